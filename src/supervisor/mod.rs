//! `zygote start`: the supervisor.
//!
//! ```text
//! zygote start   <- this module: binds listeners, requests children, restarts, rolls, drains
//!  └── zygote     (started by us, spoken to over its socket like any client would)
//!       ├── owner
//!       └── worker N
//! ```
//!
//! The supervisor is one thread around one mio `Poll`: a signalfd (SIGTERM, SIGINT, SIGHUP,
//! SIGCHLD), the zygote connection, the admin socket, and per child its control channel and
//! pidfd. It is the children's subreaper, so when the zygote dies the workers keep serving and
//! become ours to reap while a new zygote starts. Every child's life hangs on its control
//! channel: if this process dies, every child ends.
//!
//! Worker states: `starting` (spawned, not ready) → `serving` (sent ready) → `draining` (asked
//! to finish and exit). A worker that dies while serving is replaced at once; one that dies
//! before it was ready is retried with backoff, and [`CRASH_LOOP_LIMIT`] such deaths in a row
//! stop the service with an error.

mod admin;
pub mod zygote;

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use zygote_runtime::backend::{BackendChoice, IpcChoice};
use zygote_runtime::client::SpawnFds;
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{
    ChildMessage, ParentMessage, ProcessStatus, Response, ServiceStatus,
};

use self::zygote::{ZygoteProc, ZygoteSpec};

/// Deaths before ready, in a row, that stop the service.
pub const CRASH_LOOP_LIMIT: u32 = 5;
/// Longest wait between retries of a worker that keeps failing before ready.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time a child gets from spawn to ready (model import, app start).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

const SIGNALS: Token = Token(0);
const ZYGOTE: Token = Token(1);
const ADMIN: Token = Token(2);
const FIRST_DYNAMIC: usize = 16;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Owner(u32),
    Worker(u32),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Owner(d) => write!(f, "owner {d}"),
            Role::Worker(w) => write!(f, "worker {w}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Serving,
    Draining,
}

#[derive(Debug)]
struct Proc {
    role: Role,
    pid: i32,
    pidfd: OwnedFd,
    control: UnixStream,
    reader: FrameReader,
    state: State,
    started: Instant,
    last_beat: Instant,
    served: u64,
    generation: Option<u64>,
    drain_deadline: Option<Instant>,
    ctl_token: Token,
    pid_token: Token,
    /// Replaces another process of the same role once ready (a roll).
    replaces: Option<i32>,
    detail: String,
}

#[derive(Debug, Default)]
struct SlotState {
    restarts: u32,
    failures_before_ready: u32,
    restart_at: Option<Instant>,
}

enum Tok {
    Control(i32),
    Pidfd(i32),
    Admin,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Stopping,
}

struct Supervisor {
    cfg: Config,
    poll: Poll,
    signals: SignalFd,
    listeners: Vec<TcpListener>,
    zygote: Option<ZygoteProc>,
    zygote_restarts: u32,
    zygote_restart_at: Option<Instant>,
    zygote_failures: u32,
    procs: HashMap<i32, Proc>,
    slots: HashMap<Role, SlotState>,
    tokens: HashMap<Token, Tok>,
    next_token: usize,
    exits: HashMap<i32, String>,
    awaiting_status: HashMap<i32, Role>,
    generation: u64,
    phase: Phase,
    started: Instant,
    admin: admin::Admin,
    ipc: Option<String>,
    backend_name: Option<String>,
    fatal: Option<String>,
    /// The first fatal reason: the service exits 1 with it.
    stop_reason: Option<String>,
    pending_rolls: Vec<i32>,
    /// Digest of the model the service started with; every restarted zygote must match it.
    model_digest: Option<String>,
    devnull: File,
}

