//! The forward pass: word pieces in, one sentence vector per text out.
//!
//! [`SentenceEncoder`] is the boundary between the HTTP side of the app and the arithmetic.
//! Each backend of the runtime gets its own implementation over the weights a worker imported,
//! and none of them copies the weights:
//!
//! - [`host::HostEncoder`] borrows `&[f32]` slices of the owner's shared read-only mapping
//!   ([`zygote_runtime::backend::host::HostWeights`]) and multiplies with the `gemm` crate.
//! - [`cuda::CudaEncoder`] binds the same [`crate::spec::BertTensors`] table to the imported
//!   device pointers ([`zygote_runtime::backend::cuda::CudaWeights`]), with cuBLAS for the
//!   products and small NVRTC kernels for the rest.
//!
//! Batches are packed, not padded: a [`TokenBatch`] lays the texts of a request one after another,
//! every linear layer runs once over all of their rows, and attention runs within each text's
//! own rows. That is what padding plus an attention mask computes, without the padded rows.

pub mod cuda;
// The unsafe leaf of the host encoder (see its module doc).
#[allow(unsafe_code)]
pub mod gemm;
pub mod host;

use zygote_runtime::backend::Weights;

use crate::error::EmbedError;
use crate::spec::ModelSpec;
use crate::tokenize::TokenBatch;

/// A forward pass over imported weights.
pub trait SentenceEncoder {
    /// Which backend computes (`"host"`, `"cuda"`), for logs and the ready message.
    fn backend(&self) -> &'static str;
    /// The width of a sentence vector.
    fn dim(&self) -> usize;
    /// Embeds every text of `batch`, pooled (and normalised when the model says so). `out` is
    /// cleared, then holds `batch.len() * dim()` floats, text after text.
    fn embed(&mut self, batch: &TokenBatch, out: &mut Vec<f32>) -> Result<(), EmbedError>;
}

/// The encoder for the weights a worker imported, borrowing them.
pub fn for_weights<'w>(
    spec: &ModelSpec,
    weights: &'w Weights,
) -> Result<Box<dyn SentenceEncoder + 'w>, EmbedError> {
    match weights {
        Weights::Host(w) => Ok(Box::new(host::HostEncoder::new(spec, w)?)),
        Weights::Cuda(w) => Ok(Box::new(cuda::CudaEncoder::new(spec, w)?)),
    }
}

/// Refuses a batch that would index past the model's tables: a text of no word pieces or more
/// than `max_positions`, an id of `vocab` or more, a type id of `types` or more.
pub fn check_batch(
    batch: &TokenBatch,
    max_positions: usize,
    vocab: usize,
    types: usize,
) -> Result<(), EmbedError> {
    if let Some(&len) = batch.lens().iter().find(|&&l| l == 0 || l > max_positions) {
        return Err(EmbedError::Tokenize(format!(
            "a text of {len} word pieces (expected 1..={max_positions})"
        )));
    }
    if batch.ids.iter().any(|&id| id as usize >= vocab)
        || batch.type_ids.iter().any(|&t| t as usize >= types)
    {
        return Err(EmbedError::Tokenize(
            "a token id is outside the model's tables".into(),
        ));
    }
    Ok(())
}
