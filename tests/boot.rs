//! The boot sequence run in-process, driven by a signal channel instead of process signals:
//! boot, serve, reload on `Signal::Reload`, and on `Signal::Shutdown` stop everything boot
//! started (the control socket is removed last of the node's listeners) and return `Ok`; a step
//! that fails stops what the steps before it started.

mod common;

use std::path::Path;

use common::{eventually, AgentBuilder, ConfigText, FakeCloudflared, DEADLINE};
use tokio::sync::mpsc;
use tunnel_agent::control::{self, Command};
use tunnel_agent::node::Signal;

async fn status(socket: &Path) -> Option<tunnel_agent::health::Status> {
    control::call(socket, Command::Status).await.ok().and_then(|r| r.status)
}

#[tokio::test(flavor = "multi_thread")]
async fn boots_in_process_reloads_and_stops_on_the_shutdown_signal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.toml");
    let one = ConfigText::new().host("a.example.com", "http://127.0.0.1:9");
    std::fs::write(&path, one.render(dir.path())).expect("write config");
    let config = tunnel_agent::routing::load_config(&path).unwrap_or_else(|e| panic!("{e}"));

    let (signals, rx) = mpsc::channel(1);
    let agent = tokio::spawn(tunnel_agent::boot::run(path.clone(), config, rx, None));
    let socket = control::socket_path(&dir.path().join("run"));
    let s = eventually(DEADLINE, "the node answers on its control socket", || status(&socket)).await;
    assert_eq!(s.routes.count, 1, "{s:?}");
    assert!(s.ready, "{s:?}");

    let two = one.host("b.example.com", "http://127.0.0.1:9");
    std::fs::write(&path, two.render(dir.path())).expect("rewrite config");
    signals.send(Signal::Reload).await.expect("node listens");
    eventually(DEADLINE, "the reloaded table", || async {
        status(&socket).await.filter(|s| s.routes.count == 2)
    })
    .await;

    signals.send(Signal::Shutdown).await.expect("node listens");
    let result = tokio::time::timeout(DEADLINE, agent)
        .await
        .expect("run returns after Shutdown")
        .expect("run does not panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(!socket.exists(), "the control socket is removed on shutdown");
}

/// A step that fails stops what the steps before it started, last started first stopped: here
/// the config API cannot listen (the test holds its port), after the proxy, the control socket
/// and cloudflared were started.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_step_stops_what_the_steps_before_it_started() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let config = ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .env_secret("config_token", "CONFIG_TOKEN_FOR_TEST")
        .routes("source = \"config-api\"")
        .raw(&format!(
            "[config_api]\nlisten = \"{}\"\nauth_secret = \"config_token\"\n",
            taken.local_addr().expect("its address")
        ))
        .raw(&cf.section(&[]))
        .render(builder.dir());
    let mut agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", "eyJhIjoiZmFrZSJ9")
        .env("CONFIG_TOKEN_FOR_TEST", "a-config-api-token")
        .spawn(&config);
    let status = agent.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(1), "exit status {status}");
    let logs = agent.logs();
    let pos = |needle: &str| {
        logs.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {logs:#?}"))
    };
    assert!(pos("cloudflared started") < pos("shutting down"), "{logs:#?}");
    assert!(pos("shutting down") < pos("cloudflared stopped"), "{logs:#?}");
    assert!(pos("cloudflared stopped") < pos("proxy stopped"), "{logs:#?}");
    assert!(logs.iter().any(|l| l.contains("config_api.listen")), "{logs:#?}");
    // Its one SIGTERM (the fake may not have started far enough to note it itself).
    assert_eq!(
        logs.iter()
            .filter(|l| l.contains("stopping cloudflared (SIGTERM)"))
            .count(),
        1,
        "{logs:#?}"
    );
    assert!(
        !agent.dir().join("run").join("control.sock").exists(),
        "the control socket is removed"
    );
}
