//! Active / standby: only the active node runs cloudflared; a standby keeps secrets, routes and
//! the proxy warm so promotion only has to start cloudflared. The role carries the agent's worst
//! failure (two active nodes), so this module is its one owner: where a start's role comes from
//! ([`start`]), every source of a change, the fence, what is kept across starts, and what is
//! published (`STATUS=`, `/status`).
//!
//! Where the role comes from, highest precedence first:
//! 1. a watched GCE metadata attribute naming the active host (`[role_watch]`, [`watch`]);
//!    `promote`/`demote` are refused rather than fight it;
//! 2. `[role_election]` (a leader election on etcd, see `election`) and `[role_follow]` (a local
//!    health check), when configured; with both, the check gates the election. They cannot be
//!    combined with 1 (`check` refuses it); `promote`/`demote` become handover requests
//!    ([`election`]);
//! 3. `tunnel-agent promote|demote` (the control socket), persisted in the state dir so a restart
//!    or crash keeps it;
//! 4. `role` in the config file (at boot, or changed by a reload). A persisted manual role is
//!    dropped when the config's `role` changed since it was persisted: the operator's newer edit
//!    wins.
//!
//! Every change, whatever its source, takes one path: the node's `set_role` calls
//! [`Roles::change`] (the fence first, then the new state, the counters, `role.json`, `STATUS=`
//! and `/status`), brings cloudflared in line, and answers with the [`Outcome`] of
//! [`Roles::changed`]. Sources only say which [`Change`] they want.

pub mod election;
pub mod start;
pub mod watch;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::Config;
use crate::election::{Election, Phase};
use crate::follow::Follow;
use crate::health::Health;
use crate::systemd;
use crate::telemetry::Metrics;
use crate::tunnel::TunnelState;

/// The role itself is part of the config schema (`role = "active"`); why the node has it sits
/// beside it in the leaf, so `health` can render both.
pub use crate::config::roles::RoleSource;
pub use crate::config::Role;

pub use election::Handover;
pub use start::{starting, Boot, PersistedRole, Plan};
pub use watch::watch;

/// A change a source asks for, applied through the node's one role path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub to: Role,
    pub source: RoleSource,
}

/// What one pass through the role path did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The node already had the role.
    Unchanged(Role),
    /// A promotion on the election's word found the key lost meanwhile (the fence won).
    NotLeader,
    /// The role changed; cloudflared followed within `took`.
    Changed {
        role: Role,
        took: Duration,
        /// `cloudflared.enabled`: whether there was a cloudflared to start or stop.
        cloudflared: bool,
    },
}

impl Outcome {
    pub fn changed(&self) -> bool {
        matches!(self, Outcome::Changed { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Unchanged(role) => write!(f, "already {}; nothing to do", role.as_str()),
            Outcome::NotLeader => f.write_str("not promoted: this node no longer holds the election key"),
            Outcome::Changed {
                role,
                took,
                cloudflared,
            } => {
                let took_ms = took.as_secs_f64() * 1000.0;
                match (role, cloudflared) {
                    (Role::Active, true) => write!(f, "promoted to active; cloudflared started in {took_ms:.1} ms"),
                    (Role::Active, false) => f.write_str("promoted to active (cloudflared is disabled in the config)"),
                    (Role::Standby, _) => write!(
                        f,
                        "demoted to standby; cloudflared stopped in {took_ms:.1} ms, the proxy keeps serving"
                    ),
                }
            }
        }
    }
}

/// The answer to `promote`, `demote` or `status` on the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub ok: bool,
    /// Whether the command changed anything (a promote on an active node does not).
    pub changed: bool,
    pub message: String,
}

impl Answer {
    pub fn refused(message: String) -> Answer {
        Answer {
            ok: false,
            changed: false,
            message,
        }
    }

    pub fn unchanged(message: String) -> Answer {
        Answer {
            ok: true,
            changed: false,
            message,
        }
    }

