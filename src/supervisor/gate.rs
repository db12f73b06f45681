//! The listeners' gate: how a stop refuses new connections instead of resetting them.
//!
//! A listening socket's accept queue holds connections whose handshake completed but that no
//! worker accepted yet; when the last fd of the socket closes, the kernel resets every one of
//! them. During a stop the workers drain (accept what is queued, answer it, exit) while the
//! supervisor still holds the listeners, so connections that arrived after the workers' last
//! `accept` used to sit in the queue until the supervisor exited, and were reset.
//!
//! At the start of a stop, [`refuse_new_connections`] attaches a classic BPF filter to each
//! listening socket (`SO_ATTACH_FILTER`) that drops every segment opening a connection (SYN set,
//! ACK clear) and keeps every other. One socket is one open file description shared by the
//! supervisor and every worker, so one `setsockopt` on the supervisor's fd covers them all. The
//! kernel runs a listener's filter on each segment it receives, the TCP header first (so the
//! flags are byte 13), so from then on no handshake starts: clients retransmit their SYN, and
//! once the listeners are closed (when no worker is left) they get a RST, that is `connection
//! refused`. A handshake already under way when the gate closes still completes: its final ACK
//! passes (a filter that dropped everything left it half-open, and its client was reset when
//! the listener closed), and the draining workers accept it. The connections already queued,
//! and those already accepted, are not affected (an accepted socket copies its listener's
//! filter only when it is created, and those were created before). Linux only, like the rest
//! of the supervisor.
//!
//! This is a leaf module that uses `unsafe`: `setsockopt` with a pointer to the program.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Classic BPF opcodes (linux/filter.h) of the gate's program.
const BPF_LD_B_ABS: u16 = 0x30;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K`: return the constant `k`, the number of bytes of the packet to keep.
const BPF_RET_K: u16 = 0x06;

/// TCP's flag bits, in byte 13 of its header.
const TCP_FLAGS_AT: u32 = 13;
const TCP_SYN: u32 = 0x02;
const TCP_ACK: u32 = 0x10;

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The gate's program: drop a segment whose flags have SYN without ACK (one that opens a
/// connection), keep every other whole.
fn program() -> [libc::sock_filter; 5] {
    [
        // A = the segment's flags & (SYN | ACK)
        op(BPF_LD_B_ABS, 0, 0, TCP_FLAGS_AT),
        op(BPF_ALU_AND_K, 0, 0, TCP_SYN | TCP_ACK),
        // if A == SYN: next (drop), else skip one (keep)
        op(BPF_JMP_JEQ_K, 0, 1, TCP_SYN),
        op(BPF_RET_K, 0, 0, 0),
        op(BPF_RET_K, 0, 0, u32::MAX),
    ]
}

/// Attaches the gate's filter to a listening socket: no new handshake starts on it after this
/// returns; one under way completes.
pub fn refuse_new_connections(listener: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut program = program();
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `program`, valid instructions (every jump lands inside it, each
    // path ends in a return) that live until the call returns (the kernel copies the program
    // during the call); the length passed is the size of `prog`; the fd is borrowed, so it is
    // open for the whole call.
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

    /// What the program returns for a TCP header whose flags byte is `flags`, run by a
    /// classic-BPF interpreter of the few opcodes it uses.
    fn verdict(flags: u8) -> u32 {
        let mut header = [0u8; 20];
        header[TCP_FLAGS_AT as usize] = flags;
        let (program, mut pc, mut a) = (program(), 0usize, 0u32);
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                BPF_LD_B_ABS => a = u32::from(header[i.k as usize]),
                BPF_ALU_AND_K => a &= i.k,
                BPF_JMP_JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                BPF_RET_K => return i.k,
                code => panic!("opcode {code:#x} is not interpreted here"),
            }
        }
    }

    #[test]
    fn the_gate_drops_a_connections_first_segment_only() {
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        const PSH: u8 = 0x08;
        let (syn, ack) = (TCP_SYN as u8, TCP_ACK as u8);
        assert_eq!(verdict(syn), 0, "a SYN is dropped");
        for (what, flags) in [
            ("the handshake's final ACK", ack),
            ("data", ack | PSH),
            ("a SYN-ACK", syn | ack),
            ("a FIN", ack | FIN),
            ("a RST", RST),
            ("a RST-ACK", RST | ack),
        ] {
            assert_eq!(verdict(flags), u32::MAX, "{what} is kept");
        }
    }

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
