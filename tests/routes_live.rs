//! Routes from a GCE metadata attribute, applied live: the real binary long-polls the fake
//! metadata server (`wait_for_change` + `last_etag`, as GCE implements it), rejects bad values
//! while the old table keeps serving, writes the effective and last good tables, and boots from
//! the last good table when the metadata server cannot answer.
//!
//! `routes.source = "file"` with SIGHUP is covered in tests/lifecycle.rs.

mod common;

use std::collections::BTreeMap;

use common::client::get;
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeMetadata, FakeUpstream, Wire, DEADLINE};
use http::StatusCode;
use nix::sys::signal::Signal;

const ROUTES_ATTRIBUTE: &str = "instance/attributes/tunnel-routes";

fn metadata_routes_config(meta: &FakeMetadata) -> ConfigText {
    ConfigText::new()
        .gcp(&format!("metadata_url = {:?}", meta.url()))
        .routes("source = \"gcp-metadata\"")
        .routes("attribute = \"tunnel-routes\"")
}

/// The `routes.json` host map format: hostname → upstream URL.
fn host_map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(h, u)| ((*h).to_owned(), (*u).to_owned()))
        .collect()
}

fn json(map: &BTreeMap<String, String>) -> String {
    serde_json::to_string(map).expect("serialise host map")
}

fn read_map(path: &std::path::Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{path:?} is not a host map ({e})"))
}

async fn status_of(agent: &Agent, host: &str) -> StatusCode {
    get(agent.proxy_addr(), host, "/", &[]).await.status
}

/// Polls until requests for `host` get `want` from the proxy.
async fn wait_route(agent: &Agent, host: &str, want: StatusCode) {
    eventually(DEADLINE, &format!("{host} to answer {want}"), || async {
        (status_of(agent, host).await == want).then_some(())
    })
    .await;
}

async fn reload_failures(agent: &Agent) -> u64 {
    let text = get(agent.health_addr(), "localhost", "/metrics", &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix("tunnel_agent_route_reload_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tunnel_agent_route_reload_failures_total in:\n{text}"))
}

