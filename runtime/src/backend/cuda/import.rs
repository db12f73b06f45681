//! The worker's side of the CUDA backend: import the owner's arenas, verify them, and hand the
//! app device pointers.
//!
//! A worker is forked by the zygote, which never touched CUDA, so initialising CUDA here is
//! legal. [`import`] first checks everything about the manifest that needs no GPU (backend,
//! IPC mode, handle count, device UUID spelling, digest spelling), then loads the driver,
//! checks that its device has the manifest's UUID, maps every arena (VMM: import the fd,
//! reserve, map, read-only access where the driver allows it; legacy: `cuIpcOpenMemHandle`),
//! and recomputes the content digest from the device before it returns. The result,
//! [`CudaWeights`], owns the mappings and unmaps them on drop. The app reads tensors through
//! [`CudaWeights::tensor`] (raw pointers) or [`CudaWeights::view`] ([`WeightView`], which
//! cudarc's cuBLAS accepts as a `DevicePtr`). Imported memory is never put in a cudarc
//! `CudaSlice`, whose drop would free memory this process does not own.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DeviceSlice, SyncOnDrop};

use super::digest::{self, device_digest};
use super::driver::{self, Access, DeviceMemory, Driver, LegacyImport, Stager, VmmArena};
use super::plan::{format_uuid, parse_uuid, IpcMode};
use crate::backend::{BackendError, CudaUnavailable, Manifest, ManifestError};
use crate::model::Dtype;

/// Bytes per chunk when a worker reads its arenas back for the digest (two pinned buffers of
/// this size exist while it does).
pub const DIGEST_CHUNK: usize = 16 << 20;

/// What a manifest says about where and how its arenas live, checked without CUDA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub mode: IpcMode,
    pub ordinal: u32,
    pub uuid: String,
}

/// Checks everything about a CUDA manifest that can be checked without touching CUDA, given
/// the number of fds that came with it.
pub fn precheck(manifest: &Manifest, fds: usize) -> Result<Checked, BackendError> {
    if manifest.backend != crate::protocol::Backend::Cuda {
        return Err(ManifestError::NotCuda {
            backend: manifest.backend,
        }
        .into());
    }
    let mode =
        IpcMode::from_ipc(manifest.ipc).ok_or(ManifestError::NotCudaIpc { ipc: manifest.ipc })?;
    let device = manifest.device.as_ref().ok_or(ManifestError::NoDevice)?;
    if parse_uuid(&device.uuid).is_none() {
        return Err(ManifestError::BadUuid {
            uuid: device.uuid.clone(),
        }
        .into());
    }
    digest::check_spelling(&manifest.content_digest)?;
    for (i, a) in manifest.arenas.iter().enumerate() {
        if a.size == 0 || a.used > a.size {
            return Err(ManifestError::ArenaUsed {
                arena: i,
                used: a.used,
                size: a.size,
            }
            .into());
        }
        let handle_ok = match mode {
            IpcMode::Vmm => a.legacy_handle.is_empty(),
            IpcMode::Legacy => a.legacy_handle.len() == 64,
        };
        if !handle_ok {
            return Err(ManifestError::LegacyHandle {
                arena: i,
                len: a.legacy_handle.len(),
                ipc: mode.as_str(),
            }
            .into());
        }
    }
    let expected = match mode {
        IpcMode::Vmm => manifest.arenas.len(),
        IpcMode::Legacy => 0,
    };
    if fds != expected {
        return Err(BackendError::Handles {
            expected,
            received: fds,
        });
    }
    Ok(Checked {
        mode,
        ordinal: device.ordinal,
        uuid: device.uuid.clone(),
    })
}

/// Loads the driver, checks that device `ordinal` exists and has UUID `uuid`, and returns its
/// primary context.
pub(crate) fn open_device(ordinal: u32, uuid: &str) -> Result<Arc<CudaContext>, BackendError> {
    let driver = Driver::load()?;
    let count = driver.device_count()?;
    if ordinal >= count {
        return Err(CudaUnavailable::NoSuchDevice { ordinal, count }.into());
    }
    let actual = format_uuid(driver.device(ordinal)?.uuid()?);
    if actual != uuid {
        return Err(BackendError::DeviceMismatch {
            ordinal,
            expected: uuid.to_string(),
            actual,
        });
    }
    Ok(driver.primary_context(ordinal)?)
}

