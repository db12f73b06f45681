//! The worker API for Python: [`PyWorker`] wraps the runtime's `Worker` (attach, weights,
//! listeners, ready, heartbeat, draining, control messages), so a Python worker speaks the
//! same protocol as a Rust one, through the same code.
//!
//! The worker sits behind a mutex: the serving thread reports ready and draining while a
//! control thread sends heartbeats and waits for the drain request. Every call that can
//! block (importing the weights, waiting on the control channel) releases the GIL.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use zygote_runtime::protocol::ParentMessage;
use zygote_runtime::Worker;

use crate::errors;
use crate::weights::SharedWeights;

/// A process started by a zygote, attached to its supervisor.
#[pyclass(frozen, name = "Worker", module = "zygote._native")]
#[derive(Debug)]
pub struct PyWorker {
    worker: Mutex<Worker>,
    /// A duplicate of the control channel's fd, polled without holding the worker's lock (a
    /// thread waiting for the drain request must not block the one reporting ready).
    control: OwnedFd,
}

impl PyWorker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Worker> {
        // A panic while holding the lock leaves the worker as usable as before: every call
        // is one whole message.
        self.worker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps a worker attached in Rust (a child forked by the app template).
    pub(crate) fn from_worker(worker: Worker) -> PyResult<Self> {
        let control = worker.control_fd().try_clone_to_owned().map_err(|e| {
            errors::ZygoteError::new_err(format!("dup of the control channel: {e}"))
        })?;
        Ok(Self {
            worker: Mutex::new(worker),
            control,
        })
    }

    /// Runs `f` on the worker under its lock.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Worker) -> R) -> R {
        f(&mut self.lock())
    }
}

/// Attaches this process: reads `ZYGOTE_ATTACH` and adopts fds 3, 4 and the listeners. `role`
/// tags the runtime's log lines (`worker N`, `template N`).
#[pyfunction]
#[pyo3(signature = (role="worker"))]
pub fn attach(role: &str) -> PyResult<PyWorker> {
    let worker = Worker::attach().map_err(errors::worker)?;
    zygote_runtime::logging::init(&format!("{role} {}", worker.id()));
    PyWorker::from_worker(worker)
}

#[pymethods]
impl PyWorker {
    /// The worker id the supervisor gave this worker (`Worker::id()`).
    #[getter]
    fn id(&self) -> u32 {
        self.lock().id().0
    }

    /// Whether this worker was spawned as a warm spare (`--spares`) that was not activated yet.
    #[getter]
    fn spare(&self) -> bool {
        self.lock().is_spare()
    }

    /// A spare's wait, after `ready` (GIL released): heartbeats every second and accepts
    /// nothing until the supervisor sends `activate` (returns `True`: this worker now serves
    /// the slot in `id`) or `drain` (returns `False`: it served nothing and should exit). A
    /// worker that is no spare returns `True` at once.
    fn wait_activation(&self, py: Python<'_>) -> PyResult<bool> {
        let activation = py
            .detach(|| self.lock().wait_activation())
            .map_err(errors::worker)?;
        Ok(matches!(
            activation,
            zygote_runtime::worker::Activation::Serve
        ))
    }

    /// Everything `ZYGOTE_ATTACH` said: entry, worker, args, listeners, runtime_dir,
    /// model_path, model_digest, device.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let w = self.lock();
        let i = w.info();
        let d = PyDict::new(py);
        d.set_item("entry", &i.entry)?;
        d.set_item("worker", i.worker.0)?;
        d.set_item("args", i.args.clone())?;
        d.set_item("listeners", i.listeners)?;
        d.set_item("runtime_dir", i.runtime_dir.to_string_lossy().to_string())?;
        d.set_item("model_path", i.model_path.to_string_lossy().to_string())?;
        d.set_item("model_digest", &i.model_digest)?;
        d.set_item("device", i.device)?;
        Ok(d)
    }

    /// Hands over the listening sockets' fds (the caller owns them from now on; wrap them with
    /// `socket.socket(fileno=fd)`). A second call returns an empty list.
    fn take_listener_fds(&self) -> Vec<i32> {
        self.lock()
            .take_listeners()
            .into_iter()
            .map(|l| l.into_raw_fd())
            .collect()
    }

    /// Imports the owner's weights (waiting up to `timeout` seconds for an owner) and verifies
    /// them against the model before returning them.
    #[pyo3(signature = (timeout=60.0))]
    fn import_weights(&self, py: Python<'_>, timeout: f64) -> PyResult<SharedWeights> {
        let weights = py
            .detach(|| self.lock().import_weights(Duration::from_secs_f64(timeout)))
            .map_err(errors::worker)?;
        Ok(SharedWeights::new(weights))
    }

    /// Tells the supervisor this worker serves (`generation`: the weights it imported).
    #[pyo3(signature = (generation=None, detail=""))]
    fn ready(&self, generation: Option<u64>, detail: &str) -> PyResult<()> {
        self.lock()
            .ready(generation, detail)
            .map_err(errors::worker)
    }

    /// Tells the supervisor this worker is alive; `served` counts requests answered so far.
    #[pyo3(signature = (served=0))]
    fn heartbeat(&self, served: u64) -> PyResult<()> {
        self.lock().heartbeat(served).map_err(errors::worker)
    }

    /// Tells the supervisor this worker stopped accepting and finishes `in_flight` requests.
    #[pyo3(signature = (in_flight=0))]
    fn draining(&self, in_flight: u32) -> PyResult<()> {
        self.lock().draining(in_flight).map_err(errors::worker)
    }

    /// The control channel's fd, for an app's own poll loop (readable: call `poll_control`).
    fn control_fd(&self) -> i32 {
        self.control.as_raw_fd()
    }

    /// One pending message from the supervisor without blocking: `None`, or
    /// `{"type": "drain", "deadline_ms": N}`. Raises `OrphanedError` once the supervisor is gone.
    fn poll_control<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let msg = self.lock().poll_control().map_err(errors::worker)?;
        message(py, msg)
    }

    /// Waits up to `timeout` seconds (GIL released) for a message from the supervisor, then
    /// returns it as `poll_control` does.
    #[pyo3(signature = (timeout=1.0))]
    fn wait_control<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let ms = (timeout.max(0.0) * 1000.0).min(i32::MAX as f64) as i32;
        py.detach(|| {
            let mut fds = [PollFd::new(self.control.as_fd(), PollFlags::POLLIN)];
            let t = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, t) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| errors::ZygoteError::new_err(format!("polling the control channel: {e}")))?;
        self.poll_control(py)
    }
}

/// A control message as a Python dict.
fn message(py: Python<'_>, msg: Option<ParentMessage>) -> PyResult<Option<Bound<'_, PyDict>>> {
    match msg {
        None => Ok(None),
        Some(ParentMessage::Drain { deadline_ms }) => {
            let d = PyDict::new(py);
            d.set_item("type", "drain")?;
            d.set_item("deadline_ms", deadline_ms)?;
            Ok(Some(d))
        }
        // Only a spare is sent `activate`, and `wait_activation` reads it: a message seen here
        // came after the activation (none is sent twice), so it is only shown.
        Some(ParentMessage::Activate { worker }) => {
            let d = PyDict::new(py);
            d.set_item("type", "activate")?;
            d.set_item("worker", worker.0)?;
            Ok(Some(d))
        }
    }
}
