//! The GCE metadata server and what the agent gets from it: identity tokens for upstreams
//! (Cloud Run) and, later, access tokens and attributes.
//!
//! Why not the `google-cloud-auth` crate: its ID-token support would give us the fetch, but not
//! what the proxy needs around it (one fetch per audience under a burst, serving the cached token
//! until `exp` while the metadata server fails, background refresh, metrics), and it brings a
//! second HTTP stack and credential-discovery machinery a VM agent never uses. The fetch itself is
//! one GET with one header; the cache is the part worth owning.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use http::HeaderValue;
use tokio::time::Instant;

use crate::config::SecretVersionName;
use crate::secret::Secret;
use crate::telemetry::Metrics;

/// A metadata server failure. Messages never include a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata server unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("metadata server answered {status} for {path}: {body}")]
    Status { path: String, status: u16, body: String },
    #[error("{url} answered without \"Metadata-Flavor: Google\"; it is not a metadata server")]
    NotMetadata { url: String },
    #[error("identity token for {audience} is unusable: {reason}")]
    BadToken { audience: String, reason: String },
}

/// A client for `http://metadata.google.internal/computeMetadata/v1/…`.
#[derive(Debug, Clone)]
pub struct MetadataClient {
    http: reqwest::Client,
    base: String,
}

impl MetadataClient {
    /// `base` is `http://host[:port]` without a trailing slash; `timeout` bounds each request.
    pub fn new(base: String, timeout: Duration) -> anyhow::Result<MetadataClient> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // The metadata server is link-local; a proxy from the environment must not apply.
            .no_proxy()
            .build()?;
        Ok(MetadataClient { http, base })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GETs `path` (under `/computeMetadata/v1`) with `query`, checking the reply really comes
    /// from a metadata server. Returns the body and the `ETag`.
    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<(String, Option<String>), MetadataError> {
        self.get_with_timeout(path, query, None).await
    }

    /// Like [`MetadataClient::get`], with a longer timeout for `wait_for_change` long polls.
    pub async fn get_with_timeout(
        &self,
        path: &str,
        query: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Result<(String, Option<String>), MetadataError> {
        let url = format!("{}/computeMetadata/v1/{}", self.base, path.trim_start_matches('/'));
        let mut req = self.http.get(&url).query(query);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| MetadataError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            })?;
        if resp.headers().get("metadata-flavor").map(HeaderValue::as_bytes) != Some(b"Google") {
            return Err(MetadataError::NotMetadata { url: self.base.clone() });
        }
        let status = resp.status();
        let etag = resp
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.text().await.map_err(|e| MetadataError::Unreachable {
            url: self.base.clone(),
            reason: error_chain(&e),
        })?;
        if !status.is_success() {
            let mut body = body;
            body.truncate(200);
            return Err(MetadataError::Status {
                path: path.to_owned(),
                status: status.as_u16(),
                body: body.trim().to_owned(),
            });
        }
        Ok((body, etag))
    }

    /// An OAuth2 access token for the instance's default service account and its lifetime.
    pub async fn access_token(&self) -> Result<(Secret, Duration), MetadataError> {
        let (body, _) = self.get("instance/service-accounts/default/token", &[]).await?;
        #[derive(serde::Deserialize)]
        struct Token {
            access_token: String,
            expires_in: u64,
        }
        let t: Token = serde_json::from_str(&body).map_err(|e| MetadataError::BadToken {
            audience: "access token".into(),
            reason: format!("token endpoint answered with unexpected JSON: {e}"),
        })?;
        Ok((Secret::new(t.access_token), Duration::from_secs(t.expires_in)))
    }

    /// An identity token (JWT) for `audience`, with the full claim set.
    pub async fn identity_token(&self, audience: &str) -> Result<String, MetadataError> {
        let (body, _) = self
            .get(
                "instance/service-accounts/default/identity",
                &[("audience", audience), ("format", "full")],
            )
            .await?;
        Ok(body.trim().to_owned())
    }
}

