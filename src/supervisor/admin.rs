//! The admin socket (`supervisor.sock`, mode 0600): how `zygote status`, `zygote stop` and
//! `zygote reload` reach a running supervisor. One request per connection; same framing as
//! every other socket; same-uid peers only.
//!
//! No client can stall supervision: every connection is non-blocking in the supervisor's one
//! poll, read and answered a piece at a time as it becomes ready; each has
//! [`CONNECTION_DEADLINE`] from its accept to its answer's last byte, after which it is
//! closed; and at most [`MAX_CONNECTIONS`] are open at once (the next ones are answered
//! `limit` and closed), so that silent clients cost a few fds, never the loop's time.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{AdminRequest, AdminResponse, ErrorCode};

use super::effects::{AdminConn, Input};

/// Time a client gets from its connection to the end of its answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(2);
/// Admin connections open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Tokens of admin connections start here, far from the supervisor's other tokens.
const FIRST_TOKEN: usize = 1 << 40;

/// Whether a peer may use the admin socket: only the service's own uid.
pub fn admit(peer_uid: Option<u32>, own_uid: u32) -> bool {
    peer_uid == Some(own_uid)
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    reader: FrameReader,
    deadline: Instant,
    /// The answer's bytes not written yet (`None` while the request is awaited).
    out: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Admin {
    listener: UnixListener,
    uid: u32,
    conns: HashMap<Token, Conn>,
    next: usize,
    registry: Option<Registry>,
}

impl Admin {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            uid: nix::unistd::getuid().as_raw(),
            conns: HashMap::new(),
            next: FIRST_TOKEN,
            registry: None,
        })
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

    /// Whether `token` is one of the admin connections'.
    pub fn owns(&self, token: Token) -> bool {
        self.conns.contains_key(&token)
    }

    /// Accepts every waiting connection (refusing strangers and those over the cap) and
    /// reads what each already sent.
    pub fn accept(&mut self, now: Instant, out: &mut Vec<Input>) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("admin accept: {e}");
                    return;
                }
            };
            let uid =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map(|c| c.uid())
                    .ok();
            let refusal = if !admit(uid, self.uid) {
                log::warn!("admin: refused a peer with uid {uid:?}");
                Some((ErrorCode::NotAllowed, "not allowed".to_string()))
            } else if self.conns.len() >= MAX_CONNECTIONS {
                log::warn!("admin: {MAX_CONNECTIONS} connections open; refused one more");
                Some((
                    ErrorCode::Limit,
                    format!("{MAX_CONNECTIONS} admin connections are open; try again"),
                ))
            } else {
                None
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Some((code, message)) = refusal {
                // Best effort, never waiting: a refused peer gets its reason if it fits.
                let resp = AdminResponse::Error {
                    id: None,
                    code,
                    message,
                };
                if let Ok(bytes) = frame::encode(&resp) {
                    let _ = stream.write(&bytes);
                }
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
                log::warn!("admin: could not watch a connection: {registered:?}");
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    reader: FrameReader::default(),
                    deadline: now + CONNECTION_DEADLINE,
                    out: None,
                },
            );
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
        let req = match c.reader.read(&mut &c.stream) {
            Ok(ReadEvent::WouldBlock) => return,
            Ok(ReadEvent::Eof) => return self.close(token),
            Ok(ReadEvent::Frame(body)) => frame::decode::<AdminRequest>(&body),
            Err(e) => Err(e),
        };
        match req {
            Ok(req) => out.push(Input::Admin(AdminConn(token.0), req)),
            Err(e) => {
                let resp = AdminResponse::Error {
                    id: None,
                    code: frame::error_code(&e),
                    message: e.to_string(),
                };
                self.answer(AdminConn(token.0), &resp);
            }
        }
    }

    /// Queues an answer and writes what the socket takes now; the rest as it drains.
    pub fn answer(&mut self, conn: AdminConn, resp: &AdminResponse) {
        let token = Token(conn.0);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        match frame::encode(resp) {
            Ok(bytes) => c.out = Some(bytes),
            Err(e) => {
                log::warn!("admin answer: {e}");
                return self.close(token);
            }
        }
        self.flush(token);
    }

    fn flush(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Some(bytes) = c.out.as_mut() else {
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
                    log::warn!("admin answer: {e}");
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
                "admin: closed {} connection(s) silent for {}s",
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
    fn only_the_services_own_uid_is_admitted() {
        assert!(admit(Some(1000), 1000));
        assert!(!admit(Some(0), 1000), "not even root");
        assert!(!admit(Some(1001), 1000));
        assert!(!admit(None, 1000), "a peer without credentials");
    }
}
