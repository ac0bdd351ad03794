//! What a client connection may hold: a place among `proxy.max_connections`, and, over HTTP/2,
//! an idle timeout when no stream is open (hyper's HTTP/1 has its own; its HTTP/2 has only
//! keep-alive pings, which a live but silent client answers for ever).
//!
//! Beyond the cap a connection is accepted and closed at once rather than left unaccepted: with
//! `SO_REUSEPORT` each worker has its own backlog, which the kernel does not rebalance, so an
//! unaccepted connection waits there until the client gives up, and meanwhile the backlog fills
//! and new connections are dropped without a word. A close is an immediate, visible error
//! (cloudflared answers 502 and retries on its next request), counted in `/metrics`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
use tokio::time::Instant;

use super::ConnPhase;
use crate::telemetry::Metrics;

/// The cap on concurrent client connections, shared by every worker of one listener.
#[derive(Debug)]
pub struct ConnCap {
    max: usize,
    open: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl ConnCap {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            max,
            open: AtomicUsize::new(0),
            metrics,
        })
    }

    /// A place for one more connection, or `None` (counted as refused) when all are taken.
    pub fn take(self: &Arc<Self>) -> Option<ConnSlot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.proxy_connections_refused.inc();
            return None;
        }
        self.metrics.proxy_connections.inc();
        Some(ConnSlot(self.clone()))
    }
}

/// One connection's place; held by its socket (so an upgraded connection keeps it too).
#[derive(Debug)]
pub struct ConnSlot(Arc<ConnCap>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.proxy_connections.dec();
    }
}

/// Runs one connection until it ends: shut down gracefully (HTTP/2 GOAWAY, HTTP/1 close after
/// the response in flight) when the listener stops, or when an HTTP/2 connection has had no
/// stream for `idle`.
pub async fn drive<C>(conn: C, phase: Arc<ConnPhase>, idle: Duration, mut stop: watch::Receiver<Option<Duration>>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut idle_check = std::pin::pin!(idle_h2(&phase, idle));
    let mut told = std::pin::pin!(async {
        let _ = stop.wait_for(Option::is_some).await;
        first_request(&phase).await;
    });
    let mut closing = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "client connection closed with error: {e}");
                }
                return;
            }
            _ = told.as_mut(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle_check.as_mut(), if !closing => {
                tracing::debug!(idle_s = idle.as_secs_f64(), "HTTP/2 client connection with no stream for {idle:?}; closing");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// How long a connection accepted just before a stop may take to send its first request head.
const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(500);

/// Returns once an HTTP/1 connection that has served no request yet has its first one under way,
/// or after [`FIRST_REQUEST_WAIT`]. hyper closes a connection with no request in progress at
/// once when told to shut down; for one accepted a moment before (its request on the wire, as
/// during an upgrade's drain) the client would see it closed without an answer, and a client
/// retries only on a connection it had used before.
async fn first_request(phase: &ConnPhase) {
    let deadline = Instant::now() + FIRST_REQUEST_WAIT;
    while phase.started.load(Ordering::Acquire) == 0 && !phase.h2.load(Ordering::Acquire) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Resolves once the connection speaks HTTP/2 and no stream has been open for a whole `idle`
/// period. Checked once a period against the request counters (no per-request clock): a
/// connection is closed between `idle` and twice `idle` after its last stream ended.
async fn idle_h2(phase: &ConnPhase, idle: Duration) {
    let mut seen = None;
    loop {
        tokio::time::sleep(idle).await;
        if !phase.h2.load(Ordering::Acquire) {
            continue;
        }
        let now = (
            phase.started.load(Ordering::Acquire),
            phase.in_flight.load(Ordering::Acquire),
        );
        if now.1 == 0 && seen == Some(now) {
            return;
        }
        seen = Some(now);
    }
}