/// `reqwest`'s top-level message hides the cause ("error sending request"); walk the chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Seconds since the epoch of the JWT's `exp` claim. The signature is not checked: the token
/// comes from the metadata server and is checked by its audience.
pub fn jwt_exp(token: &str) -> Result<u64, String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a JWT (expected three dot-separated parts)".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("JWT payload is not base64url: {e}"))?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let claims: Claims = serde_json::from_slice(&bytes).map_err(|e| format!("JWT payload is not JSON: {e}"))?;
    claims.exp.ok_or_else(|| "JWT has no exp claim".to_owned())
}

/// A cached token, ready to put on a request.
#[derive(Debug)]
struct CachedToken {
    /// `Bearer <jwt>`, marked sensitive so hyper's debug output hides it.
    header: HeaderValue,
    expires_at: Instant,
    refresh_at: Instant,
}

/// One audience's slot.
#[derive(Debug)]
struct Slot {
    audience: Arc<str>,
    token: ArcSwapOption<CachedToken>,
    /// Held while fetching: at most one fetch in flight per audience.
    fetching: tokio::sync::Mutex<()>,
    /// The last failed fetch: waiters that queued behind it get its error instead of repeating
    /// it, so a metadata outage costs one fetch per second, not one per request.
    last_failure: Mutex<Option<(Instant, MetadataError)>>,
    refresher: AtomicBool,
}

/// Why a request could not get a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no identity token for {audience}: {cause}")]
pub struct TokenUnavailable {
    pub audience: Arc<str>,
    pub cause: MetadataError,
}

/// Identity tokens per audience: cached until `exp` minus a margin, refreshed in the
/// background, one fetch at a time per audience, stale-but-valid tokens served through a
/// metadata outage.
#[derive(Debug)]
pub struct IdTokenCache {
    metadata: MetadataClient,
    margin: Duration,
    slots: ArcSwap<HashMap<Arc<str>, Arc<Slot>>>,
    /// Serialises slot creation (copy-on-write of `slots`).
    insert: Mutex<()>,
    metrics: Arc<Metrics>,
}

/// A failed fetch is reused by requests that were already waiting for this long.
const FAILURE_REUSE: Duration = Duration::from_secs(1);

impl IdTokenCache {
    pub fn new(metadata: MetadataClient, margin: Duration, metrics: Arc<Metrics>) -> Arc<IdTokenCache> {
        Arc::new(IdTokenCache {
            metadata,
            margin,
            slots: ArcSwap::default(),
            insert: Mutex::new(()),
            metrics,
        })
    }

    fn slot(&self, audience: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.load().get(audience) {
            return s.clone();
        }
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.slots.load_full();
        if let Some(s) = current.get(audience) {
            return s.clone();
        }
        let slot = Arc::new(Slot {
            audience: Arc::from(audience),
            token: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            refresher: AtomicBool::new(false),
        });
        let mut next = HashMap::clone(&current);
        next.insert(slot.audience.clone(), slot.clone());
        self.slots.store(Arc::new(next));
        slot
    }

