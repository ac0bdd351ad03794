//! tunnel-agent: keeps a Cloudflare Tunnel origin host alive.
//!
//! [`run`] is the whole life of the agent, top to bottom: config → secrets → routes → health
//! listener → proxy → (cloudflared) → ready → watch → on signal, the same steps in reverse.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod config_api;
pub mod gcp;
pub mod health;
pub mod l7;
pub mod proxy;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod systemd;
pub mod telemetry;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;
use tokio::signal::unix::{signal, SignalKind};

use config::{Config, RouteSourceKind};
use health::Health;
use proxy::{AcceptedToken, InboundAuth, LiveSettings, Proxy};
use routes::RouteTable;
use secrets::{SecretError, SecretValues};
use telemetry::Metrics;

/// A random number for load balancing and backoff jitter (not for anything secret). std's
/// `RandomState` is seeded per instance from OS randomness; hashing a fresh one is enough here
/// and saves a dependency.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// Exit code for an invalid configuration (`EX_CONFIG` from sysexits.h). The unit lists it in
/// `RestartPreventExitStatus=` so a bad file does not become a restart loop.
pub const EXIT_CONFIG: u8 = 78;

/// Signals, as the agent understands them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Shutdown,
    Reload,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Shutdown,
            _ = self.int.recv() => Signal::Shutdown,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Reads every local secret. Collects all failures into one error.
