//! cloudflared supervision against a REAL cloudflared, named by `CLOUDFLARED_BIN` (none ships with
//! the tests any more; `tests/cloudflared_contract.rs` holds the fake to the recorded behaviour),
//! where it behaves like `tests/fakes/cloudflared`: the CLI shape the
//! agent builds, the token in the environment or in `--token-file`, its version, `/ready` with 0
//! connections and a connector id, its metrics re-exported, an unknown flag exiting 0, a crash
//! (no edge: exit 1 after ~0.6 s) and one SIGTERM draining it. With no network here it never
//! connects, so live connections, drain with traffic and reconnects stay with the fake.
//! Each test prints why and passes when the binary is absent.

mod common;

use std::time::Duration;

use common::cloudflared::{closed_port, real_cloudflared, valid_shaped_token};
use common::{eventually, Agent, AgentBuilder, ConfigText, DEADLINE};
use nix::sys::signal::Signal;

/// The `[cloudflared]` section for the real binary; `edge` keeps it running when set.
fn section(program: &std::path::Path, metrics: u16, edge: Option<u16>, extra: &[&str]) -> String {
    let mut args: Vec<String> = Vec::new();
    if let Some(port) = edge {
        args.push(format!("\"--edge\", \"127.0.0.1:{port}\""));
    }
    let mut lines = vec![
        "enabled = true".to_owned(),
        format!("path = {:?}", program.display().to_string()),
        "token_secret = \"tunnel_token\"".to_owned(),
        format!("metrics = \"127.0.0.1:{metrics}\""),
        "grace_period = \"2s\"".to_owned(),
        "poll_interval = \"100ms\"".to_owned(),
        "restart_backoff = \"100ms\"".to_owned(),
        "restart_backoff_max = \"200ms\"".to_owned(),
        format!("extra_args = [{}]", args.join(", ")),
    ];
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
    lines.retain(|l| !extra.iter().any(|e| key(e) == key(l)));
    lines.extend(extra.iter().map(|l| (*l).to_owned()));
    format!("[cloudflared]\n{}\n", lines.join("\n"))
}

struct Real {
    agent: Agent,
    metrics: u16,
    token: String,
}

/// Starts the agent supervising the real cloudflared, or `None` (after printing why) when the
/// binary is not available.
async fn start(test: &str, edge: bool, extra: &[&str]) -> Option<Real> {
    let program = match real_cloudflared() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIP {test}: {why}");
            return None;
        }
    };
    let metrics = closed_port();
    let edge = edge.then(closed_port);
    let token = valid_shaped_token();
    let config = ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .host("app.example.com", "http://127.0.0.1:9")
        .raw(&section(&program, metrics, edge, extra));
    let agent = AgentBuilder::new()
        .env("TUNNEL_TOKEN_FOR_TEST", &token)
        .env("PATH", "/usr/bin:/bin")
        .start(&config)
        .await;
    Some(Real { agent, metrics, token })
}

