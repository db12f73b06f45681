//! The BERT forward pass on the GPU, over the device weights a worker imported.
//!
//! The weights are the owner's arenas mapped into this worker's context
//! ([`zygote_runtime::backend::cuda::CudaWeights`]); the encoder binds each tensor of
//! [`BertTensors`] to its device address and never copies or frees one. Its own activations
//! live in two device buffers (f32 activations, u32 word pieces), allocated on the first
//! request and grown when a larger chunk comes, laid out by [`plan::Layout`].
//!
//! The arithmetic is the host encoder's ([`super::host`]), on the device: cuBLAS `sgemm` for
//! every linear layer (`X · Wᵀ`, the transpose chosen in the call) and strided-batched `sgemm`
//! over the heads for the attention of each text, NVRTC kernels (`kernels.cu`) for the
//! embeddings, bias (+ erf GELU), add & LayerNorm, softmax, pooling and L2 normalisation. Batches
//! are packed as on the host: the linear layers run over all rows of a chunk at once, attention
//! within each text's rows. Activations are token-major (`[rows][features]`).
//!
//! Everything runs on one stream of the worker; a request copies its word pieces in and its
//! sentence vectors out, and synchronises once. [`plan`] holds the arithmetic (tested on any
//! machine), [`launch`] the unsafe calls. The sequence of operations, [`forward`], is generic
//! over [`Exec`]: on the GPU that is the kernels and cuBLAS, in the tests an emulation of them
//! on the host (`emulate.rs`), checked against a direct BERT.

// The unsafe leaf of the CUDA encoder (see its module doc).
#[allow(unsafe_code)]
pub mod launch;
pub mod plan;

#[cfg(test)]
mod emulate;

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use zygote_runtime::backend::cuda::CudaWeights;
use zygote_runtime::model::Dtype;

use self::launch::{Buf, Kernels};
use self::plan::{chunks, grow, Dims, GemmPlan, Layout};
use super::SentenceEncoder;
use crate::error::EmbedError;
use crate::spec::{BertTensors, LayerTensors, ModelSpec, Pooling};
use crate::tokenize::TokenBatch;

/// Rows (word pieces of all texts) computed together, by default. A GPU wants large products;
/// the activations of 4096 rows of MiniLM are about 40 MiB of device memory.
pub const DEFAULT_MAX_ROWS: usize = 4096;

fn driver_error(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> EmbedError {
    move |e| EmbedError::Cuda {
        call,
        message: e.to_string(),
    }
}

/// The pooling mode as the `pool` kernel numbers it.
pub fn pool_mode(p: Pooling) -> i32 {
    match p {
        Pooling::Mean => 0,
        Pooling::Cls => 1,
        Pooling::Max => 2,
        Pooling::MeanSqrtLen => 3,
    }
}

/// The host side of a chunk's u32 buffer: word piece ids, type ids, positions within each
/// text (`rows` each), then each text's first row (relative to the chunk), then each length.
pub fn chunk_words(batch: &TokenBatch, texts: std::ops::Range<usize>, out: &mut Vec<u32>) {
    out.clear();
    let r0 = batch.span(texts.start).start;
    let r1 = batch.span(texts.end - 1).end;
    out.extend_from_slice(&batch.ids[r0..r1]);
    out.extend_from_slice(&batch.type_ids[r0..r1]);
    for i in texts.clone() {
        out.extend((0..batch.lens()[i]).map(|p| p as u32));
    }
    for i in texts.clone() {
        out.push((batch.span(i).start - r0) as u32);
    }
    for i in texts {
        out.push(batch.lens()[i] as u32);
    }
}

/// The device buffers of the activations, and their addresses.
#[derive(Debug)]
struct Activations {
    floats: CudaSlice<f32>,
    words: CudaSlice<u32>,
    f: Buf,
    w: Buf,
}

impl Activations {
    fn alloc(stream: &Arc<CudaStream>, floats: usize, words: usize) -> Result<Self, EmbedError> {
        let f_slice = stream
            .alloc_zeros::<f32>(floats.max(1))
            .map_err(driver_error("cuMemAlloc"))?;
        let w_slice = stream
            .alloc_zeros::<u32>(words.max(1))
            .map_err(driver_error("cuMemAlloc"))?;
        let f = Buf::new(f_slice.device_ptr(stream).0, f_slice.len());
        let w = Buf::new(w_slice.device_ptr(stream).0, w_slice.len());
        Ok(Self {
            floats: f_slice,
            words: w_slice,
            f,
            w,
        })
    }
}

/// The CUDA encoder, borrowing the imported weights for its whole life.
#[derive(Debug)]
pub struct CudaEncoder<'w> {
    t: BertTensors<Buf>,
    dims: Dims,
    vocab: usize,
    types: usize,
    pooling: Pooling,
    normalize: bool,
    max_rows: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    act: Option<Activations>,
    words: Vec<u32>,
    _weights: PhantomData<&'w CudaWeights>,
}

