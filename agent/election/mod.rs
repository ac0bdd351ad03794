//! Leader election (`[role_election]`): the node that holds the key under a live lease is
//! active; every other node is standby and watches the key. The state machine below exists
//! once; the store under it ([`store::Store`]) is etcd or a Kubernetes Lease
//! (`kubernetes.rs` has that recipe and what it takes from client-go).
//!
//! On etcd, the recipe is etcd's own (`clientv3/concurrency`): grant a lease, then a transaction that
//! puts `key = host_name` attached to it only if the key's `create_revision` is 0 (it does not
//! exist). The leader renews the lease every ttl/3. A standby takes over only once the key is
//! gone, which etcd guarantees happens only when the lease was revoked or expired *on the
//! server*.
//!
//! **Fencing by time.** The leader counts its lease from when a renewal was *sent* (the server
//! extends it on receipt, later; and a raft leader that just lost quorum can still answer a
//! keepalive for about an election timeout, so an answer proves less than the send time). If no
//! renewal succeeds, it fences `fence_margin` before `sent + ttl`: `/active` fails and cloudflared
//! gets its one SIGTERM, directly from this task, so a busy supervision loop cannot delay it.
//! Hence at no instant do two nodes accept new tunnel traffic, even under partition.
//!
//! The task talks to the node through [`Outcome`]s (elected / deposed) and takes
//! [`Command`]s (resign, campaign now, gate, detach). The node's one role path applies them.
//!
//! **Across an upgrade in place** the task is detached rather than stopped: it hands over what it
//! holds ([`Carried`]) without resigning, and the new image resumes renewing the same lease
//! ([`resume`]) before its deadline, which the exec never extends (`carry.rs`).

pub mod carry;
pub mod etcd;
pub mod hold;
mod http;
pub mod kubeconfig;
pub mod kubernetes;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::roles::{OnStoreLoss, RoleElectionSection};
use crate::deadline;
use crate::health::{ElectionStatus, Published};
use store::{Holder, Renewal, Store, StoreError};

pub use carry::{resume, Carried, CarriedLease, ObservedLease};

/// Why a request to the election failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The election's task is gone (the node is shutting down).
    #[error("the election task stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Won, but so late that the lease was about to be fenced anyway.
    #[error("won the key too late to hold it safely; revoked")]
    TooLate,
    /// Resigned, but the lease is left to expire by itself.
    #[error("could not revoke the lease (it expires within its ttl): {0}")]
    NotRevoked(StoreError),
}

/// Where this node stands in the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    Leader,
    #[default]
    Follower,
    /// Resigned for a handover: no campaign until another node took the key, or `promote`.
    SteppedAside,
    /// The `[role_follow]` check fails: no campaign.
    Gated,
    /// The store did not answer the last request.
    Unreachable,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Leader => "leader",
            Phase::Follower => "follower",
            Phase::SteppedAside => "stepped-aside",
            Phase::Gated => "gated",
            Phase::Unreachable => "unreachable",
        }
    }
}

/// What the election tells the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This node holds the key (win number `term`); see [`Election::promote_if_leader`].
    Elected { term: u64 },
    /// This node no longer holds the key, and was already fenced if it was active.
    Deposed { reason: String },
}

/// What the node asks of the election.
#[derive(Debug)]
pub enum Command {
    /// Give the key up now (revoke the lease). The caller has already fenced cloudflared.
    /// `step_aside`: do not campaign again until another node has taken the key, or a
    /// `Campaign` (a handover, not a re-election of the same node).
    Resign {
        step_aside: bool,
        done: oneshot::Sender<Result<(), ElectionError>>,
    },
    /// Campaign at once (`promote`); answers whether this node won.
    Campaign {
        done: oneshot::Sender<Result<bool, ElectionError>>,
    },
    /// Campaign only while `true` (the `[role_follow]` check gates the election).
    Gate(bool),
    /// An upgrade in place: renew now if leading, answer what the next image resumes from, then
    /// end without releasing anything (see [`Election::detach`]).
    Detach { done: oneshot::Sender<Carried> },
}

/// Where the election stands, for `/status`, `/metrics` and the CLI.
#[derive(Debug, Clone, Default)]
pub struct ElectionState {
    /// `etcd` or `kubernetes`.
    pub backend: &'static str,
    pub key: String,
    pub me: String,
    pub phase: Phase,
    pub is_leader: bool,
    /// The current holder's name, as last read.
    pub leader: Option<String>,
    pub lease_id: Option<i64>,
    pub lease_ttl: Option<Duration>,
    /// When our lease can expire on the server at the earliest (last renewal sent + ttl).
    pub lease_deadline: Option<Instant>,
    pub term: u64,
    pub won: u64,
    pub lost: u64,
    pub renew_failures: u64,
    pub last_error: Option<String>,
}

