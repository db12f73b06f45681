//! The safetensors format: the header parser and validator, and the tensor index it yields.
//!
//! [`parse_header`] takes a whole file's bytes (the zygote passes its sealed mapping, so nothing
//! can change between the check and the use) and returns the tensors sorted by offset and the
//! `__metadata__` map, or the first [`HeaderError`]. It allocates nothing before the length field
//! has been checked against [`MAX_HEADER_LEN`]. The model that holds a validated file is
//! [`crate::model`]; the fuzz target calls [`parse_header`] directly.
//!
//! # What a valid file is
//!
//! A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON,
//! and a data section holding the rest of the file. The JSON is an object; each key is a tensor
//! name whose value holds exactly `dtype`, `shape` and `data_offsets` (begin and end relative to
//! the data section), except the optional `__metadata__` key, an object of strings. Like the
//! reference implementation, the tensors must cover the data section exactly: no overlaps, no
//! gaps, no trailing bytes. `N` is capped at [`MAX_HEADER_LEN`] (8 MiB; the reference allows 100 MB). Stricter than the reference,
//! a key that appears twice anywhere in the header (a JSON parser would silently keep one of
//! the two) and an unknown key in a tensor entry are errors, and `__metadata__` may not be
//! `null`. A header with no tensors is valid only with an empty data section: it is what the
//! reference writes for an empty tensor map, and it leaves nothing unaccounted for.
//!
//! Every failure is its own [`HeaderError`] variant, whose message names the tensor and the
//! values; [`crate::model::ModelError`] adds the path.

use std::collections::{BTreeMap, HashSet};

mod dtype;
mod json;

pub use dtype::Dtype;

/// The largest header accepted, in bytes (8 MiB). A real header is a few hundred bytes per
/// tensor, so this admits some 20 000 tensors, twice what one owner's manifest can carry. The
/// reference implementation allows 100 MB, but parsing JSON costs about 17 times its size in
/// memory: a 90 MB header held 1.5 GB of the zygote for 5 s before it was refused. At this cap
/// the worst case is about 140 MB for a fraction of a second, and a longer length field is
/// refused before anything is read or allocated.
pub const MAX_HEADER_LEN: u64 = 8 << 20;

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

#[cfg(test)]
mod tests;
