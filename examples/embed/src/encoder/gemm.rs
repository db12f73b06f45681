//! Matrix products of the host encoder: a bounds-checked, safe face over the `gemm` crate's
//! sgemm, a packing-free kernel for the linear layers of one to a couple of texts
//! ([`linear_rows`], up to [`DOT_KERNEL_MAX_ROWS`] rows), and the transpose that feeds it
//! ([`transpose`]). This module is the host encoder's `unsafe` leaf (the crate denies `unsafe`
//! elsewhere): the `gemm` crate's entry point takes raw pointers and strides, and the AVX2
//! kernel (`dot_avx2`) reads through raw pointers with intrinsics that need the CPU feature
//! checked at run time.
//!
//! `gemm` takes raw pointers and strides, which is what lets the encoder multiply by a
//! transposed weight without copying it: torch stores a linear layer's weight as `[out, in]`
//! row-major, and `x · Wᵀ` reads it with swapped strides. It picks AVX2/FMA (or AVX-512) kernels
//! at run time, and for the few-row products of short texts it avoids most of the packing a
//! classic sgemm does, which matters because there the weights' memory traffic is the cost.
//! [`Mat`] and [`MatMut`] check at construction that every element their shape and strides
//! reach lies inside their slice; [`matmul`] checks that the shapes agree. Past those checks
//! the call cannot read or write outside the slices.

/// A read-only matrix over a slice: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Index of the last element a `rows × cols` matrix with strides `rs`, `cs` reaches, if any.
fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return None;
    }
    (rows - 1)
        .checked_mul(rs)
        .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)))
}

impl<'a> Mat<'a> {
    /// A strided view. Panics when the view would reach past `data` (a bug in the caller).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if let Some(last) = last_index(rows, cols, rs, cs) {
            assert!(
                last < data.len(),
                "matrix {rows}x{cols} (strides {rs}, {cs}) overruns {} elements",
                data.len()
            );
        }
        assert!(
            rs <= isize::MAX as usize && cs <= isize::MAX as usize,
            "stride overflow"
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The first `rows × cols` elements of `data`, row-major.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The first `rows × cols` elements of `data`, column-major.
    pub fn col_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }

    /// The transpose (a view: nothing moves).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A writable matrix over a slice: element `(i, j)` is `data[i * rs + j * cs]`. One of the
/// strides is 1 and the other spans the whole line (`rs ≥ cols` or `cs ≥ rows`), so no two
/// elements alias.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatMut<'a> {
    /// A strided view. Panics when it would overrun `data` or alias itself (a bug in the caller).
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let distinct = rows <= 1 && cs >= 1
            || cols <= 1 && rs >= 1
            || cs == 1 && rs >= cols
            || rs == 1 && cs >= rows;
        assert!(
            distinct,
            "strides ({rs}, {cs}) of a {rows}x{cols} matrix would alias"
        );
        if let Some(last) = last_index(rows, cols, rs, cs) {
            assert!(
                last < data.len(),
                "matrix {rows}x{cols} (strides {rs}, {cs}) overruns {} elements",
                data.len()
            );
        }
        assert!(
            rs <= isize::MAX as usize && cs <= isize::MAX as usize,
            "stride overflow"
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The first `rows × cols` elements of `data`, row-major.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The first `rows × cols` elements of `data`, column-major.
    pub fn col_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }
}

