//! Matrix products of the host encoder: a bounds-checked, safe face over the `gemm` crate's
//! sgemm, a packing-free kernel for the linear layers of one to a couple of texts
//! ([`linear_rows`], up to [`DOT_KERNEL_MAX_ROWS`] rows), and the transpose that feeds it
//! ([`transpose`]). This module is the host encoder's `unsafe` leaf (the crate denies `unsafe`
//! elsewhere): the `gemm` crate's entry point takes raw pointers and strides, and the SIMD
//! kernels (`dot_avx2`, and `dot_avx512` where the processor has it) read through raw pointers with
//! intrinsics that need the CPU feature checked at run time.
//!
//! `gemm` takes raw pointers and strides, which is what lets the encoder multiply by a
//! transposed weight without copying it: torch stores a linear layer's weight as `[out, in]`
//! row-major, and `x · Wᵀ` reads it with swapped strides. It picks AVX2/FMA (or AVX-512) kernels
//! at run time, and for the few-row products of short texts it avoids most of the packing a
//! classic sgemm does, which matters because there the weights' memory traffic is the cost.
//! [`Mat`] and [`MatMut`] check at construction that every element their shape and strides
//! reach lies inside their slice; [`matmul`] checks that the shapes agree. Past those checks
//! the call cannot read or write outside the slices.

pub use weight::{bf16, f16, Weight};

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

/// Panics when a `rows × cols` view with strides `rs`, `cs` would reach past `len` elements
/// or its strides would not fit in an `isize` (a bug in the caller): what both views check.
fn check_reach(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if let Some(last) = last_index(rows, cols, rs, cs) {
        assert!(
            last < len,
            "matrix {rows}x{cols} (strides {rs}, {cs}) overruns {len} elements"
        );
    }
    assert!(
        rs <= isize::MAX as usize && cs <= isize::MAX as usize,
        "stride overflow"
    );
}

impl<'a> Mat<'a> {
    /// A strided view. Panics when the view would reach past `data` (a bug in the caller).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_reach(data.len(), rows, cols, rs, cs);
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
        check_reach(data.len(), rows, cols, rs, cs);
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

/// Which kernel [`linear_rows`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotKernel {
    /// 16-lane tiles (AVX-512F, with AVX2, FMA and F16C).
    Avx512,
    /// 8-lane tiles (AVX2, FMA and F16C, which widens f16 weights).
    Avx2,
    /// A plain loop (other processors).
    Plain,
}

/// Environment variable that picks the kernel: `avx2` or `plain` (where the processor has
/// AVX-512 or AVX2, to measure one against the other); anything else is ignored.
pub const DOT_KERNEL_ENV: &str = "ZYGOTE_EMBED_DOT_KERNEL";

/// The kernel [`linear_rows`] runs (chosen once, at run time): the widest the processor has,
/// AVX-512 where it has AVX-512F (with AVX2, FMA and F16C), AVX2 where it has AVX2, FMA and F16C
/// (every AVX2 processor has F16C, which came a generation earlier), the plain loop elsewhere, unless [`DOT_KERNEL_ENV`] asks for a narrower one.
pub fn dot_kernel() -> DotKernel {
    static KERNEL: std::sync::OnceLock<DotKernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| choose_kernel(widest_kernel(), std::env::var(DOT_KERNEL_ENV).ok()))
}

/// The decision of [`dot_kernel`]: the `widest` kernel the processor runs, narrowed by the
/// environment's `asked`.
fn choose_kernel(widest: DotKernel, asked: Option<String>) -> DotKernel {
    match (asked.as_deref(), widest) {
        (Some("plain"), _) => DotKernel::Plain,
        (Some("avx2"), DotKernel::Avx512) => DotKernel::Avx2,
        _ => widest,
    }
}

fn widest_kernel() -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return DotKernel::Avx512;
        }
        if avx2 {
            return DotKernel::Avx2;
        }
    }
    DotKernel::Plain
}

