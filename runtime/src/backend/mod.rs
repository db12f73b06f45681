//! Device backends: how the owner builds the one compute copy of the weights, and how a worker
//! imports it.
//!
//! The owner (a zygote child) calls [`DeviceBackend::export`] once per generation; the result is
//! a [`Manifest`] (what is where) and the handles (fds) that let another process map the same
//! memory. A worker receives both from the owner socket and calls [`import`], which verifies
//! the manifest against the model the worker already holds before anything is served.
//!
//! | | host ([`host`]) | CUDA ([`cuda`]) |
//! |---|---|---|
//! | compute copy | f32 (f16/bf16 widened), or matrices in f16 (`--host-weights f16`), in a sealed memfd | device arenas |
//! | handle | the memfd | VMM fds, or legacy IPC handle bytes |
//! | worker import | read-only `mmap` | map into its own CUDA context |
//!
//! The backend is chosen in the owner, never in the zygote or the supervisor: probing CUDA
//! loads libcuda, and those two processes must stay free of it.

pub mod cuda;
pub mod host;
mod manifest_error;
mod unavailable;

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::model::Model;
pub use crate::protocol::{Backend, Ipc};
pub use manifest_error::ManifestError;
pub use unavailable::CudaUnavailable;

/// Which backend a service asked for (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// CUDA when a usable GPU is present, else host (logged).
    Auto,
    Host,
    Cuda,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "host" => Ok(Self::Host),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, host or cuda)"
            )),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Host => "host",
            Self::Cuda => "cuda",
        })
    }
}

/// The form of the host backend's compute copy (`--host-weights`): `f32` (every float tensor
/// widened to f32, the default), `f16` (2-D float tensors, the matrices, kept as IEEE half
/// precision: half the bytes for an app whose kernels widen them as they load them; 1-D
/// tensors, biases and norms, stay f32) or `bf16` (the matrices as bfloat16, f32's range with
/// 8 bits of precision: what a processor's bf16 matrix unit, such as AMX, multiplies). The CUDA
/// backend ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostWeightsForm {
    #[default]
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for HostWeightsForm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown host weights form {other:?} (expected f32, f16 or bf16)"
            )),
        }
    }
}

