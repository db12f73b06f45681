//! Child hygiene and the process invariants: a worker holds exactly the fds it was given, has a
//! readable title and a clean signal state; the zygote is single-threaded and, like the
//! supervisor, never maps libcuda; a child that fails before its entry is reported; and when
//! the supervisor dies, everything it started ends.

mod common;

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use common::{
    listening_inode, proc_status_field, spawn, wait_exited, wait_gone, wait_ready, wait_until,
    Service, ServiceOptions, Zygote, ZygoteOptions, BIN, CHANGE_TIMEOUT,
};
use nix::sys::signal::Signal;
use zygote_runtime::procfs;
use zygote_runtime::protocol::Response;

const T: Duration = Duration::from_secs(10);

/// Checks that `pid` holds exactly fds 0-2 (stdin `/dev/null`, stdout and stderr the service
/// log), 3 (the control socket), 4 (the model memfd) and one fd per listener from 5 on, each
/// the very socket listening on that port.
fn assert_worker_fds(svc: &Service, pid: i32, what: &str) {
    let fds = procfs::open_fds(pid).unwrap_or_else(|e| panic!("{what}: /proc/{pid}/fd: {e}"));
    let ports: Vec<u16> = svc
        .status()
        .listen
        .iter()
        .map(|a| {
            a.parse::<std::net::SocketAddr>()
                .expect("listen address")
                .port()
        })
        .collect();
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    let expected: Vec<i32> = (0..5 + ports.len() as i32).collect();
    assert_eq!(
        numbers,
        expected,
        "{what}: exactly stdio, control, model and {} listeners: {fds:?}",
        ports.len()
    );
    let target = |fd: usize| fds[fd].1.display().to_string();
    assert_eq!(target(0), "/dev/null", "{what}: stdin is /dev/null");
    for fd in [1, 2] {
        assert_eq!(
            Path::new(&target(fd)),
            svc.log.as_path(),
            "{what}: fd {fd} is the supervisor's output"
        );
    }
    assert!(
        target(3).starts_with("socket:["),
        "{what}: fd 3 is the control socket: {}",
        target(3)
    );
    assert!(
        target(4).starts_with("/memfd:zygote-model"),
        "{what}: fd 4 is the model memfd: {}",
        target(4)
    );
    for (i, port) in ports.iter().enumerate() {
        let inode = listening_inode(*port)
            .unwrap_or_else(|| panic!("no socket listens on port {port} in /proc/net/tcp"));
        assert_eq!(
            target(5 + i),
            format!("socket:[{inode}]"),
            "{what}: fd {} is the listener on port {port}",
            5 + i
        );
    }
}

#[test]
fn a_native_worker_holds_exactly_its_fds() {
    let svc = Service::start(ServiceOptions {
        workers: 1,
        listeners: 2,
        ..ServiceOptions::default()
    });
    let pid = svc.pids_of("worker")[0];
    assert_worker_fds(&svc, pid, "native idle worker");
}

#[test]
fn an_exec_worker_holds_exactly_its_fds() {
    let svc = Service::start(ServiceOptions {
        workers: 1,
        listeners: 2,
        entry: None,
        command: vec![BIN.into(), "__attach-idle".into()],
        ..ServiceOptions::default()
    });
    let pid = svc.pids_of("worker")[0];
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the worker's exe");
    assert_eq!(
        exe,
        Path::new(BIN),
        "the worker is the exec'd program, attached and ready"
    );
    assert_worker_fds(&svc, pid, "exec'd __attach-idle worker");
}

#[test]
fn a_program_that_never_attaches_still_finds_exactly_its_fds() {
    let z = Zygote::start(&["/bin/sleep", "1000"]);
    let mut c = z.client();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let kid = spawn(&z, &mut c, "exec", 0, &[listener.as_fd()]).expect("spawn exec");
    let sleep = Path::new("/bin/sleep").canonicalize().expect("sleep");
    wait_until(T, "the exec child runs /bin/sleep", || {
        std::fs::read_link(format!("/proc/{}/exe", kid.pid)).is_ok_and(|e| e == sleep)
    });
    let fds = procfs::open_fds(kid.pid).expect("the child's fds");
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(
        numbers,
        vec![0, 1, 2, 3, 4, 5],
        "stdio, control, model and one listener: {fds:?}"
    );
    assert!(
        fds[3].1.to_string_lossy().starts_with("socket:["),
        "fd 3 is the control socket: {fds:?}"
    );
    assert!(
        fds[4]
            .1
            .to_string_lossy()
            .starts_with("/memfd:zygote-model"),
        "fd 4 is the model memfd: {fds:?}"
    );
    let inode = listening_inode(port).expect("the test's listener");
    assert_eq!(
        fds[5].1.display().to_string(),
        format!("socket:[{inode}]"),
        "fd 5 is the listener the test passed"
    );
}

