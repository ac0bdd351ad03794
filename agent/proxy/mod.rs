//! The embedded origin proxy: what cloudflared's ingress points at.
//!
//! Per request: `/healthz` → ok; internal auth header (constant time) → 401; `Host` → route → 404;
//! weighted backend; hop-by-hop and credential headers removed; upstream identity token added;
//! streamed to the upstream through a pooled client; errors mapped to 502/503/504 with a short
//! JSON body and a log line naming the route.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

pub mod access_log;
mod auth;
mod authority;
mod default_trust;
mod destination;
mod error;
mod h1_pool;
mod limits;

pub use access_log::AccessLog;
pub use auth::{AcceptedToken, InboundAuth};
pub use error::ProxyError;
pub use h1_pool::PooledBody;

use authority::{AuthorityPoolKey, ToUpstream};
pub use default_trust::DefaultTrust;
use default_trust::WorkerDefaults;
use destination::{GuardedResolver, HttpConnector, RefusedDestination};
use h1_pool::{H1Error, H1Pool};
use limits::{Activity, BodyReadTimeout, BodyTimer};

use crate::config::{AuthHeaderKind, HostHeader, ProxySection, UpstreamAuthKind, UpstreamProtocol};
use crate::gcp::IdTokenCache;
use crate::routing::cors::CorsVerdict;
use crate::routing::filters::{client_scheme, is_host_and_port, request_host, Mirror};
use crate::routing::mirror::{MirrorTee, MIRROR_MAX_IN_FLIGHT};
use crate::routing::table::{host_without_port, Backend, RouteTable, Routed, Rule};
use crate::routing::tls::UpstreamTls;
use crate::routing::{path, Filters, RequestHead};
use crate::telemetry::Metrics;

/// A response body: the upstream's (from hyper-util's client or our own HTTP/1.1 pool), or one
/// the proxy wrote itself.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;
pub type UpstreamBody = Either<Incoming, PooledBody>;
/// What the server sends: the body as it is, or wrapped to write its access-log line at the end.
pub type Served = Either<ProxyBody, access_log::Logged<ProxyBody>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const HOP_BY_HOP_COUNT: usize = 10;

/// Hop-by-hop headers that are removed whether or not `Connection` names them
/// (RFC 9110 §7.6.1; `Keep-Alive` and `Proxy-Connection` are the legacy ones it mentions).
/// `Connection` comes first: [`strip_hop_by_hop`] reads its tokens only when `present[0]`.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    // The h2c upgrade's settings; only meaningful with `Upgrade: h2c`, which is never forwarded.
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

const X_SERVERLESS_AUTHORIZATION: HeaderName = HeaderName::from_static("x-serverless-authorization");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// What a reload can change without a restart.
#[derive(Debug)]
pub struct LiveSettings {
    pub routes: Arc<RouteTable>,
    pub auth: Option<InboundAuth>,
    /// The internal auth header's name, removed before forwarding even when auth is off: a
    /// token meant for this hop must never reach an upstream.
    pub auth_header: HeaderName,
    pub max_body_bytes: Option<u64>,
    /// `[proxy.access_log]`; `None` when off.
    pub access_log: Option<AccessLog>,
}

impl LiveSettings {
    /// The same settings serving another route table.
    pub fn with_routes(&self, routes: Arc<RouteTable>) -> LiveSettings {
        LiveSettings {
            routes,
            auth: self.auth.clone(),
            auth_header: self.auth_header.clone(),
            max_body_bytes: self.max_body_bytes,
            access_log: self.access_log.clone(),
        }
    }
}

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The pool of a backend with its own TLS settings.
type TlsClient = Client<HttpsConnector, CappedBody>;
/// The pool of mirrored copies (whole bodies), the default one or a mirror's own TLS's.
type MirrorClient = Client<HttpsConnector, Full<Bytes>>;
/// Pools by the address of their compiled TLS settings (see [`TlsPoolKey`]).
type TlsPools<C> = ArcSwap<HashMap<TlsPoolKey, (Weak<UpstreamTls>, C)>>;

/// A pool for requests whose authority is not their upstream's (see `authority.rs`).
#[derive(Clone)]
enum AuthorityPool {
    Https(Client<ToUpstream<HttpsConnector>, CappedBody>),
    H2c(Client<ToUpstream<HttpConnector>, CappedBody>),
}

/// [`AuthorityPool`]s by upstream, with a `Weak` to the backend's own TLS settings if any.
type AuthorityPools = ArcSwap<HashMap<AuthorityPoolKey, (Option<Weak<UpstreamTls>>, AuthorityPool)>>;

/// More pools than this (upstream addresses times TLS settings) and they are all dropped and
/// rebuilt as used: a controller that keeps pushing new upstreams cannot grow them for ever.
const MAX_AUTHORITY_POOLS: usize = 1024;

/// A table's compiled TLS settings, by address. The pool's entry also holds a `Weak` to them,
/// which keeps the allocation, so the address cannot be reused by other settings while the
/// entry exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TlsPoolKey(usize);

