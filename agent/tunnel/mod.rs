//! cloudflared, supervised: started after the proxy answers, watched, restarted with backoff,
//! stopped gracefully.
//!
//! Facts about cloudflared this relies on:
//! - `cloudflared tunnel [flags] run` takes its connector token from `TUNNEL_TOKEN` or (since
//!   2025.4) `--token-file`; we never put it in argv, where `ps` and `/proc/PID/cmdline` show it.
//! - On SIGTERM it stops accepting, waits up to `--grace-period` for in-flight requests, and exits;
//!   a *second* SIGTERM skips the drain, so we send exactly one, then SIGKILL after grace + margin.
//! - It serves `GET /ready` on its `--metrics` address: `{"status":200,"readyConnections":N,
//!   "connectorId":"…"}` (503 with the same body while it has no connection).
//! - It exits 0 on some errors (an unknown flag prints usage and exits 0), so any exit we did not
//!   ask for is a failure.
//! - It sends `READY=1` itself when it sees `NOTIFY_SOCKET`, which would confuse systemd about
//!   *our* readiness. It gets none of the agent's environment anyway ([`command`]): not the
//!   variables the agent's secrets come from, not `CREDENTIALS_DIRECTORY`.
//! - Without `HOME` (a `DynamicUser=` service has none) it looks its user up in passwd over a
//!   hundred times before its first line (~155 ms, ~40 ms with `HOME`): `HOME` is the agent's
//!   state directory, so a promotion is not slowed.
//! - It logs every retry of an unreachable edge; `log_limit` rate-limits what reaches our log.
//!
//! The child runs in its own process group, so signals reach any helper it forks.

pub mod carried_spec;
pub mod carry;
mod child;
pub mod log_limit;
mod logs;
pub mod remote_ingress;
#[cfg(test)]
mod restart_story;
pub mod sandbox;
pub mod supervisor;
pub mod version;

pub use carry::Carried;
pub use logs::{parse_log_line, LogLevel};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::CloudflaredSection;
use crate::secret::Secret;

/// Everything that determines the cloudflared command. A reload restarts cloudflared only when
/// this changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub program: PathBuf,
    /// argv after the program. Never holds a secret.
    pub args: Vec<String>,
    pub token: Option<Secret>,
    /// When set, the token is written here (mode 0600) instead of passed in the environment.
    pub token_file: Option<PathBuf>,
    /// Locally-managed tunnels: the ingress config we write, and where.
    pub ingress: Option<(PathBuf, String)>,
    pub metrics: SocketAddr,
    pub grace: Duration,
    pub stop_margin: Duration,
    /// The embedded proxy, for cloudflared's ingress.
    pub origin: SocketAddr,
    /// `cloudflared.remote_ingress = "via-proxy"`: the proxy, given to cloudflared as its
    /// `HTTP_PROXY` and `HTTPS_PROXY` ([`egress_proxy_env`]).
    pub egress_proxy: Option<SocketAddr>,
    /// cloudflared's `HOME`: the agent's state directory.
    pub home: Option<PathBuf>,
    /// Its Landlock confinement ([`sandbox`]); `None` runs it unconfined.
    pub sandbox: Option<sandbox::Policy>,
}

/// The agent's environment variables cloudflared is given, when the agent has them: where
/// programs are, the locale and time zone its log lines are written in, and Go's own names for
/// extra CA certificates. Nothing else: the agent's environment holds its secrets
/// (`source = "env"`), `CREDENTIALS_DIRECTORY`, `NOTIFY_SOCKET` and whatever the unit or an
/// operator set, none of which is cloudflared's business.
const PASSED_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR"];

