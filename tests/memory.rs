//! The weights are in memory once however many workers use them: the combined PSS of the
//! weights across four workers that each read every page is about one copy, while their
//! combined RSS counts it four times.
//!
//! The `probe` entry imports the owner's weights and reads one byte of every page. Two models:
//! an f16 one, whose f32 compute copy the owner builds in its own memfd (`zygote-weights`), and
//! an f32 one, whose compute copy is the zygote's model memfd itself (`zygote-model`); and the
//! f32 one again with `--host-weights f16`, whose f16 copy (half the file) the owner builds. A
//! last test measures the example app on the reference model after every worker served a
//! request.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{http, mapping_kib, procs_of, Service, ServiceOptions, START_TIMEOUT};
use zygote_runtime::model::Dtype;

/// The files `pid` maps whose name contains `needle` (memfds, here): inode → (name, size in
/// KiB). Read through `/proc/PID/map_files`, so a memfd whose fd was closed after mapping it
/// still counts.
fn mapped_files(pid: i32, needle: &str) -> BTreeMap<u64, (String, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("a worker's maps");
    maps.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let meta = std::fs::metadata(format!("/proc/{pid}/map_files/{range}")).ok()?;
            let name = l.split_whitespace().skip(5).collect::<Vec<_>>().join(" ");
            Some((meta.ino(), (name, meta.len().div_ceil(1024))))
        })
        .collect()
}

/// What the weights cost across a service: one copy (the memfds' sizes), and the PSS and RSS
/// of their mappings summed over every process of the service.
#[derive(Debug)]
struct Sharing {
    one_copy_kib: u64,
    pss_kib: u64,
    worker_rss_kib: u64,
    per_process: Vec<(String, i32, u64, u64)>,
}

fn measure(svc: &Service, needle: &str) -> Sharing {
    let s = svc.status();
    let workers = procs_of(&s, "worker");
    let mut copies = BTreeMap::new();
    for w in &workers {
        copies.extend(mapped_files(w.pid, needle));
    }
    assert!(
        !copies.is_empty(),
        "the workers map a memfd named like {needle:?}"
    );
    let one_copy_kib = copies.values().map(|(_, kib)| kib).sum();
    let mut sharing = Sharing {
        one_copy_kib,
        pss_kib: 0,
        worker_rss_kib: 0,
        per_process: Vec::new(),
    };
    for p in &s.processes {
        let (rss, pss, _) = mapping_kib(p.pid, needle)
            .unwrap_or_else(|| panic!("reading the smaps of {} (pid {})", p.role, p.pid));
        sharing.pss_kib += pss;
        if p.role == "worker" {
            sharing.worker_rss_kib += rss;
        }
        sharing.per_process.push((p.role.clone(), p.pid, pss, rss));
    }
    sharing
}

/// Starts 4 `probe` workers on an 8 MiB model of `dtype` (`zygote start` given `args` too)
/// and checks the sharing of the memfd named `needle`.
fn four_probes_share_one_copy(dtype: Dtype, needle: &str, args: &[&str]) -> Sharing {
    let dir = common::TempDir::new("mem");
    let model = common::synthetic_model(dir.path(), 8 << 20, dtype);
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 4,
        entry: Some("probe".into()),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..ServiceOptions::default()
    });
    let m = measure(&svc, needle);
    eprintln!("{needle}: {m:?}");
    // 8 MiB of f16 or f32 weights: at least 8 MiB as f32, at least 4 MiB in the f16 form.
    let least = if args.contains(&"f16") {
        (4 << 10) - 32
    } else {
        8 << 10
    };
    assert!(
        m.one_copy_kib >= least,
        "the weights are at least {least} KiB: {m:?}"
    );
    assert!(
        m.worker_rss_kib >= 3 * m.one_copy_kib,
        "each of the 4 workers has the weights resident (RSS sum ≥ 3 copies): {m:?}"
    );
    assert!(
        m.pss_kib * 4 <= m.one_copy_kib * 5,
        "the PSS of the weights summed over every process is at most 1.25 copies: {m:?}"
    );
    assert!(
        m.pss_kib * 4 >= m.one_copy_kib * 3,
        "the PSS sum counts the pages the workers read (at least 0.75 copies): {m:?}"
    );
    m
}

#[test]
fn four_workers_share_one_compute_copy_built_by_the_owner() {
    four_probes_share_one_copy(Dtype::F16, "/memfd:zygote-weights", &[]);
}

#[test]
fn four_workers_share_the_model_memfd_when_it_is_the_compute_copy() {
    four_probes_share_one_copy(Dtype::F32, "/memfd:zygote-model", &[]);
}

#[test]
fn four_workers_share_one_f16_copy_with_host_weights_f16() {
    // The f32 model's matrices in f16: a copy of half the file, built by the owner, shared.
    let m = four_probes_share_one_copy(
        Dtype::F32,
        "/memfd:zygote-weights",
        &["--host-weights", "f16"],
    );
    assert!(
        m.one_copy_kib < 5 << 10,
        "the f16 copy of an 8 MiB f32 model is about 4 MiB: {m:?}"
    );
}

#[test]
fn four_app_workers_share_one_copy_of_the_reference_model() {
    let Some(model) =
        common::reference_model("four_app_workers_share_one_copy_of_the_reference_model")
    else {
        return;
    };
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 4,
        entry: Some("app".into()),
        ..ServiceOptions::default()
    });
    let addr = svc.addr();
    // Requests until every worker reports one served (heartbeats carry the count).
    let deadline = Instant::now() + START_TIMEOUT;
    let mut sent = 0;
    loop {
        let s = svc.status();
        let workers = procs_of(&s, "worker");
        if workers.iter().all(|w| w.served.unwrap_or(0) >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every worker served a request within {START_TIMEOUT:?} ({sent} sent): {workers:?}"
        );
        let r = http(
            addr,
            "POST",
            "/embed",
            Some(r#"{"input": ["the weights are shared", "by every worker"]}"#),
            Duration::from_secs(30),
        )
        .expect("POST /embed");
        assert_eq!(r.status, 200, "POST /embed answers 200: {}", r.body);
        sent += 1;
    }
    let m = measure(&svc, "/memfd:zygote-");
    assert!(
        m.pss_kib * 4 <= m.one_copy_kib * 5,
        "the PSS of the weights summed over every process is at most 1.25 copies: {m:?}"
    );
    // A request reads every layer but only the embedding rows of its tokens, so a worker
    // has part of the weights resident, and the zygote may hold pages no worker touched.
    // Among the workers, each page they use is shared by all of them.
    let workers: Vec<&(String, i32, u64, u64)> =
        m.per_process.iter().filter(|p| p.0 == "worker").collect();
    for (_, pid, _, rss) in &workers {
        assert!(
            rss * 10 >= m.one_copy_kib,
            "worker {pid} has at least a tenth of the weights resident after a request: {m:?}"
        );
    }
    let worker_pss: u64 = workers.iter().map(|p| p.2).sum();
    assert!(
        m.worker_rss_kib >= 3 * worker_pss,
        "the workers' pages of the weights are shared among them (their RSS sum ≥ 3 × their \
         PSS sum): {m:?}"
    );
}
