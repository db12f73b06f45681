//! [`CudaUnavailable`]: why the CUDA backend cannot be used in this process (no driver, a
//! driver too old, `cuInit` failing, no such device), as typed cases, so that `--backend auto`
//! and the tests tell "no CUDA here" from a failure without reading text.
//! [`BackendError::CudaUnavailable`](super::BackendError::CudaUnavailable) carries it.

/// Why CUDA cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    #[error(
        "libcuda was not found (no NVIDIA driver on this machine, or not on the library path)"
    )]
    NoLibrary,
    #[error("libcuda lacks {} (the NVIDIA driver is too old for this build)", missing.join(", "))]
    MissingSymbols { missing: Vec<&'static str> },
    /// `cuInit` failed: the driver's code (a `CUresult`) and its description.
    #[error("cuInit failed: {message}")]
    Init { code: u32, message: String },
    #[error("the driver sees no CUDA device")]
    NoDevice,
    #[error("there is no CUDA device {ordinal} (the driver sees {count})")]
    NoSuchDevice { ordinal: u32, count: u32 },
}
