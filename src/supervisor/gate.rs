//! The listeners' gate: how a stop refuses new connections instead of resetting them.
//!
//! A listening socket's accept queue holds connections whose handshake completed but that no
//! worker accepted yet; when the last fd of the socket closes, the kernel resets every one of
//! them. During a stop the workers drain (accept what is queued, answer it, exit) while the
//! supervisor still holds the listeners, so connections that arrived after the workers' last
//! `accept` used to sit in the queue until the supervisor exited, and were reset.
//!
//! At the start of a stop, [`refuse_new_connections`] attaches a classic BPF filter that drops
//! every packet (`SO_ATTACH_FILTER`, `ret #0`) to each listening socket. One socket is one open
//! file description shared by the supervisor and every worker, so one `setsockopt` on the
//! supervisor's fd covers them all. The kernel runs a listener's filter on each incoming SYN
//! and on each handshake-completing ACK, so from then on nothing new enters the queue: clients
//! retransmit their SYN, and once the listeners are closed (when no worker is left) they get a
//! RST, that is `connection refused`. The connections already queued, and those already
//! accepted, are not affected (an accepted socket copies its listener's filter only when it is
//! created, and those were created before). Linux only, like the rest of the supervisor.
//!
//! This is a leaf module that uses `unsafe`: `setsockopt` with a pointer to the program.

use std::os::fd::{AsRawFd, BorrowedFd};

/// `BPF_RET | BPF_K`: return the constant `k`, the number of bytes of the packet to keep.
const BPF_RET_K: u16 = 0x06;

/// Attaches a drop-everything filter to a listening socket: no new connection is queued on
/// it after this returns.
pub fn refuse_new_connections(listener: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut drop_all = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: drop_all.len() as u16,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `drop_all`, one valid instruction that lives until the call
    // returns (the kernel copies the program during the call); the length passed is the size
    // of `prog`; the fd is borrowed, so it is open for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_gated_listener_queues_nothing_new_keeps_what_it_queued_and_refuses_once_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut early = TcpStream::connect(addr).expect("connect before the gate");
        refuse_new_connections(listener.as_fd()).expect("SO_ATTACH_FILTER");
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert_eq!(
            late.map_err(|e| e.kind()).err(),
            Some(ErrorKind::TimedOut),
            "a SYN after the gate is dropped"
        );
        // The connection queued before the gate is accepted and carries data both ways.
        let (mut accepted, _) = listener.accept().expect("the queued connection");
        early.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).expect("read");
        accepted.write_all(b"pong").expect("write back");
        early.read_exact(&mut buf).expect("read back");
        assert_eq!(&buf, b"pong");
        drop(listener);
        let after = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        assert_eq!(
            after.map_err(|e| e.kind()).err(),
            Some(ErrorKind::ConnectionRefused),
            "once closed, connections are refused"
        );
    }
}
