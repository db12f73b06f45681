//! The app template's server: the zygote server (`zygote-server`) hosted in the interpreter
//! that imported the app, so the supervisor asks it for workers over the same protocol as the
//! zygote, and each worker is a fork of the preloaded interpreter.
//!
//! Three things differ from the zygote (`ServerConfig`'s hooks): the fork is CPython's
//! `os.fork()` (the at-fork hooks that torch and others registered run, and
//! `PyOS_AfterFork_Child` makes the child's interpreter sound), done by a Python callable
//! that also logs the template's threads; the one entry, `app`, hands the forked child's
//! [`Worker`] to a Python callable that runs the worker program without the import; and each
//! turn of the loop heartbeats on the template's own control channel and stops the server on
//! `drain`. The loop runs with the GIL released; the hooks take it.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::unistd::{ForkResult, Pid};
use pyo3::prelude::*;
use zygote_runtime::model::Model;
use zygote_runtime::protocol::ParentMessage;
use zygote_runtime::Worker;
use zygote_server::{Entry, EntryTable, ServerConfig};

use crate::errors;
use crate::worker::PyWorker;

/// The entry a template serves: the app, in a forked worker.
pub const APP_ENTRY: &str = "app";

/// What the hooks (plain `fn`s, as the server takes them) need: set once, before the loop.
struct Host {
    /// The template's own worker (its control channel to the supervisor). Kept here for the
    /// life of the process, also in every forked child, which must never drop it: its fds'
    /// numbers are the child's own after the fork.
    template: Py<PyWorker>,
    /// `fork() -> int`: logs the threads, forks with `os.fork()`, returns the pid (0 in the
    /// child).
    fork: Py<PyAny>,
    /// `run(worker) -> int`: the worker program after the fork; returns the exit code.
    run: Py<PyAny>,
    last_beat: Mutex<Instant>,
}

static HOST: OnceLock<Host> = OnceLock::new();

/// Asks the kernel to reclaim the file pages only this process maps (the libraries' pages the
/// import touched and the workers do not run; `zygote_runtime::pageout`). Returns
/// `{"mappings": N, "rss_before_kib": B, "rss_after_kib": A, "ms": T}`; raises `ZygoteError`
/// where the kernel lacks `MADV_PAGEOUT`.
#[pyfunction]
pub fn page_out_file_mappings(
    py: Python<'_>,
) -> PyResult<std::collections::HashMap<&'static str, u64>> {
    let done = py
        .detach(zygote_runtime::pageout::page_out_file_mappings)
        .map_err(|e| errors::ZygoteError::new_err(e.to_string()))?;
    Ok([
        ("mappings", done.mappings as u64),
        ("rss_before_kib", done.rss_before_kib),
        ("rss_after_kib", done.rss_after_kib),
        ("ms", done.took.as_millis() as u64),
    ]
    .into_iter()
    .collect())
}

/// Serves the zygote protocol on `RUNTIME_DIR/socket_name` until the supervisor drains the
/// template (or goes away); reports ready on the template's control channel once the socket
/// listens. Returns the server's exit code.
#[pyfunction]
pub fn serve_template(
    py: Python<'_>,
    template: Py<PyWorker>,
    socket_name: String,
    fork: Py<PyAny>,
    run: Py<PyAny>,
) -> PyResult<i32> {
    let (runtime_dir, model) = {
        let w = template.get();
        w.with(|w| -> PyResult<_> {
            let info = w.info();
            let fd = w.model().memfd().try_clone_to_owned().map_err(|e| {
                errors::ZygoteError::new_err(format!("dup of the model memfd: {e}"))
            })?;
            let model = Model::from_memfd(fd, &info.model_path, &info.model_digest)
                .map_err(|e| errors::ZygoteError::new_err(e.to_string()))?;
            Ok((info.runtime_dir.clone(), model))
        })?
    };
    let host = Host {
        template,
        fork,
        run,
        last_beat: Mutex::new(Instant::now()),
    };
    if HOST.set(host).is_err() {
        return Err(errors::ZygoteError::new_err(
            "serve_template runs once per process",
        ));
    }
    let mut entries = EntryTable::new();
    entries.insert(APP_ENTRY, Entry::Native(forked_worker));
    let cfg = ServerConfig {
        on_ready: Some(ready),
        socket_name,
        fork: Some(python_fork),
        tick: Some(tick),
        ..ServerConfig::zygote(runtime_dir, model, entries, Vec::new(), "template".into())
    };
    py.detach(|| zygote_server::run(cfg))
        .map_err(|e| errors::ZygoteError::new_err(e.to_string()))
}

fn host() -> &'static Host {
    HOST.get()
        .expect("the hooks run only inside serve_template")
}

/// `on_ready`: the socket listens, so the supervisor may connect.
fn ready(path: &std::path::Path) {
    let detail = format!("app template on {}", path.display());
    if let Err(e) = host().template.get().with(|w| w.ready(None, &detail)) {
        log::error!("reporting ready: {e}");
    }
}

/// `tick`: a heartbeat every second; `false` (stop serving) on `drain` or when the supervisor
/// is gone.
fn tick() -> bool {
    let h = host();
    let due = {
        let mut last = h.last_beat.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            true
        } else {
            false
        }
    };
    h.template.get().with(|w| {
        match w.poll_control() {
            Ok(Some(ParentMessage::Drain { .. })) => {
                log::info!("drain requested: no more forks; the workers forked so far go on");
                let _ = w.draining(0);
                return false;
            }
            // The template is never spawned as a spare, so nothing activates it.
            Ok(Some(ParentMessage::Activate { worker })) => {
                log::warn!("activate (worker {worker}) sent to the app template; ignored");
            }
            Ok(None) => {}
            Err(e) => {
                log::info!("the control channel ended ({e}); stopping");
                return false;
            }
        }
        if due {
            if let Err(e) = w.heartbeat(0) {
                log::info!("heartbeat failed ({e}); stopping");
                return false;
            }
        }
        true
    })
}

/// The server's fork: the Python callable's `os.fork()`.
fn python_fork() -> nix::Result<ForkResult> {
    Python::attach(|py| {
        let pid = host()
            .fork
            .call0(py)
            .and_then(|p| p.extract::<i32>(py))
            .map_err(|e| {
                let errno = e
                    .value(py)
                    .getattr("errno")
                    .and_then(|n| n.extract::<i32>())
                    .unwrap_or(libc::EAGAIN);
                log::error!("os.fork() failed: {e}");
                nix::errno::Errno::from_raw(errno)
            })?;
        Ok(if pid == 0 {
            ForkResult::Child
        } else {
            ForkResult::Parent {
                child: Pid::from_raw(pid),
            }
        })
    })
}

/// The `app` entry in a forked child: the Python worker program, without the import.
fn forked_worker(worker: Worker) -> i32 {
    Python::attach(|py| {
        let run = || -> PyResult<i32> {
            let w = Py::new(py, PyWorker::from_worker(worker)?)?;
            host().run.call1(py, (w,))?.extract::<i32>(py)
        };
        match run() {
            Ok(code) => code,
            Err(e) => {
                e.print(py);
                1
            }
        }
    })
}
