//! The election across an upgrade in place (issue 20), on both stores: a real 3-member etcd
//! (`common::etcd`) and the fake Kubernetes API server (`common::kube_api`). Each node is the
//! library's election task in this process, with the node's half played by a flag: "active"
//! is set by a promotion on `Elected` (under `promote_if_leader`, as the node does) and cleared
//! by the fence. `detach` + a serde round trip + `resume` stands in for the exec; the flag
//! survives it, as cloudflared does. Both nodes' flags are sampled every 10 ms throughout:
//! never both active.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::etcd::{self, EtcdCluster, Relay};
use common::kube_api::FakeKubeApi;
use common::{eventually, DEADLINE};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnel_agent::config::roles::OnStoreLoss;
use tunnel_agent::deadline::from_monotonic_ns;
use tunnel_agent::election::etcd::{EtcdClient, EtcdOptions};
use tunnel_agent::election::kubernetes::{Access, LeaseClient, LeaseOptions, Token};
use tunnel_agent::election::store::Store;
use tunnel_agent::election::{self, Carried, Election, Outcome, Settings};

const KEY: &str = "/tunnel-agent/test/carry";
const SA_TOKEN: &str = "sa-token-5d2e8c71";
const NAMESPACE: &str = "tunnel";
const LEASE: &str = "carry";
const TTL: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_millis(500);

/// Where the nodes' election runs.
#[derive(Clone)]
enum Backend {
    Etcd(Vec<String>),
    Kubernetes { api: String, token_file: PathBuf },
}

impl Backend {
    fn store(&self, me: &str) -> Store {
        match self {
            Backend::Etcd(endpoints) => Store::Etcd(etcd_client(endpoints)),
            Backend::Kubernetes { api, token_file } => Store::Kubernetes(Box::new(
                LeaseClient::new(&LeaseOptions {
                    access: Access {
                        api_url: api.clone(),
                        ca_pem: None,
                        token: Token::File(token_file.clone()),
                        identity_pem: None,
                    },
                    namespace: NAMESPACE.into(),
                    name: LEASE.into(),
                    me: me.into(),
                    ttl: TTL,
                })
                .expect("Lease client"),
            )),
        }
    }

    fn key(&self) -> String {
        match self {
            Backend::Etcd(_) => KEY.into(),
            Backend::Kubernetes { .. } => format!("{NAMESPACE}/{LEASE}"),
        }
    }
}

fn etcd_client(endpoints: &[String]) -> EtcdClient {
    EtcdClient::new(&EtcdOptions {
        endpoints: endpoints.to_vec(),
        ca_pem: None,
        identity_pem: None,
        username: None,
        password: None,
    })
    .expect("etcd client")
}

fn settings(key: &str, me: &str) -> Settings {
    Settings {
        key: key.into(),
        me: me.into(),
        ttl: TTL,
        renew_interval: TTL / 3,
        request_timeout: Duration::from_secs(1),
        fence_margin: MARGIN,
        poll_interval: Duration::from_millis(100),
        on_store_loss: OnStoreLoss::Demote,
    }
}

/// One host: its election task, and the node's half as a flag and a log of outcomes.
struct Node {
    name: String,
    backend: Backend,
    active: Arc<AtomicBool>,
    election: Election,
    task: JoinHandle<()>,
    /// What this image's election told the node.
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    driver: JoinHandle<()>,
}

impl Node {
    fn start(name: &str, backend: &Backend) -> Node {
        let active = Arc::new(AtomicBool::new(false));
        Node::image(name, backend, active, |settings, store, fence, tx| {
            election::start(settings, store, fence, tx, false)
        })
    }

