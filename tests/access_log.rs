//! `[proxy.access_log]`: one line per request through the real agent, as an operator reads it
//! after a 502: which route, which upstream, how long, how many bytes, which Cloudflare ray;
//! never a token, never the query unless asked for.

mod common;

use std::net::TcpListener;

use common::client::{self, get};
use common::{body, Agent, AgentBuilder, ConfigText, FakeUpstream, Wire, DEADLINE};
use http::Method;
use nix::sys::signal::Signal;
use serde_json::Value;

const INTERNAL_TOKEN: &str = "internal-4b1d-access-log-token";
const USER_CREDENTIAL: &str = "Bearer end-user-credential-77";
const QUERY_SECRET: &str = "query-secret-9f2e";

/// Every access-log line so far: the JSON object after `access: ` in the agent's text log.
fn access_lines(agent: &Agent) -> Vec<Value> {
    agent
        .logs()
        .iter()
        .filter_map(|l| l.split_once(" access: ").map(|(_, rest)| rest.to_owned()))
        .filter_map(|rest| {
            serde_json::Deserializer::from_str(&rest)
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .collect()
}

/// Waits for the access line whose `path` is `path`.
async fn line_for(agent: &Agent, path: &str) -> Value {
    common::eventually(DEADLINE, &format!("an access line for {path}"), || async {
        access_lines(agent).into_iter().find(|v| v["path"] == path)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_per_request_with_its_facts_and_no_secret() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new()
        .internal_auth("TA_INTERNAL_TOKEN")
        .proxy("access_log = { enabled = true }")
        .host("app.test", &up.url());
    let agent = AgentBuilder::new()
        .env("TA_INTERNAL_TOKEN", INTERNAL_TOKEN)
        .start(&config)
        .await;
    let addr = agent.proxy_addr();

    let reply = get(
        addr,
        "app.test",
        &format!("/items/42?token={QUERY_SECRET}"),
        &[
            ("x-internal-auth-token", INTERNAL_TOKEN),
            ("authorization", USER_CREDENTIAL),
            ("cf-ray", "8c1f2a3b4c5d6e7f-LHR"),
            ("cf-connecting-ip", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let line = line_for(&agent, "/items/42").await;
    assert_eq!(line["route"], "app.test", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["upstream_status"], 200, "{line}");
    assert_eq!(line["upstream"], up.url(), "{line}");
    assert_eq!(line["upstream_addr"], up.addr().to_string(), "{line}");
    assert_eq!(line["bytes_in"], 0, "{line}");
    assert_eq!(line["bytes_out"], reply.body.len() as u64, "{line}");
    assert_eq!(line["cf_ray"], "8c1f2a3b4c5d6e7f-LHR", "{line}");
    assert_eq!(line["client_ip"], "203.0.113.7", "{line}");
    assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
    let time = line["time"].as_str().unwrap_or_default();
    assert!(time.len() == 24 && time.ends_with('Z'), "RFC 3339 time: {line}");
    assert!(line.get("error").is_none(), "{line}");

    // A streamed upload: the bytes handed to the upstream.
    let upload = vec![b'x'; 100_000];
    let req = client::request(Method::POST, "app.test", "/sink")
        .header("x-internal-auth-token", INTERNAL_TOKEN)
        .body(body::Generated::new(upload.len() as u64, 16 * 1024, false).boxed_any())
        .expect("request");
    let reply = client::send(addr, req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let line = line_for(&agent, "/sink").await;
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["bytes_in"], upload.len() as u64, "{line}");
    assert_eq!(line["bytes_out"], reply.body.len() as u64, "{line}");

    // Refused at the door: logged (sampled like any request), with the proxy's reason.
    let refused = get(addr, "app.test", "/no-token", &[("authorization", USER_CREDENTIAL)]).await;
    assert_eq!(refused.status, 401);
    let line = line_for(&agent, "/no-token").await;
    assert_eq!(line["status"], 401, "{line}");
    assert!(line["route"].is_null() && line["upstream"].is_null(), "{line}");
    assert_eq!(line["error"], "unauthorized", "{line}");

    // The agent's own probe path is not a request anyone asked about.
    assert_eq!(get(addr, "app.test", "/healthz", &[]).await.status, 200);
    let last = get(addr, "app.test", "/last", &[("x-internal-auth-token", INTERNAL_TOKEN)]).await;
    assert_eq!(last.status, 200);
    line_for(&agent, "/last").await;
    let lines = access_lines(&agent);
    assert!(!lines.iter().any(|v| v["path"] == "/healthz"), "{lines:?}");
    assert_eq!(lines.len(), 4, "one line per request: {lines:?}");

    let all = agent.logs().join("\n");
    for secret in [INTERNAL_TOKEN, USER_CREDENTIAL, QUERY_SECRET, "end-user-credential"] {
        assert!(!all.contains(secret), "{secret:?} in the log:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_zero_still_logs_every_proxy_error() {
    let up = FakeUpstream::start(Wire::Http1).await;
    // Nothing listens there: the connect fails, the proxy answers 502.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = format!("http://{closed}");
    let config = ConfigText::new()
        .proxy("access_log = { enabled = true, sample = 0.0 }")
        .host("app.test", &up.url())
        .host("down.test", &down);
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();

    for i in 0..20 {
        assert_eq!(get(addr, "app.test", &format!("/fine/{i}"), &[]).await.status, 200);
    }
    assert_eq!(get(addr, "nowhere.test", "/unrouted", &[]).await.status, 404);
    assert_eq!(get(addr, "down.test", "/broken?x=1", &[]).await.status, 502);

    let line = line_for(&agent, "/broken").await;
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["route"], "down.test", "{line}");
    assert_eq!(line["error"], "upstream_unreachable", "{line}");
    assert_eq!(line["upstream"], down, "{line}");
    assert!(line["upstream_status"].is_null(), "no upstream answered: {line}");
    // The 502's line is written after the earlier requests' lines would have been.
    let lines = access_lines(&agent);
    assert_eq!(lines.len(), 1, "sample = 0 logs only the error: {lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_format_with_the_query_turned_on_by_a_reload() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = ConfigText::new().host("app.test", &up.url());
    let agent = AgentBuilder::new().start(&config).await;
    let addr = agent.proxy_addr();
    assert_eq!(get(addr, "app.test", "/before?a=1", &[]).await.status, 200);

    let on = config
        .clone()
        .proxy("access_log = { enabled = true, format = \"text\", query = true }");
    agent.rewrite_config(&on);
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    assert_eq!(
        get(addr, "app.test", "/after?a=1", &[("cf-ray", "77aa-SJC")])
            .await
            .status,
        200
    );
    let line = agent
        .wait_for_log(&[" access: ", "GET \"/after?a=1\" 200 "], DEADLINE)
        .await;
    for field in [
        "route=app.test",
        &format!("upstream={}", up.url()),
        &format!("upstream_addr={}", up.addr()),
        "upstream_status=200",
        "bytes_in=0",
        "cf_ray=\"77aa-SJC\"",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field:?} missing in {line}");
    }
    let all = agent.logs().join("\n");
    assert!(!all.contains("/before"), "logged before it was enabled:\n{all}");
}
