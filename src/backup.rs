//! The backup file: every key of a cluster, as `GET /v1/backup` writes it and
//! `POST /v1/restore` reads it back (`api/backup_v1.rs` serves both). This module only
//! encodes and decodes bytes; it never touches raft, the map or the disk, and
//! [`decode`] never panics or allocates beyond its input on any bytes it is given.
//!
//! ```text
//! "RKVDBACK" | format u32 (1)
//! | groups u32, each: id u64 | kind u8 | map revision u64
//!   | leases u32, each: id u64, granted TTL in seconds u64
//!   | pairs u64, each: key (u32 len + bytes), value (u32 len + bytes), revision u64,
//!     lease id u64 (0: none)
//! | CRC-32 of everything before it (u32)
//! ```
//! (integers little-endian). A group's section is one linearizable read of its map: the
//! keys, values and revisions it held at `revision`, and the leases its keys were attached
//! to. `kind` says where a restore puts the keys: those of the cluster group or of a shard
//! go to whichever group the restoring cluster's shards give each key (so a backup of one
//! shard restores into eight, and back); those of a group an operator created go to the
//! group of the same id. Keys are UTF-8 (both APIs take them from a path); values are
//! any bytes.

use bytes::Bytes;

const MAGIC: &[u8; 8] = b"RKVDBACK";
/// The format this release writes, and the newest it reads.
pub const FORMAT: u32 = 1;

/// Where a restore puts a group's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The cluster group or a shard: each key goes to its owner by the shards.
    Sharded,
    /// A group an operator created: its keys go to the group of the same id.
    Named,
}

/// One key as the backup holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    pub key: Bytes,
    pub value: Bytes,
    /// The revision of the group's write that last changed it.
    pub revision: u64,
    /// The lease it was attached to (`command::NO_LEASE`: none).
    pub lease: u64,
}

/// One group's section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupBackup {
    pub id: u64,
    pub kind: Kind,
    /// The group's map revision when it was read.
    pub revision: u64,
    /// Leases (id, granted TTL in seconds) that keys of `pairs` are attached to.
    pub leases: Vec<(u64, u64)>,
    /// In key order.
    pub pairs: Vec<Pair>,
}

/// A whole backup: one section per group that held keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backup {
    pub groups: Vec<GroupBackup>,
}

impl Backup {
    pub fn key_count(&self) -> usize {
        self.groups.iter().map(|g| g.pairs.len()).sum()
    }
}

