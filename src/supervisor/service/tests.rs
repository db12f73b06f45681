//! The supervisor's paths, driven with the recording fake: each test moves the clock by hand
//! and feeds the inputs the event loop would.

use std::time::Duration;

use log::Level;
use nix::sys::signal::Signal;
use zygote_runtime::backend::{BackendChoice, HostWeightsForm, IpcChoice};
use zygote_runtime::procfs::Memory;
use zygote_runtime::protocol::{
    AdminRequest, AdminResponse, Backend, ChildMessage, ErrorCode, Ipc, RestartReasons,
    ServedWeights,
};
use zygote_runtime::WorkerId;

use super::Service;
use crate::supervisor::effects::{AdminConn, Exit, Input};
use crate::supervisor::fake::{Call, Fake};
use crate::supervisor::policy::{
    Phase, RecycleLimits, Role, State, CRASH_LOOP_LIMIT, READY_TIMEOUT,
};
use crate::supervisor::Config;

const GRACEFUL: Duration = Duration::from_secs(30);

fn config(workers: u32, timeout: Duration) -> Config {
    Config {
        runtime_dir: "/run/test".into(),
        model: "model.safetensors".into(),
        workers,
        listen: Vec::new(),
        backend: BackendChoice::Host,
        ipc: IpcChoice::Auto,
        host_weights: HostWeightsForm::F32,
        devices: Vec::new(),
        entry: "idle".into(),
        command: Vec::new(),
        template: false,
        timeout,
        graceful_timeout: GRACEFUL,
        allow_uids: Vec::new(),
        recycle: Default::default(),
        metrics: None,
        idle_sleep: None,
        spares: 0,
    }
}

fn sig(name: &str) -> Exit {
    Exit::Signal(name.into())
}

/// A `ready` message; a `detail` that names `backend=B` makes it an owner's, serving weights of
/// that backend with `ipc=I` (default memfd) and `bytes=N` (default 1 MiB), as an owner sends it.
fn ready(detail: &str) -> ChildMessage {
    let word = |key: &str| {
        detail
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    let weights = word("backend").map(|b| ServedWeights {
        backend: match b {
            "cuda" => Backend::Cuda,
            _ => Backend::Host,
        },
        ipc: match word("ipc") {
            Some("legacy") => Ipc::Legacy,
            Some("vmm") => Ipc::Vmm,
            _ => Ipc::Memfd,
        },
        bytes: word("bytes").map_or(1 << 20, |n| n.parse().expect("bytes=N")),
    });
    ChildMessage::Ready {
        pid: 0,
        generation: Some(1),
        weights,
        detail: detail.into(),
    }
}

/// The pids spawned for `role` among `calls`, with the pid each one replaces.
fn spawned(calls: &[Call], role: Role) -> Vec<i32> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Spawn(pid, req) if req.role == role => Some(*pid),
            _ => None,
        })
        .collect()
}

struct Harness {
    svc: Service<Fake>,
    zygote: i32,
    owner: i32,
    /// The serving worker of each slot.
    workers: Vec<i32>,
}

impl Harness {
    /// A service with its zygote, its owner (ready with `owner_detail`) and `workers` serving
    /// workers; the calls so far are taken.
    fn running(workers: u32, timeout: Duration, owner_detail: &str) -> Self {
        Self::running_with(config(workers, timeout), Fake::default(), owner_detail)
    }

    /// [`Harness::running`] with a configuration and a fake of the test's own.
    fn running_with(cfg: Config, fake: Fake, owner_detail: &str) -> Self {
        let workers = cfg.workers;
        let mut svc = Service::new(cfg, vec![], fake);
        svc.start().expect("start");
        let calls = svc.fx.take();
        let Some(Call::StartZygote(Ok(zygote))) = calls.first().cloned() else {
            panic!("the zygote starts first: {calls:?}");
        };
        let owner = spawned(&calls, Role::Owner(0))[0];
        assert!(
            spawned(&calls, Role::Worker(WorkerId(0))).is_empty(),
            "no worker before the owner is ready: {calls:?}"
        );
        svc.input(Input::Message(owner, ready(owner_detail)));
        let calls = svc.fx.take();
        let pids: Vec<i32> = (0..workers)
            .map(|w| spawned(&calls, Role::Worker(WorkerId(w)))[0])
            .collect();
        for &pid in &pids {
            svc.input(Input::Message(pid, ready("")));
        }
        assert_eq!(svc.phase, Phase::Running);
        assert!(svc
            .fx
            .logged(Level::Info, &format!("all {workers} workers serving")));
        Self {
            svc,
            zygote,
            owner,
            workers: pids,
        }
    }

    fn tick_after(&mut self, d: Duration) -> Vec<Call> {
        self.svc.fx.advance(d);
        self.svc.tick();
        self.svc.fx.take()
    }

    /// A child's death, its status first (as the event loop orders them).
    fn dies(&mut self, pid: i32, status: Exit) -> Vec<Call> {
        self.svc.input(Input::Status(pid, status));
        self.svc.input(Input::Died(pid));
        self.svc.fx.take()
    }

    fn state(&self, pid: i32) -> Option<State> {
        self.svc.procs.get(&pid).map(|p| p.state)
    }

    fn restarts(&self, role: Role) -> u32 {
        self.svc.slots.get(&role).map_or(0, |s| s.restarts)
    }
}

fn beat(h: &mut Harness, pids: &[i32]) {
    for &pid in pids {
        h.svc.input(Input::Message(
            pid,
            ChildMessage::Heartbeat {
                served: 1,
                latency: None,
            },
        ));
    }
}

#[test]
fn workers_get_the_listeners_and_devices_in_turn_owners_get_none() {
    let mut svc = Service::new(
        Config {
            devices: vec![0, 1],
            ..config(3, Duration::from_secs(30))
        },
        vec![],
        Fake::default(),
    );
    svc.start().expect("start");
    let owners: Vec<i32> = svc
        .fx
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::Spawn(pid, req) => {
                assert!(!req.listeners && req.entry == "owner", "{req:?}");
                Some(*pid)
            }
            _ => None,
        })
        .collect();
    assert_eq!(owners.len(), 2, "one owner per device");
    svc.input(Input::Message(owners[0], ready("")));
    assert!(
        spawned(&svc.fx.calls, Role::Worker(WorkerId(0))).is_empty(),
        "workers wait for every owner"
    );
    svc.input(Input::Message(owners[1], ready("")));
    let devices: Vec<u32> = svc
        .fx
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::Spawn(_, req) if req.role.is_worker() => {
                assert!(req.listeners && req.entry == "idle");
                Some(req.device)
            }
            _ => None,
        })
        .collect();
    assert_eq!(devices, [0, 1, 0]);
}

#[test]
fn a_worker_that_dies_while_serving_is_replaced_at_once() {
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    let victim = h.workers[0];
    let calls = h.dies(victim, sig("SIGKILL"));
    assert!(calls.contains(&Call::Forget(victim)));
    assert!(h
        .svc
        .fx
        .logged(Level::Warn, "died while serving (signal SIGKILL)"));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(
        spawned(&calls, Role::Worker(WorkerId(0))).len(),
        1,
        "{calls:?}"
    );
    assert_eq!(h.restarts(Role::Worker(WorkerId(0))), 1);
    assert_eq!(h.restarts(Role::Worker(WorkerId(1))), 0);
}

