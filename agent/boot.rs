//! The boot sequence as a list of steps, then the node's event loop, then the stop stack popped.
//!
//! Each step is a function in [`steps`] that takes what it needs and returns what it started
//! with its [`Stop`](crate::shutdown::Stop); [`start`] is the list, top to bottom: config →
//! secrets → routes → health listener → proxy → node → control socket → cloudflared → config API
//! → ready → watches, role sources, refreshers. Every stop goes on one [`Stops`] stack. Shutdown,
//! or a step that fails, pops it: readiness fails first (`draining`), so probes stop routing here
//! while the rest drains, then the last thing started is the first stopped.

mod steps;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::exit::AgentError;
use crate::health::Health;
use crate::node::{Node, NodeParts, Signal, Sources};
use crate::role;
use crate::server;
use crate::shutdown::{Lent, Stops};
use crate::systemd;
use crate::telemetry::Metrics;
use crate::tunnel::TunnelState;

/// Runs the agent until `signals` says shut down (or closes), or cloudflared's supervisor gives
/// up. `config` was loaded from `config_path` by the caller (which needed it to set up logging);
/// `signals` also carries reloads.
pub async fn run(config_path: PathBuf, config: Config, signals: mpsc::Receiver<Signal>) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let tunnel = Arc::new(TunnelState::default());
    let health = Health::new(metrics.clone(), tunnel.clone());
    // The graces at shutdown are the configuration's in effect then: the boot file's, or the
    // node's after its reloads.
    let mut in_effect = config.clone();
    let mut stops = Stops::default();
    let failure = match start(&mut stops, &health, &tunnel, &metrics, config_path, config, signals).await {
        Ok((mut node, sources)) => {
            let failure = node.run(sources).await.map(AgentError::from);
            in_effect = node.config().clone();
            // Dropped here: the node goes back to its stop, on the stack below the later steps'.
            failure
        }
        Err(e) => Some(e),
    };
    tracing::info!("shutting down");
    systemd::stopping();
    health.draining.store(true, Ordering::Release);
    stops.stop_all(&in_effect).await;
    failure.map_or(Ok(()), Err)
}

/// The boot steps, in order, each stop pushed on `stops`. Returns the node, lent to its event
/// loop, and the sources of its events.
async fn start(
    stops: &mut Stops,
    health: &Arc<Health>,
    tunnel: &Arc<TunnelState>,
    metrics: &Arc<Metrics>,
    config_path: PathBuf,
    config: Config,
    signals: mpsc::Receiver<Signal>,
) -> Result<(Lent<Node>, Sources), AgentError> {
    let boot_deadline = crate::deadline::from_now(config.agent.boot_timeout);
    let clients = steps::clients(&config, health)?;
    // 1. Config (loaded and validated by the caller), and what the cloudflared it names can do.
    let cloudflared_version = steps::config_loaded(&config, &config_path, health, tunnel).await?;
    // 2. Secrets.
    let secrets = steps::secrets(&config, &clients, metrics, health, boot_deadline).await?;
    // 3. Routes.
    let routes = steps::routes(&config, &clients, metrics).await?;
    let limits = steps::limits(&config);
    // 4. Health listener.
    let listener = server::bind(config.health.listen, "health.listen").await?;
    stops.push(steps::health_listener(listener, &limits, health)?);
    // 5. Proxy (an empty table until the node installs the boot table), the node, the probe.
    let proxy = steps::proxy(&config, &secrets, &clients, metrics)?;
    let workers = config.proxy.worker_threads();
    let sockets = server::bind_workers(config.proxy.listen, "proxy.listen", workers)?;
    let proxy_addr = stops.keep(steps::proxy_listener(sockets, &proxy, &config, &limits, metrics)?);
    let role = role::start::boot(&config, &clients.metadata).await;
    let role_etag = role.etag.clone();
    let (routes_etag, metadata) = (routes.etag.clone(), clients.metadata.clone());
    let parts = NodeParts {
        config_path,
        config,
        health: health.clone(),
        metrics: metrics.clone(),
        proxy,
        proxy_addr,
        metadata: clients.metadata,
        secret_manager: clients.secret_manager,
        secrets,
        tunnel: tunnel.clone(),
        role,
        cloudflared_version,
    };
    let (mut node, secret_changes) = stops.keep(steps::node(parts, routes));
    stops.push(steps::proxy_probe(health, proxy_addr, workers).await?);
    // 6. The control socket (before READY=1, so `systemctl start` followed at once by
    // `tunnel-agent promote` finds it), cloudflared once the proxy answers, the config API.
    let control = stops.keep(steps::control_socket(node.config())?);
    steps::cloudflared(&node, health).await;
    let pushes = stops.keep_some(steps::config_api(&node, health, metrics, limits).await?);
    // 7. Ready: every local component serves; the tunnel's edge connection is /ready's business.
    systemd::ready("serving");
    tracing::info!("ready");
    // The role sources and route watch from here (a standby is ready), then the refreshers.
    let roles = stops.keep_some(steps::role_watch(node.config(), &metadata, role_etag));
    let follow = steps::follow(&mut node)?;
    let (election, status_tick) = steps::election(&mut node)?;
    let route_updates = stops.keep_some(steps::route_watch(node.config(), metadata, routes_etag));
    node.restart_refreshers();
    let sources = Sources {
        signals,
        routes: route_updates,
        pushes,
        secrets: secret_changes,
        control,
        roles,
        election,
        follow,
        status_tick,
        watchdog: systemd::watchdog_interval().map(tokio::time::interval),
    };
    Ok((node, sources))
}
