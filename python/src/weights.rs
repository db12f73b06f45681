//! The imported weights as a Python object: [`SharedWeights`], every tensor of one generation
//! (each one a [`SharedTensor`], in `tensor.rs`).
//!
//! Both hold an `Arc` of the runtime's `Weights`, which owns the mapping (host) or the device
//! mappings (CUDA); a DLPack capsule holds one more clone, so the memory is unmapped only when
//! the last Python object and the last consumer tensor over it are gone.

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use zygote_runtime::backend::Weights;

use crate::dlpack;
use crate::tensor::{Entry, SharedTensor};

/// Every tensor of one imported generation of weights.
#[pyclass(frozen, module = "zygote._native")]
#[derive(Debug)]
pub struct SharedWeights {
    weights: Arc<Weights>,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    device: (i32, i32),
}

impl SharedWeights {
    /// Wraps imported weights; every tensor's address is computed once, here.
    pub fn new(weights: Weights) -> Self {
        let manifest = weights.manifest().clone();
        let mut entries = Vec::with_capacity(manifest.tensors.len());
        let device = match &weights {
            Weights::Host(_) => (dlpack::DL_CPU, 0),
            Weights::Cuda(c) => (dlpack::DL_CUDA, c.ordinal() as i32),
        };
        for t in &manifest.tensors {
            let ptr = match &weights {
                Weights::Host(h) => h.tensor(&t.name).map(|x| x.bytes.as_ptr() as usize),
                Weights::Cuda(c) => c.tensor(&t.name).map(|x| x.ptr as usize),
            };
            // The import verified the manifest, so every tensor it lists is there.
            let Some(ptr) = ptr else { continue };
            entries.push(Entry {
                name: t.name.clone(),
                dtype: t.dtype.to_string(),
                shape: t.shape.clone(),
                ptr,
                len: t.len as usize,
                arena: t.arena,
            });
        }
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Self {
            weights: Arc::new(weights),
            entries,
            by_name,
            device,
        }
    }

    fn tensor_at(&self, i: usize) -> SharedTensor {
        let e = &self.entries[i];
        SharedTensor::new(self.weights.clone(), e.clone(), self.device)
    }
}

#[pymethods]
impl SharedWeights {
    /// Tensor names, in the order of the manifest.
    fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// One tensor by name (`KeyError` when the weights have no such tensor).
    fn tensor(&self, name: &str) -> PyResult<SharedTensor> {
        match self.by_name.get(name) {
            Some(&i) => Ok(self.tensor_at(i)),
            None => Err(PyKeyError::new_err(name.to_string())),
        }
    }

    fn __len__(&self) -> usize {
        self.entries.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The weights generation (increases with every export by an owner of the service).
    #[getter]
    fn generation(&self) -> u64 {
        self.weights.manifest().generation
    }

    /// `"host"` or `"cuda"`.
    #[getter]
    fn backend(&self) -> String {
        self.weights.manifest().backend.to_string()
    }

    /// `"memfd"`, `"vmm"` or `"legacy"`.
    #[getter]
    fn ipc(&self) -> String {
        self.weights.manifest().ipc.to_string()
    }

    /// `"cpu"` or `"cuda:N"`, in torch's spelling.
    #[getter]
    fn device(&self) -> String {
        match self.device {
            (dlpack::DL_CUDA, n) => format!("cuda:{n}"),
            _ => "cpu".into(),
        }
    }

    /// Digest of the model file the weights were built from.
    #[getter]
    fn model_digest(&self) -> String {
        self.weights.manifest().model_digest.clone()
    }

    /// `(address, bytes)` of every shared arena: every tensor lies inside one of them.
    fn ranges(&self) -> Vec<(usize, usize)> {
        let manifest = self.weights.manifest();
        if let Weights::Host(h) = self.weights.as_ref() {
            return vec![(h.mapping().addr(), h.mapping().len())];
        }
        let mut out = Vec::with_capacity(manifest.arenas.len());
        for (i, arena) in manifest.arenas.iter().enumerate() {
            let base = manifest
                .tensors
                .iter()
                .zip(&self.entries)
                .find(|(t, _)| t.arena as usize == i)
                .map(|(t, e)| e.ptr - t.offset as usize);
            if let Some(base) = base {
                out.push((base, arena.size as usize));
            }
        }
        out
    }

    fn __repr__(&self) -> String {
        format!(
            "<zygote SharedWeights generation {} backend {} ({}) {} tensors on {}>",
            self.generation(),
            self.backend(),
            self.ipc(),
            self.entries.len(),
            self.device()
        )
    }
}
