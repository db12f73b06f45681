//! The admin socket (`supervisor.sock`, mode 0600): how `zygote status`, `zygote stop` and
//! `zygote reload` reach a running supervisor. One request per connection; same framing as
//! every other socket; same-uid peers only.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use zygote_runtime::protocol::frame;
use zygote_runtime::protocol::{AdminRequest, AdminResponse, ErrorCode};

use super::effects::{AdminConn, Input};

/// Time a client gets to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Admin {
    listener: UnixListener,
    uid: u32,
    waiting: HashMap<AdminConn, UnixStream>,
    next: usize,
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
            waiting: HashMap::new(),
            next: 0,
        })
    }

    pub fn register(&self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(
            &mut SourceFd(&self.listener.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    /// Accepts the waiting connections and reads their requests.
    pub fn accept(&mut self, out: &mut Vec<Input>) {
        while let Some((stream, req)) = self.next_request() {
            let conn = AdminConn(self.next);
            self.next += 1;
            self.waiting.insert(conn, stream);
            out.push(Input::Admin(conn, req));
        }
    }

    /// Events of other tokens (none yet).
    pub fn readable(&mut self, _token: Token, _out: &mut Vec<Input>) {}

    /// Accepts the next connection and reads its request. `None` when no connection waits.
    fn next_request(&mut self) -> Option<(UnixStream, AdminRequest)> {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    log::warn!("admin accept: {e}");
                    return None;
                }
            };
            let uid =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map(|c| c.uid());
            if uid.as_ref().ok() != Some(&self.uid) {
                log::warn!("admin: refused a peer with uid {uid:?}");
                let resp = AdminResponse::Error {
                    id: None,
                    code: ErrorCode::NotAllowed,
                    message: "not allowed".into(),
                };
                let _ = frame::write_frame(&mut stream, &resp);
                continue;
            }
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
            match frame::read_frame::<_, AdminRequest>(&mut stream, Some(REQUEST_DEADLINE)) {
                Ok(Some(req)) => return Some((stream, req)),
                Ok(None) => continue,
                Err(e) => {
                    let resp = AdminResponse::Error {
                        id: None,
                        code: frame::error_code(&e),
                        message: e.to_string(),
                    };
                    let _ = frame::write_frame(&mut stream, &resp);
                }
            }
        }
    }

    pub fn answer(&mut self, conn: AdminConn, resp: &AdminResponse) {
        let Some(mut stream) = self.waiting.remove(&conn) else {
            return;
        };
        if let Err(e) = frame::write_frame(&mut stream, resp) {
            log::warn!("admin answer: {e}");
        }
    }
}
