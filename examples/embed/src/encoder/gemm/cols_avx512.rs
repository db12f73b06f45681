//! The AVX-512 kernel of [`super::linear_cols`]: a linear layer over many token rows (a batch
//! of texts), computed on the feature-major activations as they are, with the vectors running
//! along the tokens. `y[o][r..r + 16]` is one register: for each `k`, one load of
//! `x[k][r..r + 16]` is multiplied by `w[o][k]` broadcast from the weight row (a load-port
//! instruction, no shuffle), for [`NB`] = 8 outputs and up to
//! [`T`] = 3 token vectors at once, 24 sums in registers. No horizontal sums, no transpose of
//! the activations, no packing of an f32 weight, which is read in place. The last token vector
//! of a block is masked, so any row count is exact.
//!
//! The loops run over [`KC`] values of `k` at a time, then over blocks of 48 tokens, then over
//! the blocks of outputs: a token block's activations (48 × `KC`, 24 KiB) stay in L1 while every
//! block of outputs reads them, and the weight's `KC` columns (a few hundred KiB) stay in L2
//! while every token block reads them, so each weight value comes from memory once per call.
//! The sums go to `y` between chunks of `k`. A call of one token block (up to 48 rows: one
//! text) runs `k` whole instead: its activations come from L2 either way, and a whole weight row
//! is one stream, which the hardware prefetcher follows. An f16 weight's block is widened into a
//! scratch (`wide`, 8 rows of the chunk: 4 KiB, or 8 whole rows) as it is reached, once per
//! token block; so is the last block of an f32 weight whose outputs are no multiple of [`NB`],
//! padded with zero rows.
//!
//! Why not the dot kernel (`dot_avx512`) for batches: its tiles sum along `k`, re-read every
//! token row once per weight triple and end with horizontal sums. Why not the `gemm` crate: on
//! stable Rust it runs its AVX2 kernels. Every function here reads through raw pointers, and
//! each one's contract says what the caller has checked.

use std::arch::x86_64::*;

use super::weight::Weight;

/// Outputs per block (sums per token vector).
pub const NB: usize = 8;

/// Token vectors (16 tokens each) per block at most: 24 sums and 3 token vectors fill 27 of
/// the 32 vector registers.
const T: usize = 3;

/// Values of `k` per chunk: eight f32 weight rows of 128 values are 4 KiB, 48 tokens' activations
/// 24 KiB (L1 holds both).
const KC: usize = 128;

