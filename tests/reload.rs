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
