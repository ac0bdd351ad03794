//! The cloudflared process itself: started ([`spawn`]) or taken over after an in-place upgrade
//! ([`adopt`]), its exit watched, its output read, stopped ([`stop`]).
//!
//! A started and an adopted cloudflared are the same [`Running`]: its exit is watched through a
//! pidfd (`pidfd_open(2)`, Linux ≥ 5.3) and reaped with `waitpid` on its pid, and its stdout and
//! stderr are read from pipes the agent holds. No `tokio::process::Child` is kept: when one is
//! dropped before its process ended, tokio reaps that pid on a later SIGCHLD, so a supervisor
//! that lets go of the process for an `execve` would have its exit stolen (by the old runtime
//! in a test, or never seen by the new image). With the pid and the pipes as plain descriptors,
//! letting go ([`Running::release`]) is closing the pidfd and handing out the pipes.
//!
//! Two descriptors per pipe: the reader task's, and a duplicate kept in [`LogPipes`]. On a hand-
//! over the readers stop and the duplicates' numbers are carried through the exec, so the pipes
//! stay open (cloudflared never writes into a pipe without a reader: Go exits on EPIPE on fd 1
//! and 2), and the new image reads them from duplicates of its own.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::logs::{emit_logs, read_lines};
use super::{command, record_exit, sandbox, terminate_locked, TunnelSpec, TunnelState};

/// A running cloudflared, started here or adopted.
pub(super) struct Running {
    pub(super) pid: u32,
    exit: ExitWatch,
    logs: LogPipes,
    /// From the spec it was started from: what stopping it takes.
    pub(super) grace: Duration,
    pub(super) stop_margin: Duration,
}

/// What stays of a [`Running`] that was let go for an exec: its pid and the raw numbers of
/// its stdout and stderr pipes (read ends, open, close-on-exec set).
pub(super) struct Released {
    pub(super) pid: u32,
    pub(super) stdout: Option<i32>,
    pub(super) stderr: Option<i32>,
}

impl Running {
    /// Waits for the process to end and reaps it. Cancel-safe: `select!` and `timeout` may drop
    /// it and call it again.
    pub(super) async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.exit.wait().await
    }

    /// Lets go of the process without signalling or reaping it: the log readers stop (what
    /// they had read is logged), the pidfd closes, and the pipes' kept duplicates are handed
    /// out as raw numbers that stay open.
    pub(super) async fn release(self) -> Released {
        let (stdout, stderr) = self.logs.release().await;
        Released {
            pid: self.pid,
            stdout,
            stderr,
        }
    }
}

/// How the process's exit is seen.
enum ExitWatch {
    /// Readable once the process has ended (pidfd_open(2)).
    Pidfd { pid: Pid, fd: AsyncFd<OwnedFd> },
    /// Where pidfd_open is refused (an old kernel, a seccomp filter): every SIGCHLD, then a
    /// look at this pid alone.
    Sigchld {
        pid: Pid,
        signals: tokio::signal::unix::Signal,
    },
}

impl ExitWatch {
    fn new(pid: Pid) -> std::io::Result<ExitWatch> {
        static FALLBACK_SAID: AtomicBool = AtomicBool::new(false);
        match pidfd_open(pid) {
            Ok(fd) => Ok(ExitWatch::Pidfd { pid, fd }),
            Err(e) => {
                if !FALLBACK_SAID.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "pidfd_open is not available ({e}); cloudflared's exit is watched through SIGCHLD");
                }
                ExitWatch::sigchld(pid)
            }
        }
    }

    fn sigchld(pid: Pid) -> std::io::Result<ExitWatch> {
        let signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        Ok(ExitWatch::Sigchld { pid, signals })
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            match self {
                ExitWatch::Pidfd { pid, fd } => {
                    // Not cleared after a look that found the process alive: epoll is edge-
                    // triggered and a pidfd stays readable once the process has ended, so the
                    // rare look that comes before the zombie can be waited for is retried.
                    let _ready = fd.readable().await?;
                    if let Some(status) = reap(*pid)? {
                        return Ok(status);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                ExitWatch::Sigchld { pid, signals } => {
                    // The handler was installed before this look, so an exit after it raises a
                    // SIGCHLD this loop still sees.
                    if let Some(status) = reap(*pid)? {
                        return Ok(status);
                    }
                    signals.recv().await;
                }
            }
        }
    }
}

