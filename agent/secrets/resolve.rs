//! Resolving every configured secret: at boot (retrying transient failures until the boot
//! deadline), on reload, and for `check` (local sources only).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{Config, SecretSource, SecretSpec};
use crate::gcp::{SecretManager, SecretManagerError};
use crate::secrets::{self, Secret, SecretError, SecretValues};
use crate::systemd;
use crate::telemetry::Metrics;

/// Why one attempt at one secret failed, and whether another attempt may succeed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Secret Manager was unreachable or overloaded: waiting can help.
    #[error(transparent)]
    Transient(SecretError),
    /// The value is missing, empty, refused or malformed: waiting cannot help.
    #[error(transparent)]
    Permanent(SecretError),
}

impl FetchError {
    pub fn into_inner(self) -> SecretError {
        match self {
            FetchError::Transient(e) | FetchError::Permanent(e) => e,
        }
    }
}

/// Reads every local secret (`file`, `env`); remote ones are skipped. What `check` uses: it must
/// not need the network.
pub fn load_local(config: &Config, metrics: &Metrics) -> Result<SecretValues, Vec<SecretError>> {
    let mut values = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, spec) in &config.secrets {
        match secrets::read_local(name, &spec.source) {
            Some(Ok(v)) => {
                metrics.secret_fetches.inc();
                values.insert(name.clone(), v);
            }
            Some(Err(e)) => {
                metrics.secret_fetch_failures.inc();
                errors.push(e);
            }
            None => {}
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

/// One attempt at one secret.
pub async fn fetch(name: &str, spec: &SecretSpec, sm: &SecretManager) -> Result<Secret, FetchError> {
    let version = match &spec.source {
        SecretSource::File(path) => return secrets::read_file(name, path).map_err(FetchError::Permanent),
        SecretSource::Env(var) => return secrets::read_env(name, var).map_err(FetchError::Permanent),
        SecretSource::GcpSecretManager(version) => version,
    };
    let remote = |message: String| SecretError::Remote {
        name: name.to_owned(),
        message,
    };
    match sm.access(version).await {
        Ok(bytes) => secrets::from_bytes(name, bytes, &version.resource()).map_err(FetchError::Permanent),
        Err(SecretManagerError::Transient(m)) => Err(FetchError::Transient(remote(m))),
        Err(SecretManagerError::Permanent(m)) => Err(FetchError::Permanent(remote(m))),
    }
}

/// Resolves every secret, retrying transient failures with backoff until `deadline`. While
/// waiting, systemd's status names the secret and the reason, and its start timeout is extended.
pub async fn resolve_all(
    config: &Config,
    sm: &SecretManager,
    metrics: &Metrics,
    deadline: Instant,
) -> Result<SecretValues, Vec<SecretError>> {
    let mut values = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, spec) in &config.secrets {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            metrics.secret_fetches.inc();
            match fetch(name, spec, sm).await {
                Ok(v) => {
                    values.insert(name.clone(), v);
                    break;
                }
                Err(e) => {
                    metrics.secret_fetch_failures.inc();
                    let delay = backoff.next_delay();
                    let e = match e {
                        FetchError::Transient(e) if crate::deadline::from_now(delay) <= deadline => e,
                        e => {
                            errors.push(e.into_inner());
                            break;
                        }
                    };
                    let why = format!("waiting for secret {name:?}: {e}");
                    tracing::warn!(secret = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "secret not available yet: {name:?}, retrying in {delay:?}: {e}");
                    systemd::extend_timeout(delay.saturating_add(Duration::from_secs(30)), &why);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

/// Several secret errors as one line (each names its secret, never a value).
pub fn join_errors(errors: &[SecretError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}
