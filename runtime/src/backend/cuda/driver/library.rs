//! Loading libcuda: the entry points the backend needs, checked before `cuInit`, and the
//! [`Driver`] token that proves it was done (and opens the devices and their contexts).

use std::ffi::c_int;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use crate::backend::{BackendError, CudaUnavailable};

use super::{check, cudarc_failure, Device, DriverFailure};

/// The driver entry points this backend and the parts of cudarc it uses call. `Driver::load`
/// refuses a libcuda that lacks one, instead of letting cudarc panic in the middle of a call.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetUuid",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemGetAllocationGranularity",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemExportToShareableHandle",
    "cuMemImportFromShareableHandle",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoH_v2",
];

/// Whether [`Driver::load`] succeeded in this process (and why not), once it was called.
static LOADED: OnceLock<Result<(), CudaUnavailable>> = OnceLock::new();

/// Proof that libcuda is loaded, complete, and initialised in this process.
#[derive(Debug, Clone, Copy)]
pub struct Driver {
    _private: (),
}

impl Driver {
    /// Loads libcuda and calls `cuInit`. Every failure is [`BackendError::CudaUnavailable`]
    /// with the reason, and nothing panics. The result is remembered.
    pub fn load() -> Result<Driver, BackendError> {
        LOADED
            .get_or_init(load_uncached)
            .clone()
            .map(|()| Driver { _private: () })
            .map_err(BackendError::CudaUnavailable)
    }

    /// `cuDriverGetVersion`, e.g. 12080 for 12.8.
    pub fn version(&self) -> Result<i32, DriverFailure> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer; the library is loaded (`self` exists).
        check("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut v)
        })?;
        Ok(v)
    }

    /// `cuDeviceGetCount`.
    pub fn device_count(&self) -> Result<u32, DriverFailure> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out pointer; the driver is initialised (`self` exists).
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
        Ok(n.max(0) as u32)
    }

    /// The device with this ordinal.
    pub fn device(&self, ordinal: u32) -> Result<Device, DriverFailure> {
        let mut raw: sys::CUdevice = 0;
        // SAFETY: `raw` is a valid out pointer; the driver is initialised (`self` exists).
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut raw, ordinal as c_int)
        })?;
        Ok(Device::new(ordinal, raw))
    }

    /// Retains the device's primary context (what cudarc's `CudaContext::new` does) and makes
    /// it current on this thread.
    pub fn primary_context(&self, ordinal: u32) -> Result<Arc<CudaContext>, DriverFailure> {
        CudaContext::new(ordinal as usize).map_err(cudarc_failure("cuDevicePrimaryCtxRetain"))
    }
}

fn load_uncached() -> Result<(), CudaUnavailable> {
    // SAFETY: `is_culib_present` only tries to dlopen each candidate name of libcuda and drops
    // the handle again; it calls no CUDA function.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::NoLibrary);
    }
    // SAFETY: the library loads (just checked), so `culib` returns it instead of panicking.
    let lib = unsafe { sys::culib() };
    let missing: Vec<&'static str> = REQUIRED_SYMBOLS
        .iter()
        .copied()
        .filter(|name| {
            // SAFETY: the symbol is only looked up, never called through this type.
            unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err()
        })
        .collect();
    if !missing.is_empty() {
        return Err(CudaUnavailable::MissingSymbols { missing });
    }
    // SAFETY: every symbol is present, so cudarc's lazy lookup of `cuInit` cannot panic.
    let code = unsafe { sys::cuInit(0) };
    check("cuInit", code).map_err(|f| CudaUnavailable::Init {
        code: f.code as u32,
        message: f.describe(),
    })
}

/// Whether [`Driver::load`] succeeded in this process (only then can the driver name its codes).
pub(super) fn loaded() -> bool {
    matches!(LOADED.get(), Some(Ok(())))
}