impl TlsPoolKey {
    fn of(t: &Arc<UpstreamTls>) -> TlsPoolKey {
        TlsPoolKey(Arc::as_ptr(t) as usize)
    }
}

/// The proxy's state shared by every worker thread: what a reload changes, the identity
/// tokens, the metrics. Each worker thread has its own upstream pools ([`Worker`]).
pub struct Proxy {
    pub live: ArcSwap<LiveSettings>,
    tokens: Arc<IdTokenCache>,
    metrics: Arc<Metrics>,
    /// Bounds mirror copies buffered or in flight (see `routing::mirror`), over all workers.
    mirror_slots: Arc<tokio::sync::Semaphore>,
    /// `http://` and `https://` with the global trust (`proxy.ca_file`, else `proxy.trust`),
    /// replaced when a reload changes it.
    default_trust: ArcSwap<DefaultTrust>,
    /// Pool settings for every client.
    builder: hyper_util::client::legacy::Builder,
    settings: ProxySection,
    /// Every connector's resolver: the destination rule at connect time.
    resolver: GuardedResolver,
}

/// One worker thread's view of the proxy: the shared state and that thread's own upstream
/// pools, so a pooled upstream connection is only used by the thread that opened it (see
/// `server::serve_workers`).
pub struct Worker {
    shared: Arc<Proxy>,
    /// HTTP/1.1 to `http://` (but upgrades).
    h1: Arc<H1Pool>,
    /// HTTP/1.1 or HTTP/2 (ALPN) to `https://` and upgrades to `http://`, and mirror copies,
    /// with the default trust (rebuilt when a reload changes it).
    defaults: ArcSwap<WorkerDefaults>,
    /// HTTP/2 with prior knowledge over cleartext.
    h2c: Client<HttpConnector, CappedBody>,
    /// `RequestMirror` copies go through their own pools, so a slow mirror backend cannot
    /// take connections from real traffic.
    mirror_h2c: Client<HttpConnector, Full<Bytes>>,
    /// The pools of backends with their own TLS settings, one per compiled [`UpstreamTls`] of a
    /// table in use.
    tls_pools: TlsPools<TlsClient>,
    /// The same for mirrors with their own TLS settings (apart, as every mirror pool is).
    mirror_tls_pools: TlsPools<MirrorClient>,
    tls_pools_insert: Mutex<()>,
    /// Pools for `https://` and `h2c` requests that carry the client's host (or a
    /// URLRewrite's) as their authority; the `Weak` keeps a TLS key's address from reuse.
    authority_pools: AuthorityPools,
}

fn http_connector(settings: &ProxySection, resolver: &GuardedResolver) -> HttpConnector {
    let mut c = HttpConnector::new_with_resolver(resolver.clone());
    c.set_nodelay(true);
    c.set_connect_timeout(Some(settings.connect_timeout));
    c.enforce_http(false);
    c.set_keepalive(Some(Duration::from_secs(60)));
    c
}

impl Proxy {
    pub fn new(
        settings: &ProxySection,
        live: LiveSettings,
        tokens: Arc<IdTokenCache>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Proxy>> {
        let resolver = GuardedResolver::new(settings.allow_link_local_upstreams);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host);
        let proxy = Proxy {
            live: ArcSwap::from_pointee(live),
            tokens,
            metrics,
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(MIRROR_MAX_IN_FLIGHT)),
            default_trust: ArcSwap::from_pointee(DefaultTrust::load(settings, settings, &resolver)?),
            builder,
            settings: settings.clone(),
            resolver,
        };
        Ok(Arc::new(proxy))
    }

    /// Applies a reloaded `proxy.allow_link_local_upstreams` to every connection opened from
    /// now on.
    pub fn set_allow_link_local(&self, allow: bool) {
        self.resolver.set_allow_link_local(allow);
    }

    /// The identity-token cache, pruned by the node when a table is installed.
    pub fn tokens(&self) -> &Arc<IdTokenCache> {
        &self.tokens
    }

    /// A worker with its own, empty upstream pools. Give each worker thread one and handle its
    /// requests with it.
    pub fn worker(self: &Arc<Self>) -> Arc<Worker> {
        let b = &self.builder;
        let h1 = H1Pool::new(
            http_connector(&self.settings, &self.resolver),
            self.settings.pool_max_idle_per_host,
            self.settings.pool_idle_timeout,
        );
        Arc::new(Worker {
            shared: self.clone(),
            h1,
            defaults: ArcSwap::from_pointee(WorkerDefaults::new(self)),
            h2c: b
                .clone()
                .http2_only(true)
                .build(http_connector(&self.settings, &self.resolver)),
            mirror_h2c: b
                .clone()
                .http2_only(true)
                .build(http_connector(&self.settings, &self.resolver)),
            tls_pools: ArcSwap::default(),
            mirror_tls_pools: ArcSwap::default(),
            tls_pools_insert: Mutex::new(()),
            authority_pools: ArcSwap::default(),
        })
    }
}

