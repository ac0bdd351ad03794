//! Logs and metrics.
//!
//! Metrics are plain atomics rendered in the Prometheus text format. Each compiled route rule
//! holds an `Arc<RouteStats>` taken from [`Metrics::route`], so counting a request is a few
//! relaxed atomic adds with no map lookup or lock on the request path (the `prometheus-client`
//! crate's label families take a lock and hash per observation). A route keeps its counters
//! across reloads because the registry hands out the same `Arc` for the same name, and loses
//! them when a table without it is installed ([`Metrics::keep_routes`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::LogFormat;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Why a proxied request failed on the upstream side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Token,
    Other,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 4] = [Self::Connect, Self::Timeout, Self::Token, Self::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Token => "token",
            Self::Other => "other",
        }
    }
}

/// Counters for one route.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// By status class: 1xx … 5xx.
    codes: [AtomicU64; 5],
    /// Cumulative-at-render histogram: `buckets[i]` counts observations in bucket i only.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    errors: [AtomicU64; 4],
}

impl RouteStats {
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.codes[class].fetch_add(1, Relaxed);
        let secs = elapsed.as_secs_f64();
        let idx = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[idx].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
    }
}

/// A counter with a fixed label set known at compile time.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Every metric the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<Arc<str>, Arc<RouteStats>>>,
    /// Requests that never reached a route: 401 (auth) and 404 (no route).
    pub unrouted: Arc<RouteStats>,
    pub token_cache_hits: Counter,
    pub token_fetches: Counter,
    pub token_fetch_failures: Counter,
    pub route_reloads: Counter,
    pub route_reload_failures: Counter,
    /// Persisted route tables moved aside at boot because runs serving them crashed.
    pub routes_quarantined: Counter,
    pub secret_fetches: Counter,
    pub secret_fetch_failures: Counter,
    pub promotions: Counter,
    pub demotions: Counter,
    /// Mirrored copies waiting for their body or being sent (at most `MIRROR_MAX_IN_FLIGHT`).
    pub mirrors_in_flight: Gauge,
    /// Client connections open on the proxy listener, and those closed at once over
    /// `proxy.max_connections`.
    pub proxy_connections: Gauge,
    pub proxy_connections_refused: Counter,
}

