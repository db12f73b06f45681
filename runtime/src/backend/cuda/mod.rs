//! The CUDA backend: device arenas shared by VMM fds or legacy IPC handles.
//!
//! NOTE: placeholder until the CUDA backend lands; it refuses every use with a clear error.

use std::os::fd::OwnedFd;

use super::{BackendError, Manifest};

/// Weights a worker imported into its own CUDA context.
#[derive(Debug)]
pub struct CudaWeights {
    manifest: Manifest,
}

impl CudaWeights {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// Worker side import.
pub fn import(_manifest: Manifest, _fds: Vec<OwnedFd>) -> Result<CudaWeights, BackendError> {
    Err(BackendError::CudaUnavailable("this build has no CUDA backend yet".into()))
}
