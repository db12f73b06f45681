//! The `owner` entry: the one process that builds the compute copy of the weights and hands it
//! to workers.
//!
//! The supervisor spawns it through the zygote like any child (entry `owner`, arguments
//! `--backend B --ipc I --host-weights F --generation G`). It picks the backend (probing CUDA happens here and
//! nowhere else), exports generation `G`, listens on the owner socket of its device
//! ([`zygote_runtime::worker::owner_socket`]), reports ready, and then answers each worker's
//! `import` with the manifest and the handles ([`imports`], non-blocking: no worker can stall
//! another), sending a heartbeat to its supervisor every second. It exits on `drain` or when its
//! supervisor goes away.
//!
//! The owner socket is served under a claim ([`zygote_runtime::rundir::SocketClaim`]): a second
//! owner of the same device finds it taken and stops with [`OwnerError::SocketClaimed`] instead
//! of rebinding the socket under the live one, and an owner removes only the socket it bound.

pub mod imports;

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use zygote_runtime::backend::{
    BackendChoice, BackendError, DeviceBackend, Export, HostWeightsForm, IpcChoice,
};
use zygote_runtime::client::ZygoteClient;
use zygote_runtime::protocol::{Backend, Ipc, ParentMessage, ServedWeights};
use zygote_runtime::rundir::{RunDirError, SocketClaim};
use zygote_runtime::{Worker, WorkerError};

use imports::Imports;

/// Why an owner stops before or while serving. The entry logs it and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("bad owner arguments: {0}")]
    Arguments(String),
    #[error("no usable backend: {0}")]
    Backend(String),
    #[error("building the weights failed: {0}")]
    Build(#[from] BackendError),
    #[error("another owner serves device {device}: {source}")]
    SocketClaimed { device: u32, source: RunDirError },
    #[error("the owner socket: {0}")]
    Socket(RunDirError),
    #[error("reporting ready failed: {0}")]
    Ready(WorkerError),
    #[error("control channel: {0}")]
    Control(WorkerError),
    #[error("poll failed: {0}")]
    Poll(nix::Error),
}

/// Exit code of an owner that stopped with an [`OwnerError`] (the log says which).
pub const OWNER_FAILED: i32 = 1;

/// Options of the owner, from its spawn arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerOptions {
    pub backend: BackendChoice,
    pub ipc: IpcChoice,
    /// The form of the host backend's compute copy (`--host-weights`).
    pub host_weights: HostWeightsForm,
    pub generation: u64,
}

impl OwnerOptions {
    /// Parses `--backend B --ipc I --host-weights F --generation G` (each optional).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            backend: BackendChoice::Auto,
            ipc: IpcChoice::Auto,
            host_weights: HostWeightsForm::F32,
            generation: 1,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            match a.as_str() {
                "--backend" => o.backend = v.parse()?,
                "--ipc" => o.ipc = v.parse()?,
                "--host-weights" => o.host_weights = v.parse()?,
                "--generation" => {
                    o.generation = v.parse().map_err(|e| format!("--generation {v}: {e}"))?
                }
                other => return Err(format!("unknown owner argument {other}")),
            }
        }
        Ok(o)
    }
}

/// Chooses the backend. Only the owner calls this: probing CUDA loads libcuda.
pub fn select_backend(opts: &OwnerOptions, device: u32) -> Result<Box<dyn DeviceBackend>, String> {
    zygote_runtime::backend::cuda::select_backend(opts.backend, opts.ipc, opts.host_weights, device)
        .map_err(|e| e.to_string())
}

/// The entry function: 0 after a drain or when the supervisor is gone, [`OWNER_FAILED`]
/// (with the error logged) otherwise.
pub fn run(mut worker: Worker) -> i32 {
    match own(&mut worker) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            OWNER_FAILED
        }
    }
}

fn own(worker: &mut Worker) -> Result<(), OwnerError> {
    let opts = OwnerOptions::parse(worker.args()).map_err(OwnerError::Arguments)?;
    let device = worker.info().device.unwrap_or(0);
    // Claim the socket first: a second owner of this device must not build anything.
    let name = zygote_runtime::worker::owner_socket_name(device);
    let (claim, listener) = SocketClaim::bind(&worker.info().runtime_dir, &name, 0o600).map_err(
        |source| match source {
            RunDirError::Claimed { .. } => OwnerError::SocketClaimed { device, source },
            other => OwnerError::Socket(other),
        },
    )?;
    listener.set_nonblocking(true).map_err(|e| {
        OwnerError::Socket(RunDirError::Io {
            path: claim.path().to_path_buf(),
            action: "setting non-blocking",
            source: e,
        })
    })?;
    let started = Instant::now();
    let mut backend = select_backend(&opts, device).map_err(OwnerError::Backend)?;
    let export = obtain(backend.as_mut(), worker, device, opts.generation)?;
    let built = started.elapsed();
    let bytes = export.manifest.arenas.iter().map(|a| a.used).sum::<u64>();
    let detail = format!(
        "backend={} ipc={} generation={} bytes={bytes} built_ms={}",
        backend.name(),
        backend.ipc(),
        export.manifest.generation,
        built.as_millis()
    );
    log::info!(
        "weights ready: {detail}; serving {}",
        claim.path().display()
    );
    let weights = match (
        Backend::from_name(backend.name()),
        Ipc::from_name(backend.ipc()),
    ) {
        (Some(backend), Some(ipc)) => ServedWeights {
            backend,
            ipc,
            bytes,
        },
        _ => {
            return Err(OwnerError::Backend(format!(
                "unknown backend or IPC in {detail}"
            )))
        }
    };
    worker
        .ready_serving(export.manifest.generation, weights, &detail)
        .map_err(OwnerError::Ready)?;
    serve(worker, &listener, &export)
}

