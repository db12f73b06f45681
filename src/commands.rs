//! The client commands: `zygote spawn` (a one-child supervisor over the zygote socket),
//! `zygote status`, `zygote stop`, `zygote reload`, `zygote scale`, `zygote sleep` and `zygote wake`
//! (requests to a running `zygote start`).

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use zygote_runtime::client::{SpawnFds, ZygoteClient};
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{
    AdminRequest, AdminResponse, ChildMessage, ProcessStatus, Response, RestartReasons,
    ServiceStatus,
};
use zygote_runtime::WorkerId;

use crate::cli::{SpawnArgs, StatusArgs};
use crate::paths;

/// `zygote spawn`: returns the exit code to exit with (the child's code, or 128 + signal).
pub fn spawn(args: SpawnArgs) -> anyhow::Result<i32> {
    let dir = paths::runtime_dir(&args.runtime_dir);
    let sock = dir.join(zygote_runtime::rundir::ZYGOTE_SOCKET);
    let mut client = ZygoteClient::connect(&sock, "zygote spawn")
        .with_context(|| format!("connecting to {}", sock.display()))?;
    let listeners: Vec<TcpListener> = args
        .listen
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("binding {a}")))
        .collect::<anyhow::Result<_>>()?;
    let (mine, theirs) = UnixStream::pair().context("socketpair for the control channel")?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let fds = SpawnFds {
        stdin: stdin.as_fd(),
        stdout: stdout.as_fd(),
        stderr: stderr.as_fd(),
        control: theirs.as_fd(),
        listeners: listeners.iter().map(|l| l.as_fd()).collect(),
    };
    let spawned = client.spawn(
        &args.entry,
        WorkerId(args.worker),
        &args.args,
        args.device,
        &fds,
    )?;
    drop(theirs);
    drop(listeners);
    println!("pid {}", spawned.pid);
    mine.set_nonblocking(true)?;
    let mut reader = FrameReader::default();
    let mut control_open = true;
    loop {
        if control_open {
            loop {
                match reader.read(&mut &mine) {
                    Ok(ReadEvent::Frame(body)) => match frame::decode::<ChildMessage>(&body) {
                        Ok(ChildMessage::Ready { detail, .. }) => println!("ready {detail}"),
                        Ok(ChildMessage::Draining { .. }) => println!("draining"),
                        Ok(ChildMessage::Heartbeat { .. }) => {}
                        Err(e) => log::warn!("bad control message: {e}"),
                    },
                    Ok(ReadEvent::WouldBlock) => break,
                    Ok(ReadEvent::Eof) | Err(_) => {
                        control_open = false;
                        break;
                    }
                }
            }
        }
        match client.next_event(Some(Duration::from_millis(200))) {
            Ok(Response::Exited {
                pid, code, signal, ..
            }) if pid == spawned.pid => {
                return Ok(match (code, signal) {
                    (Some(c), _) => {
                        println!("exited with code {c}");
                        c
                    }
                    (_, Some(s)) => {
                        println!("killed by signal {s}");
                        128 + s
                    }
                    _ => {
                        println!("exited with an unknown status");
                        1
                    }
                });
            }
            Ok(Response::ChildError { stage, message, .. }) => {
                eprintln!("child failed before its entry ({stage}): {message}")
            }
            Ok(_) => {}
            Err(zygote_runtime::protocol::ProtocolError::TimedOut) => {}
            Err(e) => bail!("lost the zygote before pid {} exited: {e}", spawned.pid),
        }
    }
}

/// Sends one request to a running `zygote start`.
pub fn admin(dir: &Path, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    let sock = dir.join(paths::SUPERVISOR_SOCKET);
    let mut stream = UnixStream::connect(&sock).with_context(|| {
        format!(
            "no service is running in {} (connecting to {})",
            dir.display(),
            sock.display()
        )
    })?;
    // A refused peer finds the connection closed before it could write; the refusal is still
    // there to read, and says more than the failed write.
    let sent = frame::write_frame(&mut stream, req);
    let resp: AdminResponse = match frame::read_frame(&mut stream, Some(Duration::from_secs(30))) {
        Ok(Some(resp)) => resp,
        Ok(None) => {
            sent?;
            bail!("the supervisor closed the connection");
        }
        Err(e) => {
            sent?;
            return Err(e.into());
        }
    };
    if let AdminResponse::Error { code, message, .. } = &resp {
        bail!("the supervisor refused: {code:?}: {message}");
    }
    Ok(resp)
}

pub fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let dir = paths::runtime_dir(&args.runtime_dir);
    let AdminResponse::Status { service, .. } = admin(&dir, &AdminRequest::Status { id: 1 })?
    else {
        bail!("unexpected answer to status");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&service)?);
    } else {
        print!("{}", render(&service));
    }
    Ok(0)
}

