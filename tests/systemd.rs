//! `zygote start` under systemd, without systemd: a real `NOTIFY_SOCKET` datagram socket
//! (`Type=notify`: READY, STATUS, RELOADING, STOPPING, WATCHDOG) and a launcher that passes
//! listeners exactly as systemd's socket activation does (fds 3 and up, `LISTEN_PID` = the
//! pid that execs `zygote`, `LISTEN_FDS`, `LISTEN_FDNAMES`).

mod common;

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::load::{one_request, Outcome};
use common::{Service, ServiceOptions, TempDir, CHANGE_TIMEOUT};
use nix::sys::signal::Signal;

/// The launcher: `sh` moves the listeners from stdin and stdout to fds 3 and 4 (stdout goes
/// back to the log), exports the activation variables with its own pid, and execs `zygote`
/// (same pid), as systemd does after its fork.
const LAUNCHER: &str = "exec 3<&0 4<&1 0</dev/null 1>&2; \
    export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web:metrics; exec \"$@\"";

/// `cmd` run by [`LAUNCHER`] with `web` and `metrics` as its fds 3 and 4, and `env` added.
fn activated(
    cmd: Command,
    log: &Path,
    web: &TcpListener,
    metrics: &TcpListener,
    env: &[(&str, String)],
) -> Command {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(LAUNCHER)
        .arg("launcher") // $0
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh.envs(env.iter().map(|(k, v)| (k, v)));
    let fd = |l: &TcpListener| OwnedFd::from(l.try_clone().expect("dup of a listener"));
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .expect("the service log");
    sh.stdin(Stdio::from(fd(web)))
        .stdout(Stdio::from(fd(metrics)))
        .stderr(log);
    sh
}

/// The notifications received so far, one datagram each.
fn received(sock: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

/// Waits until a datagram satisfies `what`; returns its index.
fn wait_note(
    sock: &UnixDatagram,
    notes: &mut Vec<String>,
    from: usize,
    what: &str,
    cond: impl Fn(&str) -> bool,
) -> usize {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        received(sock, notes);
        if let Some(i) = notes.iter().skip(from).position(|n| cond(n)) {
            return from + i;
        }
        assert!(
            Instant::now() < deadline,
            "no notification {what} in {CHANGE_TIMEOUT:?}: {notes:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn environ(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

#[test]
fn type_notify_and_socket_activation_as_systemd_does_them() {
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("binding NOTIFY_SOCKET");
    sock.set_nonblocking(true).expect("nonblocking");
    let web = TcpListener::bind("127.0.0.1:0").expect("web listener");
    let metrics = TcpListener::bind("127.0.0.1:0").expect("metrics listener");
    let env = [
        ("NOTIFY_SOCKET", path.display().to_string()),
        ("WATCHDOG_USEC", "200000".to_string()),
    ];
    let svc = Service::start_via(
        ServiceOptions {
            workers: 2,
            listeners: 0,
            wait_serving: false,
            ..ServiceOptions::default()
        },
        |cmd, log| activated(cmd, log, &web, &metrics, &env),
    );
    let mut notes = Vec::new();
    let ready = wait_note(&sock, &mut notes, 0, "READY=1", |n| {
        n.lines().any(|l| l == "READY=1")
    });
    assert!(
        notes[ready].contains("STATUS=2 of 2 workers serving"),
        "{notes:#?}"
    );
    let s = svc.status();
    assert!(
        common::settled(&s, 2),
        "READY=1 only once every worker serves: {s:?}"
    );
    assert_eq!(
        s.listen,
        [web.local_addr().expect("addr").to_string()],
        "the inherited listener, not --listen's default"
    );
    let first = wait_note(&sock, &mut notes, 0, "WATCHDOG=1", |n| n == "WATCHDOG=1");
    wait_note(&sock, &mut notes, first + 1, "a second WATCHDOG=1", |n| {
        n == "WATCHDOG=1"
    });
    // The socket named `metrics` serves /metrics.
    let m = metrics.local_addr().expect("addr");
    let mut c = std::net::TcpStream::connect(m).expect("the metrics socket");
    use std::io::{Read, Write};
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("answer");
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(
        text.contains("zygote_workers{state=\"serving\"} 2"),
        "{text}"
    );
    // No child sees the manager's variables.
    for pid in svc.pids_of("worker").into_iter().chain([svc.zygote_pid()]) {
        let env = environ(pid);
        for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID"] {
            assert!(!env.contains(k), "pid {pid} inherited {k}:\n{env}");
        }
    }
    let from = notes.len();
    svc.signal(Signal::SIGHUP);
    let reloading = wait_note(&sock, &mut notes, from, "RELOADING=1", |n| {
        n.starts_with("RELOADING=1\nMONOTONIC_USEC=")
    });
    wait_note(
        &sock,
        &mut notes,
        reloading,
        "READY=1 after the roll",
        |n| n.starts_with("READY=1\n"),
    );
    let mut svc = svc;
    svc.signal(Signal::SIGTERM);
    let from = notes.len();
    wait_note(&sock, &mut notes, from, "STOPPING=1", |n| {
        n.starts_with("STOPPING=1")
    });
    let status = svc.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", svc.log_tail());
}

#[test]
fn a_restart_of_a_socket_activated_service_keeps_the_port_and_answers_what_queued() {
    let test = "a_restart_of_a_socket_activated_service_keeps_the_port_and_answers_what_queued";
    let Some(model) = common::reference_model(test) else {
        return;
    };
    // The manager's sockets: they outlive every instance of the service.
    let web = TcpListener::bind("127.0.0.1:0").expect("web listener");
    let metrics = TcpListener::bind("127.0.0.1:0").expect("metrics listener");
    let addr = web.local_addr().expect("addr");
    let opts = ServiceOptions {
        model: Some(model),
        workers: 2,
        entry: Some("app".into()),
        listeners: 0,
        ..ServiceOptions::default()
    };
    let start = || {
        Service::start_via(opts.clone(), |cmd, log| {
            activated(cmd, log, &web, &metrics, &[])
        })
    };
    let mut first = start();
    assert!(matches!(one_request(addr, true), Outcome::Answered));
    first.signal(Signal::SIGTERM);
    let status = first.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", first.log_tail());
    // Between the instances: connections complete their handshake on the manager's socket
    // and their requests wait in it.
    use std::io::{Read, Write};
    let waiting: Vec<std::net::TcpStream> = (0..4)
        .map(|_| {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .expect("a connection while no instance runs");
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("its request");
            c
        })
        .collect();
    let _second = start();
    for (i, mut c) in waiting.into_iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut raw = Vec::new();
        let read = c.read_to_end(&mut raw);
        assert!(
            read.is_ok() && raw.starts_with(b"HTTP/1.1 200 "),
            "connection {i}, made while no instance ran, is answered by the next: {read:?} {}",
            String::from_utf8_lossy(&raw)
        );
    }
}