/// Binds every tensor of the encoder to its device address, checking shape and dtype.
fn bind(spec: &ModelSpec, weights: &CudaWeights) -> Result<BertTensors<Buf>, EmbedError> {
    BertTensors::bind(
        &spec.config,
        |name| weights.tensor(name).is_some(),
        |name, shape| {
            let Some(t) = weights.tensor(name) else {
                return Ok(None);
            };
            if t.shape != shape {
                return Err(EmbedError::TensorShape {
                    name: name.into(),
                    expected: shape.to_vec(),
                    actual: t.shape.to_vec(),
                });
            }
            let elems: u64 = shape.iter().product();
            if t.dtype != Dtype::F32 || t.len != elems * 4 || t.ptr % 4 != 0 {
                return Err(EmbedError::NotF32 { name: name.into() });
            }
            Ok(Some(Buf::new(t.ptr, elems as usize)))
        },
    )
}

impl<'w> CudaEncoder<'w> {
    /// Binds every tensor of `spec`'s encoder in `weights`, makes this worker's stream and
    /// cuBLAS handle, and compiles the kernels.
    pub fn new(spec: &ModelSpec, weights: &'w CudaWeights) -> Result<Self, EmbedError> {
        let t = bind(spec, weights)?;
        launch::libraries_present()?;
        let ctx = weights.context();
        ctx.bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        let stream = ctx.new_stream().map_err(driver_error("cuStreamCreate"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| EmbedError::Cuda {
            call: "cublasCreate",
            message: e.to_string(),
        })?;
        let kernels = Kernels::load(ctx)?;
        let c = &spec.config;
        log::info!(
            "CUDA encoder on device {}: {} layers, hidden {}, kernels compiled",
            weights.ordinal(),
            c.num_hidden_layers,
            c.hidden_size
        );
        Ok(Self {
            vocab: t.word.len() / c.hidden_size,
            types: t.token_type.len() / c.hidden_size,
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
            stream,
            blas,
            kernels,
            act: None,
            words: Vec::new(),
            _weights: PhantomData,
        })
    }

    /// Sets the rows computed together. A text longer than this is still computed whole, alone.
    pub fn with_max_rows(mut self, rows: usize) -> Self {
        self.max_rows = rows.max(1);
        self
    }

    /// The activation buffers, grown to hold `l`.
    fn buffers(&mut self, l: &Layout) -> Result<(Buf, Buf), EmbedError> {
        let (have_f, have_w) = self
            .act
            .as_ref()
            .map_or((0, 0), |a| (a.floats.len(), a.words.len()));
        if l.floats > have_f || l.words > have_w {
            let (nf, nw) = (grow(have_f, l.floats), grow(have_w, l.words));
            // The old buffers are freed on this stream, after the work queued on it.
            self.act = None;
            log::debug!("CUDA encoder: activations grown to {nf} floats, {nw} words");
            self.act = Some(Activations::alloc(&self.stream, nf, nw)?);
        }
        let a = self.act.as_ref().ok_or(EmbedError::Cuda {
            call: "cuMemAlloc",
            message: "no activation buffers".into(),
        })?;
        Ok((a.f, a.w))
    }

    /// Runs texts `texts` of `batch` and appends their vectors to `out`.
    fn run_chunk(
        &mut self,
        batch: &TokenBatch,
        texts: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), EmbedError> {
        let d = self.dims;
        let h = d.hidden;
        let r0 = batch.span(texts.start).start;
        let rows = batch.span(texts.end - 1).end - r0;
        let n_texts = texts.len();
        let max_len = batch.lens()[texts.clone()]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let l = Layout::new(&d, rows, n_texts, max_len).ok_or_else(|| EmbedError::Cuda {
            call: "layout",
            message: format!("a chunk of {rows} rows overflows"),
        })?;
        let (f, w) = self.buffers(&l)?;
        let mut words = std::mem::take(&mut self.words);
        chunk_words(batch, texts.clone(), &mut words);
        debug_assert_eq!(words.len(), l.words);
        {
            let a = self.act.as_mut().ok_or(EmbedError::Cuda {
                call: "cuMemcpyHtoD",
                message: "no activation buffers".into(),
            })?;
            let mut dst = a.words.slice_mut(0..words.len());
            self.stream
                .memcpy_htod(&words[..], &mut dst)
                .map_err(driver_error("cuMemcpyHtoD"))?;
        }
        self.words = words;

        let mut gpu = Gpu {
            stream: &self.stream,
            kernels: &self.kernels,
            blas: &self.blas,
        };
        let spans: Vec<(usize, usize)> = texts
            .clone()
            .map(|i| (batch.span(i).start - r0, batch.lens()[i]))
            .collect();
        forward(
            &mut gpu,
            &self.t,
            &d,
            &l,
            f,
            w,
            &spans,
            self.pooling,
            self.normalize,
        )?;
        let s = &self.stream;
        let start = out.len();
        out.resize(start + n_texts * h, 0.0);
        let a = self.act.as_ref().ok_or(EmbedError::Cuda {
            call: "cuMemcpyDtoH",
            message: "no activation buffers".into(),
        })?;
        s.memcpy_dtoh(&a.floats.slice(l.out.clone()), &mut out[start..])
            .map_err(driver_error("cuMemcpyDtoH"))?;
        s.synchronize()
            .map_err(driver_error("cuStreamSynchronize"))?;
        Ok(())
    }
}

/// The operations of the forward pass on device buffers: the GPU's kernels and cuBLAS, or (in
/// the tests) an emulation of them on the host that checks the orchestration below.
pub trait Exec {
    #[allow(clippy::too_many_arguments)]
    fn embed(
        &mut self,
        x: Buf,
        tokens: Buf,
        word: Buf,
        position: Buf,
        token_type: Buf,
        rows: usize,
        hidden: usize,
    ) -> Result<(), EmbedError>;
    fn add_bias(
        &mut self,
        y: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        gelu: bool,
    ) -> Result<(), EmbedError>;
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &mut self,
        x: Buf,
        residual: Option<Buf>,
        w: Buf,
        b: Buf,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), EmbedError>;
    fn softmax(&mut self, s: Buf, nrows: usize, len: usize) -> Result<(), EmbedError>;
    #[allow(clippy::too_many_arguments)]
    fn pool(
        &mut self,
        out: Buf,
        x: Buf,
        spans: Buf,
        texts: usize,
        rows: usize,
        hidden: usize,
        mode: i32,
    ) -> Result<(), EmbedError>;
    fn l2_normalize(&mut self, v: Buf, texts: usize, hidden: usize) -> Result<(), EmbedError>;
    fn sgemm(&mut self, p: &GemmPlan, a: Buf, b: Buf, c: Buf) -> Result<(), EmbedError>;
}

