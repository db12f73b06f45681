//! The service as its users meet it: the example app (`--entry app`) on the reference model,
//! over HTTP. No request fails while the service drains on SIGTERM, while SIGHUP rolls the
//! workers, or while the zygote dies and restarts.
//!
//! These tests need the reference model directory (see [`common::reference_model`]): without
//! it they are skipped with a printed reason, except under CI, where they fail.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{
    http, procs_of, settled, wait_for, wait_until, HttpResponse, Service, ServiceOptions,
    CHANGE_TIMEOUT, START_TIMEOUT,
};
use nix::sys::signal::Signal;

/// Time one request may take (the debug build computes slowly).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn app(test: &str, workers: u32) -> Option<Service> {
    let model = common::reference_model(test)?;
    Some(Service::start(ServiceOptions {
        model: Some(model),
        workers,
        entry: Some("app".into()),
        ..ServiceOptions::default()
    }))
}

/// `{"input": [...]}` with `n` texts of about `words` words each.
fn embed_body(n: usize, words: usize) -> String {
    let texts: Vec<String> = (0..n)
        .map(|i| {
            (0..words)
                .map(|w| format!("word{} shared weights", (i * 31 + w) % 97))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    serde_json::json!({ "input": texts }).to_string()
}

/// Checks an `/embed` answer: 200, one 384-float embedding per input.
fn check_embed(r: &HttpResponse, inputs: usize) -> Result<(), String> {
    if r.status != 200 {
        return Err(format!("status {}: {}", r.status, r.body));
    }
    let v: serde_json::Value =
        serde_json::from_str(&r.body).map_err(|e| format!("not JSON ({e}): {}", r.body))?;
    let data = v["data"]
        .as_array()
        .ok_or_else(|| format!("no data array: {}", r.body))?;
    if data.len() != inputs {
        return Err(format!("{} embeddings for {inputs} inputs", data.len()));
    }
    for (i, d) in data.iter().enumerate() {
        let n = d["embedding"].as_array().map(|e| e.len());
        if n != Some(384) {
            return Err(format!("embedding {i} has {n:?} values, not 384"));
        }
    }
    Ok(())
}

fn embed(addr: SocketAddr, n: usize, words: usize) -> Result<(), String> {
    let r = http(
        addr,
        "POST",
        "/embed",
        Some(&embed_body(n, words)),
        REQUEST_TIMEOUT,
    )
    .map_err(|e| format!("POST /embed: {e}"))?;
    check_embed(&r, n)
}

/// Sends `raw` as it is and returns the answer's status code.
fn raw_status(addr: SocketAddr, raw: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).expect("timeout");
    s.write_all(raw.as_bytes()).expect("send");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

fn get_ok(addr: SocketAddr, path: &str) -> Result<(), String> {
    let r =
        http(addr, "GET", path, None, REQUEST_TIMEOUT).map_err(|e| format!("GET {path}: {e}"))?;
    if r.status == 200 {
        Ok(())
    } else {
        Err(format!("GET {path}: status {}: {}", r.status, r.body))
    }
}

#[test]
fn the_app_answers_health_readiness_and_embeddings() {
    let Some(svc) = app("the_app_answers_health_readiness_and_embeddings", 2) else {
        return;
    };
    let addr = svc.addr();
    get_ok(addr, "/healthz").expect("GET /healthz");
    get_ok(addr, "/readyz").expect("GET /readyz");
    embed(addr, 3, 8).expect("POST /embed with 3 texts");

    // Every answer names the worker that made it.
    let r = http(addr, "GET", "/healthz", None, REQUEST_TIMEOUT).expect("GET /healthz");
    let workers: Vec<i32> = procs_of(&svc.status(), "worker")
        .iter()
        .map(|p| p.pid)
        .collect();
    let pid: i32 = r
        .header("X-Worker-Pid")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric X-Worker-Pid in {:?}", r.headers));
    assert!(
        workers.contains(&pid),
        "X-Worker-Pid {pid} is one of the workers {workers:?}"
    );

    // Refused as nginx and hyper refuse them: a signed Content-Length, HTTP/1.1 without Host.
    for raw in [
        "POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: +17\r\n\r\n{\"input\": \"hello\"}",
        "GET /healthz HTTP/1.1\r\n\r\n",
    ] {
        let status = raw_status(addr, raw);
        assert_eq!(status, 400, "{raw:?}");
    }
    // As OpenAI answers: empty texts refused, an unknown model not found, token ids taken.
    for (body, status, code) in [
        (r#"{"input": ""}"#, 400, "invalid_input"),
        (r#"{"input": ["a", "   "]}"#, 400, "invalid_input"),
        (
            r#"{"input": "a", "model": "text-embedding-3-small"}"#,
            404,
            "model_not_found",
        ),
        (r#"{"input": [[101, 7592, 102], [101, 102]]}"#, 200, ""),
        (r#"{"input": [101, 7592, 102]}"#, 200, ""),
    ] {
        let r = http(addr, "POST", "/v1/embeddings", Some(body), REQUEST_TIMEOUT)
            .expect("POST /v1/embeddings");
        assert_eq!(r.status, status, "{body}: {}", r.body);
        if status != 200 {
            let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
            assert_eq!(v["error"]["code"], code, "{}", r.body);
        }
    }

    // The zygote preloaded the app's tokenizer before forking, and is still single-threaded.
    let zygote = svc.zygote_pid();
    assert_eq!(
        zygote_runtime::procfs::thread_count(zygote).expect("the zygote's tasks"),
        1,
        "the zygote has a single thread after preloading the app"
    );
    let log = std::fs::read_to_string(&svc.log).expect("the service log");
    assert!(
        log.contains("preloaded the app's model spec and tokenizer"),
        "the zygote logged the preload:\n{log}"
    );
}

/// A client that keeps sending requests (alternately `/healthz` and a small `/embed`) from
/// `threads` threads until stopped, counting successes and keeping every failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|t| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut health = t % 2 == 0;
                    while !stop.load(Ordering::Relaxed) {
                        health = !health;
                        let r = if health {
                            get_ok(addr, "/healthz")
                        } else {
                            embed(addr, 2, 6)
                        };
                        match r {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().expect("lock").push(e),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; returns the successes and the failures.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("a load thread panicked");
        }
        let failures = std::mem::take(&mut *self.failures.lock().expect("lock"));
        (self.ok(), failures)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn sigterm_drains_every_accepted_request_and_exits_0() {
    let Some(mut svc) = app("sigterm_drains_every_accepted_request_and_exits_0", 2) else {
        return;
    };
    let addr = svc.addr();
    // Slow-ish requests, more of them than there are workers, so some wait in the accept
    // queue when SIGTERM comes. Sized for the debug build (about 1 s each there): every
    // one of them on a single worker still fits well within the 30 s drain deadline.
    const REQUESTS: usize = 6;
    const TEXTS: usize = 8;
    const WORDS: usize = 30;
    let (sent_tx, sent_rx) = mpsc::channel();
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let sent = sent_tx.clone();
            std::thread::spawn(move || -> Result<(), String> {
                use std::io::{Read, Write};
                let body = embed_body(TEXTS, WORDS);
                let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(REQUEST_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                let req = format!(
                    "POST /embed HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
                let _ = sent.send(());
                let mut raw = Vec::new();
                s.read_to_end(&mut raw)
                    .map_err(|e| format!("reading: {e}"))?;
                let text = String::from_utf8_lossy(&raw);
                let (head, body) = text
                    .split_once("\r\n\r\n")
                    .ok_or_else(|| format!("no complete answer: {text:?}"))?;
                let status = head.split_whitespace().nth(1).unwrap_or("");
                if status != "200" {
                    return Err(format!("status {status}: {body}"));
                }
                Ok(())
            })
        })
        .collect();
    drop(sent_tx);
    for i in 0..REQUESTS {
        sent_rx
            .recv_timeout(CHANGE_TIMEOUT)
            .unwrap_or_else(|_| panic!("request {i} of {REQUESTS} was not sent in time"));
    }
    svc.signal(Signal::SIGTERM);
    let results: Vec<Result<(), String>> = clients
        .into_iter()
        .map(|c| c.join().expect("a client thread panicked"))
        .collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "every request sent before SIGTERM is answered 200: {failed:?}"
    );
    let status = svc.wait_exit(REQUEST_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "zygote start exits 0 after draining"
    );
    assert!(
        svc.leftovers().is_empty(),
        "nothing of the service is left after the drain"
    );
}

#[test]
fn sighup_rolls_the_workers_without_failing_a_request() {
    let Some(svc) = app("sighup_rolls_the_workers_without_failing_a_request", 2) else {
        return;
    };
    let addr = svc.addr();
    let old = svc.pids_of("worker");
    let load = Load::start(addr, 3);
    wait_until(CHANGE_TIMEOUT, "the load is flowing", || load.ok() >= 4);
    svc.signal(Signal::SIGHUP);
    wait_until(
        START_TIMEOUT,
        "every worker is replaced by a serving one",
        || {
            svc.try_status().is_some_and(|s| {
                settled(&s, 2) && procs_of(&s, "worker").iter().all(|w| !old.contains(&w.pid))
            })
        },
    );
    let after_roll = load.ok();
    wait_until(CHANGE_TIMEOUT, "the new workers answer", || {
        load.ok() >= after_roll + 4
    });
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "no request failed during the roll ({ok} succeeded): {failures:?}"
    );
    let new = svc.pids_of("worker");
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "the worker pids changed: {old:?} -> {new:?}"
    );
}

#[test]
fn when_the_zygote_dies_the_workers_keep_answering() {
    let Some(svc) = app("when_the_zygote_dies_the_workers_keep_answering", 2) else {
        return;
    };
    let addr = svc.addr();
    let workers = svc.pids_of("worker");
    let zygote = svc.zygote_pid();
    let load = Load::start(addr, 2);
    wait_until(CHANGE_TIMEOUT, "the load is flowing", || load.ok() >= 4);
    common::signal(zygote, Signal::SIGKILL);
    let new_zygote = wait_for(CHANGE_TIMEOUT, "a new zygote runs", || {
        let s = svc.try_status()?;
        procs_of(&s, "zygote")
            .into_iter()
            .find(|z| z.pid > 0 && z.pid != zygote)
    });
    let during = load.ok();
    wait_until(CHANGE_TIMEOUT, "requests keep being answered", || {
        load.ok() >= during + 6
    });
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "no request failed while the zygote died and restarted ({ok} succeeded): {failures:?}"
    );
    assert_eq!(
        svc.pids_of("worker"),
        workers,
        "the same workers answered throughout"
    );
    // And the new zygote serves: a killed worker comes back and answers.
    common::signal(workers[0], Signal::SIGKILL);
    wait_until(
        START_TIMEOUT,
        "worker 0 is replaced through the new zygote",
        || {
            svc.try_status().is_some_and(|s| {
                settled(&s, 2)
                    && procs_of(&s, "worker").iter().all(|w| w.pid != workers[0])
                    && procs_of(&s, "zygote")
                        .iter()
                        .any(|z| z.pid == new_zygote.pid)
            })
        },
    );
    for _ in 0..4 {
        embed(addr, 1, 4).expect("POST /embed after the replacement");
    }
}

#[test]
fn a_model_the_app_cannot_serve_is_refused_before_any_worker_starts() {
    let Some(reference) = common::reference_model("a_model_the_app_cannot_serve_is_refused") else {
        return;
    };
    // The reference model with a pooling mode the app does not compute.
    let dir = common::TempDir::new("unservable");
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(model_dir.join("1_Pooling")).expect("model dir");
    for name in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "model.safetensors",
    ] {
        std::os::unix::fs::symlink(reference.join(name), model_dir.join(name)).expect("link");
    }
    std::fs::write(
        model_dir.join("1_Pooling/config.json"),
        r#"{"embedding_dimension": 384, "pooling_mode": "lasttoken"}"#,
    )
    .expect("pooling config");
    let model = model_dir.join("model.safetensors");
    let done = common::run_start(
        &[
            "--model",
            model.to_str().expect("utf-8 path"),
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--entry",
            "app",
        ],
        &dir.path().join("rt"),
        Duration::from_secs(60),
    );
    assert!(
        !done.status.success(),
        "zygote start exits non-zero: {}\n{}",
        done.status,
        done.output
    );
    assert!(
        done.output.contains("the app cannot serve the model")
            && done.output.contains("\"lasttoken\" is not supported"),
        "the error names the model and the reason:\n{}",
        done.output
    );
    // Refused before anything was forked: no owner, no worker, so no crash loop.
    for absent in ["crash loop", "worker 0", "owner"] {
        assert!(
            !done.output.contains(absent),
            "{absent:?} in the output:\n{}",
            done.output
        );
    }
    assert_eq!(done.leftovers, Vec::<i32>::new());
}
