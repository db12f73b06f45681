//! The zygote socket, spoken to directly: spawn and exit status (code and signal), the pidfd,
//! who may connect, and every kind of bad frame — each answered with its typed error while
//! another client keeps being served.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{spawn, wait_exited, wait_ready, wait_until, Zygote, ZygoteOptions};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_cbor::Value;
use zygote_runtime::client::ZygoteClient;
use zygote_runtime::fdpass;
use zygote_runtime::protocol::frame::{self, raw_map};
use zygote_runtime::protocol::{ErrorCode, ProtocolError, Request, Response, WorkerId};

const T: Duration = Duration::from_secs(10);

/// The pidfd's own view of the process it refers to (`Pid:` in `/proc/self/fdinfo/N`).
fn pidfd_target(fd: &impl AsRawFd) -> i32 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .expect("reading the pidfd's fdinfo");
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Pid: line in the pidfd's fdinfo:\n{info}"))
}

fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).expect("poll") > 0
}

#[test]
fn an_idle_child_runs_reports_ready_and_exits_0_when_its_control_channel_closes() {
    let z = Zygote::start(&[]);
    let mut c = z.client();
    let mut kid = spawn(&z, &mut c, "idle", 3, &[]).expect("spawn of the idle entry");
    let detail = wait_ready(&mut kid, T);
    assert!(
        detail.starts_with("idle:"),
        "the idle entry reports itself in its ready detail: {detail:?}"
    );
    let status = c.status().expect("status");
    let child = status
        .children
        .iter()
        .find(|ch| ch.pid == kid.pid)
        .unwrap_or_else(|| panic!("status lists the child {}: {status:?}", kid.pid));
    assert_eq!(
        (child.entry.as_str(), child.worker),
        ("idle", WorkerId(3)),
        "status names the child's entry and worker id"
    );
    let pid = kid.pid;
    drop(kid.control);
    let (ev, _) = wait_exited(&mut c, pid, T);
    assert_eq!(
        ev,
        Response::Exited {
            id: exited_id(&ev),
            pid,
            code: Some(0),
            signal: None,
            status: 0
        },
        "a child whose supervisor closed its control channel ends with code 0, reported"
    );
    assert!(
        !c.status()
            .expect("status")
            .children
            .iter()
            .any(|ch| ch.pid == pid),
        "an exited child is no longer listed"
    );
}

fn exited_id(ev: &Response) -> u64 {
    match ev {
        Response::Exited { id, .. } => *id,
        other => panic!("not an exited event: {other:?}"),
    }
}

