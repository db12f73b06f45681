//! The AVX-512 kernel of [`super::linear_rows`]: the AVX2 kernel's tiles (`super::dot_avx2`,
//! whose plan of token-row groups and prefetches it shares) with 16-lane vectors, so one step
//! covers 16 values of `k` and each fused multiply-add does twice the work. Run where the
//! processor has AVX-512F and `ZYGOTE_EMBED_DOT_KERNEL=avx512` asks for it (it measured no
//! faster than the AVX2 kernel here); every function here reads through raw pointers, and each
//! one's contract says what the caller has checked.

use std::arch::x86_64::*;

use super::dot_avx2::{self, Group, Layer, Triple};

/// Computes every output.
///
/// # Safety
/// AVX-512F is available; `w.len() == b.len() * inp`, `xt.len() >= rows * inp`,
/// `y.len() >= b.len() * rows`.
pub unsafe fn linear(xt: &[f32], rows: usize, inp: usize, w: &[f32], b: &[f32], y: &mut [f32]) {
    // SAFETY: this function's contract, and `pick_triple`'s tiles need AVX-512F.
    unsafe { dot_avx2::run(xt, rows, inp, w, b, y, pick_triple) }
}

/// A [`triple`] for `n` weight rows and `inp` inputs, specialised for BERT's input widths as
/// the AVX2 kernel's are.
fn pick_triple(n: usize, inp: usize) -> Triple {
    macro_rules! by_rows {
        ($w:literal) => {
            match n {
                3 => triple::<3, $w>,
                2 => triple::<2, $w>,
                _ => triple::<1, $w>,
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
unsafe fn triple<const N: usize, const INP: usize>(
    layer: Layer<'_>,
    y: &mut [f32],
    o: usize,
    groups: &[Group],
    pf: *const f32,
) {
    for g in groups {
        let pf = g.prefetches(pf);
        match g.m {
            // SAFETY: this function's contract, for the group's four rows.
            4 => unsafe { tile::<4, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's three rows.
            3 => unsafe { tile::<3, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's two rows.
            2 => unsafe { tile::<2, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
            // SAFETY: this function's contract, for the group's one row (m >= 1).
            _ => unsafe { tile::<1, N, INP>(layer, y, o, g.r, pf, g.pf_per_step) },
        }
    }
}

/// One tile: outputs `o..o+N` for token rows `r..r+M` (`M <= 4`); `INP` is 0 or `inp`. It asks
/// for the `pf_lines` 64-byte lines from `pf` on, at most `pf_per_step` per 16 values of `k`
/// (a prefetch never faults, so `pf` needs no contract; the caller points it into `w`).
///
/// # Safety
/// AVX-512F is available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`,
/// `(r + M) * inp <= xt.len()`, and `(o + N - 1) * rows + r + M <= y.len()`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const M: usize, const N: usize, const INP: usize>(
    Layer {
        xt,
        rows,
        inp,
        w,
        b,
    }: Layer<'_>,
    y: &mut [f32],
    o: usize,
    r: usize,
    (pf, pf_lines): (*const f32, usize),
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
            *v = unsafe { _mm512_loadu_ps(wp.wrapping_add(n * inp + k)) };
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
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(pf_done * 16).cast());
                pf_done += 1;
            }
        }
        k += 16;
    }
    for n in 0..N {
        let line = &mut y[(o + n) * rows + r..][..M];
        for (m, out) in line.iter_mut().enumerate() {
            let mut sum = b[o + n] + _mm512_reduce_add_ps(acc[m][n]);
            if full < inp {
                let wtail = &w[(o + n) * inp + full..(o + n + 1) * inp];
                let xtail = &xt[(r + m) * inp + full..(r + m + 1) * inp];
                sum += wtail.iter().zip(xtail).map(|(p, q)| p * q).sum::<f32>();
            }
            *out = sum;
        }
    }
}
