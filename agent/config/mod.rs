//! The agent's configuration: one TOML file, unknown keys rejected, every error naming the file,
//! the key and the reason.
//!
//! Parsing happens in two passes. `toml` + serde reject syntax errors, unknown keys and wrongly
//! typed values (those errors carry line and column). [`Config::validate`] then checks what types
//! cannot express (cross-references between sections, URLs, ranges) and collects *every* problem,
//! so an operator fixes a file in one round trip instead of one error per `check` run.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/tunnel-agent/agent.toml";

/// The whole file. Every section has working defaults, so an empty file is a valid (if useless)
/// configuration: no routes, no auth, proxy on loopback, health on `:2000`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `active` runs cloudflared; `standby` keeps everything else warm for promotion. A top-level
    /// key, so it must come before the first `[section]`.
    #[serde(default)]
    pub role: crate::roles::Role,
    #[serde(default)]
    pub role_watch: RoleWatchSection,
    #[serde(default)]
    pub agent: AgentSection,
    /// Named secrets; other sections refer to them by name so that a value never has to appear
    /// in this file.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSpec>,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub routes: RoutesSection,
    /// Full-form routes (`[[route]]`), Gateway API HTTPRoute style. The `[routes]` host map is
    /// shorthand for one such route per hostname.
    #[serde(default, rename = "route")]
    pub route: Vec<RouteSpec>,
    #[serde(default)]
    pub gcp: GcpSection,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub cloudflared: CloudflaredSection,
    /// The listener the controller pushes route tables to (`routes.source = "config-api"`).
    #[serde(default)]
    pub config_api: Option<ConfigApiSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Volatile files for operators and children (effective `routes.json`, token file, control
    /// socket). systemd's `RuntimeDirectory=` creates it.
    pub runtime_dir: PathBuf,
    /// Files that must survive a reboot (last good route table, persisted role).
    pub state_dir: PathBuf,
    /// How long in-flight proxy requests may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `tunnel_agent=debug,hyper=info`.
    pub log_level: String,
    /// How long boot may keep retrying transient failures (Secret Manager 429/5xx, metadata
    /// server unreachable) before giving up with an error.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            runtime_dir: PathBuf::from("/run/tunnel-agent"),
            state_dir: PathBuf::from("/var/lib/tunnel-agent"),
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Auto,
            log_level: "info".to_owned(),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is the journal stream, text otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretSourceKind {
    File,
    Env,
    GcpSecretManager,
}

impl fmt::Display for SecretSourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretSourceKind::File => "file",
            SecretSourceKind::Env => "env",
            SecretSourceKind::GcpSecretManager => "gcp-secret-manager",
        })
    }
}

