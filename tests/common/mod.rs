//! Shared support for the integration tests: they run the real `zygote` binary in a temporary
//! runtime directory and wait for what they expect with deadlines.
//!
//! - [`Service`]: a guard around `zygote start` (the whole supervised service).
//! - [`Zygote`]: a guard around a bare `zygote __zygote`, for tests that speak the protocol.
//! - [`wait_until`] / [`wait_for`]: poll a condition every few milliseconds until a deadline,
//!   then fail saying what was awaited. No test synchronises with a fixed sleep.
//! - Models: [`tiny_model`] and [`synthetic_model`] write safetensors files with
//!   [`zygote_runtime::synth`]; [`reference_model`] finds the all-MiniLM-L6-v2 directory for the
//!   tests that need the real example app.
//!
//! Cleanup: every process a guard starts carries an environment variable unique to that guard
//! ([`TAG_ENV`]); the supervisor, the zygote and every child inherit it (exec'd entries too).
//! On drop a guard SIGKILLs its direct child and then every process still carrying its tag,
//! until none is left, and removes its temporary directory. Pids are never guessed from names,
//! and other tests' (or other programs') processes are never touched.

#![allow(dead_code)] // Each test file uses its own part of this module.

pub mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use zygote_runtime::client::{SpawnFds, Spawned, ZygoteClient};
use zygote_runtime::model::Dtype;
use zygote_runtime::protocol::frame;
use zygote_runtime::protocol::{
    ChildMessage, ProcessStatus, ProtocolError, Response, ServiceStatus,
};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_zygote");
/// The environment variable that marks every process a guard started.
pub const TAG_ENV: &str = "ZYGOTE_TEST_TAG";

/// How long a service gets to come up (model load, owner, workers).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long tests wait for a state change of a running service.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Polls `cond` every few milliseconds until it holds; panics after `timeout` saying `what`
/// was awaited.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// Polls `f` every few milliseconds until it returns `Some`; panics after `timeout` saying
/// `what` was awaited.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary directory, removed on drop. Its mode is 0755 (the umask's default), so a test
/// that drops privileges can still reach what it opens up inside.
#[derive(Debug)]
pub struct TempDir {
    dir: tempfile::TempDir,
}

