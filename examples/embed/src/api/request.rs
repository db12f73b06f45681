//! The body of an embeddings request, read and validated: pure, bytes in, an [`EmbedRequest`]
//! or an [`ApiError`] naming what was wrong out. This is the entry point the fuzzer drives with
//! arbitrary bodies ([`parse_embed_request`]); it never panics.
//!
//! What is taken, as OpenAI and text-embeddings-inference take it: `input` as a string, an
//! array of strings, an array of token ids, or an array of arrays of token ids; `model`, which
//! must name the model served; `encoding_format`, `dimensions` and `user` (OpenAI's); and
//! `prompt_name` (text-embeddings-inference's), one of the model's prompts. Empty or
//! whitespace-only texts are refused, as OpenAI refuses them.

use serde_json::{Map, Value};

use crate::http::Response;

/// Limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Texts per request.
    pub max_inputs: usize,
    /// Characters (Unicode scalar values) per text. Texts are truncated to the model's word
    /// pieces anyway; this bounds the tokenizer's work.
    pub max_text_chars: usize,
    /// Word pieces per request, after tokenisation and truncation (413 beyond): the bound on
    /// what one request may cost to compute.
    pub max_request_tokens: usize,
    /// Word pieces per forward pass: a request beyond it is computed in several passes, with
    /// the worker's loop (heartbeats, other requests) running between them.
    pub max_batch_tokens: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_inputs: 256,
            max_text_chars: 32 * 1024,
            max_request_tokens: 16 * 1024,
            max_batch_tokens: 512,
        }
    }
}