#[test]
fn the_exit_code_of_an_exec_entry_reaches_the_requester() {
    let z = Zygote::start(&["/bin/sh", "-c", "exit 7"]);
    let mut c = z.client();
    let kid = spawn(&z, &mut c, "exec", 0, &[]).expect("spawn of the exec entry");
    let (ev, before) = wait_exited(&mut c, kid.pid, T);
    let Response::Exited {
        code,
        signal,
        status,
        ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(
        (code, signal, status),
        (Some(7), None, 7),
        "`sh -c 'exit 7'` is reported as code 7, status 7 (events before: {before:?})"
    );
    assert!(
        before.is_empty(),
        "a child that ran its program reports no child_error: {before:?}"
    );
}

#[test]
fn a_signal_request_ends_a_child_and_its_exit_reports_the_signal() {
    let z = Zygote::start(&[]);
    let mut c = z.client();
    for (sig, name) in [(libc::SIGKILL, "SIGKILL"), (libc::SIGTERM, "SIGTERM")] {
        let mut kid = spawn(&z, &mut c, "idle", 0, &[]).expect("spawn");
        wait_ready(&mut kid, T);
        c.signal(kid.pid, sig)
            .unwrap_or_else(|e| panic!("signal request {name} refused: {e}"));
        let (ev, _) = wait_exited(&mut c, kid.pid, T);
        let Response::Exited {
            code,
            signal,
            status,
            ..
        } = ev
        else {
            unreachable!()
        };
        assert_eq!(
            (code, signal, status),
            (None, Some(sig), -sig),
            "a child ended by {name} is reported with signal {sig} and status -{sig}"
        );
    }
}

#[test]
fn the_pidfd_in_the_spawn_answer_refers_to_the_child() {
    let z = Zygote::start(&[]);
    let mut c = z.client();
    let mut kid = spawn(&z, &mut c, "idle", 0, &[]).expect("spawn");
    wait_ready(&mut kid, T);
    assert_eq!(
        pidfd_target(&kid.pidfd),
        kid.pid,
        "the pidfd's fdinfo names the spawned pid"
    );
    assert!(
        !readable_now(kid.pidfd.as_fd()),
        "a pidfd is not readable while its process lives"
    );
    zygote_runtime::pidfd::send_signal(kid.pidfd.as_fd(), libc::SIGTERM)
        .expect("pidfd_send_signal through the received pidfd");
    let (ev, _) = wait_exited(&mut c, kid.pid, T);
    assert!(
        matches!(ev, Response::Exited { signal: Some(s), .. } if s == libc::SIGTERM),
        "the signal sent through the pidfd ended that very child: {ev:?}"
    );
    wait_until(T, "the pidfd of an exited child is readable", || {
        readable_now(kid.pidfd.as_fd())
    });
}

#[test]
fn a_signal_to_a_pid_that_is_not_a_child_is_refused() {
    let z = Zygote::start(&[]);
    let mut c = z.client();
    let me = std::process::id() as i32;
    for (pid, what) in [(1, "init"), (z.pid, "the zygote itself"), (me, "the test")] {
        match c.signal(pid, libc::SIGTERM) {
            Err(ProtocolError::Remote {
                code: ErrorCode::NotChild,
                ..
            }) => {}
            other => panic!("a signal to {what} (pid {pid}) is refused with not_child: {other:?}"),
        }
    }
    let mut kid = spawn(&z, &mut c, "idle", 0, &[]).expect("spawn");
    wait_ready(&mut kid, T);
    for sig in [0, 65, -9] {
        match c.signal(kid.pid, sig) {
            Err(ProtocolError::Remote {
                code: ErrorCode::BadSignal,
                ..
            }) => {}
            other => panic!("signal number {sig} is refused with bad_signal: {other:?}"),
        }
    }
    assert!(
        c.status()
            .expect("status")
            .children
            .iter()
            .any(|ch| ch.pid == kid.pid),
        "the child survived the refused signals"
    );
}

// ---------------------------------------------------------------------------------------------
// Who may connect.

const HELPER_SOCKET_ENV: &str = "ZYGOTE_TEST_OTHER_UID_SOCKET";
const HELPER_ACTIONS_ENV: &str = "ZYGOTE_TEST_OTHER_UID_ACTIONS";
const NOBODY: u32 = 65534;

/// Not a test of its own: the other-uid tests run this test binary again, as uid 65534, with
/// only this function selected. It runs the actions named in [`HELPER_ACTIONS_ENV`]
/// (comma-separated; `hello` when unset) and prints the uid it ran as and, as a JSON object,
/// each action's outcome, on a line starting with `HELPER `.
///
/// | action | what | outcome |
/// |---|---|---|
/// | `hello` | a raw connection's first answer | the answer, as JSON |
/// | `status`, `shutdown`, `fetch`, `release` | that request (`release`: `release_weights`) | `"ok"` or the error code |
/// | `keep` | `keep_weights` for device 0 with an unsealed memfd of its own | `"ok"` or the code |
/// | `signal:PID` | SIGTERM to PID | `"ok"` or the code |
/// | `spawn_own` | spawns `idle`, then SIGTERMs that child | `"ok"` or the code |
/// | `spawn_owner` | spawns the `owner` entry | `"ok"` or the code |
/// | `hold` | opens connections until one is refused | `{"held": N, "refused": code}` |
#[test]
#[ignore = "helper run as another uid by the other-uid tests"]
fn helper_other_uid_client() {
    let Some(sock) = std::env::var_os(HELPER_SOCKET_ENV) else {
        eprintln!("helper_other_uid_client only runs as a child of the other-uid tests");
        return;
    };
    let sock = std::path::PathBuf::from(sock);
    let uid = nix::unistd::getuid().as_raw();
    let actions = std::env::var(HELPER_ACTIONS_ENV).unwrap_or_else(|_| "hello".into());
    let code = |r: Result<(), ProtocolError>| match r {
        Ok(()) => serde_json::json!("ok"),
        Err(ProtocolError::Remote { code, .. }) => serde_json::to_value(code).expect("a code"),
        Err(e) => serde_json::json!(format!("failed: {e}")),
    };
    let client = || ZygoteClient::connect(&sock, "another uid");
    let mut out = serde_json::Map::new();
    for action in actions.split(',') {
        let outcome = match action.split_once(':').unwrap_or((action, "")) {
            ("hello", _) => helper_hello(&sock),
            ("status", _) => code(client().and_then(|mut c| c.status().map(|_| ()))),
            ("shutdown", _) => code(client().and_then(|mut c| c.shutdown())),
            ("fetch", _) => code(client().and_then(|mut c| c.fetch_weights(0).map(|_| ()))),
            ("release", _) => code(client().and_then(|mut c| c.release_weights())),
            ("keep", _) => code(client().and_then(|mut c| helper_keep(&mut c))),
            ("signal", pid) => code(
                client().and_then(|mut c| c.signal(pid.parse().expect("a pid"), libc::SIGTERM)),
            ),
            ("spawn_own", _) => code(client().and_then(|mut c| {
                let pid = helper_spawn(&mut c, "idle")?;
                c.signal(pid, libc::SIGTERM)
            })),
            ("spawn_owner", _) => {
                code(client().and_then(|mut c| helper_spawn(&mut c, "owner").map(|_| ())))
            }
            ("hold", _) => {
                // Raw connections: a refused one gets its error frame at once, an admitted one
                // nothing until it speaks. (A client that said hello first could lose the race
                // with the close and see a reset instead of the error.)
                let mut held = Vec::new();
                let refused = loop {
                    let mut s = UnixStream::connect(&sock).expect("connect");
                    s.set_read_timeout(Some(Duration::from_millis(300))).ok();
                    match frame::read_frame::<_, Response>(&mut s, Some(Duration::from_millis(300)))
                    {
                        Ok(Some(Response::Error { code, .. })) => {
                            break serde_json::to_value(code).expect("a code")
                        }
                        Err(ProtocolError::TimedOut) => held.push(s),
                        other => break serde_json::json!(format!("unexpected: {other:?}")),
                    }
                    if held.len() > 100 {
                        break serde_json::json!("never refused");
                    }
                };
                serde_json::json!({ "held": held.len(), "refused": refused })
            }
            other => panic!("unknown helper action {other:?}"),
        };
        out.insert(action.to_string(), outcome);
    }
    println!("HELPER {uid} {}", serde_json::Value::Object(out));
}

fn helper_hello(sock: &std::path::Path) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).expect("connecting to the zygote socket");
    // A refused peer may find the connection closed already; the answer is still readable.
    let _ = frame::write_frame(
        &mut s,
        &Request::Hello {
            id: 1,
            client: "another uid".into(),
        },
    );
    match frame::read_frame::<_, Response>(&mut s, Some(Duration::from_secs(10))) {
        Ok(Some(r)) => serde_json::to_value(&r).expect("a response is JSON"),
        other => serde_json::json!({ "failed": format!("{other:?}") }),
    }
}

