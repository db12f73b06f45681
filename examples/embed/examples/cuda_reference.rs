//! The CUDA encoder against sentence-transformers, on a GPU: built here, run by
//! `scripts/gpu-check.sh` on a machine that has one (and no Rust).
//!
//! ```text
//! cargo build --release --example cuda_reference -p zygote-embed
//! target/release/examples/cuda_reference [--model DIR] [--fixture JSON] [--device N]
//!                                        [--min-cosine C]
//! ```
//!
//! It goes through the production path in one process: the model file is loaded, the CUDA
//! backend exports it (VMM arenas, as an owner does) and the export is imported as a worker
//! does (manifest, device UUID and digest checked); the app is built over the imported
//! weights, so its encoder is the CUDA one. Every fixture sentence is then embedded alone and
//! all of them in batches of 16, and the program prints the minimum cosine to the fixture's
//! vectors (and to the host encoder's), the word-piece counts that differ, and the time per
//! request. Exit status: 0 when every cosine is at least `--min-cosine` (default 0.9999), 1
//! when one is not, 2 when the check could not run; 0 with a message when this machine has no
//! usable CUDA (nothing to check).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use serde::Deserialize;
use zygote_embed::{build_app, encoder, import_host_weights, spec, ModelSpec};
use zygote_runtime::backend::cuda::{self, CudaBackend};
use zygote_runtime::backend::{self, BackendError, DeviceBackend, IpcChoice};
use zygote_runtime::Model;

#[derive(Deserialize)]
struct Fixture {
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
    num_tokens: Vec<usize>,
}

struct Options {
    model: PathBuf,
    fixture: PathBuf,
    device: u32,
    min_cosine: f64,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        model: PathBuf::from("models/all-MiniLM-L6-v2"),
        fixture: PathBuf::from("examples/embed/tests/fixtures/minilm_reference.json"),
        device: 0,
        min_cosine: 0.9999,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = value()?.into(),
            "--fixture" => o.fixture = value()?.into(),
            "--device" => o.device = value()?.parse().map_err(|e| format!("--device: {e}"))?,
            "--min-cosine" => {
                o.min_cosine = value()?.parse().map_err(|e| format!("--min-cosine: {e}"))?
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The smallest cosine of `got` (vectors of `dim`, text after text) to `want`, and its index.
fn worst(got: &[f32], want: &[Vec<f32>], dim: usize) -> (f64, usize) {
    got.chunks_exact(dim)
        .zip(want)
        .map(|(g, w)| cosine(g, w))
        .enumerate()
        .fold(
            (f64::INFINITY, 0),
            |acc, (i, c)| {
                if c < acc.0 {
                    (c, i)
                } else {
                    acc
                }
            },
        )
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cuda_reference: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let o = options()?;
    match cuda::probe() {
        Ok(s) => println!(
            "CUDA driver {} sees {} device(s); using device {}",
            s.driver_version,
            s.devices.len(),
            o.device
        ),
        Err(BackendError::CudaUnavailable(why)) => {
            println!("CUDA is unavailable ({why}): nothing to check");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(format!("probing CUDA: {e}")),
    }
    encoder::cuda::launch::libraries_present().map_err(|e| e.to_string())?;

    let text =
        std::fs::read_to_string(&o.fixture).map_err(|e| format!("{}: {e}", o.fixture.display()))?;
    let fx: Fixture =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", o.fixture.display()))?;
    let model_file = o.model.join("model.safetensors");
    let spec = ModelSpec::load(&o.model).map_err(|e| e.to_string())?;
    let model = Model::load(&model_file).map_err(|e| e.to_string())?;
    spec::check_model_file(&spec.config, &model).map_err(|e| e.to_string())?;

    // The owner's side, then the worker's, in this one process (VMM: an export can be
    // imported by the process that made it; a legacy IPC handle cannot).
    let mut owner = CudaBackend::new(o.device, IpcChoice::Vmm).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let export = owner
        .export(&model, 1)
        .map_err(|e| format!("export: {e}"))?;
    let export_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    let weights =
        backend::import(export.manifest, export.fds, &model).map_err(|e| format!("import: {e}"))?;
    println!(
        "exported in {export_ms:.0} ms, imported in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let t0 = Instant::now();
    let mut app = build_app(&spec, &weights).map_err(|e| format!("CUDA app: {e}"))?;
    println!(
        "CUDA encoder ready in {:.0} ms (NVRTC compile included)",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let dim = app.dim();

    // One sentence per request, as the fixture was made.
    let mut alone = Vec::with_capacity(fx.sentences.len() * dim);
    let mut token_mismatches = Vec::new();
    let t0 = Instant::now();
    for (i, s) in fx.sentences.iter().enumerate() {
        let (v, tokens) = app.embed(&[s]).map_err(|e| format!("sentence {i}: {e}"))?;
        alone.extend_from_slice(v);
        if fx.num_tokens.get(i) != Some(&tokens) {
            token_mismatches.push(i);
        }
    }
    let alone_ms = t0.elapsed().as_secs_f64() * 1e3 / fx.sentences.len().max(1) as f64;

    // Batches of 16: the packed path, attention within each text.
    let mut batched = Vec::with_capacity(alone.len());
    let t0 = Instant::now();
    for chunk in fx.sentences.chunks(16) {
        let (v, _) = app.embed(chunk).map_err(|e| format!("batch: {e}"))?;
        batched.extend_from_slice(v);
    }
    let batch_ms = t0.elapsed().as_secs_f64() * 1e3 / fx.sentences.len().div_ceil(16) as f64;

    // The host encoder on the same sentences, batched.
    let (_host_model, host_weights) =
        import_host_weights(&model_file).map_err(|e| format!("host weights: {e}"))?;
    let mut host_app = build_app(&spec, &host_weights).map_err(|e| format!("host app: {e}"))?;
    let mut host = Vec::with_capacity(alone.len());
    for chunk in fx.sentences.chunks(16) {
        let (v, _) = host_app.embed(chunk).map_err(|e| format!("host: {e}"))?;
        host.extend_from_slice(v);
    }
    let host_vecs: Vec<Vec<f32>> = host.chunks_exact(dim).map(<[f32]>::to_vec).collect();

    let (c_alone, i_alone) = worst(&alone, &fx.embeddings, dim);
    let (c_batched, i_batched) = worst(&batched, &fx.embeddings, dim);
    let (c_host, i_host) = worst(&batched, &host_vecs, dim);
    println!("sentences: {}", fx.sentences.len());
    println!("min cosine to the fixture, one per request: {c_alone:.6} (sentence {i_alone})");
    println!("min cosine to the fixture, batches of 16:   {c_batched:.6} (sentence {i_batched})");
    println!("min cosine to the host encoder, batched:    {c_host:.6} (sentence {i_host})");
    println!("time per request: {alone_ms:.2} ms alone, {batch_ms:.2} ms per batch of 16");
    if !token_mismatches.is_empty() {
        println!("word-piece counts differ from the fixture for sentences {token_mismatches:?}");
    }
    let ok = token_mismatches.is_empty()
        && alone.len() == fx.embeddings.len() * dim
        && batched.len() == alone.len()
        && [c_alone, c_batched, c_host]
            .iter()
            .all(|&c| c >= o.min_cosine);
    println!(
        "cuda_reference: {} (threshold {})",
        if ok { "PASS" } else { "FAIL" },
        o.min_cosine
    );
    drop(app);
    drop(weights);
    drop(owner);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