#[test]
fn deaths_before_ready_back_off_then_stop_the_service_as_a_crash_loop() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    let first = h.workers[0];
    h.dies(first, sig("SIGKILL"));
    let mut pid = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    for n in 1..CRASH_LOOP_LIMIT {
        h.dies(pid, Exit::Code(1));
        let wait = Duration::from_millis(100 << (n - 1));
        assert!(h.svc.fx.logged(
            Level::Warn,
            &format!("retry {n} in {} ms", wait.as_millis())
        ));
        assert!(
            spawned(
                &h.tick_after(wait - Duration::from_millis(1)),
                Role::Worker(WorkerId(0))
            )
            .is_empty(),
            "retry {n} waits its backoff"
        );
        pid = spawned(
            &h.tick_after(Duration::from_millis(1)),
            Role::Worker(WorkerId(0)),
        )[0];
    }
    let calls = h.dies(pid, Exit::Code(1));
    assert!(h.svc.fx.logged(
        Level::Error,
        "crash loop: worker 0 died 5 times in a row before it was ready"
    ));
    assert_eq!(h.svc.phase, Phase::Stopping);
    assert_eq!(
        calls,
        [Call::Forget(pid), Call::StopAccepting],
        "the service stops (no worker is left to drain)"
    );
}

#[test]
fn a_stop_drains_workers_then_owners_and_kills_at_the_drain_deadline() {
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    let (w0, w1) = (h.workers[0], h.workers[1]);
    h.svc.input(Input::Signal(Signal::SIGTERM));
    let calls = h.svc.fx.take();
    assert_eq!(
        calls[..3],
        [Call::StopAccepting, Call::Drain(w0), Call::Drain(w1)],
        "the listeners are gated before any worker drains"
    );
    assert!(
        !calls.contains(&Call::Drain(h.owner)),
        "the owner serves until the workers are gone"
    );
    // Worker 0 finishes; worker 1 hangs.
    h.dies(w0, Exit::Code(0));
    assert!(h
        .svc
        .fx
        .logged(Level::Info, "exited after draining (exit code 0)"));
    let calls = h.tick_after(GRACEFUL);
    assert!(
        !calls.contains(&Call::CloseListeners),
        "the listeners stay while a worker drains"
    );
    assert!(
        !calls.contains(&Call::Signal(w1, Signal::SIGKILL)),
        "not killed at its deadline: {calls:?}"
    );
    let calls = h.tick_after(Duration::from_millis(1));
    assert!(
        calls.contains(&Call::Signal(w1, Signal::SIGKILL)),
        "{calls:?}"
    );
    assert!(h.svc.fx.logged(Level::Warn, "worker 1 (pid"));
    assert!(h
        .svc
        .fx
        .logged(Level::Warn, "killing: drain deadline passed"));
    h.dies(w1, sig("SIGKILL"));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(
        calls[..2],
        [Call::CloseListeners, Call::Drain(h.owner)],
        "no worker left: the listeners close, then the owner drains"
    );
    assert!(!h.svc.done());
    h.dies(h.owner, Exit::Code(0));
    assert!(h.svc.done());
    assert_eq!(h.svc.finish(), None, "a requested stop is not an error");
    assert_eq!(h.svc.fx.take(), [Call::StopZygote(Some(h.zygote))]);
}

#[test]
fn a_child_that_cannot_hear_drain_gets_sigterm() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    let w = h.workers[0];
    h.svc.fx.deaf.insert(w);
    h.svc.input(Input::Signal(Signal::SIGINT));
    assert_eq!(
        h.svc.fx.take(),
        [
            Call::StopAccepting,
            Call::Drain(w),
            Call::Signal(w, Signal::SIGTERM)
        ]
    );
}

#[test]
fn a_child_not_ready_within_120_s_is_killed_and_retried() {
    let timeout = Duration::from_secs(1000);
    let mut h = Harness::running(1, timeout, "");
    h.dies(h.workers[0], sig("SIGKILL"));
    let slow = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    let calls = h.tick_after(READY_TIMEOUT);
    assert!(!calls.contains(&Call::Signal(slow, Signal::SIGKILL)));
    let calls = h.tick_after(Duration::from_millis(1));
    assert!(
        calls.contains(&Call::Signal(slow, Signal::SIGKILL)),
        "{calls:?}"
    );
    assert!(h
        .svc
        .fx
        .logged(Level::Warn, "killing: not ready after 120s"));
    h.dies(slow, sig("SIGKILL"));
    assert!(h.svc.fx.logged(Level::Warn, "died before it was ready"));
    assert_eq!(
        h.svc.slots[&Role::Worker(WorkerId(0))].failures_before_ready,
        1
    );
}

#[test]
fn a_serving_child_silent_past_the_timeout_is_killed_the_others_are_not() {
    let timeout = Duration::from_secs(30);
    let mut h = Harness::running(2, timeout, "");
    let (w0, w1, owner) = (h.workers[0], h.workers[1], h.owner);
    h.svc.fx.advance(Duration::from_secs(20));
    beat(&mut h, &[w1, owner]);
    let calls = h.tick_after(Duration::from_secs(11));
    assert_eq!(calls, [Call::Signal(w0, Signal::SIGKILL)]);
    assert!(h
        .svc
        .fx
        .logged(Level::Warn, "no heartbeat for 31.0s (--timeout 30s)"));
    // While the kernel tears it down (a large process takes a while), it is not killed, nor
    // logged as killed, again on every tick.
    let before = h.svc.fx.logs.len();
    for _ in 0..5 {
        assert_eq!(h.tick_after(Duration::from_millis(100)), []);
    }
    assert_eq!(
        h.svc.fx.logs.len(),
        before,
        "{:?}",
        &h.svc.fx.logs[before..]
    );
}

#[test]
fn a_roll_drains_each_old_worker_only_once_its_replacement_is_ready() {
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    let (old0, old1) = (h.workers[0], h.workers[1]);
    h.svc.input(Input::Signal(Signal::SIGHUP));
    let calls = h.tick_after(Duration::ZERO);
    let (new0, new1) = (
        spawned(&calls, Role::Worker(WorkerId(0)))[0],
        spawned(&calls, Role::Worker(WorkerId(1)))[0],
    );
    assert!(h
        .svc
        .fx
        .logged(Level::Info, &format!("to replace pid {old0}")));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Drain(_))),
        "nothing drains before a replacement is ready"
    );
    h.svc.input(Input::Message(new1, ready("")));
    assert_eq!(h.svc.fx.take(), [Call::Drain(old1)]);
    assert_eq!(h.state(old0), Some(State::Serving));
    h.svc.input(Input::Message(new0, ready("")));
    assert_eq!(h.svc.fx.take(), [Call::Drain(old0)]);
    h.dies(old0, Exit::Code(0));
    h.dies(old1, Exit::Code(0));
    assert!(
        spawned(
            &h.tick_after(Duration::from_secs(1)),
            Role::Worker(WorkerId(0))
        )
        .is_empty(),
        "a drained worker is not replaced again"
    );
    assert_eq!(
        h.restarts(Role::Worker(WorkerId(0))),
        0,
        "a roll is not a restart"
    );
}

