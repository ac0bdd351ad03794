//! Upgrade in place: the running image hands what must outlive it to the next binary through
//! `execve(2)`, on the same PID (systemd's `MainPID`, the unit's cgroup and cloudflared's parent
//! do not change).
//!
//! ```text
//!  old image                                     new image (same PID)
//!  ─────────                                     ────────────────────
//!  preflight: new binary's self-test + check     main: [`Incoming::take`] reads the state
//!  RELOADING=1                                   boot::start from it: sockets adopted,
//!  stop accepting, drain (agent.upgrade_drain)     cloudflared adopted, role, secrets, lease
//!  state → sealed memfd, carried fds inheritable  READY=1, [`Incoming::commit`]
//!  execve(new binary) ───────────────────────▶   (fails before commit: [`Incoming::roll_back`]
//!   (fails: execveat(previous binary))             execs the previous binary, same state)
//! ```
//!
//! The listening sockets never close: each image keeps a duplicate ([`listeners::Sockets`]),
//! and the kernel queues connections while neither image accepts. The previous binary is kept
//! open (`/proc/self/exe`, an `O_PATH` descriptor): dpkg has replaced the file by then.
//!
//! Two variables carry the numbers: [`STATE_VAR`] (the memfd) and [`PREVIOUS_VAR`]
//! (`<binary fd>:<memfd>`, how to go back, kept apart so a new image that cannot read the first
//! can still return). A returning image finds [`ROLLED_BACK_VAR`] (why) instead of
//! [`PREVIOUS_VAR`]: there is no second rollback.

pub mod fds;
pub mod listeners;
pub mod preflight;
pub mod state;

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

pub use preflight::Plan;
pub use state::State;

use crate::health::{AgentStatus, Health, UpgradeResult, UpgradeStatus};

/// The memfd holding the [`State`].
pub const STATE_VAR: &str = "TUNNEL_AGENT_HANDOVER";
/// `<previous binary's fd>:<state memfd>`: how a new image that cannot take over goes back.
pub const PREVIOUS_VAR: &str = "TUNNEL_AGENT_PREVIOUS";
/// Set for a previous image coming back: why the new one could not take over.
pub const ROLLED_BACK_VAR: &str = "TUNNEL_AGENT_ROLLED_BACK";

/// The signals the agent handles. Their default action ends the process, so between the exec
/// and the new image's handlers (a few ms) one of them (a `systemctl reload` during an apt
/// upgrade) would kill the agent and drop the tunnel: they are blocked across the exec (the
/// mask survives it) and stay pending until [`unblock_signals`].
const HANDLED: [nix::sys::signal::Signal; 4] = [
    nix::sys::signal::Signal::SIGHUP,
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGUSR2,
];

fn handled_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Once the handlers are installed: the signals blocked across an exec (pending ones arrive
/// now) are delivered again. A no-op for a fresh start.
pub fn unblock_signals() {
    let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_UNBLOCK, Some(&handled_set()), None);
}

/// The longest reason carried in [`ROLLED_BACK_VAR`].
const REASON_LIMIT: usize = 1000;

/// The state an upgraded (or rolled-back) image starts from, and the numbers it must keep open
/// until it has taken over.
#[derive(Debug)]
pub struct Incoming {
    state_fd: RawFd,
    /// The previous binary, to go back to (`None` for an image that is itself the way back).
    previous: Option<RawFd>,
    /// Why the new image gave up, for a previous image coming back.
    rolled_back: Option<String>,
    state: Result<State, String>,
}

fn parse_fd(s: &str) -> Option<RawFd> {
    s.parse::<RawFd>().ok().filter(|&fd| fd > 2 && fds::is_open(fd))
}

