//! Texts to word pieces, as sentence-transformers makes them: the Hugging Face `tokenizers`
//! crate reading the model's `tokenizer.json`, truncated at the model's `max_seq_length`
//! (special tokens included), without padding.
//!
//! The `tokenizer.json` of MiniLM carries its own truncation (128) and fixed padding (128);
//! sentence-transformers overrides both when it tokenises (truncation at 256, padding to the
//! longest text of a batch), and so does this module. Padding is not needed at all here: a
//! [`TokenBatch`] packs the texts of a request one after another, and the encoders attend
//! within each text's own span (see [`crate::encoder`]).

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::EmbedError;
use crate::spec::ModelSpec;

/// The word pieces of several texts, packed: text `i` owns `ids[starts[i]..starts[i] + lens[i]]`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    lens: Vec<usize>,
    starts: Vec<usize>,
}

impl TokenBatch {
    /// Forgets every text, keeping the allocations.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.type_ids.clear();
        self.lens.clear();
        self.starts.clear();
    }

    /// Keeps the first `texts` texts.
    pub fn truncate(&mut self, texts: usize) {
        if texts < self.lens.len() {
            let end = self.starts[texts];
            self.ids.truncate(end);
            self.type_ids.truncate(end);
            self.lens.truncate(texts);
            self.starts.truncate(texts);
        }
    }

    /// Appends one text's word pieces.
    pub fn push(&mut self, ids: &[u32], type_ids: &[u32]) {
        debug_assert_eq!(ids.len(), type_ids.len());
        self.starts.push(self.ids.len());
        self.lens.push(ids.len());
        self.ids.extend_from_slice(ids);
        self.type_ids.extend_from_slice(type_ids);
    }

    /// Number of texts.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Word pieces of all texts together.
    pub fn total_tokens(&self) -> usize {
        self.ids.len()
    }

    /// The rows of text `i`: `start..start + len`.
    pub fn span(&self, i: usize) -> std::ops::Range<usize> {
        self.starts[i]..self.starts[i] + self.lens[i]
    }

    /// The word pieces and token types of text `i`.
    pub fn text(&self, i: usize) -> (&[u32], &[u32]) {
        let span = self.span(i);
        (&self.ids[span.clone()], &self.type_ids[span])
    }

    /// Word pieces of every text, in order.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Length of the longest text.
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
}

/// The model's tokenizer, set up as sentence-transformers uses it.
#[derive(Debug)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_len: usize,
    lower_case: bool,
    vocab_size: u32,
    type_vocab_size: u32,
}

impl TextEncoder {
    /// Loads `tokenizer.json` and checks that every id it can produce has a row in the model's
    /// embedding tables.
    pub fn load(spec: &ModelSpec) -> Result<Self, EmbedError> {
        let path = &spec.tokenizer_path;
        let err = |reason: String| EmbedError::Tokenizer {
            path: path.clone(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: spec.max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| err(e.to_string()))?;
        tokenizer.with_padding(None);
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > spec.config.vocab_size {
            return Err(err(format!(
                "its vocabulary has {vocab} entries, the model's embedding table only {}",
                spec.config.vocab_size
            )));
        }
        let this = Self {
            tokenizer,
            max_len: spec.max_seq_length,
            lower_case: spec.lower_case,
            vocab_size: spec.config.vocab_size as u32,
            type_vocab_size: spec.config.type_vocab_size as u32,
        };
        // A tokenizer that cannot encode a plain sentence is broken; find out now, not per request.
        let mut probe = TokenBatch::default();
        this.encode_into("Hello, world.", &mut probe)
            .map_err(|e| err(e.to_string()))?;
        Ok(this)
    }

    /// Word pieces per text at most, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenises `text` (truncated, with the model's special tokens) and appends it to `batch`;
    /// returns its number of word pieces.
    pub fn encode_into(&self, text: &str, batch: &mut TokenBatch) -> Result<usize, EmbedError> {
        let lowered;
        let text = if self.lower_case {
            lowered = text.to_lowercase();
            lowered.as_str()
        } else {
            text
        };
        let enc = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let (ids, types) = (enc.get_ids(), enc.get_type_ids());
        // The encoders index their tables with these ids; an id past a table would be a panic
        // there, so it is refused here (load() already checked the vocabulary's size).
        if let Some(bad) = ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(EmbedError::Tokenize(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        if let Some(bad) = types.iter().find(|&&t| t >= self.type_vocab_size) {
            return Err(EmbedError::Tokenize(format!(
                "token type {bad} is outside the model's types"
            )));
        }
        if ids.is_empty() || ids.len() > self.max_len {
            return Err(EmbedError::Tokenize(format!(
                "{} word pieces (expected 1..={})",
                ids.len(),
                self.max_len
            )));
        }
        batch.push(ids, types);
        Ok(ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_packs_texts() {
        let mut b = TokenBatch::default();
        b.push(&[101, 7, 102], &[0, 0, 0]);
        b.push(&[101, 102], &[0, 0]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.total_tokens(), 5);
        assert_eq!(b.span(1), 3..5);
        assert_eq!(b.max_len(), 3);
        b.truncate(1);
        assert_eq!((b.len(), b.total_tokens()), (1, 3));
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.total_tokens(), 0);
    }
}
