//! Inbound auth: the internal header cloudflared's requests carry, checked in constant time,
//! with the previous token still accepted for a while after a rotation.

use anyhow::Context as _;
use http::HeaderName;
use tokio::time::Instant;

use crate::config::Config;
use crate::secret::Secret;
use crate::secrets::SecretValues;

/// One accepted internal token. During rotation the previous value stays accepted until
/// `until`.
#[derive(Debug, Clone)]
pub struct AcceptedToken {
    pub value: Secret,
    pub until: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct InboundAuth {
    pub header: HeaderName,
    pub accepted: Vec<AcceptedToken>,
}

impl InboundAuth {
    /// The inbound auth for `config`, or `None` when `proxy.auth_secret` is unset. When the token
    /// changed from `previous`, the previous value stays accepted for `proxy.auth_overlap`
    /// (rotation without 401s).
    pub fn for_config(
        config: &Config,
        secrets: &SecretValues,
        previous: Option<&InboundAuth>,
    ) -> anyhow::Result<Option<InboundAuth>> {
        let Some(name) = &config.proxy.auth_secret else {
            return Ok(None);
        };
        let header = HeaderName::from_bytes(config.proxy.auth_header.as_bytes()).context("proxy.auth_header")?;
        let current = secrets.get(name).cloned().context("proxy.auth_secret has no value")?;
        let now = Instant::now();
        let mut accepted = vec![AcceptedToken {
            value: current.clone(),
            until: None,
        }];
        for old in previous.map(|p| p.accepted.as_slice()).unwrap_or_default() {
            if old.value == current || old.until.is_some_and(|u| u <= now) {
                continue;
            }
            accepted.push(AcceptedToken {
                value: old.value.clone(),
                until: Some(
                    old.until
                        .unwrap_or(crate::deadline::after(now, config.proxy.auth_overlap)),
                ),
            });
        }
        if accepted.len() > 1 {
            tracing::info!(
                overlap_s = config.proxy.auth_overlap.as_secs(),
                "internal auth token rotated; the previous one stays accepted for {:?} (proxy.auth_overlap)",
                config.proxy.auth_overlap
            );
        }
        Ok(Some(InboundAuth { header, accepted }))
    }

    /// Constant-time comparison against every accepted token (no early exit on the first
    /// match, so timing does not tell which one matched).
    pub(super) fn accepts(&self, presented: &[u8]) -> bool {
        let now = Instant::now();
        let mut ok = subtle::Choice::from(0);
        for t in &self.accepted {
            if t.until.is_none_or(|u| now < u) {
                ok |= t.value.ct_matches(presented);
            }
        }
        ok.into()
    }
}
