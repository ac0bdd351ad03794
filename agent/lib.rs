//! tunnel-agent: keeps a Cloudflare Tunnel origin host alive.
//!
//! [`run`] is the whole life of the agent, top to bottom: config → secrets → routes → health
//! listener → proxy → (cloudflared) → ready → watch → on signal, the same steps in reverse.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod control;
pub mod files;
pub mod gcp;
pub mod health;
pub mod proxy;
pub mod roles;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod systemd;
pub mod telemetry;
pub mod tunnel;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use config::{Config, RouteSourceKind, SecretSpec};
use gcp::{MetadataClient, SecretManager, SecretManagerError};
use health::Health;
use proxy::{AcceptedToken, InboundAuth, LiveSettings, Proxy};
use roles::{PersistedRole, Role, RoleSource};
use routing::source::HostMap;
use routing::table::RouteTable;
use secrets::{Secret, SecretError, SecretValues, SecretVersionName};
use telemetry::Metrics;
use tunnel::{RestartPolicy, TunnelSpec, TunnelSupervisor};

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

/// Reads every local secret (`file`, `env`); remote ones are skipped. What `check` uses: it must
/// not need the network.
pub fn load_local_secrets(config: &Config, metrics: &Metrics) -> Result<SecretValues, Vec<SecretError>> {
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
            None => {}
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

/// One attempt at one secret. `Err((error, transient))`.
async fn fetch_secret(name: &str, spec: &SecretSpec, sm: &SecretManager) -> Result<Secret, (SecretError, bool)> {
    if let Some(local) = secrets::read_local(name, spec) {
        return local.map_err(|e| (e, false));
    }
    let remote = |message: String| SecretError::Remote {
        name: name.to_owned(),
        message,
    };
    let version = SecretVersionName::parse(spec.name.as_deref().unwrap_or("")).map_err(|e| (remote(e), false))?;
    match sm.access(&version).await {
        Ok(bytes) => secrets::from_bytes(name, bytes, &version.resource()).map_err(|e| (e, false)),
        Err(SecretManagerError::Transient(m)) => Err((remote(m), true)),
        Err(SecretManagerError::Permanent(m)) => Err((remote(m), false)),
    }
}

/// Resolves every secret, retrying transient failures with backoff until `deadline`. While
/// waiting, systemd's status names the secret and the reason, and its start timeout is extended.
pub async fn resolve_secrets(
    config: &Config,
    sm: &SecretManager,
    metrics: &Metrics,
    deadline: Instant,
) -> Result<SecretValues, Vec<SecretError>> {
    let mut values = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, spec) in &config.secrets {
        let mut backoff = backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            metrics.secret_fetches.inc();
            match fetch_secret(name, spec, sm).await {
                Ok(v) => {
                    values.insert(name.clone(), v);
                    break;
                }
                Err((e, transient)) => {
                    metrics.secret_fetch_failures.inc();
                    let delay = backoff.next_delay();
                    if !transient || Instant::now() + delay > deadline {
                        errors.push(e);
                        break;
                    }
                    let why = format!("waiting for secret {name:?}: {e}");
                    tracing::warn!(secret = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "secret not available yet");
                    systemd::extend_timeout(delay + Duration::from_secs(30), &why);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

/// Builds the route table from a host map (the source's) plus the config's `[[route]]`s.
pub fn build_routes(config: &Config, map: &HostMap, metrics: &Metrics) -> anyhow::Result<RouteTable> {
    RouteTable::build_with(config, map, metrics).map_err(|e| anyhow::anyhow!("invalid routes: {e}"))
}

/// Reads the configured local route source and builds the table (what `check` uses).
pub fn load_routes(config: &Config, metrics: &Metrics) -> anyhow::Result<RouteTable> {
    let map = match config.routes.source {
        RouteSourceKind::Inline => config.routes.hosts.clone(),
        RouteSourceKind::File => {
            routing::table::read_host_map(config.routes.file.as_deref().unwrap_or(std::path::Path::new("")))
                .map_err(anyhow::Error::msg)?
        }
        RouteSourceKind::GcpMetadata => HostMap::new(),
        RouteSourceKind::ConfigApi => return Ok(routing::config_api::load_persisted(config, metrics)),
    };
    build_routes(config, &map, metrics)
}

fn join_errors(errors: &[SecretError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

/// The proxy's inbound auth for `config`. When the token changed from `previous`, the previous
/// value stays accepted for `proxy.auth_overlap` (rotation without 401s).
fn inbound_auth(
    config: &Config,
    secrets: &SecretValues,
    previous: Option<&InboundAuth>,
) -> anyhow::Result<Option<InboundAuth>> {
    let Some(name) = &config.proxy.auth_secret else {
        return Ok(None);
    };
    let header = HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?;
    let current = secrets.get(name).cloned().context("proxy.auth_secret has no value")?;
    let now = Instant::now();
    let mut accepted = vec![AcceptedToken {
        value: current.clone(),
        until: None,
    }];
    for old in previous.map(|p| p.accepted.as_slice()).unwrap_or_default() {
        if old.value == current || old.until.is_some_and(|u| u <= now) {
            continue;
        }
        accepted.push(AcceptedToken {
            value: old.value.clone(),
            until: Some(old.until.unwrap_or(now + config.proxy.auth_overlap)),
        });
    }
    if accepted.len() > 1 {
        tracing::info!(
            overlap_s = config.proxy.auth_overlap.as_secs(),
            "internal auth token rotated; the previous one stays accepted during the overlap"
        );
    }
    Ok(Some(InboundAuth { header, accepted }))
}

/// The cloudflared command for `config`, or `None` when it should not run here (disabled, or
/// this node is standby).
fn tunnel_spec(
    config: &Config,
    secrets: &SecretValues,
    origin: SocketAddr,
    table: &RouteTable,
    role: Role,
) -> Option<TunnelSpec> {
    let cf = &config.cloudflared;
    if !cf.enabled || role == Role::Standby {
        return None;
    }
    let token = cf.token_secret.as_ref().and_then(|n| secrets.get(n)).cloned();
    let hostnames: Vec<String> = table.summary.iter().flat_map(|r| r.hostnames.iter().cloned()).collect();
    let mut spec = TunnelSpec::new(cf, token, &config.agent.runtime_dir, origin, &hostnames);
    spec.scrub_env = config
        .secrets
        .values()
        .filter(|s| s.source == config::SecretSourceKind::Env)
        .filter_map(|s| s.var.clone())
        .collect();
    Some(spec)
}

/// Something the supervision loop reacts to.
enum Event {
    SecretChanged(String, Secret),
}

/// Re-reads secrets that have a `refresh` interval and reports changed values.
fn spawn_refreshers(
    config: &Config,
    sm: &Arc<SecretManager>,
    current: &SecretValues,
    tx: &mpsc::Sender<Event>,
    metrics: &Arc<Metrics>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (name, spec) in &config.secrets {
        let Some(every) = spec.refresh else { continue };
        let (name, spec, sm, tx, metrics) = (name.clone(), spec.clone(), sm.clone(), tx.clone(), metrics.clone());
        let mut last = current.get(&name).cloned();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                metrics.secret_fetches.inc();
                match fetch_secret(&name, &spec, &sm).await {
                    Ok(v) if last.as_ref() != Some(&v) => {
                        last = Some(v.clone());
                        if tx.send(Event::SecretChanged(name.clone(), v)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err((e, _)) => {
                        metrics.secret_fetch_failures.inc();
                        tracing::warn!(secret = %name, error = %e, "secret refresh failed; keeping the current value")
                    }
                }
            }
        }));
    }
    tasks
}

/// The running agent's mutable state, owned by the supervision loop.
struct Agent {
    config_path: PathBuf,
    config: Config,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    proxy_addr: SocketAddr,
    metadata: MetadataClient,
    secret_manager: Arc<SecretManager>,
    secrets: SecretValues,
    tunnel: TunnelSupervisor,
    events: mpsc::Sender<Event>,
    refreshers: Vec<tokio::task::JoinHandle<()>>,
    role: Role,
    role_source: RoleSource,
}

impl Agent {
    /// Swaps in new live proxy settings.
    /// `routes: None` keeps the table in use (a config-API push may land at any time, so the
    /// swap is read-copy-update rather than a blind store).
    fn apply_live(
        &self,
        routes: Option<Arc<RouteTable>>,
        config: &Config,
        secrets: &SecretValues,
    ) -> anyhow::Result<()> {
        let previous = self.proxy.live.load();
        let auth = inbound_auth(config, secrets, previous.auth.as_ref())?;
        let auth_header = HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?;
        self.proxy.live.rcu(|cur| LiveSettings {
            routes: routes.clone().unwrap_or_else(|| cur.routes.clone()),
            auth: auth.clone(),
            auth_header: auth_header.clone(),
            max_body_bytes: config.proxy.max_body_bytes,
        });
        Ok(())
    }

    /// Records a newly applied table: status, metrics, files.
    fn routes_applied(&self, config: &Config, map: &HostMap, table: &RouteTable) {
        self.metrics.route_reloads.inc();
        if let Err(e) = routing::source::persist(config, map, table) {
            tracing::warn!(error = %e, "cannot write routes.json to the runtime or state directory");
        }
        self.health.update_status(|s| {
            s.routes = table.summary.clone();
            s.routes_version += 1;
            s.route_source = routing::source::describe(config);
            s.routes_fallback = None;
        });
    }

    /// SIGHUP: re-read config, secrets and routes; apply all or nothing.
    async fn reload(&mut self) {
        systemd::reloading();
        match self.try_reload().await {
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

    async fn try_reload(&mut self) -> anyhow::Result<()> {
        let mut new = Config::load(&self.config_path)?;
        let pending = self.config.restart_only_differences(&new);
        // From here on `new` holds the running values of restart-only settings, so nothing
        // below acts on one of them (a new runtime_dir, a new route source) before a restart.
        new.keep_restart_only(&self.config);
        let deadline = Instant::now() + Duration::from_secs(30);
        let secrets = resolve_secrets(&new, &self.secret_manager, &self.metrics, deadline)
            .await
            .map_err(|e| anyhow::anyhow!(join_errors(&e)))?;
        let table = if new.routes.source == RouteSourceKind::ConfigApi {
            None
        } else {
            let (map, _) = routing::source::fetch(&new, &self.metadata)
                .await
                .map_err(anyhow::Error::msg)?;
            let table = build_routes(&new, &map, &self.metrics)?;
            Some((map, table))
        };
        if !pending.is_empty() {
            tracing::warn!(settings = ?pending, "changed settings take effect only after a restart");
        }
        if new.role != self.config.role && self.config.role_watch.attribute.is_none() {
            tracing::info!(
                from = self.config.role.as_str(),
                to = new.role.as_str(),
                "role changed in the config file"
            );
            match new.role {
                Role::Active => self.metrics.promotions.inc(),
                Role::Standby => self.metrics.demotions.inc(),
            }
            self.role = new.role;
            self.role_source = RoleSource::Config;
            let _ = std::fs::remove_file(roles::state_path(&new.agent.state_dir));
        }
        let routes = match table {
            // Pushed routes are not in the file: keep serving them; auth and limits reload.
            None => None,
            Some((map, table)) => {
                self.routes_applied(&new, &map, &table);
                Some(Arc::new(table))
            }
        };
        let current = routes.clone().unwrap_or_else(|| self.proxy.live.load().routes.clone());
        let spec = tunnel_spec(&new, &secrets, self.proxy_addr, &current, self.role);
        self.apply_live(routes, &new, &secrets)?;
        self.tunnel.apply(spec).await;
        self.health.update_status(|s| {
            s.secrets = secrets.keys().cloned().collect();
            s.pending_restart = pending.iter().map(|p| (*p).to_owned()).collect();
            s.cloudflared_metrics = new.cloudflared.enabled.then_some(new.cloudflared.metrics);
            s.tunnel_ready_grace = new.cloudflared.ready_grace;
            s.role = self.role.as_str().to_owned();
            s.role_source = self.role_source.as_str().to_owned();
        });
        for t in self.refreshers.drain(..) {
            t.abort();
        }
        self.refreshers = spawn_refreshers(&new, &self.secret_manager, &secrets, &self.events, &self.metrics);
        self.secrets = secrets;
        tracing::info!(routes = self.proxy.live.load().routes.len(), "configuration reloaded");
        self.config = new;
        Ok(())
    }

    /// A new value from the watched route source.
    async fn routes_changed(&mut self, update: routing::source::Update) {
        let built = update.and_then(|map| {
            build_routes(&self.config, &map, &self.metrics)
                .map(|t| (map, t))
                .map_err(|e| format!("{e:#}"))
        });
        match built {
            Ok((map, table)) => {
                tracing::info!(routes = table.len(), "routes updated from the watched source");
                let spec = tunnel_spec(&self.config, &self.secrets, self.proxy_addr, &table, self.role);
                self.routes_applied(&self.config, &map, &table);
                if let Err(e) = self.apply_live(Some(Arc::new(table)), &self.config, &self.secrets) {
                    tracing::error!(error = %format!("{e:#}"), "cannot apply routes");
                }
                self.tunnel.apply(spec).await;
            }
            Err(e) => {
                self.metrics.route_reload_failures.inc();
                tracing::error!(error = %e, "route update rejected; the current table keeps serving");
                self.health.update_status(|s| s.last_reload_error = Some(e.clone()));
            }
        }
    }

    /// A refreshed secret changed value.
    async fn secret_changed(&mut self, name: String, value: Secret) {
        tracing::info!(secret = %name, "secret changed; applying");
        self.secrets.insert(name.clone(), value);
        if self.config.proxy.auth_secret.as_ref() == Some(&name) {
            if let Err(e) = self.apply_live(None, &self.config, &self.secrets) {
                tracing::error!(error = %format!("{e:#}"), "cannot apply the rotated token");
            }
        }
        if self.config.cloudflared.token_secret.as_ref() == Some(&name) {
            let routes = self.proxy.live.load().routes.clone();
            self.tunnel
                .apply(tunnel_spec(
                    &self.config,
                    &self.secrets,
                    self.proxy_addr,
                    &routes,
                    self.role,
                ))
                .await;
        }
    }

    /// Moves to `role`. Promotion spawns cloudflared before returning; demotion stops it like
    /// shutdown does (one SIGTERM, grace, SIGKILL) while the proxy keeps serving.
    async fn set_role(&mut self, role: Role, source: RoleSource) -> (bool, String) {
        if role == self.role {
            if source == RoleSource::WatchedAttribute {
                self.role_source = source;
                self.publish_role();
            }
            return (false, format!("already {}; nothing to do", role.as_str()));
        }
        let started = Instant::now();
        self.role = role;
        self.role_source = source;
        match role {
            Role::Active => self.metrics.promotions.inc(),
            Role::Standby => self.metrics.demotions.inc(),
        }
        let persisted = PersistedRole {
            role,
            source: if source == RoleSource::Cli {
                RoleSource::Cli
            } else {
                source
            },
            config_role: self.config.role,
        };
        if let Err(e) = roles::persist(&self.config.agent.state_dir, &persisted) {
            tracing::warn!(error = %e, "cannot persist the role; a restart will fall back to the config's");
        }
        // The decision is published first; cloudflared follows it.
        self.publish_role();
        let routes = self.proxy.live.load().routes.clone();
        let spec = tunnel_spec(&self.config, &self.secrets, self.proxy_addr, &routes, role);
        self.tunnel.apply(spec).await;
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        let message = match role {
            Role::Active if self.config.cloudflared.enabled => {
                format!("promoted to active; cloudflared started in {took_ms:.1} ms")
            }
            Role::Active => "promoted to active (cloudflared is disabled in the config)".to_owned(),
            Role::Standby => {
                format!("demoted to standby; cloudflared stopped in {took_ms:.1} ms, the proxy keeps serving")
            }
        };
        tracing::info!(role = role.as_str(), source = source.as_str(), took_ms, "{message}");
        (true, message)
    }

    fn publish_role(&self) {
        let (role, source) = (self.role.as_str().to_owned(), self.role_source.as_str().to_owned());
        self.health.update_status(|s| {
            s.role = role.clone();
            s.role_source = source.clone();
        });
        systemd::status(&format!("serving as {role} ({source})"));
    }

    /// A command from the control socket.
    async fn control(&mut self, command: control::Command) -> control::Reply {
        let (ok, changed, message) = match command {
            control::Command::Status => (
                true,
                false,
                format!("{} ({})", self.role.as_str(), self.role_source.as_str()),
            ),
            control::Command::Promote | control::Command::Demote if self.config.role_watch.attribute.is_some() => (
                false,
                false,
                format!(
                    "the role is decided by the metadata attribute {:?}; change it there",
                    self.config.role_watch.attribute.as_deref().unwrap_or("")
                ),
            ),
            control::Command::Promote => {
                let (changed, message) = self.set_role(Role::Active, RoleSource::Cli).await;
                (true, changed, message)
            }
            control::Command::Demote => {
                let (changed, message) = self.set_role(Role::Standby, RoleSource::Cli).await;
                (true, changed, message)
            }
        };
        control::Reply {
            ok,
            changed,
            message,
            status: self.health.status_json(),
        }
    }
}

/// Routes at boot: the source's, or the last good table when the source cannot be read.
async fn boot_routes(
    config: &Config,
    metadata: &MetadataClient,
    metrics: &Metrics,
) -> anyhow::Result<(HostMap, RouteTable, Option<String>, Option<String>)> {
    if config.routes.source == RouteSourceKind::ConfigApi {
        // The controller's last push, persisted in the state dir (or an empty table until the
        // first push; /ready waits for one).
        return Ok((
            HostMap::new(),
            routing::config_api::load_persisted(config, metrics),
            None,
            None,
        ));
    }
    // A remote source's value that builds no valid table is as unusable as an unreachable one.
    let fetched = routing::source::fetch(config, metadata).await.and_then(|(map, etag)| {
        let table = build_routes(config, &map, metrics).map_err(|e| format!("{e:#}"))?;
        Ok((map, table, etag))
    });
    match fetched {
        Ok((map, table, etag)) => Ok((map, table, etag, None)),
        Err(source_error) if config.routes.source == RouteSourceKind::Inline => {
            anyhow::bail!("{source_error}")
        }
        Err(source_error) => {
            let map = routing::source::load_last_good(config).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read routes from {}: {source_error}; no last good table either ({e})",
                    routing::source::describe(config)
                )
            })?;
            let table = build_routes(config, &map, metrics)?;
            tracing::warn!(source = %routing::source::describe(config), error = %source_error, "route source unreachable; serving the last good table");
            Ok((
                map,
                table,
                None,
                Some(format!("source unreachable at boot: {source_error}")),
            ))
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT. `config` was loaded from `config_path` by the caller
/// (which needed it to set up logging).
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let metrics = Arc::new(Metrics::default());
    let health = Health::new(metrics.clone());
    let boot_deadline = Instant::now() + config.agent.boot_timeout;
    let metadata = MetadataClient::new(config.gcp.metadata_base(), config.gcp.metadata_timeout)?;
    let secret_manager = Arc::new(SecretManager::new(
        metadata.clone(),
        config.gcp.secret_manager_endpoint.clone(),
        config.gcp.metadata_timeout.max(Duration::from_secs(10)),
    )?);

    // 1. Config (loaded and validated by the caller).
    health.config_loaded.store(true, Ordering::Release);
    health.update_status(|s| s.config_file = config_path.display().to_string());

    // 2. Secrets.
    systemd::status("fetching secrets");
    let secrets = resolve_secrets(&config, &secret_manager, &metrics, boot_deadline)
        .await
        .map_err(|e| anyhow::anyhow!(join_errors(&e)))?;
    health.secrets_loaded.store(true, Ordering::Release);
    health.update_status(|s| s.secrets = secrets.keys().cloned().collect());

    // 3. Routes.
    systemd::status("loading routes");
    let (host_map, routes, etag, fallback) = boot_routes(&config, &metadata, &metrics).await?;
    tracing::info!(routes = routes.len(), source = %routing::source::describe(&config), "routes loaded");
    // A config-API agent is ready once it has a pushed table (now, from the state dir, or later).
    let routes_ready = config.routes.source != RouteSourceKind::ConfigApi || routes.version.is_some();

    let limits = server::Limits {
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        max_header_bytes: config.proxy.max_header_bytes,
    };
    let api_limits = limits.clone();

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
    let tokens = gcp::IdTokenCache::new(metadata.clone(), config.gcp.id_token_refresh_margin, metrics.clone());
    let live = LiveSettings {
        auth: inbound_auth(&config, &secrets, None)?,
        routes: Arc::new(RouteTable::default()),
        auth_header: HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?,
        max_body_bytes: config.proxy.max_body_bytes,
    };
    let proxy = Proxy::new(&config.proxy, live, tokens, metrics.clone())?;
    let proxy_listener = server::bind(config.proxy.listen, "proxy.listen").await?;
    let proxy_server = {
        let proxy = proxy.clone();
        server::serve(proxy_listener, limits.clone(), move |peer, req| {
            proxy.clone().handle(peer, req)
        })?
    };
    let proxy_addr = proxy_server.local_addr;
    let (role, role_source, role_etag) = roles::boot_role(&config, &metadata).await;
    if role_source == RoleSource::WatchedAttribute {
        // Remembered so a reboot during a metadata outage comes back in the last watched role.
        let persisted = PersistedRole {
            role,
            source: role_source,
            config_role: config.role,
        };
        if let Err(e) = roles::persist(&config.agent.state_dir, &persisted) {
            tracing::warn!(error = %e, "cannot persist the role");
        }
    }
    let spec = tunnel_spec(&config, &secrets, proxy_addr, &routes, role);
    let (events, mut event_rx) = mpsc::channel(16);
    let config_cloudflared = config.cloudflared.clone();
    let mut agent = Agent {
        config_path,
        config,
        health: health.clone(),
        metrics,
        proxy,
        proxy_addr,
        metadata: metadata.clone(),
        secret_manager,
        secrets,
        tunnel: TunnelSupervisor::start(None, RestartPolicy::from(&config_cloudflared), health.tunnel.clone()),
        events: events.clone(),
        refreshers: Vec::new(),
        role,
        role_source,
    };
    agent.publish_role();
    if agent.config.routes.source != RouteSourceKind::ConfigApi {
        agent.routes_applied(&agent.config, &host_map, &routes);
    }
    health.update_status(|s| s.routes_fallback = fallback);
    agent.apply_live(Some(Arc::new(routes)), &agent.config, &agent.secrets)?;
    health.routes_loaded.store(routes_ready, Ordering::Release);
    // Wait for the proxy to answer before declaring it, and before cloudflared may send traffic.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !health::probe(proxy_addr, Duration::from_secs(1)).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "proxy on {proxy_addr} does not answer its own health probe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    health.proxy_answering.store(true, Ordering::Release);
    let proxy_probe = health.watch_proxy(proxy_addr, Duration::from_secs(1));
    tracing::info!(listen = %proxy_addr, "proxy up");

    // The control socket, before READY=1 so `systemctl start` followed at once by `tunnel-agent
    // promote` finds it, and before cloudflared so failing to bind it cannot leave a child behind.
    // Commands wait in the channel until the supervision loop runs.
    let (control_tx, mut control_rx) = mpsc::channel(4);
    let (control_path, control_server) = control::serve(&agent.config.agent.runtime_dir, control_tx)?;

    // 6. cloudflared, once the proxy answers.
    health.update_status(|s| {
        s.cloudflared_metrics = agent
            .config
            .cloudflared
            .enabled
            .then_some(agent.config.cloudflared.metrics);
        s.tunnel_ready_grace = agent.config.cloudflared.ready_grace;
    });
    if spec.is_some() {
        systemd::status("starting cloudflared");
    }
    agent.tunnel.apply(spec).await;

    // L7 config API (routes.source = "config-api"): the controller pushes route tables.
    let config_api_server = match (&agent.config.config_api, agent.config.routes.source) {
        (Some(section), RouteSourceKind::ConfigApi) => {
            let name = section.auth_secret.as_deref().unwrap_or_default();
            let token = agent
                .secrets
                .get(name)
                .cloned()
                .context("config_api.auth_secret has no value")?;
            let api = routing::config_api::start(
                section,
                &agent.config,
                token,
                agent.proxy.clone(),
                health.clone(),
                agent.metrics.clone(),
                api_limits,
            );
            Some(api.await?)
        }
        _ => None,
    };

    // 7. Ready: every local component serves; the tunnel's edge connection is /ready's business.
    systemd::ready("serving");
    tracing::info!("ready");

    // Watch.
    let (role_tx, mut role_rx) = mpsc::channel(4);
    let role_watch = roles::watch(&agent.config, agent.metadata.clone(), role_etag, role_tx);
    let (route_tx, mut route_rx) = mpsc::channel(4);
    let route_watch = routing::source::watch(&agent.config, metadata, etag, route_tx);
    agent.refreshers = spawn_refreshers(
        &agent.config,
        &agent.secret_manager,
        &agent.secrets,
        &events,
        &agent.metrics,
    );
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    let failure = loop {
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
                Signal::Reload => agent.reload().await,
                Signal::Shutdown => break None,
            },
            Some(update) = route_rx.recv() => agent.routes_changed(update).await,
            Some(Event::SecretChanged(name, value)) = event_rx.recv() => agent.secret_changed(name, value).await,
            Some((command, reply)) = control_rx.recv() => {
                let answer = agent.control(command).await;
                let _ = reply.send(answer);
            }
            Some(role) = role_rx.recv() => {
                agent.set_role(role, RoleSource::WatchedAttribute).await;
            }
            e = agent.tunnel.failed() => break Some(e),
            _ = tick => systemd::watchdog(),
        }
    };

    // Shutdown: the boot sequence in reverse. Readiness fails first so probes stop routing here.
    tracing::info!("shutting down");
    systemd::stopping();
    health.draining.store(true, Ordering::Release);
    for w in [route_watch, role_watch].into_iter().flatten() {
        w.abort();
    }
    control_server.abort();
    let _ = std::fs::remove_file(&control_path);
    for t in agent.refreshers.drain(..) {
        t.abort();
    }
    agent.tunnel.shutdown().await;
    proxy_probe.abort();
    if let Some(api) = config_api_server {
        api.shutdown(Duration::from_secs(1)).await;
    }
    let drained = proxy_server.shutdown(agent.config.agent.shutdown_grace).await;
    tracing::info!(drained, "proxy stopped");
    health_server.shutdown(Duration::from_secs(1)).await;
    match failure {
        None => Ok(()),
        Some(e) => Err(e),
    }
}
