//! Copies between host and device: a synchronous [`read`] for checks, and the [`Stager`]'s
//! bulk uploads and downloads through pinned bounce buffers it owns.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use crate::backend::{BackendError, ManifestError};

use super::{bind, check, cudarc_failure, DeviceMemory, DriverFailure};

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
