//! Forking a child and cleaning it up before its entry runs. This is an `unsafe` leaf: `fork`,
//! raw fd placement, signal dispositions, pidfds and the process title live here and nowhere
//! else.
//!
//! What a child has when its entry starts (the "child hygiene" of the design):
//!
//! - its own session (`setsid`), so a terminal's Ctrl-C reaches the supervisor, which drains,
//!   rather than every worker at once;
//! - exactly the fds of [`zygote_runtime::worker`]'s table: stdio, the control channel at 3,
//!   the model memfd at 4, the listeners from 5 — every other fd is closed (`close_range`);
//! - every signal disposition at its default and an empty signal mask (a native entry then
//!   ignores `SIGPIPE`, as any freshly started Rust program does);
//! - a readable process title (`zygote: worker 3` in `ps`, `zygote-w3` as its comm);
//! - its control channel armed as its lifeline ([`zygote_runtime::lifeline`]).
//!
//! A failure before the entry runs is written to a status pipe (`stage`, NUL, message) that the
//! zygote turns into a `child_error` for the requester; the pipe closes unread when the entry
//! starts (native: closed by hand; exec: `O_CLOEXEC`).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::unistd::{ForkResult, Pid};
use zygote_runtime::worker::{AttachInfo, ATTACH_ENV, CONTROL_FD, FIRST_LISTENER_FD, MODEL_FD};
use zygote_runtime::Worker;

use crate::entries::Entry;

/// Exit code of a child that failed before its entry ran.
pub const SETUP_FAILED: i32 = 127;

/// Errors of forking, seen by the zygote.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("creating the status pipe failed: {0}")]
    Pipe(nix::Error),
    #[error("fork failed: {0}")]
    Fork(nix::Error),
    #[error("pidfd_open({pid}) failed: {source}")]
    Pidfd { pid: i32, source: std::io::Error },
    #[error("preparing the exec of {program}: {reason}")]
    Exec { program: String, reason: String },
}

/// Everything a child needs, prepared in the zygote before the fork.
#[derive(Debug)]
pub struct ChildPlan<'a> {
    /// Log tag, e.g. `worker 3`.
    pub tag: String,
    /// Process title, e.g. `zygote: worker 3`.
    pub title: String,
    pub info: AttachInfo,
    pub entry: &'a Entry,
    pub stdio: [OwnedFd; 3],
    pub control: OwnedFd,
    pub listeners: Vec<OwnedFd>,
    pub model: BorrowedFd<'a>,
}

/// A child just forked.
#[derive(Debug)]
pub struct Forked {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    /// Read end of the status pipe: end-of-file without data means the entry started.
    pub status: OwnedFd,
}

/// Prepared exec arguments (built before the fork so the child only calls exec).
struct ExecPlan {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

fn exec_plan(
    program: &std::path::Path,
    fixed: &[String],
    info: &AttachInfo,
) -> Result<ExecPlan, ForkError> {
    let err = |reason: String| ForkError::Exec {
        program: program.display().to_string(),
        reason,
    };
    let cprog =
        CString::new(program.as_os_str().as_encoded_bytes()).map_err(|e| err(e.to_string()))?;
    let mut argv = vec![cprog.clone()];
    for a in fixed.iter().chain(info.args.iter()) {
        argv.push(CString::new(a.as_bytes()).map_err(|e| err(e.to_string()))?);
    }
    let json = serde_json::to_string(info).map_err(|e| err(e.to_string()))?;
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k == ATTACH_ENV {
            continue;
        }
        let mut kv = k.into_encoded_bytes();
        kv.push(b'=');
        kv.extend_from_slice(v.as_encoded_bytes());
        if let Ok(c) = CString::new(kv) {
            envp.push(c);
        }
    }
    envp.push(CString::new(format!("{ATTACH_ENV}={json}")).map_err(|e| err(e.to_string()))?);
    Ok(ExecPlan {
        program: cprog,
        argv,
        envp,
    })
}

