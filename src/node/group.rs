//! One raft group on this node: its `RawNode`, its key-value map, its waiting clients
//! and reads, and its snapshots. The node loop (`mod.rs`) hands it messages, ticks it,
//! and each round has it propose the round's writes (as one entry; a write's life until
//! it applies is `group/proposals.rs`) and handle its `Ready` in the order raft-rs
//! requires:
//!
//! 1. send the leader's messages at once (they may go out before the local write);
//!    install the snapshot the leader sent, if the Ready carries one (`snapshots.rs`);
//! 2. apply the committed entries to the key-value map and answer their waiting clients;
//! 3. stage new entries and the hard state into the round's batch, which the loop writes
//!    once for every group, fsynced (`storage.rs` says when) (`stage_ready`);
//! 4. only then send the messages that promise durability (votes, append responses);
//! 5. `advance`, and do the same for the light ready that follows (`finish_ready`).
//!
//! A leader also proposes the revoke of each lease that expired (`group/lease_expiry.rs`).
//!
//! A client is answered only after its entry is committed and applied here; a request
//! whose fate is unknown is never answered as a success. A group never touches another
//! group: what concerns the whole node (a group created in the cluster group's log, this
//! node's removal) it reports to the loop as a [`GroupEvent`]. Only the cluster group
//! writes the cluster's membership and moves the transport.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use raft::eraftpb::{Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole, INVALID_ID};
use slog::{error, info, warn, Logger};

use crate::command::{decode_entry, Op, Proposal, ProposalId};
use crate::kv::{Applied, SharedKv};
use crate::membership::SharedMembership;
use crate::metrics::Metrics;
use crate::random::random_u64;
use crate::read_index::ReadQueue;
use crate::replica_id::node_of;
use crate::snapshot::{self, SnapshotMeta};
use crate::storage::LogStore;
use crate::transport::Transport;

use super::NodeConfig;
use raft::Ready;
use raft_engine::LogBatch;

mod hibernation;
mod inbound;
mod lease_expiry;
mod members;
mod placement;
mod proposals;
mod snapshots;

use crate::router::{
    GroupMsg, Member, NodeStatus, ProposeError, Reply, Router, Written, CLUSTER_GROUP,
};
pub use members::CHANGE_IN_PROGRESS;
use proposals::Waiter;

/// Ticks after which an unanswered ReadIndex request is sent again.
const READ_RETRY_TICKS: u64 = 3;

/// What a group shares with the rest of the process.
pub struct GroupShared {
    /// The cluster's members and groups (the cluster group writes, the transport and
    /// the API read).
    pub membership: SharedMembership,
    pub transport: Arc<Transport>,
    /// The node's own inbox, for answers from its helper threads.
    pub inbox: Router,
    pub metrics: Arc<Metrics>,
}

/// What a group asks of the node loop after a round.
#[derive(Debug, PartialEq, Eq)]
pub enum GroupEvent {
    /// The cluster group changed where group `group` lives (created it, or added or
    /// removed a node): this node may have to start or drop its replica.
    Placed { group: u64 },
    /// This node applied its own removal from the group, at `index`.
    Removed { index: u64 },
    /// The group's log was compacted: raft-engine may delete files now.
    LogCompacted,
    /// The cluster group applied the list of shards: its keys are the data groups' now,
    /// and so is its share of the watch history.
    ShardsSet,
}

/// A Ready whose entries and hard state are staged in the round's write batch.
pub struct StagedReady {
    ready: Ready,
    hard_state: Option<raft::eraftpb::HardState>,
    /// The batch must be synced before `finish_ready`.
    pub must_sync: bool,
}

