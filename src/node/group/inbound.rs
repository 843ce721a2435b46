//! What a peer's raft message must satisfy before raft-rs sees it.
//!
//! raft-rs trusts its input: a heartbeat whose commit index is past the end of the log,
//! an empty proposal, a read request without its context entry, appended entries that do
//! not follow the index they claim to follow, or a snapshot whose configuration cannot
//! be a raft configuration each make it abort the process. A peer (a buggy or forged
//! one, or a node restarted on a lost disk) must not be able to do that, so every
//! message from the wire passes [`check`] first, against this group's state. What fails
//! is dropped and logged; raft tolerates lost messages, so a real peer that is merely
//! behind loses nothing by it. It never changes the message or the group.

use std::collections::BTreeSet;

use raft::eraftpb::{ConfState, Message, MessageType};
use raft::{Raft, Storage};

/// Above any index or term a real log reaches; keeps every sum below from overflowing.
const MAX_PLAUSIBLE: u64 = 1 << 62;

/// Why `msg`, arrived from a peer for the group whose raft state is `raft`, must not be
/// stepped; `Ok` if it may.
pub fn check<S: Storage>(raft: &Raft<S>, msg: &Message) -> Result<(), String> {
    use MessageType::*;
    let kind = msg.get_msg_type();
    if matches!(
        kind,
        MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum
    ) {
        return Err(format!("{kind:?} is a local message; no peer sends it"));
    }
    if msg.to != raft.id {
        return Err(format!("addressed to node {}, not this one", msg.to));
    }
    if msg.from == raft.id || msg.from == 0 {
        return Err(format!("claims to come from node {}", msg.from));
    }
    if msg.term > MAX_PLAUSIBLE || msg.index > MAX_PLAUSIBLE || msg.log_term > MAX_PLAUSIBLE {
        return Err("term or index out of any plausible range".into());
    }
    // Proposals and read requests that a follower forwards carry no term (raft-rs sends
    // them as local messages, and aborts if it must forward one that has a term);
    // everything else names the sender's term.
    let forwarded = matches!(kind, MsgPropose | MsgReadIndex);
    if forwarded != (msg.term == 0) {
        return Err(format!("{kind:?} with term {}", msg.term));
    }
    let last_index = raft.raft_log.last_index();
    match kind {
        MsgPropose if msg.entries.is_empty() => Err("a proposal without entries".into()),
        MsgReadIndex if msg.entries.len() != 1 => {
            Err("a read request needs exactly one entry (its context)".into())
        }
        MsgHeartbeat if msg.commit > last_index => Err(format!(
            "heartbeat commits index {} past this log's end ({last_index}): was this node's \
             log lost while the leader still counts on it?",
            msg.commit
        )),
        MsgAppend => check_append(raft, msg),
        MsgAppendResponse if !msg.reject && msg.index > last_index => Err(format!(
            "acknowledges index {} past this log's end ({last_index})",
            msg.index
        )),
        MsgSnapshot => check_snapshot(msg),
        // A real vote answers a request sent after this node's log was durable, and a
        // candidate appends nothing; raft-rs asserts as much when it becomes leader.
        MsgRequestVoteResponse | MsgRequestPreVoteResponse
            if raft.raft_log.persisted < last_index =>
        {
            Err("a vote answering a request this node has not sent yet".into())
        }
        // Sent once this node acknowledged the leader's whole log, so it is durable here;
        // campaigning on entries not yet durable could make a leader of an unsaved log.
        MsgTimeoutNow if raft.raft_log.persisted < last_index => {
            Err("told to campaign before its log is durable".into())
        }
        // A follower would forward it to its leader, and raft-rs aborts on forwarding a
        // message that has a term: only the leader takes it (the asker asks again).
        MsgTransferLeader if raft.state != raft::StateRole::Leader => {
            Err("a leadership transfer request reached a node that is not the leader".into())
        }
        _ => Ok(()),
    }
}

/// Appended entries follow `msg.index` one by one, with terms that never go down and
/// never pass the sender's; an append anchored at or after the commit index carries a
/// term at least that of the committed entry (a real leader's log holds it).
fn check_append<S: Storage>(raft: &Raft<S>, msg: &Message) -> Result<(), String> {
    if msg.log_term > msg.term {
        return Err("anchored at a term later than the sender's".into());
    }
    let mut previous_term = msg.log_term;
    for (i, entry) in msg.entries.iter().enumerate() {
        if entry.index != msg.index + 1 + i as u64 {
            return Err(format!(
                "entry {} where index {} was due",
                entry.index,
                msg.index + 1 + i as u64
            ));
        }
        if entry.term < previous_term || entry.term > msg.term {
            return Err(format!(
                "entry {} has term {}, outside [{previous_term}, {}]",
                entry.index, entry.term, msg.term
            ));
        }
        previous_term = entry.term;
    }
    // No log holds a term above its node's current one, so an anchor at that term or
    // later passes without a look into the log store (the steady state, where every
    // append is anchored in the leader's term: no read on the follower's hot path).
    let committed = raft.raft_log.committed;
    if msg.index >= committed && msg.log_term < raft.term {
        let committed_term = raft.raft_log.term(committed).unwrap_or(0);
        if msg.log_term < committed_term {
            return Err(format!(
                "anchored at term {} below the committed entry's term {committed_term}",
                msg.log_term
            ));
        }
    }
    Ok(())
}

