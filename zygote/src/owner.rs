//! The `owner` entry: the one process that builds the compute copy of the weights and hands it
//! to workers.
//!
//! The supervisor spawns it through the zygote like any child (entry `owner`, arguments
//! `--backend B --ipc I --generation G`). It picks the backend (probing CUDA happens here and
//! nowhere else), exports generation `G`, listens on the owner socket of its device
//! ([`zygote_runtime::worker::owner_socket`]), reports ready, and then answers each worker's
//! `import` with the manifest and the handles, sending a heartbeat to its supervisor every
//! second. It exits on `drain` or when its supervisor goes away.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use zygote_runtime::backend::{BackendChoice, DeviceBackend, Export, IpcChoice};
use zygote_runtime::client::ZygoteClient;
use zygote_runtime::protocol::frame;
use zygote_runtime::protocol::{
    ErrorCode, OwnerRequest, OwnerResponse, ParentMessage, ProtocolError,
};
use zygote_runtime::{fdpass, Worker, WorkerError};

/// Options of the owner, from its spawn arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerOptions {
    pub backend: BackendChoice,
    pub ipc: IpcChoice,
    pub generation: u64,
}

impl OwnerOptions {
    /// Parses `--backend B --ipc I --generation G` (each optional).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            backend: BackendChoice::Auto,
            ipc: IpcChoice::Auto,
            generation: 1,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            match a.as_str() {
                "--backend" => o.backend = v.parse()?,
                "--ipc" => o.ipc = v.parse()?,
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
    zygote_runtime::backend::cuda::select_backend(opts.backend, opts.ipc, device)
        .map_err(|e| e.to_string())
}

/// The entry function.
pub fn run(mut worker: Worker) -> i32 {
    let opts = match OwnerOptions::parse(worker.args()) {
        Ok(o) => o,
        Err(e) => {
            log::error!("bad owner arguments: {e}");
            return 2;
        }
    };
    let device = worker.info().device.unwrap_or(0);
    let started = Instant::now();
    let mut backend = match select_backend(&opts, device) {
        Ok(b) => b,
        Err(e) => {
            log::error!("no usable backend: {e}");
            return 3;
        }
    };
    let export = match obtain(backend.as_mut(), &worker, device, opts.generation) {
        Ok(e) => e,
        Err(e) => {
            log::error!("building the weights failed: {e}");
            return 4;
        }
    };
    let built = started.elapsed();
    let path = zygote_runtime::worker::owner_socket(&worker.info().runtime_dir, device);
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            log::error!("binding the owner socket {}: {e}", path.display());
            return 5;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let detail = format!(
        "backend={} ipc={} generation={} bytes={} built_ms={}",
        backend.name(),
        backend.ipc(),
        export.manifest.generation,
        export.manifest.arenas.iter().map(|a| a.used).sum::<u64>(),
        built.as_millis()
    );
    log::info!("weights ready: {detail}; serving {}", path.display());
    if let Err(e) = worker.ready(Some(export.manifest.generation), &detail) {
        log::error!("reporting ready failed: {e}");
        return 6;
    }
    let code = serve(&mut worker, &listener, &export);
    let _ = std::fs::remove_file(&path);
    code
}

/// Adopts the generation the zygote keeps for `device` when the backend can (a restarted
/// owner: no upload), else exports a new one and leaves its handles with the zygote, so that
/// they outlive this process.
fn obtain(
    backend: &mut dyn DeviceBackend,
    worker: &Worker,
    device: u32,
    generation: u64,
) -> Result<Export, zygote_runtime::backend::BackendError> {
    let socket = worker
        .info()
        .runtime_dir
        .join(zygote_runtime::worker::ZYGOTE_SOCKET);
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
    if export.manifest.ipc != "legacy" {
        if let Some(z) = zygote.as_mut() {
            if let Err(e) = z.keep_weights(device, &export.manifest, &export.fds) {
                log::warn!("leaving the weights with the zygote failed: {e}");
            }
        }
    }
    Ok(export)
}

fn serve(worker: &mut Worker, listener: &UnixListener, export: &Export) -> i32 {
    let mut last_beat = Instant::now();
    let mut served = 0u64;
    loop {
        let (listener_ready, control_ready) = {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(worker.control_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("poll failed: {e}");
                    return 1;
                }
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if control_ready {
            // Drain is the only message a supervisor sends an owner.
            match worker.poll_control() {
                Ok(Some(ParentMessage::Drain { .. })) => {
                    log::info!("drain requested after {served} imports; exiting");
                    return 0;
                }
                Ok(None) => {}
                Err(WorkerError::Orphaned) => {
                    log::info!("supervisor gone; exiting");
                    return 0;
                }
                Err(e) => {
                    log::error!("control channel: {e}");
                    return 1;
                }
            }
        }
        if listener_ready {
            match listener.accept() {
                Ok((stream, _)) => match answer(stream, export) {
                    Ok(worker_id) => {
                        served += 1;
                        log::debug!("weights sent to worker {worker_id}");
                    }
                    Err(e) => log::warn!("an import failed: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => log::warn!("accept on the owner socket failed: {e}"),
            }
        }
        if last_beat.elapsed() >= Duration::from_secs(1) {
            last_beat = Instant::now();
            if let Err(WorkerError::Orphaned) = worker.heartbeat(served) {
                return 0;
            }
        }
    }
}

/// Answers one worker: reads its `import`, checks the model digest, sends the manifest and fds.
fn answer(mut stream: UnixStream, export: &Export) -> Result<u32, ProtocolError> {
    stream.set_write_timeout(Some(frame::READ_DEADLINE))?;
    let req: OwnerRequest = frame::read_frame(&mut stream, Some(frame::READ_DEADLINE))?
        .ok_or(ProtocolError::Truncated)?;
    let OwnerRequest::Import {
        id,
        worker,
        model_digest,
    } = req;
    if model_digest != export.manifest.model_digest {
        let message = format!(
            "worker model {model_digest} is not the owner's model {}",
            export.manifest.model_digest
        );
        frame::write_frame(
            &mut stream,
            &OwnerResponse::Error {
                id: Some(id),
                code: ErrorCode::Unavailable,
                message: message.clone(),
            },
        )?;
        return Err(ProtocolError::Remote {
            code: ErrorCode::Unavailable,
            message,
        });
    }
    let resp = OwnerResponse::Manifest {
        id,
        manifest: export.manifest.clone(),
        fds: export.fds.len() as u32,
    };
    frame::write_frame(&mut stream, &resp)?;
    fdpass::send_fds(stream.as_fd(), &export.fds)?;
    Ok(worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_arguments_parse_and_refuse_nonsense() {
        let args: Vec<String> = ["--backend", "host", "--ipc", "vmm", "--generation", "7"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = OwnerOptions::parse(&args).unwrap();
        assert_eq!(
            o,
            OwnerOptions {
                backend: BackendChoice::Host,
                ipc: IpcChoice::Vmm,
                generation: 7
            }
        );
        assert!(OwnerOptions::parse(&["--backend".into()]).is_err());
        assert!(OwnerOptions::parse(&["--backend".into(), "tpu".into()]).is_err());
        assert!(OwnerOptions::parse(&["--exec".into(), "/bin/sh".into()]).is_err());
    }
}
