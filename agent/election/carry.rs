//! The election across an upgrade in place (issue 20): the old image detaches its task
//! ([`super::Election::detach`]) and carries [`Carried`] through the exec; the new image
//! [`resume`]s from it and goes on renewing the *same* lease, so the key never changes hands
//! and the node stays active without restarting cloudflared.
//!
//! Safety comes first, since two actives is the worst failure:
//! - The lease's deadline (the last renewal *sent* + its ttl, the earliest the server can expire
//!   it) is carried as a `CLOCK_MONOTONIC` reading, which means the same instant after the exec:
//!   the time the exec took is spent from it, never added. Each conversion reads two clocks, so
//!   the deadline comes back [`CLOCK_SLACK`] early rather than a few nanoseconds late.
//! - A resume past the fence point (`deadline - fence_margin`) fences at once, on the path a
//!   failed renewal takes (fence, then [`Outcome::Deposed`]); the key is revoked once the store
//!   answers, as a lease fenced on always is. Under `on_store_loss = "keep"` the first renewal
//!   decides instead, as it would have without the exec.
//! - A [`Carried`] from another `[role_election]` (backend, key or host name changed) is not
//!   resumed: the task fences, starts from scratch, and the carried lease is left to expire (its
//!   store may be another cluster, where its ID could name somebody else's lease).
//! - A resumed task that holds no lease fences too: the node cannot be active on a lease it
//!   does not hold, whatever it carried as its role.
//!
//! What the node hears: a resumed leader sends nothing while it stays leader. The node starts
//! active because [`Election::state`] says it leads as soon as [`resume`] returns (its
//! cloudflared carried too); an `Elected` would ask for a promotion it does not need. A lease
//! not resumed sends one `Deposed`; later wins (a new term) and losses are as usual.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::store::Store;
use super::{Election, Fence, Held, Outcome, Phase, Settings, Task};
use crate::config::roles::OnStoreLoss;
use crate::deadline;

/// How early a carried deadline comes back: more than the error of two clock conversions
/// (microseconds), far less than any fence margin.
pub const CLOCK_SLACK: Duration = Duration::from_millis(1);

/// The longest hold believed from a carried struct: the config's own bound on `ttl`. A carried
/// deadline is never taken as later than now + this.
const GRANTED_LIMIT: Duration = Duration::from_secs(3600);

/// The election as one image hands it to the next. Plain data, no secrets: the etcd
/// credentials come from the config and the Kubernetes token file is read again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// `etcd` or `kubernetes`; with `key` and `me`, which `[role_election]` this was. Another
    /// one is not resumed.
    pub backend: String,
    /// The etcd key, or the Lease's `namespace/name`.
    pub key: String,
    /// The host name this node holds the key as.
    pub me: String,
    /// The lease this node holds the key with; `None` on a follower.
    pub lease: Option<CarriedLease>,
    /// A lease this node fenced on and has not revoked yet (revoked once the store answers).
    pub stale: Option<i64>,
    /// The `[role_follow]` check's last verdict (only read when a check is configured).
    pub gate_open: bool,
    /// Resigned for a handover: no campaign until another node took the key.
    pub stepped_aside: bool,
    /// The counters `/status` and the metrics show, so they count across upgrades.
    pub term: u64,
    pub won: u64,
    pub lost: u64,
    pub renew_failures: u64,
    /// The holder's name, as last read.
    pub leader: Option<String>,
    pub last_error: Option<String>,
    /// Kubernetes: the Lease as last seen, so a silent holder's lease duration is counted from
    /// when the old image first saw its record, not from the exec.
    pub observed: Option<ObservedLease>,
}

/// A held lease, as carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedLease {
    /// etcd's lease ID, or the Lease's `leaseTransitions` at its acquisition.
    pub id: i64,
    /// The hold's duration on the server, ms.
    pub granted_ms: u64,
    /// The earliest server-side expiry ([`deadline::to_monotonic_ns`]).
    pub deadline_ns: u64,
    /// When the old image meant to renew next (monotonic ns). The new image renews at once
    /// instead: the exec took time.
    pub next_renew_ns: u64,
}

