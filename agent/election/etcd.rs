//! A small etcd v3 client over etcd's JSON gateway (grpc-gateway, served on the client port
//! since etcd 3.4), for the one recipe the election needs: lease grant / keepalive / revoke, a
//! create-if-absent transaction and a read of the key.
//!
//! Why the gateway rather than a gRPC client crate: it runs over the reqwest + rustls stack the
//! agent already has (no tonic/prost/protoc build dependency), and the five calls are one JSON
//! POST each. Facts about the gateway this relies on (etcd's `Documentation/dev-guide/
//! api_grpc_gateway.md` and observed on etcd 3.4):
//! - 64-bit integers (lease IDs, TTLs, revisions) are JSON *strings*; fields whose value is zero
//!   or false are omitted (a keepalive of an expired lease answers with no `TTL`; a failed
//!   transaction has no `succeeded`).
//! - keys and values are base64 (proto `bytes`).
//! - an error is a non-200 answer with `{"error": "...", "code": N}` (gRPC status codes).
//! - `/v3/lease/keepalive` is a stream; one request body yields one `{"result": {...}}` line.
//! - with auth enabled, `/v3/auth/authenticate` returns a token that goes in the
//!   `Authorization` header as is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use super::hold::{Holder, Lease};
use crate::secrets::Secret;

/// How to reach and authenticate to the cluster.
#[derive(Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// PEM bundle the endpoints' certificates must chain to (else the system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, PEM, concatenated (mTLS).
    pub identity_pem: Option<Vec<u8>>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (connection refused, timeout, TLS failure).
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    /// An endpoint answered with an error (no leader, lease not found, auth failure…).
    #[error("etcd {endpoint} refused: {message} (code {code})")]
    Refused {
        endpoint: String,
        code: i64,
        message: String,
    },
    #[error("unexpected answer from etcd {endpoint}: {message}")]
    Protocol { endpoint: String, message: String },
    /// The client could not be built from the configured files (`what` names the part).
    #[error("{what}: {message}")]
    Setup { what: &'static str, message: String },
}

pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint to try first: the last one that answered.
    current: AtomicUsize,
    username: Option<String>,
    password: Option<Secret>,
    token: Mutex<Option<String>>,
}

/// The largest answer read from a member: the election's answers (a lease, one key whose
/// value is a host name, a token) are well under 1 KiB; a member that sends more is refused.
const BODY_LIMIT: usize = 256 * 1024;

/// gRPC's UNAUTHENTICATED, which etcd answers for an expired or unknown auth token.
const CODE_UNAUTHENTICATED: i64 = 16;
/// gRPC's NOT_FOUND ("requested lease not found").
pub const CODE_NOT_FOUND: i64 = 5;

/// A 64-bit integer as the gateway writes it: a string (a bare number is accepted too).
fn int(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(v: &serde_json::Value) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(v.as_str()?).ok()
}

/// Whether a request may be in flight to two members at once (see [`EtcdClient::call`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    Hedged,
    OneAtATime,
}

/// Why one endpoint's attempt failed: try the next one, or stop here.
enum Failed {
    Unreachable(String),
    Final(EtcdError),
}

type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<serde_json::Value, Failed>> + Send + 'a>>;