#[test]
fn a_replacement_that_dies_mid_roll_leaves_the_old_worker_serving_and_is_retried() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    let old = h.workers[0];
    h.svc.input(Input::Signal(Signal::SIGHUP));
    let doomed = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    let calls = h.dies(doomed, Exit::Code(1));
    assert!(!calls.contains(&Call::Drain(old)), "{calls:?}");
    assert_eq!(
        h.state(old),
        Some(State::Serving),
        "the old worker keeps serving"
    );
    assert!(h.svc.fx.logged(
        Level::Warn,
        &format!("the replacement for pid {old} died; pid {old} keeps serving")
    ));
    let calls = h.tick_after(Duration::ZERO);
    let retry = spawned(&calls, Role::Worker(WorkerId(0)));
    assert_eq!(
        retry.len(),
        1,
        "one new replacement, not a restart too: {calls:?}"
    );
    h.svc.input(Input::Message(retry[0], ready("")));
    assert_eq!(h.svc.fx.take(), [Call::Drain(old)]);
}

#[test]
fn a_restarted_legacy_ipc_owner_rolls_every_worker() {
    let mut h = Harness::running(2, Duration::from_secs(30), "backend=cuda ipc=legacy");
    assert_eq!(h.svc.ipc.as_deref(), Some("legacy"));
    assert_eq!(h.svc.backend.as_deref(), Some("cuda"));
    h.dies(h.owner, sig("SIGKILL"));
    let owner = spawned(&h.tick_after(Duration::ZERO), Role::Owner(0))[0];
    assert!(
        spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0))).is_empty(),
        "the workers keep serving while the owner restarts"
    );
    h.svc
        .input(Input::Message(owner, ready("backend=cuda ipc=legacy")));
    assert!(h.svc.fx.logged(
        Level::Info,
        "the owner restarted with legacy CUDA IPC: rolling 2"
    ));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(
        spawned(&calls, Role::Worker(WorkerId(0))).len(),
        1,
        "{calls:?}"
    );
    assert_eq!(
        spawned(&calls, Role::Worker(WorkerId(1))).len(),
        1,
        "{calls:?}"
    );
}

#[test]
fn a_restarted_vmm_owner_leaves_the_workers_alone() {
    let mut h = Harness::running(2, Duration::from_secs(30), "backend=cuda ipc=vmm");
    h.dies(h.owner, sig("SIGKILL"));
    let owner = spawned(&h.tick_after(Duration::ZERO), Role::Owner(0))[0];
    h.svc
        .input(Input::Message(owner, ready("backend=cuda ipc=vmm")));
    let calls = h.tick_after(Duration::ZERO);
    assert!(
        spawned(&calls, Role::Worker(WorkerId(0))).is_empty(),
        "{calls:?}"
    );
}

/// The zygote launched by the last tick fails to start.
fn launch_fails(h: &mut Harness, calls: &[Call]) {
    assert_eq!(calls, [Call::LaunchZygote]);
    h.svc.input(Input::ZygoteStarted(Err(
        "the zygote exited before it was ready".into(),
    )));
}

#[test]
fn a_zygote_restart_that_keeps_failing_stops_the_service() {
    let mut h = Harness::running(1, Duration::from_secs(1000), "");
    let w = h.workers[0];
    h.svc.input(Input::Status(h.zygote, sig("SIGKILL")));
    assert!(h.svc.zygote.is_none());
    assert!(h.svc.fx.logged(Level::Warn, "restarting it in 50 ms"));
    // The died zygote was failure 1; each failed start is one more, 5 s apart.
    let calls = h.tick_after(Duration::from_millis(50));
    launch_fails(&mut h, &calls);
    for _ in 0..2 {
        assert!(h.tick_after(Duration::from_millis(4999)).is_empty());
        let calls = h.tick_after(Duration::from_millis(1));
        launch_fails(&mut h, &calls);
    }
    assert_eq!(h.svc.phase, Phase::Running, "the worker serves meanwhile");
    let calls = h.tick_after(Duration::from_secs(5));
    launch_fails(&mut h, &calls);
    assert!(
        h.svc.fx.take().contains(&Call::Drain(w)),
        "the service stops"
    );
    assert!(h
        .svc
        .fx
        .logged(Level::Error, "the zygote cannot be restarted"));
    h.dies(w, Exit::Code(0));
    h.dies(h.owner, Exit::Code(0));
    let reason = h.svc.finish().expect("a fatal stop has its reason");
    assert!(
        reason.contains("the zygote cannot be restarted"),
        "{reason}"
    );
    assert_eq!(h.svc.fx.take(), [Call::StopZygote(None)]);
}

#[test]
fn while_a_new_zygote_starts_supervision_goes_on_and_spawns_wait_for_it() {
    let timeout = Duration::from_secs(30);
    let mut h = Harness::running(2, timeout, "");
    let (w0, w1, owner) = (h.workers[0], h.workers[1], h.owner);
    h.svc.input(Input::Status(h.zygote, sig("SIGKILL")));
    assert_eq!(
        h.tick_after(Duration::from_millis(50)),
        [Call::LaunchZygote]
    );
    // The new zygote loads a large model for a long while: the workers are still judged by
    // their heartbeats, and a dead one waits for the zygote.
    h.dies(w0, sig("SIGKILL"));
    h.svc.fx.advance(Duration::from_secs(20));
    beat(&mut h, &[owner]);
    let calls = h.tick_after(Duration::from_secs(11));
    assert_eq!(
        calls,
        [Call::Signal(w1, Signal::SIGKILL)],
        "no second launch, no spawn without a zygote, the silent worker killed"
    );
    zygote_started(&mut h.svc, 999);
    assert!(h.svc.fx.logged(Level::Info, "zygote restarted (restart 1)"));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(
        spawned(&calls, Role::Worker(WorkerId(0))).len(),
        1,
        "{calls:?}"
    );
    let status = h.svc.status();
    assert_eq!(
        (status.processes[1].pid, status.processes[1].restarts),
        (999, 1)
    );
}

#[test]
fn an_exit_status_that_comes_after_the_death_is_logged_with_the_role() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    let w = h.workers[0];
    h.svc.input(Input::Died(w));
    assert!(h
        .svc
        .fx
        .logged(Level::Warn, "died while serving (status to follow)"));
    h.svc.input(Input::Status(w, sig("SIGSEGV")));
    assert!(h.svc.fx.logged(
        Level::Info,
        &format!("worker 0 (pid {w}) exit status: signal SIGSEGV")
    ));
    assert_eq!(h.svc.exits.len(), 0);
}

#[test]
fn an_owner_that_fails_before_the_first_ready_fails_the_start() {
    let mut svc = Service::new(config(1, Duration::from_secs(30)), vec![], Fake::default());
    svc.start().expect("start");
    let owner = spawned(&svc.fx.take(), Role::Owner(0))[0];
    svc.input(Input::ChildError {
        pid: owner,
        stage: "attach".into(),
        message: "no model".into(),
    });
    svc.input(Input::Status(owner, Exit::Code(127)));
    svc.input(Input::Died(owner));
    assert!(svc.done());
    let reason = svc.finish().expect("the start failed");
    assert!(
        reason.contains("owner 0 (pid")
            && reason.contains("attach failed: no model; exit code 127"),
        "{reason}"
    );
}

