//! Process file descriptors (`pidfd_open(2)`, `pidfd_send_signal(2)`), through rustix: a
//! handle on one process that a reused pid can never redirect. The zygote opens one per child
//! and hands a copy to the requester; the supervisor signals its children through theirs.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::process::{Pid, PidfdFlags, Signal};

/// `pidfd_open(2)`: an fd that refers to process `pid` for as long as the fd lives.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // rustix's `Pid` is a positive number (it asserts so): refuse the rest first.
    let pid = (pid > 0)
        .then(|| Pid::from_raw(pid))
        .flatten()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// The signal `number` names, when it is one a client may send: the named signals (1 to 31 on
/// Linux). Real-time signals are refused: the C library reserves some of them for itself.
pub fn signal(number: i32) -> Option<Signal> {
    Signal::from_named_raw(number)
}

/// `pidfd_send_signal(2)`: signals exactly the process `pidfd` refers to, even if its pid has
/// been reused since. A number that is not a named signal is `EINVAL`.
pub fn send_signal(pidfd: BorrowedFd<'_>, number: i32) -> io::Result<()> {
    let sig = signal(number).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_send_signal(pidfd, sig)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_signals_are_signals_and_others_are_not() {
        for n in [libc::SIGHUP, libc::SIGTERM, libc::SIGKILL, libc::SIGUSR1] {
            assert_eq!(signal(n).map(|s| s.as_raw()), Some(n));
        }
        for n in [0, -9, 34, 64, 65] {
            assert!(signal(n).is_none(), "{n}");
        }
    }

    #[test]
    fn a_pidfd_refers_to_its_process() {
        let me = open(std::process::id() as i32).expect("a pidfd of this process");
        // Signal 0 is not a named signal: refused before any system call.
        let e = send_signal(std::os::fd::AsFd::as_fd(&me), 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(open(-1).is_err());
    }
}
