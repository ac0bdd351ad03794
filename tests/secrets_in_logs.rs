//! Secrets never reach the log, even at `trace`: the internal token (right or wrong), the
//! identity tokens, on success and on every failure path.

mod common;

use common::client::{self, get};
use common::metadata::SIGNATURE_MARKER;
use common::ws::{WsClient, OP_TEXT};
use common::{AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Fault, Wire, DEADLINE};
use http::StatusCode;
use nix::sys::signal::Signal;

const INTERNAL_TOKEN: &str = "S3CRET-internal-9d8c7b6a";
const WRONG_TOKEN: &str = "guessed-7e6f5a4b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_trace_logs_or_status() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let h2 = FakeUpstream::start(Wire::H2c).await;
    let config = ConfigText::new()
        .agent("log_level = \"trace\"")
        .internal_auth("TA_INTERNAL_TOKEN")
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .gcp("metadata_timeout = \"500ms\"")
        .routes("upstream_auth = \"gcp-id-token\"")
        .proxy("allow_id_tokens_over_http = true")
        .host("run.test", &up.url())
        .host("broken.test", &format!("{}/broken", up.url()))
        .raw(&format!(
            "[[route]]\nhostnames = [\"grpc.test\"]\nupstream = \"{}\"\nprotocol = \"h2c\"\nupstream_auth = \"gcp-id-token\"\n",
            h2.url()
        ));
    let agent = AgentBuilder::new()
        .env("TA_INTERNAL_TOKEN", INTERNAL_TOKEN)
        .start(&config)
        .await;
    let addr = agent.proxy_addr();
    let auth = [("x-internal-auth-token", INTERNAL_TOKEN)];

    assert_eq!(get(addr, "run.test", "/", &auth).await.status, StatusCode::OK);
    assert_eq!(get(addr, "grpc.test", "/", &auth).await.status, StatusCode::OK);
    // Over HTTP/2 too: h2's own trace output describes every frame it decodes.
    let req = http::Request::builder()
        .uri("http://grpc.test/")
        .header("x-internal-auth-token", INTERNAL_TOKEN)
        .body(common::body::empty())
        .expect("request");
    assert_eq!(client::send_h2(addr, req).await.status, StatusCode::OK);
    let wrong = [("x-internal-auth-token", WRONG_TOKEN)];
    assert_eq!(
        get(addr, "run.test", "/", &wrong).await.status,
        StatusCode::UNAUTHORIZED
    );
    let mut ws = WsClient::connect(addr, "run.test", "/ws", &auth).await;
    assert_eq!(ws.handshake.status, 101);
    ws.send(OP_TEXT, b"hi").await;
    assert_eq!(ws.recv().await.payload, b"hi");

    // Failure paths log the most.
    meta.set_fault(Fault::ServerError);
    assert_eq!(
        get(addr, "broken.test", "/", &auth).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    meta.set_fault(Fault::NotGoogle);
    let r = get(addr, "broken.test", "/", &auth).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log(&["configuration reloaded"], DEADLINE).await;
    let status = client::get(agent.health_addr(), "localhost", "/status", &[]).await;

    // Trace logging really was on (so silence is not the reason nothing leaked).
    let logs = agent.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("DEBUG") && l.contains("identity token fetched")),
        "expected debug lines:\n{}",
        logs.join("\n")
    );
    let issued = meta.issued();
    assert!(issued.len() >= 2, "tokens were issued: {issued:?}");
    let mut secrets: Vec<String> = vec![INTERNAL_TOKEN.into(), WRONG_TOKEN.into(), SIGNATURE_MARKER.into()];
    for jwt in &issued {
        secrets.push(jwt.clone());
        // The payload alone identifies a token too.
        secrets.push(jwt.split('.').nth(1).expect("payload").to_owned());
    }
    for secret in &secrets {
        for line in &logs {
            assert!(!line.contains(secret.as_str()), "secret in log line: {line}");
        }
        assert!(!status.text().contains(secret.as_str()), "secret in /status");
        assert!(!r.text().contains(secret.as_str()), "secret in an error body");
    }
}
