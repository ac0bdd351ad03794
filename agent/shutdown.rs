//! One way to stop whatever the agent started: pingora's `ShutdownWatch` and linkerd's `drain`
//! are the models.
//!
//! Every started service runs as a task watching a [`ShutdownWatch`]: `None` while it runs, then
//! `Some(grace)`: finish what is in flight within `grace`, and end. A [`Stop`] holds the other
//! side, the watch's sender and the task. Stopping sends the grace and waits for the task, for
//! [`SLACK`] beyond the grace; a task still running then is aborted, and the log says so.
//!
//! A task with nothing to finish (an idle watch, a probe loop) is stopped the same way:
//! [`Stop::aborting`] wraps it in a service that aborts it when told to stop. A value that the
//! boot sequence and the event loop use by `&mut` (the node) is [`Stop::lend`]: it comes back to
//! its stop when they let go of it, and is stopped when the stack reaches it.
//!
//! [`Stops`] is the stack: boot pushes each step's stop, shutdown (or a failed step) pops them,
//! so stopping mirrors starting.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Config;

/// What a service watches: `None` while it runs; `Some(grace)` once it is to stop, finishing
/// what is in flight within `grace`.
pub type ShutdownWatch = watch::Receiver<Option<Duration>>;

/// How long a service may take to finish, read from the configuration in effect when it stops
/// (a reload may have changed `agent.shutdown_grace` since boot).
pub type Grace = fn(&Config) -> Duration;

/// How long a stop waits beyond the grace before it aborts the service's task. A service that
/// honours its watch ends within its grace; the slack covers the close after it.
pub const SLACK: Duration = Duration::from_secs(5);

/// Something started, and how to stop it: its watch's sender and its task (which returns
/// whether it finished everything within its grace).
pub struct Stop {
    what: &'static str,
    grace: Grace,
    signal: watch::Sender<Option<Duration>>,
    task: JoinHandle<bool>,
    /// Left running by an upgrade in place ([`Stops::hand_over`]): what it owns goes on in
    /// the next image.
    carried: bool,
}

/// A new watch for a service, and the sender its [`Stop`] keeps.
pub fn channel() -> (watch::Sender<Option<Duration>>, ShutdownWatch) {
    watch::channel(None)
}

/// No time to finish anything: for tasks that hold no requests.
pub fn no_grace(_: &Config) -> Duration {
    Duration::ZERO
}

impl Stop {
    /// A service already running as `task`, watching the receiver of `signal`.
    pub fn new(
        what: &'static str,
        grace: Grace,
        signal: watch::Sender<Option<Duration>>,
        task: JoinHandle<bool>,
    ) -> Stop {
        Stop {
            what,
            grace,
            signal,
            task,
            carried: false,
        }
    }

    /// Marks a stop that an upgrade in place must not run: what it stops (the node's
    /// cloudflared and election) is handed to the next image instead.
    pub fn carried_over(mut self) -> Stop {
        self.carried = true;
        self
    }

