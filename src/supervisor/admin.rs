//! The admin socket (`supervisor.sock`, mode 0600): how `zygote status`, `zygote stop` and
//! `zygote reload` reach a running supervisor. One request per connection; same framing as
//! every other socket; same-uid peers only.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use zygote_runtime::protocol::frame;
use zygote_runtime::protocol::{AdminRequest, AdminResponse, ErrorCode};

/// Time a client gets to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Admin {
    listener: UnixListener,
    uid: u32,
}

impl Admin {
    pub fn bind(path: &Path, registry: &Registry, token: Token) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        registry.register(
            &mut SourceFd(&listener.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(Self {
            listener,
            uid: nix::unistd::getuid().as_raw(),
        })
    }

    /// Accepts the next connection and reads its request. `None` when no connection waits.
    pub fn next_request(&mut self) -> Option<(UnixStream, AdminRequest)> {
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

    pub fn answer(&mut self, mut stream: UnixStream, resp: &AdminResponse) {
        if let Err(e) = frame::write_frame(&mut stream, resp) {
            log::warn!("admin answer: {e}");
        }
    }
}
