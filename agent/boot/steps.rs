//! The boot steps, in the order [`super::start`] runs them. Each takes what it needs and returns
//! what it started, with its [`Stop`] when it started something that runs.
//!
//! The listener steps take their sockets rather than binding them: the caller binds them now,
//! and a start that inherits its sockets would hand those instead, through the same step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};

use crate::config::{Config, RouteSourceKind};
use crate::election::Outcome;
use crate::gcp::{self, MetadataClient, SecretManager};
use crate::handover::listeners::{Kind, Sockets};
use crate::handover::State;
use crate::health::{self, Health};
use crate::node::{Node, NodeParts};
use crate::proxy::{AccessLog, InboundAuth, LiveSettings, Proxy};
use crate::role::{self, Role};
use crate::routing::config_api::{self, Push};
use crate::routing::source::{self as route_source, BootRoutes};
use crate::routing::table::RouteTable;
use crate::secrets::refresh::SecretChange;
use crate::secrets::resolve::{join_errors, resolve_all};
use crate::secrets::SecretValues;
use crate::server::{self, Limits};
use crate::shutdown::{Lent, Stop};
use crate::telemetry::Metrics;
use crate::tunnel::version::{CloudflaredVersion, Unsupported};
use crate::tunnel::TunnelState;
use crate::{control, systemd};

/// The internal listeners' grace: the health listener and the config API hold no long requests.
fn one_second(_: &Config) -> Duration {
    Duration::from_secs(1)
}

/// The proxy drains for `agent.shutdown_grace`.
fn shutdown_grace(config: &Config) -> Duration {
    config.agent.shutdown_grace
}

/// The node's stop: the election's resign (a request to etcd), then cloudflared's drain and
/// SIGKILL after it. The node bounds each part itself; this bounds the whole.
fn node_grace(config: &Config) -> Duration {
    let cf = &config.cloudflared;
    let resign = config
        .role_election
        .as_ref()
        .map_or(Duration::ZERO, |e| e.request_timeout());
    cf.grace_period.saturating_add(cf.stop_margin).saturating_add(resign)
}

/// The clients of the cloud's services every later step may use.
pub(super) struct Clients {
    pub metadata: MetadataClient,
    pub secret_manager: Arc<SecretManager>,
}

/// The binary an upgrade runs: the path this process was first started from (carried from
/// image to image: by the time of an upgrade, `/proc/self/exe` names the replaced file).
pub(super) fn binary(carried: Option<&State>) -> PathBuf {
    match carried {
        Some(s) => s.node.binary.clone(),
        None => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/tunnel-agent")),
    }
}

/// Step 0: the metadata server's and Secret Manager's clients; `/status` details policy and
/// the running build.
pub(super) fn clients(config: &Config, health: &Health) -> anyhow::Result<Clients> {
    health.set_details_from(config.health.details_from);
    health.update_status(|s| s.agent = crate::handover::fresh_status());
    let metadata = MetadataClient::new(config.gcp.metadata_base(), config.gcp.metadata_timeout)?;
    let secret_manager = Arc::new(SecretManager::new(
        metadata.clone(),
        config.gcp.secret_manager_endpoint.clone(),
        config.gcp.metadata_timeout.max(Duration::from_secs(10)),
    )?);
    Ok(Clients {
        metadata,
        secret_manager,
    })
}

/// Step 1: the config is loaded (by the caller); what the cloudflared it names can do. After an
/// upgrade, what the adopted cloudflared is, from the carried state (the binary on disk is asked
/// once the new image is ready: `Node::recheck_cloudflared_version`).
pub(super) async fn config_loaded(
    config: &Config,
    config_path: &Path,
    health: &Health,
    tunnel: &TunnelState,
    carried: Option<&State>,
) -> Result<Option<CloudflaredVersion>, Unsupported> {
    health.config_loaded.store(true, Ordering::Release);
    // The environment mode (`--from-env`) says so: its settings are not all in a file.
    let file = match (crate::config::env::active(), config_path.as_os_str().is_empty()) {
        (Some(_), true) => "(environment)".to_owned(),
        (Some(_), false) => format!("{} + environment", config_path.display()),
        (None, _) => config_path.display().to_string(),
    };
    health.update_status(|s| s.config_file = file);
    let adopted = carried
        .and_then(|s| s.node.tunnel.as_ref())
        .filter(|t| t.pid.is_some())
        .and_then(|t| t.status.version.as_deref())
        .and_then(|v| crate::tunnel::version::parse(&format!("cloudflared version {v}")));
    match adopted {
        Some(version) if config.cloudflared.enabled => {
            tunnel.set_version(version.version.clone());
            Ok(Some(version))
        }
        _ => detect_cloudflared(config, tunnel).await,
    }
}