async fn status(agent: &Agent) -> serde_json::Value {
    get(agent.health_addr(), "localhost", "/status", &[]).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_changes_apply_without_restart_and_bad_values_are_rejected() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let only_a = host_map(&[("a.example.com", &up.url())]);
    meta.set_attribute(ROUTES_ATTRIBUTE, &json(&only_a));
    let agent = AgentBuilder::new().start(&metadata_routes_config(&meta)).await;
    let effective = agent.dir().join("run/routes.json");
    let last_good = agent.dir().join("state/routes.json");

    assert_eq!(status_of(&agent, "a.example.com").await, StatusCode::OK);
    assert_eq!(status_of(&agent, "b.example.com").await, StatusCode::NOT_FOUND);
    assert_eq!(read_map(&effective), only_a);
    assert_eq!(read_map(&last_good), only_a);
    let s = status(&agent).await;
    assert_eq!(
        s["routes"]["source"], "gcp-metadata instance/attributes/tunnel-routes",
        "{s}"
    );
    assert_eq!(s["routes_fallback"], serde_json::Value::Null, "{s}");

    let a_and_b = host_map(&[
        ("a.example.com", &up.url()),
        ("b.example.com", &format!("{}/b", up.url())),
    ]);
    meta.set_attribute(ROUTES_ATTRIBUTE, &json(&a_and_b));
    wait_route(&agent, "b.example.com", StatusCode::OK).await;
    let echo = get(agent.proxy_addr(), "b.example.com", "/x", &[]).await.echoed();
    assert_eq!(echo.uri, "/b/x", "the new route, with its base path");
    agent
        .wait_for_log(&["routes updated from the watched source"], DEADLINE)
        .await;
    assert_eq!(read_map(&effective), a_and_b);
    assert_eq!(read_map(&last_good), a_and_b);
    let pid_before = agent.pid();

    // Not JSON, then JSON naming an unusable upstream: each rejected with a reason, counted,
    // and the table in use (and on disk) stays.
    let bad_values: [(String, &[&str]); 2] = [
        (
            format!(r#"{{"a.example.com": "{}", "c.exa"#, up.url()),
            &["tunnel-routes", "JSON"],
        ),
        (
            json(&host_map(&[("c.example.com", "ftp://files.example.com")])),
            &["c.example.com", "ftp"],
        ),
    ];
    for (i, (value, reasons)) in bad_values.iter().enumerate() {
        let failures = reload_failures(&agent).await;
        meta.set_attribute(ROUTES_ATTRIBUTE, value);
        eventually(DEADLINE, "the bad value to be counted", || async {
            (reload_failures(&agent).await == failures + 1).then_some(())
        })
        .await;
        // The counter moves just before the log line is written, and stderr is collected on
        // another thread: wait for the line rather than assume it is there.
        let rejected: Vec<String> = eventually(DEADLINE, "the rejection to be logged", || async {
            let lines: Vec<String> = agent
                .logs()
                .into_iter()
                .filter(|l| l.contains("route update rejected"))
                .collect();
            (lines.len() > i).then_some(lines)
        })
        .await;
        assert_eq!(rejected.len(), i + 1, "{rejected:#?}");
        for reason in *reasons {
            assert!(
                rejected[i].contains(reason),
                "the log says why ({reason}): {}",
                rejected[i]
            );
        }
        let s = status(&agent).await;
        assert!(
            s["last_reload_error"].as_str().is_some_and(|e| e.contains(reasons[0])),
            "{s}"
        );
        assert_eq!(status_of(&agent, "a.example.com").await, StatusCode::OK);
        assert_eq!(status_of(&agent, "b.example.com").await, StatusCode::OK);
        assert_eq!(status_of(&agent, "c.example.com").await, StatusCode::NOT_FOUND);
        assert_eq!(read_map(&effective), a_and_b);
        assert_eq!(read_map(&last_good), a_and_b);
    }

    // The watch goes on after rejections: a good value applies again.
    let a_and_c = host_map(&[("a.example.com", &up.url()), ("c.example.com", &up.url())]);
    meta.set_attribute(ROUTES_ATTRIBUTE, &json(&a_and_c));
    wait_route(&agent, "c.example.com", StatusCode::OK).await;
    assert_eq!(status_of(&agent, "b.example.com").await, StatusCode::NOT_FOUND);
    assert_eq!(read_map(&last_good), a_and_c);
    assert_eq!(agent.pid(), pid_before, "no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_during_a_metadata_outage_serves_the_last_good_table() {
    let meta = FakeMetadata::start().await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let config = metadata_routes_config(&meta);
    let only_a = host_map(&[("a.example.com", &up.url())]);
    meta.set_attribute(ROUTES_ATTRIBUTE, &json(&only_a));

    let mut first = AgentBuilder::new().start(&config).await;
    assert_eq!(status_of(&first, "a.example.com").await, StatusCode::OK);
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait_exit(DEADLINE).await.code(), Some(0));
    assert_eq!(read_map(&first.dir().join("state/routes.json")), only_a);

    // Reboot while the metadata server answers 503.
    meta.set_attributes_down(true);
    let second = first.successor().start(&config).await;
    assert_eq!(status_of(&second, "a.example.com").await, StatusCode::OK);
    let line = second.wait_for_log(&["serving the last good table"], DEADLINE).await;
    assert!(line.contains("503"), "the log says why: {line}");
    let s = status(&second).await;
    assert!(
        s["routes_fallback"].as_str().is_some_and(|f| f.contains("unreachable")),
        "{s}"
    );
    assert_eq!(
        get(second.health_addr(), "localhost", "/ready", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(read_map(&second.dir().join("run/routes.json")), only_a);

    // The value changed during the outage; once the server answers, the watch picks it up.
    let a_and_c = host_map(&[("a.example.com", &up.url()), ("c.example.com", &up.url())]);
    meta.set_attribute(ROUTES_ATTRIBUTE, &json(&a_and_c));
    meta.set_attributes_down(false);
    wait_route(&second, "c.example.com", StatusCode::OK).await;
    let s = status(&second).await;
    assert_eq!(s["routes_fallback"], serde_json::Value::Null, "{s}");
    assert_eq!(read_map(&second.dir().join("state/routes.json")), a_and_c);

    // And it keeps watching from there.
    let only_d = host_map(&[("d.example.com", &up.url())]);
    meta.set_attribute(ROUTES_ATTRIBUTE, &json(&only_d));
    wait_route(&second, "d.example.com", StatusCode::OK).await;
    assert_eq!(status_of(&second, "a.example.com").await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_without_metadata_or_last_good_table_fails_naming_both() {
    let meta = FakeMetadata::start().await;
    meta.set_attributes_down(true);
    let builder = AgentBuilder::new();
    let text = metadata_routes_config(&meta).render(builder.dir());
    let mut agent = builder.spawn(&text);
    let status = agent.wait_exit(DEADLINE).await;
    assert!(!status.success(), "{status}");
    let log = agent.logs().join("\n");
    assert!(log.contains("tunnel-routes") && log.contains("last good"), "{log}");
}
