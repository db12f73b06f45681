//! The HTTP API of the embeddings service: routes, request validation, the compute queue,
//! answers.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/embeddings` | OpenAI-compatible: `input` (string, array of strings, token ids, or arrays of token ids), `model`, `encoding_format` (`float` or `base64`), `dimensions`, `user`, and `prompt_name` |
//! | `POST /embed` | the Python service this app replaces: `{"input": [...]}`, same answer shape |
//! | `GET /v1/models` | the one model served, OpenAI's list shape |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when the weights are imported and the worker is not draining, else 503 |
//!
//! Every refusal is a 4xx answer with OpenAI's error shape ([`Response::error`]) naming what was
//! wrong; a request can never end the worker. The limits ([`ApiLimits`] here, body and header
//! sizes in [`crate::http::Limits`]) are listed in the app's README.
//!
//! The parts: [`request`] reads and validates a body, [`schedule`] decides which texts go into
//! the next forward pass, `answer` writes the vectors. [`App`] carries it out: it tokenises a
//! request when the loop hands it over ([`Service::submit`]), refuses one beyond the per-request
//! budget of word pieces, queues the rest, and computes one pass of at most
//! [`ApiLimits::max_batch_tokens`] word pieces per [`Service::step`].

mod answer;
pub mod request;
pub mod schedule;

use std::collections::HashMap;

use crate::encoder::SentenceEncoder;
use crate::error::EmbedError;
use crate::http::{Reply, Request, Response, Service};
use crate::spec::ModelSpec;
use crate::tokenize::{TextEncoder, TokenBatch};

pub use answer::base64_f32;
pub use request::{
    parse_embed_request, ApiError, ApiLimits, EmbedRequest, EncodingFormat, Flavor, Input, Served,
};
use schedule::Scheduler;

/// One queued request: its word pieces, and its vectors as the passes compute them.
#[derive(Debug)]
struct Job {
    tokens: TokenBatch,
    format: EncodingFormat,
    vectors: Vec<f32>,
}

/// The embeddings service: tokenizer, encoder, the queue of requests being computed, and the
/// buffers reused across passes.
pub struct App<'e> {
    encoder: Box<dyn SentenceEncoder + 'e>,
    tokenizer: TextEncoder,
    model_name: String,
    vocab_size: usize,
    max_tokens: usize,
    prompts: Vec<(String, String)>,
    default_prompt: Option<String>,
    limits: ApiLimits,
    scheduler: Scheduler,
    jobs: HashMap<u64, Job>,
    batch: TokenBatch,
    vectors: Vec<f32>,
}

