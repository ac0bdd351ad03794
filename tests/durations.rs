//! Input that used to crash the agent (issue 18): durations without an upper bound (a deadline
//! `Instant + Duration` that overflows panics, and the release build aborts), a persisted push
//! that brought the crash back at every start, an identity token with an absurd `exp`, and a
//! metadata error body cut inside a character. Each runs the real binary.

mod common;

use std::time::Duration;

use common::agent::control_command;
use common::client::{get, try_send};
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Fault, Wire, DEADLINE};
use http::StatusCode;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const API_TOKEN: &str = "config-api-token-for-durations";

/// `"300000000000y"`: parses (humantime), and overflows any `Instant` it is added to.
const ABSURD: &str = "300000000000y";

fn api_config() -> ConfigText {
    ConfigText::new()
        .env_secret("config_token", "CONFIG_API_TOKEN_FOR_TEST")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\n")
}

async fn start_api(builder: AgentBuilder) -> Agent {
    builder
        .env("CONFIG_API_TOKEN_FOR_TEST", API_TOKEN)
        .start(&api_config())
        .await
}

/// A table of one rule for `host`, served by `upstream`, with `timeouts`.
fn table(version: u64, host: &str, upstream: &str, timeouts: Value) -> Value {
    json!({
        "version": version,
        "rules": [{ "hostnames": [host], "backends": [{ "url": upstream }], "timeouts": timeouts }],
    })
}

async fn push(agent: &Agent, body: &Value) -> (u16, Value) {
    agent.put_config(API_TOKEN, body, Duration::from_secs(120)).await
}

async fn status(agent: &Agent) -> Value {
    get(agent.health_addr(), "localhost", "/status", &[]).await.json()
}

