//! The worker's HTTP/1.1 server: one thread, one mio event loop over the shared listeners, the
//! open connections and the control channel to the supervisor.
//!
//! Every worker of a service polls the same listening sockets (the supervisor bound them and
//! passed them to each worker). The sockets are non-blocking, so when several workers wake for
//! one connection, one `accept` wins and the others get `WouldBlock`.
//!
//! A worker accepts at most one connection per listener in each turn of its loop. Clients such
//! as load balancers and benchmarks open many keep-alive connections at once and keep them;
//! were the first worker awake to take the whole burst, it would serve them all on one core
//! while the other workers idled. Taking one at a time lets the idle workers, whose turns are
//! short, take their share while a busy one computes.
//!
//! A request is handled when all of it has arrived; the [`Service`] computes the answer in the
//! loop's thread (one worker is one core's worth of compute). Each turn of the loop first
//! collects what arrived on every connection, then hands every complete request to the service
//! in one batch: requests that arrived on several connections while the previous batch was
//! computed are computed together, which is how a worker under load makes its matrix products
//! wide without making anyone wait on purpose, and no connection waits more than one batch
//! behind another.
//! Keep-alive and pipelining are supported; a connection handles one request at a time and
//! reads the next only after the previous answer is written, so its buffers stay bounded. Everything has a limit ([`Limits`]):
//! header bytes, body bytes, connections, and the time a request may take to arrive (slowloris),
//! an idle keep-alive connection may stay, and an answer may take to be read.
//!
//! The loop also keeps the worker's side of the control channel ([`Control`]): a heartbeat every
//! second, and the drain: on [`ParentMessage::Drain`] it reports `draining`, accepts every
//! connection still queued on the listeners, lets go of the listeners, finishes every request
//! received or arriving on an open connection (answering with `Connection: close`), closes idle
//! keep-alive connections, and returns once nothing is left, or at the drain's deadline.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use zygote_runtime::protocol::{Latency, ParentMessage};
use zygote_runtime::WorkerError;

/// Limits of the HTTP side, per worker.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request line and headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Request body, in bytes (413 beyond).
    pub max_body: usize,
    /// Open connections; beyond, this worker stops accepting and leaves new connections to
    /// the other workers.
    pub max_connections: usize,
    /// Time from a request's first byte to its last (408 beyond).
    pub request_timeout: Duration,
    /// Time an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// Time an answer may stay unread (without any progress) before the connection is dropped.
    pub write_timeout: Duration,
    /// While draining: time a connection that has not sent a byte yet is waited for.
    pub drain_grace: Duration,
    /// Interval of heartbeats to the supervisor.
    pub heartbeat: Duration,
    /// Longest a waiting request is held back so that the connections answered in the batch
    /// just finished can send their next request and join it (zero: never). Only applies
    /// while a request is waiting and such a connection has not sent yet, so a lone client is
    /// never held; under load, it turns alternating batches of one into batches of several,
    /// which cost much less per text.
    pub batch_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_body: 1024 * 1024,
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(1),
            heartbeat: Duration::from_secs(1),
            batch_wait: Duration::from_millis(1),
        }
    }
}

/// Most header lines in a request (431 beyond).
pub const MAX_HEADERS: usize = 64;
/// Bytes read from a socket at once.
const READ_CHUNK: usize = 16 * 1024;
/// Time a closing connection's unread input is still read and discarded, so that the client
/// sees the final answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 4 * 1024 * 1024;
/// How often connections are checked against their timeouts.
const SWEEP: Duration = Duration::from_millis(250);

