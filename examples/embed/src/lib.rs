//! # zygote-embed: a sentence-embeddings service computed from the shared weights
//!
//! The model side: the model directory ([`spec`]), the tokenizer ([`tokenize`]) and the forward
//! pass over imported weights ([`encoder`]).

pub mod encoder;
pub mod error;
pub mod spec;
pub mod tokenize;

pub use error::EmbedError;
pub use spec::ModelSpec;
