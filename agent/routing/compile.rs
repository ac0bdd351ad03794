//! The route compiler: rules as configured ([`RuleSource`]) in, a [`RouteTable`] out, every
//! problem collected on the way. One method per piece of a rule (backends and their TLS, matches,
//! filters, timeouts, hostnames, listener scopes, the summary), each filing its problems under
//! the key the rule came from, so `check` and a refused push list them all at once.
//!
//! The table's work is bounded before anything is compiled (`limits::exceeded`, a count over the
//! table as written); the regex sets, the one part whose cost depends on how rules share
//! hostnames, are built last within their own budget ([`Compiler::finish`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::StatusCode;

use crate::config::{BackendSpec, Config, ListenerSpec, Problem, UpstreamProtocol};
use crate::routing::index;
use crate::routing::matching::RegexSets;
use crate::routing::rule_source::{normalise_hostname, RuleSource};
use crate::routing::table::{Backend, RouteSummary, RouteTable, RoutesError, Rule, Upstream};
use crate::routing::tls::{DefaultRoots, TlsError, UpstreamTls};
use crate::routing::{limits, Filters, RouteMatch};
use crate::telemetry::{Metrics, RouteStats};

/// Builds the table from `config`'s `[[route]]` entries plus `host_map` (the inline
/// `[routes.hosts]` or the routes file). Collects every problem.
pub fn build(config: &Config, host_map: &BTreeMap<String, String>) -> Result<RouteTable, RoutesError> {
    build_with(config, host_map, &Metrics::default())
}

/// [`build`], counting into `metrics` (the running node's).
pub fn build_with(
    config: &Config,
    host_map: &BTreeMap<String, String>,
    metrics: &Metrics,
) -> Result<RouteTable, RoutesError> {
    let mut problems = Vec::new();
    let mut sources = RuleSource::from_host_map(config, host_map);
    for (i, r) in config.route.iter().enumerate() {
        sources.push(RuleSource::from_route(config, i, r, &mut problems));
    }
    rules(sources, &config.listener, config, metrics, true, problems)
}

/// Compiles rules into a table ([`Compiler`]). With `strict_duplicates`, a hostname claimed
/// by two rules that both accept every request is an error (the second could never be
/// chosen); the config API accepts that, as Gateway API does (the earlier rule wins).
pub(crate) fn rules(
    sources: Vec<RuleSource>,
    listeners: &[ListenerSpec],
    config: &Config,
    metrics: &Metrics,
    strict_duplicates: bool,
    problems: Vec<Problem>,
) -> Result<RouteTable, RoutesError> {
    Compiler::run(sources, listeners, config, metrics, strict_duplicates, problems)
}

/// One compile of one table: the settings it runs under, what it has built so far and every
/// problem found.
pub(crate) struct Compiler<'c> {
    config: &'c Config,
    metrics: &'c Metrics,
    /// The anchors of backends and mirrors whose `tls` names no CA of its own.
    default_roots: DefaultRoots<'c>,
    /// Their failure is the same for every backend that needs them: said once.
    default_roots_reported: bool,
    /// A hostname claimed by two rules that both accept every request is an error (the second
    /// could never be chosen). The config API accepts that, as Gateway API does.
    strict_duplicates: bool,
    /// Which rule claimed each hostname with a catch-all first, to report duplicates.
    claimed: HashMap<String, String>,
    /// One set of counters per route name: rules of the same route count together.
    stats: HashMap<Arc<str>, Arc<RouteStats>>,
    table: RouteTable,
    problems: Vec<Problem>,
}

/// A rule's matches, compiled, and whether they accept every request.
struct Matches {
    list: Vec<RouteMatch>,
    catch_all: bool,
}

