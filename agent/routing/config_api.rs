//! The config API: a controller pushes whole route tables to the agent (`routes.source =
//! "config-api"`), wire-compatible with the L7 peer (seeds 003/004):
//!
//! - `PUT /config` with `{"version": N, "rules": [...]}` and `Authorization: Bearer TOKEN`:
//!   401 wrong or missing token, 415 not `application/json`, 413 body over 1 MiB, 400 invalid
//!   (every problem listed), 409 version older than the one applied, 200 applied.
//! - `GET /config` → `{"version": N, "ready": bool}`; `GET /healthz`, `GET /readyz` as the peer.
//!
//! The wire format itself is [`crate::routing::pushed`]. A push is validated and compiled here
//! (on a blocking thread), then handed to the node as a
//! [`Push`]: the node version-checks, persists and applies it on the path every route table takes
//! (proxy, status, runtime `routes.json`, cloudflared's ingress for a locally-managed tunnel).
//! The node handles one event at a time, so concurrent pushes apply in some order, and a request
//! sees either the old table or the new one, never a mix.
//!
//! With `persist = true` (the default) every applied push is also written to
//! `agent.state_dir/config-api.json` (temp file, fsync, rename) and read back at boot: the
//! controller pushes on change, not on our restart, so without it a restarted agent would
//! answer 404 until the next HTTPRoute edit. The stored version keeps ordering across the
//! restart (an older push is still refused).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, ConfigApiSection, Problem};
pub use crate::routing::persisted::{boot_persisted, load_persisted, persist, recompile_persisted, PersistedError};
pub use crate::routing::pushed::{PushedConfig, PushedRule};
use crate::routing::table::{RouteTable, RoutesError};
use crate::secret::{self, AcceptedToken};
use crate::secrets::SecretValues;
use crate::server::{self, Limits, ServerHandle};
use crate::telemetry::Metrics;

/// Largest accepted `PUT /config` body (the peer's limit).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How much of a body over [`MAX_BODY_BYTES`] is still read (and dropped) before the 413, and
/// for how long. Closing a socket with unread data makes the kernel reset the connection, which
/// can destroy the 413 before the client has read it; a bounded read lets the answer arrive.
const LINGER_BYTES: usize = 8 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// `body` whole when it fits in `limit` bytes, `None` when it does not (after [`linger`]).
async fn read_limited(mut body: Incoming, limit: usize) -> Result<Option<Bytes>, hyper::Error> {
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        if kept.len() + data.len() > limit {
            linger(body, kept.len() + data.len()).await;
            return Ok(None);
        }
        kept.extend_from_slice(&data);
    }
    Ok(Some(kept.freeze()))
}

