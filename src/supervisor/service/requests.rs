//! What operators ask of the service: admin requests (status, stop, reload, scale), and the
//! roll, the scaling and the stop they start (SIGHUP, SIGTTIN and SIGTTOU, SIGTERM too).

use log::Level;
use zygote_runtime::protocol::{AdminRequest, AdminResponse, ErrorCode, WorkerId};

use super::{Effects, Service};
use crate::supervisor::effects::Notify;
use crate::supervisor::policy::{self, Phase, Role, State};

impl<E: Effects> Service<E> {
    /// Answers an admin request.
    pub(super) fn admin(&mut self, req: AdminRequest) -> AdminResponse {
        match req {
            AdminRequest::Status { id } => AdminResponse::Status {
                id,
                service: Box::new(self.status()),
            },
            AdminRequest::Stop { id } => {
                say!(self.fx, Info, "stop requested");
                self.begin_stop();
                AdminResponse::Ok { id }
            }
            AdminRequest::Reload { id, model: None } => {
                self.roll("reload requested");
                AdminResponse::Ok { id }
            }
            AdminRequest::Reload {
                id,
                model: Some(model),
            } => match self.reload_model(model.into()) {
                Ok(()) => AdminResponse::Ok { id },
                Err(message) => AdminResponse::Error {
                    id: Some(id),
                    code: ErrorCode::BadRequest,
                    message,
                },
            },
            AdminRequest::Sleep { id } => match self.sleep("sleep requested") {
                Ok(()) => AdminResponse::Ok { id },
                Err(message) => AdminResponse::Error {
                    id: Some(id),
                    code: ErrorCode::BadRequest,
                    message,
                },
            },
            AdminRequest::Wake { id } => {
                self.wake("wake requested");
                AdminResponse::Ok { id }
            }
            AdminRequest::Scale { id, workers } => match self.scale(workers, "scale requested") {
                Ok(()) => AdminResponse::Ok { id },
                Err((code, message)) => AdminResponse::Error {
                    id: Some(id),
                    code,
                    message,
                },
            },
        }
    }

    pub(super) fn roll(&mut self, why: &str) {
        if self.phase != Phase::Running {
            say!(self.fx, Warn, "{why}: not rolling while {:?}", self.phase);
            return;
        }
        self.reloading = true;
        let status = self.status_line();
        self.fx.notify(Notify::Reloading { status });
        if let Some(old) = self.serving_template() {
            // The code reloads: a new template imports it; the workers roll once it serves.
            say!(
                self.fx,
                Info,
                "{why}: starting a new app template, then rolling {} workers onto it",
                self.cfg.workers
            );
            self.pending_rolls.push((old, policy::Cause::Roll));
            return;
        }
        let spares = match self.cfg.spares {
            0 => String::new(),
            k => format!(" and {k} spares"),
        };
        say!(
            self.fx,
            Info,
            "{why}: rolling {} workers{spares}",
            self.cfg.workers
        );
        self.roll_workers();
    }

    /// Replaces every worker that does not drain, each one before its predecessor drains.
    pub(super) fn roll_workers(&mut self) {
        let olds = self
            .procs
            .iter()
            .filter(|(_, p)| p.role.holds_listeners() && p.state != State::Draining)
            .map(|(pid, _)| (*pid, policy::Cause::Roll));
        self.pending_rolls.extend(olds);
    }

    /// Runs `n` workers from now on: new slots take ready spares first, else are spawned; the
    /// workers of slots past `n` drain; the others, and the spares' pool size, are not
    /// touched.
    pub(super) fn scale(&mut self, n: u32, why: &str) -> Result<(), (ErrorCode, String)> {
        if !(1..=policy::MAX_WORKERS).contains(&n) {
            let max = policy::MAX_WORKERS;
            return Err((
                ErrorCode::BadRequest,
                format!("the number of workers must be 1 to {max}, not {n}"),
            ));
        }
        if self.phase == Phase::Stopping {
            return Err((ErrorCode::ShuttingDown, "the service is stopping".into()));
        }
        let old = std::mem::replace(&mut self.cfg.workers, n);
        if n == old {
            return Ok(());
        }
        say!(self.fx, Info, "{why}: from {old} to {n} workers");
        if self.phase == Phase::Running {
            for w in old..n {
                // A new slot takes a ready spare first; the pool refills after its delay.
                if self.activate_spare(WorkerId(w), None).is_some() {
                    continue;
                }
                if let Err(e) = self.spawn(Role::Worker(WorkerId(w)), None) {
                    say!(self.fx, Error, "spawning worker {w}: {e:#}");
                    let at = self.fx.now() + policy::RESPAWN_RETRY;
                    self.slot(Role::Worker(WorkerId(w))).restart_at = Some(at);
                }
            }
        }
        let retired: Vec<i32> = self
            .procs
            .iter()
            .filter(|(_, p)| matches!(p.role, Role::Worker(WorkerId(w)) if w >= n))
            .map(|(pid, _)| *pid)
            .collect();
        self.pending_rolls.retain(|(pid, _)| !retired.contains(pid));
        self.slots
            .retain(|role, _| !matches!(role, Role::Worker(WorkerId(w)) if *w >= n));
        for pid in retired {
            self.drain(pid, "scaled down");
        }
        Ok(())
    }

    pub(super) fn begin_stop(&mut self) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.phase = Phase::Stopping;
        self.pending_rolls.clear();
        self.fx.watch_listeners(false);
        self.fx.notify(Notify::Stopping);
        // Before any worker is told to drain: nothing may be queued behind the workers' last
        // accept, or closing the listeners would reset it (see gate.rs).
        self.fx.stop_accepting();
        let workers: Vec<i32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.role.holds_listeners())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in workers {
            self.drain(pid, "stopping");
        }
    }
}
