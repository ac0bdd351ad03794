//! Slow and idle clients: the request body's read timeout and the idle timeout of upgraded
//! connections. Both count from the last byte that moved, in one clock the data path touches
//! with a relaxed store, so no timer is armed per read.
//!
//! - A request body that stops arriving (`proxy.body_read_timeout`, nginx's
//!   `client_body_timeout`): before the response head, the wait for that head already runs a
//!   timer ([`super::upstream::response_head`]) and it also watches the body, so a stalled
//!   upload gets 408;
//!   after the response has started (rare: the upstream answered before the body ended), the
//!   body arms its own timer only while it waits for the client, and the upload is reset.
//!   Only waiting *for the client* counts: an upstream that stops reading is the upstream's
//!   fault and gets the backend timeout (504) instead.
//! - An upgraded connection (WebSocket) with no byte in either direction for
//!   `proxy.upgrade_idle_timeout` is closed on both sides: one timer per connection, re-armed
//!   only when it fires.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When data last moved, in milliseconds after `start`.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// The request body is waiting for the client (its last poll was `Pending` on the client).
    waiting_for_client: AtomicBool,
    /// The request body has ended (or failed): no body timeout any more.
    body_done: AtomicBool,
    /// The upstream's response head has arrived: the body times itself from now on.
    response_started: AtomicBool,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting_for_client: AtomicBool::new(false),
            body_done: AtomicBool::new(false),
            response_started: AtomicBool::new(false),
        }
    }

    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn last(&self) -> Instant {
        crate::deadline::after(self.start, Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    pub fn set_waiting_for_client(&self, waiting: bool) {
        self.waiting_for_client.store(waiting, Ordering::Relaxed);
    }

    pub fn set_body_done(&self) {
        self.body_done.store(true, Ordering::Relaxed);
        self.waiting_for_client.store(false, Ordering::Relaxed);
    }

    /// The body is open and the proxy is waiting for the client's next bytes.
    pub fn stalled_on_client(&self) -> bool {
        !self.body_done.load(Ordering::Relaxed) && self.waiting_for_client.load(Ordering::Relaxed)
    }

    pub fn set_response_started(&self) {
        self.response_started.store(true, Ordering::Relaxed);
    }

    pub fn response_started(&self) -> bool {
        self.response_started.load(Ordering::Relaxed)
    }

    pub fn body_done(&self) -> bool {
        self.body_done.load(Ordering::Relaxed)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// The request body's timer once the response has started: created the first time the body
/// waits for the client after that, so a request whose body ends before its response (nearly
/// all) never allocates one.
#[derive(Default)]
pub struct BodyTimer {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl BodyTimer {
    /// Whether the body has waited for the client for `limit` since `activity` last moved;
    /// registers a wake-up at that time otherwise.
    pub fn expired(&mut self, cx: &mut Context<'_>, activity: &Activity, limit: Duration) -> bool {
        let deadline = crate::deadline::after(activity.last(), limit);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx).is_ready()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no request body bytes within proxy.body_read_timeout ({0:?})")]
pub struct BodyReadTimeout(pub Duration);

/// Joins the client's and the upstream's sides of an upgrade once both have switched, and
/// copies between them under `idle` ([`splice_with_idle`]).
pub async fn splice_upgraded(downstream: OnUpgrade, upstream: OnUpgrade, route: Arc<str>, idle: Duration) {
    match tokio::try_join!(downstream, upstream) {
        Ok((down, up)) => {
            if let Err(e) = splice_with_idle(TokioIo::new(down), TokioIo::new(up), idle).await {
                tracing::debug!(%route, error = %e, "route {route}: upgraded connection ended: {e}");
            }
        }
        Err(e) => tracing::warn!(%route, error = %e, "route {route}: upgrade failed: {e}"),
    }
}

/// Copies both ways between the two sides of an upgraded connection until either ends, or
/// until no byte has moved either way for `idle`; then both are dropped (closed).
pub async fn splice_with_idle<A, B>(a: A, b: B, idle: Duration) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let mut a = Touching {
        inner: a,
        activity: &activity,
    };
    let mut b = Touching {
        inner: b,
        activity: &activity,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let deadline = crate::deadline::after(activity.last(), idle);
        tokio::select! {
            done = &mut copy => return done.map(drop),
            _ = tokio::time::sleep_until(deadline) => {
                if crate::deadline::after(activity.last(), idle) <= Instant::now() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bytes either way within proxy.upgrade_idle_timeout ({idle:?})"),
                    ));
                }
            }
        }
    }
}

/// Marks `activity` on every read that brought bytes (every byte written was read first).
struct Touching<'a, S> {
    inner: S,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touching<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
