//! The weights the zygote keeps for each device: the manifest and the exported fds of the
//! generation an owner left with `keep_weights`. Holding an fd needs no CUDA, and it keeps the
//! weights' memory alive while no owner is up; `fetch_weights` hands out duplicates.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use zygote_runtime::backend::Manifest;

/// One generation per device.
#[derive(Debug, Default)]
pub(super) struct KeptWeights {
    by_device: BTreeMap<u32, (Manifest, Vec<OwnedFd>)>,
}

impl KeptWeights {
    /// Keeps `manifest` and `fds` for `device`; returns the generation it replaces, if any.
    pub fn keep(&mut self, device: u32, manifest: Manifest, fds: Vec<OwnedFd>) -> Option<u64> {
        self.by_device
            .insert(device, (manifest, fds))
            .map(|(old, _)| old.generation)
    }

    /// A copy of what is kept for `device`: `None` when nothing is, `Some(Err)` when
    /// duplicating an fd failed (out of fds: the zygote answers with an error and goes on).
    pub fn fetch(&self, device: u32) -> Option<std::io::Result<(Manifest, Vec<OwnedFd>)>> {
        let (manifest, fds) = self.by_device.get(&device)?;
        let dups: std::io::Result<Vec<OwnedFd>> = fds.iter().map(|f| f.try_clone()).collect();
        Some(dups.map(|d| (manifest.clone(), d)))
    }

    /// Drops everything kept; returns the generations dropped.
    pub fn release(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.by_device)
            .into_values()
            .map(|(m, _)| m.generation)
            .collect()
    }

    /// What `status` shows: `(device, generation, ipc)`.
    pub fn describe(&self) -> Vec<(u32, u64, String)> {
        self.by_device
            .iter()
            .map(|(d, (m, _))| (*d, m.generation, m.ipc.to_string()))
            .collect()
    }
}