/// Runs a service until it is stopped. Returns the exit code.
pub fn run(cfg: Config) -> anyhow::Result<i32> {
    zygote_server::server::prepare_runtime_dir(&cfg.runtime_dir)?;
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
    // Signals are read from a signalfd, so they must not be delivered the ordinary way.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd")?;
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    let poll = Poll::new()?;
    poll.registry().register(
        &mut SourceFd(&signals.as_fd().as_raw_fd()),
        SIGNALS,
        Interest::READABLE,
    )?;
    let admin = admin::Admin::bind(&admin_path, poll.registry(), ADMIN)?;
    let devnull = File::open("/dev/null")?;
    let mut sup = Supervisor {
        cfg,
        poll,
        signals,
        listeners,
        zygote: None,
        zygote_restarts: 0,
        zygote_restart_at: None,
        zygote_failures: 0,
        procs: HashMap::new(),
        slots: HashMap::new(),
        tokens: HashMap::new(),
        next_token: FIRST_DYNAMIC,
        exits: HashMap::new(),
        awaiting_status: HashMap::new(),
        generation: 0,
        phase: Phase::Starting,
        started: Instant::now(),
        admin,
        ipc: None,
        backend_name: None,
        fatal: None,
        stop_reason: None,
        pending_rolls: Vec::new(),
        model_digest: None,
        devnull,
    };
    sup.tokens.insert(ADMIN, Tok::Admin);
    let result = sup.main();
    let _ = std::fs::remove_file(&admin_path);
    result
}

impl Supervisor {
    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn devices(&self) -> Vec<u32> {
        if self.cfg.devices.is_empty() {
            vec![0]
        } else {
            self.cfg.devices.clone()
        }
    }

    fn zygote_spec(&self) -> ZygoteSpec {
        ZygoteSpec {
            runtime_dir: self.cfg.runtime_dir.clone(),
            model: self.cfg.model.clone(),
            backend: self.cfg.backend,
            allow_uids: self.cfg.allow_uids.clone(),
            command: self.cfg.command.clone(),
            expect_digest: self.model_digest.clone(),
            start_timeout: Duration::from_secs(300),
            serve_app: self.cfg.entry == "app" && self.cfg.command.is_empty(),
        }
    }

