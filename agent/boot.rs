//! The boot sequence as a list of steps, then the node's event loop, then the stop stack popped.
//!
//! Each step is a function in [`steps`] that takes what it needs and returns what it started
//! with its [`Stop`](crate::shutdown::Stop); [`start`] is the list, top to bottom: config →
//! secrets → routes → health listener → proxy → node → control socket → cloudflared → config API
//! → ready → watches, role sources, refreshers. Every stop goes on one [`Stops`] stack. Shutdown,
//! or a step that fails, pops it: readiness fails first (`draining`), so probes stop routing here
//! while the rest drains, then the last thing started is the first stopped.
//!
//! One boot path for a fresh start and for an upgraded image: with a carried state
//! ([`crate::handover`]) the same steps adopt what the previous image handed over (its sockets,
//! secrets, role) instead of binding, fetching and deciding; the new image commits once ready, or
//! returns to the previous binary if a step fails. An upgrade ends the event loop
//! ([`Ended::Upgrade`]) and pops the stack in hand-over mode ([`Stops::hand_over`]): listeners
//! drain, the node's stop is not run, and the state goes to the new binary ([`hand_over`]).

mod steps;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::exit::AgentError;
use crate::handover::listeners::{Kind, Sockets};
use crate::handover::state::NodeState;
use crate::handover::{self, Incoming, Plan, State};
use crate::health::Health;
use crate::node::{Ended, Node, NodeParts, Signal, Sources};
use crate::role;
use crate::secrets::refresh::SecretChange;
use crate::shutdown::{Lent, Stops};
use crate::systemd;
use crate::telemetry::Metrics;
use crate::tunnel::TunnelState;

/// Runs the agent until `signals` says shut down (or closes), cloudflared's supervisor gives up,
/// or an upgrade hands the process to another binary. `config` was loaded from `config_path` by
/// the caller (which needed it to set up logging); `signals` also carries reloads and upgrades.
/// `incoming`: the state an upgraded image starts from.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    signals: mpsc::Receiver<Signal>,
    incoming: Option<Incoming>,
) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    let tunnel = Arc::new(TunnelState::default());
    let health = Health::new(metrics.clone(), tunnel.clone());
    // The graces at shutdown are the configuration's in effect then: the boot file's, or the
    // node's after its reloads.
    let mut in_effect = config.clone();
    let runtime_dir = config.agent.runtime_dir.clone();
    let mut stops = Stops::default();
    let carried = incoming.as_ref().and_then(|i| i.state().ok());
    let started = start(
        &mut stops,
        &health,
        &tunnel,
        &metrics,
        (config_path, config),
        signals,
        carried,
    )
    .await;
    let failure = match started {
        Ok((mut node, sources, sockets)) => {
            if let Some(incoming) = incoming {
                incoming.commit(&health);
                node.recheck_cloudflared_version().await;
            }
            let ended = node.run(sources).await;
            in_effect = node.config().clone();
            match ended {
                Ended::Stopped(failure) => failure.map(AgentError::from),
                Ended::Upgrade(plan) => return hand_over(&plan, node, stops, &sockets, &health, &in_effect).await,
            }
            // Dropped here: the node goes back to its stop, on the stack below the later steps'.
        }
        // An upgraded image that cannot boot returns to the previous binary, which goes on
        // with the same state; nothing of this image is stopped (its node's stop would stop the
        // carried cloudflared). Only if that is impossible does it shut down like any failure.
        Err(e) => match incoming {
            Some(incoming) => Some(AgentError::from(anyhow::anyhow!(incoming.roll_back(&e.to_string())))),
            None => Some(e),
        },
    };
    tracing::info!("shutting down");
    systemd::stopping();
    health.draining.store(true, Ordering::Release);
    stops.stop_all(&in_effect).await;
    remove_control_socket(&runtime_dir);
    failure.map_or(Ok(()), Err)
}

/// The control socket's file goes at shutdown (not at an upgrade: the next image serves it).
fn remove_control_socket(runtime_dir: &std::path::Path) {
    let path = crate::control::socket_path(runtime_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove {}: {e}", path.display()),
    }
}

