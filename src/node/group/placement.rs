//! The cluster group's table of groups (`membership.rs`: `groups`, `shards`, `draining`):
//! applying a group's creation, a node's placement in or out of a group, the list of
//! shards of a new cluster and a node's draining, as committed in the cluster group's
//! log. Each change is checked here, at apply time, so that of two racing requests the
//! same one wins on every node; the node loop then starts or drops this node's replica
//! (`GroupEvent::Placed`). Only the cluster group applies these.

use slog::{error, info};

use super::{Group, GroupEvent};
use crate::command::Op;
use crate::membership::Placement;
use crate::router::{ProposeError, CLUSTER_GROUP};

impl Group {
    /// Applies a change of the table of groups (any `Op` but the map's: `Kv`, `Txn` and
    /// the leases') committed at `index`.
    pub(super) fn apply_placement(&mut self, index: u64, op: Op) -> Result<(), ProposeError> {
        if !self.is_cluster_group() {
            error!(self.logger, "ignoring a change of the table of groups outside the cluster group"; "index" => index, "op" => ?op);
            return Err(ProposeError::Conflict(
                "groups are placed through the cluster group only".into(),
            ));
        }
        let mut membership = self.membership.write().unwrap();
        let (group, outcome) = match op {
            Op::Kv(_)
            | Op::Txn(_)
            | Op::GrantLease { .. }
            | Op::KeepLeaseAlive { .. }
            | Op::RevokeLease { .. } => unreachable!("a command of the map is not a placement"),
            Op::CreateGroup { group, members } => {
                if group == CLUSTER_GROUP || membership.groups.contains_key(&group) {
                    return Err(ProposeError::Conflict(format!("group {group} exists")));
                }
                let members: std::collections::BTreeSet<u64> = members.into_iter().collect();
                let placement = Placement {
                    initial: members.clone(),
                    members,
                    removed: Default::default(),
                };
                membership.groups.insert(group, placement);
                (group, "created")
            }
            Op::AddGroupMember { group, node } => {
                let Some(placement) = membership.groups.get_mut(&group) else {
                    return Err(ProposeError::Conflict(format!("no group {group}")));
                };
                if placement.was_removed(node) {
                    // Placed again only by ReAddGroupMember, which a release that forbids
                    // it cannot read: it stops rather than apply this differently.
                    return Err(ProposeError::Conflict(format!(
                        "node {node} was removed from group {group}; it can host it again \
                         only once every member runs a release that allows it"
                    )));
                }
                placement.members.insert(node);
                (group, "node placed")
            }
            Op::ReAddGroupMember { group, node } => {
                let Some(placement) = membership.groups.get_mut(&group) else {
                    return Err(ProposeError::Conflict(format!("no group {group}")));
                };
                if placement.members.contains(&node) || !placement.was_removed(node) {
                    return Err(ProposeError::Conflict(format!(
                        "node {node} is not a removed member of group {group}"
                    )));
                }
                placement.members.insert(node);
                (group, "node placed again, under a new raft id")
            }
            Op::RemoveGroupMember { group, node } => {
                let Some(placement) = membership.groups.get_mut(&group) else {
                    return Err(ProposeError::Conflict(format!("no group {group}")));
                };
                // The replica it hosts; for a node that hosts none, its first (as every
                // release before replicas had incarnations did).
                let replica = match placement.members.remove(&node) {
                    true => placement.replica_of(node),
                    false => node,
                };
                placement.removed.insert(replica);
                (group, "node taken out")
            }
            Op::DrainNode { node } => {
                if !membership.peer_urls.contains_key(&node) {
                    return Err(ProposeError::Conflict(format!(
                        "node {node} is not a member"
                    )));
                }
                info!(self.logger, "node draining: its replicas move, then it leaves"; "drained" => node, "index" => index);
                membership.draining.insert(node);
                return Ok(());
            }
            Op::SetShards { groups } => {
                if !membership.shards.is_empty() {
                    return Err(ProposeError::Conflict("the shards are set already".into()));
                }
                if let Some(unknown) = groups.iter().find(|g| !membership.groups.contains_key(g)) {
                    return Err(ProposeError::Conflict(format!("no group {unknown}")));
                }
                info!(self.logger, "keys sharded over groups"; "groups" => ?groups, "index" => index);
                membership.shards = groups;
                self.events.push(GroupEvent::ShardsSet);
                return Ok(());
            }
        };
        let placement = &membership.groups[&group];
        info!(self.logger, "group placement changed"; "placed_group" => group, "change" => outcome,
            "members" => ?placement.members, "removed_replicas" => ?placement.removed, "index" => index);
        self.events.push(GroupEvent::Placed { group });
        Ok(())
    }
}
