//! `zygote __zygote`: the zygote process, exec'd by `zygote start` (or by another supervisor).
//!
//! It loads and validates the model, preloads the example app's tokenizer (see
//! [`crate::entries::preload`]), writes `ready PID` on stdout (its supervisor's start
//! signal; stdout then points to /dev/null), and serves the zygote socket until shut down.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;
use zygote_runtime::Model;
use zygote_server::ServerConfig;

use crate::cli::ZygoteArgs;

fn announce_ready(socket: &Path) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {} {}", std::process::id(), socket.display());
    let _ = out.flush();
    drop(out);
    // Nothing else should go to the supervisor's pipe; and a closed pipe must not matter later.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

pub fn main(args: ZygoteArgs) -> anyhow::Result<i32> {
    if args.die_with_parent {
        // The zygote is its supervisor's child and ends with it, like every other process the
        // supervisor started (the workers end when their control channels close); otherwise
        // an orphaned zygote would go on holding the model and its socket. Its own children
        // are not tied to it: the death signal is not inherited across fork.
        let parent = nix::unistd::getppid();
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .context("PR_SET_PDEATHSIG")?;
        if nix::unistd::getppid() != parent {
            anyhow::bail!("the process that started the zygote (pid {parent}) is gone");
        }
    }
    // A fresh session (a terminal's Ctrl-C goes to the supervisor, which drains) and a clean
    // signal mask (the supervisor blocks the signals it reads with signalfd).
    let _ = nix::unistd::setsid();
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .context("resetting the signal mask")?;
    let started = std::time::Instant::now();
    let (model, how) = match args.model_fd {
        Some(fd) => {
            let fd = crate::inherited_fds::take(fd)
                .with_context(|| format!("taking the inherited model memfd (fd {fd})"))?;
            let model = Model::adopt(fd, &args.model).with_context(|| {
                format!("the inherited memfd of the model {}", args.model.display())
            })?;
            (model, "adopted from the supervisor's memfd")
        }
        None => {
            let model = Model::load(&args.model)
                .with_context(|| format!("loading the model {}", args.model.display()))?;
            (model, "loaded")
        }
    };
    log::info!(
        "model {} {how} and validated in {} ms: {} tensors, {} bytes, {}",
        model.path().display(),
        started.elapsed().as_millis(),
        model.tensors().len(),
        model.len(),
        model.digest()
    );
    if let Some(expected) = &args.expect_digest {
        if expected != model.digest() {
            anyhow::bail!(
                "the model {} is not the one the service started with (digest {expected}, now {}); \
                 the running owner and workers serve the old one",
                model.path().display(),
                model.digest()
            );
        }
    }
    crate::entries::preload(&model, &args.command, args.serve_app)?;
    let cfg = ServerConfig {
        on_ready: Some(announce_ready),
        ..ServerConfig::zygote(
            args.runtime_dir.clone(),
            model,
            crate::entries::table(&args.command),
            args.allow_uid.clone(),
            args.backend.to_string(),
        )
    };
    Ok(zygote_server::run(cfg)?)
}
