//! The first log of a brand-new cluster.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState};

use crate::command::{MemberContext, ProposalId};
use crate::storage::LogStore;

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
