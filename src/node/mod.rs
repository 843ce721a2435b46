//! The raft node: the one thread that drives every raft group this process hosts.
//!
//! Everything that touches raft state arrives as a [`NodeMsg`] on one channel (see
//! `router.rs`): client proposals and reads, membership changes and messages from peers,
//! each for one group by its id. The loop hands each to its group (`group.rs`), ticks
//! every group's clock, and at the end of each round has every group propose the round's
//! writes and handle its Ready. A message for a group this node does not host is answered
//! as such (a client's) or dropped (a peer's: raft resends).
//!
//! Groups come and go through the cluster group's log, whose table of groups says which
//! nodes host each group: when it changes, the loop starts or drops this node's replica
//! to match (`reconcile`), the same way on every node, and again from the log or the
//! table after a restart. A dropped replica's data is deleted and never comes back. The
//! process stops when the cluster group applies this node's removal, on shutdown (after
//! every group it leads has handed leadership off), or when storage fails.
//!
//! This thread must never block on the network, and must never apply an entry that is
//! not committed. (The thread is a single-threaded runtime that also reads the peers'
//! streams, see `run`.) Beside it: `group.rs` (one group's raft), `bootstrap.rs` (the
//! first log of a new group), `log_purge.rs` (deleting the shared log's old files).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::router::Inbox;
use raft_engine::{Engine, LogBatch};
use slog::{error, info, o, warn, Logger};

use crate::kv::SharedKv;
use crate::membership::{Placement, SharedMembership};
use crate::metrics::Metrics;
use crate::replica_id::incarnation_of;
use crate::router::{GroupMsg, NodeExit, NodeMsg, ProposeError, Router, CLUSTER_GROUP};
use crate::snapshot::{self, SnapshotData};
use crate::storage::{self, LogStore};
use crate::transport::Transport;

mod bootstrap;
mod group;
mod log_purge;

pub use bootstrap::bootstrap;
pub use group::CHANGE_IN_PROGRESS;
use group::{Group, GroupEvent, GroupShared};
use log_purge::LogPurge;

/// Most messages taken from the channel before the node looks at its Readies again.
const MAX_MSGS_PER_ROUND: usize = 4096;

/// Settings of the raft node, the same for every group.
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// The data dir: each group's snapshots live in a folder of it.
    pub data_dir: PathBuf,
    /// Applied writes (revisions) between two snapshots of a group.
    pub snapshot_count: u64,
    /// Changes the process keeps for watches, shared by its groups that hold keys.
    pub watch_history: usize,
    /// Writes kept in a group's log behind a snapshot, for followers that lag a little.
    pub catchup_entries: u64,
}

/// What the node shares with the rest of the process.
pub struct NodeShared {
    /// The cluster's members and groups (the cluster group writes, the transport reads).
    pub membership: SharedMembership,
    pub transport: Arc<Transport>,
    /// The node's own inbox (for answers from its helper threads), and where it
    /// registers each group's map for the API.
    pub router: Router,
    pub metrics: Arc<Metrics>,
}

pub struct Node {
    config: NodeConfig,
    groups: BTreeMap<u64, Group>,
    engine: Arc<Engine>,
    /// Deletes the log files no group needs any more.
    log_purge: LogPurge,
    shared: NodeShared,
    /// Set while groups this node leads hand off leadership before it stops: the
    /// deadline, and the groups handing off.
    stopping: Option<(Instant, BTreeSet<u64>)>,
    logger: Logger,
}

