//! The exit statuses of children, matched with their deaths.
//!
//! A child's death reaches the supervisor twice, in either order: its pidfd becomes readable
//! (the death itself, which decides what happens next), and its status arrives (`exited` or
//! `child_error` from the zygote, or `waitpid` for an orphan the supervisor reaps itself).
//! [`Exits`] keeps whichever comes first until the other one does.

use std::collections::HashMap;

use super::policy::Role;

#[derive(Debug)]
enum Pending {
    /// The status came first (a `child_error` may add to it before the death).
    Status(String),
    /// The death came first: log the status, with the role, when it arrives.
    Death(Role),
}

/// One tracker per supervisor, keyed by pid.
#[derive(Debug, Default)]
pub struct Exits {
    pending: HashMap<i32, Pending>,
}

impl Exits {
    /// A status for `pid`. Returns the role when the death was already handled, so that the
    /// caller logs the status that was missing then.
    pub fn status(&mut self, pid: i32, status: String) -> Option<Role> {
        match self.pending.remove(&pid) {
            Some(Pending::Death(role)) => Some(role),
            Some(Pending::Status(s)) => {
                self.pending
                    .insert(pid, Pending::Status(format!("{s}; {status}")));
                None
            }
            None => {
                self.pending.insert(pid, Pending::Status(status));
                None
            }
        }
    }

    /// The death of `pid`: its status if known, else `None`, and the status is logged when it
    /// comes.
    pub fn death(&mut self, pid: i32, role: Role) -> Option<String> {
        match self.pending.remove(&pid) {
            Some(Pending::Status(s)) => Some(s),
            Some(Pending::Death(_)) | None => {
                self.pending.insert(pid, Pending::Death(role));
                None
            }
        }
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

    #[test]
    fn a_status_before_the_death_is_handed_to_the_death() {
        let mut e = Exits::default();
        assert_eq!(e.status(7, "exit code 1".into()), None);
        assert_eq!(e.death(7, Role::Worker(0)).as_deref(), Some("exit code 1"));
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn a_death_before_its_status_gets_the_status_later_with_its_role() {
        let mut e = Exits::default();
        assert_eq!(e.death(7, Role::Owner(0)), None);
        assert_eq!(e.status(7, "signal SIGKILL".into()), Some(Role::Owner(0)));
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn a_child_error_and_the_exit_code_are_both_kept() {
        let mut e = Exits::default();
        e.status(7, "setup failed: no such file".into());
        e.status(7, "exit code 127".into());
        assert_eq!(
            e.death(7, Role::Worker(1)).as_deref(),
            Some("setup failed: no such file; exit code 127")
        );
    }
}
