//! Passing file descriptors over Unix stream sockets with `SCM_RIGHTS`.
//!
//! `passfd` sends exactly one fd per `sendmsg`, with a 4-byte payload. The protocol
//! ([`crate::protocol::frame`]) therefore sends a frame first and then its fds, one message
//! each, in the order the frame lists them; a receiver reads the frame with exact-length reads
//! (never past its end, or it would swallow the payload that carries an fd) and then exactly as
//! many fds as the frame announced. Received fds are `FD_CLOEXEC` as soon as they arrive
//! (passfd sets it before returning), so a later exec never leaks them.
//!
//! An `unsafe` leaf: the one raw `fcntl` on a received descriptor lives here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use passfd::FdPassingExt;

/// Sends one fd over `sock`. The receiving side must call [`recv_fd`] for it.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = sock.as_raw_fd();
    loop {
        match raw.send_fd(fd.as_raw_fd()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Receives one fd sent by [`send_fd`]. On a non-blocking socket with nothing queued this
/// returns `WouldBlock`; a 4-byte message without an fd is `InvalidData`.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = sock.as_raw_fd();
    let fd = loop {
        match raw.recv_fd() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "received a negative fd",
        ));
    }
    // SAFETY: `recvmsg` with SCM_RIGHTS installed `fd` in this process's table just now and
    // nothing else refers to it, so we are its sole owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends several fds in order, one message each.
pub fn send_fds<F: AsFd>(sock: BorrowedFd<'_>, fds: &[F]) -> io::Result<()> {
    for fd in fds {
        send_fd(sock, fd.as_fd())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_fd_arrives_cloexec_and_usable() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = std::fs::File::from(
            nix::sys::memfd::memfd_create(
                c"fdpass-test",
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
            )
            .unwrap(),
        );
        file.write_all(b"hello").unwrap();
        send_fd(a.as_fd(), file.as_fd()).unwrap();
        let got = recv_fd(b.as_fd()).unwrap();
        let flags = nix::fcntl::fcntl(got.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let mut f = std::fs::File::from(got);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn a_payload_without_fd_is_invalid_data() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 0]).unwrap();
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
