//! The config API: a controller pushes whole route tables to the agent (`routes.source =
//! "config-api"`), wire-compatible with the L7 peer (seeds 003/004):
//!
//! - `PUT /config` with `{"version": N, "rules": [...]}` and `Authorization: Bearer TOKEN`:
//!   401 wrong or missing token, 415 not `application/json`, 413 body over 1 MiB, 400 invalid
//!   (every problem listed), 409 version older than the one applied, 200 applied.
//! - `GET /config` → `{"version": N, "ready": bool}`; `GET /healthz`, `GET /readyz` as the peer.
//!
//! A push is validated and compiled here, in the request's task, then handed to the node as a
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

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{
    AuthHeaderKind, BackendSpec, Config, ConfigApiSection, Problem, UpstreamAuthKind, UpstreamProtocol,
};
use crate::config::{FilterSpec, MatchSpec, TimeoutsSpec};
use crate::routing::table::{RouteTable, RoutesError, RuleSource};
use crate::secret::Secret;
use crate::server::{self, Limits, ServerHandle};
use crate::telemetry::Metrics;

/// Largest accepted `PUT /config` body (the peer's limit).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// File in the state dir holding the last applied push.
const STATE_FILE: &str = "config-api.json";

/// A pushed configuration (the peer's `Config`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedConfig {
    pub version: u64,
    #[serde(default)]
    pub rules: Vec<PushedRule>,
}

/// The peer's `RouteRule`: one HTTPRoute rule with its route's hostnames.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedRule {
    /// For metrics and logs; defaults to the first hostname.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    #[serde(default)]
    pub backends: Vec<PushedBackend>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
}

/// The peer's `BackendRef`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedBackend {
    pub url: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub protocol: Option<UpstreamProtocol>,
    #[serde(default, alias = "upstreamAuth")]
    pub upstream_auth: Option<UpstreamAuthKind>,
    #[serde(default, alias = "authHeader")]
    pub auth_header: Option<AuthHeaderKind>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// The peer marks WebSocket backends so its timeouts skip upgrades; here upgrades always
    /// pass and timeouts end at the response head, so the flag changes nothing.
    #[serde(default)]
    #[allow(dead_code)]
    websocket: bool,
}

fn one() -> u32 {
    1
}

impl PushedConfig {
    /// Compiles the push into a table carrying its version. Collects every problem.
    pub fn compile(&self, config: &Config, metrics: &Metrics) -> Result<RouteTable, RoutesError> {
        let sources = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| RuleSource {
                name: r
                    .name
                    .clone()
                    .or_else(|| r.hostnames.first().map(|h| h.to_ascii_lowercase()))
                    .unwrap_or_else(|| "(any host)".to_owned()),
                key: format!("rules[{i}]"),
                hostnames: r.hostnames.clone(),
                backends: r
                    .backends
                    .iter()
                    .map(|b| BackendSpec {
                        url: b.url.clone(),
                        weight: b.weight,
                        upstream_auth: b.upstream_auth,
                        auth_header: b.auth_header,
                        protocol: b.protocol,
                        filters: b.filters.clone(),
                    })
                    .collect(),
                shorthand: false,
                upstream_key: None,
                matches: r.matches.clone(),
                filters: r.filters.clone(),
                timeouts: r.timeouts.clone().unwrap_or_default(),
                default_backend_timeout: config.proxy.upstream_timeout,
            })
            .collect();
        // Rules without backends are allowed, as in Gateway API: their requests get 500.
        let mut table = RouteTable::compile(sources, &config.routes, metrics, false, Vec::new())?;
        table.version = Some(self.version);
        Ok(table)
    }

    pub fn parse(body: &[u8]) -> Result<PushedConfig, Problem> {
        serde_json::from_slice(body).map_err(|e| Problem {
            key: "(body)".into(),
            reason: e.to_string(),
        })
    }
}

fn state_path(config: &Config) -> Option<PathBuf> {
    let persist = config.config_api.as_ref().is_some_and(|a| a.persist);
    persist.then(|| config.agent.state_dir.join(STATE_FILE))
}

/// The table persisted by the last push, if any. An unreadable or no longer valid file is
/// logged and ignored: the agent then waits for a push, as on first boot.
pub fn load_persisted(config: &Config, metrics: &Metrics) -> RouteTable {
    let Some(path) = state_path(config) else {
        return RouteTable::default();
    };
    let body = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return RouteTable::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the persisted config; waiting for a push");
            return RouteTable::default();
        }
    };
    let compiled = PushedConfig::parse(&body)
        .map_err(|p| format!("{}: {}", p.key, p.reason))
        .and_then(|c| c.compile(config, metrics).map_err(|e| e.to_string()));
    match compiled {
        Ok(table) => {
            tracing::info!(path = %path.display(), version = table.version, rules = table.len(), "serving the persisted config until the next push");
            table
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "persisted config is no longer valid; waiting for a push");
            RouteTable::default()
        }
    }
}

/// Writes an accepted push's body where [`load_persisted`] reads it back. Called by the node
/// before it applies the push: a push that cannot be persisted is not applied.
pub async fn persist(config: &Config, body: Bytes) -> Result<(), String> {
    let Some(path) = state_path(config) else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || crate::files::write_atomic(&path, &body, 0o600))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
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
    PersistFailed(String),
}

pub struct ConfigApi {
    metrics: Arc<Metrics>,
    /// Defaults for compiling pushes (`[routes]`, `proxy.upstream_timeout`).
    config: Config,
    token: Secret,
    /// To the node, which applies pushes.
    pushes: mpsc::Sender<Push>,
    /// The version of the table in use (`None` before the first push), published by the node.
    applied: watch::Receiver<Option<u64>>,
}

/// Starts the listener. `config.config_api` and its secret were validated with the config.
pub async fn start(
    section: &ConfigApiSection,
    config: &Config,
    token: Secret,
    pushes: mpsc::Sender<Push>,
    applied: watch::Receiver<Option<u64>>,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> anyhow::Result<ServerHandle> {
    let api = Arc::new(ConfigApi {
        metrics,
        config: config.clone(),
        token,
        pushes,
        applied,
    });
    let listener = server::bind(section.listen, "config_api.listen").await?;
    let handle = server::serve(listener, limits, move |_, req| api.clone().handle(req))?;
    tracing::info!(listen = %handle.local_addr, "config api up");
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
        scheme.eq_ignore_ascii_case(b"bearer ") && self.token.matches(token)
    }

    async fn put(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.authorized(&req) {
            let mut resp = reply(
                StatusCode::UNAUTHORIZED,
                json!({ "error": "unauthorized", "message": "missing or wrong bearer token" }),
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return reply(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({ "error": "unsupported_media_type", "message": "send Content-Type: application/json" }),
            );
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
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return too_large();
        }
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": "bad_request", "message": format!("cannot read the body: {e}") }),
                )
            }
        };

        let pushed = match PushedConfig::parse(&body) {
            Ok(p) => p,
            Err(problem) => {
                self.metrics.route_reload_failures.inc();
                return problems_reply(StatusCode::BAD_REQUEST, "invalid_config", &[problem]);
            }
        };
        let table = match pushed.compile(&self.config, &self.metrics) {
            Ok(t) => t,
            Err(e) => {
                self.metrics.route_reload_failures.inc();
                tracing::warn!(version = pushed.version, error = %e, "pushed config rejected");
                return problems_reply(StatusCode::BAD_REQUEST, "invalid_config", &e.problems);
            }
        };

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
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "shutting_down", "message": "the agent is stopping" }),
            ),
        }
    }
}
