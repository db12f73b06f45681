//! The connection handling the supervisor's two small servers share: the admin socket
//! ([`super::admin`]) and the `--metrics` endpoint ([`super::scrape`]).
//!
//! A [`Server`] owns a non-blocking listener inside the supervisor's one mio poll and the
//! connections it accepted: at most `max` open at once (the caller decides what the next ones
//! are told), each with `deadline` from its accept to its answer's last byte (then it is
//! closed by [`Server::expire`]), each answered once and then closed. What a request is and
//! how it is read stay with each server: [`Server::readable`] hands over a connection whose
//! request is still being read, and [`Server::answer`] takes the answer's bytes and writes
//! what the socket takes now, the rest as it drains. So no client can stall supervision:
//! silent clients cost a few fds, never the loop's time.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// A listening socket whose connections a [`Server`] serves.
pub trait Listener: AsRawFd {
    type Stream: Stream;
    fn accept_one(&self) -> std::io::Result<Self::Stream>;
}

/// A connected socket a [`Server`] reads from and writes to.
pub trait Stream: Read + Write + AsRawFd {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_one(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Stream for UnixStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        UnixStream::set_nonblocking(self, on)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept_one(&self) -> std::io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Stream for TcpStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        TcpStream::set_nonblocking(self, on)
    }
}

/// Where a connection is in its one request and answer.
#[derive(Debug)]
enum Phase {
    /// Its request is being read.
    Reading,
    /// Its request is read; its answer comes from the event loop.
    Awaiting,
    /// The answer's bytes not written yet.
    Writing(Vec<u8>),
}

/// One accepted connection: its socket and what its server reads into (`state`).
#[derive(Debug)]
pub struct Conn<S, St> {
    pub stream: S,
    pub state: St,
    deadline: Instant,
    phase: Phase,
}

/// What [`Server::accept_next`] did.
#[derive(Debug)]
enum Accepted {
    /// No connection is waiting (or accepting failed, logged).
    Done,
    /// One was refused, told what the caller said, or lost; accept the next.
    Refused,
    /// One is watched under this token; read what it already sent.
    New(Token),
}

/// A listener and its connections, with a cap and a deadline per connection.
#[derive(Debug)]
pub struct Server<L: Listener, St> {
    listener: L,
    /// The server's name in logs (`admin`, `metrics`).
    what: &'static str,
    max: usize,
    deadline: Duration,
    conns: HashMap<Token, Conn<L::Stream, St>>,
    next: usize,
    registry: Option<Registry>,
}

impl<L: Listener, St> Server<L, St> {
    /// Serves `listener` (non-blocking already); connections' tokens count up from
    /// `first_token`, which must be far from every other token of the poll.
    pub fn new(
        listener: L,
        what: &'static str,
        max: usize,
        deadline: Duration,
        first_token: usize,
    ) -> Self {
        Self {
            listener,
            what,
            max,
            deadline,
            conns: HashMap::new(),
            next: first_token,
            registry: None,
        }
    }

    pub fn listener(&self) -> &L {
        &self.listener
    }

    /// Registers the listening socket; connections are registered with the same registry.
    pub fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(
            &mut SourceFd(&self.listener.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        self.registry = Some(registry.try_clone()?);
        Ok(())
    }

    /// Whether `token` is one of this server's connections'.
    pub fn owns(&self, token: Token) -> bool {
        self.conns.contains_key(&token)
    }

    /// Accepts every waiting connection and hands each one watched to `ready`, to read what
    /// it already sent. `refusal` sees each and whether `max` are open already: `Some(bytes)`
    /// refuses it, writing `bytes` if the socket takes them now (never waiting); `None`
    /// watches it.
    pub fn accept(
        &mut self,
        now: Instant,
        mut refusal: impl FnMut(&L::Stream, bool) -> Option<Vec<u8>>,
        mut ready: impl FnMut(&mut Self, Token),
    ) where
        St: Default,
    {
        loop {
            match self.accept_next(now, &mut refusal, St::default()) {
                Accepted::Done => return,
                Accepted::Refused => {}
                Accepted::New(token) => ready(self, token),
            }
        }
    }

    /// Accepts one waiting connection, refused or watched as [`Server::accept`] says, reading
    /// into `state`.
    fn accept_next(
        &mut self,
        now: Instant,
        refusal: impl FnOnce(&L::Stream, bool) -> Option<Vec<u8>>,
        state: St,
    ) -> Accepted {
        let mut stream = match self.listener.accept_one() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Accepted::Done,
            Err(e) => {
                log::warn!("{} accept: {e}", self.what);
                return Accepted::Done;
            }
        };
        let refusal = refusal(&stream, self.conns.len() >= self.max);
        if stream.set_nonblocking(true).is_err() {
            return Accepted::Refused;
        }
        if let Some(bytes) = refusal {
            if !bytes.is_empty() {
                let _ = stream.write(&bytes);
            }
            return Accepted::Refused;
        }
        let token = Token(self.next);
        self.next += 1;
        let registered = self.registry.as_ref().map(|r| {
            r.register(
                &mut SourceFd(&stream.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
        });
        if !matches!(registered, Some(Ok(()))) {
            log::warn!(
                "{}: could not watch a connection: {registered:?}",
                self.what
            );
            return Accepted::Refused;
        }
        let conn = Conn {
            stream,
            state,
            deadline: now + self.deadline,
            phase: Phase::Reading,
        };
        self.conns.insert(token, conn);
        Accepted::New(token)
    }

    /// A connection is readable or writable: writes more of its answer if it has one, and
    /// hands it over if its request is still being read.
    pub fn readable(&mut self, token: Token) -> Option<&mut Conn<L::Stream, St>> {
        match &self.conns.get(&token)?.phase {
            Phase::Reading => self.conns.get_mut(&token),
            Phase::Awaiting => None,
            Phase::Writing(_) => {
                self.flush(token);
                None
            }
        }
    }

    /// What a connection read, if it is open.
    pub fn state(&self, token: Token) -> Option<&St> {
        self.conns.get(&token).map(|c| &c.state)
    }

    /// The connection's request is read: read no more, its answer comes later.
    pub fn await_answer(&mut self, token: Token) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.phase = Phase::Awaiting;
        }
    }

    /// Queues an answer and writes what the socket takes now; the rest as it drains, then
    /// the connection is closed.
    pub fn answer(&mut self, token: Token, bytes: Vec<u8>) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.phase = Phase::Writing(bytes);
        self.flush(token);
    }

    fn flush(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Phase::Writing(bytes) = &mut c.phase else {
            return;
        };
        while !bytes.is_empty() {
            match c.stream.write(bytes) {
                Ok(n) => {
                    bytes.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("{} answer: {e}", self.what);
                    break;
                }
            }
        }
        self.close(token);
    }

    /// Closes the connections past their deadline.
    pub fn expire(&mut self, now: Instant) {
        let late: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(t, _)| *t)
            .collect();
        if !late.is_empty() {
            log::warn!(
                "{}: closed {} connection(s) not answered within {}s",
                self.what,
                late.len(),
                self.deadline.as_secs()
            );
        }
        for t in late {
            self.close(t);
        }
    }

    /// Stops watching a connection and closes it.
    pub fn close(&mut self, token: Token) {
        if let Some(c) = self.conns.remove(&token) {
            if let Some(r) = &self.registry {
                let _ = r.deregister(&mut SourceFd(&c.stream.as_raw_fd()));
            }
        }
    }
}
