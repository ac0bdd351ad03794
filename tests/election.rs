//! Leader election on a real etcd (a 3-member cluster on loopback, Debian's etcd-server) with
//! two real agents and the fake cloudflared: failover after SIGKILL, fencing under partition
//! (sampling `/active` on both nodes every 10 ms: never two actives), graceful handover on
//! `demote` and SIGTERM while the old connector drains, quorum loss, etcd unreachable at boot.
//!
//! Counts are kept small for CI (the 20 failovers take a few minutes on a loaded
//! 2-core machine); `ELECTION_ROUNDS=20` runs the full count, which docs/benchmarks.md quotes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::agent::control_command;
use common::client::get;
use common::etcd::{self, EtcdCluster, Relay};
use common::sampler::{stats, Sampler};
use common::{
    eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeUpstream, NotifySocket, Wire, DEADLINE,
};
use http::StatusCode;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

const TUNNEL_TOKEN: &str = "eyJhIjoiZmFrZS1hY2NvdW50IiwidCI6ImZha2UtdHVubmVsIn0";
const KEY: &str = "/tunnel-agent/test/leader";
/// The lease TTL the tests run with, and the check's bound: a renewal every 1 s, its 1 s
/// timeout and the 500 ms fence margin fit in it.
const TTL: Duration = Duration::from_secs(3);

