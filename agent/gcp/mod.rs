//! The GCE metadata server and what the agent gets from it: identity tokens for upstreams
//! (Cloud Run, `id_tokens`), access tokens for Secret Manager (`secret_manager`), and watched
//! attributes (`watch`: the one long poll the role and route sources share).
//!
//! Why not the `google-cloud-auth` crate: its ID-token support would give us the fetch, but not
//! what the proxy needs around it (one fetch per audience under a burst, serving the cached token
//! until `exp` while the metadata server fails, background refresh, metrics), and it brings a
//! second HTTP stack and credential-discovery machinery a VM agent never uses. The fetch itself is
//! one GET with one header; the cache is the part worth owning.

mod id_tokens;
mod secret_manager;
mod watch;

pub use id_tokens::{jwt_exp, IdTokenCache, JwtError, TokenUnavailable};
pub use secret_manager::{SecretManager, SecretManagerError};
pub use watch::{AttributeWatch, Watched};

use std::time::Duration;

use http::HeaderValue;

use crate::secret::Secret;

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
                reason: crate::errors::error_chain(&e),
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
        let body = crate::peer_body::read_text(resp, MAX_BODY)
            .await
            .map_err(|e| MetadataError::Unreachable {
                url: self.base.clone(),
                reason: e.to_string(),
            })?;
        if !status.is_success() {
            return Err(MetadataError::Status {
                path: path.to_owned(),
                status: status.as_u16(),
                body: head(&body, MAX_ERROR_BODY).trim().to_owned(),
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

/// How much of an error body a [`MetadataError::Status`] keeps: enough for the server's reason.
const MAX_ERROR_BODY: usize = 200;
/// The largest metadata answer read: a value is at most 256 KB (Compute Engine's limit for one
/// attribute), a token a few KB; anything longer is not a metadata server's answer.
const MAX_BODY: usize = 1 << 20;

/// The longest start of `s` of at most `max` bytes that ends on a character boundary
/// (`String::truncate` panics inside a multi-byte character, and the body is the server's).
fn head(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod head_tests {
    use super::head;

    #[test]
    fn a_cut_never_splits_a_character() {
        let body = "\u{20ac}".repeat(100) + "\n";
        assert_eq!(body.len(), 301);
        let cut = head(&body, 200);
        assert_eq!(cut.len(), 198, "66 whole euro signs");
        assert_eq!(head("short", 200), "short");
        assert_eq!(head("", 200), "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata client through it: an attribute answer without end is an error, not 64 MiB
    /// of memory (on the code before this module, `get` returned the whole body).
    #[tokio::test]
    async fn the_metadata_client_refuses_an_answer_without_end() {
        let head = "HTTP/1.1 200 OK\r\nmetadata-flavor: Google\r\nconnection: close\r\n\r\n";
        let url = crate::peer_body::test_peer::peer(head, 64 << 20).await;
        let client = MetadataClient::new(url.trim_end_matches('/').to_owned(), std::time::Duration::from_secs(20))
            .expect("a client");
        let e = client
            .get("instance/attributes/routes", &[])
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
