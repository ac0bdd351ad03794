//! `:2000`: `/healthz`, `/ready`, `/metrics`, `/status`, for MIG autohealing, load balancers
//! and humans.
//!
//! Every answer comes from cached state; probing never blocks on a component. The proxy's
//! liveness is measured by a background self-probe (a real `GET /healthz` over TCP every
//! second), so `/ready` reflects a proxy that actually answers, not one that merely started.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::roles::RoleSource;
use crate::config::Role;
use crate::telemetry::Metrics;

/// What the health listener answers. The handler dispatches through [`Endpoint::parse`], which
/// only knows [`Endpoint::ALL`], so this list is the whole surface (the man page test reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Ready,
    Active,
    Metrics,
    Status,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [Self::Healthz, Self::Ready, Self::Active, Self::Metrics, Self::Status];

    pub fn path(self) -> &'static str {
        match self {
            Self::Healthz => "/healthz",
            Self::Ready => "/ready",
            Self::Active => "/active",
            Self::Metrics => "/metrics",
            Self::Status => "/status",
        }
    }

    pub fn parse(path: &str) -> Option<Endpoint> {
        Self::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// What `/active` and `/ready` say while a demoted node's cloudflared finishes in-flight requests.
pub const DRAINING_AFTER_DEMOTION: &str = "draining after demotion";

/// A component's part of `/status` and `/metrics`, read live on each request (the election's
/// lease runs down between two of them). The component publishes itself into [`Health`], which
/// sits below it and knows only this.
pub trait Published<S>: Send + Sync {
    fn status(&self) -> S;
    fn render_metrics(&self, out: &mut String);
}

/// What health reads of cloudflared, live: published by the tunnel's shared state, which sits
/// above this module.
pub trait TunnelView: Send + Sync {
    /// `/status`'s `cloudflared` object, and what `/ready` and `/metrics` read from it.
    fn status(&self) -> TunnelStatus;
    /// Whether the tunnel counts as connected, allowing `grace` after the last connection was
    /// lost.
    fn connected(&self, grace: Duration) -> bool;
}

/// `/status` (and `tunnel-agent status`): the one shape the health listener renders, the
/// control socket sends and the CLI reads. Fields in alphabetical order, as JSON objects print
/// them, so the typed reply prints exactly as the untyped one did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentStatus,
    pub build_date: String,
    pub cloudflared: TunnelStatus,
    pub commit: String,
    pub config_file: String,
    pub election: Option<ElectionStatus>,
    pub follow: Option<FollowStatus>,
    pub last_reload_error: Option<String>,
    pub pending_restart: Vec<String>,
    pub readiness: std::collections::BTreeMap<String, String>,
    pub ready: bool,
    /// `null` only before the boot decided it.
    pub role: Option<Role>,
    pub role_source: Option<RoleSource>,
    pub routes: RoutesStatus,
    pub routes_fallback: Option<String>,
    /// Names only: values never leave the process.
    pub secrets: Vec<String>,
    pub uptime_s: u64,
    pub version: String,
}

/// `/status`'s `agent`: the build that runs, since when, and the upgrades in place this process
/// has seen (counted across its images: an upgrade carries them).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub last_upgrade: Option<UpgradeStatus>,
    /// Upgrades refused before anything changed (the new binary failed its checks).
    pub refused: u64,
    /// Upgrades whose new image could not take over, so the previous binary came back.
    pub rolled_back: u64,
    /// When this image took over (RFC 3339): its start, or the upgrade that exec'd it.
    pub since: String,
    /// Upgrades completed.
    pub upgrades: u64,
    /// `--version` of the running image.
    pub version: String,
}

/// One upgrade in place, as `/status` and `tunnel-agent upgrade` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStatus {
    pub error: Option<String>,
    pub from: String,
    /// How long the listeners queued new connections: from the old image's last accept to
    /// the new image's first (`null` when refused).
    pub held_ms: Option<u64>,
    pub result: UpgradeResult,
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeResult {
    Completed,
    RolledBack,
    Refused,
}

