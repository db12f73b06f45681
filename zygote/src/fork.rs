//! Forking a child and cleaning it up before its entry runs. This is an `unsafe` leaf: `fork`,
//! raw fd placement and signal dispositions live here and nowhere else (the process title is
//! written by [`zygote_runtime::proctitle`], which a spare uses again when it is activated).
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
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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
    #[error("refusing to fork: this process has {threads} threads (a forked child would inherit locks held by the others)")]
    NotSingleThreaded { threads: usize },
    #[error("counting this process's threads: {0}")]
    Threads(std::io::Error),
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
    /// The fork itself, when the process that forks is not the zygote (see [`ForkHook`]).
    pub fork: Option<ForkHook>,
}

/// A replacement for the raw `fork(2)` of [`spawn`], for a server hosted in a process that is
/// not single-threaded and has fork handlers of its own to run: the Python app template, whose
/// fork is CPython's `os.fork()` (at-fork hooks, `PyOS_AfterFork_Child`). Whoever supplies the
/// hook answers for the soundness of running Rust code in the child; [`spawn`] then skips its
/// single-thread check.
pub type ForkHook = fn() -> nix::Result<ForkResult>;

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
///
/// The child runs ordinary Rust code (allocation, logging) before it execs or runs its entry,
/// which is sound only if the caller is single-threaded: a thread holding the allocator's lock
/// at the fork would leave it locked in the child forever. So this counts the threads
/// (`/proc/self/task`) first and refuses with [`ForkError::NotSingleThreaded`] otherwise.
pub fn spawn(plan: ChildPlan<'_>) -> Result<Forked, ForkError> {
    if plan.fork.is_none() {
        let threads = zygote_runtime::procfs::thread_count(std::process::id() as i32)
            .map_err(ForkError::Threads)?;
        check_single_threaded(threads)?;
    }
    let exec = match plan.entry {
        Entry::Exec { program, args } => Some(exec_plan(program, args, &plan.info)?),
        Entry::Native(_) | Entry::Owner(_) => None,
    };
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ForkError::Pipe)?;
    let forked = match plan.fork {
        Some(hook) => hook(),
        // SAFETY: this process is single-threaded (checked above; nothing here starts a
        // thread), so the child starts with consistent allocator and lock state and may run
        // ordinary Rust code.
        None => unsafe { nix::unistd::fork() },
    };
    match forked.map_err(ForkError::Fork)? {
        ForkResult::Child => {
            drop(status_r);
            child_main(plan, exec, status_w)
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            let pidfd = match zygote_runtime::pidfd::open(child.as_raw()) {
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

/// The decision of [`spawn`]'s thread check.
fn check_single_threaded(threads: usize) -> Result<(), ForkError> {
    if threads == 1 {
        Ok(())
    } else {
        Err(ForkError::NotSingleThreaded { threads })
    }
}

/// Runs in the child: set up, then run the entry. Never returns.
fn child_main(plan: ChildPlan<'_>, exec: Option<ExecPlan>, status_w: OwnedFd) -> ! {
    zygote_runtime::logging::set_tag(&plan.tag);
    let entry = plan.entry.clone();
    let info = plan.info.clone();
    // The pipe moves during setup (its inherited number may become another fd's place): never
    // closed by a destructor here, and always reported to where it is now.
    let mut status = StatusPipe(status_w.as_raw_fd());
    std::mem::forget(status_w);
    if let Err((stage, message)) = setup(plan, &mut status) {
        status.report(stage, &message);
        // SAFETY: _exit ends the child at once without running the zygote's destructors or
        // atexit handlers, which belong to the zygote.
        unsafe { libc::_exit(SETUP_FAILED) };
    }
    match (entry.native(), exec) {
        (None, Some(exec)) => {
            let e = nix::unistd::execve(&exec.program, &exec.argv, &exec.envp).unwrap_err();
            status.report("exec", &format!("exec of {:?} failed: {e}", exec.program));
            // SAFETY: as above.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
        (Some(f), _) => {
            // A Rust program starts with SIGPIPE ignored; a native entry is one.
            // SAFETY: SIG_IGN installs no handler code; this process has a single thread.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            // A child of a hosted server (the app template) inherits its parent's adoption of
            // the fixed fds, whose numbers `setup` has just given to this child's own.
            // SAFETY: the parent's `Worker` lives on in this child's memory only: the child
            // runs the entry and exits without returning to the code that owns it.
            unsafe { zygote_runtime::worker::forget_adoption_in_child() };
            // SAFETY: `setup` placed the control channel, the model memfd and the listeners at
            // the fixed numbers and forgot every other owner of them; this is the one adoption.
            let worker = match unsafe { Worker::from_fixed_fds(info) } {
                Ok(w) => w,
                Err(e) => {
                    status.report("attach", &e.to_string());
                    // SAFETY: as above.
                    unsafe { libc::_exit(SETUP_FAILED) }
                }
            };
            // SAFETY: `status.0` is the status pipe placed by `setup`, owned by nobody else;
            // closing it tells the zygote the entry started.
            drop(unsafe { OwnedFd::from_raw_fd(status.0) });
            let code = f(worker);
            std::process::exit(code)
        }
        (None, None) => {
            status.report("exec", "no exec plan for the exec entry");
            // SAFETY: as above.
            unsafe { libc::_exit(SETUP_FAILED) }
        }
    }
}

/// Where the status pipe's write end is while the child sets itself up: its inherited number,
/// then its copy above every target, then its fixed place after the listeners. A failure is
/// written where it is at that moment, never to the fixed place before the pipe is there (that
/// number may be one of the zygote's client connections until `setup` has placed the fds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusPipe(RawFd);

impl StatusPipe {
    /// Writes `stage\0message` to the pipe, for the zygote to turn into a `child_error`.
    fn report(self, stage: &str, message: &str) {
        log::error!("failed before the entry ran ({stage}): {message}");
        // SAFETY: `self.0` is the status pipe's write end where setup last put it (every move
        // updates it), open in this process; ManuallyDrop keeps the File from closing it.
        let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.0) });
        let _ = f.write_all(format!("{stage}\0{message}").as_bytes());
    }
}

type SetupError = (&'static str, String);

fn setup(plan: ChildPlan<'_>, status: &mut StatusPipe) -> Result<(), SetupError> {
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
    sources.push(status.0);
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
    // From here until it is placed, the pipe's copy above `floor` is the one no dup2 touches.
    if let Some(&h) = high.last() {
        status.0 = h;
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
    status.0 = status_fd;
    nix::fcntl::fcntl(
        status_fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| ("fds", e.to_string()))?;
    // The OwnedFds of the plan refer to numbers now closed or reused; forget them rather than
    // let their destructors close someone else's descriptor.
    std::mem::forget((stdin, stdout, stderr, plan.control, plan.listeners));
    close_from(status_fd + 1).map_err(|e| ("fds", format!("close_range: {e}")))?;
    reset_signals().map_err(|e| ("signals", e))?;
    zygote_runtime::proctitle::set(&plan.title);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_more_than_one_thread_may_not_fork() {
        assert!(check_single_threaded(1).is_ok());
        let e = check_single_threaded(3).unwrap_err();
        assert!(
            matches!(e, ForkError::NotSingleThreaded { threads: 3 }),
            "{e}"
        );
        // The test harness runs tests on threads of their own: `spawn` refuses here.
        let threads = zygote_runtime::procfs::thread_count(std::process::id() as i32).unwrap();
        assert!(threads > 1, "the harness has {threads} threads");
    }

    #[test]
    fn a_failure_is_reported_where_the_status_pipe_is_not_where_it_will_be() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // The fixed place the pipe would have after setup (5 + listeners): here another pipe,
        // standing for a zygote client connection that still holds that number early on.
        let (other_r, other_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        nix::fcntl::fcntl(
            other_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let status = StatusPipe(w.as_raw_fd());
        status.report("setsid", "an early failure");
        drop(w);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut got).unwrap();
        assert_eq!(got, "setsid\0an early failure");
        let mut buf = [0u8; 16];
        assert_eq!(
            nix::unistd::read(other_r.as_raw_fd(), &mut buf),
            Err(nix::errno::Errno::EAGAIN),
            "nothing went to the other descriptor"
        );
        drop(other_w);
    }
}
