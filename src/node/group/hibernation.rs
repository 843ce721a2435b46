//! Quiet groups sleep: a group with nothing to do stops ticking, so that a process with a
//! thousand idle groups sends no heartbeats for them (TiKV calls it hibernation; raft-rs
//! has none, so this is built on its messages).
//!
//! A leader falls asleep once, for `election_ticks` ticks in a row, everything it has is
//! committed, applied and matched by every follower, and nothing waits (no proposal, read
//! or membership change, no leadership transfer). It then sends a last heartbeat marked
//! [`SLEEP`] and stops ticking. A follower that receives that heartbeat from its leader
//! while its own log is complete and nothing of its own waits stops ticking too. Any
//! other message, proposal, read or membership change wakes a group (the marked
//! heartbeat's answer does not wake the leader): a woken follower's first message to the
//! leader wakes the leader, and a woken leader's first heartbeat wakes its followers.
//!
//! Sleep never touches safety: raft's guarantees do not depend on ticks, and a read
//! still needs a quorum's heartbeat answers. It costs liveness only when a sleeping
//! group's leader dies: the group elects a new one once a request wakes a follower, an
//! election timeout or two later than an awake group would. The cluster group never
//! sleeps: its heartbeats are how the cluster notices a dead node. Nor does a group that
//! holds leases: its leader must tick to see them expire (`lease_expiry.rs`).

use raft::eraftpb::{Message, MessageType};
use raft::StateRole;

use super::Group;

/// The context of a leader's heartbeat that puts its followers to sleep.
pub const SLEEP: &[u8] = b"raftkvd:sleep";

impl Group {
    /// Called on every tick while awake: counts the quiet ticks, and puts a quiet
    /// leader to sleep.
    pub(super) fn count_quiet_tick(&mut self) {
        if !self.leader_may_sleep() {
            self.quiet_ticks = 0;
            return;
        }
        self.quiet_ticks += 1;
        if self.quiet_ticks >= self.sleep_after_ticks {
            self.raw.ping();
            self.sleep_heartbeats_pending = true;
            self.asleep = true;
        }
    }

    fn leader_may_sleep(&self) -> bool {
        let raft = &self.raw.raft;
        let last = raft.raft_log.last_index();
        !self.is_cluster_group()
            && raft.state == StateRole::Leader
            && self.nothing_waits()
            && raft.lead_transferee.is_none()
            && !raft.has_pending_conf()
            && raft.raft_log.committed == last
            && raft.raft_log.applied == last
            && raft
                .prs()
                .iter()
                .all(|(_, progress)| progress.matched == last)
            && self.kv.read().unwrap().leases().is_empty()
    }

    fn nothing_waits(&self) -> bool {
        self.batch.is_empty()
            && self.parked.is_empty()
            && self.waiters.is_empty()
            && self.reads.is_empty()
    }

    /// Marks the heartbeats of the Ready being sent as the leader's last before sleep.
    pub(super) fn mark_sleep_heartbeats(&mut self, messages: &mut [Message]) {
        if !std::mem::take(&mut self.sleep_heartbeats_pending) {
            return;
        }
        for msg in messages
            .iter_mut()
            .filter(|m| m.get_msg_type() == MessageType::MsgHeartbeat)
        {
            msg.context = SLEEP.to_vec().into();
        }
    }

    /// Before a peer's message is stepped: whether it may leave the group asleep (the
    /// answer to the leader's last heartbeat).
    pub(super) fn keeps_sleep(msg: &Message) -> bool {
        msg.get_msg_type() == MessageType::MsgHeartbeatResponse && msg.context == SLEEP
    }

    /// After a peer's message was stepped: a follower told to sleep by its leader sleeps
    /// if its log is complete and nothing of its own waits; anything else wakes it. Only
    /// a message that is more than a heartbeat restarts the leader's count of quiet ticks.
    pub(super) fn after_peer_message(
        &mut self,
        kind: MessageType,
        was_sleep_signal: bool,
        from: u64,
    ) {
        let raft = &self.raw.raft;
        let last = raft.raft_log.last_index();
        let may_sleep = was_sleep_signal
            && raft.state == StateRole::Follower
            && from == raft.leader_id
            && raft.raft_log.committed == last
            && raft.raft_log.applied == last
            && self.nothing_waits();
        if may_sleep {
            self.asleep = true;
            return;
        }
        self.asleep = false;
        if !matches!(
            kind,
            MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
        ) {
            self.quiet_ticks = 0;
        }
    }

    pub(super) fn is_sleep_signal(msg: &Message) -> bool {
        msg.get_msg_type() == MessageType::MsgHeartbeat && msg.context == SLEEP
    }

    /// Wakes the group for work of its own (a proposal, a read, a membership change).
    pub(super) fn wake(&mut self) {
        self.asleep = false;
        self.quiet_ticks = 0;
    }
}
