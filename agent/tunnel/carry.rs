//! cloudflared across an in-place upgrade (issue 20): what the old image hands the new one so
//! that the running cloudflared is taken over, not restarted.
//!
//! The agent re-executes itself in the same process, so cloudflared is still its child after
//! the `execve`. [`super::TunnelSupervisor::detach`] ends supervision without a signal and
//! returns a [`Carried`]: the pid, the raw numbers of the read ends of its stdout and stderr
//! pipes (open; the hand-over clears close-on-exec on [`Carried::fds`] and passes them through
//! the exec), the supervisor's machine, the counters `/status` and the metrics show, and the
//! spec cloudflared was started from, without the token. [`super::TunnelSupervisor::adopt`]
//! restores them in the new image and takes the pid over ([`super::child::adopt`]): checked to
//! be our unreaped child, watched and read through duplicates of the carried descriptors,
//! which stay as they are (a rollback before the hand-over commits passes them on again).
//!
//! Instants travel as `CLOCK_MONOTONIC` readings ([`crate::deadline::to_monotonic_ns`]): the
//! backoff's due time, the crash-loop window's exits and cloudflared's start mean the same
//! moments after the exec, not moments shifted by how long it took.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::carried_spec::CarriedSpec;
use super::child::{self, Adopted};
use super::supervisor::{Begin, Machine, Run, Start, State, Supervisor};
use super::{RestartPolicy, TunnelSpec, TunnelState};
use crate::backoff::Backoff;
use crate::deadline::{from_monotonic_ns, to_monotonic_ns};

/// cloudflared's supervision, carried through an exec. No secret: the token is not in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Carried {
    /// cloudflared's pid; `None` when none runs (standby, disabled, backing off, fenced).
    pub pid: Option<u32>,
    /// The read end of its stdout pipe, as this process holds it (open, close-on-exec set).
    pub stdout_fd: Option<i32>,
    /// The read end of its stderr pipe, likewise.
    pub stderr_fd: Option<i32>,
    /// The spec the running cloudflared was started from (with none running, the one applied
    /// last); `None`: none was wanted.
    pub spec: Option<CarriedSpec>,
    pub machine: CarriedMachine,
    pub status: CarriedStatus,
    /// A fence holds ([`TunnelState::fence`]): nothing may start until it is released.
    pub fenced: bool,
    /// cloudflared has had its one SIGTERM (a second one would skip its drain).
    pub sigterm_sent: bool,
}

impl Carried {
    /// The descriptors that must survive the exec: the pipes' read ends.
    pub fn fds(&self) -> Vec<i32> {
        self.stdout_fd.into_iter().chain(self.stderr_fd).collect()
    }
}

/// The supervisor's [`Machine`] without its policy (the new image reads that from its config).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedMachine {
    pub state: CarriedRunState,
    /// Delays the backoff handed out since it was last reset.
    pub backoff_attempts: u32,
    /// The exits within the crash-loop window (monotonic ns).
    pub exits: Vec<u64>,
    pub unstable_exits: u32,
    pub crash_loop: bool,
}

/// [`State`], instants as monotonic ns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CarriedRunState {
    Idle,
    Starting {
        why: Start,
    },
    Running {
        started: u64,
        connections: u32,
        connected_once: bool,
        zero_since: Option<u64>,
    },
    Backoff {
        at: u64,
    },
    GaveUp,
}

impl CarriedMachine {
    pub fn of(m: &Machine) -> CarriedMachine {
        let state = match &m.state {
            State::Idle => CarriedRunState::Idle,
            State::Starting(why) => CarriedRunState::Starting { why: *why },
            State::Running(run) => CarriedRunState::Running {
                started: to_monotonic_ns(run.started),
                connections: run.connections,
                connected_once: run.connected_once,
                zero_since: run.zero_since.map(to_monotonic_ns),
            },
            State::Backoff { at } => CarriedRunState::Backoff {
                at: to_monotonic_ns(*at),
            },
            State::GaveUp => CarriedRunState::GaveUp,
        };
        CarriedMachine {
            state,
            backoff_attempts: m.backoff.attempts(),
            exits: m.exits.iter().copied().map(to_monotonic_ns).collect(),
            unstable_exits: m.unstable_exits,
            crash_loop: m.crash_loop,
        }
    }

