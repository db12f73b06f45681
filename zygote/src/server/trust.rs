//! Who may do what on the zygote socket: the trust model of `docs/PROTOCOL.md` §1, as
//! decisions with no effects (the event loop acts on them).
//!
//! - The **service's own uid** may do everything.
//! - A uid admitted with `--allow-uid` may say hello, read `status`, spawn any entry but the
//!   owner, and signal only the children its uid asked for. It never touches the weights
//!   (`keep_weights`, `fetch_weights`) and never stops the zygote (`shutdown`).
//! - `keep_weights` is accepted only from the zygote's live owner child of that device,
//!   recognised by the peer pid `SO_PEERCRED` gave when it connected (a live child's pid cannot
//!   be reused: the zygote has not reaped it). So what a worker or an adopting owner later
//!   verifies against is the zygote's record of its owner's export, never a client's claim.
//! - Connections are counted per uid: another uid may hold at most
//!   [`MAX_CONNECTIONS_PER_UID`], and all other uids together at most
//!   [`MAX_CONNECTIONS`] − [`SERVICE_RESERVED_CONNECTIONS`], so the service's supervisor always
//!   gets in.

/// Most connections served at once.
pub const MAX_CONNECTIONS: u32 = 64;
/// Connections that only the service's own uid may use.
pub const SERVICE_RESERVED_CONNECTIONS: u32 = 16;
/// Most connections one other (`--allow-uid`) uid may hold at once.
pub const MAX_CONNECTIONS_PER_UID: u32 = 8;

/// What a connected peer is to this zygote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The zygote's own uid: the service.
    Service,
    /// A uid admitted with `--allow-uid`.
    Allowed,
}

/// A connected peer, as `SO_PEERCRED` described it when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
    pub standing: Standing,
}

/// How many connections are open now, for [`admit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Open {
    /// All connections.
    pub total: u32,
    /// Those of uids other than the service's.
    pub others: u32,
    /// Those of the uid asking to connect.
    pub this_uid: u32,
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("uid {uid} may not use this zygote")]
    NotAllowed { uid: u32 },
    #[error("uid {uid} holds {open} connections, its limit")]
    UidQuota { uid: u32, open: u32 },
    #[error("too many connections from other uids (limit {limit}; the rest are the service's)")]
    OthersFull { limit: u32 },
    #[error("too many connections (limit {limit})")]
    Full { limit: u32 },
}

/// Decides whether a peer of `uid` may connect.
pub fn admit(uid: u32, service_uid: u32, allowed: &[u32], open: Open) -> Result<Standing, Refusal> {
    if uid == service_uid {
        return if open.total >= MAX_CONNECTIONS {
            Err(Refusal::Full {
                limit: MAX_CONNECTIONS,
            })
        } else {
            Ok(Standing::Service)
        };
    }
    if !allowed.contains(&uid) {
        return Err(Refusal::NotAllowed { uid });
    }
    let others_limit = MAX_CONNECTIONS - SERVICE_RESERVED_CONNECTIONS;
    if open.this_uid >= MAX_CONNECTIONS_PER_UID {
        Err(Refusal::UidQuota {
            uid,
            open: open.this_uid,
        })
    } else if open.others >= others_limit || open.total >= MAX_CONNECTIONS {
        Err(Refusal::OthersFull {
            limit: others_limit,
        })
    } else {
        Ok(Standing::Allowed)
    }
}

/// What a request would do, with what the decision needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Hello,
    Status,
    /// A spawn; `owner` when the entry is the weights owner.
    Spawn {
        owner: bool,
    },
    /// A signal to a live child that the uid `requester` asked for.
    Signal {
        requester: u32,
    },
    Shutdown,
    FetchWeights,
    ReleaseWeights,
    /// `keep_weights` for `device`; `owner_of` is the device of the live owner child the peer
    /// is, if it is one.
    KeepWeights {
        device: u32,
        owner_of: Option<u32>,
    },
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("only the service's own uid may {what}")]
    ServiceOnly { what: &'static str },
    #[error(
        "pid {pid} was spawned for uid {requester}; uid {uid} may signal only its own children"
    )]
    NotYourChild { pid: i32, requester: u32, uid: u32 },
    #[error("keep_weights for device {device} is accepted only from this zygote's live owner of that device (pid {pid} is not)")]
    NotTheOwner { device: u32, pid: i32 },
}

