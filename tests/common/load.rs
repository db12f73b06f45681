//! Load for the tests that check that nothing fails while workers change: one `Connection:
//! close` request at a time per client thread, each outcome classified, so that a test can
//! assert that every accepted connection was answered.

use std::time::Duration;

/// What one request met.
#[derive(Debug)]
pub enum Outcome {
    Answered,
    /// `connect` refused: the service is gone, as it should be after a stop.
    Refused,
    /// `connect` got no answer in time (SYNs dropped while the stop drains).
    NotConnected,
    /// Accepted, then reset or closed without an answer: what a stop must never do.
    Reset(String),
    /// Anything else (a wrong status, another error).
    Other(String),
}

/// One `Connection: close` request on a new connection: alternately `/healthz` and a small
/// `/embed`, so that the workers have something to finish when the stop comes.
pub fn one_request(addr: std::net::SocketAddr, embed: bool) -> Outcome {
    use std::io::{ErrorKind, Read, Write};
    let mut s = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e) if e.kind() == ErrorKind::TimedOut => return Outcome::NotConnected,
        Err(e) => return Outcome::Other(format!("connect: {e}")),
    };
    let broken = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
        )
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let (method, path, body) = if embed {
        (
            "POST",
            "/embed",
            r#"{"input": ["shared weights", "one copy"]}"#,
        )
    } else {
        ("GET", "/healthz", "")
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return match broken(&e) {
            true => Outcome::Reset(format!("{path}: writing: {e}")),
            false => Outcome::Other(format!("{path}: writing: {e}")),
        };
    }
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Err(e) if broken(&e) => Outcome::Reset(format!("{path}: reading: {e}")),
        Err(e) => Outcome::Other(format!("{path}: reading: {e}")),
        Ok(_) if raw.is_empty() => Outcome::Reset(format!("{path}: closed without an answer")),
        Ok(_) if raw.starts_with(b"HTTP/1.1 200 ") => Outcome::Answered,
        Ok(_) => Outcome::Other(format!("{path}: {}", String::from_utf8_lossy(&raw))),
    }
}
