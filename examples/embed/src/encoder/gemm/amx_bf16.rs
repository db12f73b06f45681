//! The AMX kernel of [`super::linear_amx`]: a linear layer over a bf16 weight (the owner's
//! `--host-weights bf16` form) on the processor's tile unit, whose `tdpbf16ps` multiplies a
//! 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 sums in one instruction (about 1.8
//! TFLOP/s on one core of the Xeon this was measured on, against 0.16 for AVX-512 FMAs).
//!
//! The product is computed transposed, `yᵀ = W · xᵀ`, so that each operand is read as it is:
//! - the A tiles are the weight itself, 16 output rows × 32 inputs read in place from the
//!   shared compute copy (a row-major bf16 `[out][in]` is exactly the A layout);
//! - the B tiles are the activations, rounded to bf16 (nearest even) and laid out as AMX wants
//!   them, pairs of consecutive features per token: `pairs[k / 2][token]` holds
//!   `(x[k][token], x[k + 1][token])` in one 32-bit word. This packing is the only copy, of the
//!   activations (a few hundred KiB at most), never of the weight;
//! - the C tiles are 16 outputs × 16 tokens of f32 sums, which is the feature-major `y` the
//!   encoder keeps.
//!
//! Eight tile registers hold 2 × 2 C tiles (32 outputs by 32 tokens), two A and two B tiles:
//! each 32 inputs of the weight's two row blocks are loaded once and used twice. The weight
//! streams from memory once per call (the outer loop runs over the outputs; the activations
//! stay in L2 across it). Tokens are padded with zeros to a multiple of 32, so the sums of the
//! padding are computed and dropped; outputs and inputs must be multiples of 32 (every BERT
//! width is; [`super::linear_amx`] sends other shapes elsewhere).
//!
//! AMX needs the kernel's permission for its tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! asked once per process by [`available`]; the tile registers are configured at the start of
//! each call and released at its end, so a thread outside this kernel carries no tile state.
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly; the tile
//! registers are not known to the compiler, which never uses them.

use std::arch::asm;
use std::arch::x86_64::*;

use half::bf16;

/// Outputs per C tile (A tile rows) and tokens per C tile (B tile columns).
const TILE: usize = 16;

/// Inputs per A tile (32 bf16 are one 64-byte tile row).
const K_STEP: usize = 32;

/// Outputs and tokens per block of the 2 × 2 C tiles.
const BLOCK: usize = 2 * TILE;

/// `arch_prctl` request that asks for permission to use an extended state component.
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;

/// The state component of AMX's tile data (XFEATURE_XTILEDATA).
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether this process may run the kernel: the processor has AMX-TILE and AMX-BF16 (CPUID leaf
/// 7) and AVX-512F, and the kernel granted the tile data state. Asked once; a fork inherits the
/// permission, and a worker asks again harmlessly.
pub fn available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return false;
        }
        // CPUID leaf 7, subleaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = __cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and changes only
        // this process's permitted extended state; it fails cleanly (EINVAL, EPERM) on a kernel
        // or hypervisor without AMX support, which is reported as unavailable.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0;
        if !granted {
            log::info!(
                "the processor has AMX but the kernel refused its tile state ({}); bf16 \
                 weights run on the vector kernels",
                std::io::Error::last_os_error()
            );
        }
        granted
    })
}

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Eight tiles of 16 rows × 64 bytes: tmm0-3 the C tiles, tmm4-5 A, tmm6-7 B.
fn config() -> TileConfig {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        c.colsb[t] = 64;
        c.rows[t] = TILE as u8;
    }
    c
}

/// C tiles stored for the bias and the copy into `y`: four 16 × 16 f32 tiles.
#[repr(C, align(64))]
struct Sums([f32; 4 * TILE * TILE]);

