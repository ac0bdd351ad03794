//! The systemd notify protocol (`sd_notify(3)`): readiness, status text, watchdog keep-alives.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (standalone runs). The variable is kept in
//! our environment so later messages still reach systemd; children get it removed explicitly.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading configuration")]);
}

/// `RELOADING=1` for an upgrade in place: the new image's `READY=1` ends it.
pub fn reloading_for(what: &str) {
    send(&[NotifyState::Reloading, NotifyState::Status(what)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Asks systemd for `extra` more time before its start (or stop) timeout fires.
pub fn extend_timeout(extra: Duration, status: &str) {
    let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status(status)]);
}

/// The interval at which to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if systemd asked for
/// one and it is meant for this process (`WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    // Capped so the interval's own arithmetic (tokio adds the period to each tick) cannot
    // overflow; more often than asked is still in time.
    (usec > 0).then(|| Duration::from_micros(usec / 2).min(Duration::from_secs(3600)))
}