/// Computes every output: `y[o][r] = b[o] + Σₖ w[o][k] · x[k][r]`, `x` being `[inp][rows]` and
/// `y` `[out][rows]` (`out = b.len()`). `wide` is scratch for widened (or padded) weight rows.
///
/// # Safety
/// AVX-512F, AVX2, FMA and F16C are available; `w.len() == b.len() * inp`,
/// `x.len() >= inp * rows`, `y.len() >= b.len() * rows`, `rows >= 1`, `inp >= 1`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn linear<W: Weight>(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
    wide: &mut Vec<f32>,
) {
    let out = b.len();
    // Token vectors in blocks of at most T, as even as possible (a block of one vector does
    // fewer multiply-adds per load than one of two or three).
    let vectors = rows.div_ceil(16);
    let token_blocks = vectors.div_ceil(T);
    // One token block reads its activations from L2 anyway: then k runs whole, so that each
    // weight row streams from memory in one piece, which the hardware prefetcher follows.
    let chunk = if token_blocks == 1 { inp } else { KC };
    let scratch = wide_to(wide, NB * inp.min(chunk));
    let mut k0 = 0;
    while k0 < inp {
        let kc = (inp - k0).min(chunk);
        let mut v0 = 0;
        for t in 0..token_blocks {
            let v = (vectors - v0) / (token_blocks - t);
            let mut o = 0;
            while o < out {
                let nb = (out - o).min(NB);
                // The block's weight: f32 rows in place (row stride inp), or (f16 rows, or the
                // last rows of an f32 weight whose outputs are no multiple of NB) widened into
                // the scratch, zero rows after the last output (row stride kc).
                let rows_w = match W::as_f32(w) {
                    Some(wf) if nb == NB => Rows {
                        w: &wf[o * inp + k0..],
                        ws: inp,
                    },
                    _ => {
                        let block = &mut scratch[..NB * kc];
                        for (j, line) in block.chunks_exact_mut(kc).enumerate() {
                            if j < nb {
                                let from = (o + j) * inp + k0;
                                W::widen_slice(&w[from..from + kc], line);
                            } else {
                                line.fill(0.0);
                            }
                        }
                        Rows { w: block, ws: kc }
                    }
                };
                let mut bias = [0.0f32; NB];
                bias[..nb].copy_from_slice(&b[o..o + nb]);
                // The next block's rows of this chunk (as stored: f32 or f16), asked for while
                // the first token block runs, so that they come from memory while this block
                // is computed; later token blocks find them in L2.
                let pf = Prefetch {
                    at: if t == 0 && o + 2 * NB <= out {
                        w.as_ptr().wrapping_add((o + NB) * inp + k0).cast()
                    } else {
                        std::ptr::null()
                    },
                    row: inp * size_of::<W>(),
                    per_k: size_of::<W>(),
                };
                // SAFETY: this function's contract gives the features and the lengths of x
                // and y; `rows_w` holds NB rows of `kc` values at stride `ws` (an f32 block
                // in place: rows o..o+NB <= out, columns k0..k0+kc <= inp; or the scratch,
                // NB rows of kc); 1 <= nb <= NB; the block's `v` token vectors
                // (1 <= v <= T) start at token 16·v0 < rows and each holds at least one
                // token (v0 + v <= vectors = ceil(rows / 16)); y's lines o..o+nb hold `rows`
                // values each. `pf` is only prefetched.
                unsafe {
                    pick_tile(v, rows_w.ws)(
                        Chunk { x, rows, k0, kc },
                        rows_w,
                        (k0 == 0).then_some(&bias),
                        nb,
                        &mut y[o * rows..],
                        16 * v0,
                        pf,
                    )
                };
                o += nb;
            }
            v0 += v;
        }
        k0 += kc;
    }
}

/// The most values [`linear`] grows `wide` to: one block's chunk of rows.
pub fn scratch(inp: usize) -> usize {
    NB * inp
}

/// `wide`, grown to at least `len` values.
fn wide_to(wide: &mut Vec<f32>, len: usize) -> &mut Vec<f32> {
    if wide.len() < len {
        wide.resize(len, 0.0);
    }
    wide
}

/// The activations a tile reads: features `k0..k0 + kc` of `x` (`[inp][rows]`).
#[derive(Clone, Copy)]
struct Chunk<'a> {
    x: &'a [f32],
    rows: usize,
    k0: usize,
    kc: usize,
}

/// The weight a tile reads: NB rows of the chunk's `kc` values, row `j` from `w[j * ws]` on.
#[derive(Clone, Copy)]
struct Rows<'a> {
    w: &'a [f32],
    ws: usize,
}

/// The weight rows a tile asks for as it runs: NB rows `row` bytes apart from `at` on (none
/// when `at` is null), `per_k` bytes per value of `k`, a line of each row every 16 values (an
/// f16 row's line twice). A prefetch never faults, so the pointer needs no contract.
#[derive(Clone, Copy)]
struct Prefetch {
    at: *const u8,
    row: usize,
    per_k: usize,
}

/// A tile of NB outputs by `v` token vectors for rows `ws` apart: specialised for BERT's
/// input widths and for [`KC`] (the weight rows' offsets become constants, which frees the
/// registers that would hold eight row pointers), generic otherwise.
type Tile = unsafe fn(Chunk<'_>, Rows<'_>, Option<&[f32; NB]>, usize, &mut [f32], usize, Prefetch);

fn pick_tile(v: usize, ws: usize) -> Tile {
    macro_rules! by_vectors {
        ($ws:expr) => {
            match v {
                3 => tile::<3, { $ws }>,
                2 => tile::<2, { $ws }>,
                _ => tile::<1, { $ws }>,
            }
        };
    }
    match ws {
        KC => by_vectors!(KC),
        384 => by_vectors!(384),
        1536 => by_vectors!(1536),
        768 => by_vectors!(768),
        3072 => by_vectors!(3072),
        _ => by_vectors!(0),
    }
}