/// The old image's side of an upgrade: `RELOADING=1`, the listeners stop accepting and drain
/// (at most `agent.upgrade_drain`; the kept duplicates go on listening, so the kernel queues
/// new connections), the state is written, and the new binary runs in this process's place.
/// Returns only when neither it nor this binary could be executed: then the stops kept for
/// the next image run after all, and the agent exits with the error (systemd restarts it).
async fn hand_over(
    plan: &Plan,
    mut node: Lent<Node>,
    stops: Stops,
    sockets: &Sockets,
    health: &Health,
    in_effect: &Config,
) -> Result<(), AgentError> {
    systemd::reloading_for(&format!("upgrading in place to {}", plan.to));
    let held_since = tokio::time::Instant::now();
    let kept = stops.hand_over(in_effect, in_effect.agent.upgrade_drain).await;
    // The election and cloudflared go on untouched through the drain; handed over last.
    let node: NodeState = {
        let carried = node.hand_over().await;
        // The node goes back to its stop, which the hand-over keeps unrun.
        drop(node);
        carried
    };
    let state = State {
        format: handover::state::FORMAT,
        from: crate::build_info::LONG_VERSION.to_owned(),
        to: plan.to.clone(),
        held_since_ns: crate::deadline::to_monotonic_ns(held_since),
        agent: health.status.load().agent.clone(),
        listeners: sockets.carry(),
        node,
    };
    let keep = state.fds();
    tracing::info!(
        drained_ms = held_since.elapsed().as_millis() as u64,
        "listeners drained for the upgrade in {} ms",
        held_since.elapsed().as_millis()
    );
    let why = handover::exec(plan, &state, &keep);
    tracing::error!(error = %why, "the upgrade failed and this binary cannot continue: {why}");
    for stop in kept {
        stop.stop(in_effect).await;
    }
    Err(AgentError::from(anyhow::anyhow!(why)))
}

/// What steps 0-3 give the rest: the cloud clients, cloudflared's version, the secrets, the
/// boot routes and their table.
struct Inputs {
    clients: steps::Clients,
    cloudflared_version: Option<crate::tunnel::version::CloudflaredVersion>,
    secrets: crate::secrets::SecretValues,
    routes: crate::routing::source::BootRoutes,
    table: Arc<crate::routing::table::RouteTable>,
}

/// Steps 0-3: clients, config, secrets, routes.
async fn inputs(
    config: &Config,
    config_path: &std::path::Path,
    health: &Arc<Health>,
    tunnel: &Arc<TunnelState>,
    metrics: &Arc<Metrics>,
    carried: Option<&State>,
) -> Result<Inputs, AgentError> {
    let boot_deadline = crate::deadline::from_now(config.agent.boot_timeout);
    let clients = steps::clients(config, health)?;
    // 1. Config (loaded and validated by the caller), and what the cloudflared it names can do.
    let cloudflared_version = steps::config_loaded(config, config_path, health, tunnel, carried).await?;
    // 2. Secrets.
    let secrets = steps::secrets(config, &clients, metrics, health, boot_deadline, carried).await?;
    // 3. Routes.
    let mut routes = steps::routes(config, &clients, metrics).await?;
    // The proxy serves the boot table from its first connection (an upgraded image's sockets
    // have connections queued); the node installs it through the one path right after.
    let table = Arc::new(std::mem::take(&mut routes.table));
    Ok(Inputs {
        clients,
        cloudflared_version,
        secrets,
        routes,
        table,
    })
}

/// The health listener of an upgraded image, served once it is ready: its socket, and where
/// its stop goes on the stack.
type HealthLater = Option<(usize, tokio::net::TcpListener)>;

/// What steps 4-5 started that the later steps use.
struct Up {
    node: Lent<Node>,
    secret_changes: mpsc::Receiver<SecretChange>,
    /// A resumed election's outcomes and status tick (step 7 starts one otherwise).
    resumed: Option<Resumed>,
    health_later: HealthLater,
    /// The watched role attribute's ETag, where its watch starts.
    role_etag: Option<String>,
}

