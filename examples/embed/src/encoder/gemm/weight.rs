//! The element types a linear layer's weight can have in the compute copy: f32, IEEE half
//! precision (`f16`, half the bytes: the owner's `--host-weights f16` form) or bfloat16
//! (`bf16`, the `--host-weights bf16` form, for the AMX kernel), the two halves widened to f32
//! as they are loaded, so the sums stay f32 either way. The tiles of `dot_avx2`, `dot_avx512`
//! and `cols_avx512` are generic over [`Weight`]; only the loads differ.

pub use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::f16 {}
    impl Sealed for super::bf16 {}
}

/// A weight element: `f32`, [`f16`] or [`bf16`] (sealed: the kernels' loads are written for
/// these three).
pub trait Weight: sealed::Sealed + Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Elements in one 64-byte cache line (what a prefetch asks for).
    const PER_LINE: usize;

    /// The value as f32 (exact for both types).
    fn widen(self) -> f32;

    /// The slice itself when it is f32 (read in place), `None` when it must be widened.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// `dst[i] = src[i]` as f32 (SIMD where the processor has it). Panics when the lengths
    /// differ.
    fn widen_slice(src: &[Self], dst: &mut [f32]);

    /// Eight elements from `p` on, widened to f32.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `p..p + 8` lies inside one slice of `Self`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// Sixteen elements from `p` on, widened to f32.
    ///
    /// # Safety
    /// AVX-512F is available; `p..p + 16` lies inside one slice of `Self`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Weight for f32 {
    const PER_LINE: usize = 16;

    #[inline]
    fn widen(self) -> f32 {
        self
    }

    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }

    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller's contract: eight f32 from `p` on are readable.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller's contract: sixteen f32 from `p` on are readable.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Weight for f16 {
    const PER_LINE: usize = 32;

    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }

    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        super::widen(src, dst);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller's contract: eight f16 (16 bytes) from `p` on are readable; the
        // load is unaligned, and F16C's `vcvtph2ps` widens them exactly.
        let bits = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(bits)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller's contract: sixteen f16 (32 bytes) from `p` on are readable; the
        // load is unaligned, and AVX-512F's `vcvtph2ps` widens them exactly.
        let bits = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_cvtph_ps(bits)
    }
}

impl Weight for bf16 {
    const PER_LINE: usize = 32;

    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }

    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "widen_slice: lengths differ");
        // A bf16 is the high half of an f32: the loop vectorises without intrinsics.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: the caller's contract: eight bf16 (16 bytes) from `p` on are readable; each
        // is zero-extended to 32 bits and moved to the high half, which is its f32 exactly.
        let bits = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller's contract: sixteen bf16 (32 bytes) from `p` on are readable;
        // widened as in `load8`.
        let bits = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }
}
