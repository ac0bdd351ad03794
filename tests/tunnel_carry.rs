//! cloudflared carried across an in-place upgrade (issue 20), in one process: a supervisor
//! detaches from the fake cloudflared as the old image does before its `execve`, the state goes
//! through JSON as it does through the hand-over's memfd, and a fresh supervisor adopts it as
//! the new image does. cloudflared is the test process's child all along, as it stays the
//! agent's across the exec (same pid). What a real exec adds (CLOEXEC cleared on the carried
//! descriptors, the new binary) is the hand-over's, tested there.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, FakeCloudflared, DEADLINE};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tunnel_agent::config::CloudflaredSection;
use tunnel_agent::secret::Secret;
use tunnel_agent::tunnel::{Carried, RestartPolicy, TunnelSpec, TunnelState, TunnelSupervisor};

const TOKEN: &str = "eyJhIjoiY2FycmllZC10b2tlbi1kby1ub3QtbGVhayJ9";

/// The agent's log, as text: a subscriber for this test's thread (the runtime is current-thread,
/// so the supervisors' tasks log there too).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (log.clone(), tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits for a line holding every one of `words`.
    async fn wait_for(&self, words: &[&str]) -> String {
        eventually(DEADLINE, &format!("a log line with {words:?}"), || async {
            self.text()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .map(str::to_owned)
        })
        .await
    }
}

fn section(cf: &FakeCloudflared) -> CloudflaredSection {
    CloudflaredSection {
        enabled: true,
        path: cf.program(),
        token_secret: Some("tunnel_token".into()),
        metrics: cf.metrics,
        grace_period: Duration::from_secs(2),
        stop_margin: Duration::from_millis(500),
        poll_interval: Duration::from_millis(100),
        restart_backoff: Duration::from_millis(100),
        restart_backoff_max: Duration::from_millis(400),
        // One exit makes a crash loop: a flag to carry.
        crash_loop_exits: 1,
        ..Default::default()
    }
}

fn spec_of(section: &CloudflaredSection, dir: &Path) -> TunnelSpec {
    let origin = "127.0.0.1:9".parse().unwrap();
    TunnelSpec::new(section, Some(Secret::new(TOKEN)), dir, origin, &[], false)
}

struct Setup {
    _dir: tempfile::TempDir,
    cf: FakeCloudflared,
    spec: TunnelSpec,
    policy: RestartPolicy,
    log: Log,
    _guard: tracing::subscriber::DefaultGuard,
}

fn setup() -> Setup {
    let (log, guard) = Log::capture();
    let dir = tempfile::tempdir().unwrap();
    let cf = FakeCloudflared::new(dir.path());
    let section = section(&cf);
    Setup {
        spec: spec_of(&section, dir.path()),
        policy: RestartPolicy::from(&section),
        _dir: dir,
        cf,
        log,
        _guard: guard,
    }
}

async fn connected(state: &TunnelState, pid: u32) {
    eventually(DEADLINE, &format!("cloudflared pid {pid} connected"), || async {
        let up = state.pid.load(Ordering::Acquire) == pid && state.connections.load(Ordering::Acquire) == 4;
        up.then_some(())
    })
    .await
}

/// A started supervisor whose cloudflared (its second: the first was killed, so there are
/// counters to carry) is connected; its pid.
async fn running(s: &Setup, state: &Arc<TunnelState>) -> (TunnelSupervisor, u32) {
    let sup = TunnelSupervisor::start(Some(s.spec.clone()), s.policy.clone(), state.clone());
    let first = s.cf.wait_starts(1, DEADLINE).await[0];
    connected(state, first).await;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let pid = s.cf.wait_starts(2, DEADLINE).await[1];
    connected(state, pid).await;
    (sup, pid)
}

/// Whether `pid` is a child of this process that has not ended.
fn running_child(pid: u32) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) == Ok(WaitStatus::StillAlive)
}

fn reaped(pid: u32) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) == Err(Errno::ECHILD)
}

fn open_cloexec(fd: i32) -> bool {
    fcntl(fd, FcntlArg::F_GETFD).is_ok_and(|f| FdFlag::from_bits_truncate(f).contains(FdFlag::FD_CLOEXEC))
}

/// Closes the carried descriptors, as the hand-over does when it commits.
fn commit(carried: &Carried) {
    for fd in carried.fds() {
        nix::unistd::close(fd).unwrap();
    }
}

