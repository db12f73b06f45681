//! `zygote status`: the service's state as the admin socket reports it, one row per process
//! (supervisor, zygote, owners by device, workers by slot).

use zygote_runtime::protocol::{ProcessStatus, ServiceStatus};

use super::effects::Effects;
use super::policy::{Phase, Role, State};
use super::service::{Child, Service};

impl<E: Effects> Service<E> {
    pub fn status(&self) -> ServiceStatus {
        let now = self.fx.now();
        let ms = |since: std::time::Instant| now.duration_since(since).as_millis() as u64;
        let me = std::process::id() as i32;
        let mine = self.fx.memory(me);
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
            pss_kib: mine.map(|m| m.pss_kib),
            rss_kib: mine.map(|m| m.rss_kib),
            age_ms: ms(self.started),
            served: None,
            restart_reasons: Default::default(),
        }];
        let restarts = self.zygote_restarts.restarts;
        processes.push(match &self.zygote {
            Some(z) => {
                let m = self.fx.memory(z.pid);
                ProcessStatus {
                    role: "zygote".into(),
                    slot: None,
                    pid: z.pid,
                    state: "running".into(),
                    restarts,
                    pss_kib: m.map(|m| m.pss_kib),
                    rss_kib: m.map(|m| m.rss_kib),
                    age_ms: ms(z.started),
                    served: None,
                    restart_reasons: Default::default(),
                }
            }
            None => ProcessStatus {
                role: "zygote".into(),
                slot: None,
                pid: 0,
                state: "restarting".into(),
                restarts,
                pss_kib: None,
                rss_kib: None,
                age_ms: 0,
                served: None,
                restart_reasons: Default::default(),
            },
        });
        let mut children: Vec<(&i32, &Child)> = self.procs.iter().collect();
        children.sort_by_key(|(_, p)| (p.role.is_worker(), p.role.slot(), p.timers.started));
        for (&pid, p) in children {
            let m = self.fx.memory(pid);
            let slot = self.slots.get(&p.role);
            processes.push(ProcessStatus {
                role: match p.role {
                    Role::Owner(_) => "owner",
                    Role::Worker(_) => "worker",
                }
                .into(),
                slot: Some(p.role.slot()),
                pid,
                state: match p.state {
                    State::Starting => "starting",
                    State::Serving => "serving",
                    State::Draining => "draining",
                }
                .into(),
                restarts: slot.map(|s| s.restarts).unwrap_or(0),
                pss_kib: m.map(|m| m.pss_kib),
                rss_kib: m.map(|m| m.rss_kib),
                age_ms: ms(p.timers.started),
                served: Some(p.served),
                restart_reasons: slot.map(|s| s.reasons).unwrap_or_default(),
            });
        }
        ServiceStatus {
            runtime_dir: self.cfg.runtime_dir.display().to_string(),
            model: self.cfg.model.display().to_string(),
            backend: self
                .backend
                .clone()
                .unwrap_or_else(|| self.cfg.backend.to_string()),
            ipc: self.ipc.clone(),
            listen: self.listen.clone(),
            uptime_ms: ms(self.started),
            workers: self.cfg.workers,
            processes,
        }
    }
}