/// One request, complete.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    pub body: &'a [u8],
}

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
            allow: None,
        }
    }

    /// The error shape of every 4xx/5xx answer, OpenAI's:
    /// `{"error": {"message", "type", "code", "param"}}`.
    pub fn error(status: u16, code: &str, message: &str, param: Option<&str>) -> Self {
        let kind = if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = serde_json::json!({
            "error": { "message": message, "type": kind, "code": code, "param": param }
        });
        Self::json(status, body.to_string().into_bytes())
    }

    /// Serialises the answer (status line, headers, body unless `head_only`). Every answer
    /// names the worker process that made it (`X-Worker-Pid`), so a client or a benchmark can
    /// see how load spreads and when a restarted worker answers first.
    fn write_to(&self, out: &mut Vec<u8>, close: bool, head_only: bool) {
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\
             X-Worker-Pid: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if close { "close" } else { "keep-alive" },
            std::process::id()
        );
        if let Some(allow) = self.allow {
            let _ = write!(out, "Allow: {allow}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// What answers requests.
pub trait Service {
    /// Answers complete requests, one answer per request, in order. `draining` is true once the
    /// worker drains (`/readyz` then answers 503). Must not panic on any input.
    fn handle_batch(&mut self, reqs: &[Request<'_>], draining: bool) -> Vec<Response>;
}

/// The worker's side of the control channel (implemented by [`zygote_runtime::Worker`]).
pub trait Control {
    /// The fd to poll for control messages, if there is a channel.
    fn fd(&self) -> Option<RawFd>;
    /// Reads one pending message, without blocking.
    fn poll(&mut self) -> Result<Option<ParentMessage>, WorkerError>;
    /// Says the worker is alive: requests answered so far, and how long they took.
    fn heartbeat(&mut self, served: u64, latency: &Latency) -> Result<(), WorkerError>;
    fn draining(&mut self, in_flight: u32) -> Result<(), WorkerError>;
}

impl Control for zygote_runtime::Worker {
    fn fd(&self) -> Option<RawFd> {
        Some(self.control_fd().as_raw_fd())
    }
    fn poll(&mut self) -> Result<Option<ParentMessage>, WorkerError> {
        self.poll_control()
    }
    fn heartbeat(&mut self, served: u64, latency: &Latency) -> Result<(), WorkerError> {
        zygote_runtime::Worker::heartbeat_with_latency(self, served, latency)
    }
    fn draining(&mut self, in_flight: u32) -> Result<(), WorkerError> {
        zygote_runtime::Worker::draining(self, in_flight)
    }
}

/// How the loop ended.
#[derive(Debug)]
pub enum Exit {
    /// Drained: every accepted request was answered.
    Drained { served: u64 },
    /// The drain's deadline passed with connections still busy; they were dropped.
    DrainTimedOut { abandoned: usize },
    /// The control channel closed: the supervisor is gone.
    Orphaned,
    /// The control channel failed (a message this worker cannot read).
    Control(WorkerError),
}

/// The parsed head of a complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub keep_alive: bool,
    pub head_len: usize,
    pub body_len: usize,
}

/// What the bytes received so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet. `expect_continue`: the head is complete, its body is still to
    /// come, and the client waits for `100 Continue` before sending it.
    Incomplete {
        expect_continue: bool,
    },
    Complete(Head),
    /// Not a request this server takes: answer and close.
    Reject {
        status: u16,
        code: &'static str,
        message: String,
    },
}

fn reject(status: u16, code: &'static str, message: impl Into<String>) -> Parsed {
    Parsed::Reject {
        status,
        code,
        message: message.into(),
    }
}

/// Parses the start of `buf` as an HTTP/1.x request, within `limits`. Never panics.
pub fn parse(buf: &[u8], limits: &Limits) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_header_bytes {
                return reject(
                    431,
                    "headers_too_large",
                    format!("request headers exceed {} bytes", limits.max_header_bytes),
                );
            }
            return Parsed::Incomplete {
                expect_continue: false,
            };
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return reject(
                431,
                "headers_too_large",
                format!("more than {MAX_HEADERS} header lines"),
            )
        }
        Err(httparse::Error::Version) => {
            return reject(505, "http_version", "only HTTP/1.0 and HTTP/1.1 are served")
        }
        Err(e) => {
            return reject(
                400,
                "malformed_request",
                format!("malformed HTTP request: {e}"),
            )
        }
    };
    if head_len > limits.max_header_bytes {
        return reject(
            431,
            "headers_too_large",
            format!("request headers exceed {} bytes", limits.max_header_bytes),
        );
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return reject(400, "malformed_request", "malformed HTTP request line");
    };
    let mut content_length: Option<usize> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let Ok(n) = value.parse::<usize>() else {
                return reject(
                    400,
                    "malformed_request",
                    format!("invalid Content-Length {value:?}"),
                );
            };
            if content_length.is_some_and(|m| m != n) {
                return reject(
                    400,
                    "malformed_request",
                    "conflicting Content-Length headers",
                );
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return reject(
                501,
                "chunked_not_supported",
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return reject(
                    417,
                    "expectation_failed",
                    format!("unsupported Expect: {value:?}"),
                );
            }
            expect_continue = true;
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > limits.max_body {
        return reject(
            413,
            "body_too_large",
            format!(
                "request body of {body_len} bytes exceeds the limit of {} bytes",
                limits.max_body
            ),
        );
    }
    if buf.len() - head_len < body_len {
        return Parsed::Incomplete { expect_continue };
    }
    let keep_alive = if version == 1 {
        !close
    } else {
        keep_alive && !close
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Parsed::Complete(Head {
        method: method.to_string(),
        path: path.to_string(),
        keep_alive,
        head_len,
        body_len,
    })
}

/// One client connection.
#[derive(Debug)]
struct Conn {
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
    /// Last time bytes moved either way (or the connection opened).
    last_activity: Instant,
    continue_sent: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum ConnState {
    Open,
    Close,
}

impl Conn {
    fn new(stream: TcpStream, now: Instant) -> Self {
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
            last_activity: now,
            continue_sent: false,
        }
    }

    /// Nothing received, nothing to write.
    fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.out_pos >= self.out.len() && self.linger_until.is_none()
    }

    /// Queues a final answer (the connection closes after it).
    fn fail(&mut self, resp: &Response) {
        self.buf.clear();
        self.request_started = None;
        resp.write_to(&mut self.out, true, false);
        self.close_after_write = true;
    }

    /// Makes all the progress possible without blocking: writes pending output, reads, parses,
    /// up to the next complete request (left in `pending` for the service). Edge-triggered
    /// polling needs exactly this: the connection is only woken again after a read or write
    /// hit `WouldBlock`.
    fn drive(&mut self, limits: &Limits) -> ConnState {
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

    /// The pending request, borrowed from the buffer.
    fn request(&self) -> Option<Request<'_>> {
        let head = self.pending.as_ref()?;
        Some(Request {
            method: &head.method,
            path: &head.path,
            body: &self.buf[head.head_len..head.head_len + head.body_len],
        })
    }

    /// Queues the answer to the pending request and drops the request's bytes.
    fn answer(&mut self, resp: &Response, draining: bool) {
        let Some(head) = self.pending.take() else {
            return;
        };
        let close = !head.keep_alive || draining;
        resp.write_to(&mut self.out, close, head.method == "HEAD");
        self.answered += 1;
        self.buf.drain(..head.head_len + head.body_len);
        self.request_started = (!self.buf.is_empty()).then(Instant::now);
        self.continue_sent = false;
        self.close_after_write = close;
    }

    /// Applies the timeouts; returns whether to close now.
    fn expired(&mut self, now: Instant, limits: &Limits, drain: Option<&Drain>) -> bool {
        if let Some(until) = self.linger_until {
            return now >= until;
        }
        if self.out_pos < self.out.len() {
            return now.duration_since(self.last_activity) >= limits.write_timeout;
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
            if let Some(d) = drain {
                // An idle keep-alive connection is closed at once; one that has sent nothing
                // yet (accepted from the queue) gets a short grace for its first request.
                return self.answered > 0 || now.duration_since(d.started) >= limits.drain_grace;
            }
            return now.duration_since(self.last_activity) >= limits.idle_timeout;
        }
        false
    }
}

