//! The role a start begins in, and the one role kept across starts (`<state_dir>/role.json`).
//!
//! One decision, [`plan`], serves both the first log line (`main.rs`, before anything remote is
//! asked) and the boot ([`boot`], which then asks the metadata server when the plan says so).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::watch::{attribute_path, host_name, role_for};
use super::{Role, RoleSource};
use crate::config::Config;
use crate::gcp::{MetadataClient, MetadataError};

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

/// Whether a bad `role.json` is worth a warning (the boot) or only ignored (the first log line,
/// which runs before the boot reads it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreadable {
    Warn,
    Ignore,
}

fn load_persisted(state_dir: &Path, unreadable: Unreadable) -> Option<PersistedRole> {
    let path = state_path(state_dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(p) => Some(p),
        Err(e) => {
            if unreadable == Unreadable::Warn {
                tracing::warn!(error = %e, path = %path.display(), "ignoring unreadable persisted role {}: {e}", path.display());
            }
            None
        }
    }
}

pub fn persist(state_dir: &Path, p: &PersistedRole) -> std::io::Result<()> {
    let data = serde_json::to_vec(p).map_err(std::io::Error::other)?;
    crate::files::write_atomic(&state_path(state_dir), &data, 0o600)
}

/// Drops the kept role: the file's `role` decides again.
pub fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(state_path(state_dir));
}

/// Where a start takes its role from, highest precedence first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// `[role_election]`: standby until elected, whatever the file or a persisted promote says.
    UntilElected,
    /// `[role_follow]` alone: standby until the check has passed `rise` times.
    UntilCheckPasses,
    /// `[role_watch]`: the metadata attribute at this path names the active host.
    Attribute(String),
    /// The config file's `role`, or a `promote`/`demote` kept from an earlier run.
    Local { role: Role, source: RoleSource },
}

/// The decision itself, pure: `persisted` is what `role.json` held.
pub fn plan(config: &Config, persisted: Option<PersistedRole>) -> Plan {
    if config.role_election.is_some() {
        return Plan::UntilElected;
    }
    if config.role_follow.is_some() {
        return Plan::UntilCheckPasses;
    }
    if let Some(path) = attribute_path(config) {
        return Plan::Attribute(path);
    }
    match persisted {
        // Only promote/demote is persisted; a file from an older version may hold another
        // source's role, which is not trusted after a restart. An edit of the file's `role`
        // since then wins.
        Some(p) if p.config_role == config.role && p.source == RoleSource::Cli => Plan::Local {
            role: p.role,
            source: RoleSource::Persisted,
        },
        _ => Plan::Local {
            role: config.role,
            source: RoleSource::Config,
        },
    }
}

impl Plan {
    /// The role before anything remote answered: standby for every remote source.
    pub fn role(&self) -> Role {
        match self {
            Plan::Local { role, .. } => *role,
            _ => Role::Standby,
        }
    }

    pub fn source(&self) -> RoleSource {
        match self {
            Plan::UntilElected => RoleSource::Election,
            Plan::UntilCheckPasses => RoleSource::Follow,
            Plan::Attribute(_) => RoleSource::WatchedAttribute,
            Plan::Local { source, .. } => *source,
        }
    }

    /// Why, for the first log line.
    pub fn why(&self) -> String {
        match self {
            Plan::UntilElected => "standby until elected".to_owned(),
            Plan::UntilCheckPasses => "standby until the role_follow check passes".to_owned(),
            Plan::Attribute(path) => format!("from the metadata attribute {path}, standby until it answers"),
            Plan::Local { role, source } => match (source, role) {
                (RoleSource::Persisted, Role::Active) => "active, kept from an earlier promote",
                (RoleSource::Persisted, Role::Standby) => "standby, kept from an earlier demote",
                (_, Role::Active) => "active, as configured",
                (_, Role::Standby) => "standby, as configured",
            }
            .to_owned(),
        }
    }
}

/// The plan for the first log line of a start: what the boot will decide before asking anything
/// remote. Quiet: the boot reads the persisted role again and warns about a bad file then.
pub fn starting(config: &Config) -> Plan {
    plan(config, load_persisted(&config.agent.state_dir, Unreadable::Ignore))
}

/// The role the boot begins in, and the attribute's ETag for the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub role: Role,
    pub source: RoleSource,
    pub etag: Option<String>,
}

