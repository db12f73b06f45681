//! The supervisor's effects on the real system, and its event loop's inputs.
//!
//! [`Os`] owns every fd of the supervisor: the mio `Poll`, the signalfd (SIGTERM, SIGINT,
//! SIGHUP, SIGCHLD, SIGTTIN, SIGTTOU), the listeners, the connection to the zygote, the admin socket, and per
//! child its control channel and pidfd. [`Os::wait`] turns their readiness into typed
//! [`Input`]s; the [`Effects`] methods do what [`super::service::Service`] decided.

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use zygote_runtime::client::{SpawnFds, ZygoteClient};
use zygote_runtime::procfs::Memory;
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{AdminResponse, ChildMessage, ParentMessage, Response, WorkerId};

use super::admin::Admin;
use super::effects::{
    AdminConn, Effects, Exit, Input, Notify, ScrapeConn, SpawnRequest, ZygoteInfo,
};
use super::notify::Notifier;
use super::policy::{self, Role};
use super::scrape::Scrape;
use super::zygote::{self, ZygoteProc, ZygoteSpec};

const SIGNALS: Token = Token(0);
const ZYGOTE: Token = Token(1);
const ADMIN: Token = Token(2);
const LAUNCH: Token = Token(3);
const METRICS: Token = Token(4);
/// Every listener, while the service sleeps.
const LISTENERS: Token = Token(5);
const FIRST_DYNAMIC: usize = 16;

/// What a dynamic token stands for.
#[derive(Debug, Clone, Copy)]
enum Tok {
    Control(i32),
    Pidfd(i32),
    /// The connection to the app template of this pid.
    Template(i32),
}

/// The fds of one child.
#[derive(Debug)]
struct ChildFds {
    pidfd: OwnedFd,
    control: UnixStream,
    reader: FrameReader,
    tokens: [Token; 2],
}

/// The supervisor's fds, and what it does with them.
#[derive(Debug)]
pub struct Os {
    poll: Poll,
    signals: SignalFd,
    listeners: Vec<TcpListener>,
    /// The listeners came from a socket activation: the manager keeps them open across our
    /// restarts, so a stop leaves new connections queued for the next instance.
    inherited: bool,
    spec: ZygoteSpec,
    zygote: Option<ZygoteProc>,
    /// A new zygote, started and not ready yet.
    launching: Option<zygote::Launch>,
    children: HashMap<i32, ChildFds>,
    /// The connections to the app templates, by pid (`--app`): workers are spawned on them.
    templates: HashMap<i32, (ZygoteClient, Token)>,
    tokens: HashMap<Token, Tok>,
    next_token: usize,
    admin: Admin,
    /// The `--metrics` endpoint, if asked for.
    scrape: Option<Scrape>,
    /// systemd's notification socket, if it runs us (`Type=notify`).
    notifier: Option<Notifier>,
    /// When the watchdog is pinged next.
    next_watchdog: Option<Instant>,
    devnull: File,
    /// The listeners are registered in the poll (the service sleeps).
    watching: bool,
    /// `reload --model`: the file and its sealed memfd, for the next zygote launched.
    next_model: Option<(
        std::path::PathBuf,
        std::sync::Arc<zygote_runtime::shm::SealedMemfd>,
    )>,
    /// The zygote being launched serves `next_model`.
    launching_next: bool,
    /// Events a retired zygote had sent about its children, for the next [`Os::wait`].
    retired_events: Vec<Input>,
}

