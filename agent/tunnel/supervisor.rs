//! The cloudflared supervisor: explicit states and a pure transition function, [`next`], driven
//! by [`supervise`], the loop that turns process exits, timers, polls and applied specs into
//! [`Event`]s and carries out the [`Output`]s.
//!
//! ```text
//!            Applied(wanted)                Spawned
//!   Idle ───────────────────▶ Starting ─────────────▶ Running ──┐ Polled (connections,
//!    ▲                          │  ▲                    │   ▲   │ stable, stuck → Starting)
//!    │ Applied(not wanted)      │  │ StartDue           │   └───┘
//!    │ from any state           │  │                    │ Exited (unrequested)
//!    │                SpawnFailed  │                    ▼
//!    │                          └─▶ Backoff { at } ◀────┘ ── too many unstable exits ─▶ GaveUp
//! ```
//!
//! `next` does no I/O and reads no clock (`now` is passed in), so its table is unit-tested with
//! paused tokio time below; the backoff delays come from [`Backoff`] (jittered).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::carried_spec::CarriedSpec;
use super::child::{describe, spawn, stop, Running};
use super::{poll_ready, record_exit, Control, RestartPolicy, TunnelSpec, TunnelState};
use crate::backoff::Backoff;

/// Why a start was asked for; a failed start is counted differently for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// A new spec was applied (promotion, reload, new routes).
    Applied,
    /// The retry after an exit or a failed start.
    Retry,
    /// The restart of a tunnel that stayed disconnected.
    Stuck,
}

/// A running cloudflared, as the machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub started: Instant,
    /// `readyConnections` at the last poll.
    pub connections: u32,
    /// Connected at least once since it started.
    pub connected_once: bool,
    /// Since when it has had no connection (after having had one).
    pub zero_since: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Nothing should run here (disabled, or standby).
    Idle,
    /// A start was asked for; its result arrives as `Spawned` or `SpawnFailed`.
    Starting(Start),
    Running(Run),
    /// The last one exited or could not start; the next start is due at `at`.
    Backoff {
        at: Instant,
    },
    /// Too many exits without staying up: the supervisor ends and systemd takes over.
    GaveUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A spec was applied: `changed` when it differs from the current one, `wanted` when it
    /// asks for a cloudflared at all.
    Applied {
        changed: bool,
        wanted: bool,
    },
    Spawned,
    SpawnFailed,
    /// The running cloudflared exited without being asked to.
    Exited,
    /// The backoff delay passed.
    StartDue,
    /// A poll of cloudflared's `/ready` (0 when it did not answer).
    Polled {
        connections: u32,
    },
}

/// What the supervisor must do (or say), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Stop the running cloudflared (one SIGTERM, grace, SIGKILL, reap).
    Stop,
    /// Start cloudflared with the current spec; `restart` counts it as a restart.
    Spawn { restart: bool },
    /// An unrequested exit, after `uptime`; the next start in `delay`.
    Exited { uptime: Duration, delay: Duration },
    /// `exits` exits within the crash-loop window; `newly` when this one made it a loop.
    CrashLoop { exits: usize, newly: bool },
    /// Give up after `unstable_exits` exits without staying up.
    GiveUp { unstable_exits: u32 },
    /// The tunnel has connections again (`connections`) after none.
    Connected { connections: u32 },
    /// The tunnel lost its last connection.
    Disconnected,
    /// Disconnected for `after`: restarting.
    StuckRestart { after: Duration },
    /// Stable for `stable_after` after a crash loop.
    Stable,
}

/// The state plus what spans states: backoff, recent exits, crash-loop flag.
#[derive(Debug, Clone)]
pub struct Machine {
    pub state: State,
    pub policy: RestartPolicy,
    pub backoff: Backoff,
    /// Exits within `crash_loop_window`.
    pub exits: VecDeque<Instant>,
    /// Exits (and failed retries) since cloudflared last stayed up for `stable_after`.
    pub unstable_exits: u32,
    pub crash_loop: bool,
}

