//! Shared by the integration tests: where the reference model is, and what to do without it.

use std::path::PathBuf;

/// The model directory: `ZYGOTE_TEST_MODEL`, else `models/all-MiniLM-L6-v2` under the repository
/// root (`scripts/fetch-model.sh` puts it there). `None` (with the reason printed) when it is
/// missing outside CI; in CI (`CI=true`) a missing model fails the test.
pub fn model_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("ZYGOTE_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2"),
    };
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "no model at {} (run scripts/fetch-model.sh, or set ZYGOTE_TEST_MODEL)",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}
