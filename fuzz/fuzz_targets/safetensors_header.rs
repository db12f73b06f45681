//! Fuzz target: the safetensors header parser (runtime/src/model.rs), fed a whole file.
//!
//! A file the parser accepts must be what the module docs promise: tensors sorted by offset
//! that tile the data section exactly, each as long as its shape and dtype say.
//!
//! Calls: `safetensors::parse_header`, `safetensors::Dtype::size`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zygote_runtime::safetensors::parse_header;

fuzz_target!(|data: &[u8]| {
    let Ok((tensors, _metadata)) = parse_header(data) else {
        return;
    };
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let mut cursor = 8 + usize::try_from(header_len).expect("a checked length fits");
    for t in &tensors {
        assert_eq!(
            t.offset, cursor,
            "tensor {} leaves a gap or overlaps",
            t.name
        );
        let elements: usize = t.shape.iter().product();
        assert_eq!(t.len, elements * t.dtype.size(), "tensor {} length", t.name);
        cursor += t.len;
    }
    assert_eq!(
        cursor,
        data.len(),
        "the tensors do not end at the end of the file"
    );
});
