//! A blocking client of the zygote socket: how a supervisor written in Rust requests children.
//! `zygote start` and `zygote spawn` use it; `docs/PROTOCOL.md` describes the same exchange
//! for clients in other languages.
//!
//! Answers to one request may be preceded by events about earlier ones (`exited`,
//! `child_error`); the client keeps those in order and hands them out with
//! [`ZygoteClient::take_events`] or [`ZygoteClient::next_event`].

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::fdpass;
use crate::protocol::frame::{self, FrameReader, ReadEvent};
use crate::protocol::{ProtocolError, Request, Response, WorkerId, ZygoteStatus};

/// Time allowed for the zygote to answer a request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The fds of a spawn request.
#[derive(Debug)]
pub struct SpawnFds<'a> {
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    pub control: BorrowedFd<'a>,
    pub listeners: Vec<BorrowedFd<'a>>,
}

/// A spawned child as the zygote reported it.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// A connection to a zygote.
#[derive(Debug)]
pub struct ZygoteClient {
    stream: UnixStream,
    reader: FrameReader,
    next_id: u64,
    events: VecDeque<Response>,
    hello: Option<Response>,
}

impl ZygoteClient {
    /// Connects and exchanges `hello`.
    pub fn connect(path: &Path, client: &str) -> Result<Self, ProtocolError> {
        let stream = UnixStream::connect(path)?;
        stream.set_nonblocking(true)?;
        let mut c = Self {
            stream,
            reader: FrameReader::default(),
            next_id: 1,
            events: VecDeque::new(),
            hello: None,
        };
        let id = c.id();
        c.send(&Request::Hello {
            id,
            client: client.to_string(),
        })?;
        let answer = c.answer(id)?;
        match answer {
            Response::Hello { .. } => {
                c.hello = Some(answer);
                Ok(c)
            }
            other => Err(unexpected("hello", &other)),
        }
    }

    /// The zygote's `hello` answer.
    pub fn hello(&self) -> Option<&Response> {
        self.hello.as_ref()
    }

