//! # `zygote._native`: the `zygote` Python package's native part
//!
//! A PyO3 extension over zygote-runtime, so a Python worker speaks the protocol, imports the
//! weights and verifies them through the same code as a Rust worker (no second
//! implementation). The pure-Python package (`python/zygote/`) builds the public API on it:
//!
//! - [`worker`]: attach, ready, heartbeat, draining, control messages, listeners, import;
//! - [`client`]: client mode, the weights of a running service in any process;
//! - [`weights`] and [`tensor`]: the imported weights as Python objects;
//! - [`dlpack`] and [`buffer`]: the two ways a tensor leaves Rust without a copy (the
//!   `unsafe` leaves);
//! - [`template`]: the app template, the zygote server hosted in the interpreter;
//! - [`errors`]: the exception types.
//!
//! See docs/PYTHON.md.

#![deny(unsafe_code)]

mod buffer;
mod client;
mod dlpack;
mod errors;
mod template;
mod tensor;
mod weights;
mod worker;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(worker::attach, m)?)?;
    m.add_function(wrap_pyfunction!(client::connect_weights, m)?)?;
    m.add_function(wrap_pyfunction!(template::serve_template, m)?)?;
    m.add_function(wrap_pyfunction!(template::page_out_file_mappings, m)?)?;
    m.add_function(wrap_pyfunction!(client::default_runtime_dir, m)?)?;
    m.add_class::<worker::PyWorker>()?;
    m.add_class::<weights::SharedWeights>()?;
    m.add_class::<tensor::SharedTensor>()?;
    m.add("ZygoteError", py.get_type::<errors::ZygoteError>())?;
    m.add(
        "NotAttachedError",
        py.get_type::<errors::NotAttachedError>(),
    )?;
    m.add("OrphanedError", py.get_type::<errors::OrphanedError>())?;
    m.add("WeightsError", py.get_type::<errors::WeightsError>())?;
    m.add("ATTACH_ENV", zygote_runtime::worker::ATTACH_ENV)?;
    Ok(())
}