/// Loads group `group_id`'s log and its newest usable snapshot from the data dir,
/// recording the snapshot in the log if the log did not know it yet.
pub fn open_group(
    engine: &Arc<Engine>,
    data_dir: &Path,
    group_id: u64,
    logger: &Logger,
) -> Result<(LogStore, Option<SnapshotData>), String> {
    let mut store = LogStore::load(engine.clone(), group_id)
        .map_err(|e| format!("cannot read the raft log of group {group_id}: {e}"))?;
    store.verify_entries().map_err(|e| {
        format!(
            "the raft log in {} is damaged: group {group_id}'s {e}. Refusing to start rather \
             than serve or replicate what it cannot verify. {}",
            data_dir.join("raft-log").display(),
            storage::DAMAGED_LOG_RECOVERY
        )
    })?;
    let recovered = snapshot::recover(
        &snapshot::dir_of(data_dir, group_id),
        &store.snapshot_meta(),
        store.truncated_index(),
        logger,
    )?;
    if let Some(data) = &recovered {
        if data.meta != store.snapshot_meta() {
            store
                .record_snapshot(&data.meta)
                .map_err(|e| format!("cannot record the snapshot in use: {e}"))?;
        }
        info!(logger, "loaded snapshot"; "group" => group_id, "index" => data.meta.index, "keys" => data.kv.len());
    }
    Ok((store, recovered))
}

impl Node {
    /// The node with the cluster group on `store` (its map rebuilt in `kv`), and every
    /// other group of the cluster's table that lists this node.
    pub fn new(
        config: NodeConfig,
        engine: Arc<Engine>,
        store: LogStore,
        kv: SharedKv,
        shared: NodeShared,
        logger: Logger,
    ) -> Result<Node, String> {
        let mut node = Node {
            config,
            groups: BTreeMap::new(),
            engine,
            log_purge: LogPurge::new(),
            shared,
            stopping: None,
            logger,
        };
        let own = node.config.id;
        node.start_group(CLUSTER_GROUP, own, store, kv)?;
        let groups: Vec<u64> = node
            .shared
            .membership
            .read()
            .unwrap()
            .groups
            .keys()
            .copied()
            .collect();
        for group in groups {
            node.reconcile(group)?;
        }
        node.share_watch_history();
        Ok(node)
    }

    /// Starts group `id`'s raft, as the replica with raft id `replica`.
    fn start_group(
        &mut self,
        id: u64,
        replica: u64,
        store: LogStore,
        kv: SharedKv,
    ) -> Result<(), String> {
        let logger = self.logger.new(o!("component" => "raft", "group" => id));
        let shared = GroupShared {
            membership: self.shared.membership.clone(),
            transport: self.shared.transport.clone(),
            inbox: self.shared.router.clone(),
            metrics: self.shared.metrics.clone(),
        };
        let mut group = Group::new(id, replica, &self.config, store, kv.clone(), shared, logger)?;
        group.report_configuration_to(self.shared.router.register(id, kv));
        self.groups.insert(id, group);
        Ok(())
    }

    /// Splits `--watch-history` evenly among the hosted groups that hold keys (at least
    /// one change each), so that the changes kept in memory do not grow with the number
    /// of groups: with keys hashed over the groups, each group's share spans about as
    /// many seconds of writes as one group's whole history would. (Each of 64 groups
    /// keeping the whole budget took 217 MiB per process under bench/put-shards.sh.)
    /// Called whenever the groups hosted here, or which of them hold keys, may have
    /// changed: at start-up, and after a round's placements.
    fn share_watch_history(&self) {
        let holding: Vec<&Group> = self
            .groups
            .values()
            .filter(|g| !g.holds_no_keys())
            .collect();
        let share = match self.config.watch_history {
            0 => 0,
            budget => (budget / holding.len().max(1)).max(1),
        };
        for group in holding {
            group.keep_watch_history(share);
        }
    }

    /// Starts or drops this node's replica of `group` to match the cluster's table of
    /// groups (see `group/placement.rs`). A replica is dropped only once the table names
    /// its raft id among the removed ones: while the cluster group replays its log after
    /// a restart the table may be older than the replica (placed again since), and such a
    /// replica is kept.
    fn reconcile(&mut self, group: u64) -> Result<(), String> {
        let placement = self
            .shared
            .membership
            .read()
            .unwrap()
            .groups
            .get(&group)
            .cloned();
        let Some(placement) = placement else {
            return Ok(());
        };
        let placed_here = placement.members.contains(&self.config.id);
        let running = self.groups.get(&group).map(Group::replica_id);
        if let Some(replica) = running.filter(|r| placement.removed.contains(r)) {
            self.drop_replica(group, replica)?;
            if placed_here {
                return self.start_replica(group, &placement);
            }
        } else if placed_here && running.is_none() {
            return self.start_replica(group, &placement);
        }
        Ok(())
    }

