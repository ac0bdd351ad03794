//! The config API: a controller pushes whole route tables to the agent (`routes.source =
//! "config-api"`), wire-compatible with the gateway controller's L7 proxy:
//!
//! - `PUT /config` with `{"version": N, "rules": [...]}` and `Authorization: Bearer TOKEN`:
//!   401 wrong or missing token, 415 not `application/json`, 413 body over 1 MiB, 400 invalid
//!   (every problem listed), 409 version older than the one applied, 200 applied.
//! - `GET /config` → `{"version": N, "ready": bool}`; `GET /healthz`, `GET /readyz` as the peer.
//!
//! A push is validated and compiled here (on a blocking thread), then handed to the node as a
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
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::route_spec::null_as_empty;
use crate::config::{BackendSpec, Config, ConfigApiSection, HostHeader, ListenerSpec, Problem};
use crate::config::{FilterSpec, MatchSpec, TimeoutsSpec};
use crate::routing::compile;
pub use crate::routing::persisted::{boot_persisted, load_persisted, persist, recompile_persisted, PersistedError};
use crate::routing::table::{RouteTable, RoutesError, RuleSource};
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

/// A pushed configuration (the controller's `Config`, `internal/proxy/config.go`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedConfig {
    pub version: u64,
    /// `null` when the controller has no rules (Go's nil slice).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub rules: Vec<PushedRule>,
    /// Set by the controller when a GRPCRoute contributed rules. gRPC needs trailers end to
    /// end, which cloudflared loses over QUIC: the agent warns when its tunnel is not on
    /// HTTP/2 and shows the flag in `/status`.
    #[serde(default, alias = "hasGrpcRoute")]
    pub has_grpc_route: bool,
    /// Optional listener scopes (our extension, docs/routing.md): `[{name, hostname}]`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub listeners: Vec<ListenerSpec>,
}

/// The controller's `RouteRule`: one HTTPRoute rule with its route's hostnames.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushedRule {
    /// For metrics and logs; defaults to the first hostname.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub matches: Vec<MatchSpec>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub filters: Vec<FilterSpec>,
    /// The controller's `BackendRef`s (`url`, `weight`, `protocol`, `tls`, `filters`,
    /// `websocket`, `unavailableStatus`), plus our `upstreamAuth` and `authHeader`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
    /// Every request this rule matches is answered with this status, before filters and
    /// backends: the controller's way to fail a rule closed that it cannot serve as written.
    #[serde(default, alias = "unavailableStatus")]
    pub unavailable_status: Option<u16>,
    /// Names of the `listeners` this rule is attached to; absent, null or empty: all.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub listeners: Vec<String>,
}

