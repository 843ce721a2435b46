//! The replicated state machine: an ordered in-memory map from keys to values.
//!
//! Only the node's apply step (or a snapshot install) writes to it, in log order, so every
//! member that has applied the same prefix of the log holds the same map. Readers take the lock briefly to copy a
//! value out. It must never be written from anywhere but committed entries.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::command::Command;

/// The map, shared between the node (the only writer) and the HTTP API (readers).
pub type SharedKv = Arc<RwLock<KvStore>>;

/// Keys and values are reference-counted: copying the map for a snapshot copies pointers.
pub type KvMap = BTreeMap<Bytes, Bytes>;

#[derive(Default)]
pub struct KvStore {
    map: KvMap,
}

impl KvStore {
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    /// A copy of the whole map, for a snapshot.
    pub fn copy_map(&self) -> KvMap {
        self.map.clone()
    }

    /// Replaces the whole map with a snapshot's.
    pub fn replace(&mut self, map: KvMap) {
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
                self.map.insert(key, value);
            }
        }
    }
}
