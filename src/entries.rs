//! The native entries compiled into the `zygote` binary, and the allowlist a zygote starts with.
//!
//! | entry | what it runs |
//! |---|---|
//! | `owner` | builds and exports the weights ([`zygote_server::owner`]) |
//! | `app` | the example embeddings service ([`zygote_embed::serve`]) |
//! | `idle` | attaches, maps the model, reports ready and waits: the smallest worker, used to measure spawns |
//! | `probe` | like `idle`, but first imports the owner's weights and reads every page of them: a worker whose memory is all weights, used to measure sharing |
//! | `exec` | the program given after `--` to `zygote start`, exec'd with the attach information |

use std::path::PathBuf;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use zygote_runtime::backend::Weights;
use zygote_runtime::protocol::ParentMessage;
use zygote_runtime::{Worker, WorkerError};
use zygote_server::{Entry, EntryTable};

/// The allowlist: the native entries, plus `exec` when a command was given.
pub fn table(command: &[String]) -> EntryTable {
    let mut t = EntryTable::new();
    t.insert("owner", Entry::Owner(zygote_server::owner::run));
    t.insert("app", Entry::Native(zygote_embed::serve));
    t.insert("idle", Entry::Native(idle));
    t.insert("probe", Entry::Native(probe));
    if let Some((program, args)) = command.split_first() {
        t.insert(
            "exec",
            Entry::Exec {
                program: resolve_program(program),
                args: args.to_vec(),
            },
        );
    }
    t
}

/// Prepares the native entries' shared state in the zygote before it forks anything (see
/// [`zygote_embed::preload`]): only when workers may run the native `app`, not a command after
/// `--`. When the workers do run it (`serve_app`, set by `zygote start` for `--entry app`), a
/// model the app cannot serve is an error: the zygote stops before it is ready, and the service
/// with it, with the reason, instead of starting workers that all refuse the model until the
/// crash-loop limit. Otherwise it is not the zygote's failure: its other entries still work.
pub fn preload(
    model: &zygote_runtime::Model,
    command: &[String],
    serve_app: bool,
) -> anyhow::Result<()> {
    if !command.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    match zygote_embed::preload(model) {
        Ok(()) => log::info!(
            "preloaded the app's model spec and tokenizer in {} ms",
            started.elapsed().as_millis()
        ),
        Err(e) if serve_app => {
            anyhow::bail!(
                "the app cannot serve the model {}: {e}",
                model.path().display()
            )
        }
        Err(e) => log::info!("the app entry cannot serve this model ({e}); not preloaded"),
    }
    Ok(())
}

/// A command name without a `/` is looked up in `PATH` once, when the zygote starts (the
/// child then execs that exact file, as a shell would).
pub fn resolve_program(program: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from(program))
}

/// The `idle` entry: touches the model's header (so the mapping is really in use), reports
/// ready, then heartbeats until drained or orphaned.
pub fn idle(mut worker: Worker) -> i32 {
    let tensors = worker.model().tensors().len();
    let first = worker.model().bytes().first().copied().unwrap_or(0);
    let detail = format!("idle: {tensors} tensors mapped (first byte {first:#04x})");
    if worker.ready(None, &detail).is_err() {
        return 1;
    }
    wait_for_drain(worker)
}

/// The `probe` entry: imports the weights, reads one byte of every page of them (so every
/// page is mapped into this process), reports ready, then waits like `idle`.
pub fn probe(mut worker: Worker) -> i32 {
    let weights = match worker.import_weights(std::time::Duration::from_secs(60)) {
        Ok(w) => w,
        Err(e) => {
            log::error!("importing the weights: {e}");
            return 1;
        }
    };
    let m = weights.manifest();
    let detail = match &weights {
        Weights::Host(host) => {
            let bytes = host.mapping().as_slice();
            let sum = bytes
                .iter()
                .step_by(4096)
                .fold(0u64, |acc, &b| acc.wrapping_add(b as u64));
            format!(
                "probe: generation {} backend host ipc {} {} bytes read (page checksum {sum})",
                m.generation,
                m.ipc,
                bytes.len()
            )
        }
        Weights::Cuda(cuda) => {
            // The import already read every arena back to check its digest.
            let t = cuda.timings();
            format!(
                "probe: generation {} backend cuda ipc {} read_only {} context_ms {} map_ms {} digest_ms {}",
                m.generation,
                m.ipc,
                cuda.read_only(),
                t.context.as_millis(),
                t.map.as_millis(),
                t.digest.as_millis()
            )
        }
    };
    if worker.ready(Some(m.generation), &detail).is_err() {
        return 1;
    }
    wait_for_drain(worker)
}

/// Heartbeats until drained or orphaned (a spare the same way: neither entry accepts).
fn wait_for_drain(mut worker: Worker) -> i32 {
    loop {
        let mut fds = [PollFd::new(worker.control_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                log::error!("poll: {e}");
                return 1;
            }
        }
        match worker.poll_control() {
            Ok(Some(ParentMessage::Drain { .. })) | Err(WorkerError::Orphaned) => return 0,
            // These entries never accept: a spare and an activated one wait alike.
            Ok(Some(ParentMessage::Activate { worker })) => {
                log::info!("activated as worker {worker}");
            }
            Ok(None) => {}
            Err(e) => {
                log::error!("control channel: {e}");
                return 1;
            }
        }
        if let Err(WorkerError::Orphaned) = worker.heartbeat(0) {
            return 0;
        }
    }
}
