//! Reading model directories: both layouts, and the refusals.

use super::*;

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

const MINILM_CONFIG: &str = r#"{"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 384,
    "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
    "num_attention_heads": 12, "num_hidden_layers": 6, "type_vocab_size": 2, "vocab_size": 30522}"#;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("zygote-embed-spec-{tag}-{}", std::process::id()));
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

fn minilm_dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    write(&d.0, "config.json", MINILM_CONFIG);
    write(&d.0, "tokenizer.json", "{}");
    write(
        &d.0,
        "modules.json",
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    );
    write(
        &d.0,
        "1_Pooling/config.json",
        r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true,
            "pooling_mode_max_tokens": false, "pooling_mode_mean_sqrt_len_tokens": false}"#,
    );
    write(
        &d.0,
        "sentence_bert_config.json",
        r#"{"max_seq_length": 256, "do_lower_case": false}"#,
    );
    d
}

#[test]
fn reads_a_minilm_layout() {
    let d = minilm_dir("ok");
    let s = ModelSpec::load(&d.0).unwrap();
    assert_eq!(s.pooling, Pooling::Mean);
    assert!(s.normalize);
    assert_eq!(s.max_seq_length, 256);
    assert_eq!(s.dim(), 384);
    assert_eq!(s.config.head_dim(), 32);
    assert!(!s.lower_case);
}

fn refused(d: &TempDir, needle: &str) {
    let err = ModelSpec::load(&d.0).unwrap_err().to_string();
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
}

#[test]
fn refuses_other_architectures() {
    let d = minilm_dir("arch");
    write(
        &d.0,
        "config.json",
        &MINILM_CONFIG.replace("\"bert\"", "\"mpnet\""),
    );
    refused(&d, "mpnet");
}

#[test]
fn refuses_a_missing_tokenizer() {
    let d = minilm_dir("tok");
    std::fs::remove_file(d.0.join("tokenizer.json")).unwrap();
    refused(&d, "tokenizer.json");
}

#[test]
fn refuses_a_pooling_width_mismatch() {
    let d = minilm_dir("width");
    write(
        &d.0,
        "1_Pooling/config.json",
        r#"{"word_embedding_dimension": 768, "pooling_mode_mean_tokens": true}"#,
    );
    refused(
        &d,
        "pooled width 768 does not match the model's hidden_size 384",
    );
}

#[test]
fn refuses_unknown_modules_and_pooling_mixes() {
    let d = minilm_dir("dense");
    write(
        &d.0,
        "modules.json",
        r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
    );
    refused(&d, "Dense");
    let d = minilm_dir("mix");
    write(
        &d.0,
        "1_Pooling/config.json",
        r#"{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#,
    );
    refused(&d, "more than one pooling mode");
}

#[test]
fn refuses_bad_dimensions_and_activation() {
    let d = minilm_dir("heads");
    write(
        &d.0,
        "config.json",
        &MINILM_CONFIG.replace("\"num_attention_heads\": 12", "\"num_attention_heads\": 7"),
    );
    refused(&d, "not a multiple");
    let d = minilm_dir("act");
    write(
        &d.0,
        "config.json",
        &MINILM_CONFIG.replace("\"gelu\"", "\"relu\""),
    );
    refused(&d, "relu");
    let d = minilm_dir("len");
    write(
        &d.0,
        "sentence_bert_config.json",
        r#"{"max_seq_length": 1024}"#,
    );
    refused(&d, "exceeds max_position_embeddings");
    let d = minilm_dir("json");
    write(&d.0, "config.json", "{not json");
    refused(&d, "invalid JSON");
}