/// An arena mapped into this process by import.
#[derive(Debug)]
pub(crate) enum ImportedArena {
    Vmm(VmmArena),
    Legacy(LegacyImport),
}

impl ImportedArena {
    pub(crate) fn memory(&self) -> &dyn DeviceMemory {
        match self {
            Self::Vmm(a) => a,
            Self::Legacy(a) => a,
        }
    }

    fn read_only(&self) -> bool {
        matches!(self, Self::Vmm(a) if a.access() == Access::ReadOnly)
    }
}

/// Maps every arena of `manifest` (already prechecked as `mode`) into `ctx`.
pub(crate) fn map_arenas(
    ctx: &Arc<CudaContext>,
    manifest: &Manifest,
    mode: IpcMode,
    fds: &[OwnedFd],
) -> Result<Vec<ImportedArena>, BackendError> {
    let mut out = Vec::with_capacity(manifest.arenas.len());
    for (i, a) in manifest.arenas.iter().enumerate() {
        let arena = match mode {
            IpcMode::Vmm => {
                let fd = fds.get(i).ok_or(BackendError::Handles {
                    expected: manifest.arenas.len(),
                    received: fds.len(),
                })?;
                ImportedArena::Vmm(VmmArena::import(ctx, fd.as_fd(), a.size, Access::ReadOnly)?)
            }
            IpcMode::Legacy => {
                let handle: [u8; 64] = a.legacy_handle.as_slice().try_into().map_err(|_| {
                    ManifestError::LegacyHandle {
                        arena: i,
                        len: a.legacy_handle.len(),
                        ipc: mode.as_str(),
                    }
                })?;
                ImportedArena::Legacy(LegacyImport::open(ctx, &handle, a.size)?)
            }
        };
        out.push(arena);
    }
    Ok(out)
}

/// Recomputes the content digest of mapped arenas and compares it with the manifest's.
pub(crate) fn verify(
    ctx: &Arc<CudaContext>,
    manifest: &Manifest,
    arenas: &[ImportedArena],
) -> Result<(), BackendError> {
    let mut stager = Stager::new(ctx, DIGEST_CHUNK)?;
    let list: Vec<(&dyn DeviceMemory, u64)> = arenas
        .iter()
        .zip(&manifest.arenas)
        .map(|(m, a)| (m.memory(), a.used))
        .collect();
    let actual = device_digest(&mut stager, &list)?;
    if actual != manifest.content_digest {
        return Err(BackendError::Digest {
            what: "device weights",
            expected: manifest.content_digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// How long the parts of an import took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportTimings {
    /// Loading the driver, checking the device and retaining its context.
    pub context: Duration,
    /// Importing and mapping the arenas.
    pub map: Duration,
    /// Reading the arenas back and checking the digest.
    pub digest: Duration,
}

impl ImportTimings {
    pub fn total(&self) -> Duration {
        self.context + self.map + self.digest
    }
}

impl std::fmt::Display for ImportTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "context_ms={:.1} map_ms={:.1} digest_ms={:.1}",
            ms(self.context),
            ms(self.map),
            ms(self.digest)
        )
    }
}

/// Worker side: checks the manifest, initialises CUDA, checks the device, maps the arenas and
/// verifies their digest. The fds are closed once mapped (the mappings keep the memory).
pub fn import(manifest: Manifest, fds: Vec<OwnedFd>) -> Result<CudaWeights, BackendError> {
    let checked = precheck(&manifest, fds.len())?;
    let start = Instant::now();
    let ctx = open_device(checked.ordinal, &checked.uuid)?;
    let context = start.elapsed();
    let arenas = map_arenas(&ctx, &manifest, checked.mode, &fds)?;
    drop(fds);
    let map = start.elapsed() - context;
    verify(&ctx, &manifest, &arenas)?;
    let timings = ImportTimings {
        context,
        map,
        digest: start.elapsed() - context - map,
    };
    let read_only = !arenas.is_empty() && arenas.iter().all(ImportedArena::read_only);
    log::info!(
        "imported generation {} ({} arenas, {} bytes, ipc {}, {}) on device {}: {timings}",
        manifest.generation,
        arenas.len(),
        manifest.arenas.iter().map(|a| a.used).sum::<u64>(),
        checked.mode.as_str(),
        if read_only { "read-only" } else { "read-write" },
        checked.ordinal,
    );
    Ok(CudaWeights::new(manifest, ctx, arenas, read_only, timings))
}

