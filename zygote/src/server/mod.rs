//! The zygote's event loop: one thread, one mio `Poll`, the zygote socket, its connections,
//! and one pidfd and one status pipe per live child.
//!
//! A connection is checked with `SO_PEERCRED` when accepted, then reads frames
//! ([`zygote_runtime::protocol::frame`]) and the fds that follow a `spawn`. Every bad frame
//! gets an `error` answer; the connection closes only when the stream can no longer be trusted
//! to be in step (oversized, truncated, timed out, wrong fd count), and never affects other
//! connections. When a child exits, its pidfd becomes readable; the zygote reaps it and sends
//! `exited` to the connection that asked for it.
//!
//! | module | holds |
//! |---|---|
//! | this one | the loop: accepting, reading, writing, deadlines, shutting down |
//! | [`conn`] | one connection: frame reader, fds being received, answers being written |
//! | [`requests`] | what each request does |
//! | [`children`] | the live children, their pidfds and status pipes, their exits |
//! | [`kept`] | the weights kept per device (`keep_weights`, `fetch_weights`) |
//! | [`trust`] | who may connect and who may make which request (decisions only) |

mod children;
mod conn;
mod kept;
mod requests;
pub mod trust;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::UnixListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use zygote_runtime::model::Model;
use zygote_runtime::protocol::frame::{self, ReadEvent};
use zygote_runtime::protocol::{ErrorCode, Limits, ProtocolError, Response};
use zygote_runtime::rundir::{RunDirError, SocketClaim, ZYGOTE_SOCKET};

use children::{Children, StatusRead};
use conn::{Conn, FdProgress};
use kept::KeptWeights;

use crate::entries::EntryTable;
use crate::fork::ForkHook;

/// Most listeners one spawn may pass.
pub const MAX_LISTENERS: u32 = 16;
/// Most arguments in one spawn, and the longest argument.
pub const MAX_ARGS: u32 = 64;
pub const MAX_ARG_LEN: u32 = 4096;
pub use trust::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_UID, SERVICE_RESERVED_CONNECTIONS};
/// Most live children.
pub const MAX_CHILDREN: u32 = 1024;
/// Most fds one `keep_weights` may carry (one per arena).
pub const MAX_KEPT_FDS: u32 = 64;

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
    /// The socket's name in `runtime_dir` ([`ZYGOTE_SOCKET`] for the zygote).
    pub socket_name: String,
    /// The fork of every spawn, when this server is hosted in a process that forks its own way
    /// (the Python app template); `None`: the zygote's raw, single-threaded fork.
    pub fork: Option<ForkHook>,
    /// Called at every turn of the loop (at least every 250 ms); `false` shuts the server
    /// down. A hosted server heartbeats and watches its own control channel here.
    pub tick: Option<fn() -> bool>,
}

impl ServerConfig {
    /// The zygote's own configuration: its socket, the raw fork, no tick.
    pub fn zygote(
        runtime_dir: PathBuf,
        model: Model,
        entries: EntryTable,
        allow_uids: Vec<u32>,
        backend: String,
    ) -> Self {
        Self {
            runtime_dir,
            model,
            entries,
            allow_uids,
            backend,
            on_ready: None,
            socket_name: ZYGOTE_SOCKET.to_string(),
            fork: None,
            tick: None,
        }
    }
}

/// Errors that stop the zygote.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    RuntimeDir(#[from] RunDirError),
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("event loop: {0}")]
    Poll(io::Error),
}

/// What a registered token stands for.
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
    children: Children,
    /// Exported handles kept per device (see `keep_weights`).
    kept: KeptWeights,
    tokens: HashMap<Token, Slot>,
    /// Connections in line for a read turn (see `read_round`).
    runnable: VecDeque<Token>,
    next_token: usize,
    shutting_down: bool,
    uid: u32,
}

