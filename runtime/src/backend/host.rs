//! The host backend: one compute copy of the weights in a sealed memfd, shared read-only by
//! every worker.
//!
//! The copy has one of three forms ([`HostWeightsForm`], chosen by the operator with
//! `--host-weights`): `f32`, the default, where every float tensor is f32 (f16/bf16 widened);
//! `f16`, where the 2-D float tensors (the matrices: linear weights and embedding tables)
//! are IEEE half precision (f32/bf16 narrowed, rounding to nearest; a value beyond f16's range
//! is refused, never turned into an infinity) and the 1-D ones (biases, norms) f32; and `bf16`,
//! the same with the matrices in bfloat16 (f32 narrowed to nearest even, f16 widened: exact;
//! f32's range, so nothing is refused). The half forms halve the bytes a CPU forward pass
//! streams per text and the copy's size, for an app whose kernels widen them as they load them
//! or multiply them as they are (bf16 on a matrix unit such as AMX); an app that reads only f32
//! must refuse them ([`HostTensor::as_f32`] is `None` for a half tensor; the manifest names
//! each tensor's dtype).
//!
//! When the model needs no conversion (every tensor already in its compute dtype, each
//! aligned to its element size in the file: an f32 model in the f32 form, an f16 model
//! without 1-D f16 tensors in the f16 form), the compute copy *is* the zygote's sealed model
//! memfd: the owner exports a duplicate of that fd with the tensors at their file offsets, and
//! the weights are in memory exactly once. Otherwise the owner converts the tensors that need
//! it (every other one is copied as it is) into a new memfd, each tensor at a 64-byte-aligned
//! offset, seals it and exports it with the digest of its bytes.
//!
//! A worker receives the memfd, checks its seals and size, maps it read-only and verifies its
//! contents before it reports ready: by recomputing the digest, or, when the memfd is the very
//! model memfd the worker inherited from the zygote (same inode, sealed), by that identity.
//! However many workers there are, the compute copy is in memory once.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{
    ArenaInfo, BackendError, DeviceBackend, Export, HostWeightsForm, Manifest, TensorLayout,
};
use crate::model::{Dtype, Model};
use crate::shm::{Mapping, MemfdWriter, SealedMemfd};

/// Alignment of every tensor in the compute copy (a cache line; enough for any SIMD load).
pub const ALIGN: u64 = 64;

/// Name of the compute copy's memfd, as `/proc/PID/maps` shows it.
pub const MEMFD_NAME: &str = "zygote-weights";

/// The host backend, owner side: builds the compute copy in its `form`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostBackend {
    pub form: HostWeightsForm,
}

impl HostBackend {
    pub fn new(form: HostWeightsForm) -> Self {
        Self { form }
    }
}

/// The dtype a tensor of dtype `d` with `rank` dimensions has in the compute copy of `form`:
/// in the f16 (bf16) form a 2-D float tensor is f16 (bf16); otherwise f16/bf16 are widened to
/// f32 and every other dtype is kept.
pub fn compute_dtype(d: Dtype, rank: usize, form: HostWeightsForm) -> Dtype {
    let float = matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16);
    match form {
        HostWeightsForm::F16 if float && rank == 2 => Dtype::F16,
        HostWeightsForm::Bf16 if float && rank == 2 => Dtype::BF16,
        _ => widened_dtype(d),
    }
}

/// The dtype of `d` in the f32 form (also the CUDA backend's compute dtype): f16/bf16 widened
/// to f32, every other dtype kept.
pub fn widened_dtype(d: Dtype) -> Dtype {
    match d {
        Dtype::F16 | Dtype::BF16 => Dtype::F32,
        other => other,
    }
}

/// Writes [`widened_dtype`]'s form of `src` (a tensor of dtype `d`) into `dst`.
pub fn widen_into(d: Dtype, src: &[u8], dst: &mut [u8]) {
    match d {
        Dtype::F16 | Dtype::BF16 => {
            let widen = if d == Dtype::F16 {
                f16_to_f32
            } else {
                bf16_to_f32
            };
            for (s, o) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&widen(u16::from_le_bytes([s[0], s[1]])).to_le_bytes());
            }
        }
        _ => dst.copy_from_slice(src),
    }
}

