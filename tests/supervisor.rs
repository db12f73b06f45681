//! `zygote start`, the supervisor: it replaces what dies (worker, owner, zygote) without
//! disturbing the rest, stops on a crash loop, kills workers that stop heartbeating, rolls
//! on SIGHUP, drains on SIGTERM, and refuses bad model files before serving anything.

mod common;

use std::path::Path;
use std::time::Duration;

use common::load::{one_request, Outcome};
use common::{
    alive, proc_status_field, procs_of, run_start, settled, wait_gone, wait_until, Proc, Service,
    ServiceOptions, TempDir, CHANGE_TIMEOUT,
};
use nix::sys::signal::Signal;
use zygote_runtime::protocol::RestartReasons;

/// The worker of `slot` that serves, from a status.
fn serving_in(procs: &[Proc], slot: u32) -> Option<&Proc> {
    procs
        .iter()
        .find(|p| p.slot == Some(slot) && p.state == "serving")
}

fn ppid(pid: i32) -> i32 {
    proc_status_field(pid, "PPid")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no PPid for pid {pid}"))
}

#[test]
fn a_killed_worker_is_replaced_in_its_slot() {
    let svc = Service::idle(2);
    let before = svc.procs("worker");
    let (victim, other) = (before[0].pid, before[1].pid);
    common::signal(victim, Signal::SIGKILL);
    let after = wait_until_settled(&svc, "worker 0 is replaced", |s| {
        procs_of(s, "worker").iter().all(|p| p.pid != victim)
    });
    let w0 = serving_in(&after, 0).expect("slot 0 serves");
    assert_ne!(w0.pid, victim, "slot 0 is served by a new pid");
    assert_eq!(w0.restarts, 1, "slot 0 counts one restart");
    assert_eq!(
        w0.restart_reasons,
        RestartReasons {
            signal: 1,
            ..Default::default()
        },
        "slot 0's restart was a signal"
    );
    let w1 = serving_in(&after, 1).expect("slot 1 serves");
    assert_eq!((w1.pid, w1.restarts), (other, 0), "slot 1 is untouched");
}

/// Waits until the service is settled (owner and every worker serving) and `cond` holds;
/// returns the workers.
fn wait_until_settled(
    svc: &Service,
    what: &str,
    cond: impl Fn(&zygote_runtime::protocol::ServiceStatus) -> bool,
) -> Vec<Proc> {
    common::wait_for(CHANGE_TIMEOUT, what, || {
        let s = svc.try_status()?;
        (settled(&s, svc.workers) && cond(&s)).then(|| procs_of(&s, "worker"))
    })
}

#[test]
fn a_killed_owner_is_restarted_and_the_workers_are_unaffected() {
    // probe workers import the weights from the owner, so a new one proves the new owner
    // serves them.
    let svc = Service::start(ServiceOptions {
        workers: 2,
        entry: Some("probe".into()),
        ..ServiceOptions::default()
    });
    let workers: Vec<i32> = svc.pids_of("worker");
    let owner = svc.pids_of("owner")[0];
    common::signal(owner, Signal::SIGKILL);
    wait_until_settled(&svc, "a new owner serves", |s| {
        procs_of(s, "owner")
            .iter()
            .any(|o| o.pid != owner && o.state == "serving" && o.restarts == 1)
    });
    assert_eq!(
        svc.pids_of("worker"),
        workers,
        "the workers kept serving under the same pids while the owner restarted"
    );
    common::signal(workers[1], Signal::SIGKILL);
    let after = wait_until_settled(
        &svc,
        "worker 1 is replaced after the owner's restart",
        |s| procs_of(s, "worker").iter().all(|p| p.pid != workers[1]),
    );
    assert!(
        serving_in(&after, 1).is_some_and(|w| w.pid != workers[1]),
        "a new worker imported the weights from the new owner and serves: {after:?}"
    );
}