/// Whether [`linear_rows`] runs a SIMD kernel on this processor, and [`transpose`] its AVX2
/// blocks (both need AVX2 and FMA, which every AVX-512 processor also has; the kernels F16C too).
pub fn dot_kernel_available() -> bool {
    dot_kernel() != DotKernel::Plain
}

/// `y[o][r] = b[o] + Σₖ w[o][k] · xt[r][k]`: a linear layer over `rows` token-major rows
/// (`xt` is `[rows][in]`), with the torch-layout weight `w` (`[out][in]`, row-major, read in
/// place) and a feature-major result (`y` is `[out][rows]`, as the encoder keeps activations).
///
/// Both operands run contiguously along `k`, so each output is a dot product of two
/// contiguous lines and nothing is packed: the weights stream through once per call, which is
/// what few-row products are bound by, and no row is padded. A register tile of three weight
/// rows by up to four token rows keeps twelve sums, 8-lane on AVX2/FMA processors (by up to
/// six token rows, 16-lane, on AVX-512 ones, see [`dot_kernel`]); elsewhere a plain loop
/// computes the same. The weight is f32 or [`f16`] (widened to f32 as each vector of it is
/// loaded; the sums are f32 either way). Panics when the slices do not hold the shapes (a bug
/// in the caller).
pub fn linear_rows<W: Weight>(xt: &[f32], rows: usize, w: &[W], b: &[f32], y: &mut [f32]) {
    linear_rows_with(dot_kernel(), xt, rows, w, b, y);
}

/// The inputs of a linear layer of `out` outputs whose weight holds `w` values, after checking
/// that its input (`x` values, `rows` rows) and output (`y` values) hold the shapes; `kernel`
/// names the caller in the panic (a bug in the caller).
fn layer_inputs(kernel: &str, x: usize, rows: usize, w: usize, out: usize, y: usize) -> usize {
    assert!(out > 0, "a linear layer has outputs");
    assert!(
        w.is_multiple_of(out),
        "weight of {w} values for {out} outputs"
    );
    let inp = w / out;
    assert!(
        x >= rows * inp && y >= out * rows,
        "{kernel}: {rows} rows of {inp} in, {out} out: input {x} values, output {y}"
    );
    inp
}

/// [`linear_rows`] with the kernel `kernel`; one the processor lacks computes with the plain
/// loop instead.
pub fn linear_rows_with<W: Weight>(
    kernel: DotKernel,
    xt: &[f32],
    rows: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
) {
    let out = b.len();
    let inp = layer_inputs("linear_rows", xt.len(), rows, w.len(), out, y.len());
    #[cfg(target_arch = "x86_64")]
    {
        let widest = widest_kernel();
        if kernel == DotKernel::Avx512 && widest == DotKernel::Avx512 {
            // SAFETY: the processor has AVX-512F (checked at run time just above), and the
            // asserts above establish the lengths `dot_avx512` relies on: `w` holds
            // `out × inp` values, `xt` at least `rows × inp`, `y` at least `out × rows`, `b`
            // exactly `out`.
            unsafe { dot_avx512::linear(xt, rows, inp, w, b, y) };
            return;
        }
        if kernel != DotKernel::Plain && widest != DotKernel::Plain {
            // SAFETY: the processor has AVX2, FMA and F16C (checked at run time just above), and
            // the asserts above establish the lengths `dot_avx2` relies on (as above).
            unsafe { dot_avx2::linear(xt, rows, inp, w, b, y) };
            return;
        }
    }
    for o in 0..out {
        let wrow = &w[o * inp..(o + 1) * inp];
        for r in 0..rows {
            let xrow = &xt[r * inp..(r + 1) * inp];
            y[o * rows + r] = b[o]
                + wrow
                    .iter()
                    .zip(xrow)
                    .map(|(a, c)| a.widen() * c)
                    .sum::<f32>();
        }
    }
}