#[test]
fn the_zygote_is_single_threaded_and_neither_it_nor_the_supervisor_maps_libcuda() {
    let svc = Service::idle(2);
    // One more fork while serving: kill a worker and wait for its replacement.
    let old = svc.pids_of("worker")[0];
    common::signal(old, Signal::SIGKILL);
    wait_until(CHANGE_TIMEOUT, "the killed worker is replaced", || {
        svc.try_status().is_some_and(|s| {
            common::settled(&s, 2) && !common::procs_of(&s, "worker").iter().any(|p| p.pid == old)
        })
    });
    let zygote = svc.zygote_pid();
    assert_eq!(
        procfs::thread_count(zygote).expect("the zygote's tasks"),
        1,
        "the zygote has a single thread while serving"
    );
    for (pid, who) in [(zygote, "zygote"), (svc.pid(), "supervisor")] {
        assert!(
            !procfs::maps_contain(pid, "libcuda").expect("reading maps"),
            "the {who} (pid {pid}) has no libcuda mapping"
        );
        assert!(
            procfs::maps_contain(pid, "libc").expect("reading maps"),
            "the {who}'s maps were read (they list libc)"
        );
    }
}

/// Signal numbers as the bit masks of `/proc/PID/status`.
fn sigmask(sigs: &[i32]) -> u64 {
    sigs.iter().fold(0, |m, s| m | 1 << (s - 1))
}

fn status_hex(pid: i32, key: &str) -> u64 {
    let v = proc_status_field(pid, key).unwrap_or_else(|| panic!("no {key} for pid {pid}"));
    u64::from_str_radix(&v, 16).unwrap_or_else(|e| panic!("{key} {v:?}: {e}"))
}

#[test]
fn a_child_gets_its_title_and_a_clean_signal_state() {
    let z = Zygote::start_with(ZygoteOptions {
        command: vec!["/bin/sleep".into(), "1000".into()],
        ignore_signals: vec!["HUP".into(), "USR1".into(), "USR2".into()],
        ..ZygoteOptions::default()
    });
    let inherited = sigmask(&[libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2]);
    assert_eq!(
        status_hex(z.pid, "SigIgn") & inherited,
        inherited,
        "precondition: the zygote was started with SIGHUP, SIGUSR1 and SIGUSR2 ignored"
    );
    let mut c = z.client();

    let mut native = spawn(&z, &mut c, "idle", 5, &[]).expect("spawn idle");
    wait_ready(&mut native, T);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", native.pid)).expect("cmdline");
    assert!(
        cmdline.starts_with(b"zygote: worker 5"),
        "a native child's title is `zygote: worker 5`: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", native.pid)).expect("comm");
    assert_eq!(comm.trim(), "zygote-w5", "a native child's comm");
    assert_eq!(
        status_hex(native.pid, "SigBlk"),
        0,
        "a native child blocks no signal"
    );
    assert_eq!(
        status_hex(native.pid, "SigIgn"),
        sigmask(&[libc::SIGPIPE]),
        "a native child ignores only SIGPIPE (as any Rust program does)"
    );

    let exec = spawn(&z, &mut c, "exec", 6, &[]).expect("spawn exec");
    let exe = std::path::PathBuf::from("/bin/sleep")
        .canonicalize()
        .expect("sleep");
    wait_until(T, "the exec child runs /bin/sleep", || {
        std::fs::read_link(format!("/proc/{}/exe", exec.pid)).is_ok_and(|e| e == exe)
    });
    assert_eq!(
        (
            status_hex(exec.pid, "SigBlk"),
            status_hex(exec.pid, "SigIgn")
        ),
        (0, 0),
        "an exec'd child starts with no signal blocked or ignored"
    );
}

#[test]
fn an_exec_that_fails_is_reported_as_child_error_then_exit_127() {
    let missing = "/nonexistent/zygote-test-missing-program";
    let z = Zygote::start(&[missing]);
    let mut c = z.client();
    let kid = spawn(&z, &mut c, "exec", 0, &[]).expect("the spawn itself succeeds");
    let (ev, before) = wait_exited(&mut c, kid.pid, T);
    let Response::Exited { code, signal, .. } = ev else {
        unreachable!()
    };
    assert_eq!(
        (code, signal),
        (Some(127), None),
        "a child whose exec failed exits with 127"
    );
    match before.as_slice() {
        [Response::ChildError {
            pid,
            stage,
            message,
            ..
        }] => {
            assert_eq!(*pid, kid.pid, "the child_error names the child");
            assert_eq!(stage, "exec", "the failing stage is exec");
            assert!(
                message.contains(missing),
                "the child_error names the program: {message}"
            );
        }
        other => panic!("exactly one child_error precedes the exit: {other:?}"),
    }
}

#[test]
fn when_the_supervisor_dies_every_process_it_started_ends() {
    let svc = Service::idle(2);
    let s = svc.status();
    let started: Vec<(String, i32)> = s
        .processes
        .iter()
        .filter(|p| p.role != "supervisor")
        .map(|p| (p.role.clone(), p.pid))
        .collect();
    assert_eq!(
        started.len(),
        4,
        "a zygote, an owner and two workers: {started:?}"
    );
    svc.signal(Signal::SIGKILL);
    wait_gone(
        &started,
        CHANGE_TIMEOUT,
        "every process of the killed supervisor ends",
    );
    wait_until(
        CHANGE_TIMEOUT,
        "nothing the service started is left",
        || svc.leftovers().is_empty(),
    );
}