/// Plans where each tensor goes in the compute copy of `form`: `(layouts, total bytes)`,
/// tensors in model order.
pub fn plan(model: &Model, form: HostWeightsForm) -> (Vec<TensorLayout>, u64) {
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(model.tensors().len());
    for t in model.tensors() {
        let dtype = compute_dtype(t.dtype, t.shape.len(), form);
        let count: u64 = t.shape.iter().map(|&d| d as u64).product();
        let len = count * dtype.size() as u64;
        offset = offset.div_ceil(ALIGN) * ALIGN;
        out.push(TensorLayout {
            name: t.name.clone(),
            dtype,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            arena: 0,
            offset,
            len,
        });
        offset += len;
    }
    (out, offset)
}

/// IEEE half precision to single: exact for every value (the `half` crate's conversion).
fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// bf16 to f32: exact (the high half of an f32).
fn bf16_to_f32(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

/// Element `i` of the little-endian bytes `src` of a float tensor of dtype `d` (f32, f16 or
/// bf16), as f32 (exact).
fn float_at(d: Dtype, src: &[u8], i: usize) -> f32 {
    match d {
        Dtype::F32 => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        Dtype::F16 => f16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
        Dtype::BF16 => bf16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
        other => unreachable!("float_at of a {other} tensor"),
    }
}

/// Writes tensor `name`'s bytes `src` (dtype `from`) into `dst` as dtype `to` (what
/// [`compute_dtype`] gave): widened, narrowed to f16 (rounding to nearest even; a finite
/// value beyond f16's range is [`BackendError::F16Range`]), to bf16 (nearest even; f16 to
/// bf16 goes through f32, and both steps are exact or rounded once), or copied when the dtypes
/// agree.
pub fn convert_into(
    name: &str,
    from: Dtype,
    to: Dtype,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), BackendError> {
    match (from, to) {
        _ if from == to => dst.copy_from_slice(src),
        (Dtype::F16 | Dtype::BF16, Dtype::F32) => widen_into(from, src, dst),
        (Dtype::F32 | Dtype::BF16, Dtype::F16) => {
            for (i, o) in dst.chunks_exact_mut(2).enumerate() {
                let v = float_at(from, src, i);
                let h = half::f16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    return Err(BackendError::F16Range {
                        tensor: name.to_string(),
                        index: i,
                        value: v,
                    });
                }
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        (Dtype::F32 | Dtype::F16, Dtype::BF16) => {
            for (i, o) in dst.chunks_exact_mut(2).enumerate() {
                let b = half::bf16::from_f32(float_at(from, src, i));
                o.copy_from_slice(&b.to_bits().to_le_bytes());
            }
        }
        _ => {
            return Err(BackendError::Dtype {
                tensor: name.to_string(),
                dtype: format!("{from} (to {to})"),
            })
        }
    }
    Ok(())
}

impl DeviceBackend for HostBackend {
    fn name(&self) -> &'static str {
        "host"
    }

    fn ipc(&self) -> &'static str {
        "memfd"
    }

    fn export(&mut self, model: &Model, generation: u64) -> Result<Export, BackendError> {
        if let Some(export) = export_in_place(model, generation, self.form)? {
            return Ok(export);
        }
        let (layouts, total) = plan(model, self.form);
        let mut writer = MemfdWriter::create(MEMFD_NAME, total as usize)?;
        {
            let dst = writer.as_mut_slice();
            for (t, l) in model.tensors().iter().zip(&layouts) {
                let out = &mut dst[l.offset as usize..(l.offset + l.len) as usize];
                convert_into(&t.name, t.dtype, l.dtype, model.data(t), out)?;
            }
        }
        log::info!("host compute copy: {} form, {total} bytes", self.form);
        let sealed = writer.seal()?;
        let map = sealed.map()?;
        let content_digest = super::digest_bytes(&[&map]);
        drop(map);
        let manifest = Manifest {
            generation,
            backend: crate::protocol::Backend::Host,
            ipc: crate::protocol::Ipc::Memfd,
            model_digest: model.digest().to_string(),
            content_digest,
            device: None,
            arenas: vec![ArenaInfo {
                size: total,
                used: total,
                legacy_handle: Vec::new(),
            }],
            tensors: layouts,
        };
        let fd = sealed.try_clone_fd().map_err(|source| BackendError::Dup {
            what: "the weights memfd",
            source,
        })?;
        Ok(Export {
            manifest,
            fds: vec![fd],
        })
    }

    fn adopt(
        &mut self,
        manifest: Manifest,
        fds: Vec<OwnedFd>,
        model: &Model,
    ) -> Result<Option<Export>, BackendError> {
        if manifest.backend != crate::protocol::Backend::Host {
            return Ok(None);
        }
        super::check_manifest(&manifest, model)?;
        if !has_form(&manifest, model, self.form) {
            // Kept by an owner of another form: this one builds its own.
            return Ok(None);
        }
        // The same checks a worker makes: seals, size, contents.
        let dup = fds
            .first()
            .map(|f| f.try_clone())
            .transpose()
            .map_err(|source| BackendError::Dup {
                what: "a kept memfd",
                source,
            })?;
        let weights = import(manifest.clone(), dup.into_iter().collect(), model)?;
        drop(weights);
        Ok(Some(Export { manifest, fds }))
    }
}

