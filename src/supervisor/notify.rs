//! systemd's notification protocol (`sd_notify(3)`): `Type=notify` services tell the manager
//! when they are ready, reloading or stopping, and ping its watchdog.
//!
//! [`Notifier::from_env`] reads `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace), `WATCHDOG_USEC` and `WATCHDOG_PID`, and removes them so that no child sees them
//! (a worker's own `sd_notify` would otherwise speak for the service). [`Notifier::send`]
//! sends one datagram; [`line`] is what the service's [`Notify`] says, in the protocol's words.
//! The watchdog is pinged by the event loop itself at half the interval, so a loop that hangs
//! stops the pings and systemd acts.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use super::effects::Notify;

/// The datagram socket to the manager, and the watchdog's interval.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if asked.
    pub watchdog: Option<Duration>,
}

/// The watchdog's ping interval: half of `WATCHDOG_USEC`, when it is meant for `my_pid`.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(my_pid)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// The protocol's line for a notification.
pub fn line(n: &Notify, monotonic_usec: u64) -> String {
    match n {
        Notify::Ready { status } => format!("READY=1\nSTATUS={status}"),
        Notify::Reloading { status } => {
            format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS={status}")
        }
        Notify::Stopping => "STOPPING=1\nSTATUS=stopping: draining the workers".into(),
        Notify::Status(status) => format!("STATUS={status}"),
    }
}

impl Notifier {
    /// The notifier the environment asks for, if any (and the variables removed).
    pub fn from_env() -> std::io::Result<Option<Self>> {
        let var = |k: &str| std::env::var(k).ok();
        let (socket, usec, pid) = (
            var("NOTIFY_SOCKET"),
            var("WATCHDOG_USEC"),
            var("WATCHDOG_PID"),
        );
        for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(k);
        }
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let addr = match socket.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&socket)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        let watchdog = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id());
        Ok(Some(Self {
            sock,
            addr,
            watchdog,
        }))
    }

    /// Sends one notification (never blocking: a manager that does not read loses it).
    pub fn send(&self, text: &str) {
        if let Err(e) = self.sock.send_to_addr(text.as_bytes(), &self.addr) {
            log::warn!("notifying systemd ({:?}): {e}", text.lines().next());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_interval_and_only_for_this_pid() {
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
    }

    #[test]
    fn each_notification_says_what_sd_notify_expects() {
        let status = "2 of 2 workers serving".to_string();
        assert_eq!(
            line(
                &Notify::Ready {
                    status: status.clone()
                },
                5
            ),
            "READY=1\nSTATUS=2 of 2 workers serving"
        );
        assert_eq!(
            line(&Notify::Reloading { status }, 5),
            "RELOADING=1\nMONOTONIC_USEC=5\nSTATUS=2 of 2 workers serving"
        );
        assert!(line(&Notify::Stopping, 5).starts_with("STOPPING=1\n"));
        assert_eq!(line(&Notify::Status("x".into()), 5), "STATUS=x");
    }
}