/// Steps 4-5: the health listener, the proxy, the role, the node (which adopts a carried
/// cloudflared and resumes a carried election), the proxy's probe.
#[allow(clippy::too_many_arguments)]
async fn node_up(
    stops: &mut Stops,
    sockets: &mut Sockets,
    health: &Arc<Health>,
    tunnel: &Arc<TunnelState>,
    metrics: &Arc<Metrics>,
    (config_path, config): (PathBuf, Config),
    inputs: Inputs,
    limits: &crate::server::Limits,
    carried: Option<&State>,
) -> Result<Up, AgentError> {
    // 4. Health listener. A fresh start answers probes from here (503 while booting); an
    // upgraded image leaves the inherited socket queueing until it is ready, so no probe sees
    // it half-started.
    let listener = sockets.tcp(Kind::Health, config.health.listen, "health.listen").await?;
    let later = match carried {
        None => {
            stops.push(steps::health_listener(listener, limits, health)?);
            None
        }
        Some(_) => Some((stops.len(), listener)),
    };
    // 5. Proxy (serving the boot table), the role, the node, the probe.
    let Inputs {
        clients,
        cloudflared_version,
        secrets,
        routes,
        table,
    } = inputs;
    let proxy = steps::proxy(&config, &secrets, &clients, metrics, table.clone())?;
    let worker_sockets = sockets.proxy(config.proxy.listen, config.proxy.worker_threads())?;
    let workers = worker_sockets.len();
    let proxy_addr = stops.keep(steps::proxy_listener(worker_sockets, &proxy, &config, limits, metrics)?);
    let role = match carried {
        Some(s) => role::Boot {
            role: s.node.role,
            source: s.node.role_source,
            etag: None,
        },
        None => role::start::boot(&config, &clients.metadata).await,
    };
    let role_etag = role.etag.clone();
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
        binary: steps::binary(carried),
        tunnel_carried: carried.and_then(|s| s.node.tunnel.clone()),
    };
    let (mut node, secret_changes) = stops.keep(steps::node(parts, routes, table));
    let resumed = steps::resume_election(&mut node, carried.and_then(|s| s.node.election.clone())).await?;
    stops.push(steps::proxy_probe(health, proxy_addr, workers).await?);
    Ok(Up {
        node,
        secret_changes,
        resumed,
        health_later: later,
        role_etag,
    })
}

/// A resumed election's outcomes and its status tick.
type Resumed = (mpsc::Receiver<crate::election::Outcome>, Option<tokio::time::Interval>);

/// The boot steps, in order, each stop pushed on `stops`; with `carried`, from the state the
/// previous image handed over. Returns the node, lent to its event loop, the sources of its
/// events, and the listening sockets (for the next upgrade).
async fn start(
    stops: &mut Stops,
    health: &Arc<Health>,
    tunnel: &Arc<TunnelState>,
    metrics: &Arc<Metrics>,
    (config_path, config): (PathBuf, Config),
    signals: mpsc::Receiver<Signal>,
    carried: Option<&State>,
) -> Result<(Lent<Node>, Sources, Sockets), AgentError> {
    let mut sockets = Sockets::new(carried.map(|s| s.listeners.clone()).unwrap_or_default());
    // Until the carried election is resumed (step 5) nobody renews its lease: if boot got that
    // far only after the fence point, cloudflared is stopped without waiting for it.
    let guard = steps::fence_guard(carried, &config);
    let inputs = inputs(&config, &config_path, health, tunnel, metrics, carried).await?;
    let routes_etag = inputs.routes.etag.clone();
    let metadata = inputs.clients.metadata.clone();
    let limits = steps::limits(&config);
    let Up {
        mut node,
        secret_changes,
        resumed,
        health_later,
        role_etag,
    } = node_up(
        stops,
        &mut sockets,
        health,
        tunnel,
        metrics,
        (config_path, config),
        inputs,
        &limits,
        carried,
    )
    .await?;
    if let Some(guard) = guard {
        guard.abort();
    }
    // 6. The control socket (before READY=1, so `systemctl start` followed at once by
    // `tunnel-agent promote` finds it), cloudflared once the proxy answers, the config API.
    let control = stops.keep(steps::control_socket(node.config(), &mut sockets)?);
    steps::cloudflared(&node, health).await;
    let pushes = stops.keep_some(steps::config_api(&node, health, metrics, limits.clone(), &mut sockets).await?);
    if let Some((slot, listener)) = health_later {
        stops.insert(slot, steps::health_listener(listener, &limits, health)?);
    }
    // 7. Ready: every local component serves; the tunnel's edge connection is /ready's business.
    systemd::ready("serving");
    tracing::info!("ready");
    // The role sources and route watch from here (a standby is ready), then the refreshers.
    let roles = stops.keep_some(steps::role_watch(node.config(), &metadata, role_etag));
    let follow = steps::follow(&mut node)?;
    let (election, status_tick) = match resumed {
        Some(resumed) => resumed,
        None => steps::election(&mut node)?,
    };
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
    Ok((node, sources, sockets))
}
