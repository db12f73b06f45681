//! Throughput of the host forward pass, single-threaded: sentences per second for short
//! (about 10 word pieces) and longer (about 60) texts, one, two, four and eight texts per call,
//! and for `mix`, the served benchmark's sentences (`scripts/bench-embed/sentences.txt`) taken in
//! turn. Tokenisation is included, as in a request. Besides the wall-clock rate it prints the
//! texts per second of this thread's CPU time (`/proc/thread-self/schedstat`): on a machine
//! shared with other work the wall-clock rate counts the time the thread waited for a core,
//! the CPU-time rate does not, so it is the one to compare across runs of a busy machine.
//!
//! `cargo run --release -p zygote-embed --example forward_bench [--host-weights f32|f16|bf16]
//! [MODEL_DIR] [SECONDS] [CASE]` (default model directory: `models/all-MiniLM-L6-v2`, default
//! 3 s per case; CASE, e.g. `short/1`, runs one case only, for profiling; `--host-weights f16`
//! builds the compute copy as `zygote start --host-weights f16` does, matrices in f16, and the
//! first line printed says which form ran (`bf16`: matrices in bf16, on the AMX tile unit where
//! the processor has one); `--host-weights f32,f16` measures both, in 100 ms slices taken in
//! turn, one line per form).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use zygote_embed::{build_app, import_host_weights_as, ModelSpec};
use zygote_runtime::backend::HostWeightsForm;

const SHORT: &str = "The quick brown fox jumps over the lazy dog.";
const LONG: &str =
    "Sentence embeddings map a text to a vector, so that texts with similar meanings \
    end up close together; search engines, clustering and deduplication all rely on them, and a \
    small model such as this one computes them quickly on an ordinary processor core.";

fn main() -> anyhow::Result<()> {
    let mut all: Vec<String> = std::env::args().skip(1).collect();
    let mut forms = vec![HostWeightsForm::F32];
    if let Some(at) = all.iter().position(|a| a == "--host-weights") {
        let value = all
            .get(at + 1)
            .ok_or_else(|| anyhow::anyhow!("--host-weights needs a value"))?;
        forms = value
            .split(',')
            .map(|f| f.parse().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?;
        all.drain(at..at + 2);
    }
    let mut args = all.into_iter();
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2")
    });
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let only = args.next();
    let spec = ModelSpec::load(&dir)?;
    let weights = forms
        .iter()
        .map(|&form| import_host_weights_as(&dir.join("model.safetensors"), form))
        .collect::<Result<Vec<_>, _>>()?;
    let mut apps = weights
        .iter()
        .map(|(_model, w)| build_app(&spec, w))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = forms.iter().map(|f| f.to_string()).collect();
    println!("host weights: {}", names.join(","));

    println!(
        "{:<8} {:>6} {:>7} {:>12} {:>12} {:>12} {:>5}",
        "text", "tokens", "batch", "sentences/s", "ms/call", "per cpu-s", "form"
    );
    let mix_file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-embed/sentences.txt");
    let mix_text = std::fs::read_to_string(&mix_file)?;
    let mix: Vec<&str> = mix_text.lines().filter(|l| !l.trim().is_empty()).collect();
    let cases: [(&str, Vec<&str>); 3] =
        [("short", vec![SHORT]), ("long", vec![LONG]), ("mix", mix)];
    for (label, pool) in &cases {
        for batch in [1usize, 2, 4, 8] {
            if only
                .as_ref()
                .is_some_and(|o| *o != format!("{label}/{batch}"))
            {
                continue;
            }
            // Each call takes the next `batch` texts of the pool, cycling (each form its own).
            let take = |next: &mut usize| {
                let texts: Vec<&str> = (0..batch).map(|i| pool[(*next + i) % pool.len()]).collect();
                *next = (*next + batch) % pool.len();
                texts
            };
            let mut runs = vec![Run::default(); apps.len()];
            // Warm the buffers and caches first (a whole cycle of the pool).
            for (app, run) in apps.iter_mut().zip(&mut runs) {
                for _ in 0..pool.len().max(3) {
                    app.embed(&take(&mut run.next))?;
                }
            }
            // With several forms, slices of SLICE each in turn, so that a drift of the
            // machine's speed weighs on each alike; with one, a single slice.
            let slice = if apps.len() > 1 {
                SLICE
            } else {
                Duration::from_secs_f64(seconds)
            };
            let budget = Duration::from_secs_f64(seconds);
            while runs.iter().any(|r| r.wall < budget) {
                for (app, run) in apps.iter_mut().zip(&mut runs) {
                    let start = Instant::now();
                    let cpu_start = thread_cpu();
                    while start.elapsed() < slice {
                        run.tokens += app.embed(&take(&mut run.next))?.1;
                        run.calls += 1;
                    }
                    run.wall += start.elapsed();
                    run.cpu = run
                        .cpu
                        .zip(cpu_start.zip(thread_cpu()))
                        .map(|(c, (a, b))| c + b.saturating_sub(a));
                }
            }
            for (run, form) in runs.iter().zip(&names) {
                let elapsed = run.wall.as_secs_f64();
                let texts = run.calls as usize * batch;
                let per_cpu = run.cpu.map_or(f64::NAN, |c| texts as f64 / c.as_secs_f64());
                println!(
                    "{label:<8} {:>6} {batch:>7} {:>12.1} {:>12.2} {per_cpu:>12.1} {form:>5}",
                    run.tokens / texts,
                    texts as f64 / elapsed,
                    elapsed * 1e3 / run.calls as f64
                );
            }
        }
    }
    Ok(())
}

/// The slice each form runs in turn when several are measured.
const SLICE: Duration = Duration::from_millis(100);

/// What one form's app did in one case.
#[derive(Debug, Clone)]
struct Run {
    next: usize,
    calls: u64,
    tokens: usize,
    wall: Duration,
    cpu: Option<Duration>,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            next: 0,
            calls: 0,
            tokens: 0,
            wall: Duration::ZERO,
            cpu: Some(Duration::ZERO),
        }
    }
}

/// This thread's time on a CPU so far (the first field of `/proc/thread-self/schedstat`, in
/// nanoseconds), where the kernel reports it.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}
