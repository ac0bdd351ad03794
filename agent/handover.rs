//! The node's side of the election: applying its outcomes through the one role path, and
//! `promote`/`demote` as handover requests. An `impl Node` kept beside the election rather than in
//! node.rs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::Config;
use crate::election::{self, etcd, Election, Outcome};
use crate::health::Health;
use crate::node::Node;
use crate::roles::{Role, RoleSource};
use crate::secrets::SecretValues;
use crate::tunnel::TunnelState;

/// Builds the etcd client and starts the election, if `[role_election]` is configured. The
/// node is standby until the election says otherwise (also when etcd cannot be reached).
pub fn start(
    config: &Config,
    secrets: &SecretValues,
    health: &Arc<Health>,
    tunnel: &Arc<TunnelState>,
    outcomes: tokio::sync::mpsc::Sender<Outcome>,
    gated: bool,
) -> anyhow::Result<Option<(Election, tokio::task::JoinHandle<()>)>> {
    let Some(section) = &config.role_election else {
        return Ok(None);
    };
    let read = |key: &str, path: &Option<std::path::PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("role_election.{key}: cannot read {}: {e}", p.display()))
            })
            .transpose()
    };
    let identity = match (
        read("cert_file", &section.cert_file)?,
        read("key_file", &section.key_file)?,
    ) {
        (Some(mut cert), Some(key)) => {
            cert.push(b'\n');
            cert.extend_from_slice(&key);
            Some(cert)
        }
        _ => None,
    };
    let password = match &section.password_secret {
        Some(name) => Some(
            secrets
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("role_election.password_secret: secret {name:?} has no value"))?,
        ),
        None => None,
    };
    let client = etcd::EtcdClient::new(&etcd::EtcdOptions {
        endpoints: section.endpoints.clone(),
        ca_pem: read("ca_file", &section.ca_file)?,
        identity_pem: identity,
        username: section.username.clone(),
        password,
    })
    .map_err(|e| anyhow::anyhow!("role_election: {e}"))?;
    let me = section.host_name.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    });
    anyhow::ensure!(
        !me.is_empty(),
        "role_election.host_name: unset and the kernel hostname is empty"
    );
    let fence: election::Fence = {
        let (health, tunnel) = (health.clone(), tunnel.clone());
        Arc::new(move || {
            health.leaving_active.store(true, Ordering::Release);
            tunnel.fence();
        })
    };
    let settings = election::Settings::from_section(section, me);
    let (election, task) = election::start(settings, client, fence, outcomes, gated);
    health.set_election(election.clone());
    Ok(Some((election, task)))
}

impl Node {
    /// An outcome of the election, applied through the node's role path.
    pub(crate) async fn election_outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Elected { term } => {
                tracing::info!(term, "elected: becoming active (term {term})");
                self.set_role(Role::Active, RoleSource::Election).await;
            }
            Outcome::Deposed { reason } => {
                tracing::warn!(%reason, "no longer the elected leader: becoming standby ({reason})");
                self.set_role(Role::Standby, RoleSource::Election).await;
            }
        }
    }

    /// `promote`/`demote` under an election: handover requests. Returns `(ok, changed, message)`.
    pub(crate) async fn handover(&mut self, election: Election, promote: bool) -> (bool, bool, String) {
        let state = election.state();
        if promote {
            if state.is_leader {
                return (true, false, format!("already active: this node holds {}", state.key));
            }
            if let Some(other) = state.leader.filter(|l| *l != state.me) {
                return (
                    false,
                    false,
                    format!(
                        "refused: {other} holds the election key {}; run `tunnel-agent demote` there to hand over",
                        state.key
                    ),
                );
            }
            return match election.campaign().await {
                Ok(true) => {
                    let (changed, message) = self.set_role(Role::Active, RoleSource::Election).await;
                    (true, changed, format!("won the election for {}; {message}", state.key))
                }
                Ok(false) => (
                    false,
                    false,
                    format!(
                        "refused: {} holds the election key {}; run `tunnel-agent demote` there to hand over",
                        election.state().leader.as_deref().unwrap_or("another node"),
                        state.key
                    ),
                ),
                Err(e) => (false, false, format!("refused: cannot campaign: {e}")),
            };
        }
        if !state.is_leader {
            return (
                true,
                false,
                format!(
                    "already standby; {} holds {}",
                    state.leader.as_deref().unwrap_or("nobody"),
                    state.key
                ),
            );
        }
        // Resign: cloudflared's SIGTERM first (no new requests from here on), then the lease is
        // revoked at once so a standby takes over now; the drain goes on meanwhile.
        self.decide(Role::Standby);
        let revoked = election.resign(true).await;
        let (changed, message) = self.set_role(Role::Standby, RoleSource::Election).await;
        match revoked {
            Ok(()) => (
                true,
                changed,
                format!("resigned the election (lease revoked, this node steps aside until another takes the key or `promote`); {message}"),
            ),
            Err(e) => (true, changed, format!("resigned; {e}; {message}")),
        }
    }

    /// The `[role_follow]` check changed verdict. Alone it decides the role; with an election it
    /// gates the campaign, and a failing check makes the leader resign (fenced first).
    pub(crate) async fn follow_changed(&mut self, passing: bool) {
        let Some(election) = self.election.clone() else {
            let role = if passing { Role::Active } else { Role::Standby };
            self.set_role(role, RoleSource::Follow).await;
            return;
        };
        election.gate(passing).await;
        if !passing && election.state().is_leader {
            tracing::warn!("the role_follow check fails: resigning the election");
            self.decide(Role::Standby);
            if let Err(e) = election.resign(false).await {
                tracing::warn!(error = %e, "resigning the election failed: {e}");
            }
            self.set_role(Role::Standby, RoleSource::Election).await;
        }
    }

    /// SIGTERM on the elected leader: cloudflared's SIGTERM, then the lease revoked at once.
    pub(crate) async fn resign_for_shutdown(&self) {
        let Some(election) = &self.election else { return };
        if election.state().is_leader {
            self.decide(Role::Standby);
            if let Err(e) = election.resign(true).await {
                tracing::warn!(error = %e, "could not resign the election on shutdown: {e}");
            } else {
                tracing::info!("resigned the election on shutdown (lease revoked)");
            }
        }
    }
}