    fn main(&mut self) -> anyhow::Result<i32> {
        let z = zygote::start(&self.zygote_spec()).context("starting the zygote")?;
        self.adopt_zygote(z)?;
        for d in self.devices() {
            self.spawn(Role::Owner(d), None)?;
        }
        log::info!(
            "starting {} workers of entry {:?} on {}",
            self.cfg.workers,
            self.cfg.entry,
            self.cfg
                .listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut events = Events::with_capacity(128);
        loop {
            if let Some(reason) = self.fatal.take() {
                if self.phase != Phase::Stopping {
                    log::error!("{reason}; stopping the service");
                    self.begin_stop();
                }
                self.stop_reason.get_or_insert(reason);
            }
            if self.phase == Phase::Stopping && self.procs.is_empty() {
                return Ok(self.finish());
            }
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(100)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    ZYGOTE => self.on_zygote_events(),
                    t => match self.tokens.get(&t) {
                        Some(Tok::Control(pid)) => {
                            let pid = *pid;
                            self.on_control(pid)
                        }
                        Some(Tok::Pidfd(pid)) => {
                            let pid = *pid;
                            self.on_exit(pid)
                        }
                        Some(Tok::Admin) => self.on_admin(),
                        None => {}
                    },
                }
            }
            self.tick();
        }
    }

    fn adopt_zygote(&mut self, mut z: ZygoteProc) -> anyhow::Result<()> {
        let fd = z.client.fd().as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), ZYGOTE, Interest::READABLE)?;
        if self.model_digest.is_none() {
            let status = z
                .client
                .status()
                .context("asking the zygote for its model")?;
            self.model_digest = Some(status.model_digest);
        }
        // Events may already be buffered in the client from the hello exchange.
        let _ = z.client.poll();
        self.zygote = Some(z);
        Ok(())
    }

    fn spawn(&mut self, role: Role, replaces: Option<i32>) -> anyhow::Result<()> {
        let Some(z) = self.zygote.as_mut() else {
            bail!("no zygote to spawn {role} from");
        };
        let (mine, theirs) = UnixStream::pair().context("socketpair")?;
        let (entry, args, device, listeners): (String, Vec<String>, Option<u32>, Vec<_>) =
            match role {
                Role::Owner(d) => {
                    self.generation += 1;
                    let args = vec![
                        "--backend".into(),
                        self.cfg.backend.to_string(),
                        "--ipc".into(),
                        self.cfg.ipc.to_string(),
                        "--generation".into(),
                        self.generation.to_string(),
                    ];
                    ("owner".into(), args, Some(d), Vec::new())
                }
                Role::Worker(w) => {
                    let devices = if self.cfg.devices.is_empty() {
                        vec![0]
                    } else {
                        self.cfg.devices.clone()
                    };
                    let device = devices[w as usize % devices.len()];
                    (
                        self.cfg.entry.clone(),
                        Vec::new(),
                        Some(device),
                        self.listeners.iter().map(|l| l.as_fd()).collect(),
                    )
                }
            };
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let fds = SpawnFds {
            stdin: self.devnull.as_fd(),
            stdout: stdout.as_fd(),
            stderr: stderr.as_fd(),
            control: theirs.as_fd(),
            listeners,
        };
        let slot = match role {
            Role::Owner(d) | Role::Worker(d) => d,
        };
        let spawned = z
            .client
            .spawn(&entry, slot, &args, device, &fds)
            .with_context(|| format!("spawning {role}"))?;
        drop(theirs);
        mine.set_nonblocking(true)?;
        let ctl_token = self.token();
        let pid_token = self.token();
        self.poll.registry().register(
            &mut SourceFd(&mine.as_raw_fd()),
            ctl_token,
            Interest::READABLE,
        )?;
        self.poll.registry().register(
            &mut SourceFd(&spawned.pidfd.as_raw_fd()),
            pid_token,
            Interest::READABLE,
        )?;
        self.tokens.insert(ctl_token, Tok::Control(spawned.pid));
        self.tokens.insert(pid_token, Tok::Pidfd(spawned.pid));
        log::info!(
            "{role}: spawned pid {}{}",
            spawned.pid,
            replaces
                .map(|p| format!(" to replace pid {p}"))
                .unwrap_or_default()
        );
        let now = Instant::now();
        self.procs.insert(
            spawned.pid,
            Proc {
                role,
                pid: spawned.pid,
                pidfd: spawned.pidfd,
                control: mine,
                reader: FrameReader::default(),
                state: State::Starting,
                started: now,
                last_beat: now,
                served: 0,
                generation: None,
                drain_deadline: None,
                ctl_token,
                pid_token,
                replaces,
                detail: String::new(),
            },
        );
        // Answers to the spawn may have brought events along.
        self.drain_zygote_events();
        Ok(())
    }

    fn owners_ready(&self) -> bool {
        self.devices().iter().all(|d| {
            self.procs
                .values()
                .any(|p| p.role == Role::Owner(*d) && p.state == State::Serving)
        })
    }

    fn live(&self, role: Role) -> impl Iterator<Item = &Proc> {
        self.procs
            .values()
            .filter(move |p| p.role == role && p.state != State::Draining)
    }

    fn on_control(&mut self, pid: i32) {
        let mut msgs = Vec::new();
        let mut closed = false;
        if let Some(p) = self.procs.get_mut(&pid) {
            loop {
                match p.reader.read(&mut &p.control) {
                    Ok(ReadEvent::Frame(body)) => match frame::decode::<ChildMessage>(&body) {
                        Ok(m) => msgs.push(m),
                        Err(e) => log::warn!("{} (pid {pid}): bad control message: {e}", p.role),
                    },
                    Ok(ReadEvent::WouldBlock) => break,
                    Ok(ReadEvent::Eof) | Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&p.control.as_raw_fd()));
            }
        }
        for m in msgs {
            self.on_child_message(pid, m);
        }
    }

    fn on_child_message(&mut self, pid: i32, m: ChildMessage) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.last_beat = Instant::now();
        match m {
            ChildMessage::Ready {
                generation, detail, ..
            } => {
                if p.state != State::Starting {
                    return;
                }
                p.state = State::Serving;
                p.generation = generation;
                p.detail = detail.clone();
                let role = p.role;
                let replaces = p.replaces.take();
                log::info!(
                    "{role} (pid {pid}) ready in {} ms: {detail}",
                    p.started.elapsed().as_millis()
                );
                if let Role::Owner(_) = role {
                    self.ipc = field(&detail, "ipc");
                    self.backend_name = field(&detail, "backend");
                    let restarted = self.slots.get(&role).is_some_and(|s| s.restarts > 0);
                    if restarted && self.ipc.as_deref() == Some("legacy") {
                        // Legacy IPC memory died with the old owner: workers must re-import.
                        self.roll("the owner restarted with legacy CUDA IPC");
                    }
                }
                if let Some(s) = self.slots.get_mut(&role) {
                    s.failures_before_ready = 0;
                }
                if let Some(old) = replaces {
                    self.drain(old, "replaced by a new worker");
                }
                if self.phase == Phase::Starting && self.owners_ready() {
                    self.phase = Phase::Running;
                    for w in 0..self.cfg.workers {
                        if let Err(e) = self.spawn(Role::Worker(w), None) {
                            self.fatal = Some(format!("spawning worker {w}: {e:#}"));
                            return;
                        }
                    }
                }
                if self.phase == Phase::Running
                    && self.all_workers_serving()
                    && matches!(role, Role::Worker(_))
                {
                    log::info!("all {} workers serving", self.cfg.workers);
                }
            }
            ChildMessage::Heartbeat { served } => p.served = served,
            ChildMessage::Draining { in_flight } => {
                log::info!(
                    "{} (pid {pid}) draining, {in_flight} requests in flight",
                    p.role
                );
                p.state = State::Draining;
            }
        }
    }

    fn all_workers_serving(&self) -> bool {
        (0..self.cfg.workers).all(|w| {
            self.procs
                .values()
                .any(|p| p.role == Role::Worker(w) && p.state == State::Serving)
        })
    }

    fn drain(&mut self, pid: i32, why: &str) {
        let graceful = self.cfg.graceful_timeout;
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.state == State::Draining && p.drain_deadline.is_some() {
            return;
        }
        log::info!("{} (pid {pid}): draining ({why})", p.role);
        p.state = State::Draining;
        p.drain_deadline = Some(Instant::now() + graceful);
        let msg = ParentMessage::Drain {
            deadline_ms: graceful.as_millis() as u64,
        };
        let sent = frame::encode(&msg)
            .ok()
            .map(|b| zygote_runtime::client::write_all_nonblocking(&p.control, &b));
        if !matches!(sent, Some(Ok(()))) {
            // A child that cannot hear us (an exec'd program that never attached) gets SIGTERM.
            let _ = zygote_server::fork::pidfd_send_signal(p.pidfd.as_fd(), libc::SIGTERM);
        }
    }

    fn kill(&mut self, pid: i32, why: &str) {
        if let Some(p) = self.procs.get(&pid) {
            log::warn!("{} (pid {pid}): killing: {why}", p.role);
            let _ = zygote_server::fork::pidfd_send_signal(p.pidfd.as_fd(), libc::SIGKILL);
        }
    }

    fn on_exit(&mut self, pid: i32) {
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut SourceFd(&p.control.as_raw_fd()));
        let _ = reg.deregister(&mut SourceFd(&p.pidfd.as_raw_fd()));
        self.tokens.remove(&p.ctl_token);
        self.tokens.remove(&p.pid_token);
        // Orphans (their zygote died) are ours to reap; the zygote reports the others.
        self.reap();
        self.drain_zygote_events();
        let status = self.exits.remove(&pid).unwrap_or_else(|| {
            // The zygote's `exited` is on its way; log the status when it arrives.
            self.awaiting_status.insert(pid, p.role);
            "status to follow".into()
        });
        let lived = p.started.elapsed();
        let role = p.role;
        match p.state {
            State::Draining => log::info!("{role} (pid {pid}) exited after draining ({status})"),
            State::Serving | State::Starting if self.phase == Phase::Stopping => {
                log::info!("{role} (pid {pid}) exited while stopping ({status})")
            }
            State::Serving => {
                log::warn!(
                    "{role} (pid {pid}) died while serving ({status}) after {:.1}s; restarting it",
                    lived.as_secs_f64()
                );
                let s = self.slots.entry(role).or_default();
                s.restarts += 1;
                s.failures_before_ready = 0;
                s.restart_at = Some(Instant::now());
            }
            State::Starting => {
                let s = self.slots.entry(role).or_default();
                s.failures_before_ready += 1;
                s.restarts += 1;
                let n = s.failures_before_ready;
                if n >= CRASH_LOOP_LIMIT
                    || (self.phase == Phase::Starting && matches!(role, Role::Owner(_)))
                {
                    let what = if matches!(role, Role::Owner(_)) && self.phase == Phase::Starting {
                        format!("{role} (pid {pid}) failed before it was ready ({status}); see its error above")
                    } else {
                        format!("crash loop: {role} died {n} times in a row before it was ready (last: pid {pid}, {status})")
                    };
                    self.fatal = Some(what);
                    return;
                }
                let backoff = (Duration::from_millis(100) * 2u32.pow(n.saturating_sub(1).min(10)))
                    .min(MAX_BACKOFF);
                log::warn!(
                    "{role} (pid {pid}) died before it was ready ({status}); retry {n} in {} ms",
                    backoff.as_millis()
                );
                s.restart_at = Some(Instant::now() + backoff);
            }
        }
        if let Some(old) = p.replaces {
            // A replacement that died: the old one keeps serving, and the roll retries.
            log::warn!("the replacement for pid {old} died; pid {old} keeps serving");
            if let Some(s) = self.slots.get_mut(&role) {
                s.restart_at = s.restart_at.or(Some(Instant::now()));
            }
            self.pending_rolls.push(old);
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.reaped(pid.as_raw(), format!("exit code {code}"))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.reaped(pid.as_raw(), format!("signal {sig}"))
                }
                Ok(_) => {}
            }
        }
    }

    /// Keeps a child's exit status for `on_exit`, or logs it if `on_exit` already ran.
    fn record_exit(&mut self, pid: i32, status: String) {
        match self.awaiting_status.remove(&pid) {
            Some(role) => log::info!("{role} (pid {pid}) exit status: {status}"),
            None => {
                // A `child_error` comes before the `exited` of the same child: keep both.
                self.exits
                    .entry(pid)
                    .and_modify(|s| *s = format!("{s}; {status}"))
                    .or_insert(status);
            }
        }
    }

    fn reaped(&mut self, pid: i32, status: String) {
        if self.zygote.as_ref().is_some_and(|z| z.pid == pid) {
            self.on_zygote_death(status);
        } else {
            self.record_exit(pid, status);
        }
    }

    fn on_zygote_death(&mut self, status: String) {
        if let Some(z) = self.zygote.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&z.client.fd().as_raw_fd()));
            let lived = z.started.elapsed();
            if self.phase == Phase::Stopping {
                log::info!("zygote (pid {}) exited ({status})", z.pid);
                return;
            }
            self.zygote_restarts += 1;
            self.zygote_failures = if lived < Duration::from_secs(10) {
                self.zygote_failures + 1
            } else {
                1
            };
            if self.zygote_failures >= CRASH_LOOP_LIMIT {
                self.fatal = Some(format!(
                    "crash loop: the zygote died {} times in a row ({status})",
                    self.zygote_failures
                ));
                return;
            }
            let backoff = (Duration::from_millis(50)
                * 2u32.pow(self.zygote_failures.saturating_sub(1)))
            .min(MAX_BACKOFF);
            log::warn!(
                "zygote (pid {}) died ({status}); {} children keep running; restarting it in {} ms",
                z.pid,
                self.procs.len(),
                backoff.as_millis()
            );
            self.zygote_restart_at = Some(Instant::now() + backoff);
        }
    }

    fn on_zygote_events(&mut self) {
        let lost = match self.zygote.as_mut() {
            Some(z) => z.client.poll().is_err(),
            None => false,
        };
        self.drain_zygote_events();
        if lost {
            if let Some(z) = self.zygote.as_ref() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&z.client.fd().as_raw_fd()));
            }
            // The death itself is handled when SIGCHLD reaps it.
            self.reap();
        }
    }

    fn drain_zygote_events(&mut self) {
        let Some(z) = self.zygote.as_mut() else {
            return;
        };
        for ev in z.client.take_events() {
            match ev {
                Response::Exited {
                    pid, code, signal, ..
                } => {
                    let s = match (code, signal) {
                        (Some(c), _) => format!("exit code {c}"),
                        (_, Some(s)) => format!("signal {s}"),
                        _ => "unknown status".into(),
                    };
                    self.record_exit(pid, s);
                }
                Response::ChildError {
                    pid,
                    stage,
                    message,
                    ..
                } => {
                    log::error!("pid {pid} failed before its entry ran ({stage}): {message}");
                    self.record_exit(pid, format!("{stage} failed: {message}"));
                }
                other => log::debug!("zygote said {other:?}"),
            }
        }
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                Ok(Signal::SIGHUP) => self.roll("SIGHUP"),
                Ok(s @ (Signal::SIGTERM | Signal::SIGINT)) => {
                    log::info!("{s}: draining and stopping");
                    self.begin_stop();
                }
                _ => {}
            }
        }
    }

    fn roll(&mut self, why: &str) {
        if self.phase != Phase::Running {
            log::warn!("{why}: not rolling while {:?}", self.phase);
            return;
        }
        log::info!("{why}: rolling {} workers", self.cfg.workers);
        let olds: Vec<i32> = self
            .procs
            .values()
            .filter(|p| matches!(p.role, Role::Worker(_)) && p.state != State::Draining)
            .map(|p| p.pid)
            .collect();
        self.pending_rolls.extend(olds);
    }

    fn begin_stop(&mut self) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.phase = Phase::Stopping;
        self.pending_rolls.clear();
        let workers: Vec<i32> = self
            .procs
            .values()
            .filter(|p| matches!(p.role, Role::Worker(_)))
            .map(|p| p.pid)
            .collect();
        for pid in workers {
            self.drain(pid, "stopping");
        }
    }

    /// Timers: restarts, rolls, heartbeats, drain deadlines, the zygote's restart.
    fn tick(&mut self) {
        let now = Instant::now();
        if let Some(at) = self.zygote_restart_at {
            if now >= at {
                self.zygote_restart_at = None;
                match zygote::start(&self.zygote_spec()) {
                    Ok(z) => {
                        if let Err(e) = self.adopt_zygote(z) {
                            self.fatal = Some(format!("adopting the new zygote: {e:#}"));
                        } else {
                            log::info!("zygote restarted (restart {})", self.zygote_restarts);
                        }
                    }
                    Err(e) => {
                        self.zygote_failures += 1;
                        if self.zygote_failures >= CRASH_LOOP_LIMIT {
                            self.fatal = Some(format!("the zygote cannot be restarted: {e}"));
                        } else {
                            log::error!("restarting the zygote failed: {e}; retrying");
                            self.zygote_restart_at = Some(now + MAX_BACKOFF);
                        }
                    }
                }
            }
        }
        if self.phase == Phase::Stopping {
            self.tick_stopping(now);
            return;
        }
        // Restarts of owners and workers whose slot is empty.
        let mut due = Vec::new();
        for (role, s) in &self.slots {
            if s.restart_at.is_some_and(|t| now >= t) {
                due.push(*role);
            }
        }
        if self.zygote.is_some() {
            for role in due {
                if self.live(role).next().is_some() {
                    if let Some(s) = self.slots.get_mut(&role) {
                        s.restart_at = None;
                    }
                    continue;
                }
                if matches!(role, Role::Worker(_))
                    && !self.owners_ready()
                    && self.phase == Phase::Starting
                {
                    continue;
                }
                match self.spawn(role, None) {
                    Ok(()) => {
                        if let Some(s) = self.slots.get_mut(&role) {
                            s.restart_at = None;
                        }
                    }
                    Err(e) => {
                        log::error!("restarting {role}: {e:#}");
                        if let Some(s) = self.slots.get_mut(&role) {
                            s.restart_at = Some(now + Duration::from_millis(500));
                        }
                    }
                }
            }
            // Rolls: one replacement per old worker.
            let rolls: Vec<i32> = std::mem::take(&mut self.pending_rolls);
            for old in rolls {
                let Some(role) = self
                    .procs
                    .get(&old)
                    .filter(|p| p.state == State::Serving)
                    .map(|p| p.role)
                else {
                    continue;
                };
                if self.procs.values().any(|p| p.replaces == Some(old)) {
                    continue;
                }
                if let Err(e) = self.spawn(role, Some(old)) {
                    log::error!("rolling {role}: {e:#}");
                    self.pending_rolls.push(old);
                }
            }
        }
        // Heartbeats and ready deadlines.
        let timeout = self.cfg.timeout;
        let mut kills = Vec::new();
        for p in self.procs.values() {
            match p.state {
                State::Serving if now.duration_since(p.last_beat) > timeout => kills.push((
                    p.pid,
                    format!(
                        "no heartbeat for {:.1}s (--timeout {}s)",
                        now.duration_since(p.last_beat).as_secs_f64(),
                        timeout.as_secs()
                    ),
                )),
                State::Starting if now.duration_since(p.started) > READY_TIMEOUT => kills.push((
                    p.pid,
                    format!("not ready after {}s", READY_TIMEOUT.as_secs()),
                )),
                State::Draining if p.drain_deadline.is_some_and(|d| now > d) => {
                    kills.push((p.pid, "drain deadline passed".into()))
                }
                _ => {}
            }
        }
        for (pid, why) in kills {
            self.kill(pid, &why);
        }
    }

    fn tick_stopping(&mut self, now: Instant) {
        let workers_left = self
            .procs
            .values()
            .any(|p| matches!(p.role, Role::Worker(_)));
        if !workers_left {
            let owners: Vec<i32> = self
                .procs
                .values()
                .filter(|p| matches!(p.role, Role::Owner(_)) && p.drain_deadline.is_none())
                .map(|p| p.pid)
                .collect();
            for pid in owners {
                self.drain(pid, "stopping");
            }
        }
        let late: Vec<i32> = self
            .procs
            .values()
            .filter(|p| p.drain_deadline.is_some_and(|d| now > d))
            .map(|p| p.pid)
            .collect();
        for pid in late {
            self.kill(pid, "drain deadline passed");
        }
    }

    fn finish(&mut self) -> i32 {
        if let Some(mut z) = self.zygote.take() {
            let pid = z.pid;
            if let Err(e) = z.client.shutdown() {
                log::warn!("asking the zygote to shut down: {e}");
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                        let _ =
                            frame::wait_readable(self.signals.as_fd(), Duration::from_millis(50));
                        while let Ok(Some(_)) = self.signals.read_signal() {}
                    }
                    Ok(WaitStatus::StillAlive) => {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                        let _ = waitpid(Pid::from_raw(pid), None);
                        break;
                    }
                    _ => break,
                }
            }
        }
        self.reap();
        match self.stop_reason.take() {
            Some(reason) => {
                log::error!("service stopped: {reason}");
                eprintln!("zygote: {reason}");
                1
            }
            None => {
                log::info!("service stopped");
                0
            }
        }
    }

    fn on_admin(&mut self) {
        while let Some(req) = self.admin.next_request() {
            use zygote_runtime::protocol::{AdminRequest, AdminResponse};
            let (conn, req) = req;
            let resp = match req {
                AdminRequest::Status { id } => AdminResponse::Status {
                    id,
                    service: self.status(),
                },
                AdminRequest::Stop { id } => {
                    log::info!("stop requested");
                    self.begin_stop();
                    AdminResponse::Ok { id }
                }
                AdminRequest::Reload { id } => {
                    self.roll("reload requested");
                    AdminResponse::Ok { id }
                }
            };
            self.admin.answer(conn, &resp);
        }
    }

    fn status(&self) -> ServiceStatus {
        let now = Instant::now();
        let mem = |pid: i32| zygote_runtime::procfs::memory(pid);
        let me = std::process::id() as i32;
        let mut processes = vec![ProcessStatus {
            role: "supervisor".into(),
            slot: None,
            pid: me,
            state: match self.phase {
                Phase::Starting => "starting",
                Phase::Running => "running",
                Phase::Stopping => "stopping",
            }
            .into(),
            restarts: 0,
            pss_kib: mem(me).map(|m| m.pss_kib),
            rss_kib: mem(me).map(|m| m.rss_kib),
            age_ms: self.started.elapsed().as_millis() as u64,
            served: None,
        }];
        match &self.zygote {
            Some(z) => processes.push(ProcessStatus {
                role: "zygote".into(),
                slot: None,
                pid: z.pid,
                state: "running".into(),
                restarts: self.zygote_restarts,
                pss_kib: mem(z.pid).map(|m| m.pss_kib),
                rss_kib: mem(z.pid).map(|m| m.rss_kib),
                age_ms: z.started.elapsed().as_millis() as u64,
                served: None,
            }),
            None => processes.push(ProcessStatus {
                role: "zygote".into(),
                slot: None,
                pid: 0,
                state: "restarting".into(),
                restarts: self.zygote_restarts,
                pss_kib: None,
                rss_kib: None,
                age_ms: 0,
                served: None,
            }),
        }
        let mut procs: Vec<&Proc> = self.procs.values().collect();
        procs.sort_by_key(|p| {
            (
                matches!(p.role, Role::Worker(_)),
                match p.role {
                    Role::Owner(d) | Role::Worker(d) => d,
                },
                p.started,
            )
        });
        for p in procs {
            let (role, slot) = match p.role {
                Role::Owner(d) => ("owner", d),
                Role::Worker(w) => ("worker", w),
            };
            let m = mem(p.pid);
            processes.push(ProcessStatus {
                role: role.into(),
                slot: Some(slot),
                pid: p.pid,
                state: match p.state {
                    State::Starting => "starting",
                    State::Serving => "serving",
                    State::Draining => "draining",
                }
                .into(),
                restarts: self.slots.get(&p.role).map(|s| s.restarts).unwrap_or(0),
                pss_kib: m.map(|m| m.pss_kib),
                rss_kib: m.map(|m| m.rss_kib),
                age_ms: now.duration_since(p.started).as_millis() as u64,
                served: Some(p.served),
            });
        }
        ServiceStatus {
            runtime_dir: self.cfg.runtime_dir.display().to_string(),
            model: self.cfg.model.display().to_string(),
            backend: self
                .backend_name
                .clone()
                .unwrap_or_else(|| self.cfg.backend.to_string()),
            ipc: self.ipc.clone(),
            listen: self
                .listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .map(|a| a.to_string())
                .collect(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            processes,
        }
    }
}

/// `key=value` out of a ready detail line.
fn field(detail: &str, key: &str) -> Option<String> {
    detail.split_whitespace().find_map(|kv| {
        kv.strip_prefix(key)
            .and_then(|r| r.strip_prefix('='))
            .map(str::to_string)
    })
}