/// Rows from which [`linear_cols`] beats [`linear_rows`] on AVX-512 processors, measured with
/// `examples/linear_bench.rs` on this model's shapes (Xeon with AVX-512, weights from memory):
/// at 24 rows 55-87 GFLOP/s against 37-74 for the dot kernel, at 96 rows 74-122 against 40-60
/// (and 40-67 for the `gemm` crate); at 12-17 rows they are even (the token-vector kernel
/// ahead on the 1536-input layer, behind on the others: in the one-text forward pass the two
/// came out even), and below the dot kernel wins (a token vector there is mostly empty lanes).
pub const COLS_KERNEL_MIN_ROWS: usize = 20;

/// The most values [`linear_cols`] grows its scratch `wide` to for a layer of `inp` inputs:
/// one block of weight rows widened from f16 (8 rows of `inp`, 48 KiB at 1536 inputs).
pub fn linear_cols_scratch(inp: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return cols_avx512::scratch(inp);
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// Whether [`linear_cols`] runs its AVX-512 kernel: where the processor has AVX-512F and
/// [`DOT_KERNEL_ENV`] asks for no narrower kernel.
pub fn cols_kernel_available() -> bool {
    dot_kernel() == DotKernel::Avx512
}

/// `y[o][r] = b[o] + Σₖ w[o][k] · x[k][r]`: a linear layer over `rows` feature-major rows (`x`
/// is `[in][rows]`, as the encoder keeps activations), with the torch-layout weight `w`
/// (`[out][in]`, f32 read in place or [`f16`] widened a few rows at a time into `wide`) and a
/// feature-major result (`y` is `[out][rows]`). For batches: on AVX-512 processors (see
/// [`cols_kernel_available`]) the vectors run along the tokens, eight outputs by 48 tokens at
/// a time (`cols_avx512`); elsewhere a plain loop computes the same. Panics when the slices do
/// not hold the shapes (a bug in the caller).
pub fn linear_cols<W: Weight>(
    x: &[f32],
    rows: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
    wide: &mut Vec<f32>,
) {
    linear_cols_with(dot_kernel(), x, rows, w, b, y, wide);
}

/// [`linear_cols`] with the AVX-512 kernel when `kernel` is [`DotKernel::Avx512`] and the
/// processor has it, the plain loop otherwise.
pub fn linear_cols_with<W: Weight>(
    kernel: DotKernel,
    x: &[f32],
    rows: usize,
    w: &[W],
    b: &[f32],
    y: &mut [f32],
    wide: &mut Vec<f32>,
) {
    let out = b.len();
    let inp = layer_inputs("linear_cols", x.len(), rows, w.len(), out, y.len());
    if rows == 0 {
        return;
    }
    if inp == 0 {
        for (line, &bias) in y.chunks_exact_mut(rows).zip(b) {
            line.fill(bias);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == DotKernel::Avx512 && widest_kernel() == DotKernel::Avx512 {
        // SAFETY: the processor has AVX-512F with AVX2, FMA and F16C (`widest_kernel`, checked
        // at run time just above), and `layer_inputs` checked the lengths `cols_avx512` relies
        // on: `w` holds `out × inp` values, `x` at least `inp × rows`, `y` at least
        // `out × rows`; rows and inp are not 0 (returned above otherwise).
        unsafe { cols_avx512::linear(x, rows, inp, w, b, y, wide) };
        return;
    }
    for o in 0..out {
        let wrow = &w[o * inp..(o + 1) * inp];
        let line = &mut y[o * rows..(o + 1) * rows];
        line.fill(b[o]);
        for (k, wv) in wrow.iter().enumerate() {
            let wv = wv.widen();
            for (yv, xv) in line.iter_mut().zip(&x[k * rows..(k + 1) * rows]) {
                *yv += wv * xv;
            }
        }
    }
}

/// Environment variable that turns the AMX kernel off (`ZYGOTE_EMBED_AMX=0`), to measure a
/// bf16 weight on the AVX-512 kernels against it; anything else is ignored. A narrower
/// [`DOT_KERNEL_ENV`] turns it off too (AMX comes only with AVX-512).
pub const AMX_ENV: &str = "ZYGOTE_EMBED_AMX";

/// Whether [`linear_amx`] runs on the tile unit: the processor has AMX-BF16 (with AVX-512F),
/// the kernel grants its tile state, and neither [`AMX_ENV`] nor [`DOT_KERNEL_ENV`] turns it
/// off. Decided once.
pub fn amx_available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        let asked = std::env::var(AMX_ENV).map_or(true, |v| v != "0");
        #[cfg(target_arch = "x86_64")]
        return asked && dot_kernel() == DotKernel::Avx512 && amx_bf16::available();
        #[cfg(not(target_arch = "x86_64"))]
        return {
            let _ = asked;
            false
        };
    })
}

