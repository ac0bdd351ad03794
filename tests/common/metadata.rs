//! A fake GCE metadata server, faithful where the agent could get it wrong:
//! - `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=A&format=full`
//!   answers an identity token (a JWT) for audience A;
//! - a request without `Metadata-Flavor: Google`, or with `X-Forwarded-For` (the real server
//!   refuses anything that looks proxied), gets 403;
//! - every reply carries `Metadata-Flavor: Google`.
//!
//! Tokens are unsigned (the signature part is a fixed marker): the agent reads `exp` and never
//! verifies signatures, Cloud Run does. Faults (500, hang, dropped connection) and a delay can
//! be injected at any time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The signature part of every token; tests search logs for it.
pub const SIGNATURE_MARKER: &str = "RkFLRS1TSUdOQVRVUkUtZG8tbm90LWxvZw";

const IDENTITY_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/identity";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const V1: &str = "/computeMetadata/v1/";

/// What the fake does with the next identity requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 500 with a short text body (as the real server answers while it is unwell).
    ServerError,
    /// Accepts the request and never answers.
    Hang,
    /// Closes the connection without a response.
    Drop,
    /// Answers 200 with a token but without `Metadata-Flavor` (not a metadata server).
    NotGoogle,
    /// 500 with a 301-byte body of 3-byte characters: byte 200 falls inside one.
    ServerErrorMultibyte,
}

#[derive(Debug)]
struct State {
    fault: Mutex<Fault>,
    delay: Mutex<Duration>,
    lifetime: Mutex<Duration>,
    /// Identity requests that carried the flavor header, by audience.
    fetches: Mutex<HashMap<String, u64>>,
    issued: Mutex<Vec<String>>,
    refused: AtomicU64,
    serial: AtomicU64,
    /// The OAuth2 access token the token endpoint hands out.
    access_token: Mutex<String>,
    token_requests: AtomicU64,
    /// `instance/attributes/NAME` or `project/attributes/NAME` → (value, version).
    attributes: Mutex<HashMap<String, (String, u64)>>,
    attribute_version: AtomicU64,
    attribute_changed: tokio::sync::Notify,
    /// While set, attribute and token requests get 503 (a metadata outage).
    attributes_down: std::sync::atomic::AtomicBool,
}

