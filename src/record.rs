//! How the map holds one key: its revision, key and value in a single shared allocation,
//! reached through one pointer.
//!
//! A key-value store's memory is mostly its keys and values, so their layout is the one
//! that matters. A record is a thin reference-counted pointer to one heap block:
//! `count | revision | length | key length (LEB128) | key | value`. The map's tree holds
//! it as a [`Slot`], 16 bytes: the pointer and the key's first eight bytes, which spare
//! a search most trips to the block. (A fat `Arc<[u8]>` plus the revision was 24 bytes in
//! the tree; the tree's nodes are also what a snapshot's copy-on-write duplicates, so
//! they count twice.) Cloning a record only counts a reference. A record never changes
//! once built.

use std::cmp::Ordering;
use std::fmt;

use bytes::Bytes;
use triomphe::ThinArc;

/// One key, its value and its revision (that of the write that last changed it).
#[derive(Clone)]
pub struct Record(ThinArc<u64, u8>);

impl Record {
    pub fn new(key: &[u8], value: &[u8], revision: u64) -> Record {
        let mut key_len = [0; 10];
        let prefix = encode_len(key.len(), &mut key_len);
        let data = [prefix, key, value].concat();
        Record(ThinArc::from_header_and_slice(revision, &data))
    }

    /// Where the key starts and ends in the block's bytes.
    fn key_span(&self) -> (usize, usize) {
        let bytes = &self.0.slice;
        let (mut len, mut at) = (0, 0);
        loop {
            let byte = bytes[at];
            len |= usize::from(byte & 0x7f) << (7 * at);
            at += 1;
            if byte < 0x80 {
                return (at, at + len);
            }
        }
    }

    pub fn key(&self) -> &[u8] {
        let (start, end) = self.key_span();
        &self.0.slice[start..end]
    }

    pub fn value(&self) -> &[u8] {
        &self.0.slice[self.key_span().1..]
    }

    pub fn revision(&self) -> u64 {
        self.0.header.header
    }

    /// The value as `Bytes` that share this record's allocation (no copy).
    pub fn value_bytes(&self) -> Bytes {
        Bytes::from_owner(ValueOf(self.clone()))
    }
}

/// Writes `len` as LEB128 (seven bits a byte, low first, the high bit set on all but the
/// last) into `buf`; returns the bytes used. A key under 128 bytes costs one.
fn encode_len(mut len: usize, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = 0;
    loop {
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            buf[at] = low;
            return &buf[..=at];
        }
        buf[at] = low | 0x80;
        at += 1;
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("key", &Bytes::copy_from_slice(self.key()))
            .field("revision", &self.revision())
            .field("value_len", &self.value().len())
            .finish()
    }
}

/// Owns a record and shows only its value, so `Bytes` can borrow it.
struct ValueOf(Record);

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        self.0.value()
    }
}

/// Records are ordered and compared by key alone (a listing merges the map's pieces in
/// this order; the tree itself orders [`Slot`]s, which agree).
impl PartialEq for Record {
    fn eq(&self, other: &Record) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Record {}

impl PartialOrd for Record {
    fn partial_cmp(&self, other: &Record) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Record {
    fn cmp(&self, other: &Record) -> Ordering {
        self.key().cmp(other.key())
    }
}

/// A record as the map's tree holds it: the first eight bytes of its key beside the
/// pointer, so that a search decides most comparisons without following the pointer to
/// the record. (In a large map each such pointer is a cache miss; following them was
/// 12% of a one-shard cluster's CPU under puts.) Ordered as its record, by key: keys
/// padded with zeros to eight bytes order as the keys themselves do, except where they
/// tie, and then the whole keys decide.
#[derive(Clone)]
pub struct Slot {
    head: u64,
    record: Record,
}

impl Slot {
    pub fn new(record: Record) -> Slot {
        Slot {
            head: head_of(record.key()),
            record,
        }
    }

    /// A slot to find `key`'s with (its record holds only the key).
    pub fn probe(key: &[u8]) -> Slot {
        Slot::new(Record::new(key, &[], 0))
    }

    pub fn record(&self) -> &Record {
        &self.record
    }
}

/// The first eight bytes of `key`, zero-padded, as a number that orders as they do.
fn head_of(key: &[u8]) -> u64 {
    let mut head = [0; 8];
    let n = key.len().min(8);
    head[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(head)
}

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Slot {}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Slot) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Slot {
    fn cmp(&self, other: &Slot) -> Ordering {
        self.head
            .cmp(&other.head)
            .then_with(|| self.record.cmp(&other.record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_order_as_their_keys() {
        let keys: [&[u8]; 12] = [
            b"",
            b"\0",
            b"a",
            b"a\0",
            b"a\0\0\0\0\0\0\0",
            b"a\0\0\0\0\0\0\0\0",
            b"a\0\0\0\0\0\0\x01",
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefghi",
            b"abcdefgi",
            b"\xff",
        ];
        for a in keys {
            for b in keys {
                let (sa, sb) = (Slot::probe(a), Slot::probe(b));
                assert_eq!(sa.cmp(&sb), a.cmp(b), "{a:?} against {b:?}");
            }
        }
    }

    #[test]
    fn holds_key_value_and_revision_in_one_block() {
        let r = Record::new(b"key", b"value", 7);
        assert_eq!(
            (r.key(), r.value(), r.revision()),
            (&b"key"[..], &b"value"[..], 7)
        );
        assert_eq!(r.value_bytes(), "value");
        let empty = Record::new(b"k", b"", 1);
        assert_eq!(empty.value(), b"");
        assert_eq!(std::mem::size_of::<Record>(), 8);
    }

    #[test]
    fn keys_of_any_length_keep_key_and_value_apart() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let key = vec![b'k'; len];
            let r = Record::new(&key, b"value", 1);
            assert_eq!((r.key().len(), r.value()), (len, &b"value"[..]), "{len}");
        }
    }

    #[test]
    fn a_set_of_slots_is_a_map_by_key() {
        let mut set = std::collections::BTreeSet::new();
        set.insert(Slot::new(Record::new(b"b", b"1", 1)));
        set.insert(Slot::new(Record::new(b"a", b"2", 2)));
        set.replace(Slot::new(Record::new(b"b", b"3", 3)));
        let found = set.get(&Slot::probe(b"b")).unwrap();
        assert_eq!(found.record().value(), b"3");
        assert_eq!(
            set.iter().map(|s| s.record().key()).collect::<Vec<_>>(),
            [b"a", b"b"]
        );
    }
}
