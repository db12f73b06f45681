//! Warm spares (`--spares`), driven with the recording fake: the pool is spawned after the
//! workers, a ready spare takes a dead, killed or recycled worker's place at once (`activate`,
//! no spawn), the pool refills after [`SPARE_REFILL_DELAY`], and rolls, scaling and the stop
//! treat spares as the brief says.

use super::*;
use crate::supervisor::policy::SPARE_REFILL_DELAY;

/// A running service with `workers` serving workers and `spares` ready spares (their pids in
/// pool order); the calls so far are taken.
fn with_spares(workers: u32, spares: u32, cfg: impl FnOnce(&mut Config)) -> (Harness, Vec<i32>) {
    let mut c = Config {
        spares,
        ..config(workers, Duration::from_secs(30))
    };
    cfg(&mut c);
    let mut h = Harness::running_with(c, Fake::default(), "");
    let pool = spare_pids(&h);
    assert_eq!(pool.len(), spares as usize, "one spawn per spare");
    for &pid in &pool {
        h.svc.input(Input::Message(pid, ready("")));
    }
    h.svc.fx.take();
    (h, pool)
}

/// The pids of the spares, by pool index.
fn spare_pids(h: &Harness) -> Vec<i32> {
    let mut v: Vec<(u32, i32)> = h
        .svc
        .procs
        .iter()
        .filter_map(|(pid, p)| match p.role {
            Role::Spare(k) => Some((k, *pid)),
            _ => None,
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, pid)| pid).collect()
}

fn role_of(h: &Harness, pid: i32) -> Option<Role> {
    h.svc.procs.get(&pid).map(|p| p.role)
}

#[test]
fn spares_are_spawned_after_the_workers_with_the_listeners_and_reported_apart() {
    let mut svc = Service::new(
        Config {
            spares: 2,
            ..config(1, Duration::from_secs(30))
        },
        vec![],
        Fake::default(),
    );
    svc.start().expect("start");
    let owner = spawned(&svc.fx.take(), Role::Owner(0))[0];
    svc.input(Input::Message(owner, ready("")));
    let calls = svc.fx.take();
    let roles: Vec<(Role, bool, bool)> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Spawn(_, r) => Some((r.role, r.listeners, r.spare)),
            _ => None,
        })
        .collect();
    assert_eq!(
        roles,
        [
            (Role::Worker(WorkerId(0)), true, false),
            (Role::Spare(0), true, true),
            (Role::Spare(1), true, true),
        ],
        "workers first, then the pool; spares hold the listeners but are told they are spares"
    );
    let pids: Vec<i32> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Spawn(pid, _) => Some(*pid),
            _ => None,
        })
        .collect();
    for &pid in &pids {
        svc.input(Input::Message(pid, ready("")));
    }
    assert_eq!(svc.status_line(), "1 of 1 workers serving");
    let s = svc.status();
    let spares: Vec<(&str, &str)> = s
        .processes
        .iter()
        .filter(|p| p.role == "spare")
        .map(|p| (p.role.as_str(), p.state.as_str()))
        .collect();
    assert_eq!(spares, [("spare", "ready"), ("spare", "ready")], "{s:?}");
    let m = svc.metrics();
    assert_eq!(
        m.spares,
        [("starting", 0), ("ready", 2), ("draining", 0)],
        "/metrics counts the pool apart from the workers"
    );
    assert_eq!(m.workers[1], ("serving", 1));
}

#[test]
fn a_dead_worker_is_replaced_by_a_ready_spare_at_once_and_the_pool_refills_after_the_delay() {
    let (mut h, pool) = with_spares(2, 1, |_| {});
    let w0 = h.workers[0];
    let calls = h.dies(w0, sig("SIGKILL"));
    assert!(
        calls.contains(&Call::Activate(pool[0], WorkerId(0))),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Spawn(..))),
        "no fork on the way to the slot's next answer: {calls:?}"
    );
    assert_eq!(role_of(&h, pool[0]), Some(Role::Worker(WorkerId(0))));
    assert_eq!(h.state(pool[0]), Some(State::Serving));
    assert!(h.svc.all_workers_serving());
    let r = reasons(&h, Role::Worker(WorkerId(0)));
    assert_eq!(r.signal, 1, "the death counts as before: {r:?}");
    assert!(h.svc.fx.logged(Level::Info, "spare 0 (pid"));
    // Before the refill delay: nothing spawned, not even for the empty slot.
    let calls = h.tick_after(SPARE_REFILL_DELAY - Duration::from_millis(1));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Spawn(..))),
        "{calls:?}"
    );
    let calls = h.tick_after(Duration::from_millis(1));
    assert_eq!(spawned(&calls, Role::Spare(0)).len(), 1, "{calls:?}");
    assert!(spawned(&calls, Role::Worker(WorkerId(0))).is_empty());
}

