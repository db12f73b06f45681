//! The unsafe leaf of the CUDA backend: thin safe wrappers over the CUDA driver API
//! (`cudarc::driver::sys`, loaded at run time).
//!
//! Everything else in the backend goes through this module, which owns three rules:
//!
//! - **Nothing touches CUDA before [`Driver::load`].** cudarc panics when libcuda or one of its
//!   symbols is missing, so `load` checks for the library and every entry point this backend
//!   (and the parts of cudarc it uses) calls before `cuInit`, and all other entry points need
//!   a [`Driver`] token or a context that could only have been made with one. Only the owner
//!   and the workers ever call `load`: the zygote and the supervisor must never map libcuda.
//! - **Every device resource is a value that releases it on drop**, and keeps its context
//!   alive (`Arc<CudaContext>`) until then: [`VmmArena`] (`cuMemCreate` or
//!   `cuMemImportFromShareableHandle`, reserve, map, access), [`LegacyArena`] (`cuMemAlloc`),
//!   [`LegacyImport`] (`cuIpcOpenMemHandle`), and the pinned buffers of a [`Stager`].
//! - **Host memory handed to an asynchronous copy is not touched until the copy is done.**
//!   [`Stager`] owns its two pinned bounce buffers and an event per buffer, and only lends a
//!   buffer to the caller after the event that follows its last copy has completed.
//!
//! Contexts are cudarc's [`CudaContext`] on the device's primary context, so the streams and
//! cuBLAS handles an app makes with cudarc see the same address space as the arenas.
//!
//! Every raw driver call of the project is in this module, hence `#[allow(unsafe_code)]` here
//! alone in the backend.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};

use crate::backend::{BackendError, CudaUnavailable, ManifestError};

/// The driver entry points this backend and the parts of cudarc it uses call. `Driver::load`
/// refuses a libcuda that lacks one, instead of letting cudarc panic in the middle of a call.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetUuid",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemGetAllocationGranularity",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemExportToShareableHandle",
    "cuMemImportFromShareableHandle",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoH_v2",
];

/// A driver call that failed: which call, and its `CUresult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverFailure {
    pub call: &'static str,
    pub code: CUresult,
}

impl DriverFailure {
    /// The error's name and description, as the driver spells them.
    pub fn describe(&self) -> String {
        // Only a loaded driver can name its codes (asking an absent one would panic in cudarc).
        if !matches!(LOADED.get(), Some(Ok(()))) {
            return format!("{:?}", self.code);
        }
        let e = DriverError(self.code);
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", self.code));
        match e.error_string() {
            Ok(s) => format!("{name}: {}", s.to_string_lossy()),
            Err(_) => name,
        }
    }
}

impl From<DriverFailure> for BackendError {
    fn from(f: DriverFailure) -> Self {
        BackendError::Cuda {
            call: f.call,
            code: f.code as u32,
            message: f.describe(),
        }
    }
}

fn check(call: &'static str, code: CUresult) -> Result<(), DriverFailure> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DriverFailure { call, code })
    }
}

/// Maps an error of cudarc's safe layer.
fn cudarc_failure(call: &'static str) -> impl Fn(DriverError) -> DriverFailure {
    move |e| DriverFailure { call, code: e.0 }
}

/// Whether [`Driver::load`] succeeded in this process (and why not), once it was called.
static LOADED: OnceLock<Result<(), CudaUnavailable>> = OnceLock::new();

/// Proof that libcuda is loaded, complete, and initialised in this process.
#[derive(Debug, Clone, Copy)]
pub struct Driver {
    _private: (),
}

impl Driver {
    /// Loads libcuda and calls `cuInit`. Every failure is [`BackendError::CudaUnavailable`]
    /// with the reason, and nothing panics. The result is remembered.
    pub fn load() -> Result<Driver, BackendError> {
        LOADED
            .get_or_init(load_uncached)
            .clone()
            .map(|()| Driver { _private: () })
            .map_err(BackendError::CudaUnavailable)
    }

