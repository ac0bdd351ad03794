//! PID 1 in a container: the process that reaps orphans, without taking the agent's children.
//!
//! In a PID namespace (a container, a Kubernetes pod) the first process has two duties no other
//! process has. Every orphan in the namespace is re-parented to it (cloudflared's children when
//! cloudflared dies before them), and stays a zombie until PID 1 waits for it. And the kernel
//! delivers to PID 1 only the signals it has a handler for: an unhandled SIGTERM from
//! `podman stop` or the kubelet is dropped, not fatal.
//!
//! Reaping orphans with `waitpid(-1)` inside the agent would race the agent's own waits: the
//! tunnel supervisor waits for its cloudflared by pid (tokio's `Child::wait`), and a `waitpid(-1)`
//! that collects cloudflared first leaves the supervisor with `ECHILD` and no exit status.
//! Peeking with `waitid(P_ALL, WNOWAIT)` needs a list of the pids the agent spawned, which only
//! the modules that spawn know. So, as `tini` and `docker --init` do, the split is by process:
//! when the agent finds itself PID 1 it starts itself again as its only child (the agent proper,
//! which runs exactly as it does under systemd) and stays behind as a small init. That init's
//! only own child is the agent; cloudflared is the agent's child, never the init's, so the
//! init's `waitpid(-1)` can collect every orphan and can never collect cloudflared. The init
//! forwards SIGTERM, SIGINT and SIGHUP to the agent, and exits with the agent's status
//! (128 + the signal number when a signal ended it). The child is a new `exec` of the same
//! binary (`/proc/self/exe`), not a `fork` of a running process; the one `unsafe` here is the
//! `pre_exec` that gives it back the signal mask PID 1 started with.

use std::process::Command;

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The signals the init passes on to the agent (what `main.rs` handles: stop, stop, reload).
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// When this process is PID 1, runs the init described above and exits with the agent's
/// status; it never returns then. Otherwise (systemd, a shell, `podman run --init`, the agent
/// under the init) it returns at once and changes nothing. Call it before any thread starts:
/// the init's signal mask must be the whole process's.
///
/// The agent under the init starts with the signal mask PID 1 was started with, not the
/// init's: a mask is inherited through fork and exec, std's `Command::spawn` leaves it as it is,
/// and a SIGTERM blocked in the agent would never reach its handler. tests/reaper.rs checks
/// both paths (and that the agent's mask has no SIGTERM in it).
pub fn init_if_pid1() {
    if Pid::this() != Pid::from_raw(1) {
        return;
    }
    let mut set = SigSet::empty();
    for signal in FORWARDED.into_iter().chain([Signal::SIGCHLD]) {
        set.add(signal);
    }
    // Blocked before the child exists, so a SIGTERM that arrives while it starts waits in the
    // init's pending set instead of being dropped (the kernel discards a signal PID 1 neither
    // handles nor blocks).
    let previous = match set.thread_swap_mask(SigmaskHow::SIG_BLOCK) {
        Ok(previous) => previous,
        Err(e) => return degraded(&format!("cannot block signals: {e}"), None),
    };
    let mut agent = Command::new("/proc/self/exe");
    agent.args(std::env::args_os().skip(1));
    restore_mask_in_child(&mut agent, previous);
    let child = match agent.spawn() {
        Ok(child) => child,
        Err(e) => return degraded(&format!("cannot start the agent under it: {e}"), Some(previous)),
    };
    let Ok(pid) = i32::try_from(child.id()) else {
        eprintln!("tunnel-agent: the agent's pid {} is out of range", child.id());
        std::process::exit(1)
    };
    // The child is waited for below, by pid, among the orphans; the handle is not needed.
    drop(child);
    std::process::exit(supervise(Pid::from_raw(pid), &set))
}

/// Makes `command`'s process set its signal mask to `mask` before it executes.
#[allow(unsafe_code)]
fn restore_mask_in_child(command: &mut Command, mask: SigSet) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure makes one async-signal-safe call,
    // pthread_sigmask(3) (signal-safety(7) lists it through sigprocmask), on a set copied in
    // before the fork; it allocates nothing and takes no lock (an `Errno` becomes an
    // `io::Error` without allocating).
    unsafe {
        command.pre_exec(move || mask.thread_set_mask().map_err(std::io::Error::from));
    }
}

/// Running as PID 1 without the init: the agent still handles SIGTERM itself; only orphans
/// are left unreaped. Said once, on stderr (logging is not set up yet).
fn degraded(why: &str, previous: Option<SigSet>) {
    if let Some(previous) = previous {
        let _ = previous.thread_set_mask();
    }
    eprintln!("tunnel-agent: running as PID 1 without reaping orphans: {why}");
}

/// The init's loop: forward signals to the agent, reap whatever exits, return the agent's
/// exit code once it has exited.
fn supervise(agent: Pid, set: &SigSet) -> i32 {
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap(agent) {
                    return code;
                }
            }
            // The agent may already be gone (its SIGCHLD is next in line): nothing to do.
            Ok(signal) => {
                let _ = kill(agent, signal);
            }
            Err(_) => {}
        }
    }
}

/// Collects every child that has exited (SIGCHLDs coalesce: one may stand for many) and
/// returns the agent's exit code when the agent was among them.
fn reap(agent: Pid) -> Option<i32> {
    let mut agent_code = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => agent_code = Some(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                agent_code = Some(128 + signal as i32);
            }
            // Nothing more has exited now (or no child is left at all).
            Ok(WaitStatus::StillAlive) | Err(_) => return agent_code,
            // An orphan: collected, which is all it needed.
            Ok(_) => {}
        }
    }
}