    /// A command that went through the role path, `prefix` saying what came before it.
    pub fn after(prefix: Option<String>, outcome: &Outcome) -> Answer {
        Answer {
            ok: true,
            changed: outcome.changed(),
            message: match prefix {
                Some(p) => format!("{p}; {outcome}"),
                None => outcome.to_string(),
            },
        }
    }
}

/// What `promote`/`demote` mean under the configured sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manual {
    /// Another source decides and would undo it.
    Refused(String),
    /// A handover request to the election ([`Roles::handover`]).
    Handover,
    /// The operator decides: this change, kept for the next start.
    Direct(Change),
}

/// The fence: what leaving `active` does at the moment of decision, before anything slow.
#[derive(Clone)]
pub struct Fence {
    health: Arc<Health>,
    tunnel: Arc<TunnelState>,
}

impl Fence {
    pub fn new(health: Arc<Health>, tunnel: Arc<TunnelState>) -> Fence {
        Fence { health, tunnel }
    }

    /// Leaving `active` fails `/active` and sends cloudflared its one SIGTERM at once (no new
    /// tunnel requests from here on; the drain of in-flight ones follows); entering it lifts
    /// that fence.
    pub fn decide(&self, role: Role) {
        match role {
            Role::Standby => {
                self.health.leaving_active.store(true, Ordering::Release);
                self.tunnel.fence();
            }
            Role::Active => {
                self.tunnel.release();
                self.health.leaving_active.store(false, Ordering::Release);
            }
        }
    }
}

/// The role's one owner: the current role and its source, the sources that run as tasks (the
/// election, the followed check), the fence and what was last published.
pub struct Roles {
    role: Role,
    source: RoleSource,
    fence: Fence,
    metrics: Arc<Metrics>,
    /// The leader election, when `[role_election]` decides the role.
    election: Option<Election>,
    /// The `[role_follow]` check, when configured.
    follow: Option<Follow>,
    /// The election's and the check's tasks, stopped after the node resigned on shutdown.
    tasks: Vec<JoinHandle<()>>,
    /// The last `STATUS=` role detail published.
    published_detail: String,
}

