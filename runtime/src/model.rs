//! The model file: a safetensors file, validated completely, held in a sealed memfd.
//!
//! The zygote calls [`Model::load`] once at start. The file is copied by the kernel into a
//! memfd sized from the file's metadata, the memfd is sealed ([`crate::shm`]) and mapped
//! read-only, the header is parsed from the mapped bytes into a tensor index and checked
//! ([`parse_header`]), and only then is the content digest computed, once. Validating the copy
//! rather than the file means nothing can change between the check and the use. Every child
//! inherits the memfd, so the model is in memory once however many processes use it. An exec'd
//! child rebuilds its view with [`Model::from_memfd`]: it checks the seals and parses the header
//! again (cheap), but does not re-hash: the seals guarantee the bytes are the ones the zygote
//! hashed.
//!
//! # What a valid file is
//!
//! A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON,
//! and a data section holding the rest of the file. The JSON is an object; each key is a tensor
//! name whose value holds exactly `dtype`, `shape` and `data_offsets` (begin and end relative to
//! the data section), except the optional `__metadata__` key, an object of strings. Like the
//! reference implementation, the tensors must cover the data section exactly: no overlaps, no
//! gaps, no trailing bytes, and `N` is capped at [`MAX_HEADER_LEN`]. Stricter than the reference,
//! a key that appears twice anywhere in the header (a JSON parser would silently keep one of
//! the two) and an unknown key in a tensor entry are errors, and `__metadata__` may not be
//! `null`. A header with no tensors is valid only with an empty data section: it is what the
//! reference writes for an empty tensor map, and it leaves nothing unaccounted for.
//!
//! Every failure is its own [`HeaderError`] variant, whose message names the tensor and the
//! values, wrapped in a [`ModelError`] that names the path.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::shm::{Mapping, SealedMemfd, ShmError};

/// The largest header accepted, in bytes: the reference implementation's limit. A real header
/// is a few hundred bytes per tensor; anything near this is an attack or a corrupt length.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The file looked for when `--model` names a directory.
pub const MODEL_FILE_NAME: &str = "model.safetensors";

/// Name of the model's memfd, as `/proc/PID/maps` shows it (`/memfd:zygote-model`).
pub const MEMFD_NAME: &str = "zygote-model";

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
    /// Every dtype, in the order of their element size.
    pub const ALL: [Dtype; 15] = [
        Self::Bool,
        Self::U8,
        Self::I8,
        Self::F8E4M3,
        Self::F8E5M2,
        Self::I16,
        Self::U16,
        Self::F16,
        Self::BF16,
        Self::I32,
        Self::U32,
        Self::F32,
        Self::I64,
        Self::U64,
        Self::F64,
    ];

    /// Parses a safetensors dtype name (`"F16"`); the error is the unknown name.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| s.to_string())
    }

    /// The safetensors name of the dtype.
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

    /// The known names, comma separated (for error messages).
    fn known_names() -> String {
        Self::ALL.map(|d| d.as_str()).join(", ")
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// What is wrong with a safetensors file's header or layout; one variant per check.
///
/// Offsets in `data_offsets` and the layout variants are relative to the data section, as in
/// the file; `len` values are bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the file is {len} bytes, too short for the 8-byte header length")]
    TooShort { len: usize },
    #[error("the header length is 0 (an empty header is not valid JSON)")]
    HeaderLengthZero,
    #[error("the header length {len} is over the limit of {max} bytes")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("the header length {len} runs past the end of the file (only {available} bytes follow the length field)")]
    HeaderPastEnd { len: u64, available: usize },
    #[error("the header is not UTF-8 (invalid byte at header offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("the header is not valid JSON: {message}")]
    NotJson { message: String },
    #[error("the header is a JSON {found}, not an object")]
    NotObject { found: &'static str },
    #[error("key {name:?} appears more than once in the header")]
    DuplicateName { name: String },
    #[error("{context}: key {key:?} appears more than once")]
    DuplicateKey { context: String, key: String },
    #[error("__metadata__ is a JSON {found}, not an object of strings")]
    MetadataNotObject { found: &'static str },
    #[error("__metadata__ key {key:?}: value {value} is not a string")]
    MetadataValueNotString { key: String, value: String },
    #[error("tensor {tensor}: entry is a JSON {found}, not an object with dtype, shape and data_offsets")]
    EntryNotObject { tensor: String, found: &'static str },
    #[error("tensor {tensor}: missing key {key:?}")]
    MissingKey { tensor: String, key: &'static str },
    #[error("tensor {tensor}: unexpected key {key:?} (an entry holds only dtype, shape and data_offsets)")]
    ExtraKey { tensor: String, key: String },
    #[error("tensor {tensor}: dtype {value} is not a string")]
    DtypeNotString { tensor: String, value: String },
    #[error(
        "tensor {tensor}: unknown dtype {dtype:?} (known: {})",
        Dtype::known_names()
    )]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor {tensor}: shape {value} is not an array of non-negative integers")]
    BadShape { tensor: String, value: String },
    #[error("tensor {tensor}: shape {shape:?} × {dtype} overflows a 64-bit byte count")]
    ShapeOverflow {
        tensor: String,
        shape: Vec<usize>,
        dtype: Dtype,
    },
    #[error("tensor {tensor}: data_offsets {value} is not a pair of non-negative integers")]
    BadOffsets { tensor: String, value: String },
    #[error("tensor {tensor}: data_offsets [{begin}, {end}] end before they begin")]
    ReversedOffsets {
        tensor: String,
        begin: u64,
        end: u64,
    },
    #[error("tensor {tensor}: shape {shape:?} × {dtype} needs {needed} bytes, data_offsets give {given}")]
    SizeMismatch {
        tensor: String,
        shape: Vec<usize>,
        dtype: Dtype,
        needed: u64,
        given: u64,
    },
    #[error("tensor {tensor}: data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes)")]
    OutOfBounds {
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error("tensors {first} [{first_begin}, {first_end}] and {second} [{second_begin}, {second_end}] overlap")]
    Overlap {
        first: String,
        first_begin: u64,
        first_end: u64,
        second: String,
        second_begin: u64,
        second_end: u64,
    },
    #[error(
        "bytes [{begin}, {end}) of the data section, before tensor {next}, belong to no tensor"
    )]
    Gap { begin: u64, end: u64, next: String },
    #[error("the data section is {data_len} bytes but the tensors cover only the first {end} ({} trailing bytes)", data_len - end)]
    TrailingBytes { end: u64, data_len: u64 },
}

