//! The proxy's own HTTP/1.1 pool for cleartext (`http://`) upstreams, one per worker thread.
//!
//! hyper-util's pooled `Client` costs, per request: a connect future built and a pool lock taken
//! even on a hit, and a spawned task whose only job is to put the connection back once the
//! response body ends. Here a checkout is a lookup in the worker's own idle list, and the
//! response body puts its connection back itself when it ends (docs/benchmarks.md has the
//! numbers). Each connection's hyper state machine runs as a task on the same worker thread, so
//! nothing crosses CPUs.
//!
//! A request goes out again on another connection only when hyper hands it back unsent (the
//! pooled connection turned out closed before any byte of the request was written): whatever the
//! method, nothing reached the upstream. A request whose bytes left is never re-sent.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::{Connection, HttpInfo};

use super::destination::HttpConnector;
use tokio::time::Instant;
use tower_service::Service;

use super::CappedBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request through the pool failed.
#[derive(Debug)]
pub enum H1Error {
    /// No connection could be opened (refused, unreachable, timed out, DNS).
    Connect(BoxError),
    /// The connection failed while sending the request or reading the response head.
    Request(hyper::Error),
    /// The URI has no authority to connect to (a bug upstream of here; checked at compile).
    NoAuthority,
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Connect(e) => write!(f, "cannot connect: {e}"),
            H1Error::Request(e) => e.fmt(f),
            H1Error::NoAuthority => f.write_str("upstream URI without a host"),
        }
    }
}

impl std::error::Error for H1Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            H1Error::Connect(e) => Some(e.as_ref()),
            H1Error::Request(e) => Some(e),
            H1Error::NoAuthority => None,
        }
    }
}

/// A connection: hyper's handle to send on it, and the addresses it connected (set on each
/// response, as hyper-util's client does, for the access log).
struct Conn {
    send: SendRequest<CappedBody>,
    info: Option<HttpInfo>,
}

/// An idle connection, and since when it has been idle.
struct Idle {
    conn: Conn,
    since: Instant,
}

pub struct H1Pool {
    connector: HttpConnector,
    /// By the upstream authority as its URL writes it. Not by `Authority` itself: its `Hash`
    /// feeds the hasher one lowercased byte at a time, which cost 900 instructions a lookup, and
    /// there are two lookups per request.
    idle: Mutex<HashMap<Box<str>, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Whether the task that closes connections idle for longer than `idle_timeout` runs.
    sweeping: AtomicBool,
}

impl H1Pool {
    pub fn new(connector: HttpConnector, max_idle: usize, idle_timeout: Duration) -> Arc<H1Pool> {
        Arc::new(H1Pool {
            connector,
            idle: Mutex::new(HashMap::new()),
            max_idle,
            idle_timeout,
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `req` (an absolute `http://` URI) on an idle connection to its authority, or on a
    /// new one, and returns the response whose body gives the connection back when it ends.
    pub async fn send(self: &Arc<Self>, mut req: Request<CappedBody>) -> Result<Response<PooledBody>, H1Error> {
        let authority = req.uri().authority().cloned().ok_or(H1Error::NoAuthority)?;
        if !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(authority.as_str()).map_err(|_| H1Error::NoAuthority)?;
            req.headers_mut().insert(header::HOST, host);
        }
        // HTTP/1.1 to an origin server: the request target in origin form (RFC 9112 §3.2.1).
        let origin_form = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(origin_form);
        loop {
            let (mut conn, reused) = match self.checkout(&authority) {
                Some(conn) => (conn, true),
                // Boxed: rare next to a pooled hit, and large.
                None => (Box::pin(self.connect(&authority)).await?, false),
            };
            match conn.send.try_send_request(req).await {
                Ok(mut resp) => {
                    if let Some(info) = &conn.info {
                        resp.extensions_mut().insert(info.clone());
                    }
                    let home = Home {
                        pool: Arc::downgrade(self),
                        authority,
                        conn,
                    };
                    return Ok(resp.map(|inner| {
                        PooledBody {
                            inner,
                            home: Some(home),
                        }
                        .released_if_ended()
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Handed back unsent: nothing reached the upstream, so it may go again, on
                    // a fresh connection if the pool has no other.
                    Some(unsent) if reused => {
                        tracing::debug!(upstream = %authority, error = %e.error(), "pooled connection closed before the request was sent; sending it on another");
                        req = unsent;
                    }
                    _ => return Err(H1Error::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently idle connection to `authority` that is open and ready. One whose
    /// response has only just ended may not be ready yet (its hyper task has not run since):
    /// it stays for the next checkout.
    fn checkout(&self, authority: &Authority) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(authority.as_str())?;
        let now = Instant::now();
        // Closed by the upstream, or idle too long: dropping it closes it.
        list.retain(|c| !c.conn.send.is_closed() && now.duration_since(c.since) < self.idle_timeout);
        let ready = list.iter().rposition(|c| c.conn.send.is_ready())?;
        Some(list.swap_remove(ready).conn)
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn, H1Error> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| H1Error::NoAuthority)?;
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(|e| H1Error::Connect(Box::new(e)))?;
        let mut extras = http::Extensions::new();
        io.connected().get_extras(&mut extras);
        let info = extras.remove::<HttpInfo>();
        let (send, conn) = http1::handshake(io).await.map_err(H1Error::Request)?;
        let upstream = authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%upstream, error = %e, "upstream connection closed with an error");
            }
        });
        Ok(Conn { send, info })
    }

    /// Keeps a connection whose response ended, if it can take another request.
    fn put(self: &Arc<Self>, authority: Authority, conn: Conn) {
        if conn.send.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let conn = Idle {
            conn,
            since: Instant::now(),
        };
        // One lookup; the key is allocated only for a new authority.
        match idle.get_mut(authority.as_str()) {
            Some(list) if list.len() >= self.max_idle => return,
            Some(list) => list.push(conn),
            None => {
                idle.insert(authority.as_str().into(), vec![conn]);
            }
        }
        drop(idle);
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

/// Closes connections idle for longer than the pool's `idle_timeout` (or already closed by the
/// upstream), so a route that goes quiet does not hold its upstream's sockets for ever.
async fn sweep(pool: Weak<H1Pool>) {
    let period = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        for list in idle.values_mut() {
            list.retain(|c| !c.conn.send.is_closed() && now.duration_since(c.since) < pool.idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// Where a connection goes back when its response ends.
struct Home {
    pool: Weak<H1Pool>,
    authority: Authority,
    conn: Conn,
}

/// A response body from the pool: gives its connection back once the upstream's body has
/// ended. Dropped earlier (the client went away mid-body), it does not, and hyper closes the
/// connection, which could not carry another request anyway.
pub struct PooledBody {
    inner: Incoming,
    home: Option<Home>,
}

impl PooledBody {
    /// A body that is already complete (HEAD, 204, 304, `Content-Length: 0`) is never polled.
    fn released_if_ended(mut self) -> PooledBody {
        if self.inner.is_end_stream() {
            self.release();
        }
        self
    }

    fn release(&mut self) {
        if let Some(home) = self.home.take() {
            if let Some(pool) = home.pool.upgrade() {
                pool.put(home.authority, home.conn);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            // A failed body leaves the connection in no state to reuse.
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