#[test]
fn status_reports_each_process_with_its_slot_state_and_restarts() {
    let mut h = Harness::running(2, Duration::from_secs(30), "backend=host ipc=memfd");
    h.dies(h.workers[1], sig("SIGKILL"));
    h.tick_after(Duration::ZERO);
    let s = h.svc.status();
    let rows: Vec<(&str, Option<u32>, &str, u32)> = s
        .processes
        .iter()
        .map(|p| (p.role.as_str(), p.slot, p.state.as_str(), p.restarts))
        .collect();
    assert_eq!(
        rows,
        [
            ("supervisor", None, "running", 0),
            ("zygote", None, "running", 0),
            ("owner", Some(0), "serving", 0),
            ("worker", Some(0), "serving", 0),
            ("worker", Some(1), "starting", 1),
        ]
    );
    assert_eq!(
        (s.backend.as_str(), s.ipc.as_deref()),
        ("host", Some("memfd"))
    );
}

fn reasons(h: &Harness, role: Role) -> RestartReasons {
    h.svc
        .slots
        .get(&role)
        .map(|s| s.reasons)
        .unwrap_or_default()
}

#[test]
fn each_replacement_counts_under_its_reason() {
    let mut h = Harness::running(4, Duration::from_secs(30), "");
    let w = h.workers.clone();
    h.dies(w[0], Exit::Code(3));
    h.dies(w[1], sig("SIGSEGV"));
    // A status after the death: counted when it comes.
    h.svc.input(Input::Died(w[3]));
    assert_eq!(
        reasons(&h, Role::Worker(WorkerId(3))),
        RestartReasons::default()
    );
    h.svc.input(Input::Status(w[3], Exit::Code(1)));
    let r = |h: &Harness, s| reasons(h, Role::Worker(WorkerId(s)));
    assert_eq!((r(&h, 0).exit, r(&h, 0).signal), (1, 0));
    assert_eq!((r(&h, 1).exit, r(&h, 1).signal), (0, 1));
    assert_eq!(r(&h, 3).exit, 1, "a status after the death is counted");
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    let silent = h.workers[0];
    let calls = h.tick_after(Duration::from_secs(31));
    assert!(calls.contains(&Call::Signal(silent, Signal::SIGKILL)));
    h.dies(silent, sig("SIGKILL"));
    assert_eq!(
        reasons(&h, Role::Worker(WorkerId(0))),
        RestartReasons {
            heartbeat: 1,
            ..Default::default()
        }
    );
    let new = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    h.svc.input(Input::Message(new, ready("")));
    h.svc.input(Input::Signal(Signal::SIGHUP));
    let rolled = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    h.svc.input(Input::Message(rolled, ready("")));
    h.dies(new, Exit::Code(0));
    let r = reasons(&h, Role::Worker(WorkerId(0)));
    assert_eq!(
        (r.heartbeat, r.roll, r.exit),
        (1, 1, 0),
        "a drained exit is no restart"
    );
    let status = h.svc.status();
    assert_eq!(status.processes.last().map(|p| p.restart_reasons), Some(r));
}

#[test]
fn scaling_adds_slots_and_drains_the_ones_past_the_new_count_touching_no_other() {
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    let (w0, w1) = (h.workers[0], h.workers[1]);
    let resp = h.svc.input(Input::Admin(
        AdminConn(1),
        AdminRequest::Scale { id: 7, workers: 4 },
    ));
    assert_eq!(resp, Some((AdminConn(1), AdminResponse::Ok { id: 7 })));
    let calls = h.svc.fx.take();
    let (w2, w3) = (
        spawned(&calls, Role::Worker(WorkerId(2)))[0],
        spawned(&calls, Role::Worker(WorkerId(3)))[0],
    );
    assert_eq!(calls.len(), 2, "only the new slots: {calls:?}");
    h.svc.input(Input::Message(w2, ready("")));
    h.svc.input(Input::Message(w3, ready("")));
    h.svc.input(Input::Signal(Signal::SIGTTOU));
    assert_eq!(h.svc.fx.take(), [Call::Drain(w3)]);
    assert_eq!(h.svc.status().workers, 3);
    h.svc.input(Input::Admin(
        AdminConn(2),
        AdminRequest::Scale { id: 8, workers: 1 },
    ));
    assert_eq!(h.svc.fx.take(), [Call::Drain(w1), Call::Drain(w2)]);
    for pid in [w1, w2, w3] {
        h.dies(pid, Exit::Code(0));
    }
    let calls = h.tick_after(Duration::from_secs(1));
    assert!(calls.is_empty(), "the slots past 1 stay empty: {calls:?}");
    assert_eq!(h.state(w0), Some(State::Serving), "worker 0 is not touched");
    h.svc.input(Input::Signal(Signal::SIGTTIN));
    assert_eq!(
        spawned(&h.svc.fx.take(), Role::Worker(WorkerId(1))).len(),
        1
    );
    assert!(h.svc.fx.logged(Level::Info, "SIGTTIN: from 1 to 2 workers"));
}

#[test]
fn a_scale_out_of_range_or_while_stopping_is_refused() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    h.svc.input(Input::Signal(Signal::SIGTTOU));
    assert!(h.svc.fx.logged(Level::Warn, "must be 1 to 256, not 0"));
    assert!(h.svc.fx.take().is_empty(), "the last worker stays");
    let refused = |h: &mut Harness, workers| match h.svc.input(Input::Admin(
        AdminConn(1),
        AdminRequest::Scale { id: 1, workers },
    )) {
        Some((_, AdminResponse::Error { code, .. })) => Some(code),
        _ => None,
    };
    assert_eq!(refused(&mut h, 257), Some(ErrorCode::BadRequest));
    h.svc.input(Input::Signal(Signal::SIGTERM));
    assert_eq!(refused(&mut h, 2), Some(ErrorCode::ShuttingDown));
}

#[test]
fn the_statuses_of_strangers_are_not_kept() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    // A worker's own child, orphaned to the supervisor (everyone's subreaper), then reaped.
    h.svc.input(Input::Status(4242, Exit::Code(0)));
    assert_eq!(h.svc.exits.len(), 0);
    // One of ours, its status before its death: kept until the death.
    h.svc.input(Input::Status(h.workers[0], Exit::Code(1)));
    assert_eq!(h.svc.exits.len(), 1);
    h.svc.input(Input::Died(h.workers[0]));
    assert_eq!(h.svc.exits.len(), 0);
}

#[test]
fn a_first_zygote_that_cannot_start_fails_the_start_before_any_spawn() {
    let mut fx = Fake::default();
    fx.zygote_failures = 1;
    let mut svc = Service::new(config(1, Duration::from_secs(30)), vec![], fx);
    let e = svc.start().expect_err("the start fails");
    assert!(
        e.to_string().contains("exited before it was ready"),
        "{e:#}"
    );
    assert!(spawned(&svc.fx.calls, Role::Owner(0)).is_empty());
}

fn recycling(workers: u32, limits: RecycleLimits, fake: Fake) -> Harness {
    let cfg = Config {
        recycle: limits,
        ..config(workers, Duration::from_secs(30))
    };
    Harness::running_with(cfg, fake, "")
}

fn served(h: &mut Harness, pid: i32, served: u64) {
    h.svc.input(Input::Message(
        pid,
        ChildMessage::Heartbeat {
            served,
            latency: None,
        },
    ));
}