    /// `cuDriverGetVersion`, e.g. 12080 for 12.8.
    pub fn version(&self) -> Result<i32, DriverFailure> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer; the library is loaded (`self` exists).
        check("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut v)
        })?;
        Ok(v)
    }

    /// `cuDeviceGetCount`.
    pub fn device_count(&self) -> Result<u32, DriverFailure> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out pointer; the driver is initialised (`self` exists).
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
        Ok(n.max(0) as u32)
    }

    /// The device with this ordinal.
    pub fn device(&self, ordinal: u32) -> Result<Device, DriverFailure> {
        let mut raw: sys::CUdevice = 0;
        // SAFETY: `raw` is a valid out pointer; the driver is initialised (`self` exists).
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut raw, ordinal as c_int)
        })?;
        Ok(Device { ordinal, raw })
    }

    /// Retains the device's primary context (what cudarc's `CudaContext::new` does) and makes
    /// it current on this thread.
    pub fn primary_context(&self, ordinal: u32) -> Result<Arc<CudaContext>, DriverFailure> {
        CudaContext::new(ordinal as usize).map_err(cudarc_failure("cuDevicePrimaryCtxRetain"))
    }
}

fn load_uncached() -> Result<(), CudaUnavailable> {
    // SAFETY: `is_culib_present` only tries to dlopen each candidate name of libcuda and drops
    // the handle again; it calls no CUDA function.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::NoLibrary);
    }
    // SAFETY: the library loads (just checked), so `culib` returns it instead of panicking.
    let lib = unsafe { sys::culib() };
    let missing: Vec<&'static str> = REQUIRED_SYMBOLS
        .iter()
        .copied()
        .filter(|name| {
            // SAFETY: the symbol is only looked up, never called through this type.
            unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err()
        })
        .collect();
    if !missing.is_empty() {
        return Err(CudaUnavailable::MissingSymbols { missing });
    }
    // SAFETY: every symbol is present, so cudarc's lazy lookup of `cuInit` cannot panic.
    let code = unsafe { sys::cuInit(0) };
    check("cuInit", code).map_err(|f| CudaUnavailable::Init {
        code: f.code as u32,
        message: f.describe(),
    })
}

/// A CUDA device (ordinal and driver handle).
#[derive(Debug, Clone, Copy)]
pub struct Device {
    ordinal: u32,
    raw: sys::CUdevice,
}

impl Device {
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// `cuDeviceGetUuid`: the 16 bytes `nvidia-smi -L` shows.
    pub fn uuid(&self) -> Result<[u8; 16], DriverFailure> {
        let mut u = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: `u` is a valid out pointer; `raw` came from `cuDeviceGet`.
        check("cuDeviceGetUuid", unsafe {
            sys::cuDeviceGetUuid(&mut u, self.raw)
        })?;
        Ok(u.bytes.map(|b| b as u8))
    }

    /// `cuDeviceGetName`.
    pub fn name(&self) -> Result<String, DriverFailure> {
        let mut buf = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer holds `buf.len()` bytes and the driver writes a nul-terminated
        // name of at most that many.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, self.raw)
        })?;
        // SAFETY: the driver nul-terminated the name inside `buf`.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(name.to_string_lossy().into_owned())
    }

    /// `cuDeviceTotalMem`, in bytes.
    pub fn total_mem(&self) -> Result<u64, DriverFailure> {
        let mut n: usize = 0;
        // SAFETY: `n` is a valid out pointer; `raw` came from `cuDeviceGet`.
        check("cuDeviceTotalMem", unsafe {
            sys::cuDeviceTotalMem_v2(&mut n, self.raw)
        })?;
        Ok(n as u64)
    }

    /// `cuDeviceGetAttribute`.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32, DriverFailure> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer; `raw` came from `cuDeviceGet`.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut v, attr, self.raw)
        })?;
        Ok(v)
    }
}

/// Something that occupies a range of device addresses in a context.
pub trait DeviceMemory {
    /// The first device address.
    fn ptr(&self) -> sys::CUdeviceptr;
    /// Bytes mapped from `ptr`.
    fn size(&self) -> u64;
    /// The context the addresses belong to.
    fn context(&self) -> &Arc<CudaContext>;
}

fn bind(ctx: &CudaContext) -> Result<(), DriverFailure> {
    ctx.bind_to_thread()
        .map_err(cudarc_failure("cuCtxSetCurrent"))
}

/// Allocation properties of device memory on `ctx`'s device, exportable as a POSIX fd.
fn vmm_properties(ctx: &CudaContext) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes:
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ctx.cu_device(),
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// `cuMemGetAllocationGranularity` (minimum) for POSIX-fd-exportable memory on `ctx`'s device.
pub fn vmm_granularity(ctx: &Arc<CudaContext>) -> Result<u64, DriverFailure> {
    bind(ctx)?;
    let prop = vmm_properties(ctx);
    let mut g: usize = 0;
    // SAFETY: `g` and `prop` are valid for the call; `prop` is fully initialised.
    check("cuMemGetAllocationGranularity", unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    })?;
    Ok(g as u64)
}

