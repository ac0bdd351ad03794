//! Leader election on the Kubernetes Lease API (`backend = "kubernetes"`), against the fake API
//! server (`common::kube_api`, which keeps `resourceVersion` conflicts, 404s and 401s as the
//! real one does) with two real agents and the fake cloudflared. `/active` of both nodes is
//! sampled every 10 ms throughout: never two 200s at once. Each node reaches the API server
//! through its own relay, so one node can be partitioned alone.

mod common;

use std::time::Duration;

use common::agent::control_command;
use common::etcd::Relay;
use common::kube_api::{FakeKubeApi, Fault};
use common::sampler::{stats, Sampler};
use common::{eventually, Agent, AgentBuilder, ConfigText, FakeCloudflared, FakeUpstream, Wire, DEADLINE};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

const TUNNEL_TOKEN: &str = "eyJhIjoiZmFrZS1hY2NvdW50IiwidCI6ImZha2UtdHVubmVsIn0";
/// The service account token the fake API server accepts. It must never reach a log line.
const SA_TOKEN: &str = "sa-token-7f3c1e9a2b";
const NAMESPACE: &str = "tunnel";
const LEASE: &str = "pair-1";
/// The lease duration: a renewal every 1 s, its 1 s timeout and the 500 ms fence margin fit.
const TTL: Duration = Duration::from_secs(3);

struct Node {
    name: String,
    agent: Agent,
    cf: FakeCloudflared,
    relay: Relay,
    config: ConfigText,
}

fn node_config(name: &str, cf: &FakeCloudflared, up: &FakeUpstream, api: &str, token_file: &str) -> ConfigText {
    ConfigText::new()
        .top("role = \"active\"")
        .env_secret("tunnel_token", "TA_TUNNEL_TOKEN")
        .host("app.test", &up.url())
        .raw(&cf.section(&["grace_period = \"10s\"", "stop_margin = \"2s\""]))
        .raw(&format!(
            "[role_election]\nbackend = \"kubernetes\"\nnamespace = \"{NAMESPACE}\"\nname = \"{LEASE}\"\napi_url = \"{api}\"\ntoken_file = {token_file:?}\nttl = \"{}s\"\nfence_margin = \"500ms\"\npoll_interval = \"100ms\"\nhost_name = \"{name}\"\n",
            TTL.as_secs()
        ))
}

/// A node whose token file holds `token`; its cloudflared drains for `drain_ms` after SIGTERM.
async fn node(name: &str, api: &FakeKubeApi, up: &FakeUpstream, token: &str, drain_ms: u64) -> Node {
    let relay = Relay::start(api.addr()).await;
    let builder = AgentBuilder::new();
    let cf = FakeCloudflared::new(builder.dir());
    cf.set("drain_ms", &drain_ms.to_string());
    let token_file = builder.file("sa-token", token);
    let builder = builder.env("TA_TUNNEL_TOKEN", TUNNEL_TOKEN);
    let config = node_config(name, &cf, up, &relay.url(), &token_file.display().to_string());
    let agent = builder.start(&config).await;
    Node {
        name: name.to_owned(),
        agent,
        cf,
        relay,
        config,
    }
}

impl Node {
    async fn status(&self) -> serde_json::Value {
        common::client::get(self.agent.health_addr(), "localhost", "/status", &[])
            .await
            .json()
    }

