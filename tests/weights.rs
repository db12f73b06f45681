//! The weights outlive their owner: an owner leaves its exported handles with the zygote, a
//! worker started while no owner is up imports that kept generation, and the next owner adopts
//! it instead of building the weights again. Driven through the protocol on a bare zygote, so
//! the "no owner is up" window is as long as the test wants it.

mod common;

use std::time::Duration;

use common::{
    spawn, synthetic_model, wait_exited, wait_ready, wait_until, Kid, TempDir, Zygote,
    ZygoteOptions,
};
use zygote_runtime::client::ZygoteClient;
use zygote_runtime::model::Dtype;

const READY: Duration = Duration::from_secs(30);

/// A zygote started on a synthetic model of `bytes` written in `dir`.
fn on_synthetic_model(dir: &TempDir, bytes: u64, dtype: Dtype) -> Zygote {
    let model = synthetic_model(dir.path(), bytes, dtype);
    Zygote::start_with(ZygoteOptions {
        model: Some(model),
        ..ZygoteOptions::default()
    })
}

/// Asserts that the zygote keeps no generation, `why` naming what the test expects.
fn assert_nothing_kept(client: &mut ZygoteClient, why: &str) {
    let kept = client.status().expect("status").kept;
    assert!(kept.is_empty(), "{why}: {kept:?}");
}

/// The owner of device 0, spawned through `client` and waited for until ready.
fn ready_owner(z: &Zygote, client: &mut ZygoteClient) -> Kid {
    let mut owner = spawn(z, client, "owner", 0, &[]).expect("spawn owner");
    wait_ready(&mut owner, READY);
    owner
}

#[test]
fn a_kept_generation_serves_workers_while_no_owner_is_up_and_is_adopted_by_the_next_owner() {
    let dir = TempDir::new("kept");
    // f16: the owner builds an f32 copy of its own, so what is kept is not the model memfd.
    let z = on_synthetic_model(&dir, 4 << 20, Dtype::F16);
    let mut client = z.client();

    assert_nothing_kept(&mut client, "nothing is kept before an owner ran");
    let mut owner = spawn(&z, &mut client, "owner", 0, &[]).expect("spawn owner");
    let detail = wait_ready(&mut owner, READY);
    assert!(
        detail.contains("generation=1"),
        "the first owner exports generation 1: {detail}"
    );
    let kept = client.status().expect("status").kept;
    assert_eq!(
        kept,
        vec![(0, 1, "memfd".to_string())],
        "the zygote keeps the owner's generation"
    );

    // The owner goes away (its supervisor closes its control channel).
    let owner_pid = owner.pid;
    drop(owner);
    wait_exited(&mut client, owner_pid, Duration::from_secs(10));

    // A worker starting now finds no owner and imports what the zygote kept, verified.
    let mut worker = spawn(&z, &mut client, "probe", 0, &[]).expect("spawn probe");
    let detail = wait_ready(&mut worker, READY);
    assert!(
        detail.contains("generation 1"),
        "the worker imported generation 1: {detail}"
    );
    wait_until(
        Duration::from_secs(5),
        "the worker's log line about the kept generation",
        || {
            z.log_tail()
                .contains("no owner is up; importing generation 1 kept by the zygote")
        },
    );

    // The next owner adopts generation 1 rather than building a generation of its own.
    let mut owner = spawn(&z, &mut client, "owner", 0, &[]).expect("spawn second owner");
    let detail = wait_ready(&mut owner, READY);
    assert!(
        detail.contains("generation=1"),
        "the second owner serves the adopted generation: {detail}"
    );
    wait_until(
        Duration::from_secs(5),
        "the owner's log line about the adoption",
        || {
            z.log_tail()
                .contains("adopted generation 1 kept by the zygote (no rebuild)")
        },
    );

    // And a worker served by the new owner gets the same generation.
    let mut second = spawn(&z, &mut client, "probe", 1, &[]).expect("spawn second probe");
    let detail = wait_ready(&mut second, READY);
    assert!(
        detail.contains("generation 1"),
        "the adopted generation reaches new workers: {detail}"
    );
}

/// A manifest of one 4 KiB arena, as a client that plants weights would send.
fn planted_manifest() -> zygote_runtime::backend::Manifest {
    use zygote_runtime::backend::{ArenaInfo, Manifest};
    Manifest {
        generation: 9,
        backend: zygote_runtime::backend::Backend::Host,
        ipc: zygote_runtime::backend::Ipc::Memfd,
        model_digest: "xxh3-128:0".into(),
        content_digest: "xxh3-128:0".into(),
        device: None,
        arenas: vec![ArenaInfo {
            size: 4096,
            used: 4096,
            legacy_handle: Vec::new(),
        }],
        tensors: Vec::new(),
    }
}