/// Everything that can be wrong with a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {path}: not found")]
    NotFound { path: PathBuf },
    #[error("model {path}: not a regular file (nor a directory holding {MODEL_FILE_NAME})")]
    NotAFile { path: PathBuf },
    #[error("model {dir}: the directory holds no {MODEL_FILE_NAME}")]
    NoModelInDirectory { dir: PathBuf },
    #[error("model {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("model {path}: the file is {len} bytes, more than this machine can map")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("model {path}: the file changed size while being read ({expected} bytes when opened, {actual} read)")]
    ChangedWhileReading {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("model {path}: {reason}")]
    Invalid { path: PathBuf, reason: HeaderError },
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
    /// Resolves `path`: a regular file, or a directory holding [`MODEL_FILE_NAME`]. Symbolic
    /// links are followed.
    pub fn resolve_path(path: &Path) -> Result<PathBuf, ModelError> {
        let meta = stat(path)?;
        if meta.is_file() {
            return Ok(path.to_path_buf());
        }
        if !meta.is_dir() {
            return Err(ModelError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let inner = path.join(MODEL_FILE_NAME);
        match stat(&inner) {
            Ok(m) if m.is_file() => Ok(inner),
            Ok(_) => Err(ModelError::NotAFile { path: inner }),
            Err(ModelError::NotFound { .. }) => Err(ModelError::NoModelInDirectory {
                dir: path.to_path_buf(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Loads a model file into a sealed memfd, validates it completely, and computes its digest.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file_path = Self::resolve_path(path)?;
        let memfd = copy_into_sealed_memfd(&file_path)?;
        let map = memfd.map()?;
        let (tensors, metadata) = parse_header(&map).map_err(|reason| ModelError::Invalid {
            path: file_path.clone(),
            reason,
        })?;
        // Hashing reads every byte: only a file that passed validation is worth it.
        let digest = crate::backend::digest_bytes(&[&map]);
        Ok(Self::assemble(
            file_path, memfd, map, tensors, metadata, digest,
        ))
    }

    /// Rebuilds a model view in a child from the inherited memfd: checks its seals and parses
    /// the header again, but trusts `digest` (the seals guarantee the bytes it was computed
    /// from).
    pub fn from_memfd(fd: OwnedFd, path: &Path, digest: &str) -> Result<Self, ModelError> {
        let memfd = SealedMemfd::from_fd(fd, None)?;
        let map = memfd.map()?;
        let (tensors, metadata) = parse_header(&map).map_err(|reason| ModelError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Self::assemble(
            path.to_path_buf(),
            memfd,
            map,
            tensors,
            metadata,
            digest.to_string(),
        ))
    }

    fn assemble(
        path: PathBuf,
        memfd: SealedMemfd,
        map: Mapping,
        tensors: Vec<TensorInfo>,
        metadata: BTreeMap<String, String>,
        digest: String,
    ) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            path,
            memfd,
            map,
            tensors,
            by_name,
            metadata,
            digest,
        }
    }

    /// The model file (after [`Model::resolve_path`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The sealed memfd holding the whole file.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.fd()
    }
    /// The whole file, mapped read-only.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    /// Size of the whole file in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// The tensor index, sorted by offset.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// The bytes of a tensor of this model's index.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.len]
    }
    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// `xxh3-128:` and 32 hex digits, over the whole file.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// `stat(2)` with the model's error types.
fn stat(path: &Path) -> Result<std::fs::Metadata, ModelError> {
    std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::NotFound {
            path: path.to_path_buf(),
        },
        _ => ModelError::Io {
            path: path.to_path_buf(),
            action: "inspecting",
            source,
        },
    })
}

