//! The BERT forward pass on the CPU, over the owner's shared weights.
//!
//! Every weight is a slice borrowed from the read-only mapping the worker imported; nothing
//! of it is copied. The compute copy is f32, or, in the owner's `--host-weights f16` form, has
//! its matrices (linear weights, embedding tables) in f16 and its vectors (biases, LayerNorm)
//! in f32: the kernels widen an f16 matrix as they load it and sum in f32, so that form streams
//! half the bytes per text ([`Tensor`]). Linear layers compute `x · Wᵀ + b` over the weight as
//! torch stores it ([`super::gemm`]): on AVX-512 processors a batch (from
//! [`super::gemm::COLS_KERNEL_MIN_ROWS`] word pieces) with vectors along the tokens, reading the
//! weight in place; up to [`super::gemm::DOT_KERNEL_MAX_ROWS`] word pieces with a packing-free
//! register tile; more with the `gemm` crate over strided views, so the transposed weight is a
//! view, not a copy. Per-request activations live in one scratch space per encoder, allocated
//! once and grown to the largest chunk seen, so a steady stream of requests allocates nothing
//! in the forward pass.
//!
//! Activations are stored feature-major: a chunk of `R` word pieces is `[features][R]`
//! (element `(t, f)` at `f * R + t`), the column-major form of the usual `[R, features]`. With
//! that layout the weight is the product's right-hand side, read in place along its rows, and
//! the activations are the small left-hand side that the kernel wants column-major: for the
//! few word pieces of a short text this is about twice as fast as the row-major layout, which
//! makes the kernel repack every weight on every call.
//!
//! The arithmetic follows Hugging Face's `BertModel` in eval mode, then sentence-transformers'
//! pooling and normalisation: embeddings (word + position + token type), LayerNorm, N × (self
//! attention, add & LayerNorm, GELU feed-forward, add & LayerNorm), pooling over each text's
//! tokens, L2 normalisation. One worker is one thread; parallelism comes from running one
//! worker per core.

use zygote_runtime::backend::host::HostWeights;

use super::gemm::{self, bf16, f16, matmul, Mat, MatMut};
use super::SentenceEncoder;
use crate::error::EmbedError;
use crate::spec::{BertTensors, LayerTensors, ModelSpec, Pooling};
use crate::tokenize::TokenBatch;

/// Rows (word pieces of all texts) computed together, by default. Larger chunks gain little
/// once a matrix product has a few hundred rows, and the activations of a chunk are this
/// worker's private memory: 512 rows of MiniLM are about 8 MiB.
pub const DEFAULT_MAX_ROWS: usize = 512;

/// Dimensions of the model, copied out of the config once.
#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    heads: usize,
    head_dim: usize,
    inter: usize,
    max_positions: usize,
    eps: f32,
}

