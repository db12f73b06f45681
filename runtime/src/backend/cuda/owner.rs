//! The owner's side of the CUDA backend: upload the weights once, export them, keep them.
//!
//! [`CudaBackend`] is what the owner (a zygote child, the only process that creates device
//! copies of the weights) gets from [`super::select_backend`]. [`DeviceBackend::export`]:
//!
//! 1. plans the arenas ([`super::plan`]) with the device's allocation granularity;
//! 2. allocates them: VMM (`cuMemCreate`, POSIX-fd exportable) or legacy (`cuMemAlloc`);
//! 3. uploads each arena's image ([`super::image`]) from the model's shared mapping through two
//!    pinned bounce buffers of the owner's own, hashing each chunk as it is staged;
//! 4. reads the arenas back and checks that the device digest equals the staged one;
//! 5. exports one fd per arena (VMM) or the legacy IPC handle bytes, and keeps the arenas for
//!    as long as the generation is not released.
//!
//! [`CudaBackend::adopt`] is the other way to get a generation, after an owner died: the fds
//! that someone kept (the zygote) are imported, verified and served again, with no upload.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;

use super::digest::{device_digest, ContentHasher};
use super::driver::{self, DeviceMemory, Driver, LegacyArena, Stager, VmmArena};
use super::image::ArenaImage;
use super::import::{self, ImportedArena};
use super::plan::{self, Capabilities, IpcMode};
use super::DeviceInfo;
use crate::backend::{
    check_manifest, ArenaInfo, BackendError, CudaUnavailable, DeviceBackend, DeviceId, Export,
    IpcChoice, Manifest, ManifestError,
};
use crate::model::{Dtype, Model};

/// Bytes per pinned bounce buffer in the owner (two of them exist during an upload).
pub const UPLOAD_CHUNK: usize = 64 << 20;

/// An arena the owner keeps alive for a generation.
#[derive(Debug)]
enum OwnedArena {
    Vmm(VmmArena),
    Legacy(LegacyArena),
    /// Imported from fds kept by someone else (adoption).
    Adopted(ImportedArena),
}

impl OwnedArena {
    fn memory(&self) -> &dyn DeviceMemory {
        match self {
            Self::Vmm(a) => a,
            Self::Legacy(a) => a,
            Self::Adopted(a) => a.memory(),
        }
    }

    fn memory_mut(&mut self) -> Option<&mut dyn DeviceMemory> {
        match self {
            Self::Vmm(a) => Some(a),
            Self::Legacy(a) => Some(a),
            Self::Adopted(_) => None,
        }
    }
}

/// The CUDA backend, owner side: one device, one context, the generations it exported.
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    ipc: IpcMode,
    granularity: u64,
    arena_cap: u64,
    generations: BTreeMap<u64, Vec<OwnedArena>>,
}

impl CudaBackend {
    /// Opens device `device` for an owner: loads the driver (an error is
    /// [`BackendError::CudaUnavailable`]), decides the IPC mode from `ipc` and what the device
    /// supports (logged), and retains the device's primary context.
    pub fn new(device: u32, ipc: IpcChoice) -> Result<Self, BackendError> {
        let driver = Driver::load()?;
        let count = driver.device_count()?;
        if device >= count {
            return Err(CudaUnavailable::NoSuchDevice {
                ordinal: device,
                count,
            }
            .into());
        }
        let info = super::device_info(&driver, device)?;
        let decision = plan::decide_ipc(ipc, info.capabilities, device)?;
        let ctx = driver.primary_context(device)?;
        let granularity = match decision.mode {
            IpcMode::Vmm => driver::vmm_granularity(&ctx)?,
            IpcMode::Legacy => plan::LEGACY_GRANULARITY,
        };
        log::info!(
            "CUDA device {device}: {} ({}, {} MiB); ipc {}: {}; granularity {} KiB",
            info.name,
            info.uuid,
            info.total_mem >> 20,
            decision.mode.as_str(),
            decision.reason,
            granularity >> 10,
        );
        Ok(Self {
            ctx,
            info,
            ipc: decision.mode,
            granularity,
            arena_cap: plan::DEFAULT_ARENA_CAP,
            generations: BTreeMap::new(),
        })
    }

    /// Sets the most bytes packed into one arena (default [`plan::DEFAULT_ARENA_CAP`]).
    pub fn with_arena_cap(mut self, cap: u64) -> Self {
        self.arena_cap = cap.max(1);
        self
    }

    /// The device, as manifests name it.
    pub fn device(&self) -> DeviceId {
        DeviceId {
            ordinal: self.info.ordinal,
            uuid: self.info.uuid.clone(),
        }
    }

    /// What the device is and supports.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The IPC mode of new exports.
    pub fn ipc_mode(&self) -> IpcMode {
        self.ipc
    }

    /// The allocation granularity arena sizes are rounded to.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The device's primary context in this process.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The generations this owner holds, oldest first.
    pub fn generations(&self) -> Vec<u64> {
        self.generations.keys().copied().collect()
    }