impl TempDir {
    pub fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("zygote-test-{label}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory for {label}: {e}"));
        // tempfile makes it 0700; tests that drop privileges need to reach inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("chmod of {}: {e}", dir.path().display()));
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The pids of every live process whose environment holds `TAG_ENV=tag`.
pub fn tagged_pids(tag: &str) -> Vec<i32> {
    let needle = format!("{TAG_ENV}={tag}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs every process carrying `tag` until none is left (or 10 s passed).
pub fn kill_tagged(tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = tagged_pids(tag);
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A unique tag for a guard's processes.
fn new_tag(dir: &Path) -> String {
    dir.display().to_string()
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the first field after the parenthesised comm.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Waits until none of `procs` (a name and a pid each) is alive; fails after `timeout`
/// naming the ones still there.
pub fn wait_gone(procs: &[(String, i32)], timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<&(String, i32)> = procs.iter().filter(|(_, pid)| alive(*pid)).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: still alive after {timeout:?}: {left:?} (of {procs:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` to `pid`, failing the test if that is impossible.
pub fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("sending {sig} to pid {pid}: {e}"));
}

/// A valid model of two small tensors (an f32 one and an f16 one), 16 KiB of data.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.safetensors");
    let a: Vec<u8> = (0..2048u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..4096u16).flat_map(|i| i.to_le_bytes()).collect();
    zygote_runtime::synth::write_safetensors(
        &path,
        &[
            ("a", Dtype::F32, &[2048], &a),
            ("b", Dtype::F16, &[4096], &b),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// A valid model of about `bytes` of `dtype` weights.
pub fn synthetic_model(dir: &Path, bytes: u64, dtype: Dtype) -> PathBuf {
    let path = dir.join(format!("synthetic-{bytes}-{}.safetensors", dtype.as_str()));
    zygote_runtime::synth::write_synthetic(&path, bytes, dtype, 7)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// The reference model directory (all-MiniLM-L6-v2) for the tests that serve the example app:
/// `$ZYGOTE_TEST_MODEL_DIR`, else `models/all-MiniLM-L6-v2` in the repository.
///
/// When it is missing: `None` after printing why (the caller skips), unless `CI` is set, where
/// a missing model is a failure (CI fetches it first, so its absence is a broken set-up).
pub fn reference_model(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("ZYGOTE_TEST_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !ci,
        "{test}: the reference model is missing at {} (CI is set; scripts/fetch-model.sh \
         models/all-MiniLM-L6-v2 fetches it)",
        dir.display()
    );
    // Straight to stderr, past the test harness's capture, so the skip shows in every run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: no reference model at {} (fetch it with scripts/fetch-model.sh \
         models/all-MiniLM-L6-v2; with CI set this is a failure)",
        dir.display()
    );
    None
}

/// The last `n` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The supervised service.

/// How to start a [`Service`].
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub model: Option<PathBuf>,
    pub workers: u32,
    pub entry: Option<String>,
    /// Number of listeners (each `127.0.0.1:0`, a port the kernel picks).
    pub listeners: u32,
    /// More options for `zygote start`.
    pub args: Vec<String>,
    /// The exec entry's program and arguments (after `--`).
    pub command: Vec<String>,
    /// Wait until the owner and every worker serve before returning.
    pub wait_serving: bool,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            model: None,
            workers: 2,
            entry: Some("idle".into()),
            listeners: 1,
            args: Vec::new(),
            command: Vec::new(),
            wait_serving: true,
        }
    }
}

/// `zygote start` in a temporary runtime directory. Killed, with everything it started, on
/// drop.
#[derive(Debug)]
pub struct Service {
    pub dir: TempDir,
    pub runtime_dir: PathBuf,
    pub model: PathBuf,
    pub log: PathBuf,
    pub workers: u32,
    child: Child,
    tag: String,
    exited: Option<ExitStatus>,
}

/// One process of a service, from `zygote status --json`.
pub type Proc = ProcessStatus;

impl Service {
    /// Starts `zygote start` with `opts` (and, when asked, waits until it serves).
    pub fn start(opts: ServiceOptions) -> Self {
        Self::start_via(opts, |cmd, _| cmd)
    }

    /// [`Service::start`], the command handed to `launch` first (with the log's path): it
    /// returns what to run instead, e.g. a launcher that passes fds as systemd does. The
    /// command it gets carries the tag, so what it returns must keep the environment.
    pub fn start_via(opts: ServiceOptions, launch: impl FnOnce(Command, &Path) -> Command) -> Self {
        let dir = TempDir::new("svc");
        let model = opts.model.clone().unwrap_or_else(|| tiny_model(dir.path()));
        let runtime_dir = dir.path().join("rt");
        let log = dir.path().join("service.log");
        let tag = new_tag(dir.path());
        let mut cmd = Command::new(BIN);
        cmd.arg("start")
            .arg("--model")
            .arg(&model)
            .arg("--workers")
            .arg(opts.workers.to_string())
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .arg("--backend")
            .arg("host");
        if let Some(entry) = &opts.entry {
            cmd.arg("--entry").arg(entry);
        }
        for _ in 0..opts.listeners {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        cmd.args(&opts.args);
        if !opts.command.is_empty() {
            cmd.arg("--").args(&opts.command);
        }
        let out = std::fs::File::create(&log).expect("creating the service log");
        let err = out.try_clone().expect("dup of the service log");
        cmd.env(TAG_ENV, &tag)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut cmd = launch(cmd, &log);
        let child = cmd.spawn().expect("running zygote start");
        let svc = Self {
            dir,
            runtime_dir,
            model,
            log,
            workers: opts.workers,
            child,
            tag,
            exited: None,
        };
        if opts.wait_serving {
            svc.wait_serving(START_TIMEOUT);
        }
        svc
    }

    /// Starts a service of `workers` idle workers on the tiny model.
    pub fn idle(workers: u32) -> Self {
        Self::start(ServiceOptions {
            workers,
            ..ServiceOptions::default()
        })
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The tail of the service's log (supervisor, zygote and children share it).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }

    /// `zygote status --runtime-dir D --json`, parsed; `None` when it fails (not up yet, or
    /// gone).
    pub fn try_status(&self) -> Option<ServiceStatus> {
        let out = Command::new(BIN)
            .arg("status")
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--json")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The service's status as `zygote status --json` prints it; fails the test when it
    /// cannot be had.
    pub fn status(&self) -> ServiceStatus {
        let out = Command::new(BIN)
            .arg("status")
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .expect("running zygote status");
        assert!(
            out.status.success(),
            "zygote status failed ({}): {}\nservice log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "zygote status --json printed something that is not a status ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The value of [`Service::status`] as raw JSON.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(self.status()).expect("a status is JSON")
    }

    /// The processes of `role` (`supervisor`, `zygote`, `owner`, `worker`).
    pub fn procs(&self, role: &str) -> Vec<Proc> {
        procs_of(&self.status(), role)
    }

    /// The pids of `role`, sorted by slot.
    pub fn pids_of(&self, role: &str) -> Vec<i32> {
        self.procs(role).iter().map(|p| p.pid).collect()
    }

    /// The zygote's pid (0 while it restarts).
    pub fn zygote_pid(&self) -> i32 {
        self.pids_of("zygote").first().copied().unwrap_or(0)
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        let s = self.status();
        let a = s.listen.first().unwrap_or_else(|| {
            panic!("the service listens nowhere: {:?}", s.listen);
        });
        a.parse()
            .unwrap_or_else(|e| panic!("bad listen address {a}: {e}"))
    }

    /// Waits until the owner and one worker per slot serve and nothing else is starting or
    /// draining; returns the workers by slot.
    pub fn wait_serving(&self, timeout: Duration) -> Vec<Proc> {
        let n = self.workers;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                if settled(&s, n) {
                    let mut w = procs_of(&s, "worker");
                    w.sort_by_key(|p| p.slot);
                    return w;
                }
            }
            // Our unreaped child: a zombie once it exits, so its pid cannot be reused.
            if !alive(self.pid()) {
                panic!(
                    "zygote start exited while the test waited for it to serve\n\
                     service log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting until the owner and {n} workers serve\n\
                     last status: {:?}\nservice log:\n{}",
                    self.try_status(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the supervisor.
    pub fn signal(&self, sig: Signal) {
        signal(self.pid(), sig);
    }

    /// Waits for the supervisor to exit; fails after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.exited = Some(s);
                    return s;
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for zygote start: {e}"),
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for zygote start to exit\n\
                     service log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every process this service started that is still alive (its tag).
    pub fn leftovers(&self) -> Vec<i32> {
        tagged_pids(&self.tag)
    }
}

/// Whether `s` shows the owner and `workers` workers serving, one per slot, and nothing else.
pub fn settled(s: &ServiceStatus, workers: u32) -> bool {
    let owners = procs_of(s, "owner");
    let w = procs_of(s, "worker");
    let zygote_up = procs_of(s, "zygote").iter().all(|z| z.pid > 0);
    zygote_up
        && !owners.is_empty()
        && owners.iter().all(|p| p.state == "serving")
        && w.len() == workers as usize
        && w.iter().all(|p| p.state == "serving")
        && (0..workers).all(|slot| w.iter().any(|p| p.slot == Some(slot)))
}

/// The processes of `role` in a status, sorted by slot.
pub fn procs_of(s: &ServiceStatus, role: &str) -> Vec<Proc> {
    let mut v: Vec<Proc> = s
        .processes
        .iter()
        .filter(|p| p.role == role)
        .cloned()
        .collect();
    v.sort_by_key(|p| p.slot);
    v
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- service log ({}) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_tagged(&self.tag);
    }
}

/// How a `zygote start` that was run to completion ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// Its stdout and stderr (with those of the processes it started), stdout first.
    pub output: String,
    /// Processes it started that were still alive 5 s after it exited (killed since).
    pub leftovers: Vec<i32>,
}

/// Runs `zygote start ARGS --runtime-dir DIR` to completion (for services that must refuse
/// to start or stop by themselves). Fails after `timeout`.
pub fn run_start(args: &[&str], runtime_dir: &Path, timeout: Duration) -> Finished {
    let tag = new_tag(runtime_dir);
    let mut child = Command::new(BIN)
        .arg("start")
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .args(args)
        .env(TAG_ENV, &tag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running zygote start");
    // Both pipes are read by threads so a chatty child never blocks on a full pipe.
    let out = read_in_thread(child.stdout.take().expect("piped"));
    let err = read_in_thread(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for zygote start") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            kill_tagged(&tag);
            panic!("zygote start {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let gone_by = Instant::now() + Duration::from_secs(5);
    let leftovers = loop {
        let left = tagged_pids(&tag);
        if left.is_empty() || Instant::now() >= gone_by {
            break left;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    kill_tagged(&tag);
    let mut output = out.join().unwrap_or_default();
    output.push_str(&err.join().unwrap_or_default());
    Finished {
        status,
        output,
        leftovers,
    }
}

fn read_in_thread(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

// ---------------------------------------------------------------------------------------------
// A bare zygote.

/// A bare `zygote __zygote` in a temporary runtime directory, for protocol tests. Killed,
/// with every child it forked, on drop.
#[derive(Debug)]
pub struct Zygote {
    pub dir: TempDir,
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
    pub model: PathBuf,
    pub log: PathBuf,
    pub pid: i32,
    child: Child,
    tag: String,
}

/// How to start a [`Zygote`].
#[derive(Debug, Clone, Default)]
pub struct ZygoteOptions {
    pub model: Option<PathBuf>,
    /// More options for `zygote __zygote` (e.g. `--allow-uid`).
    pub args: Vec<String>,
    /// The exec entry's program and arguments.
    pub command: Vec<String>,
    /// Signals to ignore in the zygote (set with `trap '' SIG` in a shell that then execs it),
    /// to check that children get them back at their default.
    pub ignore_signals: Vec<String>,
}

impl Zygote {
    /// Starts a zygote on the tiny model with the exec entry `command` (if not empty).
    pub fn start(command: &[&str]) -> Self {
        Self::start_with(ZygoteOptions {
            command: command.iter().map(|s| s.to_string()).collect(),
            ..ZygoteOptions::default()
        })
    }

    pub fn start_with(opts: ZygoteOptions) -> Self {
        let dir = TempDir::new("zyg");
        let model = opts.model.clone().unwrap_or_else(|| tiny_model(dir.path()));
        let runtime_dir = dir.path().join("rt");
        let log = dir.path().join("zygote.log");
        let tag = new_tag(dir.path());
        let mut cmd = if opts.ignore_signals.is_empty() {
            Command::new(BIN)
        } else {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg(format!(
                    "trap '' {}; exec \"$0\" \"$@\"",
                    opts.ignore_signals.join(" ")
                ))
                .arg(BIN);
            c
        };
        cmd.arg("__zygote")
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .arg("--model")
            .arg(&model)
            .arg("--backend")
            .arg("host")
            .args(&opts.args);
        if !opts.command.is_empty() {
            cmd.arg("--").args(&opts.command);
        }
        // Appending, like the children's output into the same file: a zygote writing at its own
        // offset would overwrite the lines its children appended.
        std::fs::File::create(&log).expect("creating the zygote log");
        let err = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("opening the zygote log");
        let mut child = cmd
            .env(TAG_ENV, &tag)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("running zygote __zygote");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                kill_tagged(&tag);
                panic!(
                    "zygote __zygote did not say ready within {START_TIMEOUT:?}:\n{}",
                    log_tail(&log, 40)
                );
            }
        };
        let mut words = line.split_whitespace();
        let (Some("ready"), Some(pid), Some(socket)) = (words.next(), words.next(), words.next())
        else {
            let _ = child.kill();
            let _ = child.wait();
            kill_tagged(&tag);
            panic!(
                "zygote __zygote said {line:?} instead of `ready PID SOCKET`:\n{}",
                log_tail(&log, 40)
            );
        };
        let pid: i32 = pid.parse().expect("the ready line's pid");
        assert_eq!(
            pid,
            child.id() as i32,
            "the ready line names the zygote's own pid"
        );
        Self {
            dir,
            runtime_dir,
            socket: PathBuf::from(socket),
            model,
            log,
            pid,
            child,
            tag,
        }
    }

    /// A new connection (after `hello`).
    pub fn client(&self) -> ZygoteClient {
        ZygoteClient::connect(&self.socket, "integration test").unwrap_or_else(|e| {
            panic!(
                "connecting to {}: {e}\nzygote log:\n{}",
                self.socket.display(),
                log_tail(&self.log, 40)
            )
        })
    }

    /// A raw connection, for hand-made frames.
    pub fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.socket.display()))
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }

    /// A file the children write their stdout and stderr to (the zygote's log).
    pub fn child_output(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("opening the zygote log for a child")
    }

    /// Every process this zygote (or its children) left alive.
    pub fn leftovers(&self) -> Vec<i32> {
        tagged_pids(&self.tag)
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- zygote log ({}) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_tagged(&self.tag);
    }
}

/// A child spawned by a test through the protocol: its pid, its pidfd, and the test's end of
/// its control channel (closing it ends the child).
#[derive(Debug)]
pub struct Kid {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub control: UnixStream,
}

/// Spawns `entry` with stdio to the zygote's log and the given listeners.
pub fn spawn(
    z: &Zygote,
    client: &mut ZygoteClient,
    entry: &str,
    worker: u32,
    listeners: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Kid, ProtocolError> {
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    let stdin = std::fs::File::open("/dev/null").expect("/dev/null");
    let out = z.child_output();
    let fds = SpawnFds {
        stdin: stdin.as_fd(),
        stdout: out.as_fd(),
        stderr: out.as_fd(),
        control: theirs.as_fd(),
        listeners: listeners.to_vec(),
    };
    let Spawned { pid, pidfd } =
        client.spawn(entry, zygote_runtime::WorkerId(worker), &[], None, &fds)?;
    Ok(Kid {
        pid,
        pidfd,
        control: mine,
    })
}

/// Waits for the child's `ready` on its control channel.
pub fn wait_ready(kid: &mut Kid, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match frame::read_frame::<_, ChildMessage>(&mut kid.control, Some(left)) {
            Ok(Some(ChildMessage::Ready { pid, detail, .. })) => {
                assert_eq!(pid, kid.pid, "the ready message names the child's pid");
                return detail;
            }
            Ok(Some(_)) => continue,
            other => panic!(
                "pid {} did not report ready within {timeout:?}: {other:?}",
                kid.pid
            ),
        }
    }
}

/// Waits for the `exited` event of `pid` on `client`; returns it and the events before it.
pub fn wait_exited(
    client: &mut ZygoteClient,
    pid: i32,
    timeout: Duration,
) -> (Response, Vec<Response>) {
    let deadline = Instant::now() + timeout;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(Some(left)) {
            Ok(ev @ Response::Exited { pid: p, .. }) if p == pid => return (ev, before),
            Ok(ev) => before.push(ev),
            Err(e) => panic!(
                "no `exited` for pid {pid} within {timeout:?} ({e}); events so far: {before:?}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc.

/// `(Rss, Pss, Size)` in KiB, summed over the mappings of `pid` whose path contains `needle`.
pub fn mapping_kib(pid: i32, needle: &str) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut rss, mut pss, mut size) = (0, 0, 0);
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.ends_with(':') && first.contains('-') {
            inside = line.contains(needle);
            continue;
        }
        if !inside {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(key), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match key {
            "Rss:" => rss += v,
            "Pss:" => pss += v,
            "Size:" => size += v,
            _ => {}
        }
    }
    Some((rss, pss, size))
}

/// A field of `/proc/PID/status` (e.g. `SigIgn`), as its text.
pub fn proc_status_field(pid: i32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

/// The socket inode of the TCP socket listening on `port` (from `/proc/net/tcp`).
pub fn listening_inode(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = f.get(1)?.rsplit(':').next()?;
        let state = f.get(3)?;
        if u16::from_str_radix(local_port, 16).ok()? == port && *state == "0A" {
            f.get(9)?.parse().ok()
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client (one request per connection).

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines as sent (names in their original case).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no end of headers in {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no status in {head:?}"),
            )
        })?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