    /// Spawns `service` with a new watch.
    pub fn spawn<S, F>(what: &'static str, grace: Grace, service: S) -> Stop
    where
        S: FnOnce(ShutdownWatch) -> F,
        F: Future<Output = bool> + Send + 'static,
    {
        let (signal, watch) = channel();
        Stop::new(what, grace, signal, tokio::spawn(service(watch)))
    }

    /// A task that has nothing to finish: told to stop, it is aborted (and waited for, so what
    /// it holds is gone when the stop returns).
    pub fn aborting(what: &'static str, mut task: JoinHandle<()>) -> Stop {
        Stop::spawn(what, no_grace, move |mut watch| async move {
            tokio::select! {
                _ = &mut task => {}
                _ = watch.changed() => {
                    task.abort();
                    let _ = task.await;
                }
            }
            true
        })
    }

    /// `value` lent to whoever needs it by `&mut` until then: when the [`Lent`] is dropped (a
    /// later step failed, or the event loop ended), the value comes back here, and `stop` runs on
    /// it once this stop is popped.
    pub fn lend<T, S, F>(what: &'static str, grace: Grace, value: T, stop: S) -> (Lent<T>, Stop)
    where
        T: Send + 'static,
        S: FnOnce(T) -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        let (home, back) = oneshot::channel();
        let stop = Stop::spawn(what, grace, move |mut watch| async move {
            let Ok(value) = back.await else { return true };
            // A dropped sender (the stack itself dropped) stops it too.
            let _ = watch.wait_for(Option::is_some).await;
            stop(value).await;
            true
        });
        let lent = Lent {
            value: Some(value),
            home: Some(home),
        };
        (lent, stop)
    }

    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Tells the service to stop within its grace under `in_effect`, and waits for it (the grace
    /// plus [`SLACK`] at most). Returns whether it finished everything in time.
    pub async fn stop(self, in_effect: &Config) -> bool {
        let grace = (self.grace)(in_effect);
        self.stop_within(grace).await
    }

    /// Tells the service to stop within `grace`, and waits for it ([`SLACK`] beyond).
    pub async fn stop_within(self, grace: Duration) -> bool {
        let Stop {
            what, signal, mut task, ..
        } = self;
        tracing::debug!(what, grace_s = grace.as_secs_f64(), "stopping the {what}");
        let _ = signal.send(Some(grace));
        let bound = grace.saturating_add(SLACK);
        match tokio::time::timeout(bound, &mut task).await {
            Ok(Ok(finished)) => finished,
            Ok(Err(e)) => {
                tracing::warn!(what, error = %e, "the {what} ended abnormally while stopping: {e}");
                false
            }
            Err(_) => {
                task.abort();
                tracing::warn!(
                    what,
                    bound_s = bound.as_secs_f64(),
                    "the {what} did not stop within {bound:?}; aborted"
                );
                false
            }
        }
    }
}

/// A value lent out by [`Stop::lend`]; dropping it hands the value back to its stop.
pub struct Lent<T> {
    value: Option<T>,
    home: Option<oneshot::Sender<T>>,
}

impl<T> Deref for Lent<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("a Lent holds its value until dropped")
    }
}

impl<T> DerefMut for Lent<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("a Lent holds its value until dropped")
    }
}

impl<T> Drop for Lent<T> {
    fn drop(&mut self) {
        if let (Some(value), Some(home)) = (self.value.take(), self.home.take()) {
            // Its stop is gone only when the runtime is: nothing is left to stop it then.
            let _ = home.send(value);
        }
    }
}

/// The stop stack: each boot step that starts something pushes its [`Stop`]; [`Stops::stop_all`]
/// pops them, last started first stopped.
#[derive(Default)]
pub struct Stops {
    stack: Vec<Stop>,
}

impl Stops {
    pub fn push(&mut self, stop: Stop) {
        self.stack.push(stop);
    }

    /// How many stops the stack holds (a position for [`Stops::insert`]).
    pub fn len(&self) -> usize {
        self.stack.len()
    }

    /// Whether nothing was started.
    pub fn is_empty(&self) -> bool {
        self.stack.is_empty()
    }

    /// Puts a stop where the stack was `at` long (its step runs later than its place in the
    /// list, but stops as if it had run there).
    pub fn insert(&mut self, at: usize, stop: Stop) {
        let at = at.min(self.stack.len());
        self.stack.insert(at, stop);
    }

    /// Pushes a step's stop and hands back what the step started.
    pub fn keep<T>(&mut self, (started, stop): (T, Stop)) -> T {
        self.push(stop);
        started
    }

    /// Pushes a step's stop, when the step started something.
    pub fn keep_some<T>(&mut self, (started, stop): (T, Option<Stop>)) -> T {
        self.stack.extend(stop);
        started
    }

    /// Pops the stack, stopping each in turn under the configuration `in_effect`.
    pub async fn stop_all(mut self, in_effect: &Config) {
        while let Some(stop) = self.stack.pop() {
            stop.stop(in_effect).await;
        }
    }

