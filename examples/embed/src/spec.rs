//! The model directory: what a sentence-transformers BERT model is made of, read and checked
//! before a worker imports any weights.
//!
//! A worker knows only the model file the zygote loaded (`<dir>/model.safetensors`). Everything
//! else comes from the files beside it, as sentence-transformers lays them out:
//!
//! | file | what this app takes from it |
//! |---|---|
//! | `config.json` | the BERT shape (hidden size, layers, heads, ...), refused if not BERT |
//! | `tokenizer.json` | the tokenizer ([`crate::tokenize`]) |
//! | `modules.json` | the pipeline: Transformer, Pooling, optional Normalize; anything else is refused |
//! | `1_Pooling/config.json` | the pooling mode (mean, CLS, max, mean/√len) |
//! | `sentence_bert_config.json` | `max_seq_length` (truncation) and `do_lower_case` |
//! | `config_sentence_transformers.json` | the prompts and the default prompt's name |
//!
//! [`BertTensors::bind`] then finds every tensor the forward pass reads, with or without the
//! `bert.` prefix some checkpoints carry, and checks its shape against the config. It is generic
//! over what a tensor binds to (a host `&[f32]`, or a device pointer for a CUDA encoder), so every
//! backend's encoder refuses a wrong model the same way.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::EmbedError;

/// Largest dimension accepted from a config (keeps products of dimensions far from overflow).
const MAX_DIM: usize = 1 << 20;