    /// The socket, for registering in an event loop (readable: call [`ZygoteClient::poll`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn send(&mut self, req: &Request) -> Result<(), ProtocolError> {
        let bytes = frame::encode(req)?;
        write_all_nonblocking(&self.stream, &bytes)
    }

    /// Reads frames until the answer to `id`, keeping events about other requests.
    fn answer(&mut self, id: u64) -> Result<Response, ProtocolError> {
        let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            match self.reader.read(&mut &self.stream)? {
                ReadEvent::Frame(body) => {
                    let resp: Response = frame::decode(&body)?;
                    if answer_id(&resp) == Some(id) && !is_event(&resp) {
                        return Ok(resp);
                    }
                    if let Response::Error {
                        id: None,
                        code,
                        message,
                    } = resp
                    {
                        return Err(ProtocolError::Remote { code, message });
                    }
                    self.events.push_back(resp);
                }
                ReadEvent::WouldBlock => {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        return Err(ProtocolError::TimedOut);
                    }
                    frame::wait_readable(self.stream.as_fd(), deadline - now)?;
                }
                ReadEvent::Eof => return Err(ProtocolError::Truncated),
            }
        }
    }

    /// Requests a child. Returns once the zygote answered with its pid and pidfd.
    pub fn spawn(
        &mut self,
        entry: &str,
        worker: WorkerId,
        args: &[String],
        device: Option<u32>,
        fds: &SpawnFds<'_>,
    ) -> Result<Spawned, ProtocolError> {
        self.spawn_as(entry, worker, args, device, false, fds)
    }

    /// [`Self::spawn`], as a warm spare when `spare` is true: the child gets ready, then waits
    /// for `activate` on its control channel before it accepts.
    pub fn spawn_as(
        &mut self,
        entry: &str,
        worker: WorkerId,
        args: &[String],
        device: Option<u32>,
        spare: bool,
        fds: &SpawnFds<'_>,
    ) -> Result<Spawned, ProtocolError> {
        let id = self.id();
        let req = Request::Spawn {
            id,
            entry: entry.to_string(),
            worker,
            args: args.to_vec(),
            listeners: fds.listeners.len() as u32,
            device,
            spare,
        };
        self.send(&req)?;
        let mut all = vec![fds.stdin, fds.stdout, fds.stderr, fds.control];
        all.extend(fds.listeners.iter().copied());
        for fd in all {
            loop {
                match fdpass::send_fd(self.stream.as_fd(), fd) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_writable(&self.stream)?;
                    }
                    other => break other?,
                }
            }
        }
        match self.answer(id)? {
            Response::Spawned { pid, .. } => {
                let pidfd = loop {
                    match fdpass::recv_fd(self.stream.as_fd()) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            frame::wait_readable(self.stream.as_fd(), frame::READ_DEADLINE)?;
                        }
                        other => break other?,
                    }
                };
                Ok(Spawned { pid, pidfd })
            }
            Response::Error { code, message, .. } => Err(ProtocolError::Remote { code, message }),
            other => Err(unexpected("spawned", &other)),
        }
    }

    /// Sends a signal to a child of the zygote.
    pub fn signal(&mut self, pid: i32, signal: i32) -> Result<(), ProtocolError> {
        let id = self.id();
        self.send(&Request::Signal { id, pid, signal })?;
        self.expect_ok(id)
    }

    /// Asks for the zygote's state.
    pub fn status(&mut self) -> Result<ZygoteStatus, ProtocolError> {
        let id = self.id();
        self.send(&Request::Status { id })?;
        match self.answer(id)? {
            Response::Status { status, .. } => Ok(status),
            Response::Error { code, message, .. } => Err(ProtocolError::Remote { code, message }),
            other => Err(unexpected("status", &other)),
        }
    }

    /// Leaves the handles of an exported generation with the zygote.
    pub fn keep_weights(
        &mut self,
        device: u32,
        manifest: &crate::backend::Manifest,
        fds: &[OwnedFd],
    ) -> Result<(), ProtocolError> {
        let id = self.id();
        self.send(&Request::KeepWeights {
            id,
            device,
            manifest: manifest.clone(),
            fds: fds.len() as u32,
        })?;
        for fd in fds {
            loop {
                match fdpass::send_fd(self.stream.as_fd(), fd.as_fd()) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_writable(&self.stream)?
                    }
                    other => break other?,
                }
            }
        }
        self.expect_ok(id)
    }

    /// Fetches what the zygote keeps for `device`: `Ok(None)` when it keeps nothing.
    pub fn fetch_weights(
        &mut self,
        device: u32,
    ) -> Result<Option<(crate::backend::Manifest, Vec<OwnedFd>)>, ProtocolError> {
        let id = self.id();
        self.send(&Request::FetchWeights { id, device })?;
        match self.answer(id)? {
            Response::Weights { manifest, fds, .. } => {
                let mut got = Vec::with_capacity(fds as usize);
                for _ in 0..fds {
                    got.push(loop {
                        match fdpass::recv_fd(self.stream.as_fd()) {
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                frame::wait_readable(self.stream.as_fd(), frame::READ_DEADLINE)?;
                            }
                            other => break other?,
                        }
                    });
                }
                Ok(Some((manifest, got)))
            }
            Response::Error {
                code: crate::protocol::ErrorCode::Unavailable,
                ..
            } => Ok(None),
            Response::Error { code, message, .. } => Err(ProtocolError::Remote { code, message }),
            other => Err(unexpected("weights", &other)),
        }
    }

    /// Asks the zygote to drop every kept generation (the service's own uid only).
    pub fn release_weights(&mut self) -> Result<(), ProtocolError> {
        let id = self.id();
        self.send(&Request::ReleaseWeights { id })?;
        self.expect_ok(id)
    }

    /// Asks the zygote to exit.
    pub fn shutdown(&mut self) -> Result<(), ProtocolError> {
        let id = self.id();
        self.send(&Request::Shutdown { id })?;
        self.expect_ok(id)
    }

    fn expect_ok(&mut self, id: u64) -> Result<(), ProtocolError> {
        match self.answer(id)? {
            Response::Ok { .. } => Ok(()),
            Response::Error { code, message, .. } => Err(ProtocolError::Remote { code, message }),
            other => Err(unexpected("ok", &other)),
        }
    }

    /// Reads whatever events are available now without blocking. `Err(Truncated)` when the
    /// zygote closed the connection.
    pub fn poll(&mut self) -> Result<(), ProtocolError> {
        loop {
            match self.reader.read(&mut &self.stream)? {
                ReadEvent::Frame(body) => self.events.push_back(frame::decode(&body)?),
                ReadEvent::WouldBlock => return Ok(()),
                ReadEvent::Eof => return Err(ProtocolError::Truncated),
            }
        }
    }

    /// Takes the events read so far (`exited`, `child_error`).
    pub fn take_events(&mut self) -> Vec<Response> {
        self.events.drain(..).collect()
    }

    /// Waits for the next event, up to `timeout` (`None`: for ever).
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Response, ProtocolError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            self.poll()?;
            if !self.events.is_empty() {
                continue;
            }
            let wait = match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Err(ProtocolError::TimedOut);
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            match frame::wait_readable(self.stream.as_fd(), wait) {
                Ok(()) | Err(ProtocolError::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn answer_id(r: &Response) -> Option<u64> {
    match r {
        Response::Hello { id, .. }
        | Response::Spawned { id, .. }
        | Response::ChildError { id, .. }
        | Response::Exited { id, .. }
        | Response::Ok { id }
        | Response::Weights { id, .. }
        | Response::Status { id, .. } => Some(*id),
        Response::Error { id, .. } => *id,
    }
}

fn is_event(r: &Response) -> bool {
    matches!(r, Response::Exited { .. } | Response::ChildError { .. })
}

fn unexpected(expected: &'static str, got: &Response) -> ProtocolError {
    ProtocolError::Unexpected {
        expected,
        received: format!("{got:?}"),
    }
}

fn wait_writable(stream: &UnixStream) -> Result<(), ProtocolError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::from(5000u16)) {
        Ok(0) => Err(ProtocolError::TimedOut),
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(ProtocolError::Io(e.into())),
    }
}

/// Writes all of `bytes` to a non-blocking stream, waiting while its buffer is full.
pub fn write_all_nonblocking(
    mut stream: &UnixStream,
    mut bytes: &[u8],
) -> Result<(), ProtocolError> {
    use std::io::Write;
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_writable(stream)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(())
}