/// A command for `program` (cloudflared) with an empty environment but for [`PASSED_ENV`]; the
/// caller adds what this run needs (its `HOME`, its token).
pub fn command(program: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear();
    for var in PASSED_ENV {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    cmd
}

/// How a Go duration flag spells `d`.
fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl TunnelSpec {
    /// Builds the command for `section`. `token` is the value of `token_secret`; `hostnames`
    /// feed the ingress of a locally-managed tunnel; `grpc`: the table has gRPC routes, which
    /// under `protocol = "auto"` need `--protocol http2` (a changed spec restarts cloudflared).
    pub fn new(
        section: &CloudflaredSection,
        token: Option<Secret>,
        runtime_dir: &std::path::Path,
        origin: SocketAddr,
        hostnames: &[String],
        grpc: bool,
    ) -> TunnelSpec {
        let mut args = vec![
            "tunnel".to_owned(),
            "--no-autoupdate".to_owned(),
            "--metrics".to_owned(),
            section.metrics.to_string(),
            "--grace-period".to_owned(),
            go_duration(section.grace_period),
        ];
        let mut ingress = None;
        let mut token_file = None;
        if let (Some(creds), Some(tunnel)) = (&section.credentials_file, &section.tunnel) {
            let path = runtime_dir.join("cloudflared.yml");
            args.push("--config".to_owned());
            args.push(path.display().to_string());
            ingress = Some((path, ingress_yaml(tunnel, creds, origin, hostnames)));
        }
        if let (None, Some(p)) = (section.protocol_in_extra_args(), section.effective_protocol(grpc)) {
            args.extend(["--protocol".to_owned(), p.to_owned()]);
        }
        args.extend(section.extra_args.iter().cloned());
        args.push("run".to_owned());
        if token.is_some() && section.token_delivery == crate::config::TokenDelivery::File {
            let path = runtime_dir.join("cloudflared.token");
            args.push("--token-file".to_owned());
            args.push(path.display().to_string());
            token_file = Some(path);
        }
        if let (Some(tunnel), true) = (&section.tunnel, ingress.is_some()) {
            args.push(tunnel.clone());
        }
        TunnelSpec {
            program: section.path.clone(),
            args,
            token,
            token_file,
            ingress,
            metrics: section.metrics,
            grace: section.grace_period,
            stop_margin: section.stop_margin,
            origin,
            egress_proxy: (section.remote_ingress == crate::config::RemoteIngress::ViaProxy).then(|| dialable(origin)),
            home: None,
            sandbox: None,
        }
    }
}

/// `addr` as a client reaches it: a proxy listening on every address is dialled on loopback.
pub fn dialable(addr: SocketAddr) -> SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port()),
        _ => addr,
    }
}

/// The variables that send cloudflared's requests for `http(s)://` services through `proxy`.
///
/// Facts this relies on (cloudflared's `ingress/origin_service.go` `newHTTPTransport`, Go's
/// `net/http` and `golang.org/x/net/http/httpproxy`, read at cloudflared d1df7985; the fake,
/// tests/fakes/cloudflared, behaves so):
/// - the transport of every `http://`/`https://`/`ws(s)://` service has
///   `Proxy: http.ProxyFromEnvironment`: `HTTP_PROXY` for `http` services, `HTTPS_PROXY` for
///   `https`, except a service named `localhost` or a loopback address, which is always dialled
///   directly (so the ingress this agent writes, and a remote one naming the proxy on
///   loopback, are unaffected), and except `NO_PROXY`, which cloudflared never gets;
/// - through a proxy, an `http` request goes out in absolute form with the *visitor's* `Host`
///   (Go writes `r.Host`, not the service's address, into the request line), so the proxy
///   routes it by hostname like any other; an `https` one is a `CONNECT host:port`, which the
///   proxy refuses (it cannot see the hostname inside TLS).
pub fn egress_proxy_env(proxy: SocketAddr) -> [(&'static str, String); 2] {
    let url = format!("http://{proxy}");
    [("HTTP_PROXY", url.clone()), ("HTTPS_PROXY", url)]
}

/// cloudflared's `config.yml` for a locally-managed tunnel: every hostname to the embedded
/// proxy, then the catch-all cloudflared requires as the last rule.
pub fn ingress_yaml(tunnel: &str, credentials: &std::path::Path, origin: SocketAddr, hostnames: &[String]) -> String {
    // Hostnames and the tunnel id were validated (letters, digits, '-', '.', '*'); paths are
    // quoted as JSON strings, which are valid YAML scalars.
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let mut out = format!(
        "# Written by tunnel-agent from its route table; edits are overwritten.\ntunnel: {}\ncredentials-file: {}\ningress:\n",
        q(tunnel),
        q(&credentials.display().to_string())
    );
    for h in hostnames {
        out.push_str(&format!("  - hostname: {}\n    service: http://{origin}\n", q(h)));
    }
    out.push_str("  - service: http_status:404\n");
    out
}

/// Restart behaviour, from `[cloudflared]`.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub stable_after: Duration,
    pub crash_loop_exits: u32,
    pub crash_loop_window: Duration,
    pub give_up_after_exits: u32,
    pub poll_interval: Duration,
    pub disconnected_restart_after: Duration,
}

