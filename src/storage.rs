//! The durable raft log of one raft group: entries, hard state and conf state, kept in
//! TiKV's `raft-engine` (an append-only log store made for many raft groups, with group
//! commit), and served to raft-rs through the [`raft::Storage`] trait.
//!
//! Every write that raft-rs needs durable goes through [`LogStore::persist`], which puts
//! the entries and the hard state in one atomic, fsynced batch: a hard state whose commit
//! points past the stored log can never be left behind by a crash. This module must never
//! acknowledge a write it has not synced, and never invents entries it does not hold.

use std::path::Path;
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use raft_engine::{Config as EngineConfig, Engine, LogBatch, MessageExt};

/// raft-engine keys of the per-group metadata.
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
/// Index of the conf-change entry that produced the stored conf state.
const KEY_CONF_INDEX: &[u8] = b"conf_index";

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
}

/// Opens (or creates) the raft-engine in `dir`.
pub fn open_engine(dir: &Path) -> Result<Arc<Engine>, StoreError> {
    let config = EngineConfig {
        dir: dir.to_string_lossy().into_owned(),
        ..Default::default()
    };
    Ok(Arc::new(Engine::open(config)?))
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
            .and_then(|b| b.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0);
        Ok(LogStore {
            engine,
            group_id,
            hard_state,
            conf_state,
            conf_index,
        })
    }

    /// True when the group has never stored anything: a brand-new node.
    pub fn is_empty(&self) -> bool {
        self.engine.last_index(self.group_id).is_none() && self.hard_state == HardState::default()
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
        Ok(())
    }

    /// Appends `entries` (replacing any conflicting suffix) and stores `hard_state`, in one
    /// atomic batch, synced to disk before it returns.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        batch.add_entries::<RaftEntries>(self.group_id, entries)?;
        if let Some(hs) = hard_state {
            batch.put_message(self.group_id, KEY_HARD_STATE.to_vec(), hs)?;
        }
        self.engine.write(&mut batch, true)?;
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a commit index that raft-rs reports after the entries are durable. Not
    /// synced: a lost commit index is learned again from the leader.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        let mut batch = LogBatch::default();
        batch.put_message(self.group_id, KEY_HARD_STATE.to_vec(), &hs)?;
        self.engine.write(&mut batch, false)?;
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

    /// Entries in `[low, high)`, all of which must be stored.
    pub fn entries_between(&self, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
        self.entries(low, high, None, GetEntriesContext::empty(false))
    }

    fn first(&self) -> u64 {
        self.engine.first_index(self.group_id).unwrap_or(1)
    }

    fn last(&self) -> u64 {
        self.engine.last_index(self.group_id).unwrap_or(0)
    }
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
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = Vec::with_capacity((high - low) as usize);
        let max_size = max_size.into().map(|s| s as usize);
        self.engine
            .fetch_entries_to::<RaftEntries>(self.group_id, low, high, max_size, &mut entries)
            .map_err(store_error)?;
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        // Until log compaction exists the log starts at index 1, preceded by the empty
        // "snapshot" at index 0, term 0.
        if idx == 0 {
            return Ok(0);
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

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The log is never compacted yet, so a follower can always be caught up from
        // entries and raft-rs has no reason to ask for a snapshot.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
