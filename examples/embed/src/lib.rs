//! # zygote-embed: a sentence-embeddings service computed from the shared weights
//!
//! The example app of the zygote runtime, and the service seed 002 is about: a BERT-family
//! sentence-transformers model (all-MiniLM-L6-v2 is the reference) served over HTTP, with an
//! OpenAI-compatible `POST /v1/embeddings` and the Python service's `POST /embed`.
//!
//! It runs as a worker of `zygote start`, in either of the runtime's two ways:
//!
//! - as the native entry `app`: the zygote binary registers [`serve`] and the zygote forks into
//!   it (no exec, no model loading);
//! - as an exec'd program: `zygote start -- path/to/zygote-embed`, whose `main` attaches with
//!   [`zygote_runtime::Worker::attach`] and calls the same [`serve`].
//!
//! What a worker does, in order ([`serve`]): read the model directory beside the model file
//! ([`spec`]) and refuse an incompatible model; import the owner's weights
//! ([`zygote_runtime::Worker::import_weights`]); build the forward pass over them without copying
//! them ([`encoder`]); load the tokenizer ([`tokenize`]); take its listeners; report ready; serve
//! ([`http`], [`api`]) until the supervisor drains it or goes away.

pub mod api;
pub mod encoder;
pub mod error;
pub mod http;
pub mod spec;
pub mod tokenize;

#[cfg(test)]
mod testutil;

use std::path::Path;
use std::time::Duration;

use zygote_runtime::backend::{self, DeviceBackend, Weights};
use zygote_runtime::{Model, Worker};

pub use api::{ApiLimits, App};
pub use error::EmbedError;
pub use spec::ModelSpec;

/// Exit code: drained, or the supervisor went away.
pub const EXIT_OK: i32 = 0;
/// Exit code: the app failed while serving (the event loop or the control channel broke).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: the drain's deadline passed with requests unanswered (`EX_TEMPFAIL`).
pub const EXIT_DRAIN_TIMEOUT: i32 = 75;
/// Exit code: the app could not start: incompatible model, weights not importable, no
/// listener (`EX_CONFIG`).
pub const EXIT_SETUP: i32 = 78;

/// Time allowed for the owner to answer with the weights.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory of the model file (`<dir>/model.safetensors`).
fn model_dir(model_path: &Path) -> &Path {
    match model_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The worker's life: set up, report ready, serve until drained. Returns the exit code.
pub fn serve(mut worker: Worker) -> i32 {
    let spec = match ModelSpec::load(model_dir(worker.model().path()))
        .and_then(|spec| spec::check_model_file(&spec.config, worker.model()).map(|()| spec))
    {
        Ok(s) => s,
        Err(e) => {
            log::error!("incompatible model: {e}");
            return EXIT_SETUP;
        }
    };
    let weights = match worker.import_weights(IMPORT_TIMEOUT) {
        Ok(w) => w,
        Err(e) => {
            log::error!("cannot import the weights: {e}");
            return EXIT_SETUP;
        }
    };
    let mut app = match build_app(&spec, &weights) {
        Ok(a) => a,
        Err(e) => {
            log::error!("cannot build the model over the weights: {e}");
            return EXIT_SETUP;
        }
    };
    let listeners = worker.take_listeners();
    if listeners.is_empty() {
        log::error!("{}", EmbedError::NoListener);
        return EXIT_SETUP;
    }
    let generation = weights.manifest().generation;
    let detail = format!(
        "{} ({} backend, {} dimensions, {} word pieces max)",
        spec.name,
        weights.manifest().backend,
        spec.dim(),
        spec.max_seq_length
    );
    if let Err(e) = worker.ready(Some(generation), &detail) {
        log::error!("cannot report ready: {e}");
        return EXIT_FAILURE;
    }
    log::info!(
        "serving {detail} on {} listener(s), weights generation {generation}",
        listeners.len()
    );
    match http::run(listeners, &mut worker, &mut app, &http::Limits::default()) {
        Ok(http::Exit::Drained { served }) => {
            log::info!("drained after {served} request(s)");
            EXIT_OK
        }
        Ok(http::Exit::DrainTimedOut { abandoned }) => {
            log::warn!("drain deadline passed; dropping {abandoned} busy connection(s)");
            EXIT_DRAIN_TIMEOUT
        }
        Ok(http::Exit::Orphaned) => {
            log::info!("the supervisor is gone; exiting");
            zygote_runtime::lifeline::ORPHAN_EXIT
        }
        Ok(http::Exit::Control(e)) => {
            log::error!("control channel: {e}");
            EXIT_FAILURE
        }
        Err(e) => {
            log::error!("event loop: {e}");
            EXIT_FAILURE
        }
    }
}

/// Builds the app over imported weights: tokenizer and the backend's encoder, which borrows
/// the weights.
pub fn build_app<'w>(spec: &ModelSpec, weights: &'w Weights) -> Result<App<'w>, EmbedError> {
    let tokenizer = tokenize::TextEncoder::load(spec)?;
    let encoder = encoder::for_weights(spec, weights)?;
    Ok(App::new(
        encoder,
        tokenizer,
        spec.name.clone(),
        ApiLimits::default(),
    ))
}

/// The host weights of a model file without any other process: the owner's export and the
/// worker's import (with its manifest and digest checks) done in this one process. This is the
/// production path minus the sockets, for tests and benchmarks.
pub fn import_host_weights(model_file: &Path) -> Result<(Model, Weights), EmbedError> {
    let model = Model::load(model_file)?;
    let export = backend::host::HostBackend.export(&model, 1)?;
    let weights = backend::import(export.manifest, export.fds, &model)?;
    Ok((model, weights))
}
