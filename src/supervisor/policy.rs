//! The supervisor's decisions, as pure functions of what it knows: how long to wait before a
//! retry, when deaths before ready are a crash loop, what a child's death means, which timer
//! has run out, when a dead zygote is restarted, which warm spare takes a worker's place.
//! Nothing here touches a process, a file or
//! the clock; [`super::service`] applies the decisions through its effects.

use std::time::{Duration, Instant};

use zygote_runtime::protocol::{Ipc, RestartReasons, WorkerId};

/// Deaths before ready, in a row, that stop the service.
pub const CRASH_LOOP_LIMIT: u32 = 5;
/// Longest wait between retries of a worker (or a zygote) that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time a child gets from spawn to ready (model import, app start).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Most workers a service runs (`--workers`, `zygote scale`).
pub const MAX_WORKERS: u32 = 256;
/// First retry of a child that died before it was ready.
pub const CHILD_BACKOFF: Duration = Duration::from_millis(100);
/// First restart of a dead zygote.
pub const ZYGOTE_BACKOFF: Duration = Duration::from_millis(50);
/// A zygote that lived at least this long before it died starts a new count of failures.
pub const ZYGOTE_STABLE: Duration = Duration::from_secs(10);
/// Wait before retrying a spawn the zygote refused or could not be asked for.
pub const RESPAWN_RETRY: Duration = Duration::from_millis(500);
/// Most warm spares a service keeps (`--spares`).
pub const MAX_SPARES: u32 = 16;
/// Wait from a spare's activation (or death) to the spawn of the one that refills the pool,
/// as Android's USAP pool waits before it refills: the fork, the import and the app's start
/// stay off the moment that needed the spare, when the other workers carry the extra load.
pub const SPARE_REFILL_DELAY: Duration = Duration::from_secs(1);
/// Spare `k` is spawned as worker `SPARE_ID_BASE + k` (its process title, its logs) and takes
/// its slot's worker id when it is activated.
pub const SPARE_ID_BASE: u32 = 1000;

/// What a supervised child is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The owner of one device's weights.
    Owner(u32),
    /// The worker of one slot.
    Worker(WorkerId),
    /// Warm spare `k` of the pool (`--spares`): ready, not accepting, until it is activated
    /// into a worker slot (its role becomes that [`Role::Worker`]).
    Spare(u32),
    /// The Python app template (`--app`): imports the app once and forks the workers. One
    /// slot; during a reload the new one and the old one share it.
    Template,
}

impl Role {
    /// The device (owner), the worker id (worker) or the pool index (spare), as `zygote
    /// status` lists them.
    pub fn slot(self) -> u32 {
        match self {
            Role::Owner(n) | Role::Worker(WorkerId(n)) | Role::Spare(n) => n,
            Role::Template => 0,
        }
    }

    pub fn is_worker(self) -> bool {
        matches!(self, Role::Worker(_))
    }

    pub fn is_owner(self) -> bool {
        matches!(self, Role::Owner(_))
    }

    pub fn is_spare(self) -> bool {
        matches!(self, Role::Spare(_))
    }

    /// Workers and spares: the children that hold the listeners (drained first in a stop).
    pub fn holds_listeners(self) -> bool {
        self.is_worker() || self.is_spare()
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Owner(d) => write!(f, "owner {d}"),
            Role::Worker(WorkerId(w)) => write!(f, "worker {w}"),
            Role::Spare(k) => write!(f, "spare {k}"),
            Role::Template => write!(f, "template"),
        }
    }
}

/// Where a child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned, not ready yet.
    Starting,
    /// Sent `ready`.
    Serving,
    /// Asked to finish and exit (or said it does).
    Draining,
}

/// Where the service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Owners are being started; workers wait for them.
    Starting,
    Running,
    /// Draining everything; the service exits once nothing is left.
    Stopping,
    /// Asleep (`zygote sleep`, `--idle-sleep`): workers, then owners, drained; the zygote and
    /// the listeners stay. A wake starts the owners again ([`Phase::Starting`]).
    Asleep,
}

/// The wait before retry `n` (1, 2, ...): `base` × 2^(n−1), capped at [`MAX_BACKOFF`].
pub fn backoff(base: Duration, n: u32) -> Duration {
    (base * 2u32.pow(n.saturating_sub(1).min(10))).min(MAX_BACKOFF)
}

