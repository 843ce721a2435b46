//! `/v1/groups`: the cluster's raft groups, and the keys of one chosen group.
//!
//! | request                                         | does |
//! |-------------------------------------------------|------|
//! | `GET /v1/groups`                                | 200 `{"groups": [{"id","members","leader","term","applied","keys"}...]}` |
//! | `POST /v1/groups` body `{"id": 2, "members": [1, 2]}` | creates group 2 on nodes 1 and 2: 201 `{"id","members","revision"}`; 400 for a bad body or a node that is not a cluster member, 409 if the group exists |
//! | `GET /v1/groups/<g>[?node=<id>]`                | 200 one group as in the list (as node id's replica sees it); 404 if there is no such group |
//! | `POST /v1/groups/<g>/members` body `{"id": 4}`  | node 4 hosts a replica too: 201, the group after the change; `{"id": 4, "learner": true}` adds it as a learner (it gets the log, does not vote), and a later `{"id": 4}` promotes it |
//! | `DELETE /v1/groups/<g>/members/<id>`            | the group removes that node, which deletes its replica: 200 `{"id","members"}` |
//! | `POST /v1/groups/<g>/leader` body `{"id": 2}`   | node 2 takes over the group's leadership: 200, the group once it leads; 400 if it is not a voter |
//! | `GET`, `PUT`, `DELETE /v1/groups/<g>/kv/<key>`, `GET`, `POST /v1/groups/<g>/kv` | as `/v1/kv`, on group g's map (421 for a key a data group does not own) |
//!
//! Group 1 is the cluster group: every member is in it, and its log holds the table of
//! groups, so every node knows every group and where it lives. A group is created by an
//! entry in that log; each node it lists starts its replica when it applies the entry.
//! Any node answers any of these routes: one that does not host group g sends the
//! request on to one that does (`forward.rs`), and relays the answer.

use std::collections::{BTreeMap, BTreeSet};

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use super::request::parse_group_id;
use super::{json_response, parse_json, read_body, Api, Failure, Reply};
use crate::command::Op;
use crate::entry_formats;
use crate::membership::{parse_node_id, Placement};
use crate::router::{GroupMsg, MemberChange, NodeStatus, CLUSTER_GROUP};

/// Largest body of `POST /v1/groups`.
const MAX_GROUP_BODY_BYTES: usize = 64 * 1024;

/// The body of `POST /v1/groups`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    id: u64,
    members: Vec<u64>,
}

