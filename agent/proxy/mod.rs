//! The embedded origin proxy: what cloudflared's ingress points at.
//!
//! Per request: `/healthz` → ok; internal auth header (constant time) → 401; `Host` → route → 404;
//! weighted backend; hop-by-hop and credential headers removed; upstream identity token added;
//! streamed to the upstream through a pooled client; errors mapped to 502/503/504 with a short
//! JSON body and a log line naming the route.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

pub mod access_log;
mod auth;
mod authority;
mod body;
mod default_trust;
mod destination;
mod error;
mod h1_pool;
mod headers;
mod limits;
mod mirror;
mod response;
mod upgrade;
mod upstream;

pub use access_log::AccessLog;
pub use auth::{AcceptedToken, InboundAuth};
pub use body::{BodyTooLarge, CappedBody};
pub use error::ProxyError;
pub use h1_pool::PooledBody;
pub use headers::strip_hop_by_hop;
pub use response::{error, json};

pub use default_trust::DefaultTrust;
use default_trust::WorkerDefaults;
use destination::{GuardedResolver, HttpConnector};
use h1_pool::{H1Error, H1Pool};
use headers::{
    append_forwarded_for, client_host, content_length, set_forwarded_proto, te_has_trailers, X_SERVERLESS_AUTHORIZATION,
};
use limits::Activity;
use upgrade::upgrade_protocol;
use upstream::{
    http_connector, response_head, upstream_failure, with_authority, AuthorityPool, AuthorityPools, Head, MirrorClient,
    TlsClient, TlsPools,
};

use crate::config::{AuthHeaderKind, HostHeader, ProxySection, UpstreamAuthKind, UpstreamProtocol};
use crate::gcp::IdTokenCache;
use crate::routing::cors::CorsVerdict;
use crate::routing::filters::{client_scheme, is_host_and_port, request_host};
use crate::routing::mirror::MIRROR_MAX_IN_FLIGHT;
use crate::routing::table::{host_without_port, Backend, RouteTable, Routed, Rule};
use crate::routing::{path, Filters, RequestHead};
use crate::telemetry::Metrics;

/// A response body: the upstream's (from hyper-util's client or our own HTTP/1.1 pool), or one
/// the proxy wrote itself.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;
pub type UpstreamBody = Either<Incoming, PooledBody>;
/// What the server sends: the body as it is, or wrapped to write its access-log line at the end.
pub type Served = Either<ProxyBody, access_log::Logged<ProxyBody>>;

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
        let limit = live.max_body_bytes.unwrap_or(u64::MAX);
        let body = CappedBody::new(body, limit, progress.clone(), body_timeout, tee, exchange.clone());
        let mut up = Request::from_parts(parts, body);

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