impl CarriedLease {
    /// The carried deadline as an instant of this image, [`CLOCK_SLACK`] early: never later
    /// than it was in the image that carried it.
    pub fn deadline(&self) -> Instant {
        let deadline = deadline::from_monotonic_ns(self.deadline_ns);
        deadline.checked_sub(CLOCK_SLACK).unwrap_or(deadline)
    }
}

/// The Lease object as the Kubernetes client last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedLease {
    /// The object, JSON.
    pub object: String,
    /// When this node first saw its `spec` as it is (monotonic ns).
    pub since_ns: u64,
}

impl Carried {
    /// Whether this node held the key when it was carried.
    pub fn is_leader(&self) -> bool {
        self.lease.is_some()
    }

    /// When the carried lease must be fenced on under `fence_margin` (`None` on a follower):
    /// by then the election must have been resumed, or the node fenced without it. For a boot
    /// with slow steps ahead of the election's to check, or to arm a timer on.
    pub fn fence_point(&self, fence_margin: Duration) -> Option<Instant> {
        self.lease.map(|l| {
            let deadline = l.deadline();
            deadline.checked_sub(fence_margin).unwrap_or(deadline)
        })
    }

    /// Why `settings` on `backend` is not the election this was carried from, if it is not.
    fn mismatch(&self, backend: &str, settings: &Settings) -> Option<String> {
        let differs =
            |what: &str, was: &str, now: &str| (was != now).then(|| format!("the {what} was {was:?}, is {now:?}"));
        differs("backend", &self.backend, backend)
            .or_else(|| differs("key", &self.key, &settings.key))
            .or_else(|| differs("host name", &self.me, &settings.me))
    }
}

/// Starts the election task from what the previous image carried (see the module's doc): it
/// goes on renewing the carried lease (at once), fences when that is no longer safe, or starts
/// as a follower. [`Election::state`] is right when this returns: `is_leader`, `lease_id` and
/// `lease_deadline` are the carried lease's. `gated`: a `[role_follow]` check is configured (its
/// carried verdict applies until it sends its first one).
pub fn resume(
    settings: Settings,
    client: Store,
    fence: Fence,
    outcomes: mpsc::Sender<Outcome>,
    gated: bool,
    carried: Carried,
) -> (Election, tokio::task::JoinHandle<()>) {
    let (mut task, rx) = Task::new(settings, client, fence, outcomes, gated);
    let deposed = task.take_over(carried, gated);
    let election = task.election.clone();
    let run = async move {
        if let Some(reason) = deposed {
            let _ = task.outcomes.send(Outcome::Deposed { reason }).await;
        }
        task.run(rx).await;
    };
    (election, tokio::spawn(run))
}

impl Task {
    /// [`super::Command::Detach`]: a leader renews now (or fences, if it is already past the
    /// fence point), then the carried state is answered and `true` says the task ends. Should
    /// nobody take the answer, the task goes on as before (`false`): a lease nobody would
    /// renew or fence on is the one thing detaching must never leave behind.
    pub(super) async fn detach(&mut self, done: oneshot::Sender<Carried>) -> bool {
        if let Some(mut h) = self.lease {
            h.next_renew = Instant::now();
            self.lead(h).await;
        }
        let carried = self.carry();
        let lease = carried.lease.map(|l| format!("{:x}", l.id));
        if done.send(carried).is_err() {
            tracing::warn!(key = %self.settings.key, "nobody took the detached election; it goes on here");
            return false;
        }
        match lease {
            Some(id) => {
                tracing::info!(key = %self.settings.key, lease = %id, "detached the election for an upgrade in place, holding {} (lease {id}); the next image renews it", self.settings.key)
            }
            None => {
                tracing::info!(key = %self.settings.key, "detached the election for an upgrade in place (holding nothing)")
            }
        }
        true
    }