impl Incoming {
    /// Reads and removes the hand-over's variables: `None` on a fresh start. Runs first thing in
    /// `main`, before any thread exists (it changes the environment), so no child ever sees
    /// them. Every carried number is made close-on-exec again at once.
    // Removing variables is unsound only with other threads reading the environment: `main`
    // calls this before it starts any.
    #[allow(clippy::disallowed_methods)]
    pub fn take() -> Option<Incoming> {
        let state_var = std::env::var(STATE_VAR).ok();
        let previous_var = std::env::var(PREVIOUS_VAR).ok();
        let rolled_back = std::env::var(ROLLED_BACK_VAR).ok();
        for var in [STATE_VAR, PREVIOUS_VAR, ROLLED_BACK_VAR] {
            std::env::remove_var(var);
        }
        let state_var = state_var?;
        let (previous, previous_state) = match previous_var.as_deref().and_then(|v| v.split_once(':')) {
            Some((exe, state)) => (parse_fd(exe), parse_fd(state)),
            None => (None, None),
        };
        let from_var = parse_fd(&state_var);
        // A new image that cannot read its own variable goes back with the previous one's.
        let state_fd = from_var.or(previous_state).unwrap_or(-1);
        let state = match from_var {
            None => Err(format!("{STATE_VAR}={state_var:?} names no open descriptor")),
            Some(fd) => fds::read_state(fd)
                .map_err(|e| format!("cannot read the carried state: {e}"))
                .and_then(|b| {
                    serde_json::from_slice::<State>(&b).map_err(|e| format!("unreadable carried state: {e}"))
                }),
        };
        let state = state.and_then(|s| {
            if state::FORMATS_READ.contains(&s.format) {
                Ok(s)
            } else {
                Err(format!(
                    "carried state of format {} (this binary reads {:?})",
                    s.format,
                    state::FORMATS_READ
                ))
            }
        });
        let incoming = Incoming {
            state_fd,
            previous,
            rolled_back,
            state,
        };
        for fd in incoming.carried_fds() {
            let _ = fds::set_cloexec(fd, true);
        }
        Some(incoming)
    }

    pub fn state(&self) -> Result<&State, &str> {
        self.state.as_ref().map_err(String::as_str)
    }

    /// Every number this image must keep for a rollback: the state's, the memfd, the previous
    /// binary.
    fn carried_fds(&self) -> Vec<RawFd> {
        let mut fds = self.state.as_ref().map(State::fds).unwrap_or_default();
        fds.push(self.state_fd);
        fds.extend(self.previous);
        fds.retain(|&fd| fd > 2);
        fds
    }