    /// An upgrade in place: pops the stack like [`Stops::stop_all`], each listener draining for
    /// its grace but at most `drain`, except the stops marked [`Stop::carried_over`], which are
    /// returned unrun: the caller holds them (dropping one would run it) until its exec.
    pub async fn hand_over(mut self, in_effect: &Config, drain: Duration) -> Vec<Stop> {
        let mut kept = Vec::new();
        while let Some(stop) = self.stack.pop() {
            if stop.carried {
                kept.push(stop);
            } else {
                let grace = (stop.grace)(in_effect).min(drain);
                stop.stop_within(grace).await;
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Log = Arc<Mutex<Vec<String>>>;

    fn entries(log: &Log) -> Vec<String> {
        log.lock().unwrap().clone()
    }

    /// A service that notes when it is told to stop, and with which grace.
    fn service(name: &'static str, log: &Log) -> Stop {
        let log = log.clone();
        Stop::spawn(
            name,
            |c| c.agent.shutdown_grace,
            move |mut watch| async move {
                let _ = watch.wait_for(Option::is_some).await;
                let grace = watch.borrow().unwrap_or_default();
                log.lock().unwrap().push(format!("{name} {grace:?}"));
                true
            },
        )
    }

    fn grace(secs: u64) -> Config {
        let mut c = Config::default();
        c.agent.shutdown_grace = Duration::from_secs(secs);
        c
    }

    #[tokio::test]
    async fn the_stack_pops_in_reverse_with_the_grace_in_effect() {
        let log = Log::default();
        let mut stops = Stops::default();
        for name in ["health", "proxy", "api"] {
            stops.push(service(name, &log));
        }
        stops.stop_all(&grace(7)).await;
        assert_eq!(entries(&log), ["api 7s", "proxy 7s", "health 7s"]);
    }

    /// A list of steps as boot writes it: the third fails, so the fourth never starts, and the
    /// stack stops the two that did, in reverse.
    #[tokio::test]
    async fn a_failing_step_stops_what_the_earlier_ones_started() {
        async fn steps(stops: &mut Stops, log: &Log) -> Result<(), String> {
            stops.push(service("first", log));
            stops.push(service("second", log));
            Err::<(), _>("the third step failed".to_owned())?;
            stops.push(service("fourth", log));
            Ok(())
        }
        let log = Log::default();
        let mut stops = Stops::default();
        let booted = steps(&mut stops, &log).await;
        assert_eq!(booted, Err("the third step failed".to_owned()));
        assert!(entries(&log).is_empty(), "nothing stops before the stack is popped");
        stops.stop_all(&grace(1)).await;
        assert_eq!(entries(&log), ["second 1s", "first 1s"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_ignores_its_watch_is_aborted_after_the_slack() {
        let started = tokio::time::Instant::now();
        let stop = Stop::spawn(
            "stubborn",
            |c| c.agent.shutdown_grace,
            |_watch| async {
                std::future::pending::<()>().await;
                true
            },
        );
        assert!(!stop.stop(&grace(2)).await, "not finished: aborted");
        assert_eq!(started.elapsed(), Duration::from_secs(2) + SLACK);
    }

    #[tokio::test]
    async fn an_aborting_stop_ends_a_task_that_never_looks_at_a_watch() {
        let (dropped_tx, dropped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _held = dropped_tx;
            std::future::pending::<()>().await;
        });
        let stop = Stop::aborting("watch", task);
        assert!(stop.stop(&grace(30)).await);
        // The task's state is gone once the stop returns: its sender was dropped.
        assert!(dropped.await.is_err());
    }

    #[tokio::test]
    async fn a_hand_over_drains_for_at_most_its_bound_and_runs_no_carried_stop() {
        let log = Log::default();
        let mut stops = Stops::default();
        stops.push(service("health", &log));
        let node_log = log.clone();
        let node = stops.keep(Stop::lend("node", no_grace, 1u32, move |n| async move {
            node_log.lock().unwrap().push(format!("node {n}"));
        }));
        let last = stops.stack.pop().unwrap().carried_over();
        stops.push(last);
        stops.push(service("proxy", &log));
        drop(node);
        let kept = stops.hand_over(&grace(30), Duration::from_secs(2)).await;
        assert_eq!(entries(&log), ["proxy 2s", "health 2s"]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].what(), "node");
        tokio::task::yield_now().await;
        assert_eq!(entries(&log), ["proxy 2s", "health 2s"], "the carried stop did not run");
    }

    #[tokio::test]
    async fn a_lent_value_is_stopped_when_its_turn_comes_not_when_it_is_dropped() {
        let log = Log::default();
        let mut stops = Stops::default();
        let node_log = log.clone();
        let mut lent = stops.keep(Stop::lend("node", no_grace, 1u32, move |n| async move {
            node_log.lock().unwrap().push(format!("node {n}"));
        }));
        *lent += 1;
        stops.push(service("after", &log));
        // A later step fails: the value goes home, nothing is stopped yet.
        drop(lent);
        tokio::task::yield_now().await;
        assert!(entries(&log).is_empty());
        stops.stop_all(&grace(0)).await;
        assert_eq!(entries(&log), ["after 0ns", "node 2"]);
    }
}