async fn metric(agent: &Agent, name: &str) -> u64 {
    let text = get(agent.health_addr(), "localhost", "/metrics", &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// A proxied request that must get an HTTP answer: a dropped connection is the crash.
async fn answer(agent: &Agent, host: &str) -> StatusCode {
    let req = common::client::request(http::Method::GET, host, "/")
        .body(common::body::empty())
        .expect("request");
    match try_send(agent.proxy_addr(), req).await {
        Ok(reply) => reply.status,
        Err(e) => panic!("no answer for {host} (the request crashed its task): {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_duration_over_its_bound_is_refused_naming_the_rule_and_field() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = start_api(AgentBuilder::new()).await;

    for (field, value) in [("request", ABSURD), ("backendRequest", "25h")] {
        let (code, body) = push(&agent, &table(1, "a.test", &up.url(), json!({ field: value }))).await;
        assert_eq!(code, 400, "{field} = {value}: {body}");
        let problem = &body["problems"][0];
        assert_eq!(problem["key"], format!("rules[0].timeouts.{field}"), "{body}");
        let reason = problem["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("longer than the bound of 1day"), "{body}");
    }
    // Nothing was applied, and the agent serves.
    assert_eq!(answer(&agent, "a.test").await, StatusCode::NOT_FOUND);
    // At the bound it is accepted and used.
    let (code, body) = push(&agent, &table(2, "a.test", &up.url(), json!({ "request": "24h" }))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(answer(&agent, "a.test").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_table_with_an_unbounded_duration_is_not_served_and_the_agent_stays_up() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    // What main accepted and persisted for such a push.
    std::fs::create_dir_all(builder.dir().join("state")).expect("state dir");
    let body = table(9, "a.test", &up.url(), json!({ "request": ABSURD }));
    builder.file("state/config-api.json", &body.to_string());
    let agent = start_api(builder).await;

    assert_eq!(answer(&agent, "a.test").await, StatusCode::NOT_FOUND);
    let s = status(&agent).await;
    let why = s["routes_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("no longer valid"), "{s}");
    agent
        .wait_for_log(&["rules[0].timeouts.request", "bound of 1day"], DEADLINE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_every_duration_over_its_bound_with_file_key_and_bound() {
    let builder = AgentBuilder::new();
    let path = builder.file(
        "absurd.toml",
        &format!(
            r#"[agent]
shutdown_grace = "{ABSURD}"
upgrade_drain = "2m"
[proxy]
auth_overlap = "{ABSURD}"
upstream_timeout = "2days"
[gcp]
metadata_timeout = "2h"
[cloudflared]
stable_after = "{ABSURD}"
[role_follow]
url = "http://127.0.0.1:1/"
interval = "{ABSURD}"
[[route]]
hostnames = ["a.test"]
upstream = "http://127.0.0.1:9"
timeouts = {{ request = "{ABSURD}" }}
"#
        ),
    );
    let run = control_command(vec!["check".into(), "-c".into(), path.display().to_string()]).await;
    assert_eq!(run.status.code(), Some(78), "{}", run.output());
    let out = run.output();
    for (line, key, bound) in [
        (2, "agent.shutdown_grace", "1h"),
        (3, "agent.upgrade_drain", "1m"),
        (5, "proxy.auth_overlap", "1day"),
        (6, "proxy.upstream_timeout", "1day"),
        (8, "gcp.metadata_timeout", "1h"),
        (10, "cloudflared.stable_after", "1day"),
        (13, "role_follow.interval", "1h"),
        (17, "route[0].timeouts.request", "1day"),
    ] {
        let want = format!("absurd.toml:{line}:");
        assert!(
            out.lines()
                .any(|l| l.contains(&want) && l.contains(key) && l.contains(&format!("bound of {bound}"))),
            "{key} (line {line}, bound {bound}) not reported:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_served_by_two_runs_that_crashed_is_quarantined_at_the_next_boot() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut agent = start_api(AgentBuilder::new()).await;
    let (code, body) = push(&agent, &table(5, "a.test", &up.url(), json!({}))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(answer(&agent, "a.test").await, StatusCode::OK);
    let trial = agent.dir().join("state/config-api.json.trial");
    assert!(trial.exists(), "a new table is on trial");

    // A crash (SIGKILL leaves what an abort leaves), then a run that serves it again and
    // crashes too.
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(DEADLINE).await;
    let mut agent = start_api(agent.successor()).await;
    assert_eq!(
        answer(&agent, "a.test").await,
        StatusCode::OK,
        "one crash is not enough"
    );
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(DEADLINE).await;

    let agent = start_api(agent.successor()).await;
    assert_eq!(
        answer(&agent, "a.test").await,
        StatusCode::NOT_FOUND,
        "not served again"
    );
    let state = agent.dir().join("state");
    assert!(state.join("config-api.json.quarantined").exists());
    assert!(!state.join("config-api.json").exists() && !trial.exists());
    let s = status(&agent).await;
    assert!(
        s["routes_fallback"]
            .as_str()
            .unwrap_or_default()
            .contains("quarantined"),
        "{s}"
    );
    assert_eq!(metric(&agent, "tunnel_agent_routes_quarantined_total").await, 1);
    agent
        .wait_for_log(&["ERROR", "config-api.json.quarantined"], DEADLINE)
        .await;
    // The controller's next push is served (the stored version went with the table).
    let (code, body) = push(&agent, &table(1, "b.test", &up.url(), json!({}))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(answer(&agent, "b.test").await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restarts_never_quarantine_a_table() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut agent = start_api(AgentBuilder::new()).await;
    let (code, body) = push(&agent, &table(5, "a.test", &up.url(), json!({}))).await;
    assert_eq!(code, 200, "{body}");
    for _ in 0..3 {
        agent.signal(Signal::SIGTERM);
        assert!(agent.wait_exit(DEADLINE).await.success());
        assert!(
            !agent.dir().join("state/config-api.json.trial").exists(),
            "a clean stop confirms the table"
        );
        agent = start_api(agent.successor()).await;
        assert_eq!(answer(&agent, "a.test").await, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_token_with_an_absurd_exp_is_used_not_a_crash() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    // exp = now + 300 billion years: fits the JWT's u64, not an Instant.
    meta.set_token_lifetime(Duration::from_secs(300_000_000_000 * 31_557_600));
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .routes("upstream_auth = \"gcp-id-token\"")
        .proxy("allow_id_tokens_over_http = true")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    assert_eq!(answer(&agent, "app.test").await, StatusCode::OK);
    let echo = get(agent.proxy_addr(), "app.test", "/", &[]).await.echoed();
    assert!(echo.header("authorization").is_some_and(|a| a.starts_with("Bearer ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_error_body_of_multibyte_characters_is_cut_on_a_character() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    meta.set_fault(Fault::ServerErrorMultibyte);
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .routes("upstream_auth = \"gcp-id-token\"")
        .proxy("allow_id_tokens_over_http = true")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    // No token: the agent's own 503, and the agent is still there for the next request.
    assert_eq!(answer(&agent, "app.test").await, StatusCode::SERVICE_UNAVAILABLE);
    // Once the server recovers, tokens flow (after the cache's retry backoff).
    meta.set_fault(Fault::None);
    eventually(DEADLINE, "a token once the metadata server recovers", || async {
        (answer(&agent, "app.test").await == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_good_table_that_no_longer_builds_does_not_keep_the_agent_down() {
    let meta = FakeMetadata::start().await;
    meta.set_attributes_down(true);
    let builder = AgentBuilder::new();
    std::fs::create_dir_all(builder.dir().join("state")).expect("state dir");
    // Written by an agent whose rules allowed it; this one refuses the scheme.
    builder.file("state/routes.json", r#"{"a.test": "ftp://127.0.0.1:9"}"#);
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .gcp("metadata_timeout = \"500ms\"")
        .agent("boot_timeout = \"1s\"")
        .routes("source = \"gcp-metadata\"")
        .routes("attribute = \"tunnel-routes\"");
    let agent = builder.start(&config).await;
    assert_eq!(answer(&agent, "a.test").await, StatusCode::NOT_FOUND);
    let s = status(&agent).await;
    let why = s["routes_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("no longer valid"), "{s}");
}

/// A one-member etcd JSON gateway that grants every lease a TTL of `i64::MAX` seconds (sent as
/// a string, as the gateway sends 64-bit numbers): just enough of it to win an election.
async fn etcd_granting_forever() -> (String, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let holder = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let task = common::serve_fake(listener, holder, |holder, req| async move {
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await?.to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let forever = i64::MAX.to_string();
        let reply = match path.as_str() {
            "/v3/lease/grant" => json!({ "ID": "7", "TTL": forever }),
            "/v3/lease/keepalive" => json!({ "result": { "ID": "7", "TTL": forever } }),
            "/v3/kv/txn" => {
                let put = &body["success"][0]["request_put"]["value"];
                let mut held = holder.lock().unwrap();
                if held.is_none() {
                    *held = put.as_str().map(str::to_owned);
                }
                json!({ "succeeded": *held == put.as_str().map(str::to_owned) })
            }
            "/v3/kv/range" => match holder.lock().unwrap().clone() {
                Some(v) => json!({ "kvs": [{ "value": v, "lease": "7" }], "count": "1" }),
                None => json!({}),
            },
            _ => json!({}),
        };
        Ok::<_, hyper::Error>(http::Response::new(Full::new(bytes::Bytes::from(reply.to_string()))))
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_for_ever_does_not_crash_the_election() {
    let (url, _etcd) = etcd_granting_forever().await;
    let config = ConfigText::new().raw(&format!(
        "[role_election]\nendpoints = [{url:?}]\nkey = \"/k\"\nttl = \"3s\"\nfence_margin = \"500ms\"\npoll_interval = \"100ms\"\nhost_name = \"a\"\n"
    ));
    let agent = AgentBuilder::new().start(&config).await;
    eventually(DEADLINE, "the node to win the election and be active", || async {
        let s = status(&agent).await;
        (s["role"] == "active").then_some(())
    })
    .await;
}
