//! A fake Kubernetes API server for the Lease election: `coordination.k8s.io/v1` Leases only,
//! HTTP/1.1 on loopback, with switches for the faults a real one shows.
//!
//! Its contract, and where each fact comes from (nothing here is copied from those sources):
//! - Paths: `GET|PUT /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}`, `POST
//!   …/leases` (the REST layout of the Kubernetes API, `api-conventions.md`, "Types (Kinds)" /
//!   the API reference for Lease).
//! - Every object carries `metadata.resourceVersion`, an opaque string that changes on every
//!   write. A `PUT` whose `resourceVersion` differs from the stored one is refused with 409
//!   and a `Status` of reason `Conflict` ("Operation cannot be fulfilled on
//!   leases.coordination.k8s.io \"NAME\": the object has been modified; please apply your
//!   changes to the latest version and try again"); `api-conventions.md`, "Concurrency Control
//!   and Consistency", and apimachinery's `errors.NewConflict`.
//! - A Lease update must name a `resourceVersion`: the Lease registry's strategy disallows
//!   unconditional updates (`pkg/registry/coordination/lease/strategy.go`,
//!   `AllowUnconditionalUpdate` false), answered 422 `Invalid`. A `PUT` of a missing Lease is
//!   404 (no create-on-update for Leases).
//! - `POST` of an existing name: 409 reason `AlreadyExists`. `GET` of a missing one: 404 reason
//!   `NotFound`. A missing or wrong bearer token: 401 reason `Unauthorized`. Errors are `Status`
//!   objects (`kind: Status`, `apiVersion: v1`, `status: Failure`, `message`, `reason`, `code`);
//!   `api-conventions.md`, "Response Status Kind".
//! - The server fills `metadata.namespace`, `uid`, `creationTimestamp`; spec fields are kept as
//!   written (`holderIdentity`, `leaseDurationSeconds`, `acquireTime`, `renewTime`,
//!   `leaseTransitions`; `k8s.io/api/coordination/v1` `LeaseSpec`). It never judges expiry:
//!   that is the clients' business, by their own clocks.
//!
//! - Authentication comes before authorization: a request whose bearer token is wrong is 401
//!   whatever RBAC says; an authenticated one that RBAC denies is 403 reason `Forbidden`, with
//!   the authorizer's message (`User "system:serviceaccount:NS:SA" cannot VERB resource
//!   "leases" in API group "coordination.k8s.io" in the namespace "NS"`; apiserver's
//!   `forbidden.go`). A verified client certificate authenticates as a token does (the API
//!   server's `--client-ca-file`; its authenticators are tried in turn and the first that
//!   succeeds wins); an unverified one is refused by the TLS handshake.
//!
//! [`FakeKubeApi::start_tls`] serves HTTPS with a certificate the test makes
//! ([`super::pki`]), optionally accepting client certificates signed by a CA.
//!
//! Faults: [`Fault::Slow`] (answers after a delay), [`Fault::Hang`] (accepts and reads the
//! request, never answers), [`Fault::Status`] (answers every request with a 5xx `Status`),
//! [`Fault::Forbidden`] (RBAC denies every authenticated request), and
//! [`FakeKubeApi::refuse`] (the port closed: connection refused; live connections dropped).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// How the server answers for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Slow(Duration),
    Hang,
    Status(u16),
    /// RBAC denies the Lease: every authenticated request is 403 `Forbidden`.
    Forbidden,
}

/// HTTPS instead of HTTP: the server's certificate chain and key (PEM), and the CA (PEM) whose
/// client certificates authenticate a request without a token.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

struct State {
    token: Mutex<String>,
    /// (namespace, name) → the stored Lease.
    leases: Mutex<BTreeMap<(String, String), Value>>,
    version: AtomicU64,
    fault: Mutex<Fault>,
    /// Every answered request: (method, status).
    answered: Mutex<Vec<(Method, u16)>>,
    /// Each successful write's holderIdentity, in order.
    holders: Mutex<Vec<String>>,
    /// TLS handshakes that failed (the client did not trust the certificate, or presented one
    /// the client CA did not sign).
    failed_handshakes: AtomicU64,
}

