//! Logs and metrics.
//!
//! Metrics are plain atomics rendered in the Prometheus text format. Each compiled route rule
//! holds an `Arc<RouteStats>` taken from [`Metrics::route`], so counting a request is a few
//! relaxed atomic adds with no map lookup or lock on the request path (the `prometheus-client`
//! crate's label families take a lock and hash per observation). A route keeps its counters
//! across reloads because the registry hands out the same `Arc` for the same name, and loses
//! them when a table without it is installed ([`Metrics::keep_routes`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing_subscriber::fmt::writer::EitherWriter;

use crate::config::{LogFormat, LogStream};
use crate::prom_text::{self, Family, Kind};

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
        let build = [
            ("version", crate::build_info::VERSION),
            ("commit", crate::build_info::COMMIT),
        ];
        Family::open(
            out,
            "tunnel_agent_build_info",
            Kind::Gauge,
            "The agent's version and git commit (always 1).",
        )
        .sample(&build, 1);
        let routes: Vec<(Arc<str>, Arc<RouteStats>)> = {
            let map = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let all: Vec<(&str, &RouteStats)> = (routes.iter().map(|(k, v)| (&**k, &**v)))
            .chain(std::iter::once(("", &*self.unrouted)))
            .collect();
        render_requests(out, &all);
        render_durations(out, &all);
        render_upstream_errors(out, &all);
        self.render_counters(out);
    }

    /// The counters and gauges without labels.
    fn render_counters(&self, out: &mut String) {
        let counters: [(&str, &str, &Counter); 10] = [
            (
                "tunnel_agent_id_token_cache_hits_total",
                "Identity tokens served from cache.",
                &self.token_cache_hits,
            ),
            (
                "tunnel_agent_id_token_fetches_total",
                "Identity token fetches from the metadata server.",
                &self.token_fetches,
            ),
            (
                "tunnel_agent_id_token_fetch_failures_total",
                "Failed identity token fetches.",
                &self.token_fetch_failures,
            ),
            (
                "tunnel_agent_route_reloads_total",
                "Route tables applied.",
                &self.route_reloads,
            ),
            (
                "tunnel_agent_route_reload_failures_total",
                "Route updates rejected.",
                &self.route_reload_failures,
            ),
            (
                "tunnel_agent_routes_quarantined_total",
                "Persisted route tables quarantined at boot (runs serving them crashed).",
                &self.routes_quarantined,
            ),
            (
                "tunnel_agent_secret_fetches_total",
                "Secret reads and fetches.",
                &self.secret_fetches,
            ),
            (
                "tunnel_agent_secret_fetch_failures_total",
                "Failed secret reads and fetches.",
                &self.secret_fetch_failures,
            ),
            (
                "tunnel_agent_promotions_total",
                "Changes of this node's role to active.",
                &self.promotions,
            ),
            (
                "tunnel_agent_demotions_total",
                "Changes of this node's role to standby.",
                &self.demotions,
            ),
        ];
        for (name, help, counter) in counters {
            prom_text::single(out, name, Kind::Counter, help, counter.get());
        }
        prom_text::single(
            out,
            "tunnel_agent_mirrors_in_flight",
            Kind::Gauge,
            "Mirrored requests waiting for their body or being sent.",
            self.mirrors_in_flight.get(),
        );
        prom_text::single(
            out,
            "tunnel_agent_proxy_connections",
            Kind::Gauge,
            "Client connections open on the proxy listener.",
            self.proxy_connections.get(),
        );
        prom_text::single(
            out,
            "tunnel_agent_proxy_connections_refused_total",
            Kind::Counter,
            "Client connections closed at once because proxy.max_connections were open.",
            self.proxy_connections_refused.get(),
        );
    }
}