/// The parts of a Hugging Face BERT `config.json` the forward pass needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Refuses every config this app's forward pass would compute wrongly.
    fn check(&self) -> Result<(), String> {
        let is_bert = match &self.model_type {
            Some(t) => t == "bert",
            None => self.architectures.iter().any(|a| a.starts_with("Bert")),
        };
        if !is_bert {
            return Err(format!(
                "model_type {:?} (architectures {:?}) is not supported: this app computes BERT encoders \
                 (model_type \"bert\")",
                self.model_type.as_deref().unwrap_or("none"),
                self.architectures
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only \"gelu\", the erf form)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        for (what, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 || v > MAX_DIM {
                return Err(format!("{what} = {v} is out of range (1..={MAX_DIM})"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be a positive number",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

/// How token vectors become one sentence vector (sentence-transformers' Pooling module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the tokens (the attention mask).
    Mean,
    /// The first token's vector.
    Cls,
    /// Element-wise maximum over the tokens.
    Max,
    /// Sum over the tokens divided by √(number of tokens).
    MeanSqrtLen,
}

#[derive(Debug, Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl PoolingConfig {
    fn mode(&self) -> Result<Pooling, String> {
        if self.pooling_mode_weightedmean_tokens || self.pooling_mode_lasttoken {
            return Err("weighted-mean and last-token pooling are not supported".into());
        }
        let modes = [
            (self.pooling_mode_mean_tokens, Pooling::Mean),
            (self.pooling_mode_cls_token, Pooling::Cls),
            (self.pooling_mode_max_tokens, Pooling::Max),
            (self.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
        ];
        let mut on = modes.iter().filter(|(set, _)| *set).map(|(_, m)| *m);
        match (on.next(), on.next()) {
            (Some(m), None) => Ok(m),
            (None, _) => Err("no pooling mode is set".into()),
            // sentence-transformers would concatenate the modes into a wider vector.
            (Some(_), Some(_)) => Err(
                "more than one pooling mode is set (concatenated pooling is not supported)".into(),
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Default, Deserialize)]
struct SbertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// `config_sentence_transformers.json`: the prompts.
#[derive(Debug, Default, Deserialize)]
struct StConfig {
    #[serde(default)]
    prompts: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    model_max_length: Option<f64>,
}

/// Everything about a model directory except the weights and the tokenizer's contents.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The directory.
    pub dir: PathBuf,
    /// The name answers carry (`model`): the directory's name.
    pub name: String,
    pub config: BertConfig,
    pub pooling: Pooling,
    /// Whether sentence vectors are L2-normalised (a Normalize module in modules.json).
    pub normalize: bool,
    /// Word pieces per text, special tokens included; longer texts are truncated.
    pub max_seq_length: usize,
    /// Lowercase texts before tokenising (sentence-transformers' `do_lower_case`).
    pub lower_case: bool,
    /// `tokenizer.json`.
    pub tokenizer_path: PathBuf,
    /// The prompts of `config_sentence_transformers.json`, by name, in the file's order.
    pub prompts: Vec<(String, String)>,
    /// The prompt applied when a request names none (`default_prompt_name`).
    pub default_prompt_name: Option<String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EmbedError> {
    let bytes = std::fs::read(path).map_err(|source| EmbedError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| EmbedError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json_opt<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, EmbedError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl ModelSpec {
    /// Reads and checks the model directory `dir` (the one holding `model.safetensors`).
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let incompatible = |path: &Path, reason: String| EmbedError::Incompatible {
            path: path.to_path_buf(),
            reason,
        };

        let config_path = dir.join("config.json");
        let config: BertConfig = read_json(&config_path)?;
        config.check().map_err(|r| incompatible(&config_path, r))?;

        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(incompatible(
                &tokenizer_path,
                "missing: the app needs the fast tokenizer file (tokenizer.json) beside the model"
                    .into(),
            ));
        }

        // modules.json decides the pipeline. Without it sentence-transformers builds
        // Transformer + mean pooling with no normalisation; so does this app.
        let modules_path = dir.join("modules.json");
        let mut pooling_dir = None;
        let mut normalize = false;
        if let Some(modules) = read_json_opt::<Vec<ModuleEntry>>(&modules_path)? {
            for m in &modules {
                match m.kind.rsplit('.').next().unwrap_or_default() {
                    "Transformer" => {}
                    "Pooling" => pooling_dir = Some(dir.join(&m.path)),
                    "Normalize" => normalize = true,
                    _ => {
                        return Err(incompatible(
                            &modules_path,
                            format!(
                                "module {:?} is not supported (only Transformer, Pooling and Normalize)",
                                m.kind
                            ),
                        ))
                    }
                }
            }
        }
        let pooling = match pooling_dir {
            Some(p) => {
                let path = p.join("config.json");
                let pc: PoolingConfig = read_json(&path)?;
                if pc.word_embedding_dimension != config.hidden_size {
                    return Err(incompatible(
                        &path,
                        format!(
                            "word_embedding_dimension {} does not match the model's hidden_size {}",
                            pc.word_embedding_dimension, config.hidden_size
                        ),
                    ));
                }
                pc.mode().map_err(|r| incompatible(&path, r))?
            }
            None => Pooling::Mean,
        };

        let sbert: SbertConfig =
            read_json_opt(&dir.join("sentence_bert_config.json"))?.unwrap_or_default();
        let tok_cfg: TokenizerConfig =
            read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        // sentence-transformers: max_seq_length from its own config, else the smaller of the
        // model's positions and the tokenizer's model_max_length.
        let from_tokenizer = tok_cfg
            .model_max_length
            .filter(|v| v.is_finite() && *v >= 1.0 && *v <= MAX_DIM as f64)
            .map(|v| v as usize);
        let wanted = sbert.max_seq_length.unwrap_or_else(|| {
            from_tokenizer
                .unwrap_or(usize::MAX)
                .min(config.max_position_embeddings)
        });
        if wanted < 2 {
            return Err(incompatible(
                dir,
                format!("max_seq_length {wanted} leaves no room for text"),
            ));
        }
        if wanted > config.max_position_embeddings {
            return Err(incompatible(
                dir,
                format!(
                    "max_seq_length {wanted} exceeds max_position_embeddings {}",
                    config.max_position_embeddings
                ),
            ));
        }

        let st_path = dir.join("config_sentence_transformers.json");
        let st: StConfig = read_json_opt(&st_path)?.unwrap_or_default();
        if let Some(d) = &st.default_prompt_name {
            if !st.prompts.contains_key(d) {
                return Err(incompatible(
                    &st_path,
                    format!("default_prompt_name {d:?} is not one of the prompts"),
                ));
            }
        }

        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            dir: dir.to_path_buf(),
            name,
            config,
            pooling,
            normalize,
            max_seq_length: wanted,
            lower_case: sbert.do_lower_case,
            tokenizer_path,
            prompts: st.prompts.into_iter().collect(),
            default_prompt_name: st.default_prompt_name,
        })
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// The text of the default prompt, if the model names one.
    pub fn default_prompt(&self) -> Option<&str> {
        let name = self.default_prompt_name.as_deref()?;
        self.prompts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

/// The tensors of one encoder layer, bound to `T`.
#[derive(Debug, Clone)]
pub struct LayerTensors<T> {
    pub query_w: T,
    pub query_b: T,
    pub key_w: T,
    pub key_b: T,
    pub value_w: T,
    pub value_b: T,
    pub attn_out_w: T,
    pub attn_out_b: T,
    pub attn_ln_w: T,
    pub attn_ln_b: T,
    pub inter_w: T,
    pub inter_b: T,
    pub out_w: T,
    pub out_b: T,
    pub out_ln_w: T,
    pub out_ln_b: T,
}

/// Every tensor a BERT encoder's forward pass reads, bound to `T` (a host slice, a device
/// pointer, ...). Linear weights are `[out, in]`, row-major, as torch stores them.
#[derive(Debug, Clone)]
pub struct BertTensors<T> {
    pub word: T,
    pub position: T,
    pub token_type: T,
    pub emb_ln_w: T,
    pub emb_ln_b: T,
    pub layers: Vec<LayerTensors<T>>,
}

/// The prefixes under which checkpoints store the encoder (`BertModel` vs `BertFor*`).
pub const PREFIXES: [&str; 2] = ["", "bert."];

impl<T> BertTensors<T> {
    /// Binds every tensor: `get(full_name, expected_shape)` returns the bound tensor, `None` when
    /// the name is absent, or an error (wrong shape, dtype, ...). `has(full_name)` tells whether
    /// a name exists, to pick the prefix. The first missing tensor is reported with every name
    /// tried.
    pub fn bind(
        cfg: &BertConfig,
        has: impl Fn(&str) -> bool,
        mut get: impl FnMut(&str, &[u64]) -> Result<Option<T>, EmbedError>,
    ) -> Result<Self, EmbedError> {
        let probe = "embeddings.word_embeddings.weight";
        let prefix = PREFIXES
            .iter()
            .copied()
            .find(|p| has(&format!("{p}{probe}")))
            .unwrap_or("");
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let mut one = |name: &str, shape: &[u64]| -> Result<T, EmbedError> {
            let full = format!("{prefix}{name}");
            get(&full, shape)?.ok_or_else(|| EmbedError::MissingTensor {
                name: name.to_string(),
                tried: PREFIXES
                    .iter()
                    .map(|p| format!("{p}{name}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        };
        let word = one(probe, &[cfg.vocab_size as u64, h])?;
        let position = one(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings as u64, h],
        )?;
        let token_type = one(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size as u64, h],
        )?;
        let emb_ln_w = one("embeddings.LayerNorm.weight", &[h])?;
        let emb_ln_b = one("embeddings.LayerNorm.bias", &[h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let mut t = |suffix: &str, shape: &[u64]| one(&format!("{p}{suffix}"), shape);
            layers.push(LayerTensors {
                query_w: t("attention.self.query.weight", &[h, h])?,
                query_b: t("attention.self.query.bias", &[h])?,
                key_w: t("attention.self.key.weight", &[h, h])?,
                key_b: t("attention.self.key.bias", &[h])?,
                value_w: t("attention.self.value.weight", &[h, h])?,
                value_b: t("attention.self.value.bias", &[h])?,
                attn_out_w: t("attention.output.dense.weight", &[h, h])?,
                attn_out_b: t("attention.output.dense.bias", &[h])?,
                attn_ln_w: t("attention.output.LayerNorm.weight", &[h])?,
                attn_ln_b: t("attention.output.LayerNorm.bias", &[h])?,
                inter_w: t("intermediate.dense.weight", &[i, h])?,
                inter_b: t("intermediate.dense.bias", &[i])?,
                out_w: t("output.dense.weight", &[h, i])?,
                out_b: t("output.dense.bias", &[h])?,
                out_ln_w: t("output.LayerNorm.weight", &[h])?,
                out_ln_b: t("output.LayerNorm.bias", &[h])?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            emb_ln_w,
            emb_ln_b,
            layers,
        })
    }
}

/// Checks the model file's tensor index against the config before any weights are imported,
/// so a wrong model is refused at once with the tensor named. Floating-point tensors of any
/// width are accepted: the host backend widens f16/bf16 to f32.
pub fn check_model_file(cfg: &BertConfig, model: &zygote_runtime::Model) -> Result<(), EmbedError> {
    use zygote_runtime::model::Dtype;
    BertTensors::bind(
        cfg,
        |n| model.tensor(n).is_some(),
        |name, shape| {
            let Some(t) = model.tensor(name) else {
                return Ok(None);
            };
            let actual: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            if actual != shape {
                return Err(EmbedError::TensorShape {
                    name: name.into(),
                    expected: shape.to_vec(),
                    actual,
                });
            }
            if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(EmbedError::TensorDtype {
                    name: name.into(),
                    dtype: t.dtype.as_str().into(),
                });
            }
            Ok(Some(()))
        },
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
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
            let p = std::env::temp_dir()
                .join(format!("zygote-embed-spec-{tag}-{}", std::process::id()));
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
        refused(&d, "hidden_size 384");
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
            let has =
                |n: &str| n.starts_with(prefix) && (prefix == "bert." || !n.starts_with("bert."));
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
}