/// Asks the configured cloudflared its version at boot (a reload asks again, in
/// `Node::reload_cloudflared_version`): logged, shown in `/status` and the metrics, and checked
/// against the token delivery. A cloudflared that cannot be asked is only warned about here
/// (starting it will say what is wrong, and a standby may never start it).
async fn detect_cloudflared(config: &Config, tunnel: &TunnelState) -> Result<Option<CloudflaredVersion>, Unsupported> {
    let cf = &config.cloudflared;
    if !cf.enabled {
        return Ok(None);
    }
    match crate::tunnel::version::detect(&cf.path, Duration::from_secs(10)).await {
        Ok(version) => {
            tracing::info!(
                program = %cf.path.display(),
                version = %version.version,
                "cloudflared version {} ({})",
                version.version,
                cf.path.display()
            );
            tunnel.set_version(version.version.clone());
            crate::tunnel::version::check_delivery(&cf.path, &version, cf.token_delivery)?;
            Ok(Some(version))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell cloudflared's version: {e}");
            Ok(None)
        }
    }
}

/// Step 2: every named secret's value, retried until `deadline` (`agent.boot_timeout`); or the
/// values the previous image carried (rotations included), when they name every configured one.
pub(super) async fn secrets(
    config: &Config,
    clients: &Clients,
    metrics: &Metrics,
    health: &Health,
    deadline: Instant,
    carried: Option<&State>,
) -> anyhow::Result<SecretValues> {
    let carried = carried
        .map(|s| s.node.secrets.values())
        .filter(|values| config.secrets.keys().all(|name| values.contains_key(name)));
    let secrets = match carried {
        Some(values) => values,
        None => {
            systemd::status("fetching secrets");
            resolve_all(config, &clients.secret_manager, metrics, deadline)
                .await
                .map_err(|e| anyhow::anyhow!(join_errors(&e)))?
        }
    };
    health.secrets_loaded.store(true, Ordering::Release);
    health.update_status(|s| s.secrets = secrets.keys().cloned().collect());
    Ok(secrets)
}

/// Step 3: the route source's table, or the last good one.
pub(super) async fn routes(config: &Config, clients: &Clients, metrics: &Metrics) -> anyhow::Result<BootRoutes> {
    systemd::status("loading routes");
    let routes = route_source::boot(config, &clients.metadata, metrics).await?;
    let (count, source) = (routes.table.len(), route_source::describe(config));
    tracing::info!(routes = count, source = %source, "routes loaded: {count} from {source}");
    Ok(routes)
}

/// The client-side limits every listener starts from.
pub(super) fn limits(config: &Config) -> Limits {
    Limits {
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        max_header_bytes: config.proxy.max_header_bytes,
        http2_keep_alive_interval: config.proxy.http2_keep_alive_interval,
        max_connections: None,
    }
}

/// Step 4: `:2000` (readiness, status, metrics) served on `listener`.
pub(super) fn health_listener(listener: TcpListener, limits: &Limits, health: &Arc<Health>) -> anyhow::Result<Stop> {
    let health = health.clone();
    let server = server::serve(listener, limits.clone(), move |peer, req| {
        health.clone().handle(peer, req)
    })?;
    tracing::info!(listen = %server.local_addr, "health listener up on {}", server.local_addr);
    Ok(server.into_stop("health listener", one_second))
}

/// Step 5a: the proxy's shared state, serving `table` (the boot table, which the node then
/// installs through the path every table takes).
pub(super) fn proxy(
    config: &Config,
    secrets: &SecretValues,
    clients: &Clients,
    metrics: &Arc<Metrics>,
    table: Arc<RouteTable>,
) -> anyhow::Result<Arc<Proxy>> {
    let tokens = gcp::IdTokenCache::new(
        clients.metadata.clone(),
        config.gcp.id_token_refresh_margin,
        metrics.clone(),
        tokio::runtime::Handle::current(),
    );
    let live = LiveSettings {
        auth: InboundAuth::for_config(config, secrets, None)?,
        routes: table,
        auth_header: HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?,
        max_body_bytes: config.proxy.max_body_bytes,
        access_log: AccessLog::from_config(&config.proxy.access_log),
    };
    Proxy::new(&config.proxy, live, tokens, metrics.clone())
}