    /// What the next image needs to go on where this task is.
    fn carry(&self) -> Carried {
        let s = self.election.state();
        let observed = match &self.client {
            Store::Kubernetes(c) => c.observed_record().map(|(object, since)| ObservedLease {
                object,
                since_ns: deadline::to_monotonic_ns(since),
            }),
            Store::Etcd(_) => None,
        };
        Carried {
            backend: self.client.backend().to_owned(),
            key: self.settings.key.clone(),
            me: self.settings.me.clone(),
            lease: self.lease.map(|h| CarriedLease {
                id: h.id,
                granted_ms: u64::try_from(h.granted.as_millis()).unwrap_or(u64::MAX),
                deadline_ns: deadline::to_monotonic_ns(h.deadline),
                next_renew_ns: deadline::to_monotonic_ns(h.next_renew),
            }),
            stale: self.stale,
            gate_open: self.gate_open,
            stepped_aside: self.stepped_aside,
            term: s.term,
            won: s.won,
            lost: s.lost,
            renew_failures: s.renew_failures,
            leader: s.leader,
            last_error: s.last_error,
            observed,
        }
    }

    /// Takes `c` over before the task runs. `Some(reason)`: a carried lease was not resumed
    /// (the node was fenced; the reason goes out as [`Outcome::Deposed`]).
    fn take_over(&mut self, c: Carried, gated: bool) -> Option<String> {
        if let Some(why) = c.mismatch(self.client.backend(), &self.settings) {
            tracing::warn!(key = %self.settings.key, "not resuming the carried election: {why}; starting from scratch, fenced (a lease it held expires by itself)");
            (self.election.fence)();
            return c.lease.map(|_| format!("the carried lease is not resumed: {why}"));
        }
        if let (Store::Kubernetes(client), Some(o)) = (&self.client, &c.observed) {
            if let Err(e) = client.restore_observed(&o.object, deadline::from_monotonic_ns(o.since_ns)) {
                tracing::warn!(error = %e, "not resuming the carried Lease record (it is read again): {e}");
            }
        }
        self.stale = c.stale;
        self.stepped_aside = c.stepped_aside;
        self.gate_open = !gated || c.gate_open;
        let phase = self.follower_phase();
        self.update(|s| {
            s.term = c.term;
            s.won = c.won;
            s.lost = c.lost;
            s.renew_failures = c.renew_failures;
            s.leader = c.leader;
            s.last_error = c.last_error;
            s.phase = phase;
        });
        let Some(l) = c.lease else {
            (self.election.fence)();
            return None;
        };
        let held = self.held(&l);
        {
            let mut s = self.election.state.lock().unwrap_or_else(|e| e.into_inner());
            s.is_leader = true;
            s.phase = Phase::Leader;
            s.leader = Some(self.settings.me.clone());
            s.lease_id = Some(held.id);
            s.lease_ttl = Some(held.granted);
            s.lease_deadline = Some(held.deadline);
        }
        self.lease = Some(held);
        let left = self.fence_at(&held).saturating_duration_since(Instant::now());
        // `keep`: the operator's choice holds here too; the first renewal decides (`lead`).
        if left.is_zero() && self.settings.on_store_loss != OnStoreLoss::Keep {
            // The path of a renewal that failed in time: fenced, the key revoked once it answers.
            self.stale = Some(held.id);
            self.release_lease();
            let reason = "the upgrade took the carried lease past its fence point";
            tracing::warn!(key = %self.settings.key, lease = format!("{:x}", held.id), "left the election's leadership on {}; fenced: {reason}", self.settings.key);
            return Some(reason.to_owned());
        }
        tracing::info!(key = %self.settings.key, lease = format!("{:x}", held.id), left_ms = left.as_millis(), "resumed the election's leadership on {} (lease {:x}, {} ms before its fence point); renewing it now", self.settings.key, held.id, left.as_millis());
        None
    }

