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
//! A request is handled when all of it has arrived. Each turn of the loop first collects what
//! arrived on every connection, then hands every complete request to the [`Service`] in one
//! batch ([`Service::submit`]), which answers at once what needs no computation and queues the
//! rest; then the service computes one bounded step of its queue ([`Service::step`]) and the
//! answers completed in it are written. A step is bounded in work (the embeddings app: a budget
//! of word pieces per forward pass), so a turn of the loop is short whatever was asked: the
//! loop heartbeats between steps, reads new requests, and the service can put them into the
//! next step beside the remainder of a large one. Requests that arrived on several connections
//! while the previous step was computed are computed together, which is how a worker under
//! load makes its matrix products wide without making anyone wait on purpose. All of it runs in
//! the loop's one thread: one worker is one core's worth of compute.
//! Keep-alive and pipelining are supported; a connection handles one request at a time and
//! reads the next only after the previous answer is written, so its buffers stay bounded.
//! Everything has a limit ([`Limits`]): header bytes, body bytes, connections, and the time a request may take to arrive (slowloris),
//! an idle keep-alive connection may stay, and an answer may take to be read.
//!
//! The loop also keeps the worker's side of the control channel ([`Control`]): a heartbeat every
//! second, and the drain: on [`ParentMessage::Drain`] it reports `draining`, accepts every
//! connection still queued on the listeners, lets go of the listeners, finishes every request
//! received or arriving on an open connection (answering with `Connection: close`), closes idle
//! keep-alive connections, and returns once nothing is left, or at the drain's deadline.
//!
//! The parts: [`parse`] reads a request's head from the bytes received, [`response`] writes
//! answers, `conn` is one client connection (its buffers, reads and writes, timeouts), and
//! `server` is the event loop over all of them, the listeners and the control channel.

mod conn;
pub mod parse;
pub mod response;
mod server;

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use zygote_runtime::protocol::{Latency, ParentMessage};
use zygote_runtime::WorkerError;

pub use parse::{parse, Head, Parsed, MAX_HEADERS};
pub use response::Response;

pub use server::run;

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
    /// While draining: time an idle connection (keep-alive, or accepted with nothing sent yet)
    /// is waited for its next request, which is answered with `Connection: close`.
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

/// One request, complete.
#[derive(Debug)]
pub struct Request<'a> {
    /// Names the request while the service works on it: an answer from [`Service::step`]
    /// comes back under it. Unique within one loop.
    pub id: u64,
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    pub body: &'a [u8],
}

/// What the service did with a request handed to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer, now.
    Now(Response),
    /// The work was queued: its answer comes from [`Service::step`] under the request's id.
    Queued,
}

/// What answers requests. Nothing here may block for long or panic on any input: the loop
/// runs it between its other duties (heartbeats, new connections, timeouts).
pub trait Service {
    /// Takes complete requests, one reply per request, in order. `draining` is true once the
    /// worker drains (`/readyz` then answers 503).
    fn submit(&mut self, reqs: &[Request<'_>], draining: bool) -> Vec<Reply>;
    /// Whether queued work remains.
    fn has_work(&self) -> bool;
    /// Computes one bounded step of the queued work; returns the answers it completed, by
    /// request id. Called only while [`Service::has_work`].
    fn step(&mut self) -> Vec<(u64, Response)>;
    /// Forgets the queued work of a request whose connection closed.
    fn cancel(&mut self, id: u64);
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

#[cfg(test)]
mod tests;
