//! Randomness for load balancing, sampling and backoff jitter (never for anything secret).

use std::hash::{BuildHasher, Hasher};

/// A random number. std's `RandomState` is seeded per instance from OS randomness; hashing a
/// fresh one is enough here and saves a dependency.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// True for `numerator` of every `denominator` calls, on average (`denominator > 0`).
pub fn chance(numerator: u32, denominator: u32) -> bool {
    match (numerator, denominator) {
        (0, _) => false,
        (n, d) if n >= d => true,
        (n, d) => random_u64() % u64::from(d) < u64::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: u32 = 200_000;

    /// Whether `hits` of `DRAWS` is within five binomial standard deviations of share `p`
    /// (a correct generator fails this about once in 1.7 million).
    fn near(hits: u32, p: f64) -> bool {
        let n = f64::from(DRAWS);
        (f64::from(hits) - n * p).abs() <= 5.0 * (n * p * (1.0 - p)).sqrt()
    }

    #[test]
    fn chance_hits_its_share_closely() {
        for (num, den) in [(35, 100), (1, 5), (1, 2), (1, 1000), (999, 1000)] {
            let hits = (0..DRAWS).filter(|_| chance(num, den)).count() as u32;
            let p = f64::from(num) / f64::from(den);
            assert!(
                near(hits, p),
                "{num}/{den}: {hits} of {DRAWS}, expected about {}",
                p * f64::from(DRAWS)
            );
        }
        assert!(!(0..1000).any(|_| chance(0, 7)), "0/7 is never");
        assert!((0..1000).all(|_| chance(7, 7)), "7/7 is always");
    }

    /// Every bit of the output is a fair coin, so no modulus or threshold picks up a bias.
    #[test]
    fn every_bit_is_a_fair_coin() {
        let mut ones = [0u32; 64];
        for _ in 0..DRAWS {
            let x = random_u64();
            for (bit, count) in ones.iter_mut().enumerate() {
                *count += u32::from(x >> bit & 1 == 1);
            }
        }
        for (bit, &count) in ones.iter().enumerate() {
            assert!(near(count, 0.5), "bit {bit} set {count} times of {DRAWS}");
        }
    }
}