impl Roles {
    /// The role the boot decided ([`start::boot`]), not yet published.
    pub fn new(boot: &Boot, fence: Fence, metrics: Arc<Metrics>) -> Roles {
        Roles {
            role: boot.role,
            source: boot.source,
            fence,
            metrics,
            election: None,
            follow: None,
            tasks: Vec::new(),
            published_detail: String::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn source(&self) -> RoleSource {
        self.source
    }

    /// `status` on the control socket.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.role.as_str(), self.source.as_str())
    }

    /// Under an election, `STATUS=` follows its state (unreachable, follower of X, leader) on a
    /// timer.
    pub fn wants_status_tick(&self) -> bool {
        self.election.is_some()
    }

    /// The first half of the one role path: the fence, the new state, the counters, what is kept
    /// for the next start, and what is published. `Err` answers at once (nothing changed);
    /// `Ok` means the role changed and cloudflared must follow, then [`Roles::changed`].
    pub fn change(&mut self, change: Change, config: &Config) -> Result<(), Outcome> {
        let Change { to, source } = change;
        if to == self.role {
            // An authoritative source that agrees takes the role over: the attribute that names
            // this host, the file whose edit says what a promote had said.
            if matches!(source, RoleSource::WatchedAttribute | RoleSource::Config) {
                self.source = source;
                self.remember(config);
                self.publish();
            }
            return Err(Outcome::Unchanged(to));
        }
        match (to, &self.election) {
            // Entering active on the election's word happens under its lock, so that a fence
            // racing with this promotion always wins (see Election::promote_if_leader).
            (Role::Active, Some(election)) => {
                if !election.promote_if_leader(|| self.fence.decide(Role::Active)) {
                    return Err(Outcome::NotLeader);
                }
            }
            _ => self.fence.decide(to),
        }
        self.role = to;
        self.source = source;
        match to {
            Role::Active => self.metrics.promotions.inc(),
            Role::Standby => self.metrics.demotions.inc(),
        }
        self.remember(config);
        // The decision is published first; cloudflared follows it.
        self.publish();
        Ok(())
    }

    /// The second half of the one role path, once cloudflared followed: the outcome, logged.
    pub fn changed(&self, took: Duration, config: &Config) -> Outcome {
        let outcome = Outcome::Changed {
            role: self.role,
            took,
            cloudflared: config.cloudflared.enabled,
        };
        let took_ms = took.as_secs_f64() * 1000.0;
        tracing::info!(
            role = self.role.as_str(),
            source = self.source.as_str(),
            took_ms,
            "{outcome}"
        );
        outcome
    }

    /// Only an operator's promote/demote is kept for the next start. A role another source gave
    /// (the watched attribute, the election) may be stale by then: that source is asked again
    /// at start, and while it cannot answer the node is standby. The file taking the role back
    /// drops what was kept.
    fn remember(&self, config: &Config) {
        let state_dir = &config.agent.state_dir;
        match self.source {
            RoleSource::Cli => {
                let kept = PersistedRole {
                    role: self.role,
                    source: self.source,
                    config_role: config.role,
                };
                if let Err(e) = start::persist(state_dir, &kept) {
                    tracing::warn!(error = %e, "cannot persist the role in {}; a restart will fall back to the config's: {e}", state_dir.display());
                }
            }
            RoleSource::Config => start::forget(state_dir),
            _ => {}
        }
    }

    /// `/status` and `STATUS=` say the role and where it comes from.
    pub fn publish(&mut self) {
        let (role, source) = (self.role, self.source);
        self.fence.health.update_status(|s| {
            s.role = Some(role);
            s.role_source = Some(source);
        });
        let detail = self.detail();
        systemd::status(&format!("serving as {} ({detail})", role.as_str()));
        self.published_detail = detail;
    }

    /// The status tick: publishes again when the election's state moved.
    pub fn tick(&mut self) {
        if self.detail() != self.published_detail {
            self.publish();
        }
    }

    /// Where the role comes from, for `STATUS=`: the source, and under an election its state
    /// (e.g. `election on KEY: unreachable: …` while etcd cannot be reached).
    fn detail(&self) -> String {
        let Some(e) = &self.election else {
            return self.source.as_str().to_owned();
        };
        let s = e.state();
        let mut out = format!("election on {}: {}", s.key, s.phase.as_str());
        if let Some(l) = s.leader.as_deref().filter(|_| !s.is_leader) {
            out.push_str(&format!(", leader {l}"));
        }
        if let Some(err) = s.last_error.as_deref().filter(|_| s.phase == Phase::Unreachable) {
            out.push_str(&format!(": {err}"));
        }
        out
    }

    /// A reload read `new`: the file's `role` applies when it changed and no other source
    /// decides the role.
    pub fn reloaded(&self, old: &Config, new: &Config) -> Option<Change> {
        let decided_elsewhere = old.role_watch.attribute.is_some() || self.election.is_some() || self.follow.is_some();
        if new.role == old.role || decided_elsewhere {
            return None;
        }
        tracing::info!(
            from = old.role.as_str(),
            to = new.role.as_str(),
            "role changed in the config file: {} -> {}",
            old.role.as_str(),
            new.role.as_str()
        );
        Some(Change {
            to: new.role,
            source: RoleSource::Config,
        })
    }

    /// What `promote` (`true`) or `demote` means here.
    pub fn manual(&self, config: &Config, promote: bool) -> Manual {
        if let Some(attribute) = &config.role_watch.attribute {
            return Manual::Refused(format!(
                "the role is decided by the metadata attribute {attribute:?}; change it there"
            ));
        }
        if self.election.is_some() {
            return Manual::Handover;
        }
        if self.follow.is_some() {
            return Manual::Refused(format!(
                "the role follows the check at {}; change what it answers",
                config.role_follow.as_ref().map_or("", |f| f.url.as_str())
            ));
        }
        let to = if promote { Role::Active } else { Role::Standby };
        Manual::Direct(Change {
            to,
            source: RoleSource::Cli,
        })
    }
}

#[cfg(test)]
mod tests;
