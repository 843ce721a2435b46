//! The raft node: the one thread that owns the raft-rs `RawNode` and drives it.
//!
//! Everything that touches raft state arrives as a [`NodeMsg`] on one channel: client
//! proposals, membership changes, messages from peers. The loop steps them in, ticks the
//! clock, and handles each `Ready` in the order raft-rs requires:
//!
//! 1. send the leader's messages at once (they may go out before the local write);
//! 2. apply the committed entries to the key-value map and answer their waiting clients;
//! 3. persist new entries and the hard state in one fsynced batch;
//! 4. only then send the messages that promise durability (votes, append responses);
//! 5. `advance`, and do the same for the light ready that follows.
//!
//! A client is answered only after its entry is committed and applied here; a request
//! whose fate is unknown is never answered as a success. This thread must never block on
//! the network, and must never apply an entry that is not committed.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message};
use raft::{RawNode, SnapshotStatus, StateRole, INVALID_ID};
use slog::{error, info, warn, Logger};
use tokio::sync::oneshot;

use crate::command::{Command, MemberContext, Proposal, ProposalId};
use crate::kv::SharedKv;
use crate::membership::SharedMembership;
use crate::read_index::{ReadQueue, ReadReply};
use crate::snapshot::{self, SnapshotData, SnapshotMeta};
use crate::storage::LogStore;
use crate::transport::Transport;

/// The raft group this process serves. Multi-raft will route by it; today there is one.
pub const GROUP_ID: u64 = 1;
/// Most messages taken from the channel before the node looks at its Ready again.
const MAX_MSGS_PER_ROUND: usize = 4096;
/// Ticks after which an unanswered ReadIndex request is sent again.
const READ_RETRY_TICKS: u64 = 3;

/// Why a proposal was not applied. Every variant but `Conflict` means the outcome is
/// unknown or the cluster cannot take writes now: the client must not assume success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// No leader is known (an election is under way, or this node is cut off).
    NoLeader,
    /// The request contradicts the current membership; nothing was proposed.
    Conflict(String),
    /// Raft refused the proposal (for instance during a leadership transfer).
    Dropped(String),
    /// The entry was not applied within the deadline; it may still commit later.
    Timeout,
    /// The node is shutting down.
    Stopped,
}

/// A change of membership asked for by a client.
#[derive(Debug, Clone)]
pub enum MemberChange {
    Add { id: u64, peer_url: String },
    Remove { id: u64 },
}

type Reply = oneshot::Sender<Result<u64, ProposeError>>;

/// What this node knows about itself and the cluster (`GET /status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub term: u64,
    pub role: String,
    /// 0 when no leader is known.
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    /// Index of the newest durable snapshot (0: none).
    pub last_snapshot: u64,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    pub id: u64,
    pub peer_url: String,
}

/// Everything the node thread is asked to do.
pub enum NodeMsg {
    Propose(Command, Reply),
    ChangeMembers(MemberChange, Reply),
    ReadIndex(ReadReply),
    Step(Box<Message>),
    Unreachable(u64),
    RemovedByPeer(u64),
    /// The transport finished sending a snapshot to a peer (true: delivered).
    SnapshotSent(u64, bool),
    /// The background snapshot writer finished.
    SnapshotWritten(Result<WrittenSnapshot, String>),
    Status(oneshot::Sender<NodeStatus>),
    Shutdown,
}

/// A cheap, clonable way for other tasks to talk to the node thread.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<NodeMsg>,
}

impl NodeHandle {
    pub fn new() -> (NodeHandle, mpsc::Receiver<NodeMsg>) {
        let (tx, rx) = mpsc::channel();
        (NodeHandle { tx }, rx)
    }

    /// Proposes `command` and waits until it is applied on this node; returns its index.
    pub async fn propose(&self, command: Command, timeout: Duration) -> Result<u64, ProposeError> {
        self.ask(|reply| NodeMsg::Propose(command, reply), timeout)
            .await
    }

    /// Proposes a membership change and waits until it is applied on this node.
    pub async fn change_members(
        &self,
        change: MemberChange,
        timeout: Duration,
    ) -> Result<u64, ProposeError> {
        self.ask(|reply| NodeMsg::ChangeMembers(change, reply), timeout)
            .await
    }