#[test]
fn when_the_zygote_dies_the_workers_keep_serving_and_a_new_zygote_spawns() {
    let svc = Service::start(ServiceOptions {
        workers: 2,
        args: vec!["--timeout".into(), "2".into()],
        ..ServiceOptions::default()
    });
    let workers = svc.pids_of("worker");
    let owner = svc.pids_of("owner")[0];
    let zygote = svc.zygote_pid();
    common::signal(zygote, Signal::SIGKILL);
    let z = common::wait_for(CHANGE_TIMEOUT, "a new zygote runs", || {
        let s = svc.try_status()?;
        procs_of(&s, "zygote")
            .into_iter()
            .find(|z| z.pid > 0 && z.pid != zygote)
    });
    assert_eq!(z.restarts, 1, "the zygote counts one restart");
    for pid in workers.iter().chain([&owner]) {
        assert_eq!(
            ppid(*pid),
            svc.pid(),
            "pid {pid}, orphaned by the zygote, is now the supervisor's (its subreaper)"
        );
    }
    // Serving means heartbeating: a worker whose heartbeats stopped reaching the supervisor
    // would be killed after --timeout 2.
    wait_until(
        CHANGE_TIMEOUT,
        "the new zygote has been up for 3 s (longer than --timeout)",
        || {
            svc.try_status().is_some_and(|s| {
                procs_of(&s, "zygote")
                    .iter()
                    .any(|p| p.pid == z.pid && p.age_ms >= 3000)
            })
        },
    );
    let s = svc.status();
    assert!(
        settled(&s, 2),
        "the owner and both workers serve: {:?}",
        s.processes
    );
    assert_eq!(
        svc.pids_of("worker"),
        workers,
        "the workers kept their pids through the zygote's death"
    );
    common::signal(workers[0], Signal::SIGKILL);
    let after = wait_until_settled(&svc, "worker 0 is replaced by the new zygote", |s| {
        procs_of(s, "worker").iter().all(|p| p.pid != workers[0])
    });
    let new = serving_in(&after, 0).expect("slot 0 serves");
    assert_eq!(
        ppid(new.pid),
        z.pid,
        "the replacement of worker 0 was forked by the new zygote"
    );
}

#[test]
fn a_crash_loop_stops_the_service_with_an_error() {
    let dir = TempDir::new("crash");
    let model = common::tiny_model(dir.path());
    let done = run_start(
        &[
            "--model",
            model.to_str().expect("utf-8 path"),
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--",
            "/bin/false",
        ],
        &dir.path().join("rt"),
        Duration::from_secs(60),
    );
    assert!(
        !done.status.success(),
        "zygote start exits non-zero on a crash loop: {}\n{}",
        done.status,
        done.output
    );
    assert!(
        done.output.contains("crash loop"),
        "the error says `crash loop`:\n{}",
        done.output
    );
    assert_eq!(
        done.leftovers,
        Vec::<i32>::new(),
        "nothing the service started outlives it"
    );
}

#[test]
fn a_worker_that_misses_its_heartbeats_is_killed_and_replaced() {
    let svc = Service::start(ServiceOptions {
        workers: 2,
        args: vec!["--timeout".into(), "2".into()],
        ..ServiceOptions::default()
    });
    let before = svc.pids_of("worker");
    common::signal(before[0], Signal::SIGSTOP);
    let after = wait_until_settled(&svc, "the stopped worker 0 is replaced", |s| {
        procs_of(s, "worker").iter().all(|p| p.pid != before[0])
    });
    wait_gone(
        &[("stopped worker".into(), before[0])],
        CHANGE_TIMEOUT,
        "the stopped worker is killed",
    );
    assert_eq!(
        serving_in(&after, 1).map(|w| w.pid),
        Some(before[1]),
        "the heartbeating worker 1 is left alone"
    );
    let w0 = serving_in(&after, 0).expect("slot 0 serves");
    assert_eq!(
        (w0.restart_reasons.heartbeat, w0.restart_reasons.signal),
        (1, 0),
        "slot 0 was replaced for its heartbeats (though SIGKILL ended it)"
    );
}