    /// SIGKILL, and its cloudflared's process group with it.
    async fn crash(&mut self) {
        self.agent.signal(Signal::SIGKILL);
        let _ = self.agent.wait_exit(DEADLINE).await;
        if let Some(pid) = self.cf.started_pids().last() {
            let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }

    async fn restart(&mut self) {
        self.agent = self.agent.successor().start(&self.config).await;
    }

    fn token_file(&self) -> std::path::PathBuf {
        self.agent.dir().join("sa-token")
    }
}

async fn pair(api: &FakeKubeApi, up: &FakeUpstream, drain_ms: u64) -> Vec<Node> {
    vec![
        node("node-a", api, up, SA_TOKEN, drain_ms).await,
        node("node-b", api, up, SA_TOKEN, drain_ms).await,
    ]
}

/// Waits until exactly one node reports itself the elected leader and active; its index.
async fn one_leader(nodes: &[Node]) -> usize {
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

fn no_token_in_logs(nodes: &[Node]) {
    for n in nodes {
        let logs = n.agent.logs().join("\n");
        assert!(
            !logs.contains(SA_TOKEN),
            "{}'s logs carry the service account token",
            n.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_once_its_lease_expires() {
    let t0 = Instant::now();
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let mut nodes = pair(&api, &up, 100).await;
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let mut failovers = Vec::new();
    for _ in 0..2 {
        let leader = one_leader(&nodes).await;
        let other = 1 - leader;
        sampler.wait_only(leader, t0, DEADLINE).await;
        let s = nodes[leader].status().await;
        assert_eq!(s["election"]["backend"], "kubernetes", "{s}");
        assert_eq!(s["election"]["key"], format!("{NAMESPACE}/{LEASE}"), "{s}");
        let run = nodes[leader].agent.control("status").await;
        let line = format!("election:     kubernetes Lease {NAMESPACE}/{LEASE} is leader");
        assert!(run.stdout.contains(&line), "{run:?}");
        let lease = api.lease(NAMESPACE, LEASE).expect("the Lease exists");
        assert_eq!(lease["spec"]["holderIdentity"], nodes[leader].name.as_str(), "{lease}");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], TTL.as_secs(), "{lease}");
        let killed = Instant::now();
        nodes[leader].crash().await;
        let elected = eventually(DEADLINE, "the survivor to be elected", || async {
            (nodes[other].status().await["election"]["is_leader"] == true).then(Instant::now)
        })
        .await;
        let took = elected.saturating_duration_since(killed);
        failovers.push(took);
        // The survivor waits a whole lease duration from when it last saw the record change
        // (at most a renewal interval before the kill), never less.
        assert!(
            took >= TTL - TTL / 3 - Duration::from_millis(200),
            "took the Lease after {took:?}: before it could have expired"
        );
        assert!(took < TTL + Duration::from_secs(2), "failover took {took:?}");
        sampler.wait_only(other, killed, DEADLINE).await;
        nodes[leader].restart().await;
        sampler.set_addr(leader, nodes[leader].agent.health_addr());
        let s = nodes[leader].status().await;
        assert_eq!(s["role"], "standby", "a restarted node must not take a held Lease: {s}");
    }
    let (samples, overlaps) = sampler.finish().await;
    stats("Lease failover after SIGKILL (kill -> survivor elected)", failovers);
    println!("samples {samples}, overlaps {}", overlaps.len());
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    let lease = api.lease(NAMESPACE, LEASE).expect("the Lease");
    assert!(lease["spec"]["leaseTransitions"].as_u64().unwrap_or(0) >= 2, "{lease}");
    no_token_in_logs(&nodes);
}

/// The API server hangs (accepts, never answers), refuses connections, answers 503, starts
/// answering 403 (RBAC no longer lets the account touch the Lease), or answers too slowly: the
/// leader fences within the lease duration of the fault, nobody else is active meanwhile, and
/// once the server is back exactly one node leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_hangs_refuses_or_fails_fences_the_leader_within_ttl() {
    let t0 = Instant::now();
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = pair(&api, &up, 100).await;
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let mut fences = Vec::new();
    let faults = [
        ("hang", Some(Fault::Hang)),
        ("refuse", None),
        ("503", Some(Fault::Status(503))),
        ("403", Some(Fault::Forbidden)),
        ("slow", Some(Fault::Slow(Duration::from_secs(5)))),
    ];
    for (label, fault) in faults {
        let leader = one_leader(&nodes).await;
        sampler.wait_only(leader, t0, DEADLINE).await;
        let at = Instant::now();
        match fault {
            Some(f) => api.set_fault(f),
            None => api.refuse(),
        }
        let fenced = eventually(DEADLINE, "the leader to fence", || async {
            sampler.went_inactive(leader, at)
        })
        .await;
        let took = fenced.saturating_duration_since(at);
        println!("{label}: fenced {:.0} ms after the fault", took.as_secs_f64() * 1000.0);
        fences.push(took);
        // Fenced before the lease could expire: within ttl of the last renewal sent (which
        // was before the fault), plus one sample's slack.
        assert!(took < TTL, "{label}: fenced {took:?} after the fault, not within ttl");
        let s = nodes[leader].status().await;
        assert_eq!(s["role"], "standby", "{label}: {s}");
        assert!(
            s["election"]["renew_failures"].as_u64().unwrap_or(0) > 0,
            "{label}: {s}"
        );
        api.restore().await;
    }
    one_leader(&nodes).await;
    let (samples, overlaps) = sampler.finish().await;
    stats("API server fault -> leader's /active 503", fences);
    println!("samples {samples}, overlaps {}", overlaps.len());
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
}

/// Only the leader loses the API server (its relay hangs): it fences before the other node
/// takes the Lease, and back in touch it follows instead of fighting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_fences_before_the_other_takes_the_lease() {
    let t0 = Instant::now();
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = pair(&api, &up, 100).await;
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let mut gaps = Vec::new();
    for _ in 0..2 {
        let leader = one_leader(&nodes).await;
        let other = 1 - leader;
        sampler.wait_only(leader, t0, DEADLINE).await;
        let cut = Instant::now();
        nodes[leader].relay.hang();
        let taken = sampler.wait_only(other, cut, DEADLINE).await;
        let fenced = sampler
            .went_inactive(leader, cut)
            .expect("the cut-off leader's /active went 503");
        assert!(fenced < taken, "the other node was active before the old leader fenced");
        gaps.push(taken.saturating_duration_since(fenced));
        nodes[leader].relay.restore();
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
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
}

/// `demote` clears the Lease's holder at once (client-go's release): the other node takes it
/// in well under a lease duration, while the old connector is still draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_hands_the_lease_over_at_once() {
    let t0 = Instant::now();
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = pair(&api, &up, 5000).await;
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let leader = one_leader(&nodes).await;
    let other = 1 - leader;
    sampler.wait_only(leader, t0, DEADLINE).await;
    let old_pid = *nodes[leader].cf.started_pids().last().expect("leader's cloudflared");
    let issued = Instant::now();
    let demote = tokio::spawn(control_command(nodes[leader].agent.control_args("demote")));
    let taken = sampler.wait_only(other, issued, DEADLINE).await;
    let handover = taken.saturating_duration_since(issued);
    assert_eq!(
        nodes[leader].cf.exit_code(old_pid),
        None,
        "the old connector finished draining first"
    );
    let run = demote.await.expect("demote");
    assert!(run.ok() && run.stdout.contains("resigned"), "{run:?}");
    assert!(
        api.holders().iter().any(String::is_empty),
        "no release was written: {:?}",
        api.holders()
    );
    println!(
        "Lease handover (demote -> other /active 200): {:.0} ms",
        handover.as_secs_f64() * 1000.0
    );
    assert!(handover < Duration::from_secs(1), "handover took {handover:?}");
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    // promote on the old leader is refused while the other holds the Lease.
    let run = nodes[leader].agent.control("promote").await;
    assert!(!run.ok() && run.stderr.contains("holds the election key"), "{run:?}");
}

/// A token the API server refuses: 401 is logged clearly (without the token), the node stays
/// standby and says why; once the token file holds a good token (the kubelet's rotation), the
/// next request reads it and the node is elected, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_reported_and_a_rotated_one_is_read_again() {
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = vec![node("node-a", &api, &up, "sa-token-wrong-0000", 100).await];
    let line = nodes[0]
        .agent
        .wait_for_log(&["refused the credentials", "HTTP 401"], DEADLINE)
        .await;
    assert!(!line.contains("sa-token-wrong"), "{line}");
    let s = nodes[0].status().await;
    assert_eq!(s["role"], "standby", "{s}");
    assert_eq!(s["election"]["state"], "unreachable", "{s}");
    assert!(
        s["election"]["last_error"].as_str().unwrap_or("").contains("401"),
        "{s}"
    );
    assert!(api.answered(401) > 0);
    std::fs::write(nodes[0].token_file(), format!("{SA_TOKEN}\n")).expect("rotate the token");
    one_leader(&nodes).await;
    nodes[0]
        .agent
        .wait_for_log(&["accepts the credentials again"], DEADLINE)
        .await;
    no_token_in_logs(&nodes);
}

