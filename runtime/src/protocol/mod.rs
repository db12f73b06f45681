//! The messages of the zygote runtime's sockets. `docs/PROTOCOL.md` is their specification;
//! this module is its source of truth in code.
//!
//! Four conversations use the same framing ([`frame`]):
//!
//! - the **zygote socket** (`zygote.sock`): a supervisor (ours or anyone's) sends [`Request`]s,
//!   the zygote answers with [`Response`]s; a spawned child's pidfd follows `spawned`, and its
//!   exit follows later as `exited` on the same connection;
//! - the **owner socket** (`owner-D.sock`): a worker asks the owner of device `D` for the
//!   weights ([`OwnerRequest`]) and gets a manifest and the handles ([`OwnerResponse`]);
//! - the **control channel**: a socketpair between a supervisor and one child. The child sends
//!   [`ChildMessage`]s (ready, heartbeat), the supervisor sends [`ParentMessage`]s (drain, stop).
//!   Its closing is the child's signal to end;
//! - the **admin socket** (`supervisor.sock`): `zygote status` and `zygote stop` talk to a
//!   running `zygote start` ([`AdminRequest`], [`AdminResponse`]).

pub mod frame;
pub mod strict;

use serde::{Deserialize, Serialize};

use crate::backend::Manifest;

/// Errors of framing and message parsing, shared by every socket.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("no complete frame arrived before the read deadline")]
    TimedOut,
    #[error("empty frame (length 0)")]
    EmptyFrame,
    #[error("frame is not valid CBOR: {0}")]
    Malformed(#[source] serde_cbor::Error),
    #[error("a frame must hold a CBOR map, not {found}")]
    NotAMap { found: &'static str },
    #[error(
        "unsupported protocol version {got} (this side speaks {})",
        frame::VERSION
    )]
    Version { got: String },
    #[error("invalid message: {0}")]
    Invalid(#[source] serde_cbor::Error),
    #[error("could not encode a message: {0}")]
    Encode(#[source] serde_cbor::Error),
    #[error("could not encode a message: it does not serialise to a map")]
    EncodeNotAMap,
    #[error("expected {expected}, received {received}")]
    Unexpected {
        expected: &'static str,
        received: String,
    },
    #[error("expected {expected} file descriptors: {reason}")]
    FdCount { expected: usize, reason: String },
    #[error("the peer answered with error {code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Error codes on the wire (`"code"` of an `error` message), in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The announced frame length is over [`frame::MAX_FRAME`]. The connection closes.
    FrameTooLarge,
    /// The peer stopped in the middle of a frame. The connection closes.
    Truncated,
    /// A frame was not finished within [`frame::READ_DEADLINE`]. The connection closes.
    ReadTimeout,
    /// The frame is not a CBOR map, or is empty (length 0: the connection then closes).
    BadCbor,
    /// The `"v"` field is missing or not [`frame::VERSION`].
    BadVersion,
    /// Unknown message type, unknown field, missing field or wrong field type.
    BadRequest,
    /// The entry named in a spawn is not in the zygote's allowlist.
    UnknownEntry,
    /// The fds after a frame are not the number it announced. The connection closes.
    BadFdCount,
    /// The peer's uid is not allowed (the connection closes), or this peer may not make this
    /// request (the connection stays open): see the trust model in `docs/PROTOCOL.md` §1.
    NotAllowed,
    /// A signal was aimed at a pid that is not a live child of this zygote.
    NotChild,
    /// The signal number is not one that may be sent.
    BadSignal,
    /// Too many live children or connections; see the limits in `hello`.
    Limit,
    /// The request would take what a live child holds: a second owner for a device.
    Conflict,
    /// `fork` failed in the zygote.
    ForkFailed,
    /// The zygote is shutting down.
    ShuttingDown,
    /// The owner could not serve the weights.
    Unavailable,
    /// Anything else; the message says what.
    Internal,
}

/// The limits a zygote enforces, announced in its `hello` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_frame: u32,
    pub read_deadline_ms: u32,
    pub max_listeners: u32,
    pub max_args: u32,
    pub max_arg_len: u32,
    pub max_connections: u32,
    pub max_children: u32,
    /// Connections one uid other than the zygote's may hold (0 from a zygote that predates it).
    #[serde(default)]
    pub max_connections_per_uid: u32,
    /// Connections only the zygote's own uid may use.
    #[serde(default)]
    pub service_reserved_connections: u32,
}

