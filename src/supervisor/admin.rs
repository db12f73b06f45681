//! The admin socket (`supervisor.sock`, mode 0600): how `zygote status`, `stop`, `reload`,
//! `scale`, `sleep` and `wake` reach a running supervisor. One request per connection; same framing as
//! every other socket; same-uid peers only.
//!
//! No client can stall supervision: every connection is non-blocking in the supervisor's one
//! poll, read and answered a piece at a time as it becomes ready; each has
//! [`CONNECTION_DEADLINE`] from its accept to its answer's last byte, after which it is
//! closed; and at most [`MAX_CONNECTIONS`] are open at once (the next ones are answered
//! `limit` and closed), so that silent clients cost a few fds, never the loop's time. The
//! connections are handled by [`super::conns`], shared with `--metrics`; this module reads
//! the frames and decides who is refused.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use mio::{Registry, Token};
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{AdminRequest, AdminResponse, ErrorCode};

use super::conns::Server;
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

/// The admin listener's connections, each reading one framed request.
type AdminServer = Server<UnixListener, FrameReader>;

/// The admin listener and its connections.
#[derive(Debug)]
pub struct Admin {
    server: AdminServer,
    uid: u32,
}

impl Admin {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            server: Server::new(
                listener,
                "admin",
                MAX_CONNECTIONS,
                CONNECTION_DEADLINE,
                FIRST_TOKEN,
            ),
            uid: nix::unistd::getuid().as_raw(),
        })
    }

    /// Registers the listening socket; connections are registered with the same registry.
    pub fn register(&mut self, registry: &Registry, token: Token) -> std::io::Result<()> {
        self.server.register(registry, token)
    }

    /// Whether `token` is one of the admin connections'.
    pub fn owns(&self, token: Token) -> bool {
        self.server.owns(token)
    }

    /// Accepts every waiting connection (refusing strangers and those over the cap) and
    /// reads what each already sent.
    pub fn accept(&mut self, now: Instant, out: &mut Vec<Input>) {
        let own_uid = self.uid;
        self.server.accept(
            now,
            |stream, full| refusal(stream, full, own_uid),
            |server, token| read_request(server, token, out),
        );
    }

    /// A connection is readable or writable: reads its request, or writes more of its answer.
    pub fn ready(&mut self, token: Token, out: &mut Vec<Input>) {
        read_request(&mut self.server, token, out);
    }

    /// Queues an answer and writes what the socket takes now; the rest as it drains.
    pub fn answer(&mut self, conn: AdminConn, resp: &AdminResponse) {
        answer(&mut self.server, Token(conn.0), resp);
    }

    /// Closes the connections past their deadline.
    pub fn expire(&mut self, now: Instant) {
        self.server.expire(now);
    }
}

/// The answer refusing a new connection, if it is refused: a stranger's (`not_allowed`), or
/// one over the cap (`limit`). It is written only if it fits in the socket at once.
fn refusal(stream: &UnixStream, full: bool, own_uid: u32) -> Option<Vec<u8>> {
    let uid = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .ok();
    let (code, message) = if !admit(uid, own_uid) {
        log::warn!("admin: refused a peer with uid {uid:?}");
        (ErrorCode::NotAllowed, "not allowed".to_string())
    } else if full {
        log::warn!("admin: {MAX_CONNECTIONS} connections open; refused one more");
        (
            ErrorCode::Limit,
            format!("{MAX_CONNECTIONS} admin connections are open; try again"),
        )
    } else {
        return None;
    };
    let resp = AdminResponse::Error {
        id: None,
        code,
        message,
    };
    Some(frame::encode(&resp).unwrap_or_default())
}

/// Reads what a connection sent; a complete request becomes [`Input::Admin`], a bad one is
/// answered with its error.
fn read_request(server: &mut AdminServer, token: Token, out: &mut Vec<Input>) {
    let Some(c) = server.readable(token) else {
        return;
    };
    let req = match c.state.read(&mut &c.stream) {
        Ok(ReadEvent::WouldBlock) => return,
        Ok(ReadEvent::Eof) => return server.close(token),
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
            answer(server, token, &resp);
        }
    }
}

/// Queues an answer on an open connection and writes what the socket takes now.
fn answer(server: &mut AdminServer, token: Token, resp: &AdminResponse) {
    if server.state(token).is_none() {
        return;
    }
    match frame::encode(resp) {
        Ok(bytes) => server.answer(token, bytes),
        Err(e) => {
            log::warn!("admin answer: {e}");
            server.close(token);
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