/// Through JSON, as through the hand-over's memfd; the token never in it.
fn through_json(carried: &Carried) -> Carried {
    let json = serde_json::to_string(carried).unwrap();
    assert!(!json.contains(TOKEN), "the token is carried: {json}");
    serde_json::from_str(&json).unwrap()
}

#[tokio::test]
async fn a_detached_cloudflared_runs_on_and_is_adopted_with_its_counters_and_output() {
    let s = setup();
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    let started_at = old.detail().started_at.unwrap();

    let carried = sup.detach().await.expect("the loop was running");
    assert_eq!(carried.pid, Some(pid));
    assert_eq!(carried.fds().len(), 2, "{carried:?}");
    assert!(
        carried.fds().into_iter().all(open_cloexec),
        "the pipes stay open: {carried:?}"
    );
    assert!(kill(Pid::from_raw(pid as i32), None).is_ok());
    assert!(running_child(pid), "still our child, not reaped");
    assert_eq!(s.cf.sigterms(pid), 0, "{:?}", s.cf.events());
    let carried = through_json(&carried);
    assert_eq!((carried.status.restarts, carried.machine.crash_loop), (1, true));
    assert_eq!(carried.spec.as_ref().map(|s| s.has_token), Some(true));

    // cloudflared logs while no image reads it: the line waits in the pipe.
    s.cf.set_mode("disconnected");
    let ready = format!("http://{}/ready", s.cf.metrics);
    eventually(DEADLINE, "the fake disconnected", || async {
        let body = reqwest::get(&ready).await.ok()?.text().await.ok()?;
        body.contains("\"readyConnections\":0").then_some(())
    })
    .await;
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried.clone(), Some(s.spec.clone()), s.policy.clone(), new.clone());
    assert_eq!(new.pid.load(Ordering::Acquire), pid);
    assert_eq!(new.restarts.load(Ordering::Acquire), 1);
    assert!(new.crash_loop.load(Ordering::Acquire));
    let kept = new.detail().started_at.unwrap();
    let drift = if kept > started_at {
        kept - started_at
    } else {
        started_at - kept
    };
    assert!(drift < Duration::from_millis(5), "started_at moved by {drift:?}");
    s.log
        .wait_for(&[&format!("adopted cloudflared pid {pid} (running for "), "1 restarts)"])
        .await;
    s.log.wait_for(&["Connection terminated", &format!("pid={pid}")]).await;
    assert!(
        carried.fds().into_iter().all(open_cloexec),
        "adopt leaves the carried numbers alone"
    );

    // The hand-over commits: the new image reads through its own duplicates.
    commit(&carried);
    s.cf.set_mode("connected");
    s.log
        .wait_for(&["Registered tunnel connection connIndex=3", &format!("pid={pid}")])
        .await;
    connected(&new, pid).await;

    // The same spec as the one cloudflared runs from: nothing restarts.
    sup.apply(Some(s.spec.clone())).await;
    assert_eq!(s.cf.started_pids().len(), 2, "{:?}", s.cf.events());
    assert_eq!(new.pid.load(Ordering::Acquire), pid);

    // Stopping the adopted cloudflared: one SIGTERM, reaped, pid cleared.
    sup.shutdown().await;
    assert_eq!(s.cf.sigterms(pid), 1, "{:?}", s.cf.events());
    assert_eq!(s.cf.exit_code(pid), Some(0));
    assert!(reaped(pid));
    assert_eq!(new.pid.load(Ordering::Acquire), 0);
    assert!(!s.log.text().contains(TOKEN));
}

#[tokio::test]
async fn an_adopted_cloudflared_that_exits_is_counted_and_restarted() {
    let s = setup();
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    let carried = through_json(&sup.detach().await.unwrap());
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried.clone(), Some(s.spec.clone()), s.policy.clone(), new.clone());
    commit(&carried);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let next = s.cf.wait_starts(3, DEADLINE).await[2];
    connected(&new, next).await;
    assert!(reaped(pid));
    assert_eq!(new.restarts.load(Ordering::Acquire), 2);
    assert_eq!(new.detail().last_exit.as_deref(), Some("killed by signal SIGKILL"));
    s.log
        .wait_for(&["cloudflared exited unexpectedly (killed by signal SIGKILL)"])
        .await;
    sup.shutdown().await;
    assert!(reaped(next));
}