/// Decides whether `peer` may do `action`; `target` is the pid a signal is aimed at.
pub fn authorize(peer: &Peer, action: Action, target: i32) -> Result<(), Denied> {
    let service_only = |what| match peer.standing {
        Standing::Service => Ok(()),
        Standing::Allowed => Err(Denied::ServiceOnly { what }),
    };
    match action {
        Action::Hello | Action::Status | Action::Spawn { owner: false } => Ok(()),
        Action::Spawn { owner: true } => service_only("spawn the owner"),
        Action::Shutdown => service_only("shut the zygote down"),
        Action::FetchWeights => service_only("fetch the kept weights"),
        Action::ReleaseWeights => service_only("release the kept weights"),
        Action::Signal { requester } => match peer.standing {
            Standing::Service => Ok(()),
            Standing::Allowed if requester == peer.uid => Ok(()),
            Standing::Allowed => Err(Denied::NotYourChild {
                pid: target,
                requester,
                uid: peer.uid,
            }),
        },
        Action::KeepWeights { device, owner_of } => {
            if owner_of == Some(device) {
                Ok(())
            } else {
                Err(Denied::NotTheOwner {
                    device,
                    pid: peer.pid,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: u32 = 1000;
    const GUEST: u32 = 2000;

    fn open(total: u32, others: u32, this_uid: u32) -> Open {
        Open {
            total,
            others,
            this_uid,
        }
    }

    #[test]
    fn strangers_are_refused_and_the_service_and_allowed_uids_admitted() {
        let allowed = [GUEST];
        assert_eq!(
            admit(3000, SERVICE, &allowed, Open::default()),
            Err(Refusal::NotAllowed { uid: 3000 })
        );
        assert_eq!(
            admit(SERVICE, SERVICE, &allowed, Open::default()),
            Ok(Standing::Service)
        );
        assert_eq!(
            admit(GUEST, SERVICE, &allowed, Open::default()),
            Ok(Standing::Allowed)
        );
    }

    #[test]
    fn another_uid_has_a_quota_and_the_service_keeps_its_reserve() {
        let allowed = [GUEST, 2001];
        let quota = MAX_CONNECTIONS_PER_UID;
        assert_eq!(
            admit(GUEST, SERVICE, &allowed, open(quota, quota, quota)),
            Err(Refusal::UidQuota {
                uid: GUEST,
                open: quota
            })
        );
        let others = MAX_CONNECTIONS - SERVICE_RESERVED_CONNECTIONS;
        assert!(matches!(
            admit(2001, SERVICE, &allowed, open(others, others, 0)),
            Err(Refusal::OthersFull { .. })
        ));
        // With every connection other uids may hold taken, the service still gets in...
        assert_eq!(
            admit(SERVICE, SERVICE, &allowed, open(others, others, 0)),
            Ok(Standing::Service)
        );
        // ...up to the total.
        assert_eq!(
            admit(
                SERVICE,
                SERVICE,
                &allowed,
                open(MAX_CONNECTIONS, others, MAX_CONNECTIONS - others)
            ),
            Err(Refusal::Full {
                limit: MAX_CONNECTIONS
            })
        );
    }

    fn peer(standing: Standing) -> Peer {
        let uid = match standing {
            Standing::Service => SERVICE,
            Standing::Allowed => GUEST,
        };
        Peer {
            uid,
            pid: 77,
            standing,
        }
    }

    #[test]
    fn an_allowed_uid_may_spawn_signal_its_own_children_and_read_status_only() {
        let guest = peer(Standing::Allowed);
        for ok in [
            Action::Hello,
            Action::Status,
            Action::Spawn { owner: false },
            Action::Signal { requester: GUEST },
        ] {
            assert_eq!(authorize(&guest, ok, 5), Ok(()), "{ok:?}");
        }
        assert_eq!(
            authorize(&guest, Action::Signal { requester: SERVICE }, 5),
            Err(Denied::NotYourChild {
                pid: 5,
                requester: SERVICE,
                uid: GUEST
            })
        );
        for refused in [
            Action::Spawn { owner: true },
            Action::Shutdown,
            Action::FetchWeights,
            Action::ReleaseWeights,
        ] {
            assert!(
                matches!(
                    authorize(&guest, refused, 0),
                    Err(Denied::ServiceOnly { .. })
                ),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn the_service_may_do_everything_but_keep_weights_from_a_process_not_the_owner() {
        let service = peer(Standing::Service);
        for ok in [
            Action::Spawn { owner: true },
            Action::Signal { requester: GUEST },
            Action::Shutdown,
            Action::FetchWeights,
            Action::ReleaseWeights,
        ] {
            assert_eq!(authorize(&service, ok, 5), Ok(()), "{ok:?}");
        }
        let keep = |owner_of| Action::KeepWeights {
            device: 1,
            owner_of,
        };
        assert_eq!(authorize(&service, keep(Some(1)), 0), Ok(()));
        assert_eq!(
            authorize(&service, keep(None), 0),
            Err(Denied::NotTheOwner { device: 1, pid: 77 })
        );
        assert_eq!(
            authorize(&service, keep(Some(0)), 0),
            Err(Denied::NotTheOwner { device: 1, pid: 77 }),
            "the owner of device 0 may not keep weights for device 1"
        );
    }
}
