//! Random numbers where nothing depends on their quality: proposal-id incarnations,
//! which host a forwarded request tries first, and the seeded streams of unit tests.
//! [`random_u64`] is seeded from the standard library's per-process hasher keys, the
//! clock and the process id; no crate needed. Never use it for anything an attacker
//! must not guess.

use std::hash::{BuildHasher, Hasher};

/// A random 64-bit number.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A repeatable stream of numbers from `seed` (xorshift), for tests that want varied
/// input and the same input on every run.
#[cfg(test)]
pub fn seeded(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_draws_differ() {
        assert_ne!(super::random_u64(), super::random_u64());
    }
}
