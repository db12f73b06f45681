//! The host backend: one f32 compute copy of the weights in a sealed memfd, shared read-only by
//! every worker.
//!
//! When the model needs no conversion (every tensor already in its compute dtype, f32 tensors
//! 4-byte aligned in the file), the compute copy *is* the zygote's sealed model memfd: the
//! owner exports a duplicate of that fd with the tensors at their file offsets, and the weights
//! are in memory exactly once. Otherwise the owner widens f16/bf16 tensors to f32 (every other
//! dtype is copied as it is) into a new memfd, each tensor at a 64-byte-aligned offset, seals
//! it and exports it with the digest of its bytes.
//!
//! A worker receives the memfd, checks its seals and size, maps it read-only and verifies its
//! contents before it reports ready: by recomputing the digest, or, when the memfd is the very
//! model memfd the worker inherited from the zygote (same inode, sealed), by that identity.
//! However many workers there are, the compute copy is in memory once.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{ArenaInfo, BackendError, DeviceBackend, Export, Manifest, TensorLayout};
use crate::model::{Dtype, Model};
use crate::shm::{Mapping, MemfdWriter, SealedMemfd};

/// Alignment of every tensor in the compute copy (a cache line; enough for any SIMD load).
pub const ALIGN: u64 = 64;

/// Name of the compute copy's memfd, as `/proc/PID/maps` shows it.
pub const MEMFD_NAME: &str = "zygote-weights";

/// The host backend, owner side.
#[derive(Debug, Default)]
pub struct HostBackend;

/// The dtype a tensor has in the compute copy.
pub fn compute_dtype(d: Dtype) -> Dtype {
    match d {
        Dtype::F16 | Dtype::BF16 => Dtype::F32,
        other => other,
    }
}

/// Plans where each tensor goes: `(layouts, total bytes)`, tensors in model order.
pub fn plan(model: &Model) -> (Vec<TensorLayout>, u64) {
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(model.tensors().len());
    for t in model.tensors() {
        let dtype = compute_dtype(t.dtype);
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

/// Writes the compute form of `src` (a tensor of dtype `d`) into `dst`.
pub fn convert_into(d: Dtype, src: &[u8], dst: &mut [u8]) {
    match d {
        Dtype::F16 => {
            for (s, o) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&f16_to_f32(u16::from_le_bytes([s[0], s[1]])).to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (s, o) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                let v = half::bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => dst.copy_from_slice(src),
    }
}

impl DeviceBackend for HostBackend {
    fn name(&self) -> &'static str {
        "host"
    }

    fn ipc(&self) -> &'static str {
        "memfd"
    }

    fn export(&mut self, model: &Model, generation: u64) -> Result<Export, BackendError> {
        if let Some(export) = export_in_place(model, generation)? {
            return Ok(export);
        }
        let (layouts, total) = plan(model);
        let mut writer = MemfdWriter::create(MEMFD_NAME, total as usize)?;
        {
            let dst = writer.as_mut_slice();
            for (t, l) in model.tensors().iter().zip(&layouts) {
                let out = &mut dst[l.offset as usize..(l.offset + l.len) as usize];
                convert_into(t.dtype, model.data(t), out);
            }
        }
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

/// Whether the model's own bytes can serve as the compute copy.
pub fn usable_in_place(model: &Model) -> bool {
    model
        .tensors()
        .iter()
        .all(|t| compute_dtype(t.dtype) == t.dtype && t.offset % t.dtype.size().max(1) == 0)
}

/// Exports the model memfd itself when no tensor needs converting.
fn export_in_place(model: &Model, generation: u64) -> Result<Option<Export>, BackendError> {
    if !usable_in_place(model) {
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
    /// The elements as f32, when the tensor is f32 (every tensor's offset is 64-byte aligned).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if self.dtype != Dtype::F32 {
            return None;
        }
        // The mapping is page aligned and every offset a multiple of ALIGN, so this never fails.
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
        convert_into(Dtype::BF16, &0x3f80u16.to_le_bytes(), &mut out);
        assert_eq!(f32::from_le_bytes(out), 1.0);
    }
}
