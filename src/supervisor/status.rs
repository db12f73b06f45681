//! What the service reports: `zygote status`'s answer, one row per process (supervisor,
//! zygote, owners by device, workers by slot, spares by pool index), and the snapshot `/metrics` encodes.

use std::collections::BTreeMap;

use zygote_runtime::protocol::{ProcessStatus, ServiceStatus};

use super::effects::Effects;
use super::metrics::{Histogram, Snapshot};
use super::policy::{Phase, Role, State};
use super::service::{add_latency, Child, Service};

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
                Phase::Asleep => "asleep",
            }
            .into(),
            restarts: 0,
            pss_kib: mine.map(|m| m.pss_kib),
            rss_kib: mine.map(|m| m.rss_kib),
            age_ms: ms(self.started),
            served: None,
            generation: None,
            model: None,
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
                    generation: None,
                    model: None,
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
                generation: None,
                model: None,
                restart_reasons: Default::default(),
            },
        });
        let mut children: Vec<(&i32, &Child)> = self.procs.iter().collect();
        children.sort_by_key(|(_, p)| (role_order(p.role), p.role.slot(), p.timers.started));
        for (&pid, p) in children {
            let m = self.fx.memory(pid);
            let slot = self.slots.get(&p.role);
            processes.push(ProcessStatus {
                role: role_name(p.role).into(),
                slot: Some(p.role.slot()),
                pid,
                state: child_state(p.role, p.state).into(),
                restarts: slot.map(|s| s.restarts).unwrap_or(0),
                pss_kib: m.map(|m| m.pss_kib),
                rss_kib: m.map(|m| m.rss_kib),
                age_ms: ms(p.timers.started),
                served: Some(p.served),
                generation: p.generation,
                model: p
                    .generation
                    .and_then(|g| self.generation_models.get(&g))
                    .map(|m| m.display().to_string()),
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
            reload: self.model_reload.clone(),
            reload_error: self.reload_error.clone(),
        }
    }

    /// The snapshot `/metrics` shows.
    pub fn metrics(&self) -> Snapshot {
        let workers = [State::Starting, State::Serving, State::Draining].map(|state| {
            let n = self
                .procs
                .values()
                .filter(|p| p.role.is_worker() && p.state == state)
                .count();
            (state_name(state), n as u64)
        });
        let spares = [State::Starting, State::Serving, State::Draining].map(|state| {
            let n = self
                .procs
                .values()
                .filter(|p| p.role.is_spare() && p.state == state)
                .count();
            (child_state(Role::Spare(0), state), n as u64)
        });
        let me = std::process::id() as i32;
        let mut pss: BTreeMap<(&'static str, Option<u32>), u64> = BTreeMap::new();
        let mut add = |role, slot, pid: i32| {
            if let Some(m) = self.fx.memory(pid) {
                *pss.entry((role, slot)).or_default() += m.pss_kib * 1024;
            }
        };
        add("supervisor", None, me);
        if let Some(z) = &self.zygote {
            add("zygote", None, z.pid);
        }
        for (&pid, p) in &self.procs {
            add(role_name(p.role), Some(p.role.slot()), pid);
        }
        let live: u64 = self
            .procs
            .values()
            .filter(|p| p.role.is_worker())
            .map(|p| p.served)
            .sum();
        Snapshot {
            workers: workers.to_vec(),
            spares: spares.to_vec(),
            restarts: self.restart_totals,
            spawn_ready: self.spawn_ready.clone(),
            pss_bytes: pss.into_iter().map(|((r, s), b)| (r, s, b)).collect(),
            requests: self.retired_served + live,
            weights_bytes: self.weights_bytes.iter().map(|(d, b)| (*d, *b)).collect(),
            latency: self.latency(),
        }
    }
}

impl<E: Effects> Service<E> {
    /// The request latencies of every worker, gone ones included.
    fn latency(&self) -> Histogram {
        let mut h = self.retired_latency.clone();
        for l in self.procs.values().filter_map(|p| p.latency.as_ref()) {
            add_latency(&mut h, l);
        }
        h
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Owner(_) => "owner",
        Role::Worker(_) => "worker",
        Role::Spare(_) => "spare",
        Role::Template => "template",
    }
}

/// Owners, the app template, then workers, then spares.
fn role_order(role: Role) -> u8 {
    match role {
        Role::Owner(_) => 0,
        Role::Template => 1,
        Role::Worker(_) => 2,
        Role::Spare(_) => 3,
    }
}

/// A child's state as `zygote status` and `/metrics` name it: a spare that sent `ready` is
/// `ready` (it does not serve until it is activated).
fn child_state(role: Role, state: State) -> &'static str {
    match (role, state) {
        (Role::Spare(_), State::Serving) => "ready",
        _ => state_name(state),
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Serving => "serving",
        State::Draining => "draining",
    }
}
