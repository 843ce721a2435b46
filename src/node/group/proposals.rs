//! A client write's life in its group, from the inbox until it is applied, refused or
//! abandoned; the reason each write applies at most once however leaders change.
//!
//! - Each write gets a proposal id (this replica's incarnation and a sequence number) and
//!   waits in the round's batch; at the end of the round every write of the batch is
//!   proposed as one entry (`propose_batch`), whose context names the current term.
//! - While no leader is known, or while this leader hands its office over, writes are
//!   parked instead (raft-rs would drop them) and go first into the next proposal.
//! - A proposed write waits (a [`Waiter`]) until its entry applies here (`answer`).
//! - When an entry of a newer term applies and a write proposed in an older term has
//!   not, its entry was lost with the old leader: it is proposed again under the same id
//!   (`repropose_lost`). A leader appends a proposal only in the term it names
//!   (`keep_proposals_of_this_term`), so a late copy of the lost one is refused.
//! - A snapshot that replaces the log may hold a waiting write applied without its id
//!   being seen: such a write is never proposed again, and its client hears "outcome
//!   unknown" (`abandon_waiters_overtaken_by_snapshot`).
//!
//! It never answers a client as a success before its entry is applied here.

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{StateRole, INVALID_ID};
use slog::info;

use super::Group;
use crate::command::{
    encode_entry, proposed_term, proposed_term_context, Op, Proposal, ProposalId,
};
use crate::entry_formats;
use crate::metrics::Metrics;
use crate::router::{ProposeError, Reply, Written};

/// Size above which the writes of one round are split over several entries.
const MAX_ENTRY_BYTES: usize = 256 * 1024;

/// A client waiting for its proposal to be applied.
pub(super) struct Waiter {
    /// The term it was proposed in (see `repropose_lost`).
    term: u64,
    pub(super) reply: Reply,
    /// The encoded proposal of a normal entry, kept to propose it again if a leader
    /// change loses it; None for a conf change, which is not proposed again.
    proposal: Option<Vec<u8>>,
}

