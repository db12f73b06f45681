//! Handing back the file pages that only this process maps: what the app template does once
//! its import is done (python/zygote/template.py).
//!
//! Importing torch maps its shared libraries and touches pages of them that nothing touches
//! again: relocation and symbol tables, initialisers, and whole CUDA libraries (cuBLASLt,
//! Triton, NVRTC) that a CPU-only app loads but never calls. In the template those pages stay
//! mapped, so they are resident and charged to it alone (about 290 MiB for the seed 002 app),
//! while the workers forked from it map only what they run. [`page_out_file_mappings`] asks
//! the kernel to reclaim them now (`madvise(MADV_PAGEOUT)`, Linux ≥ 5.4) instead of leaving
//! them until memory runs short.
//!
//! Only pages the kernel can drop and read back unchanged are asked for: mappings of a file,
//! not writable, with no anonymous (copied-on-write) page in them, and not a memfd (the model's
//! and the compute copy's). The kernel reclaims only pages no other process maps, so what a
//! worker runs stays resident; a page that is needed later is read back from the file, once,
//! by the first process that touches it.
//!
//! An `unsafe` leaf: the `madvise` call lives here.
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

/// Errors of [`page_out_file_mappings`].
#[derive(Debug, thiserror::Error)]
pub enum PageOutError {
    #[error("reading /proc/self/smaps failed: {0}")]
    Smaps(#[source] std::io::Error),
    #[error("madvise(MADV_PAGEOUT) is not supported here (Linux 5.4 or later has it): {0}")]
    Unsupported(#[source] nix::Error),
}

/// A mapping [`page_out_file_mappings`] asks the kernel to reclaim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    pub start: usize,
    pub end: usize,
    pub path: String,
    /// Resident KiB when the smaps were read.
    pub rss_kib: u64,
}

/// What [`page_out_file_mappings`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedOut {
    /// Mappings asked for.
    pub mappings: usize,
    /// Resident KiB of those mappings before, and after.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub took: Duration,
}

/// The mappings of an smaps text (`/proc/PID/smaps`) whose pages can be dropped and read back
/// unchanged: backed by a file (not a memfd, not deleted, not a device), not writable, no
/// anonymous page, some page resident.
pub fn droppable(smaps: &str) -> Vec<FileMapping> {
    let mut out = Vec::new();
    let mut current: Option<(FileMapping, bool)> = None;
    let finish = |m: Option<(FileMapping, bool)>, out: &mut Vec<FileMapping>| {
        if let Some((m, ok)) = m {
            if ok && m.rss_kib > 0 {
                out.push(m);
            }
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = range(first) {
            finish(current.take(), &mut out);
            let perms = fields.next().unwrap_or("");
            current = path_of(line).map(|path| {
                let ok = perms.len() >= 2
                    && perms.as_bytes()[1] != b'w'
                    && path.starts_with('/')
                    && !path.starts_with("/memfd:")
                    && !path.starts_with("/dev/")
                    && !path.ends_with(" (deleted)");
                let m = FileMapping {
                    start,
                    end,
                    path,
                    rss_kib: 0,
                };
                (m, ok)
            });
            continue;
        }
        let Some((m, ok)) = current.as_mut() else {
            continue;
        };
        let value = fields.next().and_then(|v| v.parse::<u64>().ok());
        match (first, value) {
            ("Rss:", Some(v)) => m.rss_kib = v,
            ("Anonymous:", Some(v)) if v > 0 => *ok = false,
            _ => {}
        }
    }
    finish(current.take(), &mut out);
    out
}

/// `START-END` of a mapping's first line, in hex.
fn range(field: &str) -> Option<(usize, usize)> {
    let (a, b) = field.split_once('-')?;
    let start = usize::from_str_radix(a, 16).ok()?;
    let end = usize::from_str_radix(b, 16).ok()?;
    (start < end).then_some((start, end))
}

/// The path of a mapping's first line (`START-END PERMS OFFSET DEV INODE PATH`), which may
/// hold spaces; `None` for an anonymous mapping.
fn path_of(line: &str) -> Option<String> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        let cut = rest.find(char::is_whitespace)?;
        rest = &rest[cut..];
    }
    let path = rest.trim();
    (!path.is_empty()).then(|| path.to_string())
}

/// Resident KiB of the mappings of `smaps` that start at one of `starts`.
fn resident_of(smaps: &str, starts: &[usize]) -> u64 {
    droppable(smaps)
        .iter()
        .filter(|m| starts.contains(&m.start))
        .map(|m| m.rss_kib)
        .sum()
}