/// The file's bytes.
pub fn encode(backup: &Backup) -> Vec<u8> {
    let size: usize = backup
        .groups
        .iter()
        .flat_map(|g| &g.pairs)
        .map(|p| p.key.len() + p.value.len() + 24)
        .sum();
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(backup.groups.len() as u32).to_le_bytes());
    for group in &backup.groups {
        out.extend_from_slice(&group.id.to_le_bytes());
        out.push(match group.kind {
            Kind::Sharded => 0,
            Kind::Named => 1,
        });
        out.extend_from_slice(&group.revision.to_le_bytes());
        out.extend_from_slice(&(group.leases.len() as u32).to_le_bytes());
        for (id, ttl) in &group.leases {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&ttl.to_le_bytes());
        }
        out.extend_from_slice(&(group.pairs.len() as u64).to_le_bytes());
        for pair in &group.pairs {
            put_bytes(&mut out, &pair.key);
            put_bytes(&mut out, &pair.value);
            out.extend_from_slice(&pair.revision.to_le_bytes());
            out.extend_from_slice(&pair.lease.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads a backup file, or says in words what is wrong with it. Checks, in order: that it
/// is one, that this release reads its format, its checksum, and then every count and
/// length against the bytes there are; a key must be UTF-8, a pair's lease must be one of
/// its group's, and a group may appear once.
pub fn decode(file: &Bytes) -> Result<Backup, String> {
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err("it does not start as a raftkvd backup does (RKVDBACK)".into());
    }
    let mut r = Reader {
        file,
        at: MAGIC.len(),
        end: file.len(),
    };
    let format = r.u32()?;
    if format > FORMAT {
        return Err(format!(
            "it is in backup format {format}, written by a newer release; this one reads \
             up to format {FORMAT}"
        ));
    }
    if format == 0 {
        return Err("it names backup format 0, which no release writes".into());
    }
    if file.len() < r.at + 4 {
        return Err("it is cut short (no checksum)".into());
    }
    let body_end = file.len() - 4;
    let stored = u32::from_le_bytes(file[body_end..].try_into().expect("four bytes"));
    if crc32fast::hash(&file[..body_end]) != stored {
        return Err("its checksum does not match: it is damaged or cut short".into());
    }
    r.end = body_end;
    let mut backup = Backup::default();
    let groups = r.u32()?;
    for _ in 0..groups {
        let group = r.group()?;
        if backup.groups.iter().any(|g| g.id == group.id) {
            return Err(format!("group {} appears twice", group.id));
        }
        backup.groups.push(group);
    }
    if r.at != r.end {
        return Err(format!(
            "{} bytes follow the last group",
            r.end.saturating_sub(r.at)
        ));
    }
    Ok(backup)
}

/// The fuzzer's oracle (`fuzz/fuzz_targets/backup_decode.rs`, and the corpus replay in
/// the tests): decoding any bytes never panics, and a file that decodes encodes back to
/// exactly its bytes (so nothing it holds is dropped or changed on the way). The input
/// is also tried with its last four bytes replaced by the right checksum, so that the
/// fuzzer reaches the structure behind the checksum.
#[cfg(any(test, fuzzing))]
pub fn check_decoding(data: &[u8]) {
    let mut signed = data.to_vec();
    if let Some(body) = data.len().checked_sub(4) {
        let crc = crc32fast::hash(&data[..body]);
        signed[body..].copy_from_slice(&crc.to_le_bytes());
    }
    for file in [data.to_vec(), signed] {
        if let Ok(backup) = decode(&Bytes::from(file.clone())) {
            assert_eq!(
                encode(&backup),
                file,
                "a backup that decodes encodes to itself"
            );
        }
    }
}

/// A cursor over the checked part of a file.
struct Reader<'a> {
    file: &'a Bytes,
    at: usize,
    end: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.end - self.at < n {
            return Err(format!("it is cut short at byte {}", self.at));
        }
        self.at += n;
        Ok(&self.file[self.at - n..self.at])
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// Bytes of a length-prefixed field, sharing the file's buffer.
    fn bytes(&mut self) -> Result<Bytes, String> {
        let len = self.u32()? as usize;
        self.take(len)?;
        Ok(self.file.slice(self.at - len..self.at))
    }

    /// How many items of at least `min_size` bytes each the rest can hold: caps a
    /// count read from the file before anything is reserved for it.
    fn at_most(&self, count: u64, min_size: usize) -> Result<usize, String> {
        let room = ((self.end - self.at) / min_size) as u64;
        match count <= room {
            true => Ok(count as usize),
            false => Err(format!(
                "a count of {count} at byte {} is more than the file holds",
                self.at
            )),
        }
    }

    fn group(&mut self) -> Result<GroupBackup, String> {
        let id = self.u64()?;
        let kind = match self.u8()? {
            0 => Kind::Sharded,
            1 => Kind::Named,
            other => return Err(format!("group {id} has an unknown kind {other}")),
        };
        let revision = self.u64()?;
        let count = self.u32()?;
        let mut leases = Vec::with_capacity(self.at_most(count.into(), 16)?);
        for _ in 0..count {
            leases.push((self.u64()?, self.u64()?));
        }
        let count = self.u64()?;
        let mut pairs = Vec::with_capacity(self.at_most(count, 24)?);
        for _ in 0..count {
            let key = self.bytes()?;
            if key.is_empty() || std::str::from_utf8(&key).is_err() {
                return Err(format!(
                    "group {id} holds a key that is empty or not UTF-8 (before byte {})",
                    self.at
                ));
            }
            let value = self.bytes()?;
            let revision = self.u64()?;
            let lease = self.u64()?;
            if lease != 0 && !leases.iter().any(|(l, _)| *l == lease) {
                return Err(format!(
                    "key {:?} of group {id} names lease {lease}, which the group's \
                     section does not list",
                    String::from_utf8_lossy(&key)
                ));
            }
            pairs.push(Pair {
                key,
                value,
                revision,
                lease,
            });
        }
        Ok(GroupBackup {
            id,
            kind,
            revision,
            leases,
            pairs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backup {
        let pair = |k: &str, v: &[u8], revision, lease| Pair {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v),
            revision,
            lease,
        };
        Backup {
            groups: vec![
                GroupBackup {
                    id: 2,
                    kind: Kind::Sharded,
                    revision: 40,
                    leases: vec![(2 << 32 | 7, 30)],
                    pairs: vec![
                        pair("a", b"one", 3, 0),
                        pair("b/c", &[0, 255, 1], 9, 2 << 32 | 7),
                    ],
                },
                GroupBackup {
                    id: 9,
                    kind: Kind::Named,
                    revision: 1,
                    leases: vec![],
                    pairs: vec![pair("x", b"", 1, 0)],
                },
            ],
        }
    }

    #[test]
    fn a_backup_reads_back_as_it_was_written() {
        let backup = sample();
        let file = Bytes::from(encode(&backup));
        assert_eq!(decode(&file).unwrap(), backup);
        assert_eq!(backup.key_count(), 3);
        let empty = Bytes::from(encode(&Backup::default()));
        assert_eq!(decode(&empty).unwrap(), Backup::default());
    }

    #[test]
    fn damage_a_newer_format_and_other_files_are_named_not_read() {
        let file = encode(&sample());
        let why = |bytes: Vec<u8>| decode(&Bytes::from(bytes)).unwrap_err();
        assert!(why(b"{\"items\": []}".to_vec()).contains("does not start"));
        let mut flipped = file.clone();
        flipped[30] ^= 1;
        assert!(why(flipped).contains("checksum"));
        assert!(why(file[..file.len() - 9].to_vec()).contains("checksum"));
        let mut newer = file.clone();
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(why(newer).contains("newer release"));
    }

    /// Re-signs `body` (a file without its checksum) so that decoding reaches its
    /// structure.
    fn signed(mut body: Vec<u8>) -> Bytes {
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        Bytes::from(body)
    }

    #[test]
    fn a_well_signed_file_that_lies_about_its_contents_is_refused() {
        let file = encode(&sample());
        let body = file[..file.len() - 4].to_vec();
        // A huge pair count is refused before anything is reserved for it.
        let mut huge = body.clone();
        let pairs_at = 8 + 4 + 4 + 8 + 1 + 8 + 4 + 16;
        huge[pairs_at..pairs_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&signed(huge))
            .unwrap_err()
            .contains("more than the file holds"));
        // A pair naming a lease its group does not list.
        let mut stray = sample();
        stray.groups[1].pairs[0].lease = 5 << 32 | 1;
        let stray = encode(&stray);
        assert!(decode(&Bytes::from(stray))
            .unwrap_err()
            .contains("does not list"));
        // The same group twice.
        let mut twice = sample();
        twice.groups[1].id = 2;
        assert!(decode(&Bytes::from(encode(&twice)))
            .unwrap_err()
            .contains("twice"));
        // Bytes after the last group.
        let mut extra = body;
        extra.push(0);
        assert!(decode(&signed(extra)).unwrap_err().contains("follow"));
    }

    /// Every input the fuzzer kept (`fuzz/corpus/backup_decode`) still passes its oracle.
    #[test]
    fn replays_the_fuzz_corpus() {
        crate::fuzz_corpus::replay("backup_decode", check_decoding);
    }

    #[test]
    fn random_bytes_and_every_cut_never_panic() {
        let file = encode(&sample());
        for cut in 0..file.len() {
            check_decoding(&file[..cut]);
            check_decoding(&signed(file[..cut].to_vec()));
        }
        let mut next = crate::random::seeded(7);
        for _ in 0..2_000 {
            let mut bytes = file[..file.len() - 4].to_vec();
            for _ in 0..3 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            check_decoding(&signed(bytes));
        }
    }
}
