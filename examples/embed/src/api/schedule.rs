//! Which texts go into the next forward pass: the app's scheduling decisions, apart from the
//! arithmetic (pure, no tensors; [`super::App`] carries them out).
//!
//! Every queued request is a list of texts with their word-piece counts. A pass takes at most a
//! budget of word pieces (`max_batch_tokens`), so a pass, and with it a turn of the worker's
//! loop, stays short whatever one request asked for. A pass is filled in this order:
//!
//! 1. the next text of the started request at the front of the turn order;
//! 2. requests not started yet, in arrival order, each taking as many of its texts as fit: a
//!    small request that arrives while a large one computes is answered by the next pass;
//! 3. started requests in turn, taking what still fits; one that got texts moves to the back,
//!    so two large requests share the passes instead of one waiting for the other.
//!
//! While new requests wait beside started ones, the passes alternate: one of new requests only
//! (step 2 alone: short, so a small request waits for at most the pass being computed when it
//! arrived, plus its own short one), then one of all three steps. So a started request advances
//! at least every other pass, however many new ones arrive, and new ones are in every pass.
//!
//! With a budget of at least two of the longest texts (the app makes sure of it), step 2 always
//! has room for a new request's first text. Every pass takes at least one text, so work always
//! advances, even for a text longer than the budget.

use std::collections::VecDeque;
use std::ops::Range;

/// One request's progress: its texts' word pieces, and how many texts are computed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    id: u64,
    lens: Vec<usize>,
    done: usize,
}

impl Progress {
    fn next_len(&self) -> Option<usize> {
        self.lens.get(self.done).copied()
    }

    /// Takes as many of the next texts as fit in `room` word pieces (at least one when
    /// `at_least_one`); returns the range taken and the word pieces it holds.
    fn take(&mut self, room: usize, at_least_one: bool) -> Option<(Range<usize>, usize)> {
        let start = self.done;
        let mut used = 0;
        while let Some(len) = self.next_len() {
            let forced = at_least_one && self.done == start;
            if used + len > room && !forced {
                break;
            }
            used += len;
            self.done += 1;
        }
        (self.done > start).then_some((start..self.done, used))
    }

    fn finished(&self) -> bool {
        self.done >= self.lens.len()
    }
}

/// The texts of one forward pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Texts of each request, by index within the request, in the order the pass lays them out.
    pub parts: Vec<(u64, Range<usize>)>,
    /// Requests whose last texts are in this pass.
    pub finished: Vec<u64>,
    /// Word pieces in the pass.
    pub tokens: usize,
}

/// The queue of requests whose texts are still to be computed.
#[derive(Debug, Default)]
pub struct Scheduler {
    fresh: VecDeque<Progress>,
    started: VecDeque<Progress>,
    /// The last pass left the started requests out (new ones only): this one is theirs too.
    owed: bool,
}

impl Scheduler {
    /// Queues request `id`, whose texts have `lens` word pieces each. A request of no texts
    /// finishes in the next pass.
    pub fn push(&mut self, id: u64, lens: Vec<usize>) {
        self.fresh.push_back(Progress { id, lens, done: 0 });
    }

    /// Forgets request `id` (its client went away).
    pub fn cancel(&mut self, id: u64) {
        self.fresh.retain(|p| p.id != id);
        self.started.retain(|p| p.id != id);
    }

    pub fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.started.is_empty()
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.fresh.len() + self.started.len()
    }

    /// Picks the texts of the next pass, at most `budget` word pieces (but at least one text),
    /// and counts them as computed.
    pub fn next_pass(&mut self, budget: usize) -> Pass {
        let mut pass = Pass::default();
        let mut served: Vec<Progress> = Vec::new();
        // New requests only, every other pass while they wait beside started ones.
        let fresh_only = !self.fresh.is_empty() && !self.started.is_empty() && !self.owed;
        self.owed = fresh_only;
        // 1. The front started request's next text.
        if !fresh_only {
            if let Some(mut p) = self.started.pop_front() {
                if let Some((range, tokens)) = p.take(0, true) {
                    pass.add(p.id, range, tokens);
                }
                served.push(p);
            }
        }
        // 2. New requests.
        let mut still_fresh = VecDeque::new();
        let mut now_started = Vec::new();
        while let Some(mut p) = self.fresh.pop_front() {
            let room = budget.saturating_sub(pass.tokens);
            match p.take(room, pass.tokens == 0) {
                Some((range, tokens)) => {
                    pass.add(p.id, range, tokens);
                    now_started.push(p);
                }
                None if p.finished() => now_started.push(p),
                None => still_fresh.push_back(p),
            }
        }
        self.fresh = still_fresh;
        // 3. Started requests, the front one again first.
        let mut waited = VecDeque::new();
        for mut p in served
            .drain(..)
            .chain(self.started.drain(..))
            .collect::<Vec<_>>()
        {
            let room = if fresh_only {
                0
            } else {
                budget.saturating_sub(pass.tokens)
            };
            let had = pass.parts.iter().any(|(id, _)| *id == p.id);
            match p.take(room, false) {
                Some((range, tokens)) => {
                    pass.add(p.id, range, tokens);
                    served.push(p);
                }
                None if had => served.push(p),
                None => waited.push_back(p),
            }
        }
        // Those that waited keep their turn; those served go to the back, then the new ones.
        for p in served.into_iter().chain(now_started) {
            if p.finished() {
                pass.finished.push(p.id);
            } else {
                waited.push_back(p);
            }
        }
        self.started = waited;
        pass
    }
}

