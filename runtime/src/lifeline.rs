//! Ties a child's life to its control channel: when the supervisor that requested the child
//! goes away, its end of the channel closes and the child ends.
//!
//! The zygote arms the channel before the child's entry runs: `O_ASYNC` with the child as the
//! owner, so the kernel sends `SIGIO` to the child whenever the channel becomes readable or
//! hung up. A child that never attaches (an arbitrary exec'd program) keeps `SIGIO`'s default
//! action, which ends it; such a child is never sent control messages. A child that attaches
//! with [`crate::worker`] installs [`install_handler`]: the handler peeks at the channel and
//! ends the process only on end-of-file, so control messages reach the app. This works even
//! when the app is busy or stuck, which a poll loop alone would not. `PR_SET_PDEATHSIG` would
//! tie the child to the zygote instead, which must be free to die and restart.
//!
//! This is an `unsafe` leaf: `F_SETOWN`, the signal handler and the raw `recv` in it live here.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Exit status of a child whose supervisor went away.
pub const ORPHAN_EXIT: i32 = 0;

/// The control channel the `SIGIO` handler watches; -1 when none. Set by [`install_handler`]
/// and cleared when its [`Lifeline`] is dropped, before the channel itself closes, so the
/// handler never peeks at a descriptor number that has since been reused.
static CONTROL_FD: AtomicI32 = AtomicI32::new(-1);

/// The handler's hold on the control channel: dropping it stops the handler from watching.
/// The [`crate::Worker`] keeps it beside (and drops it before) the channel.
#[derive(Debug)]
pub struct Lifeline(());

impl Drop for Lifeline {
    fn drop(&mut self) {
        CONTROL_FD.store(-1, Ordering::Relaxed);
    }
}

/// Arms `fd` to send `SIGIO` to this process on input or hang-up.
pub fn arm(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_SETOWN takes an integer argument and touches no memory; `raw` is an open fd
    // borrowed for the duration of the call.
    let rc = unsafe { libc::fcntl(raw, libc::F_SETOWN, nix::unistd::getpid().as_raw()) };
    nix::errno::Errno::result(rc)?;
    let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_ASYNC))?;
    Ok(())
}

extern "C" fn on_sigio(_: libc::c_int) {
    let fd = CONTROL_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let mut byte = 0u8;
    // SAFETY: recv and _exit are async-signal-safe; `byte` is a valid 1-byte buffer on this
    // handler's stack; MSG_PEEK leaves any message in place for the app to read.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        // SAFETY: _exit is async-signal-safe and ends the process without running any code
        // of the interrupted app.
        unsafe { libc::_exit(ORPHAN_EXIT) };
    }
}

/// Installs the `SIGIO` handler that ends the process when `fd` reports end-of-file, and
/// checks once right away (the supervisor may already be gone). The handler watches `fd` until
/// the returned [`Lifeline`] is dropped, which must happen before `fd` is closed.
pub fn install_handler(fd: BorrowedFd<'_>) -> nix::Result<Lifeline> {
    CONTROL_FD.store(fd.as_raw_fd(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_sigio),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls async-signal-safe functions (recv, _exit) and reads an
    // atomic; it stays valid for the life of the process.
    unsafe { sigaction(Signal::SIGIO, &action) }?;
    let lifeline = Lifeline(());
    arm(fd)?;
    on_sigio(0);
    Ok(lifeline)
}