    /// Starts this node's replica of `group`: from its log and snapshot if it has them;
    /// else, on a node the group was created on, from the first log every such node
    /// writes alike; else empty, to be sent the log by the group's leader. A replica
    /// this node dropped is never started again: a new one has a new raft id
    /// (`replica_id.rs`), which is recorded before it starts.
    fn start_replica(&mut self, group: u64, placement: &Placement) -> Result<(), String> {
        let logger = self.logger.new(o!("group" => group));
        let own = self.config.id;
        let (mut store, recovered) =
            open_group(&self.engine, &self.config.data_dir, group, &logger)?;
        let destroyed = storage::destroyed_incarnation(&self.engine, group);
        let recorded = storage::recorded_replica_id(&self.engine, group);
        let replica = match recorded {
            Some(id) if destroyed.is_none_or(|d| incarnation_of(id) > d) => id,
            // A log without a recorded id: made before incarnations were recorded (raft
            // id = node id), or by a release whose snapshot install forgot the id. The
            // configuration it stores names this node's replica either way.
            _ if !store.is_empty() => store.replica_of_node(own).unwrap_or(own),
            _ => placement.replica_of(own),
        };
        if destroyed.is_some_and(|d| d >= incarnation_of(replica)) {
            warn!(logger, "not starting a replica this node dropped before"; "raft_id" => replica);
            return Ok(());
        }
        if recorded.is_none() && !store.is_empty() {
            info!(logger, "this replica's raft id was not recorded; taken from the configuration its log stores, and recorded";
                "raft_id" => replica, "incarnation" => incarnation_of(replica));
        }
        if store.is_empty() || recorded.is_none() {
            storage::record_replica_id(&self.engine, group, replica)
                .map_err(|e| format!("cannot record the raft id of a new replica: {e}"))?;
        }
        if store.is_empty() && incarnation_of(replica) == 0 && placement.initial.contains(&own) {
            let members: Vec<(u64, String)> = placement
                .initial
                .iter()
                .map(|&id| (id, String::new()))
                .collect();
            bootstrap(&mut store, &members, members.len(), Vec::new())?;
            info!(logger, "started a replica of a new group"; "members" => ?placement.initial);
        } else if store.is_empty() {
            info!(logger, "started an empty replica; the group's leader sends it the log";
                "raft_id" => replica, "incarnation" => incarnation_of(replica));
        }
        let kv = SharedKv::default();
        if let Some(data) = recovered {
            kv.write().unwrap().replace(data.kv);
        }
        self.start_group(group, replica, store, kv)
    }