/// Reads on and drops a refused body, up to [`LINGER_BYTES`] in all or [`LINGER_TIME`].
async fn linger(mut body: Incoming, mut seen: usize) {
    let drain = async {
        while seen <= LINGER_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Whether cloudflared is told to use HTTP/2 towards the edge (`--protocol http2`).
fn tunnel_is_http2(config: &Config) -> bool {
    let args = &config.cloudflared.extra_args;
    args.windows(2).any(|w| w[0] == "--protocol" && w[1] == "http2") || args.iter().any(|a| a == "--protocol=http2")
}

/// A validated, compiled push on its way to the node.
#[derive(Debug)]
pub struct Push {
    pub version: u64,
    /// Carries `version`.
    pub table: RouteTable,
    /// The request body as received, for the state file.
    pub body: Bytes,
    pub reply: oneshot::Sender<PushOutcome>,
}

/// What the node did with a [`Push`].
#[derive(Debug)]
pub enum PushOutcome {
    Applied {
        rules: usize,
    },
    /// Older than the table in use.
    Stale {
        current: u64,
    },
    PersistFailed(std::io::Error),
}

/// What a reload or a secret rotation changes for the config API; the node publishes a new
/// one each time (`Node::apply_settings`).
#[derive(Debug)]
pub struct ApiSettings {
    /// The running configuration, which pushes compile under (`[routes]`, `[proxy]`:
    /// `upstream_timeout`, `ca_file`, `allow_link_local_upstreams`, …).
    pub config: Config,
    /// The bearer tokens accepted: `config_api.auth_secret`'s value, and after a rotation the
    /// previous one for `proxy.auth_overlap`, as the proxy's inbound auth.
    pub tokens: Vec<AcceptedToken>,
}

impl ApiSettings {
    /// The settings for `config` and `secrets`; `previous` gives the tokens still in their
    /// rotation overlap.
    pub fn new(config: &Config, secrets: &SecretValues, previous: Option<&ApiSettings>) -> ApiSettings {
        let name = config.config_api.as_ref().and_then(|a| a.auth_secret.as_ref());
        let previous = previous.map(|p| p.tokens.as_slice()).unwrap_or_default();
        let tokens = match name.and_then(|n| secrets.get(n)) {
            Some(current) => secret::rotated(current.clone(), previous, config.proxy.auth_overlap),
            // Validated at boot; without a value nothing is accepted.
            None => Vec::new(),
        };
        if tokens.len() > 1 && tokens.len() > previous.len() {
            tracing::info!(
                "config API token rotated; the previous one stays accepted for {:?} (proxy.auth_overlap)",
                config.proxy.auth_overlap
            );
        }
        ApiSettings {
            config: config.clone(),
            tokens,
        }
    }
}

pub struct ConfigApi {
    metrics: Arc<Metrics>,
    /// The current [`ApiSettings`], read once per request.
    settings: watch::Receiver<Arc<ApiSettings>>,
    /// To the node, which applies pushes.
    pushes: mpsc::Sender<Push>,
    /// The version of the table in use (`None` before the first push), published by the node.
    applied: watch::Receiver<Option<u64>>,
}

/// Starts the listener. `config.config_api` and its secret were validated with the config.
pub async fn start(
    section: &ConfigApiSection,
    settings: watch::Receiver<Arc<ApiSettings>>,
    pushes: mpsc::Sender<Push>,
    applied: watch::Receiver<Option<u64>>,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> anyhow::Result<ServerHandle> {
    let api = Arc::new(ConfigApi {
        metrics,
        settings,
        pushes,
        applied,
    });
    let listener = server::bind(section.listen, "config_api.listen").await?;
    let handle = server::serve(listener, limits, move |_, req| api.clone().handle(req))?;
    tracing::info!(listen = %handle.local_addr, "config api up on {}", handle.local_addr);
    Ok(handle)
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn shutting_down() -> Response<Full<Bytes>> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "error": "shutting_down", "message": "the agent is stopping" }),
    )
}

fn problems_reply(status: StatusCode, code: &str, problems: &[Problem]) -> Response<Full<Bytes>> {
    let list: Vec<_> = problems
        .iter()
        .map(|p| json!({ "key": p.key, "reason": p.reason }))
        .collect();
    reply(status, json!({ "error": code, "problems": list }))
}