impl Os {
    /// Takes the bound listeners, the admin socket and the metrics endpoint; blocks the
    /// signals it reads into a signalfd and makes this process the subreaper of everything
    /// below it.
    pub fn new(
        (listeners, inherited): (Vec<TcpListener>, bool),
        mut admin: Admin,
        mut scrape: Option<Scrape>,
        notifier: Option<Notifier>,
        spec: ZygoteSpec,
    ) -> anyhow::Result<Self> {
        // Signals are read from a signalfd, so they must not be delivered the ordinary way.
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGCHLD,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
        ] {
            mask.add(s);
        }
        mask.thread_block().context("blocking signals")?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("signalfd")?;
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
        let poll = Poll::new()?;
        let reg = poll.registry();
        reg.register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        admin.register(reg, ADMIN)?;
        if let Some(s) = scrape.as_mut() {
            s.register(reg, METRICS)?;
        }
        Ok(Self {
            poll,
            signals,
            listeners,
            inherited,
            spec,
            zygote: None,
            launching: None,
            children: HashMap::new(),
            templates: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_DYNAMIC,
            admin,
            scrape,
            next_watchdog: notifier
                .as_ref()
                .and_then(|n| n.watchdog)
                .map(|_| Instant::now()),
            notifier,
            devnull: File::open("/dev/null")?,
            watching: false,
            next_model: None,
            launching_next: false,
            retired_events: Vec::new(),
        })
    }

    /// The listeners' addresses.
    pub fn listen_addrs(&self) -> Vec<String> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .collect()
    }

    /// Waits up to `timeout` for something to happen; returns what did, in order (the exit
    /// status of a child before its death, when both are known).
    pub fn wait(&mut self, timeout: Duration) -> std::io::Result<Vec<Input>> {
        let mut out = Vec::new();
        // Answers to a spawn may have brought events along: they are buffered in the client.
        self.zygote_events(&mut out);
        self.template_events(&mut out);
        let timeout = if out.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        self.ping_watchdog();
        let timeout = self.next_watchdog.map_or(timeout, |at| {
            timeout.min(at.saturating_duration_since(Instant::now()))
        });
        // Silent admin clients lose their connection, never the loop's time.
        self.admin.expire(Instant::now());
        if let Some(s) = self.scrape.as_mut() {
            s.expire(Instant::now());
        }
        // A launched zygote's deadline is checked even while it stays silent.
        if self
            .launching
            .as_ref()
            .is_some_and(|l| Instant::now() >= l.deadline())
        {
            self.launch_progress(&mut out);
        }
        let mut events = Events::with_capacity(128);
        match self.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(out),
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                SIGNALS => self.signals(&mut out),
                ZYGOTE => self.zygote_readable(&mut out),
                ADMIN => self.admin.accept(Instant::now(), &mut out),
                LAUNCH => self.launch_progress(&mut out),
                LISTENERS => {
                    if !out.iter().any(|i| matches!(i, Input::Connection)) {
                        out.push(Input::Connection);
                    }
                }
                METRICS => {
                    if let Some(s) = self.scrape.as_mut() {
                        s.accept(Instant::now(), &mut out);
                    }
                }
                t => match self.tokens.get(&t).copied() {
                    Some(Tok::Control(pid)) => self.control(pid, &mut out),
                    Some(Tok::Template(pid)) => self.template_readable(pid, &mut out),
                    Some(Tok::Pidfd(pid)) => {
                        // Orphans (their zygote died) are ours to reap; the zygote reports the
                        // others. Either way, the status first.
                        self.reap(&mut out);
                        self.zygote_events(&mut out);
                        self.template_events(&mut out);
                        out.push(Input::Died(pid));
                    }
                    None if self.admin.owns(t) => self.admin.ready(t, &mut out),
                    None => match self.scrape.as_mut() {
                        Some(s) if s.owns(t) => s.ready(t, &mut out),
                        _ => {}
                    },
                },
            }
        }
        Ok(out)
    }

    /// Sends an admin answer.
    pub fn answer(&mut self, conn: AdminConn, resp: &AdminResponse) {
        self.admin.answer(conn, resp);
    }

    /// `WATCHDOG=1` when it is due: only a loop that turns pings.
    fn ping_watchdog(&mut self) {
        let (Some(n), Some(at)) = (self.notifier.as_ref(), self.next_watchdog) else {
            return;
        };
        let now = Instant::now();
        if now >= at {
            n.send("WATCHDOG=1");
            self.next_watchdog = n.watchdog.map(|every| now + every);
        }
    }

    /// Sends the metrics text to a scrape.
    pub fn answer_scrape(&mut self, conn: ScrapeConn, content_type: &str, body: &str) {
        if let Some(s) = self.scrape.as_mut() {
            s.answer(conn, content_type, body);
        }
    }

    /// The metrics endpoint's address, as bound.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.scrape.as_ref().and_then(Scrape::local_addr)
    }

    fn signals(&mut self, out: &mut Vec<Input>) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(out),
                Ok(s) => out.push(Input::Signal(s)),
                Err(_) => {}
            }
        }
    }

    fn zygote_readable(&mut self, out: &mut Vec<Input>) {
        let lost = self
            .zygote
            .as_mut()
            .is_some_and(|z| z.client.poll().is_err());
        self.zygote_events(out);
        if lost {
            if let Some(z) = self.zygote.as_ref() {
                let fd = z.client.fd().as_raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            }
            // The death itself is handled when it is reaped.
            self.reap(out);
        }
    }

    fn zygote_events(&mut self, out: &mut Vec<Input>) {
        out.append(&mut self.retired_events);
        let Some(z) = self.zygote.as_mut() else {
            return;
        };
        forker_events(z.client.take_events(), "zygote", out);
    }

    /// An app template's connection is readable: the exits of the workers it forked.
    fn template_readable(&mut self, pid: i32, out: &mut Vec<Input>) {
        let Some((client, _)) = self.templates.get_mut(&pid) else {
            return;
        };
        let lost = client.poll().is_err();
        self.template_events(out);
        if lost {
            // Its workers are ours to reap from now on (we are their subreaper).
            self.drop_template(pid);
            self.reap(out);
        }
    }

    fn template_events(&mut self, out: &mut Vec<Input>) {
        for (client, _) in self.templates.values_mut() {
            forker_events(client.take_events(), "template", out);
        }
    }

    fn drop_template(&mut self, pid: i32) {
        if let Some((client, token)) = self.templates.remove(&pid) {
            let fd = client.fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            self.tokens.remove(&token);
        }
    }

    fn control(&mut self, pid: i32, out: &mut Vec<Input>) {
        let Some(c) = self.children.get_mut(&pid) else {
            return;
        };
        loop {
            match c.reader.read(&mut &c.control) {
                Ok(ReadEvent::Frame(body)) => match frame::decode::<ChildMessage>(&body) {
                    Ok(m) => out.push(Input::Message(pid, m)),
                    Err(e) => log::warn!("pid {pid}: bad control message: {e}"),
                },
                Ok(ReadEvent::WouldBlock) => break,
                Ok(ReadEvent::Eof) | Err(_) => {
                    let fd = c.control.as_raw_fd();
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                    break;
                }
            }
        }
    }

    /// Reaps every child of ours that ended: orphans, and the zygote (whose connection goes).
    fn reap(&mut self, out: &mut Vec<Input>) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid.as_raw(), Exit::Signal(sig.to_string()))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if self.zygote.as_ref().is_some_and(|z| z.pid == pid) {
                if let Some(z) = self.zygote.take() {
                    let fd = z.client.fd().as_raw_fd();
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                }
            }
            out.push(Input::Status(pid, status));
        }
    }

    /// A zygote that serves becomes the one spawns go to.
    fn adopt(&mut self, mut z: ZygoteProc) -> anyhow::Result<ZygoteInfo> {
        if std::mem::take(&mut self.launching_next) {
            // A reloaded model: it serves, so it is the service's from now on, and every later
            // zygote must find its digest.
            let status = z.client.status();
            match (status, self.next_model.take()) {
                (Ok(status), Some((path, memfd))) => {
                    self.spec.model = path;
                    self.spec.model_memfd = Some(memfd);
                    self.spec.expect_digest = Some(status.model_digest);
                }
                (status, _) => {
                    let _ = nix::sys::signal::kill(Pid::from_raw(z.pid), Signal::SIGKILL);
                    let e = status
                        .err()
                        .map_or("no model prepared".into(), |e| e.to_string());
                    anyhow::bail!("asking the new zygote for its model: {e}");
                }
            }
        }
        if self.spec.expect_digest.is_none() {
            // Every restarted zygote must serve the model the service started with.
            match z.client.status() {
                Ok(status) => self.spec.expect_digest = Some(status.model_digest),
                Err(e) => {
                    // A zygote we cannot use must not go on holding the socket.
                    let _ = nix::sys::signal::kill(Pid::from_raw(z.pid), Signal::SIGKILL);
                    return Err(e).context("asking the zygote for its model");
                }
            }
        }
        let fd = z.client.fd().as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), ZYGOTE, Interest::READABLE)?;
        // Events may already be buffered in the client from the hello exchange.
        let _ = z.client.poll();
        let info = ZygoteInfo {
            pid: z.pid,
            started: z.started,
        };
        self.zygote = Some(z);
        Ok(info)
    }

    /// Reads what a launched zygote said so far; once it serves or failed, says so.
    fn launch_progress(&mut self, out: &mut Vec<Input>) {
        let Some(launch) = self.launching.as_mut() else {
            return;
        };
        let result = match launch.progress() {
            Ok(None) => return,
            Ok(Some(z)) => self.adopt(z).map_err(|e| format!("{e:#}")),
            Err(e) => Err(e.to_string()),
        };
        if result.is_err() && std::mem::take(&mut self.launching_next) {
            // The reloaded model was refused: the next zygote serves the old one again.
            self.next_model = None;
        }
        if let Some(launch) = self.launching.take() {
            let fd = launch.fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        out.push(Input::ZygoteStarted(result));
    }

    /// Writes one control message to a live child; false when it could not be written.
    fn tell(&self, pid: i32, msg: &ParentMessage) -> bool {
        let Some(c) = self.children.get(&pid) else {
            return false;
        };
        frame::encode(msg)
            .is_ok_and(|b| zygote_runtime::client::write_all_nonblocking(&c.control, &b).is_ok())
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }
}

