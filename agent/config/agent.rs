//! `[agent]`: where the agent keeps its files, how it logs, how long boot and shutdown may take.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Volatile files for operators and children (effective `routes.json`, token file, control
    /// socket). systemd's `RuntimeDirectory=` creates it.
    pub runtime_dir: PathBuf,
    /// Files that must survive a reboot (last good route table, persisted role).
    pub state_dir: PathBuf,
    /// How long in-flight proxy requests may take to finish after SIGTERM.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::HOUR }>")]
    pub shutdown_grace: Duration,
    /// How long an upgrade in place lets in-flight proxy requests finish before the exec cuts
    /// them; new connections wait in the kernel's queue meanwhile, so this bounds their wait
    /// too (docs/operations.md, "Upgrading").
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::MINUTE }>")]
    pub upgrade_drain: Duration,
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `tunnel_agent=debug,hyper=info`.
    pub log_level: String,
    /// How long boot may keep retrying transient failures (Secret Manager 429/5xx, metadata
    /// server unreachable) before giving up with an error.
    #[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]
    pub boot_timeout: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            runtime_dir: PathBuf::from("/run/tunnel-agent"),
            state_dir: PathBuf::from("/var/lib/tunnel-agent"),
            shutdown_grace: Duration::from_secs(30),
            upgrade_drain: Duration::from_secs(10),
            log_format: LogFormat::Auto,
            log_level: "info".to_owned(),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is the journal stream, text otherwise.
    Auto,
    Text,
    Json,
    Journald,
}
