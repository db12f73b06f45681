//! The AVX-512 kernel of [`super::linear_rows`]: the AVX2 kernel's tiles (`super::dot_avx2`,
//! whose plan of token-row groups and prefetches it shares) with 16-lane vectors, so one step
//! covers 16 values of `k` and each fused multiply-add does twice the work. With 32 vector
//! registers a tile takes up to [`MR`] = 6 token rows (18 sums, 3 weight registers, one for
//! the token row), so a text of 17 word pieces is 3 groups, not 5: each weight triple is read
//! from L1 fewer times and there are fewer tile epilogues. (Eight rows, 24 sums, measured
//! 15-20% slower than six: the compiler spilled sums to the stack inside the loop; four rows
//! 1-27% slower.) The epilogue folds each sum's two 256-bit halves and reduces four token rows
//! at once (as the AVX2 kernel does), not each sum on its own: with 384 inputs a tile has only
//! 24 steps, and twelve separate 16-lane reductions cost a third as much as the steps (why the
//! first version of this kernel, with 4-row tiles and such reductions, measured no faster than
//! AVX2). Every function here reads through raw pointers, and each one's contract says what the caller has checked.

use std::arch::x86_64::*;

use super::dot_avx2::{self, hsum4, Group, Layer, Triple};
use super::weight::Weight;

/// Token rows per tile (at most): six measured fastest (see the module's doc).
const MR: usize = 6;

/// Computes every output.
///
/// # Safety
/// AVX-512F is available; `w.len() == b.len() * inp`, `xt.len() >= rows * inp`,
/// `y.len() >= b.len() * rows`.
pub unsafe fn linear<W: Weight>(
    xt: &[f32],
    rows: usize,
    inp: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
) {
    // SAFETY: this function's contract, and `pick_triple`'s tiles need AVX-512F.
    unsafe { dot_avx2::run(xt, rows, inp, w, b, y, MR, pick_triple::<W>) }
}

/// A [`triple`] for `n` weight rows and `inp` inputs, specialised for BERT's input widths as
/// the AVX2 kernel's are.
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

/// Outputs `o..o+N` for every group of token rows, one [`tile`] per group.
///
/// # Safety
/// AVX-512F is available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`, and for every group
/// `(r + m) * inp <= xt.len()`, `(o + N - 1) * rows + r + m <= y.len()`, `1 <= m <= MR`.
#[target_feature(enable = "avx512f")]
unsafe fn triple<W: Weight, const N: usize, const INP: usize>(
    layer: Layer<'_, W>,
    y: &mut [f32],
    o: usize,
    groups: &[Group],
    pf: *const W,
) {
    for g in groups {
        let pf = g.prefetches(pf);
        match g.m {
            // SAFETY: this function's contract, for the group's six rows.
            6 => unsafe { tile::<W, 6, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's five rows.
            5 => unsafe { tile::<W, 5, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
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

/// One tile: outputs `o..o+N` for token rows `r..r+M` (`M <= MR`); `INP` is 0 or `inp`. It asks
/// for the `pf_lines` 64-byte lines from `pf` on, at most `pf_per_step` per 16 values of `k`
/// (a prefetch never faults, so `pf` needs no contract; the caller points it into `w`).
///
/// # Safety
/// AVX-512F is available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`,
/// `(r + M) * inp <= xt.len()`, and `(o + N - 1) * rows + r + M <= y.len()`.
#[target_feature(enable = "avx512f")]
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
    let inp = if INP != 0 { INP } else { inp };
    let wp = w.as_ptr().wrapping_add(o * inp);
    let xp = xt.as_ptr().wrapping_add(r * inp);
    let mut acc = [[_mm512_setzero_ps(); N]; M];
    let full = inp - inp % 16;
    let mut pf_done = 0;
    let mut k = 0;
    while k + 16 <= full {
        let mut wv = [_mm512_setzero_ps(); N];
        for (n, v) in wv.iter_mut().enumerate() {
            // SAFETY: wp + n * inp + k + 16 <= w + (o + n + 1) * inp <= w + w.len(), as
            // k + 16 <= inp and o + N <= b.len() = w.len() / inp.
            // AVX-512F is enabled here, as `load16` needs.
            *v = unsafe { W::load16(wp.wrapping_add(n * inp + k)) };
        }
        for (m, line) in acc.iter_mut().enumerate() {
            // SAFETY: xp + m * inp + k + 16 <= xt + (r + M) * inp <= xt + xt.len().
            let xv = unsafe { _mm512_loadu_ps(xp.wrapping_add(m * inp + k)) };
            for (a, wn) in line.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(*wn, xv, *a);
            }
        }
        for _ in 0..pf_per_step {
            if pf_done < pf_lines {
                // A prefetch never faults, and `wrapping_add` makes no claim on the address.
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(pf_done * W::PER_LINE).cast());
                pf_done += 1;
            }
        }
        k += 16;
    }
    // Each sum's two 256-bit halves added, then four token rows reduced at once.
    let zero = _mm256_setzero_ps();
    let halves = |v: __m512| {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(lo, hi)
    };
    for n in 0..N {
        let pick = |m: usize| if m < M { halves(acc[m][n]) } else { zero };
        let line = &mut y[(o + n) * rows + r..][..M];
        for (c, chunk) in line.chunks_mut(4).enumerate() {
            let m0 = 4 * c;
            let v = _mm_add_ps(
                hsum4(pick(m0), pick(m0 + 1), pick(m0 + 2), pick(m0 + 3)),
                _mm_set1_ps(b[o + n]),
            );
            let mut sums = [0.0f32; 4];
            // SAFETY: `sums` holds 4 floats.
            unsafe { _mm_storeu_ps(sums.as_mut_ptr(), v) };
            chunk.copy_from_slice(&sums[..chunk.len()]);
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
