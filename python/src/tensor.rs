//! One shared tensor as a Python object, [`SharedTensor`]: exported by DLPack
//! (`__dlpack__`, `__dlpack_device__`) and, for host tensors, by the buffer protocol. The
//! buffer slot is an `unsafe` function by PyO3's contract, so this module allows `unsafe`
//! for that slot alone; the pointer work is in `buffer.rs` and `dlpack.rs`.

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::sync::Arc;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use zygote_runtime::backend::Weights;

use crate::{buffer, dlpack};

/// One tensor of the compute copy: where it is and what it is.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub ptr: usize,
    pub len: usize,
    pub arena: u32,
}

fn itemsize(dtype: &str) -> usize {
    zygote_runtime::model::Dtype::parse(dtype).map_or(1, |d| d.size())
}

/// One shared tensor: read-only, in the shared mapping, never copied.
#[pyclass(frozen, module = "zygote._native")]
#[derive(Debug)]
pub struct SharedTensor {
    owner: Arc<Weights>,
    entry: Entry,
    device: (i32, i32),
    buf_shape: Vec<isize>,
    buf_strides: Vec<isize>,
}

impl SharedTensor {
    /// The tensor `entry` of `owner`'s weights, on DLPack device `device`.
    pub fn new(owner: Arc<Weights>, entry: Entry, device: (i32, i32)) -> Self {
        let size = itemsize(&entry.dtype) as isize;
        let buf_shape: Vec<isize> = entry.shape.iter().map(|&d| d as isize).collect();
        let mut buf_strides = vec![size; buf_shape.len()];
        for k in (0..buf_shape.len().saturating_sub(1)).rev() {
            buf_strides[k] = buf_strides[k + 1] * buf_shape[k + 1];
        }
        Self {
            owner,
            entry,
            device,
            buf_shape,
            buf_strides,
        }
    }
}

#[pymethods]
impl SharedTensor {
    #[getter]
    fn name(&self) -> String {
        self.entry.name.clone()
    }

    /// The safetensors dtype of the compute copy (`"F32"`, `"I64"`, ...).
    #[getter]
    fn dtype(&self) -> String {
        self.entry.dtype.clone()
    }

    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.entry.shape.iter().copied())
    }

    /// The address of the first byte (a host or device address).
    #[getter]
    fn data_ptr(&self) -> usize {
        self.entry.ptr
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.entry.len
    }

    /// The arena (index into `SharedWeights.ranges()`) the tensor lies in.
    #[getter]
    fn arena(&self) -> u32 {
        self.entry.arena
    }

    /// DLPack's `(device_type, device_id)`: `(1, 0)` for CPU, `(2, N)` for CUDA device N.
    fn __dlpack_device__(&self) -> (i32, i32) {
        self.device
    }

    /// A DLPack capsule over the shared bytes (the array API's `__dlpack__`). The weights are
    /// static and were synchronised when imported, so `stream` needs no wait; `copy=True` is
    /// refused, since zygote never copies shared weights.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream;
        if copy == Some(true) {
            return Err(PyBufferError::new_err(format!(
                "{}: zygote hands out the shared weights without copying; copy the tensor \
                 after importing it if you need a private one",
                self.entry.name
            )));
        }
        if let Some(want) = dl_device {
            if want != self.device {
                return Err(PyBufferError::new_err(format!(
                    "{}: the shared tensor lives on DLPack device {:?}, not {:?}",
                    self.entry.name, self.device, want
                )));
            }
        }
        let Some(dtype) = dlpack::dtype_code(&self.entry.dtype) else {
            return Err(PyBufferError::new_err(format!(
                "{}: dtype {} has no DLPack type code",
                self.entry.name, self.entry.dtype
            )));
        };
        let d = dlpack::Describe {
            ptr: self.entry.ptr,
            shape: self.entry.shape.clone(),
            device: self.device,
            dtype,
        };
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        dlpack::capsule(py, &d, self.owner.clone(), versioned)
    }

    /// The buffer protocol (host tensors only): read-only, over the shared mapping.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if this.device.0 != dlpack::DL_CPU {
            return Err(PyBufferError::new_err(format!(
                "{} is a CUDA tensor: use torch.from_dlpack (the buffer protocol is host memory)",
                this.entry.name
            )));
        }
        let Some(format) = buffer::format(&this.entry.dtype) else {
            return Err(PyBufferError::new_err(format!(
                "{}: dtype {} has no buffer format; use torch.from_dlpack",
                this.entry.name, this.entry.dtype
            )));
        };
        let v = buffer::View {
            ptr: this.entry.ptr,
            len: this.entry.len,
            itemsize: itemsize(&this.entry.dtype),
            format,
            shape: &this.buf_shape,
            strides: &this.buf_strides,
        };
        // SAFETY: `view` is the pointer Python passed to this slot; the shape and stride
        // slices belong to `this`, which the view keeps alive through `obj`.
        unsafe { buffer::fill(view, flags, &v, slf.clone().into_any()) }
    }

    fn __repr__(&self) -> String {
        format!(
            "<zygote SharedTensor {} {} {:?} at {:#x}>",
            self.entry.name, self.entry.dtype, self.entry.shape, self.entry.ptr
        )
    }
}
