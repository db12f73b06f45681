//! Planning the device copy: pure arithmetic, no CUDA.
//!
//! The owner calls [`plan_arenas`] once per export to decide where every tensor of the compute
//! copy lives on the device, and [`decide_ipc`] once at start to choose how the arenas are
//! shared. Both are plain functions over plain inputs so that they are tested on machines
//! without a GPU, and so that the rules are in one place:
//!
//! - Tensors keep the model's order (sorted by file offset), so the upload reads the model's
//!   mapping front to back.
//! - Every tensor starts at a multiple of [`DEVICE_ALIGN`] (what `cuMemAlloc` guarantees, and
//!   what vectorised kernels and cuBLAS assume) and never straddles two arenas.
//! - Arenas are few: tensors are packed into one arena until the next one would push it over
//!   the cap ([`DEFAULT_ARENA_CAP`]); a tensor larger than the cap gets an arena of its own.
//!   Opening a handle costs time in every worker, so one handle per tensor would be slow.
//! - An arena's size is its used bytes rounded up to the allocation granularity
//!   (`cuMemGetAllocationGranularity`), as `cuMemCreate` and `cuMemMap` require.
//! - The dtypes are those of the host backend ([`host::widened_dtype`], its f32 form): f16 and bf16 are
//!   widened to f32, so that a worker's outputs on the GPU are comparable with the host
//!   backend's and the app has one code path per dtype.

use std::ops::Range;

use crate::backend::host;
use crate::backend::{BackendError, IpcChoice, ManifestError, TensorLayout};
use crate::model::TensorInfo;

/// Alignment of every tensor inside an arena, in bytes.
pub const DEVICE_ALIGN: u64 = 256;

/// Arenas are filled up to this many bytes before a new one is started (2 GiB).
pub const DEFAULT_ARENA_CAP: u64 = 2 << 30;

/// Size rounding used for legacy (`cuMemAlloc`) arenas, which have no granularity of their own:
/// the usual VMM granularity, so that both modes lay out the same model identically.
pub const LEGACY_GRANULARITY: u64 = 2 << 20;

/// `value` rounded up to a multiple of `granularity` (`None` on overflow or a zero granularity).
pub fn round_up(value: u64, granularity: u64) -> Option<u64> {
    if granularity == 0 {
        return None;
    }
    value.div_ceil(granularity).checked_mul(granularity)
}

/// One planned arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedArena {
    /// Bytes to allocate: `used` rounded up to the granularity, at least one granule.
    pub size: u64,
    /// Bytes from the start that hold tensors (padding between them included).
    pub used: u64,
    /// The tensors in this arena, as a range of [`ArenaPlan::tensors`].
    pub tensors: Range<usize>,
}

/// Where every tensor of the compute copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaPlan {
    pub arenas: Vec<PlannedArena>,
    /// In model order; `tensors[i]` is the compute form of the model's `i`-th tensor.
    pub tensors: Vec<TensorLayout>,
}

impl ArenaPlan {
    /// Bytes used in all arenas together.
    pub fn used(&self) -> u64 {
        self.arenas.iter().map(|a| a.used).sum()
    }

    /// Bytes allocated in all arenas together.
    pub fn size(&self) -> u64 {
        self.arenas.iter().map(|a| a.size).sum()
    }
}

/// Packs `tensors` (the model's index, in model order) into arenas of at most `cap` bytes
/// (rounded down to the granularity) whose sizes are multiples of `granularity`.
pub fn plan_arenas(
    tensors: &[TensorInfo],
    granularity: u64,
    cap: u64,
) -> Result<ArenaPlan, BackendError> {
    if granularity == 0 {
        return Err(ManifestError::ZeroGranularity.into());
    }
    let cap = (cap / granularity).max(1) * granularity;
    let overflow = |name: &str| -> BackendError {
        ManifestError::TensorSizeOverflow {
            tensor: name.to_string(),
        }
        .into()
    };
    let mut arenas = Vec::new();
    let mut layouts: Vec<TensorLayout> = Vec::with_capacity(tensors.len());
    let mut first = 0usize;
    let mut used = 0u64;
    let close = |first: usize, end: usize, used: u64| -> Result<PlannedArena, BackendError> {
        let size =
            round_up(used.max(1), granularity).ok_or(ManifestError::ArenaSizeOverflow { used })?;
        Ok(PlannedArena {
            size,
            used,
            tensors: first..end,
        })
    };
    for t in tensors {
        let dtype = host::widened_dtype(t.dtype);
        let len = t
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| overflow(&t.name))?;
        let mut offset = round_up(used, DEVICE_ALIGN).ok_or_else(|| overflow(&t.name))?;
        let mut end = offset.checked_add(len).ok_or_else(|| overflow(&t.name))?;
        if end > cap && layouts.len() > first {
            arenas.push(close(first, layouts.len(), used)?);
            first = layouts.len();
            offset = 0;
            end = len;
        }
        layouts.push(TensorLayout {
            name: t.name.clone(),
            dtype,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            arena: arenas.len() as u32,
            offset,
            len,
        });
        used = end;
    }
    if layouts.len() > first {
        arenas.push(close(first, layouts.len(), used)?);
    }
    Ok(ArenaPlan {
        arenas,
        tensors: layouts,
    })
}