/// Runs the zygote until a `shutdown` request. Returns the exit code.
pub fn run(cfg: ServerConfig) -> Result<i32, ServerError> {
    zygote_runtime::rundir::prepare(&cfg.runtime_dir)?;
    // Same uid only: a 0700 directory and a 0600 socket. With --allow-uid, other users must be
    // able to reach the socket at all, so the directory becomes 0711 (enter, not list) and the
    // socket 0666, and the SO_PEERCRED check on every connection is what admits or refuses.
    let (dir_mode, socket_mode) = if cfg.allow_uids.is_empty() {
        (0o700, 0o600)
    } else {
        log::info!(
            "admitting uids {:?} besides our own: runtime directory 0711, socket 0666, peers checked by SO_PEERCRED",
            cfg.allow_uids
        );
        (0o711, 0o666)
    };
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|source| {
            ServerError::Bind {
                path: p.to_path_buf(),
                source,
            }
        })
    };
    // The claim (a lock beside the socket) keeps a second zygote in this directory from
    // rebinding the socket under a live one; it is held until `run` returns.
    let (claim, listener) = SocketClaim::bind(&cfg.runtime_dir, &cfg.socket_name, socket_mode)?;
    let path = claim.path().to_path_buf();
    chmod(&cfg.runtime_dir, dir_mode)?;
    let bind_err = |source| ServerError::Bind {
        path: path.clone(),
        source,
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let mut listener = UnixListener::from_std(listener);
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
        children: Children::default(),
        kept: KeptWeights::default(),
        tokens: HashMap::new(),
        runnable: VecDeque::new(),
        next_token: FIRST_DYNAMIC,
        shutting_down: false,
        uid: nix::unistd::getuid().as_raw(),
    };
    server.serve()?;
    drop(claim);
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
        max_connections_per_uid: MAX_CONNECTIONS_PER_UID,
        service_reserved_connections: SERVICE_RESERVED_CONNECTIONS,
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
            if self.shutting_down && self.conns.values().all(|c| !c.has_output()) {
                log::info!(
                    "shutting down; {} children keep running under their requesters",
                    self.children.len()
                );
                return Ok(());
            }
            // Connections in line for a read turn: look for new events without waiting.
            let wait = if self.runnable.is_empty() {
                Duration::from_millis(250)
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(wait)) {
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
            self.read_round();
            self.check_deadlines();
            if let Some(tick) = self.cfg.tick {
                if !self.shutting_down && !tick() {
                    log::info!("told to stop by its host");
                    self.shutting_down = true;
                }
            }
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
            let (uid, pid) = match cred {
                Ok(c) => (c.uid(), c.pid()),
                Err(e) => {
                    log::warn!("SO_PEERCRED failed, refusing the connection: {e}");
                    continue;
                }
            };
            let standing = match trust::admit(uid, self.uid, &self.cfg.allow_uids, self.open(uid)) {
                Ok(s) => s,
                Err(refusal) => {
                    let code = match refusal {
                        trust::Refusal::NotAllowed { .. } => ErrorCode::NotAllowed,
                        _ => ErrorCode::Limit,
                    };
                    log::warn!("refused a connection from uid {uid} (pid {pid}): {refusal}");
                    let message = refusal.to_string();
                    if let Ok(bytes) = frame::encode(&Response::Error {
                        id: None,
                        code,
                        message,
                    }) {
                        let _ = stream.write(&bytes);
                    }
                    continue;
                }
            };
            let t = self.token();
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, t, Interest::READABLE)
            {
                log::warn!("registering a connection failed: {e}");
                continue;
            }
            log::debug!("connection {} from uid {uid} (pid {pid})", t.0);
            self.tokens.insert(t, Slot::Conn);
            let peer = trust::Peer { uid, pid, standing };
            self.conns.insert(t, Conn::new(stream, peer));
        }
    }

    /// The connections open now, as [`trust::admit`] counts them for a peer of `uid`.
    fn open(&self, uid: u32) -> trust::Open {
        let mut open = trust::Open::default();
        for c in self.conns.values() {
            open.total += 1;
            open.others += u32::from(c.peer.uid != self.uid);
            open.this_uid += u32::from(c.peer.uid == uid);
        }
        open
    }

    fn on_conn(&mut self, t: Token, readable: bool, writable: bool) {
        if readable {
            self.schedule(t);
        }
        if writable {
            self.flush(t);
        }
    }

    /// Puts `t` in line for a read turn (once).
    fn schedule(&mut self, t: Token) {
        if let Some(conn) = self.conns.get_mut(&t) {
            if !conn.scheduled {
                conn.scheduled = true;
                self.runnable.push_back(t);
            }
        }
    }

    /// One round of read turns: every connection in line reads at most one request, and those
    /// that may have more go back in line behind the others. So a client that pipelines large
    /// frames gets one turn per round like everyone else.
    fn read_round(&mut self) {
        for _ in 0..self.runnable.len() {
            let Some(t) = self.runnable.pop_front() else {
                return;
            };
            if let Some(conn) = self.conns.get_mut(&t) {
                conn.scheduled = false;
            }
            if self.read_turn(t) {
                self.schedule(t);
            }
        }
    }

    /// Reads and runs at most one request of `t`; `true` when more may be waiting.
    fn read_turn(&mut self, t: Token) -> bool {
        let Some(conn) = self.conns.get_mut(&t) else {
            return false;
        };
        if conn.closing {
            return false;
        }
        if conn.output_full() {
            // Its answers are not being read: read no more requests until they are. `flush`
            // puts it back in line once the queue is below the cap.
            if !conn.paused {
                log::debug!("connection {}: answers unread, reading paused", t.0);
            }
            conn.paused = true;
            return false;
        }
        if conn.pending.is_some() {
            return match conn.receive_fds() {
                FdProgress::Complete(p) => {
                    self.on_fds_complete(t, *p);
                    true
                }
                FdProgress::WouldBlock => false,
                FdProgress::Failed(id, msg) => {
                    self.fail(t, Some(id), ErrorCode::BadFdCount, msg, true);
                    false
                }
            };
        }
        match conn.reader.read(&mut conn.stream) {
            Ok(ReadEvent::Frame(body)) => {
                self.on_frame(t, &body);
                true
            }
            Ok(ReadEvent::WouldBlock) => false,
            Ok(ReadEvent::Eof) => {
                self.close(t);
                false
            }
            Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.close(t);
                false
            }
            Err(e) => {
                let code = frame::error_code(&e);
                self.fail(t, None, code, e.to_string(), true);
                false
            }
        }
    }

    fn on_status(&mut self, pid: Pid) {
        let Some(child) = self.children.get_mut(pid) else {
            return;
        };
        if child.status.is_none() {
            // Read to its end already (and reported, if it held a failure).
            return;
        }
        if child.read_status() == StatusRead::Open {
            return;
        }
        // End of file: the entry started (no data) or setup failed (data).
        if let (Some(fd), Some(tok)) = (child.status.take(), child.status_token.take()) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
            self.tokens.remove(&tok);
        }
        if let Some(resp) = child.setup_failure(pid) {
            let conn = child.conn;
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
        let Some(child) = self.children.remove(pid) else {
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
        let resp = child.exited(pid, status);
        if self.conns.contains_key(&child.conn) {
            self.send(child.conn, &resp);
        } else if let Response::Exited { status, .. } = resp {
            log::info!(
                "the requester of pid {pid} is gone; its exit status {status} is only logged"
            );
        }
    }

    fn send(&mut self, t: Token, resp: &Response) {
        self.send_with_fds(t, resp, []);
    }

    /// Queues an answer and the fds that follow it, and writes what the socket takes.
    fn send_with_fds(&mut self, t: Token, resp: &Response, fds: impl IntoIterator<Item = OwnedFd>) {
        let Some(conn) = self.conns.get_mut(&t) else {
            return;
        };
        conn.queue(resp);
        conn.queue_fds(fds);
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
        conn.flush();
        let resume = conn.paused && !conn.output_full();
        if resume {
            conn.paused = false;
        }
        let interest = if conn.has_output() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let _ = self
            .poll
            .registry()
            .reregister(&mut conn.stream, t, interest);
        if conn.closing && !conn.has_output() {
            self.close(t);
        } else if resume {
            // Requests may be waiting in the socket since reading paused; edge-triggered
            // readiness will not say so again.
            self.schedule(t);
        }
    }

    fn close(&mut self, t: Token) {
        if let Some(mut conn) = self.conns.remove(&t) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            log::debug!("connection {} (uid {}) closed", t.0, conn.peer.uid);
        }
        self.tokens.remove(&t);
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let mut late = Vec::new();
        for (t, c) in &self.conns {
            if c.paused {
                // Not read because its answers are not read: not late on its part.
                continue;
            }
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
    let zygote_runtime::protocol::strict::StrictValue(v) = serde_cbor::from_slice(body).ok()?;
    let serde_cbor::Value::Map(m) = v else {
        return None;
    };
    match m.get(&serde_cbor::Value::Text("id".into()))? {
        serde_cbor::Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}
