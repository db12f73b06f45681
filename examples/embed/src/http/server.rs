//! The event loop: one mio poll over the shared listeners, the open connections and the
//! control channel; the turn of the loop that accepts, reads, hands complete requests to the
//! [`Service`] in one batch, writes, sweeps timeouts, heartbeats and drains.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use zygote_runtime::protocol::{Latency, ParentMessage};
use zygote_runtime::WorkerError;

use super::conn::{Conn, ConnState};
use super::{Control, Exit, Limits, Reply, Request, Response, Service};

/// How often connections are checked against their timeouts.
const SWEEP: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Drain {
    started: Instant,
    deadline: Instant,
}

const CONTROL: Token = Token(usize::MAX - 1);
/// Tokens below this are listeners; from it on, connection slots.
const FIRST_CONN: usize = 1 << 20;

/// The event loop's state.
struct Server<'a> {
    poll: Poll,
    listeners: Vec<TcpListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    /// Per listener: connections may be queued on it (it was reported readable and the last
    /// `accept` did not say `WouldBlock`).
    acceptable: Vec<bool>,
    limits: &'a Limits,
    served: u64,
    /// How long the answered requests took, first byte received to answer queued.
    latency: Latency,
    /// Connections answered in the last batch, whose next request may join the next one.
    expected: Vec<usize>,
    /// Until when a waiting request may be held for them.
    gather_until: Option<Instant>,
    /// Requests the service computes, by id: the connection slot each answer goes to.
    waiting: HashMap<u64, usize>,
    /// Ids of queued requests whose connection closed, for the service to forget.
    cancelled: Vec<u64>,
    /// The id the next request handed to the service gets.
    next_id: u64,
    /// When the loop began: the first answer is logged against it (a restarted worker's
    /// warm-up, measured from its own side).
    started: Instant,
}