/// What a device supports, from `cuDeviceGetAttribute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED`.
    pub vmm: bool,
    /// `CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED`.
    pub posix_fd: bool,
}

/// How the arenas are shared with workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcMode {
    /// `cuMemCreate` arenas exported as POSIX fds; they outlive the owner.
    Vmm,
    /// `cuMemAlloc` arenas shared by `cuIpcGetMemHandle`; they die with the owner.
    Legacy,
}

impl IpcMode {
    /// The spelling of `Manifest::ipc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Legacy => "legacy",
        }
    }

    /// The manifest's spelling of this mode.
    pub fn ipc(self) -> crate::protocol::Ipc {
        match self {
            Self::Vmm => crate::protocol::Ipc::Vmm,
            Self::Legacy => crate::protocol::Ipc::Legacy,
        }
    }

    /// The mode of a manifest's `ipc`, when it is a CUDA one.
    pub fn from_ipc(ipc: crate::protocol::Ipc) -> Option<Self> {
        match ipc {
            crate::protocol::Ipc::Vmm => Some(Self::Vmm),
            crate::protocol::Ipc::Legacy => Some(Self::Legacy),
            crate::protocol::Ipc::Memfd => None,
        }
    }

    /// Parses an `--ipc`-style name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vmm" => Some(Self::Vmm),
            "legacy" => Some(Self::Legacy),
            _ => None,
        }
    }
}

/// The outcome of [`decide_ipc`], with the reason to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcDecision {
    pub mode: IpcMode,
    pub reason: String,
}

/// Chooses the IPC mode for `choice` on a device with `caps` (device `ordinal`, for messages).
/// `--ipc vmm` on a device without POSIX-fd VMM handles is an error rather than a silent
/// downgrade: the user asked for arenas that survive the owner.
pub fn decide_ipc(
    choice: IpcChoice,
    caps: Capabilities,
    ordinal: u32,
) -> Result<IpcDecision, BackendError> {
    let missing = if !caps.vmm {
        Some("the device does not support virtual memory management")
    } else if !caps.posix_fd {
        Some("the device cannot export VMM allocations as POSIX fds")
    } else {
        None
    };
    match (choice, missing) {
        (IpcChoice::Legacy, _) => Ok(IpcDecision {
            mode: IpcMode::Legacy,
            reason: "--ipc legacy was asked for".into(),
        }),
        (IpcChoice::Vmm, None) => Ok(IpcDecision {
            mode: IpcMode::Vmm,
            reason: "--ipc vmm was asked for".into(),
        }),
        (IpcChoice::Vmm, Some(why)) => Err(BackendError::IpcUnsupported {
            requested: "vmm".into(),
            ordinal,
            reason: why.into(),
        }),
        (IpcChoice::Auto, None) => Ok(IpcDecision {
            mode: IpcMode::Vmm,
            reason: "the device exports VMM allocations as POSIX fds".into(),
        }),
        (IpcChoice::Auto, Some(why)) => Ok(IpcDecision {
            mode: IpcMode::Legacy,
            reason: format!("{why}; falling back to legacy IPC (workers restart with the owner)"),
        }),
    }
}