/// Reaps `pid` if it has ended.
fn reap(pid: Pid) -> std::io::Result<Option<ExitStatus>> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(status) => Ok(exit_status(status)),
        Err(e) => Err(e.into()),
    }
}

/// `status` as the `ExitStatus` a `wait` would have returned; `None` while the process runs.
fn exit_status(status: WaitStatus) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    match status {
        WaitStatus::Exited(_, code) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
        WaitStatus::Signaled(_, signal, core) => {
            Some(ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 }))
        }
        _ => None,
    }
}

/// `pidfd_open(pid, 0)`, registered with tokio: a descriptor that becomes readable when the
/// process ends. It refers to that process alone even once the pid is reused; for our own
/// unreaped child the pid cannot be reused before we wait for it anyway.
#[allow(unsafe_code)]
fn pidfd_open(pid: Pid) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open(2) takes two integers and touches no memory of ours; it returns a new
    // descriptor (close-on-exec) or -1 with errno set.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd_open returned no descriptor"))?;
    // SAFETY: `fd` was just created by the kernel for this call and is held nowhere else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an `OwnedFd` is open until dropped, which the `AsyncFd` does, and always names
    // the same descriptor.
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
}

/// A close-on-exec duplicate of the carried descriptor `fd`, which stays open and unchanged:
/// until the hand-over commits, its number belongs to the hand-over (a rollback passes it on).
#[allow(unsafe_code)]
fn dup_carried(fd: i32) -> std::io::Result<OwnedFd> {
    let dup = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else holds.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// cloudflared's stdout and stderr: a reader task for each, their lines into [`emit_logs`],
/// and a kept duplicate of each read end for a hand-over.
struct LogPipes {
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Set to stop the readers (a hand-over); dropped, they read on until EOF.
    stop: watch::Sender<bool>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Logs what the readers send; ends when they have.
    emitter: tokio::task::JoinHandle<()>,
}

impl LogPipes {
    /// Reads `stdout` and `stderr` (read ends this takes) of the process `pid`.
    fn start(pid: u32, stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) -> LogPipes {
        let (stop, stopped) = watch::channel(false);
        let (lines_tx, lines) = mpsc::channel(256);
        let mut readers = Vec::new();
        let mut keep = |fd: Option<OwnedFd>, name: &str| -> Option<OwnedFd> {
            let fd = fd?;
            let reader = fd.try_clone().and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
            match reader {
                Ok(r) => readers.push(tokio::spawn(read_lines(r, lines_tx.clone(), stopped.clone()))),
                Err(e) => {
                    tracing::warn!(pid, error = %e, "cannot read cloudflared's {name} (pid {pid}): {e}")
                }
            }
            Some(fd)
        };
        let stdout = keep(stdout, "stdout");
        let stderr = keep(stderr, "stderr");
        drop(lines_tx);
        let emitter = tokio::spawn(emit_logs(lines, pid));
        LogPipes {
            stdout,
            stderr,
            stop,
            readers,
            emitter,
        }
    }

    /// Stops the readers, waits until what they read is logged, and hands out the kept read
    /// ends' numbers, left open.
    async fn release(self) -> (Option<i32>, Option<i32>) {
        let _ = self.stop.send(true);
        for reader in self.readers {
            let _ = reader.await;
        }
        let _ = self.emitter.await;
        (
            self.stdout.map(IntoRawFd::into_raw_fd),
            self.stderr.map(IntoRawFd::into_raw_fd),
        )
    }
}

pub(super) fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(sig)) => format!(
                "killed by signal {}",
                Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_owned())
            ),
            _ => "exited".to_owned(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

pub(super) fn spawn(spec: &TunnelSpec, state: &TunnelState) -> anyhow::Result<Running> {
    if let (Some(path), Some(token)) = (&spec.token_file, &spec.token) {
        crate::files::write_atomic(path, token.expose().as_bytes(), 0o600)
            .map_err(|e| anyhow::anyhow!("cannot write the token file {}: {e}", path.display()))?;
    }
    if let Some((path, yaml)) = &spec.ingress {
        crate::files::write_atomic(path, yaml.as_bytes(), 0o644)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    let mut cmd = command(&spec.program);
    cmd.args(&spec.args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(home) = &spec.home {
        cmd.env("HOME", home);
    }
    if let Some(proxy) = spec.egress_proxy {
        cmd.envs(super::egress_proxy_env(proxy));
    }
    if let (Some(token), None) = (&spec.token, &spec.token_file) {
        cmd.env("TUNNEL_TOKEN", token.expose());
    }
    // Kept open until the child has exec'd: it restricts itself to this ruleset.
    let ruleset = confine(&mut cmd, spec)?;
    let mut signalling = state.signalling();
    if signalling.hold {
        anyhow::bail!("not starting cloudflared: this node is fenced (it left the active role)");
    }
    // std's spawn, not tokio's: the process is waited for by pid (see the module's doc).
    let mut child = cmd
        .as_std_mut()
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", spec.program.display()))?;
    drop(ruleset);
    let pid = child.id();
    signalling.pid = pid;
    signalling.sigterm_sent = false;
    drop(signalling);
    let exit = match ExitWatch::new(Pid::from_raw(i32::try_from(pid).unwrap_or(0))) {
        Ok(exit) => exit,
        Err(e) => {
            // Nothing could watch it: it must not run unwatched.
            let _ = child.kill();
            let _ = child.wait();
            record_exit(state, pid);
            anyhow::bail!("cannot watch cloudflared pid {pid} for its exit: {e}");
        }
    };
    let logs = LogPipes::start(
        pid,
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );
    state.pid.store(pid, Ordering::Release);
    state.connections.store(0, Ordering::Release);
    state.with_detail(|d| {
        d.started_at = Some(Instant::now());
        d.connector_id = None;
        // A new process has no connection until a poll sees one; an earlier process's
        // connection must not count towards ready_grace.
        d.last_connected = None;
    });
    // `extra_args` can hold no token (config validation), but a URL among them may carry
    // credentials.
    let args = crate::secret::redact_urls_in(&spec.args.join(" "));
    tracing::info!(pid, program = %spec.program.display(), %args, "cloudflared started: pid {pid}, {} {args}", spec.program.display());
    Ok(Running {
        pid,
        exit,
        logs,
        grace: spec.grace,
        stop_margin: spec.stop_margin,
    })
}

/// What became of a carried cloudflared.
pub(super) enum Adopted {
    Running(Running),
    /// It was our child but ended before the exec'd image looked (reaped now).
    Ended(std::io::Result<ExitStatus>),
    /// Not a child of this process (or no such process): nothing of it is touched.
    NotOurs(Errno),
}

/// Takes over the cloudflared `pid` that an earlier image of this process started, reading its
/// output from duplicates of the carried pipe ends `stdout` and `stderr` (left open). The pid is
/// checked to be an unreaped child of this process before anything is done with it: a pid that
/// is not (a carried number gone stale, or wrong) is never signalled.
pub(super) fn adopt(
    pid: u32,
    stdout: Option<i32>,
    stderr: Option<i32>,
    grace: Duration,
    stop_margin: Duration,
) -> Adopted {
    let Ok(raw) = i32::try_from(pid) else {
        return Adopted::NotOurs(Errno::ESRCH);
    };
    let pid_t = Pid::from_raw(raw);
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(pid_t), flags) {
        Ok(WaitStatus::StillAlive) => {}
        Ok(_) => return Adopted::Ended(reap(pid_t).and_then(|s| s.ok_or_else(|| std::io::Error::other("not ended")))),
        Err(e) => return Adopted::NotOurs(e),
    }
    let exit = match ExitWatch::new(pid_t) {
        Ok(exit) => exit,
        Err(e) => return Adopted::Ended(Err(e)),
    };
    let dup = |fd: Option<i32>, name: &str| {
        let fd = fd?;
        dup_carried(fd)
            .inspect_err(
                |e| tracing::warn!(pid, fd, error = %e, "cannot take over cloudflared's {name} (fd {fd}): {e}"),
            )
            .ok()
    };
    let logs = LogPipes::start(pid, dup(stdout, "stdout"), dup(stderr, "stderr"));
    Adopted::Running(Running {
        pid,
        exit,
        logs,
        grace,
        stop_margin,
    })
}

/// Applies `spec`'s sandbox to `cmd`; returns the ruleset, to be kept until the spawn returned.
fn confine(cmd: &mut tokio::process::Command, spec: &TunnelSpec) -> anyhow::Result<Option<sandbox::Ruleset>> {
    static UNCONFINED_SAID: AtomicBool = AtomicBool::new(false);
    static CONFINED_SAID: AtomicBool = AtomicBool::new(false);
    let Some(policy) = &spec.sandbox else {
        return Ok(None);
    };
    let ruleset = sandbox::prepare(policy)?;
    match &ruleset {
        Some(r) => {
            sandbox::confine(cmd, r);
            if !CONFINED_SAID.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    abi = r.abi,
                    "cloudflared runs confined by Landlock (ABI {}): no access to the agent's secret files, \
                     credentials, state or runtime directory",
                    r.abi
                );
            }
        }
        None if policy.mode == crate::config::Sandbox::Auto && !UNCONFINED_SAID.swap(true, Ordering::Relaxed) => {
            tracing::warn!(
                "this kernel offers no Landlock: cloudflared runs unconfined and can read the agent's secret files \
                 and write its state directory (cloudflared.sandbox = \"landlock\" refuses to run it so)"
            );
        }
        None => {}
    }
    Ok(ruleset)
}

