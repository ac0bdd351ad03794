//! A small client for one `coordination.k8s.io/v1` Lease, for the election's four operations
//! (`store.rs`): acquire, renew, read, release. Facts it relies on, and where they come from:
//!
//! - The Lease lives at `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}`; `GET`
//!   answers 404 when it does not exist, `POST` to the collection creates it (201; 409
//!   `AlreadyExists` when another client created it first), `PUT` replaces it. A `PUT` whose
//!   `metadata.resourceVersion` is not the current one is refused with 409 `Conflict` and a
//!   `Status` object: optimistic concurrency (Kubernetes API conventions,
//!   `community/contributors/devel/sig-architecture/api-conventions.md`, "Concurrency Control
//!   and Consistency").
//! - `spec.holderIdentity`, `leaseDurationSeconds`, `acquireTime`, `renewTime` (MicroTime:
//!   RFC 3339 with microseconds) and `leaseTransitions` (`k8s.io/api/coordination/v1`
//!   `LeaseSpec`). Zero and empty fields may be omitted.
//! - Expiry is judged by the candidate's own clock, never by `renewTime`: client-go's
//!   `tools/leaderelection` (`tryAcquireOrRenew`) remembers the record it last saw and *when it
//!   first saw it* (`observedRecord`, `observedTime`), and takes the Lease only once that record
//!   has stayed unchanged for a lease duration. We do the same, with the longer of the record's
//!   `leaseDurationSeconds` and our own ttl. Clocks of two hosts never meet here.
//! - A holder that resigns writes the Lease back with an empty `holderIdentity` (client-go's
//!   `release`, used with `ReleaseOnCancel`), and `leaseDurationSeconds` 1; a candidate takes an
//!   empty holder at once. Acquiring increments `leaseTransitions`.
//! - In-cluster credentials: a bearer token in a file that the kubelet rotates (projected
//!   service account tokens), read again for every request here; the cluster CA next to it.
//!   Outside the cluster, a kubeconfig's cluster and user (`kubeconfig.rs`): a token, a
//!   `tokenFile` (read again like the in-cluster one) and/or a client certificate.
//!
//! Kubernetes' own leader election does not fence: a leader that stops renewing only learns it
//! lost when it next talks to the API server. Ours fences by time in the state machine; this
//! client only reports what the server said. 401 and 403 are logged (once, until the server
//! accepts the token again) and count as "unreachable": the leader fences on them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::secret::Secret;

/// The largest Lease or `Status` answer read; a Lease is well under 2 KiB.
const BODY_LIMIT: usize = 64 * 1024;
/// The largest token file read (projected tokens are about 1 KiB).
const TOKEN_LIMIT: u64 = 64 * 1024;
/// The longest `holderIdentity` accepted from the server (a host name is at most 253).
const HOLDER_LIMIT: usize = 1024;
/// The longest lease duration honoured from a record: longer ones are read as this.
const DURATION_LIMIT: i64 = 3600;
/// Writes of one renewal or release, each after a 409 and a read (all within its timeout).
const CONFLICT_RETRIES: usize = 4;

/// How to reach the API server and who this node is to it: the in-cluster defaults or
/// `api_url`/`token_file`/`ca_file`, or a kubeconfig's cluster and user (`kubeconfig.rs`).
#[derive(Debug, Clone)]
pub struct Access {
    /// `https://host:port` (in-cluster: from `KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_url: String,
    /// PEM bundle the API server's certificate must chain to (else the system roots).
    pub ca_pem: Option<Vec<u8>>,
    pub token: Token,
    /// A client certificate and its key, one PEM (a kubeconfig's `client-certificate`).
    pub identity_pem: Option<Secret>,
}

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum Token {
    /// A file read for every request: the kubelet rotates projected service account tokens,
    /// and a kubeconfig's `tokenFile` is re-read the same way.
    File(PathBuf),
    /// A kubeconfig's `token`, as written.
    Fixed(Secret),
    /// None: a client certificate authenticates.
    None,
}