/// One entry of the zygote's allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryInfo {
    pub name: String,
    /// `"native"` (a function in the zygote binary, forked without exec) or `"exec"`.
    pub kind: String,
}

/// A client's request to the zygote. Every request carries an `id` that its answers repeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// First message of a connection: says who is asking.
    Hello { id: u64, client: String },
    /// Fork a child that runs `entry`. Followed on the socket by exactly `4 + listeners` fds:
    /// stdin, stdout, stderr, the control channel, then the listeners in order.
    Spawn {
        id: u64,
        entry: String,
        worker: WorkerId,
        #[serde(default)]
        args: Vec<String>,
        listeners: u32,
        #[serde(default)]
        device: Option<u32>,
        /// A warm spare: it gets ready, then waits for [`ParentMessage::Activate`] before it
        /// accepts on its listeners. Absent on the wire when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        spare: bool,
    },
    /// Send `signal` to `pid`, which must be a live child of this zygote.
    Signal { id: u64, pid: i32, signal: i32 },
    /// Ask for the zygote's state.
    Status { id: u64 },
    /// Ask the zygote to exit. Its children keep running (they belong to their requesters).
    Shutdown { id: u64 },
    /// An owner leaves the zygote a copy of the handles of the generation it exported for
    /// `device` (holding an fd needs no CUDA). Followed by `fds` fds in the order of
    /// `manifest.arenas`. Replaces what was kept for that device.
    KeepWeights {
        id: u64,
        device: u32,
        manifest: Manifest,
        fds: u32,
    },
    /// Ask for what is kept for `device`: a worker while no owner is up, or a new owner that
    /// adopts the generation instead of building it again.
    FetchWeights { id: u64, device: u32 },
    /// Drop every kept generation (the service sleeps: once no owner and no worker maps them,
    /// their memory is freed). Answered `ok`.
    ReleaseWeights { id: u64 },
}

/// The zygote's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Hello {
        id: u64,
        server: String,
        pid: i32,
        entries: Vec<EntryInfo>,
        limits: Limits,
    },
    /// The child exists. Followed by one fd: its pidfd.
    Spawned {
        id: u64,
        pid: i32,
    },
    /// The child failed before its entry ran; `exited` follows.
    ChildError {
        id: u64,
        pid: i32,
        stage: String,
        message: String,
    },
    /// The child ended. `status` is the exit code, or minus the signal number.
    Exited {
        id: u64,
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
        status: i32,
    },
    Ok {
        id: u64,
    },
    Status {
        id: u64,
        status: ZygoteStatus,
    },
    /// What is kept for a device. Followed by `fds` fds in the order of `manifest.arenas`.
    Weights {
        id: u64,
        manifest: Manifest,
        fds: u32,
    },
    /// A request failed. `id` is absent when the request could not be read.
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
}

/// What `status` reports about a zygote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZygoteStatus {
    pub pid: i32,
    pub model_path: String,
    pub model_bytes: u64,
    pub model_digest: String,
    pub tensors: u32,
    pub backend: String,
    pub children: Vec<ChildInfo>,
    pub connections: u32,
    /// Generations kept per device: `(device, generation, ipc)`.
    #[serde(default)]
    pub kept: Vec<(u32, u64, String)>,
}

/// One live child of the zygote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildInfo {
    pub pid: i32,
    pub entry: String,
    pub worker: WorkerId,
    pub age_ms: u64,
}

/// A worker's request to an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OwnerRequest {
    /// Ask for the current weights. `model_digest` must match the owner's model.
    Import {
        id: u64,
        worker: WorkerId,
        model_digest: String,
    },
}

/// An owner's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OwnerResponse {
    /// The weights. Followed by `fds` fds, in the order of `manifest.arenas`.
    Manifest {
        id: u64,
        manifest: Manifest,
        fds: u32,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
}

/// The worker id: which of the service's workers a child is, from the supervisor's worker
/// role through the spawn request (`worker` on the wire), the zygote's child table and the
/// attach information to [`Worker::id()`](crate::Worker::id). One type for it everywhere, so
/// it is never mistaken for a device or a request id. On the wire it is a bare number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct WorkerId(pub u32);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The compute backend an owner serves its weights from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Host,
    Cuda,
}