    /// Waits until a linearizable read of the local map is allowed: this node has
    /// applied everything committed when the read arrived.
    pub async fn read_index(&self, timeout: Duration) -> Result<(), ProposeError> {
        self.ask(NodeMsg::ReadIndex, timeout).await
    }

    async fn ask<T>(
        &self,
        msg: impl FnOnce(oneshot::Sender<Result<T, ProposeError>>) -> NodeMsg,
        timeout: Duration,
    ) -> Result<T, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(msg(reply))
            .map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// A consistent picture of the node's raft state.
    pub async fn status(&self) -> Result<NodeStatus, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(NodeMsg::Status(reply))
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)
    }

    /// Hands a message from a peer to raft.
    pub fn step(&self, msg: Message) {
        let _ = self.tx.send(NodeMsg::Step(Box::new(msg)));
    }

    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.tx.send(NodeMsg::Unreachable(peer));
    }

    pub fn report_snapshot(&self, peer: u64, delivered: bool) {
        let _ = self.tx.send(NodeMsg::SnapshotSent(peer, delivered));
    }

    /// A peer answered that this node is no longer a member.
    pub fn removed_by_peer(&self, peer: u64) {
        let _ = self.tx.send(NodeMsg::RemovedByPeer(peer));
    }

    pub fn shutdown(&self) {
        let _ = self.tx.send(NodeMsg::Shutdown);
    }
}

/// How the node loop ended.
#[derive(Debug)]
pub enum NodeExit {
    /// Asked to stop.
    Stopped,
    /// This node was removed from the cluster; `index` is the removal entry (0 if a peer
    /// reported it).
    Removed { index: u64 },
    /// Storage failed; continuing could lose data.
    Failed(String),
}

/// The first log of a new cluster, the same on every initial member (as etcd does it):
/// one AddNode entry per member, carrying its peer URL, committed at term 1. A node that
/// joins later receives these entries from the leader and so learns the whole membership.
pub fn bootstrap(store: &mut LogStore, cluster: &[String]) -> Result<(), String> {
    let mut entries = Vec::with_capacity(cluster.len());
    let mut conf_state = ConfState::default();
    for (i, url) in cluster.iter().enumerate() {
        let id = i as u64 + 1;
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        cc.context = MemberContext {
            id: ProposalId::NONE,
            peer_url: url.clone(),
        }
        .encode()
        .into();
        let mut entry = Entry::default();
        entry.set_entry_type(EntryType::EntryConfChange);
        entry.term = 1;
        entry.index = id;
        entry.data = cc.write_to_bytes().map_err(|e| e.to_string())?.into();
        entries.push(entry);
        conf_state.voters.push(id);
    }
    let hard_state = HardState {
        term: 1,
        commit: entries.len() as u64,
        ..Default::default()
    };
    store
        .bootstrap(&entries, hard_state, conf_state)
        .map_err(|e| format!("could not write the initial log: {e}"))
}

/// Settings of the raft node.
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Where snapshot files live.
    pub snap_dir: PathBuf,
    /// Applied entries between two snapshots.
    pub snapshot_count: u64,
    /// Entries kept in the log behind a snapshot, for followers that lag a little.
    pub catchup_entries: u64,
}

/// A snapshot the background writer made durable.
pub struct WrittenSnapshot {
    meta: SnapshotMeta,
    bytes: u64,
    write_time: Duration,
}

pub struct Node {
    raw: RawNode<LogStore>,
    kv: SharedKv,
    membership: SharedMembership,
    transport: Arc<Transport>,
    /// Clients waiting for their entry to be applied, by proposal id.
    waiters: HashMap<ProposalId, Reply>,
    reads: ReadQueue,
    /// Index of the last entry applied to the map.
    applied: u64,
    ticks: u64,
    incarnation: u64,
    next_seq: u64,
    tick: Duration,
    /// Set when this node applied its own removal.
    removed_at: Option<u64>,
    /// Set while a leader hands off leadership before stopping: the deadline.
    stopping: Option<Instant>,
    election_timeout: Duration,
    leader: u64,
    snap_dir: PathBuf,
    snapshot_count: u64,
    catchup_entries: u64,
    /// Index of the newest durable snapshot.
    last_snapshot: u64,
    snapshot_in_progress: bool,
    /// Term of the entry at `applied`.
    applied_term: u64,
    /// The node's own inbox, for the snapshot writer's answer.
    inbox: NodeHandle,
    logger: Logger,
}