/// Weights a worker imported into its own CUDA context: the mappings of the owner's arenas,
/// unmapped when this value drops.
#[derive(Debug)]
pub struct CudaWeights {
    manifest: Manifest,
    arenas: Vec<ImportedArena>,
    by_name: HashMap<String, usize>,
    ctx: Arc<CudaContext>,
    read_only: bool,
    timings: ImportTimings,
}

/// One tensor of the imported weights, as raw device memory.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTensor<'a> {
    pub name: &'a str,
    /// Device address of the first byte, valid in [`CudaWeights::context`] while the weights live.
    pub ptr: CUdeviceptr,
    /// Bytes.
    pub len: u64,
    pub shape: &'a [u64],
    /// Dtype on the device (f16/bf16 were widened to f32).
    pub dtype: Dtype,
}

impl CudaWeights {
    fn new(
        manifest: Manifest,
        ctx: Arc<CudaContext>,
        arenas: Vec<ImportedArena>,
        read_only: bool,
        timings: ImportTimings,
    ) -> Self {
        let by_name = manifest
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            manifest,
            arenas,
            by_name,
            ctx,
            read_only,
            timings,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The device's primary context, current on the importing thread. Make streams and cuBLAS
    /// handles from it (`context().new_stream()`, `CudaBlas::new(stream)`).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device ordinal the weights live on.
    pub fn ordinal(&self) -> u32 {
        self.manifest.device.as_ref().map_or(0, |d| d.ordinal)
    }

    /// Whether every arena is mapped read-only (VMM, where the driver allows it).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// How long the import took, by part.
    pub fn timings(&self) -> ImportTimings {
        self.timings
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<DeviceTensor<'_>> {
        let l = &self.manifest.tensors[*self.by_name.get(name)?];
        let arena = self.arenas.get(l.arena as usize)?;
        Some(DeviceTensor {
            name: &l.name,
            ptr: arena.memory().ptr() + l.offset,
            len: l.len,
            shape: &l.shape,
            dtype: l.dtype,
        })
    }

    /// A typed view of a tensor for cudarc (cuBLAS and kernels take it as a `DevicePtr<T>`).
    /// `T` must be the tensor's device dtype, and `stream` must belong to this context.
    pub fn view<'a, T: Element>(
        &'a self,
        name: &str,
        stream: &'a Arc<CudaStream>,
    ) -> Result<WeightView<'a, T>, BackendError> {
        let fail = |reason: String| BackendError::View {
            tensor: name.to_string(),
            reason,
        };
        let t = self
            .tensor(name)
            .ok_or_else(|| fail("not in the weights".into()))?;
        if t.dtype != T::DTYPE {
            return Err(fail(format!(
                "is {} on the device, not {}",
                t.dtype.as_str(),
                T::DTYPE.as_str()
            )));
        }
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(fail("the stream belongs to another CUDA context".into()));
        }
        Ok(WeightView {
            ptr: t.ptr,
            len: (t.len / std::mem::size_of::<T>() as u64) as usize,
            stream,
            _weights: PhantomData,
            _elem: PhantomData,
        })
    }

    /// Copies a tensor's bytes to the host (for checks; serving reads them on the device).
    pub fn copy_to_host(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        let l = self
            .by_name
            .get(name)
            .map(|&i| &self.manifest.tensors[i])
            .ok_or_else(|| BackendError::View {
                tensor: name.to_string(),
                reason: "not in the weights".into(),
            })?;
        let arena = &self.arenas[l.arena as usize];
        let mut out = vec![0u8; l.len as usize];
        driver::read(arena.memory(), l.offset, &mut out)?;
        Ok(out)
    }

    /// Recomputes the digest of the device contents now (e.g. after the owner died).
    pub fn verify(&self) -> Result<(), BackendError> {
        verify(&self.ctx, &self.manifest, &self.arenas)
    }

    /// `cuMemGetInfo` of the device: (free, total) bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), BackendError> {
        let (free, total) = self.ctx.mem_get_info().map_err(|e| BackendError::Cuda {
            call: "cuMemGetInfo",
            code: e.0 as u32,
            message: format!("{e:?}"),
        })?;
        Ok((free as u64, total as u64))
    }
}

