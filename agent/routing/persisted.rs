//! The last applied push, kept in `agent.state_dir/config-api.json` (`config_api.persist`): the
//! controller pushes on change, not on our restart, so without it a restarted agent would answer
//! 404 until the next HTTPRoute edit. It is written before the push is applied, read back at
//! boot through its trial ([`trial`]), and compiled again under the settings of a reload.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::config::{Config, Problem};
use crate::routing::config_api::PushedConfig;
use crate::routing::table::{RouteTable, RoutesError};
use crate::routing::trial;
use crate::telemetry::Metrics;

/// File in the state dir holding the last applied push.
const STATE_FILE: &str = "config-api.json";

/// Why the persisted push cannot serve after a reload: the table in use keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum PersistedError {
    #[error("cannot read the persisted config {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    /// The file is not a push (any more); the problem names its key.
    #[error("{}: {}", .0.key, .0.reason)]
    Invalid(Problem),
    #[error("the pushed table in use (version {version}) does not compile under the reloaded settings: {error}")]
    Recompile { version: u64, error: RoutesError },
}

fn state_path(config: &Config) -> Option<PathBuf> {
    let persist = config.config_api.as_ref().is_some_and(|a| a.persist);
    persist.then(|| config.agent.state_dir.join(STATE_FILE))
}

/// The table persisted by the last push, if any, read without side effects (`check`). An
/// unreadable or no longer valid file is logged and ignored: the agent then waits for a push,
/// as on first boot.
pub fn load_persisted(config: &Config, metrics: &Metrics) -> RouteTable {
    let Some(path) = state_path(config) else {
        return RouteTable::default();
    };
    read_persisted(&path, config, metrics).unwrap_or_default()
}

/// The persisted push at boot, through its trial ([`trial`]): the table to serve and, when the
/// persisted one is not served, why (shown in `/status` as `routes_fallback`). Never an error:
/// a persisted table that cannot be served must not keep the agent down, it waits for a push.
pub fn boot_persisted(config: &Config, metrics: &Metrics) -> (RouteTable, Option<String>) {
    let Some(path) = state_path(config) else {
        return (RouteTable::default(), None);
    };
    if !path.exists() {
        return (RouteTable::default(), None);
    }
    match trial::at_boot(&path) {
        Ok(trial::AtBoot::Serve(trial)) => trial.confirm_later(),
        Ok(trial::AtBoot::Quarantined { to, runs }) => {
            metrics.routes_quarantined.inc();
            let why = format!(
                "the persisted config {} was being served by {runs} runs that ended without confirming it (crashed); moved to {} and not loaded; waiting for a push",
                path.display(),
                to.display()
            );
            tracing::error!(path = %path.display(), quarantined = %to.display(), runs, "{why}");
            return (RouteTable::default(), Some(why));
        }
        Err(e) => {
            let why = format!(
                "cannot record the trial of the persisted config {} ({e}); not loaded, so that a table that crashes cannot crash every start; waiting for a push",
                path.display()
            );
            tracing::error!(path = %path.display(), error = %e, "{why}");
            return (RouteTable::default(), Some(why));
        }
    }
    match read_persisted(&path, config, metrics) {
        Some(table) => (table, None),
        None => (
            RouteTable::default(),
            Some(format!(
                "the persisted config {} is unreadable or no longer valid (see the log); waiting for a push",
                path.display()
            )),
        ),
    }
}

/// Reads and compiles the persisted push at `path`; `None` (logged) when it is missing,
/// unreadable or no longer valid.
fn read_persisted(path: &Path, config: &Config, metrics: &Metrics) -> Option<RouteTable> {
    let body = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the persisted config {}; waiting for a push: {e}", path.display());
            return None;
        }
    };
    let compiled = PushedConfig::parse(&body)
        .map_err(|p| format!("{}: {}", p.key, p.reason))
        .and_then(|c| c.compile(config, metrics).map_err(|e| e.to_string()));
    match compiled {
        Ok(table) => {
            tracing::info!(path = %path.display(), version = table.version, rules = table.len(), "serving the persisted config {} (version {}, {} rules) until the next push", path.display(), table.version.unwrap_or(0), table.len());
            Some(table)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "persisted config {} is no longer valid; waiting for a push: {e}", path.display());
            None
        }
    }
}

