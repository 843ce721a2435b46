//! The node's side of snapshots: deciding when to take one, handing a frozen view of the
//! map to a background writer, compacting the log once the file is durable, and
//! installing a snapshot the leader sent. It never writes a snapshot file on the raft
//! loop, and never records a snapshot older than the one it has.
//!
//! When: after `--snapshot-count` applied writes (counted by the map's revision; an entry
//! carries many). Once the map is large (its last snapshot over `CHEAP_SNAPSHOT_BYTES`),
//! also only when the entries applied since hold at least as many bytes as that snapshot:
//! rewriting the whole map costs its size, and waiting until the log has grown as much
//! bounds the extra writing at one byte of snapshot per byte of log. At the latest after
//! `MAX_WRITES_FACTOR` times `--snapshot-count` writes, which bounds the log replayed at
//! restart. Also early, if cheap, when the shared log cannot delete old files because
//! they hold this group's entries (`compact_log_soon`, asked by `node/log_purge.rs`).

use std::time::Instant;

use slog::{error, info, warn};

use super::{Group, GroupEvent};
use crate::background;
use crate::metrics::Metrics;
use crate::router::GroupMsg;
use crate::snapshot::{self, SnapshotData, SnapshotMeta, WrittenSnapshot};

/// However large the map, a snapshot is due after this many times `--snapshot-count`
/// writes.
const MAX_WRITES_FACTOR: u64 = 10;
/// A snapshot smaller than this is cheap to rewrite: the next one is due on the write
/// count alone.
const CHEAP_SNAPSHOT_BYTES: u64 = 4 << 20;

/// Whether a snapshot is due, `writes` (in entries with `bytes` of payload) having been
/// applied since the last snapshot, whose file has `last_bytes`.
fn snapshot_due(writes: u64, snapshot_count: u64, bytes: u64, last_bytes: u64) -> bool {
    writes >= snapshot_count
        && (snapshot_cheap(bytes, last_bytes) || writes >= snapshot_count * MAX_WRITES_FACTOR)
}

/// Whether rewriting the map costs no more than the log it replaces: the last snapshot
/// (`last_bytes`) was small, or the entries applied since hold `bytes`, at least as many.
fn snapshot_cheap(bytes: u64, last_bytes: u64) -> bool {
    last_bytes < CHEAP_SNAPSHOT_BYTES || bytes >= last_bytes
}

/// How many entries behind a snapshot hold about `catchup_writes` writes, `entries`
/// entries having taken `writes` revisions since the last snapshot (never more than
/// `catchup_writes`: every entry takes at least one revision).
fn entries_to_keep(catchup_writes: u64, entries: u64, writes: u64) -> u64 {
    if writes <= entries {
        return catchup_writes;
    }
    (u128::from(catchup_writes) * u128::from(entries) / u128::from(writes)) as u64
}

impl Group {
    /// Snapshots when enough entries were applied since the last one (see the module
    /// doc), or when raft needs a newer one to send to a follower.
    pub(super) fn maybe_snapshot(&mut self) {
        let wanted = self.raw.store().take_snapshot_request();
        let due = snapshot_due(
            self.kv
                .read()
                .unwrap()
                .revision()
                .saturating_sub(self.last_snapshot_revision),
            self.snapshot_count,
            self.applied_bytes_since_snapshot,
            self.last_snapshot_bytes,
        );
        if (wanted || due) && !self.snapshot_in_progress && self.applied > self.last_snapshot {
            self.start_snapshot();
        }
    }

    /// A snapshot of this group is being written.
    pub fn snapshotting(&self) -> bool {
        self.snapshot_in_progress
    }

