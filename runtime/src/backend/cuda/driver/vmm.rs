//! VMM allocations (`cuMemCreate`, exported and imported as POSIX fds), their address ranges,
//! mappings and access: what the owner serves and the workers map with `--ipc vmm`.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::CudaContext;

use super::{bind, check, DeviceMemory, DriverFailure};

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
