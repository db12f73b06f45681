//! The `--metrics HOST:PORT` endpoint: a minimal HTTP/1.1 server for `GET /metrics`, inside
//! the supervisor's one poll, so that it answers while workers restart.
//!
//! Like the admin socket, no client can stall supervision: connections are non-blocking, each
//! has [`CONNECTION_DEADLINE`] from its accept to its answer's last byte, a request head is at
//! most [`MAX_HEAD`] bytes, at most [`MAX_CONNECTIONS`] are open at once (the next ones are
//! closed at once), and every answer closes its connection. A complete `GET /metrics` becomes
//! [`Input::Scrape`]; the event loop answers it with [`Scrape::answer`]. `GET /healthz` is
//! answered here with 200 (the supervisor's loop turns: a liveness probe), and so is anything
//! else: 404 for another path, 405 for another method, 400 for a bad head.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use super::effects::{Input, ScrapeConn};

/// Time a client gets from its connection to the end of its answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(2);
/// Scrape connections open at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Tokens of scrape connections start here, far from the admin's and the children's.
const FIRST_TOKEN: usize = 1 << 41;

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Not complete yet.
    Partial,
    /// `GET /metrics` (or `HEAD`: the answer has no body).
    Metrics { head_only: bool },
    /// `GET /healthz`: the supervisor's loop turns (a liveness probe), answered here.
    Healthz,
    /// Answer this status and close.
    Refuse(u16, &'static str),
}

/// Reads a request head (`buf`, as received so far).
pub fn parse(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Head::Refuse(431, "Request Header Fields Too Large")
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Refuse(400, "Bad Request"),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            match (req.method, path) {
                (Some("GET"), "/metrics") => Head::Metrics { head_only: false },
                (Some("HEAD"), "/metrics") => Head::Metrics { head_only: true },
                (_, "/metrics") => Head::Refuse(405, "Method Not Allowed"),
                (Some("GET"), "/healthz") => Head::Healthz,
                _ => Head::Refuse(404, "Not Found"),
            }
        }
    }
}

/// An answer's bytes: status line, headers, body.
pub fn response(
    status: u16,
    reason: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
    deadline: Instant,
    head_only: bool,
    /// The answer's bytes not written yet (`None` while the request is read or awaited).
    out: Option<Vec<u8>>,
}

/// The metrics listener and its connections.
#[derive(Debug)]
pub struct Scrape {
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    next: usize,
    registry: Option<Registry>,
}

impl Scrape {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Self::adopt(listener))
    }

    /// Serves on a listener bound elsewhere (socket activation), non-blocking already.
    pub fn adopt(listener: TcpListener) -> Self {
        Self {
            listener,
            conns: HashMap::new(),
            next: FIRST_TOKEN,
            registry: None,
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(
            &mut SourceFd(&self.listener.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        self.registry = Some(registry.try_clone()?);
        Ok(())
    }

    pub fn owns(&self, token: Token) -> bool {
        self.conns.contains_key(&token)
    }

    /// Accepts every waiting connection (closing those over the cap) and reads what each
    /// already sent.
    pub fn accept(&mut self, now: Instant, out: &mut Vec<Input>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("metrics accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                log::warn!("metrics: {MAX_CONNECTIONS} connections open; closed one more");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
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
                log::warn!("metrics: could not watch a connection: {registered:?}");
                continue;
            }
            let conn = Conn {
                stream,
                head: Vec::new(),
                deadline: now + CONNECTION_DEADLINE,
                head_only: false,
                out: None,
            };
            self.conns.insert(token, conn);
            self.ready(token, out);
        }
    }

    /// A connection is readable or writable: reads its request, or writes more of its answer.
    pub fn ready(&mut self, token: Token, out: &mut Vec<Input>) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.out.is_some() {
            return self.flush(token);
        }
        let mut buf = [0u8; 1024];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return self.close(token),
                Ok(n) => {
                    let room = MAX_HEAD - c.head.len();
                    c.head.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(token),
            }
            if c.head.len() >= MAX_HEAD {
                break;
            }
        }
        match parse(&c.head) {
            Head::Partial => {}
            Head::Metrics { head_only } => {
                c.head_only = head_only;
                // Read no more: the answer is awaited from the event loop.
                c.out = Some(Vec::new());
                out.push(Input::Scrape(ScrapeConn(token.0)));
            }
            Head::Healthz => {
                c.out = Some(response(200, "OK", "text/plain", "ok\n", false));
                self.flush(token);
            }
            Head::Refuse(status, reason) => {
                let body = format!("{status} {reason}\n");
                c.out = Some(response(status, reason, "text/plain", &body, false));
                self.flush(token);
            }
        }
    }

    /// Queues the metrics text as the answer, and writes what the socket takes now.
    pub fn answer(&mut self, conn: ScrapeConn, content_type: &str, body: &str) {
        let token = Token(conn.0);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.out = Some(response(200, "OK", content_type, body, c.head_only));
        self.flush(token);
    }

    fn flush(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Some(bytes) = c.out.as_mut() else {
            return;
        };
        if bytes.is_empty() {
            return; // awaiting the answer
        }
        while !bytes.is_empty() {
            match c.stream.write(bytes) {
                Ok(n) => {
                    bytes.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
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
                "metrics: closed {} connection(s) not done in {}s",
                late.len(),
                CONNECTION_DEADLINE.as_secs()
            );
        }
        for t in late {
            self.close(t);
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(c) = self.conns.remove(&token) {
            if let Some(r) = &self.registry {
                let _ = r.deregister(&mut SourceFd(&c.stream.as_raw_fd()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_or_head_of_metrics_is_a_scrape() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Head::Partial
        );
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Head::Metrics { head_only: false }
        );
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Head::Metrics { head_only: false }
        );
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Head::Metrics { head_only: true }
        );
        assert!(matches!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Head::Refuse(405, _)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Head::Refuse(404, _)
        ));
        assert!(matches!(
            parse(b"\x00\x01 nonsense\r\n\r\n"),
            Head::Refuse(400, _)
        ));
        let long = [
            b"GET /metrics HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_HEAD],
        ]
        .concat();
        assert!(matches!(parse(&long[..MAX_HEAD]), Head::Refuse(431, _)));
    }
}
