//! The durable raft log of one raft group: entries, hard state and conf state, kept in
//! TiKV's `raft-engine` (an append-only log store made for many raft groups, with group
//! commit), and served to raft-rs through the [`raft::Storage`] trait.
//!
//! Every write that raft-rs needs durable goes through [`LogStore::stage`], which puts the
//! entries and the hard state in one atomic batch (one per loop round, shared by every
//! group), fsynced whenever it holds entries or a new term or vote: a hard state whose
//! commit points past the stored log can never be left behind by a crash. This module must never
//! acknowledge a write it has not synced, and never invents entries it does not hold.
//!
//! After a snapshot the log is compacted: entries up to the *truncation point* are gone,
//! and the point's own (index, term) is kept so that `term(first_index - 1)` still
//! answers, as raft-rs requires. Installing a snapshot from the leader replaces the whole
//! log with that point, in one batch.
//!
//! The newest entries are also kept in memory (`entry_cache.rs`), exactly as written, so
//! that raft-rs's many reads near the end of the log cost no file read; anything the
//! cache does not hold is read from raft-engine.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft_engine::Command;

use crate::entry_cache::EntryCache;
use crate::log_tail::NewestFiles;
use crate::snapshot::SnapshotMeta;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use raft_engine::{Config as EngineConfig, Engine, LogBatch, MessageExt};
use slog::{warn, Logger};

/// raft-engine keys of the per-group metadata.
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
/// Index of the conf-change entry that produced the stored conf state.
const KEY_CONF_INDEX: &[u8] = b"conf_index";
/// (index, term) of the last entry removed from the log, 16 bytes.
const KEY_TRUNCATED: &[u8] = b"truncated";
/// Metadata of the newest durable snapshot (raft SnapshotMetadata).
const KEY_SNAPSHOT: &[u8] = b"snapshot";
/// Present (alone) once this node's replica of the group was removed and its log
/// deleted: that replica, and any earlier one, is never created again. Its value is the
/// destroyed replica's incarnation (`replica_id.rs`), 8 bytes; `[1]`, as releases before
/// incarnations wrote it, stands for the first.
const KEY_TOMBSTONE: &[u8] = b"tombstone";
/// The raft id of this node's replica of the group, 8 bytes; absent for a replica made
/// before incarnations, whose raft id is the node id.
const KEY_REPLICA_ID: &[u8] = b"replica_id";

/// Tells raft-engine how to read the index of a raft-rs entry.
#[derive(Clone)]
pub struct RaftEntries;