impl Api {
    /// `rest` is the path after `/v1/groups`.
    pub(super) async fn route_groups(
        &self,
        req: Request<Incoming>,
        method: &Method,
        rest: &str,
    ) -> Reply {
        if rest.is_empty() {
            return match *method {
                Method::GET => self.list_groups().await,
                Method::POST => self.create_group(req).await,
                _ => Err(Failure::method_not_allowed(method, "GET, POST")),
            };
        }
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let (id, below) = rest.split_once('/').unwrap_or((rest, ""));
        let group = parse_group_id(id)?;
        if !self.group_exists(group) {
            if req.headers().contains_key(super::FORWARDED_HEADER) {
                // The forwarder knows the group: this node's table is behind.
                return Err(Failure::not_hosted_here(group));
            }
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("no raft group {group}; see GET /v1/groups"),
            ));
        }
        let mut asked_node = None;
        if below.is_empty() && *method == Method::GET {
            // `?node=<id>`: the group as that node's replica sees it.
            let params = super::parse_query(req.uri().query(), &["node"])?;
            asked_node = super::number_param(&params, "node")?;
            if let Some(node) = asked_node {
                if node != self.id {
                    let Some(host) = self.node_url(node) else {
                        return Err(Failure::bad_request(format!(
                            "no node {node} in the cluster"
                        )));
                    };
                    return self.forward_to(vec![host], group, req, None).await;
                }
                if self.router.kv(group).is_none() {
                    return Err(Failure::new(
                        StatusCode::NOT_FOUND,
                        format!("node {node} does not host group {group}"),
                    ));
                }
            }
        }
        // `?node=<this node>` asks for this replica's view, whatever it knows; otherwise
        // a replica that does not know the group's configuration yet leaves the request
        // to a host that does.
        let here = match asked_node {
            Some(_) => self.router.kv(group),
            None => self.router.serving(group),
        };
        if here.is_none() {
            return self.forward(group, req, None).await;
        }
        if below.is_empty() {
            return match *method {
                Method::GET => {
                    let info = self.group_info(group).await?;
                    Ok(json_response(StatusCode::OK, &info))
                }
                _ => Err(Failure::method_not_allowed(method, "GET")),
            };
        }
        let changes_group =
            below == "members" || below == "leader" || below.starts_with("members/");
        if changes_group {
            let status = self.router.status(group).await?;
            if status.members.is_empty() {
                // This node's replica is new and has not learnt the group's configuration
                // yet: it would take any node for a non-member. Ask a host that knows.
                return self.forward(group, req, None).await;
            }
            return match (method.clone(), below.strip_prefix("members/")) {
                (Method::POST, None) if below == "members" => {
                    self.add_group_member(group, status, req).await
                }
                (Method::POST, None) => self.transfer_group_leader(group, status, req).await,
                (Method::DELETE, Some(node)) => self.remove_group_member(group, status, node).await,
                (_, Some(_)) => Err(Failure::method_not_allowed(method, "DELETE")),
                (_, None) => Err(Failure::method_not_allowed(method, "POST")),
            };
        }
        if below == "backup" || below == "restore" {
            return match (method.clone(), below) {
                (Method::GET, "backup") => self.backup_one_group(group).await,
                (Method::POST, "restore") => self.restore_one_group(group, req).await,
                (_, "backup") => Err(Failure::method_not_allowed(method, "GET")),
                _ => Err(Failure::method_not_allowed(method, "POST")),
            };
        }
        if below == "txn" {
            return match *method {
                Method::POST => self.txn_in(group, req).await,
                _ => Err(Failure::method_not_allowed(method, "POST")),
            };
        }
        if below == "kv" {
            let query = req.uri().query().map(str::to_string);
            return match *method {
                Method::GET => self.list_group(group, query.as_deref()).await,
                Method::POST => self.set_many_in(group, req).await,
                Method::DELETE => self.delete_prefix_in(group, query.as_deref()).await,
                _ => Err(Failure::method_not_allowed(method, "GET, POST, DELETE")),
            };
        }
        let Some(key) = below.strip_prefix("kv/") else {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("no such route /v1/groups/{rest}; see GET /v1/openapi.json"),
            ));
        };
        let key = super::decode_path_segment(key)?;
        self.serve_key(group, key, method, req).await
    }

    pub(super) fn group_exists(&self, group: u64) -> bool {
        group == CLUSTER_GROUP || self.membership.read().unwrap().groups.contains_key(&group)
    }

    async fn list_groups(&self) -> Reply {
        let table: Vec<(u64, BTreeSet<u64>)> = {
            let membership = self.membership.read().unwrap();
            let mut table = vec![(
                CLUSTER_GROUP,
                membership.peer_urls.keys().copied().collect(),
            )];
            table.extend(
                membership
                    .groups
                    .iter()
                    .map(|(id, p)| (*id, p.members.clone())),
            );
            table
        };
        let hosted: Vec<u64> = table
            .iter()
            .map(|(group, _)| *group)
            .filter(|group| self.router.serving(*group).is_some())
            .collect();
        let mut statuses: BTreeMap<u64, NodeStatus> = hosted
            .iter()
            .zip(self.router.statuses(&hosted).await)
            .filter_map(|(group, status)| Some((*group, status.ok()?)))
            .collect();
        let mut groups = Vec::with_capacity(table.len());
        for (group, members) in table {
            // A replica dropped since the table was read (its node just left the group),
            // or one too new to know the group's members, is asked about elsewhere.
            let local = statuses
                .remove(&group)
                .and_then(|status| self.describe(group, status).ok());
            groups.push(match local {
                Some(info) => info,
                None => self.remote_group_info(group, &members).await,
            });
        }
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "groups": groups }),
        ))
    }

    /// A group this node hosts, as its replica here sees it (with no members while the
    /// replica is new and has not learnt the group's configuration).
    async fn group_info(&self, group: u64) -> Result<serde_json::Value, Failure> {
        let status = self.router.status(group).await?;
        self.describe(group, status)
    }

    /// A hosted group's entry in the listing, from its replica's `status`.
    fn describe(&self, group: u64, status: NodeStatus) -> Result<serde_json::Value, Failure> {
        let keys = self.map_of(group)?.read().unwrap().len();
        let members: Vec<u64> = status.members.iter().map(|m| m.id).collect();
        Ok(serde_json::json!({
            "id": group,
            "members": members,
            "learners": status.learners,
            "leader": status.leader,
            "term": status.term,
            "applied": status.applied,
            "keys": keys,
            "asleep": status.asleep,
        }))
    }

    /// A group this node does not host, as one of its members answers for it; if none
    /// answers, its members from the table and `"reachable": false`.
    async fn remote_group_info(&self, group: u64, members: &BTreeSet<u64>) -> serde_json::Value {
        match self.fetch_json(group, format!("/v1/groups/{group}")).await {
            Ok(info) => info,
            Err(_) => serde_json::json!({
                "id": group,
                "members": members,
                "learners": [],
                "leader": 0,
                "term": 0,
                "applied": 0,
                "keys": null,
                "reachable": false,
            }),
        }
    }

    async fn create_group(&self, req: Request<Incoming>) -> Reply {
        let body = read_body(req, MAX_GROUP_BODY_BYTES).await?;
        let new: NewGroup = parse_json(&body)?;
        if new.id == 0 {
            return Err(Failure::bad_request("id must be a positive integer"));
        }
        if self.group_exists(new.id) {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!("group {} exists", new.id),
            ));
        }
        let members: BTreeSet<u64> = new.members.iter().copied().collect();
        if members.is_empty() || members.len() != new.members.len() {
            return Err(Failure::bad_request(
                "members must list one or more distinct node ids",
            ));
        }
        {
            let membership = self.membership.read().unwrap();
            if let Some(stranger) = members
                .iter()
                .find(|id| !membership.peer_urls.contains_key(id))
            {
                return Err(Failure::bad_request(format!(
                    "node {stranger} is not a member of the cluster"
                )));
            }
        }
        let members: Vec<u64> = members.into_iter().collect();
        let create = Op::CreateGroup {
            group: new.id,
            members: members.clone(),
        };
        let written = self
            .router
            .propose_op(CLUSTER_GROUP, create, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::CREATED,
            &serde_json::json!({ "id": new.id, "members": members, "revision": written.revision }),
        ))
    }
}

