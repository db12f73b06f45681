//! The package's exception types and the mapping of the runtime's errors onto them. Every
//! message says what failed and, where there is one, what to do about it.

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::PyErr;
use zygote_runtime::WorkerError;

create_exception!(
    _native,
    ZygoteError,
    PyRuntimeError,
    "Base class of every error raised by the zygote package."
);
create_exception!(
    _native,
    NotAttachedError,
    ZygoteError,
    "This process was not started by zygote (and did not call zygote.connect())."
);
create_exception!(
    _native,
    OrphanedError,
    ZygoteError,
    "The supervisor is gone: the worker should exit."
);
create_exception!(
    _native,
    WeightsError,
    ZygoteError,
    "The shared weights could not be reached, imported or verified."
);

/// The Python exception for a worker API error.
pub fn worker(e: WorkerError) -> PyErr {
    match e {
        WorkerError::NotAttached => NotAttachedError::new_err(format!(
            "{e}. To serve an app, run it with `zygote start --model PATH --app MODULE:ATTR`; \
             to use the weights of a running service from any process, call zygote.connect()"
        )),
        WorkerError::Orphaned => OrphanedError::new_err(e.to_string()),
        WorkerError::OwnerUnreachable { .. } | WorkerError::Import(_) | WorkerError::Owner(_) => {
            WeightsError::new_err(e.to_string())
        }
        other => ZygoteError::new_err(other.to_string()),
    }
}
