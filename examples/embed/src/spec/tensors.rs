//! Binding the tensors a BERT forward pass reads: every name, with or without the `bert.`
//! prefix some checkpoints carry, checked against the config's shape. Generic over what a
//! tensor binds to (a host `&[f32]`, a device pointer), so every backend refuses a wrong model
//! the same way; [`check_model_file`] runs the same binding over the model file's index before
//! any weights are imported.

use super::BertConfig;
use crate::error::EmbedError;

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
