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
    let resp = reqwest::Client::new()
        .put(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth(API_TOKEN)
        .json(body)
        .send()
        .await
        .expect("config api answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
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
async fn check_refuses_every_duration_over_its_bound_with_file_key_and_bound() {
    let builder = AgentBuilder::new();
    let path = builder.file(
        "absurd.toml",
        &format!(
            r#"[agent]
shutdown_grace = "{ABSURD}"
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
        (4, "proxy.auth_overlap", "1day"),
        (5, "proxy.upstream_timeout", "1day"),
        (7, "gcp.metadata_timeout", "1h"),
        (9, "cloudflared.stable_after", "1day"),
        (12, "role_follow.interval", "1h"),
        (16, "route[0].timeouts.request", "1day"),
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
async fn an_identity_token_with_an_absurd_exp_is_used_not_a_crash() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    // exp = now + 300 billion years: fits the JWT's u64, not an Instant.
    meta.set_token_lifetime(Duration::from_secs(300_000_000_000 * 31_557_600));
    let config = ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .routes("upstream_auth = \"gcp-id-token\"")
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
