//! # zygote-runtime: the pieces every zygote process shares
//!
//! The zygote runtime is four kinds of process (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//! zygote start  (supervisor)
//!  └── zygote    (single-threaded, CUDA-free, holds the model in a sealed memfd, forks on request)
//!       ├── owner     (builds the compute copy of the weights once and exports it)
//!       └── worker N  (imports the owner's weights, serves)
//! ```
//!
//! This crate holds what more than one of them needs:
//!
//! - [`model`]: the safetensors file, validated completely and held in a sealed memfd.
//! - [`rundir`]: the runtime directory, and the claim a process holds on a socket it serves.
//! - [`safetensors`]: the safetensors header parser and validator, and the dtypes.
//! - [`shm`]: sealed memfds and read-only mappings (an `unsafe` leaf).
//! - [`fdpass`]: sending and receiving fds with `SCM_RIGHTS` (an `unsafe` leaf).
//! - [`protocol`]: the framed CBOR messages of the zygote socket, the owner socket and the
//!   control channel, with their limits.
//! - [`backend`]: the device-backend trait and its host and CUDA implementations.
//! - [`worker`]: the API a worker uses (an `unsafe` leaf only where it adopts the fixed fds) (attach, weights, listeners, heartbeat, ready), whether
//!   it was forked as a native entry or exec'd as a program.
//! - [`client`]: a blocking client of the zygote socket, for supervisors written in Rust.
//! - [`lifeline`]: ties a child's life to its control channel (an `unsafe` leaf).
//! - [`pageout`]: the app template hands back the library pages only its import touched.
//! - [`pidfd`]: process fds (rustix), opened by the zygote and used to signal children.
//! - [`proctitle`]: the title `ps` shows for a child (an `unsafe` leaf).
//! - [`logging`]: a `log` backend that tags every line with the process that wrote it.

#![deny(unsafe_code)]

pub mod backend;
pub mod client;
pub mod fdpass;
pub mod lifeline;
pub mod logging;
pub mod model;
pub mod pageout;
pub mod pidfd;
pub mod procfs;
pub mod proctitle;
pub mod protocol;
pub mod rundir;
pub mod safetensors;
pub mod shm;
pub mod synth;
pub mod worker;

pub use model::{Model, ModelError};
pub use protocol::WorkerId;
pub use worker::{Activation, Worker, WorkerError};
