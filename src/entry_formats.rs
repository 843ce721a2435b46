//! Which formats of log entries the cluster's members read, so that a node writes a new
//! format only once every member has said it reads it (what etcd's cluster version
//! does for its own features). A rolling upgrade that brings a new entry format then
//! never makes an old member stop at an entry it cannot read: the new format is written
//! only after the last old member has been upgraded.
//!
//! Every peer stream names the newest format its sender reads (`HEADER`); the receiver
//! remembers it per peer. A peer not heard from yet, or one too old to say, counts as
//! reading format 1 only. Nothing here is persisted: after a restart a node writes the
//! oldest format until its peers have spoken, which costs only the batching of writes
//! (format 2) for those first moments. A node never trusts a peer's word for its own
//! reading: an entry newer than it reads stops it (`node/group.rs`).

use std::collections::HashMap;
use std::sync::Mutex;

/// The header a peer stream names its sender's newest readable entry format in.
pub const HEADER: &str = "x-raftkvd-entry-format";
/// Entries of one proposal each, as every release has written.
pub const SINGLE: u8 = 1;
/// Entries that carry several proposals (a round's writes).
pub const BATCH: u8 = 2;
/// The table of groups may place a node again in a group it was removed from
/// (`command.rs`'s `ReAddGroupMember`, under the replica's next raft id).
pub const REHOST: u8 = 3;
/// Leases: their grant, keepalive and revoke, and puts that attach a key to one
/// (`command.rs`, `leases.rs`).
pub const LEASES: u8 = 4;
/// The newest format this build reads and writes.
pub const NEWEST: u8 = LEASES;

pub struct EntryFormats {
    /// The newest format this node reads.
    own: u8,
    /// The newest format each peer said it reads.
    peers: Mutex<HashMap<u64, u8>>,
    /// What `writable` answered last, to log a change once.
    last_writable: Mutex<u8>,
}

impl EntryFormats {
    pub fn new(own: u8) -> EntryFormats {
        EntryFormats {
            own,
            peers: Mutex::default(),
            last_writable: Mutex::new(SINGLE),
        }
    }

    /// The newest format this node reads.
    pub fn own(&self) -> u8 {
        self.own
    }

    /// `peer` said it reads formats up to `newest`.
    pub fn heard(&self, peer: u64, newest: u8) {
        self.peers.lock().unwrap().insert(peer, newest);
    }

    /// Whether this node and every one of `members` read `format`.
    pub fn all_read(&self, members: impl Iterator<Item = u64>, format: u8) -> bool {
        let peers = self.peers.lock().unwrap();
        self.own >= format
            && members
                .into_iter()
                .all(|id| peers.get(&id).copied().unwrap_or(SINGLE) >= format)
    }

    /// The newest format every one of `members` (this node among them or not) reads,
    /// and whether that changed since the last call.
    pub fn writable(&self, members: impl Iterator<Item = u64>) -> (u8, bool) {
        let peers = self.peers.lock().unwrap();
        let newest = members
            .map(|id| peers.get(&id).copied().unwrap_or(SINGLE))
            .fold(self.own, u8::min);
        drop(peers);
        let mut last = self.last_writable.lock().unwrap();
        let changed = *last != newest;
        *last = newest;
        (newest, changed)
    }
}

/// Parses the header's value; a peer that sends none reads format 1 only.
pub fn parse(value: Option<&str>) -> u8 {
    value
        .and_then(|v| v.trim().parse::<u8>().ok())
        .filter(|&v| v >= SINGLE)
        .unwrap_or(SINGLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_reader_among_the_members_decides() {
        let formats = EntryFormats::new(NEWEST);
        assert_eq!(formats.writable([2, 3].into_iter()), (SINGLE, false));
        formats.heard(2, BATCH);
        assert_eq!(
            formats.writable([2, 3].into_iter()).0,
            SINGLE,
            "3 is not heard"
        );
        formats.heard(3, SINGLE);
        assert_eq!(formats.writable([2, 3].into_iter()).0, SINGLE);
        formats.heard(3, BATCH);
        assert_eq!(formats.writable([2, 3].into_iter()), (BATCH, true));
        assert_eq!(formats.writable([2].into_iter()), (BATCH, false));
        assert_eq!(
            EntryFormats::new(SINGLE).writable([2].into_iter()).0,
            SINGLE
        );
        assert!(formats.all_read([2, 3].into_iter(), BATCH));
        assert!(!formats.all_read([2, 3].into_iter(), REHOST));
        assert!(!EntryFormats::new(BATCH).all_read([].into_iter(), REHOST));
        assert_eq!(parse(None), SINGLE);
        assert_eq!(parse(Some("2")), BATCH);
        assert_eq!(parse(Some("0")), SINGLE);
        assert_eq!(parse(Some("x")), SINGLE);
    }
}
