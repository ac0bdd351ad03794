//! Identity tokens for upstreams (Cloud Run): one fetch per audience under a burst, cached until
//! `exp` minus a margin, refreshed in the background, served stale-but-valid through an outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use http::HeaderValue;
use tokio::time::Instant;

use super::{MetadataClient, MetadataError};
use crate::telemetry::Metrics;

/// Why a token from the metadata server has no usable `exp` claim.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT (expected three dot-separated parts)")]
    NotThreeParts,
    #[error("JWT payload is not base64url: {0}")]
    NotBase64(base64::DecodeError),
    #[error("JWT payload is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("JWT has no exp claim")]
    NoExp,
}

/// Seconds since the epoch of the JWT's `exp` claim. The signature is not checked: the token
/// comes from the metadata server and is checked by its audience.
pub fn jwt_exp(token: &str) -> Result<u64, JwtError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::NotThreeParts);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(JwtError::NotBase64)?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let claims: Claims = serde_json::from_slice(&bytes).map_err(JwtError::NotJson)?;
    claims.exp.ok_or(JwtError::NoExp)
}

/// The longest a token is cached, whatever its `exp` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

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
    /// Set when no route uses the audience any more: its refresher ends.
    retired: tokio::sync::watch::Sender<bool>,
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
    /// Where the background refreshes run: the control runtime, not the proxy worker whose
    /// request happened to fetch first.
    background: tokio::runtime::Handle,
}

/// A failed fetch is reused by requests that were already waiting for this long.
const FAILURE_REUSE: Duration = Duration::from_secs(1);

impl IdTokenCache {
    pub fn new(
        metadata: MetadataClient,
        margin: Duration,
        metrics: Arc<Metrics>,
        background: tokio::runtime::Handle,
    ) -> Arc<IdTokenCache> {
        Arc::new(IdTokenCache {
            metadata,
            margin,
            slots: ArcSwap::default(),
            insert: Mutex::new(()),
            metrics,
            background,
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
            retired: tokio::sync::watch::Sender::new(false),
        });
        let mut next = HashMap::clone(&current);
        next.insert(slot.audience.clone(), slot.clone());
        self.slots.store(Arc::new(next));
        slot
    }

    /// Drops the slots (token and background refresher) of every audience not in `keep`, the
    /// audiences of the table just installed: a route that went away stops fetching tokens.
    /// A request of the previous table still in flight gets a new slot if it asks again.
    pub fn retain(&self, keep: &std::collections::HashSet<&str>) {
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.slots.load_full();
        if current.keys().all(|a| keep.contains(&**a)) {
            return;
        }
        let mut next = HashMap::clone(&current);
        next.retain(|audience, slot| {
            let kept = keep.contains(&**audience);
            if !kept {
                slot.retired.send_replace(true);
            }
            kept
        });
        self.slots.store(Arc::new(next));
    }

    /// The `Bearer …` header value for `audience`.
    pub async fn header(self: &Arc<Self>, audience: &str) -> Result<HeaderValue, TokenUnavailable> {
        let slot = self.slot(audience);
        if let Some(v) = Self::valid(&slot) {
            self.metrics.token_cache_hits.inc();
            return Ok(v);
        }
        // Boxed: the fetch (an HTTP client future) is large, and every proxied request's
        // future would otherwise carry room for it although nearly all are cache hits.
        Box::pin(self.fetch_for(slot)).await
    }

    /// The cache missed: waits for (or does) the fetch.
    async fn fetch_for(self: &Arc<Self>, slot: Arc<Slot>) -> Result<HeaderValue, TokenUnavailable> {
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
            self.background
                .spawn(Self::refresh_loop(Arc::downgrade(self), slot.clone()));
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
                tracing::warn!(audience = %slot.audience, error = %e, "identity token fetch failed for {}: {e}", slot.audience);
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
        let exp = jwt_exp(&jwt).map_err(|e| bad(e.to_string()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let remaining = exp
            .checked_sub(now)
            .filter(|r| *r > 0)
            .ok_or_else(|| bad(format!("already expired (exp {exp}, now {now})")))?;
        // Google's identity tokens live an hour; an `exp` further out is the server's mistake (or
        // an attack on our deadlines) and is held for an hour at most.
        let remaining = Duration::from_secs(remaining).min(MAX_TOKEN_LIFETIME);
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
            expires_at: crate::deadline::after(fetched, remaining),
            refresh_at: crate::deadline::after(fetched, refresh_in),
        })));
        tracing::debug!(audience = %slot.audience, expires_in_s = remaining.as_secs(), "identity token fetched for {} (expires in {}s)", slot.audience, remaining.as_secs());
        Ok(header)
    }

    /// Refreshes `slot` before its token reaches the margin, retrying with backoff on failure
    /// while the old token keeps serving. Ends when the cache is dropped.
    async fn refresh_loop(cache: std::sync::Weak<IdTokenCache>, slot: Arc<Slot>) {
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut retired = slot.retired.subscribe();
        loop {
            let at = slot.token.load().as_ref().map(|t| t.refresh_at);
            let wait = async {
                match at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => tokio::time::sleep(backoff.next_delay()).await,
                }
            };
            tokio::select! {
                () = wait => {}
                _ = retired.wait_for(|r| *r) => return,
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
        assert!(matches!(jwt_exp(&jwt(r#"{"aud":"x"}"#)), Err(JwtError::NoExp)));
        assert!(matches!(jwt_exp("abc"), Err(JwtError::NotThreeParts)));
        assert!(matches!(jwt_exp("a.!!!.c"), Err(JwtError::NotBase64(_))));
        assert!(jwt_exp("a.!!!.c").unwrap_err().to_string().contains("base64url"));
    }
}