#[test]
fn sigterm_drains_stops_everything_and_exits_0() {
    let mut svc = Service::idle(2);
    let started: Vec<(String, i32)> = svc
        .status()
        .processes
        .iter()
        .filter(|p| p.role != "supervisor")
        .map(|p| (p.role.clone(), p.pid))
        .collect();
    svc.signal(Signal::SIGTERM);
    let status = svc.wait_exit(CHANGE_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "zygote start exits 0 after SIGTERM\n{}",
        svc.log_tail()
    );
    wait_gone(&started, CHANGE_TIMEOUT, "SIGTERM stops every process");
    assert!(
        svc.leftovers().is_empty(),
        "nothing the service started is left"
    );
    let sockets: Vec<_> = std::fs::read_dir(&svc.runtime_dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !sockets
            .iter()
            .any(|n| n == "zygote.sock" || n == "supervisor.sock"),
        "the zygote and supervisor sockets are removed: {sockets:?}"
    );
}

#[test]
fn sighup_rolls_every_worker_the_new_ready_before_the_old_exits() {
    let svc = Service::idle(3);
    let old = svc.pids_of("worker");
    let zygote = svc.zygote_pid();
    // A stopped worker cannot finish its drain, so the moment between its replacement's
    // ready and its own exit lasts until it is continued, and the status must show it: the
    // old worker draining while its replacement serves.
    common::signal(old[0], Signal::SIGSTOP);
    svc.signal(Signal::SIGHUP);
    let replacement = common::wait_for(
        CHANGE_TIMEOUT,
        "worker 0's replacement serves while the old one drains",
        || {
            let workers = procs_of(&svc.try_status()?, "worker");
            for slot in 0..3 {
                assert!(
                    serving_in(&workers, slot).is_some(),
                    "during the roll slot {slot} always has a serving worker: {workers:?}"
                );
            }
            let draining = workers
                .iter()
                .any(|w| w.pid == old[0] && w.state == "draining");
            let new = serving_in(&workers, 0).filter(|w| w.pid != old[0])?;
            draining.then_some(new.pid)
        },
    );
    common::signal(old[0], Signal::SIGCONT);
    let after = wait_until_settled(&svc, "every worker is replaced", |s| {
        let workers = procs_of(s, "worker");
        for slot in 0..3 {
            assert!(
                serving_in(&workers, slot).is_some(),
                "during the roll slot {slot} always has a serving worker: {workers:?}"
            );
        }
        workers.iter().all(|w| !old.contains(&w.pid))
    });
    assert_eq!(serving_in(&after, 0).map(|w| w.pid), Some(replacement));
    assert!(
        after
            .iter()
            .all(|w| w.restarts == 0 && w.restart_reasons.roll == 1),
        "a roll is not a restart, but counts as one roll per slot: {after:?}"
    );
    wait_gone(
        &old.iter()
            .map(|p| ("old worker".to_string(), *p))
            .collect::<Vec<_>>(),
        CHANGE_TIMEOUT,
        "the old workers exit after draining",
    );
    assert_eq!(svc.zygote_pid(), zygote, "a roll keeps the zygote");
    assert!(alive(svc.pid()), "the supervisor keeps running");
}

#[test]
fn each_bad_model_file_is_refused_before_anything_serves() {
    let dir = TempDir::new("badmodels");
    let files = dir.path().join("models");
    std::fs::create_dir(&files).expect("mkdir");
    let cases = zygote_runtime::synth::corrupt_case_files(&files).expect("writing the cases");
    assert!(
        cases.len() >= 10,
        "the corrupt cases are many: {}",
        cases.len()
    );
    for (i, case) in cases.iter().enumerate() {
        let rt = dir.path().join(format!("rt-{i}"));
        let done = run_start(
            &[
                "--model",
                case.path.to_str().expect("utf-8 path"),
                "--workers",
                "1",
                "--entry",
                "idle",
                "--listen",
                "127.0.0.1:0",
            ],
            &rt,
            Duration::from_secs(30),
        );
        assert!(
            !done.status.success(),
            "{}: zygote start refuses the model: {}\n{}",
            case.name,
            done.status,
            done.output
        );
        assert!(
            done.output.contains(case.expect),
            "{}: the error says {:?}:\n{}",
            case.name,
            case.expect,
            done.output
        );
        assert!(
            !done.output.contains("spawned"),
            "{}: nothing was spawned:\n{}",
            case.name,
            done.output
        );
        for sock in ["zygote.sock", "supervisor.sock", "owner-0.sock"] {
            assert!(
                !Path::new(&rt).join(sock).exists(),
                "{}: no {sock} is left behind",
                case.name
            );
        }
        assert!(
            done.leftovers.is_empty(),
            "{}: no process is left behind: {:?}",
            case.name,
            done.leftovers
        );
    }
}