#[test]
fn without_a_ready_spare_a_worker_is_spawned_as_before() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    // The only spare takes worker 0's place; the next death finds the pool empty.
    let first = h.workers[0];
    h.dies(first, sig("SIGKILL"));
    let calls = h.dies(pool[0], sig("SIGKILL"));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Activate(..))),
        "{calls:?}"
    );
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(spawned(&calls, Role::Worker(WorkerId(0))).len(), 1);
    // A spare that is still starting is no faster than that spawn: it is not activated.
    let calls = h.tick_after(SPARE_REFILL_DELAY);
    let refill = spawned(&calls, Role::Spare(0));
    assert_eq!(refill.len(), 1, "{calls:?}");
    let new_worker = h
        .svc
        .procs
        .iter()
        .find(|(_, p)| p.role == Role::Worker(WorkerId(0)))
        .map(|(pid, _)| *pid)
        .expect("the spawned worker");
    h.svc.input(Input::Message(new_worker, ready("")));
    let calls = h.dies(new_worker, Exit::Code(1));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Activate(..))),
        "the refill is not ready yet: {calls:?}"
    );
}

#[test]
fn a_worker_killed_for_its_heartbeat_is_replaced_by_a_spare() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    let w0 = h.workers[0];
    // The spare beats (as it does every second while it waits), the worker is silent.
    h.svc.fx.advance(Duration::from_secs(20));
    beat(&mut h, &pool);
    let calls = h.tick_after(Duration::from_secs(11));
    assert!(
        calls.contains(&Call::Signal(w0, Signal::SIGKILL)),
        "{calls:?}"
    );
    assert!(!calls.contains(&Call::Signal(pool[0], Signal::SIGKILL)));
    let calls = h.dies(w0, sig("SIGKILL"));
    assert!(
        calls.contains(&Call::Activate(pool[0], WorkerId(0))),
        "{calls:?}"
    );
    assert_eq!(reasons(&h, Role::Worker(WorkerId(0))).heartbeat, 1);
}

#[test]
fn a_silent_spare_is_killed_and_restarted_like_a_worker() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    let workers = h.workers.clone();
    h.svc.fx.advance(Duration::from_secs(20));
    beat(&mut h, &workers);
    let calls = h.tick_after(Duration::from_secs(11));
    assert!(
        calls.contains(&Call::Signal(pool[0], Signal::SIGKILL)),
        "{calls:?}"
    );
    h.dies(pool[0], sig("SIGKILL"));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(spawned(&calls, Role::Spare(0)).len(), 1, "{calls:?}");
    assert_eq!(reasons(&h, Role::Spare(0)).heartbeat, 1);
    assert_eq!(
        h.svc.restart_totals,
        RestartReasons::default(),
        "the workers' totals (/metrics) count no spare"
    );
}

#[test]
fn a_recycled_worker_is_replaced_by_a_spare_and_drains_at_once() {
    let (mut h, pool) = with_spares(1, 1, |c| {
        c.recycle = RecycleLimits {
            max_requests: Some(10),
            jitter: 0,
            max_rss_mib: None,
        };
    });
    let old = h.workers[0];
    h.svc.input(Input::Message(
        old,
        ChildMessage::Heartbeat {
            served: 10,
            latency: None,
        },
    ));
    let calls = h.svc.fx.take();
    assert_eq!(
        calls,
        [Call::Activate(pool[0], WorkerId(0)), Call::Drain(old)],
        "the spare serves before the old one drains, with no spawn"
    );
    assert_eq!(reasons(&h, Role::Worker(WorkerId(0))).recycle, 1);
    let calls = h.tick_after(Duration::ZERO);
    assert!(spawned(&calls, Role::Worker(WorkerId(0))).is_empty());
}

#[test]
fn a_roll_replaces_the_spares_too_and_never_activates_an_old_one() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    h.svc.input(Input::Signal(Signal::SIGHUP));
    let calls = h.tick_after(Duration::ZERO);
    let new_w = spawned(&calls, Role::Worker(WorkerId(0)));
    let new_s = spawned(&calls, Role::Spare(0));
    assert_eq!((new_w.len(), new_s.len()), (1, 1), "{calls:?}");
    // A worker that dies mid-roll does not get the old spare: a fresh worker is spawned.
    let calls = h.dies(h.workers[0], sig("SIGKILL"));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Activate(..))),
        "{calls:?}"
    );
    h.svc.input(Input::Message(new_s[0], ready("")));
    assert_eq!(
        h.svc.fx.take(),
        [Call::Drain(pool[0])],
        "the old spare goes"
    );
    assert_eq!(reasons(&h, Role::Spare(0)).roll, 1);
}