/// [`Exec`] on the GPU: the encoder's stream, kernels and cuBLAS handle.
struct Gpu<'a> {
    stream: &'a CudaStream,
    kernels: &'a Kernels,
    blas: &'a CudaBlas,
}

impl Exec for Gpu<'_> {
    fn embed(
        &mut self,
        x: Buf,
        tokens: Buf,
        word: Buf,
        position: Buf,
        token_type: Buf,
        rows: usize,
        hidden: usize,
    ) -> Result<(), EmbedError> {
        self.kernels.embed(
            self.stream,
            x,
            tokens,
            word,
            position,
            token_type,
            rows,
            hidden,
        )
    }
    fn add_bias(
        &mut self,
        y: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        gelu: bool,
    ) -> Result<(), EmbedError> {
        self.kernels
            .add_bias(self.stream, y, bias, rows, cols, gelu)
    }
    fn layer_norm(
        &mut self,
        x: Buf,
        residual: Option<Buf>,
        w: Buf,
        b: Buf,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), EmbedError> {
        self.kernels
            .layer_norm(self.stream, x, residual, w, b, rows, hidden, eps)
    }
    fn softmax(&mut self, s: Buf, nrows: usize, len: usize) -> Result<(), EmbedError> {
        self.kernels.softmax(self.stream, s, nrows, len)
    }
    fn pool(
        &mut self,
        out: Buf,
        x: Buf,
        spans: Buf,
        texts: usize,
        rows: usize,
        hidden: usize,
        mode: i32,
    ) -> Result<(), EmbedError> {
        self.kernels
            .pool(self.stream, out, x, spans, texts, rows, hidden, mode)
    }
    fn l2_normalize(&mut self, v: Buf, texts: usize, hidden: usize) -> Result<(), EmbedError> {
        self.kernels.l2_normalize(self.stream, v, texts, hidden)
    }
    fn sgemm(&mut self, p: &GemmPlan, a: Buf, b: Buf, c: Buf) -> Result<(), EmbedError> {
        launch::sgemm(self.blas, p, a, b, c)
    }
}

