//! One CUDA device: what it is (uuid, name, memory, attributes), as the driver says.

use std::ffi::{c_int, CStr};

use cudarc::driver::sys;

use super::{check, DriverFailure};

/// A CUDA device (ordinal and driver handle).
#[derive(Debug, Clone, Copy)]
pub struct Device {
    ordinal: u32,
    raw: sys::CUdevice,
}

impl Device {
    /// A device that `cuDeviceGet` returned for `ordinal` (only [`super::Driver::device`] has one).
    pub(super) fn new(ordinal: u32, raw: sys::CUdevice) -> Self {
        Self { ordinal, raw }
    }

    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// `cuDeviceGetUuid`: the 16 bytes `nvidia-smi -L` shows.
    pub fn uuid(&self) -> Result<[u8; 16], DriverFailure> {
        let mut u = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: `u` is a valid out pointer; `raw` came from `cuDeviceGet`.
        check("cuDeviceGetUuid", unsafe {
            sys::cuDeviceGetUuid(&mut u, self.raw)
        })?;
        Ok(u.bytes.map(|b| b as u8))
    }

    /// `cuDeviceGetName`.
    pub fn name(&self) -> Result<String, DriverFailure> {
        let mut buf = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer holds `buf.len()` bytes and the driver writes a nul-terminated
        // name of at most that many.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, self.raw)
        })?;
        // SAFETY: the driver nul-terminated the name inside `buf`.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(name.to_string_lossy().into_owned())
    }

    /// `cuDeviceTotalMem`, in bytes.
    pub fn total_mem(&self) -> Result<u64, DriverFailure> {
        let mut n: usize = 0;
        // SAFETY: `n` is a valid out pointer; `raw` came from `cuDeviceGet`.
        check("cuDeviceTotalMem", unsafe {
            sys::cuDeviceTotalMem_v2(&mut n, self.raw)
        })?;
        Ok(n as u64)
    }

    /// `cuDeviceGetAttribute`.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32, DriverFailure> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer; `raw` came from `cuDeviceGet`.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut v, attr, self.raw)
        })?;
        Ok(v)
    }
}