impl UpgradeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeResult::Completed => "completed",
            UpgradeResult::RolledBack => "rolled-back",
            UpgradeResult::Refused => "refused",
        }
    }
}

/// `tunnel_agent_upgrades_total{result}`.
fn render_upgrades(agent: &AgentStatus, out: &mut String) {
    use crate::prom_text::{Family, Kind};
    let help = "Upgrades in place this process has seen, by result.";
    let mut upgrades = Family::open(out, "tunnel_agent_upgrades_total", Kind::Counter, help);
    for result in [
        UpgradeResult::Completed,
        UpgradeResult::RolledBack,
        UpgradeResult::Refused,
    ] {
        let n = match result {
            UpgradeResult::Completed => agent.upgrades,
            UpgradeResult::RolledBack => agent.rolled_back,
            UpgradeResult::Refused => agent.refused,
        };
        upgrades.sample(&[("result", result.as_str())], n);
    }
}

/// `/status`'s `routes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutesStatus {
    pub count: usize,
    pub grpc: bool,
    pub source: String,
    pub table: Vec<RouteStatus>,
    pub version: u64,
}

/// One route as `/status` lists it (what the route table publishes of each rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Per upstream, the `Host` it is sent: `client`, `upstream`, or the rewrite's hostname.
    pub host_headers: Vec<String>,
    pub hostnames: Vec<String>,
    pub name: String,
    pub upstreams: Vec<String>,
}

/// `/status`'s `cloudflared`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub connections: u32,
    pub connector_id: Option<String>,
    pub crash_loop: bool,
    pub last_exit: Option<String>,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub uptime_s: Option<u64>,
    pub version: Option<String>,
    pub wanted: bool,
    /// What the last read of cloudflared's own ingress found, while it runs.
    #[serde(default)]
    pub remote_ingress: Option<IngressAudit>,
}

/// `/status`'s `cloudflared.remote_ingress` (`tunnel::remote_ingress`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressAudit {
    /// cloudflared's configuration version: -1 for its local ingress, else the remote one's.
    pub version: i64,
    pub rules: usize,
    /// Rules whose requests reach the proxy, including those through the proxy variables.
    pub via_proxy: usize,
    /// How many rules reach around the proxy; the first few are in `bypass`.
    pub bypassing: usize,
    pub bypass: Vec<IngressBypass>,
}

/// One rule of cloudflared's ingress whose requests do not reach the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressBypass {
    /// The rule's hostname (`*` for a catch-all).
    pub hostname: String,
    /// Its service, credentials in a URL redacted.
    pub service: String,
}

/// `/status`'s `election`, published by the election.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElectionStatus {
    pub backend: String,
    pub elections_lost: u64,
    pub elections_won: u64,
    pub host_name: String,
    pub is_leader: bool,
    pub key: String,
    pub last_error: Option<String>,
    pub leader: Option<String>,
    /// Hex, while leading.
    pub lease_id: Option<String>,
    pub lease_remaining_s: Option<f64>,
    pub lease_ttl_s: Option<u64>,
    pub renew_failures: u64,
    /// `leader`, `follower`, `stepped-aside`, `gated`, `unreachable`.
    pub state: String,
}

/// `/status`'s `follow`, published by the `[role_follow]` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowStatus {
    pub checks: u64,
    /// The last answer: an HTTP status, or why there was none.
    pub last: String,
    /// `null` until `rise` or `fall` answers in a row were seen.
    pub passing: Option<bool>,
    pub url: String,
}

