//! Randomness for load balancing, sampling and backoff jitter (never for anything secret).

use std::hash::{BuildHasher, Hasher};

/// A random number. std's `RandomState` is seeded per instance from OS randomness; hashing a
/// fresh one is enough here and saves a dependency.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}