/// Where one secret comes from. Flat rather than an enum so that a wrong combination gets a
/// message naming the missing or extra key rather than serde's "data did not match any variant".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    pub source: SecretSourceKind,
    /// `file`: path to read. A relative path is looked up in `$CREDENTIALS_DIRECTORY` first
    /// (systemd `LoadCredential=`).
    pub path: Option<PathBuf>,
    /// `env`: variable name.
    pub var: Option<String>,
    /// `gcp-secret-manager`: `projects/P/secrets/S/versions/V` or
    /// `projects/P/locations/L/secrets/S/versions/V`.
    pub name: Option<String>,
    /// Re-read interval; a changed value is applied without restart.
    #[serde(default, with = "humantime_serde")]
    pub refresh: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub listen: SocketAddr,
    /// Header cloudflared's ingress adds with the shared internal token.
    pub auth_header: String,
    /// Name of the secret holding the internal token. Unset: no auth on this listener (seed 002,
    /// where cloudflared and the app share a host).
    pub auth_secret: Option<String>,
    /// After the internal token rotates (secret `refresh`), the previous value is still accepted
    /// this long, so requests signed with it during the rollout do not get 401s.
    #[serde(with = "humantime_serde")]
    pub auth_overlap: Duration,
    /// Largest request head accepted; larger gets 431. hyper's floor is 8 KiB.
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413. Unset: no limit (bodies stream, so a
    /// large upload costs no memory).
    pub max_body_bytes: Option<u64>,
    /// A client that starts a request must finish sending its head within this (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive client connection is closed after this. Must exceed cloudflared's
    /// 90 s origin keep-alive, or cloudflared reuses a connection we are closing.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the upstream may take to send its response head, counted from the end of the
    /// request body (a slow upload is not a slow upstream); then 504. An upstream that stops
    /// reading an upload also gets 504 after this long.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            auth_header: "X-Internal-Auth-Token".to_owned(),
            auth_secret: None,
            auth_overlap: Duration::from_secs(600),
            max_header_bytes: 16 * 1024,
            max_body_bytes: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RouteSourceKind {
    /// `[routes.hosts]` in this file.
    #[default]
    Inline,
    /// A JSON file in the seed's `routes.json` format.
    File,
    /// A GCE metadata attribute holding that JSON, watched for changes.
    GcpMetadata,
    /// Pushed by a controller to the config API (`PUT /config`, the L7 peer's wire format).
    ConfigApi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AttributeScope {
    #[default]
    Instance,
    Project,
}

impl AttributeScope {
    /// The metadata path prefix for attributes of this scope.
    pub fn path(self) -> &'static str {
        match self {
            AttributeScope::Instance => "instance/attributes",
            AttributeScope::Project => "project/attributes",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuthKind {
    #[default]
    None,
    /// Identity token from the metadata server, audience = the upstream URL.
    GcpIdToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthHeaderKind {
    /// `Authorization: Bearer …`
    #[default]
    Authorization,
    /// Cloud Run's `X-Serverless-Authorization`, which leaves `Authorization` to the app.
    XServerlessAuthorization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, or HTTP/2 when an `https` upstream offers it through ALPN.
    #[default]
    Auto,
    /// HTTP/2 with prior knowledge over cleartext (gRPC servers).
    H2c,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesSection {
    pub source: RouteSourceKind,
    /// `source = "file"`: the JSON host map.
    pub file: Option<PathBuf>,
    /// `source = "inline"`: hostname → upstream URL.
    pub hosts: BTreeMap<String, String>,
    /// `source = "gcp-metadata"`: the attribute name, e.g. `tunnel-routes`.
    pub attribute: Option<String>,
    pub attribute_scope: AttributeScope,
    /// Applied to every host-map entry.
    pub upstream_auth: UpstreamAuthKind,
    pub auth_header: AuthHeaderKind,
    pub protocol: UpstreamProtocol,
}

impl Default for RoutesSection {
    fn default() -> Self {
        RoutesSection {
            source: RouteSourceKind::Inline,
            file: None,
            hosts: BTreeMap::new(),
            attribute: None,
            attribute_scope: AttributeScope::Instance,
            upstream_auth: UpstreamAuthKind::None,
            auth_header: AuthHeaderKind::Authorization,
            protocol: UpstreamProtocol::Auto,
        }
    }
}

/// One `[[route]]`: hostnames and the backends that serve them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Shown in metrics and logs; defaults to the first hostname.
    pub name: Option<String>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Shorthand for a single backend.
    pub upstream: Option<String>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    pub upstream_auth: Option<UpstreamAuthKind>,
    pub auth_header: Option<AuthHeaderKind>,
    pub protocol: Option<UpstreamProtocol>,
    /// Overrides `proxy.upstream_timeout` for this route.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Gateway API `HTTPRouteMatch`es, ORed; none means `PathPrefix /` (docs/routing.md).
    #[serde(default)]
    pub matches: Vec<crate::routing::MatchSpec>,
    /// Gateway API `HTTPRouteFilter`s for every request of this route.
    #[serde(default)]
    pub filters: Vec<crate::routing::FilterSpec>,
    /// Gateway API `HTTPRouteTimeouts` (`request`, `backend_request`).
    #[serde(default)]
    pub timeouts: Option<crate::routing::TimeoutsSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub upstream_auth: Option<UpstreamAuthKind>,
    pub auth_header: Option<AuthHeaderKind>,
    pub protocol: Option<UpstreamProtocol>,
    /// Filters applied only when this backend is chosen.
    #[serde(default)]
    pub filters: Vec<crate::routing::FilterSpec>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcpSection {
    /// Metadata server base URL. Unset: `$GCE_METADATA_HOST` if set (as Google's client
    /// libraries do), else `http://metadata.google.internal`.
    pub metadata_url: Option<String>,
    /// Identity tokens are refreshed this long before their `exp`.
    #[serde(with = "humantime_serde")]
    pub id_token_refresh_margin: Duration,
    /// Per-request timeout towards the metadata server.
    #[serde(with = "humantime_serde")]
    pub metadata_timeout: Duration,
    /// Secret Manager API base URL. Unset: `https://secretmanager.googleapis.com`, or
    /// `https://secretmanager.LOCATION.rep.googleapis.com` for regional secrets.
    pub secret_manager_endpoint: Option<String>,
}

impl Default for GcpSection {
    fn default() -> Self {
        GcpSection {
            metadata_url: None,
            id_token_refresh_margin: Duration::from_secs(300),
            metadata_timeout: Duration::from_secs(5),
            secret_manager_endpoint: None,
        }
    }
}

impl GcpSection {
    /// The metadata server base URL, without a trailing slash.
    pub fn metadata_base(&self) -> String {
        let url = match &self.metadata_url {
            Some(url) => url.clone(),
            None => match std::env::var("GCE_METADATA_HOST") {
                Ok(host) if !host.is_empty() => format!("http://{host}"),
                _ => "http://metadata.google.internal".to_owned(),
            },
        };
        url.trim_end_matches('/').to_owned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TokenDelivery {
    /// `TUNNEL_TOKEN` in cloudflared's environment: works on every version.
    #[default]
    Env,
    /// `--token-file` in the runtime dir, mode 0600 (cloudflared >= 2025.4).
    File,
}

/// cloudflared, supervised. Either a remotely-managed tunnel (`token_secret`) or a
/// locally-managed one (`credentials_file` + `tunnel`, ingress written from the route table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudflaredSection {
    pub enabled: bool,
    /// The executable; looked up in `PATH` when not absolute.
    pub path: PathBuf,
    /// Name of the secret holding the connector token (remotely-managed tunnel).
    pub token_secret: Option<String>,
    pub token_delivery: TokenDelivery,
    /// Locally-managed tunnel: the credentials JSON from `cloudflared tunnel create`.
    pub credentials_file: Option<PathBuf>,
    /// Locally-managed tunnel: its name or UUID.
    pub tunnel: Option<String>,
    /// Where cloudflared serves `/ready` and `/metrics`: moved off `:2000`, which the agent owns.
    pub metrics: SocketAddr,
    /// cloudflared's `--grace-period`: how long it drains on SIGTERM. The agent waits this plus
    /// `stop_margin` before SIGKILL.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    #[serde(with = "humantime_serde")]
    pub stop_margin: Duration,
    /// Extra arguments placed before `run` (e.g. `["--protocol", "http2"]`).
    pub extra_args: Vec<String>,
    /// Restart backoff after an unrequested exit.
    #[serde(with = "humantime_serde")]
    pub restart_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// Running and connected this long resets the backoff and the exit count.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// `crash_loop_exits` exits within `crash_loop_window` is a crash loop: `/ready` fails.
    pub crash_loop_exits: u32,
    #[serde(with = "humantime_serde")]
    pub crash_loop_window: Duration,
    /// After this many exits without a stable period the agent itself exits non-zero, handing
    /// the problem to systemd's restart policy. 0 = never.
    pub give_up_after_exits: u32,
    /// How often cloudflared's `/ready` is polled.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A tunnel that was connected and has had 0 connections this long is restarted.
    #[serde(with = "humantime_serde")]
    pub disconnected_restart_after: Duration,
    /// `/ready` keeps answering 200 this long after the tunnel loses its last connection, so a
    /// brief reconnect does not flap the verdict.
    #[serde(with = "humantime_serde")]
    pub ready_grace: Duration,
}

impl Default for CloudflaredSection {
    fn default() -> Self {
        CloudflaredSection {
            enabled: false,
            path: PathBuf::from("cloudflared"),
            token_secret: None,
            token_delivery: TokenDelivery::Env,
            credentials_file: None,
            tunnel: None,
            metrics: SocketAddr::from(([127, 0, 0, 1], 20241)),
            grace_period: Duration::from_secs(30),
            stop_margin: Duration::from_secs(5),
            extra_args: Vec::new(),
            restart_backoff: Duration::from_millis(200),
            restart_backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            crash_loop_exits: 5,
            crash_loop_window: Duration::from_secs(120),
            give_up_after_exits: 20,
            poll_interval: Duration::from_secs(1),
            disconnected_restart_after: Duration::from_secs(120),
            ready_grace: Duration::from_secs(10),
        }
    }
}

/// The config API listener (`PUT /config`, `GET /config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigApiSection {
    /// Loopback by default: only a local controller or an SSH tunnel can reach it.
    pub listen: SocketAddr,
    /// Secret holding the bearer token a `PUT /config` must present. Required.
    pub auth_secret: Option<String>,
    /// Write each applied table to `agent.state_dir` and serve it again after a restart, until
    /// the controller pushes a newer one.
    pub persist: bool,
}

impl Default for ConfigApiSection {
    fn default() -> Self {
        ConfigApiSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            auth_secret: None,
            persist: true,
        }
    }
}

/// Optional: a GCE metadata attribute naming the active host. When set it decides the role.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RoleWatchSection {
    pub attribute: Option<String>,
    pub attribute_scope: AttributeScope,
    /// This host's name as the attribute spells it. Unset: the kernel hostname.
    pub host_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub listen: SocketAddr,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 2000)),
        }
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `secrets.internal_token.path`.
    pub key: String,
    pub reason: String,
}

/// A syntax or type error found by the TOML parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    /// Dotted key path (`proxy.listen`, `route[0].upstream`) when the error points at a key or
    /// value; `None` for plain syntax errors.
    pub key: Option<String>,
    /// 1-based line and column (in characters) when the parser knows the position.
    pub position: Option<(usize, usize)>,
    pub reason: String,
}