/// Facts for `/status`, replaced whole on each change.
#[derive(Debug, Clone, Default)]
pub struct StatusInfo {
    pub config_file: String,
    pub route_source: String,
    pub routes: Vec<RouteStatus>,
    /// Bumped on every applied route table.
    pub routes_version: u64,
    /// The pushed table carries GRPCRoute rules (the controller's `hasGrpcRoute`).
    pub grpc_routes: bool,
    pub last_reload_error: Option<String>,
    /// Settings changed in the file that need a restart to apply.
    pub pending_restart: Vec<String>,
    pub secrets: Vec<String>,
    /// Why the table in use is the last good one rather than the source's (unreachable source).
    pub routes_fallback: Option<String>,
    /// cloudflared's metrics address, for re-exporting its metrics.
    pub cloudflared_metrics: Option<SocketAddr>,
    /// How long after losing its last connection the tunnel still counts as connected.
    pub tunnel_ready_grace: Duration,
    /// `None` until the boot decided it.
    pub role: Option<Role>,
    pub role_source: Option<RoleSource>,
    /// The running build and its upgrades.
    pub agent: AgentStatus,
}

/// The agent's cached health.
pub struct Health {
    pub config_loaded: AtomicBool,
    pub secrets_loaded: AtomicBool,
    pub routes_loaded: AtomicBool,
    pub proxy_answering: AtomicBool,
    /// Set first thing on shutdown, so probes fail before anything stops.
    pub draining: AtomicBool,
    /// Set the moment this node decides to leave `active` (demote, a watched attribute naming
    /// another host, a lost election), before cloudflared is told to stop, and cleared when it
    /// becomes active again: `/active` must fail from the decision on, not from the end of
    /// cloudflared's drain, or a failover check sees two active nodes for a whole grace period.
    pub leaving_active: AtomicBool,
    pub status: ArcSwap<StatusInfo>,
    pub metrics: Arc<Metrics>,
    tunnel: Arc<dyn TunnelView>,
    /// The leader election, when `[role_election]` is configured.
    election: std::sync::OnceLock<Box<dyn Published<ElectionStatus>>>,
    /// The `[role_follow]` check, when configured.
    follow: std::sync::OnceLock<Box<dyn Published<FollowStatus>>>,
    /// `health.details_from = "anywhere"`: `/status` and `/metrics` answer every client.
    details_anywhere: AtomicBool,
    started: Instant,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>, tunnel: Arc<dyn TunnelView>) -> Arc<Health> {
        Arc::new(Health {
            config_loaded: AtomicBool::new(false),
            secrets_loaded: AtomicBool::new(false),
            routes_loaded: AtomicBool::new(false),
            proxy_answering: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            leaving_active: AtomicBool::new(false),
            status: ArcSwap::default(),
            metrics,
            tunnel,
            election: std::sync::OnceLock::new(),
            follow: std::sync::OnceLock::new(),
            details_anywhere: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// The election's part of `/status` and `/metrics`, from now on (once per run).
    pub fn publish_election(&self, election: Box<dyn Published<ElectionStatus>>) {
        let _ = self.election.set(election);
    }

    /// The followed check's part of `/status` and `/metrics`, from now on (once per run).
    pub fn publish_follow(&self, follow: Box<dyn Published<FollowStatus>>) {
        let _ = self.follow.set(follow);
    }

    /// Read once at start (`health.details_from` is restart-only).
    pub fn set_details_from(&self, from: crate::config::DetailsFrom) {
        let anywhere = from == crate::config::DetailsFrom::Anywhere;
        self.details_anywhere.store(anywhere, Ordering::Release);
    }

    /// Whether `peer` may see `/status` and `/metrics`.
    fn shows_details_to(&self, peer: SocketAddr) -> bool {
        self.details_anywhere.load(Ordering::Acquire) || peer.ip().to_canonical().is_loopback()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut StatusInfo)) {
        let mut next = StatusInfo::clone(&self.status.load());
        f(&mut next);
        self.status.store(Arc::new(next));
    }

    /// The readiness verdict and the per-component detail behind it.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let (ready, components) = self.components();
        let body = json!({
            "ready": ready,
            "role": self.status.load().role,
            "draining": self.draining.load(Ordering::Acquire),
            "components": components,
        });
        (ready, body)
    }

    /// The verdict, and each component's word on it (`ok`, `not ready`, cloudflared's state).
    fn components(&self) -> (bool, std::collections::BTreeMap<String, String>) {
        let flag = |b: &AtomicBool| b.load(Ordering::Acquire);
        let components = [
            ("config", flag(&self.config_loaded)),
            ("secrets", flag(&self.secrets_loaded)),
            ("routes", flag(&self.routes_loaded)),
            ("proxy", flag(&self.proxy_answering)),
        ];
        let draining = flag(&self.draining);
        let (tunnel_ok, tunnel_text) = self.tunnel_verdict();
        let ready = !draining && tunnel_ok && components.iter().all(|(_, ok)| *ok);
        let mut detail: std::collections::BTreeMap<String, String> = components
            .into_iter()
            .map(|(name, ok)| (name.to_owned(), if ok { "ok" } else { "not ready" }.to_owned()))
            .collect();
        detail.insert("cloudflared".to_owned(), tunnel_text);
        (ready, detail)
    }

    /// cloudflared's part of the verdict: fine when it is not wanted here; otherwise running and
    /// connected (with the configured grace), and not crash-looping.
    fn tunnel_verdict(&self) -> (bool, String) {
        let t = self.tunnel.status();
        // A demoted node that is still draining serves its (new) standby role: ready.
        if self.draining_after_demotion() {
            return (true, DRAINING_AFTER_DEMOTION.to_owned());
        }
        if !t.wanted {
            let why = if self.status.load().role == Some(Role::Standby) {
                "standby (not running)"
            } else {
                "disabled"
            };
            return (true, why.to_owned());
        }
        if t.crash_loop {
            return (false, "crash loop".to_owned());
        }
        if t.pid.is_none() {
            return (false, "not running".to_owned());
        }
        let conns = t.connections;
        if conns > 0 {
            return (true, format!("connected ({conns})"));
        }
        if self.tunnel.connected(self.status.load().tunnel_ready_grace) {
            return (true, "reconnecting (within grace)".to_owned());
        }
        (false, "no connections".to_owned())
    }

    /// The node left `active` and its cloudflared, already sent its SIGTERM, still runs.
    fn draining_after_demotion(&self) -> bool {
        self.leaving_active.load(Ordering::Acquire) && self.tunnel.status().pid.is_some()
    }

    /// `/active`: this node runs the tunnel, it is connected, and the node has not decided to
    /// leave `active`.
    pub fn active(&self) -> bool {
        self.tunnel.status().wanted
            && !self.leaving_active.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && self.tunnel.connected(self.status.load().tunnel_ready_grace)
    }

    /// What `/status` and `tunnel-agent status` show: every URL in it (a followed check, an
    /// error naming an endpoint) without the credentials it may carry.
    pub fn status_json(&self) -> serde_json::Value {
        let mut status = serde_json::to_value(self.status_facts()).unwrap_or_default();
        redact_strings(&mut status);
        status
    }

    /// [`Health::status_json`], typed (for the control socket's reply). `None` only if the
    /// redacted value no longer had the shape, which would be a bug: nothing unredacted instead.
    pub fn status(&self) -> Option<Status> {
        serde_json::from_value(self.status_json()).ok()
    }

    fn status_facts(&self) -> Status {
        let s = self.status.load();
        let (ready, readiness) = self.components();
        Status {
            agent: s.agent.clone(),
            version: crate::build_info::VERSION.to_owned(),
            commit: crate::build_info::COMMIT.to_owned(),
            build_date: crate::build_info::BUILD_DATE.to_owned(),
            role: s.role,
            role_source: s.role_source,
            uptime_s: self.started.elapsed().as_secs(),
            ready,
            readiness,
            config_file: s.config_file.clone(),
            routes: RoutesStatus {
                source: s.route_source.clone(),
                version: s.routes_version,
                count: s.routes.len(),
                grpc: s.grpc_routes,
                table: s.routes.clone(),
            },
            routes_fallback: s.routes_fallback.clone(),
            cloudflared: self.tunnel.status(),
            last_reload_error: s.last_reload_error.clone(),
            pending_restart: s.pending_restart.clone(),
            secrets: s.secrets.clone(),
            election: self.election.get().map(|e| e.status()),
            follow: self.follow.get().map(|f| f.status()),
        }
    }

    /// Our metrics, then cloudflared's own (fetched with a short timeout; absent if it does not
    /// answer).
    async fn render_metrics(&self) -> String {
        use crate::prom_text::{self, Family, Kind};
        let mut out = String::with_capacity(16 * 1024);
        self.metrics.render(&mut out);
        crate::process_stats::ProcessStats::read().render(&mut out);
        let t = self.tunnel.status();
        let gauges = [
            (
                "tunnel_agent_cloudflared_wanted",
                "1 when cloudflared should run on this node.",
                u64::from(t.wanted),
            ),
            (
                "tunnel_agent_cloudflared_up",
                "1 while cloudflared is running.",
                u64::from(t.pid.is_some()),
            ),
            (
                "tunnel_agent_cloudflared_connections",
                "cloudflared's readyConnections at the last poll.",
                u64::from(t.connections),
            ),
            (
                "tunnel_agent_cloudflared_crash_loop",
                "1 while cloudflared is crash-looping.",
                u64::from(t.crash_loop),
            ),
            (
                "tunnel_agent_cloudflared_ingress_bypass_rules",
                "Rules of cloudflared's ingress whose requests do not reach the proxy (0 when unknown).",
                t.remote_ingress.as_ref().map_or(0, |a| a.bypassing as u64),
            ),
        ];
        for (name, help, v) in gauges {
            prom_text::single(&mut out, name, Kind::Gauge, help, v);
        }
        if let Some(version) = &t.version {
            let help = "The cloudflared version the agent detected at boot.";
            Family::open(&mut out, "tunnel_agent_cloudflared_info", Kind::Gauge, help)
                .sample(&[("version", version)], 1);
        }
        render_upgrades(&self.status.load().agent, &mut out);
        let help = "cloudflared restarts after failures.";
        prom_text::single(
            &mut out,
            "tunnel_agent_cloudflared_restarts_total",
            Kind::Counter,
            help,
            t.restarts,
        );
        let role = self.status.load().role;
        let help = "The node's role (1 for the current one).";
        let mut family = Family::open(&mut out, "tunnel_agent_role", Kind::Gauge, help);
        for r in [Role::Active, Role::Standby] {
            family.sample(&[("role", r.as_str())], u8::from(role == Some(r)));
        }
        if let Some(e) = self.election.get() {
            e.render_metrics(&mut out);
        }
        if let Some(f) = self.follow.get() {
            f.render_metrics(&mut out);
        }
        let (ready, _) = self.readiness();
        let help = "1 when /ready answers 200.";
        prom_text::single(&mut out, "tunnel_agent_ready", Kind::Gauge, help, u8::from(ready));
        if let (Some(addr), true) = (self.status.load().cloudflared_metrics, t.pid.is_some()) {
            if let Some(text) = fetch_text(addr, "/metrics", Duration::from_secs(1)).await {
                out.push_str(&text);
            }
        }
        out
    }

    /// Answers one request on the health listener, from `peer`.
    pub async fn handle(self: Arc<Self>, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                r#"{"error":"method not allowed"}"#.into(),
            );
        }
        let Some(endpoint) = Endpoint::parse(req.uri().path()) else {
            return reply(
                StatusCode::NOT_FOUND,
                "application/json",
                r#"{"error":"not found"}"#.into(),
            );
        };
        if matches!(endpoint, Endpoint::Metrics | Endpoint::Status) && !self.shows_details_to(peer) {
            return reply(
                StatusCode::FORBIDDEN,
                "application/json",
                json!({"error": format!(
                    "{} is served to clients on this host only (health.details_from = \"loopback\")",
                    endpoint.path()
                )})
                .to_string(),
            );
        }
        match endpoint {
            Endpoint::Healthz => reply(StatusCode::OK, "application/json", r#"{"status":"ok"}"#.into()),
            Endpoint::Ready => {
                let (ready, body) = self.readiness();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(status, "application/json", body.to_string())
            }
            Endpoint::Active => {
                if self.active() {
                    reply(StatusCode::OK, "application/json", r#"{"active":true}"#.into())
                } else if self.draining_after_demotion() {
                    let body = json!({"active": false, "reason": DRAINING_AFTER_DEMOTION});
                    reply(StatusCode::SERVICE_UNAVAILABLE, "application/json", body.to_string())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        r#"{"active":false}"#.into(),
                    )
                }
            }
            Endpoint::Metrics => reply(StatusCode::OK, "text/plain; version=0.0.4", self.render_metrics().await),
            Endpoint::Status => reply(StatusCode::OK, "application/json", self.status_json().to_string()),
        }
    }

    /// Probes the proxy's `/healthz` every `interval` and records whether it answered.
    pub fn watch_proxy(self: &Arc<Self>, addr: SocketAddr, interval: Duration) -> tokio::task::JoinHandle<()> {
        let health = Arc::downgrade(self);
        let target = probe_address(addr);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ok = probe(target, interval).await;
                let Some(health) = health.upgrade() else { return };
                let was = health.proxy_answering.swap(ok, Ordering::AcqRel);
                if was != ok {
                    if ok {
                        tracing::info!(%target, "proxy answers its health probe on {target}");
                    } else {
                        tracing::warn!(%target, "proxy stopped answering its health probe on {target}");
                    }
                }
            }
        })
    }
}

