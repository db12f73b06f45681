//! The app's one error type: everything that can stop a worker from serving, with the path or
//! value that was wrong. Errors of single requests are not here: they become HTTP answers
//! (see [`crate::api::ApiError`]) and never end the worker.

use std::path::PathBuf;

/// Why the embeddings app cannot start (or, for [`EmbedError::Tokenize`], cannot embed a text).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Incompatible { path: PathBuf, reason: String },
    #[error("{path}: cannot load the tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tensor {name} is missing (looked for {tried})")]
    MissingTensor { name: String, tried: String },
    #[error("tensor {name} has shape {actual:?}, the config says {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<u64>,
        actual: Vec<u64>,
    },
    #[error("tensor {name} has dtype {dtype}, expected a floating-point tensor")]
    TensorDtype { name: String, dtype: String },
    #[error("tensor {name} is not f32 (aligned) in the compute copy")]
    NotF32 { name: String },
    #[error("the weights are on the {backend} backend, which this app cannot compute on yet")]
    UnsupportedBackend { backend: String },
    #[error("tokenizing a text failed: {0}")]
    Tokenize(String),
    #[error("model: {0}")]
    Model(#[from] zygote_runtime::ModelError),
    #[error("weights: {0}")]
    Backend(#[from] zygote_runtime::backend::BackendError),
    #[error("worker: {0}")]
    Worker(#[from] zygote_runtime::WorkerError),
    #[error("the supervisor gave this worker no listener")]
    NoListener,
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
}