/// The events of a forker's connection (the zygote's, or an app template's) as inputs.
fn forker_events(events: Vec<Response>, who: &str, out: &mut Vec<Input>) {
    for ev in events {
        match ev {
            Response::Exited {
                pid, code, signal, ..
            } => out.push(Input::Status(pid, exit_status(code, signal))),
            Response::ChildError {
                pid,
                stage,
                message,
                ..
            } => out.push(Input::ChildError {
                pid,
                stage,
                message,
            }),
            other => log::debug!("{who} said {other:?}"),
        }
    }
}

/// An exit as the zygote reports it.
fn exit_status(code: Option<i32>, signal: Option<i32>) -> Exit {
    match (code, signal) {
        (Some(c), _) => Exit::Code(c),
        (_, Some(s)) => Exit::Signal(s.to_string()),
        _ => Exit::Unknown,
    }
}

impl Effects for Os {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn log(&mut self, level: log::Level, line: std::fmt::Arguments<'_>) {
        log::log!(level, "{line}");
    }

    fn start_zygote(&mut self) -> anyhow::Result<ZygoteInfo> {
        let z = zygote::start(&self.spec).context("starting the zygote")?;
        self.adopt(z)
    }

    fn launch_zygote(&mut self) -> anyhow::Result<()> {
        let spec = match &self.next_model {
            Some((path, memfd)) => ZygoteSpec {
                model: path.clone(),
                model_memfd: Some(memfd.clone()),
                expect_digest: None,
                ..self.spec.clone()
            },
            None => self.spec.clone(),
        };
        let launch = zygote::launch(&spec);
        if launch.is_err() {
            self.next_model = None;
        }
        let launch = launch.context("starting a zygote")?;
        self.launching_next = self.next_model.is_some();
        self.poll.registry().register(
            &mut SourceFd(&launch.fd().as_raw_fd()),
            LAUNCH,
            Interest::READABLE,
        )?;
        self.launching = Some(launch);
        Ok(())
    }