    /// The machine this was, under `policy`.
    pub fn resume(&self, policy: RestartPolicy) -> Machine {
        let state = match &self.state {
            CarriedRunState::Idle => State::Idle,
            CarriedRunState::Starting { why } => State::Starting(*why),
            CarriedRunState::Running {
                started,
                connections,
                connected_once,
                zero_since,
            } => State::Running(Run {
                started: from_monotonic_ns(*started),
                connections: *connections,
                connected_once: *connected_once,
                zero_since: zero_since.map(from_monotonic_ns),
            }),
            CarriedRunState::Backoff { at } => State::Backoff {
                at: from_monotonic_ns(*at),
            },
            CarriedRunState::GaveUp => State::GaveUp,
        };
        Machine {
            state,
            backoff: Backoff::new(policy.backoff, policy.backoff_max).with_attempts(self.backoff_attempts),
            exits: self
                .exits
                .iter()
                .copied()
                .map(from_monotonic_ns)
                .collect::<VecDeque<_>>(),
            unstable_exits: self.unstable_exits,
            crash_loop: self.crash_loop,
            policy,
        }
    }
}

/// What [`TunnelState`] shows of cloudflared (`/status`, the metrics), instants as monotonic ns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedStatus {
    pub wanted: bool,
    pub connections: u32,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub connector_id: Option<String>,
    pub started_at: Option<u64>,
    pub last_connected: Option<u64>,
    pub version: Option<String>,
}

impl CarriedStatus {
    fn of(state: &TunnelState) -> CarriedStatus {
        let d = state.detail();
        CarriedStatus {
            wanted: state.wanted.load(Ordering::Acquire),
            connections: state.connections.load(Ordering::Acquire),
            restarts: state.restarts.load(Ordering::Acquire),
            last_exit: d.last_exit,
            connector_id: d.connector_id,
            started_at: d.started_at.map(to_monotonic_ns),
            last_connected: d.last_connected.map(to_monotonic_ns),
            version: d.version,
        }
    }

    /// Writes this into `state`, but for the pid: that is set once it is taken over.
    fn restore(&self, state: &TunnelState, crash_loop: bool) {
        state.wanted.store(self.wanted, Ordering::Release);
        state.connections.store(self.connections, Ordering::Release);
        state.restarts.store(self.restarts, Ordering::Release);
        state.crash_loop.store(crash_loop, Ordering::Release);
        state.with_detail(|d| {
            d.last_exit.clone_from(&self.last_exit);
            d.connector_id.clone_from(&self.connector_id);
            d.started_at = self.started_at.map(from_monotonic_ns);
            d.last_connected = self.last_connected.map(from_monotonic_ns);
            d.version.clone_from(&self.version);
        });
    }
}

/// Ends `sup`'s hold on cloudflared for an exec (no signal; see [`child::Running::release`])
/// and says what the next image needs.
pub(super) async fn detach(sup: &mut Supervisor) -> Carried {
    let released = match sup.child.take() {
        Some(run) => Some(run.release().await),
        None => None,
    };
    let (fenced, sigterm_sent) = {
        let s = sup.state.signalling();
        (s.hold, s.sigterm_sent)
    };
    Carried {
        pid: released.as_ref().map(|r| r.pid),
        stdout_fd: released.as_ref().and_then(|r| r.stdout),
        stderr_fd: released.as_ref().and_then(|r| r.stderr),
        spec: match &sup.carried_spec {
            Some(carried) => carried.clone(),
            None => sup.spec.as_ref().map(CarriedSpec::of),
        },
        machine: CarriedMachine::of(&sup.machine),
        status: CarriedStatus::of(&sup.state),
        fenced,
        sigterm_sent: sigterm_sent && released.is_some(),
    }
}