    /// raft-engine cannot delete old log files while they hold this group's entries
    /// (`node/log_purge.rs`). If a snapshot is cheap (see the module doc: the size rule
    /// without the write count), takes one now and compacts the log up to it, keeping no
    /// entries for lagging followers (they get the snapshot instead). A group idle since
    /// its last snapshot drops the entries kept behind it. Otherwise it declines, and
    /// raft-engine copies the old entries forward itself after a few requests. Returns
    /// about how many bytes the snapshot it started will write (0 if none).
    pub fn compact_log_soon(&mut self) -> u64 {
        if self.snapshot_in_progress {
            self.compact_fully = true; // the snapshot being written will do
            return 0;
        }
        let cheap = snapshot_cheap(self.applied_bytes_since_snapshot, self.last_snapshot_bytes);
        if cheap && self.applied > self.last_snapshot {
            // The map is at most the last snapshot plus what was applied since.
            let bytes = self.last_snapshot_bytes + self.applied_bytes_since_snapshot;
            self.compact_fully = true;
            self.start_snapshot();
            return bytes;
        }
        let idle = self.applied == self.last_snapshot;
        if idle && self.raw.store().truncated_index() < self.last_snapshot {
            if let Err(e) = self.raw.mut_store().compact(self.last_snapshot + 1) {
                warn!(self.logger, "could not compact the raft log"; "error" => %e);
                return 0;
            }
            info!(self.logger, "compacted the raft log early, so that old log files can go";
                "log_starts_at" => self.last_snapshot + 1);
            self.events.push(GroupEvent::LogCompacted);
        }
        0
    }

    /// Copies the state machine and has a background thread write it, so the loop
    /// pauses only for the copy.
    fn start_snapshot(&mut self) {
        let started = Instant::now();
        let data = SnapshotData {
            meta: SnapshotMeta {
                index: self.applied,
                term: self.applied_term,
                conf_state: self.raw.raft.prs().conf().to_conf_state(),
            },
            // The cluster's membership travels in the cluster group's snapshots only.
            membership: if self.is_cluster_group() {
                self.membership.read().unwrap().clone()
            } else {
                Default::default()
            },
            kv: self.kv.read().unwrap().freeze(),
        };
        let pause = started.elapsed();
        info!(self.logger, "snapshot started";
            "index" => data.meta.index, "keys" => data.kv.len(),
            "loop_pause_ms" => format!("{:.2}", pause.as_secs_f64() * 1e3));
        self.snapshot_in_progress = true;
        self.applied_bytes_since_snapshot = 0;
        let (dir, inbox, group_id) = (self.snap_dir.clone(), self.inbox.clone(), self.id);
        let spawned = background::spawn("snapshot-writer", move || {
            let started = Instant::now();
            let result = snapshot::write(&dir, &data)
                .and_then(|(_, bytes)| {
                    snapshot::prune(&dir, data.meta.index)?;
                    Ok(bytes)
                })
                .map(|bytes| WrittenSnapshot {
                    revision: data.kv.revision(),
                    meta: data.meta,
                    bytes,
                    write_time: started.elapsed(),
                })
                .map_err(|e| format!("writing the snapshot failed: {e}"));
            inbox.send(group_id, GroupMsg::SnapshotWritten(result));
        });
        if let Err(e) = spawned {
            error!(self.logger, "could not start the snapshot writer"; "error" => %e);
            self.snapshot_in_progress = false;
        }
    }

    /// A snapshot is durable: raft may send it, and the log before it can go, except the
    /// entries of the last `catchup_entries` writes, for followers that lag a little.
    pub(super) fn on_snapshot_written(
        &mut self,
        result: Result<WrittenSnapshot, String>,
    ) -> Result<(), String> {
        self.snapshot_in_progress = false;
        let written = result?;
        let index = written.meta.index;
        if index <= self.last_snapshot {
            // A newer snapshot from the leader was installed while this one was written.
            return Ok(());
        }
        let store = self.raw.mut_store();
        store
            .record_snapshot(&written.meta)
            .map_err(|e| e.to_string())?;
        let keep = if std::mem::take(&mut self.compact_fully) {
            0
        } else {
            entries_to_keep(
                self.catchup_entries,
                index.saturating_sub(self.last_snapshot),
                written.revision.saturating_sub(self.last_snapshot_revision),
            )
        };
        let first = index.saturating_sub(keep) + 1;
        store.compact(first).map_err(|e| e.to_string())?;
        self.events.push(GroupEvent::LogCompacted);
        self.last_snapshot = index;
        self.last_snapshot_revision = written.revision;
        self.last_snapshot_bytes = written.bytes;
        Metrics::inc(&self.metrics.snapshots);
        self.metrics.snapshot_duration.observe(written.write_time);
        info!(self.logger, "snapshot written";
            "index" => index, "term" => written.meta.term, "bytes" => written.bytes,
            "write_ms" => written.write_time.as_millis(), "log_starts_at" => first);
        Ok(())
    }

