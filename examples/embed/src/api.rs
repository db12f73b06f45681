//! The HTTP API of the embeddings service: routes, request validation, answers.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/embeddings` | OpenAI-compatible: `input` (string or array of strings), `model`, `encoding_format` (`float` or `base64`), `dimensions`, `user` |
//! | `POST /embed` | the Python service this app replaces: `{"input": [...]}`, same answer shape |
//! | `GET /v1/models` | the one model served, OpenAI's list shape |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when the weights are imported and the worker is not draining, else 503 |
//!
//! Every refusal is a 4xx answer with OpenAI's error shape ([`Response::error`]) naming what was
//! wrong; a request can never end the worker. The limits ([`ApiLimits`] here, body and header
//! sizes in [`crate::http::Limits`]) are listed in the app's README.

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::encoder::SentenceEncoder;
use crate::error::EmbedError;
use crate::http::{Request, Response, Service};
use crate::tokenize::{TextEncoder, TokenBatch};

/// Limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Texts per request.
    pub max_inputs: usize,
    /// Characters (Unicode scalar values) per text. Texts are truncated to the model's word
    /// pieces anyway; this bounds the tokenizer's work.
    pub max_text_chars: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_inputs: 256,
            max_text_chars: 32 * 1024,
        }
    }
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
    fn bad(code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> Self {
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
    /// `/embed`: only `input` is read, other fields are ignored, as the Python service did.
    Seed,
}

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedRequest {
    pub inputs: Vec<String>,
    pub format: EncodingFormat,
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

/// Parses and validates a request body. `dim` is the model's vector width (for `dimensions`).
pub fn parse_embed_request(
    body: &[u8],
    flavor: Flavor,
    limits: &ApiLimits,
    dim: usize,
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
    let inputs = take_inputs(&mut obj, limits)?;
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
            // Any model name is accepted: a worker serves one model, named in the answer.
            None | Some(Value::Null) | Some(Value::String(_)) => {}
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
            Some(Value::Number(n)) if n.as_u64() == Some(dim as u64) => {}
            Some(other) => {
                return Err(ApiError::bad(
                    "unsupported_dimensions",
                    Some("dimensions"),
                    format!("this model's vectors have {dim} dimensions; dimensions={other} cannot be served"),
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
                format!("unknown parameter {name:?} (accepted: input, model, encoding_format, dimensions, user)"),
            ));
        }
    }
    Ok(EmbedRequest { inputs, format })
}

fn take_inputs(obj: &mut Map<String, Value>, limits: &ApiLimits) -> Result<Vec<String>, ApiError> {
    let texts = match obj.remove("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "missing_input",
                Some("input"),
                "\"input\" is required: a string or an array of strings",
            ))
        }
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::bad(
                    "empty_input",
                    Some("input"),
                    "\"input\" is an empty array: send at least one text",
                ));
            }
            if items.len() > limits.max_inputs {
                return Err(ApiError::bad(
                    "too_many_inputs",
                    Some("input"),
                    format!(
                        "\"input\" has {} texts; the limit is {} per request",
                        items.len(),
                        limits.max_inputs
                    ),
                ));
            }
            let mut texts = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) => texts.push(s),
                    Value::Number(_) | Value::Array(_) => {
                        return Err(ApiError::bad(
                            "invalid_input",
                            Some("input"),
                            format!(
                                "input[{i}] is {}: token arrays are not supported, send text",
                                kind(&item)
                            ),
                        ))
                    }
                    other => {
                        return Err(ApiError::bad(
                            "invalid_input",
                            Some("input"),
                            format!("input[{i}] must be a string, not {}", kind(&other)),
                        ))
                    }
                }
            }
            texts
        }
        Some(other) => {
            return Err(ApiError::bad(
                "invalid_input",
                Some("input"),
                format!(
                    "\"input\" must be a string or an array of strings, not {}",
                    kind(&other)
                ),
            ))
        }
    };
    for (i, t) in texts.iter().enumerate() {
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
    Ok(texts)
}

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

/// The embeddings service: tokenizer, encoder, and the buffers reused across requests.
pub struct App<'e> {
    encoder: Box<dyn SentenceEncoder + 'e>,
    tokenizer: TextEncoder,
    model_name: String,
    limits: ApiLimits,
    batch: TokenBatch,
    vectors: Vec<f32>,
}