/// The forward pass of one chunk laid out as `l` in the buffers `f` (floats) and `w` (its word
/// pieces and spans, already copied in): embeddings, every layer, pooling into `l.out`.
/// `spans` are the texts' (first row, length) within the chunk.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Exec>(
    e: &mut E,
    t: &BertTensors<Buf>,
    d: &Dims,
    l: &Layout,
    f: Buf,
    w: Buf,
    spans: &[(usize, usize)],
    pooling: Pooling,
    normalize: bool,
) -> Result<(), EmbedError> {
    let (h, rows) = (d.hidden, l.rows);
    let x = f.at(l.x.clone());
    e.embed(
        x,
        w.at(l.tokens.clone()),
        t.word,
        t.position,
        t.token_type,
        rows,
        h,
    )?;
    e.layer_norm(x, None, t.emb_ln_w, t.emb_ln_b, rows, h, d.eps)?;
    for layer in &t.layers {
        encoder_layer(e, layer, d, l, f, spans)?;
    }
    let pooled = f.at(l.out.clone());
    e.pool(
        pooled,
        x,
        w.at(l.spans.clone()),
        spans.len(),
        rows,
        h,
        pool_mode(pooling),
    )?;
    if normalize {
        e.l2_normalize(pooled, spans.len(), h)?;
    }
    Ok(())
}

/// One encoder layer over the chunk, in place on `x`.
fn encoder_layer<E: Exec>(
    e: &mut E,
    lt: &LayerTensors<Buf>,
    d: &Dims,
    l: &Layout,
    f: Buf,
    spans: &[(usize, usize)],
) -> Result<(), EmbedError> {
    let (h, rows) = (d.hidden, l.rows);
    let (x, q, k, v, ctx, tmp, inter, scores) = (
        f.at(l.x.clone()),
        f.at(l.q.clone()),
        f.at(l.k.clone()),
        f.at(l.v.clone()),
        f.at(l.ctx.clone()),
        f.at(l.tmp.clone()),
        f.at(l.inter.clone()),
        f.at(l.scores.clone()),
    );
    // output[rows][out] = input[rows][in] · weightᵀ + bias (then GELU).
    let linear =
        |e: &mut E, input: Buf, weight: Buf, bias: Buf, output: Buf, in_dim, out_dim, gelu| {
            e.sgemm(
                &GemmPlan::linear(rows, in_dim, out_dim),
                weight,
                input,
                output,
            )?;
            e.add_bias(output, bias, rows, out_dim, gelu)
        };
    linear(e, x, lt.query_w, lt.query_b, q, h, h, false)?;
    linear(e, x, lt.key_w, lt.key_b, k, h, h, false)?;
    linear(e, x, lt.value_w, lt.value_b, v, h, h, false)?;

    let scale = 1.0 / (d.head_dim as f32).sqrt();
    for &(start, len) in spans {
        e.sgemm(&GemmPlan::scores(d, start, len, scale), k, q, scores)?;
        e.softmax(scores, d.heads * len, len)?;
        e.sgemm(&GemmPlan::context(d, start, len), v, scores, ctx)?;
    }

    linear(e, ctx, lt.attn_out_w, lt.attn_out_b, tmp, h, h, false)?;
    e.layer_norm(x, Some(tmp), lt.attn_ln_w, lt.attn_ln_b, rows, h, d.eps)?;
    linear(e, x, lt.inter_w, lt.inter_b, inter, h, d.inter, true)?;
    linear(e, inter, lt.out_w, lt.out_b, tmp, d.inter, h, false)?;
    e.layer_norm(x, Some(tmp), lt.out_ln_w, lt.out_ln_b, rows, h, d.eps)
}