/// Activations of one chunk of `R` rows, feature-major, reused from request to request.
#[derive(Debug, Default)]
struct Scratch {
    /// Hidden states, `[hidden][R]`.
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output before its projection, `[hidden][R]`.
    ctx: Vec<f32>,
    /// A sublayer's output before add & norm, `[hidden][R]`.
    tmp: Vec<f32>,
    /// The feed-forward's inner activations, `[intermediate][R]`.
    inter: Vec<f32>,
    /// Attention scores of one head of one text, `[len][len]` (query-major).
    scores: Vec<f32>,
    /// The linear layers' own scratch.
    lin: LinearScratch,
    /// One token's embedding, summed from the three tables.
    emb: Vec<f32>,
    /// Per-row statistics of LayerNorm, `[R]`.
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// What [`linear`] copies its operands into, by kernel; each grows to the largest layer seen.
#[derive(Debug, Default)]
struct LinearScratch {
    /// A linear layer's input turned token-major, `[R][in]`, for the few-row kernel.
    xt: Vec<f32>,
    /// A block of a half weight's rows widened to f32, for the `gemm` crate (many rows) and
    /// the token-vector kernel.
    wide: Vec<f32>,
    /// A linear layer's input rounded to bf16 and paired for the AMX kernel.
    pairs: Vec<u32>,
}

/// A tensor as the encoder binds it: a vector (1-D: biases, LayerNorm) is always f32; a matrix
/// (2-D: linear weights, embedding tables) is f32 or, in the f16 or bf16 form of the compute
/// copy, f16 or bf16.
#[derive(Debug, Clone, Copy)]
enum Tensor<'w> {
    F32(&'w [f32]),
    F16(&'w [f16]),
    Bf16(&'w [bf16]),
}

impl<'w> Tensor<'w> {
    fn len(self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }

    /// The f32 values of a vector ([`HostEncoder::new`] binds every 1-D tensor as f32).
    fn vector(self) -> &'w [f32] {
        match self {
            Self::F32(v) => v,
            Self::F16(_) | Self::Bf16(_) => unreachable!("1-D tensors are bound as f32"),
        }
    }

    /// Row `i` of a `[_, width]` matrix, added to `out` (`width` values).
    fn add_row(self, i: usize, out: &mut [f32]) {
        let w = out.len();
        match self {
            Self::F32(v) => add(out, &v[i * w..(i + 1) * w]),
            Self::F16(v) => add_widened(out, &v[i * w..(i + 1) * w]),
            Self::Bf16(v) => add_widened(out, &v[i * w..(i + 1) * w]),
        }
    }
}

/// `out[i] += row[i]` widened to f32 (a half matrix's row: an embedding of one token).
fn add_widened<W: gemm::Weight>(out: &mut [f32], row: &[W]) {
    for (o, h) in out.iter_mut().zip(row) {
        *o += h.widen();
    }
}

fn ensure(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// The CPU encoder, borrowing the weights for its whole life.
#[derive(Debug)]
pub struct HostEncoder<'w> {
    t: BertTensors<Tensor<'w>>,
    dims: Dims,
    pooling: Pooling,
    normalize: bool,
    max_rows: usize,
    scratch: Scratch,
}

impl<'w> HostEncoder<'w> {
    /// Binds every tensor of `spec`'s encoder in `weights` (checking names and shapes): a
    /// vector must be f32 in the compute copy, a matrix f32, f16 or bf16.
    pub fn new(spec: &ModelSpec, weights: &'w HostWeights) -> Result<Self, EmbedError> {
        let t = BertTensors::bind(
            &spec.config,
            |name| weights.tensor(name).is_some(),
            |name, shape| {
                let Some(tensor) = weights.tensor(name) else {
                    return Ok(None);
                };
                if tensor.shape != shape {
                    return Err(EmbedError::TensorShape {
                        name: name.into(),
                        expected: shape.to_vec(),
                        actual: tensor.shape.to_vec(),
                    });
                }
                let matrix = shape.len() == 2;
                let bound = if let Some(v) = tensor.as_f32() {
                    Tensor::F32(v)
                } else if let Some(m) = tensor.as_f16().filter(|_| matrix) {
                    Tensor::F16(m)
                } else if let Some(m) = tensor.as_bf16().filter(|_| matrix) {
                    Tensor::Bf16(m)
                } else {
                    return Err(EmbedError::NotF32 { name: name.into() });
                };
                Ok(Some(bound))
            },
        )?;
        let c = &spec.config;
        Ok(Self {
            t,
            dims: Dims {
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                head_dim: c.head_dim(),
                inter: c.intermediate_size,
                max_positions: c.max_position_embeddings,
                eps: c.layer_norm_eps as f32,
            },
            pooling: spec.pooling,
            normalize: spec.normalize,
            max_rows: DEFAULT_MAX_ROWS.max(spec.max_seq_length),
            scratch: Scratch::default(),
        })
    }

    /// Sets the rows computed together. A text longer than this is still computed whole, alone.
    pub fn with_max_rows(mut self, rows: usize) -> Self {
        self.max_rows = rows.max(1);
        self
    }

    /// Runs texts `first..last` of `batch` and appends their vectors to `out`.
    fn run_chunk(&mut self, batch: &TokenBatch, first: usize, last: usize, out: &mut Vec<f32>) {
        let d = self.dims;
        let h = d.hidden;
        let r0 = batch.span(first).start;
        let rows = batch.span(last - 1).end - r0;
        let s = &mut self.scratch;
        for buf in [
            &mut s.x, &mut s.q, &mut s.k, &mut s.v, &mut s.ctx, &mut s.tmp,
        ] {
            ensure(buf, rows * h);
        }
        ensure(&mut s.inter, rows * d.inter);
        ensure(&mut s.mean, rows);
        ensure(&mut s.inv_std, rows);
        ensure(&mut s.emb, h);

        // Embeddings: word + position + token type.
        for i in first..last {
            let span = batch.span(i);
            for (pos, r) in span.clone().enumerate() {
                let (id, ty) = (batch.ids[r] as usize, batch.type_ids[r] as usize);
                let emb = &mut s.emb[..h];
                emb.fill(0.0);
                self.t.word.add_row(id, emb);
                self.t.position.add_row(pos, emb);
                self.t.token_type.add_row(ty, emb);
                let t = r - r0;
                for (f, v) in emb.iter().enumerate() {
                    s.x[f * rows + t] = *v;
                }
            }
        }
        layer_norm(
            &mut s.x[..rows * h],
            rows,
            self.t.emb_ln_w.vector(),
            self.t.emb_ln_b.vector(),
            d.eps,
            &mut s.mean,
            &mut s.inv_std,
        );

        for layer in &self.t.layers {
            encoder_layer(layer, d, batch, first, last, r0, rows, s);
        }

        for i in first..last {
            let span = batch.span(i);
            let start = out.len();
            out.resize(start + h, 0.0);
            let v = &mut out[start..];
            pool(
                self.pooling,
                &s.x[..rows * h],
                rows,
                (span.start - r0)..(span.end - r0),
                v,
            );
            if self.normalize {
                l2_normalize(v);
            }
        }
    }
}

impl SentenceEncoder for HostEncoder<'_> {
    fn backend(&self) -> &'static str {
        "host"
    }