impl Group {
    pub(super) fn next_proposal_id(&mut self) -> ProposalId {
        let id = ProposalId {
            incarnation: self.incarnation,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        id
    }

    /// Queues a client write for `propose_batch`, at the end of this round.
    pub(super) fn propose(&mut self, op: Op, reply: Reply) {
        let id = self.next_proposal_id();
        self.batch.push((Proposal { id, op }.encode(), id, reply));
    }

    /// Proposes every client write taken from the inbox this round as one entry (several
    /// past `MAX_ENTRY_BYTES`), in one raft message, as `RawNode::propose` does for one: a
    /// leader appends it and sends each follower one append; a follower forwards it to the
    /// leader. (An entry per write cost a raft step, an append and an ack each, and 48
    /// bytes of raft-engine's in-memory index per write until the next snapshot.) Each
    /// entry's context names the current term: see [`Self::keep_proposals_of_this_term`].
    pub(super) fn propose_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if self.handing_over() || self.knows_no_leader() {
            if self.parked.is_empty() && self.knows_no_leader() {
                info!(self.logger, "no leader known: writes wait for one to be elected, each up to its request timeout";
                    "writes" => self.batch.len(), "term" => self.raw.raft.term);
            }
            self.parked.append(&mut self.batch);
            return;
        }
        let term = self.raw.raft.term;
        let (encoded, waiters): (Vec<Vec<u8>>, Vec<(ProposalId, Reply)>) = self
            .batch
            .drain(..)
            .map(|(encoded, id, reply)| (encoded, (id, reply)))
            .unzip();
        let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
        let ranges = if self.members_read_batches() {
            split_by_size(&sizes, MAX_ENTRY_BYTES)
        } else {
            (0..encoded.len()).map(|i| i..i + 1).collect()
        };
        let entries: Vec<Entry> = ranges
            .into_iter()
            .map(|range| Entry {
                data: encode_entry(&encoded[range]).into(),
                context: proposed_term_context(term).into(),
                ..Default::default()
            })
            .collect();
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgPropose);
        msg.from = self.raw.raft.id;
        msg.set_entries(entries.into());
        let refused = self.raw.raft.step(msg).err().map(|e| e.to_string());
        for ((id, reply), proposal) in waiters.into_iter().zip(encoded) {
            let proposed = refused.as_ref().map_or(Ok(()), |why| Err(why.clone()));
            self.await_proposal(id, proposed, reply, Some(proposal));
        }
    }

    /// Whether every peer of this node (the members it knows, `entry_formats.rs`) reads
    /// entries that carry several proposals; if not, each write gets an entry of its own.
    fn members_read_batches(&self) -> bool {
        let peers = self.transport.peer_ids();
        let (format, changed) = self.transport.formats().writable(peers.into_iter());
        if changed {
            info!(self.logger, "entry format written changed: every member reads it"; "format" => format);
        }
        format >= entry_formats::BATCH
    }

    /// This node leads and is handing leadership over: raft-rs refuses proposals.
    pub(super) fn handing_over(&self) -> bool {
        self.raw.raft.state == StateRole::Leader && self.raw.raft.lead_transferee.is_some()
    }

    /// No leader is known (an election is under way, or this replica is cut off): raft-rs
    /// would drop a proposal.
    fn knows_no_leader(&self) -> bool {
        self.raw.raft.leader_id == INVALID_ID
    }

    /// Once a leader is known and no transfer is under way, the writes held back go first
    /// into the next proposal. They were never appended anywhere, so they cannot apply
    /// twice.
    pub(super) fn release_parked(&mut self) {
        if self.parked.is_empty() || self.handing_over() || self.knows_no_leader() {
            return;
        }
        self.parked.retain(|(_, _, reply)| !reply.is_closed());
        let fresh = std::mem::take(&mut self.batch);
        self.batch = std::mem::take(&mut self.parked);
        self.batch.extend(fresh);
    }

    /// Registers the waiter of a proposal raft accepted (it is answered when the entry is
    /// applied), or tells the client why raft refused it.
    pub(super) fn await_proposal(
        &mut self,
        id: ProposalId,
        proposed: Result<(), String>,
        reply: Reply,
        proposal: Option<Vec<u8>>,
    ) {
        match proposed {
            Ok(()) => {
                Metrics::inc(&self.metrics.proposals);
                let term = self.raw.raft.term;
                self.waiters.insert(
                    id,
                    Waiter {
                        term,
                        reply,
                        proposal,
                    },
                );
            }
            Err(why) => {
                let _ = reply.send(Err(ProposeError::Dropped(why)));
            }
        }
    }

    /// A leader appends a forwarded proposal only in the term it was proposed in (its
    /// entries' context): one that arrives later, as a follower's proposal sent to a
    /// leader that then lost its office and forwarded it on, may already have been
    /// proposed again by its proposer (`apply`), and appending both would apply it twice.
    /// Entries without the context (older releases) are kept. Returns whether anything
    /// is left to step.
    pub(super) fn keep_proposals_of_this_term(&mut self, msg: &mut Message) -> bool {
        let term = self.raw.raft.term;
        if self.raw.raft.state != StateRole::Leader {
            return true; // a follower forwards it to its leader, which decides
        }
        let refused = drop_proposals_of_other_terms(msg, term);
        if refused > 0 {
            info!(self.logger, "refused proposals from an earlier term (their proposer proposes them again)";
                "from" => msg.from, "entries" => refused, "term" => term);
        }
        !msg.entries.is_empty()
    }

    /// An entry of `term` applied: every entry of an older term that will ever commit is
    /// before it (a later leader's log holds no entry of an older term after one of its
    /// own), so a waiter proposed in an older term whose entry has not applied lost it
    /// when the leader changed: a leader dropped it (during a transfer), or never
    /// replicated it. Its write is proposed again, under the same proposal id, in the
    /// current term; no leader appends the old one any more
    /// ([`Self::keep_proposals_of_this_term`]), so it applies at most once. A conf change
    /// is not proposed again: its client hears 503 (outcome unknown) now.
    pub(super) fn repropose_lost(&mut self, term: u64) {
        let lost: Vec<ProposalId> = self
            .waiters
            .iter()
            .filter(|(_, waiter)| waiter.term < term)
            .map(|(id, _)| *id)
            .collect();
        let mut again = 0;
        for id in lost {
            let Some(waiter) = self.waiters.remove(&id) else {
                continue;
            };
            if waiter.reply.is_closed() {
                continue; // its client gave up (request timeout)
            }
            match waiter.proposal {
                Some(proposal) => {
                    self.batch.push((proposal, id, waiter.reply));
                    again += 1;
                }
                None => {
                    let _ = waiter.reply.send(Err(ProposeError::LeaderChanged));
                }
            }
        }
        if again > 0 {
            info!(self.logger, "the leader changed before these writes committed; proposing them again";
                "writes" => again, "term" => term);
        }
    }

    /// A snapshot replaced the log here: a waiting write may be inside it, applied
    /// without its id being seen, so it must never be proposed again. Its client hears
    /// 503 (outcome unknown) now.
    pub(super) fn abandon_waiters_overtaken_by_snapshot(&mut self) {
        if !self.waiters.is_empty() {
            info!(self.logger, "a snapshot overtook writes proposed here; their clients are told the outcome is unknown";
                "writes" => self.waiters.len());
        }
        for (_, waiter) in self.waiters.drain() {
            let _ = waiter.reply.send(Err(ProposeError::OvertakenBySnapshot));
        }
    }

    /// Answers the client waiting for proposal `id` here, if any.
    pub(super) fn answer(&mut self, id: ProposalId, outcome: Result<Written, ProposeError>) {
        if let Some(waiter) = self.waiters.remove(&id) {
            let _ = waiter.reply.send(outcome);
        }
    }
}