/// How to reach the API server and which Lease.
#[derive(Clone)]
pub struct LeaseOptions {
    pub access: Access,
    pub namespace: String,
    pub name: String,
    /// This node's `holderIdentity` (its host name).
    pub me: String,
    /// `leaseDurationSeconds` this node writes, and the least it waits on another's hold.
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No answer (connection refused, timeout, TLS failure).
    #[error("the Kubernetes API server did not answer: {0}")]
    Unreachable(String),
    /// The TLS handshake refused the server's certificate: another CA, another name, expired.
    /// Counts as no answer; said apart so the operator looks at the CA, not the network.
    #[error("the Kubernetes API server's certificate is not trusted (check role_election.ca_file, the kubeconfig's certificate-authority, or the pod's ca.crt): {0}")]
    Untrusted(String),
    /// 401 or 403: the token is bad, expired, or may not touch the Lease; with the `Status`
    /// object's message (RBAC's names the user, the verb and the resource).
    #[error("the Kubernetes API server refused the credentials (HTTP {status}) for Lease {lease}: {message}; {hint}")]
    Unauthorized {
        status: u16,
        lease: String,
        message: String,
        hint: &'static str,
    },
    /// Any other refusal (5xx, 422…), with the `Status` object's message.
    #[error("the Kubernetes API server answered HTTP {status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the Kubernetes API server: {0}")]
    Protocol(String),
    #[error("cannot read the bearer token: {0}")]
    Token(String),
    #[error("{what}: {message}")]
    Setup { what: &'static str, message: String },
}

/// Who holds the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    /// `leaseTransitions`: which hold this is.
    pub transitions: i32,
}

/// `spec` as read; compared whole to notice a renewal (client-go compares its record the same
/// way).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    holder_identity: Option<String>,
    #[serde(default)]
    lease_duration_seconds: Option<i64>,
    #[serde(default)]
    acquire_time: Option<String>,
    #[serde(default)]
    renew_time: Option<String>,
    #[serde(default)]
    lease_transitions: Option<i64>,
}

impl Spec {
    fn holder(&self) -> Option<&str> {
        self.holder_identity.as_deref().filter(|h| !h.is_empty())
    }

    fn transitions(&self) -> i32 {
        self.lease_transitions.and_then(|t| i32::try_from(t).ok()).unwrap_or(0)
    }

    fn duration(&self) -> Duration {
        let s = self.lease_duration_seconds.unwrap_or(0).clamp(0, DURATION_LIMIT);
        Duration::from_secs(s.unsigned_abs())
    }

    fn is(&self, me: &str, lease: i64) -> bool {
        self.holder() == Some(me) && i64::from(self.transitions()) == lease
    }
}

/// The Lease as this node last read or wrote it.
#[derive(Debug, Clone)]
struct Observed {
    /// The whole object: a `PUT` sends it back with a new `spec` (labels and annotations kept).
    object: serde_json::Value,
    spec: Spec,
    /// When this node first saw `spec` as it is, by its own clock.
    since: Instant,
}

pub struct LeaseClient {
    http: reqwest::Client,
    /// The Lease's URL and its collection's.
    url: String,
    collection: String,
    namespace: String,
    name: String,
    token: Token,
    me: String,
    ttl: Duration,
    observed: Mutex<Option<Observed>>,
    /// The API server refused the token (401/403) at the last request: logged once.
    auth_failing: AtomicBool,
}

/// What a `GET` found.
type Read = Option<Observed>;

impl LeaseClient {
    pub fn new(options: &LeaseOptions) -> Result<LeaseClient, KubeError> {
        let setup = |what: &'static str| {
            move |e: reqwest::Error| KubeError::Setup {
                what,
                message: crate::errors::error_chain(&e),
            }
        };
        let access = &options.access;
        let mut builder = super::http::builder(access.ca_pem.as_deref())
            .map_err(|(what, message)| KubeError::Setup { what, message })?;
        if let Some(pem) = &access.identity_pem {
            let identity = reqwest::Identity::from_pem(pem.expose().as_bytes()).map_err(|_| KubeError::Setup {
                what: "client certificate/key",
                message: "not a PEM certificate and private key (PKCS#8, RSA or SEC1)".into(),
            })?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(setup("HTTP client"))?;
        let api = access.api_url.trim_end_matches('/');
        let collection = format!(
            "{api}/apis/coordination.k8s.io/v1/namespaces/{}/leases",
            options.namespace
        );
        Ok(LeaseClient {
            http,
            url: format!("{collection}/{}", options.name),
            collection,
            namespace: options.namespace.clone(),
            name: options.name.clone(),
            token: access.token.clone(),
            me: options.me.clone(),
            ttl: options.ttl,
            observed: Mutex::new(None),
            auth_failing: AtomicBool::new(false),
        })
    }