/// The handle the node holds.
#[derive(Clone)]
pub struct Election {
    tx: mpsc::Sender<Command>,
    state: Arc<Mutex<ElectionState>>,
    /// The node's fence (fail `/active`, SIGTERM cloudflared). Run under the state lock so a
    /// promotion cannot interleave with a fence (see [`Election::promote_if_leader`]).
    fence: Arc<dyn Fn() + Send + Sync>,
}

/// The node's fence: synchronous, idempotent.
pub type Fence = Arc<dyn Fn() + Send + Sync>;

impl Election {
    pub fn state(&self) -> ElectionState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `promote` (the node's "enter active" step) only if this node holds the key, under
    /// the lock the fence takes: a fence either happened before (and this returns false) or
    /// comes after and undoes the promotion. Never both active.
    pub fn promote_if_leader(&self, promote: impl FnOnce()) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_leader {
            promote();
            true
        } else {
            false
        }
    }

    pub async fn resign(&self, step_aside: bool) -> Result<(), ElectionError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Resign { step_aside, done })
            .await
            .map_err(|_| ElectionError::Stopped)?;
        rx.await.map_err(|_| ElectionError::Stopped)?
    }

    pub async fn campaign(&self) -> Result<bool, ElectionError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Campaign { done })
            .await
            .map_err(|_| ElectionError::Stopped)?;
        rx.await.map_err(|_| ElectionError::Stopped)?
    }

    pub async fn gate(&self, open: bool) {
        let _ = self.tx.send(Command::Gate(open)).await;
    }

    /// Stops the task *without resigning*, for an upgrade in place: a leader renews its lease
    /// once more (so the next image gets the longest time before the fence point), and the
    /// answer is what [`resume`] needs to go on renewing the same lease. From here until the
    /// resume nobody renews the lease or watches its fence point: detach last, just before the
    /// exec, and resume first. Should the exec not happen after all, [`resume`] in this process.
    /// `/status` keeps showing the state as detached.
    pub async fn detach(&self) -> Result<Carried, ElectionError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Detach { done })
            .await
            .map_err(|_| ElectionError::Stopped)?;
        rx.await.map_err(|_| ElectionError::Stopped)
    }

    /// The `election` object of `/status` (and `tunnel-agent status`).
    pub fn status(&self) -> ElectionStatus {
        let s = self.state();
        let remaining = s
            .lease_deadline
            .filter(|_| s.is_leader)
            .map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        ElectionStatus {
            backend: s.backend.to_owned(),
            key: s.key,
            host_name: s.me,
            state: s.phase.as_str().to_owned(),
            leader: s.leader,
            is_leader: s.is_leader,
            lease_id: s.lease_id.filter(|_| s.is_leader).map(|id| format!("{id:x}")),
            lease_ttl_s: s.lease_ttl.filter(|_| s.is_leader).map(|t| t.as_secs()),
            lease_remaining_s: remaining,
            elections_won: s.won,
            elections_lost: s.lost,
            renew_failures: s.renew_failures,
            last_error: s.last_error,
        }
    }

    /// Prometheus lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use crate::prom_text::{self, Family, Kind};
        let s = self.state();
        let remaining = s
            .lease_deadline
            .filter(|_| s.is_leader)
            .map_or(0.0, |d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        let labels = [
            ("backend", s.backend),
            ("key", &s.key),
            ("leader", s.leader.as_deref().unwrap_or("")),
        ];
        let help = "The election's backend, key and current leader.";
        Family::open(out, "tunnel_agent_election_info", Kind::Gauge, help).sample(&labels, 1);
        let lines = [
            (
                "tunnel_agent_election_leader",
                Kind::Gauge,
                "1 while this node holds the election key.",
                f64::from(u8::from(s.is_leader)),
            ),
            (
                "tunnel_agent_election_lease_remaining_seconds",
                Kind::Gauge,
                "Time before this leader's lease could expire on the server (counted from the last renewal sent).",
                remaining,
            ),
            (
                "tunnel_agent_elections_won_total",
                Kind::Counter,
                "Elections this node won.",
                s.won as f64,
            ),
            (
                "tunnel_agent_elections_lost_total",
                Kind::Counter,
                "Times this node lost the key after holding it (fenced, resigned, deposed).",
                s.lost as f64,
            ),
            (
                "tunnel_agent_election_renew_failures_total",
                Kind::Counter,
                "Lease renewals that failed.",
                s.renew_failures as f64,
            ),
        ];
        for (name, kind, help, v) in lines {
            prom_text::single(out, name, kind, help, v);
        }
    }
}