/// Whether every tensor of `manifest` (checked against `model`) has the dtype the compute copy
/// of `form` gives it.
pub fn has_form(manifest: &Manifest, model: &Model, form: HostWeightsForm) -> bool {
    manifest.tensors.iter().all(|l| {
        model
            .tensor(&l.name)
            .is_some_and(|t| compute_dtype(t.dtype, t.shape.len(), form) == l.dtype)
    })
}

/// Whether the model's own bytes can serve as the compute copy of `form`.
pub fn usable_in_place(model: &Model, form: HostWeightsForm) -> bool {
    model.tensors().iter().all(|t| {
        compute_dtype(t.dtype, t.shape.len(), form) == t.dtype
            && t.offset % t.dtype.size().max(1) == 0
    })
}

/// Exports the model memfd itself when no tensor needs converting.
fn export_in_place(
    model: &Model,
    generation: u64,
    form: HostWeightsForm,
) -> Result<Option<Export>, BackendError> {
    if !usable_in_place(model, form) {
        return Ok(None);
    }
    let layouts = model
        .tensors()
        .iter()
        .map(|t| TensorLayout {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            arena: 0,
            offset: t.offset as u64,
            len: t.len as u64,
        })
        .collect();
    let fd = model
        .memfd()
        .try_clone_to_owned()
        .map_err(|source| BackendError::Dup {
            what: "the model memfd",
            source,
        })?;
    let manifest = Manifest {
        generation,
        backend: crate::protocol::Backend::Host,
        ipc: crate::protocol::Ipc::Memfd,
        model_digest: model.digest().to_string(),
        // The arena is the whole model file, so its digest is the model's.
        content_digest: model.digest().to_string(),
        device: None,
        arenas: vec![ArenaInfo {
            size: model.len(),
            used: model.len(),
            legacy_handle: Vec::new(),
        }],
        tensors: layouts,
    };
    Ok(Some(Export {
        manifest,
        fds: vec![fd],
    }))
}

/// Whether two fds refer to the same file (device and inode).
fn same_file(a: std::os::fd::BorrowedFd<'_>, b: std::os::fd::BorrowedFd<'_>) -> bool {
    match (
        nix::sys::stat::fstat(a.as_raw_fd()),
        nix::sys::stat::fstat(b.as_raw_fd()),
    ) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

/// A tensor of the host compute copy.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [u64],
    pub bytes: &'a [u8],
}