/// Forks a child that runs `plan.entry`.
pub fn spawn(plan: ChildPlan<'_>) -> Result<Forked, ForkError> {
    let exec = match plan.entry {
        Entry::Exec { program, args } => Some(exec_plan(program, args, &plan.info)?),
        Entry::Native(_) | Entry::Owner(_) => None,
    };
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ForkError::Pipe)?;
    // SAFETY: the zygote is single-threaded (an invariant checked by its tests), so the child
    // starts with consistent allocator and lock state and may run ordinary Rust code.
    match unsafe { nix::unistd::fork() }.map_err(ForkError::Fork)? {
        ForkResult::Child => {
            drop(status_r);
            child_main(plan, exec, status_w)
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            let pidfd = match pidfd_open(child.as_raw()) {
                Ok(fd) => fd,
                Err(source) => {
                    // A child nobody could track or report must not run: end and reap it.
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    return Err(ForkError::Pidfd {
                        pid: child.as_raw(),
                        source,
                    });
                }
            };
            Ok(Forked {
                pid: child,
                pidfd,
                status: status_r,
            })
        }
    }
}

/// Runs in the child: set up, then run the entry. Never returns.
fn child_main(plan: ChildPlan<'_>, exec: Option<ExecPlan>, status_w: OwnedFd) -> ! {
    zygote_runtime::logging::set_tag(&plan.tag);
    let status_fd = FIRST_LISTENER_FD + plan.listeners.len() as i32;
    let entry = plan.entry.clone();
    let info = plan.info.clone();
    if let Err((stage, message)) = setup(plan, status_w) {
        report(status_fd, stage, &message);
        // SAFETY: _exit ends the child at once without running the zygote's destructors or
        // atexit handlers, which belong to the zygote.
        unsafe { libc::_exit(SETUP_FAILED) };
    }
    match (entry.native(), exec) {
        (None, Some(exec)) => {
            let e = nix::unistd::execve(&exec.program, &exec.argv, &exec.envp).unwrap_err();
            report(
                status_fd,
                "exec",
                &format!("exec of {:?} failed: {e}", exec.program),
            );
            // SAFETY: as above.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
        (Some(f), _) => {
            // A Rust program starts with SIGPIPE ignored; a native entry is one.
            // SAFETY: SIG_IGN installs no handler code; this process has a single thread.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            let worker = match Worker::from_fixed_fds(info) {
                Ok(w) => w,
                Err(e) => {
                    report(status_fd, "attach", &e.to_string());
                    // SAFETY: as above.
                    unsafe { libc::_exit(SETUP_FAILED) }
                }
            };
            // SAFETY: `status_fd` is the status pipe placed by `setup`, owned by nobody else;
            // closing it tells the zygote the entry started.
            drop(unsafe { OwnedFd::from_raw_fd(status_fd) });
            let code = f(worker);
            std::process::exit(code)
        }
        (None, None) => {
            report(status_fd, "exec", "no exec plan for the exec entry");
            // SAFETY: as above.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
    }
}

fn report(status_fd: RawFd, stage: &str, message: &str) {
    log::error!("failed before the entry ran ({stage}): {message}");
    // SAFETY: `status_fd` is the status pipe's write end, placed by `setup` (or still at its
    // original number when setup failed early, in which case the write fails harmlessly with
    // EBADF); ManuallyDrop keeps us from closing a descriptor we may not own.
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(status_fd) });
    let _ = f.write_all(format!("{stage}\0{message}").as_bytes());
}

