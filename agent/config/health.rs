//! `[health]`: the listener of `/ready`, `/status` and `/metrics`.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub listen: SocketAddr,
    /// Who may read `/status` and `/metrics` (the probe paths are open to every client): they
    /// name upstreams, secrets, the election's key, what the node follows.
    pub details_from: DetailsFrom,
}

/// Which clients the health listener shows its details (`/status`, `/metrics`) to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DetailsFrom {
    /// Clients on this host (a loopback source address) only.
    #[default]
    Loopback,
    /// Every client that reaches `health.listen`.
    Anywhere,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 2000)),
            details_from: DetailsFrom::Loopback,
        }
    }
}