fn rounds(default: usize) -> usize {
    std::env::var("ELECTION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One host: an agent, its fake cloudflared, and its own relays to the etcd members.
struct Node {
    name: String,
    agent: Agent,
    cf: FakeCloudflared,
    relays: Vec<Relay>,
    config: ConfigText,
}

struct Setup {
    up: FakeUpstream,
    drain_ms: u64,
    grace: &'static str,
}

fn node_config(name: &str, cf: &FakeCloudflared, up: &FakeUpstream, endpoints: &[String], grace: &str) -> ConfigText {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    ConfigText::new()
        // The file's role is ignored under an election.
        .top("role = \"active\"")
        .env_secret("tunnel_token", "TA_TUNNEL_TOKEN")
        .host("app.test", &up.url())
        .raw(&cf.section(&[&format!("grace_period = \"{grace}\""), "stop_margin = \"2s\""]))
        .raw(&format!(
            "[role_election]\nbackend = \"etcd\"\nendpoints = [{}]\nkey = \"{KEY}\"\nttl = \"{}s\"\nfence_margin = \"500ms\"\npoll_interval = \"100ms\"\nhost_name = \"{name}\"\n",
            endpoints.join(", "),
            TTL.as_secs()
        ))
}

impl Setup {
    async fn new(drain_ms: u64, grace: &'static str) -> Setup {
        Setup {
            up: FakeUpstream::start(Wire::Http1).await,
            drain_ms,
            grace,
        }
    }

    async fn node(&self, name: &str, cluster: &EtcdCluster) -> Node {
        self.node_with(name, cluster, "").await
    }

    /// A node whose config has `extra` sections.
    async fn node_with(&self, name: &str, cluster: &EtcdCluster, extra: &str) -> Node {
        let mut relays = Vec::new();
        for i in 0..cluster.len() {
            relays.push(Relay::start(cluster.client_addr(i)).await);
        }
        let endpoints: Vec<String> = relays.iter().map(Relay::url).collect();
        let builder = AgentBuilder::new();
        let cf = FakeCloudflared::new(builder.dir());
        cf.set("drain_ms", &self.drain_ms.to_string());
        let builder = builder.env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN);
        let config = node_config(name, &cf, &self.up, &endpoints, self.grace).raw(extra);
        let agent = builder.start(&config).await;
        Node {
            name: name.to_owned(),
            agent,
            cf,
            relays,
            config,
        }
    }
}

impl Node {
    async fn status(&self) -> serde_json::Value {
        get(self.agent.health_addr(), "localhost", "/status", &[]).await.json()
    }

    fn cut(&self) {
        for r in &self.relays {
            r.cut();
        }
    }

    fn restore(&self) {
        for r in &self.relays {
            r.restore();
        }
    }

    /// SIGKILL, and its cloudflared's process group with it (what systemd does to the unit's
    /// cgroup when the main process dies).
    async fn crash(&mut self) {
        self.agent.signal(Signal::SIGKILL);
        let _ = self.agent.wait_exit(DEADLINE).await;
        if let Some(pid) = self.cf.started_pids().last() {
            let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }

    /// Starts the agent again on the same host directory.
    async fn restart(&mut self) {
        let next = self.agent.successor().start(&self.config).await;
        self.agent = next;
    }
}

/// Waits until exactly one node reports itself leader; returns its index.
async fn one_leader(nodes: &[&Node]) -> usize {
    eventually(DEADLINE, "exactly one elected leader", || async {
        let mut leaders = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let s = n.status().await;
            if s["role"] == "active" && s["election"]["is_leader"] == true {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_ttl() {
    if !etcd::available("a_killed_leader_is_replaced_within_ttl") {
        return;
    }
    let t0 = Instant::now();
    let cluster = EtcdCluster::start(3).await;
    let setup = Setup::new(100, "2s").await;
    let mut nodes = [
        setup.node("node-a", &cluster).await,
        setup.node("node-b", &cluster).await,
    ];
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let mut failovers = Vec::new();
    let mut elections = Vec::new();
    for _ in 0..rounds(3) {
        let leader = one_leader(&nodes.iter().collect::<Vec<_>>()).await;
        let other = 1 - leader;
        sampler.wait_only(leader, t0, DEADLINE).await;
        let killed = Instant::now();
        nodes[leader].crash().await;
        // Elected (cloudflared spawned) and then /active 200 once its tunnel connected.
        let elected = eventually(DEADLINE, "the survivor to be elected", || async {
            (nodes[other].status().await["election"]["is_leader"] == true).then(Instant::now)
        })
        .await;
        let active = sampler.wait_only(other, killed, DEADLINE).await;
        let took = active.saturating_duration_since(killed);
        failovers.push(took);
        elections.push(elected.saturating_duration_since(killed));
        // Elected = the survivor is active (cloudflared started); its /active follows once the
        // (fake) connector reports an edge connection, which is the edge's time, not ours.
        let to_elected = elected.saturating_duration_since(killed);
        assert!(
            to_elected < TTL + Duration::from_secs(1),
            "failover took {to_elected:?}, more than ttl + 1 s (/active after {took:?})"
        );
        nodes[leader].restart().await;
        sampler.set_addr(leader, nodes[leader].agent.health_addr());
        let s = nodes[leader].status().await;
        assert_eq!(s["role"], "standby", "a restarted node must not take a held key: {s}");
    }
    let (samples, overlaps) = sampler.finish().await;
    stats("failover after SIGKILL (kill -> survivor's /active 200)", failovers);
    stats("failover after SIGKILL (kill -> survivor elected)", elections);
    println!("samples {samples}, overlaps {}", overlaps.len());
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    let s = nodes[0].status().await;
    assert!(s["election"]["elections_won"].as_u64().is_some(), "{s}");
    assert_eq!(s["election"]["key"], KEY, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_fences_before_anyone_takes_over() {
    if !etcd::available("a_partitioned_leader_fences_before_anyone_takes_over") {
        return;
    }
    let t0 = Instant::now();
    let cluster = EtcdCluster::start(3).await;
    let setup = Setup::new(100, "2s").await;
    let nodes = [
        setup.node("node-a", &cluster).await,
        setup.node("node-b", &cluster).await,
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let mut gaps = Vec::new();
    for _ in 0..rounds(3) {
        let leader = one_leader(&refs).await;
        let other = 1 - leader;
        sampler.wait_only(leader, t0, DEADLINE).await;
        let cut = Instant::now();
        nodes[leader].cut();
        let taken = sampler.wait_only(other, cut, DEADLINE).await;
        let fenced = sampler
            .went_inactive(leader, cut)
            .expect("the cut-off leader's /active went 503");
        assert!(fenced < taken, "the other node was active before the old leader fenced");
        gaps.push(taken.saturating_duration_since(fenced));
        let s = nodes[leader].status().await;
        assert_eq!(s["role"], "standby", "{s}");
        assert!(s["election"]["renew_failures"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(s["election"]["elections_lost"].as_u64().unwrap_or(0) > 0, "{s}");
        nodes[leader].restore();
        // Back in touch, it follows the new leader instead of fighting it.
        eventually(DEADLINE, "the restored node to follow", || async {
            let s = nodes[leader].status().await;
            (s["election"]["leader"] == nodes[other].name.as_str() && s["election"]["state"] == "follower")
                .then_some(())
        })
        .await;
    }
    let (samples, overlaps) = sampler.finish().await;
    stats("partition: old leader's /active 503 -> new leader's /active 200", gaps);
    println!("samples {samples}, overlaps {}", overlaps.len());
    assert!(samples > 100, "too few samples: {samples}");
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_and_sigterm_hand_over_in_under_a_second_while_the_old_connector_drains() {
    if !etcd::available("demote_and_sigterm_hand_over_in_under_a_second_while_the_old_connector_drains") {
        return;
    }
    let t0 = Instant::now();
    let cluster = EtcdCluster::start(3).await;
    // The connector drains for 5 s after its SIGTERM: the handover must not wait for it.
    let setup = Setup::new(5000, "10s").await;
    let mut nodes = vec![
        setup.node("node-a", &cluster).await,
        setup.node("node-b", &cluster).await,
    ];
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let leader = one_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let other = 1 - leader;
    sampler.wait_only(leader, t0, DEADLINE).await;
    let old_pid = *nodes[leader].cf.started_pids().last().expect("leader's cloudflared");

    // An in-flight request through the leader's origin proxy, slower than the handover.
    let proxy = nodes[leader].agent.proxy_addr();
    let in_flight = tokio::spawn(async move { get(proxy, "app.test", "/slow?delay_ms=2500", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let issued = Instant::now();
    let demote = tokio::spawn(control_command(nodes[leader].agent.control_args("demote")));
    let taken = sampler.wait_only(other, issued, DEADLINE).await;
    let handover = taken.saturating_duration_since(issued);
    assert_eq!(
        nodes[leader].cf.exit_code(old_pid),
        None,
        "the old connector finished draining before the handover: {:?}",
        nodes[leader].cf.events()
    );
    assert_eq!(nodes[leader].cf.sigterms(old_pid), 1);
    let reply = in_flight.await.expect("in-flight request");
    assert_eq!(reply.status, StatusCode::OK, "the in-flight request was dropped");
    let run = demote.await.expect("demote");
    assert!(run.ok() && run.stdout.contains("resigned"), "{run:?}");
    println!(
        "graceful handover (demote -> other /active 200): {:.0} ms",
        handover.as_secs_f64() * 1000.0
    );
    assert!(handover < Duration::from_secs(1), "handover took {handover:?}");

    // SIGTERM on the new leader: the old one (a candidate again, since the key changed hands)
    // takes over as fast.
    let new_pid = *nodes[other].cf.started_pids().last().expect("new leader's cloudflared");
    let issued = Instant::now();
    nodes[other].agent.signal(Signal::SIGTERM);
    let back = sampler.wait_only(leader, issued, DEADLINE).await;
    let handover = back.saturating_duration_since(issued);
    assert_eq!(
        nodes[other].cf.exit_code(new_pid),
        None,
        "{:?}",
        nodes[other].cf.events()
    );
    println!(
        "graceful handover (SIGTERM -> other /active 200): {:.0} ms",
        handover.as_secs_f64() * 1000.0
    );
    assert!(handover < Duration::from_secs(1), "handover took {handover:?}");
    let exit = nodes[other].agent.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    assert_eq!(nodes[other].cf.sigterms(new_pid), 1, "{:?}", nodes[other].cf.events());

    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    // Refused where it would break the election: promote while another node holds the key.
    nodes[other].restart().await;
    let run = nodes[other].agent.control("promote").await;
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("holds the election key"), "{run:?}");
    nodes.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_demotes_and_restoring_it_elects_one_leader() {
    if !etcd::available("quorum_loss_demotes_and_restoring_it_elects_one_leader") {
        return;
    }
    let t0 = Instant::now();
    let mut cluster = EtcdCluster::start(3).await;
    let setup = Setup::new(100, "2s").await;
    let nodes = [
        setup.node("node-a", &cluster).await,
        setup.node("node-b", &cluster).await,
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let leader = one_leader(&refs).await;
    sampler.wait_only(leader, t0, DEADLINE).await;

    let lost = Instant::now();
    cluster.stop(1);
    cluster.stop(2);
    // Documented behaviour (on_store_loss = "demote"): the leader fences within its ttl.
    let fenced = eventually(DEADLINE, "the leader to fence without quorum", || async {
        sampler.went_inactive(leader, lost)
    })
    .await;
    let took = fenced.saturating_duration_since(lost);
    println!("quorum loss -> leader fenced: {:.0} ms", took.as_secs_f64() * 1000.0);
    assert!(took < TTL + Duration::from_secs(1), "fenced after {took:?}");
    for n in &nodes {
        let s = n.status().await;
        assert_eq!(s["role"], "standby", "{s}");
    }

    let restarted = Instant::now();
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_healthy().await;
    let healthy = Instant::now();
    // The old leader's lease outlives its fence (etcd renews every lease by its ttl when a
    // new raft leader takes over): the old leader revokes it, so one node is active again
    // within the bound docs/operations.md gives, request_timeout (ttl/3) + poll_interval + a
    // few round trips, not after the stale lease's ttl. A node may be active before the
    // health probe is through: that counts as no delay.
    let active = eventually(DEADLINE, "one node active after quorum returned", || async {
        sampler
            .timeline
            .lock()
            .unwrap()
            .iter()
            .find_map(|(t, v)| (*t >= restarted && v.iter().filter(|a| **a).count() == 1).then_some(*t))
    })
    .await;
    let took = active.saturating_duration_since(healthy);
    println!("quorum back -> one node active: {:.0} ms", took.as_secs_f64() * 1000.0);
    one_leader(&refs).await;
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    assert!(took < TTL, "one node active only {took:?} after quorum returned");
}

/// Quorum intact, but the leader's connections to the member it uses and to one other hang
/// (a black hole, not a refusal): its renewals must reach the third member before the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hung_members_of_three_do_not_fence_the_leader() {
    if !etcd::available("two_hung_members_of_three_do_not_fence_the_leader") {
        return;
    }
    let t0 = Instant::now();
    let cluster = EtcdCluster::start(3).await;
    let setup = Setup::new(100, "2s").await;
    let nodes = [
        setup.node("node-a", &cluster).await,
        setup.node("node-b", &cluster).await,
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let leader = one_leader(&refs).await;
    sampler.wait_only(leader, t0, DEADLINE).await;

    // The leader has renewed only through the first endpoint so far: it is the one in use.
    let hung = Instant::now();
    nodes[leader].relays[0].hang();
    nodes[leader].relays[1].hang();
    // An observation window, not a synchronisation: three ttls hold several renewals, each of
    // which must find the live member.
    tokio::time::sleep(TTL * 3).await;
    let s = nodes[leader].status().await;
    let fenced = sampler.went_inactive(leader, hung);
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    assert!(
        fenced.is_none(),
        "the leader fenced {:?} after two members hung although the third answered: {s}",
        fenced.map(|t| t.saturating_duration_since(hung))
    );
    assert_eq!(s["election"]["is_leader"], true, "{s}");
    assert_eq!(s["election"]["elections_lost"], 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_at_boot_means_standby_and_says_so() {
    // No etcd needed: nothing listens on the endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let up = FakeUpstream::start(Wire::Http1).await;
    let builder = AgentBuilder::new();
    let notify = NotifySocket::bind(builder.dir());
    let cf = FakeCloudflared::new(builder.dir());
    let builder = builder
        .env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN)
        .env("NOTIFY_SOCKET", &notify.path.display().to_string());
    let config = node_config("node-a", &cf, &up, &[format!("http://127.0.0.1:{port}")], "2s");
    let agent = builder.start(&config).await;
    let s = eventually(DEADLINE, "the election to report etcd unreachable", || async {
        let s: serde_json::Value = get(agent.health_addr(), "localhost", "/status", &[]).await.json();
        (s["election"]["state"] == "unreachable").then_some(s)
    })
    .await;
    assert_eq!(s["role"], "standby", "{s}");
    assert_eq!(s["role_source"], "election", "{s}");
    assert!(
        s["election"]["last_error"].as_str().unwrap_or("").contains("127.0.0.1"),
        "{s}"
    );
    eventually(DEADLINE, "STATUS= to say etcd is unreachable", || async {
        notify
            .lines()
            .iter()
            .any(|l| l.starts_with("STATUS=serving as standby (election on") && l.contains("unreachable"))
            .then_some(())
    })
    .await;
    assert!(cf.started_pids().is_empty(), "cloudflared started without the key");
    let ready = get(agent.health_addr(), "localhost", "/ready", &[]).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "a warm standby is ready: {}",
        ready.text()
    );
    let metrics = get(agent.health_addr(), "localhost", "/metrics", &[]).await.text();
    assert!(metrics.contains("tunnel_agent_election_leader 0"), "{metrics}");
    let st = agent.control("status").await;
    assert!(
        st.stdout
            .contains("election:     etcd key /tunnel-agent/test/leader is unreachable"),
        "{st:?}"
    );
}

#[test]
fn check_refuses_a_ttl_too_short_to_fence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[role_election]\nendpoints = [\"http://127.0.0.1:2379\"]\nkey = \"/k\"\nttl = \"3s\"\nfence_margin = \"1s\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("role_election.ttl") && err.contains("too short to fence"),
        "{err}"
    );
    std::fs::write(
        &path,
        "[role_election]\nendpoints = [\"http://127.0.0.1:2379\"]\nkey = \"/k\"\nttl = \"4s\"\nfence_margin = \"1s\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A local health check whose answer the test flips (Patroni's `GET /primary` answers 200 on
/// the primary and 503 on a replica). Counts the checks it answered.
struct FlipCheck {
    addr: SocketAddr,
    status: Arc<std::sync::atomic::AtomicU16>,
    answered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct FlipState {
    status: Arc<std::sync::atomic::AtomicU16>,
    answered: Arc<AtomicU64>,
}

impl FlipCheck {
    async fn start(status: u16) -> FlipCheck {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind check");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(std::sync::atomic::AtomicU16::new(status));
        let answered = Arc::new(AtomicU64::new(0));
        let state = Arc::new(FlipState {
            status: status.clone(),
            answered: answered.clone(),
        });
        let task = common::serve_fake(listener, state, |state: Arc<FlipState>, _req| async move {
            let code = state.status.load(Ordering::SeqCst);
            state.answered.fetch_add(1, Ordering::SeqCst);
            let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
            *resp.status_mut() = StatusCode::from_u16(code).expect("status");
            Ok::<_, std::convert::Infallible>(resp)
        });
        FlipCheck {
            addr,
            status,
            answered,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/primary", self.addr)
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for FlipCheck {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn follow_section(check: &FlipCheck) -> String {
    format!(
        "[role_follow]\nurl = \"{}\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 3\n",
        check.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_follows_the_check_with_its_counts() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let check = FlipCheck::start(503).await;
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    let builder = builder.env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN);
    let config = ConfigText::new()
        .top("role = \"active\"")
        .env_secret("tunnel_token", "TA_TUNNEL_TOKEN")
        .host("app.test", &up.url())
        .raw(&cf.section(&[]))
        .raw(&follow_section(&check));
    let agent = builder.start(&config).await;
    let status = || async { get(agent.health_addr(), "localhost", "/status", &[]).await.json() };
    eventually(DEADLINE, "a failing verdict", || async {
        (status().await["follow"]["passing"] == false).then_some(())
    })
    .await;
    assert_eq!(status().await["role"], "standby");
    assert!(cf.started_pids().is_empty());
    let run = agent.control("promote").await;
    assert!(!run.ok() && run.stderr.contains("follows the check"), "{run:?}");

    // 200 now: active after `rise` (2) passes in a row, not at the first one.
    let flipped = check.answered();
    check.set(200);
    cf.wait_starts(1, DEADLINE).await;
    let at_start = check.answered();
    assert!(
        at_start >= flipped + 2,
        "promoted after {} passing checks",
        at_start - flipped
    );
    eventually(DEADLINE, "/active 200", || async {
        (get(agent.health_addr(), "localhost", "/active", &[]).await.status == StatusCode::OK).then_some(())
    })
    .await;
    let s = status().await;
    assert_eq!(
        (s["role"].as_str(), s["role_source"].as_str()),
        (Some("active"), Some("follow")),
        "{s}"
    );

    // 503 again: standby after `fall` (3) failures.
    let pid = cf.started_pids()[0];
    let flipped = check.answered();
    check.set(503);
    eventually(DEADLINE, "cloudflared's SIGTERM", || async {
        (cf.sigterms(pid) == 1).then_some(())
    })
    .await;
    let at_stop = check.answered();
    assert!(
        at_stop >= flipped + 3,
        "demoted after {} failing checks",
        at_stop - flipped
    );
    eventually(DEADLINE, "standby", || async {
        (status().await["role"] == "standby").then_some(())
    })
    .await;
    let metrics = get(agent.health_addr(), "localhost", "/metrics", &[]).await.text();
    assert!(metrics.contains("tunnel_agent_follow_passing 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_election_the_node_whose_check_passes_wins() {
    if !etcd::available("with_an_election_the_node_whose_check_passes_wins") {
        return;
    }
    let t0 = Instant::now();
    let cluster = EtcdCluster::start(3).await;
    let setup = Setup::new(100, "2s").await;
    let checks = [FlipCheck::start(503).await, FlipCheck::start(200).await];
    let mut nodes = Vec::new();
    for (name, check) in ["node-a", "node-b"].into_iter().zip(&checks) {
        nodes.push(setup.node_with(name, &cluster, &follow_section(check)).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    // Only node-b's check passes: it wins, and node-a does not even campaign.
    assert_eq!(one_leader(&refs).await, 1);
    sampler.wait_only(1, t0, DEADLINE).await;
    assert_eq!(nodes[0].status().await["election"]["state"], "gated");

    // The database fails over to node-a: node-b resigns, node-a takes the key.
    let flipped = Instant::now();
    checks[1].set(503);
    checks[0].set(200);
    let taken = sampler.wait_only(0, flipped, DEADLINE).await;
    println!(
        "follow + election: check flipped -> other node's /active 200: {:.0} ms",
        taken.saturating_duration_since(flipped).as_secs_f64() * 1000.0
    );
    assert_eq!(one_leader(&refs).await, 0);
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
}

/// User + system CPU time of `pid` so far (from `/proc/PID/stat`, in clock ticks of 10 ms).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the `(comm)`: state is field 3; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

/// A measurement, not a check (run with `--ignored --nocapture`): the CPU a leader and a
/// standby spend over a minute with the default ttl (10 s) and poll interval (250 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_leader_cpu() {
    if !etcd::available("measure_leader_cpu") {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let builder = AgentBuilder::new();
        let cf = FakeCloudflared::new(builder.dir());
        let builder = builder.env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN);
        let endpoints: Vec<String> = cluster.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let config = ConfigText::new()
            .env_secret("tunnel_token", "TA_TUNNEL_TOKEN")
            .host("app.test", &up.url())
            .raw(&cf.section(&["poll_interval = \"2s\""]))
            .raw(&format!(
                "[role_election]\nendpoints = [{}]\nkey = \"{KEY}\"\nhost_name = \"{name}\"\n",
                endpoints.join(", ")
            ));
        nodes.push((builder.start(&config).await, cf));
    }
    let leader = eventually(DEADLINE, "a leader", || async {
        for (i, (a, _)) in nodes.iter().enumerate() {
            let s: serde_json::Value = get(a.health_addr(), "localhost", "/status", &[]).await.json();
            if s["election"]["is_leader"] == true {
                return Some(i);
            }
        }
        None
    })
    .await;
    let pids: Vec<i32> = nodes.iter().map(|(a, _)| a.pid().as_raw()).collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    for (i, p) in pids.iter().enumerate() {
        let ms = (cpu_ticks(*p) - before[i]) * 10;
        let role = if i == leader { "leader" } else { "standby" };
        println!(
            "{role}: {ms} ms CPU in {} s ({:.3} %)",
            window.as_secs(),
            ms as f64 / 600.0
        );
    }
}