/// Access a mapping grants to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A VMM allocation mapped into this process: created here (`cuMemCreate`) or imported from a
/// POSIX fd (`cuMemImportFromShareableHandle`). On drop it is unmapped, its address range
/// freed and its handle released; the physical memory lives on while any other handle, fd or
/// mapping of it exists.
#[derive(Debug)]
pub struct VmmArena {
    ctx: Arc<CudaContext>,
    handle: Option<sys::CUmemGenericAllocationHandle>,
    va: sys::CUdeviceptr,
    size: u64,
    mapped: bool,
    access: Access,
}

impl VmmArena {
    fn empty(ctx: &Arc<CudaContext>, size: u64) -> Self {
        Self {
            ctx: ctx.clone(),
            handle: None,
            va: 0,
            size,
            mapped: false,
            access: Access::ReadWrite,
        }
    }

    /// Allocates `size` bytes (a multiple of [`vmm_granularity`]) on `ctx`'s device, exportable
    /// as a POSIX fd, and maps them read-write here.
    pub fn create(ctx: &Arc<CudaContext>, size: u64) -> Result<Self, DriverFailure> {
        bind(ctx)?;
        let mut arena = Self::empty(ctx, size);
        let prop = vmm_properties(ctx);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` and `prop` are valid for the call; on success the handle is owned
        // by `arena`, which releases it exactly once on drop.
        check("cuMemCreate", unsafe {
            sys::cuMemCreate(&mut handle, size as usize, &prop, 0)
        })?;
        arena.handle = Some(handle);
        arena.reserve_and_map()?;
        arena.set_access(Access::ReadWrite)?;
        Ok(arena)
    }

    /// Imports the allocation behind `fd` (exported by [`VmmArena::export_fd`], possibly by
    /// another process) and maps `size` bytes of it. With `Access::ReadOnly` the mapping is
    /// made read-only where the driver supports that for device memory, and read-write
    /// otherwise; [`VmmArena::access`] tells which.
    pub fn import(
        ctx: &Arc<CudaContext>,
        fd: BorrowedFd<'_>,
        size: u64,
        access: Access,
    ) -> Result<Self, DriverFailure> {
        bind(ctx)?;
        let mut arena = Self::empty(ctx, size);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: for POSIX fds the driver takes the fd number in place of the pointer and
        // does not take ownership of it (the caller keeps and closes `fd`); on success the
        // new handle is owned by `arena`.
        check("cuMemImportFromShareableHandle", unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut handle,
                fd.as_raw_fd() as usize as *mut c_void,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        })?;
        arena.handle = Some(handle);
        arena.reserve_and_map()?;
        match access {
            Access::ReadWrite => arena.set_access(Access::ReadWrite)?,
            Access::ReadOnly => {
                if let Err(f) = arena.set_access(Access::ReadOnly) {
                    log::info!(
                        "read-only mapping of device memory refused ({}); mapping read-write",
                        f.describe()
                    );
                    arena.set_access(Access::ReadWrite)?;
                }
            }
        }
        Ok(arena)
    }

    fn reserve_and_map(&mut self) -> Result<(), DriverFailure> {
        let handle = self.handle.ok_or(DriverFailure {
            call: "cuMemMap",
            code: CUresult::CUDA_ERROR_INVALID_HANDLE,
        })?;
        let mut va: sys::CUdeviceptr = 0;
        // SAFETY: `va` is a valid out pointer; alignment 0 means the granularity and address 0
        // means no fixed address. The range is owned by `self` and freed exactly once on drop.
        check("cuMemAddressReserve", unsafe {
            sys::cuMemAddressReserve(&mut va, self.size as usize, 0, 0, 0)
        })?;
        self.va = va;
        // SAFETY: the range [va, va+size) was just reserved for this handle alone; the mapping
        // is owned by `self` and unmapped exactly once on drop.
        check("cuMemMap", unsafe {
            sys::cuMemMap(va, self.size as usize, 0, handle, 0)
        })?;
        self.mapped = true;
        Ok(())
    }

    fn set_access(&mut self, access: Access) -> Result<(), DriverFailure> {
        let desc = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ctx.cu_device(),
            },
            flags: match access {
                Access::ReadOnly => sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ,
                Access::ReadWrite => sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            },
        };
        // SAFETY: [va, va+size) is mapped by `self`; `desc` is one valid descriptor.
        check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(self.va, self.size as usize, &desc, 1)
        })?;
        self.access = access;
        Ok(())
    }

    /// Exports the allocation as a new POSIX fd (close-on-exec), which any process of this
    /// user can import while the fd lives, whether or not this process still does.
    pub fn export_fd(&self) -> Result<OwnedFd, DriverFailure> {
        let handle = self.handle.ok_or(DriverFailure {
            call: "cuMemExportToShareableHandle",
            code: CUresult::CUDA_ERROR_INVALID_HANDLE,
        })?;
        bind(&self.ctx)?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX fds the driver writes an `int` through the pointer, which points
        // at `fd`.
        check("cuMemExportToShareableHandle", unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut c_int).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        })?;
        if fd < 0 {
            return Err(DriverFailure {
                call: "cuMemExportToShareableHandle",
                code: CUresult::CUDA_ERROR_INVALID_HANDLE,
            });
        }
        // SAFETY: the driver just created `fd` for the caller, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // An exec'd child must never inherit it by accident (the fd audit of the runtime).
        let _ = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Ok(fd)
    }

    /// The access the mapping grants.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl DeviceMemory for VmmArena {
    fn ptr(&self) -> sys::CUdeviceptr {
        self.va
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for VmmArena {
    fn drop(&mut self) {
        if let Err(f) = bind(&self.ctx) {
            log::warn!("releasing a device arena: {}", f.describe());
        }
        let mut results = Vec::new();
        if self.mapped {
            // SAFETY: `self` mapped [va, va+size) and nothing borrowed from it outlives `self`
            // (device views borrow the arena).
            results.push(check("cuMemUnmap", unsafe {
                sys::cuMemUnmap(self.va, self.size as usize)
            }));
        }
        if self.va != 0 {
            // SAFETY: `self` reserved this range and it is unmapped now.
            results.push(check("cuMemAddressFree", unsafe {
                sys::cuMemAddressFree(self.va, self.size as usize)
            }));
        }
        if let Some(h) = self.handle.take() {
            // SAFETY: `self` owns this handle and releases it once.
            results.push(check("cuMemRelease", unsafe { sys::cuMemRelease(h) }));
        }
        for f in results.into_iter().filter_map(Result::err) {
            log::warn!("{} failed: {}", f.call, f.describe());
        }
    }
}

/// Device memory from `cuMemAlloc` (never the async pool, which legacy IPC refuses), shared by
/// `cuIpcGetMemHandle`. Freed on drop, which invalidates every import of it.
#[derive(Debug)]
pub struct LegacyArena {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    size: u64,
}

impl LegacyArena {
    pub fn create(ctx: &Arc<CudaContext>, size: u64) -> Result<Self, DriverFailure> {
        bind(ctx)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out pointer; the allocation is owned by the returned value
        // and freed once on drop.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, size as usize)
        })?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            size,
        })
    }

    /// The 64 bytes of `cuIpcGetMemHandle` for this allocation's base pointer.
    pub fn ipc_handle(&self) -> Result<[u8; 64], DriverFailure> {
        bind(&self.ctx)?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `h` is a valid out pointer and `ptr` is the base of a live `cuMemAlloc`.
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut h, self.ptr)
        })?;
        Ok(h.reserved.map(|b| b as u8))
    }
}

impl DeviceMemory for LegacyArena {
    fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for LegacyArena {
    fn drop(&mut self) {
        let _ = bind(&self.ctx);
        // SAFETY: `self` owns the allocation and frees it once; nothing borrowed outlives it.
        if let Err(f) = check("cuMemFree", unsafe { sys::cuMemFree_v2(self.ptr) }) {
            log::warn!("cuMemFree failed: {}", f.describe());
        }
    }
}

/// Another process's `cuMemAlloc` memory, opened from its legacy IPC handle. Closed on drop.
#[derive(Debug)]
pub struct LegacyImport {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    size: u64,
}

impl LegacyImport {
    pub fn open(
        ctx: &Arc<CudaContext>,
        handle: &[u8; 64],
        size: u64,
    ) -> Result<Self, DriverFailure> {
        bind(ctx)?;
        let h = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out pointer and `h` a handle by value; the mapping is owned
        // by the returned value and closed once on drop.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            size,
        })
    }
}

impl DeviceMemory for LegacyImport {
    fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for LegacyImport {
    fn drop(&mut self) {
        let _ = bind(&self.ctx);
        // SAFETY: `self` opened this mapping and closes it once; nothing borrowed outlives it.
        if let Err(f) = check("cuIpcCloseMemHandle", unsafe {
            sys::cuIpcCloseMemHandle(self.ptr)
        }) {
            log::warn!("cuIpcCloseMemHandle failed: {}", f.describe());
        }
    }
}

fn range_error(what: &'static str, offset: u64, len: u64, size: u64) -> BackendError {
    ManifestError::OutsideDeviceMemory {
        what,
        offset,
        end: offset.saturating_add(len),
        size,
    }
    .into()
}

/// Copies `out.len()` bytes from `mem` at `offset` into `out`, synchronously (for checks and
/// small reads; bulk transfers go through a [`Stager`]).
pub fn read(mem: &dyn DeviceMemory, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
    let len = out.len() as u64;
    let inside = matches!(offset.checked_add(len), Some(end) if end <= mem.size());
    if !inside {
        return Err(range_error("a read", offset, len, mem.size()));
    }
    if out.is_empty() {
        return Ok(());
    }
    bind(mem.context())?;
    // SAFETY: `out` is a writable host buffer of `len` bytes, and [ptr+offset, +len) lies
    // inside memory mapped in the current context (checked above); the copy is synchronous.
    check("cuMemcpyDtoH", unsafe {
        sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), mem.ptr() + offset, len as usize)
    })?;
    Ok(())
}

/// Page-locked host memory from `cuMemHostAlloc` (cached, not write-combined: the digest
/// reads it back on the CPU). Private to this module: only [`Stager`] lends it out, and only
/// while no copy uses it.
#[derive(Debug)]
struct PinnedBuffer {
    ctx: Arc<CudaContext>,
    ptr: NonNull<u8>,
    len: usize,
}

impl PinnedBuffer {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverFailure> {
        bind(ctx)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` is a valid out pointer; the buffer is owned by the returned value and
        // freed once on drop.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut p, len, 0)
        })?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(DriverFailure {
            call: "cuMemHostAlloc",
            code: CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        })?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    /// The bytes. The caller (the `Stager`) guarantees no copy into or out of them is in flight.
    fn bytes(&self, n: usize) -> &[u8] {
        // SAFETY: `ptr` holds `len` bytes that live as long as `self`; `n` is at most `len`
        // (the Stager's chunk), and no device copy writes them now (Stager discipline).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), n.min(self.len)) }
    }

    /// The bytes, to fill. Same guarantee as [`PinnedBuffer::bytes`].
    fn bytes_mut(&mut self, n: usize) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only host view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n.min(self.len)) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = bind(&self.ctx);
        // SAFETY: `self` owns the buffer; the Stager synchronised its stream before dropping.
        if let Err(f) = check("cuMemFreeHost", unsafe {
            sys::cuMemFreeHost(self.ptr.as_ptr().cast())
        }) {
            log::warn!("cuMemFreeHost failed: {}", f.describe());
        }
    }
}