#[test]
fn a_worker_at_its_request_limit_is_replaced_ready_first_and_counted_as_recycle() {
    let limits = RecycleLimits {
        max_requests: Some(10),
        jitter: 4,
        max_rss_mib: None,
    };
    let mut fake = Fake::default();
    fake.draw = 2;
    let mut h = recycling(2, limits, fake);
    let (old, other) = (h.workers[0], h.workers[1]);
    served(&mut h, old, 11);
    assert!(
        spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0))).is_empty(),
        "the limit is 10 + a jitter of 2"
    );
    served(&mut h, old, 12);
    served(&mut h, old, 13);
    let calls = h.tick_after(Duration::ZERO);
    let new = spawned(&calls, Role::Worker(WorkerId(0)));
    assert_eq!(
        new.len(),
        1,
        "one replacement, however many beats: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Drain(_))),
        "{calls:?}"
    );
    assert_eq!(h.state(old), Some(State::Serving), "it serves until then");
    assert!(h.svc.fx.logged(Level::Info, "served 12 requests"));
    h.svc.input(Input::Message(new[0], ready("")));
    assert_eq!(h.svc.fx.take(), [Call::Drain(old)]);
    h.dies(old, Exit::Code(0));
    assert!(spawned(
        &h.tick_after(Duration::from_secs(1)),
        Role::Worker(WorkerId(0))
    )
    .is_empty());
    let r = reasons(&h, Role::Worker(WorkerId(0)));
    assert_eq!((r.recycle, r.roll, r.exit), (1, 0, 0), "{r:?}");
    assert_eq!(
        h.restarts(Role::Worker(WorkerId(0))),
        0,
        "a recycle is not a restart"
    );
    assert_eq!(
        h.state(other),
        Some(State::Serving),
        "the other is not touched"
    );
    assert_eq!(
        reasons(&h, Role::Worker(WorkerId(1))),
        RestartReasons::default()
    );
    served(&mut h, new[0], 5);
    assert!(
        spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0))).is_empty(),
        "the replacement counts its own requests"
    );
}

#[test]
fn a_worker_over_the_memory_ceiling_is_recycled_and_owners_never_are() {
    let limits = RecycleLimits {
        max_requests: None,
        jitter: 0,
        max_rss_mib: Some(512),
    };
    let mut h = recycling(1, limits, Fake::default());
    let (old, owner) = (h.workers[0], h.owner);
    let mib = |n: u64| Memory {
        rss_kib: n * 1024,
        pss_kib: n * 512,
    };
    h.svc.fx.memory.insert(old, mib(512));
    h.svc.fx.memory.insert(owner, mib(4096));
    served(&mut h, old, 1_000_000);
    served(&mut h, owner, 1);
    assert!(
        spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0))).is_empty(),
        "512 MiB is not over --max-rss 512, and no request limit was set"
    );
    h.svc.fx.memory.insert(old, mib(513));
    served(&mut h, old, 1_000_001);
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(
        spawned(&calls, Role::Worker(WorkerId(0))).len(),
        1,
        "{calls:?}"
    );
    assert!(spawned(&calls, Role::Owner(0)).is_empty(), "{calls:?}");
    assert!(h.svc.fx.logged(Level::Info, "resident memory 513 MiB"));
}

#[test]
fn a_replacement_that_dies_mid_recycle_is_retried_and_still_counts_as_recycle() {
    let limits = RecycleLimits {
        max_requests: Some(1),
        ..RecycleLimits::default()
    };
    let mut h = recycling(1, limits, Fake::default());
    let old = h.workers[0];
    served(&mut h, old, 1);
    let doomed = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    h.dies(doomed, Exit::Code(1));
    assert_eq!(h.state(old), Some(State::Serving));
    let retry = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)));
    assert_eq!(retry.len(), 1);
    h.svc.input(Input::Message(retry[0], ready("")));
    assert_eq!(h.svc.fx.take(), [Call::Drain(old)]);
    let r = reasons(&h, Role::Worker(WorkerId(0)));
    assert_eq!((r.recycle, r.roll, r.exit), (1, 0, 1), "{r:?}");
}

#[test]
fn nothing_is_recycled_while_the_service_stops() {
    let limits = RecycleLimits {
        max_requests: Some(1),
        ..RecycleLimits::default()
    };
    let mut h = recycling(1, limits, Fake::default());
    let old = h.workers[0];
    h.svc.input(Input::Signal(Signal::SIGTERM));
    served(&mut h, old, 5);
    assert!(spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0))).is_empty());
}

#[test]
fn metrics_keep_the_counts_of_gone_workers_and_dropped_slots() {
    use zygote_runtime::protocol::Latency;
    let mut h = Harness::running(2, Duration::from_secs(30), "backend=host bytes=1234");
    let (w0, w1) = (h.workers[0], h.workers[1]);
    h.svc.fx.advance(Duration::from_millis(30));
    let mut l = Latency::default();
    l.observe(Duration::from_millis(3));
    l.observe(Duration::from_millis(700));
    for (pid, served) in [(w0, 5), (w1, 7)] {
        h.svc.input(Input::Message(
            pid,
            ChildMessage::Heartbeat {
                served,
                latency: Some(l.clone()),
            },
        ));
    }
    h.dies(w0, sig("SIGKILL"));
    h.tick_after(Duration::ZERO);
    let m = h.svc.metrics();
    assert_eq!(m.requests, 12, "the dead worker's requests stay counted");
    assert_eq!(m.latency.count(), 4);
    assert!(
        (m.latency.sum - 2.0 * 0.703).abs() < 1e-9,
        "{:?}",
        m.latency
    );
    assert_eq!(m.weights_bytes, [(0, 1234)]);
    assert_eq!(m.spawn_ready.count(), 3, "the owner and two workers");
    assert_eq!(m.restarts.signal, 1);
    assert_eq!(m.workers[1], ("serving", 1));
    assert_eq!(m.workers[0], ("starting", 1), "the replacement");
    h.svc.input(Input::Admin(
        AdminConn(1),
        AdminRequest::Scale { id: 1, workers: 1 },
    ));
    assert!(h.svc.slots.keys().all(|r| *r != Role::Worker(WorkerId(1))));
    h.dies(w1, Exit::Code(0));
    let m = h.svc.metrics();
    assert_eq!(
        m.restarts.signal, 1,
        "a dropped slot's restarts stay in the totals"
    );
    assert_eq!(m.requests, 12);
}

#[test]
fn the_manager_hears_ready_once_all_serve_reloading_for_a_roll_and_stopping() {
    use crate::supervisor::effects::Notify;
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    let notes = std::mem::take(&mut h.svc.fx.notes);
    assert_eq!(
        notes.last(),
        Some(&Notify::Ready {
            status: "2 of 2 workers serving".into()
        }),
        "{notes:?}"
    );
    assert_eq!(
        notes
            .iter()
            .filter(|n| matches!(n, Notify::Ready { .. }))
            .count(),
        1,
        "ready only when the last worker serves: {notes:?}"
    );
    // A death: the counts, and no second READY=1 for the replacement.
    h.dies(h.workers[0], sig("SIGKILL"));
    let new = spawned(&h.tick_after(Duration::ZERO), Role::Worker(WorkerId(0)))[0];
    h.svc.input(Input::Message(new, ready("")));
    assert_eq!(
        std::mem::take(&mut h.svc.fx.notes),
        [
            Notify::Status("1 of 2 workers serving".into()),
            Notify::Status("2 of 2 workers serving".into())
        ]
    );
    // A roll: RELOADING=1, then READY=1 once every replacement serves.
    let old1 = h.workers[1];
    h.svc.input(Input::Signal(Signal::SIGHUP));
    let calls = h.tick_after(Duration::ZERO);
    let (r0, r1) = (
        spawned(&calls, Role::Worker(WorkerId(0)))[0],
        spawned(&calls, Role::Worker(WorkerId(1)))[0],
    );
    h.svc.input(Input::Message(r1, ready("")));
    h.dies(old1, Exit::Code(0));
    let notes = std::mem::take(&mut h.svc.fx.notes);
    assert!(
        matches!(notes.first(), Some(Notify::Reloading { .. })),
        "{notes:?}"
    );
    assert!(
        !notes.iter().any(|n| matches!(n, Notify::Ready { .. })),
        "not ready while worker 0 is still rolled: {notes:?}"
    );
    h.svc.input(Input::Message(r0, ready("")));
    let notes = std::mem::take(&mut h.svc.fx.notes);
    assert_eq!(
        notes,
        [Notify::Ready {
            status: "2 of 2 workers serving".into()
        }]
    );
    h.svc.input(Input::Signal(Signal::SIGTERM));
    assert_eq!(h.svc.fx.notes, [Notify::Stopping]);
}

