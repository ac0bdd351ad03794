//! Upgrade in place (`tunnel-agent upgrade`, SIGUSR2): the agent re-executes into the binary now
//! at its path, on the same PID, keeping its sockets, cloudflared and state; a new binary that
//! fails its checks is refused, and one that cannot take over returns to the previous binary.
//!
//! The "new build" is a copy of the built binary installed over the one the agent runs, as dpkg
//! does (a new file renamed over the old): a different file, the same code. The broken builds are
//! shell wrappers around it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeUpstream, Wire, DEADLINE};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

const TOKEN: &str = "eyJhIjoiYWNjb3VudCIsInQiOiJ0dW5uZWwiLCJzIjoic2VjcmV0In0=";

/// Installs `contents` (or the built binary) at `path` the way dpkg does: written beside it,
/// then renamed over it, so a running process keeps its old file.
fn install(path: &Path, from: Option<&str>) {
    let tmp = path.with_extension("dpkg-new");
    match from {
        Some(script) => std::fs::write(&tmp, script).expect("write the new binary"),
        None => {
            std::fs::copy(env!("CARGO_BIN_EXE_tunnel-agent"), &tmp).expect("copy the built binary");
        }
    }
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename over the binary");
}

/// An agent running a copy of the built binary from its own directory, with the fake
/// cloudflared and one route to `upstream`.
async fn start(upstream: &FakeUpstream, extra: &str) -> (Agent, FakeCloudflared, PathBuf) {
    start_as(upstream, extra, true).await
}

/// [`start`]; `tunnel`: whether it is to run cloudflared (false for a standby).
async fn start_as(upstream: &FakeUpstream, extra: &str, tunnel: bool) -> (Agent, FakeCloudflared, PathBuf) {
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let bin_dir = builder.dir().join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let binary = bin_dir.join("tunnel-agent");
    install(&binary, None);
    let config = ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .host("app.test", &upstream.url())
        .agent("upgrade_drain = \"5s\"")
        .raw(&cf.section(&[]))
        .raw(extra);
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .program(&binary)
        .start(&config)
        .await;
    if tunnel {
        cf.wait_starts(1, DEADLINE).await;
    }
    let health = agent.health_addr();
    common::eventually(DEADLINE, "the tunnel connected (/ready 200)", || async move {
        (common::client::get(health, "localhost", "/ready", &[]).await.status == 200).then_some(())
    })
    .await;
    (agent, cf, binary)
}

/// What a load loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests retried once on a fresh connection after a reused one closed before any answer
    /// (what every HTTP client does for an idempotent request, RFC 9112 §9.3.1).
    retried: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.errors.lock().unwrap().push(what);
    }
}