/// A snapshot's metadata must describe a point of a log and a configuration raft can
/// restore.
fn check_snapshot(msg: &Message) -> Result<(), String> {
    let meta = msg.get_snapshot().get_metadata();
    if meta.index == 0 || meta.term == 0 || meta.term > msg.term || meta.index > MAX_PLAUSIBLE {
        return Err(format!(
            "snapshot at index {} term {} (message term {})",
            meta.index, meta.term, msg.term
        ));
    }
    check_conf_state(meta.get_conf_state())
}

/// The rules raft-rs's configuration restore enforces (and aborts on): voters exist, no
/// node is listed twice or both voter and learner, and a learner-to-be is an outgoing
/// voter that is not an incoming one.
pub fn check_conf_state(cs: &ConfState) -> Result<(), String> {
    let set = |ids: &[u64], what: &str| -> Result<BTreeSet<u64>, String> {
        let set: BTreeSet<u64> = ids.iter().copied().collect();
        if set.len() != ids.len() || set.contains(&0) {
            return Err(format!("configuration lists a {what} twice, or node 0"));
        }
        Ok(set)
    };
    let voters = set(&cs.voters, "voter")?;
    let learners = set(&cs.learners, "learner")?;
    let outgoing = set(&cs.voters_outgoing, "outgoing voter")?;
    let learners_next = set(&cs.learners_next, "learner-to-be")?;
    if voters.is_empty() {
        return Err("configuration without voters".into());
    }
    if !voters.is_disjoint(&learners) || !outgoing.is_disjoint(&learners) {
        return Err("configuration lists a node as both voter and learner".into());
    }
    if !learners_next.is_subset(&outgoing)
        || !learners_next.is_disjoint(&voters)
        || !learners_next.is_disjoint(&learners)
    {
        return Err("configuration's learners-to-be are not outgoing voters only".into());
    }
    if cs.auto_leave && outgoing.is_empty() {
        return Err("configuration leaves a joint state it is not in".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, Snapshot};
    use raft::storage::MemStorage;
    use raft::{Config, RawNode};

    /// A follower (id 2) of a three-node group whose log holds entries 1..=10 (term 1..=2)
    /// committed to 6.
    fn follower() -> RawNode<MemStorage> {
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let entries: Vec<Entry> = (1..=10)
            .map(|index| Entry {
                index,
                term: if index <= 5 { 1 } else { 2 },
                ..Default::default()
            })
            .collect();
        storage.wl().append(&entries).unwrap();
        storage.wl().set_hardstate(raft::eraftpb::HardState {
            term: 2,
            commit: 6,
            ..Default::default()
        });
        let config = Config {
            id: 2,
            applied: 6,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        RawNode::new(&config, storage, &logger).unwrap()
    }

    fn msg(kind: MessageType, term: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = 1;
        m.to = 2;
        m.term = term;
        m
    }

    #[test]
    fn what_raft_rs_aborts_on_is_refused_and_real_traffic_passes() {
        let node = follower();
        let ok = |m: &Message| check(&node.raft, m);
        let mut heartbeat = msg(MessageType::MsgHeartbeat, 2);
        heartbeat.commit = 10;
        assert!(ok(&heartbeat).is_ok());
        heartbeat.commit = 11;
        assert!(ok(&heartbeat).unwrap_err().contains("past this log's end"));

        assert!(ok(&msg(MessageType::MsgPropose, 0)).is_err());
        assert!(ok(&msg(MessageType::MsgReadIndex, 0)).is_err());
        assert!(ok(&msg(MessageType::MsgHup, 0)).is_err());
        assert!(ok(&msg(MessageType::MsgRequestVote, 0)).is_err());
        let mut elsewhere = msg(MessageType::MsgRequestVote, 3);
        elsewhere.to = 3;
        assert!(ok(&elsewhere).is_err());

        let mut append = msg(MessageType::MsgAppend, 3);
        append.index = 10;
        append.log_term = 2;
        append.entries = vec![
            Entry {
                index: 11,
                term: 3,
                ..Default::default()
            },
            Entry {
                index: 12,
                term: 3,
                ..Default::default()
            },
        ]
        .into();
        assert!(ok(&append).is_ok());
        append.entries[1].index = 5;
        assert!(ok(&append).is_err(), "entries must follow one another");
        append.entries[1].index = 12;
        append.log_term = 0;
        assert!(ok(&append).is_err(), "anchored below the committed term");

        let mut snapshot = msg(MessageType::MsgSnapshot, 3);
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snapshot.set_snapshot(snap);
        assert!(ok(&snapshot).is_ok());
        snapshot
            .mut_snapshot()
            .mut_metadata()
            .mut_conf_state()
            .learners = vec![3];
        assert!(ok(&snapshot).is_err(), "a voter cannot be a learner too");
    }

    /// What the node loop does at the end of a round: make the Ready durable (here, in
    /// memory) and advance.
    fn end_round(node: &mut RawNode<MemStorage>) {
        if !node.has_ready() {
            return;
        }
        let mut ready = node.ready();
        let store = node.store().clone();
        if !ready.snapshot().is_empty() {
            let _ = store.wl().apply_snapshot(ready.snapshot().clone());
        }
        let _ = store.wl().append(ready.entries());
        if let Some(hs) = ready.hs() {
            store.wl().set_hardstate(hs.clone());
        }
        let _ = ready.take_committed_entries();
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.wl().mut_hard_state().commit = commit;
        }
        let _ = light.take_committed_entries();
        node.advance_apply();
    }

    /// Random messages, biased towards the edges of this follower's log, in rounds as
    /// the node loop takes them: whatever [`check`] lets through, raft-rs steps without
    /// aborting.
    #[test]
    fn random_messages_that_pass_never_make_raft_abort() {
        let mut next = crate::random::seeded(0x5eed);
        let kinds = [
            MessageType::MsgHup,
            MessageType::MsgBeat,
            MessageType::MsgPropose,
            MessageType::MsgAppend,
            MessageType::MsgAppendResponse,
            MessageType::MsgRequestVote,
            MessageType::MsgRequestVoteResponse,
            MessageType::MsgSnapshot,
            MessageType::MsgHeartbeat,
            MessageType::MsgHeartbeatResponse,
            MessageType::MsgUnreachable,
            MessageType::MsgSnapStatus,
            MessageType::MsgCheckQuorum,
            MessageType::MsgTransferLeader,
            MessageType::MsgTimeoutNow,
            MessageType::MsgReadIndex,
            MessageType::MsgReadIndexResp,
            MessageType::MsgRequestPreVote,
            MessageType::MsgRequestPreVoteResponse,
        ];
        let mut passed = 0;
        for round in 0..6_000 {
            let mut node = follower();
            if round % 3 == 0 {
                // Half the time as leader, whose code paths differ.
                node.raft.become_candidate();
                node.raft.become_leader();
            }
            for step in 0..30 {
                if step % 5 == 4 {
                    end_round(&mut node);
                }
                let small = |r: u64| r % 14;
                let mut m = msg(kinds[(next() % kinds.len() as u64) as usize], small(next()));
                m.from = next() % 4;
                m.to = if next().is_multiple_of(8) {
                    next() % 4
                } else {
                    2
                };
                m.index = small(next());
                m.log_term = next() % 5;
                m.commit = small(next());
                m.reject = next().is_multiple_of(2);
                m.reject_hint = small(next());
                let n = next() % 4;
                let start = if next().is_multiple_of(4) {
                    next() % 14
                } else {
                    m.index + 1
                };
                m.entries = (0..n)
                    .map(|i| Entry {
                        index: start + i,
                        term: next() % 5,
                        ..Default::default()
                    })
                    .collect::<Vec<_>>()
                    .into();
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    let meta = m.mut_snapshot().mut_metadata();
                    meta.index = small(next()) + 5;
                    meta.term = next() % 4;
                    let cs = meta.mut_conf_state();
                    cs.voters = (0..next() % 4).map(|_| next() % 4).collect();
                    cs.learners = (0..next() % 2).map(|_| next() % 4).collect();
                }
                if check(&node.raft, &m).is_ok() {
                    passed += 1;
                    let described = format!("{m:?}");
                    let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _ = node.step(m);
                        if next().is_multiple_of(3) {
                            node.tick();
                        }
                    }));
                    assert!(stepped.is_ok(), "raft-rs aborted on {described}");
                }
            }
        }
        assert!(
            passed > 20_000,
            "only {passed} messages passed: the test is too narrow"
        );
    }
}