/// Sleeps `h` by an admin request and lets every child of the sleep exit.
fn asleep(h: &mut Harness) {
    let resp = h
        .svc
        .input(Input::Admin(AdminConn(1), AdminRequest::Sleep { id: 3 }));
    assert_eq!(resp, Some((AdminConn(1), AdminResponse::Ok { id: 3 })));
    let calls = h.svc.fx.take();
    let drains: Vec<Call> = h.workers.iter().map(|w| Call::Drain(*w)).collect();
    assert_eq!(calls, drains, "every worker drains, the owner not yet");
    assert_eq!(h.svc.phase, Phase::Asleep);
    assert!(h.svc.fx.watching, "the listeners are watched while asleep");
    assert_eq!(
        h.svc.fx.notes.last(),
        Some(&crate::supervisor::effects::Notify::Status(
            "asleep: no owner or worker; a connection wakes it".into()
        ))
    );
    for w in h.workers.clone() {
        h.dies(w, Exit::Code(0));
    }
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(calls, [Call::Drain(h.owner)], "then the owner drains");
    assert!(
        !calls.contains(&Call::CloseListeners),
        "the listeners stay open"
    );
    h.dies(h.owner, Exit::Code(0));
    assert!(h.svc.procs.is_empty());
    assert_eq!(
        h.tick_after(Duration::ZERO),
        [Call::ReleaseWeights],
        "then the zygote drops the weights it keeps"
    );
    let calls = h.tick_after(Duration::from_secs(60));
    assert!(
        calls.is_empty(),
        "asleep, nothing is restarted and the zygote stays: {calls:?}"
    );
}

/// Wakes `h` by `input` and checks the owner, then every worker, is spawned again.
fn wakes(h: &mut Harness, input: Input) {
    h.svc.input(input);
    let calls = h.svc.fx.take();
    let owners = spawned(&calls, Role::Owner(0));
    assert_eq!(owners.len(), 1, "a wake starts the owner: {calls:?}");
    assert_eq!(h.svc.phase, Phase::Starting);
    assert!(!h.svc.fx.watching, "awake, the workers accept");
    h.svc.fx.advance(Duration::from_millis(40));
    h.svc.input(Input::Message(owners[0], ready("")));
    let calls = h.svc.fx.take();
    let workers: Vec<i32> = (0..h.workers.len() as u32)
        .map(|w| spawned(&calls, Role::Worker(WorkerId(w)))[0])
        .collect();
    for &w in &workers {
        h.svc.input(Input::Message(w, ready("")));
    }
    assert_eq!(h.svc.phase, Phase::Running);
    assert!(
        h.svc.fx.logged(
            Level::Info,
            "awake: every worker serves 40 ms after the wake"
        ),
        "{:?}",
        h.svc.fx.logs
    );
    (h.owner, h.workers) = (owners[0], workers);
}

#[test]
fn sleep_drains_the_workers_then_the_owner_and_wake_starts_them_again() {
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    asleep(&mut h);
    assert_eq!(h.svc.status().processes[0].state, "asleep");
    wakes(
        &mut h,
        Input::Admin(AdminConn(2), AdminRequest::Wake { id: 4 }),
    );
    // A second sleep works the same way, and the first connection wakes it.
    asleep(&mut h);
    wakes(&mut h, Input::Connection);
    assert_eq!(
        reasons(&h, Role::Worker(WorkerId(0))),
        RestartReasons::default(),
        "sleeping is not a restart"
    );
}

#[test]
fn a_wake_while_children_still_drain_waits_for_the_last_one() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    h.svc
        .input(Input::Admin(AdminConn(1), AdminRequest::Sleep { id: 1 }));
    h.svc.fx.take();
    h.svc.input(Input::Connection);
    assert!(
        h.svc.fx.take().is_empty(),
        "no owner beside the draining one"
    );
    h.dies(h.workers[0], Exit::Code(0));
    assert_eq!(h.tick_after(Duration::ZERO), [Call::Drain(h.owner)]);
    h.dies(h.owner, Exit::Code(0));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(calls[0], Call::ReleaseWeights);
    assert_eq!(
        spawned(&calls, Role::Owner(0)).len(),
        1,
        "woken once the old owner is gone: {calls:?}"
    );
}

#[test]
fn idle_sleep_sleeps_after_that_long_without_a_request_and_not_before() {
    let cfg = Config {
        idle_sleep: Some(Duration::from_secs(10)),
        ..config(1, Duration::from_secs(30))
    };
    let mut h = Harness::running_with(cfg, Fake::default(), "");
    let w = h.workers[0];
    h.tick_after(Duration::from_secs(6));
    served(&mut h, w, 3);
    assert!(h.tick_after(Duration::from_secs(6)).is_empty());
    served(&mut h, w, 3);
    assert_eq!(h.svc.phase, Phase::Running, "a request 6 s ago");
    assert_eq!(h.tick_after(Duration::from_secs(4)), [Call::Drain(w)]);
    assert_eq!(h.svc.phase, Phase::Asleep);
    assert!(h
        .svc
        .fx
        .logged(Level::Info, "no request for 10 s (--idle-sleep)"));
}

#[test]
fn sleep_is_refused_while_starting_or_stopping_and_a_stop_while_asleep_ends_the_service() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    asleep(&mut h);
    h.svc.input(Input::Signal(Signal::SIGTERM));
    assert!(!h.svc.fx.watching);
    h.tick_after(Duration::ZERO);
    assert!(h.svc.done(), "nothing is left to drain");
    let resp = h
        .svc
        .input(Input::Admin(AdminConn(1), AdminRequest::Sleep { id: 9 }));
    assert!(
        matches!(
            resp,
            Some((
                _,
                AdminResponse::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            ))
        ),
        "{resp:?}"
    );
}

/// The new zygote of a reload (or a restart) is up, as pid `pid`.
fn zygote_started(svc: &mut Service<Fake>, pid: i32) {
    let z = crate::supervisor::effects::ZygoteInfo {
        pid,
        started: svc.fx.now,
    };
    svc.input(Input::ZygoteStarted(Ok(z)));
}

/// A `reload --model /models/b.safetensors` of `svc`, up to its new zygote serving.
fn reload_to_new_zygote(svc: &mut Service<Fake>) {
    svc.input(Input::Admin(
        AdminConn(5),
        AdminRequest::Reload {
            id: 1,
            model: Some("/models/b.safetensors".into()),
        },
    ));
    svc.fx.take();
    zygote_started(svc, 900);
}

