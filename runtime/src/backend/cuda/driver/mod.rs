//! The unsafe leaf of the CUDA backend: thin safe wrappers over the CUDA driver API
//! (`cudarc::driver::sys`, loaded at run time).
//!
//! Everything else in the backend goes through this module, which owns three rules:
//!
//! - **Nothing touches CUDA before [`Driver::load`].** cudarc panics when libcuda or one of its
//!   symbols is missing, so `load` checks for the library and every entry point this backend
//!   (and the parts of cudarc it uses) calls before `cuInit`, and all other entry points need
//!   a [`Driver`] token or a context that could only have been made with one. Only the owner
//!   and the workers ever call `load`: the zygote and the supervisor must never map libcuda.
//! - **Every device resource is a value that releases it on drop**, and keeps its context
//!   alive (`Arc<CudaContext>`) until then: [`VmmArena`] (`cuMemCreate` or
//!   `cuMemImportFromShareableHandle`, reserve, map, access), [`LegacyArena`] (`cuMemAlloc`),
//!   [`LegacyImport`] (`cuIpcOpenMemHandle`), and the pinned buffers of a [`Stager`].
//! - **Host memory handed to an asynchronous copy is not touched until the copy is done.**
//!   [`Stager`] owns its two pinned bounce buffers and an event per buffer, and only lends a
//!   buffer to the caller after the event that follows its last copy has completed.
//!
//! Contexts are cudarc's [`CudaContext`] on the device's primary context, so the streams and
//! cuBLAS handles an app makes with cudarc see the same address space as the arenas.
//!
//! Every raw driver call of the project is in this module and its files, hence
//! `#[allow(unsafe_code)]` here alone in the backend.
//!
//! The leaf is split by what each part wraps: `library.rs` loads libcuda and hands out the
//! [`Driver`] token; `device.rs` asks a [`Device`] what it is; `vmm.rs` makes, imports,
//! exports and maps VMM allocations ([`VmmArena`]); `legacy.rs` allocates and opens legacy IPC
//! memory ([`LegacyArena`], [`LegacyImport`]); `copy.rs` moves bytes between host and device
//! ([`read`], [`Stager`]). This file holds what they share: the error of a driver call and the
//! [`DeviceMemory`] trait.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, DriverError};

use crate::backend::BackendError;

mod copy;
mod device;
mod legacy;
mod library;
mod vmm;

pub use copy::{read, Stager};
pub use device::Device;
pub use legacy::{LegacyArena, LegacyImport};
pub use library::Driver;
pub use vmm::{vmm_granularity, Access, VmmArena};

/// A driver call that failed: which call, and its `CUresult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverFailure {
    pub call: &'static str,
    pub code: CUresult,
}

impl DriverFailure {
    /// The error's name and description, as the driver spells them.
    pub fn describe(&self) -> String {
        // Only a loaded driver can name its codes (asking an absent one would panic in cudarc).
        if !library::loaded() {
            return format!("{:?}", self.code);
        }
        let e = DriverError(self.code);
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", self.code));
        match e.error_string() {
            Ok(s) => format!("{name}: {}", s.to_string_lossy()),
            Err(_) => name,
        }
    }
}

impl From<DriverFailure> for BackendError {
    fn from(f: DriverFailure) -> Self {
        BackendError::Cuda {
            call: f.call,
            code: f.code as u32,
            message: f.describe(),
        }
    }
}

fn check(call: &'static str, code: CUresult) -> Result<(), DriverFailure> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DriverFailure { call, code })
    }
}

/// Maps an error of cudarc's safe layer.
fn cudarc_failure(call: &'static str) -> impl Fn(DriverError) -> DriverFailure {
    move |e| DriverFailure { call, code: e.0 }
}

/// Something that occupies a range of device addresses in a context.
pub trait DeviceMemory {
    /// The first device address.
    fn ptr(&self) -> sys::CUdeviceptr;
    /// Bytes mapped from `ptr`.
    fn size(&self) -> u64;
    /// The context the addresses belong to.
    fn context(&self) -> &Arc<CudaContext>;
}

fn bind(ctx: &CudaContext) -> Result<(), DriverFailure> {
    ctx.bind_to_thread()
        .map_err(cudarc_failure("cuCtxSetCurrent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_call_and_the_code() {
        let f = DriverFailure {
            call: "cuMemCreate",
            code: CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        };
        match BackendError::from(f) {
            BackendError::Cuda {
                call,
                code,
                message,
            } => {
                assert_eq!(call, "cuMemCreate");
                assert_eq!(code, CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32);
                // Without libcuda the driver cannot name the code; the enum's name stands in.
                assert!(message.contains("OUT_OF_MEMORY"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
