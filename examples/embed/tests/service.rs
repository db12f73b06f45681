//! The embeddings service end to end, without the zygote: the real model (host weights through
//! the owner's export and a worker's import), the real app, the real event loop on
//! 127.0.0.1:0, and HTTP clients. Vectors are checked against the sentence-transformers
//! fixture, so batching across requests cannot mix answers up unnoticed.

#![deny(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use zygote_embed::http::{self, Control, Exit};
use zygote_embed::http::{Reply, Request, Service};
use zygote_embed::tokenize::TextEncoder;
use zygote_embed::{build_app, encoder, import_host_weights, ApiLimits, App, ModelSpec};
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::Latency;
use zygote_runtime::protocol::ParentMessage;
use zygote_runtime::WorkerError;

/// The worker's end of a control channel made of the runtime's real frames.
struct PairControl {
    sock: UnixStream,
    reader: FrameReader,
    draining: Arc<AtomicBool>,
}

impl Control for PairControl {
    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
    fn poll(&mut self) -> Result<Option<ParentMessage>, WorkerError> {
        match self
            .reader
            .read(&mut self.sock)
            .map_err(WorkerError::Control)?
        {
            ReadEvent::Frame(b) => Ok(Some(frame::decode(&b).map_err(WorkerError::Control)?)),
            ReadEvent::WouldBlock => Ok(None),
            ReadEvent::Eof => Err(WorkerError::Orphaned),
        }
    }
    fn heartbeat(&mut self, _served: u64, _latency: &Latency) -> Result<(), WorkerError> {
        Ok(())
    }
    fn draining(&mut self, _in_flight: u32) -> Result<(), WorkerError> {
        self.draining.store(true, Ordering::SeqCst);
        Ok(())
    }
}

struct Fixture {
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
    num_tokens: Vec<usize>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm_reference.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Fixture {
        sentences: serde_json::from_value(v["sentences"].clone()).unwrap(),
        embeddings: serde_json::from_value(v["embeddings"].clone()).unwrap(),
        num_tokens: serde_json::from_value(v["num_tokens"].clone()).unwrap(),
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn send(s: &mut TcpStream, method: &str, path: &str, body: &str) {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
}

/// Reads one answer: status and JSON body.
fn receive(s: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(&buf) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap();
            if buf.len() >= n + len {
                let code = resp.code.unwrap();
                return (code, serde_json::from_slice(&buf[n..n + len]).unwrap());
            }
        }
        let got = s.read(&mut chunk).unwrap();
        assert!(got > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..got]);
    }
}

fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = connect(addr);
    send(&mut s, method, path, body);
    receive(&mut s)
}