/// Adopts the generation the zygote keeps for `device` when the backend can (a restarted
/// owner: no upload), else exports a new one and leaves its handles with the zygote, so that
/// they outlive this process.
fn obtain(
    backend: &mut dyn DeviceBackend,
    worker: &Worker,
    device: u32,
    generation: u64,
) -> Result<Export, BackendError> {
    let socket = worker
        .info()
        .runtime_dir
        .join(zygote_runtime::rundir::ZYGOTE_SOCKET);
    let mut zygote = match ZygoteClient::connect(&socket, "owner") {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!(
                "the zygote is not reachable ({e}); the weights will not outlive this owner"
            );
            None
        }
    };
    if let Some(kept) = zygote
        .as_mut()
        .and_then(|z| z.fetch_weights(device).ok().flatten())
    {
        let (manifest, fds) = kept;
        let generation = manifest.generation;
        match backend.adopt(manifest, fds, worker.model()) {
            Ok(Some(export)) => {
                log::info!("adopted generation {generation} kept by the zygote (no rebuild)");
                return Ok(export);
            }
            Ok(None) => log::info!("generation {generation} cannot be adopted; building anew"),
            Err(e) => log::warn!("adopting generation {generation} failed ({e}); building anew"),
        }
    }
    let export = backend.export(worker.model(), generation)?;
    // Legacy CUDA handles die with this process: keeping them would only mislead.
    if export.manifest.ipc != zygote_runtime::protocol::Ipc::Legacy {
        if let Some(z) = zygote.as_mut() {
            if let Err(e) = z.keep_weights(device, &export.manifest, &export.fds) {
                log::warn!("leaving the weights with the zygote failed: {e}");
            }
        }
    }
    Ok(export)
}

/// Answers imports until a drain or the supervisor's end, heartbeating every second.
fn serve(worker: &mut Worker, listener: &UnixListener, export: &Export) -> Result<(), OwnerError> {
    const BEAT: Duration = Duration::from_secs(1);
    let mut last_beat = Instant::now();
    let mut imports = Imports::default();
    loop {
        let now = Instant::now();
        let wait = imports
            .next_deadline(now)
            .unwrap_or(BEAT)
            .min(BEAT.saturating_sub(last_beat.elapsed()));
        let (listener_ready, control_ready, ready) = {
            let set = imports.poll_set();
            let mut fds = vec![
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(worker.control_fd(), PollFlags::POLLIN),
            ];
            fds.extend(set.iter().map(|(fd, writable)| {
                let flags = if *writable {
                    PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                };
                PollFd::new(*fd, flags)
            }));
            let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(OwnerError::Poll(e)),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let conns: Vec<bool> = fds[2..].iter().map(ready).collect();
            (ready(&fds[0]), ready(&fds[1]), conns)
        };
        if control_ready {
            // Drain is the only message a supervisor sends an owner (it spawns no spare owner).
            match worker.poll_control() {
                Ok(Some(ParentMessage::Drain { .. })) => {
                    log::info!("drain requested after {} imports; exiting", imports.served);
                    return Ok(());
                }
                Ok(Some(ParentMessage::Activate { .. })) => {
                    log::warn!("ignoring `activate`: an owner is no spare");
                }
                Ok(None) => {}
                Err(WorkerError::Orphaned) => {
                    log::info!("supervisor gone; exiting");
                    return Ok(());
                }
                Err(e) => return Err(OwnerError::Control(e)),
            }
        }
        imports.serve(&ready, export);
        if listener_ready {
            imports.accept(listener);
        }
        if last_beat.elapsed() >= BEAT {
            last_beat = Instant::now();
            if let Err(WorkerError::Orphaned) = worker.heartbeat(imports.served) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_arguments_parse_and_refuse_nonsense() {
        let args: Vec<String> = [
            "--backend",
            "host",
            "--ipc",
            "vmm",
            "--host-weights",
            "f16",
            "--generation",
            "7",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = OwnerOptions::parse(&args).unwrap();
        assert_eq!(
            o,
            OwnerOptions {
                backend: BackendChoice::Host,
                ipc: IpcChoice::Vmm,
                host_weights: HostWeightsForm::F16,
                generation: 7
            }
        );
        let default = OwnerOptions::parse(&[]).unwrap();
        assert_eq!(default.host_weights, HostWeightsForm::F32);
        assert!(OwnerOptions::parse(&["--host-weights".into(), "int8".into()]).is_err());
        assert!(OwnerOptions::parse(&["--backend".into()]).is_err());
        assert!(OwnerOptions::parse(&["--backend".into(), "tpu".into()]).is_err());
        assert!(OwnerOptions::parse(&["--exec".into(), "/bin/sh".into()]).is_err());
    }
}