    /// The new image serves: the carried numbers close (each user holds its own duplicate), and
    /// `/status` records the upgrade (or the rollback this image is).
    pub fn commit(self, health: &Health) {
        let held = self.state.as_ref().ok().map(|s| {
            let since = crate::deadline::from_monotonic_ns(s.held_since_ns);
            u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        if let Ok(s) = &self.state {
            let mut agent = s.agent.clone();
            let result = match &self.rolled_back {
                None => {
                    agent.upgrades += 1;
                    UpgradeResult::Completed
                }
                Some(_) => {
                    agent.rolled_back += 1;
                    UpgradeResult::RolledBack
                }
            };
            agent.last_upgrade = Some(UpgradeStatus {
                error: self.rolled_back.clone(),
                from: s.from.clone(),
                held_ms: held,
                result,
                to: s.to.clone(),
            });
            match &self.rolled_back {
                None => {
                    tracing::info!(from = %s.from, to = %s.to, held_ms = held, "upgraded in place: {} -> {} (new connections waited {} ms)", s.from, s.to, held.unwrap_or(0))
                }
                Some(why) => {
                    tracing::error!(from = %s.from, to = %s.to, error = %why, "upgrade to {} rolled back: {why}; {} serves again", s.to, s.from)
                }
            }
            health.update_status(|st| {
                agent.version = st.agent.version.clone();
                agent.since = st.agent.since.clone();
                st.agent = agent;
            });
        }
        for fd in self.carried_fds() {
            fds::close(fd);
        }
    }

    /// This image cannot take over: re-executes the previous binary with the same state, which
    /// goes on from where it stopped. Returns only when that is impossible (no previous binary,
    /// or its exec failed), with why.
    pub fn roll_back(self, why: &str) -> String {
        let Some(previous) = self.previous else {
            return format!("cannot take over ({why}), and there is no previous binary to return to");
        };
        let reason: String = why.replace('\n', " ").chars().take(REASON_LIMIT).collect();
        eprintln!("tunnel-agent: cannot take over ({reason}); returning to the previous binary");
        let fds = self.carried_fds();
        let e = return_to(previous, &fds, self.state_fd, reason);
        format!("cannot take over ({why}), and returning to the previous binary failed: {e}")
    }
}

/// A rollback: executes the previous binary (`previous`, an `O_PATH` descriptor) with the state
/// in `state_fd`, telling it why (`reason`). Returns only on failure.
fn return_to(previous: RawFd, keep: &[RawFd], state_fd: RawFd, reason: String) -> std::io::Error {
    let env = [(ROLLED_BACK_VAR, reason), (STATE_VAR, state_fd.to_string())];
    replace_image(Image::Fd(previous), keep, &env)
}

/// The binary to run in this process's place.
enum Image<'a> {
    Path(&'a Path),
    Fd(RawFd),
}

/// `execve`s `image` with this process's argv and environment plus `env`, the numbers in `keep`
/// inheritable. Returns only on failure, with `keep` close-on-exec again.
fn replace_image(image: Image<'_>, keep: &[RawFd], env: &[(&str, String)]) -> std::io::Error {
    let to_c = |b: &[u8]| CString::new(b).map_err(std::io::Error::other);
    let args: Result<Vec<CString>, _> = std::env::args_os().map(|a| to_c(a.as_bytes())).collect();
    let ours = [STATE_VAR, PREVIOUS_VAR, ROLLED_BACK_VAR];
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !ours.iter().any(|o| k == *o))
        .collect();
    vars.extend(env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
    let envp: Result<Vec<CString>, _> = vars
        .iter()
        .map(|(k, v)| to_c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let (args, envp) = match (args, envp) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    for &fd in keep {
        if let Err(e) = fds::set_cloexec(fd, false) {
            return e;
        }
    }
    let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&handled_set()), None);
    let err = match image {
        Image::Path(path) => match to_c(path.as_os_str().as_bytes()) {
            Ok(p) => nix::unistd::execve(&p, &args, &envp).unwrap_err(),
            Err(e) => return e,
        },
        Image::Fd(fd) => nix::unistd::execveat(Some(fd), c"", &args, &envp, AtFlags::AT_EMPTY_PATH).unwrap_err(),
    };
    for &fd in keep {
        let _ = fds::set_cloexec(fd, true);
    }
    unblock_signals();
    std::io::Error::from_raw_os_error(err as i32)
}

/// The old image's last act: writes `state` to a memfd and execs `plan`'s binary with `keep`
/// (the sockets' and cloudflared's numbers) inherited. Should that exec fail, execs the running
/// binary again (rolled back, same state). Returns only when both failed.
pub fn exec(plan: &Plan, state: &State, keep: &[RawFd]) -> String {
    let bytes = match serde_json::to_vec(state) {
        Ok(b) => b,
        Err(e) => return format!("cannot write the carried state: {e}"),
    };
    let memfd = match fds::write_state(&bytes) {
        Ok(fd) => fd,
        Err(e) => return format!("cannot write the carried state: {e}"),
    };
    let previous = match nix::fcntl::open("/proc/self/exe", OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => return format!("cannot keep the running binary open for a rollback: {e}"),
    };
    tracing::info!(
        state_bytes = bytes.len(),
        fds = keep.len(),
        "executing {} in place ({} bytes of state, {} descriptors)",
        plan.binary.display(),
        bytes.len(),
        keep.len()
    );
    let mut all = keep.to_vec();
    all.extend([memfd.as_raw_fd(), previous]);
    let env = [
        (STATE_VAR, memfd.as_raw_fd().to_string()),
        (PREVIOUS_VAR, format!("{previous}:{}", memfd.as_raw_fd())),
    ];
    let e = replace_image(Image::Path(&plan.binary), &all, &env);
    tracing::error!(binary = %plan.binary.display(), error = %e, "cannot execute {}: {e}; continuing with the running binary", plan.binary.display());
    let reason = format!("cannot execute {}: {e}", plan.binary.display());
    let again = return_to(previous, &all, memfd.as_raw_fd(), reason);
    format!(
        "cannot execute {} ({e}) nor the running binary again ({again})",
        plan.binary.display()
    )
}

/// `/status`'s `agent` at a fresh start.
pub fn fresh_status() -> AgentStatus {
    AgentStatus {
        version: crate::build_info::LONG_VERSION.to_owned(),
        since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ..AgentStatus::default()
    }
}

/// Records a refused upgrade: `/status`, the metric, the journal.
pub fn refused(health: &Health, to: &str, why: &str) {
    tracing::error!(error = %why, "upgrade refused; this version keeps serving: {why}");
    health.update_status(|s| {
        s.agent.refused += 1;
        s.agent.last_upgrade = Some(UpgradeStatus {
            error: Some(why.to_owned()),
            from: crate::build_info::LONG_VERSION.to_owned(),
            held_ms: None,
            result: UpgradeResult::Refused,
            to: to.to_owned(),
        });
    });
}
