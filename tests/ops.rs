//! What operators of a production service rely on, checked on the real binary: workers
//! recycled after `--max-requests` (with its jitter) or over `--max-rss`, without a failed
//! request under load.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::load::{one_request, Outcome};
use common::{procs_of, wait_until, Service, ServiceOptions, CHANGE_TIMEOUT};
use zygote_runtime::protocol::ServiceStatus;

/// Recycles counted over the worker slots of a status (the processes of a slot, old and new
/// mid-recycle, show the same count: each slot is counted once).
fn recycles(s: &ServiceStatus) -> u32 {
    let by_slot: BTreeMap<Option<u32>, u32> = procs_of(s, "worker")
        .iter()
        .map(|p| (p.slot, p.restart_reasons.recycle))
        .collect();
    by_slot.values().sum()
}

#[test]
fn workers_recycled_after_max_requests_under_load_fail_no_request() {
    const CLIENTS: usize = 6;
    const RECYCLES: u32 = 4;
    let Some(model) =
        common::reference_model("workers_recycled_after_max_requests_under_load_fail_no_request")
    else {
        return;
    };
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 2,
        entry: Some("app".into()),
        args: ["--max-requests", "40", "--max-requests-jitter", "20"]
            .map(String::from)
            .to_vec(),
        ..ServiceOptions::default()
    });
    let addr = svc.addr();
    let answered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (answered, done, bad) = (answered.clone(), done.clone(), bad.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while !done.load(Ordering::SeqCst) {
                    match one_request(addr, i % 2 == 1) {
                        Outcome::Answered => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        other => bad.lock().expect("lock").push(format!("{other:?}")),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let deadline = Duration::from_secs(120);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(deadline, "the workers are recycled under load", || {
            svc.try_status().is_some_and(|s| recycles(&s) >= RECYCLES)
        })
    }));
    done.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("a client thread panicked");
    }
    if let Err(e) = waited {
        panic!(
            "{}\nanswered {}\nservice log:\n{}",
            e.downcast_ref::<String>().cloned().unwrap_or_default(),
            answered.load(Ordering::Relaxed),
            svc.log_tail()
        );
    }
    let bad = bad.lock().expect("lock");
    let status = svc.status();
    eprintln!(
        "recycled under load: {} recycles, {} answered, {} failed",
        recycles(&status),
        answered.load(Ordering::Relaxed),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "no request fails while workers are recycled ({} failed): {bad:#?}",
        bad.len()
    );
    for p in procs_of(&status, "worker") {
        let r = p.restart_reasons;
        assert_eq!(
            (r.exit, r.signal, r.heartbeat, r.roll),
            (0, 0, 0, 0),
            "a recycle counts as nothing else: {p:?}"
        );
    }
    assert!(
        svc.log_tail().contains("--max-requests"),
        "the log says why"
    );
}

#[test]
fn a_worker_over_max_rss_is_recycled_ready_first() {
    // Every worker holds more than 1 MiB: each one is recycled as soon as it reports.
    let svc = Service::start(ServiceOptions {
        workers: 1,
        args: ["--max-rss", "1"].map(String::from).to_vec(),
        wait_serving: false,
        ..ServiceOptions::default()
    });
    wait_until(
        CHANGE_TIMEOUT,
        "two recycles over --max-rss in the status",
        || svc.try_status().is_some_and(|s| recycles(&s) >= 2),
    );
    let log = svc.log_tail();
    assert!(log.contains("over --max-rss 1"), "{log}");
    let s = svc.status();
    assert!(
        procs_of(&s, "worker").iter().any(|p| p.state == "serving"),
        "a serving worker is there at every moment a status is taken: {s:?}"
    );
}