    /// Stops this node's replica of `group` (raft id `replica`) and deletes its log and
    /// snapshots, leaving a tombstone. The process goes on serving its other groups.
    fn drop_replica(&mut self, group: u64, replica: u64) -> Result<(), String> {
        // The log in store is the replica's own: deleting another replica's would turn
        // a voter into an empty node (this happened once, to a replica that had
        // forgotten its raft id). Refuse, and stop, rather than delete it.
        if let Some(stored) = storage::recorded_replica_id(&self.engine, group) {
            if stored != replica {
                return Err(format!(
                    "group {group}: asked to drop replica {replica}, but the log stored for \
                     the group is replica {stored}'s; refusing to delete it"
                ));
            }
        }
        self.groups.remove(&group);
        self.shared.router.unregister(group);
        storage::destroy_group(&self.engine, group, incarnation_of(replica))
            .map_err(|e| format!("cannot delete the log of group {group}: {e}"))?;
        self.log_purge.on_compacted();
        let dir = snapshot::dir_of(&self.config.data_dir, group);
        if let Some(group_dir) = dir.parent().filter(|_| group != CLUSTER_GROUP) {
            if let Err(e) = std::fs::remove_dir_all(group_dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(self.logger, "could not delete a dropped group's snapshots"; "group" => group, "dir" => %group_dir.display(), "error" => %e);
                }
            }
        }
        info!(self.logger, "dropped this node's replica of a group; its data is deleted"; "group" => group, "raft_id" => replica);
        Ok(())
    }

    /// Runs the loop until shutdown, removal or a storage failure.
    ///
    /// This is async only to wait: the loop runs on its own single-threaded runtime,
    /// the raft thread, beside the tasks that read the peers' message streams, so that a
    /// message from a peer reaches raft without waking another thread. Everything else
    /// (stepping, fsync, applying) blocks this thread on purpose, as a plain loop would.
    pub async fn run(mut self, mut inbox: Inbox) -> NodeExit {
        let tick = self.config.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            let first = tokio::select! {
                msg = inbox.recv() => match msg {
                    Some(msg) => Some(msg),
                    None => return NodeExit::Stopped,
                },
                _ = tokio::time::sleep_until(next_tick.into()) => None,
            };
            if let Some(msg) = first {
                if let Some(exit) = self.handle(msg) {
                    return exit;
                }
                for _ in 0..MAX_MSGS_PER_ROUND {
                    let Some(msg) = inbox.try_recv() else { break };
                    if let Some(exit) = self.handle(msg) {
                        return exit;
                    }
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.groups.values_mut().for_each(Group::tick);
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
            }
            if let Some(exit) = self.end_round() {
                return exit;
            }
            // Let the peer streams read what arrived during this round: under load the
            // inbox is never empty, and the loop would otherwise not yield for many rounds.
            tokio::task::yield_now().await;
        }
    }

    fn handle(&mut self, msg: NodeMsg) -> Option<NodeExit> {
        match msg {
            NodeMsg::Group(id, msg) => match self.groups.get_mut(&id) {
                Some(group) => group.handle(msg),
                None => not_hosted(id, msg),
            },
            NodeMsg::Unreachable(peer) => {
                for group in self.groups.values_mut() {
                    group.report_unreachable(peer);
                }
            }
            NodeMsg::RemovedByPeer(peer) => {
                info!(self.logger, "a peer reports this node removed from the cluster"; "peer" => peer);
                return Some(NodeExit::Removed { index: 0 });
            }
            NodeMsg::CompactLogs(groups) => self.log_purge.compaction_wanted(groups),
            NodeMsg::Shutdown => return self.begin_shutdown(),
        }
        None
    }

    /// Every group proposes, reads and handles its Ready; then the loop carries out
    /// what the groups asked of it. Returns why the node must stop, if it must.
    ///
    /// Group commit: every group's new entries and hard state of the round go into one
    /// write batch, written with one fsync (if any group needs one) before any group
    /// sends a message that promises durability; the commit indexes that follow go into
    /// a second batch, written unsynced.
    fn end_round(&mut self) -> Option<NodeExit> {
        let mut batch = LogBatch::default();
        let mut staged = Vec::new();
        let mut must_sync = false;
        for group in self.groups.values_mut() {
            group.propose_round();
            match group.stage_ready(&mut batch) {
                Ok(Some(ready)) => {
                    must_sync |= ready.must_sync;
                    staged.push((group.id(), ready));
                }
                Ok(None) => {}
                Err(e) => {
                    let id = group.id();
                    return Some(self.storage_failed(id, e));
                }
            }
        }
        // The leaders' messages may go out before the write: followers persist at the same
        // time as the leader.
        self.send_outboxes();
        if !batch.is_empty() {
            let started = Instant::now();
            if let Err(e) = self.engine.write(&mut batch, must_sync) {
                let e = format!("could not persist raft entries: {e}");
                return Some(self.storage_failed(0, e));
            }
            if must_sync {
                self.shared.metrics.log_fsync.observe(started.elapsed());
            }
        }
        let mut commits = LogBatch::default();
        for (id, ready) in staged {
            let group = self.groups.get_mut(&id).expect("staged this round");
            if let Err(e) = group.finish_ready(ready, &mut commits) {
                return Some(self.storage_failed(id, e));
            }
        }
        self.send_outboxes();
        if !commits.is_empty() {
            if let Err(e) = self.engine.write(&mut commits, false) {
                let e = format!("could not record commit indexes: {e}");
                return Some(self.storage_failed(0, e));
            }
        }
        let mut events = Vec::new();
        for group in self.groups.values_mut() {
            events.extend(group.take_events().into_iter().map(|e| (group.id(), e)));
        }
        let mut share_history_again = false;
        for (group_id, event) in events {
            share_history_again |= matches!(
                event,
                GroupEvent::Placed { .. } | GroupEvent::Removed { .. } | GroupEvent::ShardsSet
            );
            let done = match event {
                GroupEvent::Placed { group } => self.reconcile(group),
                GroupEvent::ShardsSet => Ok(()),
                GroupEvent::LogCompacted => {
                    self.log_purge.on_compacted();
                    Ok(())
                }
                GroupEvent::Removed { index } if group_id == CLUSTER_GROUP => {
                    return Some(NodeExit::Removed { index });
                }
                GroupEvent::Removed { index } => {
                    info!(self.logger, "this node was removed from a group"; "group" => group_id, "index" => index);
                    match self.groups.get(&group_id).map(Group::replica_id) {
                        Some(replica) => self.drop_replica(group_id, replica),
                        None => Ok(()),
                    }
                }
            };
            if let Err(e) = done {
                error!(self.logger, "could not start or drop a replica; stopping"; "error" => &e);
                return Some(NodeExit::Failed(e));
            }
        }
        if share_history_again {
            self.share_watch_history();
        }
        let in_use = self.engine.get_used_size() as u64;
        let gauge = &self.shared.metrics.raft_log_in_use_bytes;
        gauge.store(in_use, Ordering::Relaxed);
        self.log_purge.tell_groups(&mut self.groups);
        self.log_purge
            .maybe_start(&self.engine, &self.shared.router, &self.logger);
        if let Some((deadline, handing_off)) = &self.stopping {
            let leading = handing_off
                .iter()
                .any(|id| self.groups.get(id).is_some_and(Group::is_leader));
            if !leading || Instant::now() > *deadline {
                info!(self.logger, "leadership handed off; stopping");
                return Some(NodeExit::Stopped);
            }
        }
        None
    }

    /// Sends every group's queued messages: one chunk per peer process.
    fn send_outboxes(&mut self) {
        let messages: Vec<_> = self
            .groups
            .values_mut()
            .flat_map(Group::take_outbox)
            .collect();
        if !messages.is_empty() {
            self.shared.transport.send(messages);
        }
    }

    /// Logs a failure to persist or apply (in `group`, 0: the round's shared write) once;
    /// the node stops, since continuing could lose data or diverge.
    fn storage_failed(&self, group: u64, error: String) -> NodeExit {
        error!(self.logger, "cannot persist or apply; stopping to protect the data"; "group" => group, "error" => &error);
        NodeExit::Failed(error)
    }

    /// Every group this node leads first hands leadership to its most up-to-date
    /// follower, so that stopping it costs no group an election timeout; a node that
    /// leads nothing stops at once.
    fn begin_shutdown(&mut self) -> Option<NodeExit> {
        if self.stopping.is_some() {
            return Some(NodeExit::Stopped);
        }
        let handing_off: BTreeSet<u64> = self
            .groups
            .values_mut()
            .filter_map(|g| g.hand_off_leadership().then_some(g.id()))
            .collect();
        if handing_off.is_empty() {
            return Some(NodeExit::Stopped);
        }
        let election_timeout = self.config.tick * self.config.election_ticks as u32;
        self.stopping = Some((Instant::now() + election_timeout * 2, handing_off));
        None
    }
}

/// Answers a client's request for a group this node does not host; a peer's message for
/// one is dropped (raft sends again, and the replica may not be created yet).
fn not_hosted(group: u64, msg: GroupMsg) {
    match msg {
        GroupMsg::Propose(_, reply) | GroupMsg::ChangeMembers(_, reply) => {
            let _ = reply.send(Err(ProposeError::NotHosted(group)));
        }
        GroupMsg::ReadIndex(reply) => {
            let _ = reply.send(Err(ProposeError::NotHosted(group)));
        }
        GroupMsg::Step(_)
        | GroupMsg::SnapshotReceived(..)
        | GroupMsg::SnapshotSent(..)
        | GroupMsg::SnapshotWritten(_)
        | GroupMsg::Status(_)
        | GroupMsg::TransferLeader(_) => {}
    }
}
