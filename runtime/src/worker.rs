//! The worker API: what a process started by the zygote uses to join the service.
//!
//! A child finds everything at fixed places when its entry starts:
//!
//! | fd | what |
//! |---|---|
//! | 0, 1, 2 | stdin, stdout, stderr given by the requester |
//! | 3 ([`CONTROL_FD`]) | the control channel to the requester |
//! | 4 ([`MODEL_FD`]) | the model's sealed memfd |
//! | 5 .. 5+n ([`FIRST_LISTENER_FD`]) | the listeners, in the order of the request |
//!
//! and the rest of what it needs ([`AttachInfo`]) in the environment variable [`ATTACH_ENV`]
//! (JSON). A native entry is handed a [`Worker`] built from the same places; an exec'd program
//! calls [`Worker::attach`]. Either way the app then imports the weights from the owner
//! ([`Worker::import_weights`]), takes its listeners, reports [`Worker::ready`], serves, sends
//! heartbeats, and watches [`Worker::poll_control`] for a drain request.
//!
//! An `unsafe` leaf in one place: [`Worker::from_fixed_fds`] takes ownership of the fixed
//! descriptor numbers (`OwnedFd::from_raw_fd`), which only the zygote's placement makes sound.
#![allow(unsafe_code)]

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::{self, BackendError, Weights};
use crate::fdpass;
use crate::model::{Model, ModelError};
use crate::protocol::frame::{self, FrameReader, ReadEvent};
use crate::protocol::{
    ChildMessage, Latency, OwnerRequest, OwnerResponse, ParentMessage, ProtocolError, WorkerId,
};

/// The control channel's fd in every child.
pub const CONTROL_FD: i32 = 3;
/// The model memfd's fd in every child.
pub const MODEL_FD: i32 = 4;
/// The first listener's fd in every child.
pub const FIRST_LISTENER_FD: i32 = 5;
/// The environment variable holding [`AttachInfo`] as JSON.
pub const ATTACH_ENV: &str = "ZYGOTE_ATTACH";

/// The first wait of [`Worker::import_weights`] while no owner is up.
pub const FIRST_IMPORT_BACKOFF: Duration = Duration::from_millis(5);
/// The longest wait between two tries of [`Worker::import_weights`].
pub const MAX_IMPORT_BACKOFF: Duration = Duration::from_millis(250);

/// The wait after `delay`: doubled, up to [`MAX_IMPORT_BACKOFF`].
pub fn next_import_backoff(delay: Duration) -> Duration {
    (delay * 2).min(MAX_IMPORT_BACKOFF)
}

/// What an importer found while no owner was up, logged once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    NothingKept,
    ZygoteUnreachable(String),
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NothingKept => f.write_str("the zygote keeps no weights for it"),
            Self::ZygoteUnreachable(e) => write!(f, "the zygote is not reachable ({e})"),
        }
    }
}

/// What a child needs to know besides its fds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachInfo {
    /// The entry this child runs.
    pub entry: String,
    /// The worker id the requester gave it.
    pub worker: WorkerId,
    /// Arguments from the spawn request.
    pub args: Vec<String>,
    /// Number of listeners from fd 5 on.
    pub listeners: u32,
    /// The runtime directory (where the owner sockets are).
    pub runtime_dir: PathBuf,
    /// The model file the zygote loaded.
    pub model_path: PathBuf,
    /// The model's digest (computed once by the zygote).
    pub model_digest: String,
    /// The device requested for this child, if any.
    pub device: Option<u32>,
    /// A warm spare: after `ready` it waits for `activate` ([`Worker::wait_activation`])
    /// before it accepts on its listeners. Absent (false) for every other child.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spare: bool,
}

/// How a spare's wait for activation ended ([`Worker::wait_activation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// It was activated (or was no spare): serve now, as [`Worker::id`].
    Serve,
    /// It was asked to drain before it served: exit 0.
    Drained,
}

/// Errors of attaching and of talking to the owner and the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{ATTACH_ENV} is not set: this program must be started by a zygote")]
    NotAttached,
    #[error("{ATTACH_ENV} is invalid: {0}")]
    BadAttachInfo(String),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("could not reach the owner at {path} within {waited:?}: {source}")]
    OwnerUnreachable {
        path: PathBuf,
        waited: Duration,
        source: std::io::Error,
    },
    #[error("owner protocol: {0}")]
    Owner(ProtocolError),
    #[error("the owner socket {path} is served by uid {uid}, not by this service's")]
    OwnerNotTrusted { path: PathBuf, uid: u32 },
    #[error("control channel: {0}")]
    Control(ProtocolError),
    #[error("importing the weights: {0}")]
    Import(#[from] BackendError),
    #[error("the control channel is closed: the supervisor is gone")]
    Orphaned,
    #[error("this process has attached already: the fixed fds belong to its Worker")]
    AlreadyAttached,
}