/// The persisted push compiled again under `config` (a reload): `Ok(None)` when nothing is
/// persisted (`persist = false`, or no push yet), an error when it no longer compiles, so the
/// reload is refused and the table in use keeps serving. Then backends' default anchors and
/// the destination rule follow the reloaded settings, as for any other source.
pub fn recompile_persisted(config: &Config, metrics: &Metrics) -> Result<Option<RouteTable>, PersistedError> {
    let Some(path) = state_path(config) else {
        return Ok(None);
    };
    let body = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(PersistedError::Read { path, error }),
    };
    let pushed = PushedConfig::parse(&body).map_err(PersistedError::Invalid)?;
    pushed
        .compile(config, metrics)
        .map(Some)
        .map_err(|error| PersistedError::Recompile {
            version: pushed.version,
            error,
        })
}

/// Writes an accepted push's body where [`boot_persisted`] reads it back, on trial until this
/// run has served it for [`trial::TRIAL_PERIOD`]. Called by the node before it applies the
/// push: a push that cannot be persisted is not applied.
pub async fn persist(config: &Config, body: Bytes) -> std::io::Result<()> {
    let Some(path) = state_path(config) else {
        return Ok(());
    };
    let trial = tokio::task::spawn_blocking(move || {
        crate::files::write_atomic(&path, &body, 0o600)?;
        trial::Trial::begin(&path)
    })
    .await
    .map_err(std::io::Error::other)??;
    trial.confirm_later();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(state_dir: &Path, allow_link_local: bool) -> Config {
        let text = format!(
            r#"
            [agent]
            state_dir = "{}"
            [secrets.token]
            source = "env"
            var = "TOKEN"
            [routes]
            source = "config-api"
            [config_api]
            auth_secret = "token"
            [proxy]
            allow_link_local_upstreams = {allow_link_local}
            "#,
            state_dir.display()
        );
        crate::routing::parse_config(Path::new("t.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A reload recompiles the persisted push under the new settings; what no longer compiles
    /// refuses the reload, saying which version and why.
    #[test]
    fn the_persisted_push_is_recompiled_under_the_reloaded_settings() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::default();
        let before = config(dir.path(), true);
        let none = recompile_persisted(&before, &metrics).expect("nothing persisted yet");
        assert!(none.is_none());

        let push = r#"{"version": 4, "rules": [{"hostnames": ["m.example.com"], "backends": [{"url": "http://169.254.169.254"}]}]}"#;
        std::fs::write(dir.path().join(STATE_FILE), push).unwrap();
        let table = recompile_persisted(&before, &metrics)
            .expect("compiles")
            .expect("persisted");
        assert_eq!(table.version, Some(4));

        let after = config(dir.path(), false);
        let err = recompile_persisted(&after, &metrics).expect_err("a link-local backend, no longer allowed");
        let PersistedError::Recompile { version: 4, error } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(error.problems[0].key, "rules[0].backends[0].url", "{err}");
        assert!(
            err.to_string()
                .starts_with("the pushed table in use (version 4) does not compile under the reloaded settings: rules[0].backends[0].url: "),
            "{err}"
        );

        std::fs::write(dir.path().join(STATE_FILE), "[4, []]").unwrap();
        let err = recompile_persisted(&after, &metrics).expect_err("not a push");
        assert!(
            matches!(&err, PersistedError::Invalid(p) if p.key == "(body)"),
            "{err:?}"
        );
    }

    /// A push that cannot be written is not applied: the node answers 500 with this error.
    #[tokio::test]
    async fn a_push_that_cannot_be_written_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "").unwrap();
        let err = persist(&config(&not_a_dir, false), Bytes::from_static(b"{}"))
            .await
            .expect_err("the state dir is a file");
        assert!(!err.to_string().is_empty());
        persist(&config(dir.path(), false), Bytes::from_static(b"{}"))
            .await
            .expect("written");
        assert_eq!(std::fs::read(dir.path().join(STATE_FILE)).unwrap(), b"{}");
    }
}
