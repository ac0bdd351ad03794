//! The config API: a controller pushes whole route tables to the agent (`routes.source =
//! "config-api"`), a drop-in for the gateway controller's proxy pods (the peer's
//! `internal/proxy/api.go`):
//!
//! - `PUT /config` with `{"version": N, "rules": [...]}` and `Authorization: Bearer TOKEN`:
//!   401 wrong or missing token, 415 not `application/json`, 413 body over 1 MiB, 400 invalid
//!   (every problem listed), 409 only when `0 < N < current` ([`is_stale`]), 200 applied. An
//!   equal version is applied again; version 0 is applied with a warning and is not ready.
//! - `GET /config` → `{"version": N, "ready": bool}`, with the same bearer as `PUT` (the
//!   controller's pusher reads it after a 409 and retries above it).
//! - `GET /healthz` always 200; `GET /readyz` 503 "no config loaded" until a table with a
//!   version above 0 is in, then 503 while the node cannot serve (the tunnel not connected);
//!   `GET /metrics` without a token (`config_api.metrics`), the health listener's text.
//! - `config_api.allow_unauthenticated`: no token at all (the peer without `PROXY_AUTH_TOKEN`).
//!
//! The wire format itself is [`crate::routing::pushed`]. A push is validated and compiled here
//! (on a blocking thread), then handed to the node as a [`Push`]: the node version-checks,
//! persists and applies it on the path every route table takes (proxy, status, runtime
//! `routes.json`, cloudflared's ingress for a locally-managed tunnel, and its `--protocol` when
//! the table has gRPC routes). The node handles one event at a time, so concurrent pushes apply
//! in some order, and a request sees either the old table or the new one, never a mix.
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

use crate::config::{Config, Problem};
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

/// Whether a push of `version` is refused while the table in use has `current`: only when
/// `0 < version < current`. An equal version is applied again (a controller re-pushing after
/// its own restart), and version 0 (unversioned) is applied over anything, as the peer does
/// (`Router.UpdateConfig`).
pub fn is_stale(version: u64, current: u64) -> bool {
    version > 0 && version < current
}

/// Whether the table in use counts as a loaded configuration: it has a version above 0 (the
/// peer's `/readyz` answers "no config loaded" while its version is 0).
pub fn counts_as_loaded(version: Option<u64>) -> bool {
    version.is_some_and(|v| v > 0)
}

/// What the config API reads of the node besides the table's version. Implemented by
/// `crate::health::Health`, whose readiness it shares.
pub trait NodeView: Send + Sync {
    /// `Err(reason)` while the node cannot serve its role for a reason other than its table
    /// (the tunnel not connected, the proxy not answering, draining).
    fn serving(&self) -> Result<(), String>;
    /// The Prometheus text of the health listener's `/metrics`.
    fn metrics_text(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>>;
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
    /// `config_api.allow_unauthenticated`: every request is let in without a token.
    pub open: bool,
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
            open: config.config_api.as_ref().is_some_and(|a| a.allow_unauthenticated),
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
    /// Readiness beyond the table, and the metrics text.
    node: Arc<dyn NodeView>,
}

/// Serves the API on `listener` (bound or adopted by the caller on `config_api.listen`).
/// `config.config_api` and its secret were validated with the config.
pub async fn start(
    listener: tokio::net::TcpListener,
    settings: watch::Receiver<Arc<ApiSettings>>,
    pushes: mpsc::Sender<Push>,
    applied: watch::Receiver<Option<u64>>,
    node: Arc<dyn NodeView>,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> anyhow::Result<ServerHandle> {
    let api = Arc::new(ConfigApi {
        metrics,
        settings,
        pushes,
        applied,
        node,
    });
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

fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = reply(
        StatusCode::UNAUTHORIZED,
        json!({ "error": "unauthorized", "message": "missing or wrong bearer token" }),
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

fn not_ready(reason: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "ready": false, "reason": reason }),
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
            (&Method::GET, "/config") if !self.authorized(&req) => unauthorized(),
            (&Method::GET, "/config") => {
                let ready = counts_as_loaded(loaded) && self.node.serving().is_ok();
                reply(
                    StatusCode::OK,
                    json!({ "version": loaded.unwrap_or(0), "ready": ready }),
                )
            }
            (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({ "status": "ok" })),
            (&Method::GET, "/readyz") => match (counts_as_loaded(loaded), self.node.serving()) {
                (false, _) => not_ready("no config loaded"),
                (true, Err(why)) => not_ready(&why),
                (true, Ok(())) => reply(StatusCode::OK, json!({ "ready": true })),
            },
            (&Method::GET, "/metrics") if self.metrics_on() => {
                let mut resp = Response::new(Full::new(Bytes::from(self.node.metrics_text().await)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
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

    /// `config_api.metrics`.
    fn metrics_on(&self) -> bool {
        let settings = self.settings.borrow();
        settings.config.config_api.as_ref().is_some_and(|a| a.metrics)
    }

    /// `Authorization: Bearer TOKEN` (scheme case-insensitive, RFC 9110 §11.1), token compared
    /// in constant time.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        if self.settings.borrow().open {
            return true;
        }
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
            return Err(unauthorized());
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
                let cf = &self.settings.borrow().config.cloudflared;
                if pushed.has_grpc_route && cf.enabled && cf.effective_protocol(true) != Some("http2") {
                    // The controller sets hasGrpcRoute because cloudflared drops HTTP trailers
                    // over QUIC, and gRPC carries its status in them.
                    tracing::warn!("the table has gRPC routes but cloudflared is pinned to another protocol than http2 (cloudflared.protocol, extra_args); gRPC status trailers may be lost over QUIC");
                }
                if pushed.version == 0 {
                    tracing::warn!("applied an unversioned table (version 0): /readyz stays 503 \"no config loaded\" until a push with a version above 0");
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

#[cfg(test)]
mod tests {
    use super::{counts_as_loaded, is_stale};

    /// The peer's `Router.UpdateConfig`: refused only when `0 < version < current`.
    #[test]
    fn only_an_older_nonzero_version_is_stale() {
        for (version, current, stale) in [
            (4, 5, true),
            (1, 5, true),
            (5, 5, false),
            (6, 5, false),
            (0, 5, false),
            (0, 0, false),
            (1, 0, false),
        ] {
            assert_eq!(is_stale(version, current), stale, "{version} over {current}");
        }
        assert!(!counts_as_loaded(None));
        assert!(!counts_as_loaded(Some(0)));
        assert!(counts_as_loaded(Some(1)));
    }
}