    /// The `Bearer …` header value for `audience`.
    pub async fn header(self: &Arc<Self>, audience: &str) -> Result<HeaderValue, TokenUnavailable> {
        let slot = self.slot(audience);
        if let Some(v) = Self::valid(&slot) {
            self.metrics.token_cache_hits.inc();
            return Ok(v);
        }
        let waited_from = Instant::now();
        let _fetching = slot.fetching.lock().await;
        // Someone else may have fetched (or failed) while we queued.
        if let Some(v) = Self::valid(&slot) {
            self.metrics.token_cache_hits.inc();
            return Ok(v);
        }
        if let Some((at, err)) = &*slot.last_failure.lock().unwrap_or_else(|e| e.into_inner()) {
            if *at >= waited_from || at.elapsed() < FAILURE_REUSE {
                return Err(TokenUnavailable {
                    audience: slot.audience.clone(),
                    cause: err.clone(),
                });
            }
        }
        let header = self.fetch(&slot).await.map_err(|cause| TokenUnavailable {
            audience: slot.audience.clone(),
            cause,
        })?;
        if !slot.refresher.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::refresh_loop(Arc::downgrade(self), slot.clone()));
        }
        Ok(header)
    }

    fn valid(slot: &Slot) -> Option<HeaderValue> {
        let guard = slot.token.load();
        let token = guard.as_ref()?;
        (Instant::now() < token.expires_at).then(|| token.header.clone())
    }

    /// Fetches and stores a token. Call with `slot.fetching` held.
    async fn fetch(&self, slot: &Slot) -> Result<HeaderValue, MetadataError> {
        self.metrics.token_fetches.inc();
        let result = self.fetch_inner(slot).await;
        match &result {
            Ok(_) => *slot.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None,
            Err(e) => {
                self.metrics.token_fetch_failures.inc();
                tracing::warn!(audience = %slot.audience, error = %e, "identity token fetch failed");
                *slot.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), e.clone()));
            }
        }
        result
    }

    async fn fetch_inner(&self, slot: &Slot) -> Result<HeaderValue, MetadataError> {
        let bad = |reason: String| MetadataError::BadToken {
            audience: slot.audience.to_string(),
            reason,
        };
        let jwt = self.metadata.identity_token(&slot.audience).await?;
        let exp = jwt_exp(&jwt).map_err(bad)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let remaining = exp
            .checked_sub(now)
            .filter(|r| *r > 0)
            .ok_or_else(|| bad(format!("already expired (exp {exp}, now {now})")))?;
        let remaining = Duration::from_secs(remaining);
        let mut header =
            HeaderValue::try_from(format!("Bearer {jwt}")).map_err(|_| bad("not a valid header value".into()))?;
        header.set_sensitive(true);
        let fetched = Instant::now();
        // A token that does not outlive the margin is refreshed at half its life instead.
        // "Exactly the margin" counts too: a refresh due *now* would fetch a token just as short
        // and loop, hammering the metadata server (hundreds of fetches a second).
        let refresh_in = remaining
            .checked_sub(self.margin)
            .filter(|d| !d.is_zero())
            .unwrap_or(remaining / 2);
        slot.token.store(Some(Arc::new(CachedToken {
            header: header.clone(),
            expires_at: fetched + remaining,
            refresh_at: fetched + refresh_in,
        })));
        tracing::debug!(audience = %slot.audience, expires_in_s = remaining.as_secs(), "identity token fetched");
        Ok(header)
    }

    /// Refreshes `slot` before its token reaches the margin, retrying with backoff on failure
    /// while the old token keeps serving. Ends when the cache is dropped.
    async fn refresh_loop(cache: std::sync::Weak<IdTokenCache>, slot: Arc<Slot>) {
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let at = slot.token.load().as_ref().map(|t| t.refresh_at);
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => tokio::time::sleep(backoff.next_delay()).await,
            }
            let Some(cache) = cache.upgrade() else { return };
            let _fetching = slot.fetching.lock().await;
            // A request may have refreshed it meanwhile.
            let due = slot
                .token
                .load()
                .as_ref()
                .is_none_or(|t| Instant::now() >= t.refresh_at);
            if !due {
                continue;
            }
            match cache.fetch(&slot).await {
                Ok(_) => backoff.reset(),
                Err(_) => {
                    drop(_fetching);
                    tokio::time::sleep(backoff.next_delay()).await;
                    // Make the next iteration retry now rather than wait for refresh_at again.
                    if let Some(t) = slot.token.load_full() {
                        if Instant::now() >= t.expires_at {
                            slot.token.store(None);
                        }
                    }
                }
            }
        }
    }
}

/// Why a Secret Manager access failed, and whether waiting can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretManagerError {
    /// 429, 5xx, network, metadata server trouble: worth retrying until the boot deadline.
    #[error("{0}")]
    Transient(String),
    /// 400/401/403/404, a corrupted payload: reported at once.
    #[error("{0}")]
    Permanent(String),
}

/// Reads secret versions over Secret Manager's REST API (`GET …/versions/V:access`).
#[derive(Debug)]
pub struct SecretManager {
    http: reqwest::Client,
    metadata: MetadataClient,
    endpoint: Option<String>,
    /// The access token and when to stop using it.
    access: tokio::sync::Mutex<Option<(Secret, Instant)>>,
}