/// What a child's death means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// It was asked to go (drained, or the service stops): nothing to do.
    Expected,
    /// It died while serving: replace it at once.
    Replace,
    /// It died before it was ready: retry after this wait.
    Retry(Duration),
    /// An owner died before it was ready while the service starts: the start fails.
    StartFailed,
    /// `failures` deaths before ready in a row: the service stops.
    CrashLoop { failures: u32 },
}

/// Decides about a child that died in `state` while the service is in `phase`; `failures` is
/// its slot's count of deaths before ready in a row, this one included.
pub fn on_death(role: Role, state: State, phase: Phase, failures: u32) -> Death {
    match state {
        State::Draining => Death::Expected,
        _ if phase == Phase::Stopping => Death::Expected,
        State::Serving => Death::Replace,
        State::Starting
            if phase == Phase::Starting && matches!(role, Role::Owner(_) | Role::Template) =>
        {
            Death::StartFailed
        }
        State::Starting if failures >= CRASH_LOOP_LIMIT => Death::CrashLoop { failures },
        State::Starting => Death::Retry(backoff(CHILD_BACKOFF, failures)),
    }
}

/// Whether a death is a reload's new app template failing (its import raised): that
/// template is not retried, and the old one goes on serving.
pub fn reload_failed(role: Role, state: State, phase: Phase, replaces: bool) -> bool {
    role == Role::Template && state == State::Starting && phase == Phase::Running && replaces
}

/// A timer of a child that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overdue {
    /// Serving, but silent for this long (over `--timeout`).
    Heartbeat(Duration),
    /// Not ready within [`READY_TIMEOUT`].
    NotReady,
    /// Draining past its deadline.
    DrainDeadline,
}

impl std::fmt::Display for Overdue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overdue::Heartbeat(d) => write!(f, "no heartbeat for {:.1}s", d.as_secs_f64()),
            Overdue::NotReady => write!(f, "not ready after {}s", READY_TIMEOUT.as_secs()),
            Overdue::DrainDeadline => write!(f, "drain deadline passed"),
        }
    }
}

/// The clocks of one child.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    pub started: Instant,
    pub last_beat: Instant,
    pub drain_deadline: Option<Instant>,
}

/// Which of a child's timers ran out at `now`, if any (`timeout` is `--timeout`). A draining
/// child is past its deadline whatever its state says.
pub fn overdue(state: State, t: &Timers, now: Instant, timeout: Duration) -> Option<Overdue> {
    if t.drain_deadline.is_some_and(|d| now > d) {
        return Some(Overdue::DrainDeadline);
    }
    match state {
        State::Serving if now.duration_since(t.last_beat) > timeout => {
            Some(Overdue::Heartbeat(now.duration_since(t.last_beat)))
        }
        State::Starting if now.duration_since(t.started) > READY_TIMEOUT => Some(Overdue::NotReady),
        _ => None,
    }
}

/// What to do about a zygote that died or could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZygoteRestart {
    /// Start a new one after this wait.
    After(Duration),
    /// `failures` in a row: the service stops.
    CrashLoop { failures: u32 },
}

/// The count of zygote restarts and of failures in a row.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZygoteRestarts {
    /// Deaths of a running zygote (shown by `zygote status`).
    pub restarts: u32,
    failures: u32,
}

impl ZygoteRestarts {
    /// A running zygote died after `lived`: one that lived less than [`ZYGOTE_STABLE`] counts
    /// as one more failure in a row; a longer life starts the count again.
    pub fn died(&mut self, lived: Duration) -> ZygoteRestart {
        self.restarts += 1;
        self.failures = if lived < ZYGOTE_STABLE {
            self.failures + 1
        } else {
            1
        };
        if self.failures >= CRASH_LOOP_LIMIT {
            ZygoteRestart::CrashLoop {
                failures: self.failures,
            }
        } else {
            ZygoteRestart::After(backoff(ZYGOTE_BACKOFF, self.failures))
        }
    }

    /// Starting a new zygote failed: retried after [`MAX_BACKOFF`] until the count is a
    /// crash loop.
    pub fn start_failed(&mut self) -> ZygoteRestart {
        self.failures += 1;
        if self.failures >= CRASH_LOOP_LIMIT {
            ZygoteRestart::CrashLoop {
                failures: self.failures,
            }
        } else {
            ZygoteRestart::After(MAX_BACKOFF)
        }
    }
}

/// Why a slot's child was replaced (`zygote status` counts them per slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It exited with a code on its own.
    Exit,
    /// A signal the supervisor did not send killed it.
    Signal,
    /// The supervisor killed it: silent past `--timeout`, or not ready in time.
    Heartbeat,
    /// A roll replaced it.
    Roll,
    /// It reached `--max-requests` or `--max-rss` and was replaced.
    Recycle,
}

