//! Legacy CUDA IPC: `cuMemAlloc` memory shared by `cuIpcGetMemHandle` (the owner's side) and
//! opened by `cuIpcOpenMemHandle` (the workers' side), for `--ipc legacy`.

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use super::{bind, check, DeviceMemory, DriverFailure};

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