/// The 32-bit words that [`linear`]'s packing of `rows` tokens by `inp` inputs takes: `inp / 2`
/// lines of the tokens rounded up to a multiple of 32.
fn pairs_len(rows: usize, inp: usize) -> usize {
    inp / 2 * rows.div_ceil(BLOCK) * BLOCK
}

/// Computes `y[o][r] = b[o] + Σₖ w[o][k] · bf16(x[k][r])`, `x` being `[inp][rows]` f32 and `y`
/// `[out][rows]` (`out = b.len()`), summed in f32. `pairs` is scratch for the packed
/// activations ([`pairs_len`] words).
///
/// # Safety
/// [`available`] returned true; `inp` and `out` are non-zero multiples of 32,
/// `w.len() == out * inp`, `x.len() >= inp * rows`, `y.len() >= out * rows`, `rows >= 1`.
#[target_feature(enable = "avx512f")]
pub unsafe fn linear(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[bf16],
    b: &[f32],
    y: &mut [f32],
    pairs: &mut Vec<u32>,
) {
    let out = b.len();
    let padded = rows.div_ceil(BLOCK) * BLOCK;
    if pairs.len() < pairs_len(rows, inp) {
        pairs.resize(pairs_len(rows, inp), 0);
    }
    // SAFETY: AVX-512F is available (this function's contract); inp is a multiple of 32,
    // x holds inp × rows values, padded (a multiple of 32) >= rows, and pairs was resized to
    // `pairs_len` = inp / 2 × padded words above.
    unsafe { pack(x, rows, inp, padded, pairs) };
    let cfg = config();
    let mut sums = Sums([0.0; 4 * TILE * TILE]);
    // Byte strides: a weight row, a line of pairs (one per two features), a stored C row.
    let wstride = inp * size_of::<bf16>();
    let pstride = padded * size_of::<u32>();
    let cstride = TILE * size_of::<f32>();
    // SAFETY: `cfg` is a valid palette-1 configuration (eight tiles of 16 rows × 64 bytes, the
    // most palette 1 allows); the process has the tile state's permission (`available`).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
    let wp = w.as_ptr();
    let pp = pairs.as_ptr();
    for o in (0..out).step_by(BLOCK) {
        for t in (0..padded).step_by(BLOCK) {
            // SAFETY: tile instructions on registers the configuration above set up.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                )
            };
            for k in (0..inp).step_by(K_STEP) {
                let a0 = wp.wrapping_add(o * inp + k);
                let a1 = a0.wrapping_add(TILE * inp);
                let b0 = pp.wrapping_add(k / 2 * padded + t);
                let b1 = b0.wrapping_add(TILE);
                // SAFETY: each tile load reads 16 rows of 64 bytes. A tiles: weight rows
                // o..o + 32 <= out (out is a multiple of 32), inputs k..k + 32 <= inp (inp a
                // multiple of 32), inside `w` (out × inp values). B tiles: pair lines
                // k/2..k/2 + 16 <= inp/2, tokens t..t + 32 <= padded, inside `pairs`
                // (`pairs_len` words, resized above). Only tmm0-7 are written.
                unsafe {
                    asm!(
                        "tileloadd tmm4, [{a0} + {ws}]",
                        "tileloadd tmm5, [{a1} + {ws}]",
                        "tileloadd tmm6, [{b0} + {ps}]",
                        "tileloadd tmm7, [{b1} + {ps}]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a1,
                        b0 = in(reg) b0,
                        b1 = in(reg) b1,
                        ws = in(reg) wstride,
                        ps = in(reg) pstride,
                        options(nostack, readonly)
                    )
                };
            }
            let s = sums.0.as_mut_ptr();
            // SAFETY: each store writes 16 rows of 64 bytes, one 256-value quarter of `sums`.
            unsafe {
                asm!(
                    "tilestored [{c0} + {cs}], tmm0",
                    "tilestored [{c1} + {cs}], tmm1",
                    "tilestored [{c2} + {cs}], tmm2",
                    "tilestored [{c3} + {cs}], tmm3",
                    c0 = in(reg) s,
                    c1 = in(reg) s.wrapping_add(TILE * TILE),
                    c2 = in(reg) s.wrapping_add(2 * TILE * TILE),
                    c3 = in(reg) s.wrapping_add(3 * TILE * TILE),
                    cs = in(reg) cstride,
                    options(nostack)
                )
            };
            store(&sums, b, o, t, rows, y);
        }
    }
    // SAFETY: releases the tile state this call configured (no operands).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Writes the block's sums (C tile `2i + j` is outputs `o + 16i..`, tokens `t + 16j..`) plus