/// Counts one replacement for `cause`.
pub fn count(reasons: &mut RestartReasons, cause: Cause) {
    let n = match cause {
        Cause::Exit => &mut reasons.exit,
        Cause::Signal => &mut reasons.signal,
        Cause::Heartbeat => &mut reasons.heartbeat,
        Cause::Roll => &mut reasons.roll,
        Cause::Recycle => &mut reasons.recycle,
    };
    *n += 1;
}

/// When a worker is replaced by a fresh one (gunicorn's `--max-requests`, with its jitter, and
/// a memory ceiling): a worker that leaks, or whose allocator only grows, is recycled before it
/// hurts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecycleLimits {
    /// Requests a worker serves before it is replaced.
    pub max_requests: Option<u64>,
    /// Up to this many requests more, drawn per worker, so that workers started together are
    /// not all replaced at once.
    pub jitter: u64,
    /// Resident memory (MiB) past which a worker is replaced.
    pub max_rss_mib: Option<u64>,
}

/// Why a worker is due for recycling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycle {
    /// It served `served` requests, its limit being `limit`.
    Requests { served: u64, limit: u64 },
    /// Its resident memory is `rss_mib`, over `limit` MiB.
    Rss { rss_mib: u64, limit: u64 },
}

impl std::fmt::Display for Recycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recycle::Requests { served, limit } => {
                write!(
                    f,
                    "served {served} requests (--max-requests: {limit} for it)"
                )
            }
            Recycle::Rss { rss_mib, limit } => {
                write!(f, "resident memory {rss_mib} MiB over --max-rss {limit}")
            }
        }
    }
}

/// The request limit of one new worker: `max_requests` plus a share of the jitter picked by
/// `draw` (any number; the caller draws it at random).
pub fn request_limit(limits: &RecycleLimits, draw: u64) -> Option<u64> {
    let extra = draw % limits.jitter.saturating_add(1);
    limits.max_requests.map(|n| n.saturating_add(extra))
}

/// Whether a worker that served `served` requests (its limit being `limit`) and holds
/// `rss_kib` of resident memory (when it was read) is due for recycling.
pub fn recycle(
    limits: &RecycleLimits,
    served: u64,
    limit: Option<u64>,
    rss_kib: Option<u64>,
) -> Option<Recycle> {
    if let Some(limit) = limit.filter(|l| served >= *l) {
        return Some(Recycle::Requests { served, limit });
    }
    let (rss_mib, limit) = (rss_kib? / 1024, limits.max_rss_mib?);
    (rss_mib > limit).then_some(Recycle::Rss { rss_mib, limit })
}

/// A spare as [`pick_spare`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpareView {
    pub pid: i32,
    pub device: u32,
    /// It sent `ready`.
    pub ready: bool,
    /// A roll is replacing it (it runs the old code or weights), or it drains.
    pub going: bool,
    pub started: Instant,
}

/// The spare that takes the place of a worker on `device`, if one can: ready, on that device,
/// not being replaced by a roll; the oldest first (the longest warm, its pages settled).
/// `None`: a fresh worker is spawned instead, as without spares.
pub fn pick_spare(spares: &[SpareView], device: u32) -> Option<i32> {
    spares
        .iter()
        .filter(|s| s.ready && !s.going && s.device == device)
        .min_by_key(|s| (s.started, s.pid))
        .map(|s| s.pid)
}

