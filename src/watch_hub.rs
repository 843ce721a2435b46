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

/// Which keys a watcher wants: any of `keys`, and any key that starts with one of
/// `prefixes` (one stream may watch several, as etcd multiplexes watches on a stream).
#[derive(Clone, Debug, Default)]
pub struct Keys {
    pub keys: Vec<Bytes>,
    pub prefixes: Vec<Bytes>,
}

impl Keys {
    /// One key.
    pub fn one(key: Bytes) -> Keys {
        Keys {
            keys: vec![key],
            prefixes: Vec::new(),
        }
    }

    /// Every key that starts with `prefix`.
    #[cfg(test)]
    pub fn prefix(prefix: Bytes) -> Keys {
        Keys {
            keys: Vec::new(),
            prefixes: vec![prefix],
        }
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        self.keys.iter().any(|one| key == &one[..])
            || self.prefixes.iter().any(|prefix| key.starts_with(prefix))
    }

    /// How many keys and prefixes: a registration of more than one may be offered one
    /// change several times (`WatchHub::dispatch` hands it over once).
    pub fn len(&self) -> usize {
        self.keys.len() + self.prefixes.len()
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
    /// How many of `by_prefix`'s prefixes have each length: a change looks up only its
    /// key's prefixes of those lengths (ten thousand prefixes of one length cost one
    /// lookup per change, not one per byte of the key).
    prefix_lengths: BTreeMap<usize, usize>,
    /// Each registered id and its keys, to unregister it.
    registered: HashMap<u64, Keys>,
    /// Registrations of more than one key or prefix.
    several: usize,
    next_id: u64,
}

impl WatchHub {
    /// From now on, every change of `keys` goes to `tx`, once; returns the
    /// registration's id.
    pub fn register(&mut self, keys: Keys, tx: mpsc::Sender<Event>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        for key in &keys.keys {
            let subscriber = Subscriber { id, tx: tx.clone() };
            self.by_key.entry(key.clone()).or_default().push(subscriber);
        }
        for prefix in &keys.prefixes {
            let subscriber = Subscriber { id, tx: tx.clone() };
            let list = self.by_prefix.entry(prefix.clone()).or_insert_with(|| {
                *self.prefix_lengths.entry(prefix.len()).or_default() += 1;
                Vec::new()
            });
            list.push(subscriber);
        }
        if keys.len() > 1 {
            self.several += 1;
        }
        self.registered.insert(id, keys);
        id
    }

    /// Forgets registration `id` (if the hub has not dropped it already).
    pub fn unregister(&mut self, id: u64) {
        let Some(keys) = self.registered.remove(&id) else {
            return;
        };
        if keys.len() > 1 {
            self.several -= 1;
        }
        for key in &keys.keys {
            if without(self.by_key.get_mut(key), id) {
                self.by_key.remove(key);
            }
        }
        for prefix in &keys.prefixes {
            if without(self.by_prefix.get_mut(prefix), id) {
                self.by_prefix.remove(prefix);
                if let Some(count) = self.prefix_lengths.get_mut(&prefix.len()) {
                    *count -= 1;
                    if *count == 0 {
                        self.prefix_lengths.remove(&prefix.len());
                    }
                }
            }
        }
    }

    /// Drops every registration: their tasks catch up from the history (which a
    /// snapshot just replaced).
    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_prefix.clear();
        self.prefix_lengths.clear();
        self.registered.clear();
        self.several = 0;
    }

    /// Hands `event` to every watcher of its key, once each; drops those that cannot
    /// take it now.
    pub fn dispatch(&mut self, event: &Event) {
        if self.registered.is_empty() {
            return;
        }
        let mut offer = Offer {
            event,
            offered: Vec::new(),
            dedup: self.several > 0,
            dropped: Vec::new(),
        };
        if let Some(list) = self.by_key.get(&event.key) {
            offer.to(list);
        }
        for &end in self
            .prefix_lengths
            .range(..=event.key.len())
            .map(|(len, _)| len)
        {
            if let Some(list) = self.by_prefix.get(&event.key[..end]) {
                offer.to(list);
            }
        }
        for id in offer.dropped {
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

/// One change being handed to its watchers.
struct Offer<'a> {
    event: &'a Event,
    /// The registrations it went to, when one may be met twice (several keys).
    offered: Vec<u64>,
    dedup: bool,
    /// Those whose channel was full.
    dropped: Vec<u64>,
}

impl Offer<'_> {
    fn to(&mut self, list: &[Subscriber]) {
        for subscriber in list {
            if self.dedup {
                if self.offered.contains(&subscriber.id) {
                    continue;
                }
                self.offered.push(subscriber.id);
            }
            if subscriber.tx.try_send(self.event.clone()).is_err() {
                self.dropped.push(subscriber.id);
            }
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
        hub.register(Keys::one(b("a/1")), one_tx);
        hub.register(Keys::prefix(b("")), all_tx);
        let sub_id = hub.register(Keys::prefix(b("a/")), sub_tx);
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
        let lengths: Vec<usize> = hub.prefix_lengths.keys().copied().collect();
        assert_eq!(lengths, vec![0], "only the empty prefix is left");
        let (tx, _rx) = mpsc::channel(1);
        let id = hub.register(Keys::one(b("x")), tx);
        hub.unregister(id);
        assert_eq!(hub.len(), 2);
        assert!(!hub.by_key.contains_key(&b("x")[..]));
        hub.clear();
        assert_eq!(hub.len(), 0);
    }

    #[test]
    fn a_watcher_of_several_keys_and_prefixes_gets_each_change_once() {
        let mut hub = WatchHub::default();
        let (tx, mut rx) = mpsc::channel(8);
        let several = Keys {
            keys: vec![b("a/1"), b("c")],
            prefixes: vec![b("a/"), b("a"), b("b/")],
        };
        let id = hub.register(several, tx);
        for (revision, key) in [
            (1, "a/1"),
            (2, "a/2"),
            (3, "c"),
            (4, "d"),
            (5, "b/x"),
            (6, "cc"),
        ] {
            hub.dispatch(&event(revision, key));
        }
        let got: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok().map(|e| e.revision)).collect();
        assert_eq!(got, vec![1, 2, 3, 5]);
        hub.unregister(id);
        assert!(hub.by_key.is_empty() && hub.by_prefix.is_empty());
        assert!(hub.prefix_lengths.is_empty());
        assert_eq!((hub.len(), hub.several), (0, 0));
    }
}
