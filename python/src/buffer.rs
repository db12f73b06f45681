//! The buffer protocol over a host tensor (an `unsafe` leaf): `numpy.asarray(t)` and
//! `memoryview(t)` see the shared mapping itself, read-only, with no copy.
//!
//! The view's `obj` holds a reference to the tensor object, which owns the mapping (through an
//! `Arc`) and the shape and stride arrays the view points at, so both outlive every view.

#![allow(unsafe_code)]

use std::ffi::{c_int, CStr};

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// The `struct` module's format character for a safetensors dtype, or `None` (bf16, float8:
/// no format character exists; use DLPack for those).
pub fn format(dtype: &str) -> Option<&'static CStr> {
    Some(match dtype {
        "BOOL" => c"?",
        "U8" => c"B",
        "I8" => c"b",
        "I16" => c"h",
        "U16" => c"H",
        "F16" => c"e",
        "I32" => c"i",
        "U32" => c"I",
        "F32" => c"f",
        "I64" => c"q",
        "U64" => c"Q",
        "F64" => c"d",
        _ => return None,
    })
}

/// What a view describes; the slices must live as long as `owner`.
#[derive(Debug)]
pub struct View<'a> {
    pub ptr: usize,
    pub len: usize,
    pub itemsize: usize,
    pub format: &'static CStr,
    pub shape: &'a [isize],
    pub strides: &'a [isize],
}

/// Fills `view` (from `__getbuffer__`) read-only over `v`, owned by `owner`.
///
/// # Safety
///
/// `view` must be the pointer Python passed to `__getbuffer__`, and `v`'s slices must be owned
/// by `owner` (they are read through `view` as long as it holds `owner`).
pub unsafe fn fill(
    view: *mut ffi::Py_buffer,
    flags: c_int,
    v: &View<'_>,
    owner: Bound<'_, PyAny>,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("no buffer view to fill"));
    }
    if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
        return Err(PyBufferError::new_err(
            "shared weights are read-only: every worker maps the same bytes (copy the array \
             first if you need to change it)",
        ));
    }
    // SAFETY: `view` is non-null and Python's to fill, per this function's contract.
    let view = unsafe { &mut *view };
    view.obj = owner.into_ptr();
    view.buf = v.ptr as *mut std::ffi::c_void;
    view.len = v.len as isize;
    view.readonly = 1;
    view.itemsize = v.itemsize as isize;
    view.format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
        v.format.as_ptr() as *mut _
    } else {
        std::ptr::null_mut()
    };
    view.ndim = v.shape.len() as c_int;
    view.shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
        v.shape.as_ptr() as *mut _
    } else {
        std::ptr::null_mut()
    };
    view.strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
        v.strides.as_ptr() as *mut _
    } else {
        std::ptr::null_mut()
    };
    view.suboffsets = std::ptr::null_mut();
    view.internal = std::ptr::null_mut();
    Ok(())
}
