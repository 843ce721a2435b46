//! Membership changes of a group: checking a requested change against the current
//! configuration (raft-rs would silently turn a doomed one into an empty entry),
//! proposing it, and applying committed conf changes to raft and the stored conf state;
//! in the cluster group also to the peer list and the transport. A node that applies its
//! own removal tells the loop (from the cluster group, the process stops).

use std::collections::BTreeSet;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType};
use raft::{StateRole, INVALID_ID};
use slog::{info, warn};

use super::{Group, GroupEvent};
use crate::command::MemberContext;
use crate::membership::CLUSTER_GROUP_VOTERS;
use crate::replica_id::node_of;
use crate::router::{MemberChange, ProposeError, Reply, Written};

/// The start of the message that refuses a change while another is unapplied; a client
/// that sees it may retry (`join.rs` does).
pub const CHANGE_IN_PROGRESS: &str = "another membership change is still in progress";

impl Group {
    /// Proposes a change of the group's members, named by node ids (the API's), which
    /// it turns into raft ids first (`replica_id.rs`).
    pub(super) fn propose_member_change(&mut self, change: MemberChange, reply: Reply) {
        let change = self.in_raft_ids(change);
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
            MemberChange::Add { id, peer_url } if self.joins_cluster_group_as_learner(id) => {
                info!(self.logger, "the cluster group has all its voters: the new member joins it as a learner";
                    "node" => id, "voters" => CLUSTER_GROUP_VOTERS);
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = id;
                peer_url
            }
            MemberChange::Add { id, peer_url } => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
                peer_url
            }
            MemberChange::AddLearner { id } => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = id;
                String::new()
            }
            MemberChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
                String::new()
            }
        };
        cc.context = MemberContext { id, peer_url }.encode().into();
        let proposed = self
            .raw
            .propose_conf_change(vec![], cc)
            .map_err(|e| e.to_string());
        self.await_proposal(id, proposed, reply, None);
    }

    /// `change` with its node id replaced by the raft id of that node's replica: the one in
    /// the configuration, or else the one the table of groups places (a node added again
    /// after its removal is a new replica). The cluster group's raft ids are node ids.
    fn in_raft_ids(&self, change: MemberChange) -> MemberChange {
        if self.is_cluster_group() {
            return change;
        }
        let replica = |node: u64| {
            self.replica_of_node(node).unwrap_or_else(|| {
                let membership = self.membership.read().unwrap();
                membership
                    .groups
                    .get(&self.id)
                    .map_or(node, |placement| placement.replica_of(node))
            })
        };
        match change {
            MemberChange::Add { id, peer_url } => MemberChange::Add {
                id: replica(id),
                peer_url,
            },
            MemberChange::AddLearner { id } => MemberChange::AddLearner { id: replica(id) },
            MemberChange::Remove { id } => MemberChange::Remove { id: replica(id) },
        }
    }

    /// Refuses a change (in raft ids) that cannot succeed, instead of letting raft-rs
    /// silently turn it into an empty entry.
    fn check_member_change(&self, change: &MemberChange) -> Result<(), String> {
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let members: BTreeSet<u64> = conf.voters.iter().chain(&conf.learners).copied().collect();
        let membership = self.membership.read().unwrap();
        let learner = |id: &u64| conf.learners.contains(id);
        match change {
            MemberChange::AddLearner { id } if members.contains(id) => {
                return Err(format!("node {} is already a member", node_of(*id)));
            }
            MemberChange::AddLearner { .. } => {}
            // Promoting a learner (in the cluster group, only to fill a voter's place).
            MemberChange::Add { id, peer_url } if learner(id) => {
                if self.is_cluster_group() && self.has_all_cluster_voters() {
                    return Err(format!(
                        "node {id} is already a member (a learner of the cluster group, \
                         which has its {CLUSTER_GROUP_VOTERS} voters)"
                    ));
                }
                // A promotion must not move the member's address on the side.
                let known = membership.peer_urls.get(id);
                if self.is_cluster_group() && known != Some(peer_url) {
                    return Err(format!(
                        "node {id} is already a member, at {}",
                        known.map_or("an unknown URL", String::as_str)
                    ));
                }
            }
            MemberChange::Add { id, peer_url } => {
                if members.contains(id) {
                    return Err(format!("node {} is already a member", node_of(*id)));
                }
                if membership.removed.contains(&node_of(*id)) {
                    return Err(format!(
                        "node id {} was removed from this cluster and cannot be reused; add the node under a new id",
                        node_of(*id)
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
                    return Err(format!("node {} is not a member", node_of(*id)));
                }
                if members.len() == 1 && self.is_cluster_group() {
                    return Err("cannot remove the last member of the cluster".into());
                }
                if members.len() == 1 {
                    return Err(format!(
                        "cannot remove the last member of group {}",
                        self.id
                    ));
                }
                let hosted: Vec<u64> = membership
                    .groups
                    .iter()
                    .filter(|(_, placement)| placement.members.contains(id))
                    .map(|(group, _)| *group)
                    .collect();
                if self.is_cluster_group() && !hosted.is_empty() {
                    // Removing it would leave each of those groups a replica short: the
                    // API drains it first (rebalance.rs).
                    return Err(format!(
                        "node {id} still hosts replicas of groups {hosted:?}: it is removed \
                         once they have moved to other nodes"
                    ));
                }
            }
        }
        if self.member_change_pending() {
            return Err(format!("{CHANGE_IN_PROGRESS}; retry once it is applied"));
        }
        Ok(())
    }

    /// Whether this group's configuration has [`CLUSTER_GROUP_VOTERS`] voters or more
    /// (what the cluster group may have at most).
    fn has_all_cluster_voters(&self) -> bool {
        self.raw.raft.prs().conf().voters().ids().len() >= CLUSTER_GROUP_VOTERS
    }

    /// Whether adding node `id` to the cluster group makes it a learner: it is new, and
    /// the group has its [`CLUSTER_GROUP_VOTERS`] voters already.
    fn joins_cluster_group_as_learner(&self, id: u64) -> bool {
        self.is_cluster_group()
            && !self.raw.raft.prs().conf().learners().contains(&id)
            && self.has_all_cluster_voters()
    }

    /// On the cluster group's leader, every tick: while the group has fewer than
    /// [`CLUSTER_GROUP_VOTERS`] voters (one left), promotes the learner that is furthest
    /// along, once it holds everything committed and answered recently (not while handing
    /// leadership over: raft-rs would drop the change). No client waits for the change;
    /// the next tick looks again.
    pub(super) fn keep_cluster_group_voters(&mut self) {
        if !self.is_cluster_group() || !self.is_leader() {
            return;
        }
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        if self.has_all_cluster_voters()
            || conf.learners().is_empty()
            || raft.has_pending_conf()
            || self.handing_over()
        {
            return;
        }
        let committed = raft.raft_log.committed;
        let heir = conf
            .learners()
            .iter()
            .filter_map(|&id| Some((id, raft.prs().get(id)?)))
            .filter(|(_, progress)| progress.recent_active && progress.matched >= committed)
            .max_by_key(|(id, progress)| (progress.matched, std::cmp::Reverse(*id)))
            .map(|(id, _)| id);
        let Some(heir) = heir else {
            return;
        };
        let Some(peer_url) = self
            .membership
            .read()
            .unwrap()
            .peer_urls
            .get(&heir)
            .cloned()
        else {
            return;
        };
        info!(self.logger, "the cluster group is short of voters: promoting a learner";
            "node" => heir, "voters" => conf.voters().ids().len());
        let (reply, _nobody_waits) = tokio::sync::oneshot::channel();
        self.propose_member_change(MemberChange::Add { id: heir, peer_url }, reply);
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

    /// Applies a committed membership change, which took map revision `revision`.
    pub(super) fn apply_conf_change(&mut self, entry: &Entry, revision: u64) -> Result<(), String> {
        let (cc, context) = match ConfChange::parse_from_bytes(&entry.data)
            .map_err(|e| e.to_string())
            .and_then(|cc| {
                let ctx = MemberContext::decode(&cc.context).map_err(|e| e.to_string())?;
                Ok((cc, ctx))
            }) {
            Ok(parsed) => parsed,
            Err(e) => return Err(self.unreadable(entry, &format!("a conf change: {e}"))),
        };
        // Entries up to the stored conf index were applied to raft before a restart; raft
        // already starts from their result.
        if entry.index > self.raw.store().conf_index() {
            match self.raw.apply_conf_change(&cc) {
                Ok(conf_state) => {
                    self.raw
                        .mut_store()
                        .set_conf_state(conf_state, entry.index)
                        .map_err(|e| format!("could not persist the conf state: {e}"))?;
                    self.note_configuration();
                }
                Err(e) => {
                    warn!(self.logger, "raft refused a conf change"; "index" => entry.index, "error" => %e);
                    self.answer(context.id, Err(ProposeError::Conflict(e.to_string())));
                    return Ok(());
                }
            }
        }
        let node = cc.node_id;
        let own_id = self.raw.raft.id;
        if self.is_cluster_group() {
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
                    membership.draining.remove(&node);
                    self.transport.remove_peer(node);
                }
            }
        }
        if cc.get_change_type() == ConfChangeType::RemoveNode && node == own_id {
            self.events.push(GroupEvent::Removed { index: entry.index });
        }
        info!(self.logger, "membership changed"; "group" => self.id,
            "change" => ?cc.get_change_type(), "node" => node_of(node), "raft_id" => node, "index" => entry.index,
            "term" => entry.term, "voters" => ?self.raw.raft.prs().conf().voters().ids().iter().collect::<Vec<_>>());
        self.answer(context.id, Ok(Written::at(revision)));
        Ok(())
    }
}