impl<'c> Compiler<'c> {
    /// Compiles `sources` (with the table's `listeners`) under `config`; `problems` are those
    /// found before (while reducing `[[route]]` entries to sources), reported with the rest.
    pub(crate) fn run(
        sources: Vec<RuleSource>,
        listeners: &[ListenerSpec],
        config: &'c Config,
        metrics: &'c Metrics,
        strict_duplicates: bool,
        mut problems: Vec<Problem>,
    ) -> Result<RouteTable, RoutesError> {
        let over = limits::exceeded(&sources, listeners.len());
        if !over.is_empty() {
            problems.extend(over);
            return Err(RoutesError { problems });
        }
        let rule_keys: Vec<String> = sources.iter().map(|p| p.key.clone()).collect();
        let mut compiler = Compiler {
            config,
            metrics,
            default_roots: DefaultRoots::new(&config.proxy),
            default_roots_reported: false,
            strict_duplicates,
            claimed: HashMap::new(),
            stats: HashMap::new(),
            table: RouteTable::default(),
            problems,
        };
        crate::routing::destination::check(&sources, config, &mut compiler.problems);
        compiler.configured_roots();
        compiler.table.listeners = index::compile_listeners(listeners, &mut compiler.problems);
        for source in sources {
            compiler.rule(source);
        }
        compiler.finish(&rule_keys)
    }

    /// A configured bundle or store is checked with every table (a reload, `check`), even
    /// before a backend needs it: the proxy reads it at boot too.
    fn configured_roots(&mut self) {
        let proxy = &self.config.proxy;
        if proxy.ca_file.is_some() || proxy.trust.is_some() {
            if let Err((key, reason)) = self.default_roots.get() {
                self.problems.push(Problem { key, reason });
                self.default_roots_reported = true;
            }
        }
    }

    /// Compiles one rule and adds it, its matches and its summary to the table.
    fn rule(&mut self, p: RuleSource) {
        let idx = self.table.rules.len();
        let backends = self.backends(&p);
        let matches = self.matches(&p, idx);
        let filters = self.rule_filters(&p, &backends, &matches.list);
        let (request_timeout, backend_timeout) = self.timeouts(&p);
        let hostnames = self.hostnames(&p, matches.catch_all);
        self.index(&p, matches.list, &hostnames);
        let unavailable = self.fail_closed(p.unavailable_status, || format!("{}.unavailableStatus", p.key));
        let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
        let route: Arc<str> = Arc::from(p.name.as_str());
        self.table.summary.push(summary(p.name, hostnames, &backends, &filters));
        let metrics = self.metrics;
        let stats = self
            .stats
            .entry(route.clone())
            .or_insert_with(|| metrics.route(&route))
            .clone();
        self.table.rules.push(Rule {
            stats,
            route,
            unavailable,
            backends,
            total_weight,
            filters,
            request_timeout,
            backend_timeout,
        });
    }

    /// The rule's backends that compile; a backend with a problem is left out (the table is
    /// refused anyway).
    fn backends(&mut self, p: &RuleSource) -> Vec<Backend> {
        let mut out = Vec::with_capacity(p.backends.len());
        for (bi, b) in p.backends.iter().enumerate() {
            if let Some(backend) = self.backend(p, bi, b) {
                out.push(backend);
            }
        }
        out
    }

