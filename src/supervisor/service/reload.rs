//! `zygote reload --model PATH`: a new model without downtime. The file is copied into a new
//! sealed memfd; the zygote is replaced by one started on it, which validates and hashes it
//! (a zygote is already replaceable with its children serving, and one model per zygote keeps
//! every fork's fd 4 simple); the owners drain and new ones (a new generation) export it; then
//! the workers roll onto it, each replacement ready before its predecessor drains. A file the
//! new zygote refuses leaves the old model serving: a zygote is started on the old memfd again.

use std::path::PathBuf;

use log::Level;
use zygote_runtime::protocol::ModelReload;

use super::{Effects, Service};
use crate::supervisor::effects::ZygoteInfo;
use crate::supervisor::policy::{Phase, Role, State};

/// Where a reload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::supervisor) enum ReloadStage {
    /// A new zygote validates the file.
    Loading(PathBuf),
    /// The old owners drain; the new ones start once they are gone.
    Owners,
    /// New owners spawned, not all ready.
    OwnersStarting,
    /// The workers roll onto the new generation.
    Rolling,
}

impl<E: Effects> Service<E> {
    /// Starts serving `path`; `Err` says why not (nothing changed then).
    pub(super) fn reload_model(&mut self, path: PathBuf) -> Result<(), String> {
        if self.phase != Phase::Running {
            return Err(format!("the service is {:?}, not running", self.phase));
        }
        if self.reload_stage.is_some() {
            return Err("a reload is in progress".into());
        }
        let Some(z) = self.zygote.filter(|_| !self.zygote_launching) else {
            return Err("the zygote is restarting; try again".into());
        };
        let model = path.display().to_string();
        if let Err(e) = self.fx.prepare_model(&path) {
            let error = format!("{e:#}");
            self.reload_failed(model, error.clone());
            return Err(error);
        }
        say!(
            self.fx,
            Info,
            "reload: serving {model} from now on; a new zygote loads and validates it"
        );
        self.fx.retire_zygote(z.pid);
        self.zygote = None;
        self.model_reload = Some(ModelReload {
            model: model.clone(),
            state: "loading".into(),
            error: None,
        });
        self.reload_stage = Some(ReloadStage::Loading(path));
        if let Err(e) = self.fx.launch_zygote() {
            self.reload_stage = None;
            let error = format!("{e:#}");
            self.reload_failed(model, error.clone());
            self.relaunch_zygote();
            return Err(error);
        }
        self.zygote_launching = true;
        Ok(())
    }

    fn reload_failed(&mut self, model: String, error: String) {
        say!(
            self.fx,
            Error,
            "reload of {model} refused: {error}; the old model keeps serving"
        );
        self.model_reload = Some(ModelReload {
            model,
            state: "failed".into(),
            error: Some(error),
        });
    }

    /// The outcome of the zygote a reload launched; `false` when no reload waited for it.
    pub(super) fn reload_zygote_started(&mut self, result: &Result<ZygoteInfo, String>) -> bool {
        let Some(ReloadStage::Loading(path)) = self.reload_stage.clone() else {
            return false;
        };
        let model = path.display().to_string();
        match result {
            Ok(z) => {
                self.zygote = Some(*z);
                self.cfg.model = path;
                self.reload_stage = Some(ReloadStage::Owners);
                if let Some(r) = self.model_reload.as_mut() {
                    r.state = "owners".into();
                }
                say!(
                    self.fx,
                    Info,
                    "reload: zygote pid {} serves {model}; the owners drain",
                    z.pid
                );
                let owners: Vec<i32> = self
                    .procs
                    .iter()
                    .filter(|(_, p)| p.role.is_owner())
                    .map(|(pid, _)| *pid)
                    .collect();
                for pid in owners {
                    self.drain(pid, "a new model");
                }
            }
            Err(e) => {
                self.reload_stage = None;
                self.reload_failed(model, e.clone());
                self.relaunch_zygote();
            }
        }
        true
    }

    /// A zygote on the service's model again, after a refused reload (no crash-loop count:
    /// the old zygote did not die, it was retired).
    fn relaunch_zygote(&mut self) {
        match self.fx.launch_zygote() {
            Ok(()) => self.zygote_launching = true,
            Err(e) => {
                let now = self.fx.now();
                self.zygote_start_failed(now, format!("{e:#}"));
            }
        }
    }

    /// Timers: the new owners once the old ones are gone; the end of the roll.
    pub(super) fn advance_reload(&mut self) {
        match self.reload_stage {
            Some(ReloadStage::Owners) => {
                if self.procs.values().any(|p| p.role.is_owner()) || self.zygote.is_none() {
                    return;
                }
                for d in self.devices() {
                    if let Err(e) = self.spawn(Role::Owner(d), None) {
                        say!(self.fx, Error, "reload: spawning owner {d}: {e:#}");
                        return;
                    }
                }
                self.reload_stage = Some(ReloadStage::OwnersStarting);
            }
            Some(ReloadStage::Rolling) if !self.reloading => {
                self.reload_stage = None;
                if let Some(r) = self.model_reload.as_mut() {
                    r.state = "done".into();
                    let model = r.model.clone();
                    say!(self.fx, Info, "reload: every worker serves {model}");
                }
            }
            _ => {}
        }
    }

    /// An owner is ready: once every owner of the new generation is, the workers roll.
    pub(super) fn reload_owner_ready(&mut self) {
        if self.reload_stage != Some(ReloadStage::OwnersStarting) {
            return;
        }
        let all = self.devices().iter().all(|d| {
            self.procs
                .values()
                .any(|p| p.role == Role::Owner(*d) && p.state == State::Serving)
        });
        if all {
            self.reload_stage = Some(ReloadStage::Rolling);
            if let Some(r) = self.model_reload.as_mut() {
                r.state = "rolling".into();
            }
            self.roll("reload: the new owners are ready");
        }
    }
}