/// Element types a [`WeightView`] can have, by their dtype on the device.
pub trait Element: Copy + 'static {
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t {
            const DTYPE: Dtype = Dtype::$d;
        })*
    };
}

element!(f32 => F32, f64 => F64, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32,
    u32 => U32, i64 => I64, u64 => U64);

/// A typed, read-only view of one imported tensor, borrowed from [`CudaWeights`], that
/// cudarc's cuBLAS accepts wherever it takes a `DevicePtr<T>`. Dropping it frees nothing.
pub struct WeightView<'a, T> {
    ptr: CUdeviceptr,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _weights: PhantomData<&'a CudaWeights>,
    _elem: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for WeightView<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightView")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("elem", &std::any::type_name::<T>())
            .finish()
    }
}

impl<'a, T> WeightView<'a, T> {
    /// Device address of the first element.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-view of elements `range` (e.g. one row of an embedding table).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Option<WeightView<'a, T>> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        Some(WeightView {
            ptr: self.ptr + (range.start * std::mem::size_of::<T>()) as u64,
            len: range.end - range.start,
            stream: self.stream,
            _weights: PhantomData,
            _elem: PhantomData,
        })
    }
}

impl<T> DeviceSlice<T> for WeightView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl<T> DevicePtr<T> for WeightView<'_, T> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (CUdeviceptr, SyncOnDrop<'b>) {
        // The weights were written by the owner and synchronised before they were exported,
        // and nobody writes them afterwards, so a reader has no earlier write to wait for and
        // leaves no event behind.
        (self.ptr, SyncOnDrop::Record(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ArenaInfo, DeviceId, TensorLayout};

    pub(crate) fn manifest(ipc: &str, arenas: usize) -> Manifest {
        Manifest {
            generation: 1,
            backend: crate::protocol::Backend::Cuda,
            ipc: crate::protocol::Ipc::from_name(ipc).expect("an ipc name"),
            model_digest: crate::backend::digest_bytes(&[b"model"]),
            content_digest: crate::backend::digest_bytes(&[b"content"]),
            device: Some(DeviceId {
                ordinal: 0,
                uuid: "GPU-00000000-0000-0000-0000-000000000000".into(),
            }),
            arenas: (0..arenas)
                .map(|_| ArenaInfo {
                    size: 2 << 20,
                    used: 1024,
                    legacy_handle: if ipc == "legacy" { vec![7; 64] } else { vec![] },
                })
                .collect(),
            tensors: vec![TensorLayout {
                name: "w".into(),
                dtype: crate::model::Dtype::F32,
                shape: vec![256],
                arena: 0,
                offset: 0,
                len: 1024,
            }],
        }
    }

    fn expect_manifest_error(m: &Manifest, fds: usize, needle: &str) {
        match precheck(m, fds) {
            Err(BackendError::Manifest(e)) => assert!(e.to_string().contains(needle), "{e}"),
            other => panic!("expected a manifest error about {needle:?}, got {other:?}"),
        }
    }

    /// A refusal says which value was wrong as a field, not only in its text.
    #[test]
    fn precheck_refusals_carry_the_wrong_values() {
        let mut m = manifest("vmm", 1);
        m.arenas[0].used = m.arenas[0].size + 1;
        match precheck(&m, 1) {
            Err(BackendError::Manifest(ManifestError::ArenaUsed { arena, used, size })) => {
                assert_eq!((arena, used), (0, size + 1));
            }
            other => panic!("expected ArenaUsed, got {other:?}"),
        }
        let mut m = manifest("vmm", 1);
        m.backend = crate::protocol::Backend::Host;
        assert!(matches!(
            precheck(&m, 1),
            Err(BackendError::Manifest(ManifestError::NotCuda {
                backend: crate::protocol::Backend::Host
            }))
        ));
        let mut m = manifest("legacy", 1);
        m.arenas[0].legacy_handle.truncate(10);
        assert!(matches!(
            precheck(&m, 0),
            Err(BackendError::Manifest(ManifestError::LegacyHandle {
                arena: 0,
                len: 10,
                ipc: "legacy"
            }))
        ));
        let mut m = manifest("vmm", 1);
        m.device = None;
        assert!(matches!(
            precheck(&m, 1),
            Err(BackendError::Manifest(ManifestError::NoDevice))
        ));
    }

    #[test]
    fn well_formed_manifests_pass_the_precheck() {
        let c = precheck(&manifest("vmm", 2), 2).unwrap();
        assert_eq!(c.mode, IpcMode::Vmm);
        assert_eq!(c.ordinal, 0);
        let c = precheck(&manifest("legacy", 3), 0).unwrap();
        assert_eq!(c.mode, IpcMode::Legacy);
    }

    #[test]
    fn bad_manifests_fail_before_cuda_is_touched() {
        let mut m = manifest("vmm", 1);
        m.backend = crate::protocol::Backend::Host;
        expect_manifest_error(&m, 1, "not cuda");

        expect_manifest_error(&manifest("memfd", 1), 1, "not a CUDA mode");

        let mut m = manifest("vmm", 1);
        m.device = None;
        expect_manifest_error(&m, 1, "must name its device");

        let mut m = manifest("vmm", 1);
        m.device.as_mut().unwrap().uuid = "0".into();
        expect_manifest_error(&m, 1, "UUID");

        let mut m = manifest("vmm", 1);
        m.content_digest = "sha1:abc".into();
        expect_manifest_error(&m, 1, "content digest");

        let mut m = manifest("vmm", 1);
        m.arenas[0].used = m.arenas[0].size + 1;
        expect_manifest_error(&m, 1, "used of");

        let mut m = manifest("vmm", 1);
        m.arenas[0].size = 0;
        expect_manifest_error(&m, 1, "used of");

        let mut m = manifest("legacy", 1);
        m.arenas[0].legacy_handle.pop();
        expect_manifest_error(&m, 0, "legacy IPC handle");

        let mut m = manifest("vmm", 1);
        m.arenas[0].legacy_handle = vec![1; 64];
        expect_manifest_error(&m, 1, "legacy IPC handle");
    }

    #[test]
    fn handle_counts_must_match_the_mode() {
        for (m, fds, expected) in [
            (manifest("vmm", 2), 1, 2),
            (manifest("vmm", 2), 3, 2),
            (manifest("legacy", 2), 2, 0),
        ] {
            match precheck(&m, fds) {
                Err(BackendError::Handles {
                    expected: e,
                    received,
                }) => assert_eq!((e, received), (expected, fds)),
                other => panic!("expected a handle count error, got {other:?}"),
            }
        }
    }

    #[test]
    fn import_refuses_a_bad_manifest_without_cuda_and_a_good_one_where_cuda_is_missing() {
        // A bad handle count is refused before any CUDA call, GPU or not.
        let m = manifest("vmm", 1);
        assert!(matches!(
            import(m, Vec::new()),
            Err(BackendError::Handles { .. })
        ));
        // A well-formed legacy manifest (no fds needed) gets as far as the driver: without
        // libcuda that is CudaUnavailable; with a GPU, no device has the all-zero UUID.
        match import(manifest("legacy", 1), Vec::new()) {
            Err(BackendError::CudaUnavailable(why)) => {
                assert!(super::super::probe().is_err(), "{why}");
            }
            Err(BackendError::DeviceMismatch { expected, .. }) => {
                assert_eq!(expected, "GPU-00000000-0000-0000-0000-000000000000");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn element_dtypes_match_their_sizes() {
        fn check<T: Element>() {
            assert_eq!(
                T::DTYPE.size(),
                std::mem::size_of::<T>(),
                "{}",
                T::DTYPE.as_str()
            );
        }
        check::<f32>();
        check::<f64>();
        check::<i8>();
        check::<u8>();
        check::<i16>();
        check::<u16>();
        check::<i32>();
        check::<u32>();
        check::<i64>();
        check::<u64>();
    }
}
