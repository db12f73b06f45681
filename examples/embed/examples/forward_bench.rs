//! Throughput of the host forward pass, single-threaded: sentences per second for short
//! (about 10 word pieces) and longer (about 60) texts, one, two, four and eight texts per call,
//! and for `mix`, the served benchmark's sentences (`scripts/bench-embed/sentences.txt`) taken in
//! turn. Tokenisation is included, as in a request. Besides the wall-clock rate it prints the
//! texts per second of this thread's CPU time (`/proc/thread-self/schedstat`): on a machine
//! shared with other work the wall-clock rate counts the time the thread waited for a core,
//! the CPU-time rate does not, so it is the one to compare across runs of a busy machine.
//!
//! `cargo run --release -p zygote-embed --example forward_bench [MODEL_DIR] [SECONDS] [CASE]`
//! (default model directory: `models/all-MiniLM-L6-v2`, default 3 s per case; CASE, e.g.
//! `short/1`, runs one case only, for profiling).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use zygote_embed::{build_app, import_host_weights, ModelSpec};

const SHORT: &str = "The quick brown fox jumps over the lazy dog.";
const LONG: &str =
    "Sentence embeddings map a text to a vector, so that texts with similar meanings \
    end up close together; search engines, clustering and deduplication all rely on them, and a \
    small model such as this one computes them quickly on an ordinary processor core.";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2")
    });
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let only = args.next();
    let spec = ModelSpec::load(&dir)?;
    let (_model, weights) = import_host_weights(&dir.join("model.safetensors"))?;
    let mut app = build_app(&spec, &weights)?;

    println!(
        "{:<8} {:>6} {:>7} {:>12} {:>12} {:>12}",
        "text", "tokens", "batch", "sentences/s", "ms/call", "per cpu-s"
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
            // Each call takes the next `batch` texts of the pool, cycling.
            let mut next = 0usize;
            let mut take = || {
                let texts: Vec<&str> = (0..batch).map(|i| pool[(next + i) % pool.len()]).collect();
                next = (next + batch) % pool.len();
                texts
            };
            // Warm the buffers and caches first (a whole cycle of the pool).
            for _ in 0..pool.len().max(3) {
                app.embed(&take())?;
            }
            let budget = Duration::from_secs_f64(seconds);
            let start = Instant::now();
            let cpu_start = thread_cpu();
            let (mut calls, mut tokens) = (0u64, 0usize);
            while start.elapsed() < budget {
                tokens += app.embed(&take())?.1;
                calls += 1;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let cpu = cpu_start
                .zip(thread_cpu())
                .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
            let texts = calls as usize * batch;
            let per_cpu = cpu.map_or(f64::NAN, |c| texts as f64 / c);
            println!(
                "{label:<8} {:>6} {batch:>7} {:>12.1} {:>12.2} {per_cpu:>12.1}",
                tokens / texts,
                texts as f64 / elapsed,
                elapsed * 1e3 / calls as f64
            );
        }
    }
    Ok(())
}

/// This thread's time on a CPU so far (the first field of `/proc/thread-self/schedstat`, in
/// nanoseconds), where the kernel reports it.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}