impl Worker {
    /// Sends through the pool of a backend with its own TLS settings. Finding the pool is one
    /// lock-free load and a hash of the settings' address.
    fn tls_request(&self, t: &Arc<UpstreamTls>, up: Request<CappedBody>) -> ResponseFuture {
        self.tls_pool(&self.tls_pools, t).request(up)
    }

    /// The pool of `pools` for `t`, built on its first request; pools of settings whose table
    /// is gone are dropped then.
    fn tls_pool<B>(
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

    /// Handles one downstream request. Never fails: every error becomes a response.
    pub async fn handle(self: Arc<Self>, peer: SocketAddr, mut req: Request<Incoming>) -> Response<Served> {
        let start = Instant::now();
        let live = self.shared.live.load_full();
        // With the access log off, this is all it costs.
        let Some(log) = live.access_log.as_ref().filter(|_| req.uri().path() != "/healthz") else {
            return self.serve(&live, peer, req, start, None).await.map(Either::Left);
        };
        let entry = log.begin(&req, start);
        // For the upstream request's body (bytes in) and its response (status, address).
        req.extensions_mut().insert(entry.exchange.clone());
        let resp = self.serve(&live, peer, req, start, Some(&entry.exchange)).await;
        entry.finish(resp)
    }

    async fn serve(
        &self,
        live: &LiveSettings,
        peer: SocketAddr,
        mut req: Request<Incoming>,
        start: Instant,
        exchange: Option<&access_log::Exchange>,
    ) -> Response<ProxyBody> {
        if req.uri().path() == "/healthz" {
            return json(StatusCode::OK, r#"{"status":"ok"}"#.into());
        }
        if let Some(auth) = &live.auth {
            let ok = req
                .headers()
                .get(&auth.header)
                .is_some_and(|v| auth.accepts(v.as_bytes()));
            if !ok {
                let header = auth.header.clone();
                return self.unrouted(ProxyError::Unauthorized { header }, start, exchange);
            }
        }
        // Matched and forwarded from here on in its normal form (routing/path.rs).
        match path::normalise_uri(req.uri()) {
            Ok(None) => {}
            Ok(Some(uri)) => *req.uri_mut() = uri,
            Err(e) => return self.unrouted(ProxyError::BadPath(e), start, exchange),
        }
        // Before routing: header matches, redirects and the upstream all see the proxy's word.
        set_forwarded_proto(req.headers_mut(), peer);
        // HTTP/2 requests carry the host in `:authority`; HTTP/1.1 in `Host`.
        let host = req
            .uri()
            .host()
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(host_without_port)
            })
            .unwrap_or("");
        let Some(routed) = live.routes.route(host, &RequestHead::of(&req)) else {
            let (host, path) = (host.to_owned(), req.uri().path().to_owned());
            return self.unrouted(ProxyError::NoRoute { host, path }, start, exchange);
        };
        let rule = routed.rule;
        if let Some(x) = exchange {
            x.route(&rule.route);
        }
        let origin = rule
            .filters
            .cors
            .as_ref()
            .and(req.headers().get(header::ORIGIN).cloned());
        let mut resp = match self.forward(routed, live, peer, req, start).await {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(x) = exchange {
                    x.failed(e.code(), e.upstream(), e.upstream_kind().is_some());
                }
                self.failed(rule, e)
            }
        };
        if let Some(cors) = &rule.filters.cors {
            cors.decorate(origin.as_ref(), resp.headers_mut());
        }
        if let Some(m) = &rule.filters.response_headers {
            m.apply(resp.headers_mut());
        }
        rule.stats.observe(resp.status().as_u16(), start.elapsed());
        resp
    }

    /// The answer to a request refused before it found a rule (401, 400, 404), counted as
    /// unrouted.
    fn unrouted(&self, e: ProxyError, start: Instant, exchange: Option<&access_log::Exchange>) -> Response<ProxyBody> {
        self.shared
            .metrics
            .unrouted
            .observe(e.status().as_u16(), start.elapsed());
        if let Some(x) = exchange {
            x.failed(e.code(), None, false);
        }
        e.response()
    }

    /// Decides what answers: a fail-closed rule, a redirect or a CORS preflight answer here
    /// (the rule's first, then the picked backend's); otherwise the backend does, within the
    /// rule's request timeout.
    async fn forward(
        &self,
        routed: Routed<'_>,
        live: &LiveSettings,
        peer: SocketAddr,
        req: Request<Incoming>,
        start: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let rule = routed.rule;
        if let Some(status) = rule.unavailable {
            return Err(ProxyError::Unavailable { status });
        }
        if let Some(answer) = answer_here(&rule.filters, routed, &req) {
            return answer;
        }
        let backend = rule.pick_backend().ok_or(ProxyError::NoBackend)?;
        if let Some(status) = backend.unavailable {
            return Err(ProxyError::Unavailable { status });
        }
        if let Some(answer) = answer_here(&backend.filters, routed, &req) {
            return answer;
        }
        // The controller's `websocket` backends: an upgrade handshake is exempt from the rule's
        // timeouts (a WebSocket server may take its time to accept).
        let exempt = backend.websocket && upgrade_protocol(req.headers()).is_some();
        let sent = self.send(routed, backend, live, peer, req, exempt);
        match rule.request_timeout.filter(|_| !exempt) {
            None => sent.await,
            // Until the response head: a response that has started streaming is never cut off.
            Some(limit) => match tokio::time::timeout_at(crate::deadline::after(start, limit), sent).await {
                Ok(resp) => resp,
                Err(_) => Err(ProxyError::RequestTimeout { limit }),
            },
        }
    }

    /// Sends the request to `backend` and streams its answer back.
    async fn send(
        &self,
        routed: Routed<'_>,
        backend: &Backend,
        live: &LiveSettings,
        peer: SocketAddr,
        mut req: Request<Incoming>,
        timeout_exempt: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let rule = routed.rule;
        let backend_timeout = rule.backend_timeout.filter(|_| !timeout_exempt);
        let origin = backend
            .filters
            .cors
            .as_ref()
            .and(req.headers().get(header::ORIGIN).cloned());
        if let (Some(limit), Some(len)) = (live.max_body_bytes, content_length(req.headers())) {
            if len > limit {
                return Err(ProxyError::DeclaredBodyTooLarge { len, limit });
            }
        }
        // The Host rule (docs/routing.md): the client's, unless this backend wants its own
        // (then hyper writes the upstream URI's authority) or a URLRewrite names one.
        let client_host = match backend.host_header {
            HostHeader::Client => client_host(&req),
            HostHeader::Upstream => None,
        };
        let upgrade = upgrade_protocol(req.headers());
        let downstream_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let headers = &mut parts.headers;
        let wants_trailers = te_has_trailers(headers);
        strip_hop_by_hop(headers);
        headers.remove(header::HOST);
        if let Some(host) = client_host {
            headers.insert(header::HOST, host);
        }
        headers.remove(header::AUTHORIZATION);
        headers.remove(X_SERVERLESS_AUTHORIZATION);
        headers.remove(&live.auth_header);
        if wants_trailers {
            // gRPC servers use `te: trailers` to detect proxies that would drop trailers.
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(proto) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto.clone());
        }
        append_forwarded_for(headers, peer);
        // Rule filters, then the chosen backend's (Gateway API: backend filters apply only
        // when that backend is chosen).
        for filters in [&rule.filters, &backend.filters] {
            if let Some(m) = &filters.request_headers {
                m.apply(headers);
            }
        }
        let rewrite = backend.filters.rewrite.as_ref().or(rule.filters.rewrite.as_ref());
        if let Some(host) = rewrite.and_then(|r| r.hostname.as_ref()) {
            headers.insert(header::HOST, host.clone());
        }
        let rewritten = match rewrite.and_then(|r| r.path.as_ref()) {
            None => None,
            Some(m) => {
                let mut pq = m.apply(parts.uri.path(), routed.matched.prefix());
                if let Some(q) = parts.uri.query() {
                    pq.push('?');
                    pq.push_str(q);
                }
                Some(PathAndQuery::try_from(pq).map_err(|e| ProxyError::BadRewrite(e.to_string()))?)
            }
        };
        // Mirrors see the request as the backend will (filters applied), without credentials.
        let has_mirrors = !rule.filters.mirrors.is_empty() || !backend.filters.mirrors.is_empty();
        let tee = if has_mirrors && upgrade.is_none() {
            let pq = rewritten.as_ref().or(parts.uri.path_and_query()).cloned();
            let mirrors = rule.filters.mirrors.iter().chain(&backend.filters.mirrors);
            self.start_mirrors(rule, mirrors, &parts.method, pq, headers, body.is_end_stream())
        } else {
            None
        };
        let pq = rewritten.or_else(|| parts.uri.path_and_query().cloned());
        let target = UpstreamTarget {
            upstream: &backend.upstream,
            protocol: backend.protocol,
            auth: backend.auth,
            auth_header: backend.auth_header,
        };
        target.address(&self.shared.tokens, &mut parts, pq.as_ref()).await?;
        let exchange = parts.extensions.remove::<Arc<access_log::Exchange>>();
        // Extensions are per hop (hyper's connection info, upgrade handles): start clean.
        parts.extensions = http::Extensions::new();
        let own_pool = backend.protocol == UpstreamProtocol::Auto
            && backend.tls.is_none()
            && downstream_upgrade.is_none()
            && backend.upstream.scheme == http::uri::Scheme::HTTP;
        let progress = Arc::new(Activity::new());
        let body_timeout = self.shared.settings.body_read_timeout;
        let mut up = Request::from_parts(
            parts,
            CappedBody {
                inner: body,
                remaining: live.max_body_bytes.unwrap_or(u64::MAX),
                progress: progress.clone(),
                body_timeout,
                timer: BodyTimer::default(),
                tee,
                exchange: exchange.clone(),
            },
        );

        let upstream_error = |e: &(dyn std::error::Error + 'static), connect| upstream_failure(backend, e, connect);
        let timed_out = || ProxyError::UpstreamTimeout {
            upstream: backend.upstream.url.to_string(),
            timeout: backend_timeout.unwrap_or_default(),
        };
        if own_pool {
            let sent = std::pin::pin!(self.h1.send(up));
            let resp = match response_head(sent, backend_timeout, body_timeout, &progress).await {
                Head::Ready(Ok(resp)) => {
                    progress.set_response_started();
                    if let Some(x) = &exchange {
                        x.upstream(&backend.upstream.url, &resp);
                    }
                    resp
                }
                Head::Ready(Err(e)) => return Err(upstream_error(&e, matches!(e, H1Error::Connect(_)))),
                Head::UpstreamTimeout => return Err(timed_out()),
                Head::BodyTimeout => return Err(ProxyError::BodyReadTimeout { limit: body_timeout }),
            };
            return Ok(self.finish_response(backend, origin.as_ref(), resp.map(Either::Right)));
        }
        // Where HTTP/2 may carry the request (h2c, or https with ALPN), a Host other than the
        // upstream's travels as the URI's authority, through a pool that still dials the
        // upstream; hyper-util writes it back as `Host` if the connection is HTTP/1.1.
        // (Chosen after the own pool's branch, whose awaits would otherwise hold it.)
        let authority_pool = up
            .headers()
            .get(header::HOST)
            .filter(|host| {
                downstream_upgrade.is_none() && host.as_bytes() != backend.upstream.authority.as_str().as_bytes()
            })
            // A Host that is not an authority (hyper accepted it as a header value) stays `Host`.
            .and_then(|host| with_authority(up.uri(), host))
            .and_then(|uri| Some((uri, self.authority_pool(backend)?)))
            .map(|(uri, pool)| {
                *up.uri_mut() = uri;
                up.headers_mut().remove(header::HOST);
                pool
            });
        let mut sent = match (authority_pool, backend.protocol) {
            (Some(AuthorityPool::Https(pool)), _) => pool.request(up),
            (Some(AuthorityPool::H2c(pool)), _) => pool.request(up),
            (None, UpstreamProtocol::Auto) => match &backend.tls {
                None => self.defaults().client.request(up),
                Some(t) => self.tls_request(t, up),
            },
            (None, UpstreamProtocol::H2c) => self.h2c.request(up),
        };
        let sent = response_head(Pin::new(&mut sent), backend_timeout, body_timeout, &progress).await;
        let mut resp = match sent {
            Head::Ready(Ok(resp)) => {
                progress.set_response_started();
                if let Some(x) = &exchange {
                    x.upstream(&backend.upstream.url, &resp);
                }
                resp
            }
            Head::Ready(Err(e)) => return Err(upstream_error(&e, e.is_connect())),
            Head::UpstreamTimeout => return Err(timed_out()),
            Head::BodyTimeout => return Err(ProxyError::BodyReadTimeout { limit: body_timeout }),
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(downstream) = downstream_upgrade {
                let upstream = hyper::upgrade::on(&mut resp);
                let idle = self.shared.settings.upgrade_idle_timeout;
                tokio::spawn(limits::splice_upgraded(downstream, upstream, rule.route.clone(), idle));
                // Keep Connection/Upgrade: they are the 101's point.
                return Ok(resp.map(|b| Either::Left(Either::Left(b))));
            }
        }
        Ok(self.finish_response(backend, origin.as_ref(), resp.map(Either::Left)))
    }

    /// The upstream's response as the client gets it: hop-by-hop headers removed, the backend's
    /// response filters applied.
    fn finish_response(
        &self,
        backend: &Backend,
        origin: Option<&HeaderValue>,
        mut resp: Response<UpstreamBody>,
    ) -> Response<ProxyBody> {
        strip_hop_by_hop(resp.headers_mut());
        if let Some(m) = &backend.filters.response_headers {
            m.apply(resp.headers_mut());
        }
        if let Some(cors) = &backend.filters.cors {
            cors.decorate(origin, resp.headers_mut());
        }
        resp.map(Either::Left)
    }

    /// Starts a task per sampled mirror, each waiting for the body copy. Returns the tee that
    /// feeds them, or `None` when nothing is mirrored or the body was empty (sent already).
    fn start_mirrors<'m>(
        &self,
        rule: &Rule,
        mirrors: impl Iterator<Item = &'m Mirror>,
        method: &http::Method,
        path_and_query: Option<PathAndQuery>,
        headers: &HeaderMap,
        body_is_empty: bool,
    ) -> Option<MirrorTee> {
        let mut waiting = Vec::new();
        for mirror in mirrors.filter(|m| m.sampled()) {
            let Ok(permit) = self.shared.mirror_slots.clone().try_acquire_owned() else {
                tracing::debug!(route = %rule.route, mirror = %mirror.upstream.url, "route {}: mirror to {} skipped: too many mirrored requests in flight", rule.route, mirror.upstream.url);
                continue;
            };
            let slot = MirrorSlot::new(permit, self.shared.metrics.clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<Bytes>();
            waiting.push(tx);
            let mut req = Request::new(());
            *req.method_mut() = method.clone();
            *req.headers_mut() = headers.clone();
            req.headers_mut().remove(header::HOST);
            let task = MirrorTask {
                upstream: mirror.upstream.clone(),
                protocol: mirror.protocol,
                auth: mirror.auth,
                auth_header: mirror.auth_header,
                path_and_query: path_and_query.clone(),
                head: req,
                client: match &mirror.tls {
                    Some(t) => self.tls_pool(&self.mirror_tls_pools, t),
                    None => self.defaults().mirror_client.clone(),
                },
                h2c: self.mirror_h2c.clone(),
                tokens: self.shared.tokens.clone(),
                timeout: rule.backend_timeout.unwrap_or(Duration::from_secs(30)),
                route: rule.route.clone(),
            };
            tokio::spawn(async move {
                let _slot = slot;
                // The sender is dropped without sending when the body is too large or the
                // real request ends early: then there is nothing whole to mirror.
                if let Ok(body) = rx.await {
                    task.send(body).await;
                }
            });
        }
        if waiting.is_empty() {
            return None;
        }
        let tee = MirrorTee::new(waiting);
        if body_is_empty {
            tee.finish();
            return None;
        }
        Some(tee)
    }

    /// The answer for a request the proxy could not forward: the upstream-error metric and the
    /// log line where the failure is the upstream's, then the JSON error.
    fn failed(&self, rule: &Rule, e: ProxyError) -> Response<ProxyBody> {
        if let Some(kind) = e.upstream_kind() {
            rule.stats.upstream_error(kind);
        }
        let route = &rule.route;
        match &e {
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
        e.response()
    }
}

/// The client's Host as a header value: HTTP/1.1's own `Host` (shared, not copied), or HTTP/2's
/// `:authority`. The same text as [`request_host`], which routing matched.
fn client_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    match req.headers().get(header::HOST) {
        Some(host) if host.to_str().is_ok() => Some(host.clone()),
        _ => Some(HeaderValue::from_static("")),
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

/// A redirect or a CORS preflight answer from `filters`, when they give one for this request.
fn answer_here(
    filters: &Filters,
    routed: Routed<'_>,
    req: &Request<Incoming>,
) -> Option<Result<Response<ProxyBody>, ProxyError>> {
    if let Some(redirect) = &filters.redirect {
        if redirect.uses_request_host() && !is_host_and_port(request_host(req)) {
            return Some(Err(ProxyError::BadHost));
        }
        let location = redirect.location(
            client_scheme(req.headers()),
            request_host(req),
            req.uri().path(),
            req.uri().query(),
            routed.matched.prefix(),
        );
        return Some(
            HeaderValue::try_from(location)
                .map_err(|_| ProxyError::BadRedirect)
                .map(|location| {
                    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
                    *resp.status_mut() = redirect.status;
                    resp.headers_mut().insert(header::LOCATION, location);
                    resp
                }),
        );
    }
    match filters.cors.as_ref()?.on_request(req.method(), req.headers()) {
        CorsVerdict::Forward => None,
        CorsVerdict::Preflight(headers) => {
            let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            *resp.headers_mut() = headers;
            Some(Ok(resp))
        }
    }
}

/// What the wait for the upstream's response head ended with.
enum Head<T> {
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
async fn response_head<F: std::future::Future>(
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

/// A short JSON error body.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    json(status, body)
}

pub fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The `Upgrade` value to forward when the request asks for one (`Connection: upgrade` on any
/// line), without `h2c`: RFC 9113 §3.1 removed the HTTP/1.1 upgrade to HTTP/2 ("h2c" ... is
/// "deprecated"), and a lenient upstream that still switches would give the client a raw
/// HTTP/2 connection past the proxy's routing and auth (h2c smuggling). A request offering only
/// h2c is forwarded as the plain HTTP/1.1 request it also is.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let offered = headers.get(header::UPGRADE)?.to_str().ok()?;
    let kept: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| !p.split('/').next().unwrap_or(p).trim().eq_ignore_ascii_case("h2c"))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

fn te_has_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.trim()
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Every token of every `Connection` line (a sender may split them over several lines).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: the fixed set and every header named by any `Connection` line.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (standard names compare as enum tags) notes which of the fixed
    // set are present; only those are removed. Most messages carry none, and most others only
    // `Connection`, so this is one hashed removal instead of ten.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // `Connection: keep-alive` and the like name headers of the fixed set, removed below.
    if present[0] {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !HOP_BY_HOP.iter().any(|h| h.as_str().eq_ignore_ascii_case(t)))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
}

/// `X-Forwarded-Proto` as the proxy knows it. The scheme the visitor used is known to the
/// Cloudflare edge, which sets the header on every request it relays, and so to the local
/// cloudflared, a loopback peer: its single `http` or `https` is kept. From any other peer the
/// header is the client's own claim (it would make redirects and upstreams believe a plain
/// request was encrypted), replaced by what the proxy saw: its listener is plain `http`.
fn set_forwarded_proto(headers: &mut HeaderMap, peer: SocketAddr) {
    let mut lines = headers.get_all(X_FORWARDED_PROTO).iter();
    let relayed = match (lines.next(), lines.next()) {
        (Some(v), None) => peer.ip().to_canonical().is_loopback() && (v == "https" || v == "http"),
        _ => false,
    };
    if !relayed {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    // A chain may arrive split over several lines, which mean the same as one comma-joined
    // line (RFC 9110 §5.3); `get` would keep only the first and `insert` drop the rest.
    // Built in one string: this runs on every request.
    let mut value = String::with_capacity(48);
    let chain = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    for hop in chain {
        value.push_str(hop);
        value.push_str(", ");
    }
    push_ip(&mut value, peer.ip());
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Appends `ip` as `Display` writes it. IPv4 (every request from a local cloudflared) without
/// the formatting machinery, which cost about 900 instructions a request (callgrind).
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    use std::fmt::Write as _;
    let std::net::IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// One mirrored request, sent once its body copy is complete.
/// One upstream as a request is sent to it: the request itself and each of its mirror copies.
struct UpstreamTarget<'a> {
    upstream: &'a crate::routing::table::Upstream,
    protocol: UpstreamProtocol,
    auth: UpstreamAuthKind,
    auth_header: AuthHeaderKind,
}

impl UpstreamTarget<'_> {
    /// Points `parts` at the upstream: its URI for `path_and_query`, an identity token when the
    /// upstream wants one (`upstream_auth = "gcp-id-token"`), the HTTP version of its protocol.
    async fn address(
        &self,
        tokens: &Arc<IdTokenCache>,
        parts: &mut http::request::Parts,
        path_and_query: Option<&PathAndQuery>,
    ) -> Result<(), ProxyError> {
        let url = &self.upstream.url;
        if self.auth == UpstreamAuthKind::GcpIdToken {
            let token = tokens.header(url).await.map_err(|e| ProxyError::TokenUnavailable {
                upstream: url.to_string(),
                reason: e.to_string(),
            })?;
            let name = match self.auth_header {
                AuthHeaderKind::Authorization => header::AUTHORIZATION,
                AuthHeaderKind::XServerlessAuthorization => X_SERVERLESS_AUTHORIZATION,
            };
            parts.headers.insert(name, token);
        }
        parts.uri = self
            .upstream
            .uri_for(path_and_query)
            .map_err(|e| ProxyError::BadUpstreamUri(e.to_string()))?;
        parts.version = match self.protocol {
            UpstreamProtocol::H2c => Version::HTTP_2,
            UpstreamProtocol::Auto => Version::HTTP_11,
        };
        Ok(())
    }
}

/// A mirror's place among the `MIRROR_MAX_IN_FLIGHT`, counted in `mirrors_in_flight` while
/// its task holds it.
struct MirrorSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl MirrorSlot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, metrics: Arc<Metrics>) -> MirrorSlot {
        metrics.mirrors_in_flight.inc();
        MirrorSlot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.metrics.mirrors_in_flight.dec();
    }
}

