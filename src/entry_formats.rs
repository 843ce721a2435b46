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
//! back. A peer too old to say counts as reading format 1 only.
//!
//! A member never heard from counts as reading what the cluster has written, which only
//! rises (etcd's cluster version never goes down either): the newest format that every
//! member had said it reads at once, remembered in the same file. So adding a member
//! does not make the others fall back to older formats (single entries, no leases, no
//! transactions) until it first talks: a new member must run a release that reads what
//! the cluster writes, and one that does not stops at the first entry it cannot read,
//! with a message saying to upgrade it. Until a node has heard every member once (a new
//! node, or one whose file was lost), that is format 1. What one given peer does
//! ([`EntryFormats::said`]) is only ever what it said.
//!
//! A node never trusts a peer's word for its own reading: an entry newer than it reads
//! stops it (`node/group.rs`), so a member downgraded to an older release while it was
//! down stops at the first entry it cannot read, with a message saying so, until it is
//! upgraded again (what it says once it is up is heard within a second).

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
    /// The newest format every member had said it reads at once: what a member never
    /// heard from counts as reading.
    reached: Mutex<u8>,
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
            reached: Mutex::new(SINGLE),
            last_writable: Mutex::new(SINGLE),
            file: None,
        }
    }

    /// The same, remembering what peers said in `file` (read now, if it exists; a line
    /// `<node id> <format>` per peer, and `reached <format>`). A damaged file is
    /// forgotten, not trusted: the peers are heard again within a second of being up.
    /// (Releases before `reached` find the file damaged, and so hear their peers again.)
    pub fn remembered_in(own: u8, file: PathBuf) -> EntryFormats {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let mut reached = SINGLE;
        let peers = text
            .lines()
            .map(|line| {
                let (id, format) = line.split_once(' ')?;
                let format: u8 = format.parse().ok()?;
                if id == REACHED {
                    reached = format;
                    return Some(None);
                }
                Some(Some((id.parse().ok()?, format)))
            })
            .collect::<Option<Vec<Option<(u64, u8)>>>>();
        let Some(peers) = peers else {
            return EntryFormats {
                file: Some(file),
                ..EntryFormats::new(own)
            };
        };
        EntryFormats {
            peers: Mutex::new(peers.into_iter().flatten().collect()),
            reached: Mutex::new(reached),
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
        match write_down(file, &changed, *self.reached.lock().unwrap()) {
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

    /// Whether `peer` itself has said it reads `format` (for what that one node will do
    /// with a request, not for what the cluster may write).
    pub fn said(&self, peer: u64, format: u8) -> bool {
        self.peers
            .lock()
            .unwrap()
            .get(&peer)
            .is_some_and(|&f| f >= format)
    }

    /// Whether this node and every one of `members` read `format`.
    pub fn all_read(&self, members: impl Iterator<Item = u64>, format: u8) -> bool {
        self.newest_all_read(members) >= format
    }

    /// The newest format this node and every one of `members` read (a member never heard
    /// from: what the cluster has reached): what this node writes to a group of them
    /// (`/status` shows it for the cluster's members). If every one of them has said
    /// what it reads, that is what the cluster has reached, if it is newer.
    pub fn newest_all_read(&self, members: impl Iterator<Item = u64>) -> u8 {
        let peers = self.peers.lock().unwrap();
        let mut reached = self.reached.lock().unwrap();
        let (mut newest, mut all_heard) = (self.own, true);
        for id in members {
            let said = peers.get(&id).copied();
            all_heard &= said.is_some();
            newest = newest.min(said.unwrap_or(*reached));
        }
        if all_heard && newest > *reached {
            // Written down before it counts; if it cannot be, it counts from the next
            // time it can.
            let written = match &self.file {
                Some(file) => write_down(file, &peers, newest).is_ok(),
                None => true,
            };
            if written {
                *reached = newest;
            }
        }
        newest.min(self.own)
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

/// The first word of the file's line that remembers what the cluster has reached.
const REACHED: &str = "reached";

/// Writes what peers said, and what the cluster reached, to `file`.
fn write_down(
    file: &std::path::Path,
    peers: &HashMap<u64, u8>,
    reached: u8,
) -> std::io::Result<()> {
    let mut lines: Vec<String> = peers.iter().map(|(id, f)| format!("{id} {f}\n")).collect();
    lines.sort();
    lines.push(format!("{REACHED} {reached}\n"));
    crate::durable::write_file(file, lines.concat().as_bytes())
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
            formats.writable([2, 3, 4].into_iter()).0,
            BATCH,
            "4, never heard from, counts as reading what the cluster reached"
        );
        formats.heard(4, SINGLE).unwrap();
        assert_eq!(formats.writable([2, 3, 4].into_iter()).0, SINGLE);
        assert_eq!(formats.writable([2, 3].into_iter()).0, BATCH);
        assert_eq!(
            EntryFormats::new(SINGLE).writable([2].into_iter()).0,
            SINGLE
        );
        assert!(formats.all_read([2, 3].into_iter(), BATCH));
        assert!(
            formats.said(2, BATCH) && !formats.said(9, BATCH),
            "9 said nothing"
        );
        let file = std::env::temp_dir().join(format!("raftkvd-formats-{}", std::process::id()));
        let remembered = EntryFormats::remembered_in(NEWEST, file.clone());
        assert_eq!(remembered.writable([2].into_iter()).0, SINGLE);
        remembered.heard(2, LEASES).unwrap();
        remembered.heard(5, BATCH).unwrap();
        let restarted = EntryFormats::remembered_in(NEWEST, file.clone());
        assert_eq!(restarted.writable([2].into_iter()).0, LEASES);
        assert_eq!(restarted.writable([2, 5].into_iter()).0, BATCH);
        // What the cluster reached is remembered too: a member never heard from (7, added
        // since) counts as reading it, one that said less counts as what it said.
        let again = EntryFormats::remembered_in(NEWEST, file.clone());
        assert_eq!(again.writable([2, 7].into_iter()).0, LEASES);
        again.heard(7, BATCH).unwrap();
        assert_eq!(again.writable([2, 7].into_iter()).0, BATCH);
        assert_eq!(again.writable([2].into_iter()).0, LEASES);
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
