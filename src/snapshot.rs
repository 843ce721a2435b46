//! Snapshot files: the whole replicated state at one applied index, on disk.
//!
//! A snapshot holds the key-value map, the membership (peer URLs, removed ids) and the
//! raft metadata (index, term, ConfState) of the last entry it includes. One file per
//! snapshot, `snap-<index as 16 hex digits>.snap`, in the data dir's `snap/` folder:
//!
//! ```text
//! "RKVSNAP5" | index u64 | term u64 | map revision u64 | conf state (u32 len + protobuf)
//! | members u32, each: id u64, url (u32 len + bytes) | removed u32, each: id u64
//! | groups u32, each: id u64, then three lists (initial, members, removed nodes),
//!   each u32 count + ids u64 | shards u32, each: group id u64
//! | draining u32, each: node id u64
//! | (RKVSNAP5 only) leases u32, each: id u64, TTL seconds u64, last renewal's revision
//!   u64, keys u32, each key (u32 len + bytes)
//! | pairs u64, each: key (u32 len + bytes), value (u32 len + bytes), revision u64
//! | CRC-32 of everything before it (u32)
//! ```
//! (integers little-endian). Each raft group has its own folder of snapshots (the
//! cluster group's is `snap/`, group g's `groups/<g>/snap/`); only the cluster group's
//! carry members and groups. A group with no lease writes "RKVSNAP4", the same without
//! the leases, so that a cluster that never used them stays readable by the release
//! before them (a lease exists only once every member reads them,
//! `entry_formats::LEASES`). Older formats are still read: "RKVSNAP3" lacks the table of
//! groups (there was one group); "RKVSNAP2" also lacks the map revision, which was then always the index; "RKVSNAP1" also lacks the keys' revisions,
//! and gives every key the snapshot's index. A file is written to a temporary name,
//! fsynced, renamed and the directory fsynced, so a crash leaves either the whole snapshot
//! or none (its `.tmp` file is removed at start-up); the checksum catches corruption after
//! that. The same file is what a leader streams to a follower.
//! This module never returns data that failed its checksum.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use std::time::Instant;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::ConfState;

use crate::durable;
use crate::kv::FrozenKv;
use crate::leases::Leases;
use crate::membership::{Membership, Placement};
use crate::record::Record;

const MAGIC: &[u8; 8] = b"RKVSNAP5";
/// The fourth format, without leases (still written when a group has none).
const MAGIC_V4: &[u8; 8] = b"RKVSNAP4";
/// The third format, without the table of groups.
const MAGIC_V3: &[u8; 8] = b"RKVSNAP3";
/// The second format, without the map's revision.
const MAGIC_V2: &[u8; 8] = b"RKVSNAP2";
/// The first format, without revisions.
const MAGIC_V1: &[u8; 8] = b"RKVSNAP1";
/// What every format's magic starts with.
const MAGIC_FAMILY: &[u8; 7] = b"RKVSNAP";
/// Snapshot files kept; older ones are deleted once a newer one is durable.
const KEEP: usize = 3;
/// Bytes written between two syncs of a snapshot file being written.
const SYNC_EVERY: u64 = 1 << 20;
/// Buffer of the snapshot writer and readers: big enough that a syscall moves many
/// records, small beside the map (a writer runs while the node serves at full speed).
const BUFFER_BYTES: usize = 64 << 10;

/// Raft's view of a snapshot: the last entry it includes and the membership then.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
}

/// A snapshot the background writer made durable.
pub struct WrittenSnapshot {
    pub meta: SnapshotMeta,
    /// The map's revision in it.
    pub revision: u64,
    pub bytes: u64,
    pub write_time: std::time::Duration,
}

/// Everything needed to rebuild the state machine at `meta.index`.
#[derive(Default)]
pub struct SnapshotData {
    pub meta: SnapshotMeta,
    pub membership: Membership,
    pub kv: FrozenKv,
}

/// The snapshot directory of raft group `group_id` in a data dir (the cluster group,
/// 1, keeps the folder of the single-group releases).
pub fn dir_of(data_dir: &Path, group_id: u64) -> PathBuf {
    match group_id {
        1 => data_dir.join("snap"),
        _ => data_dir
            .join("groups")
            .join(group_id.to_string())
            .join("snap"),
    }
}

pub fn path_of(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("snap-{index:016x}.snap"))
}

