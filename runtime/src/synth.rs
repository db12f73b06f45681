//! Synthetic safetensors files, for tests and benchmarks.
//!
//! The zygote serves whatever file `--model` names; tests and benchmarks need files of a chosen
//! size without downloading a model, and files that are broken in exactly one way. This module
//! writes them:
//!
//! - [`write_safetensors`]: a valid file from given tensors, laid out like the reference
//!   implementation lays them out (in order, no gaps, header padded with spaces to a multiple
//!   of 8 so the data section starts 8-byte aligned).
//! - [`write_synthetic`]: a valid file of about a given size, a few 2-D tensors of
//!   pseudo-random weights, streamed to disk (a 4 GiB model needs no 4 GiB buffer).
//! - [`corrupt_case_files`] and [`corrupt_cases`]: one minimal bad file per check of
//!   [`crate::model::parse_header`] and [`crate::Model::resolve_path`], for tests that start the
//!   real binary on each and expect it to refuse to start.
//!
//! The broken files are written by `synth/corrupt.rs`; this file holds the valid ones.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::model::Dtype;

mod corrupt;

pub use corrupt::{corrupt_case_files, corrupt_cases, CorruptCase};

/// Writes a valid safetensors file holding `tensors` (name, dtype, shape, little-endian bytes)
/// in the order given, and `metadata` as `__metadata__`.
///
/// Fails with `InvalidInput` when a tensor's bytes do not match its shape and dtype, when a
/// name repeats, or when a name is `__metadata__`: this writer only writes valid files (see
/// [`write_raw`] for the others).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, Dtype, &[usize], &[u8])],
    metadata: Option<&BTreeMap<String, String>>,
) -> io::Result<()> {
    let layout: Vec<(&str, Dtype, &[usize], u64)> = tensors
        .iter()
        .map(|&(name, dtype, shape, data)| (name, dtype, shape, data.len() as u64))
        .collect();
    let header = header_bytes(&layout, metadata)?;
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, _, _, data) in tensors {
        out.write_all(data)?;
    }
    out.flush()
}

/// Tensors per synthetic model.
const SYNTH_LAYERS: u64 = 4;
/// Columns of a synthetic tensor (fewer when the model is tiny).
const SYNTH_COLS: u64 = 1024;

/// Writes a valid model of about `total_bytes` of tensor data: four 2-D tensors (fewer if tiny)
/// named `layer.{i}.weight` of `dtype`, filled from a xorshift generator seeded with `seed`
/// (the same arguments always give the same file).
///
/// The data section is at most `total_bytes` and less by under 32 KiB (rows are whole), and at
/// least one element. Float values are uniform in ±1/√cols, like an initialised layer, so
/// arithmetic on them stays finite; integer and bool tensors get raw random bits (bools 0 or 1).
/// The file is streamed through a 1 MiB buffer.
pub fn write_synthetic(path: &Path, total_bytes: u64, dtype: Dtype, seed: u64) -> io::Result<()> {
    let size = dtype.size() as u64;
    let elems = (total_bytes / size).max(1);
    let layers = elems.min(SYNTH_LAYERS);
    let per_layer = elems / layers;
    let cols = per_layer.min(SYNTH_COLS);
    let rows = per_layer / cols;
    let too_big = |_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{total_bytes} bytes do not fit in memory"),
        )
    };
    let shape = [usize::try_from(rows).map_err(too_big)?, cols as usize];
    let names: Vec<String> = (0..layers).map(|i| format!("layer.{i}.weight")).collect();
    let tensor_len = rows * cols * size;
    let layout: Vec<(&str, Dtype, &[usize], u64)> = names
        .iter()
        .map(|n| (n.as_str(), dtype, &shape[..], tensor_len))
        .collect();
    let header = header_bytes(&layout, None)?;

    let mut out = File::create(path)?;
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&header);
    out.write_all(&head)?;
    let mut rng = XorShift::new(seed);
    let filler = Filler::new(dtype, 1.0 / (cols as f64).sqrt());
    // A whole number of elements of every dtype; large writes, no second buffer.
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..layers {
        let mut left = tensor_len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            filler.fill(&mut chunk[..n], &mut rng);
            out.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    out.flush()
}

