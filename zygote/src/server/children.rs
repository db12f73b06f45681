//! The zygote's live children: who asked for each, its pidfd and status pipe, and what its
//! exit or early failure tells the requester.
//!
//! The event loop registers each child's pidfd (readable when the child ends) and status pipe
//! (end-of-file when the entry started, `stage\0message` before it when setup failed); this
//! module turns what they say into answers and leaves sending them to the loop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use mio::Token;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use zygote_runtime::protocol::{ChildInfo, Response, WorkerId};

/// One live child.
#[derive(Debug)]
pub(super) struct Child {
    /// The spawn request's id, repeated in every answer about this child.
    pub id: u64,
    /// The connection that asked for it, and that connection's uid.
    pub conn: Token,
    pub requester: u32,
    /// The device it owns the weights of, when it is the owner entry.
    pub owner_of: Option<u32>,
    pub entry: String,
    /// How logs name it: `owner 0`, `worker 3`.
    pub role: String,
    pub worker: WorkerId,
    pub started: Instant,
    pub pidfd: OwnedFd,
    pub status: Option<OwnedFd>,
    pub status_buf: Vec<u8>,
    pub pidfd_token: Token,
    pub status_token: Option<Token>,
}

/// How reading a status pipe ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StatusRead {
    /// More may come.
    Open,
    /// End of file: the pipe can be closed.
    Closed,
}

impl Child {
    /// Reads what the status pipe holds now into `status_buf`.
    pub fn read_status(&mut self) -> StatusRead {
        let Some(status) = self.status.as_ref() else {
            return StatusRead::Closed;
        };
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(status.as_raw_fd(), &mut buf) {
                Ok(0) => return StatusRead::Closed,
                Ok(n) => self.status_buf.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EAGAIN) => return StatusRead::Open,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return StatusRead::Closed,
            }
        }
    }

    /// The `child_error` for a setup failure the status pipe reported, if it reported one.
    pub fn setup_failure(&self, pid: Pid) -> Option<Response> {
        if self.status_buf.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.status_buf).to_string();
        let (stage, message) = text.split_once('\0').unwrap_or(("setup", &text));
        log::warn!(
            "{} (pid {pid}) failed before its entry ran: {stage}: {message}",
            self.role
        );
        Some(Response::ChildError {
            id: self.id,
            pid: pid.as_raw(),
            stage: stage.to_string(),
            message: message.to_string(),
        })
    }

    /// The `exited` answer for a wait status, logged.
    pub fn exited(&self, pid: Pid, status: WaitStatus) -> Response {
        let (code, signal) = match status {
            WaitStatus::Exited(_, code) => (Some(code), None),
            WaitStatus::Signaled(_, sig, _) => (None, Some(sig as i32)),
            other => {
                log::warn!("unexpected wait status for pid {pid}: {other:?}");
                (None, None)
            }
        };
        let value = code.unwrap_or_else(|| -signal.unwrap_or(0));
        log::info!(
            "{} (entry {}, pid {pid}) exited with {} after {:.3}s",
            self.role,
            self.entry,
            match (code, signal) {
                (Some(c), _) => format!("code {c}"),
                (_, Some(s)) => format!("signal {s}"),
                _ => "unknown status".into(),
            },
            self.started.elapsed().as_secs_f64()
        );
        Response::Exited {
            id: self.id,
            pid: pid.as_raw(),
            code,
            signal,
            status: value,
        }
    }
}

/// The table of live children, by pid.
#[derive(Debug, Default)]
pub(super) struct Children {
    by_pid: HashMap<Pid, Child>,
}

impl Children {
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }
    pub fn insert(&mut self, pid: Pid, child: Child) {
        self.by_pid.insert(pid, child);
    }
    pub fn get(&self, pid: Pid) -> Option<&Child> {
        self.by_pid.get(&pid)
    }
    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut Child> {
        self.by_pid.get_mut(&pid)
    }
    pub fn remove(&mut self, pid: Pid) -> Option<Child> {
        self.by_pid.remove(&pid)
    }

    /// The device whose weights `pid` owns, when it is a live owner child.
    pub fn owner_of(&self, pid: i32) -> Option<u32> {
        self.by_pid.get(&Pid::from_raw(pid))?.owner_of
    }

    /// The live owner of `device`, if there is one.
    pub fn owner(&self, device: u32) -> Option<Pid> {
        self.by_pid
            .iter()
            .find(|(_, c)| c.owner_of == Some(device))
            .map(|(pid, _)| *pid)
    }

    /// What `status` shows.
    pub fn describe(&self) -> Vec<ChildInfo> {
        self.by_pid
            .iter()
            .map(|(pid, c)| ChildInfo {
                pid: pid.as_raw(),
                entry: c.entry.clone(),
                worker: c.worker,
                age_ms: c.started.elapsed().as_millis() as u64,
            })
            .collect()
    }
}
