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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_that_fits_is_the_sum() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(5)), now + Duration::from_secs(5));
    }

    #[test]
    fn a_deadline_that_does_not_fit_is_far_away_not_a_panic() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FAR);
        let wait = Duration::from_secs(300_000_000_000 * 31_557_600);
        assert!(after(now, wait) > now + Duration::from_secs(86_400 * 365));
    }
}
