//! The supervisor's state machine: the children it runs, their slots, the phase of the
//! service, the zygote's restarts and the rolls in progress.
//!
//! [`Service`] reacts to [`Input`]s and to the passing of time ([`Service::tick`]); it decides
//! with [`super::policy`] and acts only through its [`Effects`], so the unit tests
//! (`service/tests.rs`) drive every path with a recording fake and a clock they move by hand.
//! This file holds the children's lives (spawn, ready, drain, kill);
//! `service/deaths.rs` their ends and the zygote's (deaths, exit statuses, restarts, crash
//! loops); `service/requests.rs` what operators ask (admin requests, rolls, scaling, the stop);
//! `service/sleep.rs` sleep and wake; `service/timers.rs` what time does (restarts, rolls'
//! spawns, deadlines).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::bail;
use log::Level;
use nix::sys::signal::Signal;
use zygote_runtime::protocol::{
    AdminResponse, ChildMessage, Latency, RestartReasons, ServedWeights, WorkerId,
};

use super::effects::{AdminConn, Effects, Input, Notify, SpawnRequest, ZygoteInfo};
use super::exits::Exits;
use super::metrics::{Histogram, REQUEST_LATENCY_BOUNDS, SPAWN_READY_BOUNDS};
use super::policy::{self, Phase, Role, State, Timers};
use super::Config;

/// Logs one line through the effects (so that the fake records it).
macro_rules! say {
    ($fx:expr, $level:ident, $($arg:tt)+) => {
        $fx.log(Level::$level, format_args!($($arg)+))
    };
}

/// One supervised child.
#[derive(Debug)]
pub(super) struct Child {
    /// A spare's turns into its new slot's [`Role::Worker`] when it is activated.
    pub role: Role,
    pub state: State,
    pub timers: Timers,
    pub served: u64,
    pub generation: Option<u64>,
    /// The pid this child replaces once it is ready, and why (a roll, a recycle).
    pub replaces: Option<(i32, policy::Cause)>,
    /// Requests it serves before it is recycled (`--max-requests`, with its jitter).
    pub request_limit: Option<u64>,
    /// A replacement was asked for (it is recycled): no more checks.
    pub recycling: bool,
    /// The latencies its last heartbeat carried, if it measures them.
    pub latency: Option<Latency>,
    /// Why the supervisor killed it, if it did (counted when it dies).
    pub killed_for: Option<policy::Cause>,
    /// SIGKILL was sent: it is not sent (or logged) again while the kernel tears it down.
    pub sigkilled: bool,
    /// An app template's number: it serves on `template-N.sock`.
    pub template: Option<u32>,
}

/// The history of one slot (a worker slot, or an owner's device).
#[derive(Debug, Default)]
pub(super) struct Slot {
    pub restarts: u32,
    pub failures_before_ready: u32,
    pub restart_at: Option<Instant>,
    /// Why its children were replaced.
    pub reasons: RestartReasons,
}