    /// The bearer token now: a token file as it holds it now (the kubelet rewrites it before
    /// it expires), or `None` when a client certificate authenticates alone.
    fn token(&self) -> Result<Option<Secret>, KubeError> {
        let path = match &self.token {
            Token::File(path) => path,
            Token::Fixed(token) => return Ok(Some(token.clone())),
            Token::None => return Ok(None),
        };
        let shown = path.display();
        let bytes =
            crate::files::read_regular(path, TOKEN_LIMIT).map_err(|e| KubeError::Token(format!("{shown}: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| KubeError::Token(format!("{shown} is not UTF-8 text")))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(KubeError::Token(format!("{shown} is empty")));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KubeError::Token(format!("{shown} holds more than one token-like word")));
        }
        Ok(Some(Secret::new(token)))
    }

    /// One request; the answer's status and body (read with a ceiling). 401/403 are errors.
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<(StatusCode, bytes::Bytes), KubeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(KubeError::Unreachable("out of time".into()));
        }
        let mut req = self
            .http
            .request(method, url)
            .timeout(left)
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = self.token()? {
            req = req.bearer_auth(token.expose());
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let unreachable = |e: &(dyn std::error::Error + 'static)| {
            let chain = crate::secret::redact_urls_in(&crate::errors::error_chain(e));
            match refused_certificate(e) {
                true => KubeError::Untrusted(chain),
                false => KubeError::Unreachable(chain),
            }
        };
        let resp = req.send().await.map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let body = crate::peer_body::read(resp, BODY_LIMIT)
            .await
            .map_err(|e| unreachable(&e))?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.refused(status, &body));
        }
        if self.auth_failing.swap(false, Ordering::Relaxed) {
            tracing::info!("the Kubernetes API server accepts the credentials again");
        }
        Ok((status, body))
    }

    /// A 401 or 403, said once in the log (with the server's reason and what to check) until
    /// a request gets through again.
    fn refused(&self, status: StatusCode, body: &[u8]) -> KubeError {
        let hint = match (status, &self.token) {
            (StatusCode::UNAUTHORIZED, Token::File(_)) => {
                "the token is missing, expired or not for this cluster (check role_election.token_file, or the kubeconfig's tokenFile)"
            }
            (StatusCode::UNAUTHORIZED, _) => {
                "the kubeconfig's token or client certificate is not accepted by this cluster"
            }
            _ => "the account may not get, create or update this Lease (check its Role and RoleBinding)",
        };
        let error = KubeError::Unauthorized {
            status: status.as_u16(),
            lease: self.describe(),
            message: status_message(body),
            hint,
        };
        if !self.auth_failing.swap(true, Ordering::Relaxed) {
            tracing::error!(
                status = status.as_u16(),
                lease = %self.describe(),
                "{error}; the election counts the API server as unreachable until it accepts the credentials"
            );
        }
        error
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The Lease, or `None` when it does not exist; remembered as observed.
    async fn get(&self, deadline: Instant) -> Result<Read, KubeError> {
        let (status, body) = self.send(Method::GET, &self.url, None, deadline).await?;
        match status {
            StatusCode::OK => Ok(Some(self.observe(&body)?)),
            StatusCode::NOT_FOUND => Ok(None),
            other => Err(api_error(other, &body)),
        }
    }

    /// Parses a Lease and records it as observed: `since` moves only when `spec` changed.
    fn observe(&self, body: &[u8]) -> Result<Observed, KubeError> {
        let (object, spec) = parse(body)?;
        let mut slot = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let since = match slot.as_ref() {
            Some(o) if o.spec == spec => o.since,
            _ => Instant::now(),
        };
        let observed = Observed { object, spec, since };
        *slot = Some(observed.clone());
        Ok(observed)
    }

    /// The Lease as this node last saw it (the object, as JSON) and since when unchanged, for an
    /// upgrade in place to carry (`election::carry`).
    pub fn observed_record(&self) -> Option<(String, Instant)> {
        self.cached().map(|o| (o.object.to_string(), o.since))
    }

    /// Takes a carried [`LeaseClient::observed_record`] back, so the new image goes on counting
    /// a silent holder's lease duration from when the old one first saw its record, rather than
    /// from the exec (which would delay a takeover by up to a lease duration). Checked as an
    /// answer from the server is; `since` is never taken as later than now. A record that moved
    /// meanwhile is replaced at the next read, which restarts the count (`observe`).
    pub fn restore_observed(&self, object: &str, since: Instant) -> Result<(), KubeError> {
        if object.len() > BODY_LIMIT {
            return Err(KubeError::Protocol(format!(
                "a carried Lease larger than {BODY_LIMIT} bytes"
            )));
        }
        let (object, spec) = parse(object.as_bytes())?;
        let since = since.min(Instant::now());
        *self.observed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Observed { object, spec, since });
        Ok(())
    }

    /// Whether the holder stopped renewing: its record unchanged for a lease duration (the
    /// longer of its and ours) by our clock. An empty holder is free.
    fn expired(o: &Observed, ttl: Duration) -> bool {
        if o.spec.holder().is_none() {
            return true;
        }
        let wait = o.spec.duration().max(ttl);
        Instant::now() >= crate::deadline::after(o.since, wait)
    }

    /// The Lease as last seen when it is still hold `lease` of this node (no request), else as
    /// read now.
    async fn ours_or_read(&self, lease: i64, deadline: Instant) -> Result<Read, KubeError> {
        match self.cached() {
            Some(o) if o.spec.is(&self.me, lease) => Ok(Some(o)),
            _ => self.get(deadline).await,
        }
    }

    fn cached(&self) -> Option<Observed> {
        self.observed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `PUT` the observed object with a new `spec`: `Ok(Some)` written, `Ok(None)` refused
    /// by a newer version (409) or gone (404).
    async fn put(&self, base: &Observed, spec: serde_json::Value, deadline: Instant) -> Result<Read, KubeError> {
        let mut object = base.object.clone();
        if let Some(map) = object.as_object_mut() {
            map.insert("spec".into(), spec);
        }
        let (status, body) = self.send(Method::PUT, &self.url, Some(&object), deadline).await?;
        match status {
            StatusCode::OK | StatusCode::CREATED => Ok(Some(self.observe(&body)?)),
            StatusCode::CONFLICT | StatusCode::NOT_FOUND => Ok(None),
            other => Err(api_error(other, &body)),
        }
    }

    /// One attempt: `Ok(Ok((transitions, ttl)))` won, `Ok(Err(holder))` held or lost a race.
    pub async fn acquire(&self, timeout: Duration) -> Result<Result<(i64, Duration), Option<Holder>>, KubeError> {
        let (me, ttl) = (self.me.as_str(), self.ttl);
        let deadline = crate::deadline::from_now(timeout);
        let now = micro_time();
        let Some(current) = self.get(deadline).await? else {
            let object = json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec_json(Some(me), ttl.as_secs(), &now, &now, 0),
            });
            let (status, body) = self
                .send(Method::POST, &self.collection, Some(&object), deadline)
                .await?;
            return match status {
                StatusCode::OK | StatusCode::CREATED => {
                    self.observe(&body)?;
                    Ok(Ok((0, ttl)))
                }
                StatusCode::CONFLICT => Ok(Err(None)),
                other => Err(api_error(other, &body)),
            };
        };
        if !Self::expired(&current, ttl) {
            return Ok(Err(current.spec.holder().map(|h| Holder {
                name: h.to_owned(),
                transitions: current.spec.transitions(),
            })));
        }
        let transitions = current.spec.transitions().checked_add(1).unwrap_or(0);
        let spec = spec_json(Some(me), ttl.as_secs(), &now, &now, transitions);
        match self.put(&current, spec, deadline).await? {
            Some(_) => Ok(Ok((i64::from(transitions), ttl))),
            None => Ok(Err(None)),
        }
    }

    /// Renews hold `lease`: `Ok(Ok(ttl))`, or `Ok(Err(why))` when it is no longer ours. A 409
    /// (someone else wrote the Lease) is answered by a read: still ours, the write is retried
    /// with the new version; otherwise lost. Writers that keep changing a Lease that is still
    /// ours make this renewal fail (an error, not a loss): the state machine retries, and
    /// fences by time if it never gets through.
    pub async fn renew(&self, lease: i64, timeout: Duration) -> Result<Result<Duration, String>, KubeError> {
        let me = self.me.as_str();
        let deadline = crate::deadline::from_now(timeout);
        let mut base = self.ours_or_read(lease, deadline).await?;
        for _ in 0..CONFLICT_RETRIES {
            let Some(current) = base.take() else {
                return Ok(Err("the Lease was deleted".into()));
            };
            if !current.spec.is(me, lease) {
                return Ok(Err(format!(
                    "the Lease was taken by {}",
                    current.spec.holder().unwrap_or("nobody")
                )));
            }
            let ttl = current.spec.duration();
            let spec = spec_json(
                Some(me),
                ttl.as_secs(),
                current.spec.acquire_time.as_deref().unwrap_or(""),
                &micro_time(),
                current.spec.transitions(),
            );
            if self.put(&current, spec, deadline).await?.is_some() {
                return Ok(Ok(ttl));
            }
            base = self.get(deadline).await?;
        }
        Err(KubeError::Api {
            status: StatusCode::CONFLICT.as_u16(),
            message: "the Lease kept changing under this node's renewals".into(),
        })
    }

    /// Who holds the Lease by our clock: `None` when it does not exist, has no holder, or its
    /// holder stopped renewing a lease duration ago.
    pub async fn read(&self, timeout: Duration) -> Result<Option<Holder>, KubeError> {
        let ttl = self.ttl;
        let deadline = crate::deadline::from_now(timeout);
        Ok(self
            .get(deadline)
            .await?
            .filter(|o| !Self::expired(o, ttl))
            .and_then(|o| {
                o.spec.holder().map(|h| Holder {
                    name: h.to_owned(),
                    transitions: o.spec.transitions(),
                })
            }))
    }

    /// Gives hold `lease` up: the holder cleared and the duration 1 s, as client-go's release
    /// does. A Lease that is gone or held by another is left alone.
    pub async fn release(&self, lease: i64, timeout: Duration) -> Result<(), KubeError> {
        let me = self.me.as_str();
        let deadline = crate::deadline::from_now(timeout);
        let mut base = self.ours_or_read(lease, deadline).await?;
        for _ in 0..CONFLICT_RETRIES {
            let Some(current) = base.take().filter(|o| o.spec.is(me, lease)) else {
                return Ok(());
            };
            let now = micro_time();
            let spec = spec_json(None, 1, &now, &now, current.spec.transitions());
            if self.put(&current, spec, deadline).await?.is_some() {
                return Ok(());
            }
            base = self.get(deadline).await?;
        }
        Err(KubeError::Protocol(
            "the Lease kept changing while this node released it".into(),
        ))
    }
}