pub fn load_secrets(config: &Config, metrics: &Metrics) -> Result<SecretValues, Vec<SecretError>> {
    let mut values = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, spec) in &config.secrets {
        match secrets::read_local(name, spec) {
            Some(Ok(v)) => {
                metrics.secret_fetches.inc();
                values.insert(name.clone(), v);
            }
            Some(Err(e)) => {
                metrics.secret_fetch_failures.inc();
                errors.push(e);
            }
            None => errors.push(SecretError::Remote {
                name: name.clone(),
                message: format!("source \"{}\" is not supported by this build yet", spec.source),
            }),
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

/// Reads the configured route source and builds the table.
pub fn load_routes(config: &Config, metrics: &Metrics) -> anyhow::Result<RouteTable> {
    if config.routes.source == RouteSourceKind::ConfigApi {
        return Ok(config_api::load_persisted(config, metrics));
    }
    let file_map;
    let host_map = match config.routes.source {
        RouteSourceKind::Inline | RouteSourceKind::ConfigApi => &config.routes.hosts,
        RouteSourceKind::File => {
            let path = config.routes.file.as_deref().unwrap_or(Path::new(""));
            file_map = routes::read_host_map(path).map_err(anyhow::Error::msg)?;
            &file_map
        }
    };
    RouteTable::build_with(config, host_map, metrics).map_err(|e| anyhow::anyhow!("invalid routes: {e}"))
}

fn route_source_name(config: &Config) -> String {
    match config.routes.source {
        RouteSourceKind::Inline => "inline".to_owned(),
        RouteSourceKind::ConfigApi => "config-api".to_owned(),
        RouteSourceKind::File => format!(
            "file {}",
            config.routes.file.as_deref().unwrap_or(Path::new("")).display()
        ),
    }
}

/// What the proxy can change live, from a config, its secrets and a route table.
fn live_settings(config: &Config, secrets: &SecretValues, routes: RouteTable) -> anyhow::Result<LiveSettings> {
    let auth = match &config.proxy.auth_secret {
        None => None,
        Some(name) => Some(InboundAuth {
            header: HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?,
            accepted: vec![AcceptedToken {
                value: secrets.get(name).cloned().context("proxy.auth_secret has no value")?,
                until: None,
            }],
        }),
    };
    Ok(LiveSettings {
        routes: Arc::new(routes),
        auth,
        max_body_bytes: config.proxy.max_body_bytes,
    })
}

fn join_errors(errors: &[SecretError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

/// The running agent's mutable state, owned by the supervision loop.
struct Agent {
    config_path: PathBuf,
    config: Config,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
}

impl Agent {
    /// SIGHUP: re-read config, secrets and routes; apply all or nothing.
    fn reload(&mut self) {
        systemd::reloading();
        match self.try_reload() {
            Ok(()) => {
                self.health.update_status(|s| s.last_reload_error = None);
                systemd::ready("serving (reloaded)");
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(error = %msg, "reload rejected; the previous configuration keeps serving");
                self.metrics.route_reload_failures.inc();
                self.health.update_status(|s| s.last_reload_error = Some(msg.clone()));
                systemd::ready(&format!("serving previous configuration; reload failed: {msg}"));
            }
        }
    }

    fn try_reload(&mut self) -> anyhow::Result<()> {
        let new = Config::load(&self.config_path)?;
        let secrets = load_secrets(&new, &self.metrics).map_err(|e| anyhow::anyhow!(join_errors(&e)))?;
        let routes = load_routes(&new, &self.metrics)?;
        let pending = self.config.restart_only_differences(&new);
        if !pending.is_empty() {
            tracing::warn!(settings = ?pending, "changed settings take effect only after a restart");
        }
        let summary = routes.summary.clone();
        let live = live_settings(&new, &secrets, routes)?;
        if new.routes.source == RouteSourceKind::ConfigApi {
            // Pushed routes are not in the file: keep serving them; auth and limits reload.
            self.proxy.live.rcu(|cur| live.with_routes(cur.routes.clone()));
        } else {
            self.proxy.live.store(Arc::new(live));
        }
        let summary = match new.routes.source {
            RouteSourceKind::ConfigApi => self.proxy.live.load().routes.summary.clone(),
            _ => summary,
        };
        self.metrics.route_reloads.inc();
        self.health.update_status(|s| {
            s.routes = summary;
            s.routes_version += 1;
            s.route_source = route_source_name(&new);
            s.secrets = secrets.keys().cloned().collect();
            s.pending_restart = pending.iter().map(|p| (*p).to_owned()).collect();
        });
        tracing::info!(routes = self.proxy.live.load().routes.len(), "configuration reloaded");
        // Keep the running values of restart-only settings, so the next reload diffs against
        // what is really in effect.
        let mut applied = new;
        applied.proxy.listen = self.config.proxy.listen;
        applied.health.listen = self.config.health.listen;
        applied.agent.runtime_dir = self.config.agent.runtime_dir.clone();
        applied.agent.state_dir = self.config.agent.state_dir.clone();
        applied.agent.log_format = self.config.agent.log_format;
        applied.agent.log_level = self.config.agent.log_level.clone();
        self.config = applied;
        Ok(())
    }
}

/// Runs the agent until SIGTERM/SIGINT. `config` was loaded from `config_path` by the caller
/// (which needed it to set up logging).
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let metrics = Arc::new(Metrics::default());
    let health = Health::new(metrics.clone());

    // 1. Config (loaded and validated by the caller).
    health.config_loaded.store(true, Ordering::Release);
    health.update_status(|s| s.config_file = config_path.display().to_string());

    // 2. Secrets.
    systemd::status("reading secrets");
    let secrets = load_secrets(&config, &metrics).map_err(|e| anyhow::anyhow!(join_errors(&e)))?;
    health.secrets_loaded.store(true, Ordering::Release);

    // 3. Routes.
    systemd::status("loading routes");
    let routes = load_routes(&config, &metrics)?;
    metrics.route_reloads.inc();
    health.update_status(|s| {
        s.routes = routes.summary.clone();
        s.routes_version = 1;
        s.route_source = route_source_name(&config);
        s.secrets = secrets.keys().cloned().collect();
    });
    // A config-API agent is ready once it has a pushed table (now, from the state dir, or later).
    let routes_ready = config.routes.source != RouteSourceKind::ConfigApi || routes.version.is_some();
    health.routes_loaded.store(routes_ready, Ordering::Release);
    tracing::info!(routes = routes.len(), source = %route_source_name(&config), "routes loaded");

    let limits = server::Limits {
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        max_header_bytes: config.proxy.max_header_bytes,
    };

    // 4. Health listener.
    let health_listener = server::bind(config.health.listen, "health.listen").await?;
    let health_server = {
        let health = health.clone();
        server::serve(health_listener, limits.clone(), move |_, req| {
            health.clone().handle(req)
        })?
    };
    tracing::info!(listen = %health_server.local_addr, "health listener up");

    // 5. Proxy.
    let metadata = gcp::MetadataClient::new(config.gcp.metadata_base(), config.gcp.metadata_timeout)?;
    let tokens = gcp::IdTokenCache::new(metadata, config.gcp.id_token_refresh_margin, metrics.clone());
    let proxy = Proxy::new(
        &config.proxy,
        live_settings(&config, &secrets, routes)?,
        tokens,
        metrics.clone(),
    )?;
    let proxy_listener = server::bind(config.proxy.listen, "proxy.listen").await?;
    let proxy_server = {
        let proxy = proxy.clone();
        server::serve(proxy_listener, limits.clone(), move |peer, req| {
            proxy.clone().handle(peer, req)
        })?
    };
    let proxy_addr = proxy_server.local_addr;
    // Wait for the proxy to answer before declaring it (and, later, starting cloudflared).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !health::probe(proxy_addr, Duration::from_secs(1)).await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "proxy on {proxy_addr} does not answer its own health probe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    health.proxy_answering.store(true, Ordering::Release);
    let proxy_probe = health.watch_proxy(proxy_addr, Duration::from_secs(1));
    tracing::info!(listen = %proxy_addr, "proxy up");

    // --- L7 config API (routes.source = "config-api"): the controller pushes route tables. ---
    let config_api_server = match (&config.config_api, config.routes.source) {
        (Some(section), RouteSourceKind::ConfigApi) => {
            let name = section.auth_secret.as_deref().unwrap_or_default();
            let token = secrets
                .get(name)
                .cloned()
                .context("config_api.auth_secret has no value")?;
            let api = config_api::start(
                section,
                &config,
                token,
                proxy.clone(),
                health.clone(),
                metrics.clone(),
                limits,
            );
            Some(api.await?)
        }
        _ => None,
    };
    // --- end L7 config API ---

    // 7. Ready.
    systemd::ready("serving");
    tracing::info!("ready");

    // Watch.
    let mut agent = Agent {
        config_path,
        config,
        health: health.clone(),
        metrics,
        proxy,
    };
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    loop {
        let tick = async {
            match watchdog.as_mut() {
                Some(w) => {
                    w.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            sig = signals.next() => match sig {
                Signal::Reload => agent.reload(),
                Signal::Shutdown => break,
            },
            _ = tick => systemd::watchdog(),
        }
    }

    // Shutdown: the boot sequence in reverse. Readiness fails first so probes stop routing here.
    tracing::info!("shutting down");
    systemd::stopping();
    health.draining.store(true, Ordering::Release);
    let grace = agent.config.agent.shutdown_grace;
    proxy_probe.abort();
    if let Some(api) = config_api_server {
        api.shutdown(Duration::from_secs(1)).await;
    }
    let drained = proxy_server.shutdown(grace).await;
    tracing::info!(drained, "proxy stopped");
    health_server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