pub struct Group {
    /// The raft group id.
    id: u64,
    raw: RawNode<LogStore>,
    kv: SharedKv,
    membership: SharedMembership,
    transport: Arc<Transport>,
    /// Clients waiting for their entry to be applied, by proposal id.
    waiters: HashMap<ProposalId, Waiter>,
    /// Client writes taken from the inbox this round, encoded, not yet proposed.
    batch: Vec<(Vec<u8>, ProposalId, Reply)>,
    /// Writes held back while no leader is known (an election) or while this leader
    /// hands its office over (raft-rs would drop them); proposed once a leader is known
    /// and no transfer is under way. A write whose client gave up is forgotten.
    parked: Vec<(Vec<u8>, ProposalId, Reply)>,
    reads: ReadQueue,
    /// Index of the last entry applied to the map.
    applied: u64,
    /// The commit index last counted in the metrics.
    committed: u64,
    ticks: u64,
    incarnation: u64,
    next_seq: u64,
    /// What the node loop must do after this round.
    events: Vec<GroupEvent>,
    /// Messages for peers, sent by the loop with every group's of the same phase.
    outbox: Vec<(u64, Message)>,
    /// Not ticking (`hibernation.rs`).
    asleep: bool,
    /// Ticks in a row this leader could have slept.
    quiet_ticks: u64,
    /// Quiet ticks before a leader sleeps.
    sleep_after_ticks: u64,
    /// The next Ready's heartbeats are the leader's last before it sleeps.
    sleep_heartbeats_pending: bool,
    /// Leases this leader proposed to revoke: the renewal each revoke names, and the tick
    /// it was proposed at (`lease_expiry.rs`).
    expiring: HashMap<u64, (u64, u64)>,
    leader: u64,
    snap_dir: PathBuf,
    snapshot_count: u64,
    catchup_entries: u64,
    /// Index of the newest durable snapshot.
    last_snapshot: u64,
    /// The map's revision in that snapshot.
    last_snapshot_revision: u64,
    /// Size of that snapshot's file.
    last_snapshot_bytes: u64,
    /// Payload bytes of the entries applied since the last snapshot began.
    applied_bytes_since_snapshot: u64,
    snapshot_in_progress: bool,
    /// The next snapshot compacts the whole log before it, keeping no entries for
    /// lagging followers: raft-engine asked for the space (`compact_log_soon`).
    compact_fully: bool,
    /// Term of the entry at `applied`.
    applied_term: u64,
    /// The node's own inbox, for the snapshot writer's answer.
    inbox: Router,
    /// When a refused peer message was last logged, and how many were refused since.
    refusals: (Option<std::time::Instant>, u64),
    /// Set while this replica knows the group's configuration (the router's
    /// `serving`: the API serves the group here only then).
    configured: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<Metrics>,
    logger: Logger,
}