pub struct FakeKubeApi {
    addr: SocketAddr,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The accept loop and every live connection (aborted by `refuse`).
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakeKubeApi {
    /// Serves on a loopback port; requests must carry `Authorization: Bearer {token}`.
    pub async fn start(token: &str) -> FakeKubeApi {
        Self::start_with(token, None).await
    }

    /// Serves HTTPS with `tls`'s certificate (requests still need the token unless they present
    /// a client certificate `tls.client_ca_pem` signed).
    pub async fn start_tls(token: &str, tls: &Tls) -> FakeKubeApi {
        Self::start_with(token, Some(acceptor(tls))).await
    }

    async fn start_with(token: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeKubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake API server");
        let addr = listener.local_addr().expect("addr");
        let api = FakeKubeApi {
            addr,
            state: Arc::new(State {
                token: Mutex::new(token.to_owned()),
                leases: Mutex::default(),
                version: AtomicU64::new(100),
                fault: Mutex::new(Fault::None),
                answered: Mutex::default(),
                holders: Mutex::default(),
                failed_handshakes: AtomicU64::new(0),
            }),
            tls,
            tasks: Arc::default(),
        };
        api.serve(listener);
        api
    }

    fn serve(&self, listener: TcpListener) {
        let (state, tasks, tls) = (self.state.clone(), self.tasks.clone(), self.tls.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, tls) = (state.clone(), tls.clone());
                let conn = tokio::spawn(async move {
                    let Some(tls) = tls else {
                        return serve_connection(stream, state, false).await;
                    };
                    // A failed handshake (an untrusted client certificate) is the client's error.
                    let Ok(stream) = tls.accept(stream).await else {
                        state.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let client_cert = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                    serve_connection(stream, state, client_cert).await;
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Rotates the accepted token (what the kubelet's rotation does to old tokens, at once).
    pub fn set_token(&self, token: &str) {
        *self.state.token.lock().unwrap() = token.to_owned();
    }

    /// Closes the port and every live connection: clients get "connection refused".
    pub fn refuse(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Listens again on the same port after [`FakeKubeApi::refuse`].
    pub async fn restore(&self) {
        self.refuse();
        // The aborted accept loop drops its listener when the runtime next runs it: poll.
        let listener = super::eventually(super::DEADLINE, "the fake API server's port to be free", || async {
            TcpListener::bind(self.addr).await.ok()
        })
        .await;
        self.serve(listener);
        self.set_fault(Fault::None);
    }

    /// The stored Lease, if any.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = (namespace.to_owned(), name.to_owned());
        self.state.leases.lock().unwrap().get(&key).cloned()
    }

    /// Another client's write that leaves the spec alone (`kubectl annotate`): a new
    /// resourceVersion, so the holder's next renewal meets a 409.
    pub fn annotate(&self, namespace: &str, name: &str, note: &str) {
        let mut leases = self.state.leases.lock().unwrap();
        let key = (namespace.to_owned(), name.to_owned());
        let mut lease = leases.get(&key).cloned().expect("a Lease to annotate");
        lease["metadata"]["annotations"] = json!({"example.com/note": note});
        let current = lease.clone();
        store(&self.state, &mut leases, namespace, name, lease, Some(&current));
    }

    /// How many requests were answered with `status`.
    pub fn answered(&self, status: u16) -> usize {
        self.state
            .answered
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == status)
            .count()
    }

    /// How many TLS handshakes failed.
    pub fn failed_handshakes(&self) -> u64 {
        self.state.failed_handshakes.load(Ordering::SeqCst)
    }

    /// Each successful write's holderIdentity ("" for a release), in order.
    pub fn holders(&self) -> Vec<String> {
        self.state.holders.lock().unwrap().clone()
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.refuse();
    }
}

type Answer = Result<Response<Full<Bytes>>, std::convert::Infallible>;

/// HTTP/1.1 on one accepted connection; `client_cert`: it presented a verified certificate.
async fn serve_connection<S>(stream: S, state: Arc<State>, client_cert: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| handle(state.clone(), req, client_cert));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

/// The TLS side of [`FakeKubeApi::start_tls`]: client certificates optional (a token works
/// too), and verified against the client CA when one is given.
fn acceptor(tls: &Tls) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<_, _>>()
        .expect("server certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).expect("server key PEM");
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots.add(c.expect("client CA PEM")).expect("client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).expect("server TLS config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// A `Status` object, as the API server writes its errors.
fn status(code: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"group": "coordination.k8s.io", "kind": "leases"},
        "code": code.as_u16(),
    });
    json_response(code, &body)
}

async fn handle(state: Arc<State>, req: Request<Incoming>, client_cert: bool) -> Answer {
    let fault = *state.fault.lock().unwrap();
    match fault {
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::Status(_) | Fault::Forbidden | Fault::None => {}
    }
    let method = req.method().clone();
    let resp = answer(&state, req, fault, client_cert).await;
    state.answered.lock().unwrap().push((method, resp.status().as_u16()));
    Ok(resp)
}

async fn answer(state: &State, req: Request<Incoming>, fault: Fault, client_cert: bool) -> Response<Full<Bytes>> {
    if let Fault::Status(code) = fault {
        let code = StatusCode::from_u16(code).expect("status code");
        return status(
            code,
            "InternalError",
            "the fake API server is failing on purpose".into(),
        );
    }
    let expected = format!("Bearer {}", state.token.lock().unwrap());
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    // The API server tries its authenticators in turn (x509 before bearer tokens) and takes
    // the first that succeeds.
    if !client_cert && auth != Some(expected.as_str()) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized".into());
    }
    let path = req.uri().path().to_owned();
    if fault == Fault::Forbidden {
        return forbidden(req.method(), &path);
    }
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "too large".into(),
            )
        }
    };
    match (method, parts.as_slice()) {
        (Method::GET, [ns, "leases", name]) => get(state, ns, name),
        (Method::POST, [ns, "leases"]) => create(state, ns, &body),
        (Method::PUT, [ns, "leases", name]) => update(state, ns, name, &body),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fake".into(),
        ),
    }
}