impl Node {
    pub fn new(
        config: &NodeConfig,
        store: LogStore,
        kv: SharedKv,
        membership: SharedMembership,
        transport: Arc<Transport>,
        inbox: NodeHandle,
        logger: Logger,
    ) -> Result<Node, String> {
        // The map was rebuilt from this snapshot (or is empty); raft hands out every
        // committed entry after it.
        let snap = store.snapshot_meta();
        let raft_config = raft::Config {
            id: config.id,
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
            .map_err(|e| format!("could not start raft: {e}"))?;
        Ok(Node {
            raw,
            kv,
            membership,
            transport,
            waiters: HashMap::new(),
            reads: ReadQueue::default(),
            applied: snap.index,
            ticks: 0,
            incarnation: random_u64(),
            next_seq: 1,
            tick: config.tick,
            removed_at: None,
            stopping: None,
            election_timeout: config.tick * config.election_ticks as u32,
            leader: INVALID_ID,
            snap_dir: config.snap_dir.clone(),
            snapshot_count: config.snapshot_count,
            catchup_entries: config.catchup_entries,
            last_snapshot: snap.index,
            snapshot_in_progress: false,
            applied_term: snap.term,
            inbox,
            logger,
        })
    }

    /// Runs the loop until shutdown, removal or a storage failure.
    pub fn run(mut self, inbox: mpsc::Receiver<NodeMsg>) -> NodeExit {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(wait) {
                Ok(msg) => {
                    if let Some(exit) = self.handle(msg) {
                        return exit;
                    }
                    for msg in inbox.try_iter().take(MAX_MSGS_PER_ROUND) {
                        if let Some(exit) = self.handle(msg) {
                            return exit;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return NodeExit::Stopped,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                self.ticks += 1;
                self.waiters.retain(|_, reply| !reply.is_closed());
                self.reads.retry_stale(self.ticks, READ_RETRY_TICKS);
                next_tick += self.tick;
                if next_tick < now {
                    next_tick = now + self.tick;
                }
            }
            self.start_read_batch();
            if let Err(e) = self.on_ready() {
                error!(self.logger, "storage failed; stopping to protect the data"; "error" => &e);
                return NodeExit::Failed(e);
            }
            if let Some(index) = self.removed_at {
                return NodeExit::Removed { index };
            }
            if let Some(deadline) = self.stopping {
                if self.raw.raft.state != StateRole::Leader || Instant::now() > deadline {
                    info!(self.logger, "leadership handed off; stopping";
                        "leader" => self.raw.raft.leader_id, "term" => self.raw.raft.term);
                    return NodeExit::Stopped;
                }
            }
        }
    }

    fn handle(&mut self, msg: NodeMsg) -> Option<NodeExit> {
        match msg {
            NodeMsg::Propose(command, reply) => self.propose(command, reply),
            NodeMsg::ChangeMembers(change, reply) => self.propose_member_change(change, reply),
            NodeMsg::ReadIndex(reply) => self.reads.push(reply),
            NodeMsg::Step(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    warn!(self.logger, "raft rejected a peer message"; "error" => %e);
                }
            }
            NodeMsg::Unreachable(peer) => self.raw.report_unreachable(peer),
            NodeMsg::RemovedByPeer(peer) => {
                info!(self.logger, "a peer reports this node removed from the cluster"; "peer" => peer);
                return Some(NodeExit::Removed { index: 0 });
            }
            NodeMsg::SnapshotSent(peer, delivered) => {
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(peer, status);
            }
            NodeMsg::SnapshotWritten(result) => {
                if let Err(e) = self.on_snapshot_written(result) {
                    error!(self.logger, "could not record a snapshot"; "error" => &e);
                }
            }
            NodeMsg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            NodeMsg::Shutdown => return self.begin_shutdown(),
        }
        None
    }

    /// A leader first hands leadership to its most up-to-date follower, so that stopping
    /// it costs the cluster no election timeout; anyone else stops at once.
    fn begin_shutdown(&mut self) -> Option<NodeExit> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || self.stopping.is_some() {
            return Some(NodeExit::Stopped);
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
            return Some(NodeExit::Stopped);
        };
        info!(self.logger, "transferring leadership before stopping";
            "to" => transferee, "term" => raft.term);
        self.raw.transfer_leader(transferee);
        self.stopping = Some(Instant::now() + self.election_timeout * 2);
        None
    }

    fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        let urls = &self.membership.read().unwrap().peer_urls;
        NodeStatus {
            id: raft.id,
            term: raft.term,
            role: format!("{:?}", raft.state),
            leader: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            last_snapshot: self.last_snapshot,
            members: conf
                .voters
                .iter()
                .chain(&conf.learners)
                .map(|&id| Member {
                    id,
                    peer_url: urls.get(&id).cloned().unwrap_or_default(),
                })
                .collect(),
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

    fn next_proposal_id(&mut self) -> ProposalId {
        let id = ProposalId {
            incarnation: self.incarnation,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        id
    }

    fn propose(&mut self, command: Command, reply: Reply) {
        if self.raw.raft.leader_id == INVALID_ID {
            let _ = reply.send(Err(ProposeError::NoLeader));
            return;
        }
        let id = self.next_proposal_id();
        let data = Proposal { id, command }.encode();
        match self.raw.propose(vec![], data) {
            Ok(()) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Dropped(e.to_string())));
            }
        }
    }

