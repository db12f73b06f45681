//! The element types a linear layer's weight can have in the compute copy: f32, or IEEE half
//! precision (`f16`, half the bytes: the owner's `--host-weights f16` form) widened to f32 as it
//! is loaded, so the sums stay f32 either way. The tiles of `dot_avx2` and `dot_avx512` are
//! generic over [`Weight`]; only the loads differ.

pub use half::f16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::f16 {}
}

/// A weight element: `f32` or [`f16`] (sealed: the kernels' loads are written for these two).
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