/// Spawns `entry` with /dev/null for stdio; returns its pid.
fn helper_spawn(c: &mut ZygoteClient, entry: &str) -> Result<i32, ProtocolError> {
    let (_mine, theirs) = UnixStream::pair()?;
    let null = std::fs::File::open("/dev/null")?;
    let fds = zygote_runtime::client::SpawnFds {
        stdin: null.as_fd(),
        stdout: null.as_fd(),
        stderr: null.as_fd(),
        control: theirs.as_fd(),
        listeners: Vec::new(),
    };
    Ok(c.spawn(entry, WorkerId(9), &[], None, &fds)?.pid)
}

/// Plants weights of its own: what an attacker would leave for the next owner to adopt.
fn helper_keep(c: &mut ZygoteClient) -> Result<(), ProtocolError> {
    let memfd =
        nix::sys::memfd::memfd_create(c"planted", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(std::io::Error::from)?;
    nix::unistd::ftruncate(&memfd, 4096).map_err(std::io::Error::from)?;
    let manifest = zygote_runtime::backend::Manifest {
        generation: 99,
        backend: zygote_runtime::backend::Backend::Host,
        ipc: zygote_runtime::backend::Ipc::Memfd,
        model_digest: "xxh3-128:0".into(),
        content_digest: "xxh3-128:0".into(),
        device: None,
        arenas: vec![zygote_runtime::backend::ArenaInfo {
            size: 4096,
            used: 4096,
            legacy_handle: Vec::new(),
        }],
        tensors: Vec::new(),
    };
    c.keep_weights(0, &manifest, &[memfd])
}

/// Runs the helper as uid 65534 against `z` with `actions`; returns the uid it ran as and the
/// outcome of each action.
fn run_as_nobody(z: &Zygote, actions: &str) -> (u32, serde_json::Value) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args([
            "helper_other_uid_client",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_SOCKET_ENV, &z.socket)
        .env(HELPER_ACTIONS_ENV, actions)
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running the helper as uid 65534");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("HELPER ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "the helper printed no answer ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (uid, json) = line.split_once(' ').expect("uid and answer");
    (
        uid.parse().expect("the helper's uid"),
        serde_json::from_str(json).expect("the helper's answer is JSON"),
    )
}

/// Runs the helper's `hello` as uid 65534 against `z`; returns the uid it ran as and the answer.
fn connect_as_nobody(z: &Zygote, open_the_way: bool) -> (u32, serde_json::Value) {
    if open_the_way {
        // A zygote without --allow-uid keeps others out by file modes; open the way to the
        // socket for this test only, so the SO_PEERCRED check is what decides.
        std::fs::set_permissions(&z.runtime_dir, std::fs::Permissions::from_mode(0o711))
            .expect("chmod of the runtime dir");
        std::fs::set_permissions(&z.socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod of the socket");
    }
    let (uid, out) = run_as_nobody(z, "hello");
    (uid, out["hello"].clone())
}

fn allowing_nobody() -> Zygote {
    Zygote::start_with(ZygoteOptions {
        args: vec!["--allow-uid".into(), NOBODY.to_string()],
        ..ZygoteOptions::default()
    })
}

#[test]
fn an_allowed_uid_may_spawn_and_signal_its_own_children_and_read_status_and_nothing_more() {
    let z = allowing_nobody();
    let mut c = z.client();
    let mut ours = spawn(&z, &mut c, "idle", 0, &[]).expect("the service's own child");
    wait_ready(&mut ours, T);
    let actions = format!(
        "status,spawn_own,signal:{},shutdown,fetch,release,keep,spawn_owner",
        ours.pid
    );
    let (uid, out) = run_as_nobody(&z, &actions);
    assert_eq!(uid, NOBODY, "the helper ran as uid 65534");
    assert_eq!(out["status"], "ok", "an allowed uid reads status: {out}");
    assert_eq!(
        out["spawn_own"], "ok",
        "it spawns and signals its own child: {out}"
    );
    for refused in [
        format!("signal:{}", ours.pid),
        "shutdown".into(),
        "fetch".into(),
        "release".into(),
        "keep".into(),
        "spawn_owner".into(),
    ] {
        assert_eq!(out[&refused], "not_allowed", "{refused} is refused: {out}");
    }
    let status = c.status().expect("the zygote serves on");
    assert!(
        status.children.iter().any(|ch| ch.pid == ours.pid),
        "the service's child survived the other uid's signal: {status:?}"
    );
    assert!(
        status.kept.is_empty(),
        "nothing was planted: {:?}",
        status.kept
    );
}

#[test]
fn an_allowed_uid_holds_at_most_its_quota_of_connections() {
    let z = allowing_nobody();
    // The quota is announced, for clients to plan with.
    match z.client().hello() {
        Some(Response::Hello { limits, .. }) => assert_eq!(
            (
                limits.max_connections_per_uid,
                limits.service_reserved_connections
            ),
            (8, 16),
            "{limits:?}"
        ),
        other => panic!("no hello: {other:?}"),
    }
    let (_, out) = run_as_nobody(&z, "hold");
    assert_eq!(
        (
            out["hold"]["held"].as_u64(),
            out["hold"]["refused"].as_str()
        ),
        (
            Some(zygote_server::server::MAX_CONNECTIONS_PER_UID as u64),
            Some("limit")
        ),
        "{out}"
    );
}

#[test]
fn a_client_of_another_uid_is_refused_with_not_allowed() {
    let z = Zygote::start(&[]);
    let mut bystander = z.client();
    let (uid, answer) = connect_as_nobody(&z, true);
    assert_eq!(uid, NOBODY, "the helper ran as uid 65534");
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("not_allowed")),
        "a peer of another uid gets an error with code not_allowed: {answer}"
    );
    bystander
        .status()
        .expect("the zygote keeps serving its own uid");
}

