//! The AVX2/FMA kernel of [`super::linear_rows`], and the plan of its tiles that the AVX-512
//! kernel (`super::dot_avx512`) shares. Every function here reads through raw pointers; each
//! one's contract says what the caller has checked.
//!
//! A tile is [`NR`] weight rows against up to [`MR`] token rows: per 8 lanes of `k`, three
//! weight loads kept in registers, one load per token row and one fused multiply-add per
//! (token row, weight row) pair: 7 loads for 12 FMAs, so the FMA units, not the load ports,
//! set the pace. Weight rows are the outer loop: a triple of weight rows (18 KiB at 1536
//! inputs) stays in L1 while every group of token rows passes it, so the weights stream
//! from memory once per call, and the token rows (a few KiB to a few hundred) are re-read
//! from L1 or L2. The encoder's 42 MiB of weights do not fit a 32 MiB last-level cache, so
//! each call's weights come from memory; the next triple is prefetched while this one is
//! computed, a slice per group of token rows, which took one short text's products from
//! 34 to 60 GFLOP/s.

use std::arch::x86_64::*;

use super::weight::Weight;

/// Token rows per tile.
pub(super) const MR: usize = 4;
/// Weight rows per tile: 4 × 3 accumulators and 3 weight registers fill 15 of the sixteen
/// vector registers.
pub(super) const NR: usize = 3;
/// Weight triples between the one computed and the one prefetched (1: the next; two and
/// three ahead measured slower).
const PF_DIST: usize = 1;

/// The operands of one linear layer: `rows` token rows of `xt` (`[rows][inp]`), the weight
/// `w` (`[out][inp]`, f32 or f16) and the bias `b` (`[out]`).
pub(super) struct Layer<'a, W> {
    pub(super) xt: &'a [f32],
    pub(super) rows: usize,
    pub(super) inp: usize,
    pub(super) w: &'a [W],
    pub(super) b: &'a [f32],
}

impl<W> Clone for Layer<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for Layer<'_, W> {}

/// Groups of token rows planned on the stack: [`super::DOT_KERNEL_MAX_ROWS`] rows in
/// groups of [`MR`].
const MAX_GROUPS: usize = super::DOT_KERNEL_MAX_ROWS.div_ceil(MR);

/// One group of token rows, and its share of the prefetches of the next weight triple.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Group {
    /// First token row.
    pub(super) r: usize,
    /// Token rows (1 to the kernel's group size: [`MR`] for AVX2, 6 for AVX-512).
    pub(super) m: usize,
    /// First line, counted from the start of the prefetched rows, that this group asks for.
    pf_first: usize,
    /// Lines it asks for.
    pf_lines: usize,
    /// At most this many per step of `k`.
    pub(super) pf_per_step: usize,
}

impl Group {
    /// Where this group's share of the prefetches starts (from the prefetched rows' start
    /// `pf`) and how many 64-byte lines it asks for.
    pub(super) fn prefetches<W: Weight>(&self, pf: *const W) -> (*const W, usize) {
        (pf.wrapping_add(self.pf_first * W::PER_LINE), self.pf_lines)
    }
}

/// Spreads `lines` 64-byte prefetch lines over the groups, in order.
fn share_prefetches(groups: &mut [Group], lines: usize, inp: usize) {
    let n = groups.len();
    let per_step = lines.div_ceil(n * (inp / 16).max(1));
    for (g, group) in groups.iter_mut().enumerate() {
        group.pf_first = lines * g / n;
        group.pf_lines = lines * (g + 1) / n - group.pf_first;
        group.pf_per_step = per_step;
    }
}

/// Computes every output.
///
/// # Safety
/// AVX2, FMA and F16C are available; `w.len() == b.len() * inp`, `xt.len() >= rows * inp`,
/// `y.len() >= b.len() * rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn linear<W: Weight>(
    xt: &[f32],
    rows: usize,
    inp: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
) {
    // SAFETY: this function's contract, and `pick_triple`'s tiles need AVX2, FMA and F16C.
    unsafe { run(xt, rows, inp, w, b, y, MR, pick_triple::<W>) }
}

