//! The node's part of an upgrade in place: the preflight when asked (`tunnel-agent upgrade`,
//! SIGUSR2), and, once it passed and the loop ended, what the node hands the next image.
//! `boot` does the rest (drain, state, exec; `crate::handover`).

use crate::control;
use crate::handover::state::{CarriedSecrets, NodeState};
use crate::handover::{self, preflight, Plan};
use crate::role::Answer;
use crate::systemd;
use crate::tunnel::{RestartPolicy, TunnelSupervisor};

use super::Node;

impl Node {
    /// The preflight of an upgrade: the new binary (the file at the path this process was
    /// started from) must take our state and accept the configuration. Refused: recorded in
    /// `/status`, the metric and the journal, nothing changed.
    pub(super) async fn upgrade_requested(&mut self) -> (Answer, Option<Plan>) {
        let binary = self.binary.clone();
        tracing::info!(binary = %binary.display(), "upgrade requested: checking {}", binary.display());
        systemd::status(&format!("serving; checking {} for an upgrade", binary.display()));
        let from_env = crate::config::env::active().is_some();
        match preflight::check(&binary, &self.config_path, from_env).await {
            Ok(plan) => {
                let from = crate::build_info::LONG_VERSION;
                tracing::info!(from, to = %plan.to, "upgrading in place: {from} -> {}", plan.to);
                let answer = Answer {
                    ok: true,
                    changed: true,
                    message: format!("re-executing in place: {from} -> {}", plan.to),
                };
                (answer, Some(plan))
            }
            Err(why) => {
                handover::refused(&self.health, &binary.display().to_string(), &why);
                systemd::status(&format!("serving; upgrade refused: {why}"));
                (Answer::refused(format!("upgrade refused: {why}")), None)
            }
        }
    }

    /// The loop has ended for an upgrade and the listeners have drained: stops what must not run
    /// on (the secret refreshers; the next image starts its own) and says what the next image
    /// takes over. The election first (its last renewal gives the next image the most time; a
    /// fence after the tunnel's detach would find no cloudflared to stop), then cloudflared.
    /// An election that cannot be detached (its task ended) is carried as none: the next image
    /// starts it afresh, as a follower, fenced.
    pub async fn hand_over(&mut self) -> NodeState {
        for t in self.refreshers.drain(..) {
            t.abort();
        }
        let election = match self.roles.detach_election().await {
            Ok(carried) => carried,
            Err(e) => {
                tracing::error!(error = %e, "cannot hand the election over ({e}); the next image starts it afresh");
                None
            }
        };
        // The supervisor's loop ends without touching cloudflared; an idle one takes its place,
        // which nothing applies a spec to (the node's stop does not run in a hand-over).
        let idle = TunnelSupervisor::start(
            None,
            RestartPolicy::from(&self.config.cloudflared),
            self.tunnel.state.clone(),
        );
        let tunnel = std::mem::replace(&mut self.tunnel, idle).detach().await;
        NodeState {
            binary: self.binary.clone(),
            role: self.roles.role(),
            role_source: self.roles.source(),
            routes_version: *self.routes_version.borrow(),
            secrets: CarriedSecrets::from(&self.secrets),
            tunnel,
            election,
        }
    }

    /// An upgraded image's boot took the adopted cloudflared's version from the carried state
    /// (asking the binary would hold new connections for as long as it takes to answer). Once
    /// ready, the binary on disk, which the next start runs, is asked as a reload asks it.
    pub async fn recheck_cloudflared_version(&mut self) {
        let config = self.config.clone();
        match self.reload_cloudflared_version(&config).await {
            Ok(version) => self.note_cloudflared_version(version, &config.cloudflared.path),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cloudflared on disk: {e:#}"),
        }
    }

    /// A control command that is an upgrade: answered, and the plan when it goes ahead.
    pub(super) async fn control_upgrade(&mut self) -> (control::Reply, Option<Plan>) {
        let (answer, plan) = self.upgrade_requested().await;
        let reply = control::Reply {
            ok: answer.ok,
            changed: answer.changed,
            message: answer.message,
            status: self.health.status(),
        };
        (reply, plan)
    }
}