/// Everything wrong with one file, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Errors from the TOML parser (syntax, unknown keys, wrong types). When there are any,
    /// `problems` is empty: validation needs a file that parses.
    pub parse: Vec<ParseProblem>,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        let mut lines = Vec::new();
        // `file:line:column:` is the shape editors and CI annotators recognise.
        for p in &self.parse {
            let at = match p.position {
                Some((line, column)) => format!("{file}:{line}:{column}"),
                None => file.to_string(),
            };
            lines.push(match &p.key {
                Some(key) => format!("{at}: {key}: {}", p.reason),
                None => format!("{at}: {}", p.reason),
            });
        }
        for p in &self.problems {
            lines.push(format!("{file}: {}: {}", p.key, p.reason));
        }
        f.write_str(&lines.join("\n"))
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                key: "(file)".to_owned(),
                reason: format!("cannot read: {e}"),
            }],
            parse: Vec::new(),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config = parse_all(text).map_err(|parse| ConfigError {
            file: path.to_owned(),
            parse,
            problems: Vec::new(),
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: path.to_owned(),
                problems,
                parse: Vec::new(),
            })
        }
    }

    /// Checks everything the types cannot. Returns all problems found.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: String, reason: String| out.push(Problem { key, reason });

        if self.agent.shutdown_grace.is_zero() {
            bad("agent.shutdown_grace".into(), "must be greater than 0".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.agent.log_level) {
            bad("agent.log_level".into(), format!("invalid filter: {e}"));
        }

        for (name, spec) in &self.secrets {
            let key = |k: &str| format!("secrets.{name}.{k}");
            let want = match spec.source {
                SecretSourceKind::File => "path",
                SecretSourceKind::Env => "var",
                SecretSourceKind::GcpSecretManager => "name",
            };
            let given = [
                ("path", spec.path.is_some()),
                ("var", spec.var.as_deref().is_some_and(|v| !v.is_empty())),
                ("name", spec.name.is_some()),
            ];
            for (k, present) in given {
                if k == want && !present {
                    bad(key(k), format!("required for source = \"{}\"", spec.source));
                } else if k != want && present {
                    bad(key(k), format!("not used by source = \"{}\"", spec.source));
                }
            }
            if let (SecretSourceKind::GcpSecretManager, Some(n)) = (spec.source, &spec.name) {
                if let Err(reason) = crate::secrets::SecretVersionName::parse(n) {
                    bad(key("name"), reason);
                }
            }
            if spec.refresh.is_some_and(|r| r < Duration::from_secs(1)) {
                bad(key("refresh"), "must be at least 1s".into());
            }
        }

        let p = &self.proxy;
        if let Some(secret) = &p.auth_secret {
            if !self.secrets.contains_key(secret) {
                bad(
                    "proxy.auth_secret".into(),
                    format!("no secret named {secret:?} in [secrets]"),
                );
            }
        }
        if http::HeaderName::from_bytes(p.auth_header.as_bytes()).is_err() {
            bad(
                "proxy.auth_header".into(),
                format!("{:?} is not a valid header name", p.auth_header),
            );
        }
        if p.max_header_bytes < 8192 {
            bad("proxy.max_header_bytes".into(), "must be at least 8192".into());
        }
        for (k, v) in [
            ("header_read_timeout", p.header_read_timeout),
            ("idle_timeout", p.idle_timeout),
            ("connect_timeout", p.connect_timeout),
            ("upstream_timeout", p.upstream_timeout),
            ("pool_idle_timeout", p.pool_idle_timeout),
        ] {
            if v.is_zero() {
                bad(format!("proxy.{k}"), "must be greater than 0".into());
            }
        }
        // Port 0 asks the kernel for a free port, so two `:0` listeners never collide (tests
        // and ad-hoc runs bind both that way).
        if p.listen == self.health.listen && p.listen.port() != 0 {
            bad(
                "health.listen".into(),
                format!("same address as proxy.listen ({})", p.listen),
            );
        }

        let r = &self.routes;
        if r.source != RouteSourceKind::File && r.file.is_some() {
            bad("routes.file".into(), "only used with source = \"file\"".into());
        }
        if r.source == RouteSourceKind::File && r.file.is_none() {
            bad("routes.file".into(), "required for source = \"file\"".into());
        }
        if r.source != RouteSourceKind::Inline && !r.hosts.is_empty() {
            bad("routes.hosts".into(), "only used with source = \"inline\"".into());
        }
        if r.source != RouteSourceKind::GcpMetadata && r.attribute.is_some() {
            bad(
                "routes.attribute".into(),
                "only used with source = \"gcp-metadata\"".into(),
            );
        }
        if r.source == RouteSourceKind::ConfigApi {
            if !self.route.is_empty() {
                bad(
                    "route".into(),
                    "not used with source = \"config-api\" (the controller pushes every route)".into(),
                );
            }
            match self.config_api.as_ref().and_then(|a| a.auth_secret.as_ref()) {
                None => bad(
                    "config_api.auth_secret".into(),
                    "required for routes.source = \"config-api\"".into(),
                ),
                Some(secret) if !self.secrets.contains_key(secret) => bad(
                    "config_api.auth_secret".into(),
                    format!("no secret named {secret:?} in [secrets]"),
                ),
                Some(_) => {}
            }
        }
        if let Some(api) = &self.config_api {
            if self.routes.source != RouteSourceKind::ConfigApi {
                bad(
                    "config_api".into(),
                    "only used with routes.source = \"config-api\"".into(),
                );
            }
            if api.listen.port() != 0 && (api.listen == self.proxy.listen || api.listen == self.health.listen) {
                bad(
                    "config_api.listen".into(),
                    format!("{} is already used by proxy.listen or health.listen", api.listen),
                );
            }
        }
        // Route contents (URLs, hostnames, duplicates) are checked by the same code that builds
        // the live table, so `check` and a running agent can never disagree. Remote sources are
        // checked when fetched.
        let empty = BTreeMap::new();
        let hosts = match self.routes.source {
            RouteSourceKind::Inline => &self.routes.hosts,
            _ => &empty,
        };
        if let Err(e) = crate::routing::table::RouteTable::build(self, hosts) {
            for p in e.problems {
                bad(p.key, p.reason);
            }
        }

        let cf = &self.cloudflared;
        if cf.enabled {
            match (&cf.token_secret, &cf.credentials_file) {
                (None, None) => bad(
                    "cloudflared.token_secret".into(),
                    "set token_secret (remotely-managed tunnel) or credentials_file + tunnel (locally-managed)".into(),
                ),
                (Some(_), Some(_)) => bad(
                    "cloudflared.credentials_file".into(),
                    "give either token_secret or credentials_file, not both".into(),
                ),
                (Some(name), None) if !self.secrets.contains_key(name) => bad(
                    "cloudflared.token_secret".into(),
                    format!("no secret named {name:?} in [secrets]"),
                ),
                (None, Some(_)) if cf.tunnel.is_none() => bad(
                    "cloudflared.tunnel".into(),
                    "required with credentials_file (the tunnel's name or UUID)".into(),
                ),
                _ => {}
            }
            if cf.metrics == self.health.listen || cf.metrics == self.proxy.listen {
                bad(
                    "cloudflared.metrics".into(),
                    format!("{} is already used by the agent", cf.metrics),
                );
            }
            if cf.crash_loop_exits == 0 {
                bad("cloudflared.crash_loop_exits".into(), "must be at least 1".into());
            }
            if cf.poll_interval.is_zero() {
                bad("cloudflared.poll_interval".into(), "must be greater than 0".into());
            }
            for a in &cf.extra_args {
                if a == "run" || a.starts_with("--token") || a.starts_with("--metrics") {
                    bad(
                        "cloudflared.extra_args".into(),
                        format!("{a:?} is managed by the agent; remove it (and never put a token in argv)"),
                    );
                }
            }
        }
        if let Some(a) = &self.role_watch.attribute {
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                bad(
                    "role_watch.attribute".into(),
                    format!("{a:?} is not a metadata attribute name"),
                );
            }
        }
        if self.routes.source == RouteSourceKind::GcpMetadata {
            match &self.routes.attribute {
                None => bad(
                    "routes.attribute".into(),
                    "required for source = \"gcp-metadata\"".into(),
                ),
                Some(a) if a.is_empty() || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => {
                    bad(
                        "routes.attribute".into(),
                        format!("{a:?} is not a metadata attribute name"),
                    )
                }
                _ => {}
            }
        }
        if let Some(url) = &self.gcp.secret_manager_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bad(
                    "gcp.secret_manager_endpoint".into(),
                    "must be an http:// or https:// URL".into(),
                );
            }
        }
        if let Some(url) = &self.gcp.metadata_url {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(_) => out.push(Problem {
                    key: "gcp.metadata_url".into(),
                    reason: "must be an http:// or https:// URL".into(),
                }),
                Err(e) => out.push(Problem {
                    key: "gcp.metadata_url".into(),
                    reason: format!("invalid URL: {e}"),
                }),
            }
        }
        out
    }

    /// Settings that only take effect on restart (listeners, directories). Reload reports a
    /// change to any of these instead of half-applying it.
    pub fn restart_only_differences(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.proxy.listen != new.proxy.listen {
            out.push("proxy.listen");
        }
        if self.health.listen != new.health.listen {
            out.push("health.listen");
        }
        if self.config_api.as_ref().map(|a| a.listen) != new.config_api.as_ref().map(|a| a.listen) {
            out.push("config_api.listen");
        }
        if self.agent.runtime_dir != new.agent.runtime_dir {
            out.push("agent.runtime_dir");
        }
        if self.agent.state_dir != new.agent.state_dir {
            out.push("agent.state_dir");
        }
        if self.agent.log_format != new.agent.log_format {
            out.push("agent.log_format");
        }
        // The global subscriber is installed once, with the level read at start.
        if self.agent.log_level != new.agent.log_level {
            out.push("agent.log_level");
        }
        if self.proxy.max_header_bytes != new.proxy.max_header_bytes {
            out.push("proxy.max_header_bytes");
        }
        if self.proxy.header_read_timeout != new.proxy.header_read_timeout {
            out.push("proxy.header_read_timeout");
        }
        if self.proxy.idle_timeout != new.proxy.idle_timeout {
            out.push("proxy.idle_timeout");
        }
        if self.proxy.connect_timeout != new.proxy.connect_timeout
            || self.proxy.pool_idle_timeout != new.proxy.pool_idle_timeout
            || self.proxy.pool_max_idle_per_host != new.proxy.pool_max_idle_per_host
        {
            out.push("proxy.connect_timeout/pool_*");
        }
        if self.routes.source != new.routes.source
            || self.routes.attribute != new.routes.attribute
            || self.routes.attribute_scope != new.routes.attribute_scope
        {
            out.push("routes.source/attribute");
        }
        if self.role_watch.attribute != new.role_watch.attribute
            || self.role_watch.attribute_scope != new.role_watch.attribute_scope
            || self.role_watch.host_name != new.role_watch.host_name
        {
            out.push("role_watch");
        }
        let api = |c: &Config| {
            c.config_api
                .as_ref()
                .map(|a| (a.listen, a.auth_secret.clone(), a.persist))
        };
        if api(self) != api(new) {
            out.push("config_api");
        }
        if self.gcp.metadata_url != new.gcp.metadata_url || self.gcp.metadata_timeout != new.gcp.metadata_timeout {
            out.push("gcp.metadata_url/metadata_timeout");
        }
        // The identity-token cache is built once at start and keeps its margin.
        if self.gcp.id_token_refresh_margin != new.gcp.id_token_refresh_margin {
            out.push("gcp.id_token_refresh_margin");
        }
        // The Secret Manager client is built once at start, with its endpoint.
        if self.gcp.secret_manager_endpoint != new.gcp.secret_manager_endpoint {
            out.push("gcp.secret_manager_endpoint");
        }
        // The supervisor takes its restart policy at start; a reload only changes the command.
        if restart_policy(&self.cloudflared) != restart_policy(&new.cloudflared) {
            out.push(
                "cloudflared.restart_backoff/restart_backoff_max/stable_after/crash_loop_*/give_up_after_exits/poll_interval/disconnected_restart_after",
            );
        }
        out
    }

    /// Overwrites the settings [`Config::restart_only_differences`] covers with `running`'s, so
    /// a reloaded configuration describes what is really in effect: the next reload diffs
    /// against it, and nothing half-applies a value that needs a restart (cloudflared's token
    /// file in a new `runtime_dir`, one read of a new route source).
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.proxy.listen = running.proxy.listen;
        self.health.listen = running.health.listen;
        self.agent.runtime_dir = running.agent.runtime_dir.clone();
        self.agent.state_dir = running.agent.state_dir.clone();
        self.agent.log_format = running.agent.log_format;
        self.agent.log_level = running.agent.log_level.clone();
        self.proxy.max_header_bytes = running.proxy.max_header_bytes;
        self.proxy.header_read_timeout = running.proxy.header_read_timeout;
        self.proxy.idle_timeout = running.proxy.idle_timeout;
        self.proxy.connect_timeout = running.proxy.connect_timeout;
        self.proxy.pool_idle_timeout = running.proxy.pool_idle_timeout;
        self.proxy.pool_max_idle_per_host = running.proxy.pool_max_idle_per_host;
        if self.routes.source != running.routes.source {
            // The source's own keys go with it; within one source, `file` and `hosts` are live.
            self.routes.source = running.routes.source;
            self.routes.file = running.routes.file.clone();
            self.routes.hosts = running.routes.hosts.clone();
        }
        self.routes.attribute = running.routes.attribute.clone();
        self.routes.attribute_scope = running.routes.attribute_scope;
        self.role_watch = running.role_watch.clone();
        // The config API's listener and token are read once, at start.
        self.config_api = running.config_api.clone();
        self.gcp.metadata_url = running.gcp.metadata_url.clone();
        self.gcp.metadata_timeout = running.gcp.metadata_timeout;
        self.gcp.id_token_refresh_margin = running.gcp.id_token_refresh_margin;
        self.gcp.secret_manager_endpoint = running.gcp.secret_manager_endpoint.clone();
        let cf = &running.cloudflared;
        self.cloudflared.restart_backoff = cf.restart_backoff;
        self.cloudflared.restart_backoff_max = cf.restart_backoff_max;
        self.cloudflared.stable_after = cf.stable_after;
        self.cloudflared.crash_loop_exits = cf.crash_loop_exits;
        self.cloudflared.crash_loop_window = cf.crash_loop_window;
        self.cloudflared.give_up_after_exits = cf.give_up_after_exits;
        self.cloudflared.poll_interval = cf.poll_interval;
        self.cloudflared.disconnected_restart_after = cf.disconnected_restart_after;
    }
}

