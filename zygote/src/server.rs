//! The zygote's event loop: one thread, one mio `Poll`, the zygote socket, its connections,
//! and one pidfd and one status pipe per live child.
//!
//! A connection is checked with `SO_PEERCRED` when accepted, then reads frames
//! ([`zygote_runtime::protocol::frame`]) and the fds that follow a `spawn`. Every bad frame
//! gets an `error` answer; the connection closes only when the stream can no longer be trusted
//! to be in step (oversized, truncated, timed out, wrong fd count), and never affects other
//! connections. When a child exits, its pidfd becomes readable; the zygote reaps it and sends
//! `exited` to the connection that asked for it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use zygote_runtime::backend::Manifest;
use zygote_runtime::fdpass;
use zygote_runtime::model::Model;
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{
    ChildInfo, ErrorCode, Limits, ProtocolError, Request, Response, ZygoteStatus,
};
use zygote_runtime::worker::AttachInfo;

use crate::entries::EntryTable;
use crate::fork::{self, ChildPlan};

/// Most listeners one spawn may pass.
pub const MAX_LISTENERS: u32 = 16;
/// Most arguments in one spawn, and the longest argument.
pub const MAX_ARGS: u32 = 64;
pub const MAX_ARG_LEN: u32 = 4096;
/// Most connections served at once.
pub const MAX_CONNECTIONS: u32 = 64;
/// Most live children.
pub const MAX_CHILDREN: u32 = 1024;
/// Most fds one `keep_weights` may carry (one per arena).
pub const MAX_KEPT_FDS: u32 = 64;
/// The name of the socket in the runtime directory.
pub const SOCKET_NAME: &str = zygote_runtime::worker::ZYGOTE_SOCKET;

const LISTENER: Token = Token(0);
const FIRST_DYNAMIC: usize = 1;

/// How a zygote is set up.
#[derive(Debug)]
pub struct ServerConfig {
    pub runtime_dir: PathBuf,
    pub model: Model,
    pub entries: EntryTable,
    /// uids allowed besides the zygote's own.
    pub allow_uids: Vec<u32>,
    /// Shown by `status`.
    pub backend: String,
    /// Called once the socket listens (the supervisor's ready signal).
    pub on_ready: Option<fn(&Path)>,
}

/// Errors that stop the zygote.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("runtime directory {path}: {reason}")]
    RuntimeDir { path: PathBuf, reason: String },
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("event loop: {0}")]
    Poll(io::Error),
}

#[derive(Debug)]
enum Out {
    Bytes(Vec<u8>, usize),
    Fd(OwnedFd),
}

#[derive(Debug)]
struct PendingSpawn {
    id: u64,
    /// Fds announced: 4 + listeners for a spawn, the arena count for `keep_weights`.
    need: usize,
    /// Set for `keep_weights`: the device and manifest the fds belong to.
    keep: Option<(u32, Manifest)>,
    entry: String,
    worker: u32,
    args: Vec<String>,
    listeners: u32,
    device: Option<u32>,
    fds: Vec<OwnedFd>,
    since: Instant,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    reader: FrameReader,
    pending: Option<PendingSpawn>,
    out: VecDeque<Out>,
    closing: bool,
    uid: u32,
}

#[derive(Debug)]
struct Child {
    id: u64,
    conn: Token,
    entry: String,
    worker: u32,
    started: Instant,
    pidfd: OwnedFd,
    status: Option<OwnedFd>,
    status_buf: Vec<u8>,
    pidfd_token: Token,
    status_token: Option<Token>,
}

enum Slot {
    Conn,
    Pidfd(Pid),
    Status(Pid),
}

struct Server {
    cfg: ServerConfig,
    poll: Poll,
    listener: UnixListener,
    conns: HashMap<Token, Conn>,
    children: HashMap<Pid, Child>,
    /// Exported handles kept per device (see `keep_weights`).
    kept: std::collections::BTreeMap<u32, (Manifest, Vec<OwnedFd>)>,
    tokens: HashMap<Token, Slot>,
    next_token: usize,
    shutting_down: bool,
    uid: u32,
}

