//! Closing the fds a process inherited from whoever started it.
//!
//! `zygote start` and `zygote __zygote` keep only stdin, stdout and stderr of what they were
//! started with, as CPython's forkserver does: an fd left open by a shell, a CI runner or a
//! careless parent would otherwise stay open in the supervisor and the zygote for the service's
//! whole life (a pipe that never sees EOF, a deleted file that keeps its space, a socket).
//! Under systemd socket activation the supervisor adopts fds 3 .. 3 + `LISTEN_FDS` first
//! ([`crate::activation`]) and closes only the fds above them.
//!
//! This is a leaf module that uses `unsafe`: the `close_range` system call.

/// The first fd that is not stdio.
const FIRST: u32 = 3;

/// Closes every fd from 3 up, but the `keep` fds from 3 on (the adopted listeners). Call it
/// first thing in `main`, before anything in this process opened an fd (but those kept):
/// after it, no other fd from 3 up is open.
pub fn close(keep: u32) -> std::io::Result<()> {
    // SAFETY: close_range only closes descriptors. It runs before any code of this process
    // opened one (the Rust runtime keeps none open above stdio at `main`; the adopted
    // listeners are below `FIRST + keep`), so no `OwnedFd`, `File` or other owner of an fd
    // in the range exists yet whose fd it could close under it.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, FIRST + keep, u32::MAX, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