    /// The carried lease as this image's [`Held`]: its deadline no later than carried (and
    /// never beyond a whole hold from now), its renewal due at once.
    fn held(&self, l: &CarriedLease) -> Held {
        let now = Instant::now();
        let granted = Duration::from_millis(l.granted_ms).min(GRANTED_LIMIT);
        Held {
            id: l.id,
            granted,
            deadline: l.deadline().min(deadline::after(now, granted)),
            next_renew: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried() -> Carried {
        Carried {
            backend: "etcd".into(),
            key: "/k".into(),
            me: "node-a".into(),
            lease: Some(CarriedLease {
                id: 0x694d_8a1f_0c3b_2e11,
                granted_ms: 3000,
                deadline_ns: deadline::to_monotonic_ns(Instant::now() + Duration::from_secs(2)),
                next_renew_ns: deadline::to_monotonic_ns(Instant::now()),
            }),
            stale: Some(7),
            gate_open: true,
            stepped_aside: false,
            term: 4,
            won: 4,
            lost: 3,
            renew_failures: 1,
            leader: Some("node-a".into()),
            last_error: None,
            observed: Some(ObservedLease {
                object: r#"{"metadata":{"resourceVersion":"9"}}"#.into(),
                since_ns: 12,
            }),
        }
    }

    #[test]
    fn carried_state_survives_serde() {
        let c = carried();
        let text = serde_json::to_string(&c).expect("serialize");
        let back: Carried = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, c);
    }

    fn settings(key: &str, me: &str) -> Settings {
        Settings {
            key: key.into(),
            me: me.into(),
            ttl: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            fence_margin: Duration::from_millis(500),
            poll_interval: Duration::from_millis(100),
            on_store_loss: Default::default(),
        }
    }

    #[test]
    fn another_election_is_named_not_resumed() {
        let c = carried();
        assert_eq!(c.mismatch("etcd", &settings("/k", "node-a")), None);
        let why = c.mismatch("kubernetes", &settings("/k", "node-a")).expect("backend");
        assert!(why.contains("backend"), "{why}");
        let why = c.mismatch("etcd", &settings("/other", "node-a")).expect("key");
        assert!(why.contains("\"/k\"") && why.contains("\"/other\""), "{why}");
        assert!(c.mismatch("etcd", &settings("/k", "node-b")).is_some());
    }

    /// The deadline after a resume is never later than the one carried, and a corrupted one is
    /// bounded by a whole hold from now.
    #[tokio::test]
    async fn a_carried_deadline_comes_back_no_later() {
        let (task, _rx) = task();
        let before = Instant::now() + Duration::from_millis(2500);
        let mut l = carried().lease.expect("lease");
        l.deadline_ns = deadline::to_monotonic_ns(before);
        let held = task.held(&l);
        assert!(held.deadline <= before, "{:?} > {before:?}", held.deadline);
        assert!(before - held.deadline < Duration::from_millis(5));
        let c = Carried {
            lease: Some(l),
            ..carried()
        };
        let margin = Duration::from_millis(500);
        assert!(c.fence_point(margin).expect("a leader's") <= before - margin);
        assert_eq!(Carried { lease: None, ..c }.fence_point(margin), None);
        l.deadline_ns = u64::MAX;
        let held = task.held(&l);
        assert!(held.deadline <= Instant::now() + Duration::from_secs(3));
    }

    fn task() -> (Task, mpsc::Receiver<super::super::Command>) {
        let client = super::super::etcd::EtcdClient::new(&super::super::etcd::EtcdOptions {
            endpoints: vec!["http://127.0.0.1:1".into()],
            ca_pem: None,
            identity_pem: None,
            username: None,
            password: None,
        })
        .expect("client");
        let (outcomes, _) = mpsc::channel(1);
        Task::new(
            settings("/k", "node-a"),
            Store::Etcd(client),
            std::sync::Arc::new(|| {}),
            outcomes,
            false,
        )
    }
}
