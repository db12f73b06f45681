//! systemd socket activation: the listeners `zygote start` inherits instead of binding.
//!
//! systemd (or any launcher that follows its protocol, `sd_listen_fds(3)`) passes the sockets
//! of a `.socket` unit as fds 3 .. 3 + `LISTEN_FDS`, sets `LISTEN_PID` to the pid of the
//! process it execs, and names them in `LISTEN_FDNAMES` (colon-separated, from
//! `FileDescriptorName=`). [`take`] runs first thing in `main`, before
//! [`crate::inherited_fds::close_from`] closes every other inherited fd: it reads the variables
//! (and removes them, so that no child sees them), checks that each fd is a listening TCP
//! socket, and adopts it. A socket named `metrics` serves `/metrics`; the others are the
//! service's listeners.
//!
//! This is a leaf module that uses `unsafe`: taking ownership of the inherited fds.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};

/// The first fd systemd passes.
pub const FIRST: i32 = 3;
/// More inherited sockets than this are refused (a broken environment, not a real unit).
pub const MAX_FDS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of fds (1 to {MAX_FDS})")]
    BadCount(String),
    #[error("LISTEN_FDNAMES names {names} fds but LISTEN_FDS is {fds}")]
    NamesMismatch { names: usize, fds: usize },
    #[error("inherited fd {fd} ({name}) is not a listening TCP socket: {why}")]
    NotAListener { fd: i32, name: String, why: String },
}

/// What the environment says, decided apart from the fds: the names of the fds to adopt, or
/// `None` when they are not meant for this process (no `LISTEN_PID`, or another pid's).
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    my_pid: u32,
) -> Result<Option<Vec<String>>, ActivationError> {
    if listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(my_pid) {
        return Ok(None);
    }
    let Some(fds) = listen_fds else {
        return Ok(None);
    };
    let n = fds
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_FDS).contains(n))
        .ok_or_else(|| ActivationError::BadCount(fds.to_string()))?;
    match names.filter(|s| !s.is_empty()) {
        None => Ok(Some(vec!["unknown".to_string(); n])),
        Some(names) => {
            let names: Vec<String> = names.split(':').map(str::to_string).collect();
            if names.len() != n {
                return Err(ActivationError::NamesMismatch {
                    names: names.len(),
                    fds: n,
                });
            }
            Ok(Some(names))
        }
    }
}

/// The listeners passed by socket activation, by name.
#[derive(Debug, Default)]
pub struct Activated {
    pub listeners: Vec<(String, TcpListener)>,
}

impl Activated {
    /// The fds from [`FIRST`] up that are taken (the others can be closed).
    pub fn count(&self) -> usize {
        self.listeners.len()
    }
}

/// Reads and removes the activation variables and adopts the fds they name. Call it first
/// thing in `main` (single-threaded, nothing opened yet). Removed even when the fds are not
/// ours, so that children never see them.
pub fn take() -> Result<Activated, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let parsed = parse(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let Some(names) = parsed? else {
        return Ok(Activated::default());
    };
    let mut listeners = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let fd = FIRST + i as i32;
        let owned = adopt(fd).map_err(|why| ActivationError::NotAListener {
            fd,
            name: name.clone(),
            why,
        })?;
        let l = TcpListener::from(owned);
        if let Err(e) = l.local_addr() {
            return Err(ActivationError::NotAListener {
                fd,
                name,
                why: format!("no TCP address: {e}"),
            });
        }
        l.set_nonblocking(true)
            .map_err(|e| ActivationError::NotAListener {
                fd,
                name: name.clone(),
                why: e.to_string(),
            })?;
        listeners.push((name, l));
    }
    Ok(Activated { listeners })
}

/// Takes fd `fd` if it is an open, listening stream socket.
fn adopt(fd: i32) -> Result<OwnedFd, String> {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    // Checked on the raw fd before it is owned, so that an fd that is not ours to take (not
    // open) is never wrapped.
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err("not open".into());
    }
    // SAFETY: the fd is open (checked above) and nothing in this process owns it: `take` runs
    // first in `main`, before any code opened an fd, and the launcher passed fds 3 .. 3 + n to
    // this process for it to take. Each fd is taken once (the loop above visits each once).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(format!("a {t:?} socket")),
        Err(e) => return Err(format!("not a socket ({e})")),
    }
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err("not listening".into()),
        Err(e) => return Err(e.to_string()),
    }
    // Ours from now on: not inherited by what the supervisor execs.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&owned),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| e.to_string())?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fds_meant_for_this_pid_are_taken() {
        let p = |pid, fds, names| parse(pid, fds, names, 42);
        assert_eq!(p(None, Some("2"), None), Ok(None));
        assert_eq!(p(Some("41"), Some("2"), None), Ok(None), "another pid's");
        assert_eq!(p(Some("42"), None, None), Ok(None));
        assert_eq!(
            p(Some("42"), Some("2"), None),
            Ok(Some(vec!["unknown".into(), "unknown".into()]))
        );
        assert_eq!(
            p(Some("42"), Some("2"), Some("web:metrics")),
            Ok(Some(vec!["web".into(), "metrics".into()]))
        );
        assert_eq!(
            p(Some("42"), Some("1"), Some("web:metrics")),
            Err(ActivationError::NamesMismatch { names: 2, fds: 1 })
        );
        for bad in ["0", "x", "-1", "65"] {
            assert_eq!(
                p(Some("42"), Some(bad), None),
                Err(ActivationError::BadCount(bad.into()))
            );
        }
    }
}
