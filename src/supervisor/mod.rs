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
//! | [`conns`] | what the admin socket and `--metrics` share: accept with a cap, a deadline per connection, one answer |
//! | [`scrape`] | the `--metrics` HTTP endpoint |
//! | [`notify`] | systemd's `sd_notify` protocol: ready, reloading, stopping, status, watchdog |
//! | [`metrics`] | `/metrics`'s snapshot and its encoding (the only user of prometheus-client) |
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
//!
//! With `--spares K` the service also keeps K warm spares: children spawned like workers
//! (listeners, weights, ready) that do not accept until they are sent `activate`. A worker that
//! dies serving, is killed for its heartbeat or is recycled is replaced by a ready spare at
//! once (the spare becomes that slot's worker); the pool is refilled after
//! [`policy::SPARE_REFILL_DELAY`].

mod admin;
mod conns;
mod effects;
mod exits;
#[cfg(test)]
mod fake;
#[allow(unsafe_code)]
mod gate;
mod metrics;
mod notify;
mod os;
pub mod policy;
mod scrape;
mod service;
mod status;
pub mod zygote;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use zygote_runtime::backend::{BackendChoice, HostWeightsForm, IpcChoice};

use self::effects::Input;
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
    /// The form of the host backend's compute copy (`--host-weights`), given to each owner.
    pub host_weights: HostWeightsForm,
    pub devices: Vec<u32>,
    pub entry: String,
    pub command: Vec<String>,
    /// `command` is the app template (`--app`): it is spawned once, and the workers are
    /// spawned through it (entry `app` on its socket) instead of through the zygote.
    pub template: bool,
    pub timeout: Duration,
    pub graceful_timeout: Duration,
    pub allow_uids: Vec<u32>,
    /// When workers are recycled (`--max-requests`, `--max-requests-jitter`, `--max-rss`).
    pub recycle: policy::RecycleLimits,
    /// Where `/metrics` is served (`--metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Sleep after this long without a request (`--idle-sleep`).
    pub idle_sleep: Option<Duration>,
    /// Warm spares kept ready, not accepting (`--spares`).
    pub spares: u32,
}

/// Runs a service until it is stopped. Returns the exit code. `activated` are the listeners
/// of a socket activation, by name: used instead of binding `--listen` (one named `metrics`
/// serves `/metrics`).
pub fn run(cfg: Config, activated: Vec<(String, TcpListener)>) -> anyhow::Result<i32> {
    zygote_runtime::rundir::prepare(&cfg.runtime_dir)?;
    let admin_path = cfg.runtime_dir.join(crate::paths::SUPERVISOR_SOCKET);
    if UnixStream::connect(&admin_path).is_ok() {
        bail!(
            "a service is already running in {} (zygote stop --runtime-dir {0} stops it)",
            cfg.runtime_dir.display()
        );
    }
    // The model's bytes, held here for the service's life and inherited by every zygote (a
    // restarted one maps these pages instead of a second copy); the zygote validates them.
    let model_memfd = std::sync::Arc::new(
        zygote_runtime::Model::seal_file(&cfg.model)
            .with_context(|| format!("reading the model {}", cfg.model.display()))?,
    );
    let notifier = notify::Notifier::from_env().context("NOTIFY_SOCKET")?;
    let (mut listeners, mut metrics_listener) = (Vec::new(), None);
    let inherited = !activated.is_empty();
    if !inherited {
        for addr in &cfg.listen {
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            listeners.push(l);
        }
    } else {
        let names: Vec<&str> = activated.iter().map(|(n, _)| n.as_str()).collect();
        log::info!(
            "socket activation: adopted {} inherited listener(s) ({}); --listen is not bound",
            names.len(),
            names.join(", ")
        );
        for (name, l) in activated {
            match name.as_str() {
                "metrics" => metrics_listener = Some(l),
                _ => listeners.push(l),
            }
        }
        if listeners.is_empty() {
            bail!("socket activation passed no listener for the service (only `metrics`)");
        }
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
        model_memfd: Some(model_memfd),
        start_timeout: Duration::from_secs(300),
        // Only when app workers will run: `--workers 0` (client mode) serves any model file.
        serve_app: cfg.entry == "app" && cfg.command.is_empty() && cfg.workers > 0,
    };
    let scrape = match (metrics_listener, cfg.metrics) {
        (Some(l), _) => Some(scrape::Scrape::adopt(l)),
        (None, Some(addr)) => {
            Some(scrape::Scrape::bind(addr).with_context(|| format!("binding --metrics {addr}"))?)
        }
        (None, None) => None,
    };
    let os = os::Os::new((listeners, inherited), admin, scrape, notifier, spec)?;
    if let Some(addr) = os.metrics_addr() {
        log::info!("serving metrics on http://{addr}/metrics");
    }
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
            if let Input::Scrape(conn) = input {
                let text = metrics::encode(svc.metrics());
                svc.effects()
                    .answer_scrape(conn, metrics::CONTENT_TYPE, &text);
                continue;
            }
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
