//! The answer to an embeddings request: OpenAI's list shape, with the vectors as JSON numbers
//! or as base64 of their little-endian f32 bytes.

use base64::Engine as _;
use serde::Serialize;

use super::request::EncodingFormat;
use crate::http::Response;

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem<'a>>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct EmbeddingItem<'a> {
    object: &'static str,
    index: usize,
    embedding: EmbeddingRepr<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingRepr<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// Base64 of the little-endian bytes of `v` (what OpenAI's `encoding_format=base64` returns).
pub fn base64_f32(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The 200 answer: `vectors` holds one vector of `dim` floats per input, in order; `tokens`
/// is the word pieces the model read.
pub fn embeddings(
    vectors: &[f32],
    dim: usize,
    format: EncodingFormat,
    model: &str,
    tokens: usize,
) -> Response {
    let data = vectors
        .chunks_exact(dim.max(1))
        .enumerate()
        .map(|(index, v)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => EmbeddingRepr::Float(v),
                EncodingFormat::Base64 => EmbeddingRepr::Base64(base64_f32(v)),
            },
        })
        .collect();
    let list = EmbeddingList {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    match serde_json::to_vec(&list) {
        Ok(body) => Response::json(200, body),
        Err(e) => Response::error(
            500,
            "serialization_failed",
            &format!("cannot write the answer: {e}"),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000 -> bytes 00 00 80 3f.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn the_list_has_one_item_per_vector() {
        let r = embeddings(&[1.0, 0.0, 0.0, 1.0], 2, EncodingFormat::Float, "m", 7);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][1]["embedding"][1], 1.0);
        assert_eq!(v["usage"]["prompt_tokens"], 7);
        assert_eq!(v["model"], "m");
    }
}
