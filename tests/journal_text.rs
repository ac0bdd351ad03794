//! `journalctl -u tunnel-agent` shows only each entry's MESSAGE by default, so the facts (which
//! route, which upstream, which secret, the error, the address) must be in the message text,
//! not only in structured fields. The agent logs JSON here, which keeps the two apart exactly
//! as the journal does (`fields.message` vs the other fields).

mod common;

use std::net::TcpListener;

use common::client::get;
use common::{AgentBuilder, ConfigText, DEADLINE};
use nix::sys::signal::Signal;

/// The `message` of every JSON log line so far.
fn messages(agent: &common::Agent) -> Vec<String> {
    agent
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_owned))
        .collect()
}

fn find<'a>(messages: &'a [String], needles: &[&str]) -> Option<&'a String> {
    messages.iter().find(|m| needles.iter().all(|n| m.contains(n)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_name_the_route_upstream_secret_address_and_error() {
    // A port with nothing listening: connect fails at once with "Connection refused".
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let upstream = format!("http://{closed}");
    let config = ConfigText::new()
        .agent("log_format = \"json\"")
        .host("down.test", &upstream);
    let builder = AgentBuilder::new();
    let text = config.render(builder.dir());
    // Spawned, not started: the harness reads addresses from text logs; these are JSON.
    let agent = builder.spawn(&text);
    let proxy: std::net::SocketAddr = common::eventually(DEADLINE, "the agent is ready", || async {
        let lines: Vec<serde_json::Value> = agent
            .logs()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let ready = lines.iter().any(|v| v["fields"]["message"] == "ready");
        let proxy = lines
            .iter()
            .find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("proxy up"))
            })
            .and_then(|v| v["fields"]["listen"].as_str()?.parse().ok());
        proxy.filter(|_| ready)
    })
    .await;
    assert_eq!(get(proxy, "down.test", "/", &[]).await.status, 502);
    let proxy = proxy.to_string();

    // A reload with a missing secret: rejected, and the message says which and why.
    let broken = config
        .clone()
        .env_secret("tok", "JOURNAL_TEST_ABSENT_VAR")
        .proxy("auth_secret = \"tok\"");
    agent.rewrite_config(&broken);
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log(&["reload rejected"], DEADLINE).await;

    let all = messages(&agent);
    let text = all.join("\n");
    assert!(!all.is_empty(), "no JSON log lines:\n{}", agent.logs().join("\n"));
    for needles in [
        &["tunnel-agent ", "(commit ", "starting with"][..],
        &["proxy up on", &proxy],
        &["routes loaded: 1 from inline"],
        &[
            "route down.test: upstream request failed",
            &upstream,
            "answering 502",
            "Connection refused",
        ],
        &["reload rejected", "\"tok\"", "JOURNAL_TEST_ABSENT_VAR"],
    ] {
        assert!(find(&all, needles).is_some(), "no message with {needles:?} in:\n{text}");
    }
}