/// The supervisor's state, and its effects.
#[derive(Debug)]
pub struct Service<E: Effects> {
    pub(super) cfg: Config,
    pub(super) fx: E,
    /// The listeners' addresses, as bound (for `zygote status`).
    pub(super) listen: Vec<String>,
    pub(super) procs: BTreeMap<i32, Child>,
    pub(super) slots: BTreeMap<Role, Slot>,
    exits: Exits,
    pub(super) zygote: Option<ZygoteInfo>,
    pub(super) zygote_restarts: policy::ZygoteRestarts,
    zygote_restart_at: Option<Instant>,
    /// A new zygote was launched and is not ready yet.
    zygote_launching: bool,
    generation: u64,
    pub(super) phase: Phase,
    pub(super) started: Instant,
    /// What the owner said it serves with.
    pub(super) backend: Option<String>,
    pub(super) ipc: Option<String>,
    /// The first fatal reason: the service exits 1 with it.
    stop_reason: Option<String>,
    /// Serving workers that a roll or a recycle must replace, and why.
    pending_rolls: Vec<(i32, policy::Cause)>,
    /// Replacements since the start, by reason (kept when scaling drops a slot).
    pub(super) restart_totals: RestartReasons,
    /// Spawn to ready, of every child.
    pub(super) spawn_ready: Histogram,
    /// Bytes of weights each device's owner said it serves.
    pub(super) weights_bytes: BTreeMap<u32, u64>,
    /// Requests served by workers that are gone.
    pub(super) retired_served: u64,
    /// The latencies of the requests of workers that are gone.
    pub(super) retired_latency: Histogram,
    /// What the service manager was told: ready once, a roll in progress, the last status.
    told_ready: bool,
    pub(super) reloading: bool,
    told_status: Option<String>,
    /// Asleep, and a wake was asked for: it happens once the last child of the sleep exits.
    wake_requested: bool,
    /// Asleep, and the zygote was asked to drop the weights it keeps.
    weights_released: bool,
    /// When a worker's heartbeat last counted a new request (or the last wake): `--idle-sleep`.
    last_request: Instant,
    /// When the last wake began, until every worker serves.
    woke_at: Option<Instant>,
    /// The model file of each generation an owner was spawned for.
    pub(super) generation_models: BTreeMap<u64, std::path::PathBuf>,
    /// A `reload --model` in progress, and what the status shows of the last one.
    reload_stage: Option<reload::ReloadStage>,
    pub(super) model_reload: Option<zygote_runtime::protocol::ModelReload>,
    /// App templates spawned so far (each one's socket is numbered).
    templates: u32,
    /// Why the last reload's new app template failed, if it did (`zygote status`).
    pub(super) reload_error: Option<String>,
}

/// The entry an app template serves: the app, in a forked worker.
pub const TEMPLATE_ENTRY: &str = "app";

/// The socket app template `n` serves on, in the runtime directory.
pub fn template_socket(n: u32) -> String {
    format!("template-{n}.sock")
}

/// Adds a worker's latencies to a histogram of [`REQUEST_LATENCY_BOUNDS`] (counts of other
/// bounds, from a worker of another version, are left out).
pub fn add_latency(h: &mut Histogram, l: &Latency) {
    h.add(&l.counts, l.sum_us as f64 / 1e6);
}

impl<E: Effects> Service<E> {
    pub fn new(cfg: Config, listen: Vec<String>, fx: E) -> Self {
        let started = fx.now();
        Self {
            cfg,
            fx,
            listen,
            procs: BTreeMap::new(),
            slots: BTreeMap::new(),
            exits: Exits::default(),
            zygote: None,
            zygote_restarts: policy::ZygoteRestarts::default(),
            zygote_restart_at: None,
            zygote_launching: false,
            generation: 0,
            phase: Phase::Starting,
            started,
            backend: None,
            ipc: None,
            stop_reason: None,
            pending_rolls: Vec::new(),
            restart_totals: RestartReasons::default(),
            spawn_ready: Histogram::new(SPAWN_READY_BOUNDS),
            weights_bytes: BTreeMap::new(),
            retired_served: 0,
            retired_latency: Histogram::new(REQUEST_LATENCY_BOUNDS),
            told_ready: false,
            reloading: false,
            told_status: None,
            wake_requested: false,
            weights_released: false,
            last_request: started,
            woke_at: None,
            generation_models: BTreeMap::new(),
            reload_stage: None,
            model_reload: None,
            templates: 0,
            reload_error: None,
        }
    }

    pub fn effects(&mut self) -> &mut E {
        &mut self.fx
    }

    pub(super) fn devices(&self) -> Vec<u32> {
        if self.cfg.devices.is_empty() {
            vec![0]
        } else {
            self.cfg.devices.clone()
        }
    }

