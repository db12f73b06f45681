//! DLPack capsules over the shared weights (an `unsafe` leaf).
//!
//! `torch.from_dlpack(t)` calls `t.__dlpack__(...)`, which lands in [`capsule`]: it builds a
//! `DLManagedTensor` (or, when the consumer asks for DLPack 1.x, a `DLManagedTensorVersioned`
//! with the read-only flag set) whose data pointer is the tensor's address inside the shared
//! mapping (host) or the imported device memory (CUDA). Nothing is copied. The managed
//! tensor's `manager_ctx` owns a [`Keep`]: a clone of the `Arc` that owns the mapping, plus the
//! shape array the tensor points at. Its deleter drops both, so the mapping lives as long as
//! any tensor made from it, however long the Python objects that made it live.
//!
//! The capsule protocol (DLPack's `python_spec`): the capsule is named `dltensor`
//! (`dltensor_versioned`); a consumer that takes ownership renames it `used_dltensor`
//! (`used_dltensor_versioned`) and calls the deleter itself later. The capsule's own destructor
//! calls the deleter only when the capsule was never consumed.

#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;

/// DLPack's device types (`DLDeviceType`) used here.
pub const DL_CPU: i32 = 1;
pub const DL_CUDA: i32 = 2;

/// DLPack's type codes (`DLDataTypeCode`).
const DL_INT: u8 = 0;
const DL_UINT: u8 = 1;
const DL_FLOAT: u8 = 2;
const DL_BFLOAT: u8 = 4;
const DL_BOOL: u8 = 6;

/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const FLAG_READ_ONLY: u64 = 1;

/// The DLPack version this module writes into versioned capsules.
const VERSION: DLPackVersion = DLPackVersion { major: 1, minor: 0 };

const NAME: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// What a managed tensor keeps alive: the owner of the memory and the shape array.
struct Keep {
    _owner: Arc<dyn Send + Sync>,
    shape: Vec<i64>,
}

/// Where a tensor's bytes are and what they are, for DLPack.
#[derive(Debug, Clone)]
pub struct Describe {
    /// Address of the first byte (host address, or device address in the primary context).
    pub ptr: usize,
    pub shape: Vec<u64>,
    /// `(device_type, device_id)`.
    pub device: (i32, i32),
    /// `(code, bits)`, from [`dtype_code`].
    pub dtype: (u8, u8),
}

/// DLPack's `(code, bits)` for a safetensors dtype, or `None` when DLPack 1.0 has no code
/// for it (the float8 kinds).
pub fn dtype_code(dtype: &str) -> Option<(u8, u8)> {
    Some(match dtype {
        "BOOL" => (DL_BOOL, 8),
        "U8" => (DL_UINT, 8),
        "I8" => (DL_INT, 8),
        "I16" => (DL_INT, 16),
        "U16" => (DL_UINT, 16),
        "F16" => (DL_FLOAT, 16),
        "BF16" => (DL_BFLOAT, 16),
        "I32" => (DL_INT, 32),
        "U32" => (DL_UINT, 32),
        "F32" => (DL_FLOAT, 32),
        "I64" => (DL_INT, 64),
        "U64" => (DL_UINT, 64),
        "F64" => (DL_FLOAT, 64),
        _ => return None,
    })
}

