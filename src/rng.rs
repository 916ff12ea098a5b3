//! One small seeded random generator, for the load generator, the fuzzer and
//! the tests: reproducible from a seed, fast, and of no statistical pride.

/// A xorshift64 generator.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator started from `seed` (any value; zero is moved off zero).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The generator of stream `id` of `seed`: streams of one seed differ.
    pub fn stream(seed: u64, id: u64) -> Self {
        Self::new(seed ^ (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The seed in the environment variable `var`, or one from the clock when it
/// is unset or not a number; either way the caller prints it, so that a run
/// can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_streams_differ() {
        let take = |mut r: XorShift| (0..4).map(|_| r.next_u64()).collect::<Vec<_>>();
        assert_eq!(take(XorShift::new(7)), take(XorShift::new(7)));
        assert_ne!(take(XorShift::stream(7, 0)), take(XorShift::stream(7, 1)));
        assert_ne!(XorShift::new(0).next_u64(), 0);
        assert!(XorShift::new(3).below(10) < 10);
    }
}
