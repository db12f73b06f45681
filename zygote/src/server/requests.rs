//! What each request of the zygote socket does: one method per request type, called by the
//! event loop once a frame (and, for `spawn` and `keep_weights`, its fds) has arrived.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::unistd::Pid;
use zygote_runtime::protocol::frame;
use zygote_runtime::protocol::{ErrorCode, Request, Response, WorkerId, ZygoteStatus};
use zygote_runtime::worker::AttachInfo;

use super::children::Child;
use super::conn::{Awaiting, Pending};
use super::trust::{self, Action};
use super::{
    limits, request_id, Server, MAX_ARGS, MAX_ARG_LEN, MAX_CHILDREN, MAX_KEPT_FDS, MAX_LISTENERS,
};
use crate::fork::{self, ChildPlan};

impl Server {
    /// Decodes one frame and runs the request it holds.
    pub(super) fn on_frame(&mut self, t: Token, body: &[u8]) {
        let req: Request = match frame::decode(body) {
            Ok(r) => r,
            Err(e) => {
                let code = frame::error_code(&e);
                log::warn!("connection {}: bad frame: {e}", t.0);
                let id = request_id(body);
                self.fail(t, id, code, e.to_string(), false);
                // A refused spawn's fds still follow it: read them (and close them) so that
                // they are not taken for the next frame. One whose count is unreadable or over
                // the limit leaves the stream out of step: close.
                match announced_spawn_fds(body) {
                    SpawnFds::None => {}
                    SpawnFds::Count(need) => {
                        let p = Pending::new(id.unwrap_or(0), need, Awaiting::Discard);
                        self.await_fds(t, p);
                    }
                    SpawnFds::Unknown => {
                        let msg = "a refused spawn's fds cannot be counted; closing".to_string();
                        self.fail(t, id, ErrorCode::BadRequest, msg, true);
                    }
                }
                return;
            }
        };
        log::debug!("connection {}: {req:?}", t.0);
        match req {
            Request::Hello { id, client } => self.hello(t, id, &client),
            Request::Spawn {
                id,
                entry,
                worker,
                args,
                listeners,
                device,
                spare,
            } => {
                let what = Awaiting::Spawn {
                    entry,
                    worker,
                    args,
                    listeners,
                    device,
                    spare,
                };
                self.await_spawn_fds(t, id, listeners, what)
            }
            Request::Signal { id, pid, signal } => self.signal(t, id, pid, signal),
            Request::Status { id } => self.status(t, id),
            Request::Shutdown { id } => {
                if !self.authorized(t, id, Action::Shutdown, 0) {
                    return;
                }
                log::info!("shutdown requested (connection {})", t.0);
                self.send(t, &Response::Ok { id });
                self.shutting_down = true;
            }
            Request::KeepWeights {
                id,
                device,
                manifest,
                fds,
            } => {
                if fds as usize != manifest.arenas.len() || fds > MAX_KEPT_FDS {
                    let msg = format!(
                        "keep_weights announces {fds} fds for {} arenas (at most {MAX_KEPT_FDS})",
                        manifest.arenas.len()
                    );
                    self.fail(t, Some(id), ErrorCode::BadFdCount, msg, true);
                    return;
                }
                let what = Awaiting::Keep { device, manifest };
                self.await_fds(t, Pending::new(id, fds as usize, what));
            }
            Request::FetchWeights { id, device } => self.fetch_weights(t, id, device),
            Request::ReleaseWeights { id } => {
                if !self.authorized(t, id, Action::ReleaseWeights, 0) {
                    return;
                }
                let gone = self.kept.release();
                log::info!("released the kept weights (generations {gone:?})");
                self.send(t, &Response::Ok { id });
            }
        }
    }

