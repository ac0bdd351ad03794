//! One rule as configured, before it is compiled: what a host-map entry, a `[[route]]` and a
//! pushed rule all reduce to, and the hostname rule they share. A leaf of `routing` (it reads
//! only the config and routing's errors): the table's compiler and the checks that run before it
//! (limits, destinations, the index) read it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::route_spec::FilterKind;
use crate::config::{
    BackendSpec, Config, FilterSpec, HostHeader, MatchSpec, Problem, RouteSourceKind, RouteSpec, TimeoutsSpec,
};
use crate::routing::error::RuleError;

/// One rule as configured, before compiling: what a host-map entry, a `[[route]]` and a pushed
/// rule all reduce to.
#[derive(Debug)]
pub(crate) struct RuleSource {
    pub name: String,
    /// Where the rule came from, for error messages (`route[2]`, `rules[0]`).
    pub key: String,
    pub hostnames: Vec<String>,
    pub backends: Vec<BackendSpec>,
    /// Single upstream given as a string (host map entry or `upstream =`).
    pub shorthand: bool,
    /// Key to blame for a bad shorthand upstream, when not the route's own key.
    pub upstream_key: Option<String>,
    pub matches: Vec<MatchSpec>,
    pub filters: Vec<FilterSpec>,
    pub timeouts: TimeoutsSpec,
    /// Backend timeout when `timeouts.backend_request` is not given.
    pub default_backend_timeout: Duration,
    /// The controller's rule-level `unavailableStatus`.
    pub unavailable_status: Option<u16>,
    /// `Host` towards backends that do not choose their own.
    pub host_header: HostHeader,
    /// Names of the listeners this rule is attached to; empty: all of them.
    pub listeners: Vec<String>,
}

impl RuleSource {
    /// One rule per entry of a host map (the inline `[routes.hosts]`, the routes file or the
    /// metadata attribute): the default match, one backend.
    pub(crate) fn from_host_map(config: &Config, host_map: &BTreeMap<String, String>) -> Vec<RuleSource> {
        let map_key = match config.routes.source {
            RouteSourceKind::File => "routes.file",
            RouteSourceKind::GcpMetadata => "routes.attribute",
            _ => "routes.hosts",
        };
        let mut sources = Vec::with_capacity(host_map.len());
        for (host, url) in host_map {
            sources.push(RuleSource {
                name: host.to_ascii_lowercase(),
                key: format!("{map_key}.{host:?}"),
                hostnames: vec![host.clone()],
                backends: vec![BackendSpec::new(url)],
                shorthand: true,
                upstream_key: None,
                matches: Vec::new(),
                filters: Vec::new(),
                timeouts: TimeoutsSpec::default(),
                default_backend_timeout: config.proxy.upstream_timeout,
                unavailable_status: None,
                // Host maps usually point at Cloud Run, which routes on its own hostname.
                host_header: HostHeader::Upstream,
                listeners: Vec::new(),
            });
        }
        sources
    }

    /// The `i`th `[[route]]`: its `upstream` shorthand or its `backends`, with the route's
    /// `upstream_auth`, `auth_header` and `protocol` as the backends' defaults. A route that
    /// gives both, or neither (without a redirect), is a problem.
    pub(crate) fn from_route(config: &Config, i: usize, r: &RouteSpec, problems: &mut Vec<Problem>) -> RuleSource {
        let key = format!("route[{i}]");
        let mut backends = r.backends.clone().unwrap_or_default();
        let redirects = r.filters.iter().any(|f| f.kind == FilterKind::RequestRedirect);
        let explicitly_none = r.backends.as_ref().is_some_and(Vec::is_empty);
        match (&r.upstream, backends.is_empty()) {
            (Some(url), true) => backends.push(BackendSpec {
                upstream_auth: r.upstream_auth,
                auth_header: r.auth_header,
                protocol: r.protocol,
                ..BackendSpec::new(url)
            }),
            (Some(_), false) => problems.push(Problem {
                key: format!("{key}.upstream"),
                reason: "give either upstream or backends, not both".into(),
            }),
            (None, true) if !redirects && !explicitly_none => problems.push(Problem {
                key: format!("{key}.backends"),
                reason: "a route needs an upstream, at least one backend, or a RequestRedirect filter".into(),
            }),
            (None, _) => {
                for b in &mut backends {
                    b.upstream_auth = b.upstream_auth.or(r.upstream_auth);
                    b.auth_header = b.auth_header.or(r.auth_header);
                    b.protocol = b.protocol.or(r.protocol);
                }
            }
        }
        let name = r
            .name
            .clone()
            .or_else(|| r.hostnames.first().map(|h| h.to_ascii_lowercase()))
            .unwrap_or_else(|| key.clone());
        let shorthand = r.upstream.is_some();
        RuleSource {
            name,
            upstream_key: shorthand.then(|| format!("{key}.upstream")),
            key,
            shorthand,
            hostnames: r.hostnames.clone(),
            backends,
            matches: r.matches.clone(),
            filters: r.filters.clone(),
            timeouts: r.timeouts.clone().unwrap_or_default(),
            default_backend_timeout: r.timeout.unwrap_or(config.proxy.upstream_timeout),
            unavailable_status: None,
            host_header: r.host_header.unwrap_or(HostHeader::Client),
            listeners: r.listeners.clone(),
        }
    }
}

/// Normalises a configured hostname. Accepts `*.` wildcards; rejects ports and junk.
pub(crate) fn normalise_hostname(h: &str) -> Result<String, RuleError> {
    let lower = h.trim().to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").unwrap_or(&lower);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(valid_label) {
        return Err(RuleError::new(format!(
            "{h:?} is not a valid hostname (no port, no scheme; a leading \"*.\" is allowed)"
        )));
    }
    Ok(lower)
}