impl SecretManager {
    pub fn new(metadata: MetadataClient, endpoint: Option<String>, timeout: Duration) -> anyhow::Result<SecretManager> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(SecretManager {
            http,
            metadata,
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_owned()),
            access: tokio::sync::Mutex::new(None),
        })
    }

    fn url(&self, name: &SecretVersionName) -> String {
        let base = match (&self.endpoint, &name.location) {
            (Some(e), _) => e.clone(),
            (None, Some(l)) => format!("https://secretmanager.{l}.rep.googleapis.com"),
            (None, None) => "https://secretmanager.googleapis.com".to_owned(),
        };
        format!("{base}/v1/{}:access", name.resource())
    }

    async fn access_token(&self) -> Result<Secret, SecretManagerError> {
        let mut cached = self.access.lock().await;
        if let Some((token, until)) = &*cached {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = self
            .metadata
            .access_token()
            .await
            .map_err(|e| SecretManagerError::Transient(format!("no access token: {e}")))?;
        // Stop using it a minute early so it cannot expire in flight.
        let until = Instant::now() + lifetime.saturating_sub(Duration::from_secs(60));
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// The payload of one secret version, CRC32C-verified when Google sent a checksum.
    pub async fn access(&self, name: &SecretVersionName) -> Result<Vec<u8>, SecretManagerError> {
        let token = self.access_token().await?;
        let resp = self
            .http
            .get(self.url(name))
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| SecretManagerError::Transient(format!("Secret Manager unreachable: {}", error_chain(&e))))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            SecretManagerError::Transient(format!("reading Secret Manager's answer: {}", error_chain(&e)))
        })?;
        if !status.is_success() {
            // Google's error envelope: {"error": {"code": 403, "message": "...", "status": "..."}}.
            #[derive(serde::Deserialize)]
            struct Envelope {
                error: GoogleError,
            }
            #[derive(serde::Deserialize)]
            struct GoogleError {
                message: String,
                #[serde(default)]
                status: String,
            }
            let detail = match serde_json::from_slice::<Envelope>(&body) {
                Ok(e) if e.error.status.is_empty() => e.error.message,
                Ok(e) => format!("{} ({})", e.error.message, e.error.status),
                Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned(),
            };
            let msg = format!("Secret Manager answered {}: {detail}", status.as_u16());
            return Err(if status.as_u16() == 429 || status.is_server_error() {
                SecretManagerError::Transient(msg)
            } else {
                SecretManagerError::Permanent(msg)
            });
        }
        #[derive(serde::Deserialize)]
        struct Access {
            payload: Payload,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Payload {
            data: String,
            /// int64 in proto3 JSON, hence a decimal string.
            data_crc32c: Option<String>,
        }
        let access: Access = serde_json::from_slice(&body)
            .map_err(|e| SecretManagerError::Permanent(format!("unexpected answer from Secret Manager: {e}")))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(access.payload.data.as_bytes())
            .map_err(|e| SecretManagerError::Permanent(format!("payload.data is not base64: {e}")))?;
        if let Some(crc) = access.payload.data_crc32c {
            let want: u64 = crc
                .parse()
                .map_err(|_| SecretManagerError::Permanent(format!("payload.dataCrc32c {crc:?} is not a number")))?;
            let got = u64::from(crc32c::crc32c(&data));
            if got != want {
                return Err(SecretManagerError::Permanent(format!(
                    "payload checksum mismatch (CRC32C {got}, Secret Manager said {want}); refusing the value"
                )));
            }
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", e.encode(r#"{"alg":"RS256"}"#), e.encode(payload))
    }

    #[test]
    fn reads_exp_and_refuses_junk() {
        assert_eq!(jwt_exp(&jwt(r#"{"exp":1700000000,"aud":"x"}"#)).unwrap(), 1_700_000_000);
        assert!(jwt_exp(&jwt(r#"{"aud":"x"}"#)).unwrap_err().contains("no exp"));
        assert!(jwt_exp("abc").unwrap_err().contains("three"));
        assert!(jwt_exp("a.!!!.c").unwrap_err().contains("base64url"));
    }
}
