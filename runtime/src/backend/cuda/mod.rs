//! The CUDA backend: the owner uploads the weights to the GPU once, and every worker maps that
//! one device copy into its own CUDA context.
//!
//! ```text
//! owner (zygote child)                          worker (zygote child)
//!   select_backend → CudaBackend::new             backend::import → cuda::import
//!   export: plan, cuMemCreate, upload,            precheck (no CUDA), cuInit, UUID check,
//!           digest, export fds ─── owner socket ──▶ import fds, map, digest → CudaWeights
//! zygote: keeps dups of the fds (no CUDA needed)  ──▶ new owner: CudaBackend::adopt
//! ```
//!
//! Modules, from the bottom up:
//!
//! - [`driver`]: the unsafe leaf. Safe wrappers over the driver API, loaded at run time by
//!   cudarc; nothing here runs unless [`driver::Driver::load`] found a complete libcuda.
//! - [`plan`]: pure arithmetic: granularity rounding, packing tensors into few arenas, the
//!   IPC decision, device UUID spelling.
//! - [`image`]: an arena's bytes, produced on the host chunk by chunk for the upload.
//! - [`digest`]: the content digest, and its recomputation from the device.
//! - [`owner`]: [`CudaBackend`], the owner's side ([`crate::backend::DeviceBackend`]).
//! - [`mod@import`]: the worker's side: [`import()`], [`CudaWeights`], [`DeviceTensor`],
//!   [`WeightView`].
//!
//! The compute copy has the host backend's dtypes (f16/bf16 widened to f32), so a GPU
//! worker's outputs are comparable with a CPU worker's and the app needs one code path per
//! dtype; the price is twice the VRAM for half-precision models.
//!
//! Owner death. A VMM arena lives while any fd, handle or mapping of it does, so whoever keeps
//! the exported fds (the zygote: holding an fd needs no CUDA) lets workers import while the
//! owner is down, and lets a new owner [`CudaBackend::adopt`] the generation instead of
//! uploading it again; workers already serving keep their mappings. Legacy IPC memory dies
//! with the owner that allocated it: a manifest whose `ipc` is `legacy` tells the supervisor
//! to drain and restart the workers once a new owner is up.
//!
//! Only the owner and the workers may call into this module's CUDA paths ([`probe`],
//! [`select_backend`], [`CudaBackend`], [`import()`]): they load libcuda, and the zygote and
//! the supervisor must never map it. Holding or passing a VMM fd needs no CUDA at all.

pub mod digest;
pub mod driver;
pub mod image;
pub mod import;
pub mod owner;
pub mod plan;

pub use import::{import, CudaWeights, DeviceTensor, Element, ImportTimings, WeightView};
pub use owner::CudaBackend;
pub use plan::{Capabilities, IpcMode};

use super::host::HostBackend;
use super::{
    BackendChoice, BackendError, CudaUnavailable, DeviceBackend, HostWeightsForm, IpcChoice,
};

/// What the driver says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: u32,
    /// As `nvidia-smi -L` spells it: `GPU-` and 8-4-4-4-12 hex digits.
    pub uuid: String,
    pub name: String,
    /// Bytes of device memory.
    pub total_mem: u64,
    pub capabilities: Capabilities,
}

/// What [`probe`] found: the driver and every device it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    /// `cuDriverGetVersion`, e.g. 12080 for 12.8.
    pub driver_version: i32,
    pub devices: Vec<DeviceInfo>,
}

pub(crate) fn device_info(
    driver: &driver::Driver,
    ordinal: u32,
) -> Result<DeviceInfo, BackendError> {
    let dev = driver.device(ordinal)?;
    Ok(DeviceInfo {
        ordinal,
        uuid: plan::format_uuid(dev.uuid()?),
        name: dev.name()?,
        total_mem: dev.total_mem()?,
        capabilities: owner::read_capabilities(&dev)?,
    })
}