/// Writes a file that is a header length, `header` and `data`, with no checks: the header
/// length is `header.len()` and no padding is added. For files that must be invalid.
pub fn write_raw(path: &Path, header: &[u8], data: &[u8]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + header.len() + data.len());
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes)
}

/// The header of a valid file for tensors of the given byte lengths, laid out in order and
/// padded with spaces to a multiple of 8 bytes.
fn header_bytes(
    tensors: &[(&str, Dtype, &[usize], u64)],
    metadata: Option<&BTreeMap<String, String>>,
) -> io::Result<Vec<u8>> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let mut map = serde_json::Map::new();
    if let Some(metadata) = metadata {
        map.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0u64;
    for &(name, dtype, shape, len) in tensors {
        if name == "__metadata__" {
            return Err(invalid("__metadata__ cannot name a tensor".to_string()));
        }
        let needed = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| {
                invalid(format!(
                    "tensor {name}: shape {shape:?} × {dtype} overflows"
                ))
            })?;
        if needed != len {
            return Err(invalid(format!(
                "tensor {name}: shape {shape:?} × {dtype} needs {needed} bytes, got {len}"
            )));
        }
        let entry = serde_json::json!({
            "dtype": dtype.as_str(),
            "shape": shape,
            "data_offsets": [offset, offset + len],
        });
        if map.insert(name.to_string(), entry).is_some() {
            return Err(invalid(format!("tensor name {name:?} given twice")));
        }
        offset += len;
    }
    let mut header = serde_json::to_vec(&map).map_err(io::Error::other)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// xorshift64* (Vigna): fast, good enough for weights nobody trains, and no dependency.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed: a zero state would stay zero, and nearby seeds should not
        // give nearby streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f64) -> f64 {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (unit * 2.0 - 1.0) * scale
    }
}

/// Turns the generator's bits into elements of one dtype. Each 64-bit draw fills 8 bytes, so
/// a gigabyte takes a fraction of a second rather than a conversion per element.
#[derive(Debug)]
struct Filler {
    dtype: Dtype,
    scale: f64,
    /// For F16 and BF16: the element for each 16-bit draw, uniform over ±scale.
    table: Vec<u16>,
}

impl Filler {
    fn new(dtype: Dtype, scale: f64) -> Self {
        let convert: Option<fn(f32) -> u16> = match dtype {
            Dtype::F16 => Some(f32_to_f16),
            Dtype::BF16 => Some(f32_to_bf16),
            _ => None,
        };
        let table = convert.map_or_else(Vec::new, |convert| {
            (0..=u16::MAX)
                .map(|i| convert(((f64::from(i) + 0.5) / 32768.0 - 1.0) as f32 * scale as f32))
                .collect()
        });
        Self {
            dtype,
            scale,
            table,
        }
    }

