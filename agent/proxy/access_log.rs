//! The access log (`[proxy.access_log]`): one line per proxied request, for the first question
//! after a 502 ("which requests?").
//!
//! A line is written when the response body ends (or is dropped, e.g. the client went away), so
//! it carries the duration and the bytes both ways. It goes through `tracing` with target
//! `access`, so the agent's journald or stderr output applies; the message is the whole line
//! (JSON or text), so `journalctl -o cat` shows it as is.
//!
//! What is logged is fixed here and never a secret: the method, the path (the query only when
//! `query = true`), statuses, the upstream URL and address, and of all request headers only
//! `Cf-Ray` and `Cf-Connecting-IP` (cloudflared passes both from the edge, so a line can be
//! found in Cloudflare's logs too).
//!
//! Cost: with the log off, `Proxy::handle` takes one branch (no allocation, no clock read
//! beyond the request's `start`), and the upstream request body one more per data frame (its
//! `Option<Arc<Exchange>>` is `None`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::HeaderName;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::config::{AccessLogFormat, AccessLogSection};

const CF_RAY: HeaderName = HeaderName::from_static("cf-ray");
const CF_CONNECTING_IP: HeaderName = HeaderName::from_static("cf-connecting-ip");
/// Longest header value or path kept in a line: a line is for finding a request, not for
/// replaying it, and a client must not be able to make one arbitrarily long.
const MAX_VALUE: usize = 512;

/// The access log's settings, compiled. Absent (`None` in `LiveSettings`) when disabled.
#[derive(Debug, Clone)]
pub struct AccessLog {
    format: AccessLogFormat,
    /// A request is sampled when a random u64 is below this (`u64::MAX` logs every one).
    threshold: u64,
    always: bool,
    query: bool,
}

impl AccessLog {
    pub fn from_config(section: &AccessLogSection) -> Option<AccessLog> {
        if !section.enabled {
            return None;
        }
        let sample = section.sample.clamp(0.0, 1.0);
        Some(AccessLog {
            format: section.format,
            // f64 → u64 saturates; 1.0 is handled by `always` (2^64 does not fit).
            threshold: (sample * u64::MAX as f64) as u64,
            always: sample >= 1.0,
            query: section.query,
        })
    }

    /// Notes what the request head says, before the request is consumed. `start` is the
    /// proxy's own clock reading for the request.
    pub fn begin<B>(&self, req: &Request<B>, start: Instant) -> Entry {
        let uri = req.uri();
        let mut path = if self.query {
            uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()).to_owned()
        } else {
            uri.path().to_owned()
        };
        truncate(&mut path);
        let header = |name: &HeaderName| {
            req.headers().get(name).map(|v| {
                let mut s = String::from_utf8_lossy(v.as_bytes()).into_owned();
                truncate(&mut s);
                s
            })
        };
        Entry {
            format: self.format,
            sampled: self.always || crate::random::random_u64() < self.threshold,
            time: SystemTime::now(),
            start,
            method: req.method().clone(),
            path,
            cf_ray: header(&CF_RAY),
            client_ip: header(&CF_CONNECTING_IP),
            exchange: Arc::new(Exchange::default()),
        }
    }
}

