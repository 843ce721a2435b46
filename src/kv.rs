//! The replicated state machine: an in-memory map from keys to values.
//!
//! Only the node's apply step (or a snapshot install) writes to it, in log order, so every
//! member that has applied the same prefix of the log holds the same map. Readers take the
//! lock briefly to clone a value out (a reference-count increment). It must never be
//! written from anywhere but committed entries.
//!
//! The map is split into shards, each behind an `Arc`, so that a snapshot is taken in
//! O(shards): [`KvStore::freeze`] clones the shard pointers, and a later write to a shard
//! the snapshot writer still holds copies that one shard first (copy-on-write). The cost
//! of copying is spread over the writes that follow instead of pausing the raft loop.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::command::Command;

/// The map, shared between the node (the only writer) and the HTTP API (readers).
pub type SharedKv = Arc<RwLock<KvStore>>;

/// One shard; keys and values are reference-counted.
pub type KvMap = BTreeMap<Bytes, Bytes>;

/// Enough shards that copying one is a small pause even with millions of keys.
const SHARDS: usize = 64;

/// An immutable view of the whole map at one applied index, for a snapshot.
#[derive(Clone)]
pub struct FrozenKv {
    shards: Vec<Arc<KvMap>>,
}

impl FrozenKv {
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Every pair, shard by shard (not in key order).
    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Builds a view from pairs read back from a snapshot file.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Bytes, Bytes)>) -> FrozenKv {
        let mut shards = vec![KvMap::new(); SHARDS];
        for (key, value) in pairs {
            shards[shard_of(&key)].insert(key, value);
        }
        FrozenKv {
            shards: shards.into_iter().map(Arc::new).collect(),
        }
    }
}

impl Default for FrozenKv {
    fn default() -> FrozenKv {
        FrozenKv::from_pairs([])
    }
}

fn shard_of(key: &[u8]) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % SHARDS as u64) as usize
}

#[derive(Default)]
pub struct KvStore {
    map: FrozenKv,
}

impl KvStore {
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.map.shards[shard_of(key)].get(key).cloned()
    }

    /// The whole map as it is now, in O(shards).
    pub fn freeze(&self) -> FrozenKv {
        self.map.clone()
    }

    /// Replaces the whole map with a snapshot's.
    pub fn replace(&mut self, map: FrozenKv) {
        self.map = map;
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) {
        match command {
            Command::Put { key, value } => {
                // Own right-sized copies: slices would pin the whole buffer the entry was
                // read into (raft-engine reads whole, possibly compressed, blocks).
                let key = Bytes::copy_from_slice(&key);
                let value = Bytes::copy_from_slice(&value);
                let shard = &mut self.map.shards[shard_of(&key)];
                Arc::make_mut(shard).insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(kv: &mut KvStore, k: &str, v: &str) {
        kv.apply(Command::Put {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
        });
    }

    #[test]
    fn a_frozen_view_does_not_see_later_writes() {
        let mut kv = KvStore::default();
        for i in 0..1000 {
            put(&mut kv, &format!("k{i}"), "old");
        }
        let frozen = kv.freeze();
        for i in 0..1000 {
            put(&mut kv, &format!("k{i}"), "new");
        }
        put(&mut kv, "extra", "x");
        assert_eq!(frozen.len(), 1000);
        assert!(frozen.iter().all(|(_, v)| v == "old"));
        assert_eq!(kv.get(b"k7").unwrap(), "new");
        assert_eq!(kv.freeze().len(), 1001);
    }
}
