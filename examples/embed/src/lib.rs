//! # zygote-embed: a sentence-embeddings service computed from the shared weights
//!
//! The model side: the model directory ([`spec`]), the tokenizer ([`tokenize`]) and the forward
//! pass over imported weights ([`encoder`]); the worker's HTTP event loop ([`http`]).

pub mod encoder;
pub mod error;
pub mod http;
pub mod spec;
pub mod tokenize;

#[cfg(test)]
mod testutil;

pub use error::EmbedError;
pub use spec::ModelSpec;
