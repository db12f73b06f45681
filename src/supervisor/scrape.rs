//! The `--metrics HOST:PORT` endpoint: a minimal HTTP/1.1 server for `GET /metrics`, inside
//! the supervisor's one poll, so that it answers while workers restart.
//!
//! Like the admin socket (both are served by [`super::conns`]), no client can stall
//! supervision: connections are non-blocking, each has [`CONNECTION_DEADLINE`] from its accept to its answer's last byte, a request head is at
//! most [`MAX_HEAD`] bytes, at most [`MAX_CONNECTIONS`] are open at once (the next ones are
//! closed at once), and every answer closes its connection. A complete `GET /metrics` becomes
//! [`Input::Scrape`]; the event loop answers it with [`Scrape::answer`]. `GET /healthz` is
//! answered here with 200 (the supervisor's loop turns: a liveness probe), and so is anything
//! else: 404 for another path, 405 for another method, 400 for a bad head.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mio::{Registry, Token};

use super::conns::Server;
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

/// What a metrics connection has read.
#[derive(Debug, Default)]
struct Request {
    head: Vec<u8>,
    head_only: bool,
}

/// The metrics listener and its connections.
#[derive(Debug)]
pub struct Scrape {
    server: Server<TcpListener, Request>,
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
            server: Server::new(
                listener,
                "metrics",
                MAX_CONNECTIONS,
                CONNECTION_DEADLINE,
                FIRST_TOKEN,
            ),
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.listener().local_addr().ok()
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        self.server.register(registry, token)
    }

    pub fn owns(&self, token: Token) -> bool {
        self.server.owns(token)
    }

    /// Accepts every waiting connection (closing those over the cap) and reads what each
    /// already sent.
    pub fn accept(&mut self, now: Instant, out: &mut Vec<Input>) {
        let refusal = |_: &TcpStream, full: bool| {
            full.then(|| {
                log::warn!("metrics: {MAX_CONNECTIONS} connections open; closed one more");
                Vec::new()
            })
        };
        self.server
            .accept(now, refusal, |server, token| read_head(server, token, out));
    }

    /// A connection is readable or writable: reads its request, or writes more of its answer.
    pub fn ready(&mut self, token: Token, out: &mut Vec<Input>) {
        read_head(&mut self.server, token, out);
    }

    /// Queues the metrics text as the answer, and writes what the socket takes now.
    pub fn answer(&mut self, conn: ScrapeConn, content_type: &str, body: &str) {
        let token = Token(conn.0);
        let Some(req) = self.server.state(token) else {
            return;
        };
        let bytes = response(200, "OK", content_type, body, req.head_only);
        self.server.answer(token, bytes);
    }

    /// Closes the connections past their deadline.
    pub fn expire(&mut self, now: Instant) {
        self.server.expire(now);
    }
}

/// Reads what a connection sent; a complete `GET /metrics` becomes [`Input::Scrape`], any
/// other complete head is answered here.
fn read_head(server: &mut Server<TcpListener, Request>, token: Token, out: &mut Vec<Input>) {
    let Some(c) = server.readable(token) else {
        return;
    };
    let mut buf = [0u8; 1024];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return server.close(token),
            Ok(n) => {
                let room = MAX_HEAD - c.state.head.len();
                c.state.head.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return server.close(token),
        }
        if c.state.head.len() >= MAX_HEAD {
            break;
        }
    }
    match parse(&c.state.head) {
        Head::Partial => {}
        Head::Metrics { head_only } => {
            c.state.head_only = head_only;
            // Read no more: the answer is awaited from the event loop.
            server.await_answer(token);
            out.push(Input::Scrape(ScrapeConn(token.0)));
        }
        Head::Healthz => {
            let bytes = response(200, "OK", "text/plain", "ok\n", false);
            server.answer(token, bytes);
        }
        Head::Refuse(status, reason) => {
            let body = format!("{status} {reason}\n");
            let bytes = response(status, reason, "text/plain", &body, false);
            server.answer(token, bytes);
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