/// The supervisor of the new image from `carried`, and how its loop begins. `spec` is the one
/// the new image computed; the next applied spec counts as unchanged when it is what the
/// carried cloudflared was started from.
pub(super) fn adopt(
    carried: Carried,
    spec: Option<TunnelSpec>,
    policy: RestartPolicy,
    state: Arc<TunnelState>,
) -> anyhow::Result<(Supervisor, Begin)> {
    let mut sup = Supervisor::new(policy.clone(), state.clone())?;
    sup.machine = carried.machine.resume(policy);
    carried.status.restore(&state, carried.machine.crash_loop);
    state.signalling().hold = carried.fenced;
    sup.last_exit = carried.status.last_exit.clone().unwrap_or_default();
    if !CarriedSpec::same(carried.spec.as_ref(), spec.as_ref()) {
        sup.carried_spec = Some(carried.spec.clone());
    }
    let defaults = crate::config::CloudflaredSection::default();
    let (grace, stop_margin) = match &carried.spec {
        Some(s) => (
            Duration::from_millis(s.grace_ms),
            Duration::from_millis(s.stop_margin_ms),
        ),
        None => spec
            .as_ref()
            .map_or((defaults.grace_period, defaults.stop_margin), |s| {
                (s.grace, s.stop_margin)
            }),
    };
    sup.spec = spec;
    let Some(pid) = carried.pid else {
        state.pid.store(0, Ordering::Release);
        return Ok((sup, Begin::Nothing));
    };
    match child::adopt(pid, carried.stdout_fd, carried.stderr_fd, grace, stop_margin) {
        Adopted::Running(run) => {
            {
                let mut s = state.signalling();
                s.pid = pid;
                s.sigterm_sent = carried.sigterm_sent;
            }
            state.pid.store(pid, Ordering::Release);
            sup.child = Some(run);
            let up = state.detail().started_at.map_or(0, |t| t.elapsed().as_secs());
            let restarts = carried.status.restarts;
            tracing::info!(
                pid,
                uptime_s = up,
                restarts,
                "adopted cloudflared pid {pid} (running for {up} s, {restarts} restarts)"
            );
            Ok((sup, Begin::Nothing))
        }
        Adopted::Ended(status) => {
            tracing::warn!(pid, "cloudflared pid {pid} ended before this image could take it over");
            Ok((sup, Begin::Ended(pid, status)))
        }
        Adopted::NotOurs(e) => {
            tracing::warn!(pid, error = %e, "not adopting cloudflared pid {pid}: it is not a child of this process ({e}); it is not signalled");
            state.pid.store(0, Ordering::Release);
            let why = std::io::Error::other(format!("it is not a child of this process ({e})"));
            Ok((sup, Begin::Ended(pid, Err(why))))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::tunnel::sandbox;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            crash_loop_exits: 3,
            crash_loop_window: Duration::from_secs(60),
            give_up_after_exits: 5,
            poll_interval: Duration::from_millis(100),
            disconnected_restart_after: Duration::from_secs(30),
        }
    }

    fn close(a: tokio::time::Instant, b: tokio::time::Instant) -> bool {
        let d = if a > b { a - b } else { b - a };
        d < Duration::from_millis(5)
    }

    /// Real time: monotonic readings mean nothing under the paused clock.
    #[test]
    fn a_machine_comes_back_with_its_instants_and_counters() {
        let now = tokio::time::Instant::now();
        let mut m = Machine::new(policy());
        m.state = State::Backoff {
            at: now + Duration::from_secs(3),
        };
        m.exits = [now - Duration::from_secs(20), now - Duration::from_secs(1)].into();
        m.unstable_exits = 2;
        m.crash_loop = true;
        m.backoff.next_delay();
        m.backoff.next_delay();
        let json = serde_json::to_string(&CarriedMachine::of(&m)).unwrap();
        let back = serde_json::from_str::<CarriedMachine>(&json).unwrap().resume(policy());
        let State::Backoff { at } = back.state else {
            panic!("{:?}", back.state)
        };
        assert!(close(at, now + Duration::from_secs(3)), "{json}");
        assert!(back.exits.iter().zip(&m.exits).all(|(a, b)| close(*a, *b)));
        assert_eq!(
            (back.unstable_exits, back.crash_loop, back.backoff.attempts()),
            (2, true, 2)
        );

        let run = Run {
            started: now - Duration::from_secs(90),
            connections: 4,
            connected_once: true,
            zero_since: None,
        };
        m.state = State::Running(run.clone());
        let back = CarriedMachine::of(&m).resume(policy());
        let State::Running(back) = back.state else { panic!() };
        assert!(close(back.started, run.started));
        assert_eq!(
            (back.connections, back.connected_once, back.zero_since),
            (4, true, None)
        );
    }

    #[test]
    fn the_carried_spec_matches_an_equal_spec_and_holds_no_token() {
        let section = crate::config::CloudflaredSection {
            enabled: true,
            token_secret: Some("t".into()),
            ..Default::default()
        };
        let origin: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let make = |token: &str, grpc: bool| {
            let mut spec = TunnelSpec::new(
                &section,
                Some(crate::secret::Secret::new(token)),
                std::path::Path::new("/run/x"),
                origin,
                &[],
                grpc,
            );
            spec.sandbox = Some(sandbox::Policy {
                mode: crate::config::Sandbox::Auto,
                allow: vec![("/usr".into(), sandbox::Access::ReadExec)],
                files: Vec::new(),
                protected: vec!["/etc/tunnel-agent".into()],
            });
            spec
        };
        let carried = CarriedSpec::of(&make("sekrit-token-value", false));
        let json = serde_json::to_string(&carried).unwrap();
        assert!(!json.contains("sekrit"), "{json}");
        let carried: CarriedSpec = serde_json::from_str(&json).unwrap();
        assert!(CarriedSpec::same(
            Some(&carried),
            Some(&make("sekrit-token-value", false))
        ));
        assert!(
            !CarriedSpec::same(Some(&carried), Some(&make("sekrit-token-value", true))),
            "other args"
        );
        assert!(!CarriedSpec::same(Some(&carried), None));
        assert!(!CarriedSpec::same(None, Some(&make("x", false))));
        assert!(CarriedSpec::same(None, None));
        let mut unconfined = make("sekrit-token-value", false);
        unconfined.sandbox = None;
        assert!(!CarriedSpec::same(Some(&carried), Some(&unconfined)));
    }
}