    fn dim(&self) -> usize {
        self.dims.hidden
    }

    fn embed(&mut self, batch: &TokenBatch, out: &mut Vec<f32>) -> Result<(), EmbedError> {
        out.clear();
        out.reserve(batch.len() * self.dims.hidden);
        // What a TextEncoder produces always passes; a batch built by hand must not index past
        // the tables.
        let vocab = self.t.word.len() / self.dims.hidden;
        let types = self.t.token_type.len() / self.dims.hidden;
        super::check_batch(batch, self.dims.max_positions, vocab, types)?;
        // Chunks of whole texts, each at most max_rows rows (or one text, if longer).
        let mut first = 0;
        while first < batch.len() {
            let mut last = first + 1;
            let mut rows = batch.lens()[first];
            while last < batch.len() && rows + batch.lens()[last] <= self.max_rows {
                rows += batch.lens()[last];
                last += 1;
            }
            self.run_chunk(batch, first, last, out);
            first = last;
        }
        Ok(())
    }
}

/// `y = x · Wᵀ + b` for `rows` rows, feature-major: `x` is `[in][rows]`, `y` is `[out][rows]`,
/// and `W` is `[out, in]` row-major as torch stores it. A bf16 weight goes to the AMX tile unit
/// where the processor has one ([`gemm::linear_amx`], any row count; the activations rounded
/// to bf16 into `lin.pairs`). Otherwise, on AVX-512 processors, from
/// [`gemm::COLS_KERNEL_MIN_ROWS`] rows on (a batch, or a long text), the token-vector kernel
/// reads `x` as it is ([`gemm::linear_cols`]). Few rows (one to a couple of texts, up to
/// [`gemm::DOT_KERNEL_MAX_ROWS`]) go to the packing-free kernel over a token-major copy
/// of `x` made in `lin.xt` (a few KiB), which reads a half weight as it is; the rest go to the
/// `gemm` crate, which reads an f32 `Wᵀ` as a view of the shared weight with swapped strides,
/// and a half one [`WIDE_ROWS`] rows at a time widened into `lin.wide` (a few hundred KiB,
/// never the whole weight).
fn linear(
    x: &[f32],
    rows: usize,
    w: Tensor<'_>,
    b: Tensor<'_>,
    y: &mut [f32],
    lin: &mut LinearScratch,
) {
    let b = b.vector();
    let out_dim = b.len();
    let in_dim = w.len() / out_dim;
    let y = &mut y[..out_dim * rows];
    if let Tensor::Bf16(w) = w {
        if gemm::amx_fits(in_dim, out_dim) {
            gemm::linear_amx(&x[..in_dim * rows], rows, w, b, y, &mut lin.pairs);
            return;
        }
    }
    if rows >= gemm::COLS_KERNEL_MIN_ROWS && gemm::cols_kernel_available() {
        let wide = &mut lin.wide;
        match w {
            Tensor::F32(w) => gemm::linear_cols(x, rows, w, b, y, wide),
            Tensor::F16(w) => gemm::linear_cols(x, rows, w, b, y, wide),
            Tensor::Bf16(w) => gemm::linear_cols(x, rows, w, b, y, wide),
        }
        return;
    }
    if rows <= gemm::DOT_KERNEL_MAX_ROWS && gemm::dot_kernel_available() {
        let xt = &mut lin.xt;
        ensure(xt, rows * in_dim);
        gemm::transpose(&x[..in_dim * rows], in_dim, rows, xt);
        let xt = &xt[..rows * in_dim];
        match w {
            Tensor::F32(w) => gemm::linear_rows(xt, rows, w, b, y),
            Tensor::F16(w) => gemm::linear_rows(xt, rows, w, b, y),
            Tensor::Bf16(w) => gemm::linear_rows(xt, rows, w, b, y),
        }
        return;
    }
    for (line, &bias) in y.chunks_exact_mut(rows).zip(b) {
        line.fill(bias);
    }
    let product = |y: &mut [f32], w: &[f32], n: usize| {
        matmul(
            MatMut::col_major(y, rows, n),
            Mat::col_major(x, rows, in_dim),
            Mat::row_major(w, n, in_dim).t(),
            1.0,
            true,
        )
    };
    match w {
        Tensor::F32(w) => product(y, w, out_dim),
        Tensor::F16(w) => widened_product(w, in_dim, rows, y, &mut lin.wide, product),
        Tensor::Bf16(w) => widened_product(w, in_dim, rows, y, &mut lin.wide, product),
    }
}

