//! `[gcp]`: the metadata server and Secret Manager endpoints, identity token refresh.

use std::time::Duration;

use serde::Deserialize;

use super::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcpSection {
    /// Metadata server base URL. Unset: `$GCE_METADATA_HOST` if set (as Google's client
    /// libraries do), else `http://metadata.google.internal`.
    pub metadata_url: Option<String>,
    /// Identity tokens are refreshed this long before their `exp`.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub id_token_refresh_margin: Duration,
    /// Per-request timeout towards the metadata server.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub metadata_timeout: Duration,
    /// Secret Manager API base URL. Unset: `https://secretmanager.googleapis.com`, or
    /// `https://secretmanager.LOCATION.rep.googleapis.com` for regional secrets.
    pub secret_manager_endpoint: Option<String>,
}

impl Default for GcpSection {
    fn default() -> Self {
        GcpSection {
            metadata_url: None,
            id_token_refresh_margin: Duration::from_secs(300),
            metadata_timeout: Duration::from_secs(5),
            secret_manager_endpoint: None,
        }
    }
}

impl GcpSection {
    /// The metadata server base URL, without a trailing slash.
    pub fn metadata_base(&self) -> String {
        let url = match &self.metadata_url {
            Some(url) => url.clone(),
            None => match std::env::var("GCE_METADATA_HOST") {
                Ok(host) if !host.is_empty() => format!("http://{host}"),
                _ => "http://metadata.google.internal".to_owned(),
            },
        };
        url.trim_end_matches('/').to_owned()
    }
}