/// The inode of the model memfd `pid` maps (`/memfd:zygote-model`), from `/proc/PID/maps`.
fn model_memfd_inode(pid: i32) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter(|l| l.contains("/memfd:zygote-model"))
        .find_map(|l| l.split_whitespace().nth(4)?.parse().ok())
}

/// The service's total PSS in KiB (every process `zygote status` lists).
fn total_pss_kib(s: &zygote_runtime::protocol::ServiceStatus) -> u64 {
    s.processes.iter().filter_map(|p| p.pss_kib).sum()
}

#[test]
fn a_zygote_restarted_after_kill_9_maps_the_services_model_memfd_not_a_second_copy() {
    const MIB: u64 = 1 << 20;
    let dir = TempDir::new("samecopy");
    // f32: the model memfd is the compute copy, so every process maps the one memfd.
    let model = common::synthetic_model(dir.path(), 32 * MIB, zygote_runtime::model::Dtype::F32);
    let svc = Service::start(ServiceOptions {
        model: Some(model.clone()),
        workers: 2,
        entry: Some("probe".into()),
        ..ServiceOptions::default()
    });
    let zygote = svc.zygote_pid();
    let inode = model_memfd_inode(zygote).expect("the zygote maps the model memfd");
    let workers = svc.pids_of("worker");
    for pid in &workers {
        assert_eq!(model_memfd_inode(*pid), Some(inode), "worker {pid} maps it");
    }
    let before = total_pss_kib(&svc.status());
    // The file on disk changes meanwhile: the restarted zygote does not read it again.
    std::fs::write(&model, b"not a model any more").expect("overwriting the model file");
    common::signal(zygote, Signal::SIGKILL);
    let z = common::wait_for(CHANGE_TIMEOUT, "a new zygote runs", || {
        let s = svc.try_status()?;
        procs_of(&s, "zygote")
            .into_iter()
            .find(|z| z.pid > 0 && z.pid != zygote && z.state == "running")
    });
    assert_eq!(
        model_memfd_inode(z.pid),
        Some(inode),
        "the new zygote maps the memfd the service held, not a copy of the file:\n{}",
        svc.log_tail()
    );
    // It serves spawns from it: a killed worker is replaced by one forked from it.
    common::signal(workers[0], Signal::SIGKILL);
    let after = wait_until_settled(&svc, "worker 0 is replaced by the new zygote", |s| {
        procs_of(s, "worker").iter().all(|p| p.pid != workers[0])
    });
    let new = serving_in(&after, 0).expect("slot 0 serves");
    assert_eq!(ppid(new.pid), z.pid, "forked by the new zygote");
    assert_eq!(model_memfd_inode(new.pid), Some(inode));
    let after = total_pss_kib(&svc.status());
    eprintln!(
        "total PSS of the service: {before} KiB before kill -9 of the zygote, {after} KiB after \
         (model {} KiB)",
        32 * MIB / 1024
    );
    assert!(
        after < before + 8 * MIB / 1024,
        "no second copy: {after} KiB after, {before} KiB before"
    );
}