impl<'a> HostTensor<'a> {
    /// The elements as f32, when the tensor is f32 (every tensor's offset is 64-byte aligned,
    /// or, in place, a multiple of its element size).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if self.dtype != Dtype::F32 {
            return None;
        }
        // The mapping is page aligned and every offset a multiple of 4, so this never fails.
        bytemuck::try_cast_slice(self.bytes).ok()
    }

    /// The elements as bfloat16, when the tensor is bf16 (the bf16 form's matrices).
    pub fn as_bf16(&self) -> Option<&'a [half::bf16]> {
        if self.dtype != Dtype::BF16 {
            return None;
        }
        // The mapping is page aligned and every offset even, so this never fails.
        bytemuck::try_cast_slice(self.bytes).ok()
    }

    /// The elements as IEEE half precision, when the tensor is f16 (the f16 form's matrices).
    pub fn as_f16(&self) -> Option<&'a [half::f16]> {
        if self.dtype != Dtype::F16 {
            return None;
        }
        // The mapping is page aligned and every offset even, so this never fails.
        bytemuck::try_cast_slice(self.bytes).ok()
    }
}

/// Weights a worker imported from a host owner.
#[derive(Debug)]
pub struct HostWeights {
    manifest: Manifest,
    map: Mapping,
    by_name: HashMap<String, usize>,
}

impl HostWeights {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
        let l = &self.manifest.tensors[*self.by_name.get(name)?];
        Some(HostTensor {
            dtype: l.dtype,
            shape: &l.shape,
            bytes: &self.map[l.offset as usize..(l.offset + l.len) as usize],
        })
    }

    /// A tensor as f32 with its shape, when it is f32 in the compute copy.
    pub fn f32(&self, name: &str) -> Option<(&[f32], &[u64])> {
        let t = self.tensor(name)?;
        Some((t.as_f32()?, t.shape))
    }

    /// The whole mapping (for audits).
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }
}

