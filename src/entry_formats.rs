//! Which formats of log entries the cluster's members read, so that a node writes a new
//! format only once every member has said it reads it (what etcd's cluster version
//! does for its own features). A rolling upgrade that brings a new entry format then
//! never makes an old member stop at an entry it cannot read: the new format is written
//! only after the last old member has been upgraded.
//!
//! Every peer stream names the newest format its sender reads (`HEADER`); the receiver
//! remembers it per peer, in memory and in its data dir (`entry-formats`), so that a
//! restart does not forget it: a node restarted while a member is down would otherwise
//! write the oldest format, refuse leases and not batch writes until that member came
//! back. A peer never heard from, or one too old to say, counts as reading format 1
//! only. A node never trusts a peer's word for its own reading: an entry newer than it
//! reads stops it (`node/group.rs`), so a member downgraded to an older release while it
//! was down stops at the first entry it cannot read, with a message saying so, until it
//! is upgraded again (what it says once it is up is heard within a second).

use std::collections::HashMap;
use std::path::PathBuf;
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
/// Deletes of every key under a prefix (`command.rs`'s `Write::DeletePrefix`).
pub const DELETE_PREFIX: u8 = 5;
/// Transactions with an else branch and reads (`command.rs`'s `Op::Txn`).
pub const TXN: u8 = 6;
/// The newest format this build reads and writes.
pub const NEWEST: u8 = TXN;

pub struct EntryFormats {
    /// The newest format this node reads.
    own: u8,
    /// The newest format each peer said it reads.
    peers: Mutex<HashMap<u64, u8>>,
    /// What `writable` answered last, to log a change once.
    last_writable: Mutex<u8>,
    /// Where `peers` is kept across restarts (none in unit tests).
    file: Option<PathBuf>,
}

impl EntryFormats {
    pub fn new(own: u8) -> EntryFormats {
        EntryFormats {
            own,
            peers: Mutex::default(),
            last_writable: Mutex::new(SINGLE),
            file: None,
        }
    }

    /// The same, remembering what peers said in `file` (read now, if it exists; a line
    /// `<node id> <format>` per peer). A damaged file is forgotten, not trusted: the
    /// peers are heard again within a second of being up.
    pub fn remembered_in(own: u8, file: PathBuf) -> EntryFormats {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let peers = text
            .lines()
            .map(|line| {
                let (id, format) = line.split_once(' ')?;
                Some((id.parse().ok()?, format.parse().ok()?))
            })
            .collect::<Option<HashMap<u64, u8>>>()
            .unwrap_or_default();
        EntryFormats {
            peers: Mutex::new(peers),
            file: Some(file),
            ..EntryFormats::new(own)
        }
    }

    /// The newest format this node reads.
    pub fn own(&self) -> u8 {
        self.own
    }

    /// `peer` said it reads formats up to `newest`. A change is written to the file
    /// before it counts; if it cannot be, the peer counts as reading the older of what
    /// was remembered and what it said, which is safe either way.
    pub fn heard(&self, peer: u64, newest: u8) -> std::io::Result<()> {
        let mut peers = self.peers.lock().unwrap();
        let before = peers.get(&peer).copied();
        if before == Some(newest) {
            return Ok(());
        }
        let Some(file) = &self.file else {
            peers.insert(peer, newest);
            return Ok(());
        };
        let mut changed = peers.clone();
        changed.insert(peer, newest);
        let mut lines: Vec<String> = changed
            .iter()
            .map(|(id, f)| format!("{id} {f}\n"))
            .collect();
        lines.sort();
        match crate::durable::write_file(file, lines.concat().as_bytes()) {
            Ok(()) => {
                *peers = changed;
                Ok(())
            }
            Err(e) => {
                peers.insert(peer, before.unwrap_or(SINGLE).min(newest));
                Err(e)
            }
        }
    }

    /// Whether this node and every one of `members` read `format`.
    pub fn all_read(&self, members: impl Iterator<Item = u64>, format: u8) -> bool {
        let peers = self.peers.lock().unwrap();
        self.own >= format
            && members
                .into_iter()
                .all(|id| peers.get(&id).copied().unwrap_or(SINGLE) >= format)
    }

    /// The newest format this node and every one of `members` read: what this node
    /// writes to a group of them (`/status` shows it for the cluster's members).
    pub fn newest_all_read(&self, members: impl Iterator<Item = u64>) -> u8 {
        let peers = self.peers.lock().unwrap();
        members
            .map(|id| peers.get(&id).copied().unwrap_or(SINGLE))
            .fold(self.own, u8::min)
    }

    /// [`Self::newest_all_read`], and whether that changed since the last call.
    pub fn writable(&self, members: impl Iterator<Item = u64>) -> (u8, bool) {
        let newest = self.newest_all_read(members);
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
        formats.heard(2, BATCH).unwrap();
        assert_eq!(
            formats.writable([2, 3].into_iter()).0,
            SINGLE,
            "3 is not heard"
        );
        formats.heard(3, SINGLE).unwrap();
        assert_eq!(formats.writable([2, 3].into_iter()).0, SINGLE);
        formats.heard(3, BATCH).unwrap();
        assert_eq!(formats.writable([2, 3].into_iter()), (BATCH, true));
        assert_eq!(formats.writable([2].into_iter()), (BATCH, false));
        assert_eq!(
            EntryFormats::new(SINGLE).writable([2].into_iter()).0,
            SINGLE
        );
        assert!(formats.all_read([2, 3].into_iter(), BATCH));
        let file = std::env::temp_dir().join(format!("raftkvd-formats-{}", std::process::id()));
        let remembered = EntryFormats::remembered_in(NEWEST, file.clone());
        assert_eq!(remembered.writable([2].into_iter()).0, SINGLE);
        remembered.heard(2, LEASES).unwrap();
        remembered.heard(5, BATCH).unwrap();
        let restarted = EntryFormats::remembered_in(NEWEST, file.clone());
        assert_eq!(restarted.writable([2].into_iter()).0, LEASES);
        assert_eq!(restarted.writable([2, 5].into_iter()).0, BATCH);
        std::fs::write(&file, "2 x\n").unwrap();
        let damaged = EntryFormats::remembered_in(NEWEST, file.clone());
        assert_eq!(damaged.writable([2].into_iter()).0, SINGLE);
        std::fs::remove_file(&file).unwrap();
        assert!(!formats.all_read([2, 3].into_iter(), REHOST));
        assert!(!EntryFormats::new(BATCH).all_read([].into_iter(), REHOST));
        assert_eq!(parse(None), SINGLE);
        assert_eq!(parse(Some("2")), BATCH);
        assert_eq!(parse(Some("0")), SINGLE);
        assert_eq!(parse(Some("x")), SINGLE);
    }
}