/// The size of a snapshot file in bytes (0 if it cannot be read).
pub fn size_of(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// Indexes of the snapshot files in `dir`, newest first.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name
            .strip_prefix("snap-")
            .and_then(|n| n.strip_suffix(".snap"))
        {
            if let Ok(index) = u64::from_str_radix(hex, 16) {
                indexes.push(index);
            }
        }
    }
    indexes.sort_unstable_by(|a, b| b.cmp(a));
    Ok(indexes)
}

/// A file that is synced every `SYNC_EVERY` bytes written to it.
struct SyncedAsWritten {
    file: File,
    unsynced: u64,
}

impl Write for SyncedAsWritten {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A writer that checksums what passes through it.
struct Checksummed<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put_bytes(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

/// Writes `data` durably as the snapshot of its index; returns the file's path and size.
pub fn write(dir: &Path, data: &SnapshotData) -> io::Result<(PathBuf, u64)> {
    fs::create_dir_all(dir)?;
    let path = path_of(dir, data.meta.index);
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp)?;
    let mut w = Checksummed {
        inner: BufWriter::with_capacity(BUFFER_BYTES, SyncedAsWritten { file, unsynced: 0 }),
        crc: crc32fast::Hasher::new(),
    };
    let leases = data.kv.leases();
    w.write_all(if leases.is_empty() { MAGIC_V4 } else { MAGIC })?;
    w.write_all(&data.meta.index.to_le_bytes())?;
    w.write_all(&data.meta.term.to_le_bytes())?;
    w.write_all(&data.kv.revision().to_le_bytes())?;
    put_bytes(
        &mut w,
        &data
            .meta
            .conf_state
            .write_to_bytes()
            .map_err(io::Error::other)?,
    )?;
    w.write_all(&(data.membership.peer_urls.len() as u32).to_le_bytes())?;
    for (id, url) in &data.membership.peer_urls {
        w.write_all(&id.to_le_bytes())?;
        put_bytes(&mut w, url.as_bytes())?;
    }
    w.write_all(&(data.membership.removed.len() as u32).to_le_bytes())?;
    for id in &data.membership.removed {
        w.write_all(&id.to_le_bytes())?;
    }
    w.write_all(&(data.membership.groups.len() as u32).to_le_bytes())?;
    for (id, placement) in &data.membership.groups {
        w.write_all(&id.to_le_bytes())?;
        for nodes in [&placement.initial, &placement.members, &placement.removed] {
            w.write_all(&(nodes.len() as u32).to_le_bytes())?;
            for node in nodes {
                w.write_all(&node.to_le_bytes())?;
            }
        }
    }
    w.write_all(&(data.membership.shards.len() as u32).to_le_bytes())?;
    for group in &data.membership.shards {
        w.write_all(&group.to_le_bytes())?;
    }
    w.write_all(&(data.membership.draining.len() as u32).to_le_bytes())?;
    for node in &data.membership.draining {
        w.write_all(&node.to_le_bytes())?;
    }
    if !leases.is_empty() {
        w.write_all(&(leases.len() as u32).to_le_bytes())?;
        for (id, lease) in leases.iter() {
            w.write_all(&id.to_le_bytes())?;
            w.write_all(&lease.ttl_seconds.to_le_bytes())?;
            w.write_all(&lease.renewed_at.to_le_bytes())?;
            w.write_all(&(lease.keys.len() as u32).to_le_bytes())?;
            for key in &lease.keys {
                put_bytes(&mut w, key)?;
            }
        }
    }
    w.write_all(&(data.kv.len() as u64).to_le_bytes())?;
    for record in data.kv.iter() {
        put_bytes(&mut w, record.key())?;
        put_bytes(&mut w, record.value())?;
        w.write_all(&record.revision().to_le_bytes())?;
    }
    let crc = w.crc.finalize();
    let mut file = w.inner.into_inner().map_err(|e| e.into_error())?.file;
    file.write_all(&crc.to_le_bytes())?;
    file.sync_all()?;
    let size = file.metadata()?.len();
    drop(file);
    fs::rename(&tmp, &path)?;
    durable::sync_dir(dir)?;
    Ok((path, size))
}

/// Deletes the snapshot files older than the newest `KEEP` up to `recorded`, the one the
/// log store records. A file past it (whatever put it there) is left alone: pruning
/// never deletes the snapshot a restart needs, nor one it may fall back on.
pub fn prune(dir: &Path, recorded: u64) -> io::Result<()> {
    let kept = list(dir)?.into_iter().filter(|&index| index <= recorded);
    for index in kept.skip(KEEP) {
        fs::remove_file(path_of(dir, index))?;
    }
    Ok(())
}

/// A reader that checksums what passes through it.
struct Verified<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Verified<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.inner
            .read_exact(buf)
            .map_err(|e| format!("truncated snapshot: {e}"))?;
        self.crc.update(buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self, limit: u64) -> Result<Vec<u8>, String> {
        let len = self.u32()? as u64;
        if len > limit {
            return Err(format!(
                "snapshot field of {len} bytes is larger than the file"
            ));
        }
        let mut buf = vec![0; len as usize];
        self.exact(&mut buf)?;
        Ok(buf)
    }
}

