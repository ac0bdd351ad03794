//! The upstream phase: which pool a request goes out through ([`pool_choice`]), the send, and
//! the wait for the response head under the backend and body timeouts ([`head`]); and the pools and connectors themselves
//! (each worker's own, see [`super::Worker`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use hyper_util::client::legacy::{Client, ResponseFuture};
use tokio::time::Instant;

use super::authority::{AuthorityPoolKey, ToUpstream};
use super::body::{BodyTooLarge, CappedBody};
use super::destination::{GuardedResolver, HttpConnector, RefusedDestination};
use super::h1_pool::H1Error;
use super::limits::Activity;
use super::{ProxyError, Worker};
use crate::config::{ProxySection, UpstreamProtocol};
use crate::routing::table::Backend;
use crate::routing::tls::UpstreamTls;

pub(super) type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The pool of a backend with its own TLS settings.
pub(super) type TlsClient = Client<HttpsConnector, CappedBody>;
/// The pool of mirrored copies (whole bodies), the default one or a mirror's own TLS's.
pub(super) type MirrorClient = Client<HttpsConnector, Full<Bytes>>;
/// Pools by the address of their compiled TLS settings (see [`TlsPoolKey`]).
pub(super) type TlsPools<C> = ArcSwap<HashMap<TlsPoolKey, (Weak<UpstreamTls>, C)>>;

/// A pool for requests whose authority is not their upstream's (see `authority.rs`).
#[derive(Clone)]
pub(super) enum AuthorityPool {
    Https(Client<ToUpstream<HttpsConnector>, CappedBody>),
    H2c(Client<ToUpstream<HttpConnector>, CappedBody>),
}

/// [`AuthorityPool`]s by upstream, with a `Weak` to the backend's own TLS settings if any.
pub(super) type AuthorityPools = ArcSwap<HashMap<AuthorityPoolKey, (Option<Weak<UpstreamTls>>, AuthorityPool)>>;

/// More pools than this (upstream addresses times TLS settings) and they are all dropped and
/// rebuilt as used: a controller that keeps pushing new upstreams cannot grow them for ever.
const MAX_AUTHORITY_POOLS: usize = 1024;

/// A table's compiled TLS settings, by address. The pool's entry also holds a `Weak` to them,
/// which keeps the allocation, so the address cannot be reused by other settings while the
/// entry exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct TlsPoolKey(usize);

impl TlsPoolKey {
    fn of(t: &Arc<UpstreamTls>) -> TlsPoolKey {
        TlsPoolKey(Arc::as_ptr(t) as usize)
    }
}

pub(super) fn http_connector(settings: &ProxySection, resolver: &GuardedResolver) -> HttpConnector {
    let mut c = HttpConnector::new_with_resolver(resolver.clone());
    c.set_nodelay(true);
    c.set_connect_timeout(Some(settings.connect_timeout));
    c.enforce_http(false);
    c.set_keepalive(Some(Duration::from_secs(60)));
    c
}

/// Which pool a request goes out through.
#[derive(Debug, PartialEq)]
pub(super) enum PoolChoice {
    /// The worker's own HTTP/1.1 pool (`h1_pool.rs`): `http://`, no TLS settings, no upgrade.
    OwnH1,
    /// A pool that dials the upstream whatever authority this URI (the request's, with its
    /// `Host` as the authority) names: see `authority.rs`.
    Authority(http::Uri),
    /// The pool of the backend's protocol and TLS settings.
    Backend,
}

/// The pool for `up` to `backend`; `upgrading`: the client asked for a protocol upgrade.
pub(super) fn pool_choice<B>(backend: &Backend, up: &Request<B>, upgrading: bool) -> PoolChoice {
    let up_scheme_http = backend.upstream.scheme == http::uri::Scheme::HTTP;
    if backend.protocol == UpstreamProtocol::Auto && backend.tls.is_none() && !upgrading && up_scheme_http {
        return PoolChoice::OwnH1;
    }
    // Where HTTP/2 may carry the request (h2c, or https with ALPN), a Host other than the
    // upstream's travels as the URI's authority, through a pool that still dials the
    // upstream; hyper-util writes it back as `Host` if the connection is HTTP/1.1.
    up.headers()
        .get(header::HOST)
        .filter(|host| !upgrading && host.as_bytes() != backend.upstream.authority.as_str().as_bytes())
        // A Host that is not an authority (hyper accepted it as a header value) stays `Host`.
        .and_then(|host| with_authority(up.uri(), host))
        .map_or(PoolChoice::Backend, PoolChoice::Authority)
}

