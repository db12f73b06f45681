//! `zygote reload --model PATH`: a new zygote loads and validates the file, a new owner
//! generation exports it, the workers roll onto it, and the old model's memory goes with the
//! last process that mapped it; a file the new zygote refuses leaves the old model serving,
//! with the reason shown by `reload` and by `zygote status`.

mod common;

use std::collections::BTreeSet;

use common::{procs_of, Service, ServiceOptions, TempDir, START_TIMEOUT};
use zygote_runtime::model::Dtype;

/// `zygote reload --model MODEL --runtime-dir DIR`: success and output.
fn reload(svc: &Service, model: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(common::BIN)
        .arg("reload")
        .arg("--model")
        .arg(model)
        .arg("--runtime-dir")
        .arg(&svc.runtime_dir)
        .output()
        .expect("running zygote reload");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The inodes of the model memfds (`/memfd:zygote-model`) the service's processes map.
fn model_inodes(svc: &Service) -> BTreeSet<u64> {
    let s = svc.status();
    s.processes
        .iter()
        .filter(|p| p.pid > 0)
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/maps", p.pid)).ok())
        .flat_map(|maps| {
            maps.lines()
                .filter(|l| l.contains("/memfd:zygote-model"))
                .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// The service's total PSS in KiB.
fn total_pss_kib(s: &zygote_runtime::protocol::ServiceStatus) -> u64 {
    s.processes.iter().filter_map(|p| p.pss_kib).sum()
}

#[test]
fn a_reload_rolls_every_worker_onto_the_new_model_and_the_old_one_is_freed() {
    let dir = TempDir::new("reload");
    let a = common::synthetic_model(dir.path(), 4 << 20, Dtype::F32);
    let b = common::synthetic_model(dir.path(), 6 << 20, Dtype::F32);
    let svc = Service::start(ServiceOptions {
        model: Some(a),
        workers: 2,
        entry: Some("probe".into()),
        ..ServiceOptions::default()
    });
    let before = model_inodes(&svc);
    assert_eq!(before.len(), 1, "one model memfd: {before:?}");
    let pss_before = total_pss_kib(&svc.status());
    let old: Vec<i32> = svc
        .pids_of("worker")
        .into_iter()
        .chain(svc.pids_of("owner"))
        .collect();
    let (ok, out) = reload(&svc, &b);
    assert!(ok, "{out}\n{}", svc.log_tail());
    assert!(out.contains("every worker serves"), "{out}");
    let workers = svc.wait_serving(START_TIMEOUT);
    let s = svc.status();
    let owner = &procs_of(&s, "owner")[0];
    assert!(owner.generation.is_some_and(|g| g > 1), "{owner:?}");
    for w in &workers {
        assert!(!old.contains(&w.pid), "worker {} was replaced", w.pid);
        assert_eq!(w.generation, owner.generation, "{w:?}");
        assert_eq!(w.model.as_deref(), Some(b.to_str().unwrap()), "{w:?}");
    }
    assert_eq!(s.model, b.display().to_string());
    assert_eq!(s.reload.as_ref().map(|r| r.state.as_str()), Some("done"));
    common::wait_gone(
        &old.iter()
            .map(|p| ("old".to_string(), *p))
            .collect::<Vec<_>>(),
        START_TIMEOUT,
        "the old owner and workers end",
    );
    let after = model_inodes(&svc);
    assert_eq!(after.len(), 1, "one model in memory again: {after:?}");
    eprintln!(
        "total PSS: {pss_before} KiB on the 4 MiB model, {} KiB on the 6 MiB one after the reload",
        total_pss_kib(&svc.status())
    );
    assert!(
        after.is_disjoint(&before),
        "the new model's memfd, not the old"
    );
}

#[test]
fn a_bad_file_is_refused_by_the_new_zygote_and_the_old_model_keeps_serving() {
    let dir = TempDir::new("reloadbad");
    let bad = dir.path().join("bad.safetensors");
    // A header length past the end of the file.
    std::fs::write(&bad, b"\xff\xff\x00\x00\x00\x00\x00\x00{}").expect("writing");
    let svc = Service::start(ServiceOptions {
        workers: 2,
        entry: Some("probe".into()),
        ..ServiceOptions::default()
    });
    let workers = svc.pids_of("worker");
    let inodes = model_inodes(&svc);
    let (ok, out) = reload(&svc, &bad);
    assert!(!ok, "refused: {out}");
    assert!(
        out.contains("refused") && out.contains("old model keeps serving"),
        "{out}"
    );
    svc.wait_serving(START_TIMEOUT);
    assert_eq!(svc.pids_of("worker"), workers, "the same workers serve");
    let s = svc.status();
    let r = s.reload.expect("the status shows the reload");
    assert_eq!(r.state, "failed");
    assert!(r.error.is_some(), "{r:?}");
    let table = std::process::Command::new(common::BIN)
        .arg("status")
        .arg("--runtime-dir")
        .arg(&svc.runtime_dir)
        .output()
        .expect("zygote status");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("failed"), "{table}");
    assert_eq!(
        model_inodes(&svc),
        inodes,
        "the zygote started again maps the old model memfd"
    );
}

/// A copy of the model directory `from` in `to` whose weights differ: the first f32 bias
/// tensor doubled, so that its embeddings differ from the original's.
fn perturbed_copy(from: &std::path::Path, to: &std::path::Path) {
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("reading the model directory") {
            let e = e.expect("entry");
            let (src, dst) = (e.path(), to.join(e.file_name()));
            if src.is_dir() {
                copy_dir(&src, &dst);
            } else if e.file_name() != "model.safetensors" {
                std::fs::copy(&src, &dst).expect("copying");
            }
        }
    }
    copy_dir(from, to);
    let model = zygote_runtime::Model::load(from).expect("loading the reference model");
    let doubled = model
        .tensors()
        .iter()
        .position(|t| t.dtype == Dtype::F32 && t.name.contains("bias"))
        .expect("a bias tensor");
    let data: Vec<Vec<u8>> = model
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let bytes = model.data(t).to_vec();
            if i != doubled {
                return bytes;
            }
            bytes
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 2.0 + 0.1).to_le_bytes())
                .collect()
        })
        .collect();
    let tensors: Vec<(&str, Dtype, &[usize], &[u8])> = model
        .tensors()
        .iter()
        .zip(&data)
        .map(|(t, d)| (t.name.as_str(), t.dtype, t.shape.as_slice(), d.as_slice()))
        .collect();
    zygote_runtime::synth::write_safetensors(
        &to.join("model.safetensors"),
        &tensors,
        Some(model.metadata()),
    )
    .expect("writing the perturbed model");
}