impl std::fmt::Debug for App<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("backend", &self.encoder.backend())
            .field("model_name", &self.model_name)
            .field("limits", &self.limits)
            .field("queued", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl<'e> App<'e> {
    /// The app for the model `spec` describes. The pass budget is raised to two of the
    /// longest texts if it is set lower, so that a new request always fits beside a large
    /// one's next text (see [`schedule`]).
    pub fn new(
        encoder: Box<dyn SentenceEncoder + 'e>,
        tokenizer: TextEncoder,
        spec: &ModelSpec,
        mut limits: ApiLimits,
    ) -> Self {
        let floor = 2 * spec.max_seq_length;
        if limits.max_batch_tokens < floor {
            log::info!(
                "max_batch_tokens {} raised to {floor} (two texts of {} word pieces)",
                limits.max_batch_tokens,
                spec.max_seq_length
            );
            limits.max_batch_tokens = floor;
        }
        Self {
            encoder,
            tokenizer,
            model_name: spec.name.clone(),
            vocab_size: spec.config.vocab_size,
            max_tokens: spec.max_seq_length,
            prompts: spec.prompts.clone(),
            default_prompt: spec.default_prompt().map(str::to_string),
            limits,
            scheduler: Scheduler::default(),
            jobs: HashMap::new(),
            batch: TokenBatch::default(),
            vectors: Vec::new(),
        }
    }

    /// The width of the vectors.
    pub fn dim(&self) -> usize {
        self.encoder.dim()
    }

    /// The limits in force (after [`App::new`] adjusted them).
    pub fn limits(&self) -> &ApiLimits {
        &self.limits
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

    fn served(&self) -> Served<'_> {
        Served {
            model: &self.model_name,
            dim: self.encoder.dim(),
            vocab_size: self.vocab_size,
            max_tokens: self.max_tokens,
            prompts: &self.prompts,
            default_prompt: self.default_prompt.as_deref(),
        }
    }

    /// Tokenises a validated request and queues it under `id`, or refuses it (a text the
    /// tokenizer cannot take, or more word pieces than the per-request budget).
    fn queue(&mut self, id: u64, req: EmbedRequest) -> Result<(), Response> {
        let mut tokens = TokenBatch::default();
        let mut prompted = String::new();
        for input in &req.inputs {
            let done = match input {
                Input::Text(t) => match &req.prompt {
                    Some(p) => {
                        prompted.clear();
                        prompted.push_str(p);
                        prompted.push_str(t);
                        self.tokenizer.encode_into(&prompted, &mut tokens)
                    }
                    None => self.tokenizer.encode_into(t, &mut tokens),
                },
                Input::Tokens(ids) => {
                    tokens.push(ids, &vec![0; ids.len()]);
                    Ok(ids.len())
                }
            };
            if let Err(e) = done {
                return Err(Response::error(
                    400,
                    "tokenization_failed",
                    &format!("cannot tokenise the input: {e}"),
                    Some("input"),
                ));
            }
            if tokens.total_tokens() > self.limits.max_request_tokens {
                // Counted as it grows, so a refused request costs no more than the budget.
                return Err(Response::error(
                    413,
                    "too_many_tokens",
                    &format!(
                        "the input is more than {} word pieces after tokenisation (each text \
                         truncated to {}); the limit is {} word pieces per request: send fewer \
                         or shorter texts per request",
                        self.limits.max_request_tokens,
                        self.max_tokens,
                        self.limits.max_request_tokens
                    ),
                    Some("input"),
                ));
            }
        }
        self.scheduler.push(id, tokens.lens().to_vec());
        let vectors = vec![0.0; tokens.len() * self.encoder.dim()];
        self.jobs.insert(
            id,
            Job {
                tokens,
                format: req.format,
                vectors,
            },
        );
        Ok(())
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
        parse_embed_request(req.body, flavor, &self.limits, &self.served())
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
    fn submit(&mut self, reqs: &[Request<'_>], draining: bool) -> Vec<Reply> {
        reqs.iter()
            .map(|r| match self.route(r, draining) {
                Ok(job) => match self.queue(r.id, job) {
                    Ok(()) => Reply::Queued,
                    Err(resp) => Reply::Now(resp),
                },
                Err(resp) => Reply::Now(resp),
            })
            .collect()
    }

    fn has_work(&self) -> bool {
        !self.scheduler.is_empty()
    }

    fn step(&mut self) -> Vec<(u64, Response)> {
        let pass = self.scheduler.next_pass(self.limits.max_batch_tokens);
        let dim = self.encoder.dim();
        self.batch.clear();
        for (id, texts) in &pass.parts {
            if let Some(job) = self.jobs.get(id) {
                for t in texts.clone() {
                    let (ids, types) = job.tokens.text(t);
                    self.batch.push(ids, types);
                }
            }
        }
        let mut out = Vec::new();
        if !self.batch.is_empty() {
            if let Err(e) = self.encoder.embed(&self.batch, &mut self.vectors) {
                log::error!("embedding {} text(s) failed: {e}", self.batch.len());
                let resp = Response::error(
                    500,
                    "embedding_failed",
                    &format!("embedding failed: {e}"),
                    None,
                );
                // Every request with texts in the failed pass is answered with the error.
                for (id, _) in &pass.parts {
                    if self.jobs.remove(id).is_some() {
                        self.scheduler.cancel(*id);
                        out.push((*id, resp.clone()));
                    }
                }
                return out;
            }
        }
        let mut at = 0;
        for (id, texts) in &pass.parts {
            let n = texts.len() * dim;
            if let Some(job) = self.jobs.get_mut(id) {
                job.vectors[texts.start * dim..texts.end * dim]
                    .copy_from_slice(&self.vectors[at..at + n]);
            }
            at += n;
        }
        for id in pass.finished {
            if let Some(job) = self.jobs.remove(&id) {
                let resp = answer::embeddings(
                    &job.vectors,
                    dim,
                    job.format,
                    &self.model_name,
                    job.tokens.total_tokens(),
                );
                out.push((id, resp));
            }
        }
        out
    }

    fn cancel(&mut self, id: u64) {
        self.jobs.remove(&id);
        self.scheduler.cancel(id);
    }
}
