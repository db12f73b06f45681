//! Sleep and wake: `zygote sleep` (or `--idle-sleep`) drains every worker, then the owners,
//! and keeps the zygote (its sealed model memfd) and the listeners; `zygote wake` (or the
//! first connection queued while asleep) starts the owners again, and the workers follow them
//! as at the start. Connections that arrive meanwhile wait in the listeners' queues.

use log::Level;
use std::time::Instant;

use super::{Effects, Service};
use crate::supervisor::policy::{Phase, Role};

impl<E: Effects> Service<E> {
    /// Falls asleep: every worker drains (the owners once no worker is left, in
    /// [`Service::tick_asleep`]). Refused unless the service runs.
    pub(super) fn sleep(&mut self, why: &str) -> Result<(), String> {
        match self.phase {
            Phase::Asleep => return Ok(()),
            Phase::Running if self.reload_stage.is_none() => {}
            Phase::Running => return Err("a reload is in progress".into()),
            phase => return Err(format!("the service is {phase:?}, not running")),
        }
        say!(
            self.fx,
            Info,
            "{why}: going to sleep (draining the workers, then the owners)"
        );
        self.phase = Phase::Asleep;
        self.wake_requested = false;
        self.weights_released = false;
        self.reloading = false;
        self.pending_rolls.clear();
        for slot in self.slots.values_mut() {
            slot.restart_at = None;
        }
        let children: Vec<i32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.role.holds_listeners())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in children {
            self.drain(pid, "going to sleep");
        }
        self.fx.watch_listeners(true);
        Ok(())
    }

    /// Wakes up: at once when nothing is left from the sleep, else once the last child of it
    /// has exited (a new owner could not claim its socket beside the old one).
    pub(super) fn wake(&mut self, why: &str) {
        if self.phase != Phase::Asleep {
            return;
        }
        if !self.wake_requested {
            say!(self.fx, Info, "{why}: waking up");
        }
        self.wake_requested = true;
        self.fx.watch_listeners(false);
        if self.slept() && self.zygote.is_some() {
            self.wake_now();
        }
    }

    fn wake_now(&mut self) {
        let now = self.fx.now();
        self.wake_requested = false;
        self.phase = Phase::Starting;
        self.woke_at = Some(now);
        self.last_request = now;
        for d in self.devices() {
            if let Err(e) = self.spawn(crate::supervisor::policy::Role::Owner(d), None) {
                return self.fatal(format!("waking: spawning owner {d}: {e:#}"));
            }
        }
    }

    /// Whether the sleep is complete: no owner, worker or spare is left. An app template
    /// stays up asleep (it holds the imported app, not the weights), so that a wake forks
    /// workers at once instead of importing the app again.
    fn slept(&self) -> bool {
        self.procs.values().all(|p| p.role == Role::Template)
    }

    /// While asleep: the owners drain once no worker is left; whoever passes its drain
    /// deadline is killed; a wake asked for meanwhile happens once nothing is left.
    pub(super) fn tick_asleep(&mut self, now: Instant) {
        // An app template stays (see `slept`).
        self.drain_the_rest(now, Role::is_owner, "going to sleep");
        if self.slept() && !self.weights_released && self.zygote.is_some() {
            // No owner or worker maps the weights any more: the zygote's handles are the last.
            self.weights_released = true;
            self.fx.release_weights();
        }
        if self.slept() && self.wake_requested && self.zygote.is_some() {
            self.wake_now();
        }
    }

    /// `--idle-sleep`: asleep after that long without a request, once every worker serves.
    pub(super) fn check_idle(&mut self, now: Instant) {
        let Some(idle) = self.cfg.idle_sleep else {
            return;
        };
        if self.phase != Phase::Running || !self.all_workers_serving() {
            return;
        }
        if now.duration_since(self.last_request) >= idle {
            let why = format!("no request for {} s (--idle-sleep)", idle.as_secs());
            let _ = self.sleep(&why);
        }
    }

    /// A worker's heartbeat counted more requests: the service is not idle.
    pub(super) fn saw_requests(&mut self, now: Instant) {
        self.last_request = now;
    }

    /// Once every worker serves after a wake: how long the wake took.
    pub(super) fn check_awake(&mut self) {
        let Some(at) = self.woke_at else {
            return;
        };
        if self.phase == Phase::Running && self.all_workers_serving() {
            self.woke_at = None;
            let ms = self.fx.now().duration_since(at).as_millis();
            say!(
                self.fx,
                Info,
                "awake: every worker serves {ms} ms after the wake"
            );
        }
    }
}