impl Pass {
    /// Adds texts `range` of request `id`, merged with its previous part when they follow on.
    fn add(&mut self, id: u64, range: Range<usize>, tokens: usize) {
        self.tokens += tokens;
        if let Some((last, r)) = self.parts.last_mut() {
            if *last == id && r.end == range.start {
                r.end = range.end;
                return;
            }
        }
        self.parts.push((id, range));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pass: &Pass) -> Vec<u64> {
        pass.parts.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn small_requests_share_one_pass() {
        let mut s = Scheduler::default();
        s.push(1, vec![10, 12]);
        s.push(2, vec![8]);
        let p = s.next_pass(512);
        assert_eq!(p.parts, vec![(1, 0..2), (2, 0..1)]);
        assert_eq!(p.finished, vec![1, 2]);
        assert_eq!(p.tokens, 30);
        assert!(s.is_empty());
    }

    #[test]
    fn a_large_request_is_split_into_passes_within_the_budget() {
        let mut s = Scheduler::default();
        s.push(1, vec![256; 10]);
        let mut passes = 0;
        while !s.is_empty() {
            let p = s.next_pass(512);
            assert!(p.tokens <= 512, "{p:?}");
            passes += 1;
        }
        assert_eq!(passes, 5);
    }

    #[test]
    fn a_small_request_does_not_wait_behind_a_large_one() {
        let mut s = Scheduler::default();
        s.push(1, vec![256; 256]);
        let first = s.next_pass(512);
        assert_eq!(first.parts, vec![(1, 0..2)]);
        // A small request arrives while the first pass computes: the next pass has it, and
        // nothing else, so it is short.
        s.push(2, vec![12]);
        let next = s.next_pass(512);
        assert_eq!(ids(&next), vec![2]);
        assert_eq!((next.finished, next.tokens), (vec![2], 12));
        // Then the large one goes on.
        assert_eq!(ids(&s.next_pass(512)), vec![1]);
    }

    #[test]
    fn new_requests_cannot_starve_a_started_one() {
        let mut s = Scheduler::default();
        s.push(1, vec![256; 4]);
        s.next_pass(512);
        // Every pass is crowded by new requests that would fill it alone; request 1 still
        // advances at least every other pass.
        let mut passes = Vec::new();
        for id in 2..20 {
            s.push(id, vec![100; 5]);
            let p = s.next_pass(512);
            assert!(p.tokens <= 512);
            passes.push(ids(&p).contains(&1));
            if s.started.iter().all(|p| p.id != 1) && s.fresh.iter().all(|p| p.id != 1) {
                assert!(passes.windows(2).all(|w| w[0] || w[1]), "{passes:?}");
                return;
            }
        }
        panic!("request 1 did not finish: {passes:?}");
    }

    #[test]
    fn two_large_requests_take_turns() {
        let mut s = Scheduler::default();
        s.push(1, vec![256; 16]);
        s.next_pass(512);
        s.push(2, vec![256; 16]);
        let passes: Vec<Vec<u64>> = (0..6).map(|_| ids(&s.next_pass(512))).collect();
        for two in passes.windows(2) {
            let both = two.concat();
            assert!(both.contains(&1) && both.contains(&2), "{passes:?}");
        }
    }

    #[test]
    fn a_text_longer_than_the_budget_still_advances() {
        let mut s = Scheduler::default();
        s.push(1, vec![600, 600]);
        let p = s.next_pass(512);
        assert_eq!(p.parts, vec![(1, 0..1)]);
        let p = s.next_pass(512);
        assert_eq!((p.parts.clone(), p.finished), (vec![(1, 1..2)], vec![1]));
    }

    #[test]
    fn cancelled_and_empty_requests() {
        let mut s = Scheduler::default();
        s.push(1, vec![10]);
        s.push(2, Vec::new());
        s.cancel(1);
        assert_eq!(s.len(), 1);
        let p = s.next_pass(512);
        assert_eq!((p.parts.len(), p.finished), (0, vec![2]));
        assert!(s.is_empty());
    }
}
