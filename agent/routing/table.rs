//! The route table, modelled on Gateway API `HTTPRoute`: hostnames → ordered rules → matches →
//! weighted backends. A host map's `{"hostname": "https://upstream"}` map is the simplest case: one
//! route per hostname with one rule, the default match (`PathPrefix /`) and one backend.
//!
//! A table is built whole from configuration and then only read: requests see it through an
//! `ArcSwap`, so a reload swaps one pointer and no reader ever sees a half-built table. Everything
//! a request needs (lower-cased host keys, parsed URIs, precomputed weights) is prepared here,
//! once per table, not per request.

/// Where `main` and the tests have always found it.
pub use crate::routing::error::RoutesError;
pub(crate) use crate::routing::rule_source::{normalise_hostname, RuleSource};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::StatusCode;

use crate::config::{AuthHeaderKind, HostHeader, UpstreamAuthKind, UpstreamProtocol};
use crate::routing::error::{HostMapError, RuleError, SourceError};
use crate::routing::index::{self, HostIndex, Listener};
use crate::routing::tls::UpstreamTls;
use crate::routing::{Filters, RequestHead, RouteMatch};
use crate::telemetry::RouteStats;

/// Where a request goes once it matched: the upstream and how to authenticate to it.
#[derive(Debug)]
pub struct Backend {
    pub upstream: Upstream,
    pub weight: u32,
    pub auth: UpstreamAuthKind,
    pub auth_header: AuthHeaderKind,
    pub protocol: UpstreamProtocol,
    /// Filters that apply only when this backend is chosen.
    pub filters: Filters,
    /// Answer this instead of forwarding when this backend is picked (the controller's
    /// `unavailableStatus`: the backend keeps its share of traffic, which fails closed).
    pub unavailable: Option<StatusCode>,
    /// Upgrade handshakes to this backend are exempt from the rule's timeouts (the
    /// controller's `websocket`, from `appProtocol: kubernetes.io/ws`).
    pub websocket: bool,
    /// Which `Host` the upstream sees; a URLRewrite `hostname` overrides either.
    pub host_header: HostHeader,
    /// Own TLS settings (CA, SNI, SANs, client certificate); `None`: the proxy's.
    pub tls: Option<Arc<UpstreamTls>>,
}

/// A parsed upstream URL.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix prepended to the request path; empty when the URL has none.
    pub base_path: String,
    /// The URL as configured (without a trailing slash); also the identity-token audience,
    /// which Cloud Run expects to be the service URL.
    pub url: String,
}

/// `url` with any `user:password@` replaced, for error messages.
fn redact_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) if scheme.is_empty() => format!("[redacted]@{}", &rest[at + 1..]),
        Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, RuleError> {
        Self::parse_inner(url).map_err(|e| RuleError::new(e.reason().replace(url, &redact_userinfo(url))))
    }

    fn parse_inner(url: &str) -> Result<Upstream, RuleError> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            Some(other) => return Err(format!("{url:?}: scheme {other:?} is not http or https").into()),
            None => return Err(format!("{url:?}: missing scheme (http:// or https://)").into()),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url:?}: missing host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not allowed; use upstream_auth").into());
        }
        if uri.query().is_some() {
            return Err(format!("{url:?}: a query string is not allowed in an upstream URL").into());
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Upstream {
            scheme,
            authority,
            base_path,
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The URI to send upstream for a request with `path_and_query`.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<http::Uri, http::Error> {
        let pq = match (self.base_path.is_empty(), path_and_query) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let rest = pq.map_or("/", |pq| pq.as_str());
                PathAndQuery::try_from(format!("{}{}", self.base_path, rest))?
            }
        };
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// One rule: where a matching request goes and what happens to it on the way.
#[derive(Debug)]
pub struct Rule {
    /// The route's name, for logs and metrics.
    pub route: Arc<str>,
    /// Every matching request is answered with this status (the controller's rule-level
    /// `unavailableStatus`: a rule it cannot serve as written fails closed).
    pub unavailable: Option<StatusCode>,
    pub backends: Vec<Backend>,
    pub(super) total_weight: u64,
    pub filters: Filters,
    /// From receiving the request to the response head (`timeouts.request`); `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// From sending upstream to the response head (`timeouts.backend_request`, else the route's
    /// `timeout`, else `proxy.upstream_timeout`); `None`: no limit.
    pub backend_timeout: Option<Duration>,
    pub stats: Arc<RouteStats>,
}

impl Rule {
    /// Picks a backend by weight. `None` when there is none or every weight is 0 (Gateway API:
    /// answer 500).
    pub fn pick_backend(&self) -> Option<&Backend> {
        match self.backends.as_slice() {
            [only] if only.weight > 0 => Some(only),
            _ if self.total_weight == 0 => None,
            backends => {
                let mut n = crate::random::random_u64() % self.total_weight;
                for b in backends {
                    if n < u64::from(b.weight) {
                        return Some(b);
                    }
                    n -= u64::from(b.weight);
                }
                None
            }
        }
    }
}

/// A route as configured, kept for `routes.json` and `/status`.
#[derive(Debug, Clone)]
pub struct RouteSummary {
    pub name: String,
    pub hostnames: Vec<String>,
    pub upstreams: Vec<String>,
    /// Per upstream, the `Host` it is sent: `client`, `upstream`, or the rewrite's hostname.
    pub host_headers: Vec<String>,
}

/// The compiled, immutable table.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub(super) rules: Vec<Rule>,
    /// Every compiled match of every rule; the indexes below point into it.
    pub(super) matches: Vec<RouteMatch>,
    /// The rules that name no listener: every rule of a table without listeners, and in one
    /// with listeners the rules attached to all of them.
    pub(super) index: HostIndex,
    /// With listeners, a request is served only by the rules of the most specific listener
    /// that matches its host (Gateway API listener isolation), its own and those in `index`;
    /// none matches: 404.
    pub(super) listeners: Vec<Listener>,
    pub summary: Vec<RouteSummary>,
    /// The config API's version of this table; `None` for tables from the file.
    pub version: Option<u64>,
    /// The push carries GRPCRoute rules (the controller's `hasGrpcRoute`).
    pub grpc: bool,
}

