//! How the rest of the process reaches the raft groups this process hosts: the messages
//! the raft thread accepts ([`NodeMsg`], each for one group by its id, or for the whole
//! node), a cheap clonable [`Router`] that sends them and awaits answers with a deadline,
//! and the answers' types.
//!
//! The API and the peer transport know groups only through this module; it imports
//! neither them nor the node, so nothing below it imports it back in a circle. Nothing
//! here touches raft state.
//!
//! The raft thread's inbox is bounded in what others can pile into it: a client request
//! finds it full (`MAX_QUEUED_REQUESTS` waiting) and is answered 503 at once, and a
//! peer's message that would take the queued peer bytes past `MAX_QUEUED_PEER_BYTES` is
//! dropped (raft sends again); the node's own messages always go in.

use std::time::Duration;

use bytes::Bytes;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, oneshot};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::command::{Command, Op};
use crate::kv::{SharedKv, TxnOutcome};
use crate::leases::LeaseRefusal;
use crate::snapshot::WrittenSnapshot;

/// The group every member of the cluster belongs to: its log holds the cluster's
/// membership, and a cluster formed before groups existed is this group alone.
pub const CLUSTER_GROUP: u64 = 1;

/// Why a proposal was not applied. Every variant but `Conflict`, `CheckFailed` and `Lease` means
/// the outcome is unknown or the cluster cannot take writes now: the client must not
/// assume success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// The command was committed, but a revision check failed, so it wrote nothing: `key`
    /// is at `revision` (0: absent).
    CheckFailed { key: Bytes, revision: u64 },
    /// No leader is known (an election is under way, or this node is cut off).
    NoLeader,
    /// The request contradicts the current membership; nothing was proposed.
    Conflict(String),
    /// Raft refused the proposal (for instance during a leadership transfer).
    Dropped(String),
    /// The entry was not applied within the deadline; it may still commit later.
    Timeout,
    /// The leader changed before the entry (a membership change: writes are proposed
    /// again) committed; it may still commit later.
    LeaderChanged,
    /// This node caught up by a snapshot, which may or may not hold the entry.
    OvertakenBySnapshot,
    /// The node is shutting down.
    Stopped,
    /// This node does not host that raft group (or not yet).
    NotHosted(u64),
    /// The command's keys belong to another group; nothing was written.
    Misrouted,
    /// The raft thread has too many requests waiting; nothing was proposed.
    Overloaded,
    /// A lease operation (or a put naming a lease) was committed but refused: nothing
    /// was written.
    Lease(LeaseRefusal),
}

/// A change of membership asked for by a client.
#[derive(Debug, Clone)]
pub enum MemberChange {
    /// Adds a voter, or promotes a learner to one.
    Add {
        id: u64,
        peer_url: String,
    },
    /// Adds a learner: it receives the log but does not vote, so a replica that is still
    /// catching up costs the group no quorum (rebalancing moves add one first).
    AddLearner {
        id: u64,
    },
    Remove {
        id: u64,
    },
}

/// What a proposal did once its entry was applied on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The revision the command took: the revision of every key it wrote.
    pub revision: u64,
    /// Keys its deletes found and removed.
    pub deleted: u64,
    /// A transaction's branch and what its steps found (`Op::Txn` only).
    pub txn: Option<Box<TxnOutcome>>,
}

impl Written {
    /// A command that took `revision` and deleted nothing.
    pub fn at(revision: u64) -> Written {
        Written {
            revision,
            deleted: 0,
            txn: None,
        }
    }
}

pub type Reply = oneshot::Sender<Result<Written, ProposeError>>;
/// Answered with the read index once the local map may be read (see `read_index.rs`).
pub type ReadReply = oneshot::Sender<Result<u64, ProposeError>>;

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
    /// The map's revision: writes (and membership changes) applied so far.
    pub revision: u64,
    /// Index of the newest durable snapshot (0: none).
    pub last_snapshot: u64,
    pub members: Vec<Member>,
    /// Those of `members` that are learners.
    #[serde(skip)]
    pub learners: Vec<u64>,
    /// The group sleeps: it has nothing to do and does not tick (shown in /v1/groups).
    #[serde(skip)]
    pub asleep: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    pub id: u64,
    pub peer_url: String,
}