async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(url).await.expect("answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

fn proc_file(pid: u64, name: &str) -> String {
    std::fs::read(format!("/proc/{pid}/{name}"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

/// Waits until cloudflared's own `/ready` answers (it serves it once started), then checks for
/// 3 s that it stays up: the same pid, no restart. Returns the pid and cloudflared's `/ready`.
async fn stays_up(real: &Real) -> (u64, serde_json::Value) {
    let ready_url = format!("http://127.0.0.1:{}/ready", real.metrics);
    let own = eventually(DEADLINE, "cloudflared's /ready", || async {
        let resp = reqwest::get(&ready_url).await.ok()?;
        let code = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.ok()?;
        Some((code, body))
    })
    .await;
    assert_eq!(own.0, 503, "no edge here: {}", own.1);
    assert_eq!(own.1["readyConnections"], 0, "{}", own.1);
    let (_, status) = get_json(&real.agent.health_url("/status")).await;
    let pid = status["cloudflared"]["pid"].as_u64().expect("cloudflared running");
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let (_, s) = get_json(&real.agent.health_url("/status")).await;
        assert_eq!(s["cloudflared"]["pid"], pid, "cloudflared restarted: {s}");
        assert_eq!(s["cloudflared"]["restarts"], 0, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (pid, own.1)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_cloudflared_runs_with_the_token_in_its_environment() {
    let Some(real) = start("env-token", true, &[]).await else {
        return;
    };
    let (pid, own_ready) = stays_up(&real).await;

    // CLI shape: flags before `run`, the token nowhere in argv.
    let argv = proc_file(pid, "cmdline").replace('\n', " ");
    assert!(argv.contains(" tunnel --no-autoupdate --metrics "), "{argv}");
    assert!(argv.trim_end().ends_with(" run"), "{argv}");
    assert!(!argv.contains(&real.token), "token in argv");
    let env = proc_file(pid, "environ");
    assert!(
        env.lines().any(|l| l == format!("TUNNEL_TOKEN={}", real.token)),
        "env delivery"
    );
    assert!(
        !env.contains("TUNNEL_TOKEN_FOR_TEST="),
        "the source variable is scrubbed"
    );
    assert!(
        !env.contains("TUNNEL_AGENT_"),
        "no test hook in cloudflared's environment: {env}"
    );
    let home = format!("HOME={}", real.agent.dir().join("state").display());
    assert!(env.lines().any(|l| l == home), "HOME is the state dir: {env}");

    // Version, connector id (cloudflared has one before any connection) and /ready.
    let (_, status) = get_json(&real.agent.health_url("/status")).await;
    assert_eq!(status["cloudflared"]["version"], "2026.8.2", "{status}");
    let connector = own_ready["connectorId"]
        .as_str()
        .expect("connectorId in cloudflared's /ready");
    eventually(DEADLINE, "the connector id in /status", || async {
        let (_, s) = get_json(&real.agent.health_url("/status")).await;
        (s["cloudflared"]["connector_id"] == connector).then_some(())
    })
    .await;
    let (code, ready) = get_json(&real.agent.health_url("/ready")).await;
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["components"]["cloudflared"], "no connections", "{ready}");

    // Its metrics, re-exported after the agent's own.
    let metrics = reqwest::get(real.agent.health_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "tunnel_agent_cloudflared_info{version=\"2026.8.2\"} 1",
        "tunnel_agent_cloudflared_up 1",
        "tunnel_agent_cloudflared_connections 0",
        "\ncloudflared_",
        "\nbuild_info{",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    assert!(
        real.agent
            .logs()
            .iter()
            .any(|l| l.contains(" cloudflared:") && l.contains("Starting tunnel")),
        "cloudflared's lines re-emitted: {:#?}",
        real.agent.logs()
    );
    assert!(
        real.agent.logs().iter().all(|l| !l.contains(&real.token)),
        "token in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_cloudflared_takes_the_token_from_token_file() {
    let Some(real) = start("token-file", true, &["token_delivery = \"file\""]).await else {
        return;
    };
    // An unknown flag would make it exit 0 and an unreadable token exit 255: staying up means
    // it accepted `run --token-file FILE`.
    let (pid, _) = stays_up(&real).await;
    let argv = proc_file(pid, "cmdline").replace('\n', " ");
    let file = real.agent.dir().join("run/cloudflared.token");
    assert!(
        argv.trim_end()
            .ends_with(&format!("run --token-file {}", file.display())),
        "{argv}"
    );
    assert!(
        !proc_file(pid, "environ").contains("TUNNEL_TOKEN="),
        "file delivery sets no TUNNEL_TOKEN"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), real.token);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_sigterm_drains_the_real_cloudflared_and_it_exits_0() {
    let Some(mut real) = start("sigterm", true, &[]).await else {
        return;
    };
    stays_up(&real).await;
    let t = tokio::time::Instant::now();
    real.agent.signal(Signal::SIGTERM);
    assert!(real.agent.wait_exit(DEADLINE).await.success());
    let took = t.elapsed();
    let logs = real.agent.logs();
    let pos = |needle: &str| {
        logs.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {logs:#?}"))
    };
    assert!(pos("stopping cloudflared (SIGTERM)") < pos("Initiating graceful shutdown"));
    assert!(pos("Initiating graceful shutdown") < pos("cloudflared stopped"));
    assert!(
        logs[pos("cloudflared stopped")].contains("exited with code 0"),
        "{logs:#?}"
    );
    assert!(pos("cloudflared stopped") < pos("proxy stopped"));
    assert!(!logs.iter().any(|l| l.contains("SIGKILL")), "{logs:#?}");
    println!("agent SIGTERM -> exit with the real cloudflared drained: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_edge_the_real_cloudflared_crash_loops_and_the_agent_gives_up() {
    // Without --edge it looks the edge up in DNS, fails, exits 1 after ~0.6 s: a real crash loop.
    let extra = ["crash_loop_exits = 2", "give_up_after_exits = 3"];
    let Some(mut real) = start("crash-loop", false, &extra).await else {
        return;
    };
    let status = real.agent.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        status.code(),
        Some(1),
        "the agent hands over to systemd's restart policy"
    );
    let logs = real.agent.logs();
    let exits: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("cloudflared exited unexpectedly"))
        .collect();
    assert_eq!(exits.len(), 3, "{logs:#?}");
    assert!(exits.iter().all(|l| l.contains("exited with code 1")), "{exits:#?}");
    assert!(logs.iter().any(|l| l.contains("cloudflared is crash-looping")));
    assert!(logs.iter().any(|l| l.contains("giving up")));
    let uptimes: Vec<f64> = exits
        .iter()
        .filter_map(|l| l.split(" uptime_s=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    println!("real cloudflared without an edge: exit 1 after {uptimes:?} s");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_flag_makes_the_real_cloudflared_exit_0_which_counts_as_a_failure() {
    let Some(real) = start("unknown-flag", true, &["extra_args = [\"--no-such-flag\"]"]).await else {
        return;
    };
    real.agent
        .wait_for_log(&["cloudflared exited unexpectedly", "exited with code 0"], DEADLINE)
        .await;
    assert!(
        real.agent.logs().iter().any(|l| l.contains("Incorrect Usage")),
        "{:#?}",
        real.agent.logs()
    );
}