/// RBAC's denial, worded as the API server's authorizer words it.
fn forbidden(method: &Method, path: &str) -> Response<Full<Bytes>> {
    let verb = match *method {
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        _ => "patch",
    };
    let rest = path.strip_prefix(PREFIX).unwrap_or("");
    let mut parts = rest.split('/');
    let ns = parts.next().unwrap_or("");
    let name = parts.nth(1).map(|n| format!(" {n:?}")).unwrap_or_default();
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("leases.coordination.k8s.io{name} is forbidden: User \"system:serviceaccount:{ns}:tunnel-agent\" cannot {verb} resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"{ns}\""),
    )
}

fn not_found(name: &str) -> Response<Full<Bytes>> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("leases.coordination.k8s.io {name:?} not found"),
    )
}

fn get(state: &State, ns: &str, name: &str) -> Response<Full<Bytes>> {
    let key = (ns.to_owned(), (*name).to_owned());
    match state.leases.lock().unwrap().get(&key) {
        Some(lease) => json_response(StatusCode::OK, lease),
        None => not_found(name),
    }
}

/// A request body as JSON, or the 400 the server answers.
fn parse(body: &[u8]) -> Result<Value, Box<Response<Full<Bytes>>>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("not a JSON object: {e}"),
        ))
    })
}

type Leases = BTreeMap<(String, String), Value>;

/// Stores `lease` under a new resourceVersion (the caller holds the store's lock across its
/// compare and this write); returns what the server answers with.
fn store(state: &State, leases: &mut Leases, ns: &str, name: &str, mut lease: Value, created: Option<&Value>) -> Value {
    let rv = state.version.fetch_add(1, Ordering::SeqCst) + 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["namespace"] = json!(ns);
    lease["metadata"]["resourceVersion"] = json!(rv.to_string());
    lease["metadata"]["uid"] = created
        .and_then(|c| c.pointer("/metadata/uid").cloned())
        .unwrap_or_else(|| json!(format!("00000000-0000-0000-0000-{rv:012}")));
    let holder = lease
        .pointer("/spec/holderIdentity")
        .and_then(|h| h.as_str())
        .unwrap_or("")
        .to_owned();
    state.holders.lock().unwrap().push(holder);
    leases.insert((ns.to_owned(), name.to_owned()), lease.clone());
    lease
}

fn create(state: &State, ns: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let lease = match parse(body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let Some(name) = lease
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .map(str::to_owned)
    else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value".into(),
        );
    };
    let mut leases = state.leases.lock().unwrap();
    if leases.contains_key(&(ns.to_owned(), name.clone())) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("leases.coordination.k8s.io {name:?} already exists"),
        );
    }
    let stored = store(state, &mut leases, ns, &name, lease, None);
    json_response(StatusCode::CREATED, &stored)
}

fn update(state: &State, ns: &str, name: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let lease = match parse(body) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let key = (ns.to_owned(), name.to_owned());
    // One lock across compare and store: of two writers with the same version, one wins.
    let mut leases = state.leases.lock().unwrap();
    let Some(current) = leases.get(&key).cloned() else {
        return not_found(name);
    };
    let sent = lease.pointer("/metadata/resourceVersion").and_then(|v| v.as_str());
    let Some(sent) = sent.filter(|s| !s.is_empty()) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("Lease.coordination.k8s.io {name:?} is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"),
        );
    };
    if Some(sent) != current.pointer("/metadata/resourceVersion").and_then(|v| v.as_str()) {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on leases.coordination.k8s.io {name:?}: the object has been modified; please apply your changes to the latest version and try again"),
        );
    }
    let stored = store(state, &mut leases, ns, name, lease, Some(&current));
    json_response(StatusCode::OK, &stored)
}