/// Loads the driver and lists the devices. Without a usable driver or device this is
/// [`BackendError::CudaUnavailable`] with the reason; it never panics. It loads libcuda into
/// the calling process, so only an owner or a worker may call it.
pub fn probe() -> Result<DeviceSummary, BackendError> {
    let driver = driver::Driver::load()?;
    let count = driver.device_count()?;
    if count == 0 {
        return Err(CudaUnavailable::NoDevice.into());
    }
    let devices = (0..count)
        .map(|i| device_info(&driver, i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DeviceSummary {
        driver_version: driver.version()?,
        devices,
    })
}

/// The owner's backend for `--backend choice --ipc ipc --host-weights host_weights` on device
/// `device`, with the decision logged: `host` is the host backend (its compute copy in the
/// form `host_weights`); `cuda` is [`CudaBackend`] or an error (without CUDA:
/// [`BackendError::CudaUnavailable`]); `auto` is [`CudaBackend`] when CUDA is usable and the
/// host backend otherwise. Only the owner calls this (it may load libcuda).
pub fn select_backend(
    choice: BackendChoice,
    ipc: IpcChoice,
    host_weights: HostWeightsForm,
    device: u32,
) -> Result<Box<dyn DeviceBackend>, BackendError> {
    let cuda_ignores = || {
        if host_weights != HostWeightsForm::F32 {
            log::warn!("--host-weights {host_weights} applies to the host backend only");
        }
    };
    match choice {
        BackendChoice::Host => {
            log::info!("backend host (asked for), {host_weights} weights");
            Ok(Box::new(HostBackend::new(host_weights)))
        }
        BackendChoice::Cuda => {
            let b = CudaBackend::new(device, ipc)?;
            cuda_ignores();
            log::info!(
                "backend cuda (asked for) on device {device}, ipc {}",
                b.ipc()
            );
            Ok(Box::new(b))
        }
        BackendChoice::Auto => match CudaBackend::new(device, ipc) {
            Ok(b) => {
                cuda_ignores();
                log::info!(
                    "backend auto: using CUDA on device {device}, ipc {}",
                    b.ipc()
                );
                Ok(Box::new(b))
            }
            Err(BackendError::CudaUnavailable(why)) => {
                log::warn!(
                    "backend auto: CUDA is not usable ({why}); using the host backend, \
                     {host_weights} weights"
                );
                Ok(Box::new(HostBackend::new(host_weights)))
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this machine can run CUDA at all; the tests below expect different, exact
    /// outcomes on either kind of machine.
    fn cuda_usable() -> bool {
        probe().is_ok()
    }

    #[test]
    fn probe_explains_why_cuda_is_unavailable_and_never_panics() {
        match probe() {
            Ok(summary) => assert!(!summary.devices.is_empty()),
            Err(BackendError::CudaUnavailable(why)) => assert!(!why.to_string().is_empty()),
            Err(other) => panic!("probe must report CudaUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn backend_cuda_without_cuda_is_a_clear_error() {
        let r = select_backend(
            BackendChoice::Cuda,
            IpcChoice::Auto,
            HostWeightsForm::F32,
            0,
        );
        if cuda_usable() {
            assert_eq!(r.unwrap().name(), "cuda");
        } else {
            match r {
                Err(e @ BackendError::CudaUnavailable(_)) => {
                    assert!(
                        e.to_string().contains("CUDA backend is not available"),
                        "{e}"
                    )
                }
                Err(other) => panic!("expected CudaUnavailable, got {other}"),
                Ok(b) => panic!("expected CudaUnavailable, got backend {}", b.name()),
            }
        }
    }

    #[test]
    fn backend_auto_falls_back_to_host_and_host_is_host() {
        let auto = select_backend(
            BackendChoice::Auto,
            IpcChoice::Auto,
            HostWeightsForm::F32,
            0,
        )
        .unwrap();
        let want = if cuda_usable() { "cuda" } else { "host" };
        assert_eq!(auto.name(), want);
        let host =
            select_backend(BackendChoice::Host, IpcChoice::Vmm, HostWeightsForm::F32, 0).unwrap();
        assert_eq!((host.name(), host.ipc()), ("host", "memfd"));
    }

    #[test]
    fn a_device_that_does_not_exist_is_unavailable() {
        // With a driver the refusal names the device and the count; without one, why not.
        match CudaBackend::new(4096, IpcChoice::Auto) {
            Err(BackendError::CudaUnavailable(CudaUnavailable::NoSuchDevice {
                ordinal: 4096,
                ..
            })) => {}
            Err(BackendError::CudaUnavailable(
                CudaUnavailable::NoLibrary
                | CudaUnavailable::MissingSymbols { .. }
                | CudaUnavailable::Init { .. },
            )) if !cuda_usable() => {}
            other => panic!("expected CudaUnavailable, got {other:?}"),
        }
    }
}
