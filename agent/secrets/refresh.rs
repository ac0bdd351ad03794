//! Re-reading secrets that have a `refresh` interval; a changed value is reported to the node,
//! which applies it (a rotated auth token, a new tunnel token).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::gcp::SecretManager;
use crate::secrets::resolve::fetch;
use crate::secrets::{Secret, SecretValues};
use crate::telemetry::Metrics;

/// A refreshed secret with a new value.
#[derive(Debug)]
pub struct SecretChange {
    pub name: String,
    pub value: Secret,
}

/// Starts one refresher per secret with a `refresh` interval. `current` holds the values in
/// use, so only a real change is reported.
pub fn spawn(
    config: &Config,
    sm: &Arc<SecretManager>,
    current: &SecretValues,
    tx: &mpsc::Sender<SecretChange>,
    metrics: &Arc<Metrics>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (name, spec) in &config.secrets {
        let Some(every) = spec.refresh else { continue };
        let (name, spec, sm, tx, metrics) = (name.clone(), spec.clone(), sm.clone(), tx.clone(), metrics.clone());
        let mut last = current.get(&name).cloned();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                metrics.secret_fetches.inc();
                match fetch(&name, &spec, &sm).await {
                    Ok(v) if last.as_ref() != Some(&v) => {
                        last = Some(v.clone());
                        let change = SecretChange {
                            name: name.clone(),
                            value: v,
                        };
                        if tx.send(change).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics.secret_fetch_failures.inc();
                        tracing::warn!(secret = %name, error = %e, "secret refresh failed: {name:?}; keeping the current value: {e}")
                    }
                }
            }
        }));
    }
    tasks
}
