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

/// The metrics address a service logged (`--metrics 127.0.0.1:0` picks a free port).
fn metrics_addr(svc: &Service) -> std::net::SocketAddr {
    common::wait_for(CHANGE_TIMEOUT, "the metrics address in the log", || {
        let log = std::fs::read_to_string(&svc.log).ok()?;
        let rest = log.split("serving metrics on http://").nth(1)?;
        rest.split("/metrics").next()?.parse().ok()
    })
}

/// One HTTP/1.1 request; the status code and the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .expect("connecting to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("sending the request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("reading the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// A Python with the Prometheus client: `$ZYGOTE_TEST_PYTHON`, else `.venv-python/bin/python`
/// (made by the project's Python set-up), else `python3`. `None` (the caller skips) only when
/// no Python is there at all; a Python without the package is a failure that says how to get
/// it.
fn python_with_prometheus(test: &str) -> Option<std::path::PathBuf> {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-python/bin/python");
    let candidates: Vec<std::path::PathBuf> = std::env::var_os("ZYGOTE_TEST_PYTHON")
        .map(Into::into)
        .into_iter()
        .chain([venv, "python3".into()])
        .collect();
    let mut found = Vec::new();
    for py in &candidates {
        let out = std::process::Command::new(py)
            .args(["-c", "import prometheus_client"])
            .output();
        match out {
            Ok(o) if o.status.success() => return Some(py.clone()),
            Ok(_) => found.push(py.display().to_string()),
            Err(_) => {}
        }
    }
    assert!(
        found.is_empty(),
        "{test}: {found:?} lack the prometheus_client package (pip install prometheus_client \
         into .venv-python, or set ZYGOTE_TEST_PYTHON to a Python that has it)"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: no Python found (tried {candidates:?})"
    );
    None
}

/// Parses OpenMetrics text with the Prometheus Python client's parser; every sample as
/// `(family type, sample name, labels, value)`.
fn parse_with_python(
    py: &std::path::Path,
    text: &str,
) -> Vec<(String, String, BTreeMap<String, String>, f64)> {
    use std::io::Write;
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([fam.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(py)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the parser");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding the parser");
    let out = child.wait_with_output().expect("the parser's output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the parser's JSON")
}

type Samples = Vec<(String, String, BTreeMap<String, String>, f64)>;

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(_, n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
        })
        .map(|(_, _, _, v)| *v)
}

#[test]
fn metrics_parse_with_the_prometheus_client_and_follow_a_restart() {
    let test = "metrics_parse_with_the_prometheus_client_and_follow_a_restart";
    let Some(py) = python_with_prometheus(test) else {
        return;
    };
    let svc = Service::start(ServiceOptions {
        workers: 2,
        args: ["--metrics", "127.0.0.1:0"].map(String::from).to_vec(),
        ..ServiceOptions::default()
    });
    let addr = metrics_addr(&svc);
    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let samples = parse_with_python(&py, &text);
    let families: std::collections::BTreeSet<(&str, &str)> = samples
        .iter()
        .map(|(t, n, _, _)| (t.as_str(), n.as_str()))
        .collect();
    for (kind, name) in [
        ("info", "zygote_build_info"),
        ("gauge", "zygote_workers"),
        ("counter", "zygote_worker_restarts_total"),
        ("histogram", "zygote_spawn_ready_seconds_bucket"),
        ("gauge", "zygote_process_pss_bytes"),
        ("counter", "zygote_requests_total"),
        ("gauge", "zygote_weights_bytes"),
        ("histogram", "zygote_request_duration_seconds_count"),
    ] {
        assert!(families.contains(&(kind, name)), "{kind} {name} in\n{text}");
    }
    assert_eq!(
        sample(&samples, "zygote_workers", &[("state", "serving")]),
        Some(2.0)
    );
    assert_eq!(
        sample(&samples, "zygote_spawn_ready_seconds_count", &[]),
        Some(3.0),
        "the owner and two workers became ready"
    );
    let version = samples
        .iter()
        .find(|(_, n, _, _)| n == "zygote_build_info")
        .and_then(|(_, _, l, _)| l.get("version").cloned());
    assert_eq!(version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    for (role, slot) in [
        ("supervisor", ""),
        ("zygote", ""),
        ("owner", "0"),
        ("worker", "1"),
    ] {
        let pss = sample(
            &samples,
            "zygote_process_pss_bytes",
            &[("role", role), ("slot", slot)],
        );
        assert!(
            pss.is_some_and(|b| b > 0.0),
            "{role} {slot}: {pss:?}\n{text}"
        );
    }
    let weights = sample(&samples, "zygote_weights_bytes", &[("device", "0")]);
    assert!(weights.is_some_and(|b| b > 0.0), "{weights:?}");
    assert_eq!(
        sample(
            &samples,
            "zygote_worker_restarts_total",
            &[("reason", "signal")]
        ),
        Some(0.0)
    );

    // A silent client holds a connection; the scrape after a kill is answered all the same.
    let _silent = std::net::TcpStream::connect(addr).expect("a silent client");
    let worker = svc.pids_of("worker")[0];
    common::signal(worker, nix::sys::signal::Signal::SIGKILL);
    wait_until(CHANGE_TIMEOUT, "/metrics counts the restart", || {
        let (_, text) = http_get(addr, "/metrics");
        let samples = parse_with_python(&py, &text);
        sample(
            &samples,
            "zygote_worker_restarts_total",
            &[("reason", "signal")],
        ) == Some(1.0)
    });
    let s = svc.status();
    let reasons: u32 = procs_of(&s, "worker")
        .iter()
        .map(|p| p.restart_reasons.signal)
        .sum();
    assert_eq!(reasons, 1, "zygote status agrees with /metrics");
    assert_eq!(http_get(addr, "/").0, 404);
    assert_eq!(
        http_get(addr, "/healthz"),
        (200, "ok\n".to_string()),
        "the supervisor's liveness"
    );
}

#[test]
fn metrics_count_the_apps_requests_and_their_latency() {
    let test = "metrics_count_the_apps_requests_and_their_latency";
    let Some(py) = python_with_prometheus(test) else {
        return;
    };
    let Some(model) = common::reference_model(test) else {
        return;
    };
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 2,
        entry: Some("app".into()),
        args: ["--metrics", "127.0.0.1:0"].map(String::from).to_vec(),
        ..ServiceOptions::default()
    });
    let addr = metrics_addr(&svc);
    const N: usize = 20;
    for i in 0..N {
        let o = one_request(svc.addr(), i % 2 == 0);
        assert!(matches!(o, Outcome::Answered), "request {i}: {o:?}");
    }
    // The workers report once a second.
    wait_until(CHANGE_TIMEOUT, "the requests reach /metrics", || {
        let (_, text) = http_get(addr, "/metrics");
        let samples = parse_with_python(&py, &text);
        let requests = sample(&samples, "zygote_requests_total", &[]);
        let timed = sample(&samples, "zygote_request_duration_seconds_count", &[]);
        let inf = sample(
            &samples,
            "zygote_request_duration_seconds_bucket",
            &[("le", "+Inf")],
        );
        requests == Some(N as f64) && timed == Some(N as f64) && inf == Some(N as f64)
    });
}