/// Outputs `0..NB` of tokens `r..r + 16·V` (the last vector masked at `rows`) over the chunk's
/// features, of which the first `nb` are stored in `y` (line `j` at `y[j * rows]`): the sums
/// start at `bias` when it is given (the first chunk), at `y`'s partial sums otherwise. `WS`
/// is 0 or `ws`. It asks for the rows `pf` names.
///
/// # Safety
/// AVX-512F is available; `w.w.len() >= (NB - 1) * w.ws + c.kc`, `1 <= nb <= NB`,
/// `x.len() >= (c.k0 + c.kc) * rows`, `y.len() >= nb * rows`, and `r + 16 * (V - 1) < rows`
/// (every vector holds at least one token).
#[target_feature(enable = "avx512f")]
unsafe fn tile<const V: usize, const WS: usize>(
    c: Chunk<'_>,
    w: Rows<'_>,
    bias: Option<&[f32; NB]>,
    nb: usize,
    y: &mut [f32],
    r: usize,
    pf: Prefetch,
) {
    let ws = if WS != 0 { WS } else { w.ws };
    let rows = c.rows;
    // Lanes of each token vector that hold tokens (the last one may be partial).
    let mut masks = [0u16; V];
    for (v, mask) in masks.iter_mut().enumerate() {
        let left = rows - r - 16 * v;
        *mask = if left >= 16 {
            u16::MAX
        } else {
            (1u16 << left) - 1
        };
    }
    let yp = y.as_mut_ptr();
    let mut acc = [[_mm512_setzero_ps(); V]; NB];
    for (j, line) in acc.iter_mut().enumerate() {
        match bias {
            Some(bias) => *line = [_mm512_set1_ps(bias[j]); V],
            None if j < nb => {
                for (v, a) in line.iter_mut().enumerate() {
                    // SAFETY: the lanes set are tokens r + 16v + l < rows of output j < nb,
                    // at j * rows + r + 16v + l < nb * rows <= y.len(); masked-off lanes are
                    // not read (AVX-512 suppresses their faults).
                    *a = unsafe {
                        _mm512_maskz_loadu_ps(masks[v], yp.wrapping_add(j * rows + r + 16 * v))
                    };
                }
            }
            None => {}
        }
    }
    let wp = w.w.as_ptr();
    let xp = c.x.as_ptr().wrapping_add(c.k0 * rows + r);
    let mut k0 = 0;
    while k0 < c.kc {
        if !pf.at.is_null() {
            for j in 0..NB {
                // A prefetch never faults, and `wrapping_add` makes no claim on the address.
                let line = pf.at.wrapping_add(j * pf.row + k0 * pf.per_k);
                _mm_prefetch::<_MM_HINT_T0>(line.cast());
            }
        }
        for k in k0..(k0 + 16).min(c.kc) {
            let xk = xp.wrapping_add(k * rows);
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, xv) in xv.iter_mut().enumerate() {
                // SAFETY: lanes set in the mask are tokens r + 16v + l < rows of feature
                // k0 + k < k0 + kc, inside x (x.len() >= (k0 + kc) * rows); masked-off lanes
                // are not read (AVX-512 suppresses their faults).
                *xv = unsafe { _mm512_maskz_loadu_ps(masks[v], xk.wrapping_add(16 * v)) };
            }
            for (j, line) in acc.iter_mut().enumerate() {
                // SAFETY: j < NB and k < kc, so j * ws + k < (NB - 1) * ws + kc <= w.len().
                let wv = _mm512_set1_ps(unsafe { *wp.wrapping_add(j * ws + k) });
                for (a, xv) in line.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, *xv, *a);
                }
            }
        }
        k0 += 16;
    }
    for (j, line) in acc.iter().enumerate().take(nb) {
        for (v, a) in line.iter().enumerate() {
            // SAFETY: the lanes set are tokens r + 16v + l < rows of output j < nb, at
            // j * rows + r + 16v + l < nb * rows <= y.len(); masked-off lanes are not written.
            unsafe { _mm512_mask_storeu_ps(yp.wrapping_add(j * rows + r + 16 * v), masks[v], *a) };
        }
    }
}
