//! `zygote sleep`, `zygote wake` and `--idle-sleep`: asleep, the service runs only its
//! supervisor and its zygote (the sealed model memfd) and keeps its listeners; a wake, asked
//! for or made by the first connection, starts the owner and the workers again, and that
//! connection, queued on the listener meanwhile, is answered.

mod common;

use common::{procs_of, wait_until, Service, ServiceOptions, CHANGE_TIMEOUT, START_TIMEOUT};
use zygote_runtime::protocol::ServiceStatus;

/// `zygote CMD --runtime-dir DIR` succeeds.
fn command(cmd: &str, svc: &Service) {
    let out = std::process::Command::new(common::BIN)
        .arg(cmd)
        .arg("--runtime-dir")
        .arg(&svc.runtime_dir)
        .output()
        .expect("running zygote");
    assert!(
        out.status.success(),
        "zygote {cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asleep: the supervisor says so, and no owner or worker is left.
fn asleep(s: &ServiceStatus) -> bool {
    procs_of(s, "supervisor")
        .first()
        .is_some_and(|p| p.state == "asleep")
        && procs_of(s, "owner").is_empty()
        && procs_of(s, "worker").is_empty()
}

#[test]
fn sleep_drains_the_workers_and_the_owner_keeping_the_zygote_and_the_listener_and_wake_serves() {
    let svc = Service::idle(2);
    let zygote = svc.zygote_pid();
    let port = svc.addr().port();
    let listener = common::listening_inode(port).expect("the service listens");
    let old: Vec<i32> = svc
        .pids_of("worker")
        .into_iter()
        .chain(svc.pids_of("owner"))
        .collect();
    command("sleep", &svc);
    wait_until(CHANGE_TIMEOUT, "the service sleeps", || {
        svc.try_status().is_some_and(|s| asleep(&s))
    });
    common::wait_gone(
        &old.iter()
            .map(|p| ("child".to_string(), *p))
            .collect::<Vec<_>>(),
        CHANGE_TIMEOUT,
        "the owner and the workers end",
    );
    assert_eq!(svc.zygote_pid(), zygote, "the zygote stays");
    assert_eq!(
        common::listening_inode(port),
        Some(listener),
        "the same listener stays open"
    );
    command("wake", &svc);
    let workers = svc.wait_serving(START_TIMEOUT);
    assert!(workers.iter().all(|w| !old.contains(&w.pid)));
    assert!(
        workers.iter().all(|w| w.restarts == 0),
        "a sleep is no restart: {workers:?}"
    );
}

#[test]
fn the_first_connection_while_asleep_wakes_the_app_and_is_answered() {
    let Some(model) =
        common::reference_model("the_first_connection_while_asleep_wakes_the_app_and_is_answered")
    else {
        return;
    };
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 2,
        entry: Some("app".into()),
        args: vec!["--idle-sleep".into(), "1".into()],
        ..ServiceOptions::default()
    });
    let addr = svc.addr();
    wait_until(CHANGE_TIMEOUT, "the idle service sleeps", || {
        svc.try_status().is_some_and(|s| asleep(&s))
    });
    for round in 0..2 {
        let r = common::http(
            addr,
            "POST",
            "/embed",
            Some(r#"{"input": ["a sleeping service wakes"]}"#),
            START_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("round {round}: the request failed: {e}\n{}", svc.log_tail()));
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
        assert!(r.body.contains("embedding"), "{}", r.body);
        assert!(
            svc.log_tail()
                .contains("a connection arrived while asleep: waking up"),
            "{}",
            svc.log_tail()
        );
        // And it falls asleep again after a second without a request.
        wait_until(CHANGE_TIMEOUT, "the service sleeps again", || {
            svc.try_status().is_some_and(|s| asleep(&s))
        });
    }
}

/// How many fds of `pid` are a memfd named `name`.
fn memfds(pid: i32, name: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with(&format!("/memfd:{name}")))
        .count()
}

/// The service's total PSS in KiB.
fn total_pss_kib(s: &ServiceStatus) -> u64 {
    s.processes.iter().filter_map(|p| p.pss_kib).sum()
}

#[test]
fn asleep_the_compute_copy_is_freed_and_a_wake_builds_it_again_from_the_model_memfd() {
    let dir = common::TempDir::new("sleepf16");
    // f16: the owner widens it into a compute copy of its own (`zygote-weights`), twice the
    // file's size, which the zygote keeps a handle of.
    let model = common::synthetic_model(dir.path(), 8 << 20, zygote_runtime::model::Dtype::F16);
    let svc = Service::start(ServiceOptions {
        model: Some(model),
        workers: 2,
        entry: Some("probe".into()),
        ..ServiceOptions::default()
    });
    let zygote = svc.zygote_pid();
    assert_eq!(memfds(zygote, "zygote-weights"), 1, "the zygote keeps it");
    let awake = total_pss_kib(&svc.status());
    command("sleep", &svc);
    wait_until(CHANGE_TIMEOUT, "the service sleeps", || {
        svc.try_status().is_some_and(|s| asleep(&s))
    });
    wait_until(
        CHANGE_TIMEOUT,
        "the zygote lets the compute copy go",
        || memfds(zygote, "zygote-weights") == 0,
    );
    let sleeping = total_pss_kib(&svc.status());
    command("wake", &svc);
    svc.wait_serving(START_TIMEOUT);
    assert_eq!(memfds(zygote, "zygote-weights"), 1, "built and kept again");
    let again = total_pss_kib(&svc.status());
    eprintln!(
        "total PSS of the service (8 MiB f16 model, 16 MiB compute copy, 2 probe workers): \
         {awake} KiB awake, {sleeping} KiB asleep, {again} KiB awake again"
    );
    assert!(
        sleeping + 12 * 1024 < awake,
        "asleep the compute copy is gone: {sleeping} KiB asleep, {awake} KiB awake"
    );
}
