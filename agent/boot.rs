//! The boot sequence, top to bottom: config → secrets → routes → health listener → proxy →
//! control socket → cloudflared → config API → ready → the node's event loop → on shutdown, the
//! same steps in reverse.
//!
//! Each step that starts something pushes its stop onto a stack; shutdown (or a failed boot)
//! pops it, so stopping mirrors starting and a step that fails stops everything started before
//! it. Readiness fails first, so probes stop routing here while the rest drains.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Role;
use crate::config::{Config, RouteSourceKind};
use crate::gcp::{self, MetadataClient, SecretManager};
use crate::health::{self, Health};
use crate::node::{tunnel_spec, Node, Signal, Sources};
use crate::proxy::{AccessLog, InboundAuth, LiveSettings, Proxy};
use crate::roles::{self, RoleSource};
use crate::routing::table::RouteTable;
use crate::routing::{self, config_api};
use crate::secrets::resolve::{join_errors, resolve_all};
use crate::server::{self, ServerHandle};
use crate::telemetry::Metrics;
use crate::tunnel::{RestartPolicy, TunnelSupervisor};
use crate::{control, systemd};
use crate::{follow, handover};

/// Something boot started, and how to stop it.
enum Stop {
    Health(ServerHandle),
    /// Drained for `agent.shutdown_grace` (the value in effect at shutdown).
    Proxy(ServerHandle),
    ProxyProbe(JoinHandle<()>),
    ControlSocket(PathBuf, JoinHandle<()>),
    /// The node's own parts: cloudflared and the secret refreshers.
    Node,
    ConfigApi(ServerHandle),
    /// A metadata watch (routes, role).
    Watch(JoinHandle<()>),
}

