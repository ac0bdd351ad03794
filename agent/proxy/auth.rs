//! Inbound auth: the internal header cloudflared's requests carry, checked in constant time,
//! with the previous token still accepted for a while after a rotation.

use anyhow::Context as _;
use http::HeaderName;

use crate::config::Config;
pub use crate::secret::AcceptedToken;
use crate::secret::{accepts, rotated};
use crate::secrets::SecretValues;

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
        let previous = previous.map(|p| p.accepted.as_slice()).unwrap_or_default();
        let accepted = rotated(current, previous, config.proxy.auth_overlap);
        if accepted.len() > 1 && accepted.len() > previous.len() {
            tracing::info!(
                overlap_s = config.proxy.auth_overlap.as_secs(),
                "internal auth token rotated; the previous one stays accepted for {:?} (proxy.auth_overlap)",
                config.proxy.auth_overlap
            );
        }
        Ok(Some(InboundAuth { header, accepted }))
    }

    pub(super) fn accepts(&self, presented: &[u8]) -> bool {
        accepts(&self.accepted, presented)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::secret::Secret;

    #[test]
    fn auth_accepts_current_and_unexpired_previous_only() {
        let now = Instant::now();
        let auth = InboundAuth {
            header: HeaderName::from_static("x-internal-auth-token"),
            accepted: vec![
                AcceptedToken {
                    value: Secret::new("new"),
                    until: None,
                },
                AcceptedToken {
                    value: Secret::new("old"),
                    until: Some(now + Duration::from_secs(60)),
                },
                AcceptedToken {
                    value: Secret::new("older"),
                    until: Some(now - Duration::from_secs(1)),
                },
            ],
        };
        assert!(auth.accepts(b"new"));
        assert!(auth.accepts(b"old"));
        assert!(!auth.accepts(b"older"));
        assert!(!auth.accepts(b"ne"));
        assert!(!auth.accepts(b""));
    }
}