    fn spawn(&mut self, req: &SpawnRequest) -> anyhow::Result<i32> {
        let role = req.role;
        let client = match req.via {
            Some(t) => match self.templates.get_mut(&t) {
                Some((c, _)) => c,
                None => anyhow::bail!("no connection to the app template (pid {t}) for {role}"),
            },
            None => match self.zygote.as_mut() {
                Some(z) => &mut z.client,
                None => anyhow::bail!("no zygote to spawn {role} from"),
            },
        };
        let (mine, theirs) = UnixStream::pair().context("socketpair")?;
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let listeners = match req.listeners {
            true => self.listeners.iter().map(|l| l.as_fd()).collect(),
            false => Vec::new(),
        };
        let fds = SpawnFds {
            stdin: self.devnull.as_fd(),
            stdout: stdout.as_fd(),
            stderr: stderr.as_fd(),
            control: theirs.as_fd(),
            listeners,
        };
        // An owner is no worker: its spawn's worker id is only a label, its device (what the
        // zygote's `status` has always listed for it).
        let worker = match role {
            Role::Worker(w) => w,
            Role::Owner(device) => WorkerId(device),
            Role::Spare(k) => WorkerId(policy::SPARE_ID_BASE + k),
            Role::Template => WorkerId(0),
        };
        let spawned = client
            .spawn_as(
                &req.entry,
                worker,
                &req.args,
                Some(req.device),
                req.spare,
                &fds,
            )
            .with_context(|| format!("spawning {role}"))?;
        drop(theirs);
        mine.set_nonblocking(true)?;
        let tokens = [self.token(), self.token()];
        let reg = self.poll.registry();
        reg.register(
            &mut SourceFd(&mine.as_raw_fd()),
            tokens[0],
            Interest::READABLE,
        )?;
        reg.register(
            &mut SourceFd(&spawned.pidfd.as_raw_fd()),
            tokens[1],
            Interest::READABLE,
        )?;
        self.tokens.insert(tokens[0], Tok::Control(spawned.pid));
        self.tokens.insert(tokens[1], Tok::Pidfd(spawned.pid));
        self.children.insert(
            spawned.pid,
            ChildFds {
                pidfd: spawned.pidfd,
                control: mine,
                reader: FrameReader::default(),
                tokens,
            },
        );
        Ok(spawned.pid)
    }

