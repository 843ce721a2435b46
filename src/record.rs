//! How the map holds one key: its key and value in a single shared allocation, with the
//! revision that wrote them.
//!
//! A key-value store's memory is mostly its keys and values, so their layout is the one
//! that matters: one allocation of `key length (u32) | key | value` behind an `Arc`, plus
//! the revision, is 24 bytes in the map and one heap block per key. (A pair of `Bytes`
//! and a revision was 72 bytes and two blocks.) Cloning a record, as a snapshot's
//! copy-on-write does, only counts a reference. A record never changes once built.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;

/// One key, its value and its revision (that of the write that last changed it).
#[derive(Clone, Debug)]
pub struct Record {
    /// `key length as u32 LE | key | value`.
    data: Arc<[u8]>,
    revision: u64,
}

/// Length of the key-length prefix.
const KEY_LEN_BYTES: usize = 4;

impl Record {
    pub fn new(key: &[u8], value: &[u8], revision: u64) -> Record {
        let mut data = Vec::with_capacity(KEY_LEN_BYTES + key.len() + value.len());
        data.extend_from_slice(&(key.len() as u32).to_le_bytes());
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        Record {
            data: data.into(),
            revision,
        }
    }

    fn key_end(&self) -> usize {
        let len = u32::from_le_bytes(self.data[..KEY_LEN_BYTES].try_into().unwrap());
        KEY_LEN_BYTES + len as usize
    }

    pub fn key(&self) -> &[u8] {
        &self.data[KEY_LEN_BYTES..self.key_end()]
    }

    pub fn value(&self) -> &[u8] {
        &self.data[self.key_end()..]
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The value as `Bytes` that share this record's allocation (no copy).
    pub fn value_bytes(&self) -> Bytes {
        Bytes::from_owner(ValueOf(self.clone()))
    }
}

/// Owns a record and shows only its value, so `Bytes` can borrow it.
struct ValueOf(Record);

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        self.0.value()
    }
}

/// Records are ordered, compared and looked up by key alone, so a `BTreeSet<Record>` is
/// a map from keys to records that can be searched with a `&[u8]`.
impl Borrow<[u8]> for Record {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(std::mem::size_of::<Record>(), 24);
    }

    #[test]
    fn a_set_of_records_is_a_map_by_key() {
        let mut set = std::collections::BTreeSet::new();
        set.insert(Record::new(b"b", b"1", 1));
        set.insert(Record::new(b"a", b"2", 2));
        set.replace(Record::new(b"b", b"3", 3));
        let b: &[u8] = b"b";
        assert_eq!(set.get(b).unwrap().value(), b"3");
        assert_eq!(
            set.iter().map(Record::key).collect::<Vec<_>>(),
            [b"a", b"b"]
        );
    }
}