    /// Drops this owner's hold on a generation. With VMM its memory lives on while any fd or
    /// worker mapping of it does; with legacy IPC the memory is freed now, so call this only
    /// once no worker uses it. Returns whether the generation was held.
    pub fn release_generation(&mut self, generation: u64) -> bool {
        let held = self.generations.remove(&generation).is_some();
        if held {
            log::info!("released generation {generation}");
        }
        held
    }

    /// Takes over a generation another owner exported with VMM, from the fds someone kept
    /// (the zygote): checks the manifest against `model` and this device, imports and maps the
    /// arenas, verifies their digest, and returns the same generation ready to serve, with the
    /// same fds. Nothing is uploaded. Legacy generations cannot be adopted: their memory died
    /// with the owner that allocated it.
    pub fn adopt(
        &mut self,
        manifest: Manifest,
        fds: Vec<OwnedFd>,
        model: &Model,
    ) -> Result<Export, BackendError> {
        let checked = import::precheck(&manifest, fds.len())?;
        if checked.mode != IpcMode::Vmm {
            return Err(ManifestError::NotAdoptable {
                generation: manifest.generation,
                ipc: checked.mode.as_str(),
            }
            .into());
        }
        if checked.uuid != self.info.uuid || checked.ordinal != self.info.ordinal {
            return Err(BackendError::DeviceMismatch {
                ordinal: self.info.ordinal,
                expected: format!("device {} ({})", checked.ordinal, checked.uuid),
                actual: self.info.uuid.clone(),
            });
        }
        if self.generations.contains_key(&manifest.generation) {
            return Err(ManifestError::GenerationHeld {
                generation: manifest.generation,
            }
            .into());
        }
        check_manifest(&manifest, model)?;
        let start = Instant::now();
        let arenas = import::map_arenas(&self.ctx, &manifest, checked.mode, &fds)?;
        import::verify(&self.ctx, &manifest, &arenas)?;
        log::info!(
            "adopted generation {} ({} arenas, {} bytes) in {} ms, without uploading",
            manifest.generation,
            arenas.len(),
            manifest.arenas.iter().map(|a| a.used).sum::<u64>(),
            start.elapsed().as_millis()
        );
        self.generations.insert(
            manifest.generation,
            arenas.into_iter().map(OwnedArena::Adopted).collect(),
        );
        Ok(Export { manifest, fds })
    }

    fn allocate(&self, size: u64) -> Result<OwnedArena, BackendError> {
        Ok(match self.ipc {
            IpcMode::Vmm => OwnedArena::Vmm(VmmArena::create(&self.ctx, size)?),
            IpcMode::Legacy => OwnedArena::Legacy(LegacyArena::create(&self.ctx, size)?),
        })
    }
}

impl DeviceBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn adopt(
        &mut self,
        manifest: Manifest,
        fds: Vec<OwnedFd>,
        model: &Model,
    ) -> Result<Option<Export>, BackendError> {
        if manifest.ipc != crate::protocol::Ipc::Vmm {
            // Legacy handles die with the owner that exported them.
            return Ok(None);
        }
        CudaBackend::adopt(self, manifest, fds, model).map(Some)
    }

    fn ipc(&self) -> &'static str {
        self.ipc.as_str()
    }

    fn export(&mut self, model: &Model, generation: u64) -> Result<Export, BackendError> {
        if self.generations.contains_key(&generation) {
            return Err(ManifestError::GenerationExported { generation }.into());
        }
        let start = Instant::now();
        let plan = plan::plan_arenas(model.tensors(), self.granularity, self.arena_cap)?;
        let mut arenas = plan
            .arenas
            .iter()
            .map(|a| self.allocate(a.size))
            .collect::<Result<Vec<_>, _>>()?;
        let mut stager = Stager::new(&self.ctx, UPLOAD_CHUNK)?;
        let allocated = start.elapsed();
        let mut staged = ContentHasher::new();
        for (a, arena) in plan.arenas.iter().zip(arenas.iter_mut()) {
            let sources: Vec<(Dtype, &[u8])> = model.tensors()[a.tensors.clone()]
                .iter()
                .map(|t| (t.dtype, model.data(t)))
                .collect();
            let image = ArenaImage::new(&plan.tensors[a.tensors.clone()], &sources, a.used);
            let dst = arena.memory_mut().ok_or(ManifestError::AdoptedArenaWrite)?;
            stager.upload(dst, image.used(), |offset, buf| {
                image.fill(offset, buf);
                staged.update(buf);
            })?;
        }
        let uploaded = start.elapsed();
        let staged = staged.finish();
        let list: Vec<(&dyn DeviceMemory, u64)> = arenas
            .iter()
            .zip(&plan.arenas)
            .map(|(m, a)| (m.memory(), a.used))
            .collect();
        let on_device = device_digest(&mut stager, &list)?;
        drop(stager);
        if on_device != staged {
            return Err(BackendError::Digest {
                what: "device copy after upload",
                expected: staged,
                actual: on_device,
            });
        }
        let (bytes, allocated_bytes) = (plan.used(), plan.size());
        let mut fds = Vec::new();
        let mut infos = Vec::with_capacity(arenas.len());
        for (a, arena) in plan.arenas.iter().zip(&arenas) {
            let legacy_handle = match arena {
                OwnedArena::Vmm(v) => {
                    fds.push(v.export_fd()?);
                    Vec::new()
                }
                OwnedArena::Legacy(l) => l.ipc_handle()?.to_vec(),
                OwnedArena::Adopted(_) => Vec::new(),
            };
            infos.push(ArenaInfo {
                size: a.size,
                used: a.used,
                legacy_handle,
            });
        }
        let manifest = Manifest {
            generation,
            backend: crate::protocol::Backend::Cuda,
            ipc: self.ipc.ipc(),
            model_digest: model.digest().to_string(),
            content_digest: staged,
            device: Some(self.device()),
            arenas: infos,
            tensors: plan.tensors,
        };
        // The plan is ours, but a worker will hold it to this standard: fail here first.
        check_manifest(&manifest, model)?;
        let upload_s = (uploaded - allocated).as_secs_f64().max(1e-9);
        log::info!(
            "generation {generation}: {bytes} bytes in {} arenas ({} allocated), ipc {}; \
             allocate {} ms, upload {} ms ({:.1} GB/s), verify {} ms",
            arenas.len(),
            allocated_bytes,
            self.ipc.as_str(),
            allocated.as_millis(),
            (uploaded - allocated).as_millis(),
            bytes as f64 / upload_s / 1e9,
            (start.elapsed() - uploaded).as_millis(),
        );
        self.generations.insert(generation, arenas);
        Ok(Export { manifest, fds })
    }
}