/// The first of `running` to finish, with its endpoint's index; it is removed from the list.
async fn first_ready(running: &mut Vec<(usize, Pending<'_>)>) -> (usize, Result<serde_json::Value, Failed>) {
    std::future::poll_fn(|cx| {
        for i in 0..running.len() {
            if let std::task::Poll::Ready(out) = running[i].1.as_mut().poll(cx) {
                let (index, _) = running.swap_remove(i);
                return std::task::Poll::Ready((index, out));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// An answer's body as the gateway writes it: the value, or the error it carries.
fn answer(endpoint: &str, status: reqwest::StatusCode, text: &str) -> Result<serde_json::Value, EtcdError> {
    // The keepalive stream answers one `{"result": …}` line per request.
    let first_line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let value: serde_json::Value = serde_json::from_str(first_line).map_err(|e| EtcdError::Protocol {
        endpoint: shown(endpoint),
        message: format!("HTTP {status}, not JSON ({e})"),
    })?;
    let value = match value.get("result") {
        Some(r) => r.clone(),
        None => value,
    };
    if let Some(message) = value
        .get("error")
        .or_else(|| value.get("message"))
        .and_then(|m| m.as_str())
    {
        return Err(EtcdError::Refused {
            endpoint: shown(endpoint),
            code: value.get("code").and_then(int).unwrap_or(0),
            message: message.to_owned(),
        });
    }
    if !status.is_success() {
        return Err(EtcdError::Protocol {
            endpoint: shown(endpoint),
            message: format!("HTTP {status}"),
        });
    }
    Ok(value)
}

impl EtcdClient {
    pub fn new(options: &EtcdOptions) -> Result<EtcdClient, EtcdError> {
        let setup = |what: &'static str| {
            move |e: reqwest::Error| EtcdError::Setup {
                what,
                message: crate::errors::error_chain(&e),
            }
        };
        let mut builder = super::http::builder(options.ca_pem.as_deref())
            .map_err(|(what, message)| EtcdError::Setup { what, message })?;
        if let Some(pem) = &options.identity_pem {
            builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(setup("client certificate/key"))?);
        }
        let http = builder.build().map_err(setup("HTTP client"))?;
        Ok(EtcdClient {
            http,
            endpoints: options
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            current: AtomicUsize::new(0),
            username: options.username.clone(),
            password: options.password.clone(),
            token: Mutex::new(None),
        })
    }

    /// One JSON POST, trying the endpoints from the last good one on until one answers or the
    /// `timeout` (for the whole call) is spent. Each endpoint's turn is its share of the time
    /// left (`left / endpoints not yet tried`), so a hung member (a black hole answers nothing,
    /// and only a timeout ends the attempt) cannot take the whole budget from a live one.
    /// `Race::Hedged` leaves an attempt running when the next endpoint's turn comes, and takes
    /// the first answer: for requests that may be sent twice (keepalive, read, revoke).
    /// `Race::OneAtATime` ends an attempt when its share is spent: for a grant (a second one is a
    /// second lease) and the transaction.
    async fn call(
        &self,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
        race: Race,
    ) -> Result<serde_json::Value, EtcdError> {
        let deadline = crate::deadline::from_now(timeout);
        let n = self.endpoints.len().max(1);
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        let mut running: Vec<(usize, Pending<'_>)> = Vec::new();
        let mut tried = 0;
        let mut next_turn = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let left = deadline.saturating_duration_since(now);
            let turn_due = running.is_empty() || (race == Race::Hedged && now >= next_turn);
            if tried < self.endpoints.len() && turn_due && !left.is_zero() {
                let index = (first + tried) % n;
                let share = left / u32::try_from(n - tried).unwrap_or(u32::MAX);
                tried += 1;
                next_turn = crate::deadline::after(now, share);
                let limit = if race == Race::Hedged { left } else { share };
                running.push((index, Box::pin(self.attempt(index, path, body, limit))));
                continue;
            }
            if running.is_empty() || left.is_zero() {
                break;
            }
            let wake = if tried < self.endpoints.len() {
                next_turn.min(deadline)
            } else {
                deadline
            };
            let answer = tokio::select! {
                answer = first_ready(&mut running) => answer,
                () = tokio::time::sleep_until(wake) => continue,
            };
            match answer {
                (index, Ok(value)) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                (_, Err(Failed::Final(e))) => return Err(e),
                (_, Err(Failed::Unreachable(m))) => failures.push(m),
            }
        }
        for (index, _) in &running {
            let endpoint = self.endpoints.get(*index).map(String::as_str).unwrap_or_default();
            failures.push(format!("{}: no answer in time", shown(endpoint)));
        }
        if let Some(endpoint) = self.endpoints.get((first + tried) % n).filter(|_| tried < n) {
            failures.push(format!("{}: out of time", shown(endpoint)));
        }
        // The next call starts with the endpoint after the one tried first.
        self.current.store((first + 1) % n, Ordering::Relaxed);
        Err(EtcdError::Unreachable(failures.join("; ")))
    }

    /// One endpoint's try at a request, with a new auth token and one retry when the token
    /// expired.
    async fn attempt(
        &self,
        index: usize,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, Failed> {
        let Some(endpoint) = self.endpoints.get(index) else {
            return Err(Failed::Unreachable("no endpoint".into()));
        };
        let deadline = crate::deadline::from_now(timeout);
        let mut reauthenticated = false;
        loop {
            if self.username.is_some() && self.token().is_none() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.authenticate(endpoint, left).await {
                    Ok(()) => {}
                    Err(EtcdError::Unreachable(m)) => return Err(Failed::Unreachable(m)),
                    Err(other) => return Err(Failed::Final(other)),
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut req = self.http.post(format!("{endpoint}{path}")).timeout(left).json(body);
            if let Some(token) = self.token() {
                req = req.header("Authorization", token);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Failed::Unreachable(failure(endpoint, &e)))?;
            let status = resp.status();
            let text = crate::peer_body::read_text(resp, BODY_LIMIT)
                .await
                .map_err(|e| Failed::Unreachable(failure(endpoint, &e)))?;
            match answer(endpoint, status, &text) {
                Err(EtcdError::Refused {
                    code: CODE_UNAUTHENTICATED,
                    ..
                }) if self.username.is_some() && !reauthenticated => {
                    // An expired auth token: get a new one and retry this endpoint once.
                    reauthenticated = true;
                    *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                other => return other.map_err(Failed::Final),
            }
        }
    }

    fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn authenticate(&self, endpoint: &str, timeout: Duration) -> Result<(), EtcdError> {
        let (Some(name), Some(password)) = (&self.username, &self.password) else {
            return Ok(());
        };
        let body = json!({"name": name, "password": password.expose()});
        let resp = self
            .http
            .post(format!("{endpoint}/v3/auth/authenticate"))
            .timeout(timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| EtcdError::Unreachable(failure(endpoint, &e)))?;
        let body = crate::peer_body::read(resp, BODY_LIMIT)
            .await
            .map_err(|e| EtcdError::Unreachable(failure(endpoint, &e)))?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| EtcdError::Protocol {
            endpoint: shown(endpoint),
            message: format!("authenticate: {e}"),
        })?;
        match value.get("token").and_then(|t| t.as_str()) {
            Some(token) => {
                *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.to_owned());
                Ok(())
            }
            // The message names the user, never the password.
            None => Err(EtcdError::Refused {
                endpoint: shown(endpoint),
                code: value.get("code").and_then(int).unwrap_or(0),
                message: format!(
                    "authentication as {name:?} failed: {}",
                    value
                        .get("error")
                        .and_then(|m| m.as_str())
                        .unwrap_or("no token in the answer")
                ),
            }),
        }
    }

    /// `LeaseGrant`: a lease of (at least) `ttl`, whole seconds.
    pub async fn grant(&self, ttl: Duration, timeout: Duration) -> Result<Lease, EtcdError> {
        let v = self
            .call(
                "/v3/lease/grant",
                &json!({"TTL": ttl.as_secs().to_string()}),
                timeout,
                Race::OneAtATime,
            )
            .await?;
        #[derive(Deserialize)]
        struct Grant {
            #[serde(rename = "ID")]
            id: serde_json::Value,
            #[serde(rename = "TTL", default)]
            ttl: serde_json::Value,
        }
        let g: Grant = serde_json::from_value(v).map_err(|e| self.protocol(format!("lease grant: {e}")))?;
        let (Some(id), Some(ttl)) = (int(&g.id), int(&g.ttl)) else {
            return Err(self.protocol("lease grant without ID or TTL".into()));
        };
        Ok(Lease {
            id,
            ttl: Duration::from_secs(u64::try_from(ttl).unwrap_or(0)),
        })
    }

    /// `LeaseKeepAlive`: the lease's TTL from now, or `None` when the lease no longer exists.
    pub async fn keepalive(&self, lease: i64, timeout: Duration) -> Result<Option<Duration>, EtcdError> {
        let v = self
            .call(
                "/v3/lease/keepalive",
                &json!({"ID": lease.to_string()}),
                timeout,
                Race::Hedged,
            )
            .await?;
        // An expired lease is answered with TTL 0, which the gateway omits.
        Ok(v.get("TTL")
            .and_then(int)
            .filter(|t| *t > 0)
            .map(|t| Duration::from_secs(t.unsigned_abs())))
    }

    /// `LeaseRevoke`: deletes the lease and every key attached to it. A lease that is already
    /// gone is not an error.
    pub async fn revoke(&self, lease: i64, timeout: Duration) -> Result<(), EtcdError> {
        match self
            .call(
                "/v3/lease/revoke",
                &json!({"ID": lease.to_string()}),
                timeout,
                Race::Hedged,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused {
                code: CODE_NOT_FOUND, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads `key` (linearizable, so a member without quorum cannot answer it).
    pub async fn get(&self, key: &str, timeout: Duration) -> Result<Option<Holder>, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({"key": b64(key.as_bytes())}),
                timeout,
                Race::Hedged,
            )
            .await?;
        Ok(self.holder(&v))
    }

    /// The election recipe's acquire: put `key = name` attached to `lease` only if the key does
    /// not exist (its `create_revision` is 0); otherwise read who holds it.
    pub async fn campaign(
        &self,
        key: &str,
        name: &str,
        lease: i64,
        timeout: Duration,
    ) -> Result<Result<(), Option<Holder>>, EtcdError> {
        let k = b64(key.as_bytes());
        let body = json!({
            "compare": [{"target": "CREATE", "key": k, "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": b64(name.as_bytes()), "lease": lease.to_string()}}],
            "failure": [{"request_range": {"key": k}}],
        });
        let v = self.call("/v3/kv/txn", &body, timeout, Race::OneAtATime).await?;
        if v.get("succeeded").and_then(|s| s.as_bool()).unwrap_or(false) {
            return Ok(Ok(()));
        }
        let range = v
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .cloned()
            .unwrap_or_default();
        Ok(Err(self.holder(&range)))
    }

    fn holder(&self, range: &serde_json::Value) -> Option<Holder> {
        let kv = range.get("kvs")?.get(0)?;
        let name = unb64(kv.get("value").unwrap_or(&serde_json::Value::Null)).unwrap_or_default();
        Some(Holder {
            name: String::from_utf8_lossy(&name).into_owned(),
            lease: kv.get("lease").and_then(int).unwrap_or(0),
        })
    }

    fn protocol(&self, message: String) -> EtcdError {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len().max(1);
        EtcdError::Protocol {
            endpoint: self.endpoints.get(i).cloned().unwrap_or_default(),
            message,
        }
    }
}

/// An endpoint as errors and logs show it: `role_election.endpoints` may carry `user:pass@`
/// or a token in its query, and these messages reach the journal and `/status`.
fn shown(endpoint: &str) -> String {
    crate::secret::redact_url(endpoint)
}

/// Why `endpoint` did not answer, with every URL in the chain (reqwest names the request's)
/// redacted.
fn failure(endpoint: &str, e: &dyn std::error::Error) -> String {
    crate::secret::redact_urls_in(&format!("{endpoint}: {}", crate::errors::error_chain(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint that does not answer in time: the error names it, without its credentials.
    #[tokio::test]
    async fn errors_name_the_endpoint_without_its_credentials() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let c = EtcdClient::new(&EtcdOptions {
            endpoints: vec![format!("http://root:hunter2@127.0.0.1:{port}/?token=s3cr3t")],
            ca_pem: None,
            identity_pem: None,
            username: None,
            password: None,
        })
        .expect("client");
        let e = c.get("/k", Duration::from_millis(300)).await.expect_err("no answer");
        let text = e.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("s3cr3t"), "{text}");
        drop(silent);
    }

    /// A member that answers every request with `body` (HTTP/1.1, one request a connection).
    async fn answering(body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(body.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    /// Two hung members (the kernel accepts, nobody answers) ahead of a live one: a read and a
    /// grant still reach the live one within the call's timeout.
    #[tokio::test]
    async fn hung_members_leave_time_for_a_live_one() {
        let hung: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let mut endpoints: Vec<String> = hung
            .iter()
            .map(|l| format!("http://{}", l.local_addr().expect("addr")))
            .collect();
        let kv = r#"{"header":{},"kvs":[{"key":"L2s=","value":"bm9kZS1h","lease":"42"}],"ID":"7","TTL":"3"}"#;
        endpoints.push(answering(kv).await);
        let c = EtcdClient::new(&EtcdOptions {
            endpoints,
            ca_pem: None,
            identity_pem: None,
            username: None,
            password: None,
        })
        .expect("client");
        let holder = c
            .get("/k", Duration::from_millis(900))
            .await
            .expect("read through the live member");
        assert_eq!(holder.map(|h| h.name), Some("node-a".to_owned()));
        c.current.store(0, Ordering::Relaxed);
        let lease = c
            .grant(Duration::from_secs(3), Duration::from_millis(900))
            .await
            .expect("grant through the live member");
        assert_eq!(lease.id, 7);
        drop(hung);
    }

    /// A member whose answer has no end is refused at the ceiling, not buffered.
    #[tokio::test]
    async fn an_answer_without_end_is_refused_at_the_ceiling() {
        let head = "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n";
        let url = crate::peer_body::test_peer::peer(head, 64 << 20).await;
        let c = EtcdClient::new(&EtcdOptions {
            endpoints: vec![url.trim_end_matches('/').to_owned()],
            ca_pem: None,
            identity_pem: None,
            username: None,
            password: None,
        })
        .expect("client");
        let e = c
            .get("/k", Duration::from_secs(10))
            .await
            .expect_err("over the ceiling");
        assert!(
            e.to_string().contains(&format!("larger than {BODY_LIMIT} bytes")),
            "{e}"
        );
    }

    #[test]
    fn gateway_integers_are_strings_and_zero_is_omitted() {
        assert_eq!(int(&json!("7587869497451538179")), Some(7_587_869_497_451_538_179));
        assert_eq!(int(&json!(3)), Some(3));
        assert_eq!(int(&serde_json::Value::Null), None);
        let c = EtcdClient::new(&EtcdOptions {
            endpoints: vec!["http://127.0.0.1:1".into()],
            ca_pem: None,
            identity_pem: None,
            username: None,
            password: None,
        })
        .unwrap();
        let range = json!({"kvs": [{"key": b64(b"/k"), "value": b64(b"node-a"), "lease": "42"}], "count": "1"});
        assert_eq!(
            c.holder(&range),
            Some(Holder {
                name: "node-a".into(),
                lease: 42
            })
        );
        assert_eq!(c.holder(&json!({"header": {}})), None);
    }
}