impl MessageExt for RaftEntries {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// An error of the log store: I/O, corruption, or a broken invariant.
pub type StoreError = raft_engine::Error;

/// The raft log of one group in a shared raft-engine.
pub struct LogStore {
    engine: Arc<Engine>,
    group_id: u64,
    hard_state: HardState,
    conf_state: ConfState,
    conf_index: u64,
    /// (index, term) just before the first entry in the log.
    truncated: (u64, u64),
    /// The first index of the log (`truncated.0 + 1` when it is empty), which raft-rs asks
    /// for on nearly every step: kept here rather than looked up in raft-engine each time.
    first: u64,
    snapshot: SnapshotMetadata,
    /// Set when raft asked for a snapshot that the stored one cannot serve.
    snapshot_wanted: AtomicBool,
    /// The log's newest entries, which raft-rs reads most.
    recent: EntryCache,
}

/// How to recover a member whose raft log is damaged, for the messages that refuse one.
pub const DAMAGED_LOG_RECOVERY: &str = "In a cluster of several nodes the others hold the \
     data: remove this node from the cluster, wipe its data dir and add it back under a new \
     id; do not put back an older copy of this data dir while they run on, as the node would \
     forget votes it cast and writes it acknowledged. A single-node cluster can only be \
     restored from a copy of its data dir";

/// Opens (or creates) the raft-engine in `dir`, refusing a newest log file whose
/// recovery would drop synced batches (`log_tail.rs`).
pub fn open_engine(dir: &Path, logger: &Logger) -> Result<Arc<Engine>, StoreError> {
    let newest = NewestFiles::copy(dir)?;
    let engine = Engine::open(engine_config(dir))?;
    match newest.judge_cuts()? {
        Ok(torn) => {
            for t in torn {
                warn!(logger, "cut a write torn by a crash from the raft log (it was never \
                    synced, so never acknowledged)";
                    "file" => %t.path.display(), "offset" => t.offset, "bytes" => t.bytes);
            }
            newest.mark_judged()?;
            Ok(Arc::new(engine))
        }
        Err(damage) => {
            drop(engine);
            let kept = match newest.put_back(&damage) {
                Ok(()) => "The file is left as it was".to_string(),
                Err(e) => format!(
                    "Putting the file back as it was failed ({e}): it now ends at that byte, \
                     so do not start this node again before it is recovered"
                ),
            };
            Err(StoreError::Corruption(format!(
                "the newest raft log file {path} is damaged at byte {offset}: recovery would \
                 drop the {bytes} bytes from there, which are not a write torn by a crash \
                 ({why}) and may hold writes this node acknowledged and votes it cast. {kept}; \
                 refusing to start. {DAMAGED_LOG_RECOVERY} (or, giving up what those bytes \
                 hold, cut the file there: truncate -s {offset} {path})",
                path = damage.path.display(),
                offset = damage.offset,
                bytes = damage.bytes,
                why = damage.why,
            )))
        }
    }
}

/// How raftkvd sets raft-engine up.
fn engine_config(dir: &Path) -> EngineConfig {
    EngineConfig {
        dir: dir.to_string_lossy().into_owned(),
        // raft-engine looks for obsolete log files only once the log exceeds
        // purge_threshold (10 GiB by default, sized for TiKV), then deletes whole files,
        // moving what is still live out of them. A small store wants small numbers, so
        // that its disk use stays bounded near the threshold.
        target_file_size: raft_engine::ReadableSize::mb(8),
        purge_threshold: raft_engine::ReadableSize::mb(32),
        // A recycled file holds its old batches past the log's end, which would hide
        // damage from the tail judge; new files read as zeros there.
        enable_log_recycle: false,
        ..Default::default()
    }
}

/// Deletes group `group_id`'s whole log and state from `engine` and leaves a tombstone
/// naming the replica's `incarnation` in their place, in one synced batch. Its replica
/// must be stopped.
pub fn destroy_group(engine: &Engine, group_id: u64, incarnation: u64) -> Result<(), StoreError> {
    let mut batch = LogBatch::default();
    batch.add_command(group_id, Command::Clean);
    batch.put(
        group_id,
        KEY_TOMBSTONE.to_vec(),
        incarnation.to_le_bytes().to_vec(),
    )?;
    engine.write(&mut batch, true)?;
    Ok(())
}

/// The incarnation of this node's newest destroyed replica of group `group_id`, if one
/// was.
pub fn destroyed_incarnation(engine: &Engine, group_id: u64) -> Option<u64> {
    let tombstone = engine.get(group_id, KEY_TOMBSTONE)?;
    // `[1]`: the first replica, from a release before incarnations.
    Some(u64_of(&tombstone).unwrap_or(0))
}

/// The raft id this node's replica of group `group_id` was made with, if it was recorded
/// (see [`record_replica_id`]).
pub fn recorded_replica_id(engine: &Engine, group_id: u64) -> Option<u64> {
    u64_of(&engine.get(group_id, KEY_REPLICA_ID)?)
}

/// A value stored as 8 little-endian bytes; None if it is not 8 bytes long.
fn u64_of(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_le_bytes)
}

/// Records, synced, the raft id of the replica of group `group_id` about to start here:
/// after a restart the replica keeps it, whatever the table of groups says while the
/// cluster group replays its log.
pub fn record_replica_id(engine: &Engine, group_id: u64, replica: u64) -> Result<(), StoreError> {
    let mut batch = LogBatch::default();
    batch.put(
        group_id,
        KEY_REPLICA_ID.to_vec(),
        replica.to_le_bytes().to_vec(),
    )?;
    engine.write(&mut batch, true)?;
    Ok(())
}

