//! The model file: a safetensors file, validated completely, held in a sealed memfd.
//!
//! The zygote calls [`Model::load`] once at start. The file's bytes are copied into a sealed
//! memfd ([`crate::shm`]) and mapped read-only; the header is parsed into a tensor index and
//! checked (see [`parse_header`]); the content digest is computed once. Every child inherits
//! the memfd, so the model is in memory once however many processes use it. An exec'd child
//! rebuilds its view with [`Model::from_memfd`] (header only, no re-hash: the memfd is sealed).
//!
//! NOTE: placeholder validation; the complete validator replaces this module.

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::shm::{Mapping, SealedMemfd, ShmError};

/// Element types of safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            "I16" => Self::I16,
            "U16" => Self::U16,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I32" => Self::I32,
            "U32" => Self::U32,
            "F32" => Self::F32,
            "I64" => Self::I64,
            "U64" => Self::U64,
            "F64" => Self::F64,
            other => return Err(other.to_string()),
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(&self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }
}

/// One tensor of the index. `offset` is absolute in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// Everything that can be wrong with a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {path}: not found")]
    NotFound { path: PathBuf },
    #[error("model {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {path}: invalid safetensors: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("model memory: {0}")]
    Shm(#[from] ShmError),
}

/// A validated model in sealed shared memory.
#[derive(Debug)]
pub struct Model {
    path: PathBuf,
    memfd: SealedMemfd,
    map: Mapping,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    metadata: BTreeMap<String, String>,
    digest: String,
}

impl Model {
    /// Resolves `path` (a file, or a directory holding `model.safetensors`).
    pub fn resolve_path(path: &Path) -> Result<PathBuf, ModelError> {
        let p = if path.is_dir() {
            path.join("model.safetensors")
        } else {
            path.to_path_buf()
        };
        if !p.exists() {
            return Err(ModelError::NotFound { path: p });
        }
        Ok(p)
    }

    /// Loads, validates and seals a model file, and computes its digest.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file_path = Self::resolve_path(path)?;
        let bytes = std::fs::read(&file_path).map_err(|source| ModelError::Io {
            path: file_path.clone(),
            source,
        })?;
        let mut w = crate::shm::MemfdWriter::create("zygote-model", bytes.len())?;
        w.as_mut_slice().copy_from_slice(&bytes);
        let memfd = w.seal()?;
        let digest = crate::backend::digest_bytes(&[&bytes]);
        Self::from_sealed(file_path, memfd, digest)
    }

    /// Rebuilds a model view in a child from the inherited memfd (header parse only).
    pub fn from_memfd(fd: OwnedFd, path: &Path, digest: &str) -> Result<Self, ModelError> {
        let memfd = SealedMemfd::from_fd(fd, None)?;
        Self::from_sealed(path.to_path_buf(), memfd, digest.to_string())
    }

    fn from_sealed(path: PathBuf, memfd: SealedMemfd, digest: String) -> Result<Self, ModelError> {
        let map = memfd.map()?;
        let (tensors, metadata) = parse_header(&map).map_err(|reason| ModelError::Invalid {
            path: path.clone(),
            reason,
        })?;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path,
            memfd,
            map,
            tensors,
            by_name,
            metadata,
            digest,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.fd()
    }
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.len]
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// `xxh3-128:` and 32 hex digits, over the whole file.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// Parses and validates a safetensors header. Returns tensors sorted by offset.
pub fn parse_header(bytes: &[u8]) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>), String> {
    if bytes.len() < 8 {
        return Err("shorter than the 8-byte header length".into());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = bytes
        .get(8..8 + n)
        .ok_or("header length past end of file")?;
    let json: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let obj = json.as_object().ok_or("header is not an object")?;
    let data_start = 8 + n;
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let dtype = Dtype::parse(v["dtype"].as_str().unwrap_or(""))
            .map_err(|d| format!("{name}: dtype {d}"))?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or("shape")?
            .iter()
            .map(|d| d.as_u64().unwrap_or(0) as usize)
            .collect();
        let off = v["data_offsets"].as_array().ok_or("offsets")?;
        let (a, b) = (
            off[0].as_u64().unwrap_or(0) as usize,
            off[1].as_u64().unwrap_or(0) as usize,
        );
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            offset: data_start + a,
            len: b - a,
        });
    }
    tensors.sort_by_key(|t| t.offset);
    Ok((tensors, metadata))
}
