//! Default locations: the per-user runtime directory and the default model.

use std::path::PathBuf;

/// `$XDG_RUNTIME_DIR/zygote` when that is set, else `/tmp/zygote-UID`.
pub fn default_runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("zygote"),
        _ => PathBuf::from(format!("/tmp/zygote-{}", nix::unistd::getuid().as_raw())),
    }
}

/// The runtime directory from an option, or the default.
pub fn runtime_dir(opt: &Option<PathBuf>) -> PathBuf {
    opt.clone().unwrap_or_else(default_runtime_dir)
}

/// Where the default model lives: `$ZYGOTE_MODEL_DIR`, else
/// `$XDG_DATA_HOME/zygote/models/all-MiniLM-L6-v2` (`~/.local/share/...`).
pub fn default_model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ZYGOTE_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let data = match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share"),
    };
    data.join("zygote/models/all-MiniLM-L6-v2")
}

/// The socket names inside a runtime directory.
pub const SUPERVISOR_SOCKET: &str = "supervisor.sock";