#[test]
fn a_stop_drains_the_spares_with_the_workers_and_then_the_owner() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    h.svc.input(Input::Signal(Signal::SIGTERM));
    let calls = h.svc.fx.take();
    assert!(calls.contains(&Call::Drain(h.workers[0])), "{calls:?}");
    assert!(calls.contains(&Call::Drain(pool[0])), "{calls:?}");
    h.dies(h.workers[0], Exit::Code(0));
    let calls = h.tick_after(Duration::ZERO);
    assert!(
        !calls.contains(&Call::CloseListeners) && !calls.contains(&Call::Drain(h.owner)),
        "a spare still holds the listeners: {calls:?}"
    );
    h.dies(pool[0], Exit::Code(0));
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(calls[..2], [Call::CloseListeners, Call::Drain(h.owner)]);
}

#[test]
fn scaling_up_takes_a_ready_spare_first_and_scaling_down_leaves_the_pool() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    h.svc.input(Input::Signal(Signal::SIGTTIN));
    let calls = h.svc.fx.take();
    assert!(
        calls.contains(&Call::Activate(pool[0], WorkerId(1))),
        "{calls:?}"
    );
    assert!(spawned(&calls, Role::Worker(WorkerId(1))).is_empty());
    let calls = h.tick_after(SPARE_REFILL_DELAY);
    let refill = spawned(&calls, Role::Spare(0));
    assert_eq!(refill.len(), 1, "{calls:?}");
    h.svc.input(Input::Message(refill[0], ready("")));
    h.svc.input(Input::Signal(Signal::SIGTTOU));
    let calls = h.svc.fx.take();
    assert_eq!(
        calls,
        [Call::Drain(pool[0])],
        "worker 1 drains, the pool stays"
    );
    assert_eq!(role_of(&h, refill[0]), Some(Role::Spare(0)));
}

#[test]
fn a_spare_that_cannot_hear_activate_is_killed_and_a_worker_spawned() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    h.svc.fx.deaf.insert(pool[0]);
    let calls = h.dies(h.workers[0], sig("SIGKILL"));
    assert!(
        calls.contains(&Call::Signal(pool[0], Signal::SIGKILL)),
        "{calls:?}"
    );
    let calls = h.tick_after(Duration::ZERO);
    assert_eq!(spawned(&calls, Role::Worker(WorkerId(0))).len(), 1);
}

#[test]
fn sleep_drains_the_spares_with_the_workers_and_the_wake_makes_them_again() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    h.svc
        .input(Input::Admin(AdminConn(1), AdminRequest::Sleep { id: 1 }));
    let calls = h.svc.fx.take();
    assert!(calls.contains(&Call::Drain(pool[0])), "{calls:?}");
    assert!(!calls.contains(&Call::Drain(h.owner)), "{calls:?}");
    h.dies(h.workers[0], Exit::Code(0));
    assert!(
        !h.tick_after(Duration::ZERO).contains(&Call::Drain(h.owner)),
        "the owner waits for the spare too"
    );
    h.dies(pool[0], Exit::Code(0));
    assert_eq!(h.tick_after(Duration::ZERO), [Call::Drain(h.owner)]);
    h.dies(h.owner, Exit::Code(0));
    h.tick_after(Duration::ZERO);
    assert!(h.svc.procs.is_empty());
    h.svc.input(Input::Connection);
    let owner = spawned(&h.svc.fx.take(), Role::Owner(0))[0];
    h.svc.input(Input::Message(owner, ready("")));
    let calls = h.svc.fx.take();
    assert_eq!(spawned(&calls, Role::Worker(WorkerId(0))).len(), 1);
    assert_eq!(
        spawned(&calls, Role::Spare(0)).len(),
        1,
        "awake, the pool is made again: {calls:?}"
    );
}

#[test]
fn a_model_reload_with_spares_drains_only_the_owners_first_and_rolls_the_spares() {
    let (mut h, pool) = with_spares(1, 1, |_| {});
    reload_to_new_zygote(&mut h.svc);
    assert_eq!(
        h.svc.fx.take(),
        [Call::Drain(h.owner)],
        "the spare serves on like the workers"
    );
    h.dies(h.owner, Exit::Code(0));
    let calls = h.tick_after(Duration::ZERO);
    let owner = spawned(&calls, Role::Owner(0));
    assert_eq!(owner.len(), 1, "the new owner, a spare alive: {calls:?}");
    h.svc.input(Input::Message(owner[0], owner_ready(2)));
    let calls = h.tick_after(Duration::ZERO);
    let new_s = spawned(&calls, Role::Spare(0));
    assert_eq!(new_s.len(), 1, "the spare rolls too: {calls:?}");
    h.svc.input(Input::Message(new_s[0], ready("")));
    assert_eq!(h.svc.fx.take(), [Call::Drain(pool[0])]);
}
