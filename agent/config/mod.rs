//! The agent's configuration: one TOML file, unknown keys rejected, every error naming the file,
//! the key and the reason.
//!
//! Parsing happens in two passes. `toml` + serde reject syntax errors, unknown keys and wrongly
//! typed values (those errors carry line and column). [`Config::validate`] then checks what types
//! cannot express (cross-references between sections, URLs, ranges) and collects *every* problem,
//! so an operator fixes a file in one round trip instead of one error per `check` run.
//!
//! This module is a leaf: it imports nothing of the crate, everything else reads it. Route
//! contents are checked by the code that builds the live table, which the caller passes in (see
//! [`RouteCheck`]; `crate::routing::load_config` is the usual entry point).
//!
//! - this file: the schema (every section and its defaults) and the error types;
//! - [`route_spec`]: the route rule pieces shared by `[[route]]` and the config API's JSON;
//! - `parse`: reading the file and locating every parser error;
//! - `validate`: the checks types cannot express;
//! - `reload`: which settings a reload cannot change (they need a restart);
//! - [`duration`]: every duration field, bounded where it is read.

pub mod roles;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub mod duration;
mod parse;
mod reload;
pub mod route_spec;
mod secret_name;
mod validate;

pub use route_spec::{FilterSpec, MatchSpec, TimeoutsSpec};
pub use secret_name::SecretVersionName;
pub use validate::RouteCheck;

pub const DEFAULT_PATH: &str = "/etc/tunnel-agent/agent.toml";

/// A node's role (seed 002): only the active node runs cloudflared; a standby keeps secrets,
/// routes and the proxy warm. Part of the schema (`role = "standby"`); [`crate::roles`] decides
/// which one is in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Active,
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

/// The whole file. Every section has working defaults, so an empty file is a valid (if useless)
/// configuration: no routes, no auth, proxy on loopback, health on `:2000`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `active` runs cloudflared; `standby` keeps everything else warm for promotion. A top-level
    /// key, so it must come before the first `[section]`.
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub role_watch: RoleWatchSection,
    /// A leader election on etcd decides the role (see [`roles::RoleElectionSection`]).
    #[serde(default)]
    pub role_election: Option<roles::RoleElectionSection>,
    /// A local health check to follow (e.g. the database primary's).
    #[serde(default)]
    pub role_follow: Option<roles::RoleFollowSection>,
    #[serde(default)]
    pub agent: AgentSection,
    /// Named secrets as written; validation checks them and [`Config::parse`] turns them into
    /// [`Config::secrets`].
    #[serde(default, rename = "secrets")]
    secrets_as_written: BTreeMap<String, SecretSpecAsWritten>,
    /// Named secrets; other sections refer to them by name so that a value never has to appear
    /// in this file. Filled by [`Config::parse`] once the file is valid.
    #[serde(skip)]
    pub secrets: BTreeMap<String, SecretSpec>,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub routes: RoutesSection,
    /// Full-form routes (`[[route]]`), Gateway API HTTPRoute style. The `[routes]` host map is
    /// shorthand for one such route per hostname.
    #[serde(default, rename = "route")]
    pub route: Vec<RouteSpec>,
    /// Listener scopes (`[[listener]]`): optional; with them, a request is served only by the
    /// rules of the most specific listener matching its host (docs/routing.md).
    #[serde(default)]
    pub listener: Vec<ListenerSpec>,
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
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `tunnel_agent=debug,hyper=info`.
    pub log_level: String,
    /// How long boot may keep retrying transient failures (Secret Manager 429/5xx, metadata
    /// server unreachable) before giving up with an error.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
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
enum SecretSourceKind {
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

/// One `[secrets.NAME]` table as written. Flat rather than an enum so that a wrong combination
/// gets a message naming the missing or extra key rather than serde's "data did not match any
/// variant"; validation turns it into a [`SecretSpec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSpecAsWritten {
    source: SecretSourceKind,
    /// `file`: path to read. A relative path is looked up in `$CREDENTIALS_DIRECTORY` first
    /// (systemd `LoadCredential=`).
    path: Option<PathBuf>,
    /// `env`: variable name.
    var: Option<String>,
    /// `gcp-secret-manager`: `projects/P/secrets/S/versions/V` or
    /// `projects/P/locations/L/secrets/S/versions/V`.
    name: Option<String>,
    /// Re-read interval; a changed value is applied without restart.
    #[serde(default, deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    refresh: Option<Duration>,
}