    /// A new image of this node on `backend`, its election started by `begin`; the node's
    /// "active" flag is `active` (carried across an exec, like cloudflared).
    fn image(
        name: &str,
        backend: &Backend,
        active: Arc<AtomicBool>,
        begin: impl FnOnce(Settings, Store, election::Fence, mpsc::Sender<Outcome>) -> (Election, JoinHandle<()>),
    ) -> Node {
        let fence: election::Fence = {
            let active = active.clone();
            Arc::new(move || active.store(false, Ordering::SeqCst))
        };
        let (tx, mut rx) = mpsc::channel(8);
        let (election, task) = begin(settings(&backend.key(), name), backend.store(name), fence, tx);
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let driver = {
            let (election, active, outcomes) = (election.clone(), active.clone(), outcomes.clone());
            tokio::spawn(async move {
                while let Some(outcome) = rx.recv().await {
                    if let Outcome::Elected { .. } = outcome {
                        election.promote_if_leader(|| active.store(true, Ordering::SeqCst));
                    }
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        };
        Node {
            name: name.into(),
            backend: backend.clone(),
            active,
            election,
            task,
            outcomes,
            driver,
        }
    }

    /// The old image's half of an upgrade: detach, and the carried state as the exec carries
    /// it (serialised, parsed again). The node stays as active as it was.
    async fn detach(&self) -> Carried {
        let carried = self.election.detach().await.expect("detach");
        tokio::time::timeout(DEADLINE, async {
            while !self.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the detached task ends");
        self.driver.abort();
        let text = serde_json::to_vec(&carried).expect("serialise");
        serde_json::from_slice(&text).expect("parse")
    }

    /// The new image's half: the election resumed from `carried` under `settings`.
    fn resume(&self, carried: Carried, key: &str, gated: bool) -> Node {
        let key = key.to_owned();
        Node::image(
            &self.name,
            &self.backend,
            self.active.clone(),
            move |mut s, store, fence, tx| {
                s.key = key;
                election::resume(s, store, fence, tx, gated, carried)
            },
        )
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Waits until this node is elected and active.
    async fn until_active(&self) {
        eventually(DEADLINE, &format!("{} to be active", self.name), || async {
            (self.is_active() && self.election.state().is_leader).then_some(())
        })
        .await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
        self.driver.abort();
    }
}

/// Samples every node's "active" flag every 10 ms; counts samples where two were set.
struct Sampler {
    flags: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    samples: Arc<AtomicU64>,
    overlaps: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Sampler {
    fn start(nodes: &[&Node]) -> Sampler {
        let flags = Arc::new(Mutex::new(nodes.iter().map(|n| n.active.clone()).collect::<Vec<_>>()));
        let (samples, overlaps) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let task = {
            let (flags, samples, overlaps) = (flags.clone(), samples.clone(), overlaps.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                loop {
                    tick.tick().await;
                    let n = flags
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|f| f.load(Ordering::SeqCst))
                        .count();
                    samples.fetch_add(1, Ordering::SeqCst);
                    if n > 1 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        Sampler {
            flags,
            samples,
            overlaps,
            task,
        }
    }

    /// Samples taken and overlaps seen; fails the test on an overlap.
    fn finish(self, what: &str) -> u64 {
        self.task.abort();
        let (samples, overlaps) = (
            self.samples.load(Ordering::SeqCst),
            self.overlaps.load(Ordering::SeqCst),
        );
        println!("{what}: {samples} samples of both nodes, {overlaps} with two actives");
        assert_eq!(
            overlaps, 0,
            "{what}: two actives at once in {overlaps} of {samples} samples"
        );
        assert!(samples > 100, "{what}: the sampler hardly ran ({samples} samples)");
        drop(self.flags);
        samples
    }
}

/// Who holds the key on the store now: (name, lease).
async fn holder(backend: &Backend) -> Option<(String, i64)> {
    let store = backend.store("observer");
    store
        .read(&backend.key(), Duration::from_secs(2))
        .await
        .expect("read the key")
        .map(|h| (h.name, h.lease))
}

/// Leader A and follower B; A detaches, an exec of `exec` passes while B keeps campaigning,
/// A resumes. A keeps the key under the same lease without an `Elected`, B stays follower,
/// and a follower's upgrade (B's) changes nothing either.
async fn a_leader_keeps_its_lease_across_an_exec(backend: Backend) {
    let a = Node::start("node-a", &backend);
    a.until_active().await;
    let b = Node::start("node-b", &backend);
    let sampler = Sampler::start(&[&a, &b]);
    eventually(DEADLINE, "node-b to see node-a lead", || async {
        (b.election.state().leader.as_deref() == Some("node-a")).then_some(())
    })
    .await;
    let before = a.election.state();
    let carried = a.detach().await;
    let after_detach = a.election.state();
    let lease = carried.lease.expect("the leader carries its lease");
    assert_eq!(Some(lease.id), before.lease_id);
    assert!(a.is_active(), "detaching is not resigning");
    // A slow exec: longer than a renewal interval, well within the fence point.
    tokio::time::sleep(TTL / 2).await;
    assert!(
        !b.election.state().is_leader && !b.is_active(),
        "node-b took a held key"
    );
    let a = a.resume(carried, &backend.key(), false);
    let resumed = a.election.state();
    assert!(resumed.is_leader && a.is_active(), "{resumed:?}");
    assert_eq!(resumed.lease_id, Some(lease.id), "the same lease");
    let carried_deadline = from_monotonic_ns(lease.deadline_ns);
    let deadline = resumed.lease_deadline.expect("a deadline");
    assert!(
        deadline <= carried_deadline,
        "the exec extended the lease: {deadline:?} > {carried_deadline:?}"
    );
    let before_exec = after_detach.lease_deadline.expect("a deadline");
    assert!(deadline <= before_exec, "{deadline:?} > {before_exec:?}");
    // Renewals go on: a whole ttl and more later, the same lease still holds the key.
    let renewed = eventually(DEADLINE, "a renewal by the resumed image", || async {
        let s = a.election.state();
        s.lease_deadline.filter(|d| *d > before_exec).map(|_| s)
    })
    .await;
    assert_eq!(renewed.lease_id, Some(lease.id));
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert_eq!(holder(&backend).await, Some(("node-a".into(), lease.id)));
    let s = a.election.state();
    assert!(s.is_leader && a.is_active() && s.lease_id == Some(lease.id), "{s:?}");
    assert_eq!((s.term, s.won), (before.term, before.won), "no new term: {s:?}");
    assert!(
        a.outcomes().is_empty(),
        "the resumed leader told the node {:?}",
        a.outcomes()
    );
    // A follower's upgrade: it resumes following.
    let carried = b.detach().await;
    assert!(carried.lease.is_none());
    let b = b.resume(carried, &backend.key(), false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = b.election.state();
    assert!(
        !s.is_leader && !b.is_active() && s.leader.as_deref() == Some("node-a"),
        "{s:?}"
    );
    assert_eq!(holder(&backend).await, Some(("node-a".into(), lease.id)));
    sampler.finish("a leader's exec within its lease");
}

/// An exec slower than the fence point: the resumed image fences at once and says so, and the
/// other node takes the key over once the lease expires. Node A's store is cut off from the
/// resume on (what may have made the exec slow): with it reachable, the resumed image would
/// revoke the lease it fenced on and campaign again like any candidate, racing B.
async fn an_exec_past_the_fence_point_fences(backend: Backend) {
    let (relayed, relays) = behind_relays(&backend).await;
    let a = Node::start("node-a", &relayed);
    a.until_active().await;
    let b = Node::start("node-b", &backend);
    let sampler = Sampler::start(&[&a, &b]);
    let carried = a.detach().await;
    let lease = carried.lease.expect("the leader carries its lease");
    let deadline = from_monotonic_ns(lease.deadline_ns);
    tokio::time::sleep_until(deadline - MARGIN + Duration::from_millis(50)).await;
    assert!(a.is_active() && !b.is_active());
    relays.iter().for_each(Relay::cut);
    let a = a.resume(carried, &backend.key(), false);
    let s = a.election.state();
    assert!(!s.is_leader && !a.is_active(), "resumed past the fence point: {s:?}");
    assert_eq!((s.lease_id, s.lost), (None, 1), "{s:?}");
    let deposed = eventually(DEADLINE, "a Deposed for the node", || async {
        a.outcomes().into_iter().find(|o| matches!(o, Outcome::Deposed { .. }))
    })
    .await;
    println!("{deposed:?}");
    b.until_active().await;
    let taken = Instant::now();
    assert!(taken >= deadline, "node-b led before the carried lease could expire");
    println!("node-b led {:?} after the carried deadline", taken - deadline);
    assert_eq!(holder(&backend).await.map(|h| h.0).as_deref(), Some("node-b"));
    relays.iter().for_each(Relay::restore);
    eventually(DEADLINE, "node-a to follow node-b", || async {
        let s = a.election.state();
        (s.leader.as_deref() == Some("node-b") && s.last_error.is_none()).then_some(())
    })
    .await;
    assert!(!a.election.state().is_leader && !a.is_active());
    assert!(
        !a.outcomes().iter().any(|o| matches!(o, Outcome::Elected { .. })),
        "{:?}",
        a.outcomes()
    );
    sampler.finish("an exec past the fence point");
}

/// `backend` reached through relays that a test can cut (one per etcd member, or one in front
/// of the API server).
async fn behind_relays(backend: &Backend) -> (Backend, Vec<Relay>) {
    let addr = |url: &str| -> SocketAddr { url.trim_start_matches("http://").parse().expect("an address") };
    match backend {
        Backend::Etcd(endpoints) => {
            let mut relays = Vec::new();
            for e in endpoints {
                relays.push(Relay::start(addr(e)).await);
            }
            (Backend::Etcd(relays.iter().map(Relay::url).collect()), relays)
        }
        Backend::Kubernetes { api, token_file } => {
            let relay = Relay::start(addr(api)).await;
            let relayed = Backend::Kubernetes {
                api: relay.url(),
                token_file: token_file.clone(),
            };
            (relayed, vec![relay])
        }
    }
}

/// A carried state from another election (backend, key) is not resumed: the node is fenced at
/// once and follows; the carried lease is left to expire, after which the other node leads.
async fn another_election_is_not_resumed(backend: Backend) {
    let a = Node::start("node-a", &backend);
    a.until_active().await;
    let b = Node::start("node-b", &backend);
    let sampler = Sampler::start(&[&a, &b]);
    let carried = a.detach().await;
    let lease = carried.lease.expect("the leader carries its lease");
    // Carried from the other backend: not even looked at.
    let mut other = carried.clone();
    other.backend = match backend {
        Backend::Etcd(_) => "kubernetes".into(),
        Backend::Kubernetes { .. } => "etcd".into(),
    };
    // (A flag of its own: this image is only looked at, the test goes on with `a`'s.)
    let moved = Node::image(
        "node-a",
        &backend,
        Arc::new(AtomicBool::new(true)),
        |s, store, fence, tx| election::resume(s, store, fence, tx, true, other),
    );
    let s = moved.election.state();
    assert!(!s.is_leader && !moved.is_active() && s.lease_id.is_none(), "{s:?}");
    assert_eq!(s.won, 0, "counters start from scratch: {s:?}");
    drop(moved);
    // The same backend, another key (gated: no campaign on it here).
    assert!(a.is_active());
    let a = a.resume(carried, "/tunnel-agent/test/another-key", true);
    let s = a.election.state();
    assert!(!s.is_leader && !a.is_active(), "{s:?}");
    eventually(DEADLINE, "a Deposed for the node", || async {
        a.outcomes()
            .into_iter()
            .find(|o| matches!(o, Outcome::Deposed { reason } if reason.contains("key")))
    })
    .await;
    let left = Instant::now();
    b.until_active().await;
    let took = left.elapsed();
    println!("the other node took the key {took:?} after a resume under another key");
    let (name, id) = holder(&backend).await.expect("a holder");
    assert_eq!(name, "node-b");
    assert_ne!(id, lease.id);
    sampler.finish("a carried state from another election");
}

struct Etcd {
    _cluster: EtcdCluster,
    backend: Backend,
}

async fn etcd(test: &str) -> Option<Etcd> {
    if !etcd::available(test) {
        return None;
    }
    let cluster = EtcdCluster::start(3).await;
    let backend = Backend::Etcd(cluster.endpoints());
    Some(Etcd {
        _cluster: cluster,
        backend,
    })
}

struct Kube {
    _api: FakeKubeApi,
    _dir: tempfile::TempDir,
    backend: Backend,
}

async fn kube() -> Kube {
    let api = FakeKubeApi::start(SA_TOKEN).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, SA_TOKEN).expect("token file");
    let backend = Backend::Kubernetes {
        api: api.url(),
        token_file,
    };
    Kube {
        _api: api,
        _dir: dir,
        backend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_leader_keeps_its_lease_across_an_exec() {
    let Some(e) = etcd("etcd_a_leader_keeps_its_lease_across_an_exec").await else {
        return;
    };
    a_leader_keeps_its_lease_across_an_exec(e.backend.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_an_exec_past_the_fence_point_fences() {
    let Some(e) = etcd("etcd_an_exec_past_the_fence_point_fences").await else {
        return;
    };
    an_exec_past_the_fence_point_fences(e.backend.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_another_election_is_not_resumed() {
    let Some(e) = etcd("etcd_another_election_is_not_resumed").await else {
        return;
    };
    another_election_is_not_resumed(e.backend.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_a_leader_keeps_its_lease_across_an_exec() {
    let k = kube().await;
    a_leader_keeps_its_lease_across_an_exec(k.backend.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_an_exec_past_the_fence_point_fences() {
    let k = kube().await;
    an_exec_past_the_fence_point_fences(k.backend.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_another_election_is_not_resumed() {
    let k = kube().await;
    another_election_is_not_resumed(k.backend.clone()).await;
}