impl ConfigApi {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let loaded = *self.applied.borrow();
        match (req.method(), req.uri().path()) {
            (&Method::PUT, "/config") => self.put(req).await,
            (&Method::GET, "/config") => reply(
                StatusCode::OK,
                json!({ "version": loaded.unwrap_or(0), "ready": loaded.is_some() }),
            ),
            (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({ "status": "ok" })),
            (&Method::GET, "/readyz") if loaded.is_some() => reply(StatusCode::OK, json!({ "ready": true })),
            (&Method::GET, "/readyz") => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "ready": false, "reason": "no config loaded" }),
            ),
            (_, "/config" | "/healthz" | "/readyz") => {
                let mut resp = reply(StatusCode::METHOD_NOT_ALLOWED, json!({ "error": "method_not_allowed" }));
                let allow = if req.uri().path() == "/config" {
                    "GET, PUT"
                } else {
                    "GET"
                };
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                resp
            }
            _ => reply(StatusCode::NOT_FOUND, json!({ "error": "not_found" })),
        }
    }

    /// `Authorization: Bearer TOKEN` (scheme case-insensitive, RFC 9110 §11.1), token compared
    /// in constant time.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let Some((scheme, token)) = value.split_at_checked(7) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer ") && secret::accepts(&self.settings.borrow().tokens, token)
    }

    /// `PUT /config`: the request checked ([`ConfigApi::body`]), the push parsed and compiled,
    /// then handed to the node ([`ConfigApi::apply`]).
    async fn put(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let body = match self.body(req).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let pushed = match PushedConfig::parse(&body) {
            Ok(p) => p,
            Err(problem) => {
                self.metrics.route_reload_failures.inc();
                return problems_reply(StatusCode::BAD_REQUEST, "invalid_config", &[problem]);
            }
        };
        let Some((pushed, compiled)) = self.compile_blocking(pushed).await else {
            return shutting_down();
        };
        match compiled {
            Ok(table) => self.apply(pushed, table, body).await,
            Err(e) => {
                self.metrics.route_reload_failures.inc();
                tracing::warn!(version = pushed.version, error = %e, "pushed config rejected: version {}: {e}", pushed.version);
                problems_reply(StatusCode::BAD_REQUEST, "invalid_config", &e.problems)
            }
        }
    }

    /// The body of a `PUT /config`, or the answer refusing it: 401 without the token, 415 when
    /// not JSON, 413 over [`MAX_BODY_BYTES`] (declared or sent), 400 when it cannot be read.
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
        if !self.authorized(&req) {
            let mut resp = reply(
                StatusCode::UNAUTHORIZED,
                json!({ "error": "unauthorized", "message": "missing or wrong bearer token" }),
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Err(resp);
        }
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(reply(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({ "error": "unsupported_media_type", "message": "send Content-Type: application/json" }),
            ));
        }
        let too_large = || {
            reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": "body_too_large", "message": format!("the body exceeds {MAX_BODY_BYTES} bytes") }),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > LINGER_BYTES as u64) {
            return Err(too_large());
        }
        match read_limited(req.into_body(), MAX_BODY_BYTES).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(too_large()),
            Err(e) => Err(reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": "bad_request", "message": format!("cannot read the body: {e}") }),
            )),
        }
    }

    /// Hands a compiled push to the node and answers with what it did: 200 applied, 409 older
    /// than the table in use, 500 not persisted, 503 the node is stopping.
    async fn apply(&self, pushed: PushedConfig, table: RouteTable, body: Bytes) -> Response<Full<Bytes>> {
        let (reply_tx, outcome) = oneshot::channel();
        let push = Push {
            version: pushed.version,
            table,
            body,
            reply: reply_tx,
        };
        let outcome = match self.pushes.send(push).await {
            Ok(()) => outcome.await.ok(),
            Err(_) => None,
        };
        match outcome {
            Some(PushOutcome::Applied { rules }) => {
                if pushed.has_grpc_route && !tunnel_is_http2(&self.settings.borrow().config) {
                    // The controller sets hasGrpcRoute because cloudflared drops HTTP trailers
                    // over QUIC, and gRPC carries its status in them.
                    tracing::warn!("the table has gRPC routes but cloudflared is not run with --protocol http2 (cloudflared.extra_args); gRPC status trailers may be lost over QUIC");
                }
                reply(StatusCode::OK, json!({ "version": pushed.version, "rules": rules }))
            }
            Some(PushOutcome::Stale { current }) => reply(
                StatusCode::CONFLICT,
                json!({ "error": "stale_version", "version": pushed.version, "current": current }),
            ),
            Some(PushOutcome::PersistFailed(e)) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": "persist_failed", "message": format!("cannot write the state file: {e}") }),
            ),
            // The node is shutting down.
            None => shutting_down(),
        }
    }

    /// Compiles `pushed` off the control runtime: a large table takes a while, and the control
    /// runtime is one thread that also answers `/ready` and pets the watchdog. `None`: the
    /// runtime is shutting down (with `panic = "abort"` a compile cannot fail otherwise).
    async fn compile_blocking(&self, pushed: PushedConfig) -> Option<(PushedConfig, Result<RouteTable, RoutesError>)> {
        // The settings in force now (a reload or rotation may have changed them since boot).
        let (settings, metrics) = (self.settings.borrow().clone(), self.metrics.clone());
        tokio::task::spawn_blocking(move || {
            let table = pushed.compile(&settings.config, &metrics);
            (pushed, table)
        })
        .await
        .ok()
    }
}
