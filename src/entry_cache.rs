//! The newest entries of one group's raft log, kept in memory beside raft-engine so that
//! raft-rs reads them (to apply them, to send them to a follower, or only for their term)
//! without a file read, a decompression and a decode each time. raft-rs asks the storage
//! for an entry's term several times per write, and for every committed entry once it is
//! persisted, nearly always near the end of the log.
//!
//! The cache holds a contiguous run of entries that ends at the log's last index, each
//! exactly as written: it learns every write of entries (after raft-engine has it), and
//! forgets on a compaction or a snapshot install. It must never answer for an index it
//! does not hold, nor keep an entry the log no longer has. What it evicts (applied
//! entries, or anything past its byte budget) is read from raft-engine again.

use std::collections::VecDeque;

use raft::eraftpb::Entry;

/// Most bytes of entry data one group keeps cached; the oldest go first.
const MAX_CACHED_BYTES: usize = 1 << 20;

/// Entries kept once applied, so that the entry before the next ones (whose term raft-rs
/// sends with them) is still here.
const KEEP_APPLIED: u64 = 1;

/// A contiguous run of the log's newest entries.
#[derive(Default)]
pub struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl EntryCache {
    /// Index of the last cached entry, which is the log's last index; None when empty.
    pub fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index)
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    /// The position of entry `index`, if cached.
    fn position(&self, index: u64) -> Option<usize> {
        let first = self.first_index()?;
        let at = index.checked_sub(first)? as usize;
        (at < self.entries.len()).then_some(at)
    }

    /// The term of entry `index`, if cached.
    pub fn term(&self, index: u64) -> Option<u64> {
        self.position(index).map(|at| self.entries[at].term)
    }

    /// Entries `[low, high)` if the cache holds all of them, at most `max_size` bytes (but
    /// at least one entry), as raft-rs's storage contract has it.
    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
        let start = self.position(low)?;
        if high <= low || self.position(high - 1).is_none() {
            return None;
        }
        let mut entries: Vec<Entry> = self
            .entries
            .range(start..start + (high - low) as usize)
            .cloned()
            .collect();
        raft::util::limit_size(&mut entries, max_size);
        Some(entries)
    }

    /// Entries just written to the log: they replace every cached entry from their first
    /// index on (raft-engine does the same with a conflicting suffix).
    pub fn append(&mut self, written: &[Entry]) {
        let Some(first) = written.first().map(|e| e.index) else {
            return;
        };
        match (self.first_index(), self.last_index()) {
            (Some(cached_first), Some(cached_last))
                if cached_first <= first && first <= cached_last + 1 =>
            {
                while self.last_index().is_some_and(|last| last >= first) {
                    let dropped = self.entries.pop_back().expect("not empty");
                    self.bytes -= size_of(&dropped);
                }
            }
            _ => self.clear(),
        }
        for entry in written {
            self.bytes += size_of(entry);
            self.entries.push_back(entry.clone());
        }
        while self.bytes > MAX_CACHED_BYTES && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    /// Forgets entries before `first`: they left the log (compaction).
    pub fn forget_before(&mut self, first: u64) {
        while self.first_index().is_some_and(|i| i < first) {
            self.pop_front();
        }
    }

    /// Entries up to `applied` will rarely be read again: evicted, but for the last
    /// [`KEEP_APPLIED`].
    pub fn applied(&mut self, applied: u64) {
        self.forget_before(applied.saturating_sub(KEEP_APPLIED - 1));
    }

    /// Forgets everything (the log was replaced by a snapshot).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn pop_front(&mut self) {
        if let Some(dropped) = self.entries.pop_front() {
            self.bytes -= size_of(&dropped);
        }
    }
}

/// The bytes an entry holds, as the budget counts them.
fn size_of(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Default::default()
        }
    }

    fn run(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        indexes.map(|i| entry(i, term)).collect()
    }

    #[test]
    fn answers_only_for_what_it_holds() {
        let mut cache = EntryCache::default();
        assert_eq!(cache.term(1), None);
        cache.append(&run(5..=9, 2));
        assert_eq!(cache.term(4), None);
        assert_eq!(cache.term(5), Some(2));
        assert_eq!(cache.term(9), Some(2));
        assert_eq!(cache.term(10), None);
        assert_eq!(cache.entries(4, 6, None), None);
        assert_eq!(cache.entries(8, 11, None), None);
        let got = cache.entries(6, 9, None).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [6, 7, 8]);
        let one = cache.entries(6, 9, Some(1)).unwrap();
        assert_eq!(one.len(), 1, "at least one entry, even over the size limit");
    }

    #[test]
    fn a_conflicting_suffix_is_replaced_and_a_gap_starts_over() {
        let mut cache = EntryCache::default();
        cache.append(&run(1..=10, 1));
        cache.append(&run(7..=8, 2));
        assert_eq!(cache.last_index(), Some(8));
        assert_eq!(cache.term(6), Some(1));
        assert_eq!(cache.term(7), Some(2));
        assert_eq!(cache.term(9), None, "the old suffix is gone");
        cache.append(&run(20..=21, 3));
        assert_eq!(cache.term(8), None, "not contiguous with the new entries");
        assert_eq!(cache.term(20), Some(3));
        cache.append(&run(2..=3, 4));
        assert_eq!(
            cache.term(20),
            None,
            "a rewrite before the cache starts over"
        );
        assert_eq!(cache.last_index(), Some(3));
    }

    #[test]
    fn applied_compacted_and_oversized_entries_are_evicted() {
        let mut cache = EntryCache::default();
        cache.append(&run(1..=10, 1));
        cache.applied(6);
        assert_eq!(cache.term(5), None);
        assert_eq!(cache.term(6), Some(1), "the last applied entry stays");
        cache.forget_before(8);
        assert_eq!(cache.term(7), None);
        let big: Vec<Entry> = (11..=12)
            .map(|i| Entry {
                index: i,
                term: 1,
                data: vec![0; MAX_CACHED_BYTES].into(),
                ..Default::default()
            })
            .collect();
        cache.append(&big);
        assert_eq!(cache.term(11), None);
        assert_eq!(cache.term(12), Some(1), "the newest entry stays");
        cache.clear();
        assert_eq!(cache.last_index(), None);
    }
}
