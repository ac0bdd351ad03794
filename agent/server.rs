//! Serving HTTP on a listener: the accept loop, per-connection limits and graceful drain. Used by
//! the proxy and the health listener alike.
//!
//! Two client-side timeouts that hyper alone conflates: in hyper 1.x the HTTP/1 "header read
//! timeout" timer starts when the connection starts waiting for a request head, which on a
//! keep-alive connection means *while idle*. Set to a slowloris-sized 10 s, it would close
//! cloudflared's pooled origin connections long before cloudflared's own 90 s keep-alive, and a
//! request racing that close fails at the edge. So hyper's timer is set to the idle timeout
//! (> 90 s), and [`HeadTimeoutIo`] enforces the short header deadline from the first byte of a
//! request head until hyper hands the parsed request to the service.
//! The same wrapper refuses request heads with bare-LF line ends before hyper parses them
//! ([`crate::framing`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::framing::{BareLfGuard, BARE_LF_RESPONSE};
use crate::shutdown::{self, Grace, ShutdownWatch, Stop};

mod conns;

pub use conns::ConnCap;
use conns::ConnSlot;

/// Client-side limits for one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// HTTP/1 keep-alive, and HTTP/2 with no open stream ([`conns`]).
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// HTTP/2 PINGs this often; a peer that does not answer one within 20 s is closed.
    pub http2_keep_alive_interval: Duration,
    /// The cap on concurrent connections (the proxy's); `None` on the internal listeners.
    pub max_connections: Option<Arc<ConnCap>>,
}

impl Limits {
    /// These limits with a cap of `max` concurrent connections, counted in `metrics`.
    pub fn capped(self, max: usize, metrics: &Arc<crate::telemetry::Metrics>) -> Limits {
        Limits {
            max_connections: Some(ConnCap::new(max, metrics.clone())),
            ..self
        }
    }
}

/// Request accounting shared by a connection's IO and its service.
#[derive(Debug, Default)]
struct ConnPhase {
    /// Requests whose head hyper has parsed.
    started: AtomicU64,
    /// Responses not yet finished (body not yet dropped by hyper).
    in_flight: AtomicU64,
    /// The connection answered 101 and now carries another protocol (WebSocket): its bytes
    /// are frames, not request heads, and long silences between them are normal.
    upgraded: AtomicBool,
    /// The client opened with the HTTP/2 preface.
    h2: AtomicBool,
}

/// Closes a connection whose request head takes longer than the limit, counted from the first
/// byte of that head. Disabled for HTTP/2 (a PING is not a request head) and once the
/// connection is upgraded (a WebSocket frame is not one either).
struct HeadTimeoutIo<S> {
    inner: S,
    phase: Arc<ConnPhase>,
    timeout: Duration,
    /// When the current head started and `started` at that time.
    head: Option<(Instant, u64)>,
    sleep: Option<Pin<Box<Sleep>>>,
    first_read: bool,
    disabled: bool,
    /// Refuses request heads with bare-LF line ends (see [`crate::framing`]).
    bare_lf: BareLfGuard,
    /// Bytes of [`BARE_LF_RESPONSE`] written, once a bare LF was found.
    rejecting: Option<usize>,
    /// Held for as long as the connection's socket exists, including after an upgrade, when
    /// hyper no longer tracks it: shutdown waits for every one to be dropped.
    _alive: watch::Receiver<()>,
    /// The connection's place under the listener's cap, if it has one.
    _slot: Option<ConnSlot>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadTimeoutIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.rejecting.is_some() {
            return this.poll_reject(cx);
        }
        if this.disabled || this.phase.upgraded.load(Ordering::Acquire) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let started = this.phase.started.load(Ordering::Acquire);
        if this.head.is_some_and(|(_, seq)| seq != started) {
            this.head = None;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if this.first_read && !fresh.is_empty() {
                    this.first_read = false;
                    if fresh.starts_with(b"PRI * HTTP/2") {
                        this.disabled = true;
                        this.phase.h2.store(true, Ordering::Release);
                        return Poll::Ready(Ok(()));
                    }
                }
                if this.bare_lf.active() && this.bare_lf.feed(fresh).is_err() {
                    // hyper never sees the bad head; with no response of ours in flight the
                    // socket is free for the 400 (a pipelined one mid-response just closes).
                    buf.set_filled(before);
                    tracing::debug!("request head with a bare LF line end; answering 400 and closing");
                    if this.phase.in_flight.load(Ordering::Acquire) > 0 {
                        return Poll::Ready(Err(bare_lf_error()));
                    }
                    this.rejecting = Some(0);
                    return this.poll_reject(cx);
                }
                if !fresh.is_empty() && this.head.is_none() && this.phase.in_flight.load(Ordering::Acquire) == 0 {
                    this.head = Some((Instant::now(), started));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some((since, _)) = this.head {
                    let deadline = crate::deadline::after(since, this.timeout);
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if sleep.deadline() != deadline {
                        sleep.as_mut().reset(deadline);
                    }
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not completed within header_read_timeout",
                        )));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HeadTimeoutIo<S> {
    fn new(
        inner: S,
        phase: &Arc<ConnPhase>,
        timeout: Duration,
        alive: watch::Receiver<()>,
        slot: Option<ConnSlot>,
    ) -> HeadTimeoutIo<S> {
        HeadTimeoutIo {
            inner,
            phase: phase.clone(),
            timeout,
            head: None,
            sleep: None,
            first_read: true,
            disabled: false,
            bare_lf: BareLfGuard::default(),
            rejecting: None,
            _alive: alive,
            _slot: slot,
        }
    }

    /// Writes the 400 for a bare-LF head, then fails the read so hyper closes the connection.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(written) = self.rejecting.filter(|w| *w < BARE_LF_RESPONSE.len()) {
            match Pin::new(&mut self.inner).poll_write(cx, &BARE_LF_RESPONSE[written..]) {
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(n)) => self.rejecting = Some(written + n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => Poll::Pending,
            _ => Poll::Ready(Err(bare_lf_error())),
        }
    }
}