impl std::fmt::Display for HostWeightsForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Which CUDA IPC mechanism to use (`--ipc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpcChoice {
    Auto,
    Vmm,
    Legacy,
}

impl std::str::FromStr for IpcChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "vmm" => Ok(Self::Vmm),
            "legacy" => Ok(Self::Legacy),
            other => Err(format!(
                "unknown ipc mode {other:?} (expected auto, vmm or legacy)"
            )),
        }
    }
}

impl std::fmt::Display for IpcChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Vmm => "vmm",
            Self::Legacy => "legacy",
        })
    }
}

/// The description of one exported generation of weights: enough for a worker to map them and
/// to check that they are the weights of its model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Increases by one with every export by any owner of this service.
    pub generation: u64,
    /// `"host"` or `"cuda"` on the wire.
    pub backend: Backend,
    /// `"memfd"`, `"vmm"` or `"legacy"` on the wire.
    pub ipc: Ipc,
    /// Digest of the model file the weights were built from (`Model::digest`).
    pub model_digest: String,
    /// Digest of the compute copy's bytes (all arenas, in order).
    pub content_digest: String,
    /// The GPU holding the arenas (CUDA only).
    pub device: Option<DeviceId>,
    pub arenas: Vec<ArenaInfo>,
    pub tensors: Vec<TensorLayout>,
}

/// A GPU, by ordinal and UUID (a worker checks that its device has this UUID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceId {
    pub ordinal: u32,
    pub uuid: String,
}

/// One contiguous block of the compute copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArenaInfo {
    /// Bytes mapped (for VMM: a multiple of the allocation granularity).
    pub size: u64,
    /// Bytes in use, from the start.
    pub used: u64,
    /// Legacy CUDA IPC handle bytes; empty when the arena travels as an fd.
    #[serde(default)]
    pub legacy_handle: Vec<u8>,
}

/// Where one tensor of the compute copy lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorLayout {
    pub name: String,
    /// Dtype of the compute copy (safetensors spelling on the wire: `F32`, `I64`, ...).
    pub dtype: crate::model::Dtype,
    pub shape: Vec<u64>,
    pub arena: u32,
    pub offset: u64,
    pub len: u64,
}

/// What an owner hands out: the manifest and one fd per arena that travels as an fd.
#[derive(Debug)]
pub struct Export {
    pub manifest: Manifest,
    pub fds: Vec<OwnedFd>,
}

/// Errors of building, exporting, importing and verifying weights.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the CUDA backend is not available: {0}")]
    CudaUnavailable(#[from] CudaUnavailable),
    /// A driver call failed: its name, the driver's code (a `CUresult`) and its description.
    #[error("CUDA call {call} failed: {message}")]
    Cuda {
        call: &'static str,
        code: u32,
        message: String,
    },
    #[error("tensor {tensor}: dtype {dtype} cannot be converted for the compute copy")]
    Dtype { tensor: String, dtype: String },
    /// A value of a tensor lies beyond f16's range (±65504), so the f16 form would turn it into
    /// an infinity.
    #[error(
        "tensor {tensor}: value {value} at element {index} does not fit f16 (largest 65504); \
         serve this model with --host-weights f32"
    )]
    F16Range {
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error("manifest check failed: {0}")]
    Manifest(#[from] ManifestError),
    #[error("duplicating {what} failed: {source}")]
    Dup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("digest mismatch for {what}: expected {expected}, computed {actual}")]
    Digest {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("expected {expected} handle fds, received {received}")]
    Handles { expected: usize, received: usize },
    #[error("shared memory: {0}")]
    Shm(#[from] crate::shm::ShmError),
    #[error("device {ordinal} has UUID {actual}, but the weights live on {expected}")]
    DeviceMismatch {
        ordinal: u32,
        expected: String,
        actual: String,
    },
    #[error("--ipc {requested} is not possible on device {ordinal}: {reason}")]
    IpcUnsupported {
        requested: String,
        ordinal: u32,
        reason: String,
    },
    #[error("tensor {tensor}: {reason}")]
    View { tensor: String, reason: String },
}

/// The owner's side of a backend.
pub trait DeviceBackend {
    /// `"host"` or `"cuda"`.
    fn name(&self) -> &'static str;
    /// `"memfd"`, `"vmm"` or `"legacy"`.
    fn ipc(&self) -> &'static str;
    /// Builds the compute copy of `model` and exports it as `generation`.
    fn export(&mut self, model: &Model, generation: u64) -> Result<Export, BackendError>;
    /// Takes over a generation exported by an earlier owner (kept by the zygote while no owner
    /// was up), verifying it, instead of building the weights again. `Ok(None)`: this backend or
    /// this generation's IPC cannot be adopted; build anew.
    fn adopt(
        &mut self,
        manifest: Manifest,
        fds: Vec<OwnedFd>,
        model: &Model,
    ) -> Result<Option<Export>, BackendError> {
        let _ = (manifest, fds, model);
        Ok(None)
    }
}

/// Weights a worker imported, ready for its app.
#[derive(Debug)]
pub enum Weights {
    Host(host::HostWeights),
    Cuda(cuda::CudaWeights),
}

impl Weights {
    pub fn manifest(&self) -> &Manifest {
        match self {
            Weights::Host(w) => w.manifest(),
            Weights::Cuda(w) => w.manifest(),
        }
    }

    /// The host weights, when these are host weights.
    pub fn as_host(&self) -> Option<&host::HostWeights> {
        match self {
            Weights::Host(w) => Some(w),
            Weights::Cuda(_) => None,
        }
    }

    /// The device weights, when these are CUDA weights.
    pub fn as_cuda(&self) -> Option<&cuda::CudaWeights> {
        match self {
            Weights::Host(_) => None,
            Weights::Cuda(w) => Some(w),
        }
    }
}

/// Checks what every backend's manifest must satisfy against the worker's own model: the model
/// digest, and that every tensor of the model is present with its shape, inside its arena, and
/// not overlapping another.
pub fn check_manifest(manifest: &Manifest, model: &Model) -> Result<(), BackendError> {
    if manifest.model_digest != model.digest() {
        return Err(BackendError::Digest {
            what: "model",
            expected: model.digest().to_string(),
            actual: manifest.model_digest.clone(),
        });
    }
    if manifest.tensors.len() != model.tensors().len() {
        return Err(ManifestError::TensorCount {
            listed: manifest.tensors.len(),
            model: model.tensors().len(),
        }
        .into());
    }
    let mut spans: Vec<(u32, u64, u64, &str)> = Vec::with_capacity(manifest.tensors.len());
    for t in &manifest.tensors {
        let Some(info) = model.tensor(&t.name) else {
            return Err(ManifestError::UnknownTensor {
                tensor: t.name.clone(),
            }
            .into());
        };
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        if shape != t.shape {
            return Err(ManifestError::Shape {
                tensor: t.name.clone(),
                manifest: t.shape.clone(),
                model: shape,
            }
            .into());
        }
        let Some(arena) = manifest.arenas.get(t.arena as usize) else {
            return Err(ManifestError::NoArena {
                tensor: t.name.clone(),
                arena: t.arena,
            }
            .into());
        };
        let end = t
            .offset
            .checked_add(t.len)
            .ok_or_else(|| ManifestError::OffsetOverflow {
                tensor: t.name.clone(),
            })?;
        if end > arena.used || arena.used > arena.size {
            return Err(ManifestError::OutsideArena {
                tensor: t.name.clone(),
                offset: t.offset,
                end,
                arena: t.arena,
                used: arena.used,
                size: arena.size,
            }
            .into());
        }
        let elem = t.dtype.size() as u64;
        let count: u64 = t.shape.iter().product();
        if count * elem != t.len {
            return Err(ManifestError::Length {
                tensor: t.name.clone(),
                len: t.len,
                count,
                dtype: t.dtype,
            }
            .into());
        }
        spans.push((t.arena, t.offset, end, &t.name));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[0].0 == w[1].0 && w[1].1 < w[0].2 {
            return Err(ManifestError::Overlap {
                first: w[0].3.to_string(),
                second: w[1].3.to_string(),
            }
            .into());
        }
    }
    Ok(())
}

/// Imports what an owner sent: checks the manifest against `model`, maps the arenas and
/// verifies their contents, dispatching on `manifest.backend`.
pub fn import(
    manifest: Manifest,
    fds: Vec<OwnedFd>,
    model: &Model,
) -> Result<Weights, BackendError> {
    check_manifest(&manifest, model)?;
    match manifest.backend {
        Backend::Host => host::import(manifest, fds, model).map(Weights::Host),
        Backend::Cuda => cuda::import(manifest, fds).map(Weights::Cuda),
    }
}

/// Digest of a byte sequence as it appears in manifests: `xxh3-128:` and 32 hex digits.
pub fn digest_bytes(chunks: &[&[u8]]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for c in chunks {
        h.update(c);
    }
    format!("xxh3-128:{:032x}", h.digest128())
}