/// Creates the runtime directory (0700, ours) or checks an existing one.
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), ServerError> {
    let err = |reason: String| ServerError::RuntimeDir {
        path: dir.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            use std::os::unix::fs::MetadataExt;
            if !meta.is_dir() {
                return Err(err("exists and is not a directory".into()));
            }
            if meta.uid() != nix::unistd::getuid().as_raw() {
                return Err(err(format!("is owned by uid {}, not by us", meta.uid())));
            }
            if meta.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err(e.to_string()))?;
        }
        Err(e) => return Err(err(e.to_string())),
    }
    Ok(())
}

/// Runs the zygote until a `shutdown` request. Returns the exit code.
pub fn run(cfg: ServerConfig) -> Result<i32, ServerError> {
    prepare_runtime_dir(&cfg.runtime_dir)?;
    let path = cfg.runtime_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let mut listener = UnixListener::bind(&path).map_err(|source| ServerError::Bind {
        path: path.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Bind {
            path: path.clone(),
            source,
        }
    })?;
    let poll = Poll::new().map_err(ServerError::Poll)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(ServerError::Poll)?;
    log::info!(
        "serving {} ({} bytes, {} tensors, {}) on {}",
        cfg.model.path().display(),
        cfg.model.len(),
        cfg.model.tensors().len(),
        cfg.model.digest(),
        path.display()
    );
    if let Some(ready) = cfg.on_ready {
        ready(&path);
    }
    let mut server = Server {
        cfg,
        poll,
        listener,
        conns: HashMap::new(),
        children: HashMap::new(),
        kept: std::collections::BTreeMap::new(),
        tokens: HashMap::new(),
        next_token: FIRST_DYNAMIC,
        shutting_down: false,
        uid: nix::unistd::getuid().as_raw(),
    };
    server.serve()?;
    let _ = std::fs::remove_file(&path);
    Ok(0)
}

fn limits() -> Limits {
    Limits {
        max_frame: frame::MAX_FRAME as u32,
        read_deadline_ms: frame::READ_DEADLINE.as_millis() as u32,
        max_listeners: MAX_LISTENERS,
        max_args: MAX_ARGS,
        max_arg_len: MAX_ARG_LEN,
        max_connections: MAX_CONNECTIONS,
        max_children: MAX_CHILDREN,
    }
}