/// What one raft group is asked to do.
pub enum GroupMsg {
    Propose(Op, Reply),
    ChangeMembers(MemberChange, Reply),
    ReadIndex(ReadReply),
    Step(Box<Message>),
    /// A peer's MsgSnapshot whose file arrived whole and verified under a temporary
    /// name: the group steps the message and, only if raft takes the snapshot, moves the
    /// file to its final name. The answer says whether it did.
    SnapshotReceived(Box<Message>, PathBuf, oneshot::Sender<Result<(), String>>),
    /// The transport finished sending a snapshot to a peer (true: delivered).
    SnapshotSent(u64, bool),
    /// The background snapshot writer finished.
    SnapshotWritten(Result<WrittenSnapshot, String>),
    Status(oneshot::Sender<NodeStatus>),
    /// Have the group's leader hand leadership to this member.
    TransferLeader(u64),
}

/// Everything the raft thread is asked to do.
pub enum NodeMsg {
    /// For the group with this id.
    Group(u64, GroupMsg),
    /// A peer process cannot be reached: every group's replica on it is unreachable.
    Unreachable(u64),
    RemovedByPeer(u64),
    /// raft-engine cannot delete old log files while they hold these groups' entries:
    /// they should compact their logs early (`node/log_purge.rs`).
    CompactLogs(Vec<u64>),
    Shutdown,
}

/// A cheap, clonable way for other tasks to reach the raft groups: their mailbox (the raft
/// thread's inbox) and the maps of the groups hosted here, for reads.
#[derive(Clone)]
pub struct Router {
    tx: mpsc::UnboundedSender<NodeMsg>,
    queued: Arc<Queued>,
    maps: Arc<RwLock<HashMap<u64, Hosted>>>,
}

/// A group hosted here: its map, and whether its replica knows the group's
/// configuration yet.
struct Hosted {
    kv: SharedKv,
    configured: Arc<AtomicBool>,
}

/// Client requests waiting in the inbox beyond which a new one is refused (503).
const MAX_QUEUED_REQUESTS: usize = 50_000;
/// Bytes of peer messages waiting in the inbox beyond which a new one is dropped.
const MAX_QUEUED_PEER_BYTES: usize = 256 << 20;

/// What waits in the inbox, counted as it goes in and comes out.
#[derive(Default)]
struct Queued {
    requests: AtomicUsize,
    peer_bytes: AtomicUsize,
}

impl Queued {
    /// Counts a message in; false (counting nothing) if its bound is reached.
    fn admit(&self, weight: Weight) -> bool {
        let admitted = match weight {
            Weight::Request => self.requests.fetch_add(1, Ordering::Relaxed) < MAX_QUEUED_REQUESTS,
            Weight::PeerBytes(n) => {
                self.peer_bytes.fetch_add(n, Ordering::Relaxed) < MAX_QUEUED_PEER_BYTES
            }
            Weight::Own => return true,
        };
        if !admitted {
            self.release(weight);
        }
        admitted
    }

    /// Counts a message out.
    fn release(&self, weight: Weight) {
        match weight {
            Weight::Request => self.requests.fetch_sub(1, Ordering::Relaxed),
            Weight::PeerBytes(n) => self.peer_bytes.fetch_sub(n, Ordering::Relaxed),
            Weight::Own => 0,
        };
    }
}

/// The raft thread's end of the inbox.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<NodeMsg>,
    queued: Arc<Queued>,
}

impl Inbox {
    /// The next message; None once every sender is gone.
    pub async fn recv(&mut self) -> Option<NodeMsg> {
        let msg = self.rx.recv().await?;
        self.taken(&msg);
        Some(msg)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<NodeMsg> {
        let msg = self.rx.try_recv().ok()?;
        self.taken(&msg);
        Some(msg)
    }

    fn taken(&self, msg: &NodeMsg) {
        self.queued.release(weight(msg));
    }
}

/// How a message counts against the inbox's bounds.
#[derive(Clone, Copy)]
enum Weight {
    /// A client's request: refused when too many wait.
    Request,
    /// A peer's message of about this many bytes: dropped when too many bytes wait.
    PeerBytes(usize),
    /// The node's own bookkeeping: always taken.
    Own,
}

fn weight(msg: &NodeMsg) -> Weight {
    match msg {
        NodeMsg::Group(
            _,
            GroupMsg::Propose(..) | GroupMsg::ChangeMembers(..) | GroupMsg::ReadIndex(_),
        ) => Weight::Request,
        NodeMsg::Group(_, GroupMsg::Step(m)) => {
            Weight::PeerBytes(64 + m.entries.iter().map(|e| e.data.len() + 32).sum::<usize>())
        }
        _ => Weight::Own,
    }
}

impl Router {
    pub fn new() -> (Router, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::<Queued>::default();
        let maps = Arc::default();
        (
            Router {
                tx,
                queued: queued.clone(),
                maps,
            },
            Inbox { rx, queued },
        )
    }

