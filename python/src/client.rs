//! Client mode: the shared weights of a running service, in a process zygote did not start
//! (a gunicorn worker in its `post_fork` hook, a Celery worker, a notebook).
//!
//! The process connects to the service's `zygote.sock` like any client (the zygote checks its
//! uid with `SO_PEERCRED`, and only the service's own uid may fetch weights), asks for the
//! zygote's state (the model's path and digest, the zygote's own record) and for the
//! generation the zygote keeps of the owner's export (`fetch_weights`), then imports and
//! verifies it exactly as a worker does. The verification needs the model's tensor index:
//! when the weights are the model memfd itself (host backend, nothing to convert), that memfd
//! is the model; otherwise the model file is read once for the check and dropped.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use zygote_runtime::backend::{self, Manifest};
use zygote_runtime::client::ZygoteClient;
use zygote_runtime::protocol::{Backend, ZygoteStatus};
use zygote_runtime::rundir::ZYGOTE_SOCKET;
use zygote_runtime::Model;

use crate::errors::{WeightsError, ZygoteError};
use crate::weights::SharedWeights;

/// `$XDG_RUNTIME_DIR/zygote` when that is set, else `/tmp/zygote-UID` (as `zygote start`).
#[pyfunction]
pub fn default_runtime_dir() -> String {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("zygote"),
        _ => PathBuf::from(format!("/tmp/zygote-{}", nix::unistd::getuid().as_raw())),
    }
    .to_string_lossy()
    .into_owned()
}

/// Imports the weights a running service keeps for `device`, waiting up to `timeout` seconds
/// for its owner to have exported them.
#[pyfunction]
#[pyo3(signature = (runtime_dir, device=0, timeout=30.0))]
pub fn connect_weights(
    py: Python<'_>,
    runtime_dir: PathBuf,
    device: u32,
    timeout: f64,
) -> PyResult<SharedWeights> {
    zygote_runtime::logging::init("client");
    let weights = py.detach(|| fetch(&runtime_dir, device, Duration::from_secs_f64(timeout)))?;
    Ok(SharedWeights::new(weights))
}

fn fetch(dir: &Path, device: u32, timeout: Duration) -> PyResult<backend::Weights> {
    let socket = dir.join(ZYGOTE_SOCKET);
    let start = Instant::now();
    loop {
        let mut client = ZygoteClient::connect(&socket, "python-client").map_err(|e| {
            ZygoteError::new_err(format!(
                "cannot reach a zygote at {}: {e}. Start the service first (`zygote start \
                 --model PATH --workers 0` runs it without workers), or pass its runtime_dir",
                socket.display()
            ))
        })?;
        let status = client
            .status()
            .map_err(|e| ZygoteError::new_err(format!("zygote status: {e}")))?;
        let kept = client.fetch_weights(device).map_err(|e| {
            WeightsError::new_err(format!(
                "fetching the weights of device {device} from {}: {e} (only the service's own \
                 user may use its weights)",
                socket.display()
            ))
        })?;
        match kept {
            Some((manifest, fds)) => return import(&status, manifest, fds),
            None if start.elapsed() >= timeout => {
                return Err(WeightsError::new_err(format!(
                    "the zygote at {} keeps no weights for device {device} after {:?}: is its \
                     owner up (`zygote status`)?",
                    socket.display(),
                    start.elapsed()
                )))
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn import(
    status: &ZygoteStatus,
    manifest: Manifest,
    fds: Vec<OwnedFd>,
) -> PyResult<backend::Weights> {
    let path = PathBuf::from(&status.model_path);
    if manifest.model_digest != status.model_digest {
        return Err(WeightsError::new_err(format!(
            "the kept weights were built from model {}, the zygote serves {}",
            manifest.model_digest, status.model_digest
        )));
    }
    // The weights are the model memfd itself: it is the model, sealed, hashed by the zygote.
    let in_place = manifest.backend == Backend::Host
        && manifest.content_digest == status.model_digest
        && fds.len() == 1;
    let model = if in_place {
        let dup = fds[0]
            .try_clone()
            .map_err(|e| WeightsError::new_err(format!("dup of the weights memfd: {e}")))?;
        Model::from_memfd(dup, &path, &status.model_digest)
    } else {
        Model::load(&path)
    }
    .map_err(|e| WeightsError::new_err(format!("the model for the check: {e}")))?;
    if model.digest() != status.model_digest {
        return Err(WeightsError::new_err(format!(
            "{} changed since the service started (digest {}, the service's {})",
            path.display(),
            model.digest(),
            status.model_digest
        )));
    }
    backend::import(manifest, fds, &model).map_err(|e| WeightsError::new_err(e.to_string()))
}