/// Plans the tiles (token rows in groups of at most `mr`, the prefetches shared among them)
/// and runs the triples `pick` gives for every three weight rows: the loop both kernels
/// share (the AVX2 one with groups of [`MR`] rows, the AVX-512 one, which has twice the
/// registers, with groups of up to 6).
///
/// # Safety
/// The processor runs the triples `pick` returns, which take groups of up to `mr` rows
/// (`1 <= mr`); `w.len() == b.len() * inp`, `xt.len() >= rows * inp`,
/// `y.len() >= b.len() * rows`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run<W: Weight>(
    xt: &[f32],
    rows: usize,
    inp: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
    mr: usize,
    pick: fn(usize, usize) -> Triple<W>,
) {
    let out = b.len();
    // Token rows in groups of at most mr, as even as possible (a tile of 3 rows does more
    // work per load than one of 1), planned once for every weight triple.
    let n_groups = rows.div_ceil(mr);
    let mut plan = [Group::default(); MAX_GROUPS];
    let mut more = Vec::new();
    let groups: &mut [Group] = if n_groups <= MAX_GROUPS {
        &mut plan[..n_groups]
    } else {
        // Beyond the rows the encoder gives this kernel (it still computes them right).
        more.resize(n_groups, Group::default());
        &mut more
    };
    let mut r = 0;
    for (g, group) in groups.iter_mut().enumerate() {
        group.r = r;
        group.m = (rows - r) / (n_groups - g);
        r += group.m;
    }
    let full_lines = (NR * inp).div_ceil(W::PER_LINE);
    share_prefetches(groups, full_lines, inp);
    let full = pick(NR, inp);
    let layer = Layer {
        xt,
        rows,
        inp,
        w,
        b,
    };
    let mut o = 0;
    while o < out {
        let n = (out - o).min(NR);
        // The weight rows PF_DIST triples ahead, asked for a slice per group, so that they
        // come from memory while this triple is computed, with few misses in flight at once.
        let pf_from = (o + PF_DIST * NR).min(out) * inp;
        let pf_to = (o + (PF_DIST + 1) * NR).min(out) * inp;
        let lines = (pf_to - pf_from).div_ceil(W::PER_LINE);
        if lines != full_lines {
            // The last triples: fewer (or no) rows left to prefetch.
            share_prefetches(groups, lines, inp);
        }
        let f = if n == NR { full } else { pick(n, inp) };
        let pf = w.as_ptr().wrapping_add(pf_from);
        // SAFETY: o + n <= b.len() and every group's rows lie in 0..rows, so each tile's
        // weight rows, token rows and outputs lie inside the slices by this function's
        // contract; the processor runs the triple (same contract). (`pf` is only prefetched.)
        unsafe { f(layer, y, o, groups, pf) };
        o += n;
    }
}

/// A [`triple`] for `n` weight rows and `inp` inputs: specialised for the input widths of
/// BERT-base-like models (the row offsets become constants, which frees the registers that
/// would hold seven row pointers), generic otherwise.
fn pick_triple<W: Weight>(n: usize, inp: usize) -> Triple<W> {
    macro_rules! by_rows {
        ($w:literal) => {
            match n {
                3 => triple::<W, 3, $w>,
                2 => triple::<W, 2, $w>,
                _ => triple::<W, 1, $w>,
            }
        };
    }
    match inp {
        384 => by_rows!(384),
        1536 => by_rows!(1536),
        768 => by_rows!(768),
        3072 => by_rows!(3072),
        _ => by_rows!(0),
    }
}