struct MirrorTask {
    upstream: crate::routing::table::Upstream,
    protocol: UpstreamProtocol,
    auth: UpstreamAuthKind,
    auth_header: AuthHeaderKind,
    path_and_query: Option<PathAndQuery>,
    /// Method and headers of the copy.
    head: Request<()>,
    client: MirrorClient,
    h2c: Client<HttpConnector, Full<Bytes>>,
    tokens: Arc<IdTokenCache>,
    timeout: Duration,
    route: Arc<str>,
}

impl MirrorTask {
    async fn send(self, body: Bytes) {
        let url = &self.upstream.url;
        let (mut parts, ()) = self.head.into_parts();
        let target = UpstreamTarget {
            upstream: &self.upstream,
            protocol: self.protocol,
            auth: self.auth,
            auth_header: self.auth_header,
        };
        if let Err(e) = target
            .address(&self.tokens, &mut parts, self.path_and_query.as_ref())
            .await
        {
            tracing::debug!(route = %self.route, mirror = %url, error = %e, "route {}: mirror to {url} skipped: {e}", self.route);
            return;
        }
        let req = Request::from_parts(parts, Full::new(body));
        let sent = match self.protocol {
            UpstreamProtocol::Auto => self.client.request(req),
            UpstreamProtocol::H2c => self.h2c.request(req),
        };
        let outcome = tokio::time::timeout(self.timeout, async {
            let resp = sent.await.map_err(|e| crate::errors::error_chain(&e))?;
            let status = resp.status();
            // Read the answer to its end so the connection can be reused.
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        })
        .await;
        match outcome {
            Ok(Ok(status)) => {
                tracing::debug!(route = %self.route, mirror = %url, %status, "route {}: mirrored to {url}: {status}", self.route)
            }
            Ok(Err(e)) => {
                tracing::debug!(route = %self.route, mirror = %url, error = %e, "route {}: mirror to {url} failed: {e}", self.route)
            }
            Err(_) => {
                tracing::debug!(route = %self.route, mirror = %url, "route {}: mirror to {url} timed out", self.route)
            }
        }
    }
}

