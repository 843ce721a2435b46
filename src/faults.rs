//! Test-only network partitions: the set of peers whose raft messages this node drops,
//! in both directions. Dropped messages vanish silently (the sender sees success), so a
//! partition stalls traffic as a real one does, instead of resetting connections.
//!
//! Only reachable when raftkvd runs with `--enable-fault-injection`, through
//! `POST /debug/partition` (see api/admin.rs). It must never be switched on in production.

use std::collections::BTreeSet;
use std::sync::RwLock;

#[derive(Default)]
pub struct Partition {
    blocked: RwLock<BTreeSet<u64>>,
}

impl Partition {
    /// Messages to or from `peer` are dropped.
    pub fn is_blocked(&self, peer: u64) -> bool {
        let blocked = self.blocked.read().unwrap();
        !blocked.is_empty() && blocked.contains(&peer)
    }

    /// Replaces the blocked set (empty heals the partition).
    pub fn set(&self, peers: BTreeSet<u64>) {
        *self.blocked.write().unwrap() = peers;
    }
}