impl Group {
    /// Starts group `id`'s raft on `store` as the replica with raft id `replica`
    /// (`replica_id.rs`), with `kv` rebuilt from the store's snapshot (or empty).
    pub fn new(
        id: u64,
        replica: u64,
        config: &NodeConfig,
        store: LogStore,
        kv: SharedKv,
        shared: GroupShared,
        logger: Logger,
    ) -> Result<Group, String> {
        let GroupShared {
            membership,
            transport,
            inbox,
            metrics,
        } = shared;
        // The map was rebuilt from this snapshot (or is empty); raft hands out every
        // committed entry after it.
        let snap = store.snapshot_meta();
        let snap_revision = kv.read().unwrap().revision();
        let raft_config = raft::Config {
            id: replica,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: snap.index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let raw = RawNode::new(&raft_config, store, &logger)
            .map_err(|e| format!("could not start raft for group {id}: {e}"))?;
        let snap_dir = snapshot::dir_of(&config.data_dir, id);
        Ok(Group {
            id,
            committed: raw.raft.raft_log.committed,
            raw,
            kv,
            membership,
            transport,
            waiters: HashMap::new(),
            batch: Vec::new(),
            parked: Vec::new(),
            reads: ReadQueue::default(),
            applied: snap.index,
            ticks: 0,
            incarnation: random_u64(),
            next_seq: 1,
            events: Vec::new(),
            outbox: Vec::new(),
            asleep: false,
            quiet_ticks: 0,
            sleep_after_ticks: config.election_ticks as u64,
            sleep_heartbeats_pending: false,
            expiring: HashMap::new(),
            leader: INVALID_ID,
            last_snapshot_bytes: snapshot::size_of(&snapshot::path_of(&snap_dir, snap.index)),
            snap_dir,
            snapshot_count: config.snapshot_count,
            catchup_entries: config.catchup_entries,
            last_snapshot: snap.index,
            last_snapshot_revision: snap_revision,
            applied_bytes_since_snapshot: 0,
            snapshot_in_progress: false,
            compact_fully: false,
            applied_term: snap.term,
            inbox,
            refusals: (None, 0),
            configured: Arc::default(),
            metrics,
            logger,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// This replica's raft id.
    pub fn replica_id(&self) -> u64 {
        self.raw.raft.id
    }

    /// The raft id of node `node`'s replica in this group's configuration, if it has one.
    fn replica_of_node(&self, node: u64) -> Option<u64> {
        let conf = self.raw.raft.prs().conf();
        conf.voters()
            .ids()
            .iter()
            .chain(conf.learners().iter().copied())
            .find(|&replica| node_of(replica) == node)
    }

    fn is_cluster_group(&self) -> bool {
        self.id == CLUSTER_GROUP
    }

    /// The cluster group of a sharded cluster: every key belongs to a data group.
    pub fn holds_no_keys(&self) -> bool {
        self.is_cluster_group() && !self.membership.read().unwrap().shards.is_empty()
    }

    /// Keeps up to `changes` of this group's changes for watches (the node shares
    /// `--watch-history` among its groups: `Node::share_watch_history`).
    pub fn keep_watch_history(&self, changes: usize) {
        self.kv.write().unwrap().set_history_capacity(changes);
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Queues raft messages for the loop to send (see `take_outbox`).
    fn send(&mut self, messages: Vec<Message>) {
        let id = self.id;
        self.outbox.extend(messages.into_iter().map(|m| (id, m)));
    }

    /// The messages queued since the last call, each with this group's id.
    pub fn take_outbox(&mut self) -> Vec<(u64, Message)> {
        std::mem::take(&mut self.outbox)
    }

    /// What the node loop must do after this round; empties the list.
    pub fn take_events(&mut self) -> Vec<GroupEvent> {
        std::mem::take(&mut self.events)
    }

    /// One tick of raft's clock; waiting clients that gave up are forgotten and reads
    /// left unanswered too long are asked again.
    pub fn tick(&mut self) {
        if self.asleep {
            return;
        }
        self.raw.tick();
        self.ticks += 1;
        self.waiters.retain(|_, waiter| !waiter.reply.is_closed());
        self.parked.retain(|(_, _, reply)| !reply.is_closed());
        self.reads.retry_stale(self.ticks, READ_RETRY_TICKS);
        self.keep_cluster_group_voters();
        self.expire_leases();
        self.count_quiet_tick();
    }

    /// The work of one loop round after the messages and before the Ready: propose the
    /// round's writes and ask for the round's reads.
    pub fn propose_round(&mut self) {
        self.release_parked();
        self.propose_batch();
        self.start_read_batch();
    }

    /// Node `peer` could not be reached: tells raft about its replica here, if any.
    pub fn report_unreachable(&mut self, peer: u64) {
        if let Some(replica) = self.replica_of_node(peer) {
            self.raw.report_unreachable(replica);
        }
    }

    pub fn handle(&mut self, msg: GroupMsg) {
        match msg {
            GroupMsg::Propose(op, reply) => {
                self.wake();
                self.propose(op, reply)
            }
            GroupMsg::ChangeMembers(change, reply) => {
                self.wake();
                self.propose_member_change(change, reply)
            }
            GroupMsg::ReadIndex(reply) => {
                self.wake();
                self.reads.push(reply)
            }
            GroupMsg::Step(mut msg) => {
                if let Err(why) = inbound::check(&self.raw.raft, &msg) {
                    self.refused(&msg, &why);
                    return;
                }
                if msg.get_msg_type() == MessageType::MsgPropose
                    && !self.keep_proposals_of_this_term(&mut msg)
                {
                    return;
                }
                let keeps_sleep = Group::keeps_sleep(&msg);
                let sleep_signal = Group::is_sleep_signal(&msg);
                let (from, kind) = (msg.from, msg.get_msg_type());
                if let Err(e) = self.raw.step(*msg) {
                    warn!(self.logger, "raft rejected a peer message"; "error" => %e);
                }
                if !keeps_sleep {
                    self.after_peer_message(kind, sleep_signal, from);
                }
            }
            GroupMsg::SnapshotReceived(msg, file, reply) => {
                let _ = reply.send(self.take_received_snapshot(msg, &file));
            }
            GroupMsg::SnapshotSent(peer, delivered) => {
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(peer, status);
            }
            GroupMsg::SnapshotWritten(result) => {
                if let Err(e) = self.on_snapshot_written(result) {
                    error!(self.logger, "could not record a snapshot"; "error" => &e);
                }
            }
            GroupMsg::TransferLeader(node) => {
                // On a follower raft-rs forwards the request to the leader.
                self.wake();
                let Some(to) = self.replica_of_node(node) else {
                    warn!(self.logger, "not transferring leadership to a node outside the group"; "to" => node);
                    return;
                };
                info!(self.logger, "asking for a leadership transfer"; "to" => node, "raft_id" => to, "term" => self.raw.raft.term);
                self.raw.transfer_leader(to);
            }
            GroupMsg::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// From now on, keeps `flag` set while this replica knows the group's configuration.
    pub fn report_configuration_to(&mut self, flag: Arc<std::sync::atomic::AtomicBool>) {
        self.configured = flag;
        self.note_configuration();
    }

    /// Whether this replica knows the group's configuration (a replica placed here waits
    /// for the group's snapshot with none), told to the router.
    fn note_configuration(&self) {
        let known = !self.raw.raft.prs().conf().voters().ids().is_empty();
        self.configured
            .store(known, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a peer message that failed [`inbound::check`] and logs it, at most once a
    /// second (a flood of them must not flood the log too).
    fn refused(&mut self, msg: &Message, why: &str) {
        Metrics::inc(&self.metrics.peer_messages_refused);
        let (last_logged, since) = &mut self.refusals;
        *since += 1;
        if last_logged.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        warn!(self.logger, "refused a peer message raft could not safely take";
            "from" => msg.from, "type" => ?msg.get_msg_type(), "term" => msg.term,
            "reason" => why, "refused_since_last_log" => *since);
        *last_logged = Some(std::time::Instant::now());
        *since = 0;
    }

    /// A leader hands leadership to its most up-to-date follower, so that stopping this
    /// node costs the group no election timeout. Returns whether a transfer began.
    pub fn hand_off_leadership(&mut self) -> bool {
        self.wake();
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            return false;
        }
        let own_id = raft.id;
        let voters = raft.prs().conf().voters().ids();
        let transferee = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != own_id && voters.contains(**id))
            .max_by_key(|(_, progress)| progress.matched)
            .map(|(id, _)| *id);
        let Some(transferee) = transferee else {
            return false;
        };
        info!(self.logger, "transferring leadership before stopping";
            "to" => transferee, "term" => raft.term);
        self.raw.transfer_leader(transferee);
        true
    }

    /// The group as this replica sees it, in node ids (not raft ids).
    pub fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        let urls = &self.membership.read().unwrap().peer_urls;
        let mut members: Vec<Member> = conf
            .voters
            .iter()
            .chain(&conf.learners)
            .map(|&replica| {
                let id = node_of(replica);
                Member {
                    id,
                    peer_url: urls.get(&id).cloned().unwrap_or_default(),
                }
            })
            .collect();
        members.sort_unstable_by_key(|m| m.id);
        let mut learners: Vec<u64> = conf.learners.iter().map(|&r| node_of(r)).collect();
        learners.sort_unstable();
        NodeStatus {
            id: node_of(raft.id),
            term: raft.term,
            role: format!("{:?}", raft.state),
            leader: node_of(raft.leader_id),
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            revision: self.kv.read().unwrap().revision(),
            last_snapshot: self.last_snapshot,
            members,
            learners,
            asleep: self.asleep,
        }
    }

    /// Asks raft for one read index on behalf of every read that arrived since the last
    /// batch. Without a known leader raft would drop the request; wait for one instead.
    fn start_read_batch(&mut self) {
        if self.raw.raft.leader_id == INVALID_ID {
            return;
        }
        if let Some(ctx) = self.reads.start_batch(self.ticks) {
            self.raw.read_index(ctx);
        }
    }

    /// The first half of handling a Ready, in raft-rs's required order: sends the
    /// leader's messages, installs a snapshot the leader sent, applies the committed
    /// entries, and stages the new entries and hard state into the round's `batch`. The
    /// node loop writes that batch (once for every group) and then calls
    /// [`Self::finish_ready`].
    pub fn stage_ready(&mut self, batch: &mut LogBatch) -> Result<Option<StagedReady>, String> {
        if !self.raw.has_ready() {
            return Ok(None);
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        if !ready.messages().is_empty() {
            let mut messages = ready.take_messages();
            self.mark_sleep_heartbeats(&mut messages);
            self.send(messages);
        }
        if !ready.snapshot().is_empty() {
            let meta = ready.snapshot().get_metadata();
            self.install_snapshot(SnapshotMeta {
                index: meta.index,
                term: meta.term,
                conf_state: meta.get_conf_state().clone(),
            })?;
        }
        self.apply(ready.take_committed_entries())?;
        for rs in ready.take_read_states() {
            self.reads
                .on_read_state(&rs.request_ctx, rs.index, self.applied);
        }
        let hard_state = ready.hs().cloned();
        let must_sync = self
            .raw
            .store()
            .stage(batch, ready.entries(), hard_state.as_ref())
            .map_err(|e| format!("could not stage raft entries: {e}"))?;
        Ok(Some(StagedReady {
            ready,
            hard_state,
            must_sync,
        }))
    }

    /// The second half, once the round's batch is written (and synced if any group
    /// needed it): sends the messages that promise durability (votes, append responses),
    /// advances raft, and handles the light ready that follows. Its commit index goes
    /// into `commits`, which the loop writes unsynced at the end of the round.
    pub fn finish_ready(
        &mut self,
        staged: StagedReady,
        commits: &mut LogBatch,
    ) -> Result<(), String> {
        let StagedReady {
            mut ready,
            hard_state,
            ..
        } = staged;
        self.raw
            .mut_store()
            .staged_written(ready.entries(), hard_state.as_ref());
        if !ready.persisted_messages().is_empty() {
            self.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .stage_commit(commits, commit)
                .map_err(|e| format!("could not record the commit index: {e}"))?;
        }
        if !light.messages().is_empty() {
            self.send(light.take_messages());
        }
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        let committed = self.raw.raft.raft_log.committed;
        if committed > self.committed {
            self.metrics.committed_entries.fetch_add(
                committed - self.committed,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.committed = committed;
        }
        self.maybe_snapshot();
        Ok(())
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        if leader != self.leader {
            info!(self.logger, "leader changed";
                "leader" => leader, "previous" => self.leader,
                "role" => ?role, "term" => self.raw.raft.term,
                "commit" => self.raw.raft.raft_log.committed);
            self.leader = leader;
            Metrics::inc(&self.metrics.leader_changes);
            if leader != INVALID_ID {
                self.restart_lease_clocks();
            }
        }
    }

    /// Applies committed entries in log order.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        let Some((last, last_term)) = entries.last().map(|e| (e.index, e.term)) else {
            return Ok(());
        };
        for entry in entries {
            self.applied_bytes_since_snapshot += entry.data.len() as u64;
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry)?,
                EntryType::EntryConfChange => {
                    // Takes a revision, as every entry without a command does (kv.rs).
                    let revision = self.kv.write().unwrap().skip_revision();
                    self.apply_conf_change(&entry, revision)?;
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(
                        self.unreadable(&entry, "a ConfChangeV2, which raftkvd never writes")
                    )
                }
            }
        }
        self.metrics
            .applied_entries
            .fetch_add(last - self.applied, std::sync::atomic::Ordering::Relaxed);
        self.applied = last;
        self.raw.mut_store().applied_to(last);
        if last_term > self.applied_term {
            self.repropose_lost(last_term);
        }
        self.applied_term = last_term;
        self.reads.on_applied(last);
        Ok(())
    }

    /// Why this node stops at a committed entry it cannot read. Skipping it would make
    /// this replica diverge silently from those that can (a member of a newer release
    /// wrote it, or the log is damaged); stopping leaves the entry for a build that reads
    /// it. Logged by whoever reports the node's exit.
    fn unreadable(&self, entry: &Entry, what: &str) -> String {
        format!(
            "raft group {} cannot apply the committed entry at index {} (term {}): {what}. \
             Stopping rather than let this replica diverge; a member running a newer release \
             may have written it: upgrade this node and start it again",
            self.id, entry.index, entry.term
        )
    }

    /// Applies each command of a normal entry at its own revision and answers the client
    /// waiting for it here, if any. An entry it cannot decode stops the node.
    fn apply_normal(&mut self, entry: &Entry) -> Result<(), String> {
        let readable = self.transport.formats().own();
        if let Some(&format) = entry.data.first().filter(|&&format| format > readable) {
            let why = format!("its format {format} is newer than this node reads ({readable})");
            return Err(self.unreadable(entry, &why));
        }
        let proposals = if entry.data.is_empty() {
            Vec::new() // a new leader's empty entry
        } else {
            decode_entry(&entry.data).map_err(|e| self.unreadable(entry, &e.to_string()))?
        };
        let shared_kv = self.kv.clone();
        let mut kv = shared_kv.write().unwrap();
        if proposals.is_empty() {
            kv.skip_revision();
        }
        let mut outcomes = Vec::with_capacity(proposals.len());
        for Proposal { id, op } in proposals {
            let outcome = match op {
                Op::Kv(_)
                | Op::Txn(_)
                | Op::GrantLease { .. }
                | Op::KeepLeaseAlive { .. }
                | Op::RevokeLease { .. }
                    if self.holds_no_keys() =>
                {
                    // Misrouted (the sender's table was behind): refused alike on every
                    // replica, since the table is this group's own state.
                    kv.skip_revision();
                    Err(ProposeError::Misrouted)
                }
                Op::Kv(command) => outcome_of(kv.apply(command)),
                Op::Txn(txn) => outcome_of(kv.apply_txn(txn)),
                Op::GrantLease { lease, ttl_seconds } => {
                    outcome_of(kv.grant_lease(lease, ttl_seconds, Instant::now()))
                }
                Op::KeepLeaseAlive { lease } => {
                    outcome_of(kv.keep_lease_alive(lease, Instant::now()))
                }
                Op::RevokeLease { lease, renewed_at } => {
                    outcome_of(kv.revoke_lease(lease, renewed_at))
                }
                placement => {
                    // Takes a revision, as every entry without a key does.
                    let revision = kv.skip_revision();
                    self.apply_placement(entry.index, placement)
                        .map(|()| Written::at(revision))
                }
            };
            outcomes.push((id, outcome));
        }
        drop(kv);
        // Answered once the map is unlocked: waking a client's task may cost a syscall.
        for (id, outcome) in outcomes {
            self.answer(id, outcome);
        }
        Ok(())
    }
}

/// What a client hears of a command the map applied at a revision.
fn outcome_of((revision, applied): (u64, Applied)) -> Result<Written, ProposeError> {
    match applied {
        Applied::Written { deleted } => Ok(Written {
            deleted,
            ..Written::at(revision)
        }),
        Applied::Txn(outcome) => Ok(Written {
            txn: Some(Box::new(outcome)),
            ..Written::at(revision)
        }),
        Applied::CheckFailed { key, revision } => Err(ProposeError::CheckFailed { key, revision }),
        Applied::Lease(refusal) => Err(ProposeError::Lease(refusal)),
    }
}