fn bare_lf_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "request head with a bare LF line end (answered 400)",
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadTimeoutIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that tells the connection when the response is finished (dropped by hyper).
pub struct TrackedBody<B> {
    inner: B,
    phase: Arc<ConnPhase>,
}

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        self.phase.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request's response as the connection sends it: its body tracked, and the connection
    /// marked upgraded on a 101 before hyper writes it, so no upgraded byte is ever timed as a
    /// request head. A struct rather than an `async` block: a block awaiting the handler's
    /// future holds it twice (captured, then awaited), and this future is moved whole for
    /// every request.
    struct Tracked<F> {
        #[pin]
        response: F,
        // Handed to the body when the response is ready (taken, not cloned again).
        phase: Option<Arc<ConnPhase>>,
    }
}

impl<F: Future<Output = Response<B>>, B> Future for Tracked<F> {
    type Output = Result<Response<TrackedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.response.poll(cx));
        // Polled again after it was ready: the handler's future has already misbehaved.
        let Some(phase) = this.phase.take() else {
            return Poll::Pending;
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            phase.upgraded.store(true, Ordering::Release);
        }
        Poll::Ready(Ok(resp.map(|inner| TrackedBody { inner, phase })))
    }
}

/// A running listener (one or several accept loops on the same address), stopped through its
/// [`Stop`] ([`ServerHandle::into_stop`]). Dropping it stops it at once, without a grace.
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    signal: watch::Sender<Option<Duration>>,
    /// Ends once every accept loop has: whether their connections finished within the grace.
    task: JoinHandle<bool>,
}

impl ServerHandle {
    /// The listener's stop: it stops accepting, lets in-flight requests (and upgraded
    /// connections) finish for up to the grace, and closes idle connections.
    pub fn into_stop(self, what: &'static str, grace: Grace) -> Stop {
        Stop::new(what, grace, self.signal, self.task)
    }
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
}

/// Serves `handler` on `listener` until shut down, on the caller's runtime.
pub fn serve<H, F, B>(listener: TcpListener, limits: Limits, handler: H) -> anyhow::Result<ServerHandle>
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let local_addr = listener.local_addr()?;
    let (signal, watch) = shutdown::channel();
    let task = tokio::spawn(accept_loop(listener, limits, handler, watch));
    Ok(ServerHandle {
        local_addr,
        signal,
        task,
    })
}

