//! What one image hands the next: the carried state, versioned.
//!
//! JSON, written once into a sealed memfd. Fields are added, never repurposed: an older binary
//! (a downgrade, or a rollback) ignores what it does not know, and [`FORMAT`] changes only when a
//! field's meaning does, which the preflight checks before anything stops.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize as _;

use super::listeners;
use crate::health::AgentStatus;
use crate::role::{Role, RoleSource};
use crate::secrets::SecretValues;

/// The state's format. A binary takes over only from a writer of a format it reads
/// ([`FORMATS_READ`]).
pub const FORMAT: u32 = 1;

/// The formats this binary can take over from (the preflight asks the new binary for its list).
pub const FORMATS_READ: &[u32] = &[1];

/// Everything the next image needs to go on where this one stopped.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// `--version` of the image that wrote it.
    pub from: String,
    /// `--version` the new binary gave in its preflight.
    pub to: String,
    /// When the old image stopped accepting connections (CLOCK_MONOTONIC ns): the start of the
    /// time new connections wait in the kernel's queues.
    pub held_since_ns: u64,
    /// The counters and last upgrade `/status` shows, kept across images.
    pub agent: AgentStatus,
    pub listeners: Vec<listeners::Carried>,
    #[serde(flatten)]
    pub node: NodeState,
}

/// What the node hands over (`Node::hand_over`).
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeState {
    /// The binary later upgrades run: the path this process was first started from.
    pub binary: PathBuf,
    pub role: Role,
    pub role_source: RoleSource,
    /// The version of the pushed table in use (`None`: not a pushed table).
    pub routes_version: Option<u64>,
    /// The resolved secrets, so the new image starts without asking Secret Manager (which may be
    /// unreachable just then) and with rotated values, not the boot-time ones.
    pub secrets: CarriedSecrets,
    /// The running cloudflared (its pid, log pipes, supervision state), or the supervisor's
    /// counters when none runs.
    pub tunnel: Option<crate::tunnel::Carried>,
    /// The election's held lease and counters (`None`: no election).
    pub election: Option<crate::election::Carried>,
}

impl State {
    /// Every descriptor number the state names, which must survive the exec.
    pub fn fds(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = self.listeners.iter().map(|l| l.fd).collect();
        fds.extend(self.node.tunnel.iter().flat_map(|t| t.fds()));
        fds
    }
}

/// Secret values on their way through the memfd. Their `Debug` names them only, and the copies
/// are wiped when dropped, as [`crate::secret::Secret`]'s are.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CarriedSecrets(BTreeMap<String, String>);

impl std::fmt::Debug for CarriedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Drop for CarriedSecrets {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

impl From<&SecretValues> for CarriedSecrets {
    fn from(values: &SecretValues) -> Self {
        CarriedSecrets(values.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect())
    }
}

impl CarriedSecrets {
    pub fn values(&self) -> SecretValues {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), crate::secret::Secret::new(v.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_named_not_shown_by_debug() {
        let mut values = SecretValues::new();
        values.insert(
            "tunnel-token".into(),
            crate::secret::Secret::new("eyJhIjoi-very-secret"),
        );
        let carried = CarriedSecrets::from(&values);
        let shown = format!("{carried:?}");
        assert!(shown.contains("tunnel-token"));
        assert!(!shown.contains("very-secret"));
        let back = carried.values();
        assert_eq!(back["tunnel-token"].expose(), "eyJhIjoi-very-secret");
    }
}