impl LogStore {
    /// Loads the state of `group_id` from `engine` (all defaults for a new group).
    pub fn load(engine: Arc<Engine>, group_id: u64) -> Result<LogStore, StoreError> {
        let hard_state = engine
            .get_message::<HardState>(group_id, KEY_HARD_STATE)?
            .unwrap_or_default();
        let conf_state = engine
            .get_message::<ConfState>(group_id, KEY_CONF_STATE)?
            .unwrap_or_default();
        let conf_index = engine
            .get(group_id, KEY_CONF_INDEX)
            .and_then(|b| u64_of(&b))
            .unwrap_or(0);
        let truncated = engine
            .get(group_id, KEY_TRUNCATED)
            .filter(|b| b.len() == 16)
            .map(|b| {
                let (index, term) = b.split_at(8);
                (
                    u64::from_le_bytes(index.try_into().unwrap()),
                    u64::from_le_bytes(term.try_into().unwrap()),
                )
            })
            .unwrap_or((0, 0));
        let snapshot = engine
            .get_message::<SnapshotMetadata>(group_id, KEY_SNAPSHOT)?
            .unwrap_or_default();
        Ok(LogStore {
            first: stored_first(&engine, group_id, truncated.0),
            engine,
            group_id,
            hard_state,
            conf_state,
            conf_index,
            truncated,
            snapshot,
            snapshot_wanted: AtomicBool::new(false),
            recent: EntryCache::default(),
        })
    }

    /// True when the group has never stored anything: a brand-new node.
    pub fn is_empty(&self) -> bool {
        self.engine.last_index(self.group_id).is_none() && self.hard_state == HardState::default()
    }

