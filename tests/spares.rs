//! Warm spares (`zygote start --spares`) on the real binary and the example app: a spare is
//! ready but answers nothing while it waits; after `kill -9` of a worker the spare answers in
//! its place; the pool is refilled with a new spare.
//!
//! These tests need the reference model directory (see [`common::reference_model`]): without
//! it they are skipped with a printed reason, except under CI, where they fail.

mod common;

use std::time::Duration;

use common::{http, procs_of, wait_for, wait_until, Service, ServiceOptions, CHANGE_TIMEOUT};
use nix::sys::signal::Signal;

/// Time one request may take (the debug build computes slowly).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The pid that answered one `GET /healthz`.
fn answered_by(addr: std::net::SocketAddr) -> Option<i32> {
    let r = http(addr, "GET", "/healthz", None, REQUEST_TIMEOUT).ok()?;
    (r.status == 200).then_some(())?;
    r.header("X-Worker-Pid")?.parse().ok()
}

/// The pid of the ready spare, once there is one other than `not`.
fn ready_spare(svc: &Service, not: Option<i32>) -> i32 {
    wait_for(CHANGE_TIMEOUT, "a ready spare in the status", || {
        let s = svc.try_status()?;
        procs_of(&s, "spare")
            .into_iter()
            .find(|p| p.state == "ready" && Some(p.pid) != not)
            .map(|p| p.pid)
    })
}

/// A process's `comm` and the title its argument area shows (up to the first NUL).
fn title(pid: i32) -> (String, String) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    (
        comm.trim().to_string(),
        String::from_utf8_lossy(first).into_owned(),
    )
}

#[test]
fn a_spare_answers_nothing_until_a_killed_worker_leaves_it_the_slot_and_the_pool_refills() {
    let test =
        "a_spare_answers_nothing_until_a_killed_worker_leaves_it_the_slot_and_the_pool_refills";
    let Some(model) = common::reference_model(test) else {
        return;
    };
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 1,
        entry: Some("app".into()),
        args: ["--spares", "1"].map(String::from).to_vec(),
        ..ServiceOptions::default()
    });
    let addr = svc.addr();
    let worker = procs_of(&svc.status(), "worker")[0].pid;
    let spare = ready_spare(&svc, None);
    assert!(
        svc.log_tail().contains("waiting for activation"),
        "the spare said it waits"
    );
    assert_eq!(
        title(spare),
        ("zygote-w1000".into(), "zygote: worker 1000".into())
    );
    // Both hold the same listener: a spare that accepted would answer some of these.
    for i in 0..40 {
        assert_eq!(
            answered_by(addr),
            Some(worker),
            "request {i} answered by the worker alone (spare pid {spare})"
        );
    }
    common::signal(worker, Signal::SIGKILL);
    wait_until(
        CHANGE_TIMEOUT,
        "the spare answers in the worker's place",
        || answered_by(addr) == Some(spare),
    );
    let s = svc.status();
    let workers = procs_of(&s, "worker");
    assert_eq!(
        workers.iter().map(|p| (p.slot, p.pid)).collect::<Vec<_>>(),
        [(Some(0), spare)],
        "the spare is worker 0 now: {s:?}"
    );
    assert_eq!(workers[0].restart_reasons.signal, 1, "{s:?}");
    let log = svc.log_tail();
    assert!(log.contains("activated"), "{log}");
    assert_eq!(
        title(spare),
        ("zygote-w0".into(), "zygote: worker 0".into()),
        "ps names the slot the activated spare serves"
    );
    let refill = ready_spare(&svc, Some(spare));
    assert_ne!(refill, worker);
    for _ in 0..20 {
        assert_eq!(
            answered_by(addr),
            Some(spare),
            "the new spare answers nothing"
        );
    }
}

/// The metrics address a service logged (`--metrics 127.0.0.1:0` picks a free port).
fn metrics_addr(svc: &Service) -> std::net::SocketAddr {
    wait_for(CHANGE_TIMEOUT, "the metrics address in the log", || {
        let log = std::fs::read_to_string(&svc.log).ok()?;
        let rest = log.split("serving metrics on http://").nth(1)?;
        rest.split("/metrics").next()?.parse().ok()
    })
}

#[test]
fn spares_show_in_metrics_a_roll_replaces_them_and_a_stop_drains_them() {
    let svc = Service::start(ServiceOptions {
        workers: 1,
        args: ["--spares", "2", "--metrics", "127.0.0.1:0"]
            .map(String::from)
            .to_vec(),
        ..ServiceOptions::default()
    });
    let first: Vec<i32> = wait_for(CHANGE_TIMEOUT, "two ready spares", || {
        let s = svc.try_status()?;
        let ready: Vec<i32> = procs_of(&s, "spare")
            .iter()
            .filter(|p| p.state == "ready")
            .map(|p| p.pid)
            .collect();
        (ready.len() == 2).then_some(ready)
    });
    let metrics = metrics_addr(&svc);
    let r = http(metrics, "GET", "/metrics", None, REQUEST_TIMEOUT).expect("GET /metrics");
    assert!(
        r.body.contains("zygote_spares{state=\"ready\"} 2\n")
            && r.body.contains("zygote_workers{state=\"serving\"} 1\n"),
        "{}",
        r.body
    );
    svc.signal(Signal::SIGHUP);
    wait_until(CHANGE_TIMEOUT, "two new spares after the roll", || {
        svc.try_status().is_some_and(|s| {
            let spares = procs_of(&s, "spare");
            spares.len() == 2
                && spares
                    .iter()
                    .all(|p| p.state == "ready" && !first.contains(&p.pid))
        })
    });
    for pid in &first {
        wait_until(CHANGE_TIMEOUT, "a rolled spare exits", || {
            !common::alive(*pid)
        });
    }
    let mut svc = svc;
    let spares = svc.pids_of("spare");
    svc.signal(Signal::SIGTERM);
    let status = svc.wait_exit(CHANGE_TIMEOUT);
    assert!(status.success(), "{status:?}\n{}", svc.log_tail());
    for pid in spares {
        assert!(!common::alive(pid), "spare {pid} is gone with the service");
    }
}