#[derive(Debug)]
struct Drain {
    started: Instant,
    deadline: Instant,
}

const CONTROL: Token = Token(usize::MAX - 1);
/// Tokens below this are listeners; from it on, connection slots.
const FIRST_CONN: usize = 1 << 20;

/// The event loop's state.
struct Server<'a> {
    poll: Poll,
    listeners: Vec<TcpListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    /// Per listener: connections may be queued on it (it was reported readable and the last
    /// `accept` did not say `WouldBlock`).
    acceptable: Vec<bool>,
    limits: &'a Limits,
    served: u64,
    /// How long the answered requests took, first byte received to answer queued.
    latency: Latency,
    /// Connections answered in the last batch, whose next request may join the next one.
    expected: Vec<usize>,
    /// Until when a waiting request may be held for them.
    gather_until: Option<Instant>,
    /// When the loop began: the first answer is logged against it (a restarted worker's
    /// warm-up, measured from its own side).
    started: Instant,
}

impl Server<'_> {
    /// Accepts at most one connection from each listener that may have one queued, within the
    /// connection limit.
    fn accept_round(&mut self) {
        for li in 0..self.listeners.len() {
            if self.open >= self.limits.max_connections {
                return;
            }
            if self.acceptable[li] {
                self.acceptable[li] = self.accept_one(li);
            }
        }
    }

    /// Whether a turn of the loop has something to do at once: a connection to accept or a
    /// request to answer (not one held by [`Server::holding`]).
    fn has_work(&self, now: Instant) -> bool {
        (self.open < self.limits.max_connections && self.acceptable.iter().any(|&a| a))
            || (self.has_pending() && self.holding(now).is_none())
    }

    fn has_pending(&self) -> bool {
        self.conns.iter().flatten().any(|c| c.pending.is_some())
    }

    /// Until when waiting requests are held back for a connection answered in the last batch
    /// that has not sent its next request yet; `None` when nothing is to be waited for.
    fn holding(&self, now: Instant) -> Option<Instant> {
        let until = self.gather_until.filter(|&t| now < t)?;
        let waiting = self.expected.iter().any(|&slot| {
            self.conns
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.pending.is_none())
        });
        waiting.then_some(until)
    }

    /// One `accept` on listener `li`; returns whether more connections may be queued.
    fn accept_one(&mut self, li: usize) -> bool {
        match self.listeners[li].accept() {
            Ok((stream, _)) => {
                self.add(stream);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                true
            }
            Err(e) => {
                // EMFILE and friends: leave the connection to the other workers; the sweep
                // tries this listener again.
                log::warn!("accept failed: {e}");
                false
            }
        }
    }

    /// Accepts every queued connection, regardless of the limit (the drain takes what was
    /// already queued before it lets go of the listeners).
    fn accept_all(&mut self) {
        for li in 0..self.listeners.len() {
            while self.accept_one(li) {}
        }
    }

    fn add(&mut self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        // Registering an fd that is already readable reports it at once, so a request that
        // arrived with the connection is not missed.
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(FIRST_CONN + slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register a connection: {e}");
            self.free.push(slot);
            return;
        }
        self.conns[slot] = Some(Conn::new(stream, Instant::now()));
        self.open += 1;
    }

    fn close(&mut self, slot: usize) {
        // The slot may be reused by a new connection, which nobody waits for.
        self.expected.retain(|&e| e != slot);
        if let Some(mut c) = self.conns[slot].take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.free.push(slot);
            self.open -= 1;
        }
    }

    fn drive(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.drive(self.limits) == ConnState::Close {
            self.close(slot);
        }
    }

    /// Answers, in one batch, every request that is complete now. Answering one may uncover
    /// the next request pipelined behind it: that one waits for the next turn of the loop, with
    /// whatever arrived on other connections meanwhile (serving it at once could starve them).
    /// The connections answered become the ones [`Server::holding`] waits for.
    fn serve_batch(&mut self, service: &mut dyn Service, draining: bool) {
        let slots: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].as_ref().is_some_and(|c| c.pending.is_some()))
            .collect();
        if slots.is_empty() {
            return;
        }
        let reqs: Vec<Request<'_>> = slots
            .iter()
            .filter_map(|&i| self.conns[i].as_ref().and_then(Conn::request))
            .collect();
        let computing = Instant::now();
        let mut resps = service.handle_batch(&reqs, draining);
        drop(reqs);
        if self.served == 0 {
            log::info!(
                "first answer {} ms after serving began ({} request(s) computed in {} ms)",
                self.started.elapsed().as_millis(),
                slots.len(),
                computing.elapsed().as_millis()
            );
        }
        if resps.len() != slots.len() {
            log::error!(
                "the service answered {} of {} requests",
                resps.len(),
                slots.len()
            );
            resps.resize(
                slots.len(),
                Response::error(500, "internal_error", "no answer was computed", None),
            );
        }
        for (&slot, resp) in slots.iter().zip(&resps) {
            if let Some(c) = self.conns[slot].as_mut() {
                if let Some(started) = c.request_started {
                    self.latency.observe(started.elapsed());
                }
                c.answer(resp, draining);
                self.served += 1;
            }
            self.drive(slot);
        }
        // Keep-alive connections whose answer is out and that have not pipelined another
        // request: their clients are likely to send the next one within moments.
        self.expected = slots
            .into_iter()
            .filter(|&slot| {
                self.conns[slot].as_ref().is_some_and(|c| {
                    c.pending.is_none()
                        && !c.close_after_write
                        && !c.peer_closed
                        && c.out_pos >= c.out.len()
                })
            })
            .collect();
        self.gather_until =
            (!draining && !self.expected.is_empty() && !self.limits.batch_wait.is_zero())
                .then(|| Instant::now() + self.limits.batch_wait);
    }

    fn sweep(&mut self, drain: Option<&Drain>) {
        let now = Instant::now();
        // A listener whose accept failed (EMFILE) is tried again; one that is really empty
        // just answers WouldBlock.
        if drain.is_none() {
            self.acceptable.fill(true);
        }
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            let had_output = c.out_pos < c.out.len();
            if c.expired(now, self.limits, drain) {
                self.close(slot);
            } else if !had_output && c.out_pos < c.out.len() {
                // A 408 was queued: write it.
                self.drive(slot);
            }
        }
    }

    /// Connections that still have work: a request (partly) received, an answer being
    /// written, or nothing sent yet.
    fn in_flight(&self) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter(|c| !c.is_idle() || c.answered == 0)
            .count()
    }
}

