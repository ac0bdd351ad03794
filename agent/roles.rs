//! Active / standby (seed 002): only the active node runs cloudflared; a standby keeps secrets,
//! routes and the proxy warm so promotion only has to start cloudflared.
//!
//! Where the role comes from, highest precedence first:
//! 1. a watched GCE metadata attribute naming the active host (`[role_watch]`), when configured.
//!    It is authoritative: one value names one host, so two hosts cannot both be active through
//!    it, and manual `promote`/`demote` are refused rather than fight it;
//! 2. `[role_election]` (a leader election on etcd, see `election`) and `[role_follow]` (a local
//!    health check), when configured; with both, the check gates the election. They cannot be
//!    combined with 1 (`check` refuses it); `promote`/`demote` become handover requests;
//! 3. `tunnel-agent promote|demote` (the control socket), persisted in the state dir so a restart
//!    or crash keeps it;
//! 4. `role` in the config file. A persisted manual role is dropped when the config's `role`
//!    changed since it was persisted: the operator's newer edit wins.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::gcp::{MetadataClient, MetadataError, Watched};

/// The role itself is part of the config schema (`role = "active"`).
pub use crate::config::Role;

/// Why the node has its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleSource {
    Config,
    /// `promote`/`demote` in this run.
    Cli,
    /// `promote`/`demote` in an earlier run, read back from the state dir.
    Persisted,
    WatchedAttribute,
    /// The leader election on etcd (`[role_election]`).
    Election,
    /// The local health check (`[role_follow]`) without an election.
    Follow,
}

impl RoleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleSource::Config => "config",
            RoleSource::Cli => "cli",
            RoleSource::Persisted => "persisted",
            RoleSource::WatchedAttribute => "watched-attribute",
            RoleSource::Election => "election",
            RoleSource::Follow => "follow",
        }
    }
}

/// What is kept in `<state_dir>/role.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedRole {
    pub role: Role,
    pub source: RoleSource,
    /// The config file's `role` when this was written, to notice a later edit.
    pub config_role: Role,
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("role.json")
}

pub fn load_persisted(state_dir: &Path) -> Option<PersistedRole> {
    let bytes = std::fs::read(state_path(state_dir)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, path = %state_path(state_dir).display(), "ignoring unreadable persisted role {}: {e}", state_path(state_dir).display());
            None
        }
    }
}

pub fn persist(state_dir: &Path, p: &PersistedRole) -> std::io::Result<()> {
    let data = serde_json::to_vec(p).map_err(std::io::Error::other)?;
    crate::files::write_atomic(&state_path(state_dir), &data, 0o600)
}

/// The role at boot, before any watched attribute answered.
pub fn initial(config: &Config) -> (Role, RoleSource) {
    initial_with(config, load_persisted(&config.agent.state_dir))
}

fn initial_with(config: &Config, persisted: Option<PersistedRole>) -> (Role, RoleSource) {
    match persisted {
        // Only promote/demote is persisted; a file from an older version may hold another
        // source's role, which is not trusted after a restart.
        Some(p) if p.config_role == config.role && p.source == RoleSource::Cli => (p.role, RoleSource::Persisted),
        _ => (config.role, RoleSource::Config),
    }
}

