//! The first log of a brand-new raft group: the cluster group of a new cluster, or a
//! group the cluster group created.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState};

use crate::command::{encode_entry, MemberContext, Op, Proposal, ProposalId};
use crate::storage::LogStore;

/// The first log of a new group, the same on every initial member (as etcd does it for a
/// cluster): one AddNode entry per member `(id, peer URL)`, committed at term 1; the
/// members after the first `voters` are added as learners (AddLearnerNode). A node
/// that joins the cluster later receives these entries from the leader and so learns the
/// whole membership. (Groups other than the cluster group carry no URLs: peers are
/// found through the cluster's membership.) Then one normal entry per `ops`, also
/// committed: a new cluster's data groups and shards (`sharding.rs`).
pub fn bootstrap(
    store: &mut LogStore,
    members: &[(u64, String)],
    voters: usize,
    ops: Vec<Op>,
) -> Result<(), String> {
    let mut entries = Vec::with_capacity(members.len());
    let mut conf_state = ConfState::default();
    for (index, (id, url)) in (1..).zip(members) {
        let id = *id;
        let votes = index <= voters as u64;
        let mut cc = ConfChange::default();
        cc.set_change_type(if votes {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::AddLearnerNode
        });
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
        entry.index = index;
        entry.data = cc.write_to_bytes().map_err(|e| e.to_string())?.into();
        entries.push(entry);
        if votes {
            conf_state.voters.push(id);
        } else {
            conf_state.learners.push(id);
        }
    }
    for op in ops {
        let proposal = Proposal {
            id: ProposalId::NONE,
            op,
        };
        let entry = Entry {
            term: 1,
            index: entries.len() as u64 + 1,
            data: encode_entry(&[proposal.encode()]).into(),
            ..Default::default()
        };
        entries.push(entry);
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
