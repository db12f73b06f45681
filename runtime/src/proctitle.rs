//! The process title: what `ps` and `top` show for a zygote child (`zygote: worker 3` in the
//! argument area, `zygote-w3` as its 15-byte `comm`). The zygote sets it in each child right
//! after the fork (`zygote/src/fork.rs`); a warm spare sets it again when it is activated in a
//! slot, so that `ps` names the slot it serves, not the id it was spawned with.
//!
//! This is a leaf module that uses `unsafe`: it writes the process's own argument block.

#![allow(unsafe_code)]

use std::ffi::CString;

/// The title of a child in `role` (`worker 3`, `owner 0`): `zygote: worker 3`.
pub fn title_for(role: &str) -> String {
    format!("zygote: {role}")
}

/// Sets `comm` (15 bytes: `zygote-w3`) and rewrites the argument area that `ps` shows
/// (`zygote: worker 3`).
pub fn set(title: &str) {
    let comm = title
        .replace("zygote: ", "zygote-")
        .replace("worker ", "w")
        .replace("owner ", "o");
    if let Ok(c) = CString::new(comm.chars().take(15).collect::<String>()) {
        let _ = nix::sys::prctl::set_name(&c);
    }
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return;
    };
    // Fields after the comm start at field 3; arg_start and arg_end are fields 48 and 49.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let (Some(start), Some(end)) = (
        fields.get(45).and_then(|s| s.parse::<usize>().ok()),
        fields.get(46).and_then(|s| s.parse::<usize>().ok()),
    ) else {
        return;
    };
    if end <= start {
        return;
    }
    let len = end - start;
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    let p = start as *mut u8;
    // SAFETY: [arg_start, arg_end) is this process's own argument block on its stack, mapped
    // and writable for the life of the process; `n < len`, so we write within it. Nothing in
    // the process reads the old arguments after the fork (a native entry gets its arguments
    // from the attach info; a Python worker's interpreter copied its own at startup).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n) };
    // SAFETY: as above: bytes n..len of the same block, zeroed so `ps` ends the title there.
    unsafe { std::ptr::write_bytes(p.wrapping_add(n), 0, len - n) };
}
