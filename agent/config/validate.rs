//! The checks a file's types cannot express: cross-references between sections, URLs, ranges.

use std::time::Duration;

use super::{
    Config, Problem, RouteSourceKind, SecretSource, SecretSourceKind, SecretSpec, SecretSpecAsWritten,
    SecretVersionName,
};

/// Checks the route contents of a parsed config: the route table's own compile step, which lives
/// in `crate::routing` (this module is a leaf). `crate::routing::load_config` passes it.
pub type RouteCheck<'a> = &'a dyn Fn(&Config) -> Vec<Problem>;

impl Config {
    /// Checks everything the types cannot, section by section. Returns all problems found.
    /// `route_check` checks the route contents; its problems are listed where the route
    /// section's are.
    pub fn validate(&self, route_check: RouteCheck) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: String, reason: String| out.push(Problem { key, reason });
        self.validate_agent(&mut bad);
        self.validate_secrets(&mut bad);
        self.validate_proxy(&mut bad);
        self.validate_routes(route_check, &mut bad);
        self.validate_cloudflared(&mut bad);
        self.validate_metadata_attributes(&mut bad);
        // `[role_election]`, `[role_follow]` and their combination with `[role_watch]`.
        for p in super::roles::validate(self) {
            bad(p.key, p.reason);
        }
        self.validate_gcp(&mut bad);
        out
    }

    /// `[agent]`.
    fn validate_agent(&self, bad: &mut dyn FnMut(String, String)) {
        if self.agent.shutdown_grace.is_zero() {
            bad("agent.shutdown_grace".into(), "must be greater than 0".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.agent.log_level) {
            bad("agent.log_level".into(), format!("invalid filter: {e}"));
        }
    }

    /// `[secrets.*]`: each source's own key, and only it.
    fn validate_secrets(&self, bad: &mut dyn FnMut(String, String)) {
        for (name, spec) in &self.secrets_as_written {
            let key = |k: &str| format!("secrets.{name}.{k}");
            if let Err(problems) = spec.typed() {
                for (k, reason) in problems {
                    bad(key(k), reason);
                }
            }
            if spec.refresh.is_some_and(|r| r < Duration::from_secs(1)) {
                bad(key("refresh"), "must be at least 1s".into());
            }
        }
    }

    /// The secrets in their typed form; a secret with a problem is left out (validation reports
    /// it), so `check` can still read the well-formed ones of an invalid file.
    pub(super) fn typed_secrets(&self) -> std::collections::BTreeMap<String, SecretSpec> {
        self.secrets_as_written
            .iter()
            .filter_map(|(name, spec)| Some((name.clone(), spec.typed().ok()?)))
            .collect()
    }

    fn has_secret(&self, name: &str) -> bool {
        self.secrets_as_written.contains_key(name)
    }

    /// `[proxy]`, and the listeners' addresses.
    fn validate_proxy(&self, bad: &mut dyn FnMut(String, String)) {
        let p = &self.proxy;
        if let Some(secret) = &p.auth_secret {
            if !self.has_secret(secret) {
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
        if let (Some(_), Some(trust)) = (&p.ca_file, p.trust) {
            bad(
                "proxy.trust".into(),
                format!(
                    "trust = {:?} and ca_file both choose the trust anchors; give one of them",
                    trust.as_str()
                ),
            );
        }
        if p.workers > MAX_PROXY_WORKERS {
            bad(
                "proxy.workers".into(),
                format!("{} is more than {MAX_PROXY_WORKERS} (0 means one per CPU)", p.workers),
            );
        }
        if !(1..=MAX_PROXY_CONNECTIONS).contains(&p.max_connections) {
            bad(
                "proxy.max_connections".into(),
                format!("{} is not between 1 and {MAX_PROXY_CONNECTIONS}", p.max_connections),
            );
        }
        if p.max_header_bytes < 8192 {
            bad("proxy.max_header_bytes".into(), "must be at least 8192".into());
        }
        for (k, v) in [
            ("header_read_timeout", p.header_read_timeout),
            ("idle_timeout", p.idle_timeout),
            ("body_read_timeout", p.body_read_timeout),
            ("upgrade_idle_timeout", p.upgrade_idle_timeout),
            ("http2_keep_alive_interval", p.http2_keep_alive_interval),
            ("connect_timeout", p.connect_timeout),
            ("upstream_timeout", p.upstream_timeout),
            ("pool_idle_timeout", p.pool_idle_timeout),
        ] {
            if v.is_zero() {
                bad(format!("proxy.{k}"), "must be greater than 0".into());
            }
        }
        let sample = p.access_log.sample;
        if !(0.0..=1.0).contains(&sample) {
            bad(
                "proxy.access_log.sample".into(),
                format!("must be between 0 and 1 (a share of requests), not {sample}"),
            );
        }
        // Port 0 asks the kernel for a free port, so two `:0` listeners never collide (tests
        // and ad-hoc runs bind both that way).
        if p.listen == self.health.listen && p.listen.port() != 0 {
            bad(
                "health.listen".into(),
                format!("same address as proxy.listen ({})", p.listen),
            );
        }
    }

    /// `[routes]`, `[[route]]` and `[config_api]`; the route contents through `route_check`.
    fn validate_routes(&self, route_check: RouteCheck, bad: &mut dyn FnMut(String, String)) {
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
            if !self.listener.is_empty() {
                bad(
                    "listener".into(),
                    "not used with source = \"config-api\" (a push carries its own listeners)".into(),
                );
            }
            if !self.route.is_empty() {
                bad(
                    "route".into(),
                    "not used with source = \"config-api\" (the controller pushes every route)".into(),
                );
            }
            let open = self.config_api.as_ref().is_some_and(|a| a.allow_unauthenticated);
            match self.config_api.as_ref().and_then(|a| a.auth_secret.as_ref()) {
                None if open => {}
                None => bad(
                    "config_api.auth_secret".into(),
                    "required for routes.source = \"config-api\" (or, to let anyone who reaches config_api.listen push routes, allow_unauthenticated = true)".into(),
                ),
                Some(_) if open => bad(
                    "config_api.allow_unauthenticated".into(),
                    "not used with auth_secret; remove one of them".into(),
                ),
                Some(secret) if !self.has_secret(secret) => bad(
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
        for p in route_check(self) {
            bad(p.key, p.reason);
        }
    }

    /// `[cloudflared]`.
    fn validate_cloudflared(&self, bad: &mut dyn FnMut(String, String)) {
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
                (Some(name), None) if !self.has_secret(name) => bad(
                    "cloudflared.token_secret".into(),
                    format!("no secret named {name:?} in [secrets]"),
                ),
                (None, Some(_)) if cf.tunnel.is_none() => bad(
                    "cloudflared.tunnel".into(),
                    "required with credentials_file (the tunnel's name or UUID)".into(),
                ),
                _ => {}
            }
            if cf.crash_loop_exits == 0 {
                bad("cloudflared.crash_loop_exits".into(), "must be at least 1".into());
            }
            if cf.poll_interval.is_zero() {
                bad("cloudflared.poll_interval".into(), "must be greater than 0".into());
            }
        }
        // Checked with `enabled = false` too: a reload or a promotion may enable it later, and
        // a token in argv is a leak whether or not it is used yet.
        if cf.metrics == self.health.listen || cf.metrics == self.proxy.listen {
            bad(
                "cloudflared.metrics".into(),
                format!("{} is already used by the agent", cf.metrics),
            );
        }
        if cf.sandbox_allow.len() > super::MAX_SANDBOX_ALLOW {
            bad(
                "cloudflared.sandbox_allow".into(),
                format!("{} paths; at most {}", cf.sandbox_allow.len(), super::MAX_SANDBOX_ALLOW),
            );
        }
        for p in &cf.sandbox_allow {
            let dotted = p.components().any(|c| matches!(c, std::path::Component::ParentDir));
            if !p.is_absolute() || dotted {
                bad(
                    "cloudflared.sandbox_allow".into(),
                    format!("{}: must be an absolute path without \"..\"", p.display()),
                );
            }
        }
        if let (Some(p), true) = (cf.protocol_in_extra_args(), cf.protocol != super::TunnelProtocol::Auto) {
            bad(
                "cloudflared.protocol".into(),
                format!("{:?} here and {p:?} in extra_args; keep one", cf.protocol.as_str()),
            );
        }
        for a in &cf.extra_args {
            if let Some(flag) = managed_cloudflared_arg(a) {
                bad(
                    "cloudflared.extra_args".into(),
                    format!("{flag:?} is managed by the agent; remove it (and never put a token in argv)"),
                );
            }
        }
    }

    /// The metadata attributes watched for the role and the routes.
    fn validate_metadata_attributes(&self, bad: &mut dyn FnMut(String, String)) {
        if let Some(a) = &self.role_watch.attribute {
            if !is_attribute_name(a) {
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
                Some(a) if !is_attribute_name(a) => bad(
                    "routes.attribute".into(),
                    format!("{a:?} is not a metadata attribute name"),
                ),
                _ => {}
            }
        }
    }

    /// `[gcp]`.
    fn validate_gcp(&self, bad: &mut dyn FnMut(String, String)) {
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
                Ok(_) => bad("gcp.metadata_url".into(), "must be an http:// or https:// URL".into()),
                Err(e) => bad("gcp.metadata_url".into(), format!("invalid URL: {e}")),
            }
        }
    }
}

