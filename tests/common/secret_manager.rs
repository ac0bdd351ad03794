//! A fake Secret Manager REST API (`GET /v1/{name}:access`), faithful where the agent could get
//! it wrong:
//! - requires `Authorization: Bearer <the access token the fake metadata server issues>`,
//!   otherwise 401 with Google's error envelope;
//! - answers `{"name": …, "payload": {"data": <base64>, "dataCrc32c": "<decimal>"}}` (proto3
//!   JSON renders int64 as a string);
//! - unknown versions get 404 `NOT_FOUND`, and errors always use the envelope
//!   `{"error": {"code": N, "message": "…", "status": "…"}}`;
//! - faults can be queued (e.g. 503, 503, 429, then success), a checksum can be corrupted, and a
//!   secret can be made permanently forbidden (403 `PERMISSION_DENIED`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Correct,
    Wrong,
    Absent,
}

#[derive(Debug)]
struct State {
    access_token: String,
    /// Resource name (`projects/P/secrets/S/versions/V`) → value.
    values: Mutex<HashMap<String, Vec<u8>>>,
    forbidden: Mutex<Vec<String>>,
    faults: Mutex<VecDeque<u16>>,
    checksum: Mutex<Checksum>,
    /// Requests by resource name, whatever was answered.
    requests: Mutex<HashMap<String, u64>>,
    unauthenticated: Mutex<u64>,
}

pub struct FakeSecretManager {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FakeSecretManager {
    /// Accepts only `access_token` as the bearer.
    pub async fn start(access_token: &str) -> FakeSecretManager {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind secret manager");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            access_token: access_token.to_owned(),
            values: Mutex::default(),
            forbidden: Mutex::default(),
            faults: Mutex::default(),
            checksum: Mutex::new(Checksum::Correct),
            requests: Mutex::default(),
            unauthenticated: Mutex::default(),
        });
        let task = super::serve_fake(listener, state.clone(), handle);
        FakeSecretManager { addr, state, task }
    }

    /// For `gcp.secret_manager_endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, resource: &str, value: &[u8]) {
        self.state
            .values
            .lock()
            .unwrap()
            .insert(resource.to_owned(), value.to_vec());
    }

    pub fn forbid(&self, resource: &str) {
        self.state.forbidden.lock().unwrap().push(resource.to_owned());
    }

    /// The next requests are answered with these statuses, in order.
    pub fn queue_faults(&self, statuses: &[u16]) {
        self.state.faults.lock().unwrap().extend(statuses);
    }

    pub fn set_checksum(&self, c: Checksum) {
        *self.state.checksum.lock().unwrap() = c;
    }

    pub fn requests(&self, resource: &str) -> u64 {
        self.state.requests.lock().unwrap().get(resource).copied().unwrap_or(0)
    }

    pub fn unauthenticated(&self) -> u64 {
        *self.state.unauthenticated.lock().unwrap()
    }
}

impl Drop for FakeSecretManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn envelope(code: u16, status: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": { "code": code, "message": message, "status": status } });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(code).expect("valid status");
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json; charset=UTF-8".parse().unwrap(),
    );
    resp
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let Some(resource) = path.strip_prefix("/v1/").and_then(|p| p.strip_suffix(":access")) else {
        return Ok(envelope(404, "NOT_FOUND", &format!("Method not found: {path}")));
    };
    *state.requests.lock().unwrap().entry(resource.to_owned()).or_default() += 1;
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(state.access_token.as_str()) {
        *state.unauthenticated.lock().unwrap() += 1;
        return Ok(envelope(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        ));
    }
    if let Some(code) = state.faults.lock().unwrap().pop_front() {
        let status = match code {
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        return Ok(envelope(code, status, "The service is currently unavailable."));
    }
    if state.forbidden.lock().unwrap().iter().any(|f| f == resource) {
        return Ok(envelope(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission 'secretmanager.versions.access' denied for resource '{resource}' (or it may not exist)."
            ),
        ));
    }
    let Some(value) = state.values.lock().unwrap().get(resource).cloned() else {
        return Ok(envelope(
            404,
            "NOT_FOUND",
            &format!("Secret Version [{resource}] not found or has been destroyed."),
        ));
    };
    let crc = u64::from(crc32c::crc32c(&value));
    let mut payload = serde_json::json!({ "data": base64::engine::general_purpose::STANDARD.encode(&value) });
    match *state.checksum.lock().unwrap() {
        Checksum::Correct => payload["dataCrc32c"] = serde_json::json!(crc.to_string()),
        Checksum::Wrong => payload["dataCrc32c"] = serde_json::json!((crc ^ 1).to_string()),
        Checksum::Absent => {}
    }
    let body = serde_json::json!({ "name": resource, "payload": payload });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json; charset=UTF-8".parse().unwrap(),
    );
    Ok(resp)
}