/// Reads what an owner needs to know about a device.
pub(crate) fn read_capabilities(dev: &driver::Device) -> Result<Capabilities, BackendError> {
    let vmm = dev
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED)?
        != 0;
    let posix_fd = dev.attribute(
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
    )? != 0;
    Ok(Capabilities { vmm, posix_fd })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::plan::{plan_arenas, DEFAULT_ARENA_CAP};

    /// Writes a safetensors file with these tensors (contents: a byte pattern) and loads it.
    fn model(tensors: &[(&str, Dtype, &[usize])], tag: &str) -> (Model, std::path::PathBuf) {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .enumerate()
            .map(|(i, (_, d, shape))| {
                let n = d.size() * shape.iter().product::<usize>();
                (0..n).map(|j| (j * 13 + i) as u8).collect()
            })
            .collect();
        let list: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
            .iter()
            .zip(&data)
            .map(|(&(name, d, shape), bytes)| (name, d, shape, bytes.as_slice()))
            .collect();
        let path = std::env::temp_dir().join(format!(
            "zygote-cuda-{tag}-{}.safetensors",
            std::process::id()
        ));
        crate::synth::write_safetensors(&path, &list, None).unwrap();
        (Model::load(&path).unwrap(), path)
    }

    #[test]
    fn a_planned_manifest_passes_the_workers_checks_and_reaches_the_cuda_import() {
        let (model, path) = model(
            &[
                ("emb", Dtype::F16, &[1000, 8]),
                ("ids", Dtype::I64, &[3]),
                ("ln.w", Dtype::BF16, &[8]),
                ("w", Dtype::F32, &[8, 8]),
            ],
            "plan",
        );
        // A small cap forces several arenas.
        let plan = plan_arenas(model.tensors(), 4096, 8192).unwrap();
        assert!(plan.arenas.len() >= 2, "{plan:?}");
        let manifest = Manifest {
            generation: 3,
            backend: crate::protocol::Backend::Cuda,
            ipc: crate::protocol::Ipc::Legacy,
            model_digest: model.digest().to_string(),
            content_digest: crate::backend::digest_bytes(&[b"device"]),
            device: Some(DeviceId {
                ordinal: 0,
                uuid: "GPU-00000000-0000-0000-0000-000000000000".into(),
            }),
            arenas: plan
                .arenas
                .iter()
                .map(|a| ArenaInfo {
                    size: a.size,
                    used: a.used,
                    legacy_handle: vec![0; 64],
                })
                .collect(),
            tensors: plan.tensors.clone(),
        };
        check_manifest(&manifest, &model).unwrap();
        // Through the generic entry point, a CUDA manifest reaches the CUDA import, which gets
        // as far as the driver: unavailable here, or no device with the all-zero UUID.
        match crate::backend::import(manifest.clone(), Vec::new(), &model) {
            Err(BackendError::CudaUnavailable(_)) | Err(BackendError::DeviceMismatch { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        // A tensor moved so that it overlaps its neighbour is refused by the worker's checks.
        let mut bad = manifest.clone();
        bad.tensors[1].arena = bad.tensors[0].arena;
        bad.tensors[1].offset = bad.tensors[0].offset;
        assert!(check_manifest(&bad, &model).is_err());
        let one = plan_arenas(model.tensors(), 2 << 20, DEFAULT_ARENA_CAP).unwrap();
        assert_eq!(one.arenas.len(), 1);
        std::fs::remove_file(path).unwrap();
    }
}
