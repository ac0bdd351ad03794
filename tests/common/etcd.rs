//! A real etcd cluster for the election tests: Debian's `etcd-server` (`/usr/bin/etcd`, v3.4+,
//! whose client port serves the v3 JSON gateway), three members on loopback ports, plus a TCP
//! relay per agent and member so a test can cut one agent off from etcd (a partition) while
//! the others still reach it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub const ETCD: &str = "/usr/bin/etcd";

/// Whether etcd is installed; prints why a test skips when it is not.
pub fn available(test: &str) -> bool {
    if Path::new(ETCD).exists() {
        return true;
    }
    eprintln!("SKIP {test}: {ETCD} is missing (install Debian's etcd-server; .ci/run does)");
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial: String,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers a linearizable read. A free port
    /// found by binding port 0 can be taken by another process before etcd binds it; a member
    /// that exits at start is retried on new ports (three attempts).
    pub async fn start(n: usize) -> EtcdCluster {
        let mut last = String::new();
        for _ in 0..3 {
            let cluster = Self::spawn_all(n);
            match cluster.healthy(Duration::from_secs(30)).await {
                Ok(()) => return cluster,
                Err(e) => last = e,
            }
        }
        panic!("the etcd cluster never became healthy: {last}");
    }

    fn spawn_all(n: usize) -> EtcdCluster {
        let dir = tempfile::Builder::new().prefix("ta-etcd-").tempdir().expect("tempdir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster { dir, members, initial };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.members[i].name)))
            .expect("etcd log");
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(ETCD)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tunnel-agent-test"])
            // Fast raft timings (loopback): a lost leader is replaced in well under a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].client))
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| format!("http://{}", self.client_addr(i)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Stops member `i` (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
    }

    /// Waits until a linearizable read succeeds on every running member.
    pub async fn wait_healthy(&self) {
        if let Err(e) = self.healthy(Duration::from_secs(30)).await {
            panic!("{e}");
        }
    }

    /// A linearizable read succeeds on every running member within `deadline`; `Err` with the
    /// members' logs otherwise.
    async fn healthy(&self, deadline: Duration) -> Result<(), String> {
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{}/v3/kv/range", m.client);
            let mut last = String::new();
            let ok = tokio::time::timeout(deadline, async {
                loop {
                    match http
                        .post(&url)
                        .timeout(Duration::from_secs(2))
                        .body(r#"{"key":"aGVhbHRo"}"#)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => {
                            let text = r.text().await.unwrap_or_default();
                            if text.contains("header") && !text.contains("error") {
                                return;
                            }
                            last = text;
                        }
                        Ok(r) => last = format!("HTTP {}", r.status()),
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if ok.is_err() {
                return Err(format!("etcd member {i} never became healthy: {last}\n{}", self.logs()));
            }
        }
        Ok(())
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            out.push_str(&format!("--- {} ---\n", m.name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

/// A TCP relay in front of one address. `cut()` makes it a black hole (new connections are
/// accepted and never answered, live ones stop forwarding), like a partition where packets are
/// dropped; `restore()` forwards again. `hang()` is a black hole for live connections too: they
/// stay open and silent (a hung member, not a closed connection).
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Live connections freeze (stop forwarding, stay open) while `true`.
    hang: tokio::sync::watch::Sender<bool>,
    /// Live forwarding tasks, aborted on `cut`.
    live: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let cut = Arc::new(AtomicBool::new(false));
        let (hang, hung) = tokio::sync::watch::channel(false);
        let live: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (cut, live) = (cut.clone(), live.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let cut = cut.clone();
                    let mut hung = hung.clone();
                    let task = tokio::spawn(async move {
                        if cut.load(Ordering::SeqCst) {
                            // Hold the connection unanswered until the peer gives up.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            let _ = inbound.shutdown().await;
                            return;
                        };
                        let frozen = tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                            _ = hung.wait_for(|h| *h) => true,
                        };
                        if frozen {
                            // Both ends stay open and nothing more is forwarded.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                    });
                    let mut l = live.lock().unwrap();
                    l.retain(|t| !t.is_finished());
                    l.push(task);
                }
            })
        };
        Relay {
            addr,
            cut,
            hang,
            live,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.live.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// A hung member: new connections are accepted and never answered, live ones stay open
    /// and forward nothing more (no FIN, no RST), so only a client's own timeout ends a call.
    pub fn hang(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.hang.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.hang.send_replace(false);
        // Connections held while cut are dropped, so clients reconnect through the relay.
        for t in self.live.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.live.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}