/// Bulk transfers between host and device through two pinned bounce buffers on a stream of
/// its own, so that the host side of one chunk (filling, hashing) overlaps the copy of the
/// other. Nothing here pins memory it does not own: the model's shared mapping is read, never
/// registered (pinning it would touch the zygote's pages from a CUDA context).
#[derive(Debug)]
pub struct Stager {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    chunk: usize,
    // Field order matters on drop: `Drop::drop` synchronises the stream first.
    bufs: [PinnedBuffer; 2],
    done: [CudaEvent; 2],
}

impl Stager {
    /// Two pinned buffers of `chunk` bytes and a non-blocking stream on `ctx`.
    pub fn new(ctx: &Arc<CudaContext>, chunk: usize) -> Result<Self, DriverFailure> {
        let chunk = chunk.max(4096);
        let stream = ctx.new_stream().map_err(cudarc_failure("cuStreamCreate"))?;
        let bufs = [
            PinnedBuffer::new(ctx, chunk)?,
            PinnedBuffer::new(ctx, chunk)?,
        ];
        let event = || ctx.new_event(None).map_err(cudarc_failure("cuEventCreate"));
        let done = [event()?, event()?];
        Ok(Self {
            ctx: ctx.clone(),
            stream,
            chunk,
            bufs,
            done,
        })
    }