/// One GET on `sender`; `Err` with why when no response came.
async fn get_on(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, path: &str) -> Result<u16, String> {
    let req = http::Request::get(path)
        .header("host", "app.test")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != 200 {
        return Err(format!("answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(status)
}

async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Requests on one keep-alive connection, reconnecting when the server closes it; a request
/// that fails on a reused connection before any answer is retried once on a new one.
async fn keep_alive_loop(addr: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = sender.is_some();
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail(format!("keep-alive {e}"));
                    continue;
                }
            },
        };
        let result = match get_on(&mut s, "/").await {
            Err(_) if reused => {
                tally.retried.fetch_add(1, Ordering::Relaxed);
                match connect(addr).await {
                    Ok(fresh) => {
                        s = fresh;
                        get_on(&mut s, "/").await
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match result {
            Ok(200) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                sender = Some(s);
            }
            Ok(code) => tally.fail(format!("keep-alive answered {code}")),
            Err(e) => tally.fail(format!("keep-alive {e}")),
        }
    }
}

/// A new connection for every request; records connect + first byte of each.
async fn new_connection_loop(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    waits: Arc<std::sync::Mutex<Vec<Duration>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = match connect(addr).await {
            Ok(mut s) => get_on(&mut s, "/").await,
            Err(e) => Err(e),
        };
        waits.lock().unwrap().push(started.elapsed());
        match result {
            Ok(200) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(code) => tally.fail(format!("new connection answered {code}")),
            Err(e) => tally.fail(format!("new connection {e}")),
        }
    }
}

/// `/ready` every 10 ms: every answer that is not 200, and every request that got none.
async fn ready_sampler(addr: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let result = match connect(addr).await {
            Ok(mut s) => {
                let req = http::Request::get("/ready")
                    .header("host", "localhost")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                match s.send_request(req).await {
                    Ok(resp) if resp.status() == 200 => Ok(200),
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let status = common::client::get(addr, "localhost", "/status", &[]).await.text();
                        Err(format!("answered {code}: {} {status}", String::from_utf8_lossy(&body)))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(200) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(code) => tally.fail(format!("/ready answered {code}")),
            Err(e) => tally.fail(format!("/ready {e}")),
        }
    }
}

fn status(agent: &Agent) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(["status", "--json", "-c"])
        .arg(agent.config_path())
        .output()
        .expect("run status");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    reply["status"].clone()
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_pid_cloudflared_and_every_request() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let (agent, cf, binary) = start(&upstream, "").await;
    let cf_pid = cf.started_pids()[0];
    let before = status(&agent);
    assert_eq!(before["agent"]["upgrades"], 0);

    let (tally, ready, stop) = (
        Arc::new(Tally::default()),
        Arc::new(Tally::default()),
        Arc::new(AtomicBool::new(false)),
    );
    let waits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for _ in 0..2 {
        load.push(tokio::spawn(keep_alive_loop(
            agent.proxy_addr(),
            tally.clone(),
            stop.clone(),
        )));
    }
    load.push(tokio::spawn(new_connection_loop(
        agent.proxy_addr(),
        tally.clone(),
        stop.clone(),
        waits.clone(),
    )));
    load.push(tokio::spawn(ready_sampler(
        agent.health_addr(),
        ready.clone(),
        stop.clone(),
    )));
    // Load runs before the upgrade.
    common::eventually(DEADLINE, "requests before the upgrade", || async {
        (tally.ok.load(Ordering::Relaxed) > 50).then_some(())
    })
    .await;

    install(&binary, None);
    let upgraded = agent.control("upgrade").await;
    assert!(
        upgraded.ok(),
        "upgrade failed: {}\n{}",
        upgraded.output(),
        agent.logs().join("\n")
    );
    assert!(upgraded.output().contains("upgraded in place"), "{}", upgraded.output());
    let after_ok = tally.ok.load(Ordering::Relaxed);
    common::eventually(DEADLINE, "requests after the upgrade", || async {
        (tally.ok.load(Ordering::Relaxed) > after_ok + 50).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }

    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests: {errors:?}");
    let ready_errors = ready.errors.lock().unwrap().clone();
    assert!(ready_errors.is_empty(), "/ready not 200: {ready_errors:?}");
    let mut waits = waits.lock().unwrap().clone();
    eprintln!(
        "upgrade under load: {} requests ok ({} retried on a closed keep-alive), {} /ready samples ok; new connection + first byte p50 {:?} p99 {:?} max {:?}",
        tally.ok.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed),
        ready.ok.load(Ordering::Relaxed),
        percentile(&mut waits, 0.5),
        percentile(&mut waits, 0.99),
        percentile(&mut waits, 1.0),
    );

    let after = status(&agent);
    assert_eq!(after["agent"]["upgrades"], 1, "{after:#}");
    assert_eq!(after["agent"]["last_upgrade"]["result"], "completed");
    assert!(after["agent"]["last_upgrade"]["held_ms"].as_u64().is_some());
    assert_eq!(after["role"], before["role"]);
    assert_eq!(cf.started_pids(), vec![cf_pid], "cloudflared was not restarted");
    assert_eq!(cf.sigterms(cf_pid), 0, "cloudflared got no signal");
    assert_eq!(
        after["cloudflared"]["pid"], cf_pid,
        "the new image supervises the same cloudflared"
    );
    // The agent is the same process: the harness's child is still running.
    assert!(nix::sys::signal::kill(agent.pid(), None).is_ok());
    let logs = agent.logs().join("\n");
    assert!(logs.contains("upgraded in place"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_fails_its_checks_is_refused_and_nothing_changes() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let (agent, cf, binary) = start(&upstream, "").await;
    install(&binary, Some("#!/bin/sh\necho 'this build is broken' >&2\nexit 3\n"));
    let refused = agent.control("upgrade").await;
    assert!(!refused.ok(), "{}", refused.output());
    assert!(refused.output().contains("upgrade refused"), "{}", refused.output());
    assert!(
        refused.output().contains("this build is broken"),
        "the reason is shown: {}",
        refused.output()
    );
    let s = status(&agent);
    assert_eq!(s["agent"]["refused"], 1);
    assert_eq!(s["agent"]["upgrades"], 0);
    assert_eq!(s["agent"]["last_upgrade"]["result"], "refused");
    let metrics = common::client::get(agent.health_addr(), "localhost", "/metrics", &[])
        .await
        .text();
    assert!(
        metrics.contains("tunnel_agent_upgrades_total{result=\"refused\"} 1"),
        "{metrics}"
    );
    assert_eq!(cf.started_pids().len(), 1);
    let reply = common::client::get(agent.proxy_addr(), "app.test", "/", &[]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_image_that_cannot_read_the_state_returns_to_the_previous_binary() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let (agent, cf, binary) = start(&upstream, "").await;
    let cf_pid = cf.started_pids()[0];
    // Passes the checks (it is the real binary), but when started by the upgrade it garbles the
    // state's variable: the new image cannot take over.
    let real = binary.with_file_name("tunnel-agent-real");
    std::fs::copy(env!("CARGO_BIN_EXE_tunnel-agent"), &real).expect("copy");
    let wrapper = format!(
        "#!/bin/sh\nif [ -n \"$TUNNEL_AGENT_HANDOVER\" ]; then TUNNEL_AGENT_HANDOVER=garbage; export TUNNEL_AGENT_HANDOVER; fi\nexec {} \"$@\"\n",
        real.display()
    );
    install(&binary, Some(&wrapper));
    let rolled = agent.control("upgrade").await;
    assert!(!rolled.ok(), "{}", rolled.output());
    assert!(rolled.output().contains("rolled back"), "{}", rolled.output());
    let s = status(&agent);
    assert_eq!(s["agent"]["rolled_back"], 1, "{s:#}");
    assert_eq!(s["agent"]["upgrades"], 0);
    let error = s["agent"]["last_upgrade"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("garbage"), "the reason names what was wrong: {error}");
    assert_eq!(cf.started_pids(), vec![cf_pid], "cloudflared untouched by the rollback");
    assert_eq!(s["cloudflared"]["pid"], cf_pid);
    let reply = common::client::get(agent.proxy_addr(), "app.test", "/", &[]).await;
    assert_eq!(reply.status, 200);
    // The agent goes on: a later upgrade to a good binary works.
    install(&binary, None);
    let upgraded = agent.control("upgrade").await;
    assert!(upgraded.ok(), "{}", upgraded.output());
}

/// An elected leader on a real etcd keeps its key (the same lease) through the upgrade, the
/// standby never takes it, and `/active` (sampled every 10 ms on both) is never 200 on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elected_leader_keeps_its_lease_through_an_upgrade() {
    use common::etcd::{self, EtcdCluster};
    use common::sampler::Sampler;
    if !etcd::available("an_elected_leader_keeps_its_lease_through_an_upgrade") {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let endpoints: Vec<String> = (0..cluster.len())
        .map(|i| format!("\"http://{}\"", cluster.client_addr(i)))
        .collect();
    let election = |name: &str| {
        format!(
            "[role_election]\nbackend = \"etcd\"\nendpoints = [{}]\nkey = \"/tunnel-agent/test/upgrade\"\nttl = \"3s\"\nfence_margin = \"500ms\"\npoll_interval = \"100ms\"\nhost_name = \"{name}\"\n",
            endpoints.join(", ")
        )
    };
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let (a, cf_a, binary) = start(&upstream, &election("node-a")).await;
    common::eventually(DEADLINE, "node-a elected", || async {
        (status(&a)["election"]["is_leader"] == true).then_some(())
    })
    .await;
    let (b, _cf_b, _) = start_as(&upstream, &election("node-b"), false).await;
    let sampler = Sampler::start(vec![a.health_addr(), b.health_addr()]);
    let before = status(&a);
    let lease = before["election"]["lease_id"].clone();
    assert!(lease.is_string(), "{before:#}");
    let cf_pid = cf_a.started_pids()[0];

    install(&binary, None);
    let upgraded = a.control("upgrade").await;
    assert!(upgraded.ok(), "{}\n{}", upgraded.output(), a.logs().join("\n"));
    // Past a whole ttl after the exec: the resumed leader renewed the same lease meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (samples, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    assert!(samples > 100, "{samples} samples");
    let after = status(&a);
    assert_eq!(after["election"]["is_leader"], true, "{after:#}");
    assert_eq!(after["election"]["lease_id"], lease, "the same lease: {after:#}");
    assert_eq!(after["role"], "active");
    assert_eq!(after["agent"]["upgrades"], 1);
    assert_eq!(status(&b)["role"], "standby");
    assert_eq!(cf_a.started_pids(), vec![cf_pid], "cloudflared kept");
    eprintln!("leader upgraded under an etcd election: {samples} samples of /active on both, none both 200");
}

/// A pushed table (the gateway controller's) is the table after the upgrade, with its version:
/// `GET /config` and `/readyz` answer as before, and a stale push is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_table_and_its_version_survive_an_upgrade() {
    const API_TOKEN: &str = "config-api-token-for-the-upgrade-test";
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let binary = builder.dir().join("tunnel-agent");
    install(&binary, None);
    let config = ConfigText::new()
        .env_secret("tunnel_token", "TUNNEL_TOKEN_FOR_TEST")
        .env_secret("config_token", "CONFIG_API_TOKEN_FOR_TEST")
        .routes("source = \"config-api\"")
        .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\n")
        .raw(&cf.section(&[]));
    let agent = builder
        .env("TUNNEL_TOKEN_FOR_TEST", TOKEN)
        .env("CONFIG_API_TOKEN_FOR_TEST", API_TOKEN)
        .program(&binary)
        .start(&config)
        .await;
    let table = |version: u64| {
        serde_json::json!({
            "version": version,
            "rules": [{ "hostnames": ["pushed.test"], "backends": [{ "url": upstream.url() }] }],
        })
    };
    let (code, _) = agent.put_config(API_TOKEN, &table(7), DEADLINE).await;
    assert_eq!(code, 200);
    let cf_pids = cf.wait_starts(1, DEADLINE).await;

    install(&binary, None);
    let upgraded = agent.control("upgrade").await;
    assert!(upgraded.ok(), "{}\n{}", upgraded.output(), agent.logs().join("\n"));

    let applied: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/config", agent.config_api_addr()))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("GET /config")
        .json()
        .await
        .expect("JSON");
    assert_eq!(applied["version"], 7, "{applied}");
    let readyz = reqwest::get(format!("http://{}/readyz", agent.config_api_addr()))
        .await
        .expect("/readyz");
    assert_eq!(readyz.status(), 200);
    let reply = common::client::get(agent.proxy_addr(), "pushed.test", "/", &[]).await;
    assert_eq!(reply.status, 200, "the pushed route serves: {}", reply.text());
    let (stale, _) = agent.put_config(API_TOKEN, &table(6), DEADLINE).await;
    assert_eq!(stale, 409, "older than the carried version");
    assert_eq!(status(&agent)["routes"]["version"], 7);
    assert_eq!(cf.started_pids(), cf_pids, "cloudflared kept");
}

/// SIGHUPs all through an upgrade (a `systemctl reload` racing the package's postinst): the ones
/// that arrive between the exec and the new image's handlers wait for them instead of ending
/// the process (SIGHUP's default action), and the upgrade completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_the_exec_wait_for_the_new_image() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let (agent, cf, binary) = start(&upstream, "").await;
    let cf_pid = cf.started_pids()[0];
    install(&binary, None);
    let pid = agent.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sent
        })
    };
    let upgraded = agent.control("upgrade").await;
    stop.store(true, Ordering::Relaxed);
    let sent = hammer.await.expect("hammer");
    assert!(upgraded.ok(), "{}\n{}", upgraded.output(), agent.logs().join("\n"));
    assert!(
        nix::sys::signal::kill(pid, None).is_ok(),
        "the agent survived {sent} SIGHUPs"
    );
    assert!(sent > 20, "signals were sent throughout the upgrade ({sent})");
    let s = status(&agent);
    assert_eq!(s["agent"]["upgrades"], 1, "{s:#}");
    assert_eq!(cf.started_pids(), vec![cf_pid]);
    // The new image handled SIGHUP as a reload.
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = agent
        .logs()
        .iter()
        .filter(|l| l.contains("configuration reloaded"))
        .count();
    common::eventually(DEADLINE, "a reload by the new image", || async {
        (agent
            .logs()
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count()
            > reloaded)
            .then_some(())
    })
    .await;
}