/// Serves until drained or orphaned. `listeners` are made non-blocking (they are shared with
/// the other workers, which expect that too).
pub fn run(
    listeners: Vec<std::net::TcpListener>,
    control: &mut dyn Control,
    service: &mut dyn Service,
    limits: &Limits,
) -> io::Result<Exit> {
    let poll = Poll::new()?;
    let mut mio_listeners = Vec::with_capacity(listeners.len());
    for (i, l) in listeners.into_iter().enumerate() {
        l.set_nonblocking(true)?;
        let mut l = TcpListener::from_std(l);
        poll.registry()
            .register(&mut l, Token(i), Interest::READABLE)?;
        mio_listeners.push(l);
    }
    let control_fd = control.fd();
    if let Some(fd) = control_fd {
        poll.registry()
            .register(&mut SourceFd(&fd), CONTROL, Interest::READABLE)?;
    }
    let mut s = Server {
        poll,
        listeners: mio_listeners,
        conns: Vec::new(),
        free: Vec::new(),
        open: 0,
        acceptable: Vec::new(),
        limits,
        served: 0,
        latency: Latency::default(),
        expected: Vec::new(),
        gather_until: None,
        started: Instant::now(),
    };
    let mut events = Events::with_capacity(256);
    let mut drain: Option<Drain> = None;
    let mut next_heartbeat = Instant::now() + limits.heartbeat;
    let mut next_sweep = Instant::now() + SWEEP;
    // Connections may have queued before this worker started polling; edge-triggered
    // registration would not report them until the next one arrives.
    s.acceptable = vec![true; s.listeners.len()];

    loop {
        let now = Instant::now();
        if let Some(d) = &drain {
            if s.open == 0 {
                return Ok(Exit::Drained { served: s.served });
            }
            if now >= d.deadline {
                return Ok(Exit::DrainTimedOut { abandoned: s.open });
            }
        }
        let mut wake = next_heartbeat.min(next_sweep);
        if let Some(d) = &drain {
            wake = wake.min(d.deadline);
        }
        if let Some(until) = s.holding(now).filter(|_| s.has_pending()) {
            wake = wake.min(until);
        }
        let timeout = if s.has_work(now) {
            Duration::ZERO
        } else {
            wake.saturating_duration_since(now)
        };
        match s.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            // SIGIO from the control channel's lifeline interrupts epoll_wait.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let Token(t) = ev.token();
            if ev.token() == CONTROL {
                loop {
                    match control.poll() {
                        Ok(None) => break,
                        Ok(Some(ParentMessage::Drain { deadline_ms })) => {
                            if drain.is_none() {
                                drain = Some(start_drain(&mut s, control, service, deadline_ms)?);
                            }
                        }
                        Err(WorkerError::Orphaned) => return Ok(Exit::Orphaned),
                        Err(e) => return Ok(Exit::Control(e)),
                    }
                }
            } else if t < FIRST_CONN {
                if let Some(a) = s.acceptable.get_mut(t) {
                    *a = drain.is_none();
                }
            } else {
                s.drive(t - FIRST_CONN);
            }
        }
        if drain.is_none() {
            s.accept_round();
        }
        if drain.is_some() || s.holding(Instant::now()).is_none() {
            s.serve_batch(service, drain.is_some());
        }
        let now = Instant::now();
        if now >= next_sweep || drain.is_some() {
            s.sweep(drain.as_ref());
            next_sweep = now + SWEEP;
        }
        if now >= next_heartbeat {
            match control.heartbeat(s.served, &s.latency) {
                Ok(()) => {}
                Err(WorkerError::Orphaned) => return Ok(Exit::Orphaned),
                Err(e) => log::warn!("heartbeat failed: {e}"),
            }
            next_heartbeat = now + limits.heartbeat;
        }
    }
}

/// Begins the drain: takes every queued connection, lets go of the listeners, reports.
fn start_drain(
    s: &mut Server<'_>,
    control: &mut dyn Control,
    service: &mut dyn Service,
    deadline_ms: u64,
) -> io::Result<Drain> {
    let now = Instant::now();
    let drain = Drain {
        started: now,
        deadline: now + Duration::from_millis(deadline_ms),
    };
    s.accept_all();
    s.acceptable.clear();
    for mut l in s.listeners.drain(..) {
        let _ = s.poll.registry().deregister(&mut l);
    }
    // Give every connection a chance to read what already arrived, so that an idle-looking
    // keep-alive connection with a request in flight is not closed under it.
    for slot in 0..s.conns.len() {
        s.drive(slot);
    }
    s.serve_batch(service, true);
    let in_flight = s.in_flight();
    log::info!("draining: {in_flight} connection(s) in flight, deadline in {deadline_ms} ms");
    match control.draining(in_flight as u32) {
        Ok(()) | Err(WorkerError::Orphaned) => {}
        Err(e) => log::warn!("could not report draining: {e}"),
    }
    Ok(drain)
}

#[cfg(test)]
mod tests;
