//! Deadlines that cannot panic.
//!
//! `Instant + Duration` panics when the sum does not fit (and the release build aborts on a
//! panic). The durations from our own config are bounded when they are read
//! ([`crate::config::duration`]), but others come from peers (a token's `exp`, a lease's TTL)
//! or are sums of several; every deadline in the crate is computed here instead.

use std::time::Duration;

use tokio::time::Instant;

/// Where a deadline lands when the one asked for does not fit: about 30 years out, as tokio's
/// own `sleep` does for the same case. Far enough to mean "never" for anything we wait on.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `start + wait`, or [`FAR`] after `start` when that does not fit (or, should even that not
/// fit, `start` itself: a deadline already due, which ends a wait rather than crashing).
pub fn after(start: Instant, wait: Duration) -> Instant {
    start
        .checked_add(wait)
        .or_else(|| start.checked_add(FAR))
        .unwrap_or(start)
}

/// [`after`] from now.
pub fn from_now(wait: Duration) -> Instant {
    after(Instant::now(), wait)
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds since the clock's (boot-time) origin.
fn monotonic_now() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        }
        // CLOCK_MONOTONIC cannot fail on Linux; should it, every instant reads as "now".
        Err(_) => 0,
    }
}

/// `t` as a reading of `CLOCK_MONOTONIC` (nanoseconds). The clock is system-wide, so the value
/// means the same instant to another process, or to this one after an `execve`: how a deadline
/// (an election's fence) is carried across an upgrade without being extended by the time the
/// exec took. Not meaningful under tokio's paused test clock.
pub fn to_monotonic_ns(t: Instant) -> u64 {
    let (now, raw) = (Instant::now(), monotonic_now());
    if t <= now {
        raw.saturating_sub(u64::try_from((now - t).as_nanos()).unwrap_or(u64::MAX))
    } else {
        raw.saturating_add(u64::try_from((t - now).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// The [`Instant`] a [`to_monotonic_ns`] reading names. An instant too far in the past to
/// represent reads as now: for a deadline, "already due", never later than it was.
pub fn from_monotonic_ns(ns: u64) -> Instant {
    let (now, raw) = (Instant::now(), monotonic_now());
    if ns <= raw {
        now.checked_sub(Duration::from_nanos(raw - ns)).unwrap_or(now)
    } else {
        after(now, Duration::from_nanos(ns - raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_that_fits_is_the_sum() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(5)), now + Duration::from_secs(5));
    }

    #[test]
    fn a_monotonic_reading_names_the_same_instant() {
        let now = Instant::now();
        for t in [now, now + Duration::from_secs(3), now - Duration::from_millis(1500)] {
            let back = from_monotonic_ns(to_monotonic_ns(t));
            let error = if back > t { back - t } else { t - back };
            assert!(error < Duration::from_millis(5), "{t:?} came back as {back:?}");
        }
    }

    #[test]
    fn a_reading_from_before_the_clock_can_say_is_due_now_not_later() {
        assert!(from_monotonic_ns(0) <= Instant::now());
    }

    #[test]
    fn a_deadline_that_does_not_fit_is_far_away_not_a_panic() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FAR);
        let wait = Duration::from_secs(300_000_000_000 * 31_557_600);
        assert!(after(now, wait) > now + Duration::from_secs(86_400 * 365));
    }
}