    /// Bytes per chunk.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Writes the first `len` bytes of `dst`: `fill(offset, buf)` writes the bytes for
    /// `offset .. offset + buf.len()` into a pinned buffer, which is then copied. Returns once
    /// every byte is on the device.
    pub fn upload(
        &mut self,
        dst: &mut dyn DeviceMemory,
        len: u64,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> Result<(), BackendError> {
        if len > dst.size() {
            return Err(range_error("an upload", 0, len, dst.size()));
        }
        if !Arc::ptr_eq(dst.context(), &self.ctx) && dst.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(ManifestError::ForeignContext.into());
        }
        bind(&self.ctx)?;
        let mut in_flight = [false; 2];
        let mut offset = 0u64;
        let mut k = 0usize;
        while offset < len {
            let i = k % 2;
            if in_flight[i] {
                // The previous copy out of this buffer must be done before it is refilled.
                self.done[i]
                    .synchronize()
                    .map_err(cudarc_failure("cuEventSynchronize"))?;
            }
            let n = (self.chunk as u64).min(len - offset) as usize;
            let buf = self.bufs[i].bytes_mut(n);
            fill(offset, buf);
            // SAFETY: the source is `n` bytes of pinned memory owned by `self`, not touched
            // again before `done[i]` (recorded right after) completes; the destination range
            // [ptr+offset, +n) lies inside `dst` (checked above) in the current context.
            check("cuMemcpyHtoDAsync", unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst.ptr() + offset,
                    self.bufs[i].ptr.as_ptr().cast(),
                    n,
                    self.stream.cu_stream(),
                )
            })?;
            self.done[i]
                .record(&self.stream)
                .map_err(cudarc_failure("cuEventRecord"))?;
            in_flight[i] = true;
            offset += n as u64;
            k += 1;
        }
        self.stream
            .synchronize()
            .map_err(cudarc_failure("cuStreamSynchronize"))?;
        Ok(())
    }

    /// Reads the first `len` bytes of `src`, handing them to `consume` chunk by chunk, in order.
    pub fn download(
        &mut self,
        src: &dyn DeviceMemory,
        len: u64,
        mut consume: impl FnMut(&[u8]),
    ) -> Result<(), BackendError> {
        if len > src.size() {
            return Err(range_error("a download", 0, len, src.size()));
        }
        if len == 0 {
            return Ok(());
        }
        bind(&self.ctx)?;
        let chunk = self.chunk as u64;
        let chunks = len.div_ceil(chunk) as usize;
        let span = |k: usize| {
            let start = k as u64 * chunk;
            (start, chunk.min(len - start) as usize)
        };
        self.enqueue_download(src, 0, span(0))?;
        for k in 0..chunks {
            if k + 1 < chunks {
                // Buffer (k+1)%2 was consumed in the previous round, so it is free.
                self.enqueue_download(src, (k + 1) % 2, span(k + 1))?;
            }
            let i = k % 2;
            self.done[i]
                .synchronize()
                .map_err(cudarc_failure("cuEventSynchronize"))?;
            consume(self.bufs[i].bytes(span(k).1));
        }
        Ok(())
    }

    fn enqueue_download(
        &mut self,
        src: &dyn DeviceMemory,
        i: usize,
        (offset, n): (u64, usize),
    ) -> Result<(), BackendError> {
        // SAFETY: the destination is `n` bytes of pinned memory owned by `self` that nobody
        // reads before `done[i]` (recorded right after) completes; the source range lies
        // inside `src` (checked by `download`) in the current context.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                self.bufs[i].ptr.as_ptr().cast(),
                src.ptr() + offset,
                n,
                self.stream.cu_stream(),
            )
        })?;
        self.done[i]
            .record(&self.stream)
            .map_err(cudarc_failure("cuEventRecord"))?;
        Ok(())
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        // A transfer that failed half-way may still have copies in flight into the buffers
        // that are about to be freed.
        if let Err(e) = self.stream.synchronize() {
            let f = cudarc_failure("cuStreamSynchronize")(e);
            log::warn!("synchronising the staging stream failed: {}", f.describe());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_call_and_the_code() {
        let f = DriverFailure {
            call: "cuMemCreate",
            code: CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        };
        match BackendError::from(f) {
            BackendError::Cuda {
                call,
                code,
                message,
            } => {
                assert_eq!(call, "cuMemCreate");
                assert_eq!(code, CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32);
                // Without libcuda the driver cannot name the code; the enum's name stands in.
                assert!(message.contains("OUT_OF_MEMORY"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