impl Server {
    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn serve(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(256);
        loop {
            if self.shutting_down && self.conns.values().all(|c| c.out.is_empty()) {
                log::info!(
                    "shutting down; {} children keep running under their requesters",
                    self.children.len()
                );
                return Ok(());
            }
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(250)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServerError::Poll(e)),
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    t => match self.tokens.get(&t) {
                        Some(Slot::Conn) => self.on_conn(t, ev.is_readable(), ev.is_writable()),
                        Some(Slot::Pidfd(pid)) => {
                            let pid = *pid;
                            self.on_child_exit(pid)
                        }
                        Some(Slot::Status(pid)) => {
                            let pid = *pid;
                            self.on_status(pid)
                        }
                        None => {}
                    },
                }
            }
            self.check_deadlines();
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            let cred =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
            let uid = match cred {
                Ok(c) => c.uid(),
                Err(e) => {
                    log::warn!("SO_PEERCRED failed, refusing the connection: {e}");
                    continue;
                }
            };
            let allowed = uid == self.uid || self.cfg.allow_uids.contains(&uid);
            if !allowed || self.conns.len() as u32 >= MAX_CONNECTIONS {
                let (code, message) = if allowed {
                    (
                        ErrorCode::Limit,
                        format!("too many connections (limit {MAX_CONNECTIONS})"),
                    )
                } else {
                    log::warn!(
                        "refused a connection from uid {uid} (allowed: {} and {:?})",
                        self.uid,
                        self.cfg.allow_uids
                    );
                    (
                        ErrorCode::NotAllowed,
                        format!("uid {uid} may not use this zygote"),
                    )
                };
                if let Ok(bytes) = frame::encode(&Response::Error {
                    id: None,
                    code,
                    message,
                }) {
                    let _ = stream.write(&bytes);
                }
                continue;
            }
            let t = self.token();
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, t, Interest::READABLE)
            {
                log::warn!("registering a connection failed: {e}");
                continue;
            }
            log::debug!("connection {} from uid {uid}", t.0);
            self.tokens.insert(t, Slot::Conn);
            self.conns.insert(
                t,
                Conn {
                    stream,
                    reader: FrameReader::default(),
                    pending: None,
                    out: VecDeque::new(),
                    closing: false,
                    uid,
                },
            );
        }
    }

    fn on_conn(&mut self, t: Token, readable: bool, writable: bool) {
        if readable {
            self.read_conn(t);
        }
        if writable || readable {
            self.flush(t);
        }
    }

    fn read_conn(&mut self, t: Token) {
        loop {
            let Some(conn) = self.conns.get_mut(&t) else {
                return;
            };
            if conn.closing {
                return;
            }
            if let Some(p) = conn.pending.as_mut() {
                let need = p.need;
                while p.fds.len() < need {
                    match fdpass::recv_fd(conn.stream.as_fd()) {
                        Ok(fd) => p.fds.push(fd),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) => {
                            let msg = format!(
                                "request {} announced {need} fds, fd {} did not arrive: {e}",
                                p.id,
                                p.fds.len() + 1
                            );
                            let id = p.id;
                            self.fail(t, Some(id), ErrorCode::BadFdCount, msg, true);
                            return;
                        }
                    }
                }
                let p = conn.pending.take().expect("checked above");
                if p.keep.is_some() {
                    self.keep(t, p);
                } else {
                    self.spawn(t, p);
                }
                continue;
            }
            let event = conn.reader.read(&mut conn.stream);
            match event {
                Ok(ReadEvent::Frame(body)) => self.on_frame(t, &body),
                Ok(ReadEvent::WouldBlock) => return,
                Ok(ReadEvent::Eof) => {
                    self.close(t);
                    return;
                }
                Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.close(t);
                    return;
                }
                Err(e) => {
                    let code = frame::error_code(&e);
                    self.fail(t, None, code, e.to_string(), true);
                    return;
                }
            }
        }
    }

    fn on_frame(&mut self, t: Token, body: &[u8]) {
        let req: Request = match frame::decode(body) {
            Ok(r) => r,
            Err(e) => {
                let code = frame::error_code(&e);
                log::warn!("connection {}: bad frame: {e}", t.0);
                self.fail(t, request_id(body), code, e.to_string(), false);
                return;
            }
        };
        log::debug!("connection {}: {req:?}", t.0);
        match req {
            Request::Hello { id, client } => {
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
            Request::Spawn {
                id,
                entry,
                worker,
                args,
                listeners,
                device,
            } => {
                if listeners > MAX_LISTENERS {
                    // The fds that follow cannot be read safely in bulk: close.
                    let msg = format!("{listeners} listeners is over the limit of {MAX_LISTENERS}");
                    self.fail(t, Some(id), ErrorCode::Limit, msg, true);
                    return;
                }
                if let Some(conn) = self.conns.get_mut(&t) {
                    conn.pending = Some(PendingSpawn {
                        id,
                        need: 4 + listeners as usize,
                        keep: None,
                        entry,
                        worker,
                        args,
                        listeners,
                        device,
                        fds: Vec::new(),
                        since: Instant::now(),
                    });
                }
            }
            Request::Signal { id, pid, signal } => {
                let Some(child) = self.children.get(&Pid::from_raw(pid)) else {
                    self.fail(
                        t,
                        Some(id),
                        ErrorCode::NotChild,
                        format!("pid {pid} is not a live child of this zygote"),
                        false,
                    );
                    return;
                };
                if !(1..=64).contains(&signal) {
                    self.fail(
                        t,
                        Some(id),
                        ErrorCode::BadSignal,
                        format!("signal {signal} is not a valid signal number"),
                        false,
                    );
                    return;
                }
                match fork::pidfd_send_signal(child.pidfd.as_fd(), signal) {
                    Ok(()) => {
                        log::info!("sent signal {signal} to {} (pid {pid})", child.entry);
                        self.send(t, &Response::Ok { id })
                    }
                    Err(e) => self.fail(
                        t,
                        Some(id),
                        ErrorCode::Internal,
                        format!("signalling pid {pid}: {e}"),
                        false,
                    ),
                }
            }
            Request::Status { id } => {
                let status = ZygoteStatus {
                    pid: std::process::id() as i32,
                    model_path: self.cfg.model.path().display().to_string(),
                    model_bytes: self.cfg.model.len(),
                    model_digest: self.cfg.model.digest().to_string(),
                    tensors: self.cfg.model.tensors().len() as u32,
                    backend: self.cfg.backend.clone(),
                    children: self
                        .children
                        .iter()
                        .map(|(pid, c)| ChildInfo {
                            pid: pid.as_raw(),
                            entry: c.entry.clone(),
                            worker: c.worker,
                            age_ms: c.started.elapsed().as_millis() as u64,
                        })
                        .collect(),
                    connections: self.conns.len() as u32,
                    kept: self
                        .kept
                        .iter()
                        .map(|(d, (m, _))| (*d, m.generation, m.ipc.clone()))
                        .collect(),
                };
                self.send(t, &Response::Status { id, status });
            }
            Request::Shutdown { id } => {
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
                if let Some(conn) = self.conns.get_mut(&t) {
                    conn.pending = Some(PendingSpawn {
                        id,
                        need: fds as usize,
                        keep: Some((device, manifest)),
                        entry: String::new(),
                        worker: 0,
                        args: Vec::new(),
                        listeners: 0,
                        device: Some(device),
                        fds: Vec::new(),
                        since: Instant::now(),
                    });
                }
            }
            Request::FetchWeights { id, device } => {
                let Some((manifest, fds)) = self.kept.get(&device) else {
                    // An ordinary answer (a first owner asks too), not a client error.
                    let message = format!("no weights are kept for device {device}");
                    let code = ErrorCode::Unavailable;
                    self.send(
                        t,
                        &Response::Error {
                            id: Some(id),
                            code,
                            message,
                        },
                    );
                    return;
                };
                let dups: Result<Vec<OwnedFd>, _> = fds.iter().map(|f| f.try_clone()).collect();
                match dups {
                    Ok(dups) => {
                        let resp = Response::Weights {
                            id,
                            manifest: manifest.clone(),
                            fds: dups.len() as u32,
                        };
                        self.send(t, &resp);
                        if let Some(conn) = self.conns.get_mut(&t) {
                            conn.out.extend(dups.into_iter().map(Out::Fd));
                        }
                        self.flush(t);
                    }
                    Err(e) => {
                        let msg = format!("dup of a kept fd failed: {e}");
                        self.fail(t, Some(id), ErrorCode::Internal, msg, false)
                    }
                }
            }
        }
    }

    /// Keeps an owner's exported handles: holding an fd needs no CUDA, and it keeps the
    /// memory alive while no owner is up.
    fn keep(&mut self, t: Token, p: PendingSpawn) {
        let Some((device, manifest)) = p.keep else {
            return;
        };
        log::info!(
            "keeping generation {} of device {device} ({} {}, {} handles)",
            manifest.generation,
            manifest.backend,
            manifest.ipc,
            p.fds.len()
        );
        if let Some((old, _)) = self.kept.insert(device, (manifest, p.fds)) {
            log::info!(
                "released the kept generation {} of device {device}",
                old.generation
            );
        }
        self.send(t, &Response::Ok { id: p.id });
    }

    fn spawn(&mut self, t: Token, p: PendingSpawn) {
        let id = p.id;
        if self.shutting_down {
            return self.fail(
                t,
                Some(id),
                ErrorCode::ShuttingDown,
                "the zygote is shutting down".into(),
                false,
            );
        }
        let Some(entry) = self.cfg.entries.get(&p.entry) else {
            let names: Vec<String> = self
                .cfg
                .entries
                .describe()
                .into_iter()
                .map(|e| e.name)
                .collect();
            return self.fail(
                t,
                Some(id),
                ErrorCode::UnknownEntry,
                format!(
                    "no entry named {:?} (entries: {})",
                    p.entry,
                    names.join(", ")
                ),
                false,
            );
        };
        if p.args.len() as u32 > MAX_ARGS || p.args.iter().any(|a| a.len() as u32 > MAX_ARG_LEN) {
            return self.fail(
                t,
                Some(id),
                ErrorCode::Limit,
                format!("at most {MAX_ARGS} arguments of at most {MAX_ARG_LEN} bytes"),
                false,
            );
        }
        if self.children.len() as u32 >= MAX_CHILDREN {
            return self.fail(
                t,
                Some(id),
                ErrorCode::Limit,
                format!("{MAX_CHILDREN} children already live"),
                false,
            );
        }
        let mut fds = p.fds.into_iter();
        let stdio = [
            fds.next().expect("4 fds"),
            fds.next().expect("4 fds"),
            fds.next().expect("4 fds"),
        ];
        let control = fds.next().expect("4 fds");
        let listeners: Vec<OwnedFd> = fds.collect();
        let role = if p.entry == "owner" {
            format!("owner {}", p.device.unwrap_or(0))
        } else {
            format!("worker {}", p.worker)
        };
        let info = AttachInfo {
            entry: p.entry.clone(),
            worker: p.worker,
            args: p.args,
            listeners: p.listeners,
            runtime_dir: self.cfg.runtime_dir.clone(),
            model_path: self.cfg.model.path().to_path_buf(),
            model_digest: self.cfg.model.digest().to_string(),
            device: p.device,
        };
        let plan = ChildPlan {
            tag: role.clone(),
            title: format!("zygote: {role}"),
            info,
            entry,
            stdio,
            control,
            listeners,
            model: self.cfg.model.memfd(),
        };
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
        let _ = reg.register(
            &mut SourceFd(&forked.pidfd.as_raw_fd()),
            pidfd_token,
            Interest::READABLE,
        );
        let _ = reg.register(
            &mut SourceFd(&forked.status.as_raw_fd()),
            status_token,
            Interest::READABLE,
        );
        self.tokens.insert(pidfd_token, Slot::Pidfd(pid));
        self.tokens.insert(status_token, Slot::Status(pid));
        let pidfd_copy = forked.pidfd.try_clone();
        self.children.insert(
            pid,
            Child {
                id,
                conn: t,
                entry: p.entry.clone(),
                worker: p.worker,
                started,
                pidfd: forked.pidfd,
                status: Some(forked.status),
                status_buf: Vec::new(),
                pidfd_token,
                status_token: Some(status_token),
            },
        );
        log::info!(
            "spawned {role} ({}) as pid {pid} for connection {}",
            p.entry,
            t.0
        );
        match pidfd_copy {
            Ok(fd) => {
                self.send(
                    t,
                    &Response::Spawned {
                        id,
                        pid: pid.as_raw(),
                    },
                );
                if let Some(conn) = self.conns.get_mut(&t) {
                    conn.out.push_back(Out::Fd(fd));
                }
                self.flush(t);
            }
            Err(e) => self.fail(
                t,
                Some(id),
                ErrorCode::Internal,
                format!("dup of the pidfd failed: {e}"),
                false,
            ),
        }
    }

    fn on_status(&mut self, pid: Pid) {
        let Some(child) = self.children.get_mut(&pid) else {
            return;
        };
        let Some(status) = child.status.as_ref() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut file = std::fs::File::from(status.try_clone().expect("dup of a pipe"));
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => child.status_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        // End of file: the entry started (no data) or setup failed (data).
        if let (Some(fd), Some(tok)) = (child.status.take(), child.status_token.take()) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
            self.tokens.remove(&tok);
        }
        if !child.status_buf.is_empty() {
            let text = String::from_utf8_lossy(&child.status_buf).to_string();
            let (stage, message) = text.split_once('\0').unwrap_or(("setup", &text));
            let (id, conn) = (child.id, child.conn);
            log::warn!(
                "{} (pid {pid}) failed before its entry ran: {stage}: {message}",
                child.entry
            );
            let resp = Response::ChildError {
                id,
                pid: pid.as_raw(),
                stage: stage.to_string(),
                message: message.to_string(),
            };
            self.send(conn, &resp);
        }
    }

    fn on_child_exit(&mut self, pid: Pid) {
        let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return,
            Ok(s) => s,
            Err(e) => {
                log::warn!("waitpid({pid}) failed: {e}");
                return;
            }
        };
        // The status pipe may hold a setup error not read yet; read it before `exited`.
        self.on_status(pid);
        let Some(child) = self.children.remove(&pid) else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&child.pidfd.as_raw_fd()));
        self.tokens.remove(&child.pidfd_token);
        if let Some(tok) = child.status_token {
            self.tokens.remove(&tok);
        }
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
            "{} worker {} (pid {pid}) exited with {} after {:.3}s",
            child.entry,
            child.worker,
            match (code, signal) {
                (Some(c), _) => format!("code {c}"),
                (_, Some(s)) => format!("signal {s}"),
                _ => "unknown status".into(),
            },
            child.started.elapsed().as_secs_f64()
        );
        if self.conns.contains_key(&child.conn) {
            self.send(
                child.conn,
                &Response::Exited {
                    id: child.id,
                    pid: pid.as_raw(),
                    code,
                    signal,
                    status: value,
                },
            );
        } else {
            log::info!(
                "the requester of pid {pid} is gone; its exit status {value} is only logged"
            );
        }
    }

    fn send(&mut self, t: Token, resp: &Response) {
        let Some(conn) = self.conns.get_mut(&t) else {
            return;
        };
        match frame::encode(resp) {
            Ok(bytes) => conn.out.push_back(Out::Bytes(bytes, 0)),
            Err(e) => log::error!("encoding an answer failed: {e}"),
        }
        self.flush(t);
    }

    /// Answers with an error; `close` when the stream can no longer be trusted.
    fn fail(&mut self, t: Token, id: Option<u64>, code: ErrorCode, message: String, close: bool) {
        log::warn!("connection {}: {code:?}: {message}", t.0);
        self.send(t, &Response::Error { id, code, message });
        if close {
            if let Some(conn) = self.conns.get_mut(&t) {
                conn.closing = true;
                conn.pending = None;
            }
            self.flush(t);
        }
    }

    fn flush(&mut self, t: Token) {
        let Some(conn) = self.conns.get_mut(&t) else {
            return;
        };
        while let Some(item) = conn.out.front_mut() {
            let done = match item {
                Out::Bytes(bytes, off) => match conn.stream.write(&bytes[*off..]) {
                    Ok(n) => {
                        *off += n;
                        *off == bytes.len()
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                    Err(_) => {
                        conn.out.clear();
                        conn.closing = true;
                        break;
                    }
                },
                Out::Fd(fd) => match fdpass::send_fd(conn.stream.as_fd(), fd.as_fd()) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        conn.out.clear();
                        conn.closing = true;
                        break;
                    }
                },
            };
            if done {
                conn.out.pop_front();
            }
        }
        let interest = if conn.out.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let _ = self
            .poll
            .registry()
            .reregister(&mut conn.stream, t, interest);
        if conn.closing && conn.out.is_empty() {
            self.close(t);
        }
    }

    fn close(&mut self, t: Token) {
        if let Some(mut conn) = self.conns.remove(&t) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            log::debug!("connection {} (uid {}) closed", t.0, conn.uid);
        }
        self.tokens.remove(&t);
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let mut late = Vec::new();
        for (t, c) in &self.conns {
            if let Some(p) = &c.pending {
                if now.duration_since(p.since) > frame::READ_DEADLINE {
                    late.push((
                        *t,
                        Some(p.id),
                        ErrorCode::BadFdCount,
                        format!(
                            "request {} announced {} fds, {} arrived before the deadline",
                            p.id,
                            p.need,
                            p.fds.len()
                        ),
                    ));
                }
            } else if let Some(s) = c.reader.started() {
                if now.duration_since(s) > frame::READ_DEADLINE {
                    late.push((
                        *t,
                        None,
                        ErrorCode::ReadTimeout,
                        format!("frame not finished within {:?}", frame::READ_DEADLINE),
                    ));
                }
            }
        }
        for (t, id, code, msg) in late {
            self.fail(t, id, code, msg, true);
        }
    }
}

/// The `id` of a frame that could not be decoded as a request, when it has one.
fn request_id(body: &[u8]) -> Option<u64> {
    let v: serde_cbor::Value = serde_cbor::from_slice(body).ok()?;
    let serde_cbor::Value::Map(m) = v else {
        return None;
    };
    match m.get(&serde_cbor::Value::Text("id".into()))? {
        serde_cbor::Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}
