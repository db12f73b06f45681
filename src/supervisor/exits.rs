//! The exit statuses of children, matched with their deaths.
//!
//! A child's death reaches the supervisor twice, in either order: its pidfd becomes readable
//! (the death itself, which decides what happens next), and its status arrives (`exited` or
//! `child_error` from the zygote, or `waitpid` for an orphan the supervisor reaps itself).
//! [`Exits`] keeps whichever comes first until the other one does, and with it whether the
//! death is still to be counted among its slot's restart reasons.

use std::collections::HashMap;

use super::policy::{Cause, Role};

/// What is known of an exit: its text for the log, and its cause when the status said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub text: String,
    pub cause: Option<Cause>,
}

#[derive(Debug)]
enum Pending {
    /// The status came first (a `child_error` may add to it before the exit code).
    Status(Known),
    /// The death came first: log the status, with the role, when it arrives; `count` when
    /// its cause is still to be counted.
    Death { role: Role, count: bool },
}

/// A status that arrived after its death.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late {
    pub role: Role,
    /// The cause to count for the role's slot, if the death is to be counted.
    pub count: Option<Cause>,
}

/// One tracker per supervisor, keyed by pid.
#[derive(Debug, Default)]
pub struct Exits {
    pending: HashMap<i32, Pending>,
}

impl Exits {
    /// A status for `pid` (`cause` is `None` for a `child_error`, which tells no cause).
    /// Returns the role when the death was already handled, so that the caller logs what was
    /// missing then and counts the cause.
    pub fn status(&mut self, pid: i32, text: String, cause: Option<Cause>) -> Option<Late> {
        match self.pending.remove(&pid) {
            Some(Pending::Death { role, count }) => {
                if count && cause.is_none() {
                    // The exit code is still to come: count it then.
                    self.pending.insert(pid, Pending::Death { role, count });
                }
                Some(Late {
                    role,
                    count: cause.filter(|_| count),
                })
            }
            Some(Pending::Status(k)) => {
                let known = Known {
                    text: format!("{}; {text}", k.text),
                    cause: cause.or(k.cause),
                };
                self.pending.insert(pid, Pending::Status(known));
                None
            }
            None => {
                self.pending
                    .insert(pid, Pending::Status(Known { text, cause }));
                None
            }
        }
    }

    /// The death of `pid`: what is known of its status, else `None`, and the status is logged
    /// (and, with `count`, its cause counted) when it comes.
    pub fn death(&mut self, pid: i32, role: Role, count: bool) -> Option<Known> {
        match self.pending.remove(&pid) {
            Some(Pending::Status(k)) => Some(k),
            Some(Pending::Death { .. }) | None => {
                self.pending.insert(pid, Pending::Death { role, count });
                None
            }
        }
    }

    /// Whether the death of `pid` waits for its status.
    pub fn awaits(&self, pid: i32) -> bool {
        matches!(self.pending.get(&pid), Some(Pending::Death { .. }))
    }

    /// Entries waiting for their other half (for tests and leak checks).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zygote_runtime::WorkerId;

    const W: Role = Role::Worker(WorkerId(0));

    #[test]
    fn a_status_before_the_death_is_handed_to_the_death() {
        let mut e = Exits::default();
        assert_eq!(e.status(7, "exit code 1".into(), Some(Cause::Exit)), None);
        assert_eq!(
            e.death(7, W, true),
            Some(Known {
                text: "exit code 1".into(),
                cause: Some(Cause::Exit)
            })
        );
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn a_death_before_its_status_gets_the_status_later_with_its_role_and_cause() {
        let mut e = Exits::default();
        assert_eq!(e.death(7, Role::Owner(0), true), None);
        assert_eq!(
            e.status(7, "signal SIGKILL".into(), Some(Cause::Signal)),
            Some(Late {
                role: Role::Owner(0),
                count: Some(Cause::Signal)
            })
        );
        assert_eq!(e.len(), 0);
        e.death(8, W, false);
        assert_eq!(
            e.status(8, "exit code 0".into(), Some(Cause::Exit)),
            Some(Late {
                role: W,
                count: None
            }),
            "a death that does not count stays uncounted"
        );
    }

    #[test]
    fn a_child_error_and_the_exit_code_are_both_kept() {
        let mut e = Exits::default();
        e.status(7, "setup failed: no such file".into(), None);
        e.status(7, "exit code 127".into(), Some(Cause::Exit));
        assert_eq!(
            e.death(7, Role::Worker(WorkerId(1)), true),
            Some(Known {
                text: "setup failed: no such file; exit code 127".into(),
                cause: Some(Cause::Exit)
            })
        );
    }

    #[test]
    fn a_child_error_after_the_death_leaves_the_exit_code_to_count() {
        let mut e = Exits::default();
        e.death(7, W, true);
        let late = e.status(7, "setup failed: x".into(), None);
        assert_eq!(
            late,
            Some(Late {
                role: W,
                count: None
            })
        );
        let late = e.status(7, "exit code 127".into(), Some(Cause::Exit));
        assert_eq!(
            late,
            Some(Late {
                role: W,
                count: Some(Cause::Exit)
            })
        );
        assert_eq!(e.len(), 0);
    }
}
