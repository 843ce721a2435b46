//! Keeps the shared raft log's disk use near raft-engine's purge threshold.
//!
//! raft-engine deletes a log file only once no group has a live entry in it, and only
//! when asked (`purge_expired_files`). Asking after each snapshot was not enough with
//! many groups: each group compacts only after `--snapshot-count` writes of its own, so
//! with 64 groups some group's live entries kept every file alive, and the log grew to
//! six times the threshold. So the loop also asks every `PURGE_EVERY`, and raft-engine
//! answers with the groups whose old entries keep files alive. Those are told to compact
//! their logs early (`Group::compact_log_soon`), one after the other, at most two
//! writing a snapshot at once and their snapshots paced to `SNAPSHOT_BYTES_PER_SEC`: 64
//! small groups told at once wrote 25 MB of snapshots in 0.35 s on every node, and the
//! log's fsyncs behind them put p99 at 42 ms. A group whose snapshot would be costly
//! declines; raft-engine copies its old entries forward after a few requests.
//!
//! One purge runs at a time, on a background thread. This must never run a purge on the
//! raft loop (it may rewrite live entries), nor compact a log itself: only groups do.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_engine::Engine;
use slog::{warn, Logger};

use super::group::Group;
use crate::background;
use crate::router::Router;

/// How often the loop asks raft-engine for a purge when no compaction asked sooner.
const PURGE_EVERY: Duration = Duration::from_secs(5);
/// Groups compacting at raft-engine's request at once.
const COMPACTING_AT_ONCE: usize = 2;
/// Pace of the snapshots written at raft-engine's request.
const SNAPSHOT_BYTES_PER_SEC: u64 = 8 << 20;

pub struct LogPurge {
    /// Set while a purge job runs.
    running: Arc<AtomicBool>,
    /// A group compacted its log since the last purge began.
    compacted: bool,
    next_due: Instant,
    /// Groups raft-engine asked to compact, not told yet.
    waiting: VecDeque<u64>,
    /// Groups told, whose snapshot may still be being written.
    told: Vec<u64>,
    /// When the next group may be told (the pace of their snapshots).
    next_tell: Instant,
}

impl LogPurge {
    pub fn new() -> LogPurge {
        LogPurge {
            running: Arc::new(AtomicBool::new(false)),
            compacted: false,
            next_due: Instant::now() + PURGE_EVERY,
            waiting: VecDeque::new(),
            told: Vec::new(),
            next_tell: Instant::now(),
        }
    }

    /// A group compacted its log (or was dropped): its old files may go now.
    pub fn on_compacted(&mut self) {
        self.compacted = true;
    }

    /// The last purge named these groups.
    pub fn compaction_wanted(&mut self, groups: Vec<u64>) {
        let mut queued: BTreeSet<u64> = self.waiting.iter().chain(&self.told).copied().collect();
        for group in groups {
            if queued.insert(group) {
                self.waiting.push_back(group);
            }
        }
    }

    /// Tells waiting groups to compact, at the pace of their snapshots and while fewer
    /// than `COMPACTING_AT_ONCE` told ones are still writing theirs.
    pub fn tell_groups(&mut self, groups: &mut BTreeMap<u64, Group>) {
        if self.waiting.is_empty() && self.told.is_empty() {
            return;
        }
        self.told
            .retain(|id| groups.get(id).is_some_and(Group::snapshotting));
        while self.told.len() < COMPACTING_AT_ONCE && Instant::now() >= self.next_tell {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            if let Some(group) = groups.get_mut(&id) {
                let bytes = group.compact_log_soon();
                let pause = Duration::from_secs_f64(bytes as f64 / SNAPSHOT_BYTES_PER_SEC as f64);
                self.next_tell = Instant::now() + pause;
                if group.snapshotting() {
                    self.told.push(id);
                }
            }
        }
    }

    /// Starts a purge if one is due and none runs: every `PURGE_EVERY`, and once the
    /// groups told to compact are done, if one did. raft-engine's answer comes back as
    /// `NodeMsg::CompactLogs` through `router`.
    pub fn maybe_start(&mut self, engine: &Arc<Engine>, router: &Router, logger: &Logger) {
        let now = Instant::now();
        let settled = self.waiting.is_empty() && self.told.is_empty();
        if !(self.compacted && settled) && now < self.next_due {
            return;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return; // the next one sees this compaction's files too
        }
        self.compacted = false;
        self.next_due = now + PURGE_EVERY;
        let (engine, router, running) = (engine.clone(), router.clone(), self.running.clone());
        let job_logger = logger.clone();
        let spawned = background::spawn("log-purge", move || {
            match engine.purge_expired_files() {
                Ok(groups) if !groups.is_empty() => router.compact_logs(groups),
                Ok(_) => {}
                Err(e) => {
                    warn!(job_logger, "could not delete obsolete raft log files"; "error" => %e)
                }
            }
            running.store(false, Ordering::Release);
        });
        if let Err(e) = spawned {
            warn!(logger, "could not start the raft log purge"; "error" => %e);
            self.running.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_named_again_is_queued_once_in_the_order_first_named() {
        let mut purge = LogPurge::new();
        purge.compaction_wanted(vec![3, 1, 3]);
        purge.told.push(7);
        purge.compaction_wanted(vec![1, 7, 2]);
        assert_eq!(purge.waiting, [3, 1, 2]);
    }
}