/// A child of the zygote, attached to its supervisor.
#[derive(Debug)]
pub struct Worker {
    info: AttachInfo,
    /// Declared before `control`: fields drop in order, so the `SIGIO` handler stops watching
    /// the channel before it closes.
    _lifeline: crate::lifeline::Lifeline,
    control: UnixStream,
    reader: FrameReader,
    model: Model,
    listeners: Vec<OwnedFd>,
}

/// Name of the owner socket of device `device` (0 for the host backend) in the runtime
/// directory.
pub fn owner_socket_name(device: u32) -> String {
    format!("owner-{device}.sock")
}

/// Path of the owner socket of device `device` (0 for the host backend).
pub fn owner_socket(runtime_dir: &Path, device: u32) -> PathBuf {
    runtime_dir.join(owner_socket_name(device))
}

/// Whether this process adopted the fixed fds (see [`Worker::from_fixed_fds`]).
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// Lets a forked child adopt the fixed fds again although its parent (a process hosting a
/// zygote server, such as the Python app template, itself a worker) had adopted its own.
///
/// # Safety
///
/// Call it only in a child just forked, after the fixed numbers were given the child's own
/// fds, and only where the parent's `Worker` is never dropped or used in this child (it would
/// close or use the child's fds): the child runs its entry and exits.
pub unsafe fn forget_adoption_in_child() {
    ADOPTED.store(false, Ordering::SeqCst);
}