    /// The raft id of node `node`'s replica in the stored configuration, the newest if
    /// it lists several.
    pub fn replica_of_node(&self, node: u64) -> Option<u64> {
        let cs = &self.conf_state;
        cs.voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners_next)
            .copied()
            .filter(|&id| crate::replica_id::node_of(id) == node)
            .max()
    }

    /// The hard state last persisted.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The index of the conf-change entry whose result is the stored conf state; entries
    /// up to it need not be applied to raft again on replay.
    pub fn conf_index(&self) -> u64 {
        self.conf_index
    }

    /// Writes the first entries of a new cluster together with the hard state that
    /// commits them and the conf state they produce, in one synced batch.
    pub fn bootstrap(
        &mut self,
        entries: &[Entry],
        hard_state: HardState,
        conf_state: ConfState,
    ) -> Result<(), StoreError> {
        let conf_index = entries.last().map_or(0, |e| e.index);
        let mut batch = LogBatch::default();
        batch.add_entries::<RaftEntries>(self.group_id, entries)?;
        batch.put_message(self.group_id, KEY_HARD_STATE.to_vec(), &hard_state)?;
        self.add_conf_state(&mut batch, &conf_state, conf_index)?;
        self.engine.write(&mut batch, true)?;
        self.hard_state = hard_state;
        self.conf_state = conf_state;
        self.conf_index = conf_index;
        self.first = stored_first(&self.engine, self.group_id, self.truncated.0);
        Ok(())
    }

    /// Adds `entries` (replacing any conflicting suffix) and `hard_state` to `batch`,
    /// which the caller writes: the node loop puts every group's Ready of a round in one
    /// batch, so one fsync covers them all. Returns whether raft needs the batch synced:
    /// new entries, or a new term or vote. A hard state that only moves the commit index
    /// is written but need not be synced (etcd's `MustSync` rule): it is a fact the
    /// leader holds durably anyway and tells again, and the log file is replayed as a
    /// prefix, so a commit index that survives a crash never points past entries that
    /// did not. Call [`Self::staged_written`] once the batch is written.
    pub fn stage(
        &self,
        batch: &mut LogBatch,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<bool, StoreError> {
        batch.add_entries::<RaftEntries>(self.group_id, entries)?;
        if let Some(hs) = hard_state {
            batch.put_message(self.group_id, KEY_HARD_STATE.to_vec(), hs)?;
        }
        Ok(!entries.is_empty()
            || hard_state.is_some_and(|hs| {
                hs.term != self.hard_state.term || hs.vote != self.hard_state.vote
            }))
    }

    /// The batch that [`Self::stage`] filled with `entries` and `hard_state` is written
    /// (and synced if it had to be).
    pub fn staged_written(&mut self, entries: &[Entry], hard_state: Option<&HardState>) {
        self.recent.append(entries);
        if entries.first().is_some_and(|e| e.index <= self.first) {
            // The first entries of an empty log.
            self.first = stored_first(&self.engine, self.group_id, self.truncated.0);
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
    }

    /// Entries up to `applied` are applied: the cache of recent entries lets them go.
    pub fn applied_to(&mut self, applied: u64) {
        self.recent.applied(applied);
    }

    /// Adds to `batch` a commit index that raft-rs reports after the entries are durable.
    /// The batch need not be synced: a lost commit index is learned again from the leader.
    pub fn stage_commit(&mut self, batch: &mut LogBatch, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        batch.put_message(self.group_id, KEY_HARD_STATE.to_vec(), &hs)?;
        self.hard_state = hs;
        Ok(())
    }

    /// Stores the conf state that applying the conf-change entry at `index` produced.
    pub fn set_conf_state(&mut self, conf_state: ConfState, index: u64) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        self.add_conf_state(&mut batch, &conf_state, index)?;
        self.engine.write(&mut batch, true)?;
        self.conf_state = conf_state;
        self.conf_index = index;
        Ok(())
    }

    fn add_conf_state(
        &self,
        batch: &mut LogBatch,
        conf_state: &ConfState,
        index: u64,
    ) -> Result<(), StoreError> {
        batch.put_message(self.group_id, KEY_CONF_STATE.to_vec(), conf_state)?;
        batch.put(
            self.group_id,
            KEY_CONF_INDEX.to_vec(),
            index.to_le_bytes().to_vec(),
        )?;
        Ok(())
    }

    /// The newest durable snapshot (index 0: none yet).
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            index: self.snapshot.index,
            term: self.snapshot.term,
            conf_state: self.snapshot.get_conf_state().clone(),
        }
    }

    /// True once after raft asked for a snapshot newer than the stored one.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// The index just before the first entry of the log.
    pub fn truncated_index(&self) -> u64 {
        self.truncated.0
    }

    /// Records that the snapshot `meta` is durable on disk; raft-rs may now send it.
    pub fn record_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let snapshot = to_metadata(meta);
        let mut batch = LogBatch::default();
        batch.put_message(self.group_id, KEY_SNAPSHOT.to_vec(), &snapshot)?;
        self.engine.write(&mut batch, true)?;
        self.snapshot = snapshot;
        Ok(())
    }

    /// Removes the entries before `first`, which must all be applied and covered by a
    /// durable snapshot. The files they lived in are deleted later, by the node's purge
    /// (`node/log_purge.rs`).
    pub fn compact(&mut self, first: u64) -> Result<(), StoreError> {
        if first <= self.first() || first > self.last() + 1 {
            return Ok(());
        }
        let truncated_term = self.term(first - 1).map_err(|e| {
            raft_engine::Error::InvalidArgument(format!("no term for index {}: {e}", first - 1))
        })?;
        let mut batch = LogBatch::default();
        self.add_truncated(&mut batch, first - 1, truncated_term)?;
        batch.add_command(self.group_id, Command::Compact { index: first });
        self.engine.write(&mut batch, true)?;
        self.truncated = (first - 1, truncated_term);
        self.first = first;
        self.recent.forget_before(first);
        Ok(())
    }

    /// Replaces the whole log with a snapshot received from the leader, in one synced
    /// batch: the log is emptied, the truncation point and conf state become the
    /// snapshot's, and the hard state is kept (commit raised to the snapshot).
    pub fn install_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = hard_state.commit.max(meta.index);
        hard_state.term = hard_state.term.max(meta.term);
        let snapshot = to_metadata(meta);
        let mut batch = LogBatch::default();
        batch.add_command(self.group_id, Command::Clean);
        // Clean deletes every key of the group; who this replica is, and which replicas
        // were destroyed here before it, are not part of the log and must outlive it. (A
        // replica that forgot its raft id came back after a restart as the node's first
        // replica, was dropped as that removed replica, and rejoined empty: a voter
        // without its log or vote.)
        for key in [KEY_REPLICA_ID, KEY_TOMBSTONE] {
            if let Some(value) = self.engine.get(self.group_id, key) {
                batch.put(self.group_id, key.to_vec(), value)?;
            }
        }
        batch.put_message(self.group_id, KEY_HARD_STATE.to_vec(), &hard_state)?;
        self.add_conf_state(&mut batch, &meta.conf_state, meta.index)?;
        self.add_truncated(&mut batch, meta.index, meta.term)?;
        batch.put_message(self.group_id, KEY_SNAPSHOT.to_vec(), &snapshot)?;
        self.engine.write(&mut batch, true)?;
        self.hard_state = hard_state;
        self.conf_state = meta.conf_state.clone();
        self.conf_index = meta.index;
        self.truncated = (meta.index, meta.term);
        self.first = meta.index + 1;
        self.snapshot = snapshot;
        self.recent.clear();
        Ok(())
    }

    fn add_truncated(&self, batch: &mut LogBatch, index: u64, term: u64) -> Result<(), StoreError> {
        let mut value = index.to_le_bytes().to_vec();
        value.extend_from_slice(&term.to_le_bytes());
        batch.put(self.group_id, KEY_TRUNCATED.to_vec(), value)
    }

    /// Reads every stored entry once, so that a damaged log file is found at start-up
    /// (raft-engine checks a block's checksum only when it reads it) rather than when
    /// raft first needs the entry, or never. Errs naming the first unreadable range.
    pub fn verify_entries(&self) -> Result<(), String> {
        const CHUNK: u64 = 1024;
        let (mut low, last) = (self.first(), self.last());
        while low <= last {
            let high = (low + CHUNK).min(last + 1);
            let mut entries = Vec::new();
            self.engine
                .fetch_entries_to::<RaftEntries>(self.group_id, low, high, None, &mut entries)
                .map_err(|e| format!("entries {low}..{high} cannot be read: {e}"))?;
            low = high;
        }
        Ok(())
    }

    /// Entries in `[low, high)`, all of which must be stored.
    pub fn entries_between(&self, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
        self.entries(low, high, None, GetEntriesContext::empty(false))
    }

    fn first(&self) -> u64 {
        debug_assert_eq!(
            self.first,
            stored_first(&self.engine, self.group_id, self.truncated.0)
        );
        self.first
    }

    fn last(&self) -> u64 {
        if let Some(last) = self.recent.last_index() {
            debug_assert_eq!(Some(last), self.engine.last_index(self.group_id));
            return last;
        }
        self.engine
            .last_index(self.group_id)
            .unwrap_or(self.truncated.0)
    }
}