/// Takes out of a `MsgPropose` every entry proposed in another term than `term` (entries
/// that name none are kept); returns how many it took out.
fn drop_proposals_of_other_terms(msg: &mut Message, term: u64) -> usize {
    let before = msg.entries.len();
    msg.mut_entries()
        .retain(|e| proposed_term(&e.context).is_none_or(|t| t == term));
    before - msg.entries.len()
}

/// Items of `sizes` bytes, in order, in runs of at most `max_bytes` (an item larger than
/// that alone): the index range of each run.
fn split_by_size(sizes: &[usize], max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0;
    for (at, &size) in sizes.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if bytes + size <= max_bytes => {
                bytes += size;
                run.end = at + 1;
            }
            _ => {
                bytes = size;
                runs.push(at..at + 1);
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_keeps_only_the_proposals_of_its_own_term() {
        let entry = |context: Vec<u8>| Entry {
            context: context.into(),
            ..Default::default()
        };
        let mut msg = Message::default();
        msg.set_entries(
            vec![
                entry(proposed_term_context(4)),
                entry(proposed_term_context(5)),
                entry(Vec::new()),
                entry(proposed_term_context(6)),
            ]
            .into(),
        );
        assert_eq!(drop_proposals_of_other_terms(&mut msg, 5), 2);
        let kept: Vec<Option<u64>> = msg
            .entries
            .iter()
            .map(|e| proposed_term(&e.context))
            .collect();
        assert_eq!(
            kept,
            [Some(5), None],
            "this term's, and one from an older release"
        );
    }

    #[test]
    fn writes_are_split_into_entries_by_size_in_order() {
        assert_eq!(split_by_size(&[3, 3, 4, 1], 10), [0..3, 3..4]);
        assert_eq!(split_by_size(&[2, 20, 2], 10), [0..1, 1..2, 2..3]);
        assert!(split_by_size(&[], 10).is_empty());
    }
}