/// `product` of a half weight `w` (`in_dim` inputs), [`WIDE_ROWS`] rows at a time widened
/// into `wide`, into the matching lines of `y` (`rows` values each).
fn widened_product<W: gemm::Weight>(
    w: &[W],
    in_dim: usize,
    rows: usize,
    y: &mut [f32],
    wide: &mut Vec<f32>,
    product: impl Fn(&mut [f32], &[f32], usize),
) {
    ensure(wide, WIDE_ROWS.min(w.len() / in_dim) * in_dim);
    for (block, y) in w
        .chunks(WIDE_ROWS * in_dim)
        .zip(y.chunks_mut(WIDE_ROWS * rows))
    {
        let wide = &mut wide[..block.len()];
        W::widen_slice(block, wide);
        product(y, wide, block.len() / in_dim);
    }
}

/// Weight rows of an f16 matrix widened at a time for the `gemm` crate: 64 rows of 1536
/// inputs are 384 KiB, in L2, and the product over many token rows repays the widening.
const WIDE_ROWS: usize = 64;

/// One encoder layer over rows `r0..r0 + rows` (texts `first..last`), in place on `s.x`.
#[allow(clippy::too_many_arguments)]
fn encoder_layer(
    l: &LayerTensors<Tensor<'_>>,
    d: Dims,
    batch: &TokenBatch,
    first: usize,
    last: usize,
    r0: usize,
    rows: usize,
    s: &mut Scratch,
) {
    let n = rows * d.hidden;
    linear(&s.x, rows, l.query_w, l.query_b, &mut s.q, &mut s.lin);
    linear(&s.x, rows, l.key_w, l.key_b, &mut s.k, &mut s.lin);
    linear(&s.x, rows, l.value_w, l.value_b, &mut s.v, &mut s.lin);

    let scale = 1.0 / (d.head_dim as f32).sqrt();
    for i in first..last {
        let span = batch.span(i);
        let (start, len) = (span.start - r0, span.len());
        ensure(&mut s.scores, len * len);
        for head in 0..d.heads {
            // This head's features of this text's rows: [len, head_dim], column-major.
            let off = head * d.head_dim * rows + start;
            let (q, k, v) = (
                head_view(&s.q[..n], off, len, d, rows),
                head_view(&s.k[..n], off, len, d, rows),
                head_view(&s.v[..n], off, len, d, rows),
            );
            let scores = &mut s.scores[..len * len];
            matmul(MatMut::row_major(scores, len, len), q, k.t(), scale, false);
            for row in scores.chunks_exact_mut(len) {
                softmax(row);
            }
            let ctx = MatMut::new(&mut s.ctx[off..n], len, d.head_dim, 1, rows);
            matmul(ctx, Mat::row_major(&*scores, len, len), v, 1.0, false);
        }
    }

    linear(
        &s.ctx,
        rows,
        l.attn_out_w,
        l.attn_out_b,
        &mut s.tmp,
        &mut s.lin,
    );
    add(&mut s.x[..n], &s.tmp[..n]);
    layer_norm(
        &mut s.x[..n],
        rows,
        l.attn_ln_w.vector(),
        l.attn_ln_b.vector(),
        d.eps,
        &mut s.mean,
        &mut s.inv_std,
    );

    linear(&s.x, rows, l.inter_w, l.inter_b, &mut s.inter, &mut s.lin);
    for v in &mut s.inter[..rows * d.inter] {
        *v = gelu(*v);
    }
    linear(&s.inter, rows, l.out_w, l.out_b, &mut s.tmp, &mut s.lin);
    add(&mut s.x[..n], &s.tmp[..n]);
    layer_norm(
        &mut s.x[..n],
        rows,
        l.out_ln_w.vector(),
        l.out_ln_b.vector(),
        d.eps,
        &mut s.mean,
        &mut s.inv_std,
    );
}

