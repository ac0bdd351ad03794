//! The running node: what happens after boot, one change at a time.
//!
//! Every kind of change arrives as one [`Event`] variant and has one handler on [`Node`]:
//!
//! | event | from | handler |
//! | --- | --- | --- |
//! | [`Event::Signal`] | `main.rs` (SIGTERM/SIGINT, SIGHUP, SIGUSR2) or a test | [`Node::reload`], an upgrade, or stop |
//! | [`Event::RouteUpdate`] | the watched metadata attribute | [`Node::routes_changed`] |
//! | [`Event::Push`] | the config API | [`Node::pushed`] |
//! | [`Event::SecretChanged`] | secret refreshers | [`Node::secret_changed`] |
//! | [`Event::Control`] | the control socket | [`Node::control`], or an upgrade |
//! | [`Event::RoleChanged`] | the watched role attribute | [`Node::set_role`] |
//! | [`Event::Election`] | the etcd election (`election`) | [`Node::set_role`] |
//! | [`Event::FollowChanged`] | the `[role_follow]` check | [`Node::set_role`], or gate/resign the election |
//! | [`Event::StatusTick`] | a 1 s timer, under an election | [`Roles::tick`] |
//! | [`Event::TunnelFailed`] | the cloudflared supervisor | stop, with its error |
//!
//! A new kind of change (another role source, another route source) is one more sender into
//! [`Sources`], one more variant and one more handler. Every route table, whatever its source,
//! is applied by [`Node::install_routes`] and then reaches cloudflared through
//! [`Node::follow_tunnel`]. Every role change, whatever its source, goes through
//! [`Node::set_role`]; the role's state and its sources belong to [`Roles`]. An upgrade in place
//! (`upgrade.rs`) ends the loop with [`Ended::Upgrade`] once its preflight passed.

mod upgrade;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval};

use crate::config::{Config, RouteSourceKind};
use crate::control;
use crate::election::Outcome;
use crate::gcp::{MetadataClient, SecretManager};
use crate::handover::Plan;
use crate::health::{Health, RouteStatus};
use crate::proxy::{AccessLog, InboundAuth, LiveSettings, Proxy};
use crate::role::{self, Answer, Change, Handover, Manual, Role, RoleSource, Roles};
use crate::routing::config_api::{self, ApiSettings, Push, PushOutcome};
use crate::routing::source::{self as route_source, HostMap};
use crate::routing::table::RouteTable;
use crate::secrets::refresh::{self, SecretChange};
use crate::secrets::resolve::{join_errors, resolve_all};
use crate::secrets::SecretValues;
use crate::systemd;
use crate::telemetry::Metrics;
use crate::tunnel::{RestartPolicy, TunnelSpec, TunnelState, TunnelSupervisor};

/// Signals, as the agent understands them. `main.rs` turns SIGTERM/SIGINT and SIGHUP into these;
/// a test sends them itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Shutdown,
    Reload,
    /// Re-execute in place into the binary on disk (SIGUSR2).
    Upgrade,
}

/// Something the running node reacts to.
#[derive(Debug)]
pub enum Event {
    Signal(Signal),
    /// A new value of the watched route source (or why it is unusable).
    RouteUpdate(route_source::Update),
    /// A table pushed to the config API (boxed: a compiled table is large).
    Push(Box<Push>),
    SecretChanged(SecretChange),
    Control(control::Incoming),
    /// The watched role attribute names this host (active) or another (standby).
    RoleChanged(Role),
    /// The election won or lost this node the key (already fenced when lost).
    Election(Outcome),
    /// The `[role_follow]` check's verdict changed (true: passing).
    FollowChanged(bool),
    /// Time to refresh `STATUS=` with the election's state.
    StatusTick,
    /// The cloudflared supervisor gave up.
    TunnelFailed(anyhow::Error),
    /// Time to tell systemd's watchdog the loop is alive.
    WatchdogTick,
}

/// Where events come from: one receiver per kind, filled by the tasks boot started.
pub struct Sources {
    pub signals: mpsc::Receiver<Signal>,
    pub routes: mpsc::Receiver<route_source::Update>,
    pub pushes: mpsc::Receiver<Push>,
    pub secrets: mpsc::Receiver<SecretChange>,
    pub control: mpsc::Receiver<control::Incoming>,
    pub roles: mpsc::Receiver<Role>,
    pub election: mpsc::Receiver<Outcome>,
    pub follow: mpsc::Receiver<bool>,
    pub status_tick: Option<Interval>,
    pub watchdog: Option<Interval>,
}

