//! Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog):
//! each delay is uniform in `[base/2, cap_n]` where `cap_n = min(max, base * 2^n)`. The lower
//! bound keeps a retry from firing immediately; the jitter keeps a fleet from retrying in step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; grows until `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let floor = (self.base / 2).min(ceiling);
        let span = ceiling.saturating_sub(floor).as_nanos() as u64;
        let jitter = if span == 0 {
            0
        } else {
            crate::random::random_u64() % (span + 1)
        };
        floor + Duration::from_nanos(jitter)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// This backoff as one that has handed out `attempts` delays: how one is carried across an
    /// in-place upgrade (`tunnel::carry`).
    pub fn with_attempts(mut self, attempts: u32) -> Backoff {
        self.attempt = attempts;
        self
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds_and_grow_to_max() {
        // Property over many draws: floor <= d <= min(max, base * 2^n).
        for _ in 0..200 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            for n in 0..20u32 {
                let d = b.next_delay();
                let ceiling = Duration::from_millis(100)
                    .saturating_mul(1 << n.min(20))
                    .min(Duration::from_secs(5));
                assert!(d >= Duration::from_millis(50), "attempt {n}: {d:?} below floor");
                assert!(d <= ceiling, "attempt {n}: {d:?} above {ceiling:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_delays_and_reset_restarts() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
            for _ in 0..5 {
                b.next_delay();
            }
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "delays should differ between instances: {seen:?}");
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
