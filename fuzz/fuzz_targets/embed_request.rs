//! Fuzz target: the embeddings request body (examples/embed/src/api.rs).
//!
//! The first byte picks the API flavour (OpenAI's `/v1/embeddings` or the seed's `/embed`) and
//! the default limits or tight ones; the rest is the body, served as all-MiniLM-L6-v2 with one
//! prompt. An accepted request must hold at least one input, no more than the limits allow:
//! texts within the length limit, token ids within the vocabulary and `max_seq_length`.
//!
//! Calls: `api::parse_embed_request`, `api::ApiLimits`, `api::Flavor`, `api::Served`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zygote_embed::api::{parse_embed_request, ApiLimits, Flavor, Input, Served};

/// The reference model, all-MiniLM-L6-v2: its name, vector width, vocabulary and
/// `max_seq_length`.
const MODEL: &str = "all-MiniLM-L6-v2";
const DIM: usize = 384;
const VOCAB: usize = 30522;
const MAX_TOKENS: usize = 256;

/// Few, short texts; the other limits as the app has them.
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
    let prompts = [("query".to_string(), "query: ".to_string())];
    let served = Served {
        model: MODEL,
        dim: DIM,
        vocab_size: VOCAB,
        max_tokens: MAX_TOKENS,
        prompts: &prompts,
        default_prompt: None,
    };
    let Ok(req) = parse_embed_request(body, flavor, &limits, &served) else {
        return;
    };
    assert!(!req.inputs.is_empty() && req.inputs.len() <= limits.max_inputs);
    for input in &req.inputs {
        match input {
            Input::Text(text) => assert!(text.chars().count() <= limits.max_text_chars),
            Input::Tokens(ids) => {
                assert!(!ids.is_empty() && ids.len() <= MAX_TOKENS);
                assert!(ids.iter().all(|&id| (id as usize) < VOCAB));
            }
        }
    }
});