fn vector(item: &Value) -> Vec<f32> {
    match &item["embedding"] {
        Value::Array(xs) => xs.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        Value::String(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => panic!("embedding is {other}"),
    }
}

#[test]
fn serves_embeddings_over_http() {
    let Some(dir) = common::model_dir() else {
        return;
    };
    let fx = fixture();
    let spec = ModelSpec::load(&dir).unwrap();
    let (_model, weights) = import_host_weights(&dir.join("model.safetensors")).unwrap();
    let mut app = build_app(&spec, &weights).unwrap();
    let tokenizer = &TextEncoder::load(&spec).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (worker_end, supervisor) = UnixStream::pair().unwrap();
    worker_end.set_nonblocking(true).unwrap();
    let draining = Arc::new(AtomicBool::new(false));
    let mut control = PairControl {
        sock: worker_end,
        reader: FrameReader::default(),
        draining: draining.clone(),
    };

    std::thread::scope(|scope| {
        // The clients run beside the loop. They hand the supervisor's end back when done: if an
        // assertion fails, it is dropped on the way out instead, the loop ends as orphaned, and
        // the failure surfaces at the join.
        let fx = &fx;
        let clients = scope.spawn(move || {
            let mut supervisor = supervisor;
            // OpenAI flavour, floats.
            let picks = [0usize, 20, 42, 60];
            let input: Vec<&str> = picks.iter().map(|&i| fx.sentences[i].as_str()).collect();
            let (status, v) = call(
                addr,
                "POST",
                "/v1/embeddings",
                &json!({"input": input, "model": "sentence-transformers/all-MiniLM-L6-v2"})
                    .to_string(),
            );
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["object"], "list");
            assert_eq!(v["model"], "all-MiniLM-L6-v2");
            let tokens: usize = picks.iter().map(|&i| fx.num_tokens[i]).sum();
            assert_eq!(v["usage"]["prompt_tokens"], tokens);
            assert_eq!(v["usage"]["total_tokens"], tokens);
            let data = v["data"].as_array().unwrap();
            assert_eq!(data.len(), picks.len());
            for (k, (item, &i)) in data.iter().zip(&picks).enumerate() {
                assert_eq!(item["object"], "embedding");
                assert_eq!(item["index"], k);
                let c = cosine(&vector(item), &fx.embeddings[i]);
                assert!(c >= 0.9999, "sentence {i}: cosine {c}");
            }

            // base64, a single string.
            let body = json!({"input": fx.sentences[5], "encoding_format": "base64"}).to_string();
            let (status, v) = call(addr, "POST", "/v1/embeddings", &body);
            assert_eq!(status, 200, "{v}");
            assert!(v["data"][0]["embedding"].is_string());
            assert!(cosine(&vector(&v["data"][0]), &fx.embeddings[5]) >= 0.9999);

            // The Python service's route and shape.
            let (status, v) = call(
                addr,
                "POST",
                "/embed",
                &json!({"input": [fx.sentences[7]]}).to_string(),
            );
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["object"], "list");
            assert!(cosine(&vector(&v["data"][0]), &fx.embeddings[7]) >= 0.9999);

            // Requests on several connections at once (batched by the loop) each get their own vector.
            let mut conns: Vec<(usize, TcpStream)> = (0..8)
                .map(|k| (k * 7 % fx.sentences.len(), connect(addr)))
                .collect();
            for (i, s) in &mut conns {
                send(
                    s,
                    "POST",
                    "/v1/embeddings",
                    &json!({"input": fx.sentences[*i]}).to_string(),
                );
            }
            for (i, s) in &mut conns {
                let (status, v) = receive(s);
                assert_eq!(status, 200);
                let c = cosine(&vector(&v["data"][0]), &fx.embeddings[*i]);
                assert!(c >= 0.9999, "concurrent sentence {i}: cosine {c}");
                assert_eq!(v["usage"]["prompt_tokens"], fx.num_tokens[*i]);
            }

            // Health, readiness, models, refusals.
            assert_eq!(call(addr, "GET", "/healthz", "").0, 200);
            let (status, v) = call(addr, "GET", "/readyz", "");
            assert_eq!((status, v["status"].as_str()), (200, Some("ready")));
            assert_eq!(
                call(addr, "GET", "/v1/models", "").1["data"][0]["id"],
                "all-MiniLM-L6-v2"
            );
            for (method, path, body, want_status, want_code) in [
                (
                    "POST",
                    "/v1/embeddings",
                    "{\"input\": []}",
                    400,
                    "empty_input",
                ),
                (
                    "POST",
                    "/v1/embeddings",
                    "{\"input\": ",
                    400,
                    "invalid_json",
                ),
                (
                    "POST",
                    "/embed",
                    "{\"input\": [true]}",
                    400,
                    "invalid_input",
                ),
                ("POST", "/embed", "{\"input\": \"\"}", 400, "invalid_input"),
                (
                    "POST",
                    "/v1/embeddings",
                    "{\"input\": [\"a\", \" \\n \"]}",
                    400,
                    "invalid_input",
                ),
                (
                    "POST",
                    "/v1/embeddings",
                    "{\"input\": \"a\", \"model\": \"text-embedding-3-small\"}",
                    404,
                    "model_not_found",
                ),
                (
                    "POST",
                    "/v1/embeddings",
                    "{\"input\": [30522]}",
                    400,
                    "invalid_input",
                ),
                ("GET", "/v1/embeddings", "", 405, "method_not_allowed"),
                ("POST", "/healthz", "", 405, "method_not_allowed"),
                ("GET", "/nope", "", 404, "not_found"),
            ] {
                let (status, v) = call(addr, method, path, body);
                assert_eq!(status, want_status, "{method} {path} {body}: {v}");
                assert_eq!(v["error"]["code"], want_code, "{v}");
                assert!(v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()));
            }
            let too_many = json!({"input": vec!["a"; 257]}).to_string();
            assert_eq!(
                call(addr, "POST", "/v1/embeddings", &too_many).1["error"]["code"],
                "too_many_inputs"
            );
            let too_long = json!({"input": "x".repeat(40_000)}).to_string();
            assert_eq!(
                call(addr, "POST", "/v1/embeddings", &too_long).1["error"]["code"],
                "text_too_long"
            );
            // The per-request budget of word pieces: 100 texts truncated to 256 word pieces
            // each are more than the default 16384; refused with the limit named.
            let long_text = "word ".repeat(300);
            let too_costly = json!({"input": vec![long_text.as_str(); 100]}).to_string();
            let (status, v) = call(addr, "POST", "/v1/embeddings", &too_costly);
            assert_eq!(
                (status, v["error"]["code"].as_str()),
                (413, Some("too_many_tokens")),
                "{v}"
            );
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("16384 word pieces per request"), "{msg}");
            // Token ids are taken as they are: the ids of a sentence give its vector.
            let mut ids = zygote_embed::tokenize::TokenBatch::default();
            tokenizer.encode_into(&fx.sentences[3], &mut ids).unwrap();
            let (status, v) = call(
                addr,
                "POST",
                "/v1/embeddings",
                &json!({"input": [ids.text(0).0, ids.text(0).0]}).to_string(),
            );
            assert_eq!(status, 200, "{v}");
            for item in v["data"].as_array().unwrap() {
                assert!(cosine(&vector(item), &fx.embeddings[3]) >= 0.9999);
            }
            let (status, v) = call(
                addr,
                "POST",
                "/embed",
                &json!({"input": ids.text(0).0}).to_string(),
            );
            assert_eq!(status, 200, "{v}");
            assert!(cosine(&vector(&v["data"][0]), &fx.embeddings[3]) >= 0.9999);
            assert_eq!(v["usage"]["prompt_tokens"], fx.num_tokens[3]);
            // Still serving after all that.
            assert_eq!(call(addr, "POST", "/embed", "{\"input\": [\"ok\"]}").0, 200);

            // Drain: a request begun before it is still answered, with 503 from /readyz and
            // Connection: close; then the loop ends.
            let mut late = connect(addr);
            late.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\n")
                .unwrap();
            let msg = frame::encode(&ParentMessage::Drain { deadline_ms: 5_000 }).unwrap();
            supervisor.write_all(&msg).unwrap();
            let start = Instant::now();
            while !draining.load(Ordering::SeqCst) {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the loop did not start draining"
                );
                std::thread::yield_now();
            }
            late.write_all(b"\r\n").unwrap();
            let (status, v) = receive(&mut late);
            assert_eq!((status, v["status"].as_str()), (503, Some("draining")));
            supervisor
        });
        let exit = http::run(
            vec![listener],
            &mut control,
            &mut app,
            &http::Limits::default(),
        );
        let supervisor = clients.join().expect("client assertions");
        drop(supervisor);
        match exit {
            Ok(Exit::Drained { served }) => assert!(served >= 20, "served {served}"),
            other => panic!("{other:?}"),
        }
    });
}

