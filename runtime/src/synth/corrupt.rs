//! Broken model paths, one per check the zygote makes before it serves a file: each a minimal
//! file (or directory, fifo, missing path) that [`crate::model::parse_header`] or
//! [`crate::Model::resolve_path`] must refuse, with the fragment of the error it must give.

use std::io;
use std::path::{Path, PathBuf};

use super::write_raw;

/// One model path that the zygote must refuse, and what the refusal says.
#[derive(Debug, Clone)]
pub struct CorruptCase {
    /// What is wrong, as a file-name-safe slug (`gap-between-tensors`).
    pub name: &'static str,
    /// The path to give to `--model` (a file, a directory, or a path that does not exist).
    pub path: PathBuf,
    /// A fragment of the error message the case must produce.
    pub expect: &'static str,
}

/// Writes one minimal bad model per validation case into `dir` (which must exist) and returns
/// the cases in a fixed order, with the message fragment each must produce.
pub fn corrupt_case_files(dir: &Path) -> io::Result<Vec<CorruptCase>> {
    // A valid U8 entry, to keep each case about one thing.
    const U8_4: &str = r#"{"dtype":"U8","shape":[4],"data_offsets":[0,4]}"#;
    let mut cases = Vec::new();
    let mut add = |name: &'static str, expect: &'static str, path: PathBuf| {
        cases.push(CorruptCase { name, path, expect });
    };
    let file = |name: &str| dir.join(format!("{name}.safetensors"));

    // The length field.
    for (name, bytes, expect) in [
        (
            "empty-file",
            &b""[..],
            "too short for the 8-byte header length",
        ),
        (
            "file-shorter-than-8-bytes",
            &b"\x02\0\0"[..],
            "too short for the 8-byte header length",
        ),
        ("header-length-zero", &[0u8; 8][..], "header length is 0"),
    ] {
        std::fs::write(file(name), bytes)?;
        add(name, expect, file(name));
    }
    for (name, len, expect) in [
        (
            "header-length-over-limit",
            crate::model::MAX_HEADER_LEN + 1,
            "over the limit of 8388608 bytes",
        ),
        (
            "header-length-past-end-of-file",
            64,
            "runs past the end of the file",
        ),
    ] {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}      ");
        std::fs::write(file(name), bytes)?;
        add(name, expect, file(name));
    }

    // The header text, then each entry, then the layout.
    let header_cases: [(&'static str, String, &[u8], &'static str); 26] = [
        ("header-not-utf8", "{\"\u{1}\": 1}".into(), b"", "not UTF-8"),
        ("header-not-json", r#"{"w": "#.into(), b"", "not valid JSON"),
        ("header-not-object", "[]".into(), b"", "is a JSON array, not an object"),
        (
            "duplicate-tensor-name",
            format!(r#"{{"w":{U8_4},"w":{U8_4}}}"#),
            &[0; 4],
            r#"key "w" appears more than once in the header"#,
        ),
        (
            "duplicate-key-in-tensor-entry",
            r#"{"w":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            r#"tensor w: key "dtype" appears more than once"#,
        ),
        ("tensor-entry-not-object", r#"{"w":[0,4]}"#.into(), &[0; 4], "tensor w: entry is a JSON array"),
        (
            "tensor-missing-data-offsets",
            r#"{"w":{"dtype":"U8","shape":[4]}}"#.into(),
            &[0; 4],
            r#"tensor w: missing key "data_offsets""#,
        ),
        (
            "tensor-extra-key",
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"offsets":[0,4]}}"#.into(),
            &[0; 4],
            r#"tensor w: unexpected key "offsets""#,
        ),
        (
            "dtype-not-a-string",
            r#"{"w":{"dtype":4,"shape":[4],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            "tensor w: dtype 4 is not a string",
        ),
        (
            "unknown-dtype",
            r#"{"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            r#"tensor w: unknown dtype "F33""#,
        ),
        (
            "shape-not-an-array",
            r#"{"w":{"dtype":"U8","shape":4,"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            "tensor w: shape 4 is not an array of non-negative integers",
        ),
        (
            "shape-negative-dimension",
            r#"{"w":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            "tensor w: shape [-4] is not an array of non-negative integers",
        ),
        (
            "shape-fractional-dimension",
            r#"{"w":{"dtype":"U8","shape":[4.0],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            "tensor w: shape [4.0] is not an array of non-negative integers",
        ),
        (
            "shape-element-count-overflow",
            r#"{"w":{"dtype":"F16","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            "tensor w: shape [4294967296, 4294967296] × F16 overflows",
        ),
        (
            "data-offsets-not-a-pair",
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[4]}}"#.into(),
            &[0; 4],
            "tensor w: data_offsets [4] is not a pair of non-negative integers",
        ),
        (
            "data-offsets-not-integers",
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,"4"]}}"#.into(),
            &[0; 4],
            r#"tensor w: data_offsets [0, "4"] is not a pair of non-negative integers"#,
        ),
        (
            "data-offsets-reversed",
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}"#.into(),
            &[0; 4],
            "tensor w: data_offsets [4, 0] end before they begin",
        ),
        (
            "shape-and-dtype-size-mismatch",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#.into(),
            &[0; 4],
            "tensor w: shape [2] × F32 needs 8 bytes, data_offsets give 4",
        ),
        (
            "data-offsets-past-end-of-data",
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#.into(),
            &[0; 2],
            "tensor w: data_offsets [0, 4] run past the end of the data section (2 bytes)",
        ),
        (
            "overlapping-tensors",
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#
                .into(),
            &[0; 6],
            "tensors a [0, 4] and b [2, 6] overlap",
        ),
        (
            "gap-between-tensors",
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#
                .into(),
            &[0; 6],
            "bytes [2, 4) of the data section, before tensor b, belong to no tensor",
        ),
        (
            "trailing-bytes-after-last-tensor",
            format!(r#"{{"w":{U8_4}}}"#),
            &[0; 6],
            "cover only the first 4 (2 trailing bytes)",
        ),
        ("no-tensors-but-data", "{}".into(), &[0; 8], "cover only the first 0 (8 trailing bytes)"),
        (
            "metadata-not-an-object",
            r#"{"__metadata__":"v1"}"#.into(),
            b"",
            "__metadata__ is a JSON string, not an object of strings",
        ),
        (
            "metadata-value-not-a-string",
            r#"{"__metadata__":{"format":1}}"#.into(),
            b"",
            r#"__metadata__ key "format": value 1 is not a string"#,
        ),
        (
            "duplicate-metadata-key",
            r#"{"__metadata__":{"format":"pt","format":"np"}}"#.into(),
            b"",
            r#"__metadata__: key "format" appears more than once"#,
        ),
    ];
    for (name, header, data, expect) in header_cases {
        let mut header = header.into_bytes();
        if name == "header-not-utf8" {
            // A lone continuation byte inside the key: no UTF-8 sequence starts with it.
            header[2] = 0x80;
        }
        write_raw(&file(name), &header, data)?;
        add(name, expect, file(name));
    }

    // The path.
    add(
        "path-does-not-exist",
        ": not found",
        dir.join("no-such-model.safetensors"),
    );
    let empty = dir.join("directory-without-model");
    std::fs::create_dir_all(&empty)?;
    add(
        "directory-without-model",
        "the directory holds no model.safetensors",
        empty,
    );
    let nested = dir.join("directory-whose-model-is-a-directory");
    std::fs::create_dir_all(nested.join(crate::model::MODEL_FILE_NAME))?;
    add(
        "directory-whose-model-is-a-directory",
        "not a regular file",
        nested,
    );
    let fifo = dir.join("fifo.safetensors");
    match std::fs::remove_file(&fifo) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )?;
    add("path-is-a-fifo", "not a regular file", fifo);
    Ok(cases)
}

/// [`corrupt_case_files`] as `(case name, path)` pairs.
///
/// # Panics
///
/// When a file cannot be written into `dir`: this is test support, and a test cannot go on
/// without its files.
pub fn corrupt_cases(dir: &Path) -> Vec<(String, PathBuf)> {
    match corrupt_case_files(dir) {
        Ok(cases) => cases
            .into_iter()
            .map(|c| (c.name.to_string(), c.path))
            .collect(),
        Err(e) => panic!(
            "writing the corrupt model files into {}: {e}",
            dir.display()
        ),
    }
}