impl Server<'_> {
    /// Accepts at most one connection from each listener that may have one queued, within the
    /// connection limit.
    fn accept_round(&mut self) {
        for li in 0..self.listeners.len() {
            if self.open >= self.limits.max_connections {
                return;
            }
            if self.acceptable[li] {
                self.acceptable[li] = self.accept_one(li);
            }
        }
    }

    /// Whether a turn of the loop has something to do at once: a connection to accept or a
    /// request to answer (not one held by [`Server::holding`]).
    fn has_work(&self, now: Instant) -> bool {
        (self.open < self.limits.max_connections && self.acceptable.iter().any(|&a| a))
            || (self.has_pending() && self.holding(now).is_none())
    }

    fn has_pending(&self) -> bool {
        self.conns.iter().flatten().any(|c| c.has_request())
    }

    /// Until when waiting requests are held back for a connection answered in the last batch
    /// that has not sent its next request yet; `None` when nothing is to be waited for.
    fn holding(&self, now: Instant) -> Option<Instant> {
        let until = self.gather_until.filter(|&t| now < t)?;
        let waiting = self.expected.iter().any(|&slot| {
            self.conns
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|c| !c.has_request())
        });
        waiting.then_some(until)
    }

    /// One `accept` on listener `li`; returns whether more connections may be queued.
    fn accept_one(&mut self, li: usize) -> bool {
        match self.listeners[li].accept() {
            Ok((stream, _)) => {
                self.add(stream);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                true
            }
            Err(e) => {
                // EMFILE and friends: leave the connection to the other workers; the sweep
                // tries this listener again.
                log::warn!("accept failed: {e}");
                false
            }
        }
    }

    /// Accepts every queued connection, regardless of the limit (the drain takes what was
    /// already queued before it lets go of the listeners).
    fn accept_all(&mut self) {
        for li in 0..self.listeners.len() {
            while self.accept_one(li) {}
        }
    }

    fn add(&mut self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        // Registering an fd that is already readable reports it at once, so a request that
        // arrived with the connection is not missed.
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(FIRST_CONN + slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register a connection: {e}");
            self.free.push(slot);
            return;
        }
        self.conns[slot] = Some(Conn::new(stream, Instant::now()));
        self.open += 1;
    }

    fn close(&mut self, slot: usize) {
        // The slot may be reused by a new connection, which nobody waits for.
        self.expected.retain(|&e| e != slot);
        if let Some(mut c) = self.conns[slot].take() {
            if let Some(id) = c.submitted() {
                self.waiting.remove(&id);
                self.cancelled.push(id);
            }
            let _ = self.poll.registry().deregister(c.stream_mut());
            self.free.push(slot);
            self.open -= 1;
        }
    }

    fn drive(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.drive(self.limits) == ConnState::Close {
            self.close(slot);
        }
    }

    /// One turn's service: hands every request that is complete now to the service in one
    /// batch, lets it compute one step of its queue, and writes every answer that is ready.
    /// Answering one may uncover the next request pipelined behind it: that one waits for the
    /// next turn of the loop, with whatever arrived on other connections meanwhile (serving it
    /// at once could starve them). The connections answered become the ones
    /// [`Server::holding`] waits for.
    fn serve(&mut self, service: &mut dyn Service, draining: bool) {
        let mut answered = self.submit(service, draining);
        for id in self.cancelled.drain(..) {
            service.cancel(id);
        }
        let computing = Instant::now();
        if service.has_work() {
            for (id, resp) in service.step() {
                match self.waiting.remove(&id) {
                    Some(slot) => answered.push((slot, resp)),
                    // Its connection closed meanwhile; the answer has nowhere to go.
                    None => {
                        log::debug!("dropping the answer to request {id}: its connection is gone")
                    }
                }
            }
        }
        if answered.is_empty() {
            return;
        }
        if self.served == 0 {
            log::info!(
                "first answer {} ms after serving began ({} request(s), computed in {} ms)",
                self.started.elapsed().as_millis(),
                answered.len(),
                computing.elapsed().as_millis()
            );
        }
        let slots: Vec<usize> = answered.iter().map(|(slot, _)| *slot).collect();
        for (slot, resp) in answered {
            if let Some(c) = self.conns[slot].as_mut() {
                if let Some(started) = c.request_started() {
                    self.latency.observe(started.elapsed());
                }
                c.answer(&resp, draining);
                self.served += 1;
            }
            self.drive(slot);
        }
        // Keep-alive connections whose answer is out and that have not pipelined another
        // request: their clients are likely to send the next one within moments.
        self.expected = slots
            .into_iter()
            .filter(|&slot| {
                self.conns[slot]
                    .as_ref()
                    .is_some_and(|c| c.awaits_next_request())
            })
            .collect();
        self.gather_until =
            (!draining && !self.expected.is_empty() && !self.limits.batch_wait.is_zero())
                .then(|| Instant::now() + self.limits.batch_wait);
    }

    /// Hands every request that is complete now to the service; returns the answers it gave
    /// at once, by connection slot. The requests it queued wait under their ids in
    /// [`Server::waiting`].
    fn submit(&mut self, service: &mut dyn Service, draining: bool) -> Vec<(usize, Response)> {
        let mut ids = Vec::new();
        let mut reqs: Vec<Request<'_>> = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            if let Some(req) = c.as_ref().and_then(|c| c.request(self.next_id)) {
                ids.push((slot, self.next_id));
                reqs.push(req);
                self.next_id += 1;
            }
        }
        if reqs.is_empty() {
            return Vec::new();
        }
        let mut replies = service.submit(&reqs, draining);
        drop(reqs);
        if replies.len() != ids.len() {
            log::error!(
                "the service replied to {} of {} requests",
                replies.len(),
                ids.len()
            );
            replies.resize(
                ids.len(),
                Reply::Now(Response::error(
                    500,
                    "internal_error",
                    "no answer was computed",
                    None,
                )),
            );
        }
        let mut answered = Vec::new();
        for ((slot, id), reply) in ids.into_iter().zip(replies) {
            match reply {
                Reply::Now(resp) => answered.push((slot, resp)),
                Reply::Queued => {
                    if let Some(c) = self.conns[slot].as_mut() {
                        c.mark_submitted(id);
                        self.waiting.insert(id, slot);
                    }
                }
            }
        }
        answered
    }

    fn sweep(&mut self, drain: Option<&Drain>) {
        let now = Instant::now();
        // A listener whose accept failed (EMFILE) is tried again; one that is really empty
        // just answers WouldBlock.
        if drain.is_none() {
            self.acceptable.fill(true);
        }
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            let had_output = c.is_writing();
            if c.expired(now, self.limits, drain.map(|d| d.started)) {
                self.close(slot);
            } else if !had_output && c.is_writing() {
                // A 408 was queued: write it.
                self.drive(slot);
            }
        }
    }

    /// Connections that still have work: a request (partly) received, an answer being
    /// written, or nothing sent yet.
    fn in_flight(&self) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter(|c| !c.is_idle() || c.answered() == 0)
            .count()
    }
}