/// Requests by route and status class; a class no request had is left out.
fn render_requests(out: &mut String, all: &[(&str, &RouteStats)]) {
    let mut f = Family::open(
        out,
        "tunnel_agent_requests_total",
        Kind::Counter,
        "Proxied requests by route and status class.",
    );
    for (name, s) in all {
        for (i, c) in s.codes.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let code = format!("{}xx", i + 1);
                f.sample(&[("route", name), ("code", &code)], v);
            }
        }
    }
}

/// The latency histogram: cumulative buckets, sum and count per route.
fn render_durations(out: &mut String, all: &[(&str, &RouteStats)]) {
    let mut f = Family::open(
        out,
        "tunnel_agent_request_duration_seconds",
        Kind::Histogram,
        "Time from request head to response head.",
    );
    for (name, s) in all {
        let mut cumulative = 0;
        for (i, b) in s.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BUCKETS.get(i).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            f.suffixed("_bucket", &[("route", name), ("le", &le)], cumulative);
        }
        let sum = s.sum_micros.load(Relaxed) as f64 / 1e6;
        f.suffixed("_sum", &[("route", name)], sum);
        f.suffixed("_count", &[("route", name)], cumulative);
    }
}

/// Upstream failures by route and kind, every kind (zeros included).
fn render_upstream_errors(out: &mut String, all: &[(&str, &RouteStats)]) {
    let mut f = Family::open(
        out,
        "tunnel_agent_upstream_errors_total",
        Kind::Counter,
        "Upstream failures by route and kind.",
    );
    for (name, s) in all {
        for kind in UpstreamErrorKind::ALL {
            let v = s.errors[kind as usize].load(Relaxed);
            f.sample(&[("route", name), ("kind", kind.as_str())], v);
        }
    }
}

/// Whether `stream` is connected to the journal: systemd sets `JOURNAL_STREAM=dev:inode` for
/// the service's stdout/stderr, and a child that reopened the stream (or an SSH shell that
/// inherited the variable) has a different device/inode. `tracing_journald::layer()` succeeds
/// anywhere the journal socket exists, so it cannot answer this itself.
pub fn is_journal(stream: LogStream) -> bool {
    let Ok(journal) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = journal.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let fd = match stream {
        LogStream::Stderr => libc::STDERR_FILENO,
        LogStream::Stdout => libc::STDOUT_FILENO,
    };
    match nix::sys::stat::fstat(fd) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The chosen stream as the fmt layer's writer. The layer formats an event into one buffer and
/// writes it with one `write_all`, which holds the handle's lock throughout, so lines from
/// different threads never interleave; nothing is allocated per line.
#[derive(Debug, Clone, Copy)]
struct StreamWriter(LogStream);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StreamWriter {
    type Writer = EitherWriter<std::io::Stdout, std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        match self.0 {
            LogStream::Stdout => EitherWriter::A(std::io::stdout()),
            LogStream::Stderr => EitherWriter::B(std::io::stderr()),
        }
    }
}

/// Installs the global subscriber, writing to `stream` (the journal ignores it). `level` was
/// validated by config.
pub fn init_logging(format: LogFormat, stream: LogStream, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(level)?;
    let format = match format {
        LogFormat::Auto if is_journal(stream) => LogFormat::Journald,
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
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(StreamWriter(stream)),
            )
            .try_init()?,
        _ => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(StreamWriter(stream))
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
    fn route_names_are_escaped_in_every_family() {
        let m = Metrics::default();
        let name: Arc<str> = Arc::from("a\"b\\c\nd");
        let s = m.route(&name);
        m.keep_routes([(&name, &s)]);
        s.observe(200, Duration::from_millis(1));
        let mut out = String::new();
        m.render(&mut out);
        let escaped = r#"route="a\"b\\c\nd""#;
        for family in [
            "requests_total{",
            "duration_seconds_bucket{",
            "duration_seconds_sum{",
            "upstream_errors_total{",
        ] {
            assert!(
                out.lines().any(|l| l.contains(family) && l.contains(escaped)),
                "{family} without {escaped} in:\n{out}"
            );
        }
        assert!(!out.contains("c\nd"), "a raw newline in a label:\n{out}");
    }
}