    /// Runs a request whose fds have all arrived.
    pub(super) fn on_fds_complete(&mut self, t: Token, p: Pending) {
        match p.what {
            Awaiting::Spawn {
                entry,
                worker,
                args,
                listeners,
                device,
                spare,
            } => self.spawn(
                t,
                p.id,
                SpawnRequest {
                    entry,
                    worker,
                    args,
                    listeners,
                    device,
                    spare,
                    fds: p.fds,
                },
            ),
            Awaiting::Discard => {
                log::debug!(
                    "connection {}: closed the {} fds of a refused spawn",
                    t.0,
                    p.fds.len()
                );
            }
            Awaiting::Keep { device, manifest } => {
                let Some(peer) = self.conns.get(&t).map(|c| c.peer) else {
                    return;
                };
                let owner_of = self.children.owner_of(peer.pid);
                if !self.authorized(t, p.id, Action::KeepWeights { device, owner_of }, 0) {
                    return;
                }
                if manifest.model_digest != self.cfg.model.digest() {
                    let msg = format!(
                        "keep_weights: the manifest is of model {}, this zygote serves {}",
                        manifest.model_digest,
                        self.cfg.model.digest()
                    );
                    return self.fail(t, Some(p.id), ErrorCode::BadRequest, msg, false);
                }
                log::info!(
                    "keeping generation {} of device {device} ({} {}, {} handles)",
                    manifest.generation,
                    manifest.backend,
                    manifest.ipc,
                    p.fds.len()
                );
                if let Some(old) = self.kept.keep(device, manifest, p.fds) {
                    log::info!("released the kept generation {old} of device {device}");
                }
                self.send(t, &Response::Ok { id: p.id });
            }
        }
    }

    /// Whether the connection's peer may do `action` (see [`trust`]); answers `not_allowed`
    /// when it may not.
    fn authorized(&mut self, t: Token, id: u64, action: Action, target: i32) -> bool {
        let Some(peer) = self.conns.get(&t).map(|c| c.peer) else {
            return false;
        };
        match trust::authorize(&peer, action, target) {
            Ok(()) => true,
            Err(denied) => {
                let msg = format!("uid {} (pid {}): {denied}", peer.uid, peer.pid);
                self.fail(t, Some(id), ErrorCode::NotAllowed, msg, false);
                false
            }
        }
    }

    fn await_fds(&mut self, t: Token, p: Pending) {
        if let Some(conn) = self.conns.get_mut(&t) {
            conn.pending = Some(p);
        }
    }

    fn await_spawn_fds(&mut self, t: Token, id: u64, listeners: u32, what: Awaiting) {
        if listeners > MAX_LISTENERS {
            // The fds that follow cannot be read safely in bulk: close.
            let msg = format!("{listeners} listeners is over the limit of {MAX_LISTENERS}");
            self.fail(t, Some(id), ErrorCode::Limit, msg, true);
            return;
        }
        self.await_fds(t, Pending::new(id, 4 + listeners as usize, what));
    }

    fn hello(&mut self, t: Token, id: u64, client: &str) {
        log::info!("hello from {client:?} (connection {})", t.0);
        let resp = Response::Hello {
            id,
            server: format!("zygote {}", env!("CARGO_PKG_VERSION")),
            pid: std::process::id() as i32,
            entries: self.cfg.entries.describe(),
            limits: limits(),
        };
        self.send(t, &resp);
    }

    fn signal(&mut self, t: Token, id: u64, pid: i32, signal: i32) {
        let Some(child) = self.children.get(Pid::from_raw(pid)) else {
            let msg = format!("pid {pid} is not a live child of this zygote");
            return self.fail(t, Some(id), ErrorCode::NotChild, msg, false);
        };
        let requester = child.requester;
        if !self.authorized(t, id, Action::Signal { requester }, pid) {
            return;
        }
        let Some(child) = self.children.get(Pid::from_raw(pid)) else {
            return;
        };
        if zygote_runtime::pidfd::signal(signal).is_none() {
            let msg = format!("signal {signal} is not a named signal (1 to 31) that may be sent");
            return self.fail(t, Some(id), ErrorCode::BadSignal, msg, false);
        }
        match zygote_runtime::pidfd::send_signal(child.pidfd.as_fd(), signal) {
            Ok(()) => {
                log::info!("sent signal {signal} to {} (pid {pid})", child.role);
                self.send(t, &Response::Ok { id })
            }
            Err(e) => {
                let msg = format!("signalling pid {pid}: {e}");
                self.fail(t, Some(id), ErrorCode::Internal, msg, false)
            }
        }
    }

