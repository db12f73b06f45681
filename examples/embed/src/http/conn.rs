//! One client connection: the bytes received and not yet handled, the answers not yet written,
//! and its timeouts. [`Conn::drive`] makes all the progress possible without blocking, up to the
//! next complete request, which waits in `pending` until it is handed to the service, and
//! then, while the service computes it, under its id in `submitted`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::parse::{parse, Head, Parsed};
use super::{Limits, Request, Response};

/// Bytes read from a socket at once.
const READ_CHUNK: usize = 16 * 1024;
/// Time a closing connection's unread input is still read and discarded, so that the client
/// sees the final answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// One client connection.
#[derive(Debug)]
pub(super) struct Conn {
    stream: TcpStream,
    /// Bytes received and not yet handled.
    buf: Vec<u8>,
    /// Bytes of answers not yet written, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Requests answered on this connection.
    answered: u64,
    /// Close once `out` is written.
    close_after_write: bool,
    /// Output is shut; reading and discarding until EOF or this instant.
    linger_until: Option<Instant>,
    lingered: usize,
    /// The peer shut its side.
    peer_closed: bool,
    /// The current request's first byte arrived then (None: no partial request).
    request_started: Option<Instant>,
    /// A complete request at the start of `buf`, waiting for the service.
    pending: Option<Head>,
    /// The pending request was handed to the service, which answers it later under this id.
    submitted: Option<u64>,
    /// Last time bytes moved either way (or the connection opened).
    last_activity: Instant,
    continue_sent: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    Open,
    Close,
}