impl Api {
    /// `POST /v1/groups/<g>/members` `{"id": n}`: node n hosts a replica of group g. The
    /// table of groups lists it first (so that n starts an empty replica and accepts the
    /// group's messages), then the group adds it as a voter (or a learner, with
    /// `"learner": true`; a voter request for a learner promotes it) and its leader sends
    /// it the log or a snapshot. A node the group removed before hosts a new replica,
    /// under its next raft id (`replica_id.rs`), once every member reads entry format 3.
    /// A retry after a failure finishes what the first try began.
    async fn add_group_member(
        &self,
        group: u64,
        status: NodeStatus,
        req: Request<Incoming>,
    ) -> Reply {
        let body = read_body(req, MAX_GROUP_BODY_BYTES).await?;
        let NewGroupMember { id, learner } = parse_json(&body)?;
        let placement = self.placement_of(group)?;
        if !self.membership.read().unwrap().peer_urls.contains_key(&id) {
            return Err(Failure::bad_request(format!(
                "node {id} is not a member of the cluster"
            )));
        }
        let again = placement.was_removed(id) && !placement.members.contains(&id);
        if again && !self.every_member_reads(entry_formats::REHOST) {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!(
                    "node {id} was removed from group {group} before; it can host it again \
                     (as a new replica) only once every member runs a release that reads \
                     entry format {} (retry after a rolling upgrade)",
                    entry_formats::REHOST
                ),
            ));
        }
        let promotion = !learner && status.learners.contains(&id);
        if status.members.iter().any(|m| m.id == id) && !promotion {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!("node {id} is already a member of group {group}"),
            ));
        }
        if !placement.members.contains(&id) {
            let place = match again {
                true => Op::ReAddGroupMember { group, node: id },
                false => Op::AddGroupMember { group, node: id },
            };
            self.router
                .propose_op(CLUSTER_GROUP, place, self.request_timeout)
                .await?;
        }
        let add = match learner {
            true => MemberChange::AddLearner { id },
            false => MemberChange::Add {
                id,
                peer_url: String::new(),
            },
        };
        self.router
            .change_members(group, add, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::CREATED,
            &self.group_info(group).await?,
        ))
    }

    /// `DELETE /v1/groups/<g>/members/<n>`: the group removes node n, then the table of
    /// groups takes it out, and n deletes its replica's data. n keeps serving its other
    /// groups; that replica's raft id is never used again.
    async fn remove_group_member(&self, group: u64, status: NodeStatus, node: &str) -> Reply {
        let id = parse_node_id(node).map_err(Failure::bad_request)?;
        let placement = self.placement_of(group)?;
        let members = status.members;
        let in_group = members.iter().any(|m| m.id == id);
        if !in_group && !placement.members.contains(&id) {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!("node {id} is not a member of group {group}"),
            ));
        }
        if in_group {
            self.move_leadership_off(group, id, &members).await?;
            self.router
                .change_members(group, MemberChange::Remove { id }, self.request_timeout)
                .await?;
        }
        let take_out = Op::RemoveGroupMember { group, node: id };
        self.router
            .propose_op(CLUSTER_GROUP, take_out, self.request_timeout)
            .await?;
        let members: Vec<u64> = members.iter().map(|m| m.id).filter(|m| *m != id).collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "id": group, "members": members }),
        ))
    }

    /// Before node `id` leaves group `group`: if it leads the group, hands leadership to
    /// another member and waits until that one leads. A leader that applies its own
    /// removal stops at once, and a member left behind that has not learnt the removal
    /// committed could never be elected (in a group of two, it waits for a vote from the
    /// node that left). Each heir is asked once and given a second: while a transfer is
    /// pending the leader holds writes back, and asking again and again would keep it
    /// pending; if that heir does not take over (it may be down), the next is asked.
    async fn move_leadership_off(
        &self,
        group: u64,
        id: u64,
        members: &[crate::router::Member],
    ) -> Result<(), Failure> {
        let heirs: Vec<u64> = members.iter().map(|m| m.id).filter(|&m| m != id).collect();
        if heirs.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut asked: Option<(tokio::time::Instant, usize)> = None;
        loop {
            let leader = self.router.status(group).await?.leader;
            if leader != id && leader != 0 {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now > deadline {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("node {id} still leads group {group}; retry the removal"),
                ));
            }
            let next = match asked {
                None => Some(0),
                Some((at, heir)) if now >= at + HEIR_PATIENCE => Some(heir + 1),
                Some(_) => None,
            };
            if let (true, Some(heir)) = (leader == id, next) {
                self.router
                    .send(group, GroupMsg::TransferLeader(heirs[heir % heirs.len()]));
                asked = Some((now, heir));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `POST /v1/groups/<g>/leader` `{"id": n}`: hands group g's leadership to voter n
    /// and answers once n leads (the rebalancer spreads leaders this way).
    async fn transfer_group_leader(
        &self,
        group: u64,
        status: NodeStatus,
        req: Request<Incoming>,
    ) -> Reply {
        let body = read_body(req, MAX_GROUP_BODY_BYTES).await?;
        let NewLeader { id } = parse_json(&body)?;
        let voter = status.members.iter().any(|m| m.id == id) && !status.learners.contains(&id);
        if !voter {
            return Err(Failure::bad_request(format!(
                "node {id} is not a voter of group {group}"
            )));
        }
        if status.leader == id {
            return Ok(json_response(
                StatusCode::OK,
                &self.group_info(group).await?,
            ));
        }
        // Asked once: while a transfer is pending the leader holds its writes back, and
        // raft-rs gives it up by itself after an election timeout. (On a follower raft-rs passes
        // the request on to the leader.)
        self.router.send(group, GroupMsg::TransferLeader(id));
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let leader = self.router.status(group).await?.leader;
            if leader == id {
                return Ok(json_response(
                    StatusCode::OK,
                    &self.group_info(group).await?,
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("node {id} did not take over group {group}'s leadership in time (leader: {leader}); retry"),
                ));
            }
        }
    }

    /// Whether this node and every other member of the cluster read entry `format`.
    pub(super) fn every_member_reads(&self, format: u8) -> bool {
        let membership = self.membership.read().unwrap();
        self.entry_formats
            .all_read(membership.others(self.id), format)
    }

    /// Group `group`'s entry in the table of groups; the cluster group's members are
    /// changed through `/v1/members` only.
    fn placement_of(&self, group: u64) -> Result<Placement, Failure> {
        if group == CLUSTER_GROUP {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "group 1's members are the cluster's: change them through /v1/members",
            ));
        }
        let membership = self.membership.read().unwrap();
        membership
            .groups
            .get(&group)
            .cloned()
            .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("no raft group {group}")))
    }
}

/// The body of `POST /v1/groups/<g>/members`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroupMember {
    id: u64,
    /// Add it as a learner (default: a voter, or promote it if it is a learner).
    #[serde(default)]
    learner: bool,
}

/// The body of `POST /v1/groups/<g>/leader`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLeader {
    id: u64,
}

/// How long an heir asked to take a group's leadership is given before the next is asked.
const HEIR_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