fn truncate(s: &mut String) {
    if s.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// What the proxy learns while it serves the request: shared with the upstream request body
/// (bytes in) and written once each by the routing and forwarding steps.
#[derive(Debug, Default)]
pub struct Exchange {
    bytes_in: AtomicU64,
    route: OnceLock<Arc<str>>,
    upstream: OnceLock<Upstream>,
    /// The proxy's own error code (the JSON body's `error`) when it answered instead of an
    /// upstream.
    error: OnceLock<&'static str>,
    /// The failure was the upstream's (always logged, like a status >= 500).
    upstream_failed: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Upstream {
    url: String,
    /// The connected peer, when the connector reports it (hyper-util's `HttpInfo`).
    addr: Option<SocketAddr>,
    status: Option<u16>,
}

impl Exchange {
    pub fn route(&self, route: &Arc<str>) {
        let _ = self.route.set(route.clone());
    }

    /// The upstream that answered the head: its URL, address and status.
    pub fn upstream<B>(&self, url: &str, resp: &Response<B>) {
        let addr = resp
            .extensions()
            .get::<hyper_util::client::legacy::connect::HttpInfo>()
            .map(|i| i.remote_addr());
        let _ = self.upstream.set(Upstream {
            url: url.to_owned(),
            addr,
            status: Some(resp.status().as_u16()),
        });
    }

    /// A request the proxy answered itself because of `error`; `upstream` is the URL it could
    /// not reach, if any.
    pub fn failed(&self, code: &'static str, upstream: Option<&str>, upstream_failed: bool) {
        let _ = self.error.set(code);
        self.upstream_failed.store(upstream_failed, Ordering::Relaxed);
        if let Some(url) = upstream {
            let _ = self.upstream.set(Upstream {
                url: url.to_owned(),
                addr: None,
                status: None,
            });
        }
    }

    /// Request body bytes handed to the upstream.
    pub fn sent(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }
}

/// One request's line, waiting for its response to finish.
#[derive(Debug)]
pub struct Entry {
    format: AccessLogFormat,
    sampled: bool,
    time: SystemTime,
    start: Instant,
    method: Method,
    path: String,
    cf_ray: Option<String>,
    client_ip: Option<String>,
    pub exchange: Arc<Exchange>,
}

impl Entry {
    /// The response to send: its body wrapped so the line is written when it ends, or as it is
    /// when this request was not sampled and is no error.
    pub fn finish<B: Body>(self, resp: Response<B>) -> Response<http_body_util::Either<B, Logged<B>>> {
        use http_body_util::Either;
        let status = resp.status().as_u16();
        let failed = self.exchange.upstream_failed.load(Ordering::Relaxed);
        if !self.sampled && status < 500 && !failed {
            return resp.map(Either::Left);
        }
        resp.map(|inner| {
            Either::Right(Logged {
                inner,
                line: Some((self, status)),
                bytes_out: 0,
            })
        })
    }

    fn write(&self, status: u16, bytes_out: u64, complete: bool) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let x = &*self.exchange;
        let route = x.route.get().map(|r| &**r);
        let up = x.upstream.get();
        let line = match self.format {
            AccessLogFormat::Json => {
                let mut v = serde_json::json!({
                    "time": humantime::format_rfc3339_millis(self.time).to_string(),
                    "route": route,
                    "method": self.method.as_str(),
                    "path": self.path,
                    "status": status,
                    "upstream_status": up.and_then(|u| u.status),
                    "upstream": up.map(|u| &u.url),
                    "upstream_addr": up.and_then(|u| u.addr).map(|a| a.to_string()),
                    "duration_ms": (duration_ms * 1000.0).round() / 1000.0,
                    "bytes_in": x.bytes_in.load(Ordering::Relaxed),
                    "bytes_out": bytes_out,
                    "cf_ray": self.cf_ray,
                    "client_ip": self.client_ip,
                });
                if let Some(code) = x.error.get() {
                    v["error"] = (*code).into();
                }
                if !complete {
                    v["incomplete"] = true.into();
                }
                v.to_string()
            }
            AccessLogFormat::Text => {
                let mut s = format!(
                    "{} {:?} {status} route={} duration_ms={duration_ms:.3} bytes_in={} bytes_out={bytes_out}",
                    self.method,
                    self.path,
                    route.unwrap_or("-"),
                    x.bytes_in.load(Ordering::Relaxed),
                );
                if let Some(u) = up {
                    let _ = write!(s, " upstream={}", u.url);
                    if let Some(a) = u.addr {
                        let _ = write!(s, " upstream_addr={a}");
                    }
                    if let Some(st) = u.status {
                        let _ = write!(s, " upstream_status={st}");
                    }
                }
                if let Some(code) = x.error.get() {
                    let _ = write!(s, " error={code}");
                }
                if let Some(v) = &self.cf_ray {
                    let _ = write!(s, " cf_ray={v:?}");
                }
                if let Some(v) = &self.client_ip {
                    let _ = write!(s, " client_ip={v:?}");
                }
                if !complete {
                    s.push_str(" incomplete");
                }
                s
            }
        };
        tracing::info!(target: "access", route, status, "{line}");
    }
}

/// A response body that writes its request's line when it ends: at end of stream, on an error,
/// or when dropped before the end (then marked `incomplete`).
#[derive(Debug)]
pub struct Logged<B: Body> {
    inner: B,
    line: Option<(Entry, u16)>,
    bytes_out: u64,
}

impl<B: Body> Logged<B> {
    fn done(&mut self, complete: bool) {
        if let Some((entry, status)) = self.line.take() {
            entry.write(status, self.bytes_out, complete);
        }
    }
}

impl<B: Body> Drop for Logged<B> {
    fn drop(&mut self) {
        // hyper need not poll a body that is empty from the start (204, HEAD, a 101).
        let complete = self.inner.is_end_stream();
        self.done(complete);
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    self.bytes_out += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.done(true);
                }
            }
            Some(Err(_)) => self.done(false),
            None => self.done(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
