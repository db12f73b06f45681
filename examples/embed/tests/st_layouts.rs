//! Model directories of other shapes, saved by the pinned sentence-transformers, in both of its
//! layouts (6.x as it saves them, 2.x-5.x rewritten from them): every vector the app computes
//! must have cosine similarity ≥ 0.9999 to sentence-transformers' own, without and with a prompt.
//!
//! The models are made by the test itself (`tests/st_models/make.py`: small randomly
//! initialised BERTs of other widths, depths, head counts and pooling modes, with the reference
//! model's tokenizer). That needs the Python of the baseline's virtual environment, with torch
//! and sentence-transformers (`scripts/baseline/setup.sh` makes `.venv-baseline` at the
//! repository root); `ZYGOTE_TEST_PYTHON` names another interpreter. Without either the test is
//! skipped with a printed reason, except under CI, where it fails.

#![deny(unsafe_code)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use zygote_embed::http::{Reply, Request, Service};
use zygote_embed::{build_app, import_host_weights, ModelSpec};

/// The Python with sentence-transformers: `ZYGOTE_TEST_PYTHON`, else `.venv-baseline/bin/python`
/// at the repository root. `None` (with the reason printed) when neither exists, outside CI.
fn python() -> Option<PathBuf> {
    let path = match std::env::var_os("ZYGOTE_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-baseline/bin/python"),
    };
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "no Python with sentence-transformers at {} (run scripts/baseline/setup.sh, or set \
         ZYGOTE_TEST_PYTHON)",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("zygote-embed-st-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Embeds `sentences` through the app's API (`/embed`, with `prompt_name` when given).
fn embed_via_api(
    service: &mut dyn Service,
    sentences: &[String],
    prompt: Option<&str>,
) -> Vec<Vec<f32>> {
    let mut body = json!({ "input": sentences });
    if let Some(p) = prompt {
        body["prompt_name"] = json!(p);
    }
    let body = body.to_string();
    let req = Request {
        id: 1,
        method: "POST",
        path: "/embed",
        body: body.as_bytes(),
    };
    match service.submit(&[req], false).as_slice() {
        [Reply::Queued] => {}
        other => panic!("not queued: {other:?}"),
    }
    let mut answers = Vec::new();
    while service.has_work() {
        answers.extend(service.step());
    }
    let [(1, resp)] = answers.as_slice() else {
        panic!("{} answers", answers.len());
    };
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect()
}

fn check(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let sentences: Vec<String> = serde_json::from_value(expected["sentences"].clone()).unwrap();
    let spec = ModelSpec::load(dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        spec.max_seq_length as u64,
        expected["max_seq_length"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        spec.normalize,
        expected["normalize"].as_bool().unwrap(),
        "{name}"
    );
    let (_model, weights) = import_host_weights(&dir.join("model.safetensors")).unwrap();
    let mut app = build_app(&spec, &weights).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (prompt, key) in [(None, "embeddings"), (Some("query"), "query_embeddings")] {
        let want = vectors(&expected[key]);
        let got = embed_via_api(&mut app, &sentences, prompt);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "{name} sentence {i}: width");
            let c = cosine(g, w);
            assert!(c >= 0.9999, "{name} {key} sentence {i}: cosine {c}");
        }
        // The check can tell texts apart: two different sentences are not the same vector.
        assert!(
            cosine(&want[0], &want[1]) < 0.999,
            "{name}: degenerate vectors"
        );
    }
    // The prompt changes the vectors (so it was applied, not ignored).
    let plain = vectors(&expected["embeddings"]);
    let query = vectors(&expected["query_embeddings"]);
    assert!(
        cosine(&plain[0], &query[0]) < 0.9999,
        "{name}: the prompt changes nothing"
    );
}

#[test]
fn models_of_other_shapes_saved_by_sentence_transformers_match_it() {
    let Some(python) = python() else {
        return;
    };
    let Some(reference) = common::model_dir() else {
        return;
    };
    let out = TempDir::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/st_models/make.py");
    let status = Command::new(&python)
        .arg(&script)
        .arg(&out.0)
        .arg(&reference)
        .env("PYTHONWARNINGS", "ignore")
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .expect("running the model builder");
    assert!(status.success(), "{} failed: {status}", script.display());
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&out.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    for dir in &dirs {
        check(dir);
    }
}