    fn status(&mut self, t: Token, id: u64) {
        let model = &self.cfg.model;
        let status = ZygoteStatus {
            pid: std::process::id() as i32,
            model_path: model.path().display().to_string(),
            model_bytes: model.len(),
            model_digest: model.digest().to_string(),
            tensors: model.tensors().len() as u32,
            backend: self.cfg.backend.clone(),
            children: self.children.describe(),
            connections: self.conns.len() as u32,
            kept: self.kept.describe(),
        };
        self.send(t, &Response::Status { id, status });
    }

    fn fetch_weights(&mut self, t: Token, id: u64, device: u32) {
        if !self.authorized(t, id, Action::FetchWeights, 0) {
            return;
        }
        match self.kept.fetch(device) {
            None => {
                // An ordinary answer (a first owner asks too), not a client error.
                let message = format!("no weights are kept for device {device}");
                let code = ErrorCode::Unavailable;
                let id = Some(id);
                self.send(t, &Response::Error { id, code, message });
            }
            Some(Ok((manifest, fds))) => {
                let resp = Response::Weights {
                    id,
                    manifest,
                    fds: fds.len() as u32,
                };
                self.send_with_fds(t, &resp, fds);
            }
            Some(Err(e)) => {
                let msg = format!("dup of a kept fd failed: {e}");
                self.fail(t, Some(id), ErrorCode::Internal, msg, false)
            }
        }
    }