/// A [`triple`] of some shape (or the AVX-512 kernel's).
pub(super) type Triple<W> = unsafe fn(Layer<'_, W>, &mut [f32], usize, &[Group], *const W);

/// Outputs `o..o+N` for every group of token rows, one [`tile`] per group (inlined: one
/// call per weight triple, not one per tile). `pf` is where the next triple's rows start.
///
/// # Safety
/// AVX2, FMA and F16C are available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`, and for
/// every group `(r + m) * inp <= xt.len()`, `(o + N - 1) * rows + r + m <= y.len()`,
/// `1 <= m <= MR`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn triple<W: Weight, const N: usize, const INP: usize>(
    layer: Layer<'_, W>,
    y: &mut [f32],
    o: usize,
    groups: &[Group],
    pf: *const W,
) {
    for g in groups {
        let pf = g.prefetches(pf);
        // Each arm is a direct call (inlined), not one through a pointer picked by `m`.
        match g.m {
            // SAFETY: this function's contract, for the group's four rows.
            4 => unsafe { tile::<W, 4, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's three rows.
            3 => unsafe { tile::<W, 3, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's two rows.
            2 => unsafe { tile::<W, 2, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's one row (m >= 1).
            _ => unsafe { tile::<W, 1, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
        }
    }
}

/// One tile: outputs `o..o+N` for token rows `r..r+M` (`M <= 4`); `INP` is 0 or `inp`. Along the way it asks for
/// the `pf_lines` 64-byte lines from `pf` on, at most `pf_per_step` per step of `k` (a
/// prefetch never faults, so `pf` needs no contract; the caller points it into `w`).
///
/// # Safety
/// AVX2, FMA and F16C are available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`,
/// `(r + M) * inp <= xt.len()`, and `(o + N - 1) * rows + r + M <= y.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<W: Weight, const M: usize, const N: usize, const INP: usize>(
    Layer {
        xt,
        rows,
        inp,
        w,
        b,
    }: Layer<'_, W>,
    y: &mut [f32],
    o: usize,
    r: usize,
    (pf, pf_lines): (*const W, usize),
    pf_per_step: usize,
) {
    // INP, when not 0, is `inp` known at compile time.
    let inp = if INP != 0 { INP } else { inp };
    let wp = w.as_ptr().wrapping_add(o * inp);
    let mut pf_done = 0;
    let xp = xt.as_ptr().wrapping_add(r * inp);
    let mut acc = [[_mm256_setzero_ps(); N]; M];
    let full = inp - inp % 8;
    // One step: 8 lanes of k for every (token row, weight row) pair.
    let step = |k: usize, acc: &mut [[__m256; N]; M]| {
        let mut wv = [_mm256_setzero_ps(); N];
        for (n, v) in wv.iter_mut().enumerate() {
            // SAFETY: wp + n * inp + k + 8 <= w + (o + n + 1) * inp <= w + w.len(), as
            // k + 8 <= inp and o + N <= b.len() = w.len() / inp.
            // AVX2, FMA and F16C are enabled here, as `load8` needs.
            *v = unsafe { W::load8(wp.wrapping_add(n * inp + k)) };
        }
        for (m, line) in acc.iter_mut().enumerate() {
            // SAFETY: xp + m * inp + k + 8 <= xt + (r + M) * inp <= xt + xt.len().
            let xv = unsafe { _mm256_loadu_ps(xp.wrapping_add(m * inp + k)) };
            for (a, wn) in line.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(*wn, xv, *a);
            }
        }
    };
    let mut k = 0;
    // Two steps per turn, with the prefetches of a 64-byte line's worth of both.
    while k + 16 <= full {
        step(k, &mut acc);
        step(k + 8, &mut acc);
        for _ in 0..pf_per_step {
            if pf_done < pf_lines {
                // A prefetch never faults, and `wrapping_add` makes no claim on the address.
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(pf_done * W::PER_LINE).cast());
                pf_done += 1;
            }
        }
        k += 16;
    }
    if k < full {
        step(k, &mut acc);
    }
    let zero = _mm256_setzero_ps();
    for n in 0..N {
        // The M sums of weight row o + n, one per lane of a 4-lane vector, plus its bias.
        let pick = |m: usize| if m < M { acc[m][n] } else { zero };
        let v = _mm_add_ps(
            hsum4(pick(0), pick(1), pick(2), pick(3)),
            _mm_set1_ps(b[o + n]),
        );
        let line = &mut y[(o + n) * rows + r..][..M];
        if M == 4 {
            // SAFETY: `line` holds M = 4 floats.
            unsafe { _mm_storeu_ps(line.as_mut_ptr(), v) };
        } else {
            let mut sums = [0.0f32; 4];
            // SAFETY: `sums` holds 4 floats.
            unsafe { _mm_storeu_ps(sums.as_mut_ptr(), v) };
            line.copy_from_slice(&sums[..M]);
        }
        if full < inp {
            let wtail = &w[(o + n) * inp + full..(o + n + 1) * inp];
            for (m, out) in line.iter_mut().enumerate() {
                let xtail = &xt[(r + m) * inp + full..(r + m + 1) * inp];
                *out += wtail
                    .iter()
                    .zip(xtail)
                    .map(|(p, q)| p.widen() * q)
                    .sum::<f32>();
            }
        }
    }
}

/// `dst[i] = src[i]` as f32, 8 values at a time (the rest one by one): an f16 weight's rows
/// widened for the `gemm` crate (`super::widen`).
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen<W: Weight>(src: &[W], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    let full = src.len() - src.len() % 8;
    for k in (0..full).step_by(8) {
        // SAFETY: k + 8 <= full <= src.len(): eight values from k on lie inside src; F16C
        // (and AVX2) are available by the contract.
        let v = unsafe { W::load8(src.as_ptr().wrapping_add(k)) };
        // SAFETY: k + 8 <= dst.len() = src.len() (asserted); the store is unaligned.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().wrapping_add(k), v) };
    }
    for (d, s) in dst[full..].iter_mut().zip(&src[full..]) {
        *d = s.widen();
    }
}

/// The 8 × 8 block at row `r`, column `c` of `src` (`cols` wide), transposed into `dst`
/// (`rows` wide) at row `c`, column `r`.
///
/// # Safety
/// AVX2 is available; `(r + 8) * cols <= src.len()` with `c + 8 <= cols`, and
/// `(c + 8) * rows <= dst.len()` with `r + 8 <= rows`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn transpose8(
    src: &[f32],
    cols: usize,
    dst: &mut [f32],
    rows: usize,
    r: usize,
    c: usize,
) {
    let sp = src.as_ptr().wrapping_add(r * cols + c);
    let mut v = [_mm256_setzero_ps(); 8];
    for (i, line) in v.iter_mut().enumerate() {
        // SAFETY: row r + i < r + 8 of src, columns c..c + 8 <= cols: inside src.
        *line = unsafe { _mm256_loadu_ps(sp.wrapping_add(i * cols)) };
    }
    // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    let dp = dst.as_mut_ptr().wrapping_add(c * rows + r);
    for (j, line) in out.iter().enumerate() {
        // SAFETY: row c + j < c + 8 of dst, columns r..r + 8 <= rows: inside dst.
        unsafe { _mm256_storeu_ps(dp.wrapping_add(j * rows), *line) };
    }
}

/// The lane sums of four vectors, as one 4-lane vector: lane `i` is the sum of the `i`th.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    // Per 128-bit half: [a b c d] partial sums of that half's lanes.
    let t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
}