/// The first index of group `group_id`'s stored log, `truncated + 1` if it holds none.
fn stored_first(engine: &Engine, group_id: u64, truncated: u64) -> u64 {
    engine.first_index(group_id).unwrap_or(truncated + 1)
}

fn to_metadata(meta: &SnapshotMeta) -> SnapshotMetadata {
    let mut m = SnapshotMetadata {
        index: meta.index,
        term: meta.term,
        ..Default::default()
    };
    m.set_conf_state(meta.conf_state.clone());
    m
}

fn store_error(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if let Some(entries) = self.recent.entries(low, high, max_size) {
            return Ok(entries);
        }
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = Vec::with_capacity((high - low) as usize);
        let max_size = max_size.map(|s| s as usize);
        self.engine
            .fetch_entries_to::<RaftEntries>(self.group_id, low, high, max_size, &mut entries)
            .map_err(store_error)?;
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if let Some(term) = self.recent.term(idx) {
            return Ok(term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self
            .engine
            .get_entry::<RaftEntries>(self.group_id, idx)
            .map_err(store_error)?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The newest durable snapshot. Its data is empty: the transport streams the file
    /// named by the metadata's index (see transport.rs and peer_service.rs). A snapshot
    /// that predates the recipient's membership would be refused by it; then a new one is
    /// asked for and raft-rs tries again later.
    fn snapshot(&self, _request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let conf = self.snapshot.get_conf_state();
        let knows_recipient = conf.voters.contains(&to) || conf.learners.contains(&to);
        if self.snapshot.index == 0 || !knows_recipient {
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(self.snapshot.clone());
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![7; 10].into(),
            ..Default::default()
        }
    }

    fn quiet() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    /// The tail judge needs zeros past the log's end (`log_tail.rs`): a recycled file
    /// would hold its old batches there, and every torn write would look like damage.
    #[test]
    fn log_files_are_never_recycled() {
        assert!(!engine_config(Path::new("/tmp")).enable_log_recycle);
    }

    #[test]
    fn recent_entries_are_served_from_memory_as_the_log_has_them() {
        let dir =
            std::env::temp_dir().join(format!("raftkvd-storage-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let engine = open_engine(&dir, &quiet()).unwrap();
        let mut store = LogStore::load(engine.clone(), 5).unwrap();
        let write = |store: &mut LogStore, entries: &[Entry]| {
            let mut batch = LogBatch::default();
            store.stage(&mut batch, entries, None).unwrap();
            engine.write(&mut batch, true).unwrap();
            store.staged_written(entries, None);
        };
        let with_term = |index: u64, term: u64| Entry {
            term,
            ..entry(index)
        };
        write(
            &mut store,
            &(1..=10).map(|i| with_term(i, 1)).collect::<Vec<_>>(),
        );
        write(&mut store, &[with_term(8, 2)]); // a new leader's entry replaces 8..=10
        store.applied_to(5);
        let reopened = LogStore::load(engine.clone(), 5).unwrap();
        for store in [&store, &reopened] {
            assert_eq!(store.last_index().unwrap(), 8);
            assert_eq!(store.term(7).unwrap(), 1);
            assert_eq!(store.term(8).unwrap(), 2);
            assert!(store.term(9).is_err());
            let got = store
                .entries(3, 9, None, GetEntriesContext::empty(false))
                .unwrap();
            let terms: Vec<u64> = got.iter().map(|e| e.term).collect();
            assert_eq!(terms, [1, 1, 1, 1, 1, 2]);
        }
        store.compact(6).unwrap();
        assert!(matches!(
            store.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            store.term(5).unwrap(),
            1,
            "the truncation point keeps its term"
        );
        let meta = SnapshotMeta {
            index: 40,
            term: 3,
            conf_state: ConfState {
                voters: vec![1],
                ..Default::default()
            },
        };
        store.install_snapshot(&meta).unwrap();
        assert_eq!(store.last_index().unwrap(), 40);
        assert_eq!(store.first_index().unwrap(), 41);
        assert!(store.term(8).is_err(), "the cache forgot the replaced log");
        drop(store);
        drop(reopened);
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_destroyed_group_keeps_only_its_tombstone_and_the_next_replica_its_id() {
        let dir = std::env::temp_dir().join(format!("raftkvd-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let engine = open_engine(&dir, &quiet()).unwrap();
        let mut store = LogStore::load(engine.clone(), 5).unwrap();
        let hs = HardState {
            term: 1,
            commit: 2,
            ..Default::default()
        };
        let mut batch = LogBatch::default();
        store
            .stage(&mut batch, &[entry(1), entry(2)], Some(&hs))
            .unwrap();
        let other = LogStore::load(engine.clone(), 6).unwrap();
        other.stage(&mut batch, &[entry(1)], Some(&hs)).unwrap();
        engine.write(&mut batch, true).unwrap();
        store.staged_written(&[entry(1), entry(2)], Some(&hs));
        let replica = crate::replica_id::replica_id(3, 1);
        record_replica_id(&engine, 5, replica).unwrap();
        assert!(!store.is_empty() && destroyed_incarnation(&engine, 5).is_none());
        assert_eq!(recorded_replica_id(&engine, 5), Some(replica));
        drop(store);
        destroy_group(&engine, 5, 1).unwrap();
        drop(other);
        drop(engine);

        let engine = open_engine(&dir, &quiet()).unwrap();
        assert_eq!(destroyed_incarnation(&engine, 5), Some(1));
        assert_eq!(
            recorded_replica_id(&engine, 5),
            None,
            "deleted with the log"
        );
        assert!(LogStore::load(engine.clone(), 5).unwrap().is_empty());
        assert_eq!(
            destroyed_incarnation(&engine, 6),
            None,
            "another group is untouched"
        );
        assert_eq!(engine.last_index(6), Some(1));

        // The next replica, placed here again, is sent the group's data by snapshot: it
        // still knows its raft id, and the tombstone of the one before, after a restart.
        let again = crate::replica_id::replica_id(3, 2);
        record_replica_id(&engine, 5, again).unwrap();
        let mut store = LogStore::load(engine.clone(), 5).unwrap();
        let meta = SnapshotMeta {
            index: 40,
            term: 3,
            conf_state: ConfState {
                voters: vec![1, 2, again],
                ..Default::default()
            },
        };
        store.install_snapshot(&meta).unwrap();
        drop(store);
        drop(engine);
        let engine = open_engine(&dir, &quiet()).unwrap();
        assert_eq!(recorded_replica_id(&engine, 5), Some(again));
        assert_eq!(destroyed_incarnation(&engine, 5), Some(1));
        let store = LogStore::load(engine.clone(), 5).unwrap();
        assert_eq!(store.snapshot_meta().index, 40);
        // What a release that forgot the id is recovered from: the stored configuration.
        assert_eq!(store.replica_of_node(3), Some(again));
        assert_eq!(store.replica_of_node(4), None);
        drop(store);

        // A tombstone as releases before incarnations wrote it: the first replica.
        let mut batch = LogBatch::default();
        batch.put(7, KEY_TOMBSTONE.to_vec(), vec![1]).unwrap();
        engine.write(&mut batch, true).unwrap();
        assert_eq!(destroyed_incarnation(&engine, 7), Some(0));
        drop(engine);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
