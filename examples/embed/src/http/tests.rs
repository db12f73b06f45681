//! Tests of the request parser and of the event loop, the latter on real sockets: a listener on
//! 127.0.0.1:0, clients in the test thread, the loop in a thread of its own, and a control
//! channel that speaks the runtime's real frames over a Unix socket pair.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::net::TcpStream as StdStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};

use super::*;
use crate::testutil::Rng;

fn limits() -> Limits {
    Limits {
        max_header_bytes: 1024,
        max_body: 4096,
        ..Limits::default()
    }
}

fn complete(raw: &str) -> Head {
    match parse(raw.as_bytes(), &limits()) {
        Parsed::Complete(h) => h,
        other => panic!("{raw:?}: {other:?}"),
    }
}

fn rejected(raw: &[u8]) -> u16 {
    match parse(raw, &limits()) {
        Parsed::Reject { status, .. } => status,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
    }
}

#[test]
fn parses_requests() {
    let h = complete("GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(
        (h.method.as_str(), h.path.as_str(), h.keep_alive, h.body_len),
        ("GET", "/healthz", true, 0)
    );
    let raw = "POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhelloGET / HTTP/1.1\r\n";
    let h = complete(raw);
    assert_eq!((h.body_len, h.keep_alive), (5, false));
    assert_eq!(&raw[h.head_len..h.head_len + h.body_len], "hello");
    assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
}

#[test]
fn waits_for_the_rest() {
    let l = limits();
    assert_eq!(
        parse(b"GET / HTT", &l),
        Parsed::Incomplete {
            expect_continue: false
        }
    );
    assert_eq!(
        parse(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nab",
            &l
        ),
        Parsed::Incomplete {
            expect_continue: false
        }
    );
    assert_eq!(
        parse(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
            &l
        ),
        Parsed::Incomplete {
            expect_continue: true
        }
    );
}

