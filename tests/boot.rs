//! The boot sequence run in-process, driven by a signal channel instead of process signals:
//! boot, serve, reload on `Signal::Reload`, and on `Signal::Shutdown` stop everything boot
//! started (the control socket is removed last of the node's listeners) and return `Ok`.

mod common;

use std::path::Path;

use common::{eventually, ConfigText, DEADLINE};
use tokio::sync::mpsc;
use tunnel_agent::control::{self, Command};
use tunnel_agent::node::Signal;

async fn status(socket: &Path) -> Option<serde_json::Value> {
    control::call(socket, Command::Status).await.ok().map(|r| r.status)
}

#[tokio::test(flavor = "multi_thread")]
async fn boots_in_process_reloads_and_stops_on_the_shutdown_signal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.toml");
    let one = ConfigText::new().host("a.example.com", "http://127.0.0.1:9");
    std::fs::write(&path, one.render(dir.path())).expect("write config");
    let config = tunnel_agent::routing::load_config(&path).unwrap_or_else(|e| panic!("{e}"));

    let (signals, rx) = mpsc::channel(1);
    let agent = tokio::spawn(tunnel_agent::boot::run(path.clone(), config, rx));
    let socket = control::socket_path(&dir.path().join("run"));
    let s = eventually(DEADLINE, "the node answers on its control socket", || status(&socket)).await;
    assert_eq!(s["routes"]["count"], 1, "{s}");
    assert_eq!(s["ready"], true, "{s}");

    let two = one.host("b.example.com", "http://127.0.0.1:9");
    std::fs::write(&path, two.render(dir.path())).expect("rewrite config");
    signals.send(Signal::Reload).await.expect("node listens");
    eventually(DEADLINE, "the reloaded table", || async {
        status(&socket).await.filter(|s| s["routes"]["count"] == 2)
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