#[test]
fn binding_handles_both_prefixes_and_names_missing_tensors() {
    let cfg: BertConfig = serde_json::from_str(MINILM_CONFIG).unwrap();
    for prefix in PREFIXES {
        let has = |n: &str| n.starts_with(prefix) && (prefix == "bert." || !n.starts_with("bert."));
        let bound = BertTensors::bind(&cfg, has, |name, shape| {
            Ok(has(name).then(|| (name.to_string(), shape.to_vec())))
        })
        .unwrap();
        assert_eq!(
            bound.word.0,
            format!("{prefix}embeddings.word_embeddings.weight")
        );
        assert_eq!(bound.layers[5].inter_w.1, vec![1536, 384]);
        assert_eq!(bound.layers[5].out_w.1, vec![384, 1536]);
    }
    let err = BertTensors::bind(
        &cfg,
        |_| true,
        |name, _| Ok((!name.contains("layer.3.output.dense.bias")).then_some(())),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("encoder.layer.3.output.dense.bias") && err.contains("bert.encoder"),
        "{err}"
    );
}

/// The layout sentence-transformers 6.x saves (as 6.2.0 wrote it for a CLS-pooled model).
fn st6_dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    write(&d.0, "config.json", MINILM_CONFIG);
    write(&d.0, "tokenizer.json", "{}");
    write(
        &d.0,
        "modules.json",
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.base.modules.transformer.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.sentence_transformer.modules.pooling.Pooling"}]"#,
    );
    write(
        &d.0,
        "1_Pooling/config.json",
        r#"{"embedding_dimension": 384, "pooling_mode": "cls", "include_prompt": true}"#,
    );
    write(
        &d.0,
        "sentence_bert_config.json",
        r#"{"transformer_task": "feature-extraction", "module_output_name": "token_embeddings",
            "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}}"#,
    );
    write(
        &d.0,
        "tokenizer_config.json",
        r#"{"do_lower_case": true, "model_max_length": 128, "tokenizer_class": "BertTokenizer"}"#,
    );
    write(
        &d.0,
        "config_sentence_transformers.json",
        r#"{"__version__": {"sentence_transformers": "6.2.0"}, "default_prompt_name": null,
            "model_type": "SentenceTransformer", "prompts": {"document": "", "query": "query: "},
            "similarity_fn_name": "cosine"}"#,
    );
    d
}

#[test]
fn reads_the_sentence_transformers_6_layout() {
    let d = st6_dir("st6");
    let s = ModelSpec::load(&d.0).unwrap();
    assert_eq!(s.pooling, Pooling::Cls);
    assert!(!s.normalize);
    // max_seq_length from tokenizer_config.json's model_max_length.
    assert_eq!(s.max_seq_length, 128);
    // 6.x puts lowercasing into tokenizer.json's normaliser, not into this flag.
    assert!(!s.lower_case);
    assert_eq!(
        s.prompts,
        [
            ("document".to_string(), String::new()),
            ("query".to_string(), "query: ".to_string())
        ]
    );
    assert_eq!(s.default_prompt(), None);
    // With a Normalize module (6.x name) and a default prompt.
    write(
        &d.0,
        "modules.json",
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.base.modules.transformer.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.base.modules.normalize.Normalize"}]"#,
    );
    write(
        &d.0,
        "config_sentence_transformers.json",
        r#"{"default_prompt_name": "query", "prompts": {"query": "query: "}}"#,
    );
    let s = ModelSpec::load(&d.0).unwrap();
    assert!(s.normalize);
    assert_eq!(s.default_prompt(), Some("query: "));
}

#[test]
fn refuses_foreign_modules_and_unknown_default_prompts() {
    let d = st6_dir("foreign");
    write(
        &d.0,
        "modules.json",
        r#"[{"path":"","type":"my_package.Transformer"}]"#,
    );
    refused(&d, "my_package.Transformer");
    let d = st6_dir("subdir");
    write(
        &d.0,
        "modules.json",
        r#"[{"path":"0_Transformer","type":"sentence_transformers.models.Transformer"}]"#,
    );
    refused(&d, "0_Transformer");
    let d = st6_dir("prompt");
    write(
        &d.0,
        "config_sentence_transformers.json",
        r#"{"default_prompt_name": "search", "prompts": {"query": "query: "}}"#,
    );
    refused(&d, "default_prompt_name \"search\"");
}