/// Step 5b: the proxy served on `sockets`, one worker thread each, each with its own upstream
/// pools (nginx's worker model; docs/benchmarks.md has the numbers). Drained for
/// `agent.shutdown_grace` when stopped.
pub(super) fn proxy_listener(
    sockets: Vec<std::net::TcpListener>,
    proxy: &Arc<Proxy>,
    config: &Config,
    limits: &Limits,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(SocketAddr, Stop)> {
    let limits = limits.clone().capped(config.proxy.max_connections, metrics);
    let server = server::serve_workers(sockets, limits, |_| {
        let worker = proxy.worker();
        move |peer, req| worker.clone().handle(peer, req)
    })?;
    Ok((server.local_addr, server.into_stop("proxy", shutdown_grace)))
}

/// Step 5c: the node, which holds everything that can change from here on; it installs the boot
/// table through the path every later table takes. Its stop (the election's resign,
/// cloudflared, the refreshers) runs when the stack reaches it, wherever boot stopped.
pub(super) fn node(
    parts: NodeParts,
    routes: BootRoutes,
    table: Arc<RouteTable>,
) -> ((Lent<Node>, mpsc::Receiver<SecretChange>), Stop) {
    let health = parts.health.clone();
    let (node, secret_changes) = Node::new(parts);
    let (mut node, stop) = Stop::lend("node", node_grace, node, Node::stop);
    // An upgrade hands cloudflared and the election to the next image instead of stopping them.
    let stop = stop.carried_over();
    node.publish_role();
    node.install_routes(&routes.map, table);
    health.update_status(|s| s.routes_fallback = routes.fallback);
    ((node, secret_changes), stop)
}

/// Step 5d: waits for the proxy to answer its own probe (before declaring it, and before
/// cloudflared may send traffic), then keeps probing it for `/ready`.
pub(super) async fn proxy_probe(health: &Arc<Health>, addr: SocketAddr, workers: usize) -> anyhow::Result<Stop> {
    let deadline = crate::deadline::from_now(Duration::from_secs(5));
    while !health::probe(addr, Duration::from_secs(1)).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "proxy on {addr} does not answer its own health probe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    health.proxy_answering.store(true, Ordering::Release);
    let probe = health.watch_proxy(addr, Duration::from_secs(1));
    tracing::info!(listen = %addr, workers, "proxy up on {addr}");
    Ok(Stop::aborting("proxy probe", probe))
}

/// Step 6a: the control socket, bound or adopted. Commands wait in the channel until the node's
/// loop runs. Stopping it stops accepting; the file goes at shutdown (`boot::run`), not at an
/// upgrade, whose next image serves the same socket.
pub(super) fn control_socket(
    config: &Config,
    sockets: &mut Sockets,
) -> anyhow::Result<(mpsc::Receiver<control::Incoming>, Stop)> {
    let (tx, rx) = mpsc::channel(4);
    let runtime_dir = &config.agent.runtime_dir;
    let listener = sockets.control(&control::socket_path(runtime_dir), || control::bind(runtime_dir))?;
    let task = control::serve(listener, tx)?;
    Ok((rx, Stop::aborting("control socket", task)))
}

/// Step 6b: cloudflared, started when this node is active (the proxy answers by now).
pub(super) async fn cloudflared(node: &Node, health: &Health) {
    let cf = &node.config().cloudflared;
    let (cf_metrics, cf_grace) = (cf.enabled.then_some(cf.metrics), cf.ready_grace);
    health.update_status(|s| {
        s.cloudflared_metrics = cf_metrics;
        s.tunnel_ready_grace = cf_grace;
    });
    if node.wants_tunnel() {
        systemd::status("starting cloudflared");
    }
    node.follow_tunnel().await;
}

/// Step 6c: the L7 config API (`routes.source = "config-api"`): the controller pushes route
/// tables, which reach the node as events.
pub(super) async fn config_api(
    node: &Node,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    limits: Limits,
    sockets: &mut Sockets,
) -> anyhow::Result<(mpsc::Receiver<Push>, Option<Stop>)> {
    let (tx, rx) = mpsc::channel(4);
    let config = node.config();
    let (Some(section), RouteSourceKind::ConfigApi) = (&config.config_api, config.routes.source) else {
        return Ok((rx, None));
    };
    if let Some(name) = &section.auth_secret {
        anyhow::ensure!(node.secrets().contains_key(name), "config_api.auth_secret has no value");
    } else if crate::config::env::active().is_none() {
        // Validated: only with `allow_unauthenticated = true`. The environment mode has said
        // it already, naming PROXY_AUTH_TOKEN.
        tracing::warn!(listen = %section.listen, "the config API on {} takes pushes WITHOUT authentication (config_api.allow_unauthenticated)", section.listen);
    }
    let (settings, applied) = node.config_api_feeds();
    let view = health.clone() as Arc<dyn config_api::NodeView>;
    let listener = sockets
        .tcp(Kind::ConfigApi, section.listen, "config_api.listen")
        .await?;
    let api = config_api::start(listener, settings, tx, applied, view, metrics.clone(), limits).await?;
    Ok((rx, Some(api.into_stop("config API", one_second))))
}

/// Step 7a: the watched role attribute, when configured.
pub(super) fn role_watch(
    config: &Config,
    metadata: &MetadataClient,
    etag: Option<String>,
) -> (mpsc::Receiver<Role>, Option<Stop>) {
    let (tx, rx) = mpsc::channel(4);
    let task = role::watch(config, metadata.clone(), etag, tx);
    (rx, task.map(|t| Stop::aborting("role watch", t)))
}

/// Step 7b: the `[role_follow]` check, when configured. Its task is the node's.
pub(super) fn follow(node: &mut Node) -> anyhow::Result<mpsc::Receiver<bool>> {
    let (tx, rx) = mpsc::channel(4);
    node.start_follow(tx)?;
    Ok(rx)
}

/// Step 7c: the election campaigns from here (READY=1 is sent: a standby is ready). Its task is
/// the node's, so that shutdown can resign before stopping it. Under an election, `STATUS=`
/// follows its state (unreachable, follower of X, leader) on a 1 s tick.
pub(super) fn election(node: &mut Node) -> anyhow::Result<(mpsc::Receiver<Outcome>, Option<Interval>)> {
    let (tx, rx) = mpsc::channel(16);
    let ticks = node.start_election(tx)?;
    Ok((rx, ticks.then(|| tokio::time::interval(Duration::from_secs(1)))))
}

/// Step 5c, after an upgrade: the election goes on from the carried lease, as soon as the node
/// exists (step 7c does not start another).
pub(super) async fn resume_election(
    node: &mut Node,
    carried: Option<crate::election::Carried>,
) -> anyhow::Result<Option<(mpsc::Receiver<Outcome>, Option<Interval>)>> {
    let Some(carried) = carried else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel(16);
    let ticks = node.resume_election(tx, carried).await?;
    Ok(Some((rx, ticks.then(|| tokio::time::interval(Duration::from_secs(1))))))
}

/// An upgraded image's guard for the carried lease until the election resumes: at the lease's
/// fence point it sends the carried cloudflared's process group its SIGTERM, as the fence would.
/// `None` when no lease was carried.
pub(super) fn fence_guard(carried: Option<&State>, config: &Config) -> Option<tokio::task::JoinHandle<()>> {
    let carried = carried?;
    let margin = config.role_election.as_ref().map_or(Duration::ZERO, |e| e.fence_margin);
    let at = carried.node.election.as_ref()?.fence_point(margin)?;
    let pid = carried.node.tunnel.as_ref().and_then(|t| t.pid)?;
    Some(tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        tracing::error!(pid, "the carried election lease reached its fence point before the election resumed; stopping cloudflared pid {pid}");
        let group = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
        if group.as_raw() > 0 {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        }
    }))
}

/// Step 7d: the watched routes attribute, when the routes come from it.
pub(super) fn route_watch(
    config: &Config,
    metadata: MetadataClient,
    etag: Option<String>,
) -> (mpsc::Receiver<route_source::Update>, Option<Stop>) {
    let (tx, rx) = mpsc::channel(4);
    let task = route_source::watch(config, metadata, etag, tx);
    (rx, task.map(|t| Stop::aborting("routes watch", t)))
}