/// Serves until drained or orphaned. `listeners` are made non-blocking (they are shared with
/// the other workers, which expect that too).
pub fn run(
    listeners: Vec<std::net::TcpListener>,
    control: &mut dyn Control,
    service: &mut dyn Service,
    limits: &Limits,
) -> io::Result<Exit> {
    let poll = Poll::new()?;
    let mut mio_listeners = Vec::with_capacity(listeners.len());
    for (i, l) in listeners.into_iter().enumerate() {
        l.set_nonblocking(true)?;
        let mut l = TcpListener::from_std(l);
        poll.registry()
            .register(&mut l, Token(i), Interest::READABLE)?;
        mio_listeners.push(l);
    }
    let control_fd = control.fd();
    if let Some(fd) = control_fd {
        poll.registry()
            .register(&mut SourceFd(&fd), CONTROL, Interest::READABLE)?;
    }
    let mut s = Server {
        poll,
        listeners: mio_listeners,
        conns: Vec::new(),
        free: Vec::new(),
        open: 0,
        acceptable: Vec::new(),
        limits,
        served: 0,
        latency: Latency::default(),
        expected: Vec::new(),
        gather_until: None,
        waiting: HashMap::new(),
        cancelled: Vec::new(),
        next_id: 0,
        started: Instant::now(),
    };
    let mut events = Events::with_capacity(256);
    let mut drain: Option<Drain> = None;
    let mut next_heartbeat = Instant::now() + limits.heartbeat;
    let mut next_sweep = Instant::now() + SWEEP;
    // Connections may have queued before this worker started polling; edge-triggered
    // registration would not report them until the next one arrives.
    s.acceptable = vec![true; s.listeners.len()];

    loop {
        let now = Instant::now();
        if let Some(d) = &drain {
            if s.open == 0 {
                return Ok(Exit::Drained { served: s.served });
            }
            if now >= d.deadline {
                return Ok(Exit::DrainTimedOut { abandoned: s.open });
            }
        }
        let mut wake = next_heartbeat.min(next_sweep);
        if let Some(d) = &drain {
            wake = wake.min(d.deadline);
        }
        if let Some(until) = s
            .holding(now)
            .filter(|_| s.has_pending() || service.has_work())
        {
            wake = wake.min(until);
        }
        // Queued work is computed a step per turn, with no wait between the steps beyond the
        // batch hold.
        let computing = service.has_work() && s.holding(now).is_none();
        let timeout = if computing || s.has_work(now) {
            Duration::ZERO
        } else {
            wake.saturating_duration_since(now)
        };
        match s.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            // SIGIO from the control channel's lifeline interrupts epoll_wait.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let Token(t) = ev.token();
            if ev.token() == CONTROL {
                loop {
                    match control.poll() {
                        Ok(None) => break,
                        Ok(Some(ParentMessage::Drain { deadline_ms })) => {
                            if drain.is_none() {
                                drain = Some(start_drain(&mut s, control, service, deadline_ms)?);
                            }
                        }
                        // Sent to a spare before it serves (`serve` waits for it); here, late.
                        Ok(Some(ParentMessage::Activate { .. })) => {}
                        Err(WorkerError::Orphaned) => return Ok(Exit::Orphaned),
                        Err(e) => return Ok(Exit::Control(e)),
                    }
                }
            } else if t < FIRST_CONN {
                if let Some(a) = s.acceptable.get_mut(t) {
                    *a = drain.is_none();
                }
            } else {
                s.drive(t - FIRST_CONN);
            }
        }
        if drain.is_none() {
            s.accept_round();
        }
        if drain.is_some() || s.holding(Instant::now()).is_none() {
            s.serve(service, drain.is_some());
        }
        let now = Instant::now();
        if now >= next_sweep || drain.is_some() {
            s.sweep(drain.as_ref());
            next_sweep = now + SWEEP;
        }
        if now >= next_heartbeat {
            match control.heartbeat(s.served, &s.latency) {
                Ok(()) => {}
                Err(WorkerError::Orphaned) => return Ok(Exit::Orphaned),
                Err(e) => log::warn!("heartbeat failed: {e}"),
            }
            next_heartbeat = now + limits.heartbeat;
        }
    }
}

/// Begins the drain: takes every queued connection, lets go of the listeners, reports.
fn start_drain(
    s: &mut Server<'_>,
    control: &mut dyn Control,
    service: &mut dyn Service,
    deadline_ms: u64,
) -> io::Result<Drain> {
    let now = Instant::now();
    let drain = Drain {
        started: now,
        deadline: now + Duration::from_millis(deadline_ms),
    };
    s.accept_all();
    s.acceptable.clear();
    for mut l in s.listeners.drain(..) {
        let _ = s.poll.registry().deregister(&mut l);
    }
    // Give every connection a chance to read what already arrived, so that an idle-looking
    // keep-alive connection with a request in flight is not closed under it.
    for slot in 0..s.conns.len() {
        s.drive(slot);
    }
    s.serve(service, true);
    let in_flight = s.in_flight();
    log::info!("draining: {in_flight} connection(s) in flight, deadline in {deadline_ms} ms");
    match control.draining(in_flight as u32) {
        Ok(()) | Err(WorkerError::Orphaned) => {}
        Err(e) => log::warn!("could not report draining: {e}"),
    }
    Ok(drain)
}