/// The role at boot. With a watched attribute, it is read first (so a node never starts
/// cloudflared on a stale belief); when the metadata server cannot answer, standby: whatever the
/// attribute said before this start may have moved to another host since, and never two
/// actives beats availability. The watch follows the attribute once it answers.
pub async fn boot(config: &Config, metadata: &MetadataClient) -> Boot {
    let plan = plan(config, load_persisted(&config.agent.state_dir, Unreadable::Warn));
    let (role, source) = (plan.role(), plan.source());
    let Plan::Attribute(path) = plan else {
        return Boot {
            role,
            source,
            etag: None,
        };
    };
    match metadata.get(&path, &[]).await {
        Ok((value, etag)) => Boot {
            role: role_for(&value, &host_name(config)),
            source,
            etag,
        },
        Err(MetadataError::Status { status: 404, .. }) => Boot {
            role,
            source,
            etag: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, attribute = %path, "cannot read the role attribute {path} at boot ({e}); standby until it answers");
            Boot {
                role,
                source,
                etag: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(role: Role, source: RoleSource, config_role: Role) -> Option<PersistedRole> {
        Some(PersistedRole {
            role,
            source,
            config_role,
        })
    }

    #[test]
    fn persisted_role_survives_unless_config_changed() {
        let dir = std::env::temp_dir().join(format!("ta-roles-{}", std::process::id()));
        let mut config = Config::default();
        config.agent.state_dir = dir.clone();
        config.role = Role::Standby;
        let initial = |c: &Config| {
            let p = plan(c, load_persisted(&c.agent.state_dir, Unreadable::Warn));
            (p.role(), p.source())
        };
        assert_eq!(initial(&config), (Role::Standby, RoleSource::Config));
        let cli = PersistedRole {
            role: Role::Active,
            source: RoleSource::Cli,
            config_role: Role::Standby,
        };
        persist(&dir, &cli).unwrap();
        assert_eq!(initial(&config), (Role::Active, RoleSource::Persisted));
        config.role = Role::Active;
        assert_eq!(initial(&config), (Role::Active, RoleSource::Config));
        // Another source's role (an older version wrote the watched attribute's) is not trusted.
        config.role = Role::Standby;
        let watched = PersistedRole {
            source: RoleSource::WatchedAttribute,
            ..cli
        };
        persist(&dir, &watched).unwrap();
        assert_eq!(initial(&config), (Role::Standby, RoleSource::Config));
        forget(&dir);
        assert_eq!(load_persisted(&dir, Unreadable::Warn), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn each_source_gives_its_starting_role() {
        let mut config = Config::default();
        config.role = Role::Active;
        let promoted = kept(Role::Active, RoleSource::Cli, Role::Standby);
        // The file alone, and a promote kept from an earlier run of the same file.
        assert_eq!(
            plan(&config, None),
            Plan::Local {
                role: Role::Active,
                source: RoleSource::Config
            }
        );
        assert_eq!(plan(&config, None).why(), "active, as configured");
        config.role = Role::Standby;
        let p = plan(&config, promoted.clone());
        assert_eq!((p.role(), p.source()), (Role::Active, RoleSource::Persisted));
        assert_eq!(p.why(), "active, kept from an earlier promote");
        let demoted = kept(Role::Standby, RoleSource::Cli, Role::Active);
        config.role = Role::Active;
        assert_eq!(plan(&config, demoted).why(), "standby, kept from an earlier demote");
        // A watched attribute outranks a persisted promote; the node waits for it as standby.
        config.role = Role::Standby;
        config.role_watch.attribute = Some("tunnel-active".to_owned());
        let p = plan(&config, promoted.clone());
        assert!(
            matches!(&p, Plan::Attribute(path) if path.ends_with("/tunnel-active")),
            "{p:?}"
        );
        assert_eq!((p.role(), p.source()), (Role::Standby, RoleSource::WatchedAttribute));
        // The check and the election outrank both; with both, the election names the source.
        config.role_follow = Some(Default::default());
        assert_eq!(plan(&config, promoted.clone()), Plan::UntilCheckPasses);
        assert_eq!(Plan::UntilCheckPasses.role(), Role::Standby);
        config.role_election = Some(Default::default());
        let p = plan(&config, promoted);
        assert_eq!((p.role(), p.source()), (Role::Standby, RoleSource::Election));
        assert_eq!(p.why(), "standby until elected");
    }
}