/// Checks a snapshot file's magic and checksum without loading it.
fn verify_checksum(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size < MAGIC.len() as u64 + 4 {
        return Err("snapshot file too short".into());
    }
    let mut crc = crc32fast::Hasher::new();
    let mut body = (&mut file).take(size - 4);
    let mut buf = vec![0; BUFFER_BYTES];
    let mut first = true;
    loop {
        let n = body.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if first && !buf[..n].starts_with(MAGIC_FAMILY) {
            return Err("not a raftkvd snapshot file".into());
        }
        first = false;
        crc.update(&buf[..n]);
    }
    let mut stored = [0; 4];
    file.read_exact(&mut stored).map_err(|e| e.to_string())?;
    if u32::from_le_bytes(stored) != crc.finalize() {
        return Err("checksum mismatch: the snapshot file is corrupt".into());
    }
    Ok(())
}

/// What a file's header says: raft's metadata, the map's revision, and which parts its
/// format has.
struct Header {
    meta: SnapshotMeta,
    map_revision: u64,
    has_leases: bool,
    has_groups: bool,
    has_revisions: bool,
}

fn read_header<R: Read>(r: &mut Verified<R>, size: u64) -> Result<Header, String> {
    let mut magic = [0; 8];
    r.exact(&mut magic)?;
    let (has_leases, has_groups, has_map_revision, has_revisions) = match &magic {
        MAGIC => (true, true, true, true),
        MAGIC_V4 => (false, true, true, true),
        MAGIC_V3 => (false, false, true, true),
        MAGIC_V2 => (false, false, false, true),
        MAGIC_V1 => (false, false, false, false),
        _ => return Err("not a raftkvd snapshot file".into()),
    };
    let index = r.u64()?;
    let term = r.u64()?;
    let map_revision = if has_map_revision { r.u64()? } else { index };
    let conf_state =
        ConfState::parse_from_bytes(&r.bytes(size)?).map_err(|e| format!("bad conf state: {e}"))?;
    Ok(Header {
        meta: SnapshotMeta {
            index,
            term,
            conf_state,
        },
        map_revision,
        has_leases,
        has_groups,
        has_revisions,
    })
}

/// Checks a snapshot file's magic and checksum without loading it, and returns the raft
/// metadata its header records.
pub fn verify(path: &Path) -> Result<SnapshotMeta, String> {
    verify_checksum(path)?;
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut r = Verified {
        inner: BufReader::with_capacity(BUFFER_BYTES, file),
        crc: crc32fast::Hasher::new(),
    };
    Ok(read_header(&mut r, size)?.meta)
}

