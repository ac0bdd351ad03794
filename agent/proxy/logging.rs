//! The logging phase: what a request leaves behind once its answer is known. The route's
//! status and latency, the access log's note of the proxy's own answer, and, for a failure
//! worth one, the upstream-error metric and one log line naming the route (the client is told
//! only what [`ProxyError::client_message`] says; the why is here).

use http::StatusCode;
use tokio::time::Instant;

use super::access_log::Exchange;
use super::ProxyError;
use crate::routing::table::Rule;
use crate::telemetry::Metrics;

/// A request refused before it found a rule (401, 400, 404): counted as unrouted.
pub(super) fn unrouted(metrics: &Metrics, e: &ProxyError, start: Instant, exchange: Option<&Exchange>) {
    metrics.unrouted.observe(e.status().as_u16(), start.elapsed());
    if let Some(x) = exchange {
        x.failed(e.code(), None, false);
    }
}

/// Every answer to a request a rule matched, once its head is final.
pub(super) fn routed(rule: &Rule, status: StatusCode, start: Instant) {
    rule.stats.observe(status.as_u16(), start.elapsed());
}

/// A request a rule matched that the proxy answered itself: the access log's note, then the
/// upstream-error metric and the log line where the failure is the upstream's.
pub(super) fn failed(rule: &Rule, e: &ProxyError, exchange: Option<&Exchange>) {
    if let Some(x) = exchange {
        x.failed(e.code(), e.upstream(), e.upstream_kind().is_some());
    }
    if let Some(kind) = e.upstream_kind() {
        rule.stats.upstream_error(kind);
    }
    let route = &rule.route;
    match e {
        ProxyError::Unavailable { status } => {
            tracing::debug!(%route, status = status.as_u16(), "route {route}: marked unavailable by its table; answering {}", status.as_u16())
        }
        ProxyError::RequestTimeout { limit } => {
            tracing::warn!(%route, timeout_s = limit.as_secs_f64(), "route {route}: request timeout ({limit:?}) reached before a response; answering 504")
        }
        ProxyError::DestinationRefused { upstream, why } => {
            tracing::warn!(%route, %upstream, error = %why, code = e.code(), "route {route}: upstream {upstream} refused (destination_refused): {why}; answering 502")
        }
        ProxyError::TokenUnavailable { upstream, .. } => {
            tracing::warn!(%route, %upstream, error = %e, "route {route}: no identity token for {upstream}; answering 503: {e}")
        }
        ProxyError::UpstreamTimeout { upstream, timeout } => {
            tracing::warn!(%route, %upstream, timeout_s = timeout.as_secs_f64(), "route {route}: upstream {upstream} did not answer within {timeout:?}; answering 504")
        }
        ProxyError::Upstream { upstream, cause, .. } => {
            tracing::warn!(%route, %upstream, error = %cause, "route {route}: upstream request failed ({upstream}); answering 502: {cause}")
        }
        // The client is told only that it failed (ProxyError::client_message); the why is here.
        ProxyError::BadRewrite(_) => {
            tracing::warn!(%route, error = %e, "route {route}: {e}; answering 500")
        }
        ProxyError::BadUpstreamUri(_) => {
            tracing::debug!(%route, error = %e, "route {route}: {e}; answering 400")
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::test_support::table;
    use crate::routing::RequestHead;

    #[test]
    fn the_answer_is_counted_where_it_belongs() {
        let metrics = Metrics::default();
        let toml = "[[route]]\nname = \"r1\"\nhostnames = [\"app.example.com\"]\nupstream = \"http://10.0.0.9:8080\"\n";
        let t = table(toml);
        let req = http::Request::builder().uri("/").body(()).unwrap();
        let rule = t.route("app.example.com", &RequestHead::of(&req)).unwrap().rule;
        metrics.keep_routes([(&rule.route, &rule.stats)]);
        let start = Instant::now();
        let timeout = ProxyError::UpstreamTimeout {
            upstream: "http://10.0.0.9:8080".into(),
            timeout: Duration::from_secs(1),
        };
        let x = Exchange::default();
        failed(rule, &timeout, Some(&x));
        routed(rule, timeout.status(), start);
        let no_route = ProxyError::NoRoute {
            host: "other.example.com".into(),
            path: "/".into(),
        };
        unrouted(&metrics, &no_route, start, None);
        let mut out = String::new();
        metrics.render(&mut out);
        for line in [
            "tunnel_agent_upstream_errors_total{route=\"r1\",kind=\"timeout\"} 1",
            "tunnel_agent_requests_total{route=\"r1\",code=\"5xx\"} 1",
            "tunnel_agent_requests_total{route=\"\",code=\"4xx\"} 1",
        ] {
            assert!(out.contains(line), "{line} in {out}");
        }
    }
}
