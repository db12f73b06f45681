//! The service's timers: the zygote's restart, restarts of empty slots, the replacements of a
//! roll, heartbeats and the ready and drain deadlines, and the order of a stop.

use std::time::Instant;

use log::Level;
use zygote_runtime::WorkerId;

use super::{Effects, Service};
use crate::supervisor::effects::ZygoteInfo;
use crate::supervisor::policy::{self, Cause, Phase, Role, State, ZygoteRestart};

impl<E: Effects> Service<E> {
    /// Timers: the zygote's restart, slot restarts, rolls, heartbeats, ready and drain
    /// deadlines.
    pub fn tick(&mut self) {
        let now = self.fx.now();
        if self.zygote_restart_at.is_some_and(|at| now >= at) {
            self.zygote_restart_at = None;
            self.restart_zygote(now);
        }
        if self.phase == Phase::Stopping {
            return self.tick_stopping(now);
        }
        if self.phase == Phase::Asleep {
            return self.tick_asleep(now);
        }
        self.tick_running(now);
        self.check_idle(now);
        self.tell_manager();
    }

    fn tick_running(&mut self, now: Instant) {
        if self.zygote.is_some() {
            self.restart_due_slots(now);
            self.spawn_rolls();
        }
        self.advance_reload();
        let timeout = self.cfg.timeout;
        let kills: Vec<(i32, policy::Overdue)> = self
            .procs
            .iter()
            .filter_map(|(pid, p)| Some((*pid, policy::overdue(p.state, &p.timers, now, timeout)?)))
            .collect();
        for (pid, why) in kills {
            let (text, cause) = match why {
                policy::Overdue::Heartbeat(_) => (
                    format!("{why} (--timeout {}s)", timeout.as_secs()),
                    Some(Cause::Heartbeat),
                ),
                policy::Overdue::NotReady => (why.to_string(), Some(Cause::Heartbeat)),
                policy::Overdue::DrainDeadline => (why.to_string(), None),
            };
            self.kill(pid, &text, cause);
        }
    }

    fn restart_zygote(&mut self, now: Instant) {
        match self.fx.launch_zygote() {
            Ok(()) => self.zygote_launching = true,
            Err(e) => self.zygote_start_failed(now, format!("{e:#}")),
        }
    }

    /// The outcome of a launched zygote.
    pub(super) fn zygote_started(&mut self, result: Result<ZygoteInfo, String>) {
        self.zygote_launching = false;
        if self.reload_zygote_started(&result) {
            return;
        }
        match result {
            Ok(z) => {
                self.zygote = Some(z);
                let n = self.zygote_restarts.restarts;
                say!(self.fx, Info, "zygote restarted (restart {n})");
            }
            Err(e) => {
                let now = self.fx.now();
                self.zygote_start_failed(now, e);
            }
        }
    }

    pub(super) fn zygote_start_failed(&mut self, now: Instant, e: String) {
        match self.zygote_restarts.start_failed() {
            ZygoteRestart::CrashLoop { .. } => {
                self.fatal(format!("the zygote cannot be restarted: {e}"))
            }
            ZygoteRestart::After(wait) => {
                say!(
                    self.fx,
                    Error,
                    "restarting the zygote failed: {e}; retrying"
                );
                self.zygote_restart_at = Some(now + wait);
            }
        }
    }

    /// Spawns the owners and workers whose slot is empty and whose restart is due.
    fn restart_due_slots(&mut self, now: Instant) {
        let due: Vec<Role> = self
            .slots
            .iter()
            .filter(|(_, s)| s.restart_at.is_some_and(|t| now >= t))
            .map(|(role, _)| *role)
            .collect();
        for role in due {
            let occupied = self
                .procs
                .values()
                .any(|p| p.role == role && p.state != State::Draining);
            let retired = match role {
                Role::Worker(WorkerId(w)) => w >= self.cfg.workers,
                Role::Spare(k) => k >= self.cfg.spares,
                Role::Owner(_) | Role::Template => false,
            };
            if occupied || retired {
                self.slot(role).restart_at = None;
                continue;
            }
            if let Role::Worker(w) = role {
                if self.activate_spare(w, None).is_some() {
                    continue;
                }
            }
            if role.is_worker() && self.phase == Phase::Starting && !self.owners_ready() {
                continue;
            }
            match self.spawn(role, None) {
                Ok(()) => self.slot(role).restart_at = None,
                Err(e) => {
                    say!(self.fx, Error, "restarting {role}: {e:#}");
                    self.slot(role).restart_at = Some(now + policy::RESPAWN_RETRY);
                }
            }
        }
    }

    /// Rolls and recycles: one replacement per old worker (or spare) that still serves and has
    /// none yet; a recycled worker's is a ready spare when there is one.
    fn spawn_rolls(&mut self) {
        for (old, cause) in std::mem::take(&mut self.pending_rolls) {
            let Some(role) = self
                .procs
                .get(&old)
                .filter(|p| p.state == State::Serving)
                .map(|p| p.role)
            else {
                continue;
            };
            if self
                .procs
                .values()
                .any(|p| p.replaces.is_some_and(|r| r.0 == old))
            {
                continue;
            }
            if let (Role::Worker(w), Cause::Recycle) = (role, cause) {
                if self.activate_spare(w, Some((old, cause))).is_some() {
                    continue;
                }
            }
            if let Err(e) = self.spawn(role, Some((old, cause))) {
                say!(self.fx, Error, "replacing {role}: {e:#}");
                self.pending_rolls.push((old, cause));
            }
        }
    }

    /// The stop: workers and spares drain first, then the owners; whoever passes its deadline is killed.
    fn tick_stopping(&mut self, now: Instant) {
        if !self.procs.values().any(|p| p.role.holds_listeners()) {
            self.fx.close_listeners();
        }
        self.drain_the_rest(now, |r| !r.holds_listeners(), "stopping");
    }

    /// The second half of a stop or a sleep: once no worker or spare is left, the children
    /// `rest` picks are drained (`why`); whoever passed its drain deadline is killed.
    pub(super) fn drain_the_rest(&mut self, now: Instant, rest: fn(Role) -> bool, why: &str) {
        if !self.procs.values().any(|p| p.role.holds_listeners()) {
            let pids: Vec<i32> = self
                .procs
                .iter()
                .filter(|(_, p)| rest(p.role) && p.timers.drain_deadline.is_none())
                .map(|(pid, _)| *pid)
                .collect();
            for pid in pids {
                self.drain(pid, why);
            }
        }
        let late: Vec<i32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.timers.drain_deadline.is_some_and(|d| now > d))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in late {
            self.kill(pid, "drain deadline passed", None);
        }
    }
}