/// A capsule for `d`, keeping `owner` alive until the consumer's tensor is freed. `versioned`:
/// a DLPack 1.0 capsule with the read-only flag; otherwise the legacy (0.x) kind.
pub fn capsule(
    py: Python<'_>,
    d: &Describe,
    owner: Arc<dyn Send + Sync>,
    versioned: bool,
) -> PyResult<Py<PyAny>> {
    let shape: Vec<i64> = d.shape.iter().map(|&x| x as i64).collect();
    let ndim = shape.len() as i32;
    let keep = Box::new(Keep {
        _owner: owner,
        shape,
    });
    let keep = Box::into_raw(keep);
    let tensor = DLTensor {
        data: d.ptr as *mut c_void,
        device: DLDevice {
            device_type: d.device.0,
            device_id: d.device.1,
        },
        ndim,
        dtype: DLDataType {
            code: d.dtype.0,
            bits: d.dtype.1,
            lanes: 1,
        },
        // SAFETY: `keep` was just made by Box::into_raw and is freed only by the deleter; its
        // shape vector is never resized, so the pointer stays valid as long as the tensor.
        shape: unsafe { (*keep).shape.as_mut_ptr() },
        // Null strides: compact row-major, which every shared tensor is.
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    let (ptr, name): (*mut c_void, &CStr) = if versioned {
        let m = Box::new(DLManagedTensorVersioned {
            version: VERSION,
            manager_ctx: keep.cast(),
            deleter: Some(delete_versioned),
            flags: FLAG_READ_ONLY,
            dl_tensor: tensor,
        });
        (Box::into_raw(m).cast(), NAME_VERSIONED)
    } else {
        let m = Box::new(DLManagedTensor {
            dl_tensor: tensor,
            manager_ctx: keep.cast(),
            deleter: Some(delete_legacy),
        });
        (Box::into_raw(m).cast(), NAME)
    };
    let destructor: ffi::PyCapsule_Destructor = if versioned {
        capsule_destructor_versioned
    } else {
        capsule_destructor_legacy
    };
    // SAFETY: `ptr` is a live managed tensor owned by the capsule until a consumer renames it;
    // `name` is a 'static C string, as PyCapsule_New requires (it keeps the pointer).
    let raw = unsafe { ffi::PyCapsule_New(ptr, name.as_ptr(), Some(destructor)) };
    if raw.is_null() {
        // The capsule was not made: free what it would have owned.
        if versioned {
            // SAFETY: `ptr` came from Box::into_raw of a DLManagedTensorVersioned just above
            // and nothing else refers to it.
            unsafe { delete_versioned(ptr.cast()) };
        } else {
            // SAFETY: as above, for the legacy kind.
            unsafe { delete_legacy(ptr.cast()) };
        }
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `raw` is a new, non-null reference returned by PyCapsule_New.
    Ok(unsafe { Bound::from_owned_ptr(py, raw) }.unbind())
}

/// The legacy deleter: frees the managed tensor and what it keeps alive.
unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    if m.is_null() {
        return;
    }
    // SAFETY: the caller hands back a managed tensor made by `capsule` (Box::into_raw), once,
    // as DLPack requires; its manager_ctx is the Box<Keep> made there.
    let m = unsafe { Box::from_raw(m) };
    // SAFETY: as above: manager_ctx is a Box<Keep> not yet freed.
    drop(unsafe { Box::from_raw(m.manager_ctx.cast::<Keep>()) });
}

/// The versioned deleter: as [`delete_legacy`].
unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    if m.is_null() {
        return;
    }
    // SAFETY: the caller hands back a managed tensor made by `capsule` (Box::into_raw), once.
    let m = unsafe { Box::from_raw(m) };
    // SAFETY: as above: manager_ctx is a Box<Keep> not yet freed.
    drop(unsafe { Box::from_raw(m.manager_ctx.cast::<Keep>()) });
}

/// Runs when a legacy capsule is garbage collected: frees the tensor unless it was consumed.
unsafe extern "C" fn capsule_destructor_legacy(capsule: *mut ffi::PyObject) {
    // SAFETY: Python calls this with the capsule being destroyed; IsValid only reads its name.
    if unsafe { ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) } == 1 {
        // SAFETY: the name is still `dltensor`, so no consumer took the tensor: it is ours.
        let ptr = unsafe { ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()) };
        // SAFETY: the pointer is the managed tensor `capsule` stored, not freed by anyone.
        unsafe { delete_legacy(ptr.cast()) };
    }
}

/// Runs when a versioned capsule is garbage collected: frees the tensor unless it was consumed.
unsafe extern "C" fn capsule_destructor_versioned(capsule: *mut ffi::PyObject) {
    // SAFETY: Python calls this with the capsule being destroyed; IsValid only reads its name.
    if unsafe { ffi::PyCapsule_IsValid(capsule, NAME_VERSIONED.as_ptr()) } == 1 {
        // SAFETY: the name is unchanged, so no consumer took the tensor: it is ours.
        let ptr = unsafe { ffi::PyCapsule_GetPointer(capsule, NAME_VERSIONED.as_ptr()) };
        // SAFETY: the pointer is the managed tensor `capsule` stored, not freed by anyone.
        unsafe { delete_versioned(ptr.cast()) };
    }
}
