//! `[role_watch]`: a GCE metadata attribute names the active host. It is authoritative: one
//! value names one host, so two hosts cannot both be active through it, and manual
//! `promote`/`demote` are refused rather than fight it.

use tokio::sync::mpsc;

use super::Role;
use crate::config::Config;
use crate::gcp::{MetadataClient, Watched};

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

/// The attribute's metadata path, when `[role_watch]` names one.
pub fn attribute_path(config: &Config) -> Option<String> {
    let attribute = config.role_watch.attribute.as_deref()?;
    Some(format!("{}/{attribute}", config.role_watch.attribute_scope.path()))
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
}