impl SentenceEncoder for CudaEncoder<'_> {
    fn backend(&self) -> &'static str {
        "cuda"
    }

    fn dim(&self) -> usize {
        self.dims.hidden
    }

    fn embed(&mut self, batch: &TokenBatch, out: &mut Vec<f32>) -> Result<(), EmbedError> {
        out.clear();
        out.reserve(batch.len() * self.dims.hidden);
        super::check_batch(batch, self.dims.max_positions, self.vocab, self.types)?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        for texts in chunks(batch.lens(), self.max_rows) {
            self.run_chunk(batch, texts, out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::check_batch;

    fn batch() -> TokenBatch {
        let mut b = TokenBatch::default();
        b.push(&[101, 7, 102], &[0, 0, 0]);
        b.push(&[101, 102], &[0, 1]);
        b.push(&[101, 9, 9, 102], &[0, 0, 0, 0]);
        b
    }

    #[test]
    fn words_of_a_chunk_are_ids_types_positions_then_spans() {
        let b = batch();
        let mut w = vec![42];
        chunk_words(&b, 1..3, &mut w);
        assert_eq!(
            w,
            [
                101, 102, 101, 9, 9, 102, // ids
                0, 1, 0, 0, 0, 0, // type ids
                0, 1, 0, 1, 2, 3, // positions
                0, 2, // starts, relative to the chunk
                2, 4, // lengths
            ]
        );
        let d = Dims {
            hidden: 4,
            heads: 2,
            head_dim: 2,
            inter: 8,
            max_positions: 8,
            eps: 1e-12,
        };
        assert_eq!(Layout::new(&d, 6, 2, 4).unwrap().words, w.len());
    }

    #[test]
    fn batches_that_index_past_the_tables_are_refused() {
        let b = batch();
        assert!(check_batch(&b, 8, 200, 2).is_ok());
        // A position past the table, an id past the vocabulary, a type past the types.
        assert!(matches!(
            check_batch(&b, 3, 200, 2),
            Err(EmbedError::Tokenize(_))
        ));
        assert!(matches!(
            check_batch(&b, 8, 102, 2),
            Err(EmbedError::Tokenize(_))
        ));
        assert!(matches!(
            check_batch(&b, 8, 200, 1),
            Err(EmbedError::Tokenize(_))
        ));
        let mut empty = TokenBatch::default();
        empty.push(&[], &[]);
        assert!(check_batch(&empty, 8, 200, 2).is_err());
    }

    #[test]
    fn pooling_modes_match_the_kernel() {
        // The numbers the pool kernel's comment documents.
        assert_eq!(
            [
                Pooling::Mean,
                Pooling::Cls,
                Pooling::Max,
                Pooling::MeanSqrtLen
            ]
            .map(pool_mode),
            [0, 1, 2, 3]
        );
        let src = launch::SOURCE;
        assert!(src.contains("mode: 0 mean, 1 first token (CLS), 2 max, 3 sum / sqrt(len)"));
    }
}