#[test]
fn a_stop_under_load_refuses_new_connections_and_resets_none() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    const STOPS: usize = 5;
    const CLIENTS: usize = 8;
    let Some(model) =
        common::reference_model("a_stop_under_load_refuses_new_connections_and_resets_none")
    else {
        return;
    };
    let mut totals = [0u64; 3];
    let mut bad = Vec::new();
    for stop in 0..STOPS {
        let mut svc = Service::start(ServiceOptions {
            model: Some(model.clone()),
            workers: 2,
            entry: Some("app".into()),
            ..ServiceOptions::default()
        });
        let addr = svc.addr();
        let answered = Arc::new(AtomicU64::new(0));
        let gone = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (answered, gone, outcomes) = (answered.clone(), gone.clone(), outcomes.clone());
                std::thread::spawn(move || {
                    // Until the service is gone and this client was refused once after that
                    // (bounded: the test's own deadline ends the service first).
                    for i in 0usize.. {
                        let o = one_request(addr, (i + c) % 2 == 1);
                        let done = matches!(o, Outcome::Refused) && gone.load(Ordering::SeqCst);
                        if matches!(o, Outcome::Answered) {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        outcomes.lock().expect("lock").push(o);
                        if done || i > 100_000 {
                            return;
                        }
                    }
                })
            })
            .collect();
        common::wait_until(CHANGE_TIMEOUT, "the load is answered", || {
            answered.load(Ordering::Relaxed) >= 40
        });
        svc.signal(Signal::SIGTERM);
        let status = svc.wait_exit(Duration::from_secs(60));
        assert_eq!(
            status.code(),
            Some(0),
            "stop {stop}: exits 0\n{}",
            svc.log_tail()
        );
        gone.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().expect("a client thread panicked");
        }
        for o in outcomes.lock().expect("lock").drain(..) {
            match o {
                Outcome::Answered => totals[0] += 1,
                Outcome::Refused => totals[1] += 1,
                Outcome::NotConnected => totals[2] += 1,
                Outcome::Reset(e) | Outcome::Other(e) => bad.push(format!("stop {stop}: {e}")),
            }
        }
    }
    eprintln!(
        "{STOPS} stops under load: {} answered, {} refused, {} not connected in 3 s, {} failed",
        totals[0],
        totals[1],
        totals[2],
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "every accepted connection is answered, none is reset ({} of {}): {bad:#?}",
        bad.len(),
        totals.iter().sum::<u64>() + bad.len() as u64
    );
}

/// The pids whose parent is `parent` and whose `comm` is `name`.
fn children_named(parent: i32, name: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            proc_status_field(pid, "PPid").as_deref() == Some(&parent.to_string())
                && proc_status_field(pid, "Name").as_deref() == Some(name)
        })
        .collect()
}