impl From<&CloudflaredSection> for RestartPolicy {
    fn from(s: &CloudflaredSection) -> Self {
        RestartPolicy {
            backoff: s.restart_backoff,
            backoff_max: s.restart_backoff_max,
            stable_after: s.stable_after,
            crash_loop_exits: s.crash_loop_exits,
            crash_loop_window: s.crash_loop_window,
            give_up_after_exits: s.give_up_after_exits,
            poll_interval: s.poll_interval,
            disconnected_restart_after: s.disconnected_restart_after,
        }
    }
}

/// What health, status and metrics read; written only by the supervisor.
#[derive(Debug, Default)]
pub struct TunnelState {
    /// Whether cloudflared should be running here at all.
    pub wanted: AtomicBool,
    /// 0 when not running.
    pub pid: AtomicU32,
    /// `readyConnections` from the last poll.
    pub connections: AtomicU32,
    /// Restarts after unrequested exits or a stuck tunnel.
    pub restarts: AtomicU64,
    pub crash_loop: AtomicBool,
    detail: Mutex<TunnelDetail>,
    signalling: Mutex<Signalling>,
}

/// The running process as far as stopping it goes. Shared so that whoever stops cloudflared
/// first (the supervisor, or an election fence that must not wait for the supervisor's loop)
/// sends the one SIGTERM, and no restart slips in while a fence holds.
#[derive(Debug, Default)]
struct Signalling {
    /// 0 when not running.
    pid: u32,
    sigterm_sent: bool,
    /// Set by [`TunnelState::fence`]: no cloudflared may start until [`TunnelState::release`].
    hold: bool,
}

#[derive(Debug, Default, Clone)]
pub struct TunnelDetail {
    pub last_exit: Option<String>,
    pub connector_id: Option<String>,
    /// When a poll last saw at least one connection.
    pub last_connected: Option<Instant>,
    pub started_at: Option<Instant>,
    /// What `cloudflared --version` said at boot.
    pub version: Option<String>,
    /// The running cloudflared's pid and what its ingress was found to be.
    pub remote_ingress: Option<(u32, remote_ingress::Audit)>,
}

