//! Helpers of the unit tests: a small deterministic generator of random inputs.

/// xorshift64*: deterministic, so a failing case reproduces.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Random bytes, often assembled from pieces of JSON so that parsers get past the first
    /// byte.
    pub fn json_ish(&mut self) -> Vec<u8> {
        const PIECES: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"input\"",
            "\"model\"",
            "\"encoding_format\"",
            "\"base64\"",
            "\"float\"",
            "\"dimensions\"",
            "384",
            "-1",
            "1e999",
            "null",
            "true",
            "\"text\"",
            "\"\\u00e9\"",
            "\"\\ud800\"",
            " ",
            "\"",
            "\\",
        ];
        let mut out = Vec::new();
        for _ in 0..self.below(24) {
            if self.below(4) == 0 {
                out.extend(self.bytes(4));
            } else {
                out.extend_from_slice(PIECES[self.below(PIECES.len())].as_bytes());
            }
        }
        out
    }
}