/// `c = scale · a · b`, or `c += scale · a · b` when `accumulate`. Single-threaded.
/// Panics when the shapes disagree (a bug in the caller).
pub fn matmul(c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, scale: f32, accumulate: bool) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "shapes disagree: ({}x{}) · ({}x{}) -> ({}x{})",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..c.rows {
                for j in 0..c.cols {
                    c.data[i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: `Mat::new`/`MatMut::new` checked that every element reached through each view's
    // shape and strides lies inside its slice, and the assert above that the shapes agree, so
    // gemm reads `a` and `b` and writes `c` only within their slices; strides fit in isize
    // (checked at construction). `c` is borrowed mutably and its elements do not alias each
    // other (checked at construction); it cannot alias `a` or `b`, which are shared borrows.
    // `read_dst` is false when not accumulating, so gemm never reads `c`'s old values then.
    unsafe {
        gemm::gemm(
            c.rows,
            c.cols,
            a.cols,
            c.data.as_mut_ptr(),
            c.cs as isize,
            c.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Rows up to which [`linear_rows`] beats the `gemm` crate on this model's shapes. Measured
/// with `examples/linear_bench.rs` on an AVX2 core (Zen 3), weights from memory as in a forward
/// pass: at 17 rows (one text of the benchmark's mix) 61-74 GFLOP/s against 37-44 for the
/// crate, whose 16- and 8-row kernels compute 24 rows there; at 36 rows 70-82 against 56-63;
/// at 48 rows the crate wins on the 1536-wide input (84 against 71) and from 96 rows on all
/// three shapes, its packing and cache blocking paid back by the larger product.
pub const DOT_KERNEL_MAX_ROWS: usize = 40;

/// Whether [`linear_rows`] runs its AVX2/FMA kernel on this processor (checked once).
pub fn dot_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[o][r] = b[o] + Σₖ w[o][k] · xt[r][k]`: a linear layer over `rows` token-major rows
/// (`xt` is `[rows][in]`), with the torch-layout weight `w` (`[out][in]`, row-major, read in
/// place) and a feature-major result (`y` is `[out][rows]`, as the encoder keeps activations).
///
/// Both operands run contiguously along `k`, so each output is a dot product of two
/// contiguous lines and nothing is packed: the weights stream through once per call, which is
/// what few-row products are bound by, and no row is padded. On AVX2/FMA processors a
/// register tile of three weight rows by up to four token rows keeps twelve 8-lane sums (see
/// [`dot_kernel_available`]); elsewhere a plain loop computes the same. Panics when the slices
/// do not hold the shapes (a bug in the caller).
pub fn linear_rows(xt: &[f32], rows: usize, w: &[f32], b: &[f32], y: &mut [f32]) {
    let out = b.len();
    assert!(out > 0, "a linear layer has outputs");
    assert!(
        w.len().is_multiple_of(out),
        "weight of {} values for {out} outputs",
        w.len()
    );
    let inp = w.len() / out;
    assert!(
        xt.len() >= rows * inp && y.len() >= out * rows,
        "linear_rows: {rows} rows of {inp} in, {out} out: input {} values, output {}",
        xt.len(),
        y.len()
    );
    #[cfg(target_arch = "x86_64")]
    if dot_kernel_available() {
        // SAFETY: the processor has AVX2 and FMA (checked at run time just above), and the
        // asserts above establish the lengths `dot_avx2` relies on: `w` holds `out × inp`
        // values, `xt` at least `rows × inp`, `y` at least `out × rows`, `b` exactly `out`.
        unsafe { dot_avx2::linear(xt, rows, inp, w, b, y) };
        return;
    }
    for o in 0..out {
        let wrow = &w[o * inp..(o + 1) * inp];
        for r in 0..rows {
            let xrow = &xt[r * inp..(r + 1) * inp];
            y[o * rows + r] = b[o] + wrow.iter().zip(xrow).map(|(a, c)| a * c).sum::<f32>();
        }
    }
}

/// `dst[c][r] = src[r][c]`: the transpose of a `rows × cols` row-major matrix into a
/// `cols × rows` one. The encoder turns its feature-major activations token-major with it
/// before [`linear_rows`]; on AVX2 processors whole 8 × 8 blocks move through registers
/// (a plain loop of strided stores cost about 5% of a short text's forward pass). Panics when
/// the slices are too short (a bug in the caller).
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose: {rows}x{cols} from {} values into {}",
        src.len(),
        dst.len()
    );
    let (rb, cb) = (rows - rows % 8, cols - cols % 8);
    #[cfg(target_arch = "x86_64")]
    if dot_kernel_available() {
        for r in (0..rb).step_by(8) {
            for c in (0..cb).step_by(8) {
                // SAFETY: AVX2 is available (checked just above); r + 8 <= rows and
                // c + 8 <= cols, and both slices hold rows × cols values (asserted above), so
                // the block's rows and columns lie inside them.
                unsafe { dot_avx2::transpose8(src, cols, dst, rows, r, c) };
            }
        }
    } else {
        transpose_plain(src, rows, cols, dst, 0..rb, 0..cb);
    }
    #[cfg(not(target_arch = "x86_64"))]
    transpose_plain(src, rows, cols, dst, 0..rb, 0..cb);
    // The edges: the last columns of the blocked rows, then the last rows.
    transpose_plain(src, rows, cols, dst, 0..rb, cb..cols);
    transpose_plain(src, rows, cols, dst, rb..rows, 0..cols);
}

/// [`transpose`] of the rows `rs` and columns `cs`, one value at a time.
fn transpose_plain(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    rs: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
) {
    for r in rs {
        for c in cs.clone() {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod dot_avx2 {
    //! The AVX2/FMA kernel of [`super::linear_rows`]. Every function here reads through raw
    //! pointers; each one's contract says what the caller has checked.
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

    /// Token rows per tile.
    const MR: usize = 4;
    /// Weight rows per tile: 4 × 3 accumulators and 3 weight registers fill 15 of the sixteen
    /// vector registers.
    const NR: usize = 3;
    /// Weight triples between the one computed and the one prefetched (1: the next; two and
    /// three ahead measured slower).
    const PF_DIST: usize = 1;

    /// The operands of one linear layer: `rows` token rows of `xt` (`[rows][inp]`), the weight
    /// `w` (`[out][inp]`) and the bias `b` (`[out]`).
    #[derive(Clone, Copy)]
    struct Layer<'a> {
        xt: &'a [f32],
        rows: usize,
        inp: usize,
        w: &'a [f32],
        b: &'a [f32],
    }

    /// Groups of token rows planned on the stack: [`super::DOT_KERNEL_MAX_ROWS`] rows in
    /// groups of [`MR`].
    const MAX_GROUPS: usize = super::DOT_KERNEL_MAX_ROWS.div_ceil(MR);

    /// One group of token rows, and its share of the prefetches of the next weight triple.
    #[derive(Debug, Clone, Copy, Default)]
    struct Group {
        /// First token row.
        r: usize,
        /// Token rows (1 to [`MR`]).
        m: usize,
        /// First line, counted from the start of the prefetched rows, that this group asks for.
        pf_first: usize,
        /// Lines it asks for.
        pf_lines: usize,
        /// At most this many per step of `k`.
        pf_per_step: usize,
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
    /// AVX2 and FMA are available; `w.len() == b.len() * inp`, `xt.len() >= rows * inp`,
    /// `y.len() >= b.len() * rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn linear(xt: &[f32], rows: usize, inp: usize, w: &[f32], b: &[f32], y: &mut [f32]) {
        let out = b.len();
        // Token rows in groups of at most MR, as even as possible (a tile of 3 rows does more
        // work per load than one of 1), planned once for every weight triple.
        let n_groups = rows.div_ceil(MR);
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
        let full_lines = (NR * inp).div_ceil(16);
        share_prefetches(groups, full_lines, inp);
        let full = pick_triple(NR, inp);
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
            let lines = (pf_to - pf_from).div_ceil(16);
            if lines != full_lines {
                // The last triples: fewer (or no) rows left to prefetch.
                share_prefetches(groups, lines, inp);
            }
            let f = if n == NR { full } else { pick_triple(n, inp) };
            let pf = w.as_ptr().wrapping_add(pf_from);
            // SAFETY: o + n <= b.len() and every group's rows lie in 0..rows, so each tile's
            // weight rows, token rows and outputs lie inside the slices by this function's
            // contract; AVX2 and FMA are available (same contract). (`pf` is only prefetched.)
            unsafe { f(layer, y, o, groups, pf) };
            o += n;
        }
    }

    /// A [`triple`] for `n` weight rows and `inp` inputs: specialised for the input widths of
    /// BERT-base-like models (the row offsets become constants, which frees the registers that
    /// would hold seven row pointers), generic otherwise.
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

    /// A [`triple`] of some shape.
    type Triple = unsafe fn(Layer<'_>, &mut [f32], usize, &[Group], *const f32);

    /// Outputs `o..o+N` for every group of token rows, one [`tile`] per group (inlined: one
    /// call per weight triple, not one per tile). `pf` is where the next triple's rows start.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`, and for
    /// every group `(r + m) * inp <= xt.len()`, `(o + N - 1) * rows + r + m <= y.len()`,
    /// `1 <= m <= MR`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn triple<const N: usize, const INP: usize>(
        layer: Layer<'_>,
        y: &mut [f32],
        o: usize,
        groups: &[Group],
        pf: *const f32,
    ) {
        for g in groups {
            let pf = (pf.wrapping_add(g.pf_first * 16), g.pf_lines);
            // Each arm is a direct call (inlined), not one through a pointer picked by `m`.
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

    /// One tile: outputs `o..o+N` for token rows `r..r+M` (`M <= 4`); `INP` is 0 or `inp`. Along the way it asks for
    /// the `pf_lines` 64-byte lines from `pf` on, at most `pf_per_step` per step of `k` (a
    /// prefetch never faults, so `pf` needs no contract; the caller points it into `w`).
    ///
    /// # Safety
    /// AVX2 and FMA are available; `(o + N) * inp <= w.len()`, `o + N <= b.len()`,
    /// `(r + M) * inp <= xt.len()`, and `(o + N - 1) * rows + r + M <= y.len()`.
    #[target_feature(enable = "avx2,fma")]
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
                *v = unsafe { _mm256_loadu_ps(wp.wrapping_add(n * inp + k)) };
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
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(pf_done * 16).cast());
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
                    *out += wtail.iter().zip(xtail).map(|(p, q)| p * q).sum::<f32>();
                }
            }
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
    fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        // Per 128-bit half: [a b c d] partial sums of that half's lanes.
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_the_naive_product_with_transposed_views() {
        let (m, k, n) = (7, 19, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        // w is [n, k] (torch layout); the product needs wᵀ = [k, n].
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut wt = vec![0.0; k * n];
        for r in 0..n {
            for c in 0..k {
                wt[c * n + r] = w[r * k + c];
            }
        }
        let want = naive(&a, &wt, m, k, n);
        let mut c = vec![1.0; m * n];
        matmul(
            MatMut::row_major(&mut c, m, n),
            Mat::row_major(&a, m, k),
            Mat::row_major(&w, n, k).t(),
            1.0,
            false,
        );
        assert_eq!(c, want);
        // Accumulating with a scale.
        matmul(
            MatMut::row_major(&mut c, m, n),
            Mat::row_major(&a, m, k),
            Mat::row_major(&w, n, k).t(),
            2.0,
            true,
        );
        let want3: Vec<f32> = want.iter().map(|x| 3.0 * x).collect();
        assert_eq!(c, want3);
    }

    #[test]
    fn strided_output_leaves_other_columns_alone() {
        // Write a 2x2 product into columns 1..3 of a 2x4 buffer.
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.0, 0.0, 0.0, 1.0];
        let mut c = [9.0; 8];
        matmul(
            MatMut::new(&mut c[1..], 2, 2, 4, 1),
            Mat::row_major(&a, 2, 2),
            Mat::row_major(&b, 2, 2),
            1.0,
            false,
        );
        assert_eq!(c, [9.0, 1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0]);
    }

    #[test]
    fn column_major_operands() {
        // a = [[1, 2], [3, 4]] stored column-major; b = identity; c column-major.
        let a = [1.0, 3.0, 2.0, 4.0];
        let b = [1.0, 0.0, 0.0, 1.0];
        let mut c = [0.0; 4];
        matmul(
            MatMut::col_major(&mut c, 2, 2),
            Mat::col_major(&a, 2, 2),
            Mat::row_major(&b, 2, 2),
            1.0,
            false,
        );
        assert_eq!(c, a);
    }

    /// Runs [`linear_rows`] for `rows` token rows of `xt` against the `out` weight rows of `w`
    /// (biases `0.5 - o`) and compares every output with a plain sum, within `tol` relative.
    fn check_linear_rows(w: &[f32], xt: &[f32], out: usize, rows: usize, tol: f32) {
        let inp = w.len() / out;
        let b: Vec<f32> = (0..out).map(|i| 0.5 - i as f32).collect();
        let mut y = vec![f32::NAN; out * rows];
        linear_rows(xt, rows, w, &b, &mut y);
        for o in 0..out {
            for r in 0..rows {
                let want = b[o]
                    + (0..inp)
                        .map(|k| w[o * inp + k] as f64 * xt[r * inp + k] as f64)
                        .sum::<f64>() as f32;
                let got = y[o * rows + r];
                assert!(
                    (got - want).abs() <= tol * want.abs().max(1.0),
                    "in {inp} out {out} rows {rows}: y[{o}][{r}] = {got}, not {want}"
                );
            }
        }
    }

    #[test]
    fn linear_rows_matches_a_plain_sum_on_every_edge() {
        // Every tile shape and edge: outputs not a multiple of 3, rows not a multiple of 4, and
        // input widths with and without a tail past the last 8 lanes.
        for inp in [1, 7, 8, 9, 16, 33] {
            for out in 1..=7 {
                for rows in 1..=13 {
                    let w: Vec<f32> = (0..out * inp)
                        .map(|i| ((i * 13) % 29) as f32 * 0.125 - 1.5)
                        .collect();
                    let xt: Vec<f32> = (0..rows * inp)
                        .map(|i| ((i * 11) % 19) as f32 * 0.25 - 2.0)
                        .collect();
                    check_linear_rows(&w, &xt, out, rows, 1e-4);
                }
            }
        }
    }

    #[test]
    fn linear_rows_matches_a_plain_sum_at_the_specialised_widths() {
        // The tiles compiled for BERT's input widths, on every tile shape and edge.
        for inp in [384, 768, 1536, 3072] {
            for out in [1, 2, 3, 4, 7] {
                for rows in [1, 2, 3, 4, 5, 13] {
                    let w: Vec<f32> = (0..out * inp)
                        .map(|i| ((i * 13) % 29) as f32 * 0.0625 - 0.875)
                        .collect();
                    let xt: Vec<f32> = (0..rows * inp)
                        .map(|i| ((i * 11) % 19) as f32 * 0.125 - 1.0)
                        .collect();
                    check_linear_rows(&w, &xt, out, rows, 1e-3);
                }
            }
        }
    }

    #[test]
    fn transpose_moves_every_value() {
        // Block-aligned, ragged on either side, and smaller than a block.
        for (rows, cols) in [
            (8, 8),
            (16, 24),
            (17, 384),
            (3, 40),
            (9, 13),
            (1, 1),
            (5, 3),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "linear_rows")]
    fn linear_rows_refuses_short_inputs() {
        let mut y = [0.0; 4];
        linear_rows(&[0.0; 7], 2, &[0.0; 8], &[0.0; 2], &mut y);
    }

    #[test]
    #[should_panic(expected = "alias")]
    fn refuses_aliasing_outputs() {
        let mut data = [0.0; 10];
        let _ = MatMut::new(&mut data, 3, 3, 2, 1);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn refuses_views_past_the_slice() {
        let data = [0.0; 10];
        let _ = Mat::new(&data, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "shapes disagree")]
    fn refuses_mismatched_shapes() {
        let (a, b) = ([0.0; 6], [0.0; 6]);
        let mut c = [0.0; 4];
        matmul(
            MatMut::row_major(&mut c, 2, 2),
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&b, 2, 3),
            1.0,
            false,
        );
    }
}