/// A failed upstream send: whether it was the connection that failed.
pub(super) trait SendFailure: std::error::Error + 'static {
    fn is_connect(&self) -> bool;
}

impl SendFailure for H1Error {
    fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect(_))
    }
}

impl SendFailure for hyper_util::client::legacy::Error {
    fn is_connect(&self) -> bool {
        hyper_util::client::legacy::Error::is_connect(self)
    }
}

/// The upstream phase's wait: the response head of `sent` (the request on its way to
/// `backend` through the pool [`pool_choice`] picked) under the backend `timeout` and the body
/// read timeout ([`response_head`]), or the [`ProxyError`] the client is answered with.
/// `sent` is pinned where the caller keeps it, so the request is not moved again.
pub(super) async fn head<F, B, E>(
    backend: &Backend,
    sent: Pin<&mut F>,
    timeout: Option<Duration>,
    body_timeout: Duration,
    progress: &Activity,
) -> Result<Response<B>, ProxyError>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: SendFailure,
{
    match response_head(sent, timeout, body_timeout, progress).await {
        Head::Ready(Ok(resp)) => {
            progress.set_response_started();
            Ok(resp)
        }
        Head::Ready(Err(e)) => Err(upstream_failure(backend, &e, e.is_connect())),
        Head::UpstreamTimeout => Err(ProxyError::UpstreamTimeout {
            upstream: backend.upstream.url.to_string(),
            timeout: timeout.unwrap_or_default(),
        }),
        Head::BodyTimeout => Err(ProxyError::BodyReadTimeout { limit: body_timeout }),
    }
}

impl Worker {
    /// Sends `up` through one of hyper-util's pools: the authority pool of `choice` when it can
    /// be had, else the backend's own.
    pub(super) fn pooled(&self, backend: &Backend, choice: PoolChoice, mut up: Request<CappedBody>) -> ResponseFuture {
        if let PoolChoice::Authority(uri) = choice {
            if let Some(pool) = self.authority_pool(backend) {
                *up.uri_mut() = uri;
                up.headers_mut().remove(header::HOST);
                return match pool {
                    AuthorityPool::Https(pool) => pool.request(up),
                    AuthorityPool::H2c(pool) => pool.request(up),
                };
            }
        }
        match (backend.protocol, &backend.tls) {
            (UpstreamProtocol::Auto, None) => self.defaults().client.request(up),
            (UpstreamProtocol::Auto, Some(t)) => self.tls_request(t, up),
            (UpstreamProtocol::H2c, _) => self.h2c.request(up),
        }
    }

    /// Sends through the pool of a backend with its own TLS settings. Finding the pool is one
    /// lock-free load and a hash of the settings' address.
    fn tls_request(&self, t: &Arc<UpstreamTls>, up: Request<CappedBody>) -> ResponseFuture {
        self.tls_pool(&self.tls_pools, t).request(up)
    }