impl Machine {
    pub fn new(policy: RestartPolicy) -> Machine {
        Machine {
            state: State::Idle,
            backoff: Backoff::new(policy.backoff, policy.backoff_max),
            policy,
            exits: VecDeque::new(),
            unstable_exits: 0,
            crash_loop: false,
        }
    }

    /// When the next start is due, in `Backoff`.
    pub fn start_due(&self) -> Option<Instant> {
        match self.state {
            State::Backoff { at } => Some(at),
            _ => None,
        }
    }

    fn forget_failures(&mut self) {
        self.backoff.reset();
        self.unstable_exits = 0;
        self.exits.clear();
        self.crash_loop = false;
    }

    fn retry_later(&mut self, now: Instant) {
        self.state = State::Backoff {
            at: crate::deadline::after(now, self.backoff.next_delay()),
        };
    }
}

/// The transition function: `event` in `m.state` at `now`.
pub fn next(m: &mut Machine, event: Event, now: Instant) -> Vec<Output> {
    let mut out = Vec::new();
    match (m.state.clone(), event) {
        // The same spec again changes nothing, unless nothing runs or waits to run.
        (_, Event::Applied { changed, wanted }) if changed || (wanted && m.state == State::Idle) => {
            if matches!(m.state, State::Running(_)) {
                out.push(Output::Stop);
            }
            m.forget_failures();
            if wanted {
                out.push(Output::Spawn { restart: false });
                m.state = State::Starting(Start::Applied);
            } else {
                m.state = State::Idle;
            }
        }
        (State::Starting(_), Event::Spawned) => {
            m.state = State::Running(Run {
                started: now,
                connections: 0,
                connected_once: false,
                zero_since: None,
            });
        }
        (State::Starting(why), Event::SpawnFailed) => {
            if why == Start::Retry {
                m.unstable_exits += 1;
            }
            m.retry_later(now);
        }
        (State::Running(run), Event::Exited) => {
            m.exits.push_back(now);
            let window = m.policy.crash_loop_window;
            while m.exits.front().is_some_and(|t| now.duration_since(*t) > window) {
                m.exits.pop_front();
            }
            m.unstable_exits += 1;
            let delay = m.backoff.next_delay();
            out.push(Output::Exited {
                uptime: now.duration_since(run.started),
                delay,
            });
            if m.exits.len() >= m.policy.crash_loop_exits as usize {
                out.push(Output::CrashLoop {
                    exits: m.exits.len(),
                    newly: !m.crash_loop,
                });
                m.crash_loop = true;
            }
            if m.policy.give_up_after_exits > 0 && m.unstable_exits >= m.policy.give_up_after_exits {
                out.push(Output::GiveUp {
                    unstable_exits: m.unstable_exits,
                });
                m.state = State::GaveUp;
            } else {
                m.state = State::Backoff {
                    at: crate::deadline::after(now, delay),
                };
            }
        }
        (State::Backoff { at }, Event::StartDue) if now >= at => {
            out.push(Output::Spawn { restart: true });
            m.state = State::Starting(Start::Retry);
        }
        (State::Running(mut run), Event::Polled { connections }) => {
            let was = run.connections;
            run.connections = connections;
            if connections > 0 {
                run.connected_once = true;
                run.zero_since = None;
                if was == 0 {
                    out.push(Output::Connected { connections });
                }
                let unstable = m.unstable_exits > 0 || m.backoff.attempts() > 0;
                if now.duration_since(run.started) >= m.policy.stable_after && unstable {
                    let was_looping = m.crash_loop;
                    m.forget_failures();
                    if was_looping {
                        out.push(Output::Stable);
                    }
                }
            } else if run.connected_once {
                let since = *run.zero_since.get_or_insert(now);
                if was > 0 {
                    out.push(Output::Disconnected);
                }
                let after = now.duration_since(since);
                if after >= m.policy.disconnected_restart_after {
                    out.extend([
                        Output::StuckRestart { after },
                        Output::Stop,
                        Output::Spawn { restart: true },
                    ]);
                    m.state = State::Starting(Start::Stuck);
                    return out;
                }
            }
            m.state = State::Running(run);
        }
        // Anything else (a late timer, a poll after an exit) changes nothing.
        _ => {}
    }
    out
}