/// `workers` listening sockets on `addr` (`SO_REUSEPORT`: the kernel spreads new connections
/// over them), for [`serve_workers`]. The first picks the port when `addr` asks for port 0; the
/// others join it. Kept apart from serving, so the sockets can come from elsewhere.
pub fn bind_workers(addr: SocketAddr, what: &str, workers: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut local_addr = addr;
    let mut sockets = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let socket = reuse_port_listener(local_addr)
            .and_then(|l| l.into_std())
            .map_err(|e| anyhow::anyhow!("cannot listen on {local_addr} ({what}): {e}"))?;
        local_addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Serves each of `sockets` from a thread of its own, with its own single-threaded runtime. A
/// connection, its requests and whatever `make_handler(i)` gives worker `i` (the proxy's
/// upstream pools) stay on one thread, as in nginx's worker processes: no work stealing and no
/// wake-ups across CPUs on the request path. Logs `proxy stopped` once every worker has.
pub fn serve_workers<M, H, F, B>(
    sockets: Vec<std::net::TcpListener>,
    limits: Limits,
    make_handler: M,
) -> anyhow::Result<ServerHandle>
where
    M: Fn(usize) -> H,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (signal, _) = shutdown::channel();
    let local_addr = sockets
        .first()
        .ok_or_else(|| anyhow::anyhow!("no socket to serve"))?
        .local_addr()?;
    let mut loops = Vec::with_capacity(sockets.len());
    for (i, socket) in sockets.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start proxy worker {i}: {e}"))?;
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(socket).map_err(|e| anyhow::anyhow!("cannot start proxy worker {i}: {e}"))?
        };
        let (done, loop_done) = oneshot::channel();
        let handler = make_handler(i);
        let watch = signal.subscribe();
        let limits = limits.clone();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                let drained = runtime.block_on(accept_loop(listener, limits, handler, watch));
                // Connections still open after the grace are dropped with the runtime.
                drop(runtime);
                let _ = done.send(drained);
            })
            .map_err(|e| anyhow::anyhow!("cannot start proxy worker {i}: {e}"))?;
        loops.push(loop_done);
    }
    let task = tokio::spawn(async move {
        let mut drained = true;
        for done in loops {
            drained &= done.await.unwrap_or(false);
        }
        tracing::info!(
            drained,
            "proxy stopped ({})",
            if drained {
                "every request finished"
            } else {
                "requests cut at the shutdown grace"
            }
        );
        drained
    });
    Ok(ServerHandle {
        local_addr,
        signal,
        task,
    })
}

/// A listening socket with `SO_REUSEPORT` (and `SO_REUSEADDR`, as tokio's `bind` sets), in the
/// current runtime.
fn reuse_port_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The HTTP/1 and HTTP/2 settings every connection of a listener is served with.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes);
    // The same head limit over HTTP/2, where it is SETTINGS_MAX_HEADER_LIST_SIZE (h2 answers
    // 431 above it); left alone, hyper announces its own 16 KiB whatever the config says.
    // PINGs find a peer that is gone without a FIN (hyper's default sends none).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.http2_keep_alive_interval))
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT);
    builder
}

/// How long an HTTP/2 peer has to answer a keep-alive PING (hyper's default).
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Accepts and serves connections until `stopped` carries a grace, then drains them for up to
/// that long. Returns whether every connection finished in time.
async fn accept_loop<H, F, B>(listener: TcpListener, limits: Limits, handler: H, mut stopped: ShutdownWatch) -> bool
where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let local_addr = match listener.local_addr() {
        Ok(a) => a.to_string(),
        Err(_) => "?".to_owned(),
    };
    let (alive, alive_token) = watch::channel(());
    let builder = connection_builder(&limits);
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = %local_addr, error = %e, "accept failed on {local_addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Over the cap: closed at once (see `conns` for why not left unaccepted).
                let slot = match &limits.max_connections {
                    None => None,
                    Some(cap) => match cap.take() {
                        Some(slot) => Some(slot),
                        None => continue,
                    },
                };
                let _ = stream.set_nodelay(true);
                let phase = Arc::new(ConnPhase::default());
                let io = HeadTimeoutIo::new(stream, &phase, limits.header_read_timeout, alive_token.clone(), slot);
                let handler = handler.clone();
                let conn_phase = phase.clone();
                let service = hyper::service::service_fn(move |req| {
                    conn_phase.started.fetch_add(1, Ordering::AcqRel);
                    conn_phase.in_flight.fetch_add(1, Ordering::AcqRel);
                    Tracked {
                        response: handler(peer, req),
                        phase: Some(conn_phase.clone()),
                    }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
                tokio::spawn(conns::drive(conn, phase, limits.idle_timeout, stopped.clone()));
            }
            _ = stopped.changed() => break stopped.borrow().unwrap_or_default(),
        }
    };
    drop(listener);
    drop(alive_token);
    // Each connection shuts down gracefully on the same signal (`conns::drive`); an upgraded
    // one (WebSocket) is still a request in flight, so its socket is waited for too
    // (cloudflared, stopped first, closes its side) rather than cut at once.
    let drain = alive.closed();
    let drained = tokio::time::timeout(grace, drain).await.is_ok();
    if !drained {
        tracing::warn!(listener = %local_addr, grace_s = grace.as_secs_f64(), "connections still open after the shutdown grace ({grace:?}) on {local_addr}; closing them");
    }
    drained
}