#[tokio::test]
async fn an_adopted_cloudflared_started_from_another_spec_is_replaced_on_apply() {
    let s = setup();
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    let carried = through_json(&sup.detach().await.unwrap());
    let mut section = section(&s.cf);
    section.grace_period = Duration::from_secs(3);
    let other = spec_of(&section, s._dir.path());
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried.clone(), Some(other.clone()), s.policy.clone(), new.clone());
    commit(&carried);
    assert_eq!(new.pid.load(Ordering::Acquire), pid, "adopted all the same");
    sup.apply(Some(other)).await;
    assert_eq!(s.cf.sigterms(pid), 1);
    assert!(reaped(pid));
    let next = s.cf.wait_starts(3, DEADLINE).await[2];
    assert!(s
        .cf
        .events()
        .iter()
        .any(|e| e.kind == "start" && e.pid == next && e.rest.contains("\"3s\"")));
    connected(&new, next).await;
    sup.shutdown().await;
}

#[tokio::test]
async fn a_carried_pid_that_is_not_our_child_is_left_alone_and_a_fresh_one_starts() {
    let s = setup();
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    let mut carried = through_json(&sup.detach().await.unwrap());
    commit(&carried);
    // The real one ends first, so that the fresh one can have its metrics port.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None).unwrap();
    carried.pid = Some(1);
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried, Some(s.spec.clone()), s.policy.clone(), new.clone());
    s.log
        .wait_for(&["not adopting cloudflared pid 1: it is not a child of this process"])
        .await;
    let fresh = s.cf.wait_starts(3, DEADLINE).await[2];
    connected(&new, fresh).await;
    assert_eq!(new.restarts.load(Ordering::Acquire), 2);
    assert_eq!(
        new.detail().last_exit.as_deref(),
        Some("could not be waited for: it is not a child of this process (ECHILD: No child processes)")
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_carried_cloudflared_that_ended_during_the_exec_is_an_exit_as_any_other() {
    let s = setup();
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    let carried = through_json(&sup.detach().await.unwrap());
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually(DEADLINE, "cloudflared ended (a zombie)", || async {
        (!running_child(pid)).then_some(())
    })
    .await;
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried.clone(), Some(s.spec.clone()), s.policy.clone(), new.clone());
    commit(&carried);
    assert!(reaped(pid), "reaped by the adoption");
    let next = s.cf.wait_starts(3, DEADLINE).await[2];
    connected(&new, next).await;
    assert_eq!(new.restarts.load(Ordering::Acquire), 2);
    assert_eq!(new.detail().last_exit.as_deref(), Some("killed by signal SIGKILL"));
    sup.shutdown().await;
}

/// A fence's SIGTERM that came before the exec is carried: no second SIGTERM (which would skip
/// cloudflared's drain), no restart when it ends, and no start until the fence is released.
#[tokio::test]
async fn a_fenced_cloudflared_is_carried_draining() {
    let s = setup();
    s.cf.set("drain_ms", "1500");
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    assert!(old.fence());
    let carried = through_json(&sup.detach().await.unwrap());
    assert!(carried.fenced && carried.sigterm_sent, "{carried:?}");
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried.clone(), Some(s.spec.clone()), s.policy.clone(), new.clone());
    commit(&carried);
    assert!(new.held());
    assert!(!new.fence(), "it had its SIGTERM");
    s.log.wait_for(&["cloudflared stopped after the fence's SIGTERM"]).await;
    assert!(reaped(pid));
    assert_eq!(s.cf.sigterms(pid), 1);
    assert_eq!(new.restarts.load(Ordering::Acquire), 1, "not counted");
    sup.apply(None).await;
    assert_eq!(s.cf.started_pids().len(), 2, "{:?}", s.cf.events());
    sup.shutdown().await;
}

#[tokio::test]
async fn a_standby_carries_its_counters_and_no_process() {
    let s = setup();
    let old = Arc::new(TunnelState::default());
    let (sup, pid) = running(&s, &old).await;
    sup.apply(None).await;
    assert!(reaped(pid));
    let carried = through_json(&sup.detach().await.unwrap());
    assert_eq!(
        (carried.pid, carried.fds(), carried.spec.is_none()),
        (None, vec![], true)
    );
    let new = Arc::new(TunnelState::default());
    let sup = TunnelSupervisor::adopt(carried, None, s.policy.clone(), new.clone());
    assert_eq!(new.restarts.load(Ordering::Acquire), 1);
    assert_eq!(new.pid.load(Ordering::Acquire), 0);
    sup.apply(None).await;
    assert_eq!(s.cf.started_pids().len(), 2);
    // Promoted after the upgrade: it starts.
    sup.apply(Some(s.spec.clone())).await;
    let next = s.cf.wait_starts(3, DEADLINE).await[2];
    connected(&new, next).await;
    sup.shutdown().await;
}
