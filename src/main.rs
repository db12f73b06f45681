//! `zygote`: the command line. `zygote start` runs a supervised service; `zygote spawn`,
//! `status`, `stop`, `reload`, `scale`, `sleep` and `wake` talk to a running one; `zygote __zygote` is the zygote
//! process itself (started by `zygote start`). See README.md.
//!
//! `unsafe` is denied here but in the announced leaves: `activation` (adopting systemd's
//! listeners), `inherited_fds` (closing inherited fds, taking the inherited model memfd) and
//! the supervisor's `gate` (the listeners' filter during a stop); everything
//! else that needs it lives in the leaves of the two library crates.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod activation;
mod cli;
mod commands;
mod entries;
mod fetch;
#[allow(unsafe_code)]
mod inherited_fds;
mod paths;
mod supervisor;
mod zygote_main;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::cli::{Cli, Command, StartArgs};

fn start(
    mut args: StartArgs,
    activated: Result<activation::Activated, activation::ActivationError>,
) -> anyhow::Result<i32> {
    let activated = activated.context("socket activation (LISTEN_FDS)")?;
    let template = args.app.is_some();
    if let Some(command) = args.app_command().context("--app-dir")? {
        args.command = command;
    }
    let model = match args.model {
        Some(m) => m,
        None => {
            let dir = paths::default_model_dir();
            fetch::ensure(&dir)
                .with_context(|| format!("fetching the default model into {}", dir.display()))?;
            dir
        }
    };
    let entry = args.entry.unwrap_or_else(|| {
        if args.command.is_empty() {
            "app".into()
        } else {
            "exec".into()
        }
    });
    if entry == "exec" && args.command.is_empty() {
        anyhow::bail!("--entry exec needs a command after --");
    }
    if args.spares > 0 && args.workers == 0 {
        anyhow::bail!(
            "--spares {} needs workers to stand in for (--workers is 0)",
            args.spares
        );
    }
    let cfg = supervisor::Config {
        runtime_dir: paths::runtime_dir(&args.runtime_dir),
        model,
        workers: args.workers,
        listen: args.listen,
        backend: args.backend,
        ipc: args.ipc,
        host_weights: args.host_weights,
        devices: args.devices,
        entry,
        command: args.command,
        template,
        timeout: Duration::from_secs(args.timeout.max(1)),
        graceful_timeout: Duration::from_secs(args.graceful_timeout),
        allow_uids: args.allow_uid,
        recycle: supervisor::policy::RecycleLimits {
            max_requests: args.max_requests.filter(|n| *n > 0),
            jitter: args.max_requests_jitter,
            max_rss_mib: args.max_rss,
        },
        metrics: args.metrics,
        idle_sleep: args.idle_sleep.map(Duration::from_secs),
        spares: args.spares,
    };
    supervisor::run(cfg, activated.listeners)
}

fn main() {
    let cli = Cli::parse();
    let tag = match &cli.command {
        Command::Start(_) => "supervisor",
        Command::Zygote(_) => "zygote",
        Command::AttachIdle => "worker",
        _ => "zygote-cli",
    };
    // The supervisor and the zygote live as long as the service: they keep nothing they
    // inherited but stdio (before anything here opens an fd), and the supervisor the
    // listeners of a socket activation.
    let activated = match &cli.command {
        Command::Start(_) => activation::take(),
        _ => Ok(activation::Activated::default()),
    };
    let keep = activated.as_ref().map_or(0, |a| a.count() as u32);
    let inherited = match &cli.command {
        Command::Start(_) => Some(inherited_fds::close(keep, None)),
        Command::Zygote(z) => Some(inherited_fds::close(keep, z.model_fd)),
        _ => None,
    };
    zygote_runtime::logging::init(tag);
    if let Some(Err(e)) = inherited {
        log::warn!("closing the fds inherited from the parent: {e}");
    }
    let result = match cli.command {
        Command::Start(a) => start(a, activated),
        Command::Spawn(a) => commands::spawn(a),
        Command::Status(a) => commands::status(a),
        Command::Stop(a) => commands::stop(&paths::runtime_dir(&a.runtime_dir)),
        Command::Reload(a) => commands::reload(&paths::runtime_dir(&a.runtime_dir), a.model),
        Command::Sleep(a) => commands::sleep(&paths::runtime_dir(&a.runtime_dir)),
        Command::Wake(a) => commands::wake(&paths::runtime_dir(&a.runtime_dir)),
        Command::Scale(a) => commands::scale(&paths::runtime_dir(&a.runtime_dir), a.workers),
        Command::FetchModel(a) => {
            fetch::ensure(&a.dest.unwrap_or_else(paths::default_model_dir)).map(|()| 0)
        }
        Command::Zygote(a) => zygote_main::main(a),
        Command::AttachIdle => zygote_runtime::Worker::attach()
            .context("attaching to the zygote runtime")
            .map(|w| {
                zygote_runtime::logging::set_tag(&format!("worker {}", w.id()));
                entries::idle(w)
            }),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("zygote: {e:#}");
            std::process::exit(1);
        }
    }
}