/// Whether the peer closed `s` (or said something): false while it stays silent and open.
fn closed_by_peer(s: &std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 256];
    !matches!((&*s).read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn silent_admin_clients_stall_nothing_and_no_healthy_child_is_killed_for_heartbeats() {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const CAP: usize = 32;
    let svc = Service::start(ServiceOptions {
        workers: 2,
        args: vec!["--timeout".into(), "2".into()],
        ..ServiceOptions::default()
    });
    let before = svc.pids_of("worker");
    let owner = svc.pids_of("owner")[0];
    let zygote = svc.zygote_pid();
    let sock = svc.runtime_dir.join("supervisor.sock");
    // More silent clients than the cap: they connect and never send a byte.
    let silent: Vec<UnixStream> = (0..CAP + 8)
        .map(|_| UnixStream::connect(&sock).expect("connecting to supervisor.sock"))
        .collect();
    common::signal(before[0], Signal::SIGKILL);
    let replacement = common::wait_for(CHANGE_TIMEOUT, "a new worker 0 is forked", || {
        children_named(zygote, "zygote-w0")
            .into_iter()
            .find(|&p| p != before[0])
    });
    // Forked while the silent clients under the cap still hold their connections (none has
    // reached its 2 s deadline): supervision did not wait for any of them.
    let open = silent.iter().filter(|s| !closed_by_peer(s)).count();
    assert_eq!(
        open, CAP,
        "the replacement came while {CAP} silent clients were connected (those over the cap \
         were refused at once)"
    );
    // Silent clients keep coming for longer than --timeout, under the cap so that status
    // requests still get in.
    let stop = Arc::new(AtomicBool::new(false));
    let pressure = {
        let (stop, sock) = (stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut conns: Vec<UnixStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                conns.retain(|s| !closed_by_peer(s));
                while conns.len() < CAP / 2 {
                    match UnixStream::connect(&sock) {
                        Ok(s) => conns.push(s),
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    wait_until(
        CHANGE_TIMEOUT,
        "the replacement has served for 3 s (longer than --timeout 2)",
        || {
            svc.try_status().is_some_and(|s| {
                procs_of(&s, "worker")
                    .iter()
                    .any(|w| w.pid == replacement && w.state == "serving" && w.age_ms >= 3000)
            })
        },
    );
    stop.store(true, Ordering::Relaxed);
    pressure.join().expect("the pressure thread panicked");
    let s = svc.status();
    let workers = procs_of(&s, "worker");
    assert_eq!(
        serving_in(&workers, 1).map(|w| (w.pid, w.restarts)),
        Some((before[1], 0)),
        "worker 1 was never killed for heartbeats: {workers:?}"
    );
    assert_eq!(
        serving_in(&workers, 0).map(|w| (w.pid, w.restarts)),
        Some((replacement, 1))
    );
    assert_eq!(svc.pids_of("owner"), [owner], "the owner was never killed");
    drop(silent);
}

/// `zygote CMD --runtime-dir DIR`, its exit status and output.
fn command(cmd: &str, svc: &Service) -> (bool, String) {
    command_args(&[cmd], svc)
}

/// `zygote ARGS... --runtime-dir DIR`, its exit status and output.
fn command_args(args: &[&str], svc: &Service) -> (bool, String) {
    let out = std::process::Command::new(common::BIN)
        .args(args)
        .arg("--runtime-dir")
        .arg(&svc.runtime_dir)
        .output()
        .expect("running zygote");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn zygote_status_reload_and_stop_reach_the_service_through_the_admin_socket() {
    let mut svc = Service::idle(2);
    let old = svc.pids_of("worker");
    let (ok, table) = command("status", &svc);
    assert!(
        ok && table.contains("REPLACED") && table.contains("workers 2"),
        "{table}"
    );
    let (ok, out) = command("reload", &svc);
    assert!(ok && out.contains("rolling the workers"), "{out}");
    wait_until_settled(&svc, "zygote reload replaces every worker", |s| {
        procs_of(s, "worker").iter().all(|w| !old.contains(&w.pid))
    });
    let (ok, out) = command("stop", &svc);
    assert!(ok && out.contains("stopped"), "{out}");
    assert_eq!(svc.wait_exit(CHANGE_TIMEOUT).code(), Some(0));
    assert!(svc.leftovers().is_empty(), "zygote stop stops everything");
}

/// The fds of `pid` that point at `path`.
fn fds_to(pid: i32, path: &Path) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fds_inherited_by_zygote_start_are_closed_in_the_supervisor_and_the_zygote() {
    let dir = TempDir::new("inherit");
    let model = common::tiny_model(dir.path());
    let marker = dir.path().join("inherited");
    std::fs::write(&marker, b"left open by the parent").expect("writing the marker");
    let rt = dir.path().join("rt");
    let tag = format!("inherit-{}", dir.path().display());
    let log = dir.path().join("service.log");
    // A parent that leaves fds 8 and 9 open (not close-on-exec) across the exec.
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"exec "$@" 8<"$MARKER" 9<"$MARKER""#)
        .arg("sh")
        .arg(common::BIN)
        .arg("start")
        .arg("--model")
        .arg(&model)
        .args([
            "--workers",
            "1",
            "--entry",
            "idle",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--backend", "host", "--runtime-dir"])
        .arg(&rt)
        .env("MARKER", &marker)
        .env(common::TAG_ENV, &tag)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("creating the log"))
        .spawn()
        .expect("running zygote start under sh");
    /// Kills the service, and whatever it started, on drop.
    struct Cleanup(std::process::Child, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            common::kill_tagged(&self.1);
        }
    }
    let supervisor = child.id() as i32;
    let mut guard = Cleanup(child, tag);
    let status = common::wait_for(common::START_TIMEOUT, "the service serves", || {
        if let Ok(Some(st)) = guard.0.try_wait() {
            panic!(
                "zygote start exited ({st}):\n{}",
                common::log_tail(&log, 40)
            );
        }
        let out = std::process::Command::new(common::BIN)
            .args(["status", "--json", "--runtime-dir"])
            .arg(&rt)
            .output()
            .ok()?;
        let s: zygote_runtime::protocol::ServiceStatus =
            serde_json::from_slice(&out.stdout).ok()?;
        settled(&s, 1).then_some(s)
    });
    let zygote = procs_of(&status, "zygote")[0].pid;
    let worker = procs_of(&status, "worker")[0].pid;
    for (role, pid) in [
        ("supervisor", supervisor),
        ("zygote", zygote),
        ("worker", worker),
    ] {
        assert!(alive(pid), "{role} pid {pid} runs");
        assert_eq!(
            fds_to(pid, &marker),
            Vec::<String>::new(),
            "the {role} holds none of the fds its parent left open"
        );
    }
}

#[test]
fn zygote_scale_and_sigttin_sigttou_change_the_workers_without_touching_the_others() {
    let svc = Service::idle(2);
    let before = svc.pids_of("worker");
    let (ok, out) = command_args(&["scale", "3"], &svc);
    assert!(ok && out.contains("scaling to 3 workers"), "{out}");
    let serving = |s: &zygote_runtime::protocol::ServiceStatus, n: u32| {
        let w = procs_of(s, "worker");
        s.workers == n && w.len() == n as usize && w.iter().all(|p| p.state == "serving")
    };
    let s = common::wait_for(CHANGE_TIMEOUT, "3 workers serve", || {
        svc.try_status().filter(|s| serving(s, 3))
    });
    let third = serving_in(&procs_of(&s, "worker"), 2).expect("slot 2").pid;
    for (slot, pid) in before.iter().enumerate() {
        assert_eq!(
            serving_in(&procs_of(&s, "worker"), slot as u32).map(|w| w.pid),
            Some(*pid),
            "slot {slot} keeps its worker"
        );
    }
    svc.signal(Signal::SIGTTOU);
    common::wait_for(CHANGE_TIMEOUT, "SIGTTOU: 2 workers", || {
        svc.try_status().filter(|s| serving(s, 2))
    });
    wait_gone(
        &[("worker 2".into(), third)],
        CHANGE_TIMEOUT,
        "slot 2 drains",
    );
    assert_eq!(
        svc.pids_of("worker"),
        before,
        "slots 0 and 1 are not touched"
    );
    svc.signal(Signal::SIGTTIN);
    let s = common::wait_for(CHANGE_TIMEOUT, "SIGTTIN: 3 workers", || {
        svc.try_status().filter(|s| serving(s, 3))
    });
    assert!(serving_in(&procs_of(&s, "worker"), 2).is_some_and(|w| w.pid != third));
    let (ok, out) = command_args(&["scale", "0"], &svc);
    assert!(!ok, "0 workers is refused: {out}");
}

#[test]
fn the_admin_socket_refuses_another_uid_with_not_allowed() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let svc = Service::idle(1);
    // The runtime directory (0700) and the socket (0600) keep others out by their modes; open
    // the way for this test only, so that the SO_PEERCRED check is what decides.
    std::fs::set_permissions(&svc.runtime_dir, std::fs::Permissions::from_mode(0o711))
        .expect("chmod of the runtime dir");
    let sock = svc.runtime_dir.join("supervisor.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))
        .expect("chmod of the socket");
    let out = std::process::Command::new(common::BIN)
        .args(["status", "--runtime-dir"])
        .arg(&svc.runtime_dir)
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running zygote status as uid 65534");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("NotAllowed"),
        "another uid is refused with not_allowed: {}\n{text}",
        out.status
    );
    let (ok, table) = command("status", &svc);
    assert!(ok, "the service keeps answering its own uid: {table}");
}