    /// Starts the zygote and the owners; the workers follow once every owner is ready.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let z = self.fx.start_zygote()?;
        self.zygote = Some(z);
        for d in self.devices() {
            self.spawn(Role::Owner(d), None)?;
        }
        if self.cfg.template {
            self.spawn(Role::Template, None)?;
        }
        let listen = self.listen.join(", ");
        say!(
            self.fx,
            Info,
            "starting {} workers of entry {:?} on {listen}",
            self.cfg.workers,
            self.cfg.entry
        );
        Ok(())
    }

    /// Whether the service stopped: stopping, and nothing left to wait for.
    pub fn done(&self) -> bool {
        self.phase == Phase::Stopping && self.procs.is_empty()
    }

    /// Ends the stop: the zygote goes. Returns the fatal reason, if the stop had one.
    pub fn finish(&mut self) -> Option<String> {
        let pid = self.zygote.take().map(|z| z.pid);
        self.fx.stop_zygote(pid);
        match self.stop_reason.take() {
            Some(reason) => {
                say!(self.fx, Error, "service stopped: {reason}");
                Some(reason)
            }
            None => {
                say!(self.fx, Info, "service stopped");
                None
            }
        }
    }

    /// Handles one input; an admin request returns its answer, for the loop to send.
    pub fn input(&mut self, input: Input) -> Option<(AdminConn, AdminResponse)> {
        let answer = self.handle(input);
        self.tell_manager();
        answer
    }

    /// The status line for the service manager: the workers' counts.
    pub(super) fn status_line(&self) -> String {
        let serving = self
            .procs
            .values()
            .filter(|p| p.role.is_worker() && p.state == State::Serving)
            .count();
        let n = self.cfg.workers;
        let rolling = if self.reloading { "; rolling" } else { "" };
        format!("{serving} of {n} workers serving{rolling}")
    }

    /// Tells the service manager what changed: ready once every worker serves (at the start,
    /// and at the end of a roll), and the counts.
    pub(super) fn tell_manager(&mut self) {
        if self.phase == Phase::Asleep {
            let status = "asleep: no owner or worker; a connection wakes it".to_string();
            if self.told_status.as_ref() != Some(&status) {
                self.fx.notify(Notify::Status(status.clone()));
                self.told_status = Some(status);
            }
            return;
        }
        if self.phase != Phase::Running {
            return;
        }
        let all = self.all_workers_serving();
        let rolled = !self
            .pending_rolls
            .iter()
            .any(|(_, c)| *c == policy::Cause::Roll)
            && !self
                .procs
                .values()
                .any(|p| p.replaces.is_some_and(|(_, c)| c == policy::Cause::Roll));
        if all && self.reloading && rolled {
            self.reloading = false;
            self.told_ready = false;
        }
        let status = self.status_line();
        if all && !self.told_ready && !self.reloading {
            self.told_ready = true;
            self.fx.notify(Notify::Ready {
                status: status.clone(),
            });
        } else if self.told_status.as_ref() != Some(&status) {
            self.fx.notify(Notify::Status(status.clone()));
        }
        self.told_status = Some(status);
    }

    fn handle(&mut self, input: Input) -> Option<(AdminConn, AdminResponse)> {
        match input {
            Input::Signal(Signal::SIGHUP) => self.roll("SIGHUP"),
            Input::Signal(s @ (Signal::SIGTTIN | Signal::SIGTTOU)) => {
                let n = match s {
                    Signal::SIGTTIN => self.cfg.workers.saturating_add(1),
                    _ => self.cfg.workers.saturating_sub(1),
                };
                if let Err((_, why)) = self.scale(n, s.as_str()) {
                    say!(self.fx, Warn, "{s}: {why}");
                }
            }
            Input::Signal(s @ (Signal::SIGTERM | Signal::SIGINT)) => {
                say!(self.fx, Info, "{s}: draining and stopping");
                self.begin_stop();
            }
            Input::Signal(_) => {}
            Input::Message(pid, m) => self.on_message(pid, m),
            Input::Died(pid) => self.on_died(pid),
            Input::Status(pid, status) => self.on_status(pid, status),
            Input::ChildError {
                pid,
                stage,
                message,
            } => {
                say!(
                    self.fx,
                    Error,
                    "pid {pid} failed before its entry ran ({stage}): {message}"
                );
                self.on_status_text(pid, format!("{stage} failed: {message}"), None);
            }
            Input::Admin(conn, req) => return Some((conn, self.admin(req))),
            Input::ZygoteStarted(result) => self.zygote_started(result),
            // The event loop answers scrapes itself, from `Service::metrics`.
            Input::Scrape(_) => {}
            Input::Connection => self.wake("a connection arrived while asleep"),
        }
        None
    }

    /// A fatal reason: the service stops, and exits 1 with the first one.
    pub(super) fn fatal(&mut self, reason: String) {
        if self.phase != Phase::Stopping {
            say!(self.fx, Error, "{reason}; stopping the service");
            self.begin_stop();
        }
        self.stop_reason.get_or_insert(reason);
    }

    pub(super) fn spawn(
        &mut self,
        role: Role,
        replaces: Option<(i32, policy::Cause)>,
    ) -> anyhow::Result<()> {
        if self.zygote.is_none() {
            bail!("no zygote to spawn {role} from");
        }
        let req = match role {
            Role::Owner(d) => {
                self.generation += 1;
                self.generation_models
                    .insert(self.generation, self.cfg.model.clone());
                SpawnRequest {
                    role,
                    entry: "owner".into(),
                    args: vec![
                        "--backend".into(),
                        self.cfg.backend.to_string(),
                        "--ipc".into(),
                        self.cfg.ipc.to_string(),
                        "--host-weights".into(),
                        self.cfg.host_weights.to_string(),
                        "--generation".into(),
                        self.generation.to_string(),
                    ],
                    device: d,
                    listeners: false,
                    spare: false,
                    via: None,
                }
            }
            Role::Template => SpawnRequest {
                role,
                entry: self.cfg.entry.clone(),
                args: vec!["--socket".into(), template_socket(self.templates + 1)],
                device: 0,
                listeners: false,
                spare: false,
                via: None,
            },
            Role::Worker(_) | Role::Spare(_) => {
                let (entry, via) = if self.cfg.template {
                    let Some(t) = self.serving_template() else {
                        bail!("no app template serves yet to fork {role} from");
                    };
                    (TEMPLATE_ENTRY.to_string(), Some(t))
                } else {
                    (self.cfg.entry.clone(), None)
                };
                SpawnRequest {
                    role,
                    entry,
                    args: Vec::new(),
                    device: self.device_of(role),
                    listeners: true,
                    spare: role.is_spare(),
                    via,
                }
            }
        };
        let pid = self.fx.spawn(&req)?;
        let template = match role {
            Role::Template => {
                self.templates += 1;
                Some(self.templates)
            }
            _ => None,
        };
        let also = replaces
            .map(|(p, _)| format!(" to replace pid {p}"))
            .unwrap_or_default();
        let request_limit = match role {
            Role::Worker(_) | Role::Spare(_) => {
                let draw = self.fx.draw();
                policy::request_limit(&self.cfg.recycle, draw)
            }
            Role::Owner(_) | Role::Template => None,
        };
        say!(self.fx, Info, "{role}: spawned pid {pid}{also}");
        let now = self.fx.now();
        self.procs.insert(
            pid,
            Child {
                role,
                state: State::Starting,
                timers: Timers {
                    started: now,
                    last_beat: now,
                    drain_deadline: None,
                },
                served: 0,
                generation: None,
                replaces,
                request_limit,
                recycling: false,
                latency: None,
                killed_for: None,
                sigkilled: false,
                template,
            },
        );
        Ok(())
    }

    /// The app template new workers fork from: the newest one that serves.
    pub(super) fn serving_template(&self) -> Option<i32> {
        self.procs
            .iter()
            .filter(|(_, p)| p.role == Role::Template && p.state == State::Serving)
            .max_by_key(|(_, p)| p.template)
            .map(|(pid, _)| *pid)
    }

    /// Whether the workers can be spawned: every owner serves, and the app template too
    /// when there is one.
    fn forkers_ready(&self) -> bool {
        self.owners_ready() && (!self.cfg.template || self.serving_template().is_some())
    }

    /// Counts one replacement in `role`'s slot and, for a worker or an owner, in the service's
    /// totals (`/metrics`' restarts; a spare's are in its own row of `zygote status` only).
    fn count(&mut self, role: Role, cause: policy::Cause) {
        policy::count(&mut self.slot(role).reasons, cause);
        if !role.is_spare() {
            policy::count(&mut self.restart_totals, cause);
        }
    }

    /// The device of a worker slot or a spare: round robin over `--device`.
    fn device_of(&self, role: Role) -> u32 {
        let devices = self.devices();
        devices[role.slot() as usize % devices.len()]
    }

    /// Puts a ready spare in the place of worker `slot`'s (dead, killed or recycled) worker, if
    /// the pool has one for its device: the spare is sent `activate` and is that slot's worker
    /// from now on; `replaces` (a recycled worker) then drains, as when a replacement is ready.
    /// The pool is refilled after [`policy::SPARE_REFILL_DELAY`]. Returns the spare's pid.
    pub(super) fn activate_spare(
        &mut self,
        slot: WorkerId,
        replaces: Option<(i32, policy::Cause)>,
    ) -> Option<i32> {
        if self.phase != Phase::Running || self.cfg.spares == 0 {
            return None;
        }
        let role = Role::Worker(slot);
        let views: Vec<policy::SpareView> = self
            .procs
            .iter()
            .filter(|(_, p)| p.role.is_spare())
            .map(|(pid, p)| policy::SpareView {
                pid: *pid,
                device: self.device_of(p.role),
                ready: p.state == State::Serving,
                going: self.pending_rolls.iter().any(|(old, _)| old == pid)
                    || self
                        .procs
                        .values()
                        .any(|q| q.replaces.is_some_and(|(old, _)| old == *pid)),
                started: p.timers.started,
            })
            .collect();
        let pid = policy::pick_spare(&views, self.device_of(role))?;
        let now = self.fx.now();
        let spare = self.procs.get(&pid)?.role;
        if !self.fx.activate(pid, slot) {
            say!(
                self.fx,
                Warn,
                "{spare} (pid {pid}) cannot be sent `activate`; killing it"
            );
            self.kill(pid, "its control channel is closed", None);
            return None;
        }
        if let Some(p) = self.procs.get_mut(&pid) {
            p.role = role;
            p.timers.last_beat = now;
        }
        self.slot(spare).restart_at = Some(now + policy::SPARE_REFILL_DELAY);
        self.slot(role).restart_at = None;
        let also = replaces
            .map(|(p, _)| format!(" in place of pid {p}"))
            .unwrap_or_default();
        say!(
            self.fx,
            Info,
            "{role}: {spare} (pid {pid}) activated{also}; the pool is refilled in {} ms",
            policy::SPARE_REFILL_DELAY.as_millis()
        );
        if let Some((old, cause)) = replaces {
            self.count(role, cause);
            self.drain(old, "replaced by a spare");
        }
        Some(pid)
    }

    fn slot(&mut self, role: Role) -> &mut Slot {
        self.slots.entry(role).or_default()
    }

    fn owners_ready(&self) -> bool {
        self.devices().iter().all(|d| {
            self.procs
                .values()
                .any(|p| p.role == Role::Owner(*d) && p.state == State::Serving)
        })
    }

    pub(super) fn all_workers_serving(&self) -> bool {
        (0..self.cfg.workers).all(|w| {
            self.procs
                .values()
                .any(|p| p.role == Role::Worker(WorkerId(w)) && p.state == State::Serving)
        })
    }

    fn on_message(&mut self, pid: i32, m: ChildMessage) {
        let now = self.fx.now();
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.timers.last_beat = now;
        match m {
            ChildMessage::Ready {
                generation,
                weights,
                detail,
                ..
            } => {
                if p.state == State::Starting {
                    if let Some(n) = p.template {
                        // The supervisor must reach its socket before it counts as serving.
                        if let Err(e) = self.fx.connect_template(pid, &template_socket(n)) {
                            let why = format!("connecting to its socket: {e:#}");
                            return self.kill(pid, &why, Some(policy::Cause::Heartbeat));
                        }
                    }
                    let Some(p) = self.procs.get_mut(&pid) else {
                        return;
                    };
                    p.state = State::Serving;
                    p.generation = generation;
                    let (role, replaces) = (p.role, p.replaces.take());
                    let took = now.duration_since(p.timers.started);
                    self.spawn_ready.observe(took.as_secs_f64());
                    let ms = took.as_millis();
                    say!(
                        self.fx,
                        Info,
                        "{role} (pid {pid}) ready in {ms} ms: {detail}"
                    );
                    self.on_ready(role, replaces, weights);
                }
            }
            ChildMessage::Heartbeat { served, latency } => {
                let more = served > p.served;
                p.served = served;
                p.latency = latency.or(p.latency.take());
                if more {
                    self.saw_requests(now);
                }
                self.check_recycle(pid);
            }
            ChildMessage::Draining { in_flight } => {
                p.state = State::Draining;
                let role = p.role;
                say!(
                    self.fx,
                    Info,
                    "{role} (pid {pid}) draining, {in_flight} requests in flight"
                );
            }
        }
    }

    /// Asks for a replacement of a serving worker that reached its request limit or the
    /// memory ceiling; it drains once the replacement is ready, as in a roll.
    fn check_recycle(&mut self, pid: i32) {
        let limits = self.cfg.recycle;
        if self.phase != Phase::Running {
            return;
        }
        let Some(p) = self.procs.get(&pid) else {
            return;
        };
        if !p.role.is_worker() || p.state != State::Serving || p.recycling {
            return;
        }
        let rss_kib = match limits.max_rss_mib {
            Some(_) => self.fx.memory(pid).map(|m| m.rss_kib),
            None => None,
        };
        let Some(why) = policy::recycle(&limits, p.served, p.request_limit, rss_kib) else {
            return;
        };
        let role = p.role;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.recycling = true;
        }
        say!(self.fx, Info, "{role} (pid {pid}) {why}: recycling it");
        let Role::Worker(slot) = role else {
            return;
        };
        if self
            .activate_spare(slot, Some((pid, policy::Cause::Recycle)))
            .is_none()
        {
            self.pending_rolls.push((pid, policy::Cause::Recycle));
        }
    }

    fn on_ready(
        &mut self,
        role: Role,
        replaces: Option<(i32, policy::Cause)>,
        weights: Option<ServedWeights>,
    ) {
        if let Role::Owner(device) = role {
            self.backend = weights.map(|w| w.backend.to_string());
            self.ipc = weights.map(|w| w.ipc.to_string());
            if let Some(w) = weights {
                self.weights_bytes.insert(device, w.bytes);
            }
            let restarted = self.slots.get(&role).is_some_and(|s| s.restarts > 0);
            if policy::roll_after_owner_ready(restarted, weights.map(|w| w.ipc)) {
                self.roll("the owner restarted with legacy CUDA IPC");
            }
            self.reload_owner_ready();
        }
        if let Some(s) = self.slots.get_mut(&role) {
            s.failures_before_ready = 0;
        }
        if let Some((old, cause)) = replaces {
            self.count(role, cause);
            if role == Role::Template {
                // A reload: the new code is imported; the workers roll onto it.
                self.reload_error = None;
                self.drain(old, "replaced by a new app template");
                self.roll_workers();
            } else {
                self.drain(old, "replaced by a new worker");
            }
        }
        if self.phase == Phase::Starting && self.forkers_ready() {
            self.phase = Phase::Running;
            for w in 0..self.cfg.workers {
                if let Err(e) = self.spawn(Role::Worker(WorkerId(w)), None) {
                    self.fatal(format!("spawning worker {w}: {e:#}"));
                    return;
                }
            }
            for k in 0..self.cfg.spares {
                if let Err(e) = self.spawn(Role::Spare(k), None) {
                    self.fatal(format!("spawning spare {k}: {e:#}"));
                    return;
                }
            }
        }
        // With `--workers 0` (client mode) the service is up once its owners are.
        if self.phase == Phase::Running
            && (role.is_worker() || self.cfg.workers == 0)
            && self.all_workers_serving()
        {
            say!(self.fx, Info, "all {} workers serving", self.cfg.workers);
            self.check_awake();
        }
    }

    pub(super) fn drain(&mut self, pid: i32, why: &str) {
        let graceful = self.cfg.graceful_timeout;
        let now = self.fx.now();
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.state == State::Draining && p.timers.drain_deadline.is_some() {
            return;
        }
        p.state = State::Draining;
        p.timers.drain_deadline = Some(now + graceful);
        let role = p.role;
        say!(self.fx, Info, "{role} (pid {pid}): draining ({why})");
        if !self.fx.drain(pid, graceful) {
            // A child that cannot hear us (an exec'd program that never attached) gets SIGTERM.
            self.fx.signal(pid, Signal::SIGTERM);
        }
    }

    /// Kills a child; `cause` is what its death counts as, when it is a restart.
    pub(super) fn kill(&mut self, pid: i32, why: &str, cause: Option<policy::Cause>) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.killed_for = p.killed_for.or(cause);
            if p.sigkilled {
                return;
            }
            p.sigkilled = true;
            let role = p.role;
            say!(self.fx, Warn, "{role} (pid {pid}): killing: {why}");
            self.fx.signal(pid, Signal::SIGKILL);
        }
    }
}

mod deaths;
mod reload;
mod requests;
mod sleep;
mod timers;

#[cfg(test)]
mod tests;
