//! Starting the zygote process and connecting to it.
//!
//! The zygote is this same binary exec'd as `zygote __zygote ...` (a clean, single-threaded
//! process image that never touched CUDA). It announces itself with one line, `ready PID
//! SOCKET`, on a pipe; anything else (an exit, a timeout) means it failed, and its own error
//! is already on the shared stderr. [`start`] waits for that line (the first zygote);
//! [`launch`] returns at once, and the supervisor's poll watches the pipe (a restart, while
//! the owner and workers go on being supervised).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use zygote_runtime::backend::BackendChoice;
use zygote_runtime::client::ZygoteClient;
use zygote_runtime::shm::SealedMemfd;

/// How to start a zygote.
#[derive(Debug, Clone)]
pub struct ZygoteSpec {
    pub runtime_dir: PathBuf,
    pub model: PathBuf,
    pub backend: BackendChoice,
    pub allow_uids: Vec<u32>,
    pub command: Vec<String>,
    /// The model digest a restarted zygote must find (the one the service started with).
    pub expect_digest: Option<String>,
    /// The model file's bytes in a sealed memfd the supervisor holds for the service's life:
    /// every zygote inherits it (`--model-fd`) instead of reading the file, so one started
    /// after a crash maps the very pages the running owner and workers map: no second copy.
    pub model_memfd: Option<Arc<SealedMemfd>>,
    /// Time allowed to load and validate the model.
    pub start_timeout: Duration,
    /// The workers run the native `app` entry (the zygote refuses a model it cannot serve).
    pub serve_app: bool,
}

/// Errors of starting a zygote.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not run {exe}: {source}")]
    Exec {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the zygote exited before it was ready ({status}); its error is above")]
    Died { status: String },
    #[error("the zygote was not ready within {0:?}")]
    Timeout(Duration),
    #[error("connecting to the zygote at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: zygote_runtime::protocol::ProtocolError,
    },
}

/// A running zygote and our connection to it.
#[derive(Debug)]
pub struct ZygoteProc {
    pub pid: i32,
    pub client: ZygoteClient,
    pub started: Instant,
}

/// A zygote started and not ready yet: its `ready` line is awaited on its stdout pipe, which
/// the supervisor watches in its poll, so that a zygote loading a large model stalls nothing.
#[derive(Debug)]
pub struct Launch {
    pub pid: i32,
    stdout: ChildStdout,
    /// Bytes read from the pipe that do not make a whole line yet.
    pending: Vec<u8>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    socket: PathBuf,
}