/// Where one secret comes from: each source with what it needs, and only that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file; a relative path is looked up in `$CREDENTIALS_DIRECTORY` first (systemd
    /// `LoadCredential=`).
    File(PathBuf),
    /// An environment variable (not empty).
    Env(String),
    /// A Secret Manager version.
    GcpSecretManager(SecretVersionName),
}

/// One named secret, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub source: SecretSource,
    /// Re-read interval (at least 1 s); a changed value is applied without restart.
    pub refresh: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub listen: SocketAddr,
    /// PEM CA bundle that anchors every `https://` upstream instead of the built-in webpki
    /// (Mozilla) roots; a backend's own `tls` CA takes precedence for that backend.
    pub ca_file: Option<PathBuf>,
    /// Where the trust anchors come from when `ca_file` is not given. Unset: webpki's roots,
    /// compiled in, so an upstream is trusted the same on every host whatever its packages.
    pub trust: Option<TrustStore>,
    /// Lets backends and mirrors be link-local (169.254.0.0/16, fe80::/10) or a metadata
    /// server (`metadata.google.internal`), which serves the VM's credentials. Local config
    /// only: a push cannot set it. See `routing::destination`.
    pub allow_link_local_upstreams: bool,
    /// Lets identity tokens go to `http://` (and h2c) upstreams, in clear text.
    pub allow_id_tokens_over_http: bool,
    /// Header cloudflared's ingress adds with the shared internal token.
    pub auth_header: String,
    /// Name of the secret holding the internal token. Unset: no auth on this listener (seed 002,
    /// where cloudflared and the app share a host).
    pub auth_secret: Option<String>,
    /// After the internal token rotates (secret `refresh`), the previous value is still accepted
    /// this long, so requests signed with it during the rollout do not get 401s.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub auth_overlap: Duration,
    /// Largest request head accepted; larger gets 431. hyper's floor is 8 KiB.
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413. Unset: no limit (bodies stream, so a
    /// large upload costs no memory).
    pub max_body_bytes: Option<u64>,
    /// A client that starts a request must finish sending its head within this (slowloris).
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive client connection is closed after this. Must exceed cloudflared's
    /// 90 s origin keep-alive, or cloudflared reuses a connection we are closing.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub idle_timeout: Duration,
    /// A request body that brings no bytes for this long (the client is silent, not the
    /// upstream slow to read) gets 408 before the response has started; after, the upload is
    /// reset. nginx's `client_body_timeout`.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub body_read_timeout: Duration,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed on
    /// both sides: the bound on a long-lived stream, so its application must ping.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub upgrade_idle_timeout: Duration,
    /// HTTP/2 client connections get a PING this often; one not answered within 20 s closes
    /// the connection (a peer gone without a FIN).
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub http2_keep_alive_interval: Duration,
    /// Concurrent client connections on `listen`, over all workers; beyond it a new one is
    /// accepted and closed at once.
    pub max_connections: usize,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub connect_timeout: Duration,
    /// How long the upstream may take to send its response head, counted from the end of the
    /// request body (a slow upload is not a slow upstream); then 504. An upstream that stops
    /// reading an upload also gets 504 after this long.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub upstream_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream, in each worker's pool.
    pub pool_max_idle_per_host: usize,
    /// One line per request, for "which requests got that 502?".
    pub access_log: AccessLogSection,
    /// Worker threads serving the proxy, each with its own listening socket and upstream pools.
    /// `0`: one per CPU the agent may run on.
    pub workers: usize,
}

/// `[proxy.access_log]`: an optional line per proxied request (target `access`), written
/// wherever the agent's own log goes. Applied on reload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogSection {
    pub enabled: bool,
    pub format: AccessLogFormat,
    /// Share of requests logged, 0 to 1. Responses >= 500 and proxy errors are always logged:
    /// they are what an operator looks for.
    pub sample: f64,
    /// Include the query string. Off by default: queries carry tokens and personal data.
    pub query: bool,
}