/// The role this start begins in and why, for the first log line: what the boot will decide
/// before asking anything remote (a watched attribute is read later in the boot, and is named
/// instead). Quiet: the boot reads the persisted role again and warns about a bad file then.
pub fn starting(config: &Config) -> (Role, RoleSource, String) {
    if config.role_election.is_some() {
        return (Role::Standby, RoleSource::Election, "standby until elected".to_owned());
    }
    if config.role_follow.is_some() {
        let why = "standby until the role_follow check passes".to_owned();
        return (Role::Standby, RoleSource::Follow, why);
    }
    if let Some(path) = attribute_path(config) {
        let why = format!("from the metadata attribute {path}, standby until it answers");
        return (Role::Standby, RoleSource::WatchedAttribute, why);
    }
    let persisted = std::fs::read(state_path(&config.agent.state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (role, source) = initial_with(config, persisted);
    let why = match (source, role) {
        (RoleSource::Persisted, Role::Active) => "active, kept from an earlier promote",
        (RoleSource::Persisted, Role::Standby) => "standby, kept from an earlier demote",
        (_, Role::Active) => "active, as configured",
        (_, Role::Standby) => "standby, as configured",
    };
    (role, source, why.to_owned())
}

/// The role the watched attribute's value gives this host.
pub fn role_for(value: &str, host_name: &str) -> Role {
    let value = value.trim();
    // An empty value names nobody, even a host whose name could not be determined.
    if !value.is_empty() && value.eq_ignore_ascii_case(host_name.trim()) {
        Role::Active
    } else {
        Role::Standby
    }
}

/// This host's name for comparison with the attribute: configured, else the kernel's hostname.
pub fn host_name(config: &Config) -> String {
    config
        .role_watch
        .host_name
        .clone()
        .or_else(|| nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_default()
}

fn attribute_path(config: &Config) -> Option<String> {
    let attribute = config.role_watch.attribute.as_deref()?;
    Some(format!("{}/{attribute}", config.role_watch.attribute_scope.path()))
}

/// The role at boot. With a watched attribute, it is read first (so a node never starts
/// cloudflared on a stale belief); when the metadata server cannot answer, standby: whatever the
/// attribute said before this start may have moved to another host since, and never two
/// actives beats availability. The watch follows the attribute once it answers. Returns the
/// attribute's ETag for the watch.
pub async fn boot_role(config: &Config, metadata: &MetadataClient) -> (Role, RoleSource, Option<String>) {
    let Some(path) = attribute_path(config) else {
        let (role, source) = initial(config);
        return (role, source, None);
    };
    match metadata.get(&path, &[]).await {
        Ok((value, etag)) => (role_for(&value, &host_name(config)), RoleSource::WatchedAttribute, etag),
        Err(MetadataError::Status { status: 404, .. }) => (Role::Standby, RoleSource::WatchedAttribute, None),
        Err(e) => {
            tracing::warn!(error = %e, attribute = %path, "cannot read the role attribute {path} at boot ({e}); standby until it answers");
            (Role::Standby, RoleSource::WatchedAttribute, None)
        }
    }
}

/// Long-polls the role attribute; sends the role it gives this host whenever the value changes.
pub fn watch(
    config: &Config,
    metadata: MetadataClient,
    etag: Option<String>,
    tx: mpsc::Sender<Role>,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = attribute_path(config)?;
    let me = host_name(config);
    let mut watch = metadata.watch_attribute(path, etag, "role watch failed; keeping the current role");
    Some(tokio::spawn(async move {
        loop {
            let role = match watch.next().await {
                Watched::Changed(value) => {
                    let role = role_for(&value, &me);
                    tracing::info!(attribute = %watch.path(), value = %value.trim(), host = %me, role = role.as_str(), "role attribute {} names {:?}; this host ({me}) is {}", watch.path(), value.trim(), role.as_str());
                    role
                }
                // No attribute: nobody is named active.
                Watched::Missing { .. } => {
                    tracing::warn!(attribute = %watch.path(), "role attribute {} missing; this host is standby", watch.path());
                    Role::Standby
                }
            };
            if tx.send(role).await.is_err() {
                return;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_names_one_host() {
        assert_eq!(role_for("chi-02\n", "chi-02"), Role::Active);
        assert_eq!(role_for("CHI-02", "chi-02"), Role::Active);
        assert_eq!(role_for("dal-01", "chi-02"), Role::Standby);
        assert_eq!(role_for("", "chi-02"), Role::Standby);
        assert_eq!(role_for("", ""), Role::Standby);
        assert_eq!(role_for("  ", " "), Role::Standby);
    }

    #[test]
    fn persisted_role_survives_unless_config_changed() {
        let dir = std::env::temp_dir().join(format!("ta-roles-{}", std::process::id()));
        let mut config = Config::default();
        config.agent.state_dir = dir.clone();
        config.role = Role::Standby;
        assert_eq!(initial(&config), (Role::Standby, RoleSource::Config));
        persist(
            &dir,
            &PersistedRole {
                role: Role::Active,
                source: RoleSource::Cli,
                config_role: Role::Standby,
            },
        )
        .unwrap();
        assert_eq!(initial(&config), (Role::Active, RoleSource::Persisted));
        config.role = Role::Active;
        assert_eq!(initial(&config), (Role::Active, RoleSource::Config));
        // Another source's role (an older version wrote the watched attribute's) is not trusted.
        config.role = Role::Standby;
        persist(
            &dir,
            &PersistedRole {
                role: Role::Active,
                source: RoleSource::WatchedAttribute,
                config_role: Role::Standby,
            },
        )
        .unwrap();
        assert_eq!(initial(&config), (Role::Standby, RoleSource::Config));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
