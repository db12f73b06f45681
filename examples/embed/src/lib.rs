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
//! them ([`encoder`]); load the tokenizer ([`tokenize`]); take its listeners; report ready; a
//! warm spare (`zygote start --spares`) then waits for `activate` without accepting; serve
//! ([`http`], [`api`]) until the supervisor drains it or goes away.
//!
//! The zygote binary calls [`preload`] once before it forks anything: the model directory's
//! spec and the tokenizer (parsing `tokenizer.json` is most of a worker's start-up, tens of
//! milliseconds) are then already in every forked worker's memory, shared copy-on-write, as
//! gunicorn's `--preload` shares an app. Nothing there starts a thread or touches a device, so
//! the zygote stays single-threaded and CUDA-free. An exec'd worker loads them itself.

// unsafe lives in two announced leaves: `encoder::gemm` (the matrix products' raw pointers and
// the AVX2 kernel) and `encoder::cuda::launch` (kernel launches and cuBLAS calls).
#![deny(unsafe_code)]

pub mod api;
pub mod encoder;
pub mod error;
pub mod http;
pub mod spec;
pub mod tokenize;

#[cfg(test)]
mod testutil;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use zygote_runtime::backend::{self, DeviceBackend, Weights};
use zygote_runtime::{Model, Worker, WorkerError};

use tokenize::TextEncoder;

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

/// Environment variable overriding [`http::Limits::batch_wait`], in microseconds.
pub const BATCH_WAIT_ENV: &str = "ZYGOTE_EMBED_BATCH_WAIT_US";
/// The largest hold [`BATCH_WAIT_ENV`] may set: beyond, a lone slow client would cost every
/// batch more than a forward pass of one short text.
const MAX_BATCH_WAIT_US: u64 = 20_000;
/// Environment variable overriding [`ApiLimits::max_request_tokens`].
pub const MAX_REQUEST_TOKENS_ENV: &str = "ZYGOTE_EMBED_MAX_REQUEST_TOKENS";
/// Environment variable overriding [`ApiLimits::max_batch_tokens`].
pub const MAX_BATCH_TOKENS_ENV: &str = "ZYGOTE_EMBED_MAX_BATCH_TOKENS";
/// The largest word-piece budget either variable may set (a request's texts can hold no more
/// than `max_inputs` × the model's longest text anyway).
const MAX_TOKENS_SETTING: u64 = 1 << 24;

/// The HTTP limits: the defaults, with the batch hold from [`BATCH_WAIT_ENV`] when it is set to
/// a valid value (an invalid one is reported and the default kept, so a typo cannot stop every
/// worker from starting).
fn http_limits() -> http::Limits {
    let mut limits = http::Limits::default();
    if let Some(us) = env_setting(BATCH_WAIT_ENV, MAX_BATCH_WAIT_US, "microseconds") {
        limits.batch_wait = Duration::from_micros(us);
    }
    limits
}

/// The API limits: the defaults, with the word-piece budgets from [`MAX_REQUEST_TOKENS_ENV`]
/// and [`MAX_BATCH_TOKENS_ENV`] when they are set to valid values.
fn api_limits() -> ApiLimits {
    let mut limits = ApiLimits::default();
    if let Some(n) = env_setting(MAX_REQUEST_TOKENS_ENV, MAX_TOKENS_SETTING, "word pieces") {
        limits.max_request_tokens = (n as usize).max(1);
    }
    if let Some(n) = env_setting(MAX_BATCH_TOKENS_ENV, MAX_TOKENS_SETTING, "word pieces") {
        limits.max_batch_tokens = (n as usize).max(1);
    }
    limits
}

/// The value of the environment variable `name` when it is a whole number from 0 to `max`;
/// an invalid one is logged and ignored (the default stays).
fn env_setting(name: &str, max: u64, unit: &str) -> Option<u64> {
    let raw = std::env::var_os(name)?;
    let value = parse_setting(&raw, max);
    if value.is_none() {
        log::warn!(
            "{name}={raw:?} is not a whole number of {unit} from 0 to {max}; keeping the default"
        );
    }
    value
}

/// A whole number from 0 to `max`, surrounding spaces allowed.
fn parse_setting(raw: &std::ffi::OsStr, max: u64) -> Option<u64> {
    let n = raw.to_str()?.trim().parse::<u64>().ok()?;
    (n <= max).then_some(n)
}