    fn propose_member_change(&mut self, change: MemberChange, reply: Reply) {
        if let Err(why) = self.check_member_change(&change) {
            let _ = reply.send(Err(ProposeError::Conflict(why)));
            return;
        }
        if self.raw.raft.leader_id == INVALID_ID {
            let _ = reply.send(Err(ProposeError::NoLeader));
            return;
        }
        let id = self.next_proposal_id();
        let mut cc = ConfChange::default();
        let peer_url = match change {
            MemberChange::Add { id, peer_url } => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
                peer_url
            }
            MemberChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
                String::new()
            }
        };
        cc.context = MemberContext { id, peer_url }.encode().into();
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Dropped(e.to_string())));
            }
        }
    }

    /// Refuses a change that cannot succeed, instead of letting raft-rs silently turn it
    /// into an empty entry.
    fn check_member_change(&self, change: &MemberChange) -> Result<(), String> {
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let members: BTreeSet<u64> = conf.voters.iter().chain(&conf.learners).copied().collect();
        let membership = self.membership.read().unwrap();
        match change {
            MemberChange::Add { id, peer_url } => {
                if members.contains(id) {
                    return Err(format!("node {id} is already a member"));
                }
                if membership.removed.contains(id) {
                    return Err(format!(
                        "node id {id} was removed from this cluster and cannot be reused; add the node under a new id"
                    ));
                }
                if let Some((other, _)) = membership
                    .peer_urls
                    .iter()
                    .find(|(m, url)| members.contains(m) && *url == peer_url)
                {
                    return Err(format!(
                        "peer URL {peer_url} is already used by node {other}"
                    ));
                }
            }
            MemberChange::Remove { id } => {
                if !members.contains(id) {
                    return Err(format!("node {id} is not a member"));
                }
                if members.len() == 1 {
                    return Err("cannot remove the last member of the cluster".into());
                }
            }
        }
        if self.member_change_pending() {
            return Err(
                "another membership change is still in progress; retry once it is applied".into(),
            );
        }
        Ok(())
    }

    /// True while a conf change may still be unapplied. On the leader this is exactly the
    /// condition under which raft-rs would drop a new one; a follower looks for
    /// conf-change entries in the part of its log it has not applied yet.
    fn member_change_pending(&self) -> bool {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader {
            return raft.has_pending_conf();
        }
        let applied = raft.raft_log.applied;
        let last = raft.raft_log.last_index();
        if last <= applied {
            return false;
        }
        match self.raw.store().entries_between(applied + 1, last + 1) {
            Ok(entries) => entries
                .iter()
                .any(|e| e.get_entry_type() != EntryType::EntryNormal),
            // Unstable entries not yet in storage: be conservative.
            Err(_) => true,
        }
    }

    /// Handles one Ready and the LightReady that follows it, in raft-rs's required order.
    fn on_ready(&mut self) -> Result<(), String> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        if !ready.messages().is_empty() {
            self.transport.send(GROUP_ID, ready.take_messages());
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
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.raw
                .mut_store()
                .persist(ready.entries(), ready.hs())
                .map_err(|e| format!("could not persist raft entries: {e}"))?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport
                .send(GROUP_ID, ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .set_commit(commit)
                .map_err(|e| format!("could not record the commit index: {e}"))?;
        }
        if !light.messages().is_empty() {
            self.transport.send(GROUP_ID, light.take_messages());
        }
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_snapshot();
        Ok(())
    }

    /// Snapshots when enough entries were applied since the last one, or when raft needs
    /// a newer one to send to a follower.
    fn maybe_snapshot(&mut self) {
        let wanted = self.raw.store().take_snapshot_request();
        let due = self.applied >= self.last_snapshot + self.snapshot_count;
        if (wanted || due) && !self.snapshot_in_progress && self.applied > self.last_snapshot {
            self.start_snapshot();
        }
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
            membership: self.membership.read().unwrap().clone(),
            kv: self.kv.read().unwrap().freeze(),
        };
        let pause = started.elapsed();
        info!(self.logger, "snapshot started";
            "index" => data.meta.index, "keys" => data.kv.len(),
            "loop_pause_ms" => format!("{:.2}", pause.as_secs_f64() * 1e3));
        self.snapshot_in_progress = true;
        let (dir, inbox) = (self.snap_dir.clone(), self.inbox.clone());
        let spawned = std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                let started = Instant::now();
                let result = snapshot::write(&dir, &data)
                    .and_then(|(_, bytes)| {
                        snapshot::prune(&dir)?;
                        Ok(bytes)
                    })
                    .map(|bytes| WrittenSnapshot {
                        meta: data.meta,
                        bytes,
                        write_time: started.elapsed(),
                    })
                    .map_err(|e| format!("writing the snapshot failed: {e}"));
                let _ = inbox.tx.send(NodeMsg::SnapshotWritten(result));
            });
        if let Err(e) = spawned {
            error!(self.logger, "could not start the snapshot writer"; "error" => %e);
            self.snapshot_in_progress = false;
        }
    }

    /// A snapshot is durable: raft may send it, and the log before it can go, except the
    /// last `catchup_entries` for followers that lag a little.
    fn on_snapshot_written(
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
        let first = index.saturating_sub(self.catchup_entries) + 1;
        store.compact(first).map_err(|e| e.to_string())?;
        let (purge, logger) = (store.purger(), self.logger.clone());
        let _ = std::thread::Builder::new()
            .name("log-purge".into())
            .spawn(move || {
                if let Err(e) = purge() {
                    warn!(logger, "could not delete obsolete raft log files"; "error" => %e);
                }
            });
        self.last_snapshot = index;
        info!(self.logger, "snapshot written";
            "index" => index, "term" => written.meta.term, "bytes" => written.bytes,
            "write_ms" => written.write_time.as_millis(), "log_starts_at" => first);
        Ok(())
    }

    /// Replaces the state machine with a snapshot the leader sent (the transport already
    /// stored and verified its file), then the log with the snapshot's point.
    fn install_snapshot(&mut self, meta: SnapshotMeta) -> Result<(), String> {
        let path = snapshot::path_of(&self.snap_dir, meta.index);
        let data = snapshot::read(&path)
            .map_err(|e| format!("cannot load received snapshot {}: {e}", path.display()))?;
        let own_id = self.raw.raft.id;
        for (&id, url) in &data.membership.peer_urls {
            if id != own_id {
                self.transport.set_peer(id, url);
            }
        }
        for id in &data.membership.removed {
            self.transport.remove_peer(*id);
        }
        if data.membership.removed.contains(&own_id) {
            self.removed_at = Some(meta.index);
        }
        let keys = data.kv.len();
        self.kv.write().unwrap().replace(data.kv);
        *self.membership.write().unwrap() = data.membership;
        self.raw
            .mut_store()
            .install_snapshot(&meta)
            .map_err(|e| format!("could not install the snapshot in the log: {e}"))?;
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.last_snapshot = meta.index;
        self.reads.on_applied(meta.index);
        if let Err(e) = snapshot::prune(&self.snap_dir) {
            warn!(self.logger, "could not prune old snapshots"; "error" => %e);
        }
        info!(self.logger, "installed a snapshot from the leader";
            "index" => meta.index, "term" => meta.term, "keys" => keys);
        Ok(())
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        if leader != self.leader {
            info!(self.logger, "leader changed";
                "leader" => leader, "previous" => self.leader,
                "role" => ?role, "term" => self.raw.raft.term);
            self.leader = leader;
        }
    }

    /// Applies committed entries in log order.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        let Some((last, last_term)) = entries.last().map(|e| (e.index, e.term)) else {
            return Ok(());
        };
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChange => self.apply_conf_change(&entry)?,
                EntryType::EntryConfChangeV2 => {
                    error!(self.logger, "skipping a ConfChangeV2 entry, which raftkvd never proposes"; "index" => entry.index);
                }
            }
        }
        self.applied = last;
        self.applied_term = last_term;
        self.reads.on_applied(last);
        Ok(())
    }

    fn apply_normal(&mut self, entry: &Entry) {
        if entry.data.is_empty() {
            return; // a new leader's empty entry
        }
        let proposal = match Proposal::decode(&entry.data) {
            Ok(p) => p,
            Err(e) => {
                error!(self.logger, "skipping an undecodable entry"; "index" => entry.index, "error" => %e);
                return;
            }
        };
        self.kv.write().unwrap().apply(proposal.command);
        if let Some(reply) = self.waiters.remove(&proposal.id) {
            let _ = reply.send(Ok(entry.index));
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), String> {
        let (cc, context) = match ConfChange::parse_from_bytes(&entry.data)
            .map_err(|e| e.to_string())
            .and_then(|cc| {
                let ctx = MemberContext::decode(&cc.context).map_err(|e| e.to_string())?;
                Ok((cc, ctx))
            }) {
            Ok(parsed) => parsed,
            Err(e) => {
                error!(self.logger, "skipping an undecodable conf change"; "index" => entry.index, "error" => e);
                return Ok(());
            }
        };
        // Entries up to the stored conf index were applied to raft before a restart; raft
        // already starts from their result.
        if entry.index > self.raw.store().conf_index() {
            match self.raw.apply_conf_change(&cc) {
                Ok(conf_state) => self
                    .raw
                    .mut_store()
                    .set_conf_state(conf_state, entry.index)
                    .map_err(|e| format!("could not persist the conf state: {e}"))?,
                Err(e) => {
                    warn!(self.logger, "raft refused a conf change"; "index" => entry.index, "error" => %e);
                    if let Some(reply) = self.waiters.remove(&context.id) {
                        let _ = reply.send(Err(ProposeError::Conflict(e.to_string())));
                    }
                    return Ok(());
                }
            }
        }
        let node = cc.node_id;
        let own_id = self.raw.raft.id;
        {
            let mut membership = self.membership.write().unwrap();
            match cc.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    membership.peer_urls.insert(node, context.peer_url.clone());
                    if node != own_id {
                        self.transport.set_peer(node, &context.peer_url);
                    }
                }
                ConfChangeType::RemoveNode => {
                    membership.peer_urls.remove(&node);
                    membership.removed.insert(node);
                    self.transport.remove_peer(node);
                    if node == own_id {
                        self.removed_at = Some(entry.index);
                    }
                }
            }
        }
        info!(self.logger, "membership changed";
            "change" => ?cc.get_change_type(), "node" => node, "index" => entry.index,
            "term" => entry.term, "voters" => ?self.raw.raft.prs().conf().voters().ids().iter().collect::<Vec<_>>());
        if let Some(reply) = self.waiters.remove(&context.id) {
            let _ = reply.send(Ok(entry.index));
        }
        Ok(())
    }
}

/// A random number from the standard library's per-process hasher keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}
