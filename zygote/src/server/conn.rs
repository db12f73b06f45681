//! One client connection of the zygote socket: its stream, the frame being read, the fds a
//! request announced and has not finished sending, and the answers waiting to be written.
//!
//! Nothing here decides what a request means ([`super::requests`] does); a connection only
//! moves bytes and fds in the documented order and says when it can no longer be trusted to be
//! in step.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use mio::net::UnixStream;
use zygote_runtime::backend::Manifest;
use zygote_runtime::fdpass;
use zygote_runtime::protocol::frame::{self, FrameReader};
use zygote_runtime::protocol::{Response, WorkerId};

use super::trust::Peer;

/// Answers a connection may have queued before the zygote stops reading its requests: a peer
/// that sends requests and never reads the answers holds at most this much (plus one answer)
/// of the zygote's memory.
pub const MAX_QUEUED_OUTPUT: usize = frame::MAX_FRAME;

/// Something queued for the peer: frame bytes (and how much of them went out), or one fd.
#[derive(Debug)]
pub(super) enum Out {
    Bytes(Vec<u8>, usize),
    Fd(OwnedFd),
}

/// What a request that is still receiving its fds will do with them.
#[derive(Debug)]
pub(super) enum Awaiting {
    /// A spawn: stdin, stdout, stderr, the control channel, then the listeners.
    Spawn {
        entry: String,
        worker: WorkerId,
        args: Vec<String>,
        listeners: u32,
        device: Option<u32>,
        spare: bool,
    },
    /// `keep_weights`: one fd per arena of `manifest`, kept for `device`.
    Keep { device: u32, manifest: Manifest },
    /// A spawn whose frame was refused: its fds are read and closed, so the stream stays in
    /// step for the next frame.
    Discard,
}

/// A request whose frame has arrived and whose fds are arriving.
#[derive(Debug)]
pub(super) struct Pending {
    pub id: u64,
    /// Fds announced.
    pub need: usize,
    pub what: Awaiting,
    pub fds: Vec<OwnedFd>,
    pub since: Instant,
}

impl Pending {
    pub fn new(id: u64, need: usize, what: Awaiting) -> Self {
        Self {
            id,
            need,
            what,
            fds: Vec::with_capacity(need),
            since: Instant::now(),
        }
    }
}

/// How receiving a pending request's fds went.
#[derive(Debug)]
pub(super) enum FdProgress {
    /// Every fd arrived: the request can run.
    Complete(Box<Pending>),
    /// Not all yet; the rest come with a later readable event.
    WouldBlock,
    /// The stream is out of step: the request's id and what went wrong.
    Failed(u64, String),
}

/// One accepted connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub stream: UnixStream,
    pub reader: FrameReader,
    pub pending: Option<Pending>,
    out: VecDeque<Out>,
    /// Bytes of frames in `out` not written yet.
    out_bytes: usize,
    /// In line for a read turn.
    pub scheduled: bool,
    /// Not read because its answers are not read (see [`MAX_QUEUED_OUTPUT`]).
    pub paused: bool,
    /// Set when the stream can no longer be trusted: the connection closes once `out` is sent.
    pub closing: bool,
    /// Who connected, from `SO_PEERCRED` at accept.
    pub peer: Peer,
}

impl Conn {
    pub fn new(stream: UnixStream, peer: Peer) -> Self {
        Self {
            stream,
            reader: FrameReader::default(),
            pending: None,
            out: VecDeque::new(),
            out_bytes: 0,
            scheduled: false,
            paused: false,
            closing: false,
            peer,
        }
    }

    /// Queues an answer (written by [`Conn::flush`]).
    pub fn queue(&mut self, resp: &Response) {
        match frame::encode(resp) {
            Ok(bytes) => {
                self.out_bytes += bytes.len();
                self.out.push_back(Out::Bytes(bytes, 0));
            }
            Err(e) => log::error!("encoding an answer failed: {e}"),
        }
    }

    /// Queues fds to follow the answer queued before them, one per `SCM_RIGHTS` message.
    pub fn queue_fds(&mut self, fds: impl IntoIterator<Item = OwnedFd>) {
        self.out.extend(fds.into_iter().map(Out::Fd));
    }

    /// Whether the answers waiting to be written reached [`MAX_QUEUED_OUTPUT`].
    pub fn output_full(&self) -> bool {
        self.out_bytes >= MAX_QUEUED_OUTPUT
    }

    /// Whether answers are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Receives the fds the pending request announced, as far as they have arrived.
    pub fn receive_fds(&mut self) -> FdProgress {
        let Some(p) = self.pending.as_mut() else {
            return FdProgress::WouldBlock;
        };
        while p.fds.len() < p.need {
            match fdpass::recv_fd(self.stream.as_fd()) {
                Ok(fd) => p.fds.push(fd),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return FdProgress::WouldBlock,
                Err(e) => {
                    let msg = format!(
                        "request {} announced {} fds, fd {} did not arrive: {e}",
                        p.id,
                        p.need,
                        p.fds.len() + 1
                    );
                    return FdProgress::Failed(p.id, msg);
                }
            }
        }
        match self.pending.take() {
            Some(p) => FdProgress::Complete(Box::new(p)),
            None => FdProgress::WouldBlock,
        }
    }

    /// Writes what the socket takes now. A write error drops the rest and marks the
    /// connection closing: the peer is gone or broken.
    pub fn flush(&mut self) {
        while let Some(item) = self.out.front_mut() {
            let done = match item {
                Out::Bytes(bytes, off) => match self.stream.write(&bytes[*off..]) {
                    Ok(n) => {
                        *off += n;
                        self.out_bytes -= n;
                        *off == bytes.len()
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                    Err(_) => {
                        self.out.clear();
                        self.out_bytes = 0;
                        self.closing = true;
                        break;
                    }
                },
                Out::Fd(fd) => match fdpass::send_fd(self.stream.as_fd(), fd.as_fd()) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.out.clear();
                        self.out_bytes = 0;
                        self.closing = true;
                        break;
                    }
                },
            };
            if done {
                self.out.pop_front();
            }
        }
    }
}