    /// The pool of `pools` for `t`, built on its first request; pools of settings whose table
    /// is gone are dropped then.
    pub(super) fn tls_pool<B>(
        &self,
        pools: &TlsPools<Client<HttpsConnector, B>>,
        t: &Arc<UpstreamTls>,
    ) -> Client<HttpsConnector, B>
    where
        B: Body + Send + 'static + Unpin,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let key = TlsPoolKey::of(t);
        if let Some((_, client)) = pools.load().get(&key) {
            return client.clone();
        }
        let _guard = self.tls_pools_insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = pools.load_full();
        if let Some((_, client)) = current.get(&key) {
            return client.clone();
        }
        let client = self.shared.builder.build(self.tls_connector(t));
        let mut next: HashMap<TlsPoolKey, (Weak<UpstreamTls>, Client<HttpsConnector, B>)> = current
            .iter()
            .filter(|(_, (settings, _))| settings.strong_count() > 0)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        next.insert(key, (Arc::downgrade(t), client.clone()));
        pools.store(Arc::new(next));
        client
    }

    /// A connector with `t`'s trust, client certificate and server name.
    fn tls_connector(&self, t: &UpstreamTls) -> HttpsConnector {
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(t.config.clone())
            .https_only();
        let b = match &t.server_name {
            Some(name) => match rustls::pki_types::ServerName::try_from(name.clone()) {
                Ok(n) => b.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n)),
                // Checked when the table was compiled.
                Err(_) => b,
            },
            None => b,
        };
        b.enable_http1()
            .enable_http2()
            .wrap_connector(http_connector(&self.shared.settings, &self.shared.resolver))
    }

    /// The pool for requests to `backend` whose authority is another than its upstream's,
    /// built on first use.
    fn authority_pool(&self, backend: &Backend) -> Option<AuthorityPool> {
        // Drops the pools built on default anchors a reload has replaced.
        self.defaults();
        let up = &backend.upstream;
        let h2c = backend.protocol == UpstreamProtocol::H2c;
        let key = AuthorityPoolKey {
            scheme: up.scheme.clone(),
            upstream: up.authority.clone(),
            tls: backend.tls.as_ref().map(|t| TlsPoolKey::of(t).0),
            h2c,
        };
        if let Some((_, pool)) = self.authority_pools.load().get(&key) {
            return Some(pool.clone());
        }
        let _guard = self.tls_pools_insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.authority_pools.load_full();
        if let Some((_, pool)) = current.get(&key) {
            return Some(pool.clone());
        }
        let builder = &self.shared.builder;
        let pool = if h2c {
            let dial = ToUpstream::new(
                http_connector(&self.shared.settings, &self.shared.resolver),
                &up.scheme,
                &up.authority,
            )?;
            AuthorityPool::H2c(builder.clone().http2_only(true).build(dial))
        } else {
            let https = match &backend.tls {
                Some(t) => self.tls_connector(t),
                None => self.shared.default_https(),
            };
            AuthorityPool::Https(builder.build(ToUpstream::new(https, &up.scheme, &up.authority)?))
        };
        let mut next: HashMap<_, _> = if current.len() >= MAX_AUTHORITY_POOLS {
            HashMap::new()
        } else {
            current
                .iter()
                .filter(|(_, (tls, _))| tls.as_ref().is_none_or(|t| t.strong_count() > 0))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        next.insert(key, (backend.tls.as_ref().map(Arc::downgrade), pool.clone()));
        self.authority_pools.store(Arc::new(next));
        Some(pool)
    }
}

/// `uri` with `host` (a `Host` header's value) as its authority, when `host` is one.
fn with_authority(uri: &http::Uri, host: &HeaderValue) -> Option<http::Uri> {
    let authority = http::uri::Authority::try_from(host.as_bytes()).ok()?;
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(authority);
    http::Uri::from_parts(parts).ok()
}

