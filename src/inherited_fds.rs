//! Closing the fds a process inherited from whoever started it.
//!
//! `zygote start` and `zygote __zygote` keep only stdin, stdout and stderr of what they were
//! started with, as CPython's forkserver does: an fd left open by a shell, a CI runner or a
//! careless parent would otherwise stay open in the supervisor and the zygote for the service's
//! whole life (a pipe that never sees EOF, a deleted file that keeps its space, a socket).
//! Under systemd socket activation the supervisor adopts fds 3 .. 3 + `LISTEN_FDS` first
//! ([`crate::activation`]) and closes only the fds above them.
//!
//! This is a leaf module that uses `unsafe`: the `close_range` system call, and taking
//! ownership of the one inherited fd a zygote keeps (`--model-fd`).

/// The first fd that is not stdio.
const FIRST: u32 = 3;

/// Closes every fd from 3 up, but the `keep` fds from 3 on (the adopted listeners) and
/// `also` (the model memfd a restarted zygote inherits from its supervisor, `--model-fd`).
/// Call it first thing in `main`, before anything in this process opened an fd (but those
/// kept): after it, no other fd from 3 up is open.
pub fn close(keep: u32, also: Option<u32>) -> std::io::Result<()> {
    let first = FIRST + keep;
    match also {
        Some(fd) if fd >= first => {
            if fd > first {
                close_range(first, fd - 1)?;
            }
            if fd < u32::MAX {
                close_range(fd + 1, u32::MAX)?;
            }
            Ok(())
        }
        _ => close_range(first, u32::MAX),
    }
}

fn close_range(first: u32, last: u32) -> std::io::Result<()> {
    // SAFETY: close_range only closes descriptors. It runs before any code of this process
    // opened one (the Rust runtime keeps none open above stdio at `main`; the adopted
    // listeners and the inherited model memfd are outside the range), so no `OwnedFd`, `File`
    // or other owner of an fd in the range exists yet whose fd it could close under it.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes ownership of the model memfd this process inherited as fd `fd` (kept open by
/// [`close`]), close-on-exec from now on. Call it once, for the fd given to [`close`].
pub fn take(fd: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let raw = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    if raw < FIRST as i32 {
        // Stdio is owned by the standard library.
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    // Fails with EBADF unless the fd is open: nothing is owned that is not there.
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    // SAFETY: the fd is open (F_SETFD succeeded), above stdio, and no owner of it exists in
    // this process: it was inherited, `close` left it open, and `take` is called once for it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}
