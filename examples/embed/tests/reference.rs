//! The host forward pass against sentence-transformers: every sentence of the committed
//! fixture (`tests/fixtures/minilm_reference.json`, made by `scripts/baseline/make-fixture.py`)
//! must come out with cosine similarity ≥ 0.9999 to the reference vector, alone and batched,
//! and with the reference's word-piece count.
//!
//! The weights go through the production path: the model file is loaded and sealed as the
//! zygote does, exported by the host backend as the owner does, and imported (manifest and
//! digest checked) as a worker does; in the default f32 form, in the f16 one
//! (`--host-weights f16`: matrices in f16, sums in f32) and in the bf16 one (`--host-weights
//! bf16`: matrices in bf16, multiplied on the AMX tile unit with the activations rounded to
//! bf16 where the processor has one, widened to f32 on the vector kernels elsewhere).

#![deny(unsafe_code)]

mod common;

use serde::Deserialize;
use zygote_embed::{build_app, import_host_weights_as, spec, ModelSpec};
use zygote_runtime::backend::{HostWeightsForm, Weights};
use zygote_runtime::model::Dtype;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
    num_tokens: Vec<usize>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm_reference.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

const MIN_COSINE: f64 = 0.9999;

#[test]
fn host_forward_pass_matches_sentence_transformers() {
    forward_pass_matches(HostWeightsForm::F32);
}

#[test]
fn host_forward_pass_with_f16_weights_matches_sentence_transformers() {
    forward_pass_matches(HostWeightsForm::F16);
}

#[test]
fn host_forward_pass_with_bf16_weights_matches_sentence_transformers() {
    forward_pass_matches(HostWeightsForm::Bf16);
}

fn forward_pass_matches(form: HostWeightsForm) {
    let Some(dir) = common::model_dir() else {
        return;
    };
    let fx = fixture();
    assert_eq!(fx.model, "all-MiniLM-L6-v2");
    assert!(
        fx.sentences.len() >= 50,
        "the fixture has only {} sentences",
        fx.sentences.len()
    );
    assert_eq!(fx.sentences.len(), fx.embeddings.len());

    let spec = ModelSpec::load(&dir).expect("model directory");
    let (model, weights) =
        import_host_weights_as(&dir.join("model.safetensors"), form).expect("host weights");
    // The form asked for is the form computed from: every matrix f16 in the f16 form, none in
    // the f32 one; vectors f32 in both.
    let Weights::Host(host) = &weights else {
        panic!("host weights expected");
    };
    for t in &host.manifest().tensors {
        let file = model.tensor(&t.name).expect("a tensor of the file").dtype;
        let want = match (file, form, t.shape.len()) {
            (Dtype::F32 | Dtype::F16 | Dtype::BF16, HostWeightsForm::F16, 2) => Dtype::F16,
            (Dtype::F32 | Dtype::F16 | Dtype::BF16, HostWeightsForm::Bf16, 2) => Dtype::BF16,
            (Dtype::F32 | Dtype::F16 | Dtype::BF16, _, _) => Dtype::F32,
            (other, _, _) => other,
        };
        assert_eq!(t.dtype, want, "{form} form: {}", t.name);
    }
    spec::check_model_file(&spec.config, &model).expect("tensor index");
    let mut app = build_app(&spec, &weights).expect("app");
    assert_eq!(app.dim(), 384);

    // One text per batch, as the reference was made.
    let mut worst = (f64::INFINITY, 0);
    for (i, (s, want)) in fx.sentences.iter().zip(&fx.embeddings).enumerate() {
        let (got, tokens) = app.embed(&[s]).expect("embed");
        assert_eq!(
            tokens, fx.num_tokens[i],
            "word pieces of sentence {i} {s:?}"
        );
        let c = cosine(got, want);
        assert!(c >= MIN_COSINE, "sentence {i} {s:?}: cosine {c}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-5,
            "sentence {i} is not normalised: {norm}"
        );
        if c < worst.0 {
            worst = (c, i);
        }
    }
    eprintln!(
        "{form} weights (AMX: {}), alone: worst cosine {:.9} (sentence {})",
        zygote_embed::encoder::gemm::amx_available(),
        worst.0,
        worst.1
    );

    // All of them in one request: batching (packed, in chunks) must not change a vector.
    let (got, tokens) = app.embed(&fx.sentences).expect("embed batch");
    assert_eq!(tokens, fx.num_tokens.iter().sum::<usize>());
    let mut worst = f64::INFINITY;
    for (i, (v, want)) in got.chunks_exact(384).zip(&fx.embeddings).enumerate() {
        let c = cosine(v, want);
        assert!(
            c >= MIN_COSINE,
            "batched sentence {i} {:?}: cosine {c}",
            fx.sentences[i]
        );
        worst = worst.min(c);
    }
    eprintln!("{form} weights, batched: worst cosine {worst:.9}");
}
