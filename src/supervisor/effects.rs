//! What the supervisor does to the world, and what the world tells it.
//!
//! [`Effects`] is every action [`super::service::Service`] takes: spawning through the zygote,
//! signalling and draining children, starting and stopping a zygote, gating and closing the
//! listeners, reading the
//! clock, logging. [`super::os::Os`] does them for real; the unit tests use the recording fake
//! in [`super::fake`]. [`Input`] is what the event loop hands the service: signals, control
//! messages, deaths and exit statuses, admin requests, already decoded.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zygote_runtime::procfs::Memory;
use zygote_runtime::protocol::{AdminRequest, ChildMessage, WorkerId};

use super::policy::{Cause, Role};

/// A child to spawn, as the service decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnRequest {
    pub role: Role,
    pub entry: String,
    pub args: Vec<String>,
    pub device: u32,
    /// Whether it gets the listeners (workers and spares do, owners do not).
    pub listeners: bool,
    /// A warm spare: ready, but not accepting until [`Effects::activate`].
    pub spare: bool,
    /// The app template to fork it (its pid), instead of the zygote.
    pub via: Option<i32>,
}

/// A zygote that started and serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZygoteInfo {
    pub pid: i32,
    pub started: Instant,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// The signal, by name or number.
    Signal(String),
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::Unknown => write!(f, "unknown status"),
        }
    }
}

impl Exit {
    /// What the exit counts as, when it is a restart.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Exit::Code(_) => Some(Cause::Exit),
            Exit::Signal(_) => Some(Cause::Signal),
            Exit::Unknown => None,
        }
    }
}

/// An admin connection waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdminConn(pub usize);

/// A `/metrics` connection waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScrapeConn(pub usize);

/// What the event loop hands the service.
#[derive(Debug)]
pub enum Input {
    /// SIGTERM, SIGINT or SIGHUP (SIGCHLD is turned into statuses by the loop).
    Signal(Signal),
    /// A message on a child's control channel.
    Message(i32, ChildMessage),
    /// A child's pidfd became readable: it is dead.
    Died(i32),
    /// An exit status: the zygote's `exited`, or one reaped here (an orphan, or the zygote).
    Status(i32, Exit),
    /// The zygote's `child_error`: the child failed before its entry ran.
    ChildError {
        pid: i32,
        stage: String,
        message: String,
    },
    /// A request on the admin socket.
    Admin(AdminConn, AdminRequest),
    /// A zygote launched by [`Effects::launch_zygote`] serves, or failed to (why).
    ZygoteStarted(Result<ZygoteInfo, String>),
    /// A complete `GET /metrics`: the event loop answers it with the service's snapshot.
    Scrape(ScrapeConn),
    /// A listener became readable while watched ([`Effects::watch_listeners`]): a connection
    /// waits in its queue.
    Connection,
}

/// What the service tells a service manager (systemd's `sd_notify`), each with a status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    /// Every worker serves (first start, or the end of a roll).
    Ready { status: String },
    /// A roll began.
    Reloading { status: String },
    /// A stop began.
    Stopping,
    /// The counts changed.
    Status(String),
}

/// Everything the service does outside itself.
pub trait Effects {
    /// The clock.
    fn now(&self) -> Instant;
    /// One log line, tagged like every other line of this process.
    fn log(&mut self, level: log::Level, line: std::fmt::Arguments<'_>);
    /// Starts the first zygote and waits until it serves.
    fn start_zygote(&mut self) -> anyhow::Result<ZygoteInfo>;
    /// Starts a new zygote without waiting: [`Input::ZygoteStarted`] says how it went.
    fn launch_zygote(&mut self) -> anyhow::Result<()>;
    /// Asks the zygote (or the app template `req.via`) for a child; returns its pid. Its
    /// deaths and messages come as inputs.
    fn spawn(&mut self, req: &SpawnRequest) -> anyhow::Result<i32>;
    /// Connects to the app template `pid`, which serves the zygote protocol on `socket` in
    /// the runtime directory: from now on spawns may go `via` it.
    fn connect_template(&mut self, pid: i32, socket: &str) -> anyhow::Result<()>;
    /// Sends `drain` on a child's control channel; false when it could not be sent.
    fn drain(&mut self, pid: i32, deadline: Duration) -> bool;
    /// Sends `activate` to a spare: it accepts from now on, as `worker`; false when it could
    /// not be sent.
    fn activate(&mut self, pid: i32, worker: WorkerId) -> bool;
    /// Signals a live child through its pidfd.
    fn signal(&mut self, pid: i32, signal: Signal);
    /// A dead child's fds can go.
    fn forget(&mut self, pid: i32);
    /// A stop begins: no new connection may be queued on the listeners from now on.
    fn stop_accepting(&mut self);
    /// No worker is left: close the listeners, so that new connections are refused.
    fn close_listeners(&mut self);
    /// While asleep: say [`Input::Connection`] when a connection is queued on a listener
    /// (none is accepted here: the workers of the wake accept it).
    fn watch_listeners(&mut self, on: bool);
    /// Asks the zygote to drop the weights it keeps (asleep, once no owner is left).
    fn release_weights(&mut self);
    /// `reload --model`: copies `path` into a new sealed memfd; the next
    /// [`Effects::launch_zygote`] starts a zygote on it (validating it). If that zygote serves,
    /// its model is the service's from then on; if it fails, the old one stays.
    fn prepare_model(&mut self, path: &std::path::Path) -> anyhow::Result<()>;
    /// Asks the zygote `pid` to shut down and waits for it (killed after a deadline); its
    /// children keep running. A new one is launched next.
    fn retire_zygote(&mut self, pid: i32);
    /// Asks the zygote (if one runs) to shut down and waits for it (killing it after a
    /// deadline); a zygote still starting is killed.
    fn stop_zygote(&mut self, pid: Option<i32>);
    /// The memory of a process, for `zygote status` and `--max-rss`.
    fn memory(&self, pid: i32) -> Option<Memory>;
    /// A random number (each worker's share of `--max-requests-jitter`).
    fn draw(&mut self) -> u64;
    /// Tells the service manager, if one listens (`NOTIFY_SOCKET`).
    fn notify(&mut self, n: Notify);
}
