//! The ends of the children and of the zygote: a death (what it counts as, whether and when
//! the slot restarts, a crash loop), the exit status that follows it, and the zygote's death
//! and restart delay.

use log::Level;

use super::{add_latency, Effects, Service};
use crate::supervisor::effects::Exit;
use crate::supervisor::policy::{self, Death, Phase, Role, State, ZygoteRestart};

impl<E: Effects> Service<E> {
    pub(super) fn on_died(&mut self, pid: i32) {
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        self.fx.forget(pid);
        if policy::reload_failed(p.role, p.state, self.phase, p.replaces.is_some()) {
            let why = format!(
                "reload failed: the new app template (pid {pid}) died before it was ready \
                 (its error is above); the old template and its workers keep serving the old code"
            );
            say!(self.fx, Error, "{why}");
            self.reload_error = Some(why);
            self.reloading = false;
            return;
        }
        let now = self.fx.now();
        let role = p.role;
        // Deaths that are restarts count among the slot's reasons: by the kill the supervisor
        // sent, else by the status (now, or when it comes).
        let counts = p.state != State::Draining && self.phase != Phase::Stopping;
        let known = self
            .exits
            .death(pid, role, counts && p.killed_for.is_none());
        let cause = p.killed_for.or(known.as_ref().and_then(|k| k.cause));
        let status = known.map_or_else(|| "status to follow".into(), |k| k.text);
        if let Some(c) = cause.filter(|_| counts) {
            self.count(role, c);
        }
        if role.is_worker() {
            self.retired_served += p.served;
            if let Some(l) = &p.latency {
                add_latency(&mut self.retired_latency, l);
            }
        }
        let slot = self.slots.entry(role).or_default();
        let failures = if p.state == State::Starting && self.phase != Phase::Stopping {
            slot.failures_before_ready += 1;
            slot.restarts += 1;
            slot.failures_before_ready
        } else {
            0
        };
        let death = policy::on_death(role, p.state, self.phase, failures);
        match death {
            Death::Expected if p.state == State::Draining => {
                say!(
                    self.fx,
                    Info,
                    "{role} (pid {pid}) exited after draining ({status})"
                )
            }
            Death::Expected => {
                say!(
                    self.fx,
                    Info,
                    "{role} (pid {pid}) exited while stopping ({status})"
                )
            }
            Death::Replace => {
                let lived = now.duration_since(p.timers.started).as_secs_f64();
                say!(
                    self.fx,
                    Warn,
                    "{role} (pid {pid}) died while serving ({status}) after {lived:.1}s; restarting it"
                );
                slot.restarts += 1;
                slot.failures_before_ready = 0;
                slot.restart_at = Some(now);
            }
            Death::StartFailed => {
                return self.fatal(format!(
                    "{role} (pid {pid}) failed before it was ready ({status}); see its error above"
                ));
            }
            Death::CrashLoop { failures } => {
                return self.fatal(format!(
                    "crash loop: {role} died {failures} times in a row before it was ready \
                     (last: pid {pid}, {status})"
                ));
            }
            Death::Retry(wait) => {
                slot.restart_at = Some(now + wait);
                let ms = wait.as_millis();
                say!(
                    self.fx,
                    Warn,
                    "{role} (pid {pid}) died before it was ready ({status}); retry {failures} in {ms} ms"
                );
            }
        }
        if let Some((old, cause)) = p.replaces {
            // A replacement that died: the old one keeps serving, and the roll retries.
            say!(
                self.fx,
                Warn,
                "the replacement for pid {old} died; pid {old} keeps serving"
            );
            if let Some(s) = self.slots.get_mut(&role) {
                s.restart_at = s.restart_at.or(Some(now));
            }
            self.pending_rolls.push((old, cause));
        }
        if let (Death::Replace, Role::Worker(w)) = (death, role) {
            // With a ready spare, no fork on the way to the slot's next answer.
            self.activate_spare(w, None);
        }
    }

    pub(super) fn on_status(&mut self, pid: i32, exit: Exit) {
        if self.zygote.is_some_and(|z| z.pid == pid) {
            return self.on_zygote_death(exit.to_string());
        }
        self.on_status_text(pid, exit.to_string(), exit.cause());
    }

    pub(super) fn on_status_text(&mut self, pid: i32, text: String, cause: Option<policy::Cause>) {
        if !self.procs.contains_key(&pid) && !self.exits.awaits(pid) {
            // Not one of ours: an orphan of a child (we are everyone's subreaper) reaped here.
            say!(
                self.fx,
                Debug,
                "pid {pid} (not a child of the service) ended: {text}"
            );
            return;
        }
        if let Some(late) = self.exits.status(pid, text.clone(), cause) {
            let role = late.role;
            say!(self.fx, Info, "{role} (pid {pid}) exit status: {text}");
            if let Some(c) = late.count {
                self.count(role, c);
            }
        }
    }

    fn on_zygote_death(&mut self, status: String) {
        let Some(z) = self.zygote.take() else {
            return;
        };
        let now = self.fx.now();
        if self.phase == Phase::Stopping {
            say!(self.fx, Info, "zygote (pid {}) exited ({status})", z.pid);
            return;
        }
        match self.zygote_restarts.died(now.duration_since(z.started)) {
            ZygoteRestart::CrashLoop { failures } => self.fatal(format!(
                "crash loop: the zygote died {failures} times in a row ({status})"
            )),
            ZygoteRestart::After(wait) => {
                let (children, ms) = (self.procs.len(), wait.as_millis());
                say!(
                    self.fx,
                    Warn,
                    "zygote (pid {}) died ({status}); {children} children keep running; \
                     restarting it in {ms} ms",
                    z.pid
                );
                self.zygote_restart_at = Some(now + wait);
            }
        }
    }
}