impl PushedConfig {
    /// Compiles the push into a table carrying its version. Collects every problem; a push that
    /// names a local file is refused before compiling, which would read it.
    pub fn compile(&self, config: &Config, metrics: &Metrics) -> Result<RouteTable, RoutesError> {
        let named = self.local_files();
        if !named.is_empty() {
            return Err(RoutesError { problems: named });
        }
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
                backends: r.backends.clone(),
                unavailable_status: r.unavailable_status,
                host_header: HostHeader::Client,
                listeners: r.listeners.clone(),
                shorthand: false,
                upstream_key: None,
                matches: r.matches.clone(),
                filters: r.filters.clone(),
                timeouts: r.timeouts.clone().unwrap_or_default(),
                default_backend_timeout: config.proxy.upstream_timeout,
            })
            .collect();
        // Rules without backends are allowed, as in Gateway API: their requests get 500.
        let mut table = compile::rules(sources, &self.listeners, config, metrics, false, Vec::new())?;
        table.version = Some(self.version);
        table.grpc = self.has_grpc_route;
        Ok(table)
    }

    /// Every `tls.caFile` the push names, each as a problem. The answer is the same whatever
    /// the path is: it must not tell the controller which of the host's files exist or can be
    /// read.
    fn local_files(&self) -> Vec<Problem> {
        let named = |key: String| Problem {
            key: format!("{key}.tls.caFile"),
            reason: "a pushed table cannot name a local file; send the PEM CA certificates in caBundle".to_owned(),
        };
        let mirrors = |filters: &[FilterSpec], key: &str, out: &mut Vec<Problem>| {
            for (fi, f) in filters.iter().enumerate() {
                let tls = f.request_mirror.as_ref().and_then(|m| m.tls.as_ref());
                if tls.is_some_and(|t| t.ca_file.is_some()) {
                    out.push(named(format!("{key}.filters[{fi}].requestMirror")));
                }
            }
        };
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            for (bi, b) in r.backends.iter().enumerate() {
                let key = format!("rules[{i}].backends[{bi}]");
                if b.tls.as_ref().is_some_and(|t| t.ca_file.is_some()) {
                    out.push(named(key.clone()));
                }
                mirrors(&b.filters, &key, &mut out);
            }
            mirrors(&r.filters, &format!("rules[{i}]"), &mut out);
        }
        out
    }

    /// Parses a push. A type error or unknown field names its key path (`rules[0].backends[1].
    /// weight`), as `check` does for TOML; only a syntax error is located by line and column.
    pub fn parse(body: &[u8]) -> Result<PushedConfig, Problem> {
        let problem = |key: String, reason: String| Problem {
            key: if key.is_empty() || key == "." {
                "(body)".to_owned()
            } else {
                key
            },
            reason,
        };
        // serde's derived struct also accepts a JSON array (`[version, rules]`), which would
        // apply `[99999, []]` as version 99999: the wire format is an object, so only that is.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(problem(
                String::new(),
                "expected a JSON object {\"version\": N, \"rules\": [...]}".to_owned(),
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let pushed: PushedConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            // Broken JSON has no key to name (the path would be `?`); its line and column are in
            // the reason.
            let key = match e.inner().classify() {
                serde_json::error::Category::Data => e.path().to_string(),
                _ => String::new(),
            };
            problem(key, e.into_inner().to_string())
        })?;
        // Trailing bytes after the object (what `from_slice` checks).
        de.end().map_err(|e| problem(String::new(), e.to_string()))?;
        Ok(pushed)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::routing::parse_config(std::path::Path::new("t.toml"), "").expect("empty config is valid")
    }

    fn compile(body: &str) -> Result<RouteTable, Vec<Problem>> {
        let pushed = PushedConfig::parse(body.as_bytes()).map_err(|p| vec![p])?;
        pushed.compile(&config(), &Metrics::default()).map_err(|e| e.problems)
    }

    /// What the controller's Go `encoding/json` writes for a table using every field it knows
    /// (internal/proxy/config.go): nil slices as `null`, `[]byte` as base64, Go durations.
    const CONTROLLER_PUSH: &str = r#"{"version": 7, "hasGrpcRoute": true, "rules": [
      {"hostnames": ["old.example.com"], "backends": null, "filters": [
         {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301,
          "path": {"type": "ReplaceFullPath", "value": "/new"}}}]},
      {"hostnames": ["app.example.com"], "matches": [
         {"path": {"type": "PathPrefix", "value": "/api"}, "headers": null, "queryParams": null}],
       "filters": [
         {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": null, "add": [{"name": "x-a", "value": "1"}], "remove": null}},
         {"type": "CORS", "cors": {"allowOrigins": ["https://*.example.com"], "allowCredentials": true,
          "allowMethods": ["GET"], "allowHeaders": null, "exposeHeaders": ["x-b"], "maxAge": 60}},
         {"type": "RequestMirror", "requestMirror": {"backendUrl": "http://mirror:8080", "percent": 25, "protocol": ""}}],
       "backends": [
         {"url": "http://api:8080", "weight": 3, "protocol": "h2c", "websocket": true, "filters": null},
         {"url": "http://gone:8080", "weight": 1, "unavailableStatus": 503},
         {"url": "https://secure:8443", "weight": 1, "tls": {"caBundle": "-----BEGIN CERTIFICATE-----\n",
          "serverName": "secure.internal", "subjectAltNames": ["secure.internal"], "subjectAltNameUris": null}},
         {"url": "http://redirecting:8080", "weight": 1, "filters": [
           {"type": "RequestRedirect", "requestRedirect": {"hostname": "elsewhere.example.com"}}]}],
       "timeouts": {"request": "10s", "backend": "1.5s"}},
      {"hostnames": ["broken.example.com"], "backends": [], "unavailableStatus": 500}
    ]}"#;

    #[test]
    fn the_controllers_push_parses_with_every_field_it_sends() {
        let pushed = PushedConfig::parse(CONTROLLER_PUSH.as_bytes()).expect("parses");
        assert!(pushed.has_grpc_route);
        assert_eq!(pushed.rules.len(), 3);
        assert!(pushed.rules[0].backends.is_empty(), "null backends are an empty list");
        assert_eq!(pushed.rules[1].backends[1].unavailable_status, Some(503));
        assert!(pushed.rules[1].backends[0].websocket);
        assert_eq!(
            pushed.rules[1].backends[0].protocol,
            Some(crate::config::UpstreamProtocol::H2c)
        );
        let tls = pushed.rules[1].backends[2].tls.as_ref().expect("tls kept");
        assert_eq!(tls.server_name.as_deref(), Some("secure.internal"));
        assert_eq!(pushed.rules[2].unavailable_status, Some(500));
    }

    #[test]
    fn rules_without_anything_and_null_rules_are_accepted() {
        let t = compile(r#"{"version": 1, "rules": null}"#).expect("null rules");
        assert!(t.is_empty());
        let t = compile(
            r#"{"version": 1, "rules": [{"hostnames": null, "matches": null, "filters": null, "backends": null}]}"#,
        )
        .expect("all null");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn unknown_fields_fail_closed_naming_the_rule_and_field() {
        let err = compile(
            r#"{"version": 1, "rules": [{"backends": []}, {"backends": [{"url": "http://a", "retries": 3}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(err[0].key, "rules[1].backends[0].retries", "{err:?}");
        assert!(err[0].reason.contains("unknown field `retries`"), "{err:?}");
        let err = compile(r#"{"version": 1, "rules": [{"filters": [{"type": "CORS", "cors": {"allowOrigin": []}}]}]}"#)
            .unwrap_err();
        assert_eq!(err[0].key, "rules[0].filters[0].cors.allowOrigin", "{err:?}");
        let err =
            compile(r#"{"version": 1, "rules": [{"backends": [{"url": "http://a", "protocol": "h3"}]}]}"#).unwrap_err();
        assert_eq!(err[0].key, "rules[0].backends[0].protocol", "{err:?}");
        let err =
            compile(r#"{"version": 1, "rules": [{"backends": [{"url": "http://a", "unavailableStatus": 200}]}]}"#)
                .unwrap_err();
        assert_eq!(err[0].key, "rules[0].backends[0].unavailableStatus", "{err:?}");
        let err = compile(r#"{"version": 1, "rules": [{"unavailableStatus": 302}]}"#).unwrap_err();
        assert_eq!(err[0].key, "rules[0].unavailableStatus", "{err:?}");
    }
}

#[cfg(test)]
mod listener_tests {
    use super::tests_support::*;

    /// Gateway API listener isolation: the most specific listener matching the host owns the
    /// request, and only its rules serve it.
    #[test]
    fn the_most_specific_listener_owns_the_request() {
        let t = compile(
            r#"{"version": 1,
             "listeners": [{"name": "empty"}, {"name": "wild", "hostname": "*.example.com"},
                           {"name": "foo", "hostname": "foo.example.com"}],
             "rules": [
               {"name": "any", "listeners": ["empty"], "backends": [{"url": "http://any"}]},
               {"name": "wild", "listeners": ["wild"], "hostnames": ["*.example.com"], "matches": [{"path": {"type": "PathPrefix", "value": "/wild"}}],
                "backends": [{"url": "http://wild"}]},
               {"name": "foo", "listeners": ["foo"], "backends": [{"url": "http://foo"}]},
               {"name": "everywhere", "hostnames": ["shared.example.com"], "matches": [{"path": {"type": "Exact", "value": "/shared"}}],
                "backends": [{"url": "http://shared"}]}
             ]}"#,
        )
        .expect("compiles");
        let at = |host: &str, path: &str| route(&t, host, path);
        assert_eq!(at("foo.example.com", "/"), "foo");
        assert_eq!(at("bar.example.com", "/wild/x"), "wild");
        assert_eq!(at("bar.example.com", "/"), "404", "the *.example.com listener owns bar");
        assert_eq!(at("example.org", "/"), "any");
        assert_eq!(
            at("shared.example.com", "/shared"),
            "everywhere",
            "a rule without listeners is on all"
        );
        let err = compile(r#"{"version": 1, "listeners": [{"name": "a"}, {"name": "a", "hostname": "x:1"}], "rules": [{"listeners": ["b"]}]}"#)
            .unwrap_err();
        let keys: Vec<&str> = err.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["listeners[1].hostname", "listeners[1].name", "rules[0].listeners[0]"],
            "{err:?}"
        );
    }

    /// The controller's mirror `tls` (a BackendTLSPolicy on the mirrored Service) compiles into
    /// the mirror; on an `http://` mirror it is refused with the filter's key.
    #[test]
    fn a_pushed_mirror_takes_its_own_tls_settings() {
        let mirror = |url: &str| {
            format!(
                r#"{{"version": 1, "rules": [{{"hostnames": ["m.example.com"], "backends": [{{"url": "http://app"}}],
                  "filters": [{{"type": "RequestMirror", "requestMirror": {{"backendUrl": "{url}", "percent": 100,
                    "tls": {{"serverName": "mirror.internal", "subjectAltNames": null, "subjectAltNameUris": ["spiffe://c/ns/a/sa/m"]}}}}}}]}}]}}"#
            )
        };
        let t = compile(&mirror("https://mirror:8443")).expect("compiles");
        assert_eq!(t.len(), 1);
        let err = compile(&mirror("http://mirror:8080")).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].key, "rules[0].filters[0]", "{err:?}");
        assert!(err[0].reason.contains("https:// mirror backend"), "{err:?}");
    }

    #[test]
    fn toml_listeners_scope_routes_too() {
        let config = crate::routing::parse_config(
            std::path::Path::new("t.toml"),
            r#"
            [[listener]]
            name = "wild"
            hostname = "*.example.com"
            [[listener]]
            name = "empty"
            [[route]]
            name = "fallback"
            listeners = ["empty"]
            upstream = "http://fallback"
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = compile::build(&config, &config.routes.hosts).expect("builds");
        assert_eq!(route(&t, "bar.example.com", "/"), "404");
        assert_eq!(route(&t, "example.org", "/"), "fallback");
    }
}

#[cfg(test)]
mod tests_support {
    pub use super::*;

    pub fn compile(body: &str) -> Result<RouteTable, Vec<Problem>> {
        let config = crate::routing::parse_config(std::path::Path::new("t.toml"), "").expect("empty config is valid");
        let pushed = PushedConfig::parse(body.as_bytes()).map_err(|p| vec![p])?;
        pushed.compile(&config, &Metrics::default()).map_err(|e| e.problems)
    }

    /// The name of the rule a `GET path` to `host` lands on, or "404".
    pub fn route(t: &RouteTable, host: &str, path: &str) -> String {
        let headers = http::HeaderMap::new();
        let head = crate::routing::RequestHead {
            method: &http::Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        t.route(host, &head)
            .map_or("404".to_owned(), |r| r.rule.route.to_string())
    }
}