/// An owner's `ready` for weights generation `generation`.
fn owner_ready(generation: u64) -> ChildMessage {
    ChildMessage::Ready {
        pid: 0,
        generation: Some(generation),
        weights: None,
        detail: "owner".into(),
    }
}

fn reload(h: &mut Harness, model: &str) -> Option<(AdminConn, AdminResponse)> {
    h.svc.input(Input::Admin(
        AdminConn(5),
        AdminRequest::Reload {
            id: 11,
            model: Some(model.into()),
        },
    ))
}

fn reload_state(h: &Harness) -> (String, Option<String>) {
    let r = h.svc.status().reload.expect("a reload is shown");
    (r.state, r.error)
}

#[test]
fn a_reload_with_a_model_replaces_the_zygote_then_the_owner_then_rolls_every_worker() {
    let mut h = Harness::running(2, Duration::from_secs(30), "");
    let (w0, w1) = (h.workers[0], h.workers[1]);
    assert_eq!(
        reload(&mut h, "/models/b.safetensors"),
        Some((AdminConn(5), AdminResponse::Ok { id: 11 }))
    );
    assert_eq!(
        h.svc.fx.take(),
        [
            Call::PrepareModel("/models/b.safetensors".into()),
            Call::RetireZygote(h.zygote),
            Call::LaunchZygote
        ]
    );
    assert_eq!(reload_state(&h).0, "loading");
    // The old owner and workers serve on while the new zygote loads.
    assert!(h.tick_after(Duration::from_secs(1)).is_empty());
    zygote_started(&mut h.svc, 900);
    assert_eq!(
        h.svc.fx.take(),
        [Call::Drain(h.owner)],
        "the old owner drains"
    );
    assert_eq!(h.svc.status().model, "/models/b.safetensors");
    assert!(
        h.tick_after(Duration::ZERO).is_empty(),
        "no new owner beside the old one"
    );
    h.dies(h.owner, Exit::Code(0));
    let calls = h.tick_after(Duration::ZERO);
    let owner = spawned(&calls, Role::Owner(0));
    assert_eq!(owner.len(), 1, "a new owner, a new generation: {calls:?}");
    assert_eq!(reload_state(&h).0, "owners");
    h.svc.input(Input::Message(owner[0], owner_ready(2)));
    assert_eq!(reload_state(&h).0, "rolling");
    let calls = h.tick_after(Duration::ZERO);
    let new: Vec<i32> = [0, 1]
        .map(|w| spawned(&calls, Role::Worker(WorkerId(w)))[0])
        .to_vec();
    for (&n, old) in new.iter().zip([w0, w1]) {
        let ready = ChildMessage::Ready {
            pid: 0,
            generation: Some(2),
            weights: None,
            detail: String::new(),
        };
        h.svc.input(Input::Message(n, ready));
        assert_eq!(
            h.svc.fx.take(),
            [Call::Drain(old)],
            "each old one drains after"
        );
    }
    h.tick_after(Duration::ZERO);
    assert_eq!(reload_state(&h), ("done".into(), None));
    let s = h.svc.status();
    let served: Vec<(Option<u64>, Option<String>)> = s
        .processes
        .iter()
        .filter(|p| p.role == "worker" && p.state == "serving")
        .map(|p| (p.generation, p.model.clone()))
        .collect();
    assert_eq!(
        served,
        vec![(Some(2), Some("/models/b.safetensors".to_string())); 2],
        "{s:?}"
    );
}

#[test]
fn a_reload_the_new_zygote_refuses_leaves_the_old_model_serving_and_says_why() {
    let mut h = Harness::running(1, Duration::from_secs(30), "");
    reload(&mut h, "/models/bad.safetensors");
    h.svc.fx.take();
    h.svc.input(Input::ZygoteStarted(Err(
        "the zygote exited before it was ready (exit code 1)".into(),
    )));
    assert_eq!(
        h.svc.fx.take(),
        [Call::LaunchZygote],
        "a zygote on the old model again, at once"
    );
    let (state, error) = reload_state(&h);
    assert_eq!(state, "failed");
    assert!(error.is_some_and(|e| e.contains("exit code 1")));
    assert_eq!(h.svc.status().model, "model.safetensors");
    assert_eq!(h.svc.zygote_restarts.restarts, 0, "not a crash");
    assert!(h.svc.procs.contains_key(&h.owner) && h.svc.procs.contains_key(&h.workers[0]));
    zygote_started(&mut h.svc, 901);
    // A missing file is refused at once, with nothing touched.
    let resp = reload(&mut h, "/nowhere/missing");
    assert!(
        matches!(&resp, Some((_, AdminResponse::Error { message, .. })) if message.contains("not found")),
        "{resp:?}"
    );
    assert_eq!(
        h.svc.fx.take(),
        [Call::PrepareModel("/nowhere/missing".into())]
    );
}
mod spares;
/// A service with an app template (`--app`): its zygote, owner, template and workers serving.
struct Templated {
    svc: Service<Fake>,
    owner: i32,
    template: i32,
    workers: Vec<i32>,
}

fn templated(workers: u32) -> Templated {
    let cfg = Config {
        template: true,
        entry: "exec".into(),
        command: vec!["python3".into(), "-m".into(), "zygote.template".into()],
        ..config(workers, Duration::from_secs(30))
    };
    let mut svc = Service::new(cfg, vec![], Fake::default());
    svc.start().expect("start");
    let calls = svc.fx.take();
    let owner = spawned(&calls, Role::Owner(0))[0];
    let template = spawned(&calls, Role::Template)[0];
    let req = calls
        .iter()
        .find_map(|c| match c {
            Call::Spawn(pid, req) if *pid == template => Some(req.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(req.entry, "exec", "the zygote execs the template program");
    assert_eq!(req.args, ["--socket", "template-1.sock"]);
    assert!(!req.listeners && req.via.is_none(), "{req:?}");
    svc.input(Input::Message(owner, ready("backend=host")));
    assert!(
        spawned(&svc.fx.take(), Role::Worker(WorkerId(0))).is_empty(),
        "no worker before the template serves"
    );
    svc.input(Input::Message(template, ready("")));
    let calls = svc.fx.take();
    assert!(
        calls.contains(&Call::ConnectTemplate(template, "template-1.sock".into())),
        "{calls:?}"
    );
    let pids: Vec<i32> = (0..workers)
        .map(|w| spawned(&calls, Role::Worker(WorkerId(w)))[0])
        .collect();
    for c in &calls {
        if let Call::Spawn(_, req) = c {
            assert_eq!(
                req.via,
                Some(template),
                "workers fork from the template: {req:?}"
            );
            assert_eq!(req.entry, "app");
        }
    }
    for &pid in &pids {
        svc.input(Input::Message(pid, ready("")));
    }
    assert_eq!(svc.phase, Phase::Running);
    Templated {
        svc,
        owner,
        template,
        workers: pids,
    }
}

#[test]
fn with_an_app_template_the_workers_fork_from_it_once_it_serves() {
    let t = templated(2);
    assert_eq!(t.svc.serving_template(), Some(t.template));
}

#[test]
fn a_killed_template_is_restarted_and_its_workers_keep_serving() {
    let mut t = templated(2);
    t.svc.input(Input::Status(t.template, sig("SIGKILL")));
    t.svc.input(Input::Died(t.template));
    t.svc.fx.advance(Duration::from_millis(1));
    t.svc.tick();
    let calls = t.svc.fx.take();
    let new = spawned(&calls, Role::Template);
    assert_eq!(new.len(), 1, "one new template: {calls:?}");
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Drain(..) | Call::Signal(..))),
        "no worker is touched: {calls:?}"
    );
    for w in &t.workers {
        assert_eq!(t.svc.procs[w].state, State::Serving);
    }
    t.svc.input(Input::Message(new[0], ready("")));
    assert!(t
        .svc
        .fx
        .take()
        .contains(&Call::ConnectTemplate(new[0], "template-2.sock".into())));
    // A worker that dies now forks from the new template.
    t.svc.input(Input::Status(t.workers[0], sig("SIGKILL")));
    t.svc.input(Input::Died(t.workers[0]));
    t.svc.fx.advance(Duration::from_millis(1));
    t.svc.tick();
    let calls = t.svc.fx.take();
    let req = calls.iter().find_map(|c| match c {
        Call::Spawn(_, r) if r.role == Role::Worker(WorkerId(0)) => Some(r.clone()),
        _ => None,
    });
    assert_eq!(req.and_then(|r| r.via), Some(new[0]), "{calls:?}");
}

