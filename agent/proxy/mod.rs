//! The embedded origin proxy: what cloudflared's ingress points at.
//!
//! Per request, in phases (pingora's `request_filter` → `upstream_request_filter` →
//! `response_filter` → `logging`): `/healthz` → ok; internal auth header (constant time) → 401;
//! path normalised, `Host` → route → 404; a fail-closed rule, redirect or CORS preflight
//! answered here; a weighted backend; the request phase (`request.rs`: hop-by-hop and credential
//! headers removed, forwarding headers, filters, rewrite, identity token); the upstream phase
//! (`upstream.rs`: a pool of this worker, the response head awaited under the backend and body
//! timeouts); an upgrade spliced (`upgrade.rs`) or the response phase (`response.rs`); errors
//! mapped to 4xx/5xx with a short JSON body (`error.rs`); and the logging phase (`logging.rs`:
//! metrics, the access log, a log line naming the route).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response, StatusCode};
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
mod logging;
mod mirror;
mod request;
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
use h1_pool::H1Pool;
use headers::set_forwarded_proto;
use limits::Activity;
use request::{answer_here, UpstreamTarget};
use upgrade::upgrade_protocol;
use upstream::{http_connector, pool_choice, AuthorityPools, MirrorClient, PoolChoice, TlsClient, TlsPools};

use crate::config::ProxySection;
use crate::gcp::IdTokenCache;
use crate::routing::mirror::MIRROR_MAX_IN_FLIGHT;
use crate::routing::table::{host_without_port, Backend, RouteTable, Routed};
use crate::routing::{path, RequestHead};
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
    /// The pools of backends with their own TLS settings, one per compiled
    /// [`UpstreamTls`](crate::routing::tls::UpstreamTls) of a table in use.
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
        if req.method() == http::Method::CONNECT {
            return self.unrouted(ProxyError::Connect, start, exchange);
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
                logging::failed(rule, &e, exchange);
                e.response()
            }
        };
        response::rule_filters(rule, origin.as_ref(), &mut resp);
        logging::routed(rule, resp.status(), start);
        resp
    }

    /// The answer to a request refused before it found a rule (401, 400, 404), counted as
    /// unrouted.
    fn unrouted(&self, e: ProxyError, start: Instant, exchange: Option<&access_log::Exchange>) -> Response<ProxyBody> {
        logging::unrouted(&self.shared.metrics, &e, start, exchange);
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

    /// Sends the request to `backend` and streams its answer back: the request phase, the
    /// mirrors, the identity token, the upstream phase, then the upgrade or the response phase.
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
        let origin = backend
            .filters
            .cors
            .as_ref()
            .and(req.headers().get(header::ORIGIN).cloned());
        let forwarding = request::upstream_request(&mut req, routed, backend, live, peer)?;
        let downstream_upgrade = forwarding.upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Mirrors see the request as the backend will (filters applied), without credentials.
        let has_mirrors = !rule.filters.mirrors.is_empty() || !backend.filters.mirrors.is_empty();
        let tee = if has_mirrors && forwarding.upgrade.is_none() {
            let pq = forwarding.path_and_query.clone();
            let mirrors = rule.filters.mirrors.iter().chain(&backend.filters.mirrors);
            self.start_mirrors(rule, mirrors, &parts.method, pq, &parts.headers, body.is_end_stream())
        } else {
            None
        };
        let pq = forwarding.path_and_query.as_ref();
        UpstreamTarget::of(backend)
            .address(&self.shared.tokens, &mut parts, pq)
            .await?;
        let exchange = parts.extensions.remove::<Arc<access_log::Exchange>>();
        // Extensions are per hop (hyper's connection info, upgrade handles): start clean.
        parts.extensions = http::Extensions::new();
        let progress = Arc::new(Activity::new());
        let limit = live.max_body_bytes.unwrap_or(u64::MAX);
        let body_timeout = self.shared.settings.body_read_timeout;
        let body = CappedBody::new(body, limit, progress.clone(), body_timeout, tee, exchange.clone());
        let up = Request::from_parts(parts, body);
        let timeout = rule.backend_timeout.filter(|_| !timeout_exempt);
        // The upstream phase: the pool, the send, the wait for the response head.
        let mut resp = match pool_choice(backend, &up, downstream_upgrade.is_some()) {
            PoolChoice::OwnH1 => {
                let sent = std::pin::pin!(self.h1.send(up));
                upstream::head(backend, sent, timeout, body_timeout, &progress)
                    .await?
                    .map(Either::Right)
            }
            choice => {
                let mut sent = self.pooled(backend, choice, up);
                let sent = Pin::new(&mut sent);
                upstream::head(backend, sent, timeout, body_timeout, &progress)
                    .await?
                    .map(Either::Left)
            }
        };
        if let Some(x) = &exchange {
            x.upstream(&backend.upstream.url, &resp);
        }
        let idle = self.shared.settings.upgrade_idle_timeout;
        if !upgrade::splice(&mut resp, downstream_upgrade, &rule.route, idle) {
            response::from_backend(backend, origin.as_ref(), &mut resp);
        }
        Ok(resp.map(Either::Left))
    }
}

/// Phases driven alone in unit tests: a table compiled as the config file gives it.
#[cfg(test)]
mod test_support {
    use std::path::Path;
    use std::sync::Arc;

    use http::HeaderName;

    use super::LiveSettings;
    use crate::routing::table::RouteTable;

    /// The table of `toml` (an agent config's `[[route]]`s).
    pub fn table(toml: &str) -> RouteTable {
        let config = crate::routing::parse_config(Path::new("t.toml"), toml).expect("the test config parses");
        crate::routing::compile::build(&config, &config.routes.hosts).expect("the test table compiles")
    }

    /// Settings serving `routes`, with the internal auth header `x-internal-auth-token`.
    pub fn live(routes: RouteTable, max_body_bytes: Option<u64>) -> LiveSettings {
        LiveSettings {
            routes: Arc::new(routes),
            auth: None,
            auth_header: HeaderName::from_static("x-internal-auth-token"),
            max_body_bytes,
            access_log: None,
        }
    }
}
