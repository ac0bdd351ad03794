//! Secret Manager over its REST API, authenticated with the metadata server's access token.

use std::time::Duration;

use base64::Engine as _;
use tokio::time::Instant;

use super::MetadataClient;
use crate::config::SecretVersionName;
use crate::errors::error_chain;
use crate::secret::Secret;

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
        let until = crate::deadline::from_now(lifetime.saturating_sub(Duration::from_secs(60)));
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
        // A payload is at most 64 KiB, base64 in a JSON envelope: 1 MiB is far past any answer.
        let body = crate::peer_body::read(resp, 1 << 20)
            .await
            .map_err(|e| SecretManagerError::Transient(format!("reading Secret Manager's answer: {e}")))?;
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