/// The `[cloudflared]` keys the supervisor reads once, at start.
fn restart_policy(cf: &CloudflaredSection) -> (Duration, Duration, Duration, u32, Duration, u32, Duration, Duration) {
    (
        cf.restart_backoff,
        cf.restart_backoff_max,
        cf.stable_after,
        cf.crash_loop_exits,
        cf.crash_loop_window,
        cf.give_up_after_exits,
        cf.poll_interval,
        cf.disconnected_restart_after,
    )
}

/// Parser errors reported per `check` run, at most. A file with more is not worth listing.
const MAX_PARSE_PROBLEMS: usize = 50;

/// Deserializes `text`, collecting every parser error rather than the first.
///
/// serde stops at the first error, so after each one the offending statement (a `key = value`
/// line or a `[table]`) is blanked with spaces and the text parsed again. Blanking keeps every
/// byte offset, so later positions are still those of the original file. The loop stops at the
/// first error it cannot attribute to a statement, or when blanking left text that is no longer
/// TOML (that error would be ours, not the file's).
fn parse_all(text: &str) -> Result<Config, Vec<ParseProblem>> {
    let mut scratch = text.to_owned();
    let mut problems: Vec<ParseProblem> = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    loop {
        let e = match toml::from_str::<Config>(&scratch) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let doc = toml_edit::ImDocument::parse(scratch.as_str()).ok();
        if doc.is_none() && !problems.is_empty() {
            return Err(problems);
        }
        let located = match (&doc, e.span()) {
            (Some(doc), Some(span)) => locate(doc.as_table(), span.start),
            _ => None,
        };
        // Syntax errors come as several lines ("invalid table header\nexpected ..."): keep one.
        let reason = e.message().trim().replace('\n', "; ");
        // `[secrets.x]` with a bad `source` line blanked now lacks `source`: that is our doing.
        let consequence = match (&located, reason.strip_prefix("missing field `")) {
            (Some(l), Some(rest)) => {
                let field = rest.trim_end_matches('`');
                blanked.contains(&join_key(&l.key, field))
            }
            _ => false,
        };
        if !consequence {
            problems.push(ParseProblem {
                key: located.as_ref().map(|l| l.key.clone()),
                position: e.span().map(|s| line_column(text, s.start)),
                reason,
            });
        }
        let Some(Located {
            key,
            statement: Some(statement),
        }) = located
        else {
            return Err(problems);
        };
        if problems.len() >= MAX_PARSE_PROBLEMS || !blank(&mut scratch, statement) {
            return Err(problems);
        }
        blanked.push(key);
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Replaces `range` of `text` with spaces, keeping line breaks. False if nothing changed.
fn blank(text: &mut String, range: std::ops::Range<usize>) -> bool {
    let mut bytes = std::mem::take(text).into_bytes();
    let mut changed = false;
    for b in bytes.get_mut(range).into_iter().flatten() {
        if !matches!(*b, b'\n' | b'\r' | b' ') {
            *b = b' ';
            changed = true;
        }
    }
    // Spans start and end on character boundaries, so this only fails on a parser bug.
    match String::from_utf8(bytes) {
        Ok(s) => *text = s,
        Err(_) => changed = false,
    }
    changed
}

/// `prefix.key`, quoting keys that are not bare TOML keys (`routes.hosts."a.example.com"`).
fn join_key(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match (prefix.is_empty(), bare) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{key:?}"),
        (false, true) => format!("{prefix}.{key}"),
        (false, false) => format!("{prefix}.{key:?}"),
    }
}

/// Where a parser error falls: the innermost key, and the statement to blank to get past it.
#[derive(Debug)]
struct Located {
    key: String,
    /// `None` where blanking would change the meaning of what follows (an `[[array]]` element
    /// renumbers the ones after it; a dotted key leaves its prefix behind).
    statement: Option<std::ops::Range<usize>>,
}

fn contains(span: &Option<std::ops::Range<usize>>, pos: usize) -> bool {
    span.as_ref().is_some_and(|s| s.contains(&pos) || s.start == pos)
}

/// Walks every entry of `table`; deeper matches overwrite shallower ones.
fn locate(table: &toml_edit::Table, pos: usize) -> Option<Located> {
    let mut found = None;
    locate_in(table, "", None, true, pos, &mut found);
    found
}

fn locate_in(
    table: &dyn toml_edit::TableLike,
    prefix: &str,
    statement: Option<&std::ops::Range<usize>>,
    lines: bool,
    pos: usize,
    found: &mut Option<Located>,
) {
    use toml_edit::{Item, Value};
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        let path = join_key(prefix, name);
        let entry = match (key.span(), item.span()) {
            (Some(k), Some(v)) if v.end > k.start => Some(k.start..v.end),
            (k, _) => k,
        };
        let own = match item {
            // In a [table] (or at the top), `key = value` is a line of its own.
            Item::Value(_) if lines => entry.clone(),
            Item::Value(_) => statement.cloned(),
            // A [table]'s span runs from its header to its last value. Implicit parents
            // (`[secrets]` of `[secrets.x]`) and dotted tables have none.
            Item::Table(t) if !t.is_dotted() => t.span(),
            Item::Table(_) | Item::ArrayOfTables(_) | Item::None => None,
        };
        if contains(&entry, pos) || (matches!(item, Item::Table(_)) && contains(&own, pos)) {
            *found = Some(Located {
                key: path.clone(),
                statement: own.clone(),
            });
        }
        match item {
            Item::Table(t) => locate_in(t, &path, own.as_ref(), !t.is_dotted(), pos, found),
            Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if contains(&t.span(), pos) {
                        *found = Some(Located {
                            key: path.clone(),
                            statement: None,
                        });
                    }
                    locate_in(t, &path, None, true, pos, found);
                }
            }
            Item::Value(Value::InlineTable(t)) => locate_in(t, &path, own.as_ref(), false, pos, found),
            Item::Value(Value::Array(values)) => {
                for (i, v) in values.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if contains(&v.span(), pos) {
                        *found = Some(Located {
                            key: path.clone(),
                            statement: own.clone(),
                        });
                    }
                    if let Value::InlineTable(t) = v {
                        locate_in(t, &path, own.as_ref(), false, pos, found);
                    }
                }
            }
            Item::Value(_) | Item::None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/t/agent.toml"), text)
    }

    #[test]
    fn empty_file_is_valid_with_defaults() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c.proxy.listen.port(), 8080);
        assert_eq!(c.health.listen.port(), 2000);
        assert!(c.proxy.idle_timeout > Duration::from_secs(90));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[proxy]\nlisten = \"127.0.0.1:1\"\nlsiten = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/t/agent.toml:3:1: proxy.lsiten: unknown field `lsiten`"),
            "{err}"
        );
    }

    #[test]
    fn every_parser_error_is_reported_with_key_and_position() {
        let err = parse(
            "[agent]\nlog_format = \"xml\"\nbogus = 1\n\n[[route]]\nhostnames = [\"a.example.com\"]\n\
             backends = [{ url = \"http://b\", wieght = 2 }]\n\n[proxy]\nlisten = \"nope\"\n",
        )
        .unwrap_err();
        assert!(err.problems.is_empty(), "validation needs a parsed file");
        let got: Vec<_> = err
            .parse
            .iter()
            .map(|p| (p.key.as_deref().unwrap_or(""), p.position))
            .collect();
        assert_eq!(
            got,
            [
                ("agent.log_format", Some((2, 14))),
                ("agent.bogus", Some((3, 1))),
                ("route[0].backends[0].wieght", Some((7, 33))),
                ("proxy.listen", Some((10, 10))),
            ]
        );
    }

    #[test]
    fn a_blanked_bad_value_is_not_reported_again_as_missing() {
        let err =
            parse("[secrets.tok]\nsource = \"fle\"\npath = \"/x\"\n[secrets.other]\npath = \"/y\"\n").unwrap_err();
        let got: Vec<_> = err.parse.iter().map(|p| p.key.as_deref().unwrap_or("")).collect();
        assert_eq!(got, ["secrets.tok.source", "secrets.other"], "{err}");
        assert!(err.parse[1].reason.contains("missing field `source`"), "{err}");
    }

    #[test]
    fn syntax_error_has_position_and_one_line_reason() {
        let err = parse("[proxy\nlisten = 1\n").unwrap_err();
        assert_eq!(err.parse.len(), 1, "{err}");
        assert_eq!(err.parse[0].key, None);
        assert_eq!(err.parse[0].position, Some((1, 7)));
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("a\nbé = 1", 5), (2, 3));
        assert_eq!(line_column("", 0), (1, 1));
    }

    #[test]
    fn all_semantic_problems_reported_together() {
        let err = parse(
            r#"
            [secrets.tok]
            source = "file"
            var = "X"
            [proxy]
            auth_secret = "missing"
            max_header_bytes = 10
            [routes.hosts]
            "a.example.com" = "ftp://nope"
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "secrets.tok.path",
            "secrets.tok.var",
            "proxy.auth_secret",
            "proxy.max_header_bytes",
            "routes.hosts.\"a.example.com\"",
        ] {
            assert!(keys.contains(&want), "missing {want} in {keys:?}");
        }
    }

    #[test]
    fn settings_read_once_at_start_are_reported_as_needing_a_restart() {
        let old = parse("").unwrap();
        let new = parse("[agent]\nlog_level = \"debug\"\n[gcp]\nid_token_refresh_margin = \"1m\"\n").unwrap();
        assert_eq!(
            old.restart_only_differences(&new),
            ["agent.log_level", "gcp.id_token_refresh_margin"]
        );
        let live = parse("[proxy]\nupstream_timeout = \"5s\"\nmax_body_bytes = 10\n").unwrap();
        assert!(old.restart_only_differences(&live).is_empty());
    }

    #[test]
    fn a_reloaded_config_keeps_every_restart_only_setting_in_effect() {
        let running = parse("").unwrap();
        let mut new = parse(
            r#"
            [role_watch]
            attribute = "tunnel-active-host"
            [agent]
            runtime_dir = "/run/other"
            state_dir = "/var/lib/other"
            log_format = "json"
            log_level = "debug"
            [proxy]
            listen = "127.0.0.1:8081"
            max_header_bytes = 32768
            header_read_timeout = "1s"
            idle_timeout = "200s"
            connect_timeout = "1s"
            upstream_timeout = "5s"
            [routes]
            source = "gcp-metadata"
            attribute = "tunnel-routes"
            attribute_scope = "project"
            [gcp]
            metadata_url = "http://127.0.0.1:9"
            id_token_refresh_margin = "1m"
            secret_manager_endpoint = "http://127.0.0.1:10"
            [health]
            listen = "127.0.0.1:2001"
            [cloudflared]
            restart_backoff = "1s"
            crash_loop_exits = 9
            ready_grace = "30s"
            "#,
        )
        .unwrap();
        assert_eq!(
            running.restart_only_differences(&new).len(),
            16,
            "every restart-only group"
        );
        new.keep_restart_only(&running);
        assert!(running.restart_only_differences(&new).is_empty());
        // Live settings are the new file's.
        assert_eq!(new.proxy.upstream_timeout, Duration::from_secs(5));
        assert_eq!(new.cloudflared.ready_grace, Duration::from_secs(30));
        // The running source comes with its own keys; within one source they stay live.
        assert_eq!(new.routes.source, RouteSourceKind::Inline);
        assert!(new.routes.hosts.is_empty() && new.routes.file.is_none());
        let running = parse("[routes.hosts]\n\"a.example.com\" = \"http://a\"\n").unwrap();
        let mut new = parse("[routes]\nsource = \"file\"\nfile = \"/x.json\"\n").unwrap();
        new.keep_restart_only(&running);
        assert_eq!(new.routes.hosts, running.routes.hosts);
        assert!(new.routes.file.is_none());
        let mut edited = parse("[routes.hosts]\n\"b.example.com\" = \"http://b\"\n").unwrap();
        edited.keep_restart_only(&running);
        assert!(edited.routes.hosts.contains_key("b.example.com"));
    }

    #[test]
    fn durations_are_human() {
        let c = parse("[agent]\nshutdown_grace = \"1m 30s\"\n").unwrap();
        assert_eq!(c.agent.shutdown_grace, Duration::from_secs(90));
        let err = parse("[agent]\nshutdown_grace = \"soon\"\n").unwrap_err().to_string();
        assert!(err.contains("shutdown_grace"), "{err}");
    }

    #[test]
    fn metadata_host_env_is_used_only_without_explicit_url() {
        let explicit = GcpSection {
            metadata_url: Some("http://127.0.0.1:9/".into()),
            ..Default::default()
        };
        assert_eq!(explicit.metadata_base(), "http://127.0.0.1:9");
    }
}