impl Published<ElectionStatus> for Election {
    fn status(&self) -> ElectionStatus {
        Election::status(self)
    }

    fn render_metrics(&self, out: &mut String) {
        Election::render_metrics(self, out);
    }
}

/// Settings the task runs with.
#[derive(Clone)]
pub struct Settings {
    pub key: String,
    pub me: String,
    pub ttl: Duration,
    pub renew_interval: Duration,
    pub request_timeout: Duration,
    pub fence_margin: Duration,
    pub poll_interval: Duration,
    pub on_store_loss: OnStoreLoss,
}

impl Settings {
    pub fn from_section(section: &RoleElectionSection, me: String) -> Settings {
        Settings {
            key: section.key_name(),
            me,
            ttl: section.ttl,
            renew_interval: section.renew_interval(),
            request_timeout: section.request_timeout(),
            fence_margin: section.fence_margin,
            poll_interval: section.poll_interval,
            on_store_loss: section.on_store_loss,
        }
    }
}

/// Starts the election task. It campaigns at once (unless `gated`).
pub fn start(
    settings: Settings,
    client: Store,
    fence: Fence,
    outcomes: mpsc::Sender<Outcome>,
    gated: bool,
) -> (Election, tokio::task::JoinHandle<()>) {
    let (task, rx) = Task::new(settings, client, fence, outcomes, gated);
    (task.election.clone(), tokio::spawn(task.run(rx)))
}

/// The lease this node holds the key with.
#[derive(Debug, Clone, Copy)]
struct Held {
    id: i64,
    granted: Duration,
    /// Last renewal sent that succeeded, + its TTL: the earliest server-side expiry.
    deadline: Instant,
    next_renew: Instant,
}

struct Task {
    settings: Settings,
    client: Store,
    election: Election,
    outcomes: mpsc::Sender<Outcome>,
    gate_open: bool,
    stepped_aside: bool,
    lease: Option<Held>,
    /// The lease this node fenced on when it could not renew it. It may outlive the fence by
    /// far: a new raft leader renews every lease by its ttl, so after a quorum loss the key
    /// would stay ours, with nobody active, for a whole ttl after quorum returns. Revoked as
    /// soon as etcd answers again.
    stale: Option<i64>,
}

impl Task {
    /// A task that holds nothing yet, and the receiver of its handle's commands.
    fn new(
        settings: Settings,
        client: Store,
        fence: Fence,
        outcomes: mpsc::Sender<Outcome>,
        gated: bool,
    ) -> (Task, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(8);
        let state = Arc::new(Mutex::new(ElectionState {
            backend: client.backend(),
            key: settings.key.clone(),
            me: settings.me.clone(),
            phase: if gated { Phase::Gated } else { Phase::Follower },
            ..ElectionState::default()
        }));
        let task = Task {
            settings,
            client,
            election: Election { tx, state, fence },
            outcomes,
            gate_open: !gated,
            stepped_aside: false,
            lease: None,
            stale: None,
        };
        (task, rx)
    }