/// Reads and verifies the snapshot file at `path`.
pub fn read(path: &Path) -> Result<SnapshotData, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut r = Verified {
        inner: BufReader::with_capacity(BUFFER_BYTES, file),
        crc: crc32fast::Hasher::new(),
    };
    let Header {
        meta,
        map_revision,
        has_leases,
        has_groups,
        has_revisions,
    } = read_header(&mut r, size)?;
    let mut data = SnapshotData {
        meta,
        ..Default::default()
    };
    for _ in 0..r.u32()? {
        let id = r.u64()?;
        let url = String::from_utf8(r.bytes(size)?).map_err(|_| "peer URL is not UTF-8")?;
        data.membership.peer_urls.insert(id, url);
    }
    let mut removed = BTreeSet::new();
    for _ in 0..r.u32()? {
        removed.insert(r.u64()?);
    }
    data.membership.removed = removed;
    if has_groups {
        for _ in 0..r.u32()? {
            let id = r.u64()?;
            let mut lists = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
            for list in &mut lists {
                *list = (0..r.u32()?).map(|_| r.u64()).collect::<Result<_, _>>()?;
            }
            let [initial, members, removed] = lists;
            let placement = Placement {
                initial,
                members,
                removed,
            };
            data.membership.groups.insert(id, placement);
        }
        data.membership.shards = (0..r.u32()?).map(|_| r.u64()).collect::<Result<_, _>>()?;
        data.membership.draining = (0..r.u32()?).map(|_| r.u64()).collect::<Result<_, _>>()?;
    }
    let mut leases = Vec::new();
    if has_leases {
        for _ in 0..r.u32()? {
            let (id, ttl_seconds, renewed_at) = (r.u64()?, r.u64()?, r.u64()?);
            let keys = (0..r.u32()?)
                .map(|_| r.bytes(size).map(Bytes::from))
                .collect::<Result<_, _>>()?;
            leases.push((id, ttl_seconds, renewed_at, keys));
        }
    }
    let count = r.u64()?;
    let mut records = Vec::with_capacity(count.min(size / 8) as usize);
    for _ in 0..count {
        let key = r.bytes(size)?;
        let value = r.bytes(size)?;
        let revision = if has_revisions {
            r.u64()?
        } else {
            data.meta.index
        };
        records.push(Record::new(&key, &value, revision));
    }
    data.kv = FrozenKv::from_records(records, map_revision)
        .with_leases(Leases::from_saved(leases, Instant::now()));
    let computed = r.crc.clone().finalize();
    let mut stored = [0; 4];
    r.inner
        .read_exact(&mut stored)
        .map_err(|e| format!("truncated snapshot: {e}"))?;
    if u32::from_le_bytes(stored) != computed {
        return Err("checksum mismatch: the snapshot file is corrupt".into());
    }
    if r.inner.read(&mut [0; 1]).map_err(|e| e.to_string())? != 0 {
        return Err("trailing bytes after the checksum".into());
    }
    Ok(data)
}

/// Deletes the `.tmp` files a crash left behind: snapshots being written or received.
/// Only at start-up, when nothing is writing one.
fn remove_partial_files(dir: &Path, logger: &slog::Logger) {
    let Ok(entries) = fs::read_dir(dir) else {
        return; // no snapshot directory yet
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "tmp") {
            match fs::remove_file(&path) {
                Ok(()) => slog::info!(logger, "removed a snapshot file left unfinished by a crash";
                    "file" => %path.display()),
                Err(e) => slog::warn!(logger, "could not remove an unfinished snapshot file";
                    "file" => %path.display(), "error" => %e),
            }
        }
    }
}

/// At start-up: the snapshot to rebuild the state machine from. `wanted` is the newest
/// snapshot the log store recorded; raft's log holds every entry after `truncated`.
///
/// A corrupt file is renamed `*.corrupt` and logged. An older snapshot is used only if
/// the log still holds every entry after it; otherwise starting would silently lose
/// data, so this refuses.
pub fn recover(
    dir: &Path,
    wanted: &SnapshotMeta,
    truncated: u64,
    logger: &slog::Logger,
) -> Result<Option<SnapshotData>, String> {
    remove_partial_files(dir, logger);
    if wanted.index == 0 {
        return Ok(None);
    }
    let candidates = list(dir).unwrap_or_default();
    for index in candidates.into_iter().filter(|&i| i <= wanted.index) {
        if index < truncated {
            break;
        }
        let path = path_of(dir, index);
        match read(&path) {
            Ok(data) => {
                if index != wanted.index {
                    slog::warn!(logger, "using an older snapshot; the raft log covers the rest";
                        "index" => index, "newest" => wanted.index);
                }
                return Ok(Some(data));
            }
            Err(e) => {
                slog::error!(logger, "snapshot file is unusable; set aside as .corrupt";
                    "file" => %path.display(), "error" => &e);
                let _ = fs::rename(&path, path.with_extension("snap.corrupt"));
            }
        }
    }
    Err(format!(
        "no usable snapshot: the newest (index {}) is missing or corrupt and the raft log \
         does not reach back to an older one (it starts after index {truncated}). Refusing to \
         start rather than lose data: restore {} from a backup, or remove this node, wipe its \
         data dir and add it back under a new id",
        wanted.index,
        dir.display()
    ))
}

