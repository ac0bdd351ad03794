//! The route table, modelled on Gateway API `HTTPRoute`: hostnames → ordered rules → matches →
//! weighted backends. The seed's `{"hostname": "https://upstream"}` map is the simplest case: one
//! route per hostname with one rule, the default match (`PathPrefix /`) and one backend.
//!
//! A table is built whole from configuration and then only read: requests see it through an
//! `ArcSwap`, so a reload swaps one pointer and no reader ever sees a half-built table. Everything
//! a request needs (lower-cased host keys, parsed URIs, precomputed weights) is prepared here,
//! once per table, not per request.

pub(crate) use crate::routing::rule_source::{normalise_hostname, RuleSource};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::StatusCode;

use crate::config::route_spec::FilterKind;
use crate::config::TimeoutsSpec;
use crate::config::{
    AuthHeaderKind, BackendSpec, Config, HostHeader, ListenerSpec, Problem, RouteSourceKind, UpstreamAuthKind,
    UpstreamProtocol,
};
use crate::routing::index::{self, HostIndex, Listener};
use crate::routing::matching::RegexSets;
use crate::routing::tls::{DefaultRoots, TlsError, UpstreamTls};
use crate::routing::{limits, Filters, RequestHead, RouteMatch};
use crate::telemetry::{Metrics, RouteStats};

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
    pub fn parse(url: &str) -> Result<Upstream, String> {
        Self::parse_inner(url).map_err(|e| e.replace(url, &redact_userinfo(url)))
    }

    fn parse_inner(url: &str) -> Result<Upstream, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            Some(other) => return Err(format!("{url:?}: scheme {other:?} is not http or https")),
            None => return Err(format!("{url:?}: missing scheme (http:// or https://)")),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url:?}: missing host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{url:?}: credentials in the URL are not allowed; use upstream_auth"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("{url:?}: a query string is not allowed in an upstream URL"));
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
    total_weight: u64,
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
    rules: Vec<Rule>,
    /// Every compiled match of every rule; the indexes below point into it.
    matches: Vec<RouteMatch>,
    /// The rules that name no listener: every rule of a table without listeners, and in one
    /// with listeners the rules attached to all of them.
    index: HostIndex,
    /// With listeners, a request is served only by the rules of the most specific listener
    /// that matches its host (Gateway API listener isolation), its own and those in `index`;
    /// none matches: 404.
    listeners: Vec<Listener>,
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

#[derive(Debug, thiserror::Error)]
#[error("{}", problems.iter().map(|p| format!("{}: {}", p.key, p.reason)).collect::<Vec<_>>().join("; "))]
pub struct RoutesError {
    pub problems: Vec<Problem>,
}

/// A fail-closed status (`unavailableStatus`) must be an error status: anything else would
/// answer a request the controller could not route as if it had been served.
fn fail_closed_status(code: u16) -> Result<StatusCode, String> {
    match StatusCode::from_u16(code) {
        Ok(s) if s.is_client_error() || s.is_server_error() => Ok(s),
        _ => Err(format!("{code} is not an error status (400–599)")),
    }
}