/// A GCE metadata attribute name: letters, digits, `-` and `_`.
fn is_attribute_name(a: &str) -> bool {
    !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SecretSpecAsWritten {
    /// The source with what it needs, or each problem as the key (within the secret's table)
    /// and the reason: the source's own key missing, another source's key given, a bad name.
    fn typed(&self) -> Result<SecretSpec, Vec<(&'static str, String)>> {
        let want = match self.source {
            SecretSourceKind::File => "path",
            SecretSourceKind::Env => "var",
            SecretSourceKind::GcpSecretManager => "name",
        };
        let given = [
            ("path", self.path.is_some()),
            ("var", self.var.as_deref().is_some_and(|v| !v.is_empty())),
            ("name", self.name.is_some()),
        ];
        let mut problems = Vec::new();
        for (k, present) in given {
            if k == want && !present {
                problems.push((k, format!("required for source = \"{}\"", self.source)));
            } else if k != want && present {
                problems.push((k, format!("not used by source = \"{}\"", self.source)));
            }
        }
        let source = match self.source {
            SecretSourceKind::File => self.path.clone().map(SecretSource::File),
            SecretSourceKind::Env => self.var.clone().filter(|v| !v.is_empty()).map(SecretSource::Env),
            SecretSourceKind::GcpSecretManager => match self.name.as_deref().map(SecretVersionName::parse) {
                Some(Ok(version)) => Some(SecretSource::GcpSecretManager(version)),
                Some(Err(e)) => {
                    problems.push(("name", e.to_string()));
                    None
                }
                None => None,
            },
        };
        match source {
            Some(source) if problems.is_empty() => Ok(SecretSpec {
                source,
                refresh: self.refresh,
            }),
            _ => Err(problems),
        }
    }
}

/// More proxy workers than this is a typo, not a machine: each is a thread with its own pools.
const MAX_PROXY_WORKERS: usize = 256;
/// Far above what the unit's `LimitNOFILE` (65536) lets the agent open.
const MAX_PROXY_CONNECTIONS: usize = 1 << 20;

/// cloudflared flags `extra_args` may not carry: the agent sets `--metrics` and `run` itself,
/// and the others carry a secret (the connector token, a tunnel's credentials JSON), which in
/// argv any local user could read from `ps`.
const MANAGED_CLOUDFLARED_FLAGS: &[&str] = &["token", "token-file", "credentials-contents", "metrics"];

/// The flag as written up to any `=` (never its value: `--token=VALUE` must not reach an error
/// line), when `arg` is `run` or one of [`MANAGED_CLOUDFLARED_FLAGS`] as Go's flag package
/// reads it: one or two leading dashes, the value after `=` or in the next argument. More dashes
/// are refused too: cloudflared rejects them, but the value would be in argv all the same.
fn managed_cloudflared_arg(arg: &str) -> Option<&str> {
    if arg == "run" {
        return Some(arg);
    }
    let written = arg.split_once('=').map_or(arg, |(flag, _)| flag);
    let name = written.trim_start_matches('-');
    if name.len() == written.len() {
        return None;
    }
    MANAGED_CLOUDFLARED_FLAGS
        .iter()
        .any(|m| name.eq_ignore_ascii_case(m))
        .then_some(written)
}

#[cfg(test)]
mod tests {
    use super::managed_cloudflared_arg;
    use crate::config::Config;

    fn problems(text: &str) -> Vec<(String, String)> {
        match Config::parse(std::path::Path::new("t.toml"), text, &|_| Vec::new()) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.into_iter().map(|p| (p.key, p.reason)).collect(),
        }
    }

    #[test]
    fn a_config_api_without_a_token_must_say_so_and_not_both() {
        let api = "[routes]\nsource = \"config-api\"\n[config_api]\n";
        let none = problems(api);
        assert_eq!(none.len(), 1, "{none:?}");
        assert_eq!(none[0].0, "config_api.auth_secret");
        assert!(none[0].1.contains("allow_unauthenticated = true"), "{none:?}");
        assert!(problems(&format!("{api}allow_unauthenticated = true\n")).is_empty());
        let both = problems(&format!(
            "[secrets.t]\nsource = \"env\"\nvar = \"T\"\n{api}auth_secret = \"t\"\nallow_unauthenticated = true\n"
        ));
        let keys: Vec<&str> = both.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["config_api.allow_unauthenticated"], "{both:?}");
    }

    #[test]
    fn the_protocol_is_set_in_one_place() {
        let p = problems("[cloudflared]\nprotocol = \"quic\"\nextra_args = [\"--protocol=http2\"]\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "cloudflared.protocol");
        assert!(problems("[cloudflared]\nextra_args = [\"-protocol\", \"http2\"]\n").is_empty());
        assert!(problems("[cloudflared]\nprotocol = \"http2\"\n").is_empty());
    }

    #[test]
    fn every_spelling_of_a_managed_cloudflared_flag_is_refused_without_its_value() {
        for (arg, flag) in [
            ("--token", "--token"),
            ("-token", "-token"),
            ("--token=eyJ-SECRET", "--token"),
            ("-token=eyJ-SECRET", "-token"),
            ("--token-file=/x", "--token-file"),
            ("-token-file", "-token-file"),
            ("--credentials-contents", "--credentials-contents"),
            ("-credentials-contents={\"s\":\"SECRET\"}", "-credentials-contents"),
            ("--metrics=0.0.0.0:1", "--metrics"),
            ("-metrics", "-metrics"),
            ("---token=x", "---token"),
            ("run", "run"),
        ] {
            assert_eq!(managed_cloudflared_arg(arg), Some(flag), "{arg}");
        }
        for arg in [
            "--protocol",
            "http2",
            "--tokens-are-fine-in-other-names",
            "token",
            "-",
            "--loglevel=debug",
        ] {
            assert_eq!(managed_cloudflared_arg(arg), None, "{arg}");
        }
    }
}