/// One SIGTERM to the group, wait grace + margin, then SIGKILL; always reaps.
pub(super) async fn stop(mut run: Running, state: &TunnelState) {
    let group = Pid::from_raw(i32::try_from(run.pid).unwrap_or(0));
    tracing::info!(
        pid = run.pid,
        grace_s = run.grace.as_secs_f64(),
        "stopping cloudflared (SIGTERM): pid {}, grace {:?}",
        run.pid,
        run.grace
    );
    {
        let mut s = state.signalling();
        if s.pid == run.pid {
            terminate_locked(&mut s);
        }
    }
    let status = match tokio::time::timeout(run.grace.saturating_add(run.stop_margin), run.exited()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(
                pid = run.pid,
                "cloudflared ignored SIGTERM past its grace period; sending SIGKILL to pid {}",
                run.pid
            );
            let _ = killpg(group, Signal::SIGKILL);
            run.exited().await
        }
    };
    tracing::info!(pid = run.pid, result = %describe(&status), "cloudflared stopped: pid {}, {}", run.pid, describe(&status));
    record_exit(state, run.pid);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    /// A child of this process, started without tokio, with its stdout on a pipe. The tests
    /// reap it through the code under test.
    #[allow(clippy::zombie_processes)]
    fn child(script: &str) -> (u32, OwnedFd) {
        let mut c = std::process::Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = c.stdout.take().map(OwnedFd::from).unwrap();
        (c.id(), out)
    }

    fn pid(p: u32) -> Pid {
        Pid::from_raw(p as i32)
    }

    #[tokio::test]
    async fn both_exit_watches_reap_with_the_status_a_wait_returns() {
        let (a, _out) = child("exit 7");
        let mut watch = ExitWatch::new(pid(a)).unwrap();
        assert!(matches!(watch, ExitWatch::Pidfd { .. }), "this kernel has pidfd_open");
        let status = watch.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        let (b, _out) = child("kill -9 $$");
        let mut watch = ExitWatch::sigchld(pid(b)).unwrap();
        assert_eq!(describe(&watch.wait().await), "killed by signal SIGKILL");
        for p in [a, b] {
            assert_eq!(
                waitpid(pid(p), Some(WaitPidFlag::WNOHANG)),
                Err(Errno::ECHILD),
                "reaped"
            );
        }
    }

    #[tokio::test]
    async fn a_pid_that_is_not_our_child_is_not_adopted_and_a_carried_fd_stays_open() {
        let (p, out) = child("exit 0");
        let ours = pid(p);
        // Ended (a zombie): reaped by the adoption, with its status.
        while waitid(
            Id::Pid(ours),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) == Ok(WaitStatus::StillAlive)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fd = out.as_raw_fd();
        match adopt(p, Some(fd), None, Duration::ZERO, Duration::ZERO) {
            Adopted::Ended(status) => assert_eq!(status.unwrap().code(), Some(0)),
            _ => panic!("an ended child is Ended"),
        }
        // Reaped now: no longer ours. Neither is init.
        assert!(matches!(
            adopt(p, None, None, Duration::ZERO, Duration::ZERO),
            Adopted::NotOurs(Errno::ECHILD)
        ));
        assert!(matches!(
            adopt(1, None, None, Duration::ZERO, Duration::ZERO),
            Adopted::NotOurs(Errno::ECHILD)
        ));
        assert!(matches!(
            adopt(u32::MAX, None, None, Duration::ZERO, Duration::ZERO),
            Adopted::NotOurs(_)
        ));
        assert!(nix::fcntl::fcntl(out.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).is_ok());
    }
}
