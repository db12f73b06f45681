//! Fuzz target: the embeddings request body (examples/embed/src/api.rs).
//!
//! The first byte picks the API flavour (OpenAI's `/v1/embeddings` or the seed's `/embed`) and
//! the default limits or tight ones; the rest is the body. An accepted request must hold at
//! least one text, no more than the limits allow.
//!
//! Calls: `api::parse_embed_request`, `api::ApiLimits`, `api::Flavor`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zygote_embed::api::{parse_embed_request, ApiLimits, Flavor};

/// The width of all-MiniLM-L6-v2's vectors, the reference model's.
const DIM: usize = 384;

// `..ApiLimits::default()` is needless while the struct has these two fields only; it keeps
// the target building when limits are added, with their defaults.
#[allow(clippy::needless_update)]
fn tight() -> ApiLimits {
    ApiLimits {
        max_inputs: 4,
        max_text_chars: 16,
        ..ApiLimits::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let flavor = if pick & 1 == 0 {
        Flavor::OpenAi
    } else {
        Flavor::Seed
    };
    let limits = if pick & 2 == 0 {
        ApiLimits::default()
    } else {
        tight()
    };
    let Ok(req) = parse_embed_request(body, flavor, &limits, DIM) else {
        return;
    };
    assert!(!req.inputs.is_empty() && req.inputs.len() <= limits.max_inputs);
    for text in &req.inputs {
        assert!(text.chars().count() <= limits.max_text_chars);
    }
});