/// Whether [`linear_amx`] takes a layer of `inp` inputs and `out` outputs: the tile unit is
/// available and both are multiples of 32 (every BERT width is).
pub fn amx_fits(inp: usize, out: usize) -> bool {
    amx_available() && inp > 0 && out > 0 && inp.is_multiple_of(32) && out.is_multiple_of(32)
}

/// `y[o][r] = b[o] + Σₖ w[o][k] · x[k][r]` on the AMX tile unit: `x` is `[in][rows]`
/// (feature-major, as the encoder keeps activations), rounded to bf16 as it is packed into
/// `pairs` (a private scratch of `in / 2` × `rows` rounded up to 32 words); the bf16 weight `w`
/// (`[out][in]`) is read in place; the sums are f32, and `y` is `[out][rows]`. Every row count
/// runs here (one text or a batch). Panics when the slices do not hold the shapes or
/// [`amx_fits`] is false for them (a bug in the caller).
pub fn linear_amx(
    x: &[f32],
    rows: usize,
    w: &[bf16],
    b: &[f32],
    y: &mut [f32],
    pairs: &mut Vec<u32>,
) {
    let out = b.len();
    let inp = layer_inputs("linear_amx", x.len(), rows, w.len(), out, y.len());
    assert!(
        amx_fits(inp, out),
        "linear_amx: no tile unit, or {inp} x {out} is no multiple of 32"
    );
    if rows == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `amx_fits` (asserted above) checked that the tile unit is available
    // (`amx_bf16::available`, with AVX-512F) and that inp and out are non-zero multiples of 32;
    // `layer_inputs` checked `w.len() == out × inp`, `x.len() >= inp × rows` and
    // `y.len() >= out × rows`; rows is not 0 (returned above otherwise).
    unsafe {
        amx_bf16::linear(x, rows, inp, w, b, y, pairs)
    };
}