#[test]
fn the_runtime_dir_is_0700_and_the_socket_0600_by_default() {
    let z = Zygote::start(&[]);
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&z.runtime_dir), 0o700, "the runtime dir is ours alone");
    assert_eq!(mode(&z.socket), 0o600, "the socket is ours alone");
}

#[test]
fn allow_uid_admits_that_uid() {
    let z = allowing_nobody();
    // The zygote itself opens the way (0711 directory, 0666 socket); the peer check decides.
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(
        mode(&z.runtime_dir),
        0o711,
        "with --allow-uid the runtime dir is 0711"
    );
    assert_eq!(
        mode(&z.socket),
        0o666,
        "with --allow-uid the socket is 0666"
    );
    let (uid, answer) = connect_as_nobody(&z, false);
    assert_eq!(uid, NOBODY, "the helper ran as uid 65534");
    assert_eq!(
        (answer["type"].as_str(), answer["pid"].as_i64()),
        (Some("hello"), Some(z.pid as i64)),
        "an allowed uid gets the zygote's hello: {answer}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad frames.

/// A frame: the 4-byte big-endian length, then `body`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn cbor_frame(entries: &[(&str, Value)]) -> Vec<u8> {
    framed(&serde_cbor::to_vec(&raw_map(entries)).expect("CBOR"))
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn int(i: i64) -> Value {
    Value::Integer(i.into())
}

fn spawn_frame(id: i64, entry: &str, listeners: i64) -> Vec<u8> {
    cbor_frame(&[
        ("v", int(1)),
        ("type", text("spawn")),
        ("id", int(id)),
        ("entry", text(entry)),
        ("worker", int(0)),
        ("listeners", int(listeners)),
    ])
}

fn send_fds(s: &UnixStream, n: usize) {
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    for _ in 0..n {
        fdpass::send_fd(s.as_fd(), null.as_fd()).expect("sending an fd");
    }
}

/// Proves the zygote still serves `c`: a status, then a whole child life (spawn, ready, exit).
fn still_serves(z: &Zygote, c: &mut ZygoteClient, case: &str) {
    c.status()
        .unwrap_or_else(|e| panic!("{case}: the other client's status failed: {e}"));
    let mut kid = spawn(z, c, "idle", 1, &[])
        .unwrap_or_else(|e| panic!("{case}: the other client's spawn failed: {e}"));
    wait_ready(&mut kid, T);
    let pid = kid.pid;
    drop(kid.control);
    wait_exited(c, pid, T);
}

/// Starts a zygote and a client that stays connected, opens a raw connection, lets `send`
/// misbehave on it, and checks the answer: an `error` with `code` (and `id`, when given),
/// then either the end of the connection (`closes`) or a normal answer to a good request on
/// the same connection. The other client is served throughout, and the zygote ends up
/// holding no more fds than before (none of the failed request's fds is kept).
fn bad_frame(
    case: &str,
    code: ErrorCode,
    id: Option<u64>,
    closes: bool,
    send: impl FnOnce(&mut UnixStream),
) {
    let z = Zygote::start(&[]);
    let mut other = z.client();
    still_serves(&z, &mut other, case);
    let baseline = zygote_runtime::procfs::open_fds(z.pid).expect("the zygote's fds");
    let mut raw = z.raw();
    send(&mut raw);
    // The read deadline is 5 s; an answer gets twice that.
    let answer = frame::read_frame::<_, Response>(&mut raw, Some(Duration::from_secs(12)));
    match &answer {
        Ok(Some(Response::Error {
            id: got_id,
            code: got,
            message,
        })) => {
            assert_eq!(*got, code, "{case}: the error code ({message})");
            if id.is_some() {
                assert_eq!(*got_id, id, "{case}: the error repeats the request's id");
            }
            assert!(!message.is_empty(), "{case}: the error says what was wrong");
        }
        other => panic!("{case}: expected an error answer with code {code:?}, got {other:?}"),
    }
    if closes {
        match frame::read_frame::<_, Response>(&mut raw, Some(T)) {
            Ok(None) | Err(ProtocolError::Io(_)) => {}
            other => panic!("{case}: the zygote closes the connection after the error: {other:?}"),
        }
    } else {
        frame::write_frame(&mut raw, &Request::Status { id: 77 }).expect("a good request");
        match frame::read_frame::<_, Response>(&mut raw, Some(T)) {
            Ok(Some(Response::Status { id: 77, .. })) => {}
            other => panic!("{case}: the same connection is still served: {other:?}"),
        }
    }
    drop(raw);
    still_serves(&z, &mut other, case);
    let deadline = std::time::Instant::now() + T;
    loop {
        let now = zygote_runtime::procfs::open_fds(z.pid).expect("the zygote's fds");
        // At most as many: the pidfd of the child that just exited may close only after
        // its `exited` was sent.
        if now.len() <= baseline.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{case}: the zygote holds no more fds than before within {T:?}: \
             before {baseline:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_frame_oversized_length() {
    bad_frame("oversized", ErrorCode::FrameTooLarge, None, true, |s| {
        let len = (frame::MAX_FRAME as u32 + 1).to_be_bytes();
        s.write_all(&len).expect("write");
    });
}

#[test]
fn bad_frame_zero_length() {
    bad_frame("zero length", ErrorCode::BadCbor, None, true, |s| {
        s.write_all(&[0, 0, 0, 0]).expect("write");
    });
}

#[test]
fn bad_frame_truncated_then_closed() {
    bad_frame("truncated", ErrorCode::Truncated, None, true, |s| {
        let whole = cbor_frame(&[("v", int(1)), ("type", text("status")), ("id", int(1))]);
        s.write_all(&whole[..whole.len() / 2]).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
}

#[test]
fn bad_frame_truncated_past_the_read_deadline() {
    bad_frame("stalled", ErrorCode::ReadTimeout, None, true, |s| {
        let whole = cbor_frame(&[("v", int(1)), ("type", text("status")), ("id", int(1))]);
        s.write_all(&whole[..whole.len() / 2]).expect("write");
    });
}

#[test]
fn bad_frame_malformed_cbor() {
    bad_frame("malformed CBOR", ErrorCode::BadCbor, None, false, |s| {
        s.write_all(&framed(&[0xff, 0x00, 0x13])).expect("write");
    });
}

/// A CBOR map written by hand, members in order, repeats allowed (a map type cannot hold them).
fn raw_cbor_map(members: &[(&str, Value)]) -> Vec<u8> {
    assert!(members.len() < 24, "a one-byte map header");
    let mut out = vec![0xa0 + members.len() as u8];
    for (k, v) in members {
        out.extend(serde_cbor::to_vec(&text(k)).expect("CBOR"));
        out.extend(serde_cbor::to_vec(v).expect("CBOR"));
    }
    out
}

#[test]
fn bad_frame_a_key_twice() {
    // Two ids: which one would an answer repeat? Neither: the frame is refused.
    bad_frame("a key twice", ErrorCode::BadCbor, None, false, |s| {
        s.write_all(&framed(&raw_cbor_map(&[
            ("v", int(1)),
            ("type", text("status")),
            ("id", int(9)),
            ("id", int(10)),
        ])))
        .expect("write");
    });
}

#[test]
fn bad_frame_an_entry_named_twice_in_a_spawn() {
    bad_frame("entry twice", ErrorCode::BadCbor, None, false, |s| {
        s.write_all(&framed(&raw_cbor_map(&[
            ("v", int(1)),
            ("type", text("spawn")),
            ("id", int(9)),
            ("entry", text("idle")),
            ("entry", text("exec")),
            ("worker", int(0)),
            ("listeners", int(0)),
        ])))
        .expect("write");
        // A client sends a spawn's fds whatever the answer will be; they are read and closed.
        send_fds(s, 4);
    });
}

#[test]
fn bad_frame_bytes_after_the_map() {
    bad_frame("trailing bytes", ErrorCode::BadCbor, None, false, |s| {
        let mut body = serde_cbor::to_vec(&raw_map(&[
            ("v", int(1)),
            ("type", text("status")),
            ("id", int(9)),
        ]))
        .expect("CBOR");
        body.push(0x00);
        s.write_all(&framed(&body)).expect("write");
    });
}

#[test]
fn bad_frame_a_key_that_is_not_text() {
    bad_frame("integer key", ErrorCode::BadRequest, Some(9), false, |s| {
        let mut body = vec![0xa4];
        for (k, v) in [("v", int(1)), ("type", text("status")), ("id", int(9))] {
            body.extend(serde_cbor::to_vec(&text(k)).expect("CBOR"));
            body.extend(serde_cbor::to_vec(&v).expect("CBOR"));
        }
        body.extend(serde_cbor::to_vec(&int(1)).expect("CBOR"));
        body.extend(serde_cbor::to_vec(&int(2)).expect("CBOR"));
        s.write_all(&framed(&body)).expect("write");
    });
}

#[test]
fn bad_frame_cbor_that_is_not_a_map() {
    bad_frame("not a map", ErrorCode::BadCbor, None, false, |s| {
        s.write_all(&framed(&serde_cbor::to_vec(&int(5)).expect("CBOR")))
            .expect("write");
    });
}

#[test]
fn bad_frame_unknown_version() {
    bad_frame("version 2", ErrorCode::BadVersion, Some(9), false, |s| {
        s.write_all(&cbor_frame(&[
            ("v", int(2)),
            ("type", text("status")),
            ("id", int(9)),
        ]))
        .expect("write");
    });
}

#[test]
fn bad_frame_missing_version() {
    bad_frame("no version", ErrorCode::BadVersion, Some(9), false, |s| {
        s.write_all(&cbor_frame(&[("type", text("status")), ("id", int(9))]))
            .expect("write");
    });
}

#[test]
fn bad_frame_unknown_message_type() {
    bad_frame("unknown type", ErrorCode::BadRequest, Some(4), false, |s| {
        s.write_all(&cbor_frame(&[
            ("v", int(1)),
            ("type", text("exec")),
            ("id", int(4)),
        ]))
        .expect("write");
    });
}

#[test]
fn bad_frame_unknown_field_a_spawn_carrying_a_path() {
    bad_frame(
        "unknown field",
        ErrorCode::BadRequest,
        Some(5),
        false,
        |s| {
            s.write_all(&cbor_frame(&[
                ("v", int(1)),
                ("type", text("spawn")),
                ("id", int(5)),
                ("entry", text("idle")),
                ("worker", int(0)),
                ("listeners", int(1)),
                ("path", text("/bin/sh")),
            ]))
            .expect("write");
            // Its 4 + 1 fds follow, as they would from any client: the zygote reads and closes
            // them, so the next frame on this connection is read as a frame (§5).
            send_fds(s, 5);
        },
    );
}

#[test]
fn bad_frame_wrong_field_type() {
    bad_frame("wrong type", ErrorCode::BadRequest, Some(6), false, |s| {
        s.write_all(&cbor_frame(&[
            ("v", int(1)),
            ("type", text("signal")),
            ("id", int(6)),
            ("pid", text("1")),
            ("signal", int(9)),
        ]))
        .expect("write");
    });
}

#[test]
fn bad_frame_unknown_entry() {
    bad_frame(
        "unknown entry",
        ErrorCode::UnknownEntry,
        Some(8),
        false,
        |s| {
            s.write_all(&spawn_frame(8, "no-such-entry", 0))
                .expect("write");
            send_fds(s, 4);
        },
    );
}

#[test]
fn bad_frame_fewer_fds_than_announced_then_another_frame() {
    bad_frame(
        "wrong fd count",
        ErrorCode::BadFdCount,
        Some(3),
        true,
        |s| {
            // One listener announced: 5 fds are due, 4 come, then a frame.
            s.write_all(&spawn_frame(3, "idle", 1)).expect("write");
            send_fds(s, 4);
            s.write_all(&cbor_frame(&[
                ("v", int(1)),
                ("type", text("status")),
                ("id", int(10)),
            ]))
            .expect("write");
        },
    );
}

#[test]
fn bad_frame_fewer_fds_than_announced_then_silence() {
    bad_frame("missing fd", ErrorCode::BadFdCount, Some(3), true, |s| {
        s.write_all(&spawn_frame(3, "idle", 1)).expect("write");
        send_fds(s, 4);
    });
}

#[test]
fn bad_frame_too_many_listeners() {
    bad_frame("17 listeners", ErrorCode::Limit, Some(2), true, |s| {
        s.write_all(&spawn_frame(2, "idle", 17)).expect("write");
    });
}

// ---------------------------------------------------------------------------------------------
// A client that does not read, and one that floods.

fn rss_kib(pid: i32) -> u64 {
    common::proc_status_field(pid, "VmRSS")
        .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS of the zygote")
}

#[test]
fn a_client_that_never_reads_its_answers_holds_a_bounded_amount_of_zygote_memory() {
    let z = Zygote::start(&[]);
    let before = rss_kib(z.pid);
    let status = frame::encode(&Request::Status { id: 1 }).expect("a status frame");
    let greedy = z.raw();
    greedy.set_nonblocking(true).expect("non-blocking");
    // Up to 8 MB of pipelined `status` requests, never reading an answer (each ~0.3 KB): a
    // zygote that kept reading would queue some 100 MB of answers.
    let batch: Vec<u8> = status
        .iter()
        .copied()
        .cycle()
        .take(64 * status.len())
        .collect();
    let (mut sent, mut stalled_since) = (0usize, None::<std::time::Instant>);
    while sent < 8 << 20 {
        match (&greedy).write(&batch) {
            Ok(n) => {
                sent += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The zygote stopped reading: wait a little for it to prove it.
                let since = *stalled_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::yield_now();
            }
            Err(e) => panic!("writing requests: {e}"),
        }
    }
    assert!(
        sent < 4 << 20,
        "the zygote kept reading requests whose answers were not read ({sent} bytes taken)"
    );
    let grown = rss_kib(z.pid).saturating_sub(before);
    assert!(grown < 16 << 10, "the zygote grew by {grown} KiB");
    // Everyone else is still served.
    let mut other = z.client();
    other.status().expect("another client is answered");
}

#[test]
fn a_client_that_floods_requests_does_not_delay_another_clients_answers() {
    let z = Zygote::start(&[]);
    // Pipelined `status` requests, written faster than the zygote answers them, so its socket
    // never runs dry: a zygote that read one connection until it blocked would serve nobody
    // else while the flood lasts.
    let status = frame::encode(&Request::Status { id: 1 }).expect("a status frame");
    let batch: Vec<u8> = status
        .iter()
        .copied()
        .cycle()
        .take(4096 * status.len())
        .collect();
    let mut flooder = z.raw();
    let reader = flooder.try_clone().expect("a second handle");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_w, stop_r) = (stop.clone(), stop.clone());
    // The flooder reads its answers (so the output cap is not what holds it back).
    let drain = std::thread::spawn(move || {
        let mut r = reader;
        let mut buf = vec![0u8; 1 << 16];
        r.set_read_timeout(Some(Duration::from_millis(100))).ok();
        while !stop_r.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::io::Read::read(&mut r, &mut buf);
        }
    });
    let flood = std::thread::spawn(move || {
        flooder
            .set_write_timeout(Some(Duration::from_millis(100)))
            .ok();
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = flooder.write_all(&batch);
        }
    });
    let mut c = z.client();
    let mut worst = Duration::ZERO;
    let mut failed = None;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        if let Err(e) = c.status() {
            failed = Some(e);
            break;
        }
        worst = worst.max(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = flood.join();
    let _ = drain.join();
    assert!(
        failed.is_none(),
        "no status answer while another client flooded: {failed:?}"
    );
    assert!(
        worst < Duration::from_millis(500),
        "a status answer took {worst:?} while another client flooded"
    );
}

#[test]
fn a_runtime_dir_others_can_write_is_refused_and_left_as_it_is() {
    let dir = common::TempDir::new("unsafe-rt");
    let model = common::tiny_model(dir.path());
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).expect("mkdir");
    std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o777)).expect("chmod 777");
    // What a stranger could have left there.
    let planted = rt.join("owner-0.sock");
    let _stranger = std::os::unix::net::UnixListener::bind(&planted).expect("a planted socket");
    let out = Command::new(env!("CARGO_BIN_EXE_zygote"))
        .args(["__zygote", "--backend", "host", "--runtime-dir"])
        .arg(&rt)
        .arg("--model")
        .arg(&model)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running zygote __zygote");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the zygote must refuse the directory:\n{stderr}"
    );
    assert!(
        stderr.contains("lets other users create files in it"),
        "the error says why:\n{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&rt).expect("stat").permissions().mode() & 0o777,
        0o777,
        "the directory is not silently reset"
    );
    assert!(!rt.join("zygote.sock").exists(), "nothing was bound there");
}