/// How the weights travel from the owner to its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ipc {
    /// A sealed memfd (host backend).
    Memfd,
    /// CUDA VMM allocations exported as POSIX fds.
    Vmm,
    /// Legacy `cuIpcMemHandle` bytes (the memory dies with its owner).
    Legacy,
}

impl Backend {
    /// The backend named `name` (`"host"`, `"cuda"`), as manifests spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "host" => Some(Self::Host),
            "cuda" => Some(Self::Cuda),
            _ => None,
        }
    }
}

impl Ipc {
    /// The mechanism named `name` (`"memfd"`, `"vmm"`, `"legacy"`), as manifests spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "memfd" => Some(Self::Memfd),
            "vmm" => Some(Self::Vmm),
            "legacy" => Some(Self::Legacy),
            _ => None,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::Cuda => "cuda",
        })
    }
}

impl std::fmt::Display for Ipc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Memfd => "memfd",
            Self::Vmm => "vmm",
            Self::Legacy => "legacy",
        })
    }
}

/// What an owner's `ready` says it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedWeights {
    pub backend: Backend,
    pub ipc: Ipc,
    /// Bytes of weights in the compute copy (the arenas' used bytes).
    pub bytes: u64,
}

/// What a child tells its supervisor over the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChildMessage {
    /// The child serves. `generation` is the weights generation it imported, if any;
    /// `weights` is set by an owner (what it serves and how), `detail` is free text for logs.
    Ready {
        pid: i32,
        generation: Option<u64>,
        #[serde(default)]
        weights: Option<ServedWeights>,
        detail: String,
    },
    /// The child is alive; `served` counts requests answered so far, and `latency` (from a
    /// worker that measures it) how long they took.
    Heartbeat {
        served: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency: Option<Latency>,
    },
    /// The child stopped accepting and will exit when its in-flight work is done.
    Draining { in_flight: u32 },
}

/// Upper bounds (milliseconds) of the request-latency buckets of [`Latency`].
pub const LATENCY_BOUNDS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
];

/// The latencies of the requests a worker answered since it started, as a histogram the
/// supervisor adds up over workers (`/metrics`): `counts[i]` requests took at most
/// [`LATENCY_BOUNDS_MS`]`[i]`, the last count (one more than the bounds) took longer;
/// `sum_us` is their total in microseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            counts: vec![0; LATENCY_BOUNDS_MS.len() + 1],
            sum_us: 0,
        }
    }
}

impl Latency {
    /// Counts one request that took `took`.
    pub fn observe(&mut self, took: std::time::Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = LATENCY_BOUNDS_MS.partition_point(|b| b * 1000 < us);
        if let Some(n) = self.counts.get_mut(i) {
            *n += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }
}

/// What a supervisor tells a child over the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ParentMessage {
    /// Stop accepting, finish what was accepted (the accept queue included), then exit 0.
    Drain { deadline_ms: u64 },
    /// To a spare (spawned with `spare: true`): start accepting on the listeners it holds, as
    /// the worker of slot `worker` from now on.
    Activate { worker: WorkerId },
}

/// A request to a running `zygote start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Status {
        id: u64,
    },
    /// Drain and stop the whole service, as SIGTERM does.
    Stop {
        id: u64,
    },
    /// Roll the workers, as SIGHUP does; with `model`, serve that model file from now on: a
    /// new zygote loads and validates it, a new owner generation exports it, and the workers
    /// roll onto it (the progress and any error in [`ServiceStatus::reload`]).
    Reload {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    /// Run `workers` workers from now on (1 to 256), as SIGTTIN and SIGTTOU do one at a time.
    Scale {
        id: u64,
        workers: u32,
    },
    /// Drain every worker, then the owners, keeping the zygote (its sealed model memfd) and the
    /// listeners: the service holds no compute copy and no worker until it wakes.
    Sleep {
        id: u64,
    },
    /// Start the owners and the workers again after a sleep (nothing to do when awake).
    Wake {
        id: u64,
    },
}

/// A running `zygote start`'s answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminResponse {
    Status {
        id: u64,
        service: Box<ServiceStatus>,
    },
    Ok {
        id: u64,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
}