/// What a request matched.
#[derive(Debug, Clone, Copy)]
pub struct Routed<'t> {
    pub rule: &'t Rule,
    pub matched: &'t RouteMatch,
}

/// Reads a host map `routes.json` (`{"hostname": "https://upstream"}`).
pub fn read_host_map(path: &Path) -> Result<BTreeMap<String, String>, SourceError> {
    let text = std::fs::read(path).map_err(|error| SourceError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_host_map(&text).map_err(|error| SourceError::NotAHostMap {
        origin: path.display().to_string(),
        error,
    })
}

/// Parses a host map; an error gives the position, never the content ([`HostMapError`]).
pub fn parse_host_map(json: &[u8]) -> Result<BTreeMap<String, String>, HostMapError> {
    serde_json::from_slice::<BTreeMap<String, String>>(json).map_err(|e| HostMapError {
        what: match e.classify() {
            serde_json::error::Category::Data => "not a JSON object of hostname → URL strings",
            serde_json::error::Category::Eof => "unexpected end of JSON",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not valid JSON",
        },
        line: e.line(),
        column: e.column(),
    })
}

impl RouteTable {
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Each rule's route name and its counters, for the metrics of the table in use.
    pub fn route_stats(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<RouteStats>)> {
        self.rules.iter().map(|r| (&r.route, &r.stats))
    }

    /// The audiences (upstream URLs) of every backend and mirror that gets an identity token.
    pub fn id_token_audiences(&self) -> impl Iterator<Item = &str> {
        let filters = self
            .rules
            .iter()
            .flat_map(|r| std::iter::once(&r.filters).chain(r.backends.iter().map(|b| &b.filters)));
        let mirrors = filters.flat_map(|f| f.mirrors.iter().map(|m| (m.auth, &m.upstream)));
        let backends = self
            .rules
            .iter()
            .flat_map(|r| r.backends.iter().map(|b| (b.auth, &b.upstream)));
        backends
            .chain(mirrors)
            .filter(|(auth, _)| *auth == UpstreamAuthKind::GcpIdToken)
            .map(|(_, u)| u.url.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The match and rule for a request to `host` (already without port). Gateway API's
    /// hostname precedence comes first: the exact hostname's matches, then each matching
    /// wildcard's (longest suffix first), then those of rules without hostnames. Within each,
    /// the first match in precedence order whose conditions hold wins.
    pub fn route(&self, host: &str, req: &RequestHead<'_>) -> Option<Routed<'_>> {
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let found = if self.listeners.is_empty() {
            index::find(&[&self.index], &self.matches, host, req)?
        } else {
            let owner = self
                .listeners
                .iter()
                .filter_map(|l| l.specificity(host).map(|s| (s, l)))
                .max_by_key(|(s, _)| *s)?;
            index::find(&[&owner.1.index, &self.index], &self.matches, host, req)?
        };
        Some(Routed {
            rule: &self.rules[found.rule],
            matched: found,
        })
    }

    /// The rule a plain `GET /` to `host` would get.
    pub fn find(&self, host: &str) -> Option<&Rule> {
        let headers = http::HeaderMap::new();
        let head = RequestHead {
            method: &http::Method::GET,
            path: "/",
            query: None,
            headers: &headers,
        };
        self.route(host, &head).map(|r| r.rule)
    }

    /// The host map `routes.json` format: hostname → first backend URL.
    pub fn to_host_map(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for r in &self.summary {
            if let Some(url) = r.upstreams.first() {
                for h in &r.hostnames {
                    out.insert(h.clone(), url.clone());
                }
            }
        }
        out
    }
}

/// Strips the port from a `Host` header value (`example.com:8080`, `[::1]:8080`).
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep up to the closing bracket.
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
