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
    Err(BackendError::CudaUnavailable(
        "this build has no CUDA backend yet".into(),
    ))
}

/// Chooses the owner's backend. Placeholder: host only until the CUDA backend lands.
pub fn select_backend(
    choice: super::BackendChoice,
    _ipc: super::IpcChoice,
    _device: u32,
) -> Result<Box<dyn super::DeviceBackend>, BackendError> {
    match choice {
        super::BackendChoice::Cuda => Err(BackendError::CudaUnavailable(
            "this build has no CUDA backend yet".into(),
        )),
        super::BackendChoice::Auto => {
            log::info!("backend auto: no CUDA backend in this build, using host");
            Ok(Box::new(super::host::HostBackend))
        }
        super::BackendChoice::Host => Ok(Box::new(super::host::HostBackend)),
    }
}