/// One head's features of one text's rows, from `off` on: `[len, head_dim]`, column-major in a
/// feature-major buffer of `rows` rows.
fn head_view(buf: &[f32], off: usize, len: usize, d: Dims, rows: usize) -> Mat<'_> {
    Mat::new(&buf[off..], len, d.head_dim, 1, rows)
}

/// BERT's GELU, the exact (erf) form: `x · Φ(x)`.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The error function, as a rational approximation (Eigen's `generic_fast_erf_float`, also
/// what PyTorch's vectorised CPU kernels use): within a few ulp of the exact erf in f32, and
/// branch-free, so the GELU loop vectorises.
fn erf(x: f32) -> f32 {
    // Beyond ±4, erf is ±1 in f32.
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// Numerically stable softmax in place.
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `x += y`.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// LayerNorm of every row of a feature-major `[features][rows]` matrix, in place (biased
/// variance, eps inside the root, as torch). The loops run along rows, so they vectorise.
fn layer_norm(
    x: &mut [f32],
    rows: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
    mean: &mut [f32],
    inv_std: &mut [f32],
) {
    let features = w.len();
    let (mean, inv_std) = (&mut mean[..rows], &mut inv_std[..rows]);
    mean.fill(0.0);
    for line in x.chunks_exact(rows) {
        add(mean, line);
    }
    let inv_n = 1.0 / features as f32;
    for m in mean.iter_mut() {
        *m *= inv_n;
    }
    inv_std.fill(0.0);
    for line in x.chunks_exact(rows) {
        for ((acc, v), m) in inv_std.iter_mut().zip(line).zip(&*mean) {
            *acc += (v - m) * (v - m);
        }
    }
    for v in inv_std.iter_mut() {
        *v = 1.0 / (*v * inv_n + eps).sqrt();
    }
    for ((line, &g), &beta) in x.chunks_exact_mut(rows).zip(w).zip(b) {
        for ((v, m), is) in line.iter_mut().zip(&*mean).zip(&*inv_std) {
            *v = (*v - m) * is * g + beta;
        }
    }
}

/// Pools rows `span` of a feature-major `[features][rows]` matrix into `out` (`[features]`).
fn pool(mode: Pooling, x: &[f32], rows: usize, span: std::ops::Range<usize>, out: &mut [f32]) {
    let len = span.len() as f32;
    for (o, line) in out.iter_mut().zip(x.chunks_exact(rows)) {
        let vals = &line[span.clone()];
        *o = match mode {
            Pooling::Cls => vals[0],
            Pooling::Max => vals.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            Pooling::Mean => vals.iter().sum::<f32>() / len,
            Pooling::MeanSqrtLen => vals.iter().sum::<f32>() / len.sqrt(),
        };
    }
}

/// Divides by the Euclidean norm (at least 1e-12, as torch's `F.normalize`).
fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for x in v.iter_mut() {
        *x /= norm;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_uses_the_torch_layout() {
        // W = [[1, 2], [3, 4], [5, 6]] is [out=3, in=2]; x rows are [1, 1] and [0, 2], stored
        // feature-major as [[1, 0], [1, 2]].
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [0.5, 0.0, -1.0];
        let x = [1.0, 0.0, 1.0, 2.0];
        let mut y = [0.0; 6];
        let (t, bt) = (Tensor::F32(&w), Tensor::F32(&b));
        linear(&x, 2, t, bt, &mut y, &mut LinearScratch::default());
        // Rows [3.5, 7, 10] and [4.5, 8, 11], feature-major.
        assert_eq!(y, [3.5, 4.5, 7.0, 8.0, 10.0, 11.0]);
    }

    #[test]
    fn linear_agrees_on_both_sides_of_the_kernel_switch() {
        // Rows just under, at and over the few-row kernel's limit, against a plain sum, with
        // the weight in f32 and in f16; 150 outputs are two whole blocks of widened f16 rows
        // and a part of one.
        let (inp, out) = (40, 150);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7) % 23) as f32 * 0.1 - 1.0)
            .collect();
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        // 40 inputs are no multiple of 32: a bf16 weight of this shape takes the vector
        // kernels even where the processor has AMX.
        let wb16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.25).collect();
        for rows in [1, gemm::DOT_KERNEL_MAX_ROWS, gemm::DOT_KERNEL_MAX_ROWS + 1] {
            for (t, wk) in [
                (Tensor::F32(&w), w.clone()),
                (Tensor::F16(&w16), w16.iter().map(|h| h.to_f32()).collect()),
                (
                    Tensor::Bf16(&wb16),
                    wb16.iter().map(|h| h.to_f32()).collect(),
                ),
            ] {
                check_linear(t, &wk, &b, inp, rows);
            }
        }
    }

    #[test]
    fn a_bf16_weight_of_bert_widths_goes_to_the_tile_unit() {
        let (inp, out, rows) = (64, 96, 21);
        let w: Vec<bf16> = (0..out * inp)
            .map(|i| bf16::from_f32(((i * 7) % 23) as f32 * 0.1 - 1.0))
            .collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.25).collect();
        let x: Vec<f32> = (0..inp * rows)
            .map(|i| (i % 13) as f32 * 0.3 - 1.7)
            .collect();
        let mut y = vec![0.0; out * rows];
        linear(
            &x,
            rows,
            Tensor::Bf16(&w),
            Tensor::F32(&b),
            &mut y,
            &mut LinearScratch::default(),
        );
        // The activations as the kernel that ran saw them: rounded to bf16 on the tile unit.
        let seen = |v: f32| {
            if gemm::amx_available() {
                bf16::from_f32(v).to_f32()
            } else {
                v
            }
        };
        for o in 0..out {
            for r in 0..rows {
                let want = b[o]
                    + (0..inp)
                        .map(|k| w[o * inp + k].to_f32() * seen(x[k * rows + r]))
                        .sum::<f32>();
                let got = y[o * rows + r];
                assert!((got - want).abs() < 1e-3, "y[{o}][{r}] = {got}, not {want}");
            }
        }
    }

    /// [`linear`] over the weight `t` (whose values as f32 are `wk`) against a plain sum.
    fn check_linear(t: Tensor<'_>, wk: &[f32], b: &[f32], inp: usize, rows: usize) {
        let out = b.len();
        {
            let x: Vec<f32> = (0..inp * rows)
                .map(|i| ((i * 5) % 17) as f32 * 0.2 - 1.5)
                .collect();
            let mut y = vec![0.0; out * rows];
            let mut lin = LinearScratch::default();
            linear(&x, rows, t, Tensor::F32(b), &mut y, &mut lin);
            assert!(
                lin.wide.len() <= (WIDE_ROWS * inp).max(gemm::linear_cols_scratch(inp)),
                "widened {} values",
                lin.wide.len()
            );
            for o in 0..out {
                for r in 0..rows {
                    let want = b[o]
                        + (0..inp)
                            .map(|k| wk[o * inp + k] * x[k * rows + r])
                            .sum::<f32>();
                    let got = y[o * rows + r];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{t:?}: rows {rows}: y[{o}][{r}] = {got}, not {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_and_norms() {
        let mut r = [1000.0, 1000.0];
        softmax(&mut r);
        assert_eq!(r, [0.5, 0.5]);
        // Two rows, [1, 3] and [4, 8], feature-major; both normalise to [-1, 1].
        let mut x = [1.0, 4.0, 3.0, 8.0];
        let (mut m, mut s) = ([0.0; 2], [0.0; 2]);
        layer_norm(&mut x, 2, &[1.0, 2.0], &[0.0, 1.0], 0.0, &mut m, &mut s);
        assert_eq!(x, [-1.0, -1.0, 3.0, 3.0]);
        let mut v = [3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = [0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0, 0.0]);
    }

    #[test]
    fn erf_is_close_to_the_exact_one() {
        let mut worst = 0.0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 5e-7, "largest error {worst}");
        assert!((erf(10.0) - 1.0).abs() < 2e-7 && (erf(-10.0) + 1.0).abs() < 2e-7);
        assert_eq!(erf(0.0), 0.0);
    }

    #[test]
    fn gelu_matches_known_values() {
        // torch.nn.functional.gelu(torch.tensor([-3., -1., 0., 1., 3.]))
        for (x, want) in [
            (-3.0, -0.004_049_7),
            (-1.0, -0.158_655_26),
            (0.0, 0.0),
            (1.0, 0.841_344_7),
            (3.0, 2.995_950_3),
        ] {
            assert!((gelu(x) - want).abs() < 1e-6, "gelu({x}) = {}", gelu(x));
        }
    }

    #[test]
    fn pooling_modes() {
        // Three rows of two features, feature-major; pool rows 1..3: [-2, 3] and [4, 5].
        let x = [9.0, -2.0, 4.0, 9.0, 3.0, 5.0];
        let mut out = [0.0; 2];
        pool(Pooling::Mean, &x, 3, 1..3, &mut out);
        assert_eq!(out, [1.0, 4.0]);
        pool(Pooling::Cls, &x, 3, 1..3, &mut out);
        assert_eq!(out, [-2.0, 3.0]);
        pool(Pooling::Max, &x, 3, 1..3, &mut out);
        assert_eq!(out, [4.0, 5.0]);
        pool(Pooling::MeanSqrtLen, &x, 3, 1..3, &mut out);
        assert_eq!(out, [2.0 / 2f32.sqrt(), 8.0 / 2f32.sqrt()]);
    }
}