/// Whether the owner that just became ready needs every worker rolled: the memory of legacy
/// CUDA IPC dies with the owner that exported it, so after a restart (not the first start)
/// the workers must import the new owner's weights.
pub fn roll_after_owner_ready(restarted: bool, ipc: Option<Ipc>) -> bool {
    restarted && ipc == Some(Ipc::Legacy)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_its_base_and_is_capped() {
        let child: Vec<u64> = (1..=8)
            .map(|n| backoff(CHILD_BACKOFF, n).as_millis() as u64)
            .collect();
        assert_eq!(child, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(ZYGOTE_BACKOFF, 1), 50 * MS);
        assert_eq!(backoff(ZYGOTE_BACKOFF, 4), 400 * MS);
        assert_eq!(
            backoff(CHILD_BACKOFF, 0),
            CHILD_BACKOFF,
            "n = 0 is the first"
        );
        assert_eq!(backoff(CHILD_BACKOFF, u32::MAX), MAX_BACKOFF, "no overflow");
    }

    #[test]
    fn a_death_is_judged_by_state_and_phase() {
        let w = Role::Worker(WorkerId(0));
        let o = Role::Owner(0);
        use Phase::*;
        assert_eq!(on_death(w, State::Draining, Running, 0), Death::Expected);
        assert_eq!(on_death(w, State::Serving, Stopping, 0), Death::Expected);
        assert_eq!(on_death(w, State::Starting, Stopping, 9), Death::Expected);
        assert_eq!(on_death(w, State::Serving, Running, 0), Death::Replace);
        assert_eq!(on_death(o, State::Serving, Running, 0), Death::Replace);
        assert_eq!(
            on_death(o, State::Starting, Starting, 1),
            Death::StartFailed
        );
        assert_eq!(
            on_death(o, State::Starting, Running, 1),
            Death::Retry(100 * MS),
            "an owner restarted later is retried like a worker"
        );
        assert_eq!(
            on_death(Role::Template, State::Starting, Starting, 1),
            Death::StartFailed,
            "an app that fails to import stops the start at once"
        );
        assert_eq!(
            on_death(Role::Spare(0), State::Starting, Starting, 1),
            Death::Retry(100 * MS),
            "a spare is retried like a worker"
        );
        assert_eq!(
            on_death(w, State::Starting, Running, 3),
            Death::Retry(400 * MS)
        );
        assert_eq!(
            on_death(w, State::Starting, Running, CRASH_LOOP_LIMIT),
            Death::CrashLoop {
                failures: CRASH_LOOP_LIMIT
            }
        );
    }

    #[test]
    fn each_timer_runs_out_on_its_own_deadline() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        let t = Timers {
            started: t0,
            last_beat: t0,
            drain_deadline: None,
        };
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(overdue(State::Serving, &t, at(30), timeout), None);
        assert_eq!(
            overdue(State::Serving, &t, at(31), timeout),
            Some(Overdue::Heartbeat(Duration::from_secs(31)))
        );
        assert_eq!(
            overdue(State::Starting, &t, at(119), timeout),
            None,
            "a starting child is not judged by heartbeats"
        );
        assert_eq!(
            overdue(State::Starting, &t, at(121), timeout),
            Some(Overdue::NotReady)
        );
        let draining = Timers {
            drain_deadline: Some(at(10)),
            ..t
        };
        assert_eq!(overdue(State::Draining, &draining, at(10), timeout), None);
        assert_eq!(
            overdue(State::Draining, &draining, at(11), timeout),
            Some(Overdue::DrainDeadline)
        );
        assert_eq!(
            overdue(State::Draining, &t, at(1000), timeout),
            None,
            "a child that said `draining` on its own has no deadline"
        );
    }

    #[test]
    fn a_zygote_that_keeps_dying_young_is_a_crash_loop_and_a_stable_one_starts_over() {
        let mut z = ZygoteRestarts::default();
        let young = Duration::from_secs(1);
        let waits: Vec<ZygoteRestart> = (0..4).map(|_| z.died(young)).collect();
        assert_eq!(
            waits,
            [50, 100, 200, 400].map(|ms| ZygoteRestart::After(ms * MS))
        );
        assert_eq!(
            z.died(ZYGOTE_STABLE),
            ZygoteRestart::After(50 * MS),
            "a zygote that lived long enough starts the count again"
        );
        for _ in 0..3 {
            z.died(young);
        }
        assert_eq!(z.died(young), ZygoteRestart::CrashLoop { failures: 5 });
        assert_eq!(z.restarts, 9);
    }

    #[test]
    fn a_zygote_that_cannot_be_started_is_retried_until_a_crash_loop() {
        let mut z = ZygoteRestarts::default();
        assert_eq!(
            z.died(Duration::from_secs(60)),
            ZygoteRestart::After(50 * MS)
        );
        let tries: Vec<ZygoteRestart> = (0..4).map(|_| z.start_failed()).collect();
        assert_eq!(
            tries,
            [
                ZygoteRestart::After(MAX_BACKOFF),
                ZygoteRestart::After(MAX_BACKOFF),
                ZygoteRestart::After(MAX_BACKOFF),
                ZygoteRestart::CrashLoop { failures: 5 },
            ]
        );
        assert_eq!(z.restarts, 1, "failed starts are not restarts");
    }

    #[test]
    fn each_cause_counts_under_its_own_reason() {
        let mut r = RestartReasons::default();
        for c in [
            Cause::Exit,
            Cause::Signal,
            Cause::Signal,
            Cause::Heartbeat,
            Cause::Roll,
            Cause::Recycle,
        ] {
            count(&mut r, c);
        }
        assert_eq!(
            r,
            RestartReasons {
                exit: 1,
                signal: 2,
                heartbeat: 1,
                recycle: 1,
                roll: 1
            }
        );
    }

    #[test]
    fn a_worker_is_recycled_at_its_request_limit_or_over_the_memory_ceiling() {
        let none = RecycleLimits::default();
        assert_eq!(
            request_limit(&none, 7),
            None,
            "no limit without --max-requests"
        );
        assert_eq!(recycle(&none, u64::MAX, None, Some(u64::MAX)), None);
        let l = RecycleLimits {
            max_requests: Some(100),
            jitter: 10,
            max_rss_mib: Some(512),
        };
        let limits: Vec<u64> = [0, 3, 10, 11, u64::MAX]
            .iter()
            .map(|d| request_limit(&l, *d).expect("a limit"))
            .collect();
        assert_eq!(
            limits,
            [100, 103, 110, 100, 104],
            "jitter is 0 to J inclusive"
        );
        let no_jitter = RecycleLimits { jitter: 0, ..l };
        assert_eq!(request_limit(&no_jitter, 12345), Some(100));
        let huge = RecycleLimits {
            max_requests: Some(u64::MAX),
            jitter: u64::MAX,
            ..l
        };
        assert_eq!(request_limit(&huge, 5), Some(u64::MAX), "no overflow");
        assert_eq!(recycle(&l, 99, Some(100), Some(1024)), None);
        assert_eq!(
            recycle(&l, 100, Some(100), None),
            Some(Recycle::Requests {
                served: 100,
                limit: 100
            })
        );
        assert_eq!(recycle(&l, 0, Some(100), Some(512 * 1024)), None);
        assert_eq!(
            recycle(&l, 0, Some(100), Some(513 * 1024)),
            Some(Recycle::Rss {
                rss_mib: 513,
                limit: 512
            })
        );
        assert_eq!(recycle(&l, 0, Some(100), None), None, "memory unread");
    }

    #[test]
    fn the_oldest_ready_spare_of_the_device_is_picked_and_none_that_a_roll_replaces() {
        let t0 = Instant::now();
        let spare = |pid, device, ready, going, age_ms: u64| SpareView {
            pid,
            device,
            ready,
            going,
            started: t0 + Duration::from_millis(1000 - age_ms),
        };
        assert_eq!(pick_spare(&[], 0), None, "no spare: spawn as before");
        let pool = [
            spare(10, 0, false, false, 900),
            spare(11, 0, true, false, 100),
            spare(12, 0, true, false, 500),
            spare(13, 1, true, false, 800),
            spare(14, 0, true, true, 700),
        ];
        assert_eq!(pick_spare(&pool, 0), Some(12), "the oldest ready one");
        assert_eq!(pick_spare(&pool, 1), Some(13), "the device's own");
        assert_eq!(pick_spare(&pool, 2), None, "no spare of that device");
        assert_eq!(
            pick_spare(&pool[..1], 0),
            None,
            "a spare not ready yet is no faster than a fresh spawn"
        );
        assert_eq!(
            pick_spare(&pool[4..], 0),
            None,
            "a rolled spare is not used"
        );
    }

    #[test]
    fn a_spare_dies_like_a_worker() {
        let s = Role::Spare(0);
        assert_eq!(
            on_death(s, State::Serving, Phase::Running, 0),
            Death::Replace
        );
        assert_eq!(
            on_death(s, State::Starting, Phase::Running, 2),
            Death::Retry(200 * MS)
        );
        assert_eq!(
            on_death(s, State::Starting, Phase::Running, CRASH_LOOP_LIMIT),
            Death::CrashLoop {
                failures: CRASH_LOOP_LIMIT
            }
        );
        assert_eq!(
            on_death(s, State::Draining, Phase::Running, 0),
            Death::Expected
        );
        assert!(s.holds_listeners() && !s.is_worker());
    }

    #[test]
    fn only_a_restarted_legacy_owner_rolls_the_workers() {
        assert!(roll_after_owner_ready(true, Some(Ipc::Legacy)));
        assert!(!roll_after_owner_ready(false, Some(Ipc::Legacy)));
        assert!(!roll_after_owner_ready(true, Some(Ipc::Vmm)));
        assert!(!roll_after_owner_ready(true, None));
    }
}