    fn spawn(&mut self, t: Token, id: u64, req: SpawnRequest) {
        if self.shutting_down {
            let msg = "the zygote is shutting down".to_string();
            return self.fail(t, Some(id), ErrorCode::ShuttingDown, msg, false);
        }
        let Some(owner) = self.cfg.entries.get(&req.entry).map(|e| e.is_owner()) else {
            let names: Vec<String> = self
                .cfg
                .entries
                .describe()
                .into_iter()
                .map(|e| e.name)
                .collect();
            let msg = format!(
                "no entry named {:?} (entries: {})",
                req.entry,
                names.join(", ")
            );
            return self.fail(t, Some(id), ErrorCode::UnknownEntry, msg, false);
        };
        if !self.authorized(t, id, Action::Spawn { owner }, 0) {
            return;
        }
        let device = req.device.unwrap_or(0);
        if let Some(live) = self.children.owner(device).filter(|_| owner) {
            let msg = format!("the owner of device {device} is live already (pid {live})");
            return self.fail(t, Some(id), ErrorCode::Conflict, msg, false);
        }
        if req.args.len() as u32 > MAX_ARGS || req.args.iter().any(|a| a.len() as u32 > MAX_ARG_LEN)
        {
            let msg = format!("at most {MAX_ARGS} arguments of at most {MAX_ARG_LEN} bytes");
            return self.fail(t, Some(id), ErrorCode::Limit, msg, false);
        }
        if self.children.len() as u32 >= MAX_CHILDREN {
            let msg = format!("{MAX_CHILDREN} children already live");
            return self.fail(t, Some(id), ErrorCode::Limit, msg, false);
        }
        let mut fds = req.fds.into_iter();
        let (Some(stdin), Some(stdout), Some(stderr), Some(control)) =
            (fds.next(), fds.next(), fds.next(), fds.next())
        else {
            // `Pending` completes only with 4 + listeners fds; this is a bug, not a client's.
            let msg = "a spawn completed without its stdio and control fds".to_string();
            return self.fail(t, Some(id), ErrorCode::Internal, msg, false);
        };
        let listeners: Vec<OwnedFd> = fds.collect();
        let role = if owner {
            format!("owner {device}")
        } else {
            format!("worker {}", req.worker)
        };
        let info = AttachInfo {
            entry: req.entry.clone(),
            worker: req.worker,
            args: req.args,
            listeners: req.listeners,
            runtime_dir: self.cfg.runtime_dir.clone(),
            model_path: self.cfg.model.path().to_path_buf(),
            model_digest: self.cfg.model.digest().to_string(),
            device: req.device,
            spare: req.spare,
        };
        let Some(entry) = self.cfg.entries.get(&req.entry) else {
            return;
        };
        let plan = ChildPlan {
            tag: role.clone(),
            title: zygote_runtime::proctitle::title_for(&role),
            info,
            entry,
            stdio: [stdin, stdout, stderr],
            control,
            listeners,
            model: self.cfg.model.memfd(),
            fork: self.cfg.fork,
        };
        let requester = self.conns.get(&t).map_or(u32::MAX, |c| c.peer.uid);
        let started = Instant::now();
        let forked = match fork::spawn(plan) {
            Ok(f) => f,
            Err(e) => {
                log::error!("spawn of {role} failed: {e}");
                return self.fail(t, Some(id), ErrorCode::ForkFailed, e.to_string(), false);
            }
        };
        // The plan's fds were moved into `spawn` and closed there in the parent.
        let pid = forked.pid;
        let pidfd_token = self.token();
        let status_token = self.token();
        let reg = self.poll.registry();
        let registered = reg
            .register(
                &mut SourceFd(&forked.pidfd.as_raw_fd()),
                pidfd_token,
                Interest::READABLE,
            )
            .and_then(|()| {
                reg.register(
                    &mut SourceFd(&forked.status.as_raw_fd()),
                    status_token,
                    Interest::READABLE,
                )
            });
        if let Err(e) = registered {
            // A child whose exit would never be seen must not run: it would be neither reaped
            // nor reported. End it, reap it, and say so.
            let _ = reg.deregister(&mut SourceFd(&forked.pidfd.as_raw_fd()));
            let _ = zygote_runtime::pidfd::send_signal(forked.pidfd.as_fd(), libc::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            log::error!("watching the new {role} (pid {pid}) failed ({e}); it was killed");
            let msg = format!("registering the child's pidfd failed: {e}");
            return self.fail(t, Some(id), ErrorCode::Internal, msg, false);
        }
        self.tokens.insert(pidfd_token, super::Slot::Pidfd(pid));
        self.tokens.insert(status_token, super::Slot::Status(pid));
        let pidfd_copy = forked.pidfd.try_clone();
        log::info!(
            "spawned {role} ({}) as pid {pid} for connection {}",
            req.entry,
            t.0
        );
        self.children.insert(
            pid,
            Child {
                id,
                conn: t,
                requester,
                owner_of: owner.then_some(device),
                entry: req.entry,
                role,
                worker: req.worker,
                started,
                pidfd: forked.pidfd,
                status: Some(forked.status),
                status_buf: Vec::new(),
                pidfd_token,
                status_token: Some(status_token),
            },
        );
        match pidfd_copy {
            Ok(fd) => {
                let resp = Response::Spawned {
                    id,
                    pid: pid.as_raw(),
                };
                self.send_with_fds(t, &resp, [fd]);
            }
            Err(e) => {
                let msg = format!("dup of the pidfd failed: {e}");
                self.fail(t, Some(id), ErrorCode::Internal, msg, false)
            }
        }
    }
}

/// How many fds follow a frame that failed to decode.
enum SpawnFds {
    /// Not a spawn (or not a map): none.
    None,
    /// A spawn announcing this many (4 + its listeners).
    Count(usize),
    /// A spawn whose `listeners` is missing, not a number, or over the limit.
    Unknown,
}

/// Reads, leniently, whether a refused frame was a spawn and how many fds it announced.
fn announced_spawn_fds(body: &[u8]) -> SpawnFds {
    use serde_cbor::Value;
    let Ok(Value::Map(m)) = serde_cbor::from_slice::<Value>(body) else {
        return SpawnFds::None;
    };
    if m.get(&Value::Text("type".into())) != Some(&Value::Text("spawn".into())) {
        return SpawnFds::None;
    }
    match m.get(&Value::Text("listeners".into())) {
        Some(Value::Integer(n)) if (0..=i128::from(MAX_LISTENERS)).contains(n) => {
            SpawnFds::Count(4 + *n as usize)
        }
        _ => SpawnFds::Unknown,
    }
}

/// A spawn whose fds have arrived: stdin, stdout, stderr, the control channel, the listeners.
struct SpawnRequest {
    entry: String,
    worker: WorkerId,
    args: Vec<String>,
    listeners: u32,
    device: Option<u32>,
    spare: bool,
    fds: Vec<OwnedFd>,
}