/// A Lease as the server (or a carried record) gives it: the object and its `spec`, refused when
/// it lacks a usable `resourceVersion` or carries an oversized holder.
fn parse(body: &[u8]) -> Result<(serde_json::Value, Spec), KubeError> {
    let object: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| KubeError::Protocol(format!("a Lease that is not JSON: {e}")))?;
    let rv = object
        .pointer("/metadata/resourceVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if rv.is_empty() || rv.len() > 128 {
        return Err(KubeError::Protocol(
            "a Lease without a usable metadata.resourceVersion".into(),
        ));
    }
    let spec: Spec = match object.get("spec") {
        Some(s) => Spec::deserialize(s).map_err(|e| KubeError::Protocol(format!("Lease spec: {e}")))?,
        None => Spec::default(),
    };
    if spec.holder_identity.as_ref().is_some_and(|h| h.len() > HOLDER_LIMIT) {
        return Err(KubeError::Protocol(format!(
            "a holderIdentity longer than {HOLDER_LIMIT} bytes"
        )));
    }
    Ok((object, spec))
}

/// Whether rustls refused the server's certificate somewhere in `e`'s chain. An `io::Error` is
/// looked into with `get_ref`: its `source()` skips the error it wraps, and hyper-util wraps
/// tokio-rustls' `io::Error` in another.
fn refused_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::InvalidCertificate(_)) = err.downcast_ref::<rustls::Error>() {
            return true;
        }
        cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// A `spec` as this node writes it.