impl Worker {
    /// Attaches an exec'd program: reads [`ATTACH_ENV`] and adopts fds 3, 4 and the listeners.
    pub fn attach() -> Result<Self, WorkerError> {
        let raw = std::env::var(ATTACH_ENV).map_err(|_| WorkerError::NotAttached)?;
        let info: AttachInfo =
            serde_json::from_str(&raw).map_err(|e| WorkerError::BadAttachInfo(e.to_string()))?;
        // Children of this process must not believe they are attached too.
        std::env::remove_var(ATTACH_ENV);
        for fd in [CONTROL_FD, MODEL_FD] {
            if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
                return Err(WorkerError::BadAttachInfo(format!("fd {fd} is not open")));
            }
        }
        // SAFETY: ATTACH_ENV is set only by a zygote for the process it exec'd with the fixed
        // fds in place (checked open above); nothing in this process owns them yet, and the
        // one-shot guard in `from_fixed_fds` refuses a second adoption.
        unsafe { Self::from_fixed_fds(info) }
    }

    /// Builds the worker from the fixed fds (a native entry, after the zygote placed them).
    ///
    /// Works once per process: a second call returns [`WorkerError::AlreadyAttached`] rather
    /// than own the same descriptors twice.
    ///
    /// # Safety
    ///
    /// The zygote placed the control channel at [`CONTROL_FD`], the model memfd at [`MODEL_FD`]
    /// and `info.listeners` listeners from [`FIRST_LISTENER_FD`] on, and nothing else in this
    /// process owns those descriptors: they become the worker's, and it closes them.
    pub unsafe fn from_fixed_fds(info: AttachInfo) -> Result<Self, WorkerError> {
        if ADOPTED.swap(true, Ordering::SeqCst) {
            return Err(WorkerError::AlreadyAttached);
        }
        // SAFETY: the zygote placed the control channel at CONTROL_FD and the model memfd at
        // MODEL_FD and nothing else in this process owns them; `attach` checked they are open.
        let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
        // SAFETY: as above, for MODEL_FD.
        let model_fd = unsafe { OwnedFd::from_raw_fd(MODEL_FD) };
        let listeners = (0..info.listeners as i32)
            .map(|i| {
                // SAFETY: the zygote placed `info.listeners` listeners from FIRST_LISTENER_FD on;
                // each is owned here alone.
                unsafe { OwnedFd::from_raw_fd(FIRST_LISTENER_FD + i) }
            })
            .collect();
        for fd in [&control, &model_fd] {
            let _ = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
        }
        let control = UnixStream::from(control);
        let lifeline = crate::lifeline::install_handler(control.as_fd())
            .map_err(|e| WorkerError::Control(ProtocolError::Io(e.into())))?;
        control
            .set_nonblocking(true)
            .map_err(|e| WorkerError::Control(ProtocolError::Io(e)))?;
        let model = Model::from_memfd(model_fd, &info.model_path, &info.model_digest)?;
        Ok(Self {
            info,
            _lifeline: lifeline,
            control,
            reader: FrameReader::default(),
            model,
            listeners,
        })
    }

    pub fn info(&self) -> &AttachInfo {
        &self.info
    }

    /// The worker id the supervisor (or whoever spawned this child) gave it.
    pub fn id(&self) -> WorkerId {
        self.info.worker
    }

    pub fn args(&self) -> &[String] {
        &self.info.args
    }

    /// The model file's bytes and tensor index, shared with the zygote.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Takes the listeners (TCP listeners as the supervisor bound them).
    pub fn take_listeners(&mut self) -> Vec<std::net::TcpListener> {
        self.listeners
            .drain(..)
            .map(std::net::TcpListener::from)
            .collect()
    }

    /// Asks the owner for the weights, waiting up to `timeout` for it to be up, then verifies
    /// them against the model (manifest, digest) before returning.
    ///
    /// While no owner is up it imports the generation the zygote keeps, if any; with neither,
    /// it waits, backing off from 5 ms to [`MAX_IMPORT_BACKOFF`], and logs once per change of
    /// what it found rather than once per try.
    pub fn import_weights(&self, timeout: Duration) -> Result<Weights, WorkerError> {
        let device = self.info.device.unwrap_or(0);
        let path = owner_socket(&self.info.runtime_dir, device);
        let start = Instant::now();
        let mut delay = FIRST_IMPORT_BACKOFF;
        let mut seen: Option<Waiting> = None;
        loop {
            let source = match UnixStream::connect(&path) {
                Ok(stream) => {
                    if seen.is_some() {
                        log::info!("the owner of device {device} is up; importing");
                    }
                    return self.import_from_owner(stream, &path, timeout);
                }
                Err(source) => source,
            };
            // No owner is up: the zygote may keep the last generation's handles.
            let now = match self.fetch_kept(device) {
                Ok(Some((manifest, fds))) => {
                    log::info!(
                        "no owner is up; importing generation {} kept by the zygote",
                        manifest.generation
                    );
                    return Ok(backend::import(manifest, fds, &self.model)?);
                }
                Ok(None) => Waiting::NothingKept,
                Err(e) => Waiting::ZygoteUnreachable(e.to_string()),
            };
            if seen.as_ref() != Some(&now) {
                log::info!("no owner of device {device} is up ({source}) and {now}; waiting");
                seen = Some(now);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(WorkerError::OwnerUnreachable {
                    path,
                    waited,
                    source,
                });
            }
            std::thread::sleep(delay.min(timeout - waited));
            delay = next_import_backoff(delay);
        }
    }

    /// Imports from a connected owner socket, whose peer must be of this worker's own uid.
    fn import_from_owner(
        &self,
        mut stream: UnixStream,
        path: &Path,
        timeout: Duration,
    ) -> Result<Weights, WorkerError> {
        let us = nix::unistd::getuid().as_raw();
        match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) if c.uid() == us => {}
            Ok(c) => {
                return Err(WorkerError::OwnerNotTrusted {
                    path: path.to_path_buf(),
                    uid: c.uid(),
                })
            }
            Err(e) => return Err(WorkerError::Owner(ProtocolError::Io(e.into()))),
        }
        let req = OwnerRequest::Import {
            id: 1,
            worker: self.info.worker,
            model_digest: self.model.digest().to_string(),
        };
        frame::write_frame(&mut stream, &req).map_err(WorkerError::Owner)?;
        let answer: OwnerResponse =
            frame::read_frame(&mut stream, Some(timeout.max(Duration::from_secs(1))))
                .map_err(WorkerError::Owner)?
                .ok_or(WorkerError::Owner(ProtocolError::Truncated))?;
        match answer {
            OwnerResponse::Manifest { manifest, fds, .. } => {
                let mut handles = Vec::with_capacity(fds as usize);
                for _ in 0..fds {
                    frame::wait_readable(stream.as_fd(), frame::READ_DEADLINE)
                        .map_err(WorkerError::Owner)?;
                    handles.push(
                        fdpass::recv_fd(stream.as_fd())
                            .map_err(|e| WorkerError::Owner(ProtocolError::Io(e)))?,
                    );
                }
                Ok(backend::import(manifest, handles, &self.model)?)
            }
            OwnerResponse::Error { code, message, .. } => {
                Err(WorkerError::Owner(ProtocolError::Remote { code, message }))
            }
        }
    }

    /// What the zygote keeps for `device`: `Ok(None)` when it keeps nothing.
    fn fetch_kept(
        &self,
        device: u32,
    ) -> Result<Option<(backend::Manifest, Vec<OwnedFd>)>, ProtocolError> {
        let socket = self.info.runtime_dir.join(crate::rundir::ZYGOTE_SOCKET);
        let mut client = crate::client::ZygoteClient::connect(&socket, "worker")?;
        client.fetch_weights(device)
    }

    fn send(&mut self, msg: &ChildMessage) -> Result<(), WorkerError> {
        let bytes = frame::encode(msg).map_err(WorkerError::Control)?;
        // The socket is non-blocking; a frame this small fits unless the supervisor stopped
        // reading, and then a blocking write would only hang this worker with it.
        match self.control.write_all(&bytes) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(WorkerError::Orphaned),
            Err(e) => Err(WorkerError::Control(ProtocolError::Io(e))),
        }
    }

    /// Tells the supervisor this worker serves.
    pub fn ready(&mut self, generation: Option<u64>, detail: &str) -> Result<(), WorkerError> {
        self.send_ready(generation, None, detail)
    }

    /// Tells the supervisor this owner serves `weights` (backend and IPC mechanism, typed, so
    /// the supervisor need not read them out of `detail`).
    pub fn ready_serving(
        &mut self,
        generation: u64,
        weights: crate::protocol::ServedWeights,
        detail: &str,
    ) -> Result<(), WorkerError> {
        self.send_ready(Some(generation), Some(weights), detail)
    }

    fn send_ready(
        &mut self,
        generation: Option<u64>,
        weights: Option<crate::protocol::ServedWeights>,
        detail: &str,
    ) -> Result<(), WorkerError> {
        let pid = std::process::id() as i32;
        self.send(&ChildMessage::Ready {
            pid,
            generation,
            weights,
            detail: detail.to_string(),
        })
    }

    /// Tells the supervisor this worker is alive.
    pub fn heartbeat(&mut self, served: u64) -> Result<(), WorkerError> {
        self.send(&ChildMessage::Heartbeat {
            served,
            latency: None,
        })
    }

    /// A heartbeat that also carries the latencies of the requests served so far (the
    /// supervisor adds them up for `/metrics`).
    pub fn heartbeat_with_latency(
        &mut self,
        served: u64,
        latency: &Latency,
    ) -> Result<(), WorkerError> {
        self.send(&ChildMessage::Heartbeat {
            served,
            latency: Some(latency.clone()),
        })
    }

    /// Tells the supervisor this worker is draining.
    pub fn draining(&mut self, in_flight: u32) -> Result<(), WorkerError> {
        self.send(&ChildMessage::Draining { in_flight })
    }

    /// The control channel, to register in the app's poll loop (readable: call
    /// [`Worker::poll_control`]).
    pub fn control_fd(&self) -> BorrowedFd<'_> {
        self.control.as_fd()
    }

    /// Whether this child was spawned as a warm spare (see [`Worker::wait_activation`]).
    pub fn is_spare(&self) -> bool {
        self.info.spare
    }

    /// A spare's wait, after `ready`: heartbeats every second and does not accept until the
    /// supervisor sends `activate` (the worker then takes the slot it names, [`Worker::id`]),
    /// or `drain` (the spare served nothing: it exits). A child that is no spare returns at
    /// once. A spare holds its listeners all the while but never accepts on them, so the
    /// other workers take every connection.
    pub fn wait_activation(&mut self) -> Result<Activation, WorkerError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        while self.info.spare {
            match self.poll_control()? {
                Some(ParentMessage::Activate { worker }) => {
                    self.info.spare = false;
                    self.info.worker = worker;
                    // Its lines and its process title name the slot it serves from now on.
                    crate::logging::set_tag(&format!("worker {worker}"));
                    crate::proctitle::set(&crate::proctitle::title_for(&format!(
                        "worker {worker}"
                    )));
                    return Ok(Activation::Serve);
                }
                Some(ParentMessage::Drain { .. }) => return Ok(Activation::Drained),
                None => {}
            }
            self.heartbeat(0)?;
            let mut fds = [PollFd::new(self.control.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(WorkerError::Control(ProtocolError::Io(e.into()))),
            }
        }
        Ok(Activation::Serve)
    }

    /// Reads one pending message from the supervisor, if any, without blocking.
    pub fn poll_control(&mut self) -> Result<Option<ParentMessage>, WorkerError> {
        match self
            .reader
            .read(&mut self.control)
            .map_err(WorkerError::Control)?
        {
            ReadEvent::Frame(body) => Ok(Some(frame::decode(&body).map_err(WorkerError::Control)?)),
            ReadEvent::WouldBlock => Ok(None),
            ReadEvent::Eof => Err(WorkerError::Orphaned),
        }
    }
}