/// RBAC does not let the account touch the Lease (a missing or wrong Role): every request is
/// 403. The node never goes active, says why once in its log (the Lease, HTTP 403 and the
/// server's reason) however often it retries, and `/status` carries the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_rbac_denies_is_never_taken_and_said_once() {
    let api = FakeKubeApi::start(SA_TOKEN).await;
    api.set_fault(Fault::Forbidden);
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = vec![node("node-a", &api, &up, SA_TOKEN, 100).await];
    let sampler = Sampler::start(vec![nodes[0].agent.health_addr()]);
    let needles = ["HTTP 403", &format!("Lease {NAMESPACE}/{LEASE}"), "cannot get resource"];
    let line = nodes[0].agent.wait_for_log(&needles, DEADLINE).await;
    println!("{line}");
    // Several campaigns later (each one a GET that is refused), still one line.
    eventually(DEADLINE, "ten refused requests", || async {
        (api.answered(403) >= 10).then_some(())
    })
    .await;
    let s = nodes[0].status().await;
    assert_eq!(s["role"], "standby", "{s}");
    assert_eq!(s["election"]["state"], "unreachable", "{s}");
    let error = s["election"]["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("403") && error.contains("forbidden") && error.contains(LEASE),
        "{s}"
    );
    let said = nodes[0].agent.logs().iter().filter(|l| l.contains("HTTP 403")).count();
    assert_eq!(said, 1, "{}", nodes[0].agent.logs().join("\n"));
    assert!(api.lease(NAMESPACE, LEASE).is_none(), "a denied node created the Lease");
    let timeline = sampler.timeline.clone();
    let (samples, _) = sampler.finish().await;
    println!(
        "samples {samples}, /active changes {:?}",
        timeline.lock().unwrap().len()
    );
    let ever_active = timeline.lock().unwrap().iter().any(|(_, v)| v[0]);
    assert!(!ever_active, "/active answered 200 while RBAC denied the Lease");
    assert!(samples > 0);
    no_token_in_logs(&nodes);
}