impl std::fmt::Debug for App<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("backend", &self.encoder.backend())
            .field("model_name", &self.model_name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<'e> App<'e> {
    pub fn new(
        encoder: Box<dyn SentenceEncoder + 'e>,
        tokenizer: TextEncoder,
        model_name: String,
        limits: ApiLimits,
    ) -> Self {
        Self {
            encoder,
            tokenizer,
            model_name,
            limits,
            batch: TokenBatch::default(),
            vectors: Vec::new(),
        }
    }

    /// The width of the vectors.
    pub fn dim(&self) -> usize {
        self.encoder.dim()
    }

    /// Embeds `texts` as one batch: returns the vectors (text after text, [`App::dim`] each)
    /// and the number of word pieces the model read.
    pub fn embed<S: AsRef<str>>(&mut self, texts: &[S]) -> Result<(&[f32], usize), EmbedError> {
        self.batch.clear();
        for t in texts {
            self.tokenizer.encode_into(t.as_ref(), &mut self.batch)?;
        }
        self.encoder.embed(&self.batch, &mut self.vectors)?;
        Ok((&self.vectors, self.batch.total_tokens()))
    }

    /// Answers validated embedding requests, all texts of all of them in one forward pass.
    fn embed_requests(&mut self, reqs: &[&EmbedRequest]) -> Vec<Response> {
        let dim = self.encoder.dim();
        self.batch.clear();
        // Texts of request i: `firsts[i]..firsts[i + 1]` of the batch (None: it failed).
        let mut spans = Vec::with_capacity(reqs.len());
        let mut failed = Vec::with_capacity(reqs.len());
        for req in reqs {
            let first = self.batch.len();
            let mut error = None;
            for t in &req.inputs {
                if let Err(e) = self.tokenizer.encode_into(t, &mut self.batch) {
                    error = Some(e);
                    break;
                }
            }
            if let Some(e) = error {
                self.batch.truncate(first);
                failed.push(Some(Response::error(
                    400,
                    "tokenization_failed",
                    &format!("cannot tokenise the input: {e}"),
                    Some("input"),
                )));
            } else {
                failed.push(None);
            }
            spans.push(first..self.batch.len());
        }
        if let Err(e) = self.encoder.embed(&self.batch, &mut self.vectors) {
            log::error!("embedding {} text(s) failed: {e}", self.batch.len());
            let resp = Response::error(
                500,
                "embedding_failed",
                &format!("embedding failed: {e}"),
                None,
            );
            return vec![resp; reqs.len()];
        }
        let mut out = Vec::with_capacity(reqs.len());
        for ((req, span), failed) in reqs.iter().zip(spans).zip(failed) {
            if let Some(resp) = failed {
                out.push(resp);
                continue;
            }
            let tokens: usize = self.batch.lens()[span.clone()].iter().sum();
            let vectors = &self.vectors[span.start * dim..span.end * dim];
            let data = vectors
                .chunks_exact(dim)
                .enumerate()
                .map(|(index, v)| EmbeddingItem {
                    object: "embedding",
                    index,
                    embedding: match req.format {
                        EncodingFormat::Float => EmbeddingRepr::Float(v),
                        EncodingFormat::Base64 => EmbeddingRepr::Base64(base64_f32(v)),
                    },
                })
                .collect();
            let list = EmbeddingList {
                object: "list",
                data,
                model: &self.model_name,
                usage: Usage {
                    prompt_tokens: tokens,
                    total_tokens: tokens,
                },
            };
            out.push(match serde_json::to_vec(&list) {
                Ok(body) => Response::json(200, body),
                Err(e) => Response::error(
                    500,
                    "serialization_failed",
                    &format!("cannot write the answer: {e}"),
                    None,
                ),
            });
        }
        out
    }

    /// Routes one request: the answer, or the validated embedding request to compute.
    fn route(&self, req: &Request<'_>, draining: bool) -> Result<EmbedRequest, Response> {
        let is_get = matches!(req.method, "GET" | "HEAD");
        let flavor = match req.path {
            "/v1/embeddings" | "/embed" if req.method != "POST" => return Err(method_not_allowed(req, "POST")),
            "/v1/embeddings" => Flavor::OpenAi,
            "/embed" => Flavor::Seed,
            "/healthz" | "/readyz" | "/v1/models" if !is_get => return Err(method_not_allowed(req, "GET, HEAD")),
            "/healthz" => return Err(status_json(200, "ok")),
            // Only a worker with imported weights runs this loop, so ready means not draining.
            "/readyz" if draining => return Err(status_json(503, "draining")),
            "/readyz" => return Err(status_json(200, "ready")),
            "/v1/models" => {
                let body = serde_json::json!({
                    "object": "list",
                    "data": [{ "id": self.model_name, "object": "model", "owned_by": "zygote" }],
                });
                return Err(Response::json(200, body.to_string().into_bytes()));
            }
            _ => {
                return Err(Response::error(
                    404,
                    "not_found",
                    &format!(
                        "no route {} {}; routes: POST /v1/embeddings, POST /embed, GET /v1/models, GET /healthz, GET /readyz",
                        req.method, req.path
                    ),
                    None,
                ))
            }
        };
        parse_embed_request(req.body, flavor, &self.limits, self.encoder.dim())
            .map_err(|e| e.to_response())
    }
}

fn status_json(status: u16, text: &str) -> Response {
    Response::json(status, format!("{{\"status\":\"{text}\"}}").into_bytes())
}

fn method_not_allowed(req: &Request<'_>, allow: &'static str) -> Response {
    let mut r = Response::error(
        405,
        "method_not_allowed",
        &format!("{} is not allowed on {}; use {allow}", req.method, req.path),
        None,
    );
    r.allow = Some(allow);
    r
}

impl Service for App<'_> {
    fn handle_batch(&mut self, reqs: &[Request<'_>], draining: bool) -> Vec<Response> {
        let mut out: Vec<Option<Response>> = Vec::with_capacity(reqs.len());
        let mut jobs: Vec<(usize, EmbedRequest)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match self.route(r, draining) {
                Ok(job) => {
                    jobs.push((i, job));
                    out.push(None);
                }
                Err(resp) => out.push(Some(resp)),
            }
        }
        // Groups of at most max_inputs texts per forward pass, so one pass stays as bounded as
        // the largest single request.
        let mut rest = &jobs[..];
        while !rest.is_empty() {
            let mut n = 0;
            let mut texts = 0;
            while n < rest.len()
                && (n == 0 || texts + rest[n].1.inputs.len() <= self.limits.max_inputs)
            {
                texts += rest[n].1.inputs.len();
                n += 1;
            }
            let group: Vec<&EmbedRequest> = rest[..n].iter().map(|(_, j)| j).collect();
            for ((i, _), resp) in rest[..n].iter().zip(self.embed_requests(&group)) {
                out[*i] = Some(resp);
            }
            rest = &rest[n..];
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Response::error(500, "internal_error", "no answer was computed", None)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, flavor: Flavor) -> Result<EmbedRequest, ApiError> {
        parse_embed_request(
            body.as_bytes(),
            flavor,
            &ApiLimits {
                max_inputs: 3,
                max_text_chars: 5,
            },
            384,
        )
    }

    fn code(body: &str, flavor: Flavor) -> &'static str {
        parse(body, flavor).unwrap_err().code
    }

    #[test]
    fn accepts_openai_requests() {
        let r = parse(
            r#"{"input": "hi", "model": "text-embedding-3-small"}"#,
            Flavor::OpenAi,
        )
        .unwrap();
        assert_eq!(
            r,
            EmbedRequest {
                inputs: vec!["hi".into()],
                format: EncodingFormat::Float
            }
        );
        let r = parse(r#"{"input": ["a", "", "ü"], "encoding_format": "base64", "dimensions": 384, "user": "u"}"#, Flavor::OpenAi)
            .unwrap();
        assert_eq!(r.inputs, ["a", "", "ü"]);
        assert_eq!(r.format, EncodingFormat::Base64);
        // Five characters of two bytes each are within a five-character limit.
        assert!(parse(r#"{"input": "ééééé"}"#, Flavor::OpenAi).is_ok());
    }

    #[test]
    fn seed_flavor_ignores_other_fields() {
        let r = parse(
            r#"{"input": ["x"], "whatever": 1, "encoding_format": 7}"#,
            Flavor::Seed,
        )
        .unwrap();
        assert_eq!(r.inputs, ["x"]);
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
            (r#"{"input": [[101, 102]]}"#, OpenAi, "invalid_input"),
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
        assert_eq!(code("{\"input\": 1}", Flavor::OpenAi), "invalid_input");
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
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000 -> bytes 00 00 80 3f.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut rng = crate::testutil::Rng::new(7);
        let limits = ApiLimits::default();
        for _ in 0..5000 {
            let body = rng.json_ish();
            for flavor in [Flavor::OpenAi, Flavor::Seed] {
                let _ = parse_embed_request(&body, flavor, &limits, 384);
            }
        }
    }
}
