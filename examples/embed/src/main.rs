//! `zygote-embed`: the embeddings app as an exec'd program.
//!
//! `zygote start -- path/to/zygote-embed` execs this in every worker; it attaches to the runtime
//! (fds and environment the zygote set up) and runs the same [`zygote_embed::serve`] as the
//! native entry. Started by hand, it explains that and exits.

#![deny(unsafe_code)]

use zygote_runtime::Worker;

fn main() {
    let worker = match Worker::attach() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("zygote-embed: {e}");
            eprintln!(
                "zygote-embed is a worker program: run it as `zygote start -- {}`",
                program()
            );
            std::process::exit(zygote_embed::EXIT_SETUP);
        }
    };
    zygote_runtime::logging::init(&format!("worker {}", worker.id()));
    std::process::exit(zygote_embed::serve(worker));
}

fn program() -> String {
    std::env::args()
        .next()
        .unwrap_or_else(|| "zygote-embed".into())
}