    /// Fills `out` (a whole number of elements) with the next values.
    fn fill(&self, out: &mut [u8], rng: &mut XorShift) {
        for chunk in out.chunks_mut(8) {
            let bits = rng.next();
            let bytes: [u8; 8] = match self.dtype {
                Dtype::F64 => rng.uniform(self.scale).to_le_bytes(),
                Dtype::F32 => {
                    let unit = |b: u64| ((b >> 8) as f32 + 0.5) / (1u32 << 24) as f32;
                    let v = |b: u64| {
                        ((unit(b & 0xffff_ffff) * 2.0 - 1.0) * self.scale as f32).to_bits()
                    };
                    (u64::from(v(bits)) | u64::from(v(bits >> 32)) << 32).to_le_bytes()
                }
                Dtype::F16 | Dtype::BF16 => {
                    let h = |i: u32| {
                        u64::from(self.table[(bits >> (16 * i)) as u16 as usize]) << (16 * i)
                    };
                    (h(0) | h(1) | h(2) | h(3)).to_le_bytes()
                }
                // 8-bit floats: random bytes, with the NaN (and, for E5M2, infinity) encodings
                // moved to a finite neighbour.
                Dtype::F8E4M3 => bits
                    .to_le_bytes()
                    .map(|x| if x & 0x7f == 0x7f { x ^ 1 } else { x }),
                Dtype::F8E5M2 => {
                    bits.to_le_bytes()
                        .map(|x| if x & 0x7c == 0x7c { x & !0x40 } else { x })
                }
                Dtype::Bool => bits.to_le_bytes().map(|x| x & 1),
                Dtype::U8
                | Dtype::I8
                | Dtype::I16
                | Dtype::U16
                | Dtype::I32
                | Dtype::U32
                | Dtype::I64
                | Dtype::U64 => bits.to_le_bytes(),
            };
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// IEEE 754 binary32 to binary16, rounding to nearest, ties to even.
fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x7f_ffff;
    if exp == 0xff {
        // Infinity stays infinity; NaN stays a (quiet) NaN.
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    // Keep `keep` bits of the 24-bit significand, rounding what is shifted out.
    let round = |sig: u32, shift: u32| {
        let kept = sig >> shift;
        let rest = sig & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        kept + u32::from(rest > half || (rest == half && kept & 1 == 1))
    };
    if e <= 0 {
        // A binary16 subnormal (or zero): value = kept × 2^-24.
        if e < -10 {
            return sign;
        }
        return sign | round(man | 0x80_0000, (14 - e) as u32) as u16;
    }
    // A carry out of the significand moves into the exponent, which is what rounding up to the
    // next binade (or to infinity) means.
    sign | round(((e as u32) << 23) | man, 13) as u16
}

/// IEEE 754 binary32 to bfloat16, rounding to nearest, ties to even (finite inputs).
fn f32_to_bf16(v: f32) -> u16 {
    let x = v.to_bits();
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_header;

    /// binary16 to binary32 for finite values, to check what the writer wrote.
    fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let (exp, man) = (i32::from((h >> 10) & 0x1f), f32::from(h & 0x3ff));
        sign * match exp {
            0 => man * 2f32.powi(-24),
            _ => (1.0 + man / 1024.0) * 2f32.powi(exp - 15),
        }
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        for (v, bits) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00),
            (1e9, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (2f32.powi(-14), 0x0400),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000),
            (3.0 * 2f32.powi(-25), 0x0002),
            (1.0 + 2f32.powi(-11), 0x3c00),
            (1.0 + 3.0 * 2f32.powi(-11), 0x3c02),
            (0.1, 0x2e66),
        ] {
            assert_eq!(f32_to_f16(v), bits, "{v}");
            if v.is_finite() && v.abs() <= 65504.0 && bits != 0x0000 {
                let back = f16_to_f32(bits);
                assert!(
                    (back - v).abs() <= v.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                    "{v} -> {back}"
                );
            }
        }
        assert_eq!(f32_to_f16(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16(f32::NAN) & 0x3ff, 0);
    }

    #[test]
    fn bf16_conversion_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    }

