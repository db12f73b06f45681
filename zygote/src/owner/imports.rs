//! The owner socket's import server: every worker's `import` answered without any one of them
//! able to stall the others.
//!
//! The owner's loop polls the listener, its control channel and every open import connection
//! together; each connection is non-blocking and has a deadline ([`IMPORT_DEADLINE`] from its
//! accept to its last fd sent), after which it is dropped. A worker that connects and says
//! nothing, or that stops reading its answer, costs a slot until its deadline, never a wait.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use zygote_runtime::backend::Export;
use zygote_runtime::fdpass;
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{ErrorCode, OwnerRequest, OwnerResponse, WorkerId};

/// How long one import connection may take, from accept to its last fd.
pub const IMPORT_DEADLINE: Duration = frame::READ_DEADLINE;
/// Most import connections served at once; more wait in the listen backlog.
pub const MAX_IMPORTS: usize = 64;

/// What is still to be sent on a connection: frame bytes, then one fd per arena.
#[derive(Debug)]
enum Out {
    Bytes(Vec<u8>, usize),
    /// Index into the export's fds.
    Fd(usize),
}

/// One worker's import connection.
#[derive(Debug)]
struct Import {
    stream: UnixStream,
    reader: FrameReader,
    out: VecDeque<Out>,
    /// Set once the answer is queued: the connection ends when `out` is empty.
    answered: bool,
    /// Set when the answer carries the weights (not an error).
    sends_weights: bool,
    deadline: Instant,
    worker: Option<WorkerId>,
}

/// The open import connections.
#[derive(Debug, Default)]
pub struct Imports {
    conns: Vec<Import>,
    /// Imports answered with the weights, for heartbeats and logs.
    pub served: u64,
}

/// How a connection's turn ended.
enum Turn {
    Open,
    Done,
    Failed(String),
}

impl Imports {
    /// The fds to poll and what to poll them for (`true` = writable), in connection order.
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, bool)> {
        self.conns
            .iter()
            .map(|c| (c.stream.as_fd(), !c.out.is_empty()))
            .collect()
    }

    /// The time left until the nearest deadline.
    pub fn next_deadline(&self, now: Instant) -> Option<Duration> {
        self.conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
    }

    /// Accepts every waiting connection, up to [`MAX_IMPORTS`] open at once.
    pub fn accept(&mut self, listener: &UnixListener) {
        while self.conns.len() < MAX_IMPORTS {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("an import connection could not be made non-blocking: {e}");
                        continue;
                    }
                    self.conns.push(Import {
                        stream,
                        reader: FrameReader::default(),
                        out: VecDeque::new(),
                        answered: false,
                        sends_weights: false,
                        deadline: Instant::now() + IMPORT_DEADLINE,
                        worker: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("accept on the owner socket failed: {e}");
                    return;
                }
            }
        }
    }

    /// Gives every connection whose fd is ready (`ready[i]`, in [`Imports::poll_set`] order)
    /// its turn, and drops those that finished, failed or ran past their deadline.
    pub fn serve(&mut self, ready: &[bool], export: &Export) {
        let now = Instant::now();
        let conns = std::mem::take(&mut self.conns);
        let readiness = ready.iter().copied().chain(std::iter::repeat(false));
        for (mut c, is_ready) in conns.into_iter().zip(readiness) {
            let turn = if is_ready { c.turn(export) } else { Turn::Open };
            let turn = match turn {
                Turn::Open if now >= c.deadline => {
                    Turn::Failed(format!("not finished within {IMPORT_DEADLINE:?}"))
                }
                other => other,
            };
            match turn {
                Turn::Open => self.conns.push(c),
                Turn::Done => {
                    self.served += u64::from(c.sends_weights);
                    match c.worker {
                        Some(w) => log::debug!("weights sent to worker {w}"),
                        None => log::debug!("weights sent to a worker"),
                    }
                }
                Turn::Failed(why) => match c.worker {
                    Some(w) => log::warn!("an import of worker {w} failed: {why}"),
                    None => log::warn!("an import failed: {why}"),
                },
            }
        }
    }
}

impl Import {
    /// Reads what arrived and writes what the socket takes.
    fn turn(&mut self, export: &Export) -> Turn {
        if !self.answered {
            match self.reader.read(&mut self.stream) {
                Ok(ReadEvent::Frame(body)) => {
                    if let Err(why) = self.answer(&body, export) {
                        return Turn::Failed(why);
                    }
                }
                Ok(ReadEvent::WouldBlock) => return Turn::Open,
                Ok(ReadEvent::Eof) => return Turn::Failed("closed before its request".into()),
                Err(e) => return Turn::Failed(e.to_string()),
            }
        }
        match self.flush(export) {
            Ok(true) if self.answered => Turn::Done,
            Ok(_) => Turn::Open,
            Err(e) => Turn::Failed(format!("writing the answer: {e}")),
        }
    }

    /// Queues the answer to one `import`: the manifest and its fds, or an error.
    fn answer(&mut self, body: &[u8], export: &Export) -> Result<(), String> {
        let req: OwnerRequest = frame::decode(body).map_err(|e| e.to_string())?;
        let OwnerRequest::Import {
            id,
            worker,
            model_digest,
        } = req;
        self.worker = Some(worker);
        self.answered = true;
        let resp = if model_digest != export.manifest.model_digest {
            let message = format!(
                "worker model {model_digest} is not the owner's model {}",
                export.manifest.model_digest
            );
            log::warn!("worker {worker}: {message}");
            OwnerResponse::Error {
                id: Some(id),
                code: ErrorCode::Unavailable,
                message,
            }
        } else {
            OwnerResponse::Manifest {
                id,
                manifest: export.manifest.clone(),
                fds: export.fds.len() as u32,
            }
        };
        let sends_fds = matches!(resp, OwnerResponse::Manifest { .. });
        self.sends_weights = sends_fds;
        let bytes = frame::encode(&resp).map_err(|e| e.to_string())?;
        self.out.push_back(Out::Bytes(bytes, 0));
        if sends_fds {
            self.out.extend((0..export.fds.len()).map(Out::Fd));
        }
        Ok(())
    }

    /// Writes what the socket takes; `true` once everything queued went out.
    fn flush(&mut self, export: &Export) -> io::Result<bool> {
        while let Some(item) = self.out.front_mut() {
            let done = match item {
                Out::Bytes(bytes, off) => match self.stream.write(&bytes[*off..]) {
                    Ok(n) => {
                        *off += n;
                        *off == bytes.len()
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                    Err(e) => return Err(e),
                },
                Out::Fd(i) => match fdpass::send_fd(self.stream.as_fd(), export.fds[*i].as_fd()) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                },
            };
            if done {
                self.out.pop_front();
            }
        }
        Ok(true)
    }
}
