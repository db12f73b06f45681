//! The validator's checks, one test per way a header can be wrong.

use super::*;

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
fn a_90_mb_header_is_refused_from_its_length_field_alone() {
    // What held 1.5 GB under the reference's 100 MB cap: refused before the JSON is touched.
    let mut bytes = 90_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":");
    assert_eq!(
        parse_header(&bytes).unwrap_err(),
        HeaderError::HeaderTooLarge {
            len: 90_000_000,
            max: MAX_HEADER_LEN
        }
    );
    assert_eq!(MAX_HEADER_LEN, 8 << 20, "the documented cap");
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
    let header = entry(r#"{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,4]}"#);
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
    let (tensors, metadata) = parse_header(&file(r#"{"__metadata__":{"k":"v"}}"#, b"")).unwrap();
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
