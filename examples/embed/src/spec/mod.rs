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
//!
//! The parts: [`bert`] (the BERT config), `pooling` (the Pooling module's config), [`tensors`]
//! (binding the tensors).

mod bert;
mod pooling;
pub mod tensors;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::EmbedError;

pub use bert::BertConfig;
use bert::MAX_DIM;
pub use pooling::Pooling;
use pooling::PoolingConfig;
pub use tensors::{check_model_file, BertTensors, LayerTensors, PREFIXES};

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
                // Under 2.x-5.x's names (`sentence_transformers.models.Pooling`) and 6.x's
                // (`sentence_transformers.sentence_transformer.modules.pooling.Pooling`).
                let class = m
                    .kind
                    .strip_prefix("sentence_transformers.")
                    .and_then(|rest| rest.rsplit('.').next())
                    .unwrap_or_default();
                match class {
                    "Transformer" if m.path.is_empty() || m.path == "." => {}
                    "Transformer" => {
                        return Err(incompatible(
                            &modules_path,
                            format!(
                                "the Transformer module is in {:?}: this app reads the BERT \
                                 model from the directory itself",
                                m.path
                            ),
                        ))
                    }
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
                let width = pc.dimension().map_err(|r| incompatible(&path, r))?;
                if width != config.hidden_size {
                    return Err(incompatible(
                        &path,
                        format!(
                            "the pooled width {width} does not match the model's hidden_size {}",
                            config.hidden_size
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

#[cfg(test)]
mod tests;