/// The config API's `/readyz` and `/metrics` (the gateway controller's probes and scrape) read
/// the same state as `/ready` and `/metrics` here.
impl crate::routing::config_api::NodeView for Health {
    fn serving(&self) -> Result<(), String> {
        let (ready, body) = self.readiness();
        if ready {
            return Ok(());
        }
        if body["draining"] == json!(true) {
            return Err("draining".to_owned());
        }
        let (tunnel_ok, tunnel) = self.tunnel_verdict();
        if !tunnel_ok {
            return Err(format!("tunnel not connected to edge: {tunnel}"));
        }
        let components = body["components"].as_object().into_iter().flatten();
        let waiting: Vec<&str> = components
            .filter(|(name, state)| *name != "cloudflared" && state.as_str() != Some("ok"))
            .map(|(name, _)| name.as_str())
            .collect();
        Err(format!("not ready: {}", waiting.join(", ")))
    }

    fn metrics_text(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(self.render_metrics())
    }
}

/// Passes every string in `value` through [`crate::secret::redact_urls_in`].
fn redact_strings(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) if s.contains("://") => *s = crate::secret::redact_urls_in(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_strings),
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_strings),
        _ => {}
    }
}

/// Where to reach a listener bound to a wildcard address.
fn probe_address(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, a.port())),
        a => a,
    }
}

/// One `GET /healthz` over a fresh connection; true on a 200.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tunnel-agent-probe\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let m = s.read(&mut buf[n..]).await.ok()?;
            if m == 0 {
                break;
            }
            n += m;
        }
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A plain HTTP/1.1 GET of a small text document from a loopback service.
async fn fetch_text(addr: SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.take(4 * 1024 * 1024).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8(buf).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.").then_some(())?;
        head.split(' ').nth(1).filter(|c| *c == "200")?;
        Some(body.to_owned())
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