/// `dst[i] = src[i]` as f32: an f16 weight's rows widened for the `gemm` crate (8 values per
/// F16C instruction where the processor has the SIMD kernels; the `half` crate's conversion,
/// one value at a time and many times slower, elsewhere). Panics when the lengths differ.
pub fn widen(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if dot_kernel_available() {
        // SAFETY: AVX2, FMA and F16C are available (checked at run time by
        // `dot_kernel_available`), and the lengths agree (asserted above).
        unsafe { dot_avx2::widen(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
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
mod amx_bf16;
#[cfg(target_arch = "x86_64")]
mod cols_avx512;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
#[cfg(target_arch = "x86_64")]
mod dot_avx512;
mod weight;

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
    /// (biases `0.5 - o`) and compares every output with a plain sum, within `tol` relative:
    /// with every kernel, and with the weight as f32 and as f16.
    fn check_linear_rows(w: &[f32], xt: &[f32], out: usize, rows: usize, tol: f32) {
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for kernel in [DotKernel::Avx512, DotKernel::Avx2, DotKernel::Plain] {
            check_kernel(kernel, w, xt, out, rows, tol);
            check_kernel(kernel, &w16, xt, out, rows, tol);
        }
    }

    fn check_kernel<W: Weight>(
        kernel: DotKernel,
        w: &[W],
        xt: &[f32],
        out: usize,
        rows: usize,
        tol: f32,
    ) {
        let inp = w.len() / out;
        let b: Vec<f32> = (0..out).map(|i| 0.5 - i as f32).collect();
        let mut y = vec![f32::NAN; out * rows];
        linear_rows_with(kernel, xt, rows, w, &b, &mut y);
        for o in 0..out {
            for r in 0..rows {
                let want = b[o]
                    + (0..inp)
                        .map(|k| w[o * inp + k].widen() as f64 * xt[r * inp + k] as f64)
                        .sum::<f64>() as f32;
                let got = y[o * rows + r];
                assert!(
                    (got - want).abs() <= tol * want.abs().max(1.0),
                    "{kernel:?} {}: in {inp} out {out} rows {rows}: y[{o}][{r}] = {got}, not {want}",
                    std::any::type_name::<W>()
                );
            }
        }
    }

    /// [`check_linear_rows`] on `out × inp` weights and `rows × inp` inputs filled with
    /// repeating patterns, each value `pattern index · step - offset` for `(step, offset)` of
    /// `w` and `x`.
    fn check_patterns(inp: usize, out: usize, rows: usize, w: (f32, f32), x: (f32, f32), tol: f32) {
        let wv: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 13) % 29) as f32 * w.0 - w.1)
            .collect();
        let xt: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 11) % 19) as f32 * x.0 - x.1)
            .collect();
        check_linear_rows(&wv, &xt, out, rows, tol);
    }

    #[test]
    fn linear_rows_matches_a_plain_sum_on_every_edge() {
        // Every tile shape and edge: outputs not a multiple of 3, rows not a multiple of 4, and
        // input widths with and without a tail past the last 8 lanes.
        for inp in [1, 7, 8, 9, 16, 33] {
            for out in 1..=7 {
                for rows in 1..=13 {
                    check_patterns(inp, out, rows, (0.125, 1.5), (0.25, 2.0), 1e-4);
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
                    check_patterns(inp, out, rows, (0.0625, 0.875), (0.125, 1.0), 1e-3);
                }
            }
        }
    }

    #[test]
    fn f16_weights_are_read_as_halves() {
        // 1 + 2^-11 is not an f16: rounded to 1, so the f16 product differs from the f32 one by
        // exactly 2^-11 per input, on every kernel, for one group of token rows and several.
        let inp = 48;
        let w = vec![1.0 + 2f32.powi(-11); inp];
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for rows in [1, 13] {
            let x = vec![1.0f32; inp * rows];
            for kernel in [DotKernel::Avx512, DotKernel::Avx2, DotKernel::Plain] {
                let (mut y32, mut y16) = (vec![0.0f32; rows], vec![0.0f32; rows]);
                linear_rows_with(kernel, &x, rows, &w, &[0.0], &mut y32);
                linear_rows_with(kernel, &x, rows, &w16, &[0.0], &mut y16);
                assert!(y16.iter().all(|&v| v == inp as f32), "{kernel:?} {y16:?}");
                let want = inp as f32 * (1.0 + 2f32.powi(-11));
                assert!(y32.iter().all(|&v| v == want), "{kernel:?} {y32:?}");
            }
        }
    }

    /// [`linear_cols_with`] against a sum in f64 for every kernel and both weight types:
    /// `x` is `[inp][rows]`, the weight `out × inp`, biases `0.5 - o`.
    fn check_cols(inp: usize, out: usize, rows: usize) {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 13) % 29) as f32 * 0.0625 - 0.875)
            .collect();
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let x: Vec<f32> = (0..inp * rows)
            .map(|i| ((i * 11) % 19) as f32 * 0.125 - 1.0)
            .collect();
        let b: Vec<f32> = (0..out).map(|i| 0.5 - i as f32).collect();
        for kernel in [DotKernel::Avx512, DotKernel::Plain] {
            let mut wide = Vec::new();
            let mut y = vec![f32::NAN; out * rows + 3];
            linear_cols_with(kernel, &x, rows, &w, &b, &mut y, &mut wide);
            check_cols_sums(kernel, &x, rows, &w, &b, &y);
            linear_cols_with(kernel, &x, rows, &w16, &b, &mut y, &mut wide);
            check_cols_sums(kernel, &x, rows, &w16, &b, &y);
            assert!(wide.len() <= linear_cols_scratch(inp).max(1));
            // Past the outputs nothing is written.
            assert!(y[out * rows..].iter().all(|v| v.is_nan()));
        }
    }

    fn check_cols_sums<W: Weight>(
        kernel: DotKernel,
        x: &[f32],
        rows: usize,
        w: &[W],
        b: &[f32],
        y: &[f32],
    ) {
        let out = b.len();
        let inp = w.len() / out;
        for o in 0..out {
            for r in 0..rows {
                let want = b[o] as f64
                    + (0..inp)
                        .map(|k| w[o * inp + k].widen() as f64 * x[k * rows + r] as f64)
                        .sum::<f64>();
                let got = y[o * rows + r];
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{kernel:?} {}: in {inp} out {out} rows {rows}: y[{o}][{r}] = {got}, not {want}",
                    std::any::type_name::<W>()
                );
            }
        }
    }

    #[test]
    fn linear_cols_matches_a_plain_sum_on_every_edge() {
        // Token vectors full and partial, blocks of one to three of them; outputs filling
        // blocks of eight or not; inputs within one chunk of k, at its edge and over it.
        for inp in [1, 7, 16, 127, 128, 129, 300] {
            for out in [1, 7, 8, 9, 17] {
                for rows in [1, 15, 16, 17, 33, 48, 49, 64, 65, 97, 150] {
                    check_cols(inp, out, rows);
                }
            }
        }
    }

    #[test]
    fn linear_cols_matches_a_plain_sum_at_the_specialised_widths() {
        for inp in [384, 768, 1536, 3072] {
            for (out, rows) in [(8, 20), (16, 49), (24, 100), (13, 33)] {
                check_cols(inp, out, rows);
            }
        }
    }

    /// `linear_amx` against a sum in f64 of the same bf16 weight times the activations rounded
    /// to bf16 (what the tile unit multiplies): only the f32 summation order differs.
    fn check_amx(inp: usize, out: usize, rows: usize) {
        let w: Vec<bf16> = (0..out * inp)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 * 1e-3 - 0.5))
            .collect();
        let x: Vec<f32> = (0..inp * rows)
            .map(|i| ((i * 31) % 97) as f32 * 1e-2 - 0.4)
            .collect();
        let b: Vec<f32> = (0..out).map(|o| o as f32 * 0.01).collect();
        let mut y = vec![f32::NAN; out * rows + 3];
        let mut pairs = Vec::new();
        linear_amx(&x, rows, &w, &b, &mut y[..out * rows], &mut pairs);
        let round = |v: f32| bf16::from_f32(v).to_f32() as f64;
        for o in 0..out {
            for r in 0..rows {
                let want = b[o] as f64
                    + (0..inp)
                        .map(|k| w[o * inp + k].to_f32() as f64 * round(x[k * rows + r]))
                        .sum::<f64>();
                let got = y[o * rows + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{inp}x{out}, {rows} rows, at ({o}, {r}): {got} against {want}"
                );
            }
        }
        assert!(y[out * rows..].iter().all(|v| v.is_nan()), "wrote past y");
    }

    #[test]
    fn linear_amx_matches_a_plain_sum_of_the_rounded_values() {
        if !amx_available() {
            // The kernel cannot run here; what a bf16 weight computes on the vector kernels
            // is checked by `bf16_weights_are_read_as_high_halves`.
            eprintln!("no AMX tile unit on this machine: linear_amx not run");
            return;
        }
        // Tokens: one, within a tile, a tile, over it, a block, blocks and a ragged batch;
        // widths of one and several blocks of 32.
        for (inp, out) in [(32, 32), (64, 96), (384, 384), (1536, 384), (384, 1536)] {
            for rows in [1, 5, 16, 17, 31, 32, 33, 64, 100] {
                check_amx(inp, out, rows);
            }
        }
    }

    #[test]
    fn amx_takes_only_multiples_of_32() {
        for (inp, out) in [(31, 32), (32, 48), (0, 32), (384, 0)] {
            assert!(!amx_fits(inp, out), "{inp} x {out}");
        }
        assert_eq!(amx_fits(384, 1536), amx_available());
    }

    #[test]
    fn bf16_weights_are_read_as_high_halves() {
        // Every kernel that a bf16 weight reaches off the tile unit, against its f32 widening.
        let (inp, out) = (40, 9);
        let w: Vec<bf16> = (0..out * inp)
            .map(|i| bf16::from_bits((i as u16).wrapping_mul(2654) & 0x3fff ^ 0x3c00))
            .collect();
        let wide: Vec<f32> = w.iter().map(|h| h.to_f32()).collect();
        let mut widened = vec![f32::NAN; w.len()];
        bf16::widen_slice(&w, &mut widened);
        assert_eq!(widened, wide);
        let b = vec![0.5f32; out];
        for rows in [1, 6, 17, 33] {
            let x: Vec<f32> = (0..rows * inp).map(|i| (i % 11) as f32 * 0.1).collect();
            for kernel in [DotKernel::Avx512, DotKernel::Avx2, DotKernel::Plain] {
                let (mut got, mut want) = (vec![0.0; out * rows], vec![0.0; out * rows]);
                linear_rows_with(kernel, &x, rows, &w, &b, &mut got);
                linear_rows_with(DotKernel::Plain, &x, rows, &wide, &b, &mut want);
                close(&got, &want, 1e-4);
                let mut scratch = Vec::new();
                linear_cols_with(kernel, &x, rows, &w, &b, &mut got, &mut scratch);
                linear_cols_with(
                    DotKernel::Plain,
                    &x,
                    rows,
                    &wide,
                    &b,
                    &mut want,
                    &mut scratch,
                );
                close(&got, &want, 1e-4);
            }
        }
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "at {i}: {g} against {w}"
            );
        }
    }

    #[test]
    fn widen_is_exact_on_every_length() {
        for n in [0, 1, 7, 8, 9, 33] {
            let src: Vec<f16> = (0..n)
                .map(|i| f16::from_bits((i as u16).wrapping_mul(2654) ^ 0x3c00))
                .collect();
            let mut dst = vec![f32::NAN; n];
            widen(&src, &mut dst);
            for (s, d) in src.iter().zip(&dst) {
                assert!(s.to_f32() == *d || s.is_nan() && d.is_nan(), "{s:?} -> {d}");
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
    fn the_widest_kernel_is_chosen_unless_a_narrower_one_is_asked_for() {
        use DotKernel::*;
        let ask = |s: &str| Some(s.to_string());
        assert_eq!(choose_kernel(Avx512, None), Avx512);
        assert_eq!(choose_kernel(Avx512, ask("avx2")), Avx2);
        assert_eq!(choose_kernel(Avx512, ask("plain")), Plain);
        assert_eq!(choose_kernel(Avx512, ask("avx512")), Avx512);
        assert_eq!(choose_kernel(Avx512, ask("bogus")), Avx512);
        assert_eq!(choose_kernel(Avx2, None), Avx2);
        // Never one the processor lacks.
        assert_eq!(choose_kernel(Avx2, ask("avx512")), Avx2);
        assert_eq!(choose_kernel(Plain, ask("avx2")), Plain);
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
