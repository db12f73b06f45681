//! The Pooling module's config (`1_Pooling/config.json`) in both of sentence-transformers'
//! layouts:
//!
//! | | 2.x-5.x | 6.x |
//! |---|---|---|
//! | width | `word_embedding_dimension` | `embedding_dimension` |
//! | mode | one `pooling_mode_*_token(s)` flag set | `"pooling_mode": "cls"` (or a list) |
//! | prompt | (always pooled) | `include_prompt` |
//!
//! As sentence-transformers reads them: `pooling_mode` wins over the flags, and no mode at all
//! (no key, or no flag set) means mean pooling.

use serde::Deserialize;

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

/// `pooling_mode`: one name, or a list (concatenated pooling).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ModeField {
    One(String),
    Many(Vec<String>),
}

/// `1_Pooling/config.json`, either layout.
#[derive(Debug, Deserialize)]
pub(super) struct PoolingConfig {
    #[serde(default)]
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode: Option<ModeField>,
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
    #[serde(default = "yes")]
    include_prompt: bool,
}

fn yes() -> bool {
    true
}

impl PoolingConfig {
    /// The width of the token vectors it pools, under either name.
    pub(super) fn dimension(&self) -> Result<usize, String> {
        match (self.embedding_dimension, self.word_embedding_dimension) {
            (Some(a), Some(b)) if a != b => Err(format!(
                "embedding_dimension {a} and word_embedding_dimension {b} disagree"
            )),
            (Some(d), _) | (None, Some(d)) => Ok(d),
            (None, None) => {
                Err("neither embedding_dimension nor word_embedding_dimension is set".into())
            }
        }
    }

    /// The one pooling mode, or why it cannot be served.
    pub(super) fn mode(&self) -> Result<Pooling, String> {
        if !self.include_prompt {
            return Err(
                "include_prompt false (pooling without the prompt's tokens) is not supported"
                    .into(),
            );
        }
        let names: Vec<String> = match &self.pooling_mode {
            Some(ModeField::One(m)) => vec![m.clone()],
            Some(ModeField::Many(ms)) => ms.clone(),
            None => [
                (self.pooling_mode_cls_token, "cls"),
                (self.pooling_mode_max_tokens, "max"),
                (self.pooling_mode_mean_tokens, "mean"),
                (
                    self.pooling_mode_mean_sqrt_len_tokens,
                    "mean_sqrt_len_tokens",
                ),
                (self.pooling_mode_weightedmean_tokens, "weightedmean"),
                (self.pooling_mode_lasttoken, "lasttoken"),
            ]
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_string())
            .collect(),
        };
        match names.as_slice() {
            [] => Ok(Pooling::Mean),
            [one] => match one.as_str() {
                "mean" => Ok(Pooling::Mean),
                "cls" => Ok(Pooling::Cls),
                "max" => Ok(Pooling::Max),
                "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
                "weightedmean" | "lasttoken" => Err(format!(
                    "pooling mode {one:?} is not supported (only mean, cls, max and \
                     mean_sqrt_len_tokens)"
                )),
                other => Err(format!("unknown pooling mode {other:?}")),
            },
            // sentence-transformers would concatenate the modes into a wider vector.
            many => Err(format!(
                "more than one pooling mode is set ({many:?}; concatenated pooling is not \
                 supported)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> PoolingConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn reads_both_layouts() {
        let old = read(
            r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false}"#,
        );
        assert_eq!((old.dimension(), old.mode()), (Ok(384), Ok(Pooling::Mean)));
        let new =
            read(r#"{"embedding_dimension": 256, "pooling_mode": "cls", "include_prompt": true}"#);
        assert_eq!((new.dimension(), new.mode()), (Ok(256), Ok(Pooling::Cls)));
        for (json, want) in [
            (
                r#"{"embedding_dimension": 8, "pooling_mode": ["max"]}"#,
                Pooling::Max,
            ),
            (
                r#"{"embedding_dimension": 8, "pooling_mode": "mean_sqrt_len_tokens"}"#,
                Pooling::MeanSqrtLen,
            ),
            (r#"{"embedding_dimension": 8}"#, Pooling::Mean),
            (
                r#"{"word_embedding_dimension": 8, "pooling_mode_mean_tokens": false}"#,
                Pooling::Mean,
            ),
            // pooling_mode wins over the flags, as sentence-transformers reads it.
            (
                r#"{"embedding_dimension": 8, "pooling_mode": "max", "pooling_mode_mean_tokens": true}"#,
                Pooling::Max,
            ),
        ] {
            assert_eq!(read(json).mode(), Ok(want), "{json}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        for (json, needle) in [
            (
                r#"{"embedding_dimension": 8, "pooling_mode": "lasttoken"}"#,
                "lasttoken",
            ),
            (
                r#"{"embedding_dimension": 8, "pooling_mode": ["mean", "max"]}"#,
                "more than one",
            ),
            (
                r#"{"word_embedding_dimension": 8, "pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#,
                "more than one",
            ),
            (
                r#"{"embedding_dimension": 8, "pooling_mode": "median"}"#,
                "unknown",
            ),
            (
                r#"{"embedding_dimension": 8, "include_prompt": false}"#,
                "include_prompt",
            ),
        ] {
            let err = read(json).mode().unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
        assert!(read("{}").dimension().is_err());
        assert!(
            read(r#"{"embedding_dimension": 8, "word_embedding_dimension": 9}"#)
                .dimension()
                .is_err()
        );
    }
}
