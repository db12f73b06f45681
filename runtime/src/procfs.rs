//! Reading `/proc` for the figures and audits the runtime reports: memory (PSS, RSS), the
//! mappings a process holds (no `libcuda` in the zygote or supervisor), its open fds and its
//! thread count.

use std::path::PathBuf;

/// Memory of one process, from `/proc/PID/smaps_rollup`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// Reads a process's RSS and PSS. `None` when it is gone or unreadable.
pub fn memory(pid: i32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let mut m = Memory::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Rss:"), Some(v)) => m.rss_kib = v.parse().unwrap_or(0),
            (Some("Pss:"), Some(v)) => m.pss_kib = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Some(m)
}

/// PSS (KiB) of the mappings of `pid` whose path contains `needle` (e.g. a memfd's name).
pub fn pss_of_mapping(pid: i32, needle: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-')
            && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
            && !first.ends_with(':')
        {
            inside = line.contains(needle);
        } else if inside {
            if let Some(v) = line.strip_prefix("Pss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    Some(total)
}

/// Whether any mapping of `pid` is a file whose name contains `needle` (e.g. `libcuda`).
pub fn maps_contain(pid: i32, needle: &str) -> std::io::Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(text.lines().any(|l| l.contains(needle)))
}

/// The open fds of `pid` with what they point to.
pub fn open_fds(pid: i32) -> std::io::Result<Vec<(i32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        out.push((fd, target));
    }
    out.sort();
    Ok(out)
}

/// Number of threads of `pid` (entries of `/proc/PID/task`).
pub fn thread_count(pid: i32) -> std::io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}