/// Starts a zygote process; [`Launch::progress`] says when it serves.
pub fn launch(spec: &ZygoteSpec) -> Result<Launch, StartError> {
    let exe = std::env::current_exe().map_err(|source| StartError::Exec {
        exe: "zygote".into(),
        source,
    })?;
    let mut cmd = Command::new(&exe);
    cmd.arg("__zygote")
        .arg("--runtime-dir")
        .arg(&spec.runtime_dir)
        .arg("--model")
        .arg(&spec.model);
    cmd.arg("--backend").arg(spec.backend.to_string());
    // The zygote ends with us (it is one of the children that must not outlive the service).
    cmd.arg("--die-with-parent");
    if let Some(d) = &spec.expect_digest {
        cmd.arg("--expect-digest").arg(d);
    }
    for uid in &spec.allow_uids {
        cmd.arg("--allow-uid").arg(uid.to_string());
    }
    if spec.serve_app {
        cmd.arg("--serve-app");
    }
    if let Some(memfd) = &spec.model_memfd {
        cmd.arg("--model-fd")
            .arg(memfd.fd().as_raw_fd().to_string());
    }
    if !spec.command.is_empty() {
        cmd.arg("--").args(&spec.command);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let spawned = match &spec.model_memfd {
        Some(memfd) => spawn_inheriting(&mut cmd, memfd.fd()),
        None => cmd.spawn(),
    };
    let mut child = spawned.map_err(|source| StartError::Exec {
        exe: exe.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().ok_or_else(|| StartError::Died {
        status: "no stdout pipe".into(),
    })?;
    // The child is reaped by the supervisor (waitpid here, or its SIGCHLD handling), not by
    // `Child`.
    drop(child);
    nix::fcntl::fcntl(
        stdout.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| StartError::Died {
        status: format!("making its pipe non-blocking: {e}"),
    })?;
    Ok(Launch {
        pid,
        stdout,
        pending: Vec::new(),
        started,
        deadline: started + spec.start_timeout,
        timeout: spec.start_timeout,
        socket: socket(&spec.runtime_dir),
    })
}

/// Spawns `cmd` with `fd` inherited at its own number: close-on-exec is cleared for the spawn
/// and set again after it. The supervisor is single-threaded, so no other exec can see the fd
/// meanwhile; this keeps `pre_exec` (and its `unsafe`) out of the supervisor.
fn spawn_inheriting(cmd: &mut Command, fd: BorrowedFd<'_>) -> std::io::Result<std::process::Child> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let child = cmd.spawn();
    if let Err(e) = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        // The zygote is the only program this process execs, and it takes the fd anyway.
        log::warn!("setting close-on-exec again on the model memfd: {e}");
    }
    child
}

impl Launch {
    /// The pipe the `ready` line comes on.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stdout.as_fd()
    }

    /// Reads what the zygote wrote so far: `Some` once it is ready (and connected to), an
    /// error if it died or its time ran out (it is killed then), `None` while it loads.
    pub fn progress(&mut self) -> Result<Option<ZygoteProc>, StartError> {
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match self.stdout.read(&mut buf) {
                // After `ready` it points its stdout elsewhere; before, this means it exits.
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.kill();
                    return Err(StartError::Died {
                        status: e.to_string(),
                    });
                }
            }
        }
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            if line.starts_with("ready ") {
                return self.connect().map(Some);
            }
            log::warn!("zygote said {:?}", line.trim_end());
        }
        if eof {
            return Err(StartError::Died {
                status: self.reap(),
            });
        }
        if Instant::now() >= self.deadline {
            self.kill();
            return Err(StartError::Timeout(self.timeout));
        }
        Ok(None)
    }

    /// The status of a zygote that closed its stdout before `ready`: it is exiting, so it is
    /// given a moment (its real status says more), then killed. Bounded either way.
    fn reap(&self) -> String {
        let pid = Pid::from_raw(self.pid);
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return format!("exit code {code}"),
                Ok(WaitStatus::Signaled(_, sig, _)) => return format!("signal {sig}"),
                // Still our unreaped child, so the pid is still its own: safe to kill.
                Ok(WaitStatus::StillAlive) if Instant::now() >= deadline => {
                    self.kill();
                    let _ = waitpid(pid, None);
                    return "killed: it closed its stdout without exiting".into();
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                // The supervisor's own reaping got there first.
                Err(_) => return "status reaped with the others".into(),
            }
        }
    }

    /// When its time runs out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Gives it up (the service stops): killed and reaped if it still runs unreaped.
    pub fn abandon(self) {
        let pid = Pid::from_raw(self.pid);
        if let Ok(WaitStatus::StillAlive) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            // Still our unreaped child, so the pid is still its own.
            self.kill();
            let _ = waitpid(pid, None);
        }
    }

    /// Kills it (its status is reaped with the others).
    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGKILL);
    }

    fn connect(&mut self) -> Result<ZygoteProc, StartError> {
        let client = ZygoteClient::connect(&self.socket, "zygote start").map_err(|source| {
            self.kill();
            StartError::Connect {
                path: self.socket.clone(),
                source,
            }
        })?;
        log::info!(
            "zygote pid {} ready in {} ms",
            self.pid,
            self.started.elapsed().as_millis()
        );
        Ok(ZygoteProc {
            pid: self.pid,
            client,
            started: self.started,
        })
    }
}

/// Starts a zygote and waits until it serves (the service's first zygote: nothing else runs
/// yet).
pub fn start(spec: &ZygoteSpec) -> Result<ZygoteProc, StartError> {
    let mut launch = launch(spec)?;
    loop {
        if let Some(z) = launch.progress()? {
            return Ok(z);
        }
        let left = launch.deadline().saturating_duration_since(Instant::now());
        let _ = zygote_runtime::protocol::frame::wait_readable(launch.fd(), left);
    }
}

/// The zygote socket in `dir`.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join(zygote_runtime::rundir::ZYGOTE_SOCKET)
}