/// Runs the agent until `signals` says shut down (or closes), or cloudflared's supervisor gives
/// up. `config` was loaded from `config_path` by the caller (which needed it to set up logging);
/// `signals` also carries reloads.
pub async fn run(config_path: PathBuf, config: Config, signals: mpsc::Receiver<Signal>) -> anyhow::Result<()> {
    let mut stack = Vec::new();
    let mut node = None;
    let booted = start(config_path, config, signals, &mut stack, &mut node).await;
    let failure = match (booted, node.as_mut()) {
        (Ok(sources), Some(node)) => node.run(sources).await,
        (Ok(_), None) => Some(anyhow::anyhow!("boot finished without a node")),
        (Err(e), _) => Some(e),
    };
    tracing::info!("shutting down");
    systemd::stopping();
    if let Some(n) = &node {
        n.health.draining.store(true, Ordering::Release);
    }
    let grace = node.as_ref().map(|n| n.config.agent.shutdown_grace);
    while let Some(step) = stack.pop() {
        match step {
            Stop::Watch(task) | Stop::ProxyProbe(task) => task.abort(),
            Stop::ConfigApi(server) | Stop::Health(server) => {
                server.shutdown(Duration::from_secs(1)).await;
            }
            Stop::Node => {
                if let Some(node) = node.take() {
                    node.stop().await;
                }
            }
            Stop::ControlSocket(path, task) => {
                task.abort();
                let _ = std::fs::remove_file(&path);
            }
            Stop::Proxy(server) => {
                let drained = server.shutdown(grace.unwrap_or(Duration::from_secs(1))).await;
                tracing::info!(
                    drained,
                    "proxy stopped ({})",
                    if drained {
                        "every request finished"
                    } else {
                        "requests cut at the shutdown grace"
                    }
                );
            }
        }
    }
    match failure {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// The boot steps. Returns the node's event sources once it is ready; `node` is filled as soon
/// as the node exists, so a later failure still stops what it owns.
async fn start(
    config_path: PathBuf,
    config: Config,
    signals: mpsc::Receiver<Signal>,
    stack: &mut Vec<Stop>,
    node_slot: &mut Option<Node>,
) -> anyhow::Result<Sources> {
    let metrics = Arc::new(Metrics::default());
    let health = Health::new(metrics.clone());
    health.set_details_from(config.health.details_from);
    let boot_deadline = crate::deadline::from_now(config.agent.boot_timeout);
    let metadata = MetadataClient::new(config.gcp.metadata_base(), config.gcp.metadata_timeout)?;
    let secret_manager = Arc::new(SecretManager::new(
        metadata.clone(),
        config.gcp.secret_manager_endpoint.clone(),
        config.gcp.metadata_timeout.max(Duration::from_secs(10)),
    )?);

    // 1. Config (loaded and validated by the caller), and what the cloudflared it names can do.
    health.config_loaded.store(true, Ordering::Release);
    health.update_status(|s| s.config_file = config_path.display().to_string());
    let cloudflared_version = detect_cloudflared(&config, &health).await?;

    // 2. Secrets.
    systemd::status("fetching secrets");
    let secrets = resolve_all(&config, &secret_manager, &metrics, boot_deadline)
        .await
        .map_err(|e| anyhow::anyhow!(join_errors(&e)))?;
    health.secrets_loaded.store(true, Ordering::Release);
    health.update_status(|s| s.secrets = secrets.keys().cloned().collect());

    // 3. Routes.
    systemd::status("loading routes");
    let routes = routing::source::boot(&config, &metadata, &metrics).await?;
    tracing::info!(routes = routes.table.len(), source = %routing::source::describe(&config), "routes loaded: {} from {}", routes.table.len(), routing::source::describe(&config));

    let limits = server::Limits {
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        max_header_bytes: config.proxy.max_header_bytes,
        http2_keep_alive_interval: config.proxy.http2_keep_alive_interval,
        max_connections: None,
    };

    // 4. Health listener.
    let health_listener = server::bind(config.health.listen, "health.listen").await?;
    let health_server = {
        let health = health.clone();
        server::serve(health_listener, limits.clone(), move |peer, req| {
            health.clone().handle(peer, req)
        })?
    };
    tracing::info!(listen = %health_server.local_addr, "health listener up on {}", health_server.local_addr);
    stack.push(Stop::Health(health_server));

    // 5. Proxy, with an empty table until the node installs the boot table.
    let tokens = gcp::IdTokenCache::new(
        metadata.clone(),
        config.gcp.id_token_refresh_margin,
        metrics.clone(),
        tokio::runtime::Handle::current(),
    );
    let live = LiveSettings {
        auth: InboundAuth::for_config(&config, &secrets, None)?,
        routes: Arc::new(RouteTable::default()),
        auth_header: HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?,
        max_body_bytes: config.proxy.max_body_bytes,
        access_log: AccessLog::from_config(&config.proxy.access_log),
    };
    let proxy = Proxy::new(&config.proxy, live, tokens, metrics.clone())?;
    // One thread per CPU, each with its own listening socket and upstream pools (nginx's
    // worker model; docs/benchmarks.md has the numbers).
    let workers = config.proxy.worker_threads();
    let proxy_limits = limits.clone().capped(config.proxy.max_connections, &metrics);
    let proxy_server = server::serve_workers(config.proxy.listen, "proxy.listen", workers, proxy_limits, |_| {
        let worker = proxy.worker();
        move |peer, req| worker.clone().handle(peer, req)
    })?;
    let proxy_addr = proxy_server.local_addr;
    stack.push(Stop::Proxy(proxy_server));

    // The role, and the node that will hold everything that can change from here on.
    let (role, role_source, role_etag) = match &config.role_election {
        // Standby until elected, whatever the file or a persisted promote says.
        Some(_) => (Role::Standby, RoleSource::Election, None),
        // Standby until the check has passed `rise` times.
        None if config.role_follow.is_some() => (Role::Standby, RoleSource::Follow, None),
        None => roles::boot_role(&config, &metadata).await,
    };
    let (secret_tx, secret_rx) = mpsc::channel(16);
    let policy = RestartPolicy::from(&config.cloudflared);
    let api_settings = watch::Sender::new(Arc::new(config_api::ApiSettings::new(&config, &secrets, None)));
    let node = node_slot.insert(Node {
        config_path,
        config,
        health: health.clone(),
        metrics: metrics.clone(),
        proxy,
        proxy_addr,
        metadata: metadata.clone(),
        secret_manager,
        secrets,
        tunnel: TunnelSupervisor::start(None, policy, health.tunnel.clone()),
        secret_changes: secret_tx,
        refreshers: Vec::new(),
        role,
        role_source,
        routes_version: watch::Sender::new(None),
        api_settings,
        cloudflared_version,
        election: None,
        follow: None,
        role_tasks: Vec::new(),
        role_detail_published: String::new(),
    });
    stack.push(Stop::Node);
    node.publish_role();
    node.install_routes(&routes.map, Arc::new(routes.table));
    health.update_status(|s| s.routes_fallback = routes.fallback);

    // Wait for the proxy to answer before declaring it, and before cloudflared may send traffic.
    let deadline = crate::deadline::from_now(Duration::from_secs(5));
    while !health::probe(proxy_addr, Duration::from_secs(1)).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "proxy on {proxy_addr} does not answer its own health probe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    health.proxy_answering.store(true, Ordering::Release);
    stack.push(Stop::ProxyProbe(health.watch_proxy(proxy_addr, Duration::from_secs(1))));
    tracing::info!(listen = %proxy_addr, workers, "proxy up on {proxy_addr}");

    // The control socket, before READY=1 so `systemctl start` followed at once by `tunnel-agent
    // promote` finds it. Commands wait in the channel until the node's loop runs.
    let (control_tx, control_rx) = mpsc::channel(4);
    let (control_path, control_server) = control::serve(&node.config.agent.runtime_dir, control_tx)?;
    stack.push(Stop::ControlSocket(control_path, control_server));

    // 6. cloudflared, once the proxy answers.
    let cf = &node.config.cloudflared;
    let (cf_metrics, cf_grace) = (cf.enabled.then_some(cf.metrics), cf.ready_grace);
    health.update_status(|s| {
        s.cloudflared_metrics = cf_metrics;
        s.tunnel_ready_grace = cf_grace;
    });
    let starts_tunnel = tunnel_spec(
        &node.config,
        &node.secrets,
        proxy_addr,
        &node.proxy.live.load().routes,
        role,
    )
    .is_some();
    if starts_tunnel {
        systemd::status("starting cloudflared");
    }
    node.follow_tunnel().await;

    // L7 config API (routes.source = "config-api"): the controller pushes route tables, which
    // reach the node as events.
    let (push_tx, push_rx) = mpsc::channel(4);
    if let (Some(section), RouteSourceKind::ConfigApi) = (&node.config.config_api, node.config.routes.source) {
        let name = section.auth_secret.as_deref().unwrap_or_default();
        anyhow::ensure!(node.secrets.contains_key(name), "config_api.auth_secret has no value");
        let api = config_api::start(
            section,
            node.api_settings.subscribe(),
            push_tx,
            node.routes_version.subscribe(),
            metrics.clone(),
            limits,
        )
        .await?;
        stack.push(Stop::ConfigApi(api));
    }

    // 7. Ready: every local component serves; the tunnel's edge connection is /ready's business.
    systemd::ready("serving");
    tracing::info!("ready");

    // Watch.
    let (role_tx, role_rx) = mpsc::channel(4);
    if let Some(w) = roles::watch(&node.config, metadata.clone(), role_etag, role_tx) {
        stack.push(Stop::Watch(w));
    }
    // The election campaigns from here (READY=1 is sent: a standby is ready). Its task is the
    // node's, so that shutdown can resign before stopping it.
    let (follow_tx, follow_rx) = mpsc::channel(4);
    if let Some(section) = &node.config.role_follow {
        let (follow, task) = follow::start(section, follow_tx)?;
        health.set_follow(follow.clone());
        node.follow = Some(follow);
        node.role_tasks.push(task);
    }
    let (outcome_tx, outcome_rx) = mpsc::channel(16);
    if let Some((election, task)) = handover::start(
        &node.config,
        &node.secrets,
        &health,
        &node.tunnel.state,
        outcome_tx,
        node.follow.is_some(),
    )? {
        node.election = Some(election);
        node.role_tasks.push(task);
    }
    let (route_tx, route_rx) = mpsc::channel(4);
    if let Some(w) = routing::source::watch(&node.config, metadata, routes.etag, route_tx) {
        stack.push(Stop::Watch(w));
    }
    node.restart_refreshers();
    Ok(Sources {
        signals,
        routes: route_rx,
        pushes: push_rx,
        secrets: secret_rx,
        control: control_rx,
        roles: role_rx,
        election: outcome_rx,
        follow: follow_rx,
        // Under an election, STATUS= follows its state (unreachable, follower of X, leader).
        status_tick: node
            .election
            .is_some()
            .then(|| tokio::time::interval(Duration::from_secs(1))),
        watchdog: systemd::watchdog_interval().map(tokio::time::interval),
    })
}

/// Asks the configured cloudflared its version at boot (a reload asks again, in
/// `Node::reload_cloudflared_version`): logged, shown in `/status` and the metrics, and checked
/// against the token delivery. A cloudflared that cannot be asked is only warned about here
/// (starting it will say what is wrong, and a standby may never start it).
async fn detect_cloudflared(
    config: &Config,
    health: &Health,
) -> anyhow::Result<Option<crate::tunnel::version::CloudflaredVersion>> {
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
            health.tunnel.set_version(version.version.clone());
            crate::tunnel::version::check_delivery(&cf.path, &version, cf.token_delivery)?;
            Ok(Some(version))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell cloudflared's version: {e}");
            Ok(None)
        }
    }
}