/// The worker's life: set up, report ready, serve until drained. Returns the exit code.
pub fn serve(mut worker: Worker) -> i32 {
    let started = std::time::Instant::now();
    let (spec, tokenizer, preloaded) = match prepare(worker.model()) {
        Ok(p) => p,
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
    let mut app = match build_app_with(&spec, tokenizer, &weights) {
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
    if worker.is_spare() {
        // A warm spare: everything above is done, nothing accepted until `activate`.
        log::info!("spare: {detail} ready; waiting for activation");
        let waited = std::time::Instant::now();
        match worker.wait_activation() {
            Ok(zygote_runtime::Activation::Serve) => log::info!(
                "activated as worker {} after {} ms as a spare",
                worker.id(),
                waited.elapsed().as_millis()
            ),
            Ok(zygote_runtime::Activation::Drained) => {
                log::info!("drained as a spare, before serving");
                return EXIT_OK;
            }
            Err(WorkerError::Orphaned) => {
                log::info!("the supervisor is gone; exiting");
                return zygote_runtime::lifeline::ORPHAN_EXIT;
            }
            Err(e) => {
                log::error!("control channel: {e}");
                return EXIT_FAILURE;
            }
        }
    }
    log::info!(
        "serving {detail} on {} listener(s), weights generation {generation}; set up in {} ms \
         (tokenizer {}; host dot kernel {:?}, the widest this processor has unless {} narrows it)",
        listeners.len(),
        started.elapsed().as_millis(),
        if preloaded {
            "preloaded by the zygote"
        } else {
            "loaded here"
        },
        encoder::gemm::dot_kernel(),
        encoder::gemm::DOT_KERNEL_ENV,
    );
    match http::run(listeners, &mut worker, &mut app, &http_limits()) {
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

/// What [`preload`] prepared in the zygote, for the model file at `model_path`.
struct Preloaded {
    model_path: PathBuf,
    spec: ModelSpec,
    tokenizer: TextEncoder,
}

/// Filled in the zygote before any fork; each forked worker takes it from its own copy.
static PRELOADED: Mutex<Option<Preloaded>> = Mutex::new(None);

/// Prepares, in the zygote and before it forks, what every worker of this app would otherwise
/// build at its start: the model directory's spec, checked against the model file, and the
/// tokenizer. An error means workers of this app will refuse the model (each says why when it
/// starts); the zygote serves its other entries regardless.
pub fn preload(model: &Model) -> Result<(), EmbedError> {
    let (spec, tokenizer) = load_for(model)?;
    let mut slot = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    *slot = Some(Preloaded {
        model_path: model.path().to_path_buf(),
        spec,
        tokenizer,
    });
    Ok(())
}

/// The spec and tokenizer for `model`: the preloaded ones when the zygote prepared them for this
/// same model file, else loaded now. The flag says which.
fn prepare(model: &Model) -> Result<(ModelSpec, TextEncoder, bool), EmbedError> {
    let taken = PRELOADED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .filter(|p| p.model_path == model.path());
    match taken {
        Some(p) => Ok((p.spec, p.tokenizer, true)),
        None => load_for(model).map(|(spec, tokenizer)| (spec, tokenizer, false)),
    }
}

/// Reads the model directory beside `model`'s file, checks the file against it, and loads the
/// tokenizer.
fn load_for(model: &Model) -> Result<(ModelSpec, TextEncoder), EmbedError> {
    let spec = ModelSpec::load(model_dir(model.path()))?;
    spec::check_model_file(&spec.config, model)?;
    let tokenizer = TextEncoder::load(&spec)?;
    Ok((spec, tokenizer))
}

/// Builds the app over imported weights: tokenizer and the backend's encoder, which borrows
/// the weights.
pub fn build_app<'w>(spec: &ModelSpec, weights: &'w Weights) -> Result<App<'w>, EmbedError> {
    build_app_with(spec, TextEncoder::load(spec)?, weights)
}

/// [`build_app`] with a tokenizer already loaded.
pub fn build_app_with<'w>(
    spec: &ModelSpec,
    tokenizer: TextEncoder,
    weights: &'w Weights,
) -> Result<App<'w>, EmbedError> {
    let encoder = encoder::for_weights(spec, weights)?;
    Ok(App::new(encoder, tokenizer, spec, api_limits()))
}

/// The host weights of a model file without any other process: the owner's export and the
/// worker's import (with its manifest and digest checks) done in this one process. This is the
/// production path minus the sockets, for tests and benchmarks.
pub fn import_host_weights(model_file: &Path) -> Result<(Model, Weights), EmbedError> {
    import_host_weights_as(model_file, backend::HostWeightsForm::F32)
}

/// [`import_host_weights`] with the compute copy in `form` (what `zygote start --host-weights`
/// asks the owner for).
pub fn import_host_weights_as(
    model_file: &Path,
    form: backend::HostWeightsForm,
) -> Result<(Model, Weights), EmbedError> {
    let model = Model::load(model_file)?;
    let export = backend::host::HostBackend::new(form).export(&model, 1)?;
    let weights = backend::import(export.manifest, export.fds, &model)?;
    Ok((model, weights))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn settings_take_whole_numbers_within_the_bound() {
        let max = MAX_BATCH_WAIT_US;
        assert_eq!(parse_setting(OsStr::new("0"), max), Some(0));
        assert_eq!(parse_setting(OsStr::new(" 250 "), max), Some(250));
        assert_eq!(parse_setting(OsStr::new("20000"), max), Some(20_000));
        for bad in ["20001", "-1", "1ms", "", "0.5"] {
            assert_eq!(parse_setting(OsStr::new(bad), max), None, "{bad:?}");
        }
    }
}