/// What the request is checked against: the model served.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// The model's name (`model` must be it, or `ORG/` followed by it).
    pub model: &'a str,
    /// Vector width (`dimensions` must be it).
    pub dim: usize,
    /// Token ids must be below it.
    pub vocab_size: usize,
    /// Token-id inputs may be at most this long (the model's `max_seq_length`).
    pub max_tokens: usize,
    /// The model's prompts, by name (`prompt_name`).
    pub prompts: &'a [(String, String)],
    /// The prompt applied when a request names none.
    pub default_prompt: Option<&'a str>,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn bad(
        code: &'static str,
        param: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status: 400,
            code,
            message: message.into(),
            param,
        }
    }

    pub fn to_response(&self) -> Response {
        Response::error(self.status, self.code, &self.message, self.param)
    }
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// JSON numbers.
    Float,
    /// Base64 of the little-endian f32 bytes, as OpenAI does.
    Base64,
}

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/v1/embeddings`: OpenAI's fields; unknown fields are refused, as OpenAI does.
    OpenAi,
    /// `/embed`: only `input` and `prompt_name` are read, other fields are ignored, as the
    /// Python service did.
    Seed,
}

/// One input: a text, or word-piece ids to take as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Text(String),
    /// Used verbatim (no special tokens added, token types 0), as text-embeddings-inference
    /// does; each id below the vocabulary's size, 1 to `max_seq_length` of them.
    Tokens(Vec<u32>),
}

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedRequest {
    pub inputs: Vec<Input>,
    pub format: EncodingFormat,
    /// The prompt put before every text (not before token ids), if any.
    pub prompt: Option<String>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses and validates a request body against the model `served`.
pub fn parse_embed_request(
    body: &[u8],
    flavor: Flavor,
    limits: &ApiLimits,
    served: &Served<'_>,
) -> Result<EmbedRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "invalid_json",
            None,
            "the request body is empty: send a JSON object with \"input\"",
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            "invalid_json",
            None,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::bad(
            "invalid_request",
            None,
            format!(
                "the request body must be a JSON object, not {}",
                kind(&value)
            ),
        ));
    };
    let inputs = take_inputs(&mut obj, limits, served)?;
    let prompt = take_prompt(&mut obj, served)?;
    let mut format = EncodingFormat::Float;
    if flavor == Flavor::OpenAi {
        match obj.remove("encoding_format") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "float" => {}
            Some(Value::String(s)) if s == "base64" => format = EncodingFormat::Base64,
            Some(other) => {
                return Err(ApiError::bad(
                    "invalid_encoding_format",
                    Some("encoding_format"),
                    format!("encoding_format must be \"float\" or \"base64\", not {other}"),
                ))
            }
        }
        match obj.remove("model") {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) if names(&name, served.model) => {}
            Some(Value::String(name)) => {
                return Err(ApiError {
                    status: 404,
                    code: "model_not_found",
                    message: format!(
                        "The model `{name}` does not exist: this service serves `{}`",
                        served.model
                    ),
                    param: Some("model"),
                })
            }
            Some(other) => {
                return Err(ApiError::bad(
                    "invalid_model",
                    Some("model"),
                    format!("model must be a string, not {}", kind(&other)),
                ))
            }
        }
        match obj.remove("dimensions") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64() == Some(served.dim as u64) => {}
            Some(other) => {
                return Err(ApiError::bad(
                    "unsupported_dimensions",
                    Some("dimensions"),
                    format!(
                    "this model's vectors have {} dimensions; dimensions={other} cannot be served",
                    served.dim
                ),
                ))
            }
        }
        match obj.remove("user") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(other) => {
                return Err(ApiError::bad(
                    "invalid_user",
                    Some("user"),
                    format!("user must be a string, not {}", kind(&other)),
                ))
            }
        }
        if let Some(name) = obj.keys().next() {
            return Err(ApiError::bad(
                "unknown_parameter",
                None,
                format!(
                    "unknown parameter {name:?} (accepted: input, model, encoding_format, \
                     dimensions, user, prompt_name)"
                ),
            ));
        }
    }
    Ok(EmbedRequest {
        inputs,
        format,
        prompt,
    })
}

/// Whether `asked` names the model `served`: its name, or a hub id ending in it
/// (`sentence-transformers/all-MiniLM-L6-v2` for `all-MiniLM-L6-v2`).
fn names(asked: &str, served: &str) -> bool {
    asked == served
        || asked
            .rsplit_once('/')
            .is_some_and(|(org, name)| !org.is_empty() && name == served)
}

fn take_prompt(
    obj: &mut Map<String, Value>,
    served: &Served<'_>,
) -> Result<Option<String>, ApiError> {
    let name = match obj.remove("prompt_name") {
        None | Some(Value::Null) => return Ok(served.default_prompt.map(str::to_string)),
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(ApiError::bad(
                "invalid_prompt_name",
                Some("prompt_name"),
                format!("prompt_name must be a string, not {}", kind(&other)),
            ))
        }
    };
    match served.prompts.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => Ok(Some(text.clone())),
        None => {
            let known: Vec<&str> = served.prompts.iter().map(|(n, _)| n.as_str()).collect();
            Err(ApiError::bad(
                "unknown_prompt_name",
                Some("prompt_name"),
                if known.is_empty() {
                    format!("prompt_name {name:?}: this model has no prompts")
                } else {
                    format!("prompt_name {name:?} is not one of this model's prompts: {known:?}")
                },
            ))
        }
    }
}

fn invalid_input(message: String) -> ApiError {
    ApiError::bad("invalid_input", Some("input"), message)
}

/// Token ids from a JSON array, each checked against the vocabulary; `at` names the input.
fn token_ids(items: &[Value], at: &str, served: &Served<'_>) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(invalid_input(format!(
            "{at} is an empty array of token ids"
        )));
    }
    if items.len() > served.max_tokens {
        return Err(invalid_input(format!(
            "{at} has {} token ids; this model reads at most {}",
            items.len(),
            served.max_tokens
        )));
    }
    items
        .iter()
        .map(|v| match v.as_u64() {
            Some(id) if id < served.vocab_size as u64 => Ok(id as u32),
            _ => Err(invalid_input(format!(
                "{at} holds {v}: token ids are integers from 0 to {}",
                served.vocab_size.saturating_sub(1)
            ))),
        })
        .collect()
}

fn take_inputs(
    obj: &mut Map<String, Value>,
    limits: &ApiLimits,
    served: &Served<'_>,
) -> Result<Vec<Input>, ApiError> {
    let inputs = match obj.remove("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "missing_input",
                Some("input"),
                "\"input\" is required: a string, an array of strings, or token ids",
            ))
        }
        Some(Value::String(s)) => vec![Input::Text(s)],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::bad(
                    "empty_input",
                    Some("input"),
                    "\"input\" is an empty array: send at least one text",
                ));
            }
            if items.iter().all(Value::is_number) {
                // One input given as token ids.
                vec![Input::Tokens(token_ids(&items, "input", served)?)]
            } else {
                if items.len() > limits.max_inputs {
                    return Err(ApiError::bad(
                        "too_many_inputs",
                        Some("input"),
                        format!(
                            "\"input\" has {} items; the limit is {} per request",
                            items.len(),
                            limits.max_inputs
                        ),
                    ));
                }
                let mut inputs = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::String(s) => inputs.push(Input::Text(s)),
                        Value::Array(ids) => inputs.push(Input::Tokens(token_ids(
                            &ids,
                            &format!("input[{i}]"),
                            served,
                        )?)),
                        other => {
                            return Err(invalid_input(format!(
                                "input[{i}] must be a string or an array of token ids, not {}",
                                kind(&other)
                            )))
                        }
                    }
                }
                inputs
            }
        }
        Some(other) => {
            return Err(invalid_input(format!(
                "\"input\" must be a string, an array of strings, or token ids, not {}",
                kind(&other)
            )))
        }
    };
    for (i, input) in inputs.iter().enumerate() {
        let Input::Text(t) = input else { continue };
        if t.trim().is_empty() {
            return Err(invalid_input(if inputs.len() == 1 {
                "\"input\" is empty or only whitespace: send text to embed".to_string()
            } else {
                format!("input[{i}] is empty or only whitespace: send text to embed")
            }));
        }
        // Bytes bound characters from above: count only when it can matter.
        if t.len() > limits.max_text_chars {
            let chars = t.chars().count();
            if chars > limits.max_text_chars {
                return Err(ApiError::bad(
                    "text_too_long",
                    Some("input"),
                    format!(
                        "input[{i}] has {chars} characters; the limit is {}",
                        limits.max_text_chars
                    ),
                ));
            }
        }
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPTS: &[(&str, &str)] = &[("query", "query: "), ("passage", "passage: ")];

    fn prompts() -> Vec<(String, String)> {
        PROMPTS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    fn parse_with(
        body: &str,
        flavor: Flavor,
        default_prompt: Option<&str>,
    ) -> Result<EmbedRequest, ApiError> {
        let prompts = prompts();
        parse_embed_request(
            body.as_bytes(),
            flavor,
            &ApiLimits {
                max_inputs: 3,
                max_text_chars: 5,
                ..ApiLimits::default()
            },
            &Served {
                model: "all-MiniLM-L6-v2",
                dim: 384,
                vocab_size: 1000,
                max_tokens: 4,
                prompts: &prompts,
                default_prompt,
            },
        )
    }

    fn parse(body: &str, flavor: Flavor) -> Result<EmbedRequest, ApiError> {
        parse_with(body, flavor, None)
    }

    fn text(s: &str) -> Input {
        Input::Text(s.into())
    }

    #[test]
    fn accepts_openai_requests() {
        let r = parse(
            r#"{"input": "hi", "model": "all-MiniLM-L6-v2"}"#,
            Flavor::OpenAi,
        )
        .unwrap();
        assert_eq!(
            r,
            EmbedRequest {
                inputs: vec![text("hi")],
                format: EncodingFormat::Float,
                prompt: None,
            }
        );
        let r = parse(
            r#"{"input": ["a", " b", "ü"], "encoding_format": "base64", "dimensions": 384, "user": "u",
                "model": "sentence-transformers/all-MiniLM-L6-v2"}"#,
            Flavor::OpenAi,
        )
        .unwrap();
        assert_eq!(r.inputs, [text("a"), text(" b"), text("ü")]);
        assert_eq!(r.format, EncodingFormat::Base64);
        // Five characters of two bytes each are within a five-character limit.
        assert!(parse(r#"{"input": "ééééé"}"#, Flavor::OpenAi).is_ok());
    }

    #[test]
    fn accepts_token_ids_as_openai_and_tei_do() {
        let r = parse(r#"{"input": [101, 7, 102]}"#, Flavor::OpenAi).unwrap();
        assert_eq!(r.inputs, [Input::Tokens(vec![101, 7, 102])]);
        let r = parse(r#"{"input": [[101, 102], [5], "text"]}"#, Flavor::Seed).unwrap();
        assert_eq!(
            r.inputs,
            [
                Input::Tokens(vec![101, 102]),
                Input::Tokens(vec![5]),
                text("text")
            ]
        );
        for (body, needle) in [
            (r#"{"input": [1000]}"#, "from 0 to 999"),
            (r#"{"input": [-1]}"#, "from 0 to 999"),
            (r#"{"input": [1.5]}"#, "from 0 to 999"),
            (r#"{"input": [[1, 2], []]}"#, "input[1] is an empty array"),
            (r#"{"input": [1, 2, 3, 4, 5]}"#, "at most 4"),
            (r#"{"input": [[1], [1, "x"]]}"#, "input[1] holds \"x\""),
        ] {
            let err = parse(body, Flavor::OpenAi).unwrap_err();
            assert_eq!(err.code, "invalid_input", "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }

    #[test]
    fn refuses_empty_and_whitespace_texts() {
        for body in [
            r#"{"input": ""}"#,
            r#"{"input": "  \n\t"}"#,
            r#"{"input": ["a", ""]}"#,
            r#"{"input": ["a", "\u00a0 "]}"#,
        ] {
            let err = parse(body, Flavor::OpenAi).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_input"), "{body}");
            assert!(err.message.contains("whitespace"), "{}", err.message);
        }
    }

    #[test]
    fn an_unknown_model_is_not_found() {
        for name in [
            "text-embedding-3-small",
            "all-MiniLM-L6",
            "/all-MiniLM-L6-v2",
        ] {
            let body = serde_json::json!({"input": "a", "model": name}).to_string();
            let err = parse(&body, Flavor::OpenAi).unwrap_err();
            assert_eq!((err.status, err.code), (404, "model_not_found"), "{name}");
            assert!(err.message.contains(name) && err.message.contains("all-MiniLM-L6-v2"));
            let v: Value = serde_json::from_slice(&err.to_response().body).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["code"], "model_not_found");
        }
    }

    #[test]
    fn prompts_by_name_and_by_default() {
        let r = parse(r#"{"input": "a", "prompt_name": "query"}"#, Flavor::OpenAi).unwrap();
        assert_eq!(r.prompt.as_deref(), Some("query: "));
        let r = parse_with(r#"{"input": "a"}"#, Flavor::Seed, Some("passage: ")).unwrap();
        assert_eq!(r.prompt.as_deref(), Some("passage: "));
        let err = parse(r#"{"input": "a", "prompt_name": "doc"}"#, Flavor::Seed).unwrap_err();
        assert_eq!(err.code, "unknown_prompt_name");
        assert!(err.message.contains("query"), "{}", err.message);
        let err = parse(r#"{"input": "a", "prompt_name": 1}"#, Flavor::OpenAi).unwrap_err();
        assert_eq!(err.code, "invalid_prompt_name");
    }

    #[test]
    fn seed_flavor_ignores_other_fields() {
        let r = parse(
            r#"{"input": ["x"], "whatever": 1, "encoding_format": 7, "model": 3}"#,
            Flavor::Seed,
        )
        .unwrap();
        assert_eq!(r.inputs, [text("x")]);
        assert_eq!(r.format, EncodingFormat::Float);
    }

    #[test]
    fn refuses_bad_requests_by_name() {
        use Flavor::*;
        for (body, flavor, want) in [
            ("", OpenAi, "invalid_json"),
            ("  \n", Seed, "invalid_json"),
            ("{", OpenAi, "invalid_json"),
            ("[1]", OpenAi, "invalid_request"),
            ("\"text\"", Seed, "invalid_request"),
            ("{}", OpenAi, "missing_input"),
            (r#"{"input": null}"#, Seed, "missing_input"),
            (r#"{"input": []}"#, OpenAi, "empty_input"),
            (r#"{"input": ["a","b","c","d"]}"#, Seed, "too_many_inputs"),
            (r#"{"input": ["a", 3]}"#, OpenAi, "invalid_input"),
            (r#"{"input": [{"a": 1}]}"#, OpenAi, "invalid_input"),
            (r#"{"input": 42}"#, Seed, "invalid_input"),
            (r#"{"input": "toolong"}"#, OpenAi, "text_too_long"),
            (r#"{"input": ["ok", "ééééééé"]}"#, Seed, "text_too_long"),
            (
                r#"{"input": "a", "encoding_format": "int8"}"#,
                OpenAi,
                "invalid_encoding_format",
            ),
            (r#"{"input": "a", "model": 3}"#, OpenAi, "invalid_model"),
            (
                r#"{"input": "a", "dimensions": 128}"#,
                OpenAi,
                "unsupported_dimensions",
            ),
            (r#"{"input": "a", "user": []}"#, OpenAi, "invalid_user"),
            (
                r#"{"input": "a", "encoding-format": "float"}"#,
                OpenAi,
                "unknown_parameter",
            ),
        ] {
            let err = parse(body, flavor).unwrap_err();
            assert_eq!(err.code, want, "{body:?}: {err:?}");
            assert_eq!(err.status, 400);
            assert!(!err.message.is_empty());
        }
        assert!(
            parse("{\"input\": [\"a\",\"b\",\"c\",\"d\"]}", Flavor::Seed)
                .unwrap_err()
                .message
                .contains("limit is 3")
        );
    }

    #[test]
    fn errors_have_the_openai_shape() {
        let r = ApiError::bad("empty_input", Some("input"), "no texts").to_response();
        assert_eq!(r.status, 400);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "empty_input");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "no texts");
        assert_eq!(v["error"]["param"], "input");
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut rng = crate::testutil::Rng::new(7);
        let limits = ApiLimits::default();
        let prompts = prompts();
        let served = Served {
            model: "m",
            dim: 384,
            vocab_size: 30522,
            max_tokens: 256,
            prompts: &prompts,
            default_prompt: None,
        };
        for _ in 0..5000 {
            let body = rng.json_ish();
            for flavor in [Flavor::OpenAi, Flavor::Seed] {
                let _ = parse_embed_request(&body, flavor, &limits, &served);
            }
        }
    }
}