    /// A peer's snapshot arrived, its file verified at `file` (a temporary name): steps
    /// the message like any other, and if raft took the snapshot (it is now pending,
    /// to be installed from the next Ready) moves the file to its final name, durably,
    /// before that Ready is handled. A snapshot raft ignores never gets a snapshot's
    /// name, so no upload can stand in for, or prune away, a snapshot this node has.
    pub(super) fn take_received_snapshot(
        &mut self,
        msg: Box<raft::eraftpb::Message>,
        file: &std::path::Path,
    ) -> Result<(), String> {
        let index = msg.get_snapshot().get_metadata().index;
        self.handle(GroupMsg::Step(msg));
        let taken = self
            .raw
            .raft
            .raft_log
            .unstable_snapshot()
            .as_ref()
            .is_some_and(|snap| snap.get_metadata().index == index);
        if !taken {
            return Err(format!("raft did not take the snapshot at index {index}"));
        }
        let path = snapshot::path_of(&self.snap_dir, index);
        std::fs::rename(file, &path)
            .and_then(|()| crate::durable::sync_dir(&self.snap_dir))
            .map_err(|e| {
                let e = format!("cannot move the received snapshot to {}: {e}", path.display());
                error!(self.logger, "a received snapshot cannot be kept; its install will fail"; "error" => &e);
                e
            })
    }

    /// Replaces the state machine with a snapshot the leader sent (the transport already
    /// stored and verified its file), then the log with the snapshot's point.
    pub(super) fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), String> {
        let path = snapshot::path_of(&self.snap_dir, meta.index);
        let data = snapshot::read(&path)
            .map_err(|e| format!("cannot load received snapshot {}: {e}", path.display()))?;
        let own_id = self.raw.raft.id;
        if self.is_cluster_group() {
            self.transport.follow(own_id, &data.membership);
            if data.membership.removed.contains(&own_id) {
                self.events.push(GroupEvent::Removed { index: meta.index });
            }
            // The table of groups may have changed in the part of the log the snapshot
            // replaces: the loop checks every group's replica here against it.
            for &group in data.membership.groups.keys() {
                self.events.push(GroupEvent::Placed { group });
            }
            *self.membership.write().unwrap() = data.membership;
        }
        let keys = data.kv.len();
        self.last_snapshot_revision = data.kv.revision();
        self.kv.write().unwrap().replace(data.kv);
        self.raw
            .mut_store()
            .install_snapshot(&meta)
            .map_err(|e| format!("could not install the snapshot in the log: {e}"))?;
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.note_configuration();
        self.abandon_waiters_overtaken_by_snapshot();
        self.last_snapshot = meta.index;
        self.last_snapshot_bytes = snapshot::size_of(&path);
        self.applied_bytes_since_snapshot = 0;
        self.reads.on_applied(meta.index);
        if let Err(e) = snapshot::prune(&self.snap_dir, meta.index) {
            warn!(self.logger, "could not prune old snapshots"; "error" => %e);
        }
        info!(self.logger, "installed a snapshot from the leader";
            "index" => meta.index, "term" => meta.term, "keys" => keys);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catch_up_log_is_counted_in_writes() {
        // One write per entry (or fewer): as many entries as writes.
        assert_eq!(entries_to_keep(5_000, 10_000, 10_000), 5_000);
        assert_eq!(entries_to_keep(5_000, 10_000, 4_000), 5_000);
        // Twenty writes per entry: a twentieth of the entries.
        assert_eq!(entries_to_keep(5_000, 10_000, 200_000), 250);
        assert_eq!(entries_to_keep(5_000, 0, 0), 5_000);
    }

    #[test]
    fn small_maps_snapshot_on_count_and_large_ones_when_the_log_has_grown_as_much() {
        let mb = 1 << 20;
        // Too few writes: never.
        assert!(!snapshot_due(9_999, 10_000, 100 * mb, 0));
        // A cheap snapshot: on the count alone.
        assert!(snapshot_due(10_000, 10_000, 1, 3 * mb));
        // A 28 MB snapshot: not until entries of 28 MB were applied ...
        assert!(!snapshot_due(50_000, 10_000, 14 * mb, 28 * mb));
        assert!(snapshot_due(95_000, 10_000, 28 * mb, 28 * mb));
        // ... or ten times the count, whichever comes first.
        assert!(snapshot_due(100_000, 10_000, mb, 500 * mb));
    }
}