/// The running node's state, owned by its event loop. Built once by [`Node::new`]; from then
/// on only its own handlers change it.
pub struct Node {
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
    /// Where refreshers report changed secrets (the node's own [`Sources::secrets`]).
    secret_changes: mpsc::Sender<SecretChange>,
    refreshers: Vec<JoinHandle<()>>,
    /// The role and every source of it (the election, the followed check).
    roles: Roles,
    /// The applied table's pushed version, for the config API's `GET /config` and `/readyz`.
    routes_version: watch::Sender<Option<u64>>,
    /// What the config API compiles pushes under and the tokens it accepts, republished by
    /// every reload and rotation ([`Node::apply_settings`]).
    api_settings: watch::Sender<Arc<ApiSettings>>,
    /// `cloudflared --version` of the running configuration's binary: asked at boot and again on
    /// every reload, when cloudflared is enabled and answered.
    cloudflared_version: Option<crate::tunnel::version::CloudflaredVersion>,
    /// The binary an upgrade runs: the path this process was first started from.
    binary: PathBuf,
}

/// What the boot sequence hands [`Node::new`]: everything the node starts with.
pub struct NodeParts {
    pub config_path: PathBuf,
    pub config: Config,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub proxy: Arc<Proxy>,
    pub proxy_addr: SocketAddr,
    pub metadata: MetadataClient,
    pub secret_manager: Arc<SecretManager>,
    pub secrets: SecretValues,
    /// cloudflared's shared state: the supervisor writes it, `health` reads it, the fence acts
    /// on it.
    pub tunnel: Arc<TunnelState>,
    /// The starting role and where it came from ([`role::start::boot`]).
    pub role: role::Boot,
    pub cloudflared_version: Option<crate::tunnel::version::CloudflaredVersion>,
    /// The binary an upgrade runs.
    pub binary: PathBuf,
    /// The cloudflared an upgraded image adopts instead of starting one.
    pub tunnel_carried: Option<crate::tunnel::Carried>,
}

/// What the loop does after an event.
enum Flow {
    Continue,
    /// Stop the node; `Some` when it stops because something failed.
    Stop(Option<anyhow::Error>),
    /// Hand over to the new binary, which passed its preflight.
    Upgrade(Plan),
}

/// Why the node's loop ended.
#[derive(Debug)]
pub enum Ended {
    /// Shut down; `Some` when because something failed.
    Stopped(Option<anyhow::Error>),
    /// An upgrade in place goes ahead: [`Node::hand_over`], then boot execs `Plan`.
    Upgrade(Plan),
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
    let mut spec = TunnelSpec::new(cf, token, &config.agent.runtime_dir, origin, &hostnames, table.grpc);
    spec.home = Some(config.agent.state_dir.clone());
    spec.sandbox = Some(crate::tunnel::sandbox::policy_for(config, &spec));
    Some(spec)
}

/// [`route_source::build`] on a blocking thread: a large table takes a while to compile, and
/// the control runtime is one thread that also answers `/ready` and pets the watchdog.
async fn build_routes(config: &Config, map: HostMap, metrics: &Arc<Metrics>) -> anyhow::Result<(HostMap, RouteTable)> {
    let (config, metrics) = (config.clone(), metrics.clone());
    let built = tokio::task::spawn_blocking(move || route_source::build(&config, &map, &metrics).map(|t| (map, t)))
        .await
        .context("compiling the route table did not finish")?;
    Ok(built?)
}