/// systemd sees the upgrade as a reload of the same main process: `RELOADING=1` from the old
/// image before it drains, `READY=1` from the new one once it serves; `tunnel-agent status`
/// says which build runs and how its last upgrade went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_sees_reloading_then_ready_and_status_tells_the_upgrade() {
    let upstream = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let notify = common::NotifySocket::bind(builder.dir());
    let binary = builder.dir().join("tunnel-agent");
    install(&binary, None);
    let config = ConfigText::new().host("app.test", &upstream.url());
    let agent = builder
        .env("NOTIFY_SOCKET", &notify.path.display().to_string())
        .program(&binary)
        .start(&config)
        .await;
    notify.wait_for("READY=1", 1, DEADLINE).await;
    install(&binary, None);
    let upgraded = agent.control("upgrade").await;
    assert!(upgraded.ok(), "{}", upgraded.output());
    notify.wait_for("READY=1", 2, DEADLINE).await;
    let lines = notify.lines();
    let reloading = lines.iter().position(|l| l == "RELOADING=1").expect("RELOADING=1 sent");
    let ready_again = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| *l == "READY=1")
        .map(|(i, _)| i)
        .nth(1)
        .expect("a second READY=1");
    assert!(
        reloading < ready_again,
        "RELOADING=1 before the new image's READY=1: {lines:?}"
    );
    let summary = agent.control("status").await;
    assert!(summary.ok(), "{}", summary.output());
    let line = summary
        .output()
        .lines()
        .find(|l| l.starts_with("agent:"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no agent line: {}", summary.output()));
    assert!(line.contains("1 upgrades in place"), "{line}");
    assert!(line.contains("last upgrade completed"), "{line}");
    assert!(line.contains("new connections waited"), "{line}");
}