/// Copies the file at `path` into a new memfd and seals it.
///
/// The memfd is sized from the file's metadata and filled with `std::io::copy`, which lets the
/// kernel copy (copy_file_range(2), falling back to sendfile(2)): the bytes never pass through a
/// buffer of ours, and there is no writable mapping to fault in page by page. A file whose size
/// is not the one `fstat` gave at open (it was truncated or appended to meanwhile) is refused.
fn copy_into_sealed_memfd(path: &Path) -> Result<SealedMemfd, ModelError> {
    let io_err = |action| {
        move |source| ModelError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    // O_NONBLOCK: if the path was swapped for a FIFO since `resolve_path` looked, open must not
    // wait for a writer; the fstat below then refuses it. It does nothing to a regular file.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err("opening"))?;
    let meta = file.metadata().map_err(io_err("inspecting"))?;
    if !meta.is_file() {
        return Err(ModelError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let expected = meta.len();
    let Ok(len) = usize::try_from(expected) else {
        return Err(ModelError::TooLarge {
            path: path.to_path_buf(),
            len: expected,
        });
    };

    let mut out = crate::shm::create_sized(MEMFD_NAME, len)?;
    // One byte more than expected: enough to notice a file that grew, without following a file
    // that keeps growing.
    let actual =
        std::io::copy(&mut (&file).take(expected + 1), &mut out).map_err(io_err("reading"))?;
    let after = file.metadata().map_err(io_err("inspecting"))?.len();
    if actual != expected || after != expected {
        return Err(ModelError::ChangedWhileReading {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(SealedMemfd::seal(OwnedFd::from(out), Some(expected))?)
}

/// Parses and validates a whole safetensors file (`bytes` is the file, not just the header).
/// Returns the tensors sorted by offset, and the `__metadata__` map.
///
/// The checks run in file order: the length field, the header text, each entry in the order
/// the header lists them, then the layout of the data section; the first failure is returned.
pub fn parse_header(
    bytes: &[u8],
) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>), HeaderError> {
    let Some((len_field, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(HeaderError::TooShort { len: bytes.len() });
    };
    let n = u64::from_le_bytes(*len_field);
    if n == 0 {
        return Err(HeaderError::HeaderLengthZero);
    }
    if n > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge {
            len: n,
            max: MAX_HEADER_LEN,
        });
    }
    // n <= MAX_HEADER_LEN, so it fits in usize.
    let Some((header, data)) = rest.split_at_checked(n as usize) else {
        return Err(HeaderError::HeaderPastEnd {
            len: n,
            available: rest.len(),
        });
    };
    let text = std::str::from_utf8(header).map_err(|e| HeaderError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let json: json::Value = serde_json::from_str(text).map_err(|e| HeaderError::NotJson {
        message: e.to_string(),
    })?;
    let json::Value::Object(entries) = json else {
        return Err(HeaderError::NotObject { found: json.kind() });
    };
    if let Some(name) = first_duplicate(&entries) {
        return Err(HeaderError::DuplicateName {
            name: name.to_string(),
        });
    }

    let data_start = 8 + header.len();
    let data_len = data.len() as u64;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in &entries {
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
        } else {
            let (dtype, shape, begin, end) = parse_entry(name, value, data_len)?;
            tensors.push(TensorInfo {
                name: name.clone(),
                dtype,
                shape,
                // Both fit: `end <= data_len`, and the data section is inside `bytes`.
                offset: data_start + begin as usize,
                len: (end - begin) as usize,
            });
        }
    }
    check_layout(&mut tensors, data_start, data_len)?;
    Ok((tensors, metadata))
}

/// The first key of `entries` that appeared before, if any.
fn first_duplicate(entries: &[(String, json::Value)]) -> Option<&str> {
    let mut seen = HashSet::with_capacity(entries.len());
    entries
        .iter()
        .map(|(k, _)| k.as_str())
        .find(|k| !seen.insert(*k))
}

fn parse_metadata(value: &json::Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let json::Value::Object(pairs) = value else {
        return Err(HeaderError::MetadataNotObject {
            found: value.kind(),
        });
    };
    if let Some(key) = first_duplicate(pairs) {
        return Err(HeaderError::DuplicateKey {
            context: "__metadata__".into(),
            key: key.to_string(),
        });
    }
    pairs
        .iter()
        .map(|(k, v)| match v {
            json::Value::Str(s) => Ok((k.clone(), s.clone())),
            other => Err(HeaderError::MetadataValueNotString {
                key: k.clone(),
                value: other.shown(),
            }),
        })
        .collect()
}

const ENTRY_KEYS: [&str; 3] = ["dtype", "shape", "data_offsets"];

/// Checks one tensor entry on its own: `(dtype, shape, begin, end)`, offsets relative to the
/// data section and within it.
fn parse_entry(
    name: &str,
    value: &json::Value,
    data_len: u64,
) -> Result<(Dtype, Vec<usize>, u64, u64), HeaderError> {
    let tensor = || name.to_string();
    let json::Value::Object(fields) = value else {
        return Err(HeaderError::EntryNotObject {
            tensor: tensor(),
            found: value.kind(),
        });
    };
    if let Some(key) = first_duplicate(fields) {
        return Err(HeaderError::DuplicateKey {
            context: format!("tensor {name}"),
            key: key.to_string(),
        });
    }
    if let Some((key, _)) = fields
        .iter()
        .find(|(k, _)| !ENTRY_KEYS.contains(&k.as_str()))
    {
        return Err(HeaderError::ExtraKey {
            tensor: tensor(),
            key: key.clone(),
        });
    }
    let field = |key: &'static str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| HeaderError::MissingKey {
                tensor: tensor(),
                key,
            })
    };
    let (dtype_v, shape_v, offsets_v) = (field("dtype")?, field("shape")?, field("data_offsets")?);

    let dtype = match dtype_v {
        json::Value::Str(s) => Dtype::parse(s).map_err(|dtype| HeaderError::UnknownDtype {
            tensor: tensor(),
            dtype,
        })?,
        other => {
            return Err(HeaderError::DtypeNotString {
                tensor: tensor(),
                value: other.shown(),
            })
        }
    };
    let shape: Vec<usize> = match shape_v {
        json::Value::Array(items) => items
            .iter()
            .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
            .collect::<Option<_>>(),
        _ => None,
    }
    .ok_or_else(|| HeaderError::BadShape {
        tensor: tensor(),
        value: shape_v.shown(),
    })?;
    let needed = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|count| count.checked_mul(dtype.size() as u64))
        .ok_or_else(|| HeaderError::ShapeOverflow {
            tensor: tensor(),
            shape: shape.clone(),
            dtype,
        })?;

    let (begin, end) = match offsets_v {
        json::Value::Array(items) => match items.as_slice() {
            [a, b] => a.as_u64().zip(b.as_u64()),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| HeaderError::BadOffsets {
        tensor: tensor(),
        value: offsets_v.shown(),
    })?;
    if begin > end {
        return Err(HeaderError::ReversedOffsets {
            tensor: tensor(),
            begin,
            end,
        });
    }
    if end - begin != needed {
        return Err(HeaderError::SizeMismatch {
            tensor: tensor(),
            shape,
            dtype,
            needed,
            given: end - begin,
        });
    }
    if end > data_len {
        return Err(HeaderError::OutOfBounds {
            tensor: tensor(),
            begin,
            end,
            data_len,
        });
    }
    Ok((dtype, shape, begin, end))
}

/// Sorts `tensors` by offset and checks they tile the data section exactly: each begins where
/// the previous one ended, the first at 0, the last at the end. Zero-length tensors are allowed
/// anywhere on that chain.
fn check_layout(
    tensors: &mut [TensorInfo],
    data_start: usize,
    data_len: u64,
) -> Result<(), HeaderError> {
    tensors.sort_by_key(|t| (t.offset, t.len));
    let span = |t: &TensorInfo| {
        (
            (t.offset - data_start) as u64,
            (t.offset - data_start + t.len) as u64,
        )
    };
    let mut cursor = 0u64;
    let mut prev: Option<(&TensorInfo, u64, u64)> = None;
    for t in tensors.iter() {
        let (begin, end) = span(t);
        match prev {
            // Sorted by begin, and everything before `t` tiles [0, cursor): `t` starts inside
            // `prev`, the tensor that ends at `cursor`.
            Some((p, first_begin, first_end)) if begin < cursor => {
                return Err(HeaderError::Overlap {
                    first: p.name.clone(),
                    first_begin,
                    first_end,
                    second: t.name.clone(),
                    second_begin: begin,
                    second_end: end,
                })
            }
            _ if begin > cursor => {
                return Err(HeaderError::Gap {
                    begin: cursor,
                    end: begin,
                    next: t.name.clone(),
                });
            }
            _ => {}
        }
        cursor = end;
        prev = Some((t, begin, end));
    }
    if cursor != data_len {
        return Err(HeaderError::TrailingBytes {
            end: cursor,
            data_len,
        });
    }
    Ok(())
}

/// A JSON value that keeps object members in order, duplicates included.
///
/// `serde_json::Value` (and any map type) keeps only one of two equal keys, which would let a
/// header say two things about one tensor and have us believe either. This type keeps every
/// member so the validator can refuse duplicates, and keeps integers apart from floats so a
/// shape of `[1.0]` is refused rather than rounded.
mod json {
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Value {
        Null,
        Bool(bool),
        UInt(u64),
        Int(i64),
        Float(f64),
        Str(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    impl Value {
        /// The JSON type's name, for "is a JSON array, not an object" messages.
        pub(super) fn kind(&self) -> &'static str {
            match self {
                Self::Null => "null",
                Self::Bool(_) => "boolean",
                Self::UInt(_) | Self::Int(_) | Self::Float(_) => "number",
                Self::Str(_) => "string",
                Self::Array(_) => "array",
                Self::Object(_) => "object",
            }
        }

        pub(super) fn as_u64(&self) -> Option<u64> {
            match self {
                Self::UInt(n) => Some(*n),
                _ => None,
            }
        }

        /// The value as compact JSON, cut to a length fit for an error message.
        pub(super) fn shown(&self) -> String {
            const MAX: usize = 80;
            let s = self.to_string();
            if s.len() <= MAX {
                return s;
            }
            let cut = (0..=MAX)
                .rev()
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(0);
            format!("{}…", &s[..cut])
        }
    }

    impl fmt::Display for Value {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let quoted = |s: &str| serde_json::to_string(s).map_err(|_| fmt::Error);
            match self {
                Self::Null => f.write_str("null"),
                Self::Bool(b) => write!(f, "{b}"),
                Self::UInt(n) => write!(f, "{n}"),
                Self::Int(n) => write!(f, "{n}"),
                Self::Float(x) => write!(f, "{x:?}"),
                Self::Str(s) => f.write_str(&quoted(s)?),
                Self::Array(items) => {
                    f.write_str("[")?;
                    for (i, v) in items.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{v}")?;
                    }
                    f.write_str("]")
                }
                Self::Object(members) => {
                    f.write_str("{")?;
                    for (i, (k, v)) in members.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{}: {v}", quoted(k)?)?;
                    }
                    f.write_str("}")
                }
            }
        }
    }

    impl<'de> Deserialize<'de> for Value {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ValueVisitor)
        }
    }

    struct ValueVisitor;

    impl<'de> Visitor<'de> for ValueVisitor {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            Value::deserialize(d)
        }
        fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
            Ok(Value::Bool(b))
        }
        fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
            Ok(Value::UInt(n))
        }
        fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
            Ok(u64::try_from(n).map_or(Value::Int(n), Value::UInt))
        }
        fn visit_f64<E>(self, x: f64) -> Result<Value, E> {
            Ok(Value::Float(x))
        }
        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::Str(s.to_string()))
        }
        fn visit_string<E>(self, s: String) -> Result<Value, E> {
            Ok(Value::Str(s))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(v) = seq.next_element()? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut members = Vec::new();
            while let Some(member) = map.next_entry::<String, Value>()? {
                members.push(member);
            }
            Ok(Value::Object(members))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::synth::{write_raw, write_safetensors};
    use nix::fcntl::{fcntl, FcntlArg};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// A directory under the system temp dir, removed on drop.
    #[derive(Debug)]
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("zygote-test-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn err(header: &str, data: &[u8]) -> HeaderError {
        parse_header(&file(header, data)).expect_err("the header must be refused")
    }

    /// A header with one tensor entry `w` given as raw JSON.
    fn entry(json: &str) -> String {
        format!(r#"{{"w":{json}}}"#)
    }

    fn w() -> String {
        "w".to_string()
    }

    // The length field.

    #[test]
    fn a_file_shorter_than_the_length_field_is_refused() {
        assert_eq!(
            parse_header(b"").unwrap_err(),
            HeaderError::TooShort { len: 0 }
        );
        assert_eq!(
            parse_header(b"\x02\0\0\0\0\0\0").unwrap_err(),
            HeaderError::TooShort { len: 7 }
        );
    }

    #[test]
    fn a_zero_header_length_is_refused() {
        assert_eq!(
            parse_header(&[0; 16]).unwrap_err(),
            HeaderError::HeaderLengthZero
        );
    }

    #[test]
    fn a_header_length_over_the_limit_is_refused() {
        let mut bytes = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(
            parse_header(&bytes).unwrap_err(),
            HeaderError::HeaderTooLarge {
                len: MAX_HEADER_LEN + 1,
                max: MAX_HEADER_LEN
            }
        );
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(
            parse_header(&bytes),
            Err(HeaderError::HeaderTooLarge { len: u64::MAX, .. })
        ));
    }

    #[test]
    fn a_header_length_past_the_end_of_the_file_is_refused() {
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(
            parse_header(&bytes).unwrap_err(),
            HeaderError::HeaderPastEnd {
                len: 3,
                available: 2
            }
        );
    }

    // The header text.

    #[test]
    fn a_header_that_is_not_utf8_is_refused() {
        let mut bytes = file(r#"{"ab": 1}"#, b"");
        bytes[8 + 3] = 0xff;
        assert_eq!(
            parse_header(&bytes).unwrap_err(),
            HeaderError::NotUtf8 { offset: 3 }
        );
    }

    #[test]
    fn a_header_that_is_not_json_is_refused() {
        for header in [r#"{"w": "#, "{} {}", "{'w': 1}", "nope"] {
            assert!(
                matches!(err(header, b""), HeaderError::NotJson { .. }),
                "{header}"
            );
        }
        let HeaderError::NotJson { message } = err(r#"{"w": "#, b"") else {
            unreachable!()
        };
        assert!(message.contains("line 1 column"), "{message}");
    }

    #[test]
    fn a_header_that_is_not_an_object_is_refused() {
        for (header, found) in [
            ("[]", "array"),
            ("3", "number"),
            ("null", "null"),
            (r#""{}""#, "string"),
        ] {
            assert_eq!(
                err(header, b""),
                HeaderError::NotObject { found },
                "{header}"
            );
        }
    }

    #[test]
    fn a_tensor_named_twice_is_refused() {
        let one = r#"{"dtype":"U8","shape":[2],"data_offsets":[0,2]}"#;
        assert_eq!(
            err(&format!(r#"{{"w":{one},"w":{one}}}"#), &[0; 2]),
            HeaderError::DuplicateName { name: w() }
        );
        assert_eq!(
            err(r#"{"__metadata__":{},"__metadata__":{}}"#, b""),
            HeaderError::DuplicateName {
                name: "__metadata__".into()
            }
        );
    }

    // Tensor entries.

    #[test]
    fn a_tensor_entry_that_is_not_an_object_is_refused() {
        assert_eq!(
            err(&entry("[0, 4]"), &[0; 4]),
            HeaderError::EntryNotObject {
                tensor: w(),
                found: "array"
            }
        );
        assert_eq!(
            err(&entry("null"), b""),
            HeaderError::EntryNotObject {
                tensor: w(),
                found: "null"
            }
        );
    }

    #[test]
    fn a_key_twice_in_a_tensor_entry_is_refused() {
        let header = entry(r#"{"dtype":"U8","shape":[2],"data_offsets":[0,2],"shape":[1]}"#);
        assert_eq!(
            err(&header, &[0; 2]),
            HeaderError::DuplicateKey {
                context: "tensor w".into(),
                key: "shape".into()
            }
        );
    }

    #[test]
    fn a_tensor_entry_missing_a_key_is_refused() {
        for (json, key) in [
            (r#"{"shape":[2],"data_offsets":[0,2]}"#, "dtype"),
            (r#"{"dtype":"U8","data_offsets":[0,2]}"#, "shape"),
            (r#"{"dtype":"U8","shape":[2]}"#, "data_offsets"),
        ] {
            assert_eq!(
                err(&entry(json), &[0; 2]),
                HeaderError::MissingKey { tensor: w(), key },
                "{json}"
            );
        }
    }

    #[test]
    fn a_tensor_entry_with_an_extra_key_is_refused() {
        let header = entry(r#"{"dtype":"U8","shape":[2],"data_offsets":[0,2],"offsets":[0,2]}"#);
        assert_eq!(
            err(&header, &[0; 2]),
            HeaderError::ExtraKey {
                tensor: w(),
                key: "offsets".into()
            }
        );
    }

    #[test]
    fn a_dtype_that_is_not_a_string_is_refused() {
        let header = entry(r#"{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}"#);
        assert_eq!(
            err(&header, &[0; 4]),
            HeaderError::DtypeNotString {
                tensor: w(),
                value: r#"["F32"]"#.into()
            }
        );
    }

    #[test]
    fn an_unknown_dtype_is_refused() {
        for dtype in ["F33", "f32", "float32", ""] {
            let header = entry(&format!(
                r#"{{"dtype":"{dtype}","shape":[1],"data_offsets":[0,4]}}"#
            ));
            assert_eq!(
                err(&header, &[0; 4]),
                HeaderError::UnknownDtype {
                    tensor: w(),
                    dtype: dtype.into()
                }
            );
        }
        let message = err(
            &entry(r#"{"dtype":"F33","shape":[1],"data_offsets":[0,4]}"#),
            &[0; 4],
        )
        .to_string();
        assert!(
            message.contains("known: BOOL, U8, I8, F8_E4M3"),
            "{message}"
        );
    }

    #[test]
    fn a_shape_that_is_not_an_array_of_non_negative_integers_is_refused() {
        for (shape, shown) in [
            ("4", "4"),
            (r#""4""#, r#""4""#),
            ("[-4]", "[-4]"),
            ("[4.0]", "[4.0]"),
            ("[2, null]", "[2, null]"),
            ("[[4]]", "[[4]]"),
            ("[18446744073709551616]", "[1.8446744073709552e19]"),
        ] {
            let header = entry(&format!(
                r#"{{"dtype":"U8","shape":{shape},"data_offsets":[0,4]}}"#
            ));
            assert_eq!(
                err(&header, &[0; 4]),
                HeaderError::BadShape {
                    tensor: w(),
                    value: shown.into()
                },
                "{shape}"
            );
        }
    }

    #[test]
    fn a_shape_whose_byte_count_overflows_is_refused() {
        // The element count overflows.
        let header =
            entry(r#"{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,4]}"#);
        assert_eq!(
            err(&header, &[0; 4]),
            HeaderError::ShapeOverflow {
                tensor: w(),
                shape: vec![1 << 32, 1 << 32],
                dtype: Dtype::U8
            }
        );
        // The element count fits, the byte count does not.
        let header = entry(r#"{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]}"#);
        assert!(matches!(
            err(&header, &[0; 4]),
            HeaderError::ShapeOverflow {
                dtype: Dtype::F32,
                ..
            }
        ));
    }

    #[test]
    fn data_offsets_that_are_not_a_pair_of_integers_are_refused() {
        for (offsets, shown) in [
            ("[4]", "[4]"),
            ("[0,2,4]", "[0, 2, 4]"),
            (r#"[0,"4"]"#, r#"[0, "4"]"#),
            ("[-1,3]", "[-1, 3]"),
            ("[0,4.5]", "[0, 4.5]"),
            (r#"{"begin":0,"end":4}"#, r#"{"begin": 0, "end": 4}"#),
        ] {
            let header = entry(&format!(
                r#"{{"dtype":"U8","shape":[4],"data_offsets":{offsets}}}"#
            ));
            assert_eq!(
                err(&header, &[0; 4]),
                HeaderError::BadOffsets {
                    tensor: w(),
                    value: shown.into()
                },
                "{offsets}"
            );
        }
    }

    #[test]
    fn data_offsets_that_end_before_they_begin_are_refused() {
        let header = entry(r#"{"dtype":"U8","shape":[4],"data_offsets":[4,0]}"#);
        assert_eq!(
            err(&header, &[0; 4]),
            HeaderError::ReversedOffsets {
                tensor: w(),
                begin: 4,
                end: 0
            }
        );
    }

    #[test]
    fn a_byte_length_that_is_not_shape_times_dtype_size_is_refused() {
        let header = r#"{"bert.pooler.dense.weight":{"dtype":"F32","shape":[384,384],"data_offsets":[0,589820]}}"#;
        let e = err(header, &vec![0; 589820]);
        assert_eq!(
            e,
            HeaderError::SizeMismatch {
                tensor: "bert.pooler.dense.weight".into(),
                shape: vec![384, 384],
                dtype: Dtype::F32,
                needed: 589824,
                given: 589820,
            }
        );
        assert_eq!(
            e.to_string(),
            "tensor bert.pooler.dense.weight: shape [384, 384] × F32 needs 589824 bytes, data_offsets give 589820"
        );
    }

    #[test]
    fn data_offsets_past_the_data_section_are_refused() {
        let header = entry(r#"{"dtype":"U8","shape":[4],"data_offsets":[0,4]}"#);
        assert_eq!(
            err(&header, &[0; 3]),
            HeaderError::OutOfBounds {
                tensor: w(),
                begin: 0,
                end: 4,
                data_len: 3
            }
        );
        let header = entry(r#"{"dtype":"U8","shape":[0],"data_offsets":[5,5]}"#);
        assert_eq!(
            err(&header, &[0; 4]),
            HeaderError::OutOfBounds {
                tensor: w(),
                begin: 5,
                end: 5,
                data_len: 4
            }
        );
    }

    // The layout of the data section.

    fn u8_tensor(name: &str, begin: u64, end: u64) -> String {
        format!(
            r#""{name}":{{"dtype":"U8","shape":[{}],"data_offsets":[{begin},{end}]}}"#,
            end - begin
        )
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let header = format!("{{{},{}}}", u8_tensor("b", 2, 6), u8_tensor("a", 0, 4));
        assert_eq!(
            err(&header, &[0; 6]),
            HeaderError::Overlap {
                first: "a".into(),
                first_begin: 0,
                first_end: 4,
                second: "b".into(),
                second_begin: 2,
                second_end: 6
            }
        );
        // The same bytes twice, and an empty tensor inside another one.
        let header = format!("{{{},{}}}", u8_tensor("a", 0, 4), u8_tensor("b", 0, 4));
        assert!(matches!(err(&header, &[0; 4]), HeaderError::Overlap { .. }));
        let header = format!("{{{},{}}}", u8_tensor("a", 0, 4), u8_tensor("e", 2, 2));
        assert!(matches!(err(&header, &[0; 4]), HeaderError::Overlap { .. }));
    }

    #[test]
    fn gaps_between_tensors_are_refused() {
        let header = format!("{{{},{}}}", u8_tensor("a", 0, 2), u8_tensor("b", 4, 6));
        assert_eq!(
            err(&header, &[0; 6]),
            HeaderError::Gap {
                begin: 2,
                end: 4,
                next: "b".into()
            }
        );
        // Bytes before the first tensor are a gap too.
        let header = format!("{{{}}}", u8_tensor("a", 2, 4));
        assert_eq!(
            err(&header, &[0; 4]),
            HeaderError::Gap {
                begin: 0,
                end: 2,
                next: "a".into()
            }
        );
    }

    #[test]
    fn bytes_after_the_last_tensor_are_refused() {
        let header = format!("{{{}}}", u8_tensor("a", 0, 2));
        let e = err(&header, &[0; 5]);
        assert_eq!(
            e,
            HeaderError::TrailingBytes {
                end: 2,
                data_len: 5
            }
        );
        assert!(e.to_string().contains("(3 trailing bytes)"), "{e}");
    }

    #[test]
    fn a_header_without_tensors_needs_an_empty_data_section() {
        assert_eq!(
            err("{}", &[0; 8]),
            HeaderError::TrailingBytes {
                end: 0,
                data_len: 8
            }
        );
        let (tensors, metadata) = parse_header(&file("{}      ", b"")).unwrap();
        assert!(tensors.is_empty() && metadata.is_empty());
        let (tensors, metadata) =
            parse_header(&file(r#"{"__metadata__":{"k":"v"}}"#, b"")).unwrap();
        assert!(tensors.is_empty());
        assert_eq!(metadata["k"], "v");
    }

    #[test]
    fn empty_and_scalar_tensors_are_valid_and_come_back_sorted() {
        let header = format!(
            r#"{{{},"s":{{"dtype":"F32","shape":[],"data_offsets":[2,6]}},{},"z":{{"dtype":"F16","shape":[3,0],"data_offsets":[6,6]}}}}"#,
            u8_tensor("e", 2, 2),
            u8_tensor("a", 0, 2),
        );
        let bytes = file(&header, &[1, 2, 3, 4, 5, 6]);
        let (tensors, _) = parse_header(&bytes).unwrap();
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "e", "s", "z"]);
        let data_start = 8 + header.len();
        assert_eq!(tensors[2].offset, data_start + 2);
        assert_eq!(tensors[2].len, 4);
        assert!(tensors[2].shape.is_empty());
        assert_eq!(tensors[3].shape, [3, 0]);
    }

    // __metadata__.

    #[test]
    fn metadata_that_is_not_an_object_is_refused() {
        for (json, found) in [
            (r#""v1""#, "string"),
            ("null", "null"),
            (r#"["k","v"]"#, "array"),
        ] {
            let header = format!(r#"{{"__metadata__":{json}}}"#);
            assert_eq!(
                err(&header, b""),
                HeaderError::MetadataNotObject { found },
                "{json}"
            );
        }
    }

    #[test]
    fn a_metadata_value_that_is_not_a_string_is_refused() {
        let header = r#"{"__metadata__":{"format":"pt","layers":{"n":2}}}"#;
        assert_eq!(
            err(header, b""),
            HeaderError::MetadataValueNotString {
                key: "layers".into(),
                value: r#"{"n": 2}"#.into()
            }
        );
    }

    #[test]
    fn a_metadata_key_twice_is_refused() {
        let header = r#"{"__metadata__":{"format":"pt","format":"np"}}"#;
        assert_eq!(
            err(header, b""),
            HeaderError::DuplicateKey {
                context: "__metadata__".into(),
                key: "format".into()
            }
        );
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let shape = format!("[{}\"x\"]", "1,".repeat(500));
        let header = entry(&format!(
            r#"{{"dtype":"U8","shape":{shape},"data_offsets":[0,4]}}"#
        ));
        let HeaderError::BadShape { value, .. } = err(&header, &[0; 4]) else {
            panic!("not BadShape")
        };
        assert!(
            value.chars().count() <= 81 && value.ends_with('…'),
            "{value}"
        );
    }

    // Whole files.

    fn good_model(dir: &Path) -> (PathBuf, Vec<u8>, Vec<u8>) {
        let path = dir.join("good.safetensors");
        let a: Vec<u8> = (0..24u8).collect(); // F32 [2, 3]
        let b: Vec<u8> = (100..104u8).collect(); // F16 [2]
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(
            &path,
            &[
                ("embed.weight", Dtype::F32, &[2, 3], &a),
                ("embed.bias", Dtype::F16, &[2], &b),
            ],
            Some(&metadata),
        )
        .unwrap();
        (path, a, b)
    }

    #[test]
    fn a_good_file_loads_into_a_sealed_memfd_with_its_index_and_digest() {
        let dir = TempDir::new("model");
        let (path, a, b) = good_model(dir.path());
        let model = Model::load(&path).unwrap();
        let on_disk = std::fs::read(&path).unwrap();

        assert_eq!(model.path(), path);
        assert_eq!(model.bytes(), on_disk);
        assert_eq!(model.len(), on_disk.len() as u64);
        let header_len = u64::from_le_bytes(on_disk[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0, "the writer pads the header");
        let names: Vec<&str> = model.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["embed.weight", "embed.bias"], "sorted by offset");
        let wt = model.tensor("embed.weight").unwrap();
        assert_eq!(
            (wt.dtype, wt.shape.as_slice(), wt.offset, wt.len),
            (Dtype::F32, &[2, 3][..], 8 + header_len, 24)
        );
        assert_eq!(model.data(wt), a);
        assert_eq!(model.data(model.tensor("embed.bias").unwrap()), b);
        assert!(model.tensor("nope").is_none());
        assert_eq!(model.metadata()["format"], "pt");

        assert_eq!(model.digest(), crate::backend::digest_bytes(&[&on_disk]));
        assert!(model.digest().starts_with("xxh3-128:") && model.digest().len() == 9 + 32);
        assert_eq!(
            Model::load(&path).unwrap().digest(),
            model.digest(),
            "stable across loads"
        );

        let seals = fcntl(model.memfd().as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap();
        let need = crate::shm::required_seals().bits();
        assert_eq!(seals & need, need, "seals {seals:#x}");
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", model.memfd().as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy()
                .starts_with(&format!("/memfd:{MEMFD_NAME}")),
            "{link:?}"
        );
    }

    #[test]
    fn a_different_file_has_a_different_digest() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        let other = dir.path().join("other.safetensors");
        std::fs::write(&other, bytes).unwrap();
        assert_ne!(
            Model::load(&path).unwrap().digest(),
            Model::load(&other).unwrap().digest()
        );
    }

    #[test]
    fn a_directory_holding_model_safetensors_loads() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        std::fs::rename(&path, dir.path().join(MODEL_FILE_NAME)).unwrap();
        let model = Model::load(dir.path()).unwrap();
        assert_eq!(model.path(), dir.path().join(MODEL_FILE_NAME));
        assert_eq!(model.tensors().len(), 2);
    }

    #[test]
    fn a_child_rebuilds_the_model_from_the_sealed_memfd() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let model = Model::load(&path).unwrap();
        let fd = model.memfd().try_clone_to_owned().unwrap();
        let child = Model::from_memfd(fd, model.path(), model.digest()).unwrap();
        assert_eq!(child.tensors(), model.tensors());
        assert_eq!(child.metadata(), model.metadata());
        assert_eq!(child.digest(), model.digest());
        assert_eq!(child.bytes(), model.bytes());
    }

    #[test]
    fn an_unsealed_memfd_is_refused_by_a_child() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let fd = memfd_create(
            c"unsealed-model",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let mut f = File::from(fd);
        std::io::Write::write_all(&mut f, &std::fs::read(&path).unwrap()).unwrap();
        let e = Model::from_memfd(OwnedFd::from(f), &path, "xxh3-128:0").unwrap_err();
        assert!(
            matches!(e, ModelError::Shm(ShmError::NotSealed { .. })),
            "{e}"
        );
    }

    #[test]
    fn a_missing_path_is_refused() {
        let dir = TempDir::new("model");
        let path = dir.path().join("missing.safetensors");
        let e = Model::load(&path).unwrap_err();
        assert!(
            matches!(&e, ModelError::NotFound { path: p } if *p == path),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("model {}: not found", path.display())
        );
    }

    #[test]
    fn a_directory_without_model_safetensors_is_refused() {
        let dir = TempDir::new("model");
        good_model(dir.path()); // some other file is there: it is not picked
        let e = Model::load(dir.path()).unwrap_err();
        assert!(
            matches!(&e, ModelError::NoModelInDirectory { dir: d } if d == dir.path()),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "model {}: the directory holds no model.safetensors",
                dir.path().display()
            )
        );
    }

    #[test]
    fn a_path_that_is_neither_a_file_nor_a_directory_is_refused() {
        let dir = TempDir::new("model");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(Model::load(&fifo), Err(ModelError::NotAFile { path }) if path == fifo));
        assert!(matches!(
            Model::load(Path::new("/dev/null")),
            Err(ModelError::NotAFile { .. })
        ));
        let inner = dir.path().join("d").join(MODEL_FILE_NAME);
        std::fs::create_dir_all(&inner).unwrap();
        assert!(
            matches!(Model::load(&dir.path().join("d")), Err(ModelError::NotAFile { path }) if path == inner)
        );
    }

    #[test]
    fn a_file_whose_size_changes_while_read_is_refused() {
        // procfs reports size 0 for files that read as more: the same as a file that grew.
        let e = Model::load(Path::new("/proc/self/status")).unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::ChangedWhileReading {
                    expected: 0,
                    actual: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_bad_file_names_its_path_and_the_problem() {
        let dir = TempDir::new("model");
        let path = dir.path().join("m.safetensors");
        let header = r#"{"bert.pooler.dense.weight":{"dtype":"F32","shape":[384,384],"data_offsets":[0,589820]}}"#;
        write_raw(&path, header.as_bytes(), &vec![0; 589820]).unwrap();
        let e = Model::load(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "model {}: tensor bert.pooler.dense.weight: shape [384, 384] × F32 needs 589824 bytes, data_offsets give 589820",
                path.display()
            )
        );
    }

    #[test]
    fn every_corrupt_case_is_refused_with_its_own_message() {
        let dir = TempDir::new("corrupt");
        let cases = crate::synth::corrupt_case_files(dir.path()).unwrap();
        let mut names = HashSet::new();
        for case in &cases {
            assert!(names.insert(case.name), "case {} listed twice", case.name);
            let e = Model::load(&case.path).expect_err(case.name);
            let message = e.to_string();
            assert!(
                message.contains(case.expect),
                "case {}: {message:?} lacks {:?}",
                case.name,
                case.expect
            );
            assert!(
                message.starts_with("model /"),
                "case {}: {message:?} names no path",
                case.name
            );
            assert!(
                message.contains(&*dir.path().to_string_lossy()),
                "case {}: {message:?}",
                case.name
            );
        }
        // Every check of the validator has a case, so every variant shows up.
        let variants: HashSet<String> = cases
            .iter()
            .map(|c| match Model::load(&c.path).unwrap_err() {
                ModelError::Invalid { reason, .. } => format!("{reason:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string(),
                other => format!("{other:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string(),
            })
            .collect();
        assert_eq!(variants.len(), 28, "{variants:?}");
        assert_eq!(
            crate::synth::corrupt_cases(dir.path()).len(),
            cases.len(),
            "rewriting into the same dir works"
        );
    }
}