type SetupError = (&'static str, String);

fn setup(plan: ChildPlan<'_>, status_w: OwnedFd) -> Result<(), SetupError> {
    nix::unistd::setsid().map_err(|e| ("setsid", e.to_string()))?;
    // Sources in target order: 0,1,2, control (3), model (4), listeners (5..), status pipe.
    let [stdin, stdout, stderr] = plan.stdio;
    let mut sources: Vec<RawFd> = vec![
        stdin.as_raw_fd(),
        stdout.as_raw_fd(),
        stderr.as_raw_fd(),
        plan.control.as_raw_fd(),
    ];
    sources.push(plan.model.as_raw_fd());
    sources.extend(plan.listeners.iter().map(|l| l.as_raw_fd()));
    sources.push(status_w.as_raw_fd());
    debug_assert_eq!(
        sources.len() as i32 - 1,
        FIRST_LISTENER_FD + plan.listeners.len() as i32
    );
    // Move every source above every target first, so no dup2 below clobbers a source.
    let floor = sources
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(sources.len() as i32)
        + 1;
    let mut high = Vec::with_capacity(sources.len());
    for &fd in &sources {
        let h = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
            .map_err(|e| ("fds", format!("dup of fd {fd}: {e}")))?;
        high.push(h);
    }
    for (target, &h) in high.iter().enumerate() {
        // SAFETY: dup2 onto a small number closes whatever was there; every fd this child
        // still needs has been copied above `floor`, so nothing needed is lost.
        let rc = unsafe { libc::dup2(h, target as i32) };
        if rc < 0 {
            return Err((
                "fds",
                format!("dup2 to fd {target}: {}", std::io::Error::last_os_error()),
            ));
        }
    }
    let status_fd = sources.len() as i32 - 1;
    nix::fcntl::fcntl(
        status_fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| ("fds", e.to_string()))?;
    // The OwnedFds of the plan refer to numbers now closed or reused; forget them rather than
    // let their destructors close someone else's descriptor.
    std::mem::forget((
        stdin,
        stdout,
        stderr,
        plan.control,
        plan.listeners,
        status_w,
    ));
    close_from(status_fd + 1).map_err(|e| ("fds", format!("close_range: {e}")))?;
    reset_signals().map_err(|e| ("signals", e))?;
    set_title(&plan.title);
    // SAFETY: CONTROL_FD was placed above and stays open for the life of the child.
    let control = unsafe { BorrowedFd::borrow_raw(CONTROL_FD) };
    zygote_runtime::lifeline::arm(control).map_err(|e| ("lifeline", e.to_string()))?;
    let _ = MODEL_FD;
    Ok(())
}

fn close_from(first: RawFd) -> std::io::Result<()> {
    // SAFETY: close_range only closes descriptors; everything at `first` and above is either
    // unneeded or a copy made by `setup`, and nothing in this process refers to them any more.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn reset_signals() -> Result<(), String> {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler code; numbers the kernel rejects (the ones the C
        // library reserves) just fail with EINVAL, which we ignore.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // The C library refuses the signals it reserves for itself (32 and 33 with glibc), but a
    // disposition of SIG_IGN on them is inherited like any other: glibc's posix_spawn sets
    // them ignored in a child of a multi-threaded parent, and exec keeps that. Reset them
    // with the system call itself.
    for sig in 32..libc::SIGRTMIN() {
        reset_reserved_signal(sig)?;
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| format!("sigprocmask: {e}"))
}

/// The kernel's `struct sigaction` (`include/uapi/asm-generic/signal.h`; x86_64 and aarch64
/// both define `SA_RESTORER`, so both have the `restorer` field).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets `sig` to SIG_DFL with `rt_sigaction(2)`, bypassing the C library's wrapper.
fn reset_reserved_signal(sig: i32) -> Result<(), String> {
    let action = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: `action` is a valid kernel sigaction that lives across the call; the old action
    // is not asked for (null); the size is that of the kernel's sigset_t (8 bytes). SIG_DFL
    // installs no handler code, so no restorer is needed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &action as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            std::mem::size_of::<u64>(),
        )
    };
    if rc < 0 {
        return Err(format!(
            "rt_sigaction({sig}, SIG_DFL): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets `comm` (15 bytes) and rewrites the argument area that `ps` shows.
fn set_title(title: &str) {
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
    // the child reads the old arguments after this point (the entry gets its arguments from
    // the attach info).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n) };
    // SAFETY: as above: bytes n..len of the same block, zeroed so `ps` ends the title there.
    unsafe { std::ptr::write_bytes(p.wrapping_add(n), 0, len - n) };
}

/// `pidfd_open(2)`: an fd that refers to process `pid` for as long as the fd lives.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no memory is involved.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this descriptor for us; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`: signals exactly the process `pidfd` refers to, even if its pid has
/// been reused since.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> std::io::Result<()> {
    // SAFETY: the pidfd is borrowed and open; a null siginfo asks the kernel to fill in the
    // default; no other memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