    /// Puts `msg` in the inbox unless its bound is reached; false if it was refused (or
    /// the raft thread has stopped).
    fn enqueue(&self, msg: NodeMsg) -> bool {
        if !self.queued.admit(weight(&msg)) {
            return false;
        }
        if let Err(mpsc::error::SendError(msg)) = self.tx.send(msg) {
            // The raft thread stopped: nothing will count it out.
            self.queued.release(weight(&msg));
            return false;
        }
        true
    }

    /// Group `group_id` is hosted here, with `kv` as its map (the raft thread calls it).
    /// The replica sets the returned flag while it knows the group's configuration.
    pub fn register(&self, group_id: u64, kv: SharedKv) -> Arc<AtomicBool> {
        let configured = Arc::new(AtomicBool::new(false));
        let hosted = Hosted {
            kv,
            configured: configured.clone(),
        };
        self.maps.write().unwrap().insert(group_id, hosted);
        configured
    }

    /// Group `group_id` is no longer hosted here.
    pub fn unregister(&self, group_id: u64) {
        self.maps.write().unwrap().remove(&group_id);
    }

    /// Ids of the groups hosted here, in order.
    pub fn hosted(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.maps.read().unwrap().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The map of group `group_id`, if it is hosted here.
    pub fn kv(&self, group_id: u64) -> Option<SharedKv> {
        let maps = self.maps.read().unwrap();
        maps.get(&group_id).map(|hosted| hosted.kv.clone())
    }

    /// The map of group `group_id`, if a replica here can serve it: hosted, and knowing
    /// the group's configuration. A replica just placed here, still waiting for the
    /// group's data, cannot (it knows no leader and no member); a request for the group
    /// goes to a node that hosts it then.
    pub fn serving(&self, group_id: u64) -> Option<SharedKv> {
        let maps = self.maps.read().unwrap();
        maps.get(&group_id)
            .filter(|hosted| hosted.configured.load(Ordering::Relaxed))
            .map(|hosted| hosted.kv.clone())
    }

    /// Hands `msg` to group `group_id` (dropped if the raft thread has stopped, or if
    /// it is a peer's message and the inbox holds too many).
    pub fn send(&self, group_id: u64, msg: GroupMsg) {
        self.enqueue(NodeMsg::Group(group_id, msg));
    }

    /// Asks the raft thread to have `groups` compact their logs early.
    pub fn compact_logs(&self, groups: Vec<u64>) {
        self.enqueue(NodeMsg::CompactLogs(groups));
    }

    /// Proposes `command` to group `group_id` and waits until it is applied here.
    pub async fn propose(
        &self,
        group_id: u64,
        command: Command,
        timeout: Duration,
    ) -> Result<Written, ProposeError> {
        let op = Op::Kv(command);
        self.ask(group_id, |reply| GroupMsg::Propose(op, reply), timeout)
            .await
    }

    /// Proposes `op` to group `group_id` and waits until it is applied here; for the
    /// table of groups' changes (`Op::CreateGroup` ...), to the cluster group.
    pub async fn propose_op(
        &self,
        group_id: u64,
        op: Op,
        timeout: Duration,
    ) -> Result<Written, ProposeError> {
        self.ask(group_id, |reply| GroupMsg::Propose(op, reply), timeout)
            .await
    }

    /// Proposes a membership change of group `group_id` and waits until it is applied
    /// here.
    pub async fn change_members(
        &self,
        group_id: u64,
        change: MemberChange,
        timeout: Duration,
    ) -> Result<Written, ProposeError> {
        self.ask(
            group_id,
            |reply| GroupMsg::ChangeMembers(change, reply),
            timeout,
        )
        .await
    }

    /// Waits until a linearizable read of group `group_id`'s local map is allowed: this
    /// node has applied everything committed when the read arrived.
    /// Answers the read index: the leader's commit index when the read arrived.
    pub async fn read_index(&self, group_id: u64, timeout: Duration) -> Result<u64, ProposeError> {
        self.ask(group_id, GroupMsg::ReadIndex, timeout).await
    }

    async fn ask<T>(
        &self,
        group_id: u64,
        msg: impl FnOnce(oneshot::Sender<Result<T, ProposeError>>) -> GroupMsg,
        timeout: Duration,
    ) -> Result<T, ProposeError> {
        let (reply, answer) = oneshot::channel();
        if !self.enqueue(NodeMsg::Group(group_id, msg(reply))) {
            return Err(match self.tx.is_closed() {
                true => ProposeError::Stopped,
                false => ProposeError::Overloaded,
            });
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// A consistent picture of group `group_id`'s raft state on this node.
    pub async fn status(&self, group_id: u64) -> Result<NodeStatus, ProposeError> {
        let mut statuses = self.statuses(&[group_id]).await;
        statuses.pop().expect("one answer per group asked")
    }

    /// [`status`](Self::status) of many groups, in their order. Every question is queued
    /// before any answer is awaited, so the loop answers them a batch per round: asked
    /// one after the other, each would cost a loop round over every hosted group.
    pub async fn statuses(&self, group_ids: &[u64]) -> Vec<Result<NodeStatus, ProposeError>> {
        let asked: Vec<_> = group_ids
            .iter()
            .map(|&group_id| {
                let (reply, answer) = oneshot::channel();
                let sent = self
                    .tx
                    .send(NodeMsg::Group(group_id, GroupMsg::Status(reply)));
                (group_id, sent.is_ok(), answer)
            })
            .collect();
        let mut statuses = Vec::with_capacity(asked.len());
        for (group_id, sent, answer) in asked {
            // An unanswered question: the node stopped, or it hosts no such group (any
            // more).
            let status = match sent {
                true => answer.await.ok(),
                false => None,
            };
            statuses.push(status.ok_or_else(|| match self.tx.is_closed() {
                true => ProposeError::Stopped,
                false => ProposeError::NotHosted(group_id),
            }));
        }
        statuses
    }

    /// Hands a peer's MsgSnapshot, whose file is at `file`, to group `group_id`; answers
    /// whether raft took it (the file is then under its final name).
    pub async fn snapshot_received(
        &self,
        group_id: u64,
        msg: Message,
        file: PathBuf,
    ) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.send(
            group_id,
            GroupMsg::SnapshotReceived(Box::new(msg), file, reply),
        );
        answer
            .await
            .unwrap_or_else(|_| Err(format!("raft group {group_id} is not hosted here")))
    }

    /// Hands a message from a peer to group `group_id`'s raft.
    pub fn step(&self, group_id: u64, msg: Message) {
        self.send(group_id, GroupMsg::Step(Box::new(msg)));
    }

    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.tx.send(NodeMsg::Unreachable(peer));
    }

    pub fn report_snapshot(&self, group_id: u64, peer: u64, delivered: bool) {
        self.send(group_id, GroupMsg::SnapshotSent(peer, delivered));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_refuses_requests_past_its_bound_and_counts_them_out() {
        let (router, mut inbox) = Router::new();
        let mut answers = Vec::new();
        for _ in 0..MAX_QUEUED_REQUESTS {
            let (reply, answer) = oneshot::channel();
            assert!(router.enqueue(NodeMsg::Group(1, GroupMsg::ReadIndex(reply))));
            answers.push(answer);
        }
        let (reply, _answer) = oneshot::channel();
        assert!(!router.enqueue(NodeMsg::Group(1, GroupMsg::ReadIndex(reply))));
        // The node's own messages still go in.
        assert!(router.enqueue(NodeMsg::Shutdown));
        assert!(inbox.try_recv().is_some());
        let (reply, _answer) = oneshot::channel();
        assert!(router.enqueue(NodeMsg::Group(1, GroupMsg::ReadIndex(reply))));
        let big = Message {
            entries: vec![raft::eraftpb::Entry {
                data: vec![0; MAX_QUEUED_PEER_BYTES].into(),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        assert!(router.enqueue(NodeMsg::Group(1, GroupMsg::Step(Box::new(big.clone())))));
        assert!(!router.enqueue(NodeMsg::Group(1, GroupMsg::Step(Box::new(big)))));
    }
}