impl Conn {
    pub(super) fn new(stream: TcpStream, now: Instant) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            answered: 0,
            close_after_write: false,
            linger_until: None,
            lingered: 0,
            peer_closed: false,
            request_started: None,
            pending: None,
            submitted: None,
            last_activity: now,
            continue_sent: false,
        }
    }

    /// A complete request waits to be handed to the service.
    pub(super) fn has_request(&self) -> bool {
        self.pending.is_some() && self.submitted.is_none()
    }

    /// The id under which the service computes this connection's request, if it does.
    pub(super) fn submitted(&self) -> Option<u64> {
        self.submitted
    }

    /// The pending request was handed to the service under `id`, which answers it later.
    pub(super) fn mark_submitted(&mut self, id: u64) {
        self.submitted = self.pending.is_some().then_some(id);
    }

    /// An answer is (partly) unwritten.
    pub(super) fn is_writing(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Requests answered on this connection so far.
    pub(super) fn answered(&self) -> u64 {
        self.answered
    }

    /// Its answer is out, it stays open, and no next request has arrived: a keep-alive client
    /// that is likely to send the next one within moments.
    pub(super) fn awaits_next_request(&self) -> bool {
        self.pending.is_none() && !self.close_after_write && !self.peer_closed && !self.is_writing()
    }

    pub(super) fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// When the current request's first byte arrived (None: no request under way).
    pub(super) fn request_started(&self) -> Option<Instant> {
        self.request_started
    }

    /// Nothing received, nothing to write.
    pub(super) fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.out_pos >= self.out.len() && self.linger_until.is_none()
    }

    /// Queues a final answer (the connection closes after it).
    pub(super) fn fail(&mut self, resp: &Response) {
        self.buf.clear();
        self.request_started = None;
        resp.write_to(&mut self.out, true, false);
        self.close_after_write = true;
    }

    /// Makes all the progress possible without blocking: writes pending output, reads, parses,
    /// up to the next complete request (left in `pending` for the service). Edge-triggered
    /// polling needs exactly this: the connection is only woken again after a read or write
    /// hit `WouldBlock`.
    pub(super) fn drive(&mut self, limits: &Limits) -> ConnState {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            let now = Instant::now();
            while self.out_pos < self.out.len() {
                match self.stream.write(&self.out[self.out_pos..]) {
                    Ok(0) => return ConnState::Close,
                    Ok(n) => {
                        self.out_pos += n;
                        self.last_activity = now;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ConnState::Open,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return ConnState::Close,
                }
            }
            self.out.clear();
            self.out_pos = 0;

            if self.linger_until.is_some() {
                // Discard what the client still sends until it closes.
                loop {
                    match self.stream.read(&mut chunk) {
                        Ok(0) => return ConnState::Close,
                        Ok(n) => {
                            self.lingered += n;
                            if self.lingered > LINGER_BYTES {
                                return ConnState::Close;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ConnState::Open,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return ConnState::Close,
                    }
                }
            }
            if self.close_after_write {
                // Shut our side and linger, so that unread input does not turn into a reset
                // that destroys the answer before the client reads it.
                if self.peer_closed || self.stream.shutdown(Shutdown::Write).is_err() {
                    return ConnState::Close;
                }
                self.buf = Vec::new();
                self.linger_until = Some(now + LINGER);
                continue;
            }
            if self.pending.is_some() {
                return ConnState::Open;
            }

            if !self.buf.is_empty() {
                match parse(&self.buf, limits) {
                    Parsed::Complete(head) => {
                        self.pending = Some(head);
                        return ConnState::Open;
                    }
                    Parsed::Reject {
                        status,
                        code,
                        message,
                    } => {
                        self.fail(&Response::error(status, code, &message, None));
                        continue;
                    }
                    Parsed::Incomplete { expect_continue } => {
                        if expect_continue && !self.continue_sent {
                            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                            self.continue_sent = true;
                            continue;
                        }
                    }
                }
            }
            if self.peer_closed {
                // Whatever is left is an incomplete request that can never complete.
                return ConnState::Close;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => self.peer_closed = true,
                Ok(n) => {
                    if self.buf.is_empty() {
                        self.request_started = Some(now);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.last_activity = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ConnState::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ConnState::Close,
            }
        }
    }

    /// The pending request (not yet handed to the service), borrowed from the buffer.
    pub(super) fn request(&self, id: u64) -> Option<Request<'_>> {
        let head = self.pending.as_ref().filter(|_| self.submitted.is_none())?;
        Some(Request {
            id,
            method: &head.method,
            path: &head.path,
            body: &self.buf[head.head_len..head.head_len + head.body_len],
        })
    }

    /// Queues the answer to the pending request and drops the request's bytes.
    pub(super) fn answer(&mut self, resp: &Response, draining: bool) {
        let Some(head) = self.pending.take() else {
            return;
        };
        self.submitted = None;
        let close = !head.keep_alive || draining;
        resp.write_to(&mut self.out, close, head.method == "HEAD");
        self.answered += 1;
        self.buf.drain(..head.head_len + head.body_len);
        self.request_started = (!self.buf.is_empty()).then(Instant::now);
        self.continue_sent = false;
        self.close_after_write = close;
    }

    /// Applies the timeouts; returns whether to close now.
    pub(super) fn expired(
        &mut self,
        now: Instant,
        limits: &Limits,
        draining_since: Option<Instant>,
    ) -> bool {
        if let Some(until) = self.linger_until {
            return now >= until;
        }
        if self.out_pos < self.out.len() {
            return now.duration_since(self.last_activity) >= limits.write_timeout;
        }
        if self.pending.is_some() {
            // Arrived whole; the service has it. Its computation has no deadline here (the
            // service bounds it by its budgets), and the client waits for the answer.
            return false;
        }
        if let Some(started) = self.request_started {
            if now.duration_since(started) >= limits.request_timeout {
                let msg = format!(
                    "the request did not arrive completely within {:?}",
                    limits.request_timeout
                );
                self.fail(&Response::error(408, "request_timeout", &msg, None));
            }
            return false;
        }
        if self.is_idle() {
            if let Some(since) = draining_since {
                // An idle connection, keep-alive or accepted from the queue with nothing sent
                // yet, gets a short grace for its next request, answered with
                // `Connection: close`: closing it at once would reset a request sent just as
                // the drain began (the loop clients of a roll do that every time).
                return now.duration_since(since) >= limits.drain_grace;
            }
            return now.duration_since(self.last_activity) >= limits.idle_timeout;
        }
        false
    }
}