/// `0s` disables a timeout (GEP-1742).
fn timeout_or_none(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Reads a seed-format `routes.json` (`{"hostname": "https://upstream"}`).
pub fn read_host_map(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_host_map(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_host_map(json: &[u8]) -> Result<BTreeMap<String, String>, String> {
    serde_json::from_slice::<BTreeMap<String, String>>(json).map_err(|e| {
        // serde_json's own message quotes the offending value ("invalid type: string \"…\""),
        // and a misconfigured `routes.file` may well point at a secret: give the position only.
        let what = match e.classify() {
            serde_json::error::Category::Data => "not a JSON object of hostname → URL strings",
            serde_json::error::Category::Eof => "unexpected end of JSON",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not valid JSON",
        };
        format!("{what} (line {}, column {})", e.line(), e.column())
    })
}

impl RouteTable {
    /// Builds the table from `config`'s `[[route]]` entries plus `host_map` (the inline
    /// `[routes.hosts]` or the routes file). Collects every problem.
    pub fn build(config: &Config, host_map: &BTreeMap<String, String>) -> Result<RouteTable, RoutesError> {
        Self::build_with(config, host_map, &Metrics::default())
    }

    pub fn build_with(
        config: &Config,
        host_map: &BTreeMap<String, String>,
        metrics: &Metrics,
    ) -> Result<RouteTable, RoutesError> {
        let mut problems = Vec::new();
        let map_key = match config.routes.source {
            RouteSourceKind::File => "routes.file",
            RouteSourceKind::GcpMetadata => "routes.attribute",
            _ => "routes.hosts",
        };
        let mut sources = Vec::new();
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
                // The seed's host maps point at Cloud Run, which routes on its own hostname.
                host_header: HostHeader::Upstream,
                listeners: Vec::new(),
            });
        }
        for (i, r) in config.route.iter().enumerate() {
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
            sources.push(RuleSource {
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
            });
        }
        Self::compile(sources, &config.listener, config, metrics, true, problems)
    }

    /// Compiles rules into a table. With `strict_duplicates`, a hostname claimed by two rules
    /// that both accept every request is an error (the second could never be chosen); the
    /// config API accepts that, as Gateway API does (the earlier rule wins).
    pub(crate) fn compile(
        sources: Vec<RuleSource>,
        listeners: &[ListenerSpec],
        config: &Config,
        metrics: &Metrics,
        strict_duplicates: bool,
        mut problems: Vec<Problem>,
    ) -> Result<RouteTable, RoutesError> {
        let over = limits::exceeded(&sources, listeners.len());
        if !over.is_empty() {
            problems.extend(over);
            return Err(RoutesError { problems });
        }
        let rule_keys: Vec<String> = sources.iter().map(|p| p.key.clone()).collect();
        let defaults = &config.routes;
        let mut table = RouteTable::default();
        let default_roots = DefaultRoots::new(&config.proxy);
        let mut default_roots_reported = false;
        crate::routing::destination::check(&sources, config, &mut problems);
        // A configured bundle or store is checked with every table (a reload, `check`), even
        // before a backend needs it: the proxy reads it at boot too.
        if config.proxy.ca_file.is_some() || config.proxy.trust.is_some() {
            if let Err((key, reason)) = default_roots.get() {
                problems.push(Problem { key, reason });
                default_roots_reported = true;
            }
        }
        // Which rule claimed each hostname with a catch-all first, to report duplicates.
        let mut claimed: HashMap<String, String> = HashMap::new();
        // One set of counters per route name: rules of the same route count together.
        let mut stats: HashMap<Arc<str>, Arc<RouteStats>> = HashMap::new();
        table.listeners = index::compile_listeners(listeners, &mut problems);

        for p in sources {
            let idx = table.rules.len();
            let mut backends = Vec::new();
            for (bi, b) in p.backends.iter().enumerate() {
                let bkey = if p.shorthand {
                    p.upstream_key.clone().unwrap_or_else(|| p.key.clone())
                } else {
                    format!("{}.backends[{bi}].url", p.key)
                };
                let filters = Filters::compile(
                    &b.filters,
                    &format!("{}.backends[{bi}].filters", p.key),
                    defaults,
                    &default_roots,
                    &mut problems,
                );
                let unavailable = match b.unavailable_status.map(fail_closed_status).transpose() {
                    Ok(u) => u,
                    Err(reason) => {
                        problems.push(Problem {
                            key: format!("{}.backends[{bi}].unavailableStatus", p.key),
                            reason,
                        });
                        None
                    }
                };
                let tls = match b.tls.as_ref().map(|t| UpstreamTls::compile(t, &default_roots)) {
                    None => None,
                    Some(Ok(t)) => Some(Arc::new(t)),
                    Some(Err(TlsError::Field(field, reason))) => {
                        problems.push(Problem {
                            key: format!("{}.backends[{bi}].tls.{field}", p.key),
                            reason,
                        });
                        None
                    }
                    // The same for every backend that needs them: said once.
                    Some(Err(TlsError::Default(key, reason))) => {
                        if !std::mem::replace(&mut default_roots_reported, true) {
                            problems.push(Problem { key, reason });
                        }
                        None
                    }
                };
                match Upstream::parse(&b.url) {
                    Ok(upstream) => {
                        let protocol = b.protocol.unwrap_or(defaults.protocol);
                        if tls.is_some() && upstream.scheme != Scheme::HTTPS {
                            problems.push(Problem {
                                key: format!("{}.backends[{bi}].tls", p.key),
                                reason: "TLS settings need an https:// upstream".into(),
                            });
                            continue;
                        }
                        if protocol == UpstreamProtocol::H2c && upstream.scheme == Scheme::HTTPS {
                            problems.push(Problem {
                                key: bkey,
                                reason: "protocol = \"h2c\" needs an http:// upstream (https negotiates HTTP/2 itself)"
                                    .into(),
                            });
                            continue;
                        }
                        backends.push(Backend {
                            upstream,
                            weight: b.weight,
                            auth: b.upstream_auth.unwrap_or(defaults.upstream_auth),
                            auth_header: b.auth_header.unwrap_or(defaults.auth_header),
                            protocol,
                            filters,
                            unavailable,
                            websocket: b.websocket,
                            host_header: b.host_header.unwrap_or(p.host_header),
                            tls,
                        })
                    }
                    Err(reason) => problems.push(Problem { key: bkey, reason }),
                }
            }

            let mut matches = Vec::new();
            if p.matches.is_empty() {
                matches.push(RouteMatch::catch_all(idx, idx));
            }
            for (mi, spec) in p.matches.iter().enumerate() {
                match RouteMatch::compile(spec, &format!("{}.matches[{mi}]", p.key), idx, (idx, mi)) {
                    Ok(m) => matches.push(m),
                    Err(e) => problems.extend(e),
                }
            }
            let catch_all = matches.iter().all(RouteMatch::is_catch_all);

            let filters = Filters::compile(
                &p.filters,
                &format!("{}.filters", p.key),
                defaults,
                &default_roots,
                &mut problems,
            );
            let prefix_replaced = filters.replaces_prefix() || backends.iter().any(|b| b.filters.replaces_prefix());
            if prefix_replaced && matches.iter().any(|m| m.prefix().is_none()) {
                problems.push(Problem {
                    key: format!("{}.filters", p.key),
                    reason: "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match".into(),
                });
            }

            let request_timeout = p.timeouts.request.and_then(timeout_or_none);
            let backend_timeout = timeout_or_none(p.timeouts.backend_request.unwrap_or(p.default_backend_timeout));
            if let (Some(r), Some(b)) = (request_timeout, p.timeouts.backend_request.and_then(timeout_or_none)) {
                if b > r {
                    problems.push(Problem {
                        key: format!("{}.timeouts.backend_request", p.key),
                        reason: format!("{b:?} exceeds timeouts.request ({r:?})"),
                    });
                }
            }

            let mut hostnames: Vec<String> = Vec::new();
            for h in &p.hostnames {
                match normalise_hostname(h) {
                    Ok(h) if hostnames.contains(&h) => {}
                    Ok(h) => {
                        if strict_duplicates && catch_all {
                            if let Some(first) = claimed.get(&h) {
                                problems.push(Problem {
                                    key: p.key.clone(),
                                    reason: format!("hostname {h:?} is already routed by {first}"),
                                });
                                continue;
                            }
                            claimed.insert(h.clone(), p.key.clone());
                        }
                        hostnames.push(h);
                    }
                    Err(reason) => problems.push(Problem {
                        key: p.key.clone(),
                        reason,
                    }),
                }
            }

            // A rule without listeners is attached to every listener, as an HTTPRoute whose
            // parentRef names no sectionName: it goes in the table's own index, which every
            // listener searches too.
            let mut scopes: Vec<usize> = Vec::new();
            for (li, name) in p.listeners.iter().enumerate() {
                match table.listeners.iter().position(|l| *l.name == **name) {
                    Some(i) => scopes.push(i),
                    None => problems.push(Problem {
                        key: format!("{}.listeners[{li}]", p.key),
                        reason: format!("no listener named {name:?} in this table"),
                    }),
                }
            }
            for m in matches {
                let mi = table.matches.len();
                if p.listeners.is_empty() {
                    table.index.push(mi, &m, &hostnames);
                }
                for &li in &scopes {
                    table.listeners[li].index.push(mi, &m, &hostnames);
                }
                table.matches.push(m);
            }

            let unavailable = match p.unavailable_status.map(fail_closed_status).transpose() {
                Ok(u) => u,
                Err(reason) => {
                    problems.push(Problem {
                        key: format!("{}.unavailableStatus", p.key),
                        reason,
                    });
                    None
                }
            };
            let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
            let route: Arc<str> = Arc::from(p.name.as_str());
            table.summary.push(RouteSummary {
                name: p.name,
                hostnames,
                upstreams: backends.iter().map(|b| b.upstream.url.clone()).collect(),
                host_headers: backends
                    .iter()
                    .map(|b| {
                        let rewrite = b.filters.rewrite.as_ref().or(filters.rewrite.as_ref());
                        match rewrite.and_then(|r| r.hostname.as_ref()).and_then(|h| h.to_str().ok()) {
                            Some(h) => format!("rewrite:{h}"),
                            None => b.host_header.as_str().to_owned(),
                        }
                    })
                    .collect(),
            });
            table.rules.push(Rule {
                stats: stats
                    .entry(route.clone())
                    .or_insert_with(|| metrics.route(&route))
                    .clone(),
                route,
                unavailable,
                backends,
                total_weight,
                filters,
                request_timeout,
                backend_timeout,
            });
        }

        if !problems.is_empty() {
            return Err(RoutesError { problems });
        }
        table.finish_indexes(&rule_keys)?;
        Ok(table)
    }

    /// Sorts every index, building each distinct regex set once within the table's budget.
    fn finish_indexes(&mut self, rule_keys: &[String]) -> Result<(), RoutesError> {
        let all = &self.matches;
        let mut sets = RegexSets::new(limits::MAX_SET_PATTERNS);
        let indexes = std::iter::once(&mut self.index).chain(self.listeners.iter_mut().map(|l| &mut l.index));
        for index in indexes {
            index.finish(all, &mut sets).map_err(|over| RoutesError {
                problems: vec![Problem {
                    key: rule_keys.get(over.rule).cloned().unwrap_or_default(),
                    reason: format!(
                        "the table's regular expressions, once per distinct set of rules a hostname has, exceed {} (the limit)",
                        limits::MAX_SET_PATTERNS
                    ),
                }],
            })?;
        }
        Ok(())
    }

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

    /// The seed's `routes.json` format: hostname → first backend URL.
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