    fn update(&self, f: impl FnOnce(&mut ElectionState)) {
        f(&mut self.election.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn follower_phase(&self) -> Phase {
        if self.stepped_aside {
            Phase::SteppedAside
        } else if !self.gate_open {
            Phase::Gated
        } else {
            Phase::Follower
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let wake = match self.lease {
                Some(h) => h.next_renew.min(self.fence_at(&h)),
                None => deadline::from_now(self.settings.poll_interval),
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Detach { done }) => {
                        if self.detach(done).await {
                            return;
                        }
                    }
                    Some(cmd) => self.command(cmd).await,
                    // The node is gone; a lease left behind expires by itself.
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => match self.lease {
                    Some(h) => self.lead(h).await,
                    None => self.follow().await,
                },
            }
        }
    }

    fn fence_at(&self, h: &Held) -> Instant {
        h.deadline.checked_sub(self.settings.fence_margin).unwrap_or(h.deadline)
    }

    /// A deadline for one request that ends before the fence point while leading.
    fn request_budget(&self) -> Duration {
        let cap = self.settings.request_timeout;
        if self.settings.on_store_loss == OnStoreLoss::Keep {
            return cap;
        }
        match self.lease {
            Some(h) => cap.min(self.fence_at(&h).saturating_duration_since(Instant::now())),
            None => cap,
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Resign { step_aside, done } => {
                self.stepped_aside = step_aside;
                let held = self.lease;
                let result = match held {
                    Some(h) => {
                        // The node asked, and has fenced itself already: no Deposed for it.
                        self.release_lease();
                        // Revoke at once, so a standby takes over now rather than after ttl.
                        let revoked = self.client.release(h.id, self.settings.request_timeout).await;
                        if revoked.is_err() {
                            // Revoked by `follow` once etcd answers again, if it has not expired.
                            self.stale = Some(h.id);
                        }
                        revoked.map_err(ElectionError::NotRevoked)
                    }
                    None => Ok(()),
                };
                let phase = self.follower_phase();
                self.update(|s| s.phase = phase);
                let _ = done.send(result);
            }
            Command::Campaign { done } => {
                self.stepped_aside = false;
                if self.lease.is_some() {
                    let _ = done.send(Ok(true));
                    return;
                }
                let result = self.campaign().await;
                let _ = done.send(result);
            }
            Command::Gate(open) => {
                self.gate_open = open;
                let phase = self.follower_phase();
                if self.lease.is_none() {
                    self.update(|s| s.phase = phase);
                }
            }
            // Answered by `run`, which ends the task after it.
            Command::Detach { done } => drop(done),
        }
    }

    /// Loses the key: fences first (under the state lock), then tells the node.
    async fn give_up(&mut self, _h: Held, reason: &str) {
        self.release_lease();
        tracing::warn!(key = %self.settings.key, reason, "left the election's leadership on {}; fenced: {reason}", self.settings.key);
        let _ = self
            .outcomes
            .send(Outcome::Deposed {
                reason: reason.to_owned(),
            })
            .await;
    }

    /// Forgets the lease and fences, under the state lock.
    fn release_lease(&mut self) {
        self.lease = None;
        {
            let mut s = self.election.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.is_leader {
                s.lost += 1;
            }
            s.is_leader = false;
            s.phase = Phase::Follower;
            s.lease_id = None;
            s.lease_deadline = None;
            (self.election.fence)();
        }
    }

    /// Standby: read the key; campaign when it is gone.
    async fn follow(&mut self) {
        let read = self
            .client
            .read(&self.settings.key, self.settings.request_timeout)
            .await;
        let read = match read {
            Ok(Some(holder)) if self.is_stale(&holder) => self.revoke_stale(holder).await,
            other => {
                if other.is_ok() {
                    // The key is gone or under another lease: the stale one holds nothing.
                    self.stale = None;
                }
                other
            }
        };
        match read {
            Err(e) => {
                self.update(|s| {
                    s.phase = Phase::Unreachable;
                    s.last_error = Some(e.to_string());
                });
            }
            Ok(Some(Holder { name, .. })) => {
                if self.stepped_aside && name != self.settings.me {
                    // The handover happened: a normal candidate again.
                    self.stepped_aside = false;
                }
                let phase = self.follower_phase();
                self.update(|s| {
                    s.phase = phase;
                    s.leader = Some(name);
                    s.last_error = None;
                });
            }
            Ok(None) => {
                let phase = self.follower_phase();
                self.update(|s| {
                    s.phase = phase;
                    s.leader = None;
                    s.last_error = None;
                });
                if self.gate_open && !self.stepped_aside {
                    if let Err(e) = self.campaign().await {
                        self.update(|s| s.last_error = Some(e.to_string()));
                    }
                }
            }
        }
    }

    /// The key is still ours under the lease we fenced on (so nobody is active): give it up
    /// now rather than after its ttl. Safe: this node is fenced, and the key names its lease.
    async fn revoke_stale(&mut self, holder: Holder) -> Result<Option<Holder>, StoreError> {
        self.client.release(holder.lease, self.settings.request_timeout).await?;
        self.stale = None;
        tracing::info!(key = %self.settings.key, lease = format!("{:x}", holder.lease), "revoked the lease this node fenced on (lease {:x}): {} is free", holder.lease, self.settings.key);
        Ok(None)
    }

    /// Whether `holder` is the hold this node fenced on.
    fn is_stale(&self, holder: &Holder) -> bool {
        self.stale == Some(holder.lease) && holder.name == self.settings.me
    }

    /// One attempt at the key. `Ok(true)` when won.
    async fn campaign(&mut self) -> Result<bool, ElectionError> {
        let timeout = self.settings.request_timeout;
        // The hold counts from before the attempt's first request was sent.
        let sent = Instant::now();
        let outcome = self
            .client
            .acquire(&self.settings.key, &self.settings.me, self.settings.ttl, timeout)
            .await
            .map_err(|e| self.unreachable(e))?;
        let lease = match outcome {
            Ok(lease) => lease,
            Err(holder) => {
                let name = holder.map(|h| h.name);
                self.update(|s| s.leader = name);
                return Ok(false);
            }
        };
        let held = Held {
            id: lease.id,
            granted: lease.ttl,
            deadline: deadline::after(sent, lease.ttl),
            next_renew: deadline::after(sent, lease.ttl / 3),
        };
        if Instant::now() >= self.fence_at(&held) {
            // Won, but so late that the hold is about to be fenced anyway: give it back.
            let _ = self.client.release(lease.id, timeout).await;
            return Err(ElectionError::TooLate);
        }
        let term = {
            let mut s = self.election.state.lock().unwrap_or_else(|e| e.into_inner());
            s.term += 1;
            s.won += 1;
            s.is_leader = true;
            s.phase = Phase::Leader;
            s.leader = Some(self.settings.me.clone());
            s.lease_id = Some(lease.id);
            s.lease_ttl = Some(lease.ttl);
            s.lease_deadline = Some(held.deadline);
            s.last_error = None;
            s.term
        };
        self.lease = Some(held);
        tracing::info!(key = %self.settings.key, host = %self.settings.me, lease = format!("{:x}", lease.id), ttl_s = lease.ttl.as_secs(), "won the election for {} as {} (lease {:x}, ttl {}s)", self.settings.key, self.settings.me, lease.id, lease.ttl.as_secs());
        let _ = self.outcomes.send(Outcome::Elected { term }).await;
        Ok(true)
    }

    fn unreachable(&self, e: StoreError) -> ElectionError {
        let msg = e.to_string();
        self.update(|s| {
            s.phase = Phase::Unreachable;
            s.last_error = Some(msg);
        });
        ElectionError::Store(e)
    }

    /// Leader: renew when due; fence when the lease could be about to expire.
    async fn lead(&mut self, mut h: Held) {
        let now = Instant::now();
        if now >= self.fence_at(&h) {
            if self.settings.on_store_loss == OnStoreLoss::Keep {
                // Opted in: keep the role while etcd cannot be reached at all.
                h.next_renew = deadline::after(now, self.retry_delay());
                h.deadline = deadline::after(now, self.settings.fence_margin.saturating_add(self.retry_delay()));
                self.lease = Some(h);
                if let Err(e) = self.renew(h).await {
                    tracing::warn!(error = %e, "the election's store is unreachable; keeping the active role (on_store_loss = \"keep\"): {e}");
                }
                return;
            }
            self.stale = Some(h.id);
            self.give_up(
                h,
                "the lease could not be renewed in time (the store is unreachable, or etcd lost quorum)",
            )
            .await;
            return;
        }
        if now >= h.next_renew {
            if let Err(e) = self.renew(h).await {
                tracing::warn!(error = %e, "lease renewal failed for {}: {e}", self.settings.key);
            }
        }
    }

    fn retry_delay(&self) -> Duration {
        (self.settings.renew_interval / 4).max(Duration::from_millis(100))
    }

    /// One renewal plus a read of the key (somebody may have deleted or taken it).
    async fn renew(&mut self, mut h: Held) -> Result<(), StoreError> {
        let sent = Instant::now();
        let budget = self.request_budget();
        match self.client.renew(h.id, budget).await {
            Ok(Renewal::Renewed(ttl)) => {
                h.deadline = deadline::after(sent, ttl.min(h.granted));
                h.next_renew = deadline::after(sent, self.settings.renew_interval);
                self.lease = Some(h);
                self.update(|s| {
                    s.lease_deadline = Some(h.deadline);
                    s.last_error = None;
                });
            }
            Ok(Renewal::Lost(reason)) => {
                self.give_up(h, &reason).await;
                return Ok(());
            }
            Err(e) => {
                h.next_renew = deadline::from_now(self.retry_delay());
                self.lease = Some(h);
                let msg = e.to_string();
                self.update(|s| {
                    s.renew_failures += 1;
                    s.last_error = Some(msg);
                });
                return Err(e);
            }
        }
        match self.client.read(&self.settings.key, self.request_budget()).await {
            Ok(Some(holder)) if holder.lease == h.id && holder.name == self.settings.me => Ok(()),
            Ok(other) => {
                let who = other.map(|o| o.name);
                let _ = self.client.release(h.id, self.settings.request_timeout).await;
                let reason = format!(
                    "the key is no longer ours (held by {})",
                    who.as_deref().unwrap_or("nobody")
                );
                self.give_up(h, &reason).await;
                if let Some(who) = who {
                    self.update(|s| s.leader = Some(who));
                }
                Ok(())
            }
            // The renewal itself succeeded; the check is repeated at the next one.
            Err(_) => Ok(()),
        }
    }
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}