    fn backend(&mut self, p: &RuleSource, bi: usize, b: &BackendSpec) -> Option<Backend> {
        let bkey = if p.shorthand {
            p.upstream_key.clone().unwrap_or_else(|| p.key.clone())
        } else {
            format!("{}.backends[{bi}].url", p.key)
        };
        let defaults = &self.config.routes;
        let filters = Filters::compile(
            &b.filters,
            &format!("{}.backends[{bi}].filters", p.key),
            defaults,
            &self.default_roots,
            &mut self.problems,
        );
        let unavailable = self.fail_closed(b.unavailable_status, || {
            format!("{}.backends[{bi}].unavailableStatus", p.key)
        });
        let tls = self.backend_tls(p, bi, b);
        let upstream = match Upstream::parse(&b.url) {
            Ok(upstream) => upstream,
            Err(e) => {
                self.problems.push(e.at(bkey));
                return None;
            }
        };
        let protocol = b.protocol.unwrap_or(defaults.protocol);
        if tls.is_some() && upstream.scheme != Scheme::HTTPS {
            self.problems.push(Problem {
                key: format!("{}.backends[{bi}].tls", p.key),
                reason: "TLS settings need an https:// upstream".into(),
            });
            return None;
        }
        if protocol == UpstreamProtocol::H2c && upstream.scheme == Scheme::HTTPS {
            self.problems.push(Problem {
                key: bkey,
                reason: "protocol = \"h2c\" needs an http:// upstream (https negotiates HTTP/2 itself)".into(),
            });
            return None;
        }
        Some(Backend {
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

    /// A backend's own TLS settings (CA, SNI, SANs, client certificate), compiled.
    fn backend_tls(&mut self, p: &RuleSource, bi: usize, b: &BackendSpec) -> Option<Arc<UpstreamTls>> {
        match UpstreamTls::compile(b.tls.as_ref()?, &self.default_roots) {
            Ok(t) => Some(Arc::new(t)),
            Err(TlsError::Field(field, reason)) => {
                self.problems.push(Problem {
                    key: format!("{}.backends[{bi}].tls.{field}", p.key),
                    reason,
                });
                None
            }
            Err(TlsError::Default(key, reason)) => {
                if !std::mem::replace(&mut self.default_roots_reported, true) {
                    self.problems.push(Problem { key, reason });
                }
                None
            }
        }
    }

    /// A fail-closed status (`unavailableStatus`) must be an error status: anything else would
    /// answer a request the controller could not route as if it had been served.
    fn fail_closed(&mut self, code: Option<u16>, key: impl FnOnce() -> String) -> Option<StatusCode> {
        let code = code?;
        match StatusCode::from_u16(code) {
            Ok(s) if s.is_client_error() || s.is_server_error() => Some(s),
            _ => {
                self.problems.push(Problem {
                    key: key(),
                    reason: format!("{code} is not an error status (400–599)"),
                });
                None
            }
        }
    }

    /// The rule's matches (none configured: the catch-all `PathPrefix /`).
    fn matches(&mut self, p: &RuleSource, idx: usize) -> Matches {
        let mut list = Vec::with_capacity(p.matches.len().max(1));
        if p.matches.is_empty() {
            list.push(RouteMatch::catch_all(idx, idx));
        }
        for (mi, spec) in p.matches.iter().enumerate() {
            match RouteMatch::compile(spec, &format!("{}.matches[{mi}]", p.key), idx, (idx, mi)) {
                Ok(m) => list.push(m),
                Err(e) => self.problems.extend(e),
            }
        }
        let catch_all = list.iter().all(RouteMatch::is_catch_all);
        Matches { list, catch_all }
    }

    /// The rule's own filters; `ReplacePrefixMatch`, on the rule or a backend, needs every
    /// match to be a `PathPrefix`.
    fn rule_filters(&mut self, p: &RuleSource, backends: &[Backend], matches: &[RouteMatch]) -> Filters {
        let key = format!("{}.filters", p.key);
        let filters = Filters::compile(
            &p.filters,
            &key,
            &self.config.routes,
            &self.default_roots,
            &mut self.problems,
        );
        let prefix_replaced = filters.replaces_prefix() || backends.iter().any(|b| b.filters.replaces_prefix());
        if prefix_replaced && matches.iter().any(|m| m.prefix().is_none()) {
            self.problems.push(Problem {
                key,
                reason: "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match".into(),
            });
        }
        filters
    }

    /// `(request, backend)` timeouts; `0s` disables one (GEP-1742). The backend's may not
    /// exceed the request's.
    fn timeouts(&mut self, p: &RuleSource) -> (Option<Duration>, Option<Duration>) {
        let request = p.timeouts.request.and_then(timeout_or_none);
        let backend = timeout_or_none(p.timeouts.backend_request.unwrap_or(p.default_backend_timeout));
        if let (Some(r), Some(b)) = (request, p.timeouts.backend_request.and_then(timeout_or_none)) {
            if b > r {
                self.problems.push(Problem {
                    key: format!("{}.timeouts.backend_request", p.key),
                    reason: format!("{b:?} exceeds timeouts.request ({r:?})"),
                });
            }
        }
        (request, backend)
    }

    /// The rule's hostnames, normalised and each once; with strict duplicates, a hostname a
    /// catch-all rule claimed before is refused.
    fn hostnames(&mut self, p: &RuleSource, catch_all: bool) -> Vec<String> {
        let mut hostnames: Vec<String> = Vec::with_capacity(p.hostnames.len());
        for h in &p.hostnames {
            let h = match normalise_hostname(h) {
                Ok(h) => h,
                Err(e) => {
                    self.problems.push(e.at(p.key.clone()));
                    continue;
                }
            };
            if hostnames.contains(&h) {
                continue;
            }
            if self.strict_duplicates && catch_all {
                if let Some(first) = self.claimed.get(&h) {
                    self.problems.push(Problem {
                        key: p.key.clone(),
                        reason: format!("hostname {h:?} is already routed by {first}"),
                    });
                    continue;
                }
                self.claimed.insert(h.clone(), p.key.clone());
            }
            hostnames.push(h);
        }
        hostnames
    }

    /// Adds the rule's matches to the table and to the indexes of its listeners. A rule without
    /// listeners is attached to every listener, as an HTTPRoute whose parentRef names no
    /// sectionName: it goes in the table's own index, which every listener searches too.
    fn index(&mut self, p: &RuleSource, matches: Vec<RouteMatch>, hostnames: &[String]) {
        let mut scopes: Vec<usize> = Vec::with_capacity(p.listeners.len());
        for (li, name) in p.listeners.iter().enumerate() {
            match self.table.listeners.iter().position(|l| *l.name == **name) {
                Some(i) => scopes.push(i),
                None => self.problems.push(Problem {
                    key: format!("{}.listeners[{li}]", p.key),
                    reason: format!("no listener named {name:?} in this table"),
                }),
            }
        }
        let table = &mut self.table;
        for m in matches {
            let mi = table.matches.len();
            if p.listeners.is_empty() {
                table.index.push(mi, &m, hostnames);
            }
            for &li in &scopes {
                table.listeners[li].index.push(mi, &m, hostnames);
            }
            table.matches.push(m);
        }
    }

    /// The table, when no problem was found: every index sorted, each distinct regex set
    /// built once within the table's budget.
    fn finish(mut self, rule_keys: &[String]) -> Result<RouteTable, RoutesError> {
        if !self.problems.is_empty() {
            return Err(RoutesError {
                problems: self.problems,
            });
        }
        let table = &mut self.table;
        let all = &table.matches;
        let mut sets = RegexSets::new(limits::MAX_SET_PATTERNS);
        let indexes = std::iter::once(&mut table.index).chain(table.listeners.iter_mut().map(|l| &mut l.index));
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
        Ok(self.table)
    }
}

/// `0s` disables a timeout (GEP-1742).
fn timeout_or_none(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// A route as configured, for `routes.json` and `/status`: per backend its URL and the `Host`
/// it is sent (`client`, `upstream`, or a rewrite's hostname).
fn summary(name: String, hostnames: Vec<String>, backends: &[Backend], filters: &Filters) -> RouteSummary {
    let host_header = |b: &Backend| {
        let rewrite = b.filters.rewrite.as_ref().or(filters.rewrite.as_ref());
        match rewrite.and_then(|r| r.hostname.as_ref()).and_then(|h| h.to_str().ok()) {
            Some(h) => format!("rewrite:{h}"),
            None => b.host_header.as_str().to_owned(),
        }
    };
    RouteSummary {
        name,
        hostnames,
        upstreams: backends.iter().map(|b| b.upstream.url.clone()).collect(),
        host_headers: backends.iter().map(host_header).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::config::{HostHeader, TimeoutsSpec};

    /// A rule as the config API would give it, with `backends` by URL.
    fn source(key: &str, hostnames: &[&str], backends: &[&str]) -> RuleSource {
        RuleSource {
            name: key.to_owned(),
            key: key.to_owned(),
            hostnames: hostnames.iter().map(|h| (*h).to_owned()).collect(),
            backends: backends.iter().map(|u| BackendSpec::new(u)).collect(),
            shorthand: false,
            upstream_key: None,
            matches: Vec::new(),
            filters: Vec::new(),
            timeouts: TimeoutsSpec::default(),
            default_backend_timeout: Duration::from_secs(60),
            unavailable_status: None,
            host_header: HostHeader::Client,
            listeners: Vec::new(),
        }
    }

    fn run(sources: Vec<RuleSource>, strict_duplicates: bool) -> Result<RouteTable, Vec<Problem>> {
        let config = Config::default();
        Compiler::run(
            sources,
            &[],
            &config,
            &Metrics::default(),
            strict_duplicates,
            Vec::new(),
        )
        .map_err(|e| e.problems)
    }

    /// Each piece of a rule files its problem under the rule's key, in the order the pieces
    /// compile, and one bad piece does not hide the next.
    #[test]
    fn every_piece_of_a_rule_reports_under_its_own_key() {
        let mut bad = source("rules[0]", &["a.example.com", "a.example.com:80"], &["ftp://x"]);
        bad.matches = vec![serde_json::from_value(json!({"path": {"type": "PathPrefix", "value": "x"}})).unwrap()];
        bad.filters =
            vec![serde_json::from_value(json!({"type": "RequestRedirect", "requestRedirect": {"port": 0}})).unwrap()];
        bad.timeouts = serde_json::from_value(json!({"request": "1s", "backend": "2s"})).unwrap();
        bad.listeners = vec!["nowhere".to_owned()];
        bad.unavailable_status = Some(200);
        let problems = run(vec![bad], true).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "rules[0].backends[0].url",
                "rules[0].matches[0].path",
                "rules[0].filters[0]",
                "rules[0].timeouts.backend_request",
                "rules[0]",
                "rules[0].listeners[0]",
                "rules[0].unavailableStatus",
            ],
            "{problems:?}"
        );
        assert!(problems[0].reason.contains("scheme \"ftp\""), "{problems:?}");
        assert!(problems[4].reason.contains("not a valid hostname"), "{problems:?}");
    }

    /// With strict duplicates (the file), a hostname two catch-all rules claim is refused; a
    /// push accepts it and the earlier rule wins.
    #[test]
    fn a_second_catch_all_for_a_hostname_is_refused_only_when_strict() {
        let both = || {
            vec![
                source("route[0]", &["a.example.com"], &["http://first"]),
                source("route[1]", &["A.example.com"], &["http://second"]),
            ]
        };
        let problems = run(both(), true).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "route[1]");
        assert_eq!(
            problems[0].reason,
            "hostname \"a.example.com\" is already routed by route[0]"
        );
        let table = run(both(), false).expect("a push may repeat a hostname");
        let rule = table.find("a.example.com").expect("routed");
        assert_eq!(rule.backends[0].upstream.url, "http://first");
    }

    /// The summary says which `Host` each backend is sent: its own setting, or a rewrite's
    /// hostname (a backend's rewrite before the rule's).
    #[test]
    fn the_summary_names_the_host_each_backend_sees() {
        let rule = |rule_rewrite: bool| {
            let mut rule = source(
                "rules[0]",
                &["s.example.com"],
                &["http://one", "http://two", "http://three"],
            );
            rule.backends[1].host_header = Some(HostHeader::Upstream);
            let rewrite = |host: &str| {
                serde_json::from_value(json!({"type": "URLRewrite", "urlRewrite": {"hostname": host}})).unwrap()
            };
            rule.backends[2].filters = vec![rewrite("own.internal")];
            if rule_rewrite {
                rule.filters = vec![rewrite("rule.internal")];
            }
            rule
        };
        let table = run(vec![rule(false)], true).expect("compiles");
        assert_eq!(
            table.summary[0].host_headers,
            ["client", "upstream", "rewrite:own.internal"]
        );
        assert_eq!(table.summary[0].upstreams, ["http://one", "http://two", "http://three"]);
        let table = run(vec![rule(true)], true).expect("compiles");
        assert_eq!(
            table.summary[0].host_headers,
            ["rewrite:rule.internal", "rewrite:rule.internal", "rewrite:own.internal"]
        );
    }
}