#[test]
fn rejects_what_it_does_not_take() {
    assert_eq!(
        rejected(b"POST / HTTP/1.1\r\nContent-Length: 4097\r\n\r\n"),
        413
    );
    assert_eq!(
        rejected(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
        400
    );
    // Digits only: a sign, spaces inside, or an empty value are refused.
    for value in ["+17", "-1", "1 7", "", "0x10", "١٧"] {
        let raw = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {value}\r\n\r\n");
        assert_eq!(rejected(raw.as_bytes()), 400, "{value:?}");
    }
    // HTTP/1.1 needs exactly one Host; HTTP/1.0 needs none.
    assert_eq!(rejected(b"GET / HTTP/1.1\r\n\r\n"), 400);
    assert_eq!(
        rejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        400
    );
    assert!(matches!(
        parse(b"GET / HTTP/1.0\r\n\r\n", &limits()),
        Parsed::Complete(_)
    ));
    assert_eq!(
        rejected(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
        400
    );
    assert_eq!(
        rejected(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        501
    );
    assert_eq!(rejected(b"POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
    assert_eq!(rejected(b"\x00\x01garbage\r\n\r\n"), 400);
    assert_eq!(rejected(b"GET / HTTP/2.0\r\n\r\n"), 505);
    let many: String = (0..MAX_HEADERS + 1)
        .map(|i| format!("X-{i}: y\r\n"))
        .collect();
    assert_eq!(
        rejected(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
        431
    );
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
    assert_eq!(rejected(long.as_bytes()), 431);
}

#[test]
fn random_bytes_never_panic_the_parser() {
    let mut rng = Rng::new(1);
    let l = limits();
    let valid = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
    for _ in 0..20_000 {
        let _ = parse(&rng.bytes(300), &l);
        // Mutations of a valid request get further into the parser.
        let mut m = valid.to_vec();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(m.len());
            m[i] = rng.next() as u8;
        }
        m.truncate(rng.below(m.len() + 1));
        let _ = parse(&m, &l);
    }
}

/// Answers with what it saw: method, path, body length and batch size. A batch with a
/// request for `/slow` takes [`SLOW`], like a long computation. A request for `/long` is queued
/// and answered by a later [`Service::step`], once the loop has sent [`LONG_HEARTBEATS`]
/// heartbeats since it was queued: like a computation of many steps that only a loop which
/// keeps heartbeating between steps can finish. Answers from a loop other than the first name
/// it (`worker=NAME`).
struct Echo {
    name: &'static str,
    /// Every batch's paths, recorded when the batch starts.
    seen: Arc<Mutex<Seen>>,
    /// Queued `/long` requests: id, body text, and the heartbeat count when queued.
    queued: Vec<(u64, String, u64)>,
}

/// The time a batch with a `/slow` request takes.
const SLOW: Duration = Duration::from_millis(200);
/// Heartbeats a `/long` request waits for.
const LONG_HEARTBEATS: u64 = 3;

impl Echo {
    fn answer(&self, r: &Request<'_>, batch: usize, draining: bool) -> Response {
        let body = format!(
            "{} {} {} batch={batch} draining={draining}",
            r.method,
            r.path,
            r.body.len(),
        );
        let body = if self.name.is_empty() {
            body
        } else {
            format!("{body} worker={}", self.name)
        };
        Response::json(200, body.into_bytes())
    }
}

impl Service for Echo {
    fn submit(&mut self, reqs: &[Request<'_>], draining: bool) -> Vec<Reply> {
        let heartbeats = {
            let mut seen = self.seen.lock().unwrap();
            seen.batches
                .push(reqs.iter().map(|r| r.path.to_string()).collect());
            seen.heartbeats
        };
        if reqs.iter().any(|r| r.path == "/slow") {
            std::thread::sleep(SLOW);
        }
        reqs.iter()
            .map(|r| {
                let resp = self.answer(r, reqs.len(), draining);
                if r.path == "/long" {
                    let body = String::from_utf8(resp.body).unwrap();
                    self.queued.push((r.id, body, heartbeats));
                    Reply::Queued
                } else {
                    Reply::Now(resp)
                }
            })
            .collect()
    }
    fn has_work(&self) -> bool {
        !self.queued.is_empty()
    }
    fn step(&mut self) -> Vec<(u64, Response)> {
        let now = self.seen.lock().unwrap().heartbeats;
        let (done, rest) = std::mem::take(&mut self.queued)
            .into_iter()
            .partition(|(_, _, since)| now >= since + LONG_HEARTBEATS);
        self.queued = rest;
        done.into_iter()
            .map(|(id, body, _)| (id, Response::json(200, body.into_bytes())))
            .collect()
    }
    fn cancel(&mut self, id: u64) {
        self.queued.retain(|(q, _, _)| *q != id);
    }
}

#[derive(Debug, Default)]
struct Seen {
    heartbeats: u64,
    /// The last heartbeat's latencies.
    latency: Latency,
    draining: Vec<u32>,
    /// The paths of every batch the service was handed, in order.
    batches: Vec<Vec<String>>,
}

/// The worker's end of a real control channel (the runtime's frames over a socket pair).
struct TestControl {
    sock: UnixStream,
    reader: FrameReader,
    seen: Arc<Mutex<Seen>>,
}

impl Control for TestControl {
    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
    fn poll(&mut self) -> Result<Option<ParentMessage>, WorkerError> {
        match self
            .reader
            .read(&mut self.sock)
            .map_err(WorkerError::Control)?
        {
            ReadEvent::Frame(body) => Ok(Some(frame::decode(&body).map_err(WorkerError::Control)?)),
            ReadEvent::WouldBlock => Ok(None),
            ReadEvent::Eof => Err(WorkerError::Orphaned),
        }
    }
    fn heartbeat(&mut self, _served: u64, latency: &Latency) -> Result<(), WorkerError> {
        let mut seen = self.seen.lock().unwrap();
        seen.heartbeats += 1;
        seen.latency = latency.clone();
        Ok(())
    }
    fn draining(&mut self, in_flight: u32) -> Result<(), WorkerError> {
        self.seen.lock().unwrap().draining.push(in_flight);
        Ok(())
    }
}

/// A running loop. Dropping it closes the control channel (the loop ends as orphaned) and
/// waits for the thread, with a deadline.
struct Running {
    addr: std::net::SocketAddr,
    supervisor: Option<UnixStream>,
    seen: Arc<Mutex<Seen>>,
    done: mpsc::Receiver<io::Result<Exit>>,
    thread: Option<JoinHandle<()>>,
}

const DEADLINE: Duration = Duration::from_secs(10);

impl Running {
    fn start(limits: Limits) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener, limits, |_| {})
    }

    /// Starts the loop on `listener`, after `before(addr)` ran (to queue connections first).
    fn start_on(
        listener: std::net::TcpListener,
        limits: Limits,
        before: impl FnOnce(std::net::SocketAddr),
    ) -> Self {
        Self::start_named(listener, limits, before, "")
    }

    /// [`Running::start_on`] with an [`Echo`] that names itself `name` in its answers.
    fn start_named(
        listener: std::net::TcpListener,
        limits: Limits,
        before: impl FnOnce(std::net::SocketAddr),
        name: &'static str,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        before(addr);
        let (worker_end, supervisor) = UnixStream::pair().unwrap();
        worker_end.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut control = TestControl {
            sock: worker_end,
            reader: FrameReader::default(),
            seen: seen.clone(),
        };
        let (tx, done) = mpsc::channel();
        let echo_seen = seen.clone();
        let thread = std::thread::spawn(move || {
            let mut echo = Echo {
                name,
                seen: echo_seen,
                queued: Vec::new(),
            };
            let _ = tx.send(run(vec![listener], &mut control, &mut echo, &limits));
        });
        Self {
            addr,
            supervisor: Some(supervisor),
            seen,
            done,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> StdStream {
        let s = StdStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    fn drain(&mut self, deadline_ms: u64) {
        let msg = frame::encode(&ParentMessage::Drain { deadline_ms }).unwrap();
        self.supervisor.as_mut().unwrap().write_all(&msg).unwrap();
    }

    /// Waits until `cond` holds on what the control channel saw.
    fn wait_seen(&self, what: &str, cond: impl Fn(&Seen) -> bool) {
        let start = Instant::now();
        while !cond(&self.seen.lock().unwrap()) {
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn exit(&mut self) -> Exit {
        let exit = self
            .done
            .recv_timeout(DEADLINE)
            .expect("the loop did not end")
            .expect("the loop failed");
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        exit
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.supervisor.take();
        if self.thread.is_some() {
            let _ = self.done.recv_timeout(DEADLINE);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A parsed answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    close: bool,
    body: String,
}

/// Reads one answer (status line, headers, Content-Length body) from `s`, skipping a
/// `100 Continue`.
fn read_answer(s: &mut StdStream, pending: &mut Vec<u8>) -> Answer {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(pending) {
            let status = resp.code.unwrap();
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap_or(0);
            let close = resp
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("connection") && h.value == b"close");
            if status == 100 {
                pending.drain(..n);
                continue;
            }
            if pending.len() >= n + len {
                let body = String::from_utf8_lossy(&pending[n..n + len]).into_owned();
                pending.drain(..n + len);
                return Answer {
                    status,
                    close,
                    body,
                };
            }
        }
        let got = s.read(&mut chunk).expect("reading the answer");
        assert!(
            got > 0,
            "connection closed before a whole answer; have {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..got]);
    }
}

fn roundtrip(s: &mut StdStream, raw: &[u8]) -> Answer {
    s.write_all(raw).unwrap();
    read_answer(s, &mut Vec::new())
}

/// Whether the server closed `s` (EOF, or a reset) within the deadline.
fn closed_by_server(s: &mut StdStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

fn post(body: &str) -> Vec<u8> {
    format!(
        "POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn keep_alive_and_pipelining() {
    let rt = Running::start(limits());
    let mut c = rt.connect();
    let a = roundtrip(&mut c, GET);
    assert_eq!(
        (a.status, a.close, a.body.as_str()),
        (200, false, "GET /healthz 0 batch=1 draining=false")
    );
    let a = roundtrip(&mut c, &post("{\"input\": 1}"));
    assert_eq!(a.body, "POST /embed 12 batch=1 draining=false");
    // Two requests in one write: both answered, in order.
    let mut two = post("ab");
    two.extend_from_slice(GET);
    c.write_all(&two).unwrap();
    let mut pending = Vec::new();
    assert!(read_answer(&mut c, &mut pending)
        .body
        .starts_with("POST /embed 2 "));
    assert!(read_answer(&mut c, &mut pending)
        .body
        .starts_with("GET /healthz 0 "));
    // A request in pieces.
    let raw = post("hello");
    for piece in raw.chunks(7) {
        c.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(read_answer(&mut c, &mut Vec::new())
        .body
        .starts_with("POST /embed 5 "));
    // Connection: close is honoured.
    let a = roundtrip(
        &mut c,
        b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(a.close);
    assert!(closed_by_server(&mut c));
}

#[test]
fn expect_continue_gets_a_100() {
    let rt = Running::start(limits());
    let mut c = rt.connect();
    c.write_all(
        b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    c.write_all(b"abcd").unwrap();
    let mut pending = buf[n..n].to_vec();
    assert!(read_answer(&mut c, &mut pending)
        .body
        .starts_with("POST /embed 4 "));
}

#[test]
fn requests_that_arrive_during_a_batch_are_computed_together() {
    let rt = Running::start(limits());
    let mut clients: Vec<StdStream> = (0..3).map(|_| rt.connect()).collect();
    // Every connection is accepted and served once first.
    for c in &mut clients {
        c.write_all(GET).unwrap();
        assert_eq!(read_answer(c, &mut Vec::new()).status, 200);
    }
    // Client 0's request makes a slow batch; the other two arrive while it is computed (the
    // test waits until the service has it) and are handed to the service together in the
    // next one.
    clients[0]
        .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    rt.wait_seen("the slow batch", |s| {
        s.batches
            .last()
            .is_some_and(|b| b.iter().any(|p| p == "/slow"))
    });
    for c in &mut clients[1..] {
        c.write_all(GET).unwrap();
    }
    let bodies: Vec<String> = clients
        .iter_mut()
        .map(|c| read_answer(c, &mut Vec::new()).body)
        .collect();
    assert!(
        bodies[1..].iter().all(|b| !b.contains("batch=1")),
        "{bodies:?}"
    );
    drop(rt);
}

/// Two connections, each served once, then: A's slow request is being computed when B's
/// request arrives. Returns both, with the time A's slow answer was read.
fn slow_a_then_b(rt: &Running) -> (StdStream, StdStream, Instant) {
    let mut a = rt.connect();
    let mut b = rt.connect();
    for c in [&mut a, &mut b] {
        c.write_all(GET).unwrap();
        assert_eq!(read_answer(c, &mut Vec::new()).status, 200);
    }
    a.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    rt.wait_seen("the slow batch", |s| {
        s.batches
            .last()
            .is_some_and(|b| b.iter().any(|p| p == "/slow"))
    });
    b.write_all(GET).unwrap();
    assert!(read_answer(&mut a, &mut Vec::new())
        .body
        .contains("/slow 0 batch=1"));
    (a, b, Instant::now())
}

#[test]
fn a_waiting_request_is_held_for_the_connection_just_answered() {
    // B's request waits while A's slow one is computed. A's client sends its next request as
    // soon as it has the answer; the loop holds B's request for it (up to batch_wait), and
    // both go to the service in one batch.
    let rt = Running::start(Limits {
        batch_wait: Duration::from_secs(2),
        ..limits()
    });
    let (mut a, mut b, _) = slow_a_then_b(&rt);
    a.write_all(GET).unwrap();
    assert!(read_answer(&mut a, &mut Vec::new())
        .body
        .contains("batch=2"));
    assert!(read_answer(&mut b, &mut Vec::new())
        .body
        .contains("batch=2"));
    drop(rt);
}

#[test]
fn the_hold_ends_at_batch_wait() {
    // Same, but A's client sends nothing more: B's request is answered alone once batch_wait
    // has passed, not later.
    let wait = Duration::from_millis(300);
    let rt = Running::start(Limits {
        batch_wait: wait,
        ..limits()
    });
    let (_a, mut b, answered_a) = slow_a_then_b(&rt);
    let body = read_answer(&mut b, &mut Vec::new()).body;
    let held = answered_a.elapsed();
    assert!(body.contains("batch=1"), "{body}");
    // A's answer was written before the hold began, so the hold is at most `wait` (plus the
    // scheduling of a loaded machine); and it did happen.
    assert!(held >= wait / 2, "held {held:?}");
    assert!(held < wait + DEADLINE / 2, "held {held:?}");
    drop(rt);
}

#[test]
fn a_lone_client_is_never_held() {
    // With nobody else waiting, a client's next request is computed at once, however long
    // batch_wait is.
    let rt = Running::start(Limits {
        batch_wait: DEADLINE * 10,
        ..limits()
    });
    let mut c = rt.connect();
    for _ in 0..5 {
        assert_eq!(roundtrip(&mut c, GET).status, 200);
    }
    // And a new connection's request, with the first one just answered, waits for nothing
    // when the first client closes.
    drop(c);
    assert_eq!(roundtrip(&mut rt.connect(), GET).status, 200);
    drop(rt);
}

#[test]
fn a_pipelined_request_does_not_jump_ahead_of_other_connections() {
    let rt = Running::start(limits());
    let mut a = rt.connect();
    let mut b = rt.connect();
    // Both connections are accepted and served once first.
    for c in [&mut a, &mut b] {
        c.write_all(GET).unwrap();
        assert_eq!(read_answer(c, &mut Vec::new()).status, 200);
    }
    // A pipelines two slow requests; B sends one while A's first is computed. B's request
    // must go into the very next batch, beside A's second, not wait behind it.
    a.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    b.write_all(GET).unwrap();
    let from_b = read_answer(&mut b, &mut Vec::new()).body;
    assert!(from_b.contains("batch=2"), "B's answer: {from_b}");
    let mut pending = Vec::new();
    for _ in 0..2 {
        assert_eq!(read_answer(&mut a, &mut pending).status, 200);
    }
    drop(rt);
}

#[test]
fn a_burst_of_connections_is_shared_between_workers() {
    // Two loops on one listener, as two workers; four clients connect one after the other, as
    // a load generator does, each sending a request that keeps its worker busy as soon as it
    // is connected. A worker accepts one connection per turn of its loop, so it finds the
    // first request (and starts computing) after at most a couple of accepts, and the other
    // worker takes the rest of the burst meanwhile.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.try_clone().unwrap();
    let a = Running::start_named(listener, limits(), |_| {}, "a");
    let b = Running::start_named(other, limits(), |_| {}, "b");
    let mut clients: Vec<StdStream> = (0..4)
        .map(|_| {
            let mut c = a.connect();
            c.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    let bodies: Vec<String> = clients
        .iter_mut()
        .map(|c| read_answer(c, &mut Vec::new()).body)
        .collect();
    for w in ["worker=a", "worker=b"] {
        assert!(
            bodies.iter().any(|b| b.contains(w)),
            "{w} served some of the burst: {bodies:?}"
        );
    }
    drop((a, b));
}

#[test]
fn oversized_and_malformed_requests_get_an_answer_then_close() {
    let rt = Running::start(limits());
    // Body over the limit: 413, even while the client keeps sending the body.
    let mut c = rt.connect();
    c.write_all(b"POST /embed HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    let _ = c.write_all(&[b'x'; 30_000]);
    let a = read_answer(&mut c, &mut Vec::new());
    assert_eq!(a.status, 413);
    assert!(a.close);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "body_too_large");
    // Headers over the limit: 431.
    let mut c = rt.connect();
    let a = roundtrip(
        &mut c,
        format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(3000)).as_bytes(),
    );
    assert_eq!(a.status, 431);
    // Not HTTP: 400.
    let mut c = rt.connect();
    let a = roundtrip(&mut c, b"\x16\x03\x01\x02\x00 hello\r\n\r\n");
    assert_eq!(a.status, 400);
    assert!(closed_by_server(&mut c));
    // The server still serves.
    assert_eq!(roundtrip(&mut rt.connect(), GET).status, 200);
}

#[test]
fn slow_and_idle_connections_time_out() {
    let rt = Running::start(Limits {
        request_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        ..limits()
    });
    // A request that never completes gets a 408.
    let mut slow = rt.connect();
    slow.write_all(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
        .unwrap();
    let start = Instant::now();
    let a = read_answer(&mut slow, &mut Vec::new());
    assert_eq!(a.status, 408);
    assert!(start.elapsed() >= Duration::from_millis(150));
    // An idle keep-alive connection is closed.
    let mut idle = rt.connect();
    assert_eq!(roundtrip(&mut idle, GET).status, 200);
    let start = Instant::now();
    assert!(closed_by_server(&mut idle));
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "closed after {:?}",
        start.elapsed()
    );
}

#[test]
fn connection_limit_leaves_the_rest_queued() {
    let rt = Running::start(Limits {
        max_connections: 2,
        ..limits()
    });
    let mut a = rt.connect();
    let mut b = rt.connect();
    assert_eq!(roundtrip(&mut a, GET).status, 200);
    assert_eq!(roundtrip(&mut b, GET).status, 200);
    // The third is left in the listen queue while two are open...
    let mut c = rt.connect();
    c.write_all(GET).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        c.read(&mut byte).is_err(),
        "the third connection was served over the limit"
    );
    // ...and served once one closes.
    drop(a);
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(read_answer(&mut c, &mut Vec::new()).status, 200);
}

#[test]
fn heartbeats_flow() {
    let rt = Running::start(Limits {
        heartbeat: Duration::from_millis(20),
        ..limits()
    });
    rt.wait_seen("three heartbeats", |s| s.heartbeats >= 3);
}

#[test]
fn heartbeats_flow_and_others_are_served_while_a_long_request_computes() {
    // `/long` completes only after the loop heartbeated several times while it was queued:
    // a loop that computed it in one go, without heartbeats between steps, would never answer.
    let rt = Running::start(Limits {
        heartbeat: Duration::from_millis(20),
        ..limits()
    });
    let mut long = rt.connect();
    long.write_all(b"GET /long HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    rt.wait_seen("the long request", |s| {
        s.batches.iter().flatten().any(|p| p == "/long")
    });
    // Meanwhile another connection is answered, before the long one.
    let mut other = rt.connect();
    let a = roundtrip(&mut other, GET);
    assert_eq!(a.status, 200);
    let a = read_answer(&mut long, &mut Vec::new());
    assert_eq!(a.status, 200);
    assert!(a.body.starts_with("GET /long 0 "), "{}", a.body);
    assert!(rt.seen.lock().unwrap().heartbeats >= LONG_HEARTBEATS);
}

#[test]
fn heartbeats_carry_the_latency_of_each_answered_request() {
    let rt = Running::start(Limits {
        heartbeat: Duration::from_millis(20),
        ..limits()
    });
    let mut c = rt.connect();
    c.write_all(GET).unwrap();
    assert_eq!(read_answer(&mut c, &mut Vec::new()).status, 200);
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut c, &mut Vec::new()).status, 200);
    rt.wait_seen("both requests in a heartbeat", |s| {
        s.latency.counts.iter().sum::<u64>() == 2
    });
    let seen = rt.seen.lock().unwrap();
    assert!(
        seen.latency.sum_us >= SLOW.as_micros() as u64,
        "the slow request's time is in the sum: {:?}",
        seen.latency
    );
}

#[test]
fn drain_finishes_accepted_work_and_exits() {
    let mut rt = Running::start(limits());
    // Two idle keep-alive connections, a connection with half a request, one with nothing
    // sent.
    let mut idle = rt.connect();
    assert_eq!(roundtrip(&mut idle, GET).status, 200);
    let mut silent = rt.connect();
    assert_eq!(roundtrip(&mut silent, GET).status, 200);
    let mut half = rt.connect();
    half.write_all(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
        .unwrap();
    let mut quiet = rt.connect();
    // Make sure the loop has read the half request before the drain.
    let mut probe = rt.connect();
    assert_eq!(roundtrip(&mut probe, GET).status, 200);

    rt.drain(5_000);
    rt.wait_seen("draining", |s| !s.draining.is_empty());
    // Within the grace (counted from the drain's start): an idle keep-alive connection's next
    // request is answered, and the connection closed after it.
    let a = roundtrip(&mut idle, GET);
    assert_eq!((a.status, a.close), (200, true));
    // The half request is finished and answered with Connection: close.
    half.write_all(b"cd").unwrap();
    let a = read_answer(&mut half, &mut Vec::new());
    assert_eq!((a.status, a.close), (200, true));
    assert!(a.body.ends_with("draining=true"), "{}", a.body);
    // The quiet one, accepted before the drain, may still send its request within the grace.
    let a = roundtrip(&mut quiet, GET);
    assert!(a.close);
    assert!(closed_by_server(&mut idle));
    // An idle connection that sends nothing is closed once the grace is over.
    assert!(closed_by_server(&mut silent));
    drop(probe);
    match rt.exit() {
        Exit::Drained { served } => assert!(served >= 6, "served {served}"),
        other => panic!("{other:?}"),
    }
    // The listener is gone from this worker: nobody accepts any more.
    let in_flight = rt.seen.lock().unwrap().draining[0];
    assert!(in_flight >= 2, "in flight at drain: {in_flight}");
}

#[test]
fn drain_accepts_the_queue() {
    // Connections that are in the listen queue when the drain starts are accepted and served.
    let mut rt = Running::start(Limits {
        max_connections: 1,
        ..limits()
    });
    let mut first = rt.connect();
    assert_eq!(roundtrip(&mut first, GET).status, 200);
    let mut queued: Vec<StdStream> = (0..3)
        .map(|_| {
            let mut s = rt.connect();
            s.write_all(GET).unwrap();
            s
        })
        .collect();
    rt.drain(5_000);
    for q in &mut queued {
        let a = read_answer(q, &mut Vec::new());
        assert_eq!((a.status, a.close), (200, true));
    }
    assert!(closed_by_server(&mut first));
    assert!(matches!(rt.exit(), Exit::Drained { .. }));
}

#[test]
fn drain_gives_up_at_the_deadline() {
    let mut rt = Running::start(Limits {
        request_timeout: Duration::from_secs(60),
        ..limits()
    });
    let mut stuck = rt.connect();
    stuck
        .write_all(b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\na")
        .unwrap();
    assert_eq!(roundtrip(&mut rt.connect(), GET).status, 200);
    let start = Instant::now();
    rt.drain(200);
    match rt.exit() {
        Exit::DrainTimedOut { abandoned } => assert_eq!(abandoned, 1),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(180));
}

#[test]
fn a_closed_control_channel_ends_the_loop() {
    let mut rt = Running::start(limits());
    assert_eq!(roundtrip(&mut rt.connect(), GET).status, 200);
    rt.supervisor.take();
    assert!(matches!(rt.exit(), Exit::Orphaned));
}

#[test]
fn random_bytes_never_stop_the_server() {
    let rt = Running::start(limits());
    let mut rng = Rng::new(99);
    for round in 0..200 {
        let mut c = rt.connect();
        let mut junk = rng.bytes(600);
        if round % 3 == 0 {
            // Start like a request, so that the header parser gets further.
            let mut m = b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n".to_vec();
            m.append(&mut junk);
            junk = m;
        }
        let _ = c.write_all(&junk);
        if round % 2 == 0 {
            let _ = c.shutdown(Shutdown::Write);
        }
    }
    assert_eq!(roundtrip(&mut rt.connect(), GET).status, 200);
}