impl Metrics {
    /// The stats for route `name`: those of the table in use when it has the route (a route
    /// keeps its counts across tables), else new ones. Not registered here: a table's stats
    /// are rendered once it is installed ([`Metrics::keep_routes`]), so a table that is
    /// compiled and then refused (a stale push) shows nothing.
    pub fn route(&self, name: &Arc<str>) -> Arc<RouteStats> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.get(name).cloned().unwrap_or_default()
    }

    /// Keeps the series of exactly `routes`, the table just installed: a route that went away
    /// takes its series with it (a controller that names routes by generation would otherwise
    /// grow `/metrics` without bound), and a table compiled but never installed leaves none.
    pub fn keep_routes<'a>(&self, routes: impl IntoIterator<Item = (&'a Arc<str>, &'a Arc<RouteStats>)>) {
        let next: BTreeMap<Arc<str>, Arc<RouteStats>> =
            routes.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        *self.routes.lock().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let b = crate::build_info::VERSION;
        let _ = writeln!(
            out,
            "# HELP tunnel_agent_build_info The agent's version and git commit (always 1).\n# TYPE tunnel_agent_build_info gauge\ntunnel_agent_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            escape(b),
            escape(crate::build_info::COMMIT)
        );
        let routes: Vec<(Arc<str>, Arc<RouteStats>)> = {
            let map = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let unrouted: Arc<str> = Arc::from("");
        let all: Vec<(&str, &RouteStats)> = routes
            .iter()
            .map(|(k, v)| (&**k, &**v))
            .chain(std::iter::once((&*unrouted, &*self.unrouted)))
            .collect();

        out.push_str("# HELP tunnel_agent_requests_total Proxied requests by route and status class.\n");
        out.push_str("# TYPE tunnel_agent_requests_total counter\n");
        for (name, s) in &all {
            for (i, c) in s.codes.iter().enumerate() {
                let v = c.load(Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "tunnel_agent_requests_total{{route=\"{}\",code=\"{}xx\"}} {v}",
                        escape(name),
                        i + 1
                    );
                }
            }
        }
        out.push_str("# HELP tunnel_agent_request_duration_seconds Time from request head to response head.\n");
        out.push_str("# TYPE tunnel_agent_request_duration_seconds histogram\n");
        for (name, s) in &all {
            let name = escape(name);
            let mut cumulative = 0;
            for (i, b) in s.buckets.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = BUCKETS.get(i).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                let _ = writeln!(
                    out,
                    "tunnel_agent_request_duration_seconds_bucket{{route=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = s.sum_micros.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "tunnel_agent_request_duration_seconds_sum{{route=\"{name}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "tunnel_agent_request_duration_seconds_count{{route=\"{name}\"}} {cumulative}"
            );
        }
        out.push_str("# HELP tunnel_agent_upstream_errors_total Upstream failures by route and kind.\n");
        out.push_str("# TYPE tunnel_agent_upstream_errors_total counter\n");
        for (name, s) in &all {
            for kind in UpstreamErrorKind::ALL {
                let _ = writeln!(
                    out,
                    "tunnel_agent_upstream_errors_total{{route=\"{}\",kind=\"{}\"}} {}",
                    escape(name),
                    kind.as_str(),
                    s.errors[kind as usize].load(Relaxed)
                );
            }
        }
        counter(
            out,
            "tunnel_agent_id_token_cache_hits_total",
            "Identity tokens served from cache.",
            &self.token_cache_hits,
        );
        counter(
            out,
            "tunnel_agent_id_token_fetches_total",
            "Identity token fetches from the metadata server.",
            &self.token_fetches,
        );
        counter(
            out,
            "tunnel_agent_id_token_fetch_failures_total",
            "Failed identity token fetches.",
            &self.token_fetch_failures,
        );
        counter(
            out,
            "tunnel_agent_route_reloads_total",
            "Route tables applied.",
            &self.route_reloads,
        );
        counter(
            out,
            "tunnel_agent_route_reload_failures_total",
            "Route updates rejected.",
            &self.route_reload_failures,
        );
        counter(
            out,
            "tunnel_agent_routes_quarantined_total",
            "Persisted route tables quarantined at boot (runs serving them crashed).",
            &self.routes_quarantined,
        );
        counter(
            out,
            "tunnel_agent_secret_fetches_total",
            "Secret reads and fetches.",
            &self.secret_fetches,
        );
        counter(
            out,
            "tunnel_agent_secret_fetch_failures_total",
            "Failed secret reads and fetches.",
            &self.secret_fetch_failures,
        );
        counter(
            out,
            "tunnel_agent_promotions_total",
            "Changes of this node's role to active.",
            &self.promotions,
        );
        counter(
            out,
            "tunnel_agent_demotions_total",
            "Changes of this node's role to standby.",
            &self.demotions,
        );
        let name = "tunnel_agent_mirrors_in_flight";
        let _ = writeln!(
            out,
            "# HELP {name} Mirrored requests waiting for their body or being sent.\n# TYPE {name} gauge\n{name} {}",
            self.mirrors_in_flight.get()
        );
        self.render_connections(out);
    }

    fn render_connections(&self, out: &mut String) {
        let name = "tunnel_agent_proxy_connections";
        let _ = writeln!(
            out,
            "# HELP {name} Client connections open on the proxy listener.\n# TYPE {name} gauge\n{name} {}",
            self.proxy_connections.get()
        );
        counter(
            out,
            "tunnel_agent_proxy_connections_refused_total",
            "Client connections closed at once because proxy.max_connections were open.",
            &self.proxy_connections_refused,
        );
    }
}

fn counter(out: &mut String, name: &str, help: &str, c: &Counter) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
}

/// Escapes a label value (backslash, quote, newline), per the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM=dev:inode` for the
/// service's stdout/stderr, and a child that reopened stderr (or an SSH shell that inherited the
/// variable) has a different device/inode. `tracing_journald::layer()` succeeds anywhere the
/// journal socket exists, so it cannot answer this itself.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(libc::STDERR_FILENO) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Installs the global subscriber. `level` was validated by config.
pub fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(level)?;
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Journald => {
            let layer = tracing_journald::layer()?.with_syslog_identifier("tunnel-agent".to_owned());
            registry.with(layer).try_init()?
        }
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
            .try_init()?,
        _ => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false),
            )
            .try_init()?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = Metrics::default();
        let name: Arc<str> = Arc::from("r1");
        let s = m.route(&name);
        m.keep_routes([(&name, &s)]);
        s.observe(200, Duration::from_millis(3));
        s.observe(503, Duration::from_secs(20));
        s.upstream_error(UpstreamErrorKind::Timeout);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("tunnel_agent_requests_total{route=\"r1\",code=\"2xx\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tunnel_agent_requests_total{route=\"r1\",code=\"5xx\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tunnel_agent_request_duration_seconds_bucket{route=\"r1\",le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tunnel_agent_request_duration_seconds_bucket{route=\"r1\",le=\"+Inf\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("tunnel_agent_upstream_errors_total{route=\"r1\",kind=\"timeout\"} 1"),
            "{out}"
        );
        assert!(
            Arc::ptr_eq(&s, &m.route(&name)),
            "an installed route keeps its counters"
        );
    }

    #[test]
    fn only_the_installed_tables_routes_have_series() {
        let m = Metrics::default();
        let (old, new): (Arc<str>, Arc<str>) = (Arc::from("old"), Arc::from("new"));
        let old_stats = m.route(&old);
        m.keep_routes([(&old, &old_stats)]);
        // Compiled for a table that is never installed (a stale push): no series.
        let _refused = m.route(&Arc::from("refused"));
        let new_stats = m.route(&new);
        m.keep_routes([(&new, &new_stats)]);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("route=\"new\""), "{out}");
        assert!(
            !out.contains("route=\"old\"") && !out.contains("route=\"refused\""),
            "{out}"
        );
        assert!(
            !Arc::ptr_eq(&old_stats, &m.route(&old)),
            "a removed route starts from zero"
        );
    }

    #[test]
    fn role_changes_are_exported() {
        let m = Metrics::default();
        m.promotions.inc();
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("\ntunnel_agent_promotions_total 1\n"), "{out}");
        assert!(out.contains("\ntunnel_agent_demotions_total 0\n"), "{out}");
    }

    #[test]
    fn build_info_names_version_and_commit() {
        let mut out = String::new();
        Metrics::default().render(&mut out);
        let line = format!(
            "\ntunnel_agent_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
            crate::build_info::VERSION,
            crate::build_info::COMMIT
        );
        assert!(out.contains(&line), "{line} missing in {out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
