//! The runtime directory and the sockets in it: who may create them, who may remove them.
//!
//! Every socket of a service lives in one directory (`--runtime-dir`). [`prepare`] creates it
//! 0700 or checks an existing one: ours, a real directory, and writable by nobody else. A
//! directory that others can write is refused rather than fixed (as tmux refuses its socket
//! directory): anything could have been planted in it, and tightening the mode would not remove
//! it.
//!
//! A socket is bound only by a process holding its **claim** ([`SocketClaim`]): an exclusive
//! `flock` on a lock file beside it (`NAME.lock`), held for the life of the process that serves
//! the socket. So a second process that would serve the same socket (a second owner of a device,
//! a second zygote in one directory) finds the claim taken and stops instead of rebinding, and
//! a process removes only the socket it bound itself (same inode), never a successor's. The lock
//! files are never removed: removing one while another process waits for it would let two
//! processes hold "the" lock at once.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The zygote socket's name in the runtime directory.
pub const ZYGOTE_SOCKET: &str = "zygote.sock";

/// What is wrong with the runtime directory or one of its sockets.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("runtime directory {path}: exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("runtime directory {path}: is owned by uid {owner}, not by us (uid {us})")]
    NotOurs { path: PathBuf, owner: u32, us: u32 },
    #[error(
        "runtime directory {path}: mode {mode:04o} lets other users create files in it; refusing \
         to use it (something may have been planted there). Remove it or `chmod 700` it after \
         checking its contents"
    )]
    Unsafe { path: PathBuf, mode: u32 },
    #[error("runtime directory {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("{socket}: another live process serves it (it holds {lock})")]
    Claimed { socket: PathBuf, lock: PathBuf },
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> RunDirError + 'a {
    move |source| RunDirError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Creates the runtime directory (0700) or checks an existing one: a directory (not a link),
/// owned by us, that no other user can write. Group or other read and search bits are taken
/// away (nothing can have been planted through them).
pub fn prepare(dir: &Path) -> Result<(), RunDirError> {
    let us = nix::unistd::getuid().as_raw();
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            check(dir, &meta, us)?;
            if meta.mode() & 0o077 != 0 && meta.mode() & 0o077 != 0o011 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(dir, "chmod"))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err(dir, "creating"))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir, "chmod"))?;
        }
        Err(e) => return Err(io_err(dir, "inspecting")(e)),
    }
    Ok(())
}

/// The decision of [`prepare`] for an existing directory.
fn check(dir: &Path, meta: &std::fs::Metadata, us: u32) -> Result<(), RunDirError> {
    if !meta.is_dir() {
        return Err(RunDirError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    if meta.uid() != us {
        return Err(RunDirError::NotOurs {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            us,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(RunDirError::Unsafe {
            path: dir.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// The right to serve one socket of the runtime directory, held until dropped; dropping it
/// removes the socket if it is still the one this claim bound.
#[derive(Debug)]
pub struct SocketClaim {
    socket: PathBuf,
    /// Device and inode of the socket file this claim bound.
    bound: Option<(u64, u64)>,
    _lock: Flock<File>,
}

impl SocketClaim {
    /// Takes the claim on `dir/name` without waiting, removes a stale socket file left by a
    /// process that died holding it, binds a listener and sets its mode.
    pub fn bind(dir: &Path, name: &str, mode: u32) -> Result<(Self, UnixListener), RunDirError> {
        let socket = dir.join(name);
        let lock_path = dir.join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "opening"))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(RunDirError::Claimed {
                    socket,
                    lock: lock_path,
                })
            }
            Err((_, e)) => return Err(io_err(&lock_path, "locking")(e.into())),
        };
        let mut claim = Self {
            socket,
            bound: None,
            _lock: lock,
        };
        // Whoever bound a socket here before has let go of the claim: it is dead, and the file
        // is a leftover nobody serves.
        match std::fs::remove_file(&claim.socket) {
            Ok(()) => log::info!("removed the stale socket {}", claim.socket.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&claim.socket, "removing")(e)),
        }
        let listener =
            UnixListener::bind(&claim.socket).map_err(io_err(&claim.socket, "binding"))?;
        std::fs::set_permissions(&claim.socket, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&claim.socket, "chmod"))?;
        let meta = std::fs::symlink_metadata(&claim.socket)
            .map_err(io_err(&claim.socket, "inspecting"))?;
        claim.bound = Some((meta.dev(), meta.ino()));
        Ok((claim, listener))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.socket
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        let Some((dev, ino)) = self.bound else {
            return;
        };
        // Only the socket this claim bound: a file with another inode is a successor's.
        match std::fs::symlink_metadata(&self.socket) {
            Ok(m) if (m.dev(), m.ino()) == (dev, ino) => {
                let _ = std::fs::remove_file(&self.socket);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zygote-rundir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_new_directory_is_0700_and_a_readable_one_is_tightened() {
        let d = scratch("new");
        prepare(&d).unwrap();
        let mode = |d: &Path| std::fs::metadata(d).unwrap().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&d).unwrap();
        assert_eq!(
            mode(&d),
            0o700,
            "read and search bits of others are taken away"
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        prepare(&d).unwrap();
        assert_eq!(mode(&d), 0o711, "the --allow-uid mode is left as it is");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_left_as_it_is() {
        let d = scratch("unsafe");
        std::fs::create_dir_all(&d).unwrap();
        for mode in [0o777, 0o720, 0o702, 0o1777] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = prepare(&d).unwrap_err();
            assert!(
                matches!(e, RunDirError::Unsafe { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("planted"), "{e}");
            assert_eq!(
                std::fs::metadata(&d).unwrap().mode() & 0o7777,
                mode,
                "the refused directory is not touched"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_claimed_socket_is_neither_rebound_nor_removed_by_a_second_claimant() {
        let d = scratch("claim");
        prepare(&d).unwrap();
        let (first, _listener) = SocketClaim::bind(&d, "owner-0.sock", 0o600).unwrap();
        let e = SocketClaim::bind(&d, "owner-0.sock", 0o600).unwrap_err();
        assert!(matches!(e, RunDirError::Claimed { .. }), "{e}");
        assert!(
            first.path().exists(),
            "the second claimant left the socket alone"
        );
        std::os::unix::net::UnixStream::connect(first.path()).expect("still served");
        drop(first);
        assert!(!d.join("owner-0.sock").exists(), "its holder removes it");
        // The claim is free again, and a stale socket file is replaced.
        std::fs::write(d.join("owner-0.sock"), b"stale").unwrap();
        let (second, _l) = SocketClaim::bind(&d, "owner-0.sock", 0o600).unwrap();
        std::os::unix::net::UnixStream::connect(second.path()).expect("the new one serves");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_holder_does_not_remove_a_socket_bound_after_it() {
        let d = scratch("successor");
        prepare(&d).unwrap();
        let (claim, listener) = SocketClaim::bind(&d, "z.sock", 0o600).unwrap();
        // Someone replaced the file (not through a claim): the holder must not remove theirs.
        drop(listener);
        let _other = UnixListener::bind(d.join("z2.sock")).unwrap();
        std::fs::rename(d.join("z2.sock"), claim.path()).unwrap();
        drop(claim);
        assert!(d.join("z.sock").exists(), "the successor's socket is left");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