/// Asks the kernel to reclaim the pages of this process's [`droppable`] mappings that no
/// other process maps. A mapping unmapped meanwhile (by another thread) is skipped; a kernel
/// without `MADV_PAGEOUT` is an error, and nothing was changed.
pub fn page_out_file_mappings() -> Result<PagedOut, PageOutError> {
    let t0 = Instant::now();
    let read = || std::fs::read_to_string("/proc/self/smaps").map_err(PageOutError::Smaps);
    let maps = droppable(&read()?);
    let mut asked = Vec::with_capacity(maps.len());
    for m in &maps {
        // SAFETY: MADV_PAGEOUT changes no byte any thread can observe: the range is a
        // read-only mapping of a file with no anonymous page (checked by `droppable`), so a
        // reclaimed page reads back from the file exactly as it was. The advice takes no
        // pointer into Rust-owned memory; a range unmapped since the smaps were read makes
        // the call fail with ENOMEM and touches nothing.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_PAGEOUT,
            )
        };
        if rc == 0 {
            asked.push(m.start);
            continue;
        }
        let err = nix::Error::last();
        if err == nix::Error::EINVAL && asked.is_empty() {
            return Err(PageOutError::Unsupported(err));
        }
        log::debug!("madvise(MADV_PAGEOUT) of {} failed: {err}", m.path);
    }
    let before = maps
        .iter()
        .filter(|m| asked.contains(&m.start))
        .map(|m| m.rss_kib)
        .sum();
    let after = resident_of(&read()?, &asked);
    Ok(PagedOut {
        mappings: asked.len(),
        rss_before_kib: before,
        rss_after_kib: after,
        took: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f00000000-7f00010000 r-xp 00000000 08:01 1234 /usr/lib/libfoo.so
Size:                 64 kB
Rss:                  32 kB
Anonymous:             0 kB
7f00010000-7f00020000 r--p 00010000 08:01 1234 /usr/lib/libfoo.so
Size:                 64 kB
Rss:                  16 kB
Anonymous:             8 kB
7f00020000-7f00030000 rw-p 00020000 08:01 1234 /usr/lib/libfoo.so
Size:                 64 kB
Rss:                  16 kB
Anonymous:             0 kB
7f00030000-7f00040000 r--s 00000000 00:01 99 /memfd:zygote-model (deleted)
Size:                 64 kB
Rss:                  64 kB
Anonymous:             0 kB
7f00040000-7f00050000 rw-p 00000000 00:00 0
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f00050000-7f00060000 r--p 00000000 08:01 777 /opt/a dir/lib bar.so
Size:                 64 kB
Rss:                   4 kB
Anonymous:             0 kB
7f00060000-7f00070000 r--p 00000000 08:01 778 /usr/lib/cold.so
Size:                 64 kB
Rss:                   0 kB
Anonymous:             0 kB
7f00070000-7f00080000 r--p 00000000 08:01 779 /usr/lib/old.so (deleted)
Size:                 64 kB
Rss:                   8 kB
Anonymous:             0 kB
7fff0000-7fff1000 r--p 00000000 00:00 0 [vvar]
Rss:                   4 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_file_mappings_are_droppable() {
        let got = droppable(SMAPS);
        assert_eq!(
            got,
            vec![
                FileMapping {
                    start: 0x7f00000000,
                    end: 0x7f00010000,
                    path: "/usr/lib/libfoo.so".into(),
                    rss_kib: 32,
                },
                FileMapping {
                    start: 0x7f00050000,
                    end: 0x7f00060000,
                    path: "/opt/a dir/lib bar.so".into(),
                    rss_kib: 4,
                },
            ]
        );
    }

    #[test]
    fn a_file_only_this_process_maps_is_paged_out() {
        use std::io::Write;
        // A read-only private mapping of a fresh file, every page touched: resident, then
        // reclaimed by the call (no other process maps those pages).
        let dir = std::env::temp_dir().join(format!("zygote-pageout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages.bin");
        let len = 4 << 20;
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![7u8; len])
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let size = std::num::NonZeroUsize::new(len).unwrap();
        use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
        // SAFETY: a fresh read-only private mapping of a file of `len` bytes (no address hint,
        // so nothing existing is replaced), unmapped once below after its last use.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                &file,
                0,
            )
        }
        .unwrap();
        // SAFETY: `len` readable bytes at `ptr`, mapped until the munmap below.
        let map = unsafe { std::slice::from_raw_parts(ptr.as_ptr() as *const u8, len) };
        let sum: u64 = map.iter().step_by(4096).map(|&b| b as u64).sum();
        assert_eq!(sum, 7 * (len as u64 / 4096));
        let start = ptr.as_ptr() as usize;
        let smaps = || std::fs::read_to_string("/proc/self/smaps").unwrap();
        let resident = |s: &str| {
            droppable(s)
                .into_iter()
                .find(|m| m.start == start)
                .map_or(0, |m| m.rss_kib)
        };
        assert!(resident(&smaps()) >= 4096 - 64, "{}", resident(&smaps()));
        let done = page_out_file_mappings().unwrap();
        assert!(
            done.mappings >= 1 && done.rss_after_kib < done.rss_before_kib,
            "{done:?}"
        );
        assert!(resident(&smaps()) < 1024, "{}", resident(&smaps()));
        // The bytes read back unchanged.
        assert!(map.iter().all(|&b| b == 7));
        // SAFETY: the mapping made above, unmapped once; `map` is not used after this.
        unsafe { munmap(ptr, len) }.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
