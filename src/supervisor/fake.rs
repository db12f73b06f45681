//! A recording fake of [`Effects`] for the unit tests, in the manner of youki's
//! `syscall/test.rs`: every call is kept in order, the clock moves only when a test moves it,
//! and failures are scripted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zygote_runtime::procfs::Memory;
use zygote_runtime::WorkerId;

use super::effects::{Effects, Notify, SpawnRequest, ZygoteInfo};

/// One effect, as the service asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    StartZygote(Result<i32, String>),
    LaunchZygote,
    Spawn(i32, SpawnRequest),
    ConnectTemplate(i32, String),
    Drain(i32),
    Activate(i32, WorkerId),
    Signal(i32, Signal),
    Forget(i32),
    StopAccepting,
    CloseListeners,
    StopZygote(Option<i32>),
    ReleaseWeights,
    PrepareModel(std::path::PathBuf),
    RetireZygote(i32),
}

#[derive(Debug)]
pub struct Fake {
    pub now: Instant,
    pub calls: Vec<Call>,
    pub logs: Vec<(log::Level, String)>,
    next_pid: i32,
    /// The next this many zygote starts fail (the first, blocking one).
    pub zygote_failures: u32,
    /// The next this many spawns fail.
    pub spawn_failures: u32,
    /// Children that cannot hear `drain` (an exec'd program that never attached).
    pub deaf: HashSet<i32>,
    /// The memory each pid reports.
    pub memory: HashMap<i32, Memory>,
    /// What [`Effects::draw`] returns.
    pub draw: u64,
    /// What the service told the service manager, in order (apart from `calls`, so that the
    /// tests of other paths need not list them).
    pub notes: Vec<Notify>,
    /// Whether the listeners are watched for a connection (while asleep).
    pub watching: bool,
}

impl Default for Fake {
    fn default() -> Self {
        Self {
            now: Instant::now(),
            calls: Vec::new(),
            logs: Vec::new(),
            next_pid: 100,
            zygote_failures: 0,
            spawn_failures: 0,
            deaf: HashSet::new(),
            memory: HashMap::new(),
            draw: 0,
            notes: Vec::new(),
            watching: false,
        }
    }
}

impl Fake {
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// The calls since the last time they were taken.
    pub fn take(&mut self) -> Vec<Call> {
        std::mem::take(&mut self.calls)
    }

    /// Whether a line containing `needle` was logged at `level`.
    pub fn logged(&self, level: log::Level, needle: &str) -> bool {
        self.logs
            .iter()
            .any(|(l, line)| *l == level && line.contains(needle))
    }

    fn pid(&mut self) -> i32 {
        self.next_pid += 1;
        self.next_pid
    }
}

impl Effects for Fake {
    fn now(&self) -> Instant {
        self.now
    }

    fn log(&mut self, level: log::Level, line: std::fmt::Arguments<'_>) {
        self.logs.push((level, line.to_string()));
    }

    fn start_zygote(&mut self) -> anyhow::Result<ZygoteInfo> {
        if self.zygote_failures > 0 {
            self.zygote_failures -= 1;
            let e = "the zygote exited before it was ready".to_string();
            self.calls.push(Call::StartZygote(Err(e.clone())));
            anyhow::bail!(e);
        }
        let pid = self.pid();
        self.calls.push(Call::StartZygote(Ok(pid)));
        Ok(ZygoteInfo {
            pid,
            started: self.now,
        })
    }

    fn launch_zygote(&mut self) -> anyhow::Result<()> {
        self.calls.push(Call::LaunchZygote);
        Ok(())
    }

    fn spawn(&mut self, req: &SpawnRequest) -> anyhow::Result<i32> {
        if self.spawn_failures > 0 {
            self.spawn_failures -= 1;
            anyhow::bail!("the zygote refused");
        }
        let pid = self.pid();
        self.calls.push(Call::Spawn(pid, req.clone()));
        Ok(pid)
    }

    fn connect_template(&mut self, pid: i32, socket: &str) -> anyhow::Result<()> {
        self.calls
            .push(Call::ConnectTemplate(pid, socket.to_string()));
        Ok(())
    }

    fn drain(&mut self, pid: i32, _deadline: Duration) -> bool {
        self.calls.push(Call::Drain(pid));
        !self.deaf.contains(&pid)
    }

    fn activate(&mut self, pid: i32, worker: WorkerId) -> bool {
        self.calls.push(Call::Activate(pid, worker));
        !self.deaf.contains(&pid)
    }

    fn signal(&mut self, pid: i32, signal: Signal) {
        self.calls.push(Call::Signal(pid, signal));
    }

    fn forget(&mut self, pid: i32) {
        self.calls.push(Call::Forget(pid));
    }

    fn stop_accepting(&mut self) {
        self.calls.push(Call::StopAccepting);
    }

    fn close_listeners(&mut self) {
        self.calls.push(Call::CloseListeners);
    }

    fn watch_listeners(&mut self, on: bool) {
        self.watching = on;
    }

    fn release_weights(&mut self) {
        self.calls.push(Call::ReleaseWeights);
    }

    fn prepare_model(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        self.calls.push(Call::PrepareModel(path.to_path_buf()));
        // A file named `missing` is not there; any other is.
        if path.ends_with("missing") {
            anyhow::bail!("model {}: not found", path.display())
        }
        Ok(())
    }

    fn retire_zygote(&mut self, pid: i32) {
        self.calls.push(Call::RetireZygote(pid));
    }

    fn stop_zygote(&mut self, pid: Option<i32>) {
        self.calls.push(Call::StopZygote(pid));
    }

    fn memory(&self, pid: i32) -> Option<Memory> {
        self.memory.get(&pid).copied()
    }

    fn draw(&mut self) -> u64 {
        self.draw
    }

    fn notify(&mut self, n: Notify) {
        self.notes.push(n);
    }
}