/// Another client writes the Lease without touching its spec (an annotation): the leader's
/// next renewal meets a 409, reads the Lease again, finds it still its own and renews with the
/// new resourceVersion; it stays leader, and the annotation is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_from_another_writer_does_not_depose_the_leader() {
    let t0 = Instant::now();
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = pair(&api, &up, 100).await;
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    let leader = one_leader(&nodes).await;
    sampler.wait_only(leader, t0, DEADLINE).await;
    // Another writer every 50 ms for two lease durations: renewals meet 409s and go through.
    let until = Instant::now() + 2 * TTL;
    let mut round = 0;
    while Instant::now() < until {
        api.annotate(NAMESPACE, LEASE, &format!("round {round}"));
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(api.answered(409) > 0, "no renewal met a conflict");
    let s = nodes[leader].status().await;
    assert_eq!(s["election"]["is_leader"], true, "{s}");
    assert_eq!(s["election"]["elections_lost"], 0, "{s}");
    let lease = api.lease(NAMESPACE, LEASE).expect("the Lease");
    let note = format!("round {}", round - 1);
    assert_eq!(
        lease["metadata"]["annotations"]["example.com/note"],
        note.as_str(),
        "{lease}"
    );
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
    assert_eq!(leaders_now(&nodes).await, 1);
}

/// How many nodes report themselves leader now.
async fn leaders_now(nodes: &[Node]) -> usize {
    let mut n = 0;
    for node in nodes {
        if node.status().await["election"]["is_leader"] == true {
            n += 1;
        }
    }
    n
}

/// The API server is down when the agents start: both are standby and say why; once it
/// answers, one of them is elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_down_at_boot_means_standby_and_says_so() {
    let api = FakeKubeApi::start(SA_TOKEN).await;
    api.refuse();
    let up = FakeUpstream::start(Wire::Http1).await;
    let nodes = pair(&api, &up, 100).await;
    for n in &nodes {
        let s = eventually(
            DEADLINE,
            "the election to report the API server unreachable",
            || async {
                let s = n.status().await;
                (s["election"]["state"] == "unreachable").then_some(s)
            },
        )
        .await;
        assert_eq!(s["role"], "standby", "{s}");
        let error = s["election"]["last_error"].as_str().unwrap_or("");
        assert!(error.contains("did not answer"), "{s}");
    }
    let sampler = Sampler::start(nodes.iter().map(|n| n.agent.health_addr()).collect());
    api.restore().await;
    one_leader(&nodes).await;
    assert!(api.lease(NAMESPACE, LEASE).is_some(), "the Lease was not created");
    let (_, overlaps) = sampler.finish().await;
    assert!(overlaps.is_empty(), "two actives at once: {overlaps:?}");
}

#[test]
fn check_refuses_a_lease_config_that_cannot_fence_or_names_no_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run check");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = check("[role_election]\nbackend = \"kubernetes\"\nnamespace = \"tunnel\"\nname = \"pair-1\"\napi_url = \"http://127.0.0.1:1\"\nttl = \"3s\"\nfence_margin = \"1s\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("role_election.ttl") && err.contains("too short to fence"),
        "{err}"
    );
    let (code, err) = check("[role_election]\nbackend = \"kubernetes\"\nendpoints = [\"http://127.0.0.1:2379\"]\nname = \"Pair_1\"\nttl = \"4s\"\nfence_margin = \"1s\"\n");
    assert_eq!(code, Some(78), "{err}");
    for needle in [
        "role_election.namespace",
        "role_election.name",
        "role_election.endpoints",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let (code, err) = check("[role_election]\nbackend = \"kubernetes\"\nnamespace = \"tunnel\"\nname = \"pair-1\"\napi_url = \"http://127.0.0.1:1\"\nttl = \"4s\"\nfence_margin = \"1s\"\n");
    assert_eq!(code, Some(0), "{err}");
}