impl Default for AccessLogSection {
    fn default() -> Self {
        AccessLogSection {
            enabled: false,
            format: AccessLogFormat::Json,
            sample: 1.0,
            query: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// `key=value` pairs after `METHOD PATH STATUS`.
    Text,
}

impl ProxySection {
    /// The number of proxy worker threads to start: `workers`, or one per CPU the process may
    /// run on (its affinity mask and cgroup quota, as `std::thread::available_parallelism` reads
    /// them).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ca_file: None,
            trust: None,
            allow_link_local_upstreams: false,
            allow_id_tokens_over_http: false,
            auth_header: "X-Internal-Auth-Token".to_owned(),
            auth_secret: None,
            auth_overlap: Duration::from_secs(600),
            max_header_bytes: 16 * 1024,
            max_body_bytes: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(60),
            upgrade_idle_timeout: Duration::from_secs(300),
            http2_keep_alive_interval: Duration::from_secs(60),
            max_connections: 16_384,
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
            access_log: AccessLogSection::default(),
            workers: 0,
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

/// `proxy.trust`: the trust anchors for `https://` upstreams without a CA of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustStore {
    /// Mozilla's roots as packaged by webpki-roots, compiled into the binary.
    Webpki,
    /// The operating system's store (Debian: `/etc/ssl/certs`, from `ca-certificates`), read
    /// at boot and at each reload; `SSL_CERT_FILE` / `SSL_CERT_DIR` override where it is read.
    /// What a BackendTLSPolicy's `wellKnownCACertificates: System` asks for.
    System,
}

impl TrustStore {
    /// The spelling in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            TrustStore::Webpki => "webpki",
            TrustStore::System => "system",
        }
    }
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
    /// Weighted backends. An explicit empty list is a rule whose requests get 500 (Gateway
    /// API's answer for a rule without backendRefs); leaving both this and `upstream` out is
    /// an error, since that is almost always a mistake.
    #[serde(default)]
    pub backends: Option<Vec<BackendSpec>>,
    pub upstream_auth: Option<UpstreamAuthKind>,
    pub auth_header: Option<AuthHeaderKind>,
    pub protocol: Option<UpstreamProtocol>,
    /// The `Host` this route's backends see: `client` (default, Gateway API) or `upstream`.
    pub host_header: Option<HostHeader>,
    /// Names of the `[[listener]]`s this route is attached to; none: all of them.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Overrides `proxy.upstream_timeout` for this route.
    #[serde(default, deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub timeout: Option<Duration>,
    /// Gateway API `HTTPRouteMatch`es, ORed; none means `PathPrefix /` (docs/routing.md).
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    /// Gateway API `HTTPRouteFilter`s for every request of this route.
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Gateway API `HTTPRouteTimeouts` (`request`, `backend_request`).
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, alias = "upstreamAuth")]
    pub upstream_auth: Option<UpstreamAuthKind>,
    #[serde(default, alias = "authHeader")]
    pub auth_header: Option<AuthHeaderKind>,
    #[serde(default, deserialize_with = "protocol_or_empty")]
    pub protocol: Option<UpstreamProtocol>,
    /// Filters applied only when this backend is chosen.
    #[serde(default, deserialize_with = "route_spec::null_as_empty")]
    pub filters: Vec<FilterSpec>,
    /// TLS towards this backend (CA, SNI, SANs, client certificate); docs/routing.md.
    #[serde(default)]
    pub tls: Option<route_spec::BackendTlsSpec>,
    /// Upgrade (WebSocket) handshakes to this backend are exempt from the rule's timeouts.
    #[serde(default)]
    pub websocket: bool,
    /// Answer this status instead of forwarding, whenever this backend is picked (the
    /// controller marks an unresolvable backendRef so its share of traffic fails closed).
    #[serde(default, alias = "unavailableStatus")]
    pub unavailable_status: Option<u16>,
    /// `client` or `upstream`; unset: the route's, else `client`.
    #[serde(default, alias = "hostHeader")]
    pub host_header: Option<HostHeader>,
}

fn default_weight() -> u32 {
    1
}

impl BackendSpec {
    /// One backend with weight 1 and every other setting left to the defaults.
    pub fn new(url: &str) -> BackendSpec {
        BackendSpec {
            url: url.to_owned(),
            weight: 1,
            upstream_auth: None,
            auth_header: None,
            protocol: None,
            filters: Vec::new(),
            tls: None,
            websocket: false,
            unavailable_status: None,
            host_header: None,
        }
    }
}

