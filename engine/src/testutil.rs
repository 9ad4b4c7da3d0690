//! Helpers shared by the unit tests.

/// A xorshift64 generator: cheap, reproducible pseudo-random numbers for
/// fuzz-style tests. `seed` must not be zero.
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
