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
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            runtime_dir: PathBuf::from("/run/tunnel-agent"),
            state_dir: PathBuf::from("/var/lib/tunnel-agent"),
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Auto,
            log_level: "info".to_owned(),
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
    /// Time from sending the request to receiving the upstream's response head; then 504.
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
    /// Pushed by a controller to the config API (`PUT /config`, the L7 peer's wire format).
    ConfigApi,
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
    pub matches: Vec<crate::l7::MatchSpec>,
    /// Gateway API `HTTPRouteFilter`s for every request of this route.
    #[serde(default)]
    pub filters: Vec<crate::l7::FilterSpec>,
    /// Gateway API `HTTPRouteTimeouts` (`request`, `backend_request`).
    #[serde(default)]
    pub timeouts: Option<crate::l7::TimeoutsSpec>,
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
    pub filters: Vec<crate::l7::FilterSpec>,
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
}

impl Default for GcpSection {
    fn default() -> Self {
        GcpSection {
            metadata_url: None,
            id_token_refresh_margin: Duration::from_secs(300),
            metadata_timeout: Duration::from_secs(5),
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

/// Everything wrong with one file, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
    /// A syntax or type error from the TOML parser (already carries line/column and key).
    pub parse: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if let Some(parse) = &self.parse {
            // toml's message is multi-line with a source excerpt; keep it whole.
            write!(f, "{file}: {}", parse.trim_end())?;
        }
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 || self.parse.is_some() {
                writeln!(f)?;
            }
            write!(f, "{file}: {}: {}", p.key, p.reason)?;
        }
        Ok(())
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
            parse: None,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: Vec::new(),
            parse: Some(e.to_string()),
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: path.to_owned(),
                problems,
                parse: None,
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
        // Port 0 asks the kernel for a free port, so two `:0` listeners never collide.
        if p.listen == self.health.listen && p.listen.port() != 0 {
            bad(
                "health.listen".into(),
                format!("same address as proxy.listen ({})", p.listen),
            );
        }

        match self.routes.source {
            RouteSourceKind::Inline => {
                if self.routes.file.is_some() {
                    bad("routes.file".into(), "only used with source = \"file\"".into());
                }
            }
            RouteSourceKind::File => {
                if self.routes.file.is_none() {
                    bad("routes.file".into(), "required for source = \"file\"".into());
                }
                if !self.routes.hosts.is_empty() {
                    bad("routes.hosts".into(), "only used with source = \"inline\"".into());
                }
            }
            RouteSourceKind::ConfigApi => {
                for (key, given) in [
                    ("routes.file", self.routes.file.is_some()),
                    ("routes.hosts", !self.routes.hosts.is_empty()),
                    ("route", !self.route.is_empty()),
                ] {
                    if given {
                        bad(
                            key.into(),
                            "not used with source = \"config-api\" (the controller pushes every route)".into(),
                        );
                    }
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
        // the live table, so `check` and a running agent can never disagree.
        if self.routes.source == RouteSourceKind::Inline {
            if let Err(e) = crate::routes::RouteTable::build(self, &self.routes.hosts) {
                for p in e.problems {
                    out.push(p);
                }
            }
        } else {
            let empty = BTreeMap::new();
            if let Err(e) = crate::routes::RouteTable::build(self, &empty) {
                for p in e.problems {
                    out.push(p);
                }
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
        if self.gcp.metadata_url != new.gcp.metadata_url || self.gcp.metadata_timeout != new.gcp.metadata_timeout {
            out.push("gcp.metadata_url/metadata_timeout");
        }
        out
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
        assert!(err.contains("/etc/t/agent.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("lsiten"), "{err}");
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