fn kib(v: Option<u64>) -> String {
    v.map(|k| format!("{:.1}M", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}

/// The status table.
pub fn render(s: &ServiceStatus) -> String {
    let mut out = format!(
        "model {}  backend {}{}  listen {}  workers {}  up {:.0}s\n",
        s.model,
        s.backend,
        s.ipc
            .as_ref()
            .map(|i| format!(" ({i})"))
            .unwrap_or_default(),
        s.listen.join(","),
        s.workers,
        s.uptime_ms as f64 / 1000.0
    );
    out.push_str(&format!(
        "{:<11}{:>5}{:>9}  {:<11}{:>9}{:>10}{:>10}{:>9}{:>9}{:>5}  {}\n",
        "ROLE",
        "SLOT",
        "PID",
        "STATE",
        "RESTARTS",
        "PSS",
        "RSS",
        "AGE",
        "SERVED",
        "GEN",
        "REPLACED"
    ));
    let mut total = 0;
    let mut models = std::collections::BTreeMap::new();
    for p in &s.processes {
        total += p.pss_kib.unwrap_or(0);
        out.push_str(&row(p));
        if let (Some(g), Some(m)) = (p.generation, &p.model) {
            models.insert(g, m.as_str());
        }
    }
    out.push_str(&format!("total PSS {}\n", kib(Some(total))));
    if models.len() > 1 || models.values().any(|m| *m != s.model) {
        for (g, m) in models {
            out.push_str(&format!("generation {g}: {m}\n"));
        }
    }
    if let Some(r) = &s.reload {
        let why = r
            .error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        out.push_str(&format!("reload {}: {}{why}\n", r.model, r.state));
    }
    if let Some(e) = &s.reload_error {
        out.push_str(&format!("{e}\n"));
    }
    out
}

/// `exit 1, roll 2`: the non-zero restart reasons, or `-`.
fn reasons(r: &RestartReasons) -> String {
    let all = [
        ("exit", r.exit),
        ("signal", r.signal),
        ("heartbeat", r.heartbeat),
        ("recycle", r.recycle),
        ("roll", r.roll),
    ];
    let shown: Vec<String> = all
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(", ")
    }
}

fn row(p: &ProcessStatus) -> String {
    format!(
        "{:<11}{:>5}{:>9}  {:<11}{:>9}{:>10}{:>10}{:>8.0}s{:>9}{:>5}  {}\n",
        p.role,
        p.slot.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
        p.pid,
        p.state,
        p.restarts,
        kib(p.pss_kib),
        kib(p.rss_kib),
        p.age_ms as f64 / 1000.0,
        p.served
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        p.generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into()),
        reasons(&p.restart_reasons)
    )
}

pub fn stop(dir: &Path) -> anyhow::Result<i32> {
    admin(dir, &AdminRequest::Stop { id: 1 })?;
    // Wait for the supervisor to finish draining: its socket goes away when it exits.
    let sock = dir.join(paths::SUPERVISOR_SOCKET);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while UnixStream::connect(&sock).is_ok() {
        if std::time::Instant::now() > deadline {
            bail!("the service in {} did not stop within 120 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("stopped");
    Ok(0)
}

pub fn scale(dir: &Path, workers: u32) -> anyhow::Result<i32> {
    admin(dir, &AdminRequest::Scale { id: 1, workers })?;
    println!("scaling to {workers} workers");
    Ok(0)
}

pub fn sleep(dir: &Path) -> anyhow::Result<i32> {
    admin(dir, &AdminRequest::Sleep { id: 1 })?;
    println!("draining the workers and the owners; the service sleeps");
    Ok(0)
}

pub fn wake(dir: &Path) -> anyhow::Result<i32> {
    admin(dir, &AdminRequest::Wake { id: 1 })?;
    println!("waking: starting the owners and the workers");
    Ok(0)
}

pub fn reload(dir: &Path, model: Option<std::path::PathBuf>) -> anyhow::Result<i32> {
    let Some(model) = model else {
        admin(dir, &AdminRequest::Reload { id: 1, model: None })?;
        println!("rolling the workers");
        return Ok(0);
    };
    // The supervisor reads the file itself: a path relative to here would not be its own.
    let model = std::path::absolute(&model)
        .with_context(|| format!("resolving {}", model.display()))?
        .display()
        .to_string();
    admin(
        dir,
        &AdminRequest::Reload {
            id: 1,
            model: Some(model.clone()),
        },
    )?;
    println!("loading {model}");
    // A large model takes the new zygote a while to hash; the roll takes one ready per worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut last = String::new();
    loop {
        let AdminResponse::Status { service, .. } = admin(dir, &AdminRequest::Status { id: 2 })?
        else {
            bail!("the supervisor answered status with something else");
        };
        let Some(r) = service.reload.filter(|r| r.model == model) else {
            bail!("the service shows no reload of {model}");
        };
        if r.state != last {
            match r.state.as_str() {
                "failed" => {
                    let why = r.error.unwrap_or_default();
                    eprintln!("reload of {model} refused: {why}; the old model keeps serving");
                    return Ok(1);
                }
                "done" => {
                    println!("every worker serves {model}");
                    return Ok(0);
                }
                state => println!("{state}"),
            }
            last = r.state;
        }
        if std::time::Instant::now() > deadline {
            bail!("the reload of {model} did not finish within 600 s (now {last})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
