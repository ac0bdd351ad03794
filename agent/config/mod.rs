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
//! - this file: the whole file's schema ([`Config`]) and the role keys;
//! - one file per section with its defaults: `agent`, `secrets`, `proxy`, `routes` (with
//!   `[[route]]`, `[[listener]]`, `[config_api]`), `gcp`, `cloudflared`, `health`, [`roles`];
//! - `error`: [`Problem`], [`ParseProblem`], [`ConfigError`];
//! - [`route_spec`]: the route rule pieces shared by `[[route]]` and the config API's JSON;
//! - `parse`: reading the file and locating every parser error;
//! - `validate`: the checks types cannot express;
//! - `reload`: which settings a reload cannot change (they need a restart);
//! - [`duration`]: every duration field, bounded where it is read;
//! - [`env`]: the environment mode, the gateway controller's variables read into a [`Config`].

pub mod roles;

use std::collections::BTreeMap;

use serde::Deserialize;

mod agent;
mod cloudflared;
pub mod duration;
pub mod env;
mod error;
mod gcp;
mod health;
mod parse;
mod proxy;
mod reload;
pub mod route_spec;
mod routes;
mod secret_name;
mod secrets;
mod validate;

pub use agent::{AgentSection, LogFormat, LogStream, LOG_FORMAT_VAR, LOG_STREAM_VAR};
pub use cloudflared::{CloudflaredSection, RemoteIngress, Sandbox, TokenDelivery, TunnelProtocol, MAX_SANDBOX_ALLOW};
pub use error::{ConfigError, ParseProblem, Problem};
pub use gcp::GcpSection;
pub use health::{DetailsFrom, HealthSection};
pub use proxy::{AccessLogFormat, AccessLogSection, ProxySection, TrustStore};
pub use route_spec::{FilterSpec, MatchSpec, TimeoutsSpec};
pub(crate) use routes::protocol_or_empty;
pub use routes::{
    AttributeScope, AuthHeaderKind, BackendSpec, ConfigApiSection, HostHeader, ListenerSpec, RouteSourceKind,
    RouteSpec, RoutesSection, UpstreamAuthKind, UpstreamProtocol,
};
pub use secret_name::{SecretNameError, SecretVersionName};
pub use secrets::{SecretSource, SecretSpec};
use secrets::{SecretSourceKind, SecretSpecAsWritten};
pub use validate::RouteCheck;

pub const DEFAULT_PATH: &str = "/etc/tunnel-agent/agent.toml";

/// A node's role in an active/standby pair: only the active node runs cloudflared; a standby keeps secrets,
/// routes and the proxy warm. Part of the schema (`role = "standby"`); [`crate::role`] decides
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

/// Optional: a GCE metadata attribute naming the active host. When set it decides the role.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RoleWatchSection {
    pub attribute: Option<String>,
    pub attribute_scope: AttributeScope,
    /// This host's name as the attribute spells it. Unset: the kernel hostname.
    pub host_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

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
    fn a_bad_log_stream_names_file_line_key_and_the_streams() {
        let err = parse("[agent]\nlog_format = \"json\"\nlog_stream = \"journal\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/etc/t/agent.toml:3:14: agent.log_stream: unknown variant `journal`, expected `stderr` or `stdout`"
        );
        let c = parse("[agent]\nlog_stream = \"stdout\"\n").unwrap();
        assert_eq!(c.agent.log_stream(), LogStream::Stdout);
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
            log_stream = "stdout"
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
            17,
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
