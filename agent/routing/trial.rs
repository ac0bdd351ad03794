//! The crash-loop breaker for a persisted route table: a table that made the agent crash is
//! never loaded again at boot.
//!
//! A pushed table is persisted before it is served, so a table that crashes the agent (the
//! release build aborts on a panic) would otherwise be served again at every start, until
//! systemd gives up on the unit. So a persisted table is *on trial* until the agent has run
//! with it for [`TRIAL_PERIOD`] or stopped cleanly: a marker beside it (`<table>.trial`,
//! `{"boots": N, "nonce": …}`) counts the runs that began serving it without confirming it. A
//! run that ends by crashing (abort, SIGKILL from the watchdog) leaves the marker behind; a boot
//! that finds [`MAX_UNCONFIRMED_RUNS`] of them moves the table aside (`<table>.quarantined`) and
//! boots without it, loudly (journal, `/status`, `tunnel_agent_routes_quarantined_total`).
//!
//! The marker is confirmed (removed) when the [`Trial`] is dropped: by its timer task after the
//! trial period, or when the runtime drops that task at a clean exit. A crash never runs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the agent must run with a table before the table counts as safe.
pub const TRIAL_PERIOD: Duration = Duration::from_secs(60);

/// Runs that began serving a table and neither confirmed it nor stopped cleanly, after which
/// the next boot quarantines it: two crashes, so one unlucky kill does not cost the table.
pub const MAX_UNCONFIRMED_RUNS: u32 = 2;

/// What the marker file holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    /// Runs that began serving the table without confirming it (this one included).
    boots: u32,
    /// Which trial wrote it: an older trial's timer must not confirm a newer table.
    nonce: u64,
}

/// One run's trial of the persisted table. Dropping it confirms the table.
#[derive(Debug)]
pub struct Trial {
    marker: PathBuf,
    nonce: u64,
}

/// What a boot does with a persisted table.
#[derive(Debug)]
pub enum AtBoot {
    /// Serve it; the trial is confirmed when dropped.
    Serve(Trial),
    /// It crashed the agent [`MAX_UNCONFIRMED_RUNS`] times: moved to `to`.
    Quarantined { to: PathBuf, runs: u32 },
}

fn marker_path(table: &Path) -> PathBuf {
    let mut name = table.file_name().unwrap_or_default().to_os_string();
    name.push(".trial");
    table.with_file_name(name)
}

/// Where a quarantined table is moved (a later quarantine replaces it).
pub fn quarantine_path(table: &Path) -> PathBuf {
    let mut name = table.file_name().unwrap_or_default().to_os_string();
    name.push(".quarantined");
    table.with_file_name(name)
}

/// The number of unconfirmed runs the marker records; 0 without a marker. An unreadable marker
/// counts as the worst case short of quarantine: it was written by a run that did not confirm.
fn unconfirmed_runs(marker: &Path) -> u32 {
    match std::fs::read(marker) {
        Ok(bytes) => serde_json::from_slice::<Marker>(&bytes).map_or(1, |m| m.boots),
        Err(_) => 0,
    }
}

impl Trial {
    /// Starts the trial of `table` for this run: `runs` unconfirmed runs, this one included.
    fn write(table: &Path, runs: u32) -> std::io::Result<Trial> {
        let trial = Trial {
            marker: marker_path(table),
            nonce: crate::random::random_u64(),
        };
        let marker = Marker {
            boots: runs,
            nonce: trial.nonce,
        };
        let bytes = serde_json::to_vec(&marker).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&trial.marker, &bytes, 0o600)?;
        Ok(trial)
    }

    /// A table just persisted, about to be served for the first time.
    pub fn begin(table: &Path) -> std::io::Result<Trial> {
        Trial::write(table, 1)
    }

    /// Confirms the table after [`TRIAL_PERIOD`] (or at a clean exit, when the runtime drops
    /// the task), in a task of its own.
    pub fn confirm_later(self) {
        tokio::spawn(async move {
            tokio::time::sleep(TRIAL_PERIOD).await;
            drop(self);
        });
    }
}

impl Drop for Trial {
    fn drop(&mut self) {
        let ours = std::fs::read(&self.marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
            .is_some_and(|m| m.nonce == self.nonce);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.marker) {
                tracing::warn!(path = %self.marker.display(), error = %e, "cannot confirm the persisted route table ({}): {e}", self.marker.display());
            }
        }
    }
}

/// Decides, at boot, whether the persisted `table` (which exists) may be served: quarantines it
/// after [`MAX_UNCONFIRMED_RUNS`] runs that did not confirm it, else counts this run.
pub fn at_boot(table: &Path) -> std::io::Result<AtBoot> {
    let marker = marker_path(table);
    let runs = unconfirmed_runs(&marker);
    if runs >= MAX_UNCONFIRMED_RUNS {
        let to = quarantine_path(table);
        std::fs::rename(table, &to)?;
        std::fs::remove_file(&marker)?;
        return Ok(AtBoot::Quarantined { to, runs });
    }
    Ok(AtBoot::Serve(Trial::write(table, runs.saturating_add(1))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_in(dir: &tempfile::TempDir) -> PathBuf {
        let table = dir.path().join("config-api.json");
        std::fs::write(&table, b"{}").unwrap();
        table
    }

    #[test]
    fn a_run_that_ends_cleanly_confirms_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let table = table_in(&dir);
        for _ in 0..5 {
            let AtBoot::Serve(trial) = at_boot(&table).unwrap() else {
                panic!("a confirmed table is served")
            };
            assert!(marker_path(&table).exists(), "on trial while running");
            drop(trial);
            assert!(!marker_path(&table).exists(), "confirmed");
        }
    }

    #[test]
    fn two_runs_that_crashed_quarantine_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let table = table_in(&dir);
        // A crash never drops the trial: forget it as an abort would.
        std::mem::forget(Trial::begin(&table).unwrap());
        let AtBoot::Serve(t) = at_boot(&table).unwrap() else {
            panic!("one crash is not enough")
        };
        std::mem::forget(t);
        let AtBoot::Quarantined { to, runs } = at_boot(&table).unwrap() else {
            panic!("two crashes quarantine it")
        };
        assert_eq!(runs, 2);
        assert!(!table.exists() && to.exists() && !marker_path(&table).exists());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_serves_the_table_for_the_trial_period_confirms_it() {
        let dir = tempfile::tempdir().unwrap();
        let table = table_in(&dir);
        Trial::begin(&table).unwrap().confirm_later();
        tokio::time::sleep(TRIAL_PERIOD - Duration::from_secs(1)).await;
        assert!(marker_path(&table).exists(), "still on trial");
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(!marker_path(&table).exists(), "confirmed after the trial period");
    }

    #[test]
    fn an_older_trial_does_not_confirm_a_newer_table() {
        let dir = tempfile::tempdir().unwrap();
        let table = table_in(&dir);
        let old = Trial::begin(&table).unwrap();
        let new = Trial::begin(&table).unwrap();
        drop(old);
        assert!(marker_path(&table).exists(), "the newer table is still on trial");
        drop(new);
        assert!(!marker_path(&table).exists());
    }
}