/// A Gateway listener, as a scope of rules: its name and hostname (exact, `*.suffix`, or none
/// for a listener that accepts any host).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Which `Host` the upstream sees (docs/routing.md, "The Host rule").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostHeader {
    /// The client's `Host` (Gateway API): the default for `[[route]]` and pushed tables.
    Client,
    /// The upstream URL's own host: the default for host-map entries (Cloud Run routes on it).
    Upstream,
}

impl HostHeader {
    pub fn as_str(self) -> &'static str {
        match self {
            HostHeader::Client => "client",
            HostHeader::Upstream => "upstream",
        }
    }
}

/// A backend `protocol`: the controller's `""` (plain HTTP, its `BackendProtocolHTTP`) is `auto`.
pub(crate) fn protocol_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<UpstreamProtocol>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Known(UpstreamProtocol),
        Empty(String),
    }
    match Option::<Given>::deserialize(d)? {
        None => Ok(None),
        Some(Given::Known(p)) => Ok(Some(p)),
        Some(Given::Empty(s)) if s.is_empty() => Ok(Some(UpstreamProtocol::Auto)),
        Some(Given::Empty(s)) => Err(serde::de::Error::custom(format!(
            "unknown protocol {s:?}, expected \"auto\", \"h2c\" or \"\""
        ))),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcpSection {
    /// Metadata server base URL. Unset: `$GCE_METADATA_HOST` if set (as Google's client
    /// libraries do), else `http://metadata.google.internal`.
    pub metadata_url: Option<String>,
    /// Identity tokens are refreshed this long before their `exp`.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub id_token_refresh_margin: Duration,
    /// Per-request timeout towards the metadata server.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
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

/// Whether cloudflared runs confined by Landlock (`tunnel::sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Sandbox {
    /// Landlock when the kernel has it; otherwise unconfined, said once in the log.
    #[default]
    Auto,
    /// Landlock or cloudflared does not start.
    Landlock,
    /// Unconfined.
    Off,
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
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub grace_period: Duration,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub stop_margin: Duration,
    /// Extra arguments placed before `run` (e.g. `["--protocol", "http2"]`).
    pub extra_args: Vec<String>,
    /// Restart backoff after an unrequested exit.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub restart_backoff: Duration,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub restart_backoff_max: Duration,
    /// Running and connected this long resets the backoff and the exit count.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub stable_after: Duration,
    /// `crash_loop_exits` exits within `crash_loop_window` is a crash loop: `/ready` fails.
    pub crash_loop_exits: u32,
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub crash_loop_window: Duration,
    /// After this many exits without a stable period the agent itself exits non-zero, handing
    /// the problem to systemd's restart policy. 0 = never.
    pub give_up_after_exits: u32,
    /// How often cloudflared's `/ready` is polled.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub poll_interval: Duration,
    /// A tunnel that was connected and has had 0 connections this long is restarted.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub disconnected_restart_after: Duration,
    /// `/ready` keeps answering 200 this long after the tunnel loses its last connection, so a
    /// brief reconnect does not flap the verdict.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub ready_grace: Duration,
    /// Landlock confinement: no access to the credentials directory, the secret files, the
    /// state and runtime directories.
    pub sandbox: Sandbox,
    /// Absolute paths cloudflared may read, write and execute beneath besides the system's
    /// (e.g. for `--logfile`); at most [`MAX_SANDBOX_ALLOW`]. A protected path beneath one
    /// stays out of reach.
    pub sandbox_allow: Vec<PathBuf>,
}

/// Most entries of `cloudflared.sandbox_allow`.
pub const MAX_SANDBOX_ALLOW: usize = 32;

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
            // With a cloudflared that fails within seconds of starting, 10 exits take 45-90 s (the
            // backoff's jitter), so 5 agent runs fit in the unit's StartLimitIntervalSec=10min and
            // the unit ends `failed` (tunnel/restart_story.rs checks the sum).
            give_up_after_exits: 10,
            poll_interval: Duration::from_secs(1),
            disconnected_restart_after: Duration::from_secs(120),
            ready_grace: Duration::from_secs(10),
            sandbox: Sandbox::Auto,
            sandbox_allow: Vec::new(),
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
    /// Who may read `/status` and `/metrics` (the probe paths are open to every client): they
    /// name upstreams, secrets, the election's key, what the node follows.
    pub details_from: DetailsFrom,
}

