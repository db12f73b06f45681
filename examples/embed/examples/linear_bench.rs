//! Throughput of one linear layer `y = x · Wᵀ + b` on one core, by kernel: the packing-free
//! tile of `encoder::gemm::linear_rows` against the `gemm` crate, for the shapes of
//! all-MiniLM-L6-v2 and the row counts of one to a few texts. The weights are either one
//! matrix used again and again (`hot`, in cache) or a pool of 64 MiB of distinct matrices
//! taken in turn (`cold`, from memory, as in a forward pass whose 42 MiB of encoder weights do
//! not fit the last-level cache). The 384 × 64 shape, whose weight fits L2, shows the tile's
//! ceiling. Prints GFLOP/s: the tile over f32 weights, over the same weights in f16 (`tile16`,
//! half the bytes, widened as loaded), `encoder::gemm::linear_cols` over both (`cols`,
//! `cols16`: the token-vector kernel for batches, AVX-512 only, a plain loop elsewhere), and the
//! `gemm` crate (f32).
//!
//! `cargo run --release -p zygote-embed --example linear_bench [SECONDS_PER_CASE] [CASE]`
//! (CASE, e.g. `17/384/1536/cold`, runs one case only, for profiling).

#![deny(unsafe_code)]

use std::time::{Duration, Instant};

use zygote_embed::encoder::gemm::{
    amx_fits, bf16, f16, linear_amx, linear_cols, linear_rows, matmul, Mat, MatMut,
};

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("seconds"))
        .unwrap_or(0.5);
    let only = std::env::args().nth(2);
    println!(
        "{:>5} {:>5} {:>5} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "rows", "in", "out", "cache", "tile", "tile16", "cols", "cols16", "gemm", "amx16"
    );
    for (inp, out) in [(384, 64), (384, 384), (384, 1536), (1536, 384)] {
        let per = inp * out;
        let pool = (64 << 20) / 4 / per;
        let w: Vec<f32> = (0..pool * per)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let b = vec![0.1f32; out];
        for rows in [4usize, 8, 12, 13, 17, 24, 36, 48, 64, 96, 160] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 31) % 97) as f32 * 1e-2)
                .collect();
            let mut y = vec![0.0f32; rows * out];
            for (cache, mats) in [("hot", 1usize), ("cold", pool)] {
                if only
                    .as_ref()
                    .is_some_and(|o| *o != format!("{rows}/{inp}/{out}/{cache}"))
                {
                    continue;
                }
                let flops = 2.0 * (rows * inp * out) as f64;
                let run = |f: &mut dyn FnMut(usize)| {
                    let budget = Duration::from_secs_f64(seconds);
                    let start = Instant::now();
                    let mut calls = 0usize;
                    while start.elapsed() < budget {
                        f((calls % mats) * per);
                        calls += 1;
                    }
                    calls as f64 * flops / start.elapsed().as_secs_f64() / 1e9
                };
                let tile = run(&mut |at| linear_rows(&x, rows, &w[at..][..per], &b, &mut y));
                let tile16 = run(&mut |at| linear_rows(&x, rows, &w16[at..][..per], &b, &mut y));
                let mut wide = Vec::new();
                let cols =
                    run(&mut |at| linear_cols(&x, rows, &w[at..][..per], &b, &mut y, &mut wide));
                let cols16 =
                    run(&mut |at| linear_cols(&x, rows, &w16[at..][..per], &b, &mut y, &mut wide));
                let crate_ = run(&mut |at| {
                    let wm = &w[at..][..per];
                    for (line, &bias) in y.chunks_exact_mut(rows).zip(&b) {
                        line.fill(bias);
                    }
                    matmul(
                        MatMut::col_major(&mut y, rows, out),
                        Mat::col_major(&x, rows, inp),
                        Mat::row_major(wm, out, inp).t(),
                        1.0,
                        true,
                    );
                });
                let mut pairs = Vec::new();
                let amx = if amx_fits(inp, out) {
                    let gflops = run(&mut |at| {
                        linear_amx(&x, rows, &wb16[at..][..per], &b, &mut y, &mut pairs)
                    });
                    format!("{gflops:>10.1}")
                } else {
                    format!("{:>10}", "-")
                };
                println!(
                    "{rows:>5} {inp:>5} {out:>5} {cache:>5} {tile:>10.1} {tile16:>10.1} {cols:>10.1} {cols16:>10.1} {crate_:>10.1} {amx}"
                );
            }
        }
    }
}