/// The request of `id` for `/embed` with `body`.
fn embed_request(id: u64, body: &str) -> Request<'_> {
    Request {
        id,
        method: "POST",
        path: "/embed",
        body: body.as_bytes(),
    }
}

#[test]
fn a_large_request_is_computed_in_passes_and_a_small_one_joins_them() {
    let Some(dir) = common::model_dir() else {
        return;
    };
    let fx = fixture();
    let spec = ModelSpec::load(&dir).unwrap();
    let (_model, weights) = import_host_weights(&dir.join("model.safetensors")).unwrap();
    let limits = ApiLimits {
        // Raised to two of the longest texts (512 word pieces) by App::new.
        max_batch_tokens: 1,
        ..ApiLimits::default()
    };
    let mut app = App::new(
        encoder::for_weights(&spec, &weights).unwrap(),
        TextEncoder::load(&spec).unwrap(),
        &spec,
        limits,
    );
    assert_eq!(app.limits().max_batch_tokens, 512);
    // Every fixture sentence three times: more word pieces than one pass takes.
    // (The API refuses empty texts, which the fixture also has.)
    let large: Vec<usize> = (0..3)
        .flat_map(|_| 0..fx.sentences.len())
        .filter(|&i| !fx.sentences[i].trim().is_empty())
        .collect();
    let tokens: usize = large.iter().map(|&i| fx.num_tokens[i]).sum();
    assert!(tokens > 3 * 512, "{tokens} word pieces");
    let texts: Vec<&str> = large.iter().map(|&i| fx.sentences[i].as_str()).collect();
    let large_body = json!({ "input": texts }).to_string();
    let small_body = json!({ "input": [fx.sentences[9]] }).to_string();

    assert_eq!(
        app.submit(&[embed_request(1, &large_body)], false),
        [Reply::Queued]
    );
    let mut answers: Vec<(u64, usize)> = Vec::new();
    let mut check = |pass: usize, done: Vec<(u64, zygote_embed::http::Response)>| {
        for (id, resp) in done {
            assert_eq!(resp.status, 200);
            let v: Value = serde_json::from_slice(&resp.body).unwrap();
            let want: Vec<usize> = if id == 1 { large.clone() } else { vec![9] };
            let data = v["data"].as_array().unwrap();
            assert_eq!(data.len(), want.len());
            for (item, &i) in data.iter().zip(&want) {
                let c = cosine(&vector(item), &fx.embeddings[i]);
                assert!(c >= 0.9999, "request {id}, sentence {i}: cosine {c}");
            }
            answers.push((id, pass));
        }
    };
    check(0, app.step());
    // The small request arrives while the large one is being computed: the next pass has it.
    assert_eq!(
        app.submit(&[embed_request(2, &small_body)], false),
        [Reply::Queued]
    );
    check(1, app.step());
    let mut pass = 2;
    while app.has_work() {
        assert!(pass < 100, "the large request never finished");
        check(pass, app.step());
        pass += 1;
    }
    assert_eq!(answers.first(), Some(&(2, 1)), "{answers:?}");
    assert_eq!(answers.len(), 2);
    assert!(answers[1].1 > 1, "{answers:?}");
}