/// The state of a whole service, as `zygote status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    pub runtime_dir: String,
    pub model: String,
    pub backend: String,
    pub ipc: Option<String>,
    pub listen: Vec<String>,
    pub uptime_ms: u64,
    /// The number of workers the service runs (`--workers`, or the last `scale`).
    #[serde(default)]
    pub workers: u32,
    pub processes: Vec<ProcessStatus>,
    /// The last `reload --model`, if any.
    #[serde(default)]
    pub reload: Option<ModelReload>,
    /// Why the last code reload failed (its new app template died before it was ready), until
    /// a reload succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_error: Option<String>,
}

/// The progress of a `reload --model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelReload {
    /// The model file asked for.
    pub model: String,
    /// `loading` (a new zygote validates it), `owners` (the old owners drain, the new ones
    /// start), `rolling` (the workers roll onto it), `done`, or `failed`.
    pub state: String,
    /// Why it failed (the old model keeps serving).
    pub error: Option<String>,
}

/// One process of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessStatus {
    /// `supervisor`, `zygote`, `owner` or `worker`.
    pub role: String,
    /// The worker id, for workers; the device, for owners.
    pub slot: Option<u32>,
    pub pid: i32,
    /// `starting`, `serving`, `draining` (children); `running`, `restarting` (zygote);
    /// `starting`, `running`, `stopping` (supervisor).
    pub state: String,
    pub restarts: u32,
    /// Proportional set size, in KiB (shared pages split between their users).
    pub pss_kib: Option<u64>,
    /// Resident set size, in KiB.
    pub rss_kib: Option<u64>,
    pub age_ms: u64,
    pub served: Option<u64>,
    /// The weights' generation it serves (owners and workers, once ready).
    #[serde(default)]
    pub generation: Option<u64>,
    /// The model file of that generation.
    #[serde(default)]
    pub model: Option<String>,
    /// Why this slot's children were replaced so far.
    #[serde(default)]
    pub restart_reasons: RestartReasons,
}

/// Why a slot's children were replaced, counted per reason. `exit`, `signal` and `heartbeat`
/// are deaths (their sum is `restarts`); `roll` counts planned replacements (SIGHUP, `reload`,
/// the roll after a legacy-IPC owner's restart); `recycle` counts replacements after a request
/// or memory limit (`--max-requests`, `--max-rss`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartReasons {
    /// Exited with a code on its own.
    pub exit: u32,
    /// Killed by a signal the supervisor did not send.
    pub signal: u32,
    /// Killed by the supervisor: silent past `--timeout`, or not ready in time.
    pub heartbeat: u32,
    /// Replaced after `--max-requests` or `--max-rss`.
    pub recycle: u32,
    pub roll: u32,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it() {
        let mut l = Latency::default();
        for us in [0, 1000, 1001, 30_000_000, 30_000_001, u64::MAX] {
            l.observe(Duration::from_micros(us));
        }
        let mut want = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        want[0] = 2; // 0 and exactly 1 ms
        want[1] = 1; // just over 1 ms
        want[LATENCY_BOUNDS_MS.len() - 1] = 1; // exactly 30 s
        want[LATENCY_BOUNDS_MS.len()] = 2; // over every bound
        assert_eq!(l.counts, want);
        assert_eq!(l.sum_us, u64::MAX, "the sum saturates");
    }

    #[test]
    fn a_heartbeat_without_latency_reads_as_before() {
        let old = frame::raw_map(&[
            ("v", serde_cbor::Value::Integer(1)),
            ("type", serde_cbor::Value::Text("heartbeat".into())),
            ("served", serde_cbor::Value::Integer(3)),
        ]);
        let body = serde_cbor::to_vec(&old).expect("cbor");
        let m: ChildMessage = frame::decode(&body).expect("a heartbeat of an older worker");
        assert_eq!(
            m,
            ChildMessage::Heartbeat {
                served: 3,
                latency: None
            }
        );
    }

    /// The worker id's type is for the Rust side only: on the wire and in `ZYGOTE_ATTACH` it
    /// stays the bare number older clients send and read.
    #[test]
    fn a_worker_id_is_a_bare_number_on_the_wire() {
        assert_eq!(serde_json::to_string(&WorkerId(3)).unwrap(), "3");
        assert_eq!(serde_json::from_str::<WorkerId>("7").unwrap(), WorkerId(7));
        assert_eq!(
            serde_cbor::value::to_value(WorkerId(5)).unwrap(),
            serde_cbor::Value::Integer(5)
        );
    }
}
