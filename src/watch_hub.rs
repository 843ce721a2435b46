//! Who watches which keys of one group's map, so that applying a change hands it to
//! exactly the watchers it concerns: a key watch is found by one hash lookup, a prefix
//! watch by looking up each prefix of the changed key, so the cost per change does not
//! grow with the number of watchers of other keys, and a watcher that nothing concerns
//! is never woken (`api/watch_v1.rs`).
//!
//! The map's apply step dispatches under the map's write lock; a watcher registers
//! under the read lock, after reading the history up to the map's revision, so between
//! the history and the live events nothing is missed or repeated. Dispatch never
//! blocks: a watcher whose channel is full (a slow client) is dropped from the hub, and
//! its task, finding its channel closed, catches up from the history and registers
//! again. It must never hold a watcher's events back from another.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::history::Event;

/// Which keys a watcher wants.
#[derive(Clone, Debug)]
pub enum Keys {
    One(Bytes),
    Prefix(Bytes),
}

impl Keys {
    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            Keys::One(one) => key == &one[..],
            Keys::Prefix(prefix) => key.starts_with(prefix),
        }
    }
}

/// A registered watcher: where its events go.
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Event>,
}

#[derive(Default)]
pub struct WatchHub {
    by_key: HashMap<Bytes, Vec<Subscriber>>,
    by_prefix: BTreeMap<Bytes, Vec<Subscriber>>,
    /// Each registered id and its keys, to unregister it.
    registered: HashMap<u64, Keys>,
    next_id: u64,
}

impl WatchHub {
    /// From now on, every change of `keys` goes to `tx`; returns the registration's id.
    pub fn register(&mut self, keys: Keys, tx: mpsc::Sender<Event>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let subscriber = Subscriber { id, tx };
        match &keys {
            Keys::One(key) => self.by_key.entry(key.clone()).or_default().push(subscriber),
            Keys::Prefix(prefix) => self
                .by_prefix
                .entry(prefix.clone())
                .or_default()
                .push(subscriber),
        }
        self.registered.insert(id, keys);
        id
    }

    /// Forgets registration `id` (if the hub has not dropped it already).
    pub fn unregister(&mut self, id: u64) {
        match self.registered.remove(&id) {
            Some(Keys::One(key)) if without(self.by_key.get_mut(&key), id) => {
                self.by_key.remove(&key);
            }
            Some(Keys::Prefix(prefix)) if without(self.by_prefix.get_mut(&prefix), id) => {
                self.by_prefix.remove(&prefix);
            }
            _ => {}
        }
    }

    /// Drops every registration: their tasks catch up from the history (which a
    /// snapshot just replaced).
    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_prefix.clear();
        self.registered.clear();
    }

    /// Hands `event` to every watcher of its key; drops those that cannot take it now.
    pub fn dispatch(&mut self, event: &Event) {
        if self.registered.is_empty() {
            return;
        }
        let mut dropped = Vec::new();
        if let Some(list) = self.by_key.get(&event.key) {
            offer(list, event, &mut dropped);
        }
        if !self.by_prefix.is_empty() {
            for end in 0..=event.key.len() {
                if let Some(list) = self.by_prefix.get(&event.key[..end]) {
                    offer(list, event, &mut dropped);
                }
            }
        }
        for id in dropped {
            self.unregister(id);
        }
    }

    /// How many watchers are registered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.registered.len()
    }
}

/// Takes registration `id` out of `list`; whether the list is empty now.
fn without(list: Option<&mut Vec<Subscriber>>, id: u64) -> bool {
    list.is_some_and(|list| {
        list.retain(|s| s.id != id);
        list.is_empty()
    })
}

fn offer(list: &[Subscriber], event: &Event, dropped: &mut Vec<u64>) {
    for subscriber in list {
        if subscriber.tx.try_send(event.clone()).is_err() {
            dropped.push(subscriber.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64, key: &str) -> Event {
        Event {
            revision,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: None,
        }
    }

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn changes_reach_only_their_watchers_and_a_full_one_is_dropped() {
        let mut hub = WatchHub::default();
        let (one_tx, mut one) = mpsc::channel(8);
        let (all_tx, mut all) = mpsc::channel(8);
        let (sub_tx, mut sub) = mpsc::channel(1);
        hub.register(Keys::One(b("a/1")), one_tx);
        hub.register(Keys::Prefix(b("")), all_tx);
        let sub_id = hub.register(Keys::Prefix(b("a/")), sub_tx);
        hub.dispatch(&event(1, "a/1"));
        hub.dispatch(&event(2, "b"));
        assert_eq!(one.try_recv().unwrap().revision, 1);
        assert!(one.try_recv().is_err(), "b is not a/1");
        assert_eq!(all.try_recv().unwrap().revision, 1);
        assert_eq!(all.try_recv().unwrap().revision, 2);
        assert_eq!(sub.try_recv().unwrap().revision, 1);
        hub.dispatch(&event(3, "a/2"));
        hub.dispatch(&event(4, "a/3"));
        assert_eq!(hub.len(), 2, "the watcher of a/ was full at revision 4");
        assert_eq!(sub.try_recv().unwrap().revision, 3);
        assert!(sub.try_recv().is_err(), "dropped: its sender is gone");
        hub.unregister(sub_id);
        let (tx, _rx) = mpsc::channel(1);
        let id = hub.register(Keys::One(b("x")), tx);
        hub.unregister(id);
        assert_eq!(hub.len(), 2);
        assert!(!hub.by_key.contains_key(&b("x")[..]));
        hub.clear();
        assert_eq!(hub.len(), 0);
    }
}