/// What a failed upstream request means for the client.
fn upstream_failure(backend: &Backend, e: &(dyn std::error::Error + 'static), connect: bool) -> ProxyError {
    if find_cause::<BodyTooLarge>(e).is_some() {
        return ProxyError::BodyTooLarge;
    }
    if let Some(refused) = find_cause::<RefusedDestination>(e) {
        return ProxyError::DestinationRefused {
            upstream: backend.upstream.url.to_string(),
            why: refused.to_string(),
        };
    }
    ProxyError::Upstream {
        upstream: backend.upstream.url.to_string(),
        cause: crate::errors::error_chain(e),
        connect,
    }
}

/// What the wait for the upstream's response head ended with.
pub(super) enum Head<T> {
    Ready(T),
    /// No response head within the backend timeout, counted from the body's last byte.
    UpstreamTimeout,
    /// The request body stopped arriving from the client (`proxy.body_read_timeout`).
    BodyTimeout,
}

/// Waits for the response head. Each limit counts from the body's last movement; the body's
/// own limit applies only while the body waits for the client, the backend's only while it
/// does not (a slow upload is not a slow upstream). A deadline that has passed without firing
/// (the other side was to blame then) is re-armed a whole limit later, so the loop never spins.
pub(super) async fn response_head<F: Future>(
    mut request: Pin<&mut F>,
    timeout: Option<Duration>,
    body_timeout: Duration,
    progress: &Activity,
) -> Head<F::Output> {
    let next = |last, now, limit| {
        let at = crate::deadline::after(last, limit);
        if at > now {
            at
        } else {
            crate::deadline::after(now, limit)
        }
    };
    loop {
        let (now, last) = (Instant::now(), progress.last());
        let stalled = progress.stalled_on_client();
        if stalled && crate::deadline::after(last, body_timeout) <= now {
            return Head::BodyTimeout;
        }
        if !stalled && timeout.is_some_and(|t| crate::deadline::after(last, t) <= now) {
            return Head::UpstreamTimeout;
        }
        let upstream = timeout.map(|t| next(last, now, t));
        let body = (!progress.body_done()).then(|| next(last, now, body_timeout));
        let Some(deadline) = upstream.into_iter().chain(body).min() else {
            return Head::Ready(request.await);
        };
        if let Ok(out) = tokio::time::timeout_at(deadline, request.as_mut()).await {
            return Head::Ready(out);
        }
    }
}

fn find_cause<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_support::table;
    use crate::routing::table::RouteTable;

    /// One backend per host: plain http, h2c, https.
    const TABLE: &str = r#"
[[route]]
hostnames = ["plain.example.com"]
upstream = "http://10.0.0.9:8080"
[[route]]
hostnames = ["h2c.example.com"]
backends = [{ url = "http://10.0.0.9:8081", protocol = "h2c" }]
[[route]]
hostnames = ["tls.example.com"]
upstream = "https://10.0.0.9:8443"
"#;

    fn backend<'t>(t: &'t RouteTable, host: &str) -> &'t Backend {
        let headers = http::HeaderMap::new();
        let head = crate::routing::RequestHead {
            method: &http::Method::GET,
            path: "/",
            query: None,
            headers: &headers,
        };
        t.route(host, &head).unwrap().rule.pick_backend().unwrap()
    }

    /// An upstream request as the request phase leaves it: the upstream's URI, `host` as `Host`.
    fn up(b: &Backend, host: &str) -> Request<()> {
        let uri = format!("{}/x?y=1", b.upstream.url.trim_end_matches('/'));
        Request::builder().uri(uri).header(header::HOST, host).body(()).unwrap()
    }

    #[test]
    fn the_pool_follows_the_backend_and_the_host() {
        let t = table(TABLE);
        let plain = backend(&t, "plain.example.com");
        assert_eq!(
            pool_choice(plain, &up(plain, "plain.example.com"), false),
            PoolChoice::OwnH1
        );
        assert_eq!(
            pool_choice(plain, &up(plain, "plain.example.com"), true),
            PoolChoice::Backend,
            "an upgrade"
        );
        for b in [backend(&t, "h2c.example.com"), backend(&t, "tls.example.com")] {
            let own = b.upstream.authority.as_str();
            assert_eq!(
                pool_choice(b, &up(b, own), false),
                PoolChoice::Backend,
                "its own authority"
            );
            let PoolChoice::Authority(uri) = pool_choice(b, &up(b, "app.example.com"), false) else {
                panic!("another host goes as the authority");
            };
            assert_eq!(uri.authority().unwrap(), "app.example.com");
            assert_eq!(uri.path_and_query().unwrap(), "/x?y=1");
            assert_eq!(pool_choice(b, &up(b, "app.example.com"), true), PoolChoice::Backend);
            assert_eq!(
                pool_choice(b, &up(b, "a b"), false),
                PoolChoice::Backend,
                "not an authority"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_wait_tells_whose_stall_it_was() {
        let limit = Some(Duration::from_secs(5));
        let body_limit = Duration::from_secs(2);
        let ready = std::pin::pin!(std::future::ready("head"));
        let done = Activity::new();
        done.set_body_done();
        assert!(matches!(
            response_head(ready, limit, body_limit, &done).await,
            Head::Ready("head")
        ));

        let never = std::pin::pin!(std::future::pending::<()>());
        let started = Instant::now();
        assert!(matches!(
            response_head(never, limit, body_limit, &done).await,
            Head::UpstreamTimeout
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let uploading = Activity::new();
        uploading.set_waiting_for_client(true);
        let never = std::pin::pin!(std::future::pending::<()>());
        let started = Instant::now();
        assert!(matches!(
            response_head(never, limit, body_limit, &uploading).await,
            Head::BodyTimeout
        ));
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "the client's stall, not the upstream's"
        );
    }

    #[tokio::test]
    async fn the_head_or_whose_failure_it_was() {
        let t = table(TABLE);
        let b = backend(&t, "plain.example.com");
        let progress = Activity::new();
        let refused = std::pin::pin!(async { Err::<Response<()>, _>(H1Error::Connect("refused".into())) });
        let e = head(b, refused, None, Duration::from_secs(1), &progress)
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::Upstream { connect: true, .. }), "{e:?}");
        assert!(!progress.response_started());
        let answered = std::pin::pin!(async { Ok::<_, H1Error>(Response::new(())) });
        head(b, answered, None, Duration::from_secs(1), &progress)
            .await
            .unwrap();
        assert!(progress.response_started(), "the body times itself from now on");
    }
}
