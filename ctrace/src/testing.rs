//! Test support: a small deterministic generator for property tests, so a
//! failing case is the same on every run and machine.

/// xorshift64*: fast, seedable, good enough to pick test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// `seed`, or `CTRACE_FUZZ_SEED` when set: CI runs the fixed cases,
    /// a developer can explore others (`CTRACE_FUZZ_SEED=7 cargo test`).
    pub fn seeded(seed: u64) -> Self {
        let chosen = std::env::var("CTRACE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(seed);
        Rng::new(chosen)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