/// Worker side: adopt the memfd, check seals and size, map, verify the contents.
pub fn import(
    manifest: Manifest,
    mut fds: Vec<OwnedFd>,
    model: &Model,
) -> Result<HostWeights, BackendError> {
    if fds.len() != 1 || manifest.arenas.len() != 1 {
        return Err(BackendError::Handles {
            expected: 1,
            received: fds.len(),
        });
    }
    let fd = fds.remove(0);
    let memfd = SealedMemfd::from_fd(fd, Some(manifest.arenas[0].size))?;
    let map = memfd.map()?;
    // The model memfd itself is sealed and its digest known: identity is proof enough.
    let verified_by_identity =
        same_file(memfd.fd(), model.memfd()) && manifest.content_digest == model.digest();
    if !verified_by_identity {
        let actual = super::digest_bytes(&[&map]);
        if actual != manifest.content_digest {
            return Err(BackendError::Digest {
                what: "weights",
                expected: manifest.content_digest.clone(),
                actual,
            });
        }
    }
    let by_name = manifest
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok(HostWeights {
        manifest,
        map,
        by_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn f16_widening_is_exact() {
        for (bits, want) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0000, 0.0),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x3555, 0.333_251_95),
        ] {
            assert_eq!(f16_to_f32(bits), want, "{bits:#x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn bf16_widening_keeps_the_high_bits() {
        let mut out = [0u8; 4];
        convert_into(
            "t",
            Dtype::BF16,
            Dtype::F32,
            &0x3f80u16.to_le_bytes(),
            &mut out,
        )
        .unwrap();
        assert_eq!(f32::from_le_bytes(out), 1.0);
    }

    #[test]
    fn the_f16_form_keeps_matrices_in_f16_and_vectors_in_f32() {
        use HostWeightsForm::{F16, F32};
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            assert_eq!(compute_dtype(d, 2, F16), Dtype::F16, "{d}");
            assert_eq!(compute_dtype(d, 1, F16), Dtype::F32, "{d}");
            assert_eq!(compute_dtype(d, 3, F16), Dtype::F32, "{d}");
            assert_eq!(compute_dtype(d, 2, F32), Dtype::F32, "{d}");
        }
        assert_eq!(compute_dtype(Dtype::I64, 2, F16), Dtype::I64);
        assert_eq!(compute_dtype(Dtype::F64, 2, F16), Dtype::F64);
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A model file of `tensors` (name, dtype, shape; values `i / 8 - 1` for float ones, as
    /// f16/bf16/f32 exactly), loaded.
    fn model(dir: &std::path::Path, tensors: &[(&str, Dtype, &[usize])]) -> Model {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|&(_, d, shape)| {
                let n: usize = shape.iter().product();
                (0..n)
                    .flat_map(|i| {
                        let v = i as f32 / 8.0 - 1.0;
                        match d {
                            Dtype::F32 => v.to_le_bytes().to_vec(),
                            Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                            Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                            _ => (i as i64).to_le_bytes().to_vec(),
                        }
                    })
                    .collect()
            })
            .collect();
        let list: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
            .iter()
            .zip(&data)
            .map(|(&(name, d, shape), bytes)| (name, d, shape, bytes.as_slice()))
            .collect();
        let path = dir.join("model.safetensors");
        crate::synth::write_safetensors(&path, &list, None).unwrap();
        Model::load(&path).unwrap()
    }

    fn export_import(model: &Model, form: HostWeightsForm) -> (Export, HostWeights) {
        let export = HostBackend::new(form).export(model, 1).unwrap();
        let fds = export.fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let weights = import(export.manifest.clone(), fds, model).unwrap();
        (export, weights)
    }

    #[test]
    fn the_f16_form_narrows_matrices_and_widens_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let model = model(
            dir.path(),
            &[
                ("emb", Dtype::F32, &[5, 8]),
                ("w", Dtype::BF16, &[8, 8]),
                ("b", Dtype::F16, &[8]),
                ("ids", Dtype::I64, &[3]),
            ],
        );
        let (export, weights) = export_import(&model, HostWeightsForm::F16);
        crate::backend::check_manifest(&export.manifest, &model).unwrap();
        let want = |n: usize| (0..n).map(|i| i as f32 / 8.0 - 1.0).collect::<Vec<_>>();
        for (name, n) in [("emb", 40), ("w", 64)] {
            let t = weights.tensor(name).unwrap();
            assert_eq!(t.dtype, Dtype::F16, "{name}");
            assert!(t.as_f32().is_none(), "{name}");
            let got: Vec<f32> = t.as_f16().unwrap().iter().map(|h| h.to_f32()).collect();
            assert_eq!(got, want(n), "{name}");
        }
        let (b, shape) = weights.f32("b").unwrap();
        assert_eq!((b, shape), (want(8).as_slice(), [8u64].as_slice()));
        assert_eq!(weights.tensor("ids").unwrap().dtype, Dtype::I64);
        // The f32 form of the same model: every float tensor f32, as before.
        let (_, weights) = export_import(&model, HostWeightsForm::F32);
        assert_eq!(weights.f32("emb").unwrap().0, want(40).as_slice());
        assert_eq!(weights.f32("w").unwrap().0, want(64).as_slice());
        assert!(weights.tensor("w").unwrap().as_f16().is_none());
    }

    #[test]
    fn the_bf16_form_narrows_matrices_to_bf16_and_widens_vectors() {
        use HostWeightsForm::Bf16;
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            assert_eq!(compute_dtype(d, 2, Bf16), Dtype::BF16, "{d}");
            assert_eq!(compute_dtype(d, 1, Bf16), Dtype::F32, "{d}");
        }
        assert_eq!(compute_dtype(Dtype::I64, 2, Bf16), Dtype::I64);
        let dir = tempfile::tempdir().unwrap();
        let model = model(
            dir.path(),
            &[
                ("emb", Dtype::F32, &[5, 8]),
                ("w", Dtype::F16, &[8, 8]),
                ("b", Dtype::BF16, &[8]),
            ],
        );
        let (export, weights) = export_import(&model, Bf16);
        crate::backend::check_manifest(&export.manifest, &model).unwrap();
        // Multiples of 1/8 in [-1, 7]: exact in bf16, so the narrowing must give them back.
        let want = |n: usize| (0..n).map(|i| i as f32 / 8.0 - 1.0).collect::<Vec<_>>();
        for (name, n) in [("emb", 40), ("w", 64)] {
            let t = weights.tensor(name).unwrap();
            assert_eq!(t.dtype, Dtype::BF16, "{name}");
            assert!(t.as_f32().is_none() && t.as_f16().is_none(), "{name}");
            let got: Vec<f32> = t.as_bf16().unwrap().iter().map(|h| h.to_f32()).collect();
            assert_eq!(got, want(n), "{name}");
        }
        assert_eq!(weights.f32("b").unwrap().0, want(8).as_slice());
    }

    #[test]
    fn bf16_narrowing_rounds_to_nearest_even_and_keeps_the_range() {
        // 1 + 2^-8 is halfway between two bf16 values: it rounds to the even one (1.0);
        // 1 + 3 * 2^-8 rounds up; 1e30 is beyond f16's range but within bf16's.
        let values = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 1e30f32, -2.5];
        let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0u8; 2 * values.len()];
        convert_into("t", Dtype::F32, Dtype::BF16, &src, &mut out).unwrap();
        let got: Vec<f32> = out
            .chunks_exact(2)
            .map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], 1.0 + 4.0 / 256.0);
        assert!((got[2] / 1e30 - 1.0).abs() < 1e-2, "{}", got[2]);
        assert_eq!(got[3], -2.5);
    }

    #[test]
    fn an_f16_model_in_the_f16_form_is_served_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let model = model(
            dir.path(),
            &[("w", Dtype::F16, &[8, 8]), ("b", Dtype::F32, &[8])],
        );
        assert!(usable_in_place(&model, HostWeightsForm::F16));
        assert!(!usable_in_place(&model, HostWeightsForm::F32));
        let (export, weights) = export_import(&model, HostWeightsForm::F16);
        // The compute copy is the model memfd itself: nothing widened or copied.
        assert_eq!(export.manifest.content_digest, model.digest());
        assert!(same_file(export.fds[0].as_fd(), model.memfd()));
        assert_eq!(weights.tensor("w").unwrap().as_f16().unwrap().len(), 64);
    }

    #[test]
    fn a_kept_copy_of_the_other_form_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let model = model(
            dir.path(),
            &[("w", Dtype::F32, &[8, 8]), ("b", Dtype::F32, &[8])],
        );
        let (kept, _) = export_import(&model, HostWeightsForm::F32);
        let fds = || kept.fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let mut f16 = HostBackend::new(HostWeightsForm::F16);
        assert!(f16
            .adopt(kept.manifest.clone(), fds(), &model)
            .unwrap()
            .is_none());
        let mut f32 = HostBackend::new(HostWeightsForm::F32);
        assert!(f32
            .adopt(kept.manifest.clone(), fds(), &model)
            .unwrap()
            .is_some());
    }

    #[test]
    fn narrowing_to_f16_rounds_to_nearest() {
        let src = f32_bytes(&[1.0, -2.5, 1.0 + 2f32.powi(-11) * 1.5, 65504.0, 1e-8]);
        let mut out = vec![0u8; 10];
        convert_into("t", Dtype::F32, Dtype::F16, &src, &mut out).unwrap();
        let got: Vec<f32> = out
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        assert_eq!(got, [1.0, -2.5, 1.0 + 2f32.powi(-10), 65504.0, 0.0]);
        // bf16 1.0 (0x3f80) narrows to f16 1.0 (0x3c00).
        let mut one = [0u8; 2];
        convert_into(
            "t",
            Dtype::BF16,
            Dtype::F16,
            &0x3f80u16.to_le_bytes(),
            &mut one,
        )
        .unwrap();
        assert_eq!(u16::from_le_bytes(one), 0x3c00);
    }

    #[test]
    fn narrowing_refuses_values_beyond_f16() {
        let src = f32_bytes(&[0.5, -70000.0]);
        let mut out = vec![0u8; 4];
        let err = convert_into("enc.w", Dtype::F32, Dtype::F16, &src, &mut out).unwrap_err();
        assert!(
            matches!(&err, BackendError::F16Range { tensor, index: 1, value } if tensor == "enc.w" && *value == -70000.0),
            "{err:?}"
        );
        assert!(err.to_string().contains("--host-weights f32"), "{err}");
        // Infinities and NaNs stay what they are.
        let src = f32_bytes(&[f32::INFINITY, f32::NAN]);
        convert_into("t", Dtype::F32, Dtype::F16, &src, &mut out).unwrap();
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x7c00);
        assert!(f16_to_f32(u16::from_le_bytes([out[2], out[3]])).is_nan());
    }
}