#[test]
fn a_reload_starts_a_new_template_then_rolls_the_workers_onto_it() {
    let mut t = templated(2);
    t.svc.input(Input::Signal(Signal::SIGHUP));
    t.svc.tick();
    let calls = t.svc.fx.take();
    let new = spawned(&calls, Role::Template);
    assert_eq!(new.len(), 1, "{calls:?}");
    assert!(
        spawned(&calls, Role::Worker(WorkerId(0))).is_empty(),
        "the workers wait for the new code"
    );
    assert!(
        spawned(&calls, Role::Owner(0)).is_empty(),
        "the owner stays"
    );
    t.svc.input(Input::Message(new[0], ready("")));
    let calls = t.svc.fx.take();
    assert!(
        calls.contains(&Call::Drain(t.template)),
        "the old template retires: {calls:?}"
    );
    t.svc.tick();
    let calls = t.svc.fx.take();
    let mut replacements = Vec::new();
    for c in &calls {
        if let Call::Spawn(pid, req) = c {
            assert_eq!(req.via, Some(new[0]), "{req:?}");
            replacements.push(*pid);
        }
    }
    assert_eq!(replacements.len(), 2, "{calls:?}");
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Drain(p) if t.workers.contains(p))),
        "no worker drains before its replacement is ready: {calls:?}"
    );
    t.svc.input(Input::Message(replacements[0], ready("")));
    let calls = t.svc.fx.take();
    assert_eq!(
        calls
            .iter()
            .filter(|c| matches!(c, Call::Drain(p) if t.workers.contains(p)))
            .count(),
        1,
        "{calls:?}"
    );
    assert!(t.svc.procs.contains_key(&t.owner), "same owner");
}

#[test]
fn a_reload_whose_template_fails_leaves_the_old_one_serving() {
    let mut t = templated(2);
    t.svc.input(Input::Signal(Signal::SIGHUP));
    t.svc.tick();
    let new = spawned(&t.svc.fx.take(), Role::Template)[0];
    t.svc.input(Input::Status(new, Exit::Code(3)));
    t.svc.input(Input::Died(new));
    assert!(t
        .svc
        .reload_error
        .as_deref()
        .unwrap_or("")
        .contains("reload failed"));
    for _ in 0..10 {
        let calls = t.tick_after_ms(500);
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Spawn(..) | Call::Drain(..))),
            "no retry, nothing drained: {calls:?}"
        );
    }
    assert_eq!(t.svc.serving_template(), Some(t.template));
    assert_eq!(t.svc.phase, Phase::Running);
    for w in &t.workers {
        assert_eq!(t.svc.procs[w].state, State::Serving);
    }
}

impl Templated {
    fn tick_after_ms(&mut self, ms: u64) -> Vec<Call> {
        self.svc.fx.advance(Duration::from_millis(ms));
        self.svc.tick();
        self.svc.fx.take()
    }
}

#[test]
fn asleep_the_app_template_stays_and_the_wake_forks_the_workers_from_it() {
    let mut t = templated(1);
    t.svc
        .input(Input::Admin(AdminConn(1), AdminRequest::Sleep { id: 1 }));
    assert_eq!(t.svc.fx.take(), [Call::Drain(t.workers[0])]);
    t.svc.input(Input::Status(t.workers[0], Exit::Code(0)));
    t.svc.input(Input::Died(t.workers[0]));
    t.svc.tick();
    let calls = t.svc.fx.take();
    assert!(
        calls.contains(&Call::Drain(t.owner)) && !calls.contains(&Call::Drain(t.template)),
        "the owner drains, the template does not: {calls:?}"
    );
    t.svc.input(Input::Status(t.owner, Exit::Code(0)));
    t.svc.input(Input::Died(t.owner));
    t.svc.tick();
    let calls = t.svc.fx.take();
    assert!(
        calls.contains(&Call::ReleaseWeights),
        "asleep with only the template left: {calls:?}"
    );
    t.svc.input(Input::Connection);
    let owner = spawned(&t.svc.fx.take(), Role::Owner(0))[0];
    t.svc.input(Input::Message(owner, ready("backend=host")));
    let calls = t.svc.fx.take();
    assert!(spawned(&calls, Role::Template).is_empty(), "{calls:?}");
    let w = spawned(&calls, Role::Worker(WorkerId(0)));
    assert_eq!(w.len(), 1, "{calls:?}");
    assert!(calls
        .iter()
        .any(|c| matches!(c, Call::Spawn(p, req) if *p == w[0] && req.via == Some(t.template))));
}

#[test]
fn a_model_reload_with_an_app_template_replaces_the_template_after_the_owners() {
    let mut t = templated(1);
    reload_to_new_zygote(&mut t.svc);
    assert_eq!(
        t.svc.fx.take(),
        [Call::Drain(t.owner)],
        "only the owner drains first"
    );
    t.svc.input(Input::Status(t.owner, Exit::Code(0)));
    t.svc.input(Input::Died(t.owner));
    t.svc.tick();
    let owner = spawned(&t.svc.fx.take(), Role::Owner(0));
    assert_eq!(owner.len(), 1, "the template is not waited for");
    t.svc.input(Input::Message(owner[0], owner_ready(2)));
    t.svc.tick();
    let calls = t.svc.fx.take();
    let new = spawned(&calls, Role::Template);
    assert_eq!(
        new.len(),
        1,
        "a new template, forked by the new model's zygote: {calls:?}"
    );
}

#[test]
fn the_owner_is_asked_for_the_host_weights_form() {
    for form in [
        HostWeightsForm::F32,
        HostWeightsForm::F16,
        HostWeightsForm::Bf16,
    ] {
        let cfg = Config {
            host_weights: form,
            ..config(1, Duration::from_secs(30))
        };
        let mut svc = Service::new(cfg, vec![], Fake::default());
        svc.start().expect("start");
        let calls = svc.fx.take();
        let owner = spawned(&calls, Role::Owner(0))[0];
        let req = calls
            .iter()
            .find_map(|c| match c {
                Call::Spawn(pid, req) if *pid == owner => Some(req.clone()),
                _ => None,
            })
            .unwrap();
        let at = req.args.iter().position(|a| a == "--host-weights");
        assert_eq!(
            at.map(|i| req.args[i + 1].as_str()),
            Some(form.to_string().as_str()),
            "{:?}",
            req.args
        );
    }
}