fn spec_json(
    holder: Option<&str>,
    duration_s: u64,
    acquired: &str,
    renewed: &str,
    transitions: i32,
) -> serde_json::Value {
    let mut spec = json!({
        "holderIdentity": holder.unwrap_or(""),
        "leaseDurationSeconds": duration_s,
        "renewTime": renewed,
        "leaseTransitions": transitions,
    });
    if !acquired.is_empty() {
        spec["acquireTime"] = json!(acquired);
    }
    spec
}

/// Now as a Kubernetes MicroTime: RFC 3339, UTC, microseconds.
fn micro_time() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// A refusal with the `Status` object's message, if it has one (shortened, escaped).
fn api_error(status: StatusCode, body: &[u8]) -> KubeError {
    KubeError::Api {
        status: status.as_u16(),
        message: status_message(body),
    }
}

/// A `Status` object's `message`, shortened and escaped (it is the server's text).
fn status_message(body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let short: String = message.chars().take(300).collect();
    format!("{short:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> LeaseClient {
        LeaseClient::new(&LeaseOptions {
            access: Access {
                api_url: "http://127.0.0.1:1".into(),
                ca_pem: None,
                token: Token::File("/nonexistent".into()),
                identity_pem: None,
            },
            namespace: "ns".into(),
            name: "leader".into(),
            me: "node-a".into(),
            ttl: Duration::from_secs(3),
        })
        .expect("client")
    }

    fn lease(rv: &str, holder: &str, renewed: &str) -> Vec<u8> {
        json!({"metadata": {"resourceVersion": rv}, "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3, "renewTime": renewed}})
            .to_string()
            .into_bytes()
    }

    /// The holder's record is trusted to change, never its timestamps: a record unchanged for a
    /// lease duration by our clock is expired whatever its renewTime says.
    #[tokio::test(start_paused = true)]
    async fn expiry_is_counted_from_when_the_record_was_first_seen_unchanged() {
        let c = client();
        let ttl = Duration::from_secs(3);
        let far_future = "2999-01-01T00:00:00.000000Z";
        let o = c.observe(&lease("1", "node-a", far_future)).expect("lease");
        assert!(!LeaseClient::expired(&o, ttl));
        tokio::time::advance(Duration::from_secs(2)).await;
        let o = c.observe(&lease("1", "node-a", far_future)).expect("lease");
        assert!(!LeaseClient::expired(&o, ttl));
        tokio::time::advance(Duration::from_secs(1)).await;
        let o = c.observe(&lease("1", "node-a", far_future)).expect("lease");
        assert!(LeaseClient::expired(&o, ttl), "unchanged for 3 s");
        // A renewal (a new renewTime) restarts the count.
        let o = c
            .observe(&lease("2", "node-a", "2999-01-01T00:00:01.000000Z"))
            .expect("lease");
        assert!(!LeaseClient::expired(&o, ttl));
        // An empty holder is free at once.
        let o = c.observe(&lease("3", "", far_future)).expect("lease");
        assert!(LeaseClient::expired(&o, ttl));
    }

    /// A carried record goes on counting from when the old image first saw it, but never from
    /// a time later than now; one that would not pass as an answer is refused.
    #[tokio::test(start_paused = true)]
    async fn a_carried_record_keeps_its_count_and_is_checked() {
        let old = client();
        let ttl = Duration::from_secs(3);
        old.observe(&lease("1", "node-b", "")).expect("lease");
        tokio::time::advance(Duration::from_secs(2)).await;
        let (object, since) = old.observed_record().expect("a record");
        let new = client();
        new.restore_observed(&object, since).expect("restored");
        tokio::time::advance(Duration::from_secs(1)).await;
        let o = new.observe(&lease("1", "node-b", "")).expect("lease");
        assert!(
            LeaseClient::expired(&o, ttl),
            "counted from the old image's first sight"
        );
        new.restore_observed(&object, Instant::now() + ttl).expect("restored");
        assert!(new.cached().expect("record").since <= Instant::now());
        assert!(new.restore_observed("{}", since).is_err());
        assert!(new.restore_observed(&" ".repeat(BODY_LIMIT + 1), since).is_err());
    }

    #[test]
    fn hostile_leases_are_refused_not_trusted() {
        let c = client();
        assert!(matches!(c.observe(b"not json"), Err(KubeError::Protocol(_))));
        assert!(matches!(c.observe(br#"{"spec": {}}"#), Err(KubeError::Protocol(_))));
        let long = "x".repeat(HOLDER_LIMIT + 1);
        assert!(matches!(c.observe(&lease("1", &long, "")), Err(KubeError::Protocol(_))));
        // A huge duration is read as the cap, a negative one as 0, a huge count as 0.
        let odd = json!({"metadata": {"resourceVersion": "1"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": i64::MAX, "leaseTransitions": i64::MAX}});
        let o = c.observe(odd.to_string().as_bytes()).expect("lease");
        assert_eq!(o.spec.duration(), Duration::from_secs(DURATION_LIMIT as u64));
        assert_eq!(o.spec.transitions(), 0);
    }
}