/// The fuzzers' oracle (`fuzz/fuzz_targets/snapshot_read.rs`, and the corpus replay in
/// the tests): reading an arbitrary file never panics, and a file that reads whole also
/// verifies, with the same metadata.
#[cfg(any(test, fuzzing))]
pub fn check_reading(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static FILES: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "raftkvd-fuzz-{}-{}.snap",
        std::process::id(),
        FILES.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&path, data).expect("the temp dir is writable");
    let read = read(&path);
    let verified = verify(&path);
    let _ = fs::remove_file(&path);
    if let Ok(data) = read {
        assert_eq!(verified, Ok(data.meta), "a readable file verifies");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzer kept (`fuzz/corpus/snapshot_read`) still passes its oracle.
    #[test]
    fn replays_the_fuzz_corpus() {
        crate::fuzz_corpus::replay("snapshot_read", check_reading);
    }

    fn sample(index: u64) -> SnapshotData {
        let mut data = SnapshotData {
            meta: SnapshotMeta {
                index,
                term: 3,
                conf_state: ConfState {
                    voters: vec![1, 2, 4],
                    ..Default::default()
                },
            },
            ..Default::default()
        };
        data.membership
            .peer_urls
            .insert(1, "http://127.0.0.1:1".into());
        data.membership.removed.insert(3);
        data.kv = FrozenKv::from_records(
            (0..100u32)
                .map(|i| Record::new(format!("k{i}").as_bytes(), &[i as u8; 10], i as u64 + 1)),
            index + 5,
        );
        data
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("raftkvd-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trips_and_prunes() {
        let dir = temp_dir("roundtrip");
        for index in [10, 20, 30, 40] {
            write(&dir, &sample(index)).unwrap();
        }
        // Recorded: 30. Nothing past it goes, and three up to it stay.
        prune(&dir, 30).unwrap();
        assert_eq!(list(&dir).unwrap(), vec![40, 30, 20, 10]);
        prune(&dir, 40).unwrap();
        assert_eq!(list(&dir).unwrap(), vec![40, 30, 20]);
        assert_eq!(verify(&path_of(&dir, 40)).unwrap(), sample(40).meta);
        let back = read(&path_of(&dir, 40)).unwrap();
        let want = sample(40);
        assert_eq!(back.meta, want.meta);
        let pairs = |kv: &FrozenKv| {
            let mut v: Vec<_> = kv
                .iter()
                .map(|r| (r.key().to_vec(), r.value().to_vec(), r.revision()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(pairs(&back.kv), pairs(&want.kv));
        assert_eq!(back.kv.revision(), 45);
        assert_eq!(back.membership.peer_urls, want.membership.peer_urls);
        assert_eq!(back.membership.removed, want.membership.removed);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A current-format file of data with no groups, rewritten in the third format (no
    /// table of groups, no shards).
    fn as_third_format(v4: &[u8]) -> Vec<u8> {
        let u32_at = |at: usize| u32::from_le_bytes(v4[at..at + 4].try_into().unwrap()) as usize;
        let mut at = 32;
        at += 4 + u32_at(at); // conf state
        let members = u32_at(at);
        at += 4;
        for _ in 0..members {
            at += 8;
            at += 4 + u32_at(at);
        }
        at += 4 + 8 * u32_at(at); // removed ids
        assert_eq!(u32_at(at), 0, "the sample has no groups");
        assert_eq!(u32_at(at + 4), 0, "the sample has no shards");
        assert_eq!(u32_at(at + 8), 0, "the sample drains no node");
        let mut v3 = MAGIC_V3.to_vec();
        v3.extend_from_slice(&v4[8..at]);
        v3.extend_from_slice(&v4[at + 12..v4.len() - 4]);
        let crc = crc32fast::hash(&v3);
        v3.extend_from_slice(&crc.to_le_bytes());
        v3
    }

    #[test]
    fn the_table_of_groups_round_trips_and_a_third_format_file_has_none() {
        let dir = temp_dir("groups");
        let mut data = sample(40);
        data.membership.groups.insert(
            2,
            Placement {
                initial: [1, 2].into(),
                members: [1, 2].into(),
                removed: [].into(),
            },
        );
        data.membership.groups.insert(
            7,
            Placement {
                initial: [2, 4, 9].into(),
                members: [2, 9, 10].into(),
                removed: [4].into(),
            },
        );
        data.membership.shards = vec![2, 7, 2];
        data.membership.draining = [4].into();
        let (path, _) = write(&dir, &data).unwrap();
        assert_eq!(read(&path).unwrap().membership.draining, [4].into());
        assert_eq!(
            read(&path).unwrap().membership.shards,
            data.membership.shards
        );
        assert_eq!(
            read(&path).unwrap().membership.groups,
            data.membership.groups
        );
        let (path, _) = write(&dir, &sample(50)).unwrap();
        fs::write(&path, as_third_format(&fs::read(&path).unwrap())).unwrap();
        let back = read(&path).unwrap();
        assert!(back.membership.groups.is_empty());
        assert_eq!(
            (back.meta.index, back.kv.revision(), back.kv.len()),
            (50, 55, 100)
        );
        assert_eq!(back.membership.removed, sample(50).membership.removed);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leases_round_trip_and_a_group_without_any_writes_the_fourth_format() {
        let dir = temp_dir("leases");
        let (path, _) = write(&dir, &sample(60)).unwrap();
        assert_eq!(&fs::read(&path).unwrap()[..8], MAGIC_V4);
        let mut data = sample(70);
        let now = Instant::now();
        let saved = [
            (
                crate::leases::id_in(1, 3),
                10,
                41,
                vec![Bytes::from("k1"), Bytes::from("k2")],
            ),
            (crate::leases::id_in(1, 4), 600, 44, vec![]),
        ];
        data.kv = data.kv.with_leases(Leases::from_saved(saved.clone(), now));
        let (path, _) = write(&dir, &data).unwrap();
        assert_eq!(&fs::read(&path).unwrap()[..8], MAGIC);
        let back = read(&path).unwrap();
        let leases: Vec<_> = back
            .kv
            .leases()
            .iter()
            .map(|(id, l)| {
                (
                    id,
                    l.ttl_seconds,
                    l.renewed_at,
                    l.keys.iter().cloned().collect(),
                )
            })
            .collect();
        assert_eq!(leases, saved.to_vec());
        assert_eq!(back.kv.leases().lease_of(b"k2"), Some(saved[0].0));
        assert_eq!(back.kv.len(), 100);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_format_file_reads_with_its_index_as_the_map_revision() {
        let dir = temp_dir("v2");
        let (path, _) = write(&dir, &sample(40)).unwrap();
        let v3 = as_third_format(&fs::read(&path).unwrap());
        // The same file in the second format: no map revision after the term.
        let mut v2 = MAGIC_V2.to_vec();
        v2.extend_from_slice(&v3[8..24]);
        v2.extend_from_slice(&v3[32..v3.len() - 4]);
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&crc.to_le_bytes());
        fs::write(&path, &v2).unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.meta.index, back.kv.revision()), (40, 40));
        assert_eq!(back.kv.len(), 100);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn start_up_removes_files_a_crash_left_unfinished() {
        let dir = temp_dir("partial");
        write(&dir, &sample(10)).unwrap();
        fs::write(dir.join("snap-0000000000000014.tmp"), b"half a snapshot").unwrap();
        fs::write(dir.join("recv-0000000000000014-1.tmp"), b"half an upload").unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let wanted = sample(10).meta;
        assert!(recover(&dir, &wanted, 0, &logger).unwrap().is_some());
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "only the snapshot is left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn any_flipped_or_missing_byte_is_detected() {
        let dir = temp_dir("corrupt");
        let (path, size) = write(&dir, &sample(7)).unwrap();
        let good = fs::read(&path).unwrap();
        for at in (0..size as usize).step_by(37) {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            assert!(read(&path).is_err(), "flipped byte {at} not detected");
        }
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(read(&path).is_err(), "truncation not detected");
        assert!(verify(&path).is_err(), "truncation not detected by verify");
        fs::write(&path, &good).unwrap();
        assert!(verify(&path).is_ok());
        let mut bad = good.clone();
        bad[good.len() / 2] ^= 1;
        fs::write(&path, &bad).unwrap();
        assert!(verify(&path).is_err(), "flip not detected by verify");
        fs::remove_dir_all(&dir).unwrap();
    }
}
