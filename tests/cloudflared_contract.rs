//! cloudflared's observable contract, as recorded from a real cloudflared 2026.8.2
//! (`../shared/cloudflared-contract.md`): what the agent relies on, asserted against our fake
//! (`tests/fakes/cloudflared`) and, when `CLOUDFLARED_BIN` names one, a real binary, with the
//! same assertions. A real run skips, saying why, when the variable is not set.
//!
//! Each run gets an empty environment but `PATH` and `HOME`, as the agent gives cloudflared.

mod common;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::cloudflared::{closed_port, real_cloudflared, valid_shaped_token, FakeCloudflared};
use common::{eventually, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

/// What the real one's `/metrics` served with no edge connection (besides `go_*`, `process_*`).
const SERIES: [&str; 28] = [
    "build_info",
    "cloudflared_config_local_config_pushes",
    "cloudflared_config_local_config_pushes_errors",
    "cloudflared_icmp_total_replies",
    "cloudflared_icmp_total_requests",
    "cloudflared_orchestration_config_version",
    "cloudflared_proxy_connect_latency_bucket",
    "cloudflared_proxy_connect_latency_count",
    "cloudflared_proxy_connect_latency_sum",
    "cloudflared_proxy_connect_streams_errors",
    "cloudflared_tcp_active_sessions",
    "cloudflared_tcp_total_sessions",
    "cloudflared_tunnel_concurrent_requests_per_tunnel",
    "cloudflared_tunnel_ha_connections",
    "cloudflared_tunnel_request_errors",
    "cloudflared_tunnel_total_requests",
    "cloudflared_udp_active_sessions",
    "cloudflared_udp_total_sessions",
    "quic_client_closed_connections",
    "quic_client_congestion_state",
    "quic_client_congestion_window",
    "quic_client_latest_rtt",
    "quic_client_min_rtt",
    "quic_client_packet_too_big_dropped",
    "quic_client_sent_bytes",
    "quic_client_sent_frames",
    "quic_client_smoothed_rtt",
    "quic_client_total_connections",
];

struct Subject {
    program: PathBuf,
    home: tempfile::TempDir,
}

impl Subject {
    fn new(program: PathBuf) -> Subject {
        let home = tempfile::tempdir().expect("a HOME for cloudflared");
        Subject { program, home }
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs to its exit (within `DEADLINE`); its status and stdout + stderr.
    async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
        let out = tokio::time::timeout(DEADLINE, self.command(args, env).output())
            .await
            .unwrap_or_else(|_| panic!("{} {args:?} did not exit within {DEADLINE:?}", self.program.display()))
            .expect("run cloudflared");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status, text)
    }
}

async fn version_and_usage(s: &Subject) {
    let (status, out) = s.run(&["--version"], &[]).await;
    assert_eq!(status.code(), Some(0), "{out}");
    let first = out.lines().next().unwrap_or_default();
    let version = first
        .strip_prefix("cloudflared version ")
        .unwrap_or_else(|| panic!("{first:?}"));
    let number = version.split_whitespace().next().unwrap_or_default();
    assert!(
        number.split('.').count() == 3 && number.split('.').all(|p| p.parse::<u32>().is_ok()),
        "a calendar version: {first:?}"
    );
    assert!(
        tunnel_agent::tunnel::version::parse(&out).is_some(),
        "the agent can read it: {out:?}"
    );

    // An unknown flag: usage, and exit 0 (so the agent counts any exit it did not ask for).
    let (status, out) = s.run(&["tunnel", "--no-such-flag", "run"], &[]).await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(
        out.contains("Incorrect Usage. flag provided but not defined: -no-such-flag"),
        "{out}"
    );

    let (status, out) = s
        .run(&["tunnel", "--no-autoupdate", "run"], &[("TUNNEL_TOKEN", "notbase64")])
        .await;
    assert_eq!(status.code(), Some(255), "{out}");
    assert!(out.contains("Provided Tunnel token is not valid."), "{out}");
}

/// A valid-shaped token and an edge where nothing listens: it keeps running, `/ready` 503.
async fn running_without_an_edge(s: &Subject) {
    let metrics = format!("127.0.0.1:{}", closed_port());
    let edge = format!("127.0.0.1:{}", closed_port());
    let token = valid_shaped_token();
    let args = [
        "tunnel",
        "--no-autoupdate",
        "--metrics",
        &metrics,
        "--grace-period",
        "2s",
        "--edge",
        &edge,
        "run",
    ];
    let mut child = s
        .command(&args, &[("TUNNEL_TOKEN", &token)])
        .spawn()
        .expect("start cloudflared");
    let pid = Pid::from_raw(child.id().expect("running") as i32);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ready = eventually(DEADLINE, "its /ready", || async {
        http.get(format!("http://{metrics}/ready")).send().await.ok()
    })
    .await;
    assert_eq!(ready.status().as_u16(), 503);
    assert_eq!(ready.headers()["content-type"], "text/plain; charset=utf-8");
    let body: serde_json::Value = ready.json().await.expect("/ready is JSON");
    assert_eq!(body["status"], 503, "{body}");
    assert_eq!(body["readyConnections"], 0, "{body}");
    assert!(body["connectorId"].as_str().is_some_and(|c| !c.is_empty()), "{body}");

    let health = http.get(format!("http://{metrics}/healthcheck")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.unwrap().trim(), "OK");
    let text = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in SERIES {
        assert!(
            text.lines().any(|l| !l.starts_with('#') && l.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
    assert!(
        text.lines().any(|l| l == "cloudflared_tunnel_ha_connections 0"),
        "{text}"
    );

    // Its ingress as it applies it: version -1 until the edge pushes one; with no rules, the
    // default (every request 503). The agent reads it to find rules that go around its proxy.
    let config = http.get(format!("http://{metrics}/config")).send().await.unwrap();
    assert_eq!(config.status().as_u16(), 200);
    let body = config.bytes().await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("/config is JSON");
    assert_eq!(json["version"], -1, "{json}");
    let rules = json["config"]["ingress"].as_array().expect("config.ingress");
    assert!(rules.iter().all(|r| r["service"].is_string()), "{json}");
    assert_eq!(
        rules.last().map(|r| &r["service"]),
        Some(&"http_status:503".into()),
        "{json}"
    );
    let origin = "127.0.0.1:8080".parse().unwrap();
    let audit = tunnel_agent::tunnel::remote_ingress::audit(&body, origin, true).expect("the agent reads it");
    assert_eq!((audit.version, audit.bypassing), (-1, 0), "{audit:?}");

    // SIGHUP: survived.
    kill(pid, Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP ended it");

    // One SIGTERM with no live connection: a graceful shutdown, exit 0, well within the grace.
    let asked = tokio::time::Instant::now();
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("it exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(err.contains("Initiating graceful shutdown"), "{err}");
    println!("{}: SIGTERM -> exit 0 in {:?}", s.program.display(), asked.elapsed());
}

async fn holds_the_contract(program: PathBuf) {
    let s = Subject::new(program);
    version_and_usage(&s).await;
    running_without_an_edge(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fake_cloudflared_holds_the_recorded_contract() {
    holds_the_contract(FakeCloudflared::script()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_cloudflared_holds_the_recorded_contract() {
    match real_cloudflared() {
        Ok(program) => holds_the_contract(program).await,
        Err(why) => println!("SKIP: {why}"),
    }
}