/// What the loop does first.
pub(super) enum Begin {
    /// Nothing (an adopted cloudflared runs, or none should).
    Nothing,
    /// Apply this spec (a fresh start).
    Apply(Box<TunnelSpec>),
    /// The carried cloudflared `pid` could not be taken over (it ended, or is not our child):
    /// an exit as any other, counted and restarted by the policy.
    Ended(u32, std::io::Result<std::process::ExitStatus>),
}

/// The supervisor's loop: runs until the control channel closes (stopping cloudflared), a
/// hand-over detaches it (leaving cloudflared running), or the machine gives up (the error
/// says why).
pub(super) async fn supervise(
    sup: anyhow::Result<(Supervisor, Begin)>,
    mut rx: mpsc::Receiver<Control>,
) -> anyhow::Result<()> {
    let (mut sup, begin) = sup?;
    let mut poll = tokio::time::interval(sup.machine.policy.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    match begin {
        Begin::Nothing => {}
        Begin::Apply(spec) => sup.apply(Some(*spec)).await?,
        Begin::Ended(pid, status) => {
            if let Wake::Event(event) = sup.ended(pid, &status) {
                let outputs = next(&mut sup.machine, event, Instant::now());
                sup.carry_out(outputs, false).await?;
            }
        }
    }
    loop {
        match sup.wait(&mut rx, &mut poll).await {
            Wake::Event(event) => {
                let outputs = next(&mut sup.machine, event, Instant::now());
                sup.carry_out(outputs, event == Event::StartDue).await?;
            }
            Wake::Apply(spec, ack) => {
                sup.apply(*spec).await?;
                let _ = ack.send(());
            }
            Wake::Closed => {
                sup.stop_child().await;
                return Ok(());
            }
            Wake::Detach(reply) => {
                // The caller lets go of cloudflared (`carry::detach`) once the loop has ended.
                let _ = reply.send(Box::new(sup));
                return Ok(());
            }
            Wake::Nothing => {}
        }
    }
}

/// What woke the loop.
enum Wake {
    /// An event for the machine.
    Event(Event),
    /// A spec to apply, and who waits for it to be applied.
    Apply(Box<Option<TunnelSpec>>, tokio::sync::oneshot::Sender<()>),
    /// The control channel closed: stop cloudflared and end.
    Closed,
    /// A hand-over: end, handing the loop's state to whoever lets go of cloudflared.
    Detach(tokio::sync::oneshot::Sender<Box<Supervisor>>),
    /// Something that is no event (a poll without a child, the fence's own SIGTERM).
    Nothing,
}

/// What the loop keeps between events: the machine, the applied spec and the child it runs.
pub(super) struct Supervisor {
    pub(super) machine: Machine,
    /// The spec applied last (`None`: nothing should run).
    pub(super) spec: Option<TunnelSpec>,
    /// After an adoption, until the next apply: the carried form of the spec the adopted
    /// cloudflared was started from (`Some(None)`: none was wanted), when it is not `spec`'s.
    /// The next applied spec is compared with it.
    pub(super) carried_spec: Option<Option<CarriedSpec>>,
    pub(super) child: Option<Running>,
    /// How the last cloudflared ended, for the log lines about it.
    pub(super) last_exit: String,
    pub(super) state: Arc<TunnelState>,
    /// Polls cloudflared's `/ready` (and `/config`, when `ingress_reads` says).
    http: reqwest::Client,
    ingress_reads: super::remote_ingress::Schedule,
}

impl Supervisor {
    pub(super) fn new(policy: RestartPolicy, state: Arc<TunnelState>) -> anyhow::Result<Supervisor> {
        let http = reqwest::Client::builder()
            .timeout(policy.poll_interval.max(Duration::from_millis(500)))
            .no_proxy()
            .build()?;
        Ok(Supervisor {
            machine: Machine::new(policy),
            spec: None,
            carried_spec: None,
            child: None,
            last_exit: String::new(),
            state,
            http,
            ingress_reads: Default::default(),
        })
    }

    /// Makes `new` the spec, then does what the machine says about it.
    async fn apply(&mut self, new: Option<TunnelSpec>) -> anyhow::Result<()> {
        let changed = match self.carried_spec.take() {
            Some(carried) => !CarriedSpec::same(carried.as_ref(), new.as_ref()),
            None => new != self.spec,
        };
        let event = Event::Applied {
            changed,
            wanted: new.is_some(),
        };
        self.spec = new;
        self.state.wanted.store(self.spec.is_some(), Ordering::Release);
        let outputs = next(&mut self.machine, event, Instant::now());
        self.carry_out(outputs, false).await
    }

    /// Waits for the child's exit, the backoff's end, a control message or the next poll.
    async fn wait(&mut self, rx: &mut mpsc::Receiver<Control>, poll: &mut tokio::time::Interval) -> Wake {
        let has_child = self.child.is_some();
        let child = &mut self.child;
        let exited = async {
            match child.as_mut() {
                Some(r) => r.exited().await,
                None => std::future::pending().await,
            }
        };
        let due = self.machine.start_due();
        let start_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = exited => self.exited(&status),
            _ = start_due => Wake::Event(Event::StartDue),
            msg = rx.recv() => match msg {
                Some(Control::Apply(new, ack)) => Wake::Apply(new, ack),
                Some(Control::Detach(reply)) => Wake::Detach(reply),
                None => Wake::Closed,
            },
            _ = poll.tick(), if has_child => self.poll().await,
        }
    }

    /// The child ended with `status`.
    fn exited(&mut self, status: &std::io::Result<std::process::ExitStatus>) -> Wake {
        let pid = self.child.take().map_or(0, |r| r.pid);
        self.ended(pid, status)
    }

    /// The cloudflared `pid` ended with `status` (or could not be taken over).
    fn ended(&mut self, pid: u32, status: &std::io::Result<std::process::ExitStatus>) -> Wake {
        self.last_exit = describe(status);
        record_exit(&self.state, pid);
        self.state.with_detail(|d| d.last_exit = Some(self.last_exit.clone()));
        if self.state.held() {
            // The fence's SIGTERM did this; the node is leaving active and will apply `None`:
            // no restart, and no failure counted.
            let last_exit = &self.last_exit;
            tracing::info!(result = %last_exit, "cloudflared stopped after the fence's SIGTERM: {last_exit}");
            return Wake::Nothing;
        }
        Wake::Event(Event::Exited)
    }

    /// Asks the running cloudflared's `/ready` how many connections it has.
    async fn poll(&mut self) -> Wake {
        let Some(metrics) = self.spec.as_ref().map(|s| s.metrics) else {
            return Wake::Nothing;
        };
        let polled = poll_ready(&self.http, metrics).await;
        let answered = polled.is_some();
        let (connections, connector) = polled.unwrap_or((0, None));
        if self.child.is_none() {
            return Wake::Nothing;
        }
        self.state.connections.store(connections, Ordering::Release);
        if connector.is_some() {
            // cloudflared has its connector id before any connection (its /ready says so
            // with a 503 too).
            self.state.with_detail(|d| d.connector_id = connector);
        }
        if connections > 0 {
            self.state.with_detail(|d| d.last_connected = Some(Instant::now()));
        }
        if let (Some(spec), Some(child), true) = (&self.spec, &self.child, answered) {
            if self.ingress_reads.due(child.pid) {
                super::remote_ingress::check(&self.http, spec, child.pid, &self.state).await;
            }
        }
        Wake::Event(Event::Polled { connections })
    }

    async fn stop_child(&mut self) {
        if let Some(r) = self.child.take() {
            stop(r, &self.state).await;
        }
    }

    /// Carries out `outputs`; spawn results go back into the machine. `retry`: the spawn is
    /// the retry of an earlier failure (its error says "restart").
    async fn carry_out(&mut self, outputs: Vec<Output>, retry: bool) -> anyhow::Result<()> {
        for output in outputs {
            match output {
                Output::Stop => self.stop_child().await,
                Output::Spawn { restart } => self.spawn(restart, retry),
                other => self.report(other)?,
            }
            self.state.crash_loop.store(self.machine.crash_loop, Ordering::Release);
        }
        self.state.crash_loop.store(self.machine.crash_loop, Ordering::Release);
        Ok(())
    }

    /// Starts cloudflared with the current spec and tells the machine how that went.
    fn spawn(&mut self, restart: bool, retry: bool) {
        if restart {
            self.state.restarts.fetch_add(1, Ordering::AcqRel);
        }
        // No spec: adopted with none and nothing applied since. A failed start, so the machine
        // waits in `Backoff` (not in `Starting`, which only a spawn result leaves).
        let started = match &self.spec {
            Some(s) => spawn(s, &self.state),
            None => Err(anyhow::anyhow!("no spec applied since the upgrade")),
        };
        let event = match started {
            Ok(r) => {
                self.child = Some(r);
                Event::Spawned
            }
            Err(e) => {
                let what = if restart || retry {
                    "cannot restart cloudflared"
                } else {
                    "cannot start cloudflared"
                };
                tracing::error!(error = %format!("{e:#}"), "{what}: {e:#}");
                Event::SpawnFailed
            }
        };
        next(&mut self.machine, event, Instant::now());
    }

    /// Says what an output means (log, systemd status); giving up is the loop's error.
    fn report(&self, output: Output) -> anyhow::Result<()> {
        let last_exit = &self.last_exit;
        match output {
            Output::Stop | Output::Spawn { .. } => {}
            Output::Exited { uptime, delay } => {
                tracing::warn!(result = %last_exit, uptime_s = uptime.as_secs_f64(), restart_in_ms = delay.as_millis() as u64, "cloudflared exited unexpectedly ({last_exit}) after {:.1}s; restarting in {delay:?}", uptime.as_secs_f64());
            }
            Output::CrashLoop { exits, newly } => {
                let window = self.machine.policy.crash_loop_window.as_secs();
                if newly {
                    tracing::error!(
                        exits,
                        window_s = window,
                        "cloudflared is crash-looping: {exits} exits in {window}s, last {last_exit}"
                    );
                }
                crate::systemd::status(&format!(
                    "cloudflared crash loop: {exits} exits in {window}s, last {last_exit}"
                ));
            }
            Output::GiveUp { unstable_exits } => {
                anyhow::bail!(
                    "cloudflared exited {unstable_exits} times without staying up (last: {last_exit}); giving up so systemd's restart policy takes over"
                );
            }
            Output::Connected { connections } => {
                tracing::info!(connections, "tunnel connected ({connections} connections)");
                crate::systemd::status(&format!("serving; tunnel connected ({connections} connections)"));
            }
            Output::Disconnected => {
                tracing::warn!("tunnel lost its last connection");
                crate::systemd::status("serving; tunnel disconnected");
            }
            Output::StuckRestart { after } => {
                tracing::warn!(
                    disconnected_s = after.as_secs(),
                    "tunnel stayed disconnected; restarting cloudflared (disconnected for {after:?})"
                );
            }
            Output::Stable => tracing::info!("cloudflared is stable again"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            stable_after: Duration::from_secs(10),
            crash_loop_exits: 3,
            crash_loop_window: Duration::from_secs(60),
            give_up_after_exits: 5,
            poll_interval: Duration::from_millis(100),
            disconnected_restart_after: Duration::from_secs(30),
        }
    }

    const WANT: Event = Event::Applied {
        changed: true,
        wanted: true,
    };

    /// A machine with a cloudflared running since now.
    fn running() -> Machine {
        let mut m = Machine::new(policy());
        assert_eq!(next(&mut m, WANT, Instant::now()), [Output::Spawn { restart: false }]);
        assert_eq!(m.state, State::Starting(Start::Applied));
        assert!(next(&mut m, Event::Spawned, Instant::now()).is_empty());
        assert!(matches!(m.state, State::Running(_)));
        m
    }

    /// Lets the backoff pass and starts again.
    async fn restart_after_backoff(m: &mut Machine) -> Duration {
        let at = m.start_due().expect("waiting to restart");
        let delay = at - Instant::now();
        // Early: nothing happens.
        assert!(next(m, Event::StartDue, Instant::now()).is_empty());
        tokio::time::sleep_until(at).await;
        assert_eq!(
            next(m, Event::StartDue, Instant::now()),
            [Output::Spawn { restart: true }]
        );
        assert_eq!(m.state, State::Starting(Start::Retry));
        next(m, Event::Spawned, Instant::now());
        delay
    }

    #[tokio::test(start_paused = true)]
    async fn apply_starts_stops_and_replaces() {
        let mut m = running();
        let same = Event::Applied {
            changed: false,
            wanted: true,
        };
        assert!(next(&mut m, same, Instant::now()).is_empty(), "same spec: no restart");
        assert_eq!(
            next(&mut m, WANT, Instant::now()),
            [Output::Stop, Output::Spawn { restart: false }],
            "a new spec replaces the running one"
        );
        next(&mut m, Event::Spawned, Instant::now());
        let off = Event::Applied {
            changed: true,
            wanted: false,
        };
        assert_eq!(next(&mut m, off, Instant::now()), [Output::Stop]);
        assert_eq!(m.state, State::Idle);
        // Idle and the same (absent) spec again: still nothing.
        let off_again = Event::Applied {
            changed: false,
            wanted: false,
        };
        assert!(next(&mut m, off_again, Instant::now()).is_empty());
        // Idle, and the spec that was applied before (unchanged): start it.
        assert_eq!(next(&mut m, same, Instant::now()), [Output::Spawn { restart: false }]);
    }

    #[tokio::test(start_paused = true)]
    async fn exits_back_off_exponentially_then_loop_then_give_up() {
        let mut m = running();
        let p = policy();
        let mut delays = Vec::new();
        for n in 1..=4u32 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let out = next(&mut m, Event::Exited, Instant::now());
            let Output::Exited { uptime, delay } = out[0] else {
                panic!("{out:?}")
            };
            assert_eq!(uptime, Duration::from_secs(1));
            let ceiling = (p.backoff * 2u32.pow(n - 1)).min(p.backoff_max);
            assert!(delay >= p.backoff / 2 && delay <= ceiling, "exit {n}: {delay:?}");
            let looping = out.iter().find(|o| matches!(o, Output::CrashLoop { .. }));
            match n {
                1 | 2 => assert!(looping.is_none(), "{out:?}"),
                3 => assert_eq!(looping, Some(&Output::CrashLoop { exits: 3, newly: true })),
                _ => assert_eq!(looping, Some(&Output::CrashLoop { exits: 4, newly: false })),
            }
            assert!(m.crash_loop == (n >= 3));
            delays.push(restart_after_backoff(&mut m).await);
        }
        assert_eq!(delays.len(), 4);
        tokio::time::advance(Duration::from_secs(1)).await;
        let out = next(&mut m, Event::Exited, Instant::now());
        assert_eq!(out.last(), Some(&Output::GiveUp { unstable_exits: 5 }));
        assert_eq!(m.state, State::GaveUp);
        assert!(
            next(&mut m, Event::StartDue, Instant::now()).is_empty(),
            "gave up for good"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exits_outside_the_window_do_not_make_a_loop() {
        let mut m = running();
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(61)).await;
            let out = next(&mut m, Event::Exited, Instant::now());
            assert!(!out.iter().any(|o| matches!(o, Output::CrashLoop { .. })), "{out:?}");
            restart_after_backoff(&mut m).await;
        }
        assert_eq!(m.exits.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn staying_connected_for_stable_after_forgets_the_failures() {
        let mut m = running();
        for _ in 0..3 {
            next(&mut m, Event::Exited, Instant::now());
            restart_after_backoff(&mut m).await;
        }
        assert!(m.crash_loop);
        assert_eq!(
            next(&mut m, Event::Polled { connections: 4 }, Instant::now()),
            [Output::Connected { connections: 4 }]
        );
        assert_eq!(m.unstable_exits, 3, "not stable yet");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            next(&mut m, Event::Polled { connections: 4 }, Instant::now()),
            [Output::Stable]
        );
        assert_eq!((m.unstable_exits, m.backoff.attempts(), m.crash_loop), (0, 0, false));
        // The next exit starts the backoff from the beginning.
        let out = next(&mut m, Event::Exited, Instant::now());
        assert!(matches!(out[0], Output::Exited { delay, .. } if delay <= Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_that_stays_disconnected_is_restarted() {
        let mut m = running();
        // Never connected yet: no verdict.
        assert!(next(&mut m, Event::Polled { connections: 0 }, Instant::now()).is_empty());
        next(&mut m, Event::Polled { connections: 2 }, Instant::now());
        assert_eq!(
            next(&mut m, Event::Polled { connections: 0 }, Instant::now()),
            [Output::Disconnected]
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(next(&mut m, Event::Polled { connections: 0 }, Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            next(&mut m, Event::Polled { connections: 0 }, Instant::now()),
            [
                Output::StuckRestart {
                    after: Duration::from_secs(30)
                },
                Output::Stop,
                Output::Spawn { restart: true }
            ]
        );
        assert_eq!(m.state, State::Starting(Start::Stuck));
        // A failed restart waits out a backoff without counting as an unstable exit.
        next(&mut m, Event::SpawnFailed, Instant::now());
        assert!(m.start_due().is_some());
        assert_eq!(m.unstable_exits, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_retry_counts_towards_giving_up() {
        let mut m = running();
        next(&mut m, Event::Exited, Instant::now());
        let at = m.start_due().unwrap();
        tokio::time::sleep_until(at).await;
        next(&mut m, Event::StartDue, Instant::now());
        next(&mut m, Event::SpawnFailed, Instant::now());
        assert_eq!(m.unstable_exits, 2);
        assert!(m.start_due().unwrap() > at);
        // A failed start of a newly applied spec does not count.
        next(&mut m, WANT, Instant::now());
        next(&mut m, Event::SpawnFailed, Instant::now());
        assert_eq!(m.unstable_exits, 0);
        assert!(m.start_due().is_some());
    }

    /// The loop's state alone, without a process: an exit is the machine's event unless the
    /// fence caused it, and giving up is the loop's error.
    #[tokio::test]
    async fn the_loop_state_sorts_exits_and_ends_on_giving_up() {
        use std::os::unix::process::ExitStatusExt;
        let state = Arc::new(TunnelState::default());
        let mut sup = Supervisor::new(policy(), state.clone()).unwrap();
        sup.apply(None).await.unwrap();
        assert_eq!(sup.machine.state, State::Idle);
        assert!(!state.wanted.load(Ordering::Acquire));
        assert!(matches!(sup.poll().await, Wake::Nothing), "no spec: nothing to poll");

        let status = Ok(std::process::ExitStatus::from_raw(1 << 8));
        assert!(matches!(sup.exited(&status), Wake::Event(Event::Exited)));
        assert_eq!(sup.last_exit, "exited with code 1");
        assert_eq!(state.detail().last_exit.as_deref(), Some("exited with code 1"));
        state.fence();
        assert!(
            matches!(sup.exited(&status), Wake::Nothing),
            "the fence's SIGTERM is no failure"
        );

        sup.machine.crash_loop = true;
        let e = sup
            .carry_out(vec![Output::GiveUp { unstable_exits: 5 }], false)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("exited 5 times without staying up (last: exited with code 1)"),
            "{e}"
        );
        sup.carry_out(vec![Output::Stable], false).await.unwrap();
        assert!(state.crash_loop.load(Ordering::Acquire), "the flag is published");

        // A restart due with no spec to start from (adopted with none): a failed start.
        sup.machine.state = State::Starting(Start::Retry);
        sup.spawn(true, true);
        assert!(sup.machine.start_due().is_some(), "{:?}", sup.machine.state);
    }
}