    #[test]
    fn header_is_padded_and_tensors_follow_in_order() {
        let header = header_bytes(
            &[("b", Dtype::F32, &[2], 8), ("a", Dtype::U8, &[3], 3)],
            None,
        )
        .unwrap();
        assert_eq!(header.len() % 8, 0);
        let text = std::str::from_utf8(&header).unwrap();
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["b"]["data_offsets"], serde_json::json!([0, 8]));
        assert_eq!(v["a"]["data_offsets"], serde_json::json!([8, 11]));
        assert!(
            header_bytes(&[("a", Dtype::F32, &[2], 7)], None).is_err(),
            "size mismatch"
        );
        assert!(
            header_bytes(
                &[("a", Dtype::U8, &[1], 1), ("a", Dtype::U8, &[1], 1)],
                None
            )
            .is_err(),
            "duplicate"
        );
        let reserved = header_bytes(&[("__metadata__", Dtype::U8, &[1], 1)], None);
        assert!(reserved.is_err(), "reserved name");
    }

    #[test]
    fn synthetic_models_have_the_asked_size_and_finite_values() {
        let dir = crate::model::tests::TempDir::new("synth");
        let sizes = [
            (1u64 << 20, Dtype::F16),
            (100_000, Dtype::BF16),
            (3, Dtype::F32),
            (0, Dtype::U8),
        ];
        let every_dtype = Dtype::ALL.map(|d| (40_000u64, d));
        for (total, dtype) in sizes.into_iter().chain(every_dtype) {
            let path = dir.path().join("m.safetensors");
            write_synthetic(&path, total, dtype, 7).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let (tensors, _) = parse_header(&bytes).unwrap();
            let data: u64 = tensors.iter().map(|t| t.len as u64).sum();
            assert!(
                data <= total.max(dtype.size() as u64),
                "{total} {dtype}: {data}"
            );
            assert!(data + 32 * 1024 > total, "{total} {dtype}: {data}");
            assert!(tensors
                .iter()
                .all(|t| t.shape.len() == 2 && t.dtype == dtype));
            let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names[0], "layer.0.weight");

            // Floats are finite and within ±1/√cols.
            let t = &tensors[0];
            let limit = 1.0 / (t.shape[1] as f64).sqrt();
            let body = &bytes[t.offset..t.offset + t.len];
            let values: Vec<f64> = match dtype {
                Dtype::F16 => body
                    .chunks_exact(2)
                    .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])).into())
                    .collect(),
                Dtype::BF16 => body
                    .chunks_exact(2)
                    .map(|c| {
                        f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16).into()
                    })
                    .collect(),
                Dtype::F32 => body
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()).into())
                    .collect(),
                Dtype::F64 => body
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::F8E4M3 => {
                    assert!(body.iter().all(|b| b & 0x7f != 0x7f), "E4M3 NaN");
                    Vec::new()
                }
                Dtype::F8E5M2 => {
                    assert!(body.iter().all(|b| b & 0x7c != 0x7c), "E5M2 inf or NaN");
                    Vec::new()
                }
                Dtype::Bool => {
                    assert!(body.iter().all(|&b| b <= 1), "bool other than 0 and 1");
                    Vec::new()
                }
                _ => Vec::new(),
            };
            for v in &values {
                // f16 rounding can carry a value just past the limit.
                assert!(
                    v.is_finite() && v.abs() <= limit * (1.0 + 1e-3),
                    "{dtype}: {v} > {limit}"
                );
            }
            if values.len() > 100 {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                assert!(
                    mean.abs() < limit / 4.0,
                    "{dtype}: mean {mean}, not centred"
                );
                assert!(
                    values.iter().any(|v| v.abs() > limit / 2.0),
                    "{dtype}: no spread"
                );
            }

            let again = dir.path().join("again.safetensors");
            write_synthetic(&again, total, dtype, 7).unwrap();
            assert_eq!(
                bytes,
                std::fs::read(&again).unwrap(),
                "same seed, same file"
            );
            write_synthetic(&again, total, dtype, 8).unwrap();
            if data >= 8 {
                assert_ne!(
                    bytes,
                    std::fs::read(&again).unwrap(),
                    "another seed, another file"
                );
            }
        }
    }

    #[test]
    fn write_safetensors_writes_what_load_reads() {
        let dir = crate::model::tests::TempDir::new("synth");
        let path = dir.path().join("m.safetensors");
        let a = [1u8, 2, 3, 4, 5, 6, 7, 8];
        write_safetensors(
            &path,
            &[
                ("x", Dtype::I32, &[2], &a),
                ("empty", Dtype::F32, &[0, 4], &[]),
            ],
            None,
        )
        .unwrap();
        let model = crate::Model::load(&path).unwrap();
        assert_eq!(model.data(model.tensor("x").unwrap()), a);
        assert_eq!(model.tensor("empty").unwrap().len, 0);
        assert!(model.metadata().is_empty());
        let e = write_safetensors(&path, &[("x", Dtype::I32, &[3], &a)], None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
