//! Spawn latency and memory benchmark (issue 2 item 11). Prints figures; asserts nothing.
//!
//! ```text
//! cargo bench --bench spawn -- [--iterations N] [--sizes 16M,1G] [--workers 1,4,8]
//! ```
//!
//! For each model size it writes a synthetic f32 safetensors model, starts a bare zygote
//! (`zygote __zygote`, the release binary) and measures, as a client of the zygote socket,
//! the time from sending a spawn request to receiving the child's `ready` on its control
//! channel — for the native `idle` entry (fork only) and for the exec entry (fork + exec of
//! `zygote __attach-idle`, which attaches through the worker API). It then starts an owner and
//! 1, 4 and 8 `probe` workers (each reads every page of the weights) on the largest model and
//! sums the PSS of every process: zygote, owner and workers.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zygote_runtime::client::{SpawnFds, ZygoteClient};
use zygote_runtime::model::Dtype;
use zygote_runtime::protocol::frame;
use zygote_runtime::protocol::{ChildMessage, Response};

struct Zygote {
    child: Child,
    client: ZygoteClient,
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.client.shutdown();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ZYGOTE_BIN") {
        return PathBuf::from(p);
    }
    // target/release/deps/spawn-HASH -> target/release/zygote
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("zygote")
}

fn start_zygote(bin: &Path, dir: &Path, model: &Path) -> Zygote {
    let mut child = Command::new(bin)
        .arg("__zygote")
        .arg("--runtime-dir")
        .arg(dir)
        .arg("--model")
        .arg(model)
        .arg("--backend")
        .arg("host")
        .arg("--")
        .arg(bin)
        .arg("__attach-idle")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("ZYGOTE_LOG", "warn")
        .spawn()
        .expect("starting the zygote");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("reading ready");
    assert!(
        line.starts_with("ready "),
        "the zygote did not start: {line:?}"
    );
    let client = ZygoteClient::connect(&dir.join("zygote.sock"), "bench").expect("connecting");
    Zygote { child, client }
}

struct Running {
    pid: i32,
    control: UnixStream,
}

fn spawn_ready(z: &mut Zygote, entry: &str, worker: u32, args: &[String]) -> (Duration, Running) {
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
    let stderr = std::io::stderr();
    let fds = SpawnFds {
        stdin: devnull.as_fd(),
        stdout: devnull.as_fd(),
        stderr: stderr.as_fd(),
        control: theirs.as_fd(),
        listeners: Vec::new(),
    };
    let t0 = Instant::now();
    let spawned = z
        .client
        .spawn(entry, zygote_runtime::WorkerId(worker), args, None, &fds)
        .expect("spawn");
    drop(theirs);
    let mut control = mine;
    loop {
        match frame::read_frame::<_, ChildMessage>(&mut control, Some(Duration::from_secs(120))) {
            Ok(Some(ChildMessage::Ready { .. })) => break,
            Ok(Some(_)) => continue,
            other => panic!(
                "{entry} (pid {}) did not become ready: {other:?}",
                spawned.pid
            ),
        }
    }
    (
        t0.elapsed(),
        Running {
            pid: spawned.pid,
            control,
        },
    )
}

/// Closes the control channel (the child ends) and waits for its `exited`.
fn finish(z: &mut Zygote, r: Running) {
    drop(r.control);
    loop {
        match z.client.next_event(Some(Duration::from_secs(10))) {
            Ok(Response::Exited { pid, .. }) if pid == r.pid => return,
            Ok(_) => {}
            Err(e) => panic!("waiting for pid {} to exit: {e}", r.pid),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn parse_size(s: &str) -> u64 {
    let (n, mult) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    n.parse::<u64>().expect("size") * mult
}

fn main() {
    let mut iterations = 200usize;
    let mut sizes = vec!["16M".to_string(), "1G".to_string()];
    let mut worker_counts = vec![1u32, 4, 8];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--iterations" => iterations = it.next().expect("value").parse().expect("number"),
            "--sizes" => {
                sizes = it
                    .next()
                    .expect("value")
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "--workers" => {
                worker_counts = it
                    .next()
                    .expect("value")
                    .split(',')
                    .map(|s| s.parse().expect("number"))
                    .collect()
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let bin = binary();
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release first",
        bin.display()
    );
    let root = std::env::temp_dir().join(format!("zygote-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("bench dir");
    println!("spawn latency: request sent -> ready received, {iterations} spawns per row (after 10 warm-up)");
    println!("| model | entry | p50 | p99 | mean |");
    println!("|---|---|---|---|---|");
    let mut last_model = None;
    for size in &sizes {
        let bytes = parse_size(size);
        let model = root.join(format!("model-{size}.safetensors"));
        zygote_runtime::synth::write_synthetic(&model, bytes, Dtype::F32, 42)
            .expect("writing the model");
        let dir = root.join(format!("run-{size}"));
        let mut z = start_zygote(&bin, &dir, &model);
        for entry in ["idle", "exec"] {
            let mut times = Vec::with_capacity(iterations);
            for i in 0..iterations + 10 {
                let (t, r) = spawn_ready(&mut z, entry, 0, &[]);
                if i >= 10 {
                    times.push(t);
                }
                finish(&mut z, r);
            }
            times.sort();
            let mean = times.iter().sum::<Duration>() / times.len() as u32;
            println!(
                "| {size} | {} | {:.3} ms | {:.3} ms | {:.3} ms |",
                if entry == "idle" {
                    "native (idle)"
                } else {
                    "exec (__attach-idle)"
                },
                percentile(&times, 0.5).as_secs_f64() * 1e3,
                percentile(&times, 0.99).as_secs_f64() * 1e3,
                mean.as_secs_f64() * 1e3
            );
        }
        drop(z);
        last_model = Some((size.clone(), model));
    }
    let Some((size, model)) = last_model else {
        return;
    };
    println!();
    println!(
        "memory: owner + N probe workers (each reads every page of the weights), {size} f32 model"
    );
    println!("| workers | total PSS | total RSS | PSS / model size |");
    println!("|---|---|---|---|");
    let model_bytes = std::fs::metadata(&model).expect("model").len();
    for &n in &worker_counts {
        let dir = root.join(format!("pss-{n}"));
        let mut z = start_zygote(&bin, &dir, &model);
        let owner_args: Vec<String> = ["--backend", "host", "--generation", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (_, owner) = spawn_ready(&mut z, "owner", 0, &owner_args);
        let workers: Vec<Running> = (0..n)
            .map(|w| spawn_ready(&mut z, "probe", w, &[]).1)
            .collect();
        let zygote_pid = z.child.id() as i32;
        let pids: Vec<i32> = [zygote_pid, owner.pid]
            .into_iter()
            .chain(workers.iter().map(|w| w.pid))
            .collect();
        let (mut pss, mut rss) = (0u64, 0u64);
        for pid in &pids {
            let m = zygote_runtime::procfs::memory(*pid).expect("smaps_rollup");
            pss += m.pss_kib;
            rss += m.rss_kib;
        }
        println!(
            "| {n} | {:.1} MiB | {:.1} MiB | {:.2} |",
            pss as f64 / 1024.0,
            rss as f64 / 1024.0,
            pss as f64 * 1024.0 / model_bytes as f64
        );
        for w in workers {
            finish(&mut z, w);
        }
        finish(&mut z, owner);
    }
    let _ = std::fs::remove_dir_all(&root);
}
