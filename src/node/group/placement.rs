//! The cluster group's table of groups (`membership.rs`: `groups`, `shards`, `draining`):
//! applying a group's creation, a node's placement in or out of a group, the list of
//! shards of a new cluster and a node's draining, as committed in the cluster group's
//! log; and who the table lets speak in a data group. Each change is checked here, at
//! apply time, so that of two racing requests the same one wins on every node; the node
//! loop then starts or drops this node's replica (`GroupEvent::Placed`). Only the
//! cluster group applies these.

use slog::{error, info};

use super::{Group, GroupEvent};
use crate::command::Op;
use crate::membership::Placement;
use crate::router::{ProposeError, CLUSTER_GROUP};

impl Group {
    /// Why a raft message from node `from` must not reach this group, if it must not:
    /// only a node the table of groups places in a data group may speak in it. A node is
    /// placed before the group adds it and taken out only after the group removed it, so
    /// every member the group's configuration names passes; a cluster member that hosts
    /// no replica of the group (or no longer does) does not. For the cluster group every
    /// member may, which the transport checked.
    pub(super) fn refuses_sender(&self, from: u64) -> Option<String> {
        if self.is_cluster_group() {
            return None;
        }
        let membership = self.membership.read().unwrap();
        match membership.groups.get(&self.id) {
            Some(placement) if placement.members.contains(&from) => None,
            Some(_) => Some(format!("node {from} hosts no replica of group {}", self.id)),
            None => Some(format!("group {} is not in the table of groups", self.id)),
        }
    }

    /// Applies a change of the table of groups (any `Op` but `Kv`) committed at `index`.
    pub(super) fn apply_placement(&mut self, index: u64, op: Op) -> Result<(), ProposeError> {
        if !self.is_cluster_group() {
            error!(self.logger, "ignoring a change of the table of groups outside the cluster group"; "index" => index, "op" => ?op);
            return Err(ProposeError::Conflict(
                "groups are placed through the cluster group only".into(),
            ));
        }
        let mut membership = self.membership.write().unwrap();
        let (group, outcome) = match op {
            Op::Kv(_) => unreachable!("a key-value command is not a placement"),
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
                if placement.removed.contains(&node) {
                    return Err(ProposeError::Conflict(format!(
                        "node {node} was removed from group {group} and cannot host it again"
                    )));
                }
                placement.members.insert(node);
                (group, "node placed")
            }
            Op::RemoveGroupMember { group, node } => {
                let Some(placement) = membership.groups.get_mut(&group) else {
                    return Err(ProposeError::Conflict(format!("no group {group}")));
                };
                placement.members.remove(&node);
                placement.removed.insert(node);
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
                return Ok(());
            }
        };
        let placement = &membership.groups[&group];
        info!(self.logger, "group placement changed"; "placed_group" => group, "change" => outcome,
            "members" => ?placement.members, "index" => index);
        self.events.push(GroupEvent::Placed { group });
        Ok(())
    }
}
