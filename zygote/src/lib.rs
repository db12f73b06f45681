//! # zygote-server: the zygote process
//!
//! ```text
//! zygote start  (supervisor)
//!  └── zygote    <- this crate: single-threaded, CUDA-free, holds the model, forks on request
//!       ├── owner     (the `owner` entry, in [`owner`])
//!       └── worker N  (any other entry)
//! ```
//!
//! The zygote loads the model once ([`zygote_runtime::model`]), then serves the zygote socket
//! ([`server`]) until asked to stop. Each spawn request forks a child ([`fork`]) that is cleaned
//! up (fds, signals, session, title) before its entry runs: a native entry (a Rust function in
//! the binary, [`entries`]) or the exec entry (a program named when the zygote started). It
//! never starts a thread and never touches CUDA, so every fork is safe and every child may
//! initialise CUDA for itself.
//!
//! `unsafe` code is denied here except in [`fork`], the leaf that forks and places fds.

#![deny(unsafe_code)]

pub mod entries;
pub mod fork;
pub mod owner;
pub mod server;

pub use entries::{Entry, EntryTable, NativeEntry};
pub use server::{run, ServerConfig, ServerError};
