//! Starting the zygote process and connecting to it.
//!
//! The zygote is this same binary exec'd as `zygote __zygote ...` (a clean, single-threaded
//! process image that never touched CUDA). It announces itself with one line, `ready PID
//! SOCKET`, on a pipe; anything else (an exit, a timeout) means it failed, and its own error
//! is already on the shared stderr.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zygote_runtime::backend::BackendChoice;
use zygote_runtime::client::ZygoteClient;

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

/// Starts a zygote and waits until it serves.
pub fn start(spec: &ZygoteSpec) -> Result<ZygoteProc, StartError> {
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
    if !spec.command.is_empty() {
        cmd.arg("--").args(&spec.command);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| StartError::Exec {
        exe: exe.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped");
    let deadline = started + spec.start_timeout;
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    loop {
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            return Err(StartError::Timeout(spec.start_timeout));
        }
        match zygote_runtime::protocol::frame::wait_readable(
            reader.get_ref().as_fd(),
            deadline - now,
        ) {
            Ok(()) => {}
            Err(_) => continue,
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                let status = child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                return Err(StartError::Died { status });
            }
            Ok(_) if line.starts_with("ready ") => break,
            Ok(_) => log::warn!("zygote said {line:?}"),
            Err(e) => {
                let _ = child.kill();
                return Err(StartError::Died {
                    status: e.to_string(),
                });
            }
        }
    }
    // The child is reaped by the supervisor's SIGCHLD handling, not by `Child`.
    std::mem::forget(child);
    let path = socket(&spec.runtime_dir);
    let client =
        ZygoteClient::connect(&path, "zygote start").map_err(|source| StartError::Connect {
            path: path.clone(),
            source,
        })?;
    log::info!(
        "zygote pid {pid} ready in {} ms",
        started.elapsed().as_millis()
    );
    Ok(ZygoteProc {
        pid,
        client,
        started,
    })
}

/// The zygote socket in `dir`.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join(zygote_server::server::SOCKET_NAME)
}