    fn connect_template(&mut self, pid: i32, socket: &str) -> anyhow::Result<()> {
        let path = self.spec.runtime_dir.join(socket);
        let mut client = ZygoteClient::connect(&path, "zygote start")
            .with_context(|| format!("connecting to the app template at {}", path.display()))?;
        let token = self.token();
        let fd = client.fd().as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)?;
        let _ = client.poll();
        self.tokens.insert(token, Tok::Template(pid));
        self.templates.insert(pid, (client, token));
        Ok(())
    }

    fn drain(&mut self, pid: i32, deadline: Duration) -> bool {
        let msg = ParentMessage::Drain {
            deadline_ms: deadline.as_millis() as u64,
        };
        self.tell(pid, &msg)
    }

    fn activate(&mut self, pid: i32, worker: WorkerId) -> bool {
        self.tell(pid, &ParentMessage::Activate { worker })
    }

    fn signal(&mut self, pid: i32, signal: Signal) {
        if let Some(c) = self.children.get(&pid) {
            let _ = zygote_runtime::pidfd::send_signal(c.pidfd.as_fd(), signal as i32);
        }
    }

    fn forget(&mut self, pid: i32) {
        if let Some(c) = self.children.remove(&pid) {
            let reg = self.poll.registry();
            let _ = reg.deregister(&mut SourceFd(&c.control.as_raw_fd()));
            let _ = reg.deregister(&mut SourceFd(&c.pidfd.as_raw_fd()));
            for t in c.tokens {
                self.tokens.remove(&t);
            }
        }
        self.drop_template(pid);
    }

    fn stop_accepting(&mut self) {
        if self.inherited {
            // The manager holds the sockets: what arrives now waits in their queue for the
            // next instance instead of being reset, so the door stays open.
            log::info!("the listeners are the manager's: new connections queue for the next start");
            return;
        }
        for l in &self.listeners {
            if let Err(e) = super::gate::refuse_new_connections(l.as_fd()) {
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                log::warn!(
                    "gating listener {addr}: {e}; connections made during the stop may be reset"
                );
            }
        }
    }

    fn close_listeners(&mut self) {
        // The workers share these open files: a registration would outlive our fds.
        self.watch_listeners(false);
        if !self.listeners.is_empty() {
            log::info!("no worker left: closing the listeners");
            self.listeners.clear();
        }
    }

    fn watch_listeners(&mut self, on: bool) {
        if on == self.watching {
            return;
        }
        self.watching = on;
        let reg = self.poll.registry();
        for l in &self.listeners {
            let fd = l.as_raw_fd();
            // Readable means a connection is queued; it stays queued for a worker to accept.
            // Registering reports one already queued, so none is missed between the two.
            let done = if on {
                reg.register(&mut SourceFd(&fd), LISTENERS, Interest::READABLE)
            } else {
                reg.deregister(&mut SourceFd(&fd))
            };
            if let Err(e) = done {
                log::warn!("watching the listener (fd {fd}) for connections: {e}");
            }
        }
    }

    fn release_weights(&mut self) {
        if let Some(z) = self.zygote.as_mut() {
            if let Err(e) = z.client.release_weights() {
                log::warn!("asking the zygote to release the kept weights: {e}");
            }
        }
    }

    fn prepare_model(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        let memfd = zygote_runtime::Model::seal_file(path)?;
        self.next_model = Some((path.to_path_buf(), std::sync::Arc::new(memfd)));
        Ok(())
    }

    fn retire_zygote(&mut self, pid: i32) {
        if let Some(mut z) = self.zygote.take() {
            let fd = z.client.fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            if let Err(e) = z.client.shutdown() {
                log::warn!("asking the zygote to shut down: {e}");
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            // Exits it reported before it went are still the loop's to hear.
            let _ = z.client.poll();
            forker_events(z.client.take_events(), "zygote", &mut self.retired_events);
        }
        // Waited for here (only this pid: the others' statuses stay for the loop), so that the
        // next zygote finds its socket free.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
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

    fn stop_zygote(&mut self, pid: Option<i32>) {
        if let Some(launch) = self.launching.take() {
            launch.abandon();
        }
        let Some(pid) = pid else {
            return self.reap(&mut Vec::new());
        };
        if let Some(mut z) = self.zygote.take() {
            if let Err(e) = z.client.shutdown() {
                log::warn!("asking the zygote to shut down: {e}");
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    let _ = frame::wait_readable(self.signals.as_fd(), Duration::from_millis(50));
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
        // Whatever else ended meanwhile is reaped too; the service has stopped.
        self.reap(&mut Vec::new());
    }

    fn memory(&self, pid: i32) -> Option<Memory> {
        zygote_runtime::procfs::memory(pid)
    }

    fn notify(&mut self, n: Notify) {
        if let Some(notifier) = &self.notifier {
            let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .map_or(0, |t| {
                    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
                });
            notifier.send(&super::notify::line(&n, usec));
        }
    }

    fn draw(&mut self) -> u64 {
        // Spreading recycles needs no strong randomness: std's random hash keys (new ones for
        // each `RandomState`), fed the clock, are enough.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        h.write_u128(wall.map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        h.finish()
    }
}
