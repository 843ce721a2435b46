//! A group's recent changes, for watches (`api/watch_v1.rs`): every put and delete the
//! map applied, with its revision, in apply order, the newest `capacity` of them.
//!
//! Every replica applies the same entries in the same order at the same revisions, so
//! the history of any member, leader or follower, lists the same events under the same
//! revisions, and a watcher that resumes on another node from the revision after the
//! last it saw gets exactly the rest. The history says from which revision on it is
//! complete (`first`): older events were dropped for room, or were never seen here (the
//! map was replaced by a snapshot, or loaded from one at start-up, and the log replayed
//! after it). A request for events from before that is refused with the oldest revision
//! still available, never answered with a gap. Only the map's apply step writes it.

use std::collections::VecDeque;

use bytes::Bytes;

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub revision: u64,
    pub key: Bytes,
    /// The value put; None for a delete.
    pub value: Option<Bytes>,
}

/// What [`History::since`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    /// The matching events, in revision order (whole revisions only).
    pub events: Vec<Event>,
    /// The revision to ask from next: every revision before it was looked at.
    pub next: u64,
}

/// The events of a group's recent revisions.
#[derive(Debug)]
pub struct History {
    events: VecDeque<Event>,
    /// Every event with a revision from this one on is in `events`.
    first: u64,
    capacity: usize,
}

/// Events kept per group unless `--watch-history` says otherwise.
pub const DEFAULT_CAPACITY: usize = 10_000;

impl Default for History {
    fn default() -> History {
        History::new(DEFAULT_CAPACITY, 0)
    }
}

impl History {
    /// An empty history of a map at `revision`, keeping up to `capacity` events.
    pub fn new(capacity: usize, revision: u64) -> History {
        History {
            events: VecDeque::new(),
            first: revision + 1,
            capacity,
        }
    }

    /// The oldest revision whose events are all here.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Keeps up to `capacity` events from now on (the newest, if it holds more).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.trim();
    }

    /// Records a change applied at `revision` (not older than the last recorded).
    pub fn record(&mut self, event: Event) {
        debug_assert!(self
            .events
            .back()
            .is_none_or(|e| e.revision <= event.revision));
        if self.capacity == 0 {
            self.first = event.revision + 1;
            return;
        }
        self.events.push_back(event);
        self.trim();
    }

    /// Drops the oldest revisions, each whole, until at most `capacity` events are left.
    fn trim(&mut self) {
        while self.events.len() > self.capacity {
            let Some(oldest) = self.events.front().map(|e| e.revision) else {
                break;
            };
            while self.events.front().is_some_and(|e| e.revision == oldest) {
                self.events.pop_front();
            }
            self.first = oldest + 1;
        }
    }

    /// Forgets every event: the map is now a snapshot's, at `revision`.
    pub fn reset(&mut self, revision: u64) {
        self.events.clear();
        self.first = revision + 1;
    }

    /// The events from revision `from` on whose key `matches`, up to the map's current
    /// `revision`, at least `max` of them when there are (a revision is never split);
    /// `Err(first)` if events from `from` on are not all here any more.
    pub fn since(
        &self,
        from: u64,
        revision: u64,
        matches: impl Fn(&[u8]) -> bool,
        max: usize,
    ) -> Result<Found, u64> {
        if from < self.first {
            return Err(self.first);
        }
        let start = self.events.partition_point(|e| e.revision < from);
        let mut events: Vec<Event> = Vec::new();
        let mut next = from.max(revision + 1);
        for event in self.events.range(start..) {
            if events.len() >= max && events.last().is_some_and(|e| e.revision != event.revision) {
                next = event.revision;
                break;
            }
            if matches(&event.key) {
                events.push(event.clone());
            }
        }
        Ok(Found { events, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: u64, key: &str) -> Event {
        Event {
            revision,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Some(Bytes::from_static(b"v")),
        }
    }

    fn keys(found: &Found) -> Vec<(u64, &[u8])> {
        found
            .events
            .iter()
            .map(|e| (e.revision, &e.key[..]))
            .collect()
    }

    #[test]
    fn events_come_back_in_order_filtered_and_whole_revisions_at_a_time() {
        let mut history = History::new(100, 0);
        history.record(put(1, "a/1"));
        history.record(put(2, "b/1"));
        history.record(put(3, "a/2"));
        history.record(put(3, "a/3"));
        history.record(put(5, "a/4"));
        let all = |_: &[u8]| true;
        let found = history.since(1, 5, |k| k.starts_with(b"a/"), 100).unwrap();
        assert_eq!(
            keys(&found),
            [(1, &b"a/1"[..]), (3, b"a/2"), (3, b"a/3"), (5, b"a/4")]
        );
        assert_eq!(found.next, 6);
        // At most 2, but revision 3 is never cut in half.
        let found = history.since(2, 5, all, 2).unwrap();
        assert_eq!(keys(&found), [(2, &b"b/1"[..]), (3, b"a/2"), (3, b"a/3")]);
        assert_eq!(found.next, 5);
        // Nothing new: the position moves to the map's revision.
        let found = history.since(6, 7, all, 10).unwrap();
        assert!(found.events.is_empty());
        assert_eq!(found.next, 8);
        let found = history.since(9, 7, all, 10).unwrap();
        assert_eq!(found.next, 9, "a position ahead of the map stays");
    }

    #[test]
    fn old_revisions_go_whole_and_asking_for_them_is_an_error() {
        let mut history = History::new(2, 0);
        history.record(put(1, "a"));
        history.record(put(2, "b"));
        history.record(put(2, "c"));
        assert_eq!(history.first(), 2, "revision 1 went for room");
        assert_eq!(history.since(1, 2, |_| true, 10), Err(2));
        history.record(put(3, "d"));
        assert_eq!(history.first(), 3, "both events of revision 2 went");
        history.reset(10);
        assert_eq!(history.since(5, 10, |_| true, 10), Err(11));
        assert!(history
            .since(11, 10, |_| true, 10)
            .unwrap()
            .events
            .is_empty());
        let mut none = History::new(0, 0);
        none.record(put(4, "a"));
        assert_eq!(none.since(4, 4, |_| true, 10), Err(5));
    }
}