#[test]
fn keep_weights_with_a_wrong_fd_count_is_refused_and_nothing_is_kept() {
    use zygote_runtime::protocol::{frame, ErrorCode, Request, Response};

    let z = Zygote::start(&[]);
    let mut raw = z.raw();
    // One arena, but two fds announced.
    let req = Request::KeepWeights {
        id: 3,
        device: 0,
        manifest: planted_manifest(),
        fds: 2,
    };
    frame::write_frame(&mut raw, &req).expect("send");
    let answer: Response = frame::read_frame(&mut raw, Some(Duration::from_secs(5)))
        .expect("an answer")
        .expect("a frame");
    match answer {
        Response::Error { id, code, .. } => {
            assert_eq!(id, Some(3));
            assert_eq!(code, ErrorCode::BadFdCount);
        }
        other => panic!("expected bad_fd_count, got {other:?}"),
    }
    let mut client = z.client();
    assert_nothing_kept(&mut client, "a refused keep_weights keeps nothing");
}

#[test]
fn keep_weights_from_a_process_that_is_not_the_live_owner_is_refused() {
    use zygote_runtime::protocol::{ErrorCode, ProtocolError};

    let dir = TempDir::new("planted");
    let z = on_synthetic_model(&dir, 1 << 20, Dtype::F16);
    let mut client = z.client();
    let memfd =
        nix::sys::memfd::memfd_create(c"planted", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .expect("memfd");
    nix::unistd::ftruncate(&memfd, 4096).expect("ftruncate");
    // The service's own uid, but not the owner: refused, even with the model's own digest.
    let mut manifest = planted_manifest();
    manifest.model_digest = client.status().expect("status").model_digest;
    match client.keep_weights(0, &manifest, std::slice::from_ref(&memfd)) {
        Err(ProtocolError::Remote {
            code: ErrorCode::NotAllowed,
            message,
        }) => assert!(message.contains("live owner"), "{message}"),
        other => panic!("planting weights is refused with not_allowed: {other:?}"),
    }
    // With an owner live, still refused: only the owner itself may keep weights.
    let _owner = ready_owner(&z, &mut client);
    let mut other = z.client();
    assert!(
        matches!(
            other.keep_weights(0, &manifest, std::slice::from_ref(&memfd)),
            Err(ProtocolError::Remote {
                code: ErrorCode::NotAllowed,
                ..
            })
        ),
        "a client beside the live owner is refused"
    );
    let kept = client.status().expect("status").kept;
    assert_eq!(
        kept,
        vec![(0, 1, "memfd".to_string())],
        "what is kept is the owner's generation 1, not the planted 9"
    );
}

#[test]
fn a_second_owner_for_a_device_is_refused_while_the_first_lives() {
    use zygote_runtime::protocol::{ErrorCode, ProtocolError};

    let dir = TempDir::new("two-owners");
    let z = on_synthetic_model(&dir, 1 << 20, Dtype::F32);
    let mut client = z.client();
    let owner = ready_owner(&z, &mut client);
    match spawn(&z, &mut client, "owner", 0, &[]) {
        Err(ProtocolError::Remote {
            code: ErrorCode::Conflict,
            message,
        }) => assert!(message.contains(&owner.pid.to_string()), "{message}"),
        other => panic!("a second owner of device 0 is refused with conflict: {other:?}"),
    }
    // Once the first has gone, an owner may start again.
    let pid = owner.pid;
    drop(owner);
    wait_exited(&mut client, pid, Duration::from_secs(10));
    let mut next = spawn(&z, &mut client, "owner", 0, &[]).expect("an owner after the first");
    wait_ready(&mut next, READY);
}

#[test]
fn a_worker_without_an_owner_backs_off_logs_once_and_imports_when_an_owner_comes() {
    let dir = TempDir::new("no-owner");
    let z = on_synthetic_model(&dir, 1 << 20, Dtype::F32);
    let mut client = z.client();
    let mut worker = spawn(&z, &mut client, "probe", 0, &[]).expect("spawn probe");
    let waiting = "no owner of device 0 is up";
    let asked = |log: &str| log.matches("hello from \"worker\"").count();
    wait_until(Duration::from_secs(10), "the worker's waiting line", || {
        z.log_tail().contains(waiting)
    });
    // Every try asks the zygote for kept weights: six tries take at least 5+10+20+40+80 ms
    // with the backoff, a few ms without it.
    let first = std::time::Instant::now();
    let before = asked(&z.log_tail());
    wait_until(Duration::from_secs(10), "five more tries", || {
        asked(&z.log_tail()) >= before + 5
    });
    assert!(
        first.elapsed() >= Duration::from_millis(150),
        "five tries took only {:?}: no backoff",
        first.elapsed()
    );
    let _owner = ready_owner(&z, &mut client);
    let detail = wait_ready(&mut worker, READY);
    assert!(detail.contains("generation 1"), "{detail}");
    let log = z.log_tail();
    assert_eq!(
        log.matches(waiting).count(),
        1,
        "the waiting worker logs once per change of state:\n{log}"
    );
    assert!(
        log.contains("the owner of device 0 is up; importing"),
        "and once when it changes:\n{log}"
    );
}

#[test]
fn an_owner_whose_socket_is_claimed_stops_and_leaves_the_socket_alone() {
    use zygote_runtime::protocol::Response;
    use zygote_runtime::rundir::SocketClaim;

    let dir = TempDir::new("claimed");
    let z = on_synthetic_model(&dir, 1 << 20, Dtype::F32);
    // A live owner the zygote does not know (one started by an earlier zygote, say).
    let (claim, _listener) =
        SocketClaim::bind(&z.runtime_dir, "owner-0.sock", 0o600).expect("claiming owner-0.sock");
    let mut client = z.client();
    let owner = spawn(&z, &mut client, "owner", 0, &[]).expect("spawn owner");
    let (exited, _) = wait_exited(&mut client, owner.pid, Duration::from_secs(10));
    assert!(
        matches!(exited, Response::Exited { code: Some(1), .. }),
        "the second owner stops with an error: {exited:?}"
    );
    let log = z.log_tail();
    assert!(log.contains("another owner serves device 0"), "{log}");
    assert!(
        !log.contains("weights ready"),
        "it built nothing before it found the claim:\n{log}"
    );
    std::os::unix::net::UnixStream::connect(claim.path())
        .expect("the live owner's socket is still there and served");
    assert_nothing_kept(&mut client, "nothing was kept by the owner that stopped");
}

#[test]
fn a_silent_client_of_the_owner_socket_does_not_stall_imports() {
    use std::io::Write;

    let dir = TempDir::new("stalled-import");
    let z = on_synthetic_model(&dir, 1 << 20, Dtype::F32);
    let mut client = z.client();
    let _owner = ready_owner(&z, &mut client);
    let socket = zygote_runtime::worker::owner_socket(&z.runtime_dir, 0);
    // One client says nothing; another starts a frame and stops. Each has 5 s before the owner
    // drops it, and a blocking owner would make every import wait behind them.
    let _silent = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut partial = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    partial
        .write_all(&[0, 0, 0, 40, 0xa3])
        .expect("a frame's start");
    let started = std::time::Instant::now();
    let mut worker = spawn(&z, &mut client, "probe", 0, &[]).expect("spawn probe");
    let detail = wait_ready(&mut worker, READY);
    assert!(detail.contains("generation 1"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the import waited {:?} behind the stalled clients",
        started.elapsed()
    );
    wait_until(
        Duration::from_secs(10),
        "the owner dropping the stalled clients at their deadline",
        || z.log_tail().matches("an import failed").count() >= 2,
    );
}

#[test]
fn an_owner_says_what_it_serves_in_typed_fields_of_its_ready() {
    use zygote_runtime::protocol::{frame, Backend, ChildMessage, Ipc};

    let dir = TempDir::new("typed-ready");
    let z = on_synthetic_model(&dir, 1 << 20, Dtype::F32);
    let mut client = z.client();
    let mut owner = spawn(&z, &mut client, "owner", 0, &[]).expect("spawn owner");
    let ready = loop {
        match frame::read_frame::<_, ChildMessage>(&mut owner.control, Some(READY)) {
            Ok(Some(m @ ChildMessage::Ready { .. })) => break m,
            Ok(Some(_)) => continue,
            other => panic!("no ready from the owner: {other:?}"),
        }
    };
    let ChildMessage::Ready { weights, .. } = ready else {
        unreachable!()
    };
    let weights = weights.expect("an owner's ready carries its weights");
    assert_eq!(
        (weights.backend, weights.ipc),
        (Backend::Host, Ipc::Memfd),
        "the supervisor reads the backend and IPC from typed fields, not from the detail text"
    );
    assert!(weights.bytes > 0, "the bytes served: {weights:?}");
}