/// Which clients the health listener shows its details (`/status`, `/metrics`) to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DetailsFrom {
    /// Clients on this host (a loopback source address) only.
    #[default]
    Loopback,
    /// Every client that reaches `health.listen`.
    Anywhere,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 2000)),
            details_from: DetailsFrom::Loopback,
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
    /// Errors from the TOML parser (syntax, unknown keys, wrong types).
    pub parse: Vec<ParseProblem>,
    /// Validation problems: of the whole file, or, beside parser errors, of what parsed once
    /// the bad lines were set aside (without keys next to a set-aside line, which may be ours).
    pub problems: Vec<Problem>,
    /// What parsed, when anything did: `check` still reads its secrets and routes file so one
    /// run lists every problem.
    pub config: Option<Box<Config>>,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::parse::line_column;
    use super::*;

    /// Parses without the route-content check (that one lives in `crate::routing`, with its
    /// tests); the schema's own checks all run.
    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/t/agent.toml"), text, &|_| Vec::new())
    }

    #[test]
    fn empty_file_is_valid_with_defaults() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c.proxy.listen.port(), 8080);
        assert_eq!(c.health.listen.port(), 2000);
        assert!(c.proxy.idle_timeout > Duration::from_secs(90));
    }

    #[test]
    fn cloudflared_sandbox_is_auto_by_default_and_its_paths_are_bounded() {
        let c = parse("").unwrap();
        assert_eq!(c.cloudflared.sandbox, Sandbox::Auto);
        let c = parse("[cloudflared]\nsandbox = \"landlock\"\nsandbox_allow = [\"/var/log/cf\"]\n").unwrap();
        assert_eq!(c.cloudflared.sandbox, Sandbox::Landlock);
        assert!(parse("[cloudflared]\nsandbox = \"seccomp\"\n").is_err());
        let err = parse("[cloudflared]\nsandbox_allow = [\"var/log\", \"/x/../etc\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cloudflared.sandbox_allow: var/log: must be an absolute path"),
            "{err}"
        );
        assert!(err.contains("cloudflared.sandbox_allow: /x/../etc: must be"), "{err}");
        let many: Vec<String> = (0..=MAX_SANDBOX_ALLOW).map(|i| format!("\"/p{i}\"")).collect();
        let err = parse(&format!("[cloudflared]\nsandbox_allow = [{}]\n", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cloudflared.sandbox_allow: 33 paths; at most 32"), "{err}");
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
    fn each_secret_source_carries_what_it_needs() {
        let c = parse(
            "[secrets.f]\nsource = \"file\"\npath = \"tok\"\nrefresh = \"5s\"\n\
             [secrets.e]\nsource = \"env\"\nvar = \"TOK\"\n\
             [secrets.g]\nsource = \"gcp-secret-manager\"\nname = \"projects/p/secrets/s/versions/3\"\n",
        )
        .expect("valid");
        assert_eq!(c.secrets["f"].source, SecretSource::File("tok".into()));
        assert_eq!(c.secrets["f"].refresh, Some(Duration::from_secs(5)));
        assert_eq!(c.secrets["e"].source, SecretSource::Env("TOK".into()));
        let version = SecretVersionName::parse("projects/p/secrets/s/versions/3").expect("a version name");
        assert_eq!(c.secrets["g"].source, SecretSource::GcpSecretManager(version));
    }

    #[test]
    fn a_secret_without_its_sources_key_names_the_key() {
        let err = parse(
            "[secrets.e]\nsource = \"env\"\nvar = \"\"\n[secrets.g]\nsource = \"gcp-secret-manager\"\npath = \"/x\"\n",
        )
        .unwrap_err();
        let got: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("secrets.e.var", "required for source = \"env\""),
                ("secrets.g.path", "not used by source = \"gcp-secret-manager\""),
                ("secrets.g.name", "required for source = \"gcp-secret-manager\""),
            ],
            "{err}"
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
    fn a_syntax_error_without_words_still_gets_a_reason() {
        let e = parse("\r").unwrap_err();
        assert_eq!(e.parse.len(), 1, "{e}");
        assert_eq!(e.to_string(), "/etc/t/agent.toml:1:1: invalid TOML syntax here");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("a\nbé = 1", 5), (2, 3));
        assert_eq!(line_column("", 0), (1, 1));
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
