//! Sealed memfds and their mappings: the shared memory that holds the model in the zygote and
//! the host compute copy in the owner.
//!
//! A memfd is written once through a temporary writable mapping, which is unmapped before the
//! seals `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` go on (the kernel refuses
//! `F_SEAL_WRITE` while a writable shared mapping exists). From then on nobody, its creator
//! included, can change its bytes or size, so every process that maps it read-only sees the
//! same bytes, and a receiver can check the seals instead of trusting the sender. A shared file
//! mapping is not copied by `fork`, which is why a fork costs the same for any model size.
//!
//! An `unsafe` leaf: `mmap`/`munmap` and the slices over a mapping live here and nowhere else.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Errors of creating, sealing and mapping shared memory.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("memfd_create({name}) failed: {source}")]
    Create { name: String, source: nix::Error },
    #[error("sizing memfd {name} to {len} bytes failed: {source}")]
    Resize {
        name: String,
        len: usize,
        source: std::io::Error,
    },
    #[error("mapping {len} bytes failed: {source}")]
    Map { len: usize, source: nix::Error },
    #[error("sealing the memfd failed: {source}")]
    Seal { source: nix::Error },
    #[error("the memfd is not sealed against writes and resizing (seals {seals:#x})")]
    NotSealed { seals: i32 },
    #[error("reading the memfd's size failed: {source}")]
    Stat { source: std::io::Error },
    #[error("the memfd holds {actual} bytes, {expected} were announced")]
    Size { expected: u64, actual: u64 },
}

/// The seals every shared region carries.
pub fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL
}

/// A memfd being filled. [`MemfdWriter::seal`] turns it into a [`SealedMemfd`].
#[derive(Debug)]
pub struct MemfdWriter {
    fd: OwnedFd,
    map: Option<Mapping>,
    len: usize,
}

impl MemfdWriter {
    /// Creates a memfd of `len` bytes (zero-filled) with a writable shared mapping.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        let file = create_sized(name, len)?;
        let fd = OwnedFd::from(file);
        let map = if len == 0 {
            None
        } else {
            Some(Mapping::new(fd.as_fd(), len, true)?)
        };
        Ok(Self { fd, map, len })
    }

    /// The bytes to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.map {
            Some(m) => m.as_mut_slice(),
            None => &mut [],
        }
    }

    /// Unmaps the writable view and seals the memfd.
    pub fn seal(mut self) -> Result<SealedMemfd, ShmError> {
        drop(self.map.take());
        SealedMemfd::seal(self.fd, Some(self.len as u64))
    }
}

/// Creates an unsealed memfd named `name` of `len` zero bytes (`MFD_CLOEXEC`,
/// `MFD_ALLOW_SEALING`), for a writer that fills it through the fd rather than a mapping
/// (the model loader lets the kernel copy the file into it). Seal it with [`SealedMemfd::seal`].
pub fn create_sized(name: &str, len: usize) -> Result<File, ShmError> {
    let cname = CString::new(name).unwrap_or_else(|_| CString::from(c"zygote"));
    let fd = memfd_create(
        cname.as_c_str(),
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|source| ShmError::Create {
        name: name.to_string(),
        source,
    })?;
    let file = File::from(fd);
    file.set_len(len as u64)
        .map_err(|source| ShmError::Resize {
            name: name.to_string(),
            len,
            source,
        })?;
    Ok(file)
}

/// A memfd whose contents can no longer change.
#[derive(Debug)]
pub struct SealedMemfd {
    fd: OwnedFd,
    len: usize,
}

impl SealedMemfd {
    /// Seals a memfd this process filled (no writable mapping of it may remain) and checks its
    /// size.
    pub fn seal(fd: OwnedFd, expected_len: Option<u64>) -> Result<Self, ShmError> {
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(required_seals()))
            .map_err(|source| ShmError::Seal { source })?;
        Self::from_fd(fd, expected_len)
    }

    /// Adopts an fd received from another process after checking its seals and size.
    pub fn from_fd(fd: OwnedFd, expected_len: Option<u64>) -> Result<Self, ShmError> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .map_err(|source| ShmError::Seal { source })?;
        let need = required_seals().bits();
        if seals & need != need {
            return Err(ShmError::NotSealed { seals });
        }
        let file = File::from(fd);
        let actual = file
            .metadata()
            .map_err(|source| ShmError::Stat { source })?
            .len();
        if let Some(expected) = expected_len {
            if expected != actual {
                return Err(ShmError::Size { expected, actual });
            }
        }
        Ok(Self {
            fd: OwnedFd::from(file),
            len: actual as usize,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps the whole memfd read-only and shared.
    pub fn map(&self) -> Result<Mapping, ShmError> {
        if self.len == 0 {
            return Ok(Mapping::empty());
        }
        Mapping::new(self.fd.as_fd(), self.len, false)
    }

    /// Duplicates the fd (for passing it on while keeping this one).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

/// A shared mapping of a memfd, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; the read-only mappings never
// change (their memfd is sealed) and the one writable mapping is only reachable through
// `&mut self`, so sharing or sending it between threads cannot race.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only gives read access to sealed bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn empty() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Result<Self, ShmError> {
        let size = std::num::NonZeroUsize::new(len).ok_or(ShmError::Map {
            len,
            source: nix::Error::EINVAL,
        })?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: we map a fresh region (no address hint, so nothing existing is replaced) of a
        // memfd that is at least `len` bytes long (its creator sized it, or `from_fd` measured
        // it and the seals forbid shrinking); the region is unmapped exactly once, in `Drop`.
        let ptr = unsafe { mmap(None, size, prot, MapFlags::MAP_SHARED, fd, 0) }
            .map_err(|source| ShmError::Map { len, source })?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` points to `len` mapped, readable bytes that live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: only a writer's mapping is mutable (PROT_WRITE), `&mut self` makes this the only
        // view, and the bytes live as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte (for diagnostics and for locating the mapping in smaps).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the region was mapped by `Mapping::new` with this address and length, and no
        // slice borrowed from it can outlive `self`.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::warn!("munmap of {} bytes failed: {e}", self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_cannot_be_written_or_resized() {
        let mut w = MemfdWriter::create("shm-test", 4096).unwrap();
        w.as_mut_slice()[..5].copy_from_slice(b"hello");
        let sealed = w.seal().unwrap();
        let map = sealed.map().unwrap();
        assert_eq!(&map[..5], b"hello");
        let file = File::from(sealed.try_clone_fd().unwrap());
        assert!(file.set_len(8192).is_err(), "grow must be refused");
        assert!(file.set_len(1).is_err(), "shrink must be refused");
        use std::os::unix::fs::FileExt;
        assert!(file.write_at(b"x", 0).is_err(), "write must be refused");
        let again = SealedMemfd::from_fd(OwnedFd::from(file), Some(4096)).unwrap();
        assert_eq!(again.len(), 4096);
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let fd = memfd_create(
            c"unsealed",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        assert!(matches!(
            SealedMemfd::from_fd(fd, None),
            Err(ShmError::NotSealed { .. })
        ));
    }
}
