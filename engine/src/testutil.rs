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

/// `rounds` copies of `base`, each with one to four of its first `span`
/// bytes changed at random, with a random number to go along: the inputs
/// of the parsers' never-panic tests.
pub(crate) fn mutations(
    base: &[u8],
    span: usize,
    rounds: usize,
) -> impl Iterator<Item = (Vec<u8>, u64)> + '_ {
    let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
    let span = span.clamp(1, base.len().max(1)) as u64;
    (0..rounds).map(move |_| {
        let mut b = base.to_vec();
        for _ in 0..1 + next() % 4 {
            if let Some(x) = b.get_mut((next() % span) as usize) {
                *x = next() as u8;
            }
        }
        (b, next())
    })
}