/// the bias into `y`, for the tokens before `rows` (the padding's sums are dropped).
fn store(sums: &Sums, b: &[f32], o: usize, t: usize, rows: usize, y: &mut [f32]) {
    for (tile, c) in sums.0.chunks_exact(TILE * TILE).enumerate() {
        let (oi, tj) = (o + TILE * (tile / 2), t + TILE * (tile % 2));
        if tj >= rows {
            continue;
        }
        let n = (rows - tj).min(TILE);
        for (i, line) in c.chunks_exact(TILE).enumerate() {
            let bias = b[oi + i];
            let at = (oi + i) * rows + tj;
            for (d, s) in y[at..at + n].iter_mut().zip(line) {
                *d = s + bias;
            }
        }
    }
}

/// Packs `x` (`[inp][rows]` f32) into `pairs` (`[inp / 2][padded]` words): word
/// `(p, r)` holds bf16 of `x[2p][r]` in its low half and of `x[2p + 1][r]` in its high half,
/// rounded to nearest even; tokens `rows..padded` are zero. Sixteen tokens per step.
///
/// # Safety
/// AVX-512F is available; `inp` is even, `x.len() >= inp * rows`, `padded >= rows` is a
/// multiple of 16, `pairs.len() >= inp / 2 * padded`.
#[target_feature(enable = "avx512f")]
unsafe fn pack(x: &[f32], rows: usize, inp: usize, padded: usize, pairs: &mut [u32]) {
    let xp = x.as_ptr();
    let pp = pairs.as_mut_ptr();
    for p in 0..inp / 2 {
        let lo = xp.wrapping_add(2 * p * rows);
        let hi = lo.wrapping_add(rows);
        for r in (0..padded).step_by(16) {
            let mask: u16 = if r + 16 <= rows {
                u16::MAX
            } else if r < rows {
                (1u16 << (rows - r)) - 1
            } else {
                0
            };
            // SAFETY: the lanes set are tokens r + l < rows of feature 2p < inp, inside x;
            // masked-off lanes are not read (AVX-512 suppresses their faults) and are zero.
            let a = unsafe { _mm512_maskz_loadu_ps(mask, lo.wrapping_add(r)) };
            // SAFETY: the same tokens of feature 2p + 1 < inp.
            let c = unsafe { _mm512_maskz_loadu_ps(mask, hi.wrapping_add(r)) };
            let word = _mm512_or_si512(bf16_bits(a), _mm512_slli_epi32::<16>(bf16_bits(c)));
            // SAFETY: p * padded + r + 16 <= inp / 2 * padded <= pairs.len().
            unsafe { _mm512_storeu_si512(pp.wrapping_add(p * padded + r).cast(), word) };
        }
    }
}

/// The bf16 bits of each lane, rounded to nearest even, in the low half of its 32-bit word
/// (high half zero). A NaN stays a NaN (its quiet bit is set before the rounding).
#[inline]
#[target_feature(enable = "avx512f")]
fn bf16_bits(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_mask_or_epi32(bits, nan, bits, _mm512_set1_epi32(0x0040_0000));
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(quiet), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(quiet, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    // A NaN lane skips the rounding, whose carry would run through its all-ones exponent.
    _mm512_srli_epi32::<16>(_mm512_mask_mov_epi32(rounded, nan, quiet))
}