/// Formats a device UUID the way `nvidia-smi -L` does: `GPU-` and 8-4-4-4-12 hex digits.
pub fn format_uuid(bytes: [u8; 16]) -> String {
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses what [`format_uuid`] writes.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let rest = s.strip_prefix("GPU-")?;
    let groups: Vec<&str> = rest.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Dtype;

    const MIB: u64 = 1 << 20;

    fn tensor(name: &str, dtype: Dtype, shape: &[usize]) -> TensorInfo {
        let len = shape.iter().product::<usize>() * dtype.size();
        TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            offset: 0,
            len,
        }
    }

    /// A small deterministic generator, so the packing is checked on many shapes.
    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *state >> 33
    }

    fn check_invariants(tensors: &[TensorInfo], plan: &ArenaPlan, granularity: u64, cap: u64) {
        assert_eq!(plan.tensors.len(), tensors.len());
        let cap = (cap / granularity).max(1) * granularity;
        let mut next = 0usize;
        for (i, a) in plan.arenas.iter().enumerate() {
            assert_eq!(a.tensors.start, next, "arenas cover the tensors in order");
            assert!(a.tensors.end > a.tensors.start, "no empty arena");
            next = a.tensors.end;
            assert_eq!(
                a.size % granularity,
                0,
                "arena {i} size is a multiple of the granularity"
            );
            assert!(a.used <= a.size && a.size >= granularity);
            assert!(a.size - a.used < granularity.max(1) || a.used == 0);
            let alone = a.tensors.len() == 1;
            assert!(
                alone || a.used <= cap,
                "arena {i} over the cap holds several tensors"
            );
            let mut end = 0;
            for l in &plan.tensors[a.tensors.clone()] {
                assert_eq!(l.arena as usize, i);
                assert_eq!(l.offset % DEVICE_ALIGN, 0, "{} aligned", l.name);
                assert!(
                    l.offset >= end,
                    "{} does not overlap its predecessor",
                    l.name
                );
                end = l.offset + l.len;
                assert!(end <= a.used, "{} inside its arena", l.name);
            }
            assert_eq!(end, a.used, "used ends with the last tensor");
        }
        assert_eq!(next, tensors.len());
        for (t, l) in tensors.iter().zip(&plan.tensors) {
            assert_eq!(t.name, l.name, "model order kept");
            let widened = matches!(t.dtype, Dtype::F16 | Dtype::BF16);
            assert_eq!(l.len, t.len as u64 * if widened { 2 } else { 1 });
        }
        // A new arena only starts when the next tensor did not fit in the previous one.
        for w in plan.arenas.windows(2) {
            let first_next = &plan.tensors[w[1].tensors.start];
            let would_end = round_up(w[0].used, DEVICE_ALIGN).unwrap() + first_next.len;
            assert!(
                would_end > cap,
                "arena closed while {} still fit",
                first_next.name
            );
        }
    }

    #[test]
    fn round_up_handles_edges_and_overflow() {
        assert_eq!(round_up(0, 2 * MIB), Some(0));
        assert_eq!(round_up(1, 2 * MIB), Some(2 * MIB));
        assert_eq!(round_up(2 * MIB, 2 * MIB), Some(2 * MIB));
        assert_eq!(round_up(2 * MIB + 1, 2 * MIB), Some(4 * MIB));
        assert_eq!(round_up(1000, 3), Some(1002));
        assert_eq!(round_up(5, 0), None);
        assert_eq!(round_up(u64::MAX - 1, 2 * MIB), None);
        assert_eq!(round_up(u64::MAX, 1), Some(u64::MAX));
    }

    #[test]
    fn small_models_fit_one_arena_with_widened_dtypes() {
        let ts = vec![
            tensor("embed", Dtype::F16, &[100, 3]),
            tensor("ids", Dtype::I64, &[7]),
            tensor("norm", Dtype::BF16, &[3]),
            tensor("empty", Dtype::F32, &[0]),
            tensor("w", Dtype::F32, &[5, 5]),
        ];
        let plan = plan_arenas(&ts, 2 * MIB, DEFAULT_ARENA_CAP).unwrap();
        assert_eq!(plan.arenas.len(), 1);
        let dtypes: Vec<&str> = plan.tensors.iter().map(|l| l.dtype.as_str()).collect();
        assert_eq!(dtypes, ["F32", "I64", "F32", "F32", "F32"]);
        let offsets: Vec<u64> = plan.tensors.iter().map(|l| l.offset).collect();
        assert_eq!(offsets, [0, 1280, 1536, 1792, 1792]);
        assert_eq!(plan.arenas[0].used, 1792 + 100);
        assert_eq!(plan.arenas[0].size, 2 * MIB);
        check_invariants(&ts, &plan, 2 * MIB, DEFAULT_ARENA_CAP);
    }

    #[test]
    fn large_models_split_at_the_cap_and_big_tensors_get_their_own_arena() {
        // 3 × 3 MiB with an 8 MiB cap: two fit, the third opens arena 1; then a 20 MiB tensor
        // that is larger than any cap opens arena 2 alone, and the last one opens arena 3.
        let ts = vec![
            tensor("a", Dtype::F32, &[3 * MIB as usize / 4]),
            tensor("b", Dtype::F32, &[3 * MIB as usize / 4]),
            tensor("c", Dtype::F32, &[3 * MIB as usize / 4]),
            tensor("huge", Dtype::F16, &[5 * MIB as usize]),
            tensor("d", Dtype::U8, &[10]),
        ];
        let plan = plan_arenas(&ts, 2 * MIB, 8 * MIB).unwrap();
        let arenas: Vec<u32> = plan.tensors.iter().map(|l| l.arena).collect();
        assert_eq!(arenas, [0, 0, 1, 2, 3]);
        assert_eq!(plan.arenas[2].used, 20 * MIB);
        assert_eq!(plan.arenas[2].size, 20 * MIB);
        assert_eq!(plan.arenas[0].size, 6 * MIB);
        check_invariants(&ts, &plan, 2 * MIB, 8 * MIB);
    }

    #[test]
    fn packing_invariants_hold_on_many_random_models() {
        let mut seed = 42u64;
        let dtypes = [
            Dtype::F32,
            Dtype::F16,
            Dtype::BF16,
            Dtype::I64,
            Dtype::U8,
            Dtype::I32,
        ];
        for round in 0..300 {
            let n = (lcg(&mut seed) % 40) as usize;
            let ts: Vec<TensorInfo> = (0..n)
                .map(|i| {
                    let d = dtypes[(lcg(&mut seed) % dtypes.len() as u64) as usize];
                    let rows = (lcg(&mut seed) % 3000) as usize;
                    let cols = (lcg(&mut seed) % 700) as usize + 1;
                    tensor(&format!("t{round}.{i}"), d, &[rows, cols])
                })
                .collect();
            let granularity = [4096u64, 64 * 1024, 2 * MIB][round % 3];
            let cap = [granularity, 3 * MIB + 17, 16 * MIB, DEFAULT_ARENA_CAP][round % 4];
            let plan = plan_arenas(&ts, granularity, cap).unwrap();
            check_invariants(&ts, &plan, granularity, cap);
        }
    }

    #[test]
    fn an_empty_model_has_no_arena_and_a_zero_granularity_is_refused() {
        let plan = plan_arenas(&[], 2 * MIB, DEFAULT_ARENA_CAP).unwrap();
        assert!(plan.arenas.is_empty() && plan.tensors.is_empty());
        assert!(plan_arenas(&[tensor("x", Dtype::F32, &[1])], 0, 1).is_err());
        let huge = TensorInfo {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![usize::MAX / 2, 4],
            offset: 0,
            len: 0,
        };
        assert!(plan_arenas(&[huge], 2 * MIB, DEFAULT_ARENA_CAP).is_err());
    }

    #[test]
    fn the_ipc_decision_follows_the_table() {
        let full = Capabilities {
            vmm: true,
            posix_fd: true,
        };
        let no_fd = Capabilities {
            vmm: true,
            posix_fd: false,
        };
        let none = Capabilities {
            vmm: false,
            posix_fd: false,
        };
        let mode = |c, caps| decide_ipc(c, caps, 0).map(|d| d.mode);
        assert_eq!(mode(IpcChoice::Auto, full).unwrap(), IpcMode::Vmm);
        assert_eq!(mode(IpcChoice::Auto, no_fd).unwrap(), IpcMode::Legacy);
        assert_eq!(mode(IpcChoice::Auto, none).unwrap(), IpcMode::Legacy);
        assert_eq!(mode(IpcChoice::Vmm, full).unwrap(), IpcMode::Vmm);
        assert_eq!(mode(IpcChoice::Legacy, full).unwrap(), IpcMode::Legacy);
        assert_eq!(mode(IpcChoice::Legacy, none).unwrap(), IpcMode::Legacy);
        for caps in [no_fd, none] {
            match decide_ipc(IpcChoice::Vmm, caps, 3) {
                Err(BackendError::IpcUnsupported { ordinal: 3, .. }) => {}
                other => panic!("--ipc vmm without support must fail, got {other:?}"),
            }
        }
        let auto = decide_ipc(IpcChoice::Auto, no_fd, 0).unwrap();
        assert!(auto.reason.contains("POSIX fds"), "{}", auto.reason);
        assert_eq!(IpcMode::parse(IpcMode::Vmm.as_str()), Some(IpcMode::Vmm));
        assert_eq!(
            IpcMode::parse(IpcMode::Legacy.as_str()),
            Some(IpcMode::Legacy)
        );
        assert_eq!(IpcMode::parse("memfd"), None);
    }

    #[test]
    fn uuids_round_trip_in_the_nvidia_smi_spelling() {
        let bytes = [
            0x3b, 0x2e, 0x7f, 0x10, 0x55, 0xaa, 0x01, 0x02, 0x03, 0x04, 0xde, 0xad, 0xbe, 0xef,
            0x00, 0xff,
        ];
        let s = format_uuid(bytes);
        assert_eq!(s, "GPU-3b2e7f10-55aa-0102-0304-deadbeef00ff");
        assert_eq!(parse_uuid(&s), Some(bytes));
        for bad in [
            "3b2e7f10-55aa-0102-0304-deadbeef00ff",
            "GPU-3b2e7f10-55aa-0102-0304-deadbeef00f",
            "GPU-3b2e7f1055aa-0102-0304-deadbeef00ff",
            "GPU-zz2e7f10-55aa-0102-0304-deadbeef00ff",
            "MIG-3b2e7f10-55aa-0102-0304-deadbeef00ff",
            "",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }
}