const TEXT: &str = r#"{"input": ["the same text, answered by one model or the other"]}"#;

/// One embedding of [`TEXT`], or why not.
fn embedding(addr: std::net::SocketAddr) -> Result<Vec<f64>, String> {
    let r = common::http(addr, "POST", "/embed", Some(TEXT), START_TIMEOUT)
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("status {}: {}", r.status, r.body));
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
    v["data"][0]["embedding"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .ok_or_else(|| format!("no embedding: {}", r.body))
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn under_load_a_reload_fails_no_request_and_every_answer_comes_from_one_model() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let Some(reference) = common::reference_model(
        "under_load_a_reload_fails_no_request_and_every_answer_comes_from_one_model",
    ) else {
        return;
    };
    let dir = TempDir::new("reloadload");
    let other = dir.path().join("other-model");
    perturbed_copy(&reference, &other);
    let svc = Service::start(ServiceOptions {
        model: Some(reference),
        workers: 2,
        entry: Some("app".into()),
        ..ServiceOptions::default()
    });
    let addr = svc.addr();
    let a = embedding(addr).expect("an answer of the first model");
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let got = embedding(addr);
                    answers.lock().unwrap().push(got);
                }
            })
        })
        .collect();
    let old: Vec<(String, i32)> = svc
        .pids_of("worker")
        .into_iter()
        .map(|p| ("old worker".to_string(), p))
        .collect();
    let (ok, out) = reload(&svc, &other);
    assert!(ok, "{out}\n{}", svc.log_tail());
    // The old workers answer what they accepted before they drained, then end.
    common::wait_gone(&old, START_TIMEOUT, "the old workers end");
    let during = answers.lock().unwrap().len();
    common::wait_until(START_TIMEOUT, "more answers after the reload", || {
        answers.lock().unwrap().len() >= during + 10
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client panicked");
    }
    let b = embedding(addr).expect("an answer of the second model");
    let apart = distance(&a, &b);
    assert!(apart > 1e-3, "the two models answer differently ({apart})");
    let answers = answers.lock().unwrap();
    let (mut from_a, mut from_b) = (0, 0);
    for (i, got) in answers.iter().enumerate() {
        let v = got
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} failed during the reload: {e}"));
        let (da, db) = (distance(v, &a), distance(v, &b));
        assert!(
            da.min(db) < apart / 100.0,
            "answer {i} is wholly neither model's ({da} from the first, {db} from the second)"
        );
        if da < db {
            from_a += 1
        } else {
            from_b += 1
        }
    }
    let last = &answers[during..];
    assert!(
        last.iter()
            .all(|v| distance(v.as_ref().unwrap(), &b) < apart / 100.0),
        "once the old workers are gone every answer is the new model's"
    );
    eprintln!(
        "{} requests during and after the reload, none failed: {from_a} from the first model, \
         {from_b} from the second",
        answers.len()
    );
}