impl TunnelState {
    pub fn detail(&self) -> TunnelDetail {
        self.detail.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the version detected at boot.
    pub fn set_version(&self, version: String) {
        self.with_detail(|d| d.version = Some(version));
    }

    fn signalling(&self) -> std::sync::MutexGuard<'_, Signalling> {
        self.signalling.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops new tunnel traffic now: one SIGTERM to the running cloudflared's group (unless it
    /// already had its one) and no start or restart until [`TunnelState::release`]. Synchronous,
    /// so a lease fence does not depend on the supervisor's loop being free; the supervisor still
    /// waits out the drain and reaps. Returns whether a SIGTERM was sent now.
    pub fn fence(&self) -> bool {
        let mut s = self.signalling();
        s.hold = true;
        terminate_locked(&mut s)
    }

    /// Lifts a [`TunnelState::fence`]: this node may run cloudflared again.
    pub fn release(&self) {
        self.signalling().hold = false;
    }

    /// Whether a fence holds.
    pub fn held(&self) -> bool {
        self.signalling().hold
    }

    fn with_detail(&self, f: impl FnOnce(&mut TunnelDetail)) {
        f(&mut self.detail.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Whether the tunnel counts as connected, allowing `grace` after the last connection was
    /// seen so a brief reconnect does not flap the verdict.
    pub fn connected(&self, grace: Duration) -> bool {
        if self.pid.load(Ordering::Acquire) == 0 {
            return false;
        }
        if self.connections.load(Ordering::Acquire) > 0 {
            return true;
        }
        self.detail().last_connected.is_some_and(|t| t.elapsed() < grace)
    }
}

enum Control {
    /// Run this spec (restarting if it differs), or stop when `None`.
    Apply(Box<Option<TunnelSpec>>, oneshot::Sender<()>),
    /// Let go of cloudflared for an in-place upgrade and end.
    Detach(oneshot::Sender<Box<supervisor::Supervisor>>),
}

/// The handle the boot sequence holds.
pub struct TunnelSupervisor {
    tx: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub state: Arc<TunnelState>,
}

impl TunnelSupervisor {
    /// Starts supervising; spawns cloudflared at once when `spec` is set.
    pub fn start(spec: Option<TunnelSpec>, policy: RestartPolicy, state: Arc<TunnelState>) -> TunnelSupervisor {
        let begin = spec.map_or(supervisor::Begin::Nothing, |spec| {
            supervisor::Begin::Apply(Box::new(spec))
        });
        let sup = supervisor::Supervisor::new(policy, state.clone()).map(|sup| (sup, begin));
        TunnelSupervisor::run(sup, state)
    }

    /// Takes over the cloudflared an earlier image of this process supervised, from what its
    /// [`TunnelSupervisor::detach`] returned: the machine and counters as they were, the pid
    /// checked to be our child and watched, its output read from duplicates of the carried
    /// descriptors (which stay open: the hand-over owns them until it commits). `spec` is what
    /// this image computed for the current config, secrets and role; the next
    /// [`TunnelSupervisor::apply`] restarts nothing when cloudflared was started from an
    /// equivalent spec, and restarts it as any change does otherwise. A carried cloudflared that
    /// ended meanwhile, or a pid that is not our child, is an exit as any other: counted, and
    /// restarted by `policy` (a pid that is not ours is never signalled).
    pub fn adopt(
        carried: Carried,
        spec: Option<TunnelSpec>,
        policy: RestartPolicy,
        state: Arc<TunnelState>,
    ) -> TunnelSupervisor {
        let sup = carry::adopt(carried, spec, policy, state.clone());
        TunnelSupervisor::run(sup, state)
    }

    fn run(
        sup: anyhow::Result<(supervisor::Supervisor, supervisor::Begin)>,
        state: Arc<TunnelState>,
    ) -> TunnelSupervisor {
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(supervisor::supervise(sup, rx));
        TunnelSupervisor { tx, task, state }
    }

    /// Ends supervision for an in-place upgrade without signalling cloudflared, and returns
    /// what the next image needs to [`TunnelSupervisor::adopt`] it: cloudflared keeps running,
    /// unreaped (still this process's child after the exec), its pipes open at
    /// [`Carried::fds`]. Waits for the loop to be free: a stop or start under way finishes
    /// first. `None` when the loop had already ended (it gave up).
    pub async fn detach(self) -> Option<Carried> {
        let (reply, carried) = oneshot::channel();
        self.tx.send(Control::Detach(reply)).await.ok()?;
        let mut sup = carried.await.ok()?;
        let _ = self.task.await;
        Some(carry::detach(&mut sup).await)
    }

    /// Applies a new spec (or stops, with `None`). Returns once the change took effect:
    /// cloudflared spawned, or stopped and reaped.
    pub async fn apply(&self, spec: Option<TunnelSpec>) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Control::Apply(Box::new(spec), ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Resolves when the supervisor gave up (crash loop past the limit); the error says why.
    pub async fn failed(&mut self) -> anyhow::Error {
        match (&mut self.task).await {
            Ok(Ok(())) => anyhow::anyhow!("cloudflared supervisor stopped unexpectedly"),
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("cloudflared supervisor panicked: {e}"),
        }
    }

    /// Stops cloudflared (one SIGTERM, grace, SIGKILL, reap) and the supervisor.
    pub async fn shutdown(self) {
        self.apply(None).await;
        self.task.abort();
    }
}

/// What health reads of cloudflared: the tunnel publishes itself into `Health`, below it.
impl crate::health::TunnelView for TunnelState {
    fn status(&self) -> crate::health::TunnelStatus {
        let d = self.detail();
        let pid = self.pid.load(Ordering::Acquire);
        crate::health::TunnelStatus {
            wanted: self.wanted.load(Ordering::Acquire),
            version: d.version,
            pid: (pid != 0).then_some(pid),
            connections: self.connections.load(Ordering::Acquire),
            connector_id: d.connector_id,
            restarts: self.restarts.load(Ordering::Acquire),
            crash_loop: self.crash_loop.load(Ordering::Acquire),
            last_exit: d.last_exit,
            uptime_s: d.started_at.filter(|_| pid != 0).map(|s| s.elapsed().as_secs()),
            remote_ingress: d.remote_ingress.filter(|(p, _)| *p == pid && pid != 0).map(|(_, a)| a),
        }
    }

    fn connected(&self, grace: Duration) -> bool {
        TunnelState::connected(self, grace)
    }
}

/// The one SIGTERM for the running process group, if it has not had it.
fn terminate_locked(s: &mut Signalling) -> bool {
    if s.pid == 0 || s.sigterm_sent {
        return false;
    }
    s.sigterm_sent = true;
    let group = Pid::from_raw(i32::try_from(s.pid).unwrap_or(0));
    if let Err(e) = killpg(group, Signal::SIGTERM) {
        tracing::warn!(pid = s.pid, error = %e, "cannot send SIGTERM to cloudflared pid {}: {e}", s.pid);
    }
    true
}

/// Records that the process `pid` is gone.
fn record_exit(state: &TunnelState, pid: u32) {
    let mut s = state.signalling();
    if s.pid == pid {
        s.pid = 0;
        s.sigterm_sent = false;
    }
    drop(s);
    state.pid.store(0, Ordering::Release);
    state.connections.store(0, Ordering::Release);
}

/// Reads cloudflared's `/ready`. Public only for the fuzz target (fuzz/fuzz_targets/responses.rs).
#[doc(hidden)]
pub async fn poll_ready(http: &reqwest::Client, metrics: SocketAddr) -> Option<(u32, Option<String>)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Ready {
        ready_connections: u32,
        connector_id: Option<String>,
    }
    let resp = http.get(format!("http://{metrics}/ready")).send().await.ok()?;
    // The body is a one-line JSON object (`{"status":503,"readyConnections":0,…}`).
    let body = crate::peer_body::read(resp, 64 * 1024).await.ok()?;
    let ready: Ready = serde_json::from_slice(&body).ok()?;
    Some((ready.ready_connections, ready.connector_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_never_holds_the_token() {
        let section = CloudflaredSection {
            enabled: true,
            token_secret: Some("t".into()),
            extra_args: vec!["--protocol".into(), "http2".into()],
            ..Default::default()
        };
        let origin: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let spec = TunnelSpec::new(
            &section,
            Some(Secret::new("sekrit")),
            std::path::Path::new("/run/x"),
            origin,
            &[],
            false,
        );
        assert_eq!(
            spec.args,
            [
                "tunnel",
                "--no-autoupdate",
                "--metrics",
                "127.0.0.1:20241",
                "--grace-period",
                "30s",
                "--protocol",
                "http2",
                "run"
            ]
        );
        assert!(!spec.args.iter().any(|a| a.contains("sekrit")));
        // Under `protocol = "auto"` a gRPC table runs cloudflared on HTTP/2 (trailers); an
        // explicit protocol or extra_args' own is kept.
        let auto = CloudflaredSection {
            extra_args: Vec::new(),
            ..section.clone()
        };
        let protocol = |s: &CloudflaredSection, grpc: bool| {
            let spec = TunnelSpec::new(s, None, std::path::Path::new("/run/x"), origin, &[], grpc);
            let at = spec.args.iter().position(|a| a == "--protocol");
            at.map(|i| spec.args[i + 1].clone())
        };
        assert_eq!(protocol(&auto, false), None);
        assert_eq!(protocol(&auto, true).as_deref(), Some("http2"));
        let quic = CloudflaredSection {
            protocol: crate::config::TunnelProtocol::Quic,
            ..auto.clone()
        };
        assert_eq!(protocol(&quic, true).as_deref(), Some("quic"));
        assert_eq!(protocol(&section, false).as_deref(), Some("http2"));
        let section = CloudflaredSection {
            token_delivery: crate::config::TokenDelivery::File,
            ..section
        };
        let spec = TunnelSpec::new(
            &section,
            Some(Secret::new("sekrit")),
            std::path::Path::new("/run/x"),
            origin,
            &[],
            false,
        );
        assert_eq!(
            &spec.args[spec.args.len() - 3..],
            ["run", "--token-file", "/run/x/cloudflared.token"]
        );
    }

    #[test]
    fn locally_managed_tunnel_gets_ingress_with_catch_all() {
        let yaml = ingress_yaml(
            "6ff42ae2-765d-4adf-8112-31c55c1551ef",
            std::path::Path::new("/etc/cloudflared/creds.json"),
            "127.0.0.1:8080".parse().unwrap(),
            &["a.example.com".into(), "*.b.example.com".into()],
        );
        assert!(
            yaml.contains("  - hostname: \"a.example.com\"\n    service: http://127.0.0.1:8080\n"),
            "{yaml}"
        );
        assert!(yaml.contains("\"*.b.example.com\""), "{yaml}");
        assert!(yaml.trim_end().ends_with("- service: http_status:404"), "{yaml}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }
}
