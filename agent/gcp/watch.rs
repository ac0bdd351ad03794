//! Watching a metadata attribute with the metadata server's long poll
//! (`?wait_for_change=true&last_etag=E&timeout_sec=N`): it answers as soon as the value
//! changes, or with the same value and ETag when the timeout passes. The role and the route
//! sources both watch one this way.

use std::time::Duration;

use super::{MetadataClient, MetadataError};
use crate::backoff::Backoff;

/// How long one long poll asks the metadata server to wait.
const WATCH_TIMEOUT_SEC: u64 = 300;

/// What a watched attribute did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// A new value.
    Changed(String),
    /// The attribute does not exist (404). `was_present`: the watch had seen a value before.
    /// Said once per disappearance, and for the first read of a watch.
    Missing { was_present: bool },
}

/// One attribute's watch: [`AttributeWatch::next`] waits for the next change, retrying
/// failures with backoff (logged as `failure`; the caller keeps what it has meanwhile).
pub struct AttributeWatch {
    metadata: MetadataClient,
    path: String,
    etag: Option<String>,
    backoff: Backoff,
    failure: &'static str,
    /// A backoff still to wait out before the next read (after a `Missing` was returned).
    wait: Option<Duration>,
}

impl MetadataClient {
    /// Watches `path`, starting from `etag` (the value read at boot); without one, the current
    /// value is read at once.
    pub fn watch_attribute(&self, path: String, etag: Option<String>, failure: &'static str) -> AttributeWatch {
        AttributeWatch {
            metadata: self.clone(),
            path,
            etag,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            failure,
            wait: None,
        }
    }
}

impl AttributeWatch {
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The next change.
    pub async fn next(&mut self) -> Watched {
        let timeout = WATCH_TIMEOUT_SEC.to_string();
        if let Some(delay) = self.wait.take() {
            tokio::time::sleep(delay).await;
        }
        loop {
            let tag = self.etag.clone().unwrap_or_default();
            let query: Vec<(&str, &str)> = if self.etag.is_some() {
                vec![
                    ("wait_for_change", "true"),
                    ("timeout_sec", timeout.as_str()),
                    ("last_etag", tag.as_str()),
                ]
            } else {
                Vec::new()
            };
            let result = self
                .metadata
                .get_with_timeout(&self.path, &query, Some(Duration::from_secs(WATCH_TIMEOUT_SEC + 10)))
                .await;
            match result {
                Ok((value, new_etag)) => {
                    self.backoff.reset();
                    if new_etag.is_some() && new_etag == self.etag {
                        continue; // timed out without a change
                    }
                    self.etag = new_etag;
                    return Watched::Changed(value);
                }
                Err(MetadataError::Status { status: 404, .. }) => {
                    let was_present = self.etag.take().is_some();
                    let first = self.backoff.attempts() == 0;
                    let delay = self.backoff.next_delay();
                    if was_present || first {
                        // The caller hears of it now; the next read waits out the backoff.
                        self.wait = Some(delay);
                        return Watched::Missing { was_present };
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(attribute = %self.path, error = %e, retry_in_ms = delay.as_millis() as u64, "{} ({}), retrying in {delay:?}: {e}", self.failure, self.path);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