/// The request body passed upstream, with the configured size limit enforced as it streams
/// (a chunked body has no `Content-Length` to check up front), and a copy kept for mirrors.
pub struct CappedBody {
    inner: Incoming,
    remaining: u64,
    progress: Arc<Activity>,
    /// `proxy.body_read_timeout`; `timer` enforces it once the response has started.
    body_timeout: Duration,
    timer: BodyTimer,
    tee: Option<MirrorTee>,
    /// The access log's tally of bytes in; `None` when the log is off.
    exchange: Option<Arc<access_log::Exchange>>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured limit")]
pub struct BodyTooLarge;

impl Body for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => return self.poll_waiting(cx),
        };
        self.progress.set_waiting_for_client(false);
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        self.tee = None;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= n;
                    self.progress.touch();
                    if let Some(x) = &self.exchange {
                        x.sent(n);
                    }
                    if let Some(tee) = &mut self.tee {
                        if !tee.observe(data) {
                            self.tee = None;
                        }
                    }
                }
                // hyper may stop polling once `is_end_stream` says so, without a final `None`.
                if self.inner.is_end_stream() {
                    self.progress.set_body_done();
                    if let Some(tee) = self.tee.take() {
                        tee.finish();
                    }
                }
                Some(Ok(frame))
            }
            Some(Err(e)) => {
                self.tee = None;
                self.progress.set_body_done();
                Some(Err(Box::new(e)))
            }
            None => {
                self.progress.set_body_done();
                if let Some(tee) = self.tee.take() {
                    tee.finish();
                }
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl CappedBody {
    /// The client has not sent the next body bytes yet. Before the response head,
    /// [`response_head`]'s timer watches for a stall; after it, this body's own.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.progress.set_waiting_for_client(true);
        if self.progress.response_started() && self.timer.expired(cx, &self.progress, self.body_timeout) {
            self.tee = None;
            self.progress.set_body_done();
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.body_timeout)))));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn h2c_is_never_an_upgrade_to_forward() {
        let ask = |upgrade: &str, connection: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::UPGRADE, HeaderValue::from_str(upgrade).unwrap());
            h.insert(header::CONNECTION, HeaderValue::from_str(connection).unwrap());
            upgrade_protocol(&h)
        };
        assert_eq!(ask("h2c", "Upgrade, HTTP2-Settings"), None);
        assert_eq!(ask("H2C", "upgrade"), None);
        assert_eq!(
            ask("h2c, websocket", "upgrade"),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(ask("websocket", "Upgrade"), Some(HeaderValue::from_static("websocket")));
        assert_eq!(
            ask("websocket", "keep-alive"),
            None,
            "no Connection: upgrade, no upgrade"
        );
    }

    #[test]
    fn strips_headers_named_on_every_connection_line() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive, x-first"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Second"));
        h.insert("x-first", HeaderValue::from_static("1"));
        h.insert("x-second", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn strips_each_hop_by_hop_header_alone_and_keeps_the_rest() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("1"));
            h.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "after stripping {name}");
        }
        let mut none = HeaderMap::new();
        none.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut none);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn ip_text_is_what_display_writes() {
        let mut ips: Vec<std::net::IpAddr> = vec!["::1".parse().unwrap(), "2001:db8::8:800:200c:417a".parse().unwrap()];
        for a in [0u8, 1, 9, 10, 11, 99, 100, 101, 199, 200, 249, 250, 255] {
            ips.push(std::net::Ipv4Addr::new(a, 255 - a, a / 2, 7).into());
        }
        for ip in ips {
            let mut out = String::from("x, ");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x, {ip}"));
        }
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        append_forwarded_for(&mut h, "[::1]:5".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, ::1");
    }

    #[test]
    fn forwarded_for_keeps_every_line() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7, 192.0.2.9"));
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.1, 203.0.113.7, 192.0.2.9, 10.0.0.1");
    }

    #[test]
    fn auth_accepts_current_and_unexpired_previous_only() {
        let now = Instant::now();
        let auth = InboundAuth {
            header: HeaderName::from_static("x-internal-auth-token"),
            accepted: vec![
                AcceptedToken {
                    value: Secret::new("new"),
                    until: None,
                },
                AcceptedToken {
                    value: Secret::new("old"),
                    until: Some(now + Duration::from_secs(60)),
                },
                AcceptedToken {
                    value: Secret::new("older"),
                    until: Some(now - Duration::from_secs(1)),
                },
            ],
        };
        assert!(auth.accepts(b"new"));
        assert!(auth.accepts(b"old"));
        assert!(!auth.accepts(b"older"));
        assert!(!auth.accepts(b"ne"));
        assert!(!auth.accepts(b""));
    }

    #[test]
    fn te_trailers_detected_with_params() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        assert!(te_has_trailers(&h));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        assert!(!te_has_trailers(&h));
    }
}
