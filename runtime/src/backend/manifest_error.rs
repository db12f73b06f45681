//! [`ManifestError`]: why a manifest (received from an owner, kept by the zygote, or being
//! planned by an owner) or a copy into or out of device memory was refused, with the values
//! that were wrong as fields, so that a caller can tell the cases apart without reading text.
//! [`BackendError::Manifest`](super::BackendError::Manifest) carries it.

use crate::model::Dtype;
use crate::protocol::{Backend, Ipc};

/// What was wrong with a manifest, or with a range of device memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest lists {listed} tensors, the model has {model}")]
    TensorCount { listed: usize, model: usize },
    #[error("tensor {tensor} is not in the model")]
    UnknownTensor { tensor: String },
    #[error("tensor {tensor}: manifest shape {manifest:?}, model shape {model:?}")]
    Shape {
        tensor: String,
        manifest: Vec<u64>,
        model: Vec<u64>,
    },
    #[error("tensor {tensor}: arena {arena} does not exist")]
    NoArena { tensor: String, arena: u32 },
    #[error("tensor {tensor}: offset overflows")]
    OffsetOverflow { tensor: String },
    #[error(
        "tensor {tensor}: bytes {offset}..{end} outside arena {arena} ({used} used of {size})"
    )]
    OutsideArena {
        tensor: String,
        offset: u64,
        end: u64,
        arena: u32,
        used: u64,
        size: u64,
    },
    #[error("tensor {tensor}: {len} bytes for {count} elements of {dtype}")]
    Length {
        tensor: String,
        len: u64,
        count: u64,
        dtype: Dtype,
    },
    #[error("tensors {first} and {second} overlap")]
    Overlap { first: String, second: String },
    #[error("backend \"{backend}\" is not cuda")]
    NotCuda { backend: Backend },
    #[error("ipc \"{ipc}\" is not a CUDA mode (vmm or legacy)")]
    NotCudaIpc { ipc: Ipc },
    #[error("a CUDA manifest must name its device")]
    NoDevice,
    #[error("device UUID {uuid:?} is not GPU- and 8-4-4-4-12 hex digits")]
    BadUuid { uuid: String },
    #[error("content digest {digest:?} is not {prefix} and 32 hex digits")]
    BadContentDigest {
        digest: String,
        prefix: &'static str,
    },
    #[error("arena {arena}: {used} bytes used of {size}")]
    ArenaUsed { arena: usize, used: u64, size: u64 },
    #[error("arena {arena}: {len} bytes of legacy IPC handle with ipc {ipc}")]
    LegacyHandle {
        arena: usize,
        len: usize,
        ipc: &'static str,
    },
    #[error(
        "generation {generation} uses {ipc} IPC, which dies with its owner; it cannot be adopted"
    )]
    NotAdoptable { generation: u64, ipc: &'static str },
    #[error("generation {generation} is already held by this owner")]
    GenerationHeld { generation: u64 },
    #[error("generation {generation} was already exported by this owner")]
    GenerationExported { generation: u64 },
    #[error("allocation granularity of 0 bytes")]
    ZeroGranularity,
    #[error("tensor {tensor}: size overflows")]
    TensorSizeOverflow { tensor: String },
    #[error("arena of {used} bytes overflows")]
    ArenaSizeOverflow { used: u64 },
    #[error("an adopted arena cannot be written")]
    AdoptedArenaWrite,
    #[error("{what} of bytes {offset}..{end} is outside device memory of {size} bytes")]
    OutsideDeviceMemory {
        what: &'static str,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error("an upload to memory of another CUDA context")]
    ForeignContext,
}
