//! `zygote start`: the supervisor.
//!
//! ```text
//! zygote start   <- this module: binds listeners, requests children, restarts, rolls, drains
//!  └── zygote     (started by us, spoken to over its socket like any client would)
//!       ├── owner
//!       └── worker N
//! ```
//!
//! The supervisor is one thread around one mio `Poll`. It is split into decisions and
//! effects:
//!
//! | module | what it holds |
//! |---|---|
//! | [`policy`] | pure decisions: backoff, crash loops, what a death means, timers, zygote restarts |
//! | [`service`] | the state machine: children, slots, phase, rolls; acts only through [`effects`] |
//! | [`effects`] | the [`effects::Effects`] trait (spawn, signal, clock, log, ...) and the typed inputs |
//! | [`os`] | the real effects: every fd, the event loop's readiness turned into inputs |
//! | [`exits`] | exit statuses matched with deaths |
//! | [`status`] | `zygote status`'s answer |
//! | [`admin`] | the admin socket |
//! | [`gate`] | refusing new connections during a stop (an `unsafe` leaf) |
//! | [`zygote`] | starting a zygote process |
//!
//! The supervisor is the children's subreaper, so when the zygote dies the workers keep
//! serving and become ours to reap while a new zygote starts. Every child's life hangs on its
//! control channel: if this process dies, every child ends.
//!
//! Worker states: `starting` (spawned, not ready) → `serving` (sent ready) → `draining` (asked
//! to finish and exit). A worker that dies while serving is replaced at once; one that dies
//! before it was ready is retried with backoff, and [`policy::CRASH_LOOP_LIMIT`] such deaths in
//! a row stop the service with an error.

mod admin;
mod effects;
mod exits;
#[cfg(test)]
mod fake;
#[allow(unsafe_code)]
mod gate;
mod os;
pub mod policy;
mod service;
mod status;
pub mod zygote;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use zygote_runtime::backend::{BackendChoice, IpcChoice};

use self::service::Service;

/// How long the event loop waits at most before it looks at the timers again.
const TICK: Duration = Duration::from_millis(100);

/// Everything `zygote start` was asked for.
#[derive(Debug, Clone)]
pub struct Config {
    pub runtime_dir: PathBuf,
    pub model: PathBuf,
    pub workers: u32,
    pub listen: Vec<SocketAddr>,
    pub backend: BackendChoice,
    pub ipc: IpcChoice,
    pub devices: Vec<u32>,
    pub entry: String,
    pub command: Vec<String>,
    pub timeout: Duration,
    pub graceful_timeout: Duration,
    pub allow_uids: Vec<u32>,
    /// When workers are recycled (`--max-requests`, `--max-requests-jitter`, `--max-rss`).
    pub recycle: policy::RecycleLimits,
}

/// Runs a service until it is stopped. Returns the exit code.
pub fn run(cfg: Config) -> anyhow::Result<i32> {
    zygote_runtime::rundir::prepare(&cfg.runtime_dir)?;
    let admin_path = cfg.runtime_dir.join(crate::paths::SUPERVISOR_SOCKET);
    if UnixStream::connect(&admin_path).is_ok() {
        bail!(
            "a service is already running in {} (zygote stop --runtime-dir {0} stops it)",
            cfg.runtime_dir.display()
        );
    }
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        l.set_nonblocking(true)?;
        listeners.push(l);
    }
    let admin = admin::Admin::bind(&admin_path)
        .with_context(|| format!("binding {}", admin_path.display()))?;
    let spec = zygote::ZygoteSpec {
        runtime_dir: cfg.runtime_dir.clone(),
        model: cfg.model.clone(),
        backend: cfg.backend,
        allow_uids: cfg.allow_uids.clone(),
        command: cfg.command.clone(),
        expect_digest: None,
        start_timeout: Duration::from_secs(300),
        serve_app: cfg.entry == "app" && cfg.command.is_empty(),
    };
    let os = os::Os::new(listeners, admin, spec)?;
    let listen = os.listen_addrs();
    let mut svc = Service::new(cfg, listen, os);
    let result = serve(&mut svc);
    let _ = std::fs::remove_file(&admin_path);
    result
}

/// The event loop: inputs to the service, answers to the admin clients, timers.
fn serve(svc: &mut Service<os::Os>) -> anyhow::Result<i32> {
    svc.start()?;
    while !svc.done() {
        for input in svc.effects().wait(TICK)? {
            if let Some((conn, resp)) = svc.input(input) {
                svc.effects().answer(conn, &resp);
            }
        }
        svc.tick();
    }
    Ok(match svc.finish() {
        Some(reason) => {
            eprintln!("zygote: {reason}");
            1
        }
        None => 0,
    })
}