pub struct FakeMetadata {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FakeMetadata {
    pub async fn start() -> FakeMetadata {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind metadata");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            fault: Mutex::new(Fault::None),
            delay: Mutex::new(Duration::ZERO),
            lifetime: Mutex::new(Duration::from_secs(3600)),
            fetches: Mutex::new(HashMap::new()),
            issued: Mutex::new(Vec::new()),
            refused: AtomicU64::new(0),
            serial: AtomicU64::new(0),
            access_token: Mutex::new("ya29.fake-access-token".into()),
            token_requests: AtomicU64::new(0),
            attributes: Mutex::new(HashMap::new()),
            attribute_version: AtomicU64::new(1),
            attribute_changed: tokio::sync::Notify::new(),
            attributes_down: std::sync::atomic::AtomicBool::new(false),
        });
        let task = super::serve_fake(listener, state.clone(), handle);
        FakeMetadata { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`, for `gcp.metadata_url` or `GCE_METADATA_HOST` (without scheme).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// `exp` of tokens issued from now on is now + `lifetime`.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *self.state.lifetime.lock().unwrap() = lifetime;
    }

    /// Identity requests received for `audience` (whatever was answered).
    pub fn fetches(&self, audience: &str) -> u64 {
        self.state.fetches.lock().unwrap().get(audience).copied().unwrap_or(0)
    }

    pub fn total_fetches(&self) -> u64 {
        self.state.fetches.lock().unwrap().values().sum()
    }

    /// Requests refused with 403 (no flavor header, or proxied).
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// The access token the token endpoint hands out (the fake Secret Manager checks it).
    pub fn access_token(&self) -> String {
        self.state.access_token.lock().unwrap().clone()
    }

    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Sets `path` (e.g. `instance/attributes/tunnel-routes`), waking long polls.
    pub fn set_attribute(&self, path: &str, value: &str) {
        let version = self.state.attribute_version.fetch_add(1, Ordering::SeqCst) + 1;
        self.state
            .attributes
            .lock()
            .unwrap()
            .insert(path.to_owned(), (value.to_owned(), version));
        self.state.attribute_changed.notify_waiters();
    }

    pub fn delete_attribute(&self, path: &str) {
        self.state.attributes.lock().unwrap().remove(path);
        self.state.attribute_changed.notify_waiters();
    }

    /// Attribute and token requests answer 503 while `down`.
    pub fn set_attributes_down(&self, down: bool) {
        self.state.attributes_down.store(down, Ordering::SeqCst);
        self.state.attribute_changed.notify_waiters();
    }

    /// Every token handed out, oldest first.
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The claims part of a token, decoded.
pub fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON payload")
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Metadata-Flavor", "Google")
        .header("Content-Type", "application/text")
        .header("Server", "Metadata Server for VM")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let flavored = req.headers().get("metadata-flavor").is_some_and(|v| v == "Google");
    if !flavored || req.headers().contains_key("x-forwarded-for") {
        state.refused.fetch_add(1, Ordering::SeqCst);
        // The real server's wording.
        return Ok(reply(
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor\": \"Google\"\n".into(),
        ));
    }
    if req.method() != http::Method::GET {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n".into()));
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let path = req.uri().path().to_owned();
    if path == TOKEN_PATH || path.contains("/attributes/") {
        return Ok(non_identity(&state, &path, &query).await);
    }
    if path != IDENTITY_PATH {
        return Ok(reply(StatusCode::NOT_FOUND, "Not Found\n".into()));
    }
    let Some(audience) = query.get("audience").filter(|a| !a.is_empty()).cloned() else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required\n".into(),
        ));
    };
    *state.fetches.lock().unwrap().entry(audience.clone()).or_default() += 1;

    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fault = *state.fault.lock().unwrap();
    match fault {
        Fault::None | Fault::NotGoogle => {}
        Fault::ServerError => {
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal error while fetching identity token\n".into(),
            ))
        }
        Fault::ServerErrorMultibyte => {
            return Ok(reply(StatusCode::INTERNAL_SERVER_ERROR, "\u{20ac}".repeat(100) + "\n"))
        }
        Fault::Hang => std::future::pending::<()>().await,
        // An error from the service makes hyper close the connection without answering.
        Fault::Drop => return Err(std::io::Error::other("injected connection drop")),
    }

    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let lifetime = state.lifetime.lock().unwrap().as_secs();
    let serial = state.serial.fetch_add(1, Ordering::SeqCst);
    let full_format = query.get("format").is_some_and(|f| f == "full");
    let mut payload = serde_json::json!({
        "aud": audience,
        "azp": "112233445566778899000",
        "exp": now + lifetime,
        "iat": now,
        "iss": "https://accounts.google.com",
        "sub": "112233445566778899000",
        "jti": format!("token-{serial}"),
    });
    if full_format {
        payload["email"] = "agent@test-project.iam.gserviceaccount.com".into();
        payload["email_verified"] = true.into();
        payload["google"] =
            serde_json::json!({"compute_engine": {"project_id": "test-project", "zone": "europe-west1-b"}});
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwt = format!(
        "{}.{}.{}",
        b64.encode(r#"{"alg":"RS256","kid":"fake-key","typ":"JWT"}"#),
        b64.encode(payload.to_string()),
        SIGNATURE_MARKER
    );
    state.issued.lock().unwrap().push(jwt.clone());
    let mut resp = reply(StatusCode::OK, jwt);
    if fault == Fault::NotGoogle {
        resp.headers_mut().remove("metadata-flavor");
    }
    Ok(resp)
}

/// The access-token endpoint and attributes (with `ETag`, `wait_for_change`, `last_etag`,
/// `timeout_sec` as the real server implements them).
async fn non_identity(state: &State, path: &str, query: &HashMap<String, String>) -> Response<Full<Bytes>> {
    if state.attributes_down.load(Ordering::SeqCst) {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n".into());
    }
    if path == TOKEN_PATH {
        state.token_requests.fetch_add(1, Ordering::SeqCst);
        let token = state.access_token.lock().unwrap().clone();
        let body = serde_json::json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"});
        return reply(StatusCode::OK, body.to_string());
    }
    let key = path.strip_prefix(V1).unwrap_or(path).to_owned();
    let current = |state: &State| state.attributes.lock().unwrap().get(&key).cloned();
    let etag_of = |version: u64| format!("{version:016x}");
    let wait = query.get("wait_for_change").is_some_and(|v| v == "true");
    let last = query.get("last_etag").cloned();
    let timeout = query
        .get("timeout_sec")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let changed = state.attribute_changed.notified();
        let value = current(state);
        let unchanged = match (&value, &last) {
            (Some((_, v)), Some(l)) => etag_of(*v) == *l,
            _ => false,
        };
        if !wait || !unchanged || state.attributes_down.load(Ordering::SeqCst) {
            if state.attributes_down.load(Ordering::SeqCst) {
                return reply(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n".into());
            }
            return match value {
                Some((v, version)) => {
                    let mut resp = reply(StatusCode::OK, v);
                    resp.headers_mut().insert("etag", etag_of(version).parse().unwrap());
                    resp
                }
                None => reply(StatusCode::NOT_FOUND, "Not Found\n".into()),
            };
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {
                // Timed out without a change: the same value and ETag.
                let (v, version) = value.expect("unchanged implies present");
                let mut resp = reply(StatusCode::OK, v);
                resp.headers_mut().insert("etag", etag_of(version).parse().unwrap());
                return resp;
            }
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