/// The next tick of an optional timer (never, without one).
async fn tick_of(timer: &mut Option<Interval>) {
    match timer.as_mut() {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Node {
    /// The node, with cloudflared's supervisor started (cloudflared itself starts with the first
    /// [`Node::follow_tunnel`]) and no role task yet; and the receiving side of the channel its
    /// secret refreshers report on (the node's [`Sources::secrets`]).
    pub fn new(parts: NodeParts) -> (Node, mpsc::Receiver<SecretChange>) {
        let policy = RestartPolicy::from(&parts.config.cloudflared);
        let (secret_changes, secret_changed) = mpsc::channel(16);
        let api_settings = ApiSettings::new(&parts.config, &parts.secrets, None);
        let node = Node {
            roles: Roles::new(
                &parts.role,
                role::Fence::new(parts.health.clone(), parts.tunnel.clone()),
                parts.metrics.clone(),
            ),
            tunnel: match parts.tunnel_carried {
                // The spec this image computes for what runs now: the carried cloudflared goes on
                // unless it was started from a different one.
                Some(carried) => {
                    let routes = parts.proxy.live.load().routes.clone();
                    let spec = tunnel_spec(
                        &parts.config,
                        &parts.secrets,
                        parts.proxy_addr,
                        &routes,
                        parts.role.role,
                    );
                    TunnelSupervisor::adopt(carried, spec, policy, parts.tunnel)
                }
                None => TunnelSupervisor::start(None, policy, parts.tunnel),
            },
            config_path: parts.config_path,
            config: parts.config,
            health: parts.health,
            metrics: parts.metrics,
            proxy: parts.proxy,
            proxy_addr: parts.proxy_addr,
            metadata: parts.metadata,
            secret_manager: parts.secret_manager,
            secrets: parts.secrets,
            secret_changes,
            refreshers: Vec::new(),
            routes_version: watch::Sender::new(None),
            api_settings: watch::Sender::new(Arc::new(api_settings)),
            cloudflared_version: parts.cloudflared_version,
            binary: parts.binary,
        };
        (node, secret_changed)
    }

    /// What the config API reads from the node: the settings pushes compile under (and the
    /// tokens it accepts), and the version of the table in use.
    pub fn config_api_feeds(&self) -> (watch::Receiver<Arc<ApiSettings>>, watch::Receiver<Option<u64>>) {
        (self.api_settings.subscribe(), self.routes_version.subscribe())
    }

    /// The configuration in effect (the boot file's, or the last reload's).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The secret values in effect.
    pub fn secrets(&self) -> &SecretValues {
        &self.secrets
    }

    /// Whether cloudflared should run here now (enabled, and this node active).
    pub fn wants_tunnel(&self) -> bool {
        let routes = self.proxy.live.load().routes.clone();
        tunnel_spec(&self.config, &self.secrets, self.proxy_addr, &routes, self.roles.role()).is_some()
    }

    /// The `[role_follow]` check, started by boot (its verdicts arrive on `changes`); its task is
    /// stopped with the node.
    pub fn start_follow(&mut self, changes: mpsc::Sender<bool>) -> anyhow::Result<()> {
        self.roles.start_follow(&self.config, changes)
    }

    /// The election, started by boot after the check (which gates it); its task is stopped after
    /// the node resigned. Returns whether one runs (then `STATUS=` follows it on a tick).
    pub fn start_election(&mut self, outcomes: mpsc::Sender<Outcome>) -> anyhow::Result<bool> {
        self.roles.start_election(&self.config, &self.secrets, outcomes)?;
        Ok(self.roles.wants_status_tick())
    }

    /// An upgraded image's election, resumed from what the previous one carried, as early as
    /// the node exists. The carried role stands only if the election still leads (the exec may
    /// have taken it past its fence point): otherwise standby, through the one role path.
    pub async fn resume_election(
        &mut self,
        outcomes: mpsc::Sender<Outcome>,
        carried: crate::election::Carried,
    ) -> anyhow::Result<bool> {
        self.roles
            .resume_election(&self.config, &self.secrets, outcomes, carried)?;
        if self.roles.role() == Role::Active && !self.roles.election_leads() {
            let change = Change {
                to: Role::Standby,
                source: RoleSource::Election,
            };
            self.set_role(change).await;
        }
        Ok(self.roles.wants_status_tick())
    }

    /// `/status` and `STATUS=` say the starting role (boot, once the node exists).
    pub fn publish_role(&mut self) {
        self.roles.publish();
    }

    /// Handles events until a shutdown signal, a failure, or an upgrade that goes ahead.
    pub async fn run(&mut self, mut sources: Sources) -> Ended {
        loop {
            let event = self.next_event(&mut sources).await;
            match self.handle(event).await {
                Flow::Continue => {}
                Flow::Stop(failure) => return Ended::Stopped(failure),
                Flow::Upgrade(plan) => return Ended::Upgrade(plan),
            }
        }
    }

    async fn next_event(&mut self, sources: &mut Sources) -> Event {
        let tick = async {
            match sources.watchdog.as_mut() {
                Some(w) => {
                    w.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // A closed signal stream means whoever drives the node is gone: stop.
            sig = sources.signals.recv() => Event::Signal(sig.unwrap_or(Signal::Shutdown)),
            Some(update) = sources.routes.recv() => Event::RouteUpdate(update),
            Some(push) = sources.pushes.recv() => Event::Push(Box::new(push)),
            Some(change) = sources.secrets.recv() => Event::SecretChanged(change),
            Some(incoming) = sources.control.recv() => Event::Control(incoming),
            Some(role) = sources.roles.recv() => Event::RoleChanged(role),
            Some(outcome) = sources.election.recv() => Event::Election(outcome),
            Some(passing) = sources.follow.recv() => Event::FollowChanged(passing),
            _ = tick_of(&mut sources.status_tick) => Event::StatusTick,
            e = self.tunnel.failed() => Event::TunnelFailed(e),
            _ = tick => Event::WatchdogTick,
        }
    }

    async fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Signal(Signal::Shutdown) => return Flow::Stop(None),
            Event::Signal(Signal::Reload) => self.reload().await,
            Event::Signal(Signal::Upgrade) => {
                if let (_, Some(plan)) = self.upgrade_requested().await {
                    return Flow::Upgrade(plan);
                }
            }
            Event::Control((control::Command::Upgrade, reply)) => {
                let (answer, plan) = self.control_upgrade().await;
                let _ = reply.send(answer);
                if let Some(plan) = plan {
                    return Flow::Upgrade(plan);
                }
            }
            Event::RouteUpdate(update) => self.routes_changed(update).await,
            Event::Push(push) => self.pushed(*push).await,
            Event::SecretChanged(change) => self.secret_changed(change).await,
            Event::Control((command, reply)) => {
                let answer = self.control(command).await;
                let _ = reply.send(answer);
            }
            Event::RoleChanged(to) => {
                let source = RoleSource::WatchedAttribute;
                self.set_role(Change { to, source }).await;
            }
            Event::Election(outcome) => self.election_outcome(outcome).await,
            Event::FollowChanged(passing) => self.follow_changed(passing).await,
            Event::StatusTick => self.roles.tick(),
            Event::TunnelFailed(e) => return Flow::Stop(Some(e)),
            Event::WatchdogTick => systemd::watchdog(),
        }
        Flow::Continue
    }

    /// Stops what the node owns: secret refreshers, then cloudflared (one SIGTERM, grace,
    /// SIGKILL, reap).
    pub async fn stop(mut self) {
        for t in self.refreshers.drain(..) {
            t.abort();
        }
        // The elected leader resigns: cloudflared's SIGTERM, then the lease revoked at once.
        self.roles.stop().await;
        self.tunnel.shutdown().await;
    }

    /// Swaps in new live proxy settings from `config` and `secrets` (auth, limits); the route
    /// table in use stays. Read-copy-update, so a table installed meanwhile is kept.
    pub fn apply_settings(&self, config: &Config, secrets: &SecretValues) -> anyhow::Result<()> {
        let previous = self.proxy.live.load();
        let auth = InboundAuth::for_config(config, secrets, previous.auth.as_ref())?;
        let auth_header = HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?;
        self.proxy.set_allow_link_local(config.proxy.allow_link_local_upstreams);
        self.proxy.live.rcu(|cur| LiveSettings {
            routes: cur.routes.clone(),
            auth: auth.clone(),
            auth_header: auth_header.clone(),
            max_body_bytes: config.proxy.max_body_bytes,
            access_log: AccessLog::from_config(&config.proxy.access_log),
        });
        let api = ApiSettings::new(config, secrets, Some(&self.api_settings.borrow()));
        self.api_settings.send_replace(Arc::new(api));
        Ok(())
    }

    /// The one path every route table takes, whatever its source (config file, host map file,
    /// metadata attribute, config API push, boot): the proxy serves it, the runtime
    /// `routes.json` (and the last good copy) records it, /status and the metrics count it.
    /// cloudflared follows with [`Node::follow_tunnel`].
    pub fn install_routes(&self, map: &HostMap, table: Arc<RouteTable>) {
        let config = &self.config;
        self.metrics.route_reloads.inc();
        if let Err(e) = route_source::persist(config, map, &table) {
            tracing::warn!(error = %e, "cannot write routes.json to the runtime or state directory: {e}");
        }
        let summary: Vec<RouteStatus> = table
            .summary
            .iter()
            .map(|r| RouteStatus {
                name: r.name.clone(),
                hostnames: r.hostnames.clone(),
                upstreams: r.upstreams.clone(),
                host_headers: r.host_headers.clone(),
            })
            .collect();
        let version = table.version;
        let grpc = table.grpc;
        self.proxy.live.rcu(|live| live.with_routes(table.clone()));
        // Per-route state of routes that went away goes with them.
        self.metrics.keep_routes(table.route_stats());
        self.proxy.tokens().retain(&table.id_token_audiences().collect());
        self.routes_version.send_replace(version);
        // A config-API node is ready once it has a pushed table (from the state dir or a push)
        // with a version: version 0 is applied but not ready (the peer's rule).
        let loaded = config.routes.source != RouteSourceKind::ConfigApi || config_api::counts_as_loaded(version);
        self.health.routes_loaded.store(loaded, Ordering::Release);
        self.health.update_status(|s| {
            s.routes = summary;
            s.grpc_routes = grpc;
            // A pushed table carries the controller's version; other sources count tables.
            s.routes_version = version.unwrap_or(s.routes_version + 1);
            s.route_source = route_source::describe(config);
            s.routes_fallback = None;
        });
    }

    /// Brings cloudflared in line with the node's config, secrets, role and the table in use
    /// (a locally-managed tunnel's ingress lists the table's hostnames).
    pub async fn follow_tunnel(&self) {
        let routes = self.proxy.live.load().routes.clone();
        let spec = tunnel_spec(&self.config, &self.secrets, self.proxy_addr, &routes, self.roles.role());
        self.tunnel.apply(spec).await;
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
                // Status and metric first: whoever reads the log line finds them already set.
                self.metrics.route_reload_failures.inc();
                self.health.update_status(|s| s.last_reload_error = Some(msg.clone()));
                tracing::error!(error = %msg, "reload rejected; the previous configuration keeps serving: {msg}");
                systemd::ready(&format!("serving previous configuration; reload failed: {msg}"));
            }
        }
    }

    async fn try_reload(&mut self) -> anyhow::Result<()> {
        let mut new = crate::routing::load_config(&self.config_path)?;
        let cloudflared_version = self.reload_cloudflared_version(&new).await?;
        let pending = self.config.restart_only_differences(&new);
        // From here on `new` holds the running values of restart-only settings, so nothing
        // below acts on one of them (a new runtime_dir, a new route source) before a restart.
        new.keep_restart_only(&self.config);
        let deadline = crate::deadline::from_now(Duration::from_secs(30));
        let secrets = resolve_all(&new, &self.secret_manager, &self.metrics, deadline)
            .await
            .map_err(|e| anyhow::anyhow!(join_errors(&e)))?;
        // Pushed routes are not in the file: the persisted push is compiled again under the new
        // settings (without persistence the table in use keeps serving as compiled).
        let table = if new.routes.source == RouteSourceKind::ConfigApi {
            config_api::recompile_persisted(&new, &self.metrics)
                .map_err(anyhow::Error::msg)?
                .map(|t| (HostMap::new(), t))
        } else {
            let (map, _) = route_source::fetch(&new, &self.metadata)
                .await
                .map_err(anyhow::Error::msg)?;
            Some(build_routes(&new, map, &self.metrics).await?)
        };
        // Checked before anything changes, so a bad auth setting rejects the whole reload.
        InboundAuth::for_config(&new, &secrets, self.proxy.live.load().auth.as_ref())?;
        // The same for the default trust anchors (`proxy.ca_file`, `proxy.trust`), loaded now and
        // swapped in with the settings: a CA removed from the bundle stops being trusted.
        let trust = self.proxy.reloaded_trust(&new.proxy)?;
        if !pending.is_empty() {
            tracing::warn!(settings = ?pending, "changed settings take effect only after a restart: {}", pending.join(", "));
        }
        self.apply_settings(&new, &secrets)?;
        if let Some(trust) = trust {
            self.proxy.use_default_trust(trust);
        }
        self.note_cloudflared_version(cloudflared_version, &new.cloudflared.path);
        // Nothing below can fail: the file's role, if it changed, is applied through the one
        // role path once the new settings are in place.
        let role_change = self.roles.reloaded(&self.config, &new);
        self.config = new;
        self.secrets = secrets;
        if let Some((map, table)) = table {
            self.install_routes(&map, Arc::new(table));
        }
        if let Some(change) = role_change {
            self.set_role(change).await;
        }
        self.follow_tunnel().await;
        let new = &self.config;
        self.health.update_status(|s| {
            s.secrets = self.secrets.keys().cloned().collect();
            s.pending_restart = pending.iter().map(|p| (*p).to_owned()).collect();
            s.cloudflared_metrics = new.cloudflared.enabled.then_some(new.cloudflared.metrics);
            s.tunnel_ready_grace = new.cloudflared.ready_grace;
        });
        self.restart_refreshers();
        let routes = self.proxy.live.load().routes.len();
        tracing::info!(
            routes,
            "configuration reloaded from {} ({routes} routes)",
            self.config_path.display()
        );
        Ok(())
    }

    /// Records `version` as that of the configuration's cloudflared at `program` (logged, and
    /// shown in `/status` and the metrics, when it changed).
    fn note_cloudflared_version(
        &mut self,
        version: Option<crate::tunnel::version::CloudflaredVersion>,
        program: &std::path::Path,
    ) {
        if version == self.cloudflared_version {
            return;
        }
        if let Some(v) = &version {
            tracing::info!(
                program = %program.display(),
                version = %v.version,
                "cloudflared version {} ({})",
                v.version,
                program.display()
            );
            self.tunnel.state.set_version(v.version.clone());
        }
        self.cloudflared_version = version;
    }

    /// Asks the reloaded configuration's cloudflared its version again: `cloudflared.path` may
    /// name another binary now, or a package upgrade replaced the binary in place, and what the
    /// agent may ask of it (`--token-file`), `/status` and the metrics follow the version that
    /// will run. A reload is refused when the new binary cannot run `token_delivery` or, named
    /// by a new path, cannot be asked at all: the running cloudflared keeps serving instead of
    /// being replaced by one that would crash-loop.
    async fn reload_cloudflared_version(
        &self,
        new: &crate::config::Config,
    ) -> anyhow::Result<Option<crate::tunnel::version::CloudflaredVersion>> {
        let cf = &new.cloudflared;
        if !cf.enabled {
            return Ok(self.cloudflared_version.clone());
        }
        match crate::tunnel::version::detect(&cf.path, Duration::from_secs(10)).await {
            Ok(version) => {
                crate::tunnel::version::check_delivery(&cf.path, &version, cf.token_delivery)?;
                Ok(Some(version))
            }
            Err(e) if cf.path != self.config.cloudflared.path => {
                anyhow::bail!("cloudflared.path: cannot ask {} its version: {e}", cf.path.display())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell cloudflared's version: {e}");
                Ok(self.cloudflared_version.clone())
            }
        }
    }

    /// (Re)starts the secret refreshers for the current config and values.
    pub fn restart_refreshers(&mut self) {
        for t in self.refreshers.drain(..) {
            t.abort();
        }
        self.refreshers = refresh::spawn(
            &self.config,
            &self.secret_manager,
            &self.secrets,
            &self.secret_changes,
            &self.metrics,
        );
    }

    /// A new value from the watched route source.
    async fn routes_changed(&mut self, update: route_source::Update) {
        let built = match update {
            Ok(map) => build_routes(&self.config, map, &self.metrics)
                .await
                .map_err(|e| format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        };
        match built {
            Ok((map, table)) => {
                tracing::info!(
                    routes = table.len(),
                    "routes updated from the watched source {} ({} routes)",
                    route_source::describe(&self.config),
                    table.len()
                );
                self.install_routes(&map, Arc::new(table));
                self.follow_tunnel().await;
            }
            Err(e) => {
                self.metrics.route_reload_failures.inc();
                tracing::error!(error = %e, "route update rejected (from {}); the current table keeps serving: {e}", route_source::describe(&self.config));
                self.health.update_status(|s| s.last_reload_error = Some(e.clone()));
            }
        }
    }

    /// A table pushed to the config API: version-checked, persisted, then applied like every
    /// other table. The controller gets its answer once the proxy serves the table; cloudflared
    /// follows after.
    async fn pushed(&mut self, push: Push) {
        let current = self.proxy.live.load().routes.version;
        if let Some(current) = current.filter(|&c| config_api::is_stale(push.version, c)) {
            let _ = push.reply.send(PushOutcome::Stale { current });
            return;
        }
        if let Err(e) = config_api::persist(&self.config, push.body).await {
            tracing::error!(error = %e, version = push.version, "cannot persist the pushed config; not applied (version {}): {e}", push.version);
            let _ = push.reply.send(PushOutcome::PersistFailed(e));
            return;
        }
        let rules = push.table.len();
        self.install_routes(&HostMap::new(), Arc::new(push.table));
        tracing::info!(
            version = push.version,
            rules,
            "pushed config applied: version {} ({rules} rules)",
            push.version
        );
        let _ = push.reply.send(PushOutcome::Applied { rules });
        self.follow_tunnel().await;
    }

    /// A refreshed secret changed value.
    async fn secret_changed(&mut self, change: SecretChange) {
        let SecretChange { name, value } = change;
        tracing::info!(secret = %name, "secret changed: {name:?}; applying the new value");
        self.secrets.insert(name.clone(), value);
        let api_secret = self.config.config_api.as_ref().and_then(|a| a.auth_secret.as_ref());
        if self.config.proxy.auth_secret.as_ref() == Some(&name) || api_secret == Some(&name) {
            if let Err(e) = self.apply_settings(&self.config, &self.secrets) {
                tracing::error!(secret = %name, error = %format!("{e:#}"), "cannot apply the rotated token from secret {name:?}: {e:#}");
            }
        }
        if self.config.cloudflared.token_secret.as_ref() == Some(&name) {
            self.follow_tunnel().await;
        }
    }

    /// The one path of every role change, whatever its source: the role module decides (the
    /// fence when leaving active, the new state, what is kept and published), then cloudflared
    /// follows. Promotion spawns cloudflared before returning; demotion stops it like shutdown
    /// does (one SIGTERM, grace, SIGKILL) while the proxy keeps serving.
    pub async fn set_role(&mut self, change: Change) -> role::Outcome {
        let started = Instant::now();
        if let Err(answered) = self.roles.change(change, &self.config) {
            return answered;
        }
        self.follow_tunnel().await;
        self.roles.changed(started.elapsed(), &self.config)
    }

    /// An outcome of the election, applied through the role path.
    async fn election_outcome(&mut self, outcome: Outcome) {
        self.set_role(role::election::outcome_change(outcome)).await;
    }

    /// The `[role_follow]` check changed verdict: a role change alone, or the election's gate.
    async fn follow_changed(&mut self, passing: bool) {
        if let Some(change) = self.roles.follow_changed(passing).await {
            self.set_role(change).await;
        }
    }

    /// `promote` or `demote`, as the configured sources allow.
    async fn manual(&mut self, promote: bool) -> Answer {
        match self.roles.manual(&self.config, promote) {
            Manual::Refused(message) => Answer::refused(message),
            Manual::Direct(change) => Answer::after(None, &self.set_role(change).await),
            Manual::Handover => match self.roles.handover(promote).await {
                Handover::Answered(answer) => answer,
                Handover::Apply { change, prefix } => Answer::after(Some(prefix), &self.set_role(change).await),
            },
        }
    }

    /// A command from the control socket.
    async fn control(&mut self, command: control::Command) -> control::Reply {
        let answer = match command {
            control::Command::Status => Answer::unchanged(self.roles.describe()),
            control::Command::Promote => self.manual(true).await,
            control::Command::Demote => self.manual(false).await,
            // Taken by the loop (`handle`): it may end it.
            control::Command::Upgrade => Answer::refused("an upgrade is handled by the event loop".to_owned()),
        };
        control::Reply {
            ok: answer.ok,
            changed: answer.changed,
            message: answer.message,
            status: self.health.status(),
        }
    }
}
