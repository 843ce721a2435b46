//! Rebalancing: replicas move onto nodes that host fewer than their share, one at a
//! time, until every node of the cluster hosts the mean number of replicas give or take
//! one (a node that joins starts with none); and off a node that is leaving the cluster
//! (draining, asked for by removing a node that hosts replicas), which is then removed.
//!
//! The node that leads the cluster group plans: [`next_step`] first picks a replica of a
//! draining node and the least loaded other node that can take it, or removes a drained
//! node; otherwise a replica on the most loaded node that the least loaded node can take
//! (it is not there; and, unless every member reads entry format 3, it was never removed
//! from that group: placed again, a node hosts a new replica under a new raft id, see
//! `replica_id.rs`, which a release before that format cannot do). It carries the move out as
//! an operator would, through this node's own client API (`run`, reached over its peer
//! port as a forwarded request): add the new node to the group as a learner (it is sent
//! the log or a snapshot, and does not vote, so the group's quorum is unchanged while it
//! catches up), wait until its replica has applied the group's log up to the addition,
//! promote it to a voter, then remove the old node, which deletes its copy. The group
//! has one replica more, not less, while a move runs, and a move that fails half-way
//! leaves it so (possibly as a learner, or placed and not yet added), never short. Once
//! replicas are balanced, it spreads leaders the same way ([`next_leader_transfer`]): a node that leads two groups
//! more than another hands one over to it (`POST /v1/groups/<g>/leader`), so that every
//! node's share of the groups' write work is even too. Before that, a move that stopped
//! between placing the new replica in the table and the group's adding it is finished
//! ([`unfinished_placement`]): otherwise its node would count as a replica and serve
//! nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{info, warn, Logger};
use tokio::sync::watch;

use crate::cluster_id::{self, ClusterId};
use crate::entry_formats::{self, EntryFormats};
use crate::membership::{Membership, Placement, SharedMembership};
use crate::router::{Router, CLUSTER_GROUP};

/// How often the leader of the cluster group looks for a move.
const PLAN_EVERY: Duration = Duration::from_secs(1);
/// Leaders are counted (which lists every group) once every this many plans.
const SPREAD_LEADERS_EVERY: u32 = 3;
/// After a leadership transfer that did not happen, leaders are left alone this long.
const SPREAD_LEADERS_BACKOFF: Duration = Duration::from_secs(30);
/// After a half-done move that could not be finished, it is left alone this long.
const UNFINISHED_BACKOFF: Duration = Duration::from_secs(10);
/// A node that does not show its replica within this long gets no leadership.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);
/// Entries a replica may lag behind and still be handed a leadership.
const CAUGHT_UP_SLACK: u64 = 100;
/// How long a new replica may take to catch up before the move is given up.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(120);

/// One replica of `group` to move from node `from` to node `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub group: u64,
    pub from: u64,
    pub to: u64,
}

/// What the rebalancer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Move(Move),
    /// A draining node hosts no replica any more: remove it from the cluster.
    Remove(u64),
}

/// Whether `node` may take a replica of the group placed as `placement`: it hosts none,
/// and it was never removed from the group unless `rehost` (every member may place a
/// node in a group again).
fn may_take(placement: &Placement, node: u64, rehost: bool) -> bool {
    !placement.members.contains(&node) && (rehost || !placement.was_removed(node))
}

/// The next step: first empty the draining nodes (each of their replicas to the least
/// loaded other node that can take it), remove a drained one, then even out the others
/// until each hosts the mean number of replicas give or take one. `rehost`: see
/// [`may_take`].
pub fn next_step(membership: &Membership, rehost: bool) -> Option<Step> {
    let load = load_of(membership);
    let takers: Vec<(u64, usize)> = load
        .iter()
        .filter(|(node, _)| !membership.draining.contains(node))
        .map(|(&node, &n)| (node, n))
        .collect();
    for &leaving in &membership.draining {
        if load.get(&leaving).copied().unwrap_or(0) == 0 {
            return Some(Step::Remove(leaving));
        }
        if let Some(mv) = move_from(membership, leaving, &takers, rehost) {
            return Some(Step::Move(mv));
        }
    }
    next_move_among(membership, &takers, rehost).map(Step::Move)
}

/// Replicas per member of the cluster.
fn load_of(membership: &Membership) -> BTreeMap<u64, usize> {
    let mut load: BTreeMap<u64, usize> = membership.peer_urls.keys().map(|&n| (n, 0)).collect();
    for placement in membership.groups.values() {
        for node in &placement.members {
            if let Some(n) = load.get_mut(node) {
                *n += 1;
            }
        }
    }
    load
}

/// A replica on `from` that the least loaded of `takers` able to take it can take.
/// Where every taker hosts the group already (a move that failed half-way left it an
/// extra replica, or the cluster has no spare node), the replica on `from` is simply
/// dropped, if the group keeps as many replicas as it was created with: the "move" to
/// a node that is a member already only makes sure that node is in the group and caught
/// up before `from` leaves.
fn move_from(
    membership: &Membership,
    from: u64,
    takers: &[(u64, usize)],
    rehost: bool,
) -> Option<Move> {
    let mut takers = takers.to_vec();
    takers.sort_by_key(|&(node, n)| (n, node));
    let mut shrink = None;
    for (&group, placement) in &membership.groups {
        if !placement.members.contains(&from) {
            continue;
        }
        let to = takers
            .iter()
            .find(|(node, _)| *node != from && may_take(placement, *node, rehost));
        if let Some(&(to, _)) = to {
            return Some(Move { group, from, to });
        }
        let spare = placement.members.len() > placement.initial.len().max(1);
        let other = takers
            .iter()
            .find(|(node, _)| placement.members.contains(node));
        if let (true, Some(&(to, _)), None) = (spare, other, shrink) {
            shrink = Some(Move { group, from, to });
        }
    }
    shrink
}

/// The next move among `nodes` (with their loads) toward each hosting the mean number of
/// replicas give or take one.
fn next_move_among(membership: &Membership, nodes: &[(u64, usize)], rehost: bool) -> Option<Move> {
    let &(to, least) = nodes.iter().min_by_key(|&&(node, n)| (n, node))?;
    let mut donors = nodes.to_vec();
    donors.sort_by_key(|&(node, n)| (std::cmp::Reverse(n), node));
    for (from, most) in donors {
        if most <= least + 1 {
            return None;
        }
        let movable = membership
            .groups
            .iter()
            .find(|(_, p)| p.members.contains(&from) && may_take(p, to, rehost));
        if let Some((&group, _)) = movable {
            return Some(Move { group, from, to });
        }
    }
    None
}

/// This node's own API, reached through its peer port (`/client/...`, as another member
/// forwards a request): with mutual TLS between peers and `--admin-cn`, the peer
/// certificate is what lets this node change groups and members.
pub struct OwnApi {
    pub client: reqwest::Client,
    /// `<own peer URL>/client`.
    pub base: String,
    pub cluster_id: Arc<ClusterId>,
}

impl OwnApi {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match self.cluster_id.get() {
            Some(id) => request.header(cluster_id::HEADER, cluster_id::format(id)),
            None => request,
        }
    }
}

/// Plans and carries out moves while this node leads the cluster group, until `stop`.
pub async fn run(
    own_id: u64,
    api: OwnApi,
    router: Router,
    membership: SharedMembership,
    formats: Arc<EntryFormats>,
    mut stop: watch::Receiver<bool>,
    logger: Logger,
) {
    // Draining nodes already reported as unable to hand off a replica.
    let mut stuck: std::collections::BTreeSet<u64> = Default::default();
    let mut quiet_plans = 0u32;
    let mut leaders_alone_until = Instant::now();
    let mut unfinished_alone_until = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PLAN_EVERY) => {}
            _ = stop.changed() => return,
        }
        let leads = router
            .status(CLUSTER_GROUP)
            .await
            .is_ok_and(|s| s.leader == own_id);
        if !leads {
            continue;
        }
        let table = membership.read().unwrap().clone();
        let rehost = formats.all_read(table.others(own_id), entry_formats::REHOST);
        let plan = next_step(&table, rehost);
        report_stuck_drains(&table, plan, &mut stuck, &logger);
        let mv = match plan {
            None => {
                // Replicas are where the table says, now and then: a move that stopped
                // half-way is finished first, then the leaders are spread.
                quiet_plans = quiet_plans.wrapping_add(1);
                if !quiet_plans.is_multiple_of(SPREAD_LEADERS_EVERY) {
                    continue;
                }
                let groups = match leaders(&api).await {
                    Ok(groups) => groups,
                    Err(e) => {
                        warn!(logger, "rebalancing: could not list the groups"; "error" => e);
                        continue;
                    }
                };
                let unfinished = unfinished_placement(&table, &groups);
                if let (Some((group, node)), true) =
                    (unfinished, Instant::now() >= unfinished_alone_until)
                {
                    // Only for a node that answers: waiting for a dead one to catch up
                    // would hold every other move back for the whole catch-up deadline.
                    if answering_view(&api, group, node).await.is_none() {
                        unfinished_alone_until = Instant::now() + UNFINISHED_BACKOFF;
                        continue;
                    }
                    info!(logger, "rebalancing: finishing a move that stopped half-way"; "group" => group, "node" => node);
                    if let Err(e) = join_as_voter(&api, group, node).await {
                        warn!(logger, "rebalancing: could not finish a half-done move; will retry"; 
                            "group" => group, "node" => node, "error" => e);
                        unfinished_alone_until = Instant::now() + UNFINISHED_BACKOFF;
                    }
                    continue;
                }
                if Instant::now() >= leaders_alone_until
                    && !spread_leaders(&api, &table, &groups, &logger).await
                {
                    leaders_alone_until = Instant::now() + SPREAD_LEADERS_BACKOFF;
                }
                continue;
            }
            Some(Step::Remove(node)) => {
                match remove_node(&api, node).await {
                    Ok(()) => {
                        info!(logger, "rebalancing: a drained node was removed from the cluster"; "node" => node)
                    }
                    Err(e) => {
                        warn!(logger, "rebalancing: could not remove a drained node; will retry"; "node" => node, "error" => e)
                    }
                }
                continue;
            }
            Some(Step::Move(mv)) => mv,
        };
        info!(logger, "rebalancing: moving a replica"; "group" => mv.group, "from" => mv.from, "to" => mv.to);
        let started = Instant::now();
        let Some(placement) = table.groups.get(&mv.group) else {
            continue;
        };
        match carry_out(&api, mv, placement).await {
            Ok(()) => info!(logger, "rebalancing: replica moved"; "group" => mv.group,
                "from" => mv.from, "to" => mv.to, "ms" => started.elapsed().as_millis()),
            Err(e) => {
                warn!(logger, "rebalancing: a move did not finish; the group keeps an extra replica until a later move"; 
                "group" => mv.group, "from" => mv.from, "to" => mv.to, "error" => e)
            }
        }
    }
}

/// A replica that the table of groups places on a node that its group never added: a
/// move (or `POST /v1/groups/<g>/members`) that stopped half-way, between placing the
/// node and the group's conf change (a crash, or the group had no leader then). Such a
/// replica counts in the plans but serves nothing: its node answers the group's reads
/// and writes with 503. Finishing the move (learner, catch up, voter) mends it; the
/// group then keeps one replica more than it was created with, which a later move off a
/// draining node may drop. A learner is left alone: an operator may want one, and it
/// serves. Groups without a leader, or whose voters the answering node does not know,
/// wait.
pub fn unfinished_placement(table: &Membership, groups: &[Led]) -> Option<(u64, u64)> {
    groups
        .iter()
        .filter(|g| g.group != CLUSTER_GROUP && !g.voters.is_empty() && g.leader != 0)
        .find_map(|g| {
            let placement = table.groups.get(&g.group)?;
            let node = placement.members.iter().find(|n| {
                !g.voters.contains(n)
                    && !g.learners.contains(n)
                    && table.peer_urls.contains_key(n)
                    && !table.draining.contains(n)
            })?;
            Some((g.group, *node))
        })
}

/// A data group as `GET /v1/groups` lists it: who leads it, who votes in it and who
/// learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Led {
    pub group: u64,
    /// 0: none known.
    pub leader: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The group's applied index, as the node that answered for it sees it.
    pub applied: u64,
}

/// A leadership to hand over, `(group, to)`, so that leaders spread as replicas do: from
/// the node that leads the most data groups to one that leads at least two fewer and
/// votes in one of them. Draining and removed nodes are not given any.
pub fn next_leader_transfer(membership: &Membership, groups: &[Led]) -> Option<(u64, u64)> {
    let mut led: BTreeMap<u64, usize> = membership
        .peer_urls
        .keys()
        .filter(|n| !membership.removed.contains(n) && !membership.draining.contains(n))
        .map(|&n| (n, 0))
        .collect();
    for g in groups.iter().filter(|g| g.group != CLUSTER_GROUP) {
        if let Some(count) = led.get_mut(&g.leader) {
            *count += 1;
        }
    }
    let (&busiest, &most) = led
        .iter()
        .max_by_key(|(node, count)| (**count, u64::MAX - **node))?;
    let mut takers: Vec<(u64, usize)> = led
        .iter()
        .filter(|(_, &count)| count + 2 <= most)
        .map(|(&node, &count)| (node, count))
        .collect();
    takers.sort_by_key(|&(node, count)| (count, node));
    for (taker, _) in takers {
        let group = groups
            .iter()
            .find(|g| g.group != CLUSTER_GROUP && g.leader == busiest && g.voters.contains(&taker));
        if let Some(g) = group {
            return Some((g.group, taker));
        }
    }
    None
}

/// Every data group's leader and voters, from `GET /v1/groups`.
async fn leaders(api: &OwnApi) -> Result<Vec<Led>, String> {
    let answer = api
        .request(reqwest::Method::GET, "/v1/groups")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("GET /v1/groups: {}", answer.status()));
    }
    let list: serde_json::Value = answer.json().await.map_err(|e| e.to_string())?;
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default()
    };
    Ok(list["groups"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|g| {
            let learners = ids(&g["learners"]);
            Led {
                group: g["id"].as_u64().unwrap_or(0),
                leader: g["leader"].as_u64().unwrap_or(0),
                voters: ids(&g["members"])
                    .into_iter()
                    .filter(|m| !learners.contains(m))
                    .collect(),
                learners,
                applied: g["applied"].as_u64().unwrap_or(0),
            }
        })
        .collect())
}

/// Spreads leaders by one transfer, if one is due. Returns false when a transfer was
/// due but did not happen: the caller then leaves leaders alone for a while, since
/// while a transfer is pending the group's leader holds its writes back (until the
/// transfer ends or an election timeout passes).
async fn spread_leaders(api: &OwnApi, table: &Membership, groups: &[Led], logger: &Logger) -> bool {
    let Some((group, to)) = next_leader_transfer(table, groups) else {
        return true;
    };
    // Only to a replica that answers at once and is caught up (a paused or cut-off node
    // would stall the group's writes for the transfer's whole timeout).
    let applied = groups
        .iter()
        .find(|g| g.group == group)
        .map_or(0, |g| g.applied);
    let caught_up = answering_view(api, group, to)
        .await
        .is_some_and(|taker| taker["applied"].as_u64().unwrap_or(0) + CAUGHT_UP_SLACK >= applied);
    if !caught_up {
        info!(logger, "rebalancing: not handing over a leadership to a node that is not answering or not caught up"; "group" => group, "to" => to);
        return false;
    }
    info!(logger, "rebalancing: handing over a group's leadership"; "group" => group, "to" => to);
    let answer = api
        .request(reqwest::Method::POST, &format!("/v1/groups/{group}/leader"))
        .json(&serde_json::json!({ "id": to }))
        .send()
        .await;
    match answer {
        Ok(a) if a.status().is_success() => true,
        Ok(a) => {
            let status = a.status().as_u16();
            let why = a.text().await.unwrap_or_default();
            warn!(logger, "rebalancing: a leadership transfer did not happen"; "group" => group,
                "to" => to, "status" => status, "error" => why);
            false
        }
        Err(e) => {
            warn!(logger, "rebalancing: a leadership transfer did not happen"; "group" => group,
                "to" => to, "error" => %e);
            false
        }
    }
}

/// Logs, once per node, a draining node that still hosts replicas no step moves: every
/// other node hosts those groups already (or was removed from them while some member
/// cannot place a node again), so the node cannot leave without a group running short.
fn report_stuck_drains(
    table: &Membership,
    plan: Option<Step>,
    stuck: &mut std::collections::BTreeSet<u64>,
    logger: &Logger,
) {
    let busy = match plan {
        Some(Step::Move(mv)) => Some(mv.from),
        Some(Step::Remove(node)) => Some(node),
        None => None,
    };
    for &node in &table.draining {
        let groups: Vec<u64> = table
            .groups
            .iter()
            .filter(|(_, p)| p.members.contains(&node))
            .map(|(g, _)| *g)
            .collect();
        if busy != Some(node) && !groups.is_empty() && stuck.insert(node) {
            warn!(logger, "rebalancing: a draining node cannot hand off its replicas: every other node hosts those groups (or was removed from them, and some member runs a release that cannot place it again)"; 
                "node" => node, "groups" => ?groups);
        }
    }
}

/// Add `to`, wait for its replica to catch up, remove `from`. Before `from` goes, the
/// group must keep as many voters without it as it was created with: the table (the
/// `placement`) counts as replicas a learner left by a move that stopped half-way (a
/// crash between its steps), and a node placed whose group never added it; a drain that
/// "moves" a replica to a node that hosts one already would otherwise leave the group a
/// voter short (two voters of three, and no quorum once one is down). Such nodes are
/// made voters first, as a move makes its new node one.
async fn carry_out(api: &OwnApi, mv: Move, placement: &Placement) -> Result<(), String> {
    let Move { group, from, to } = mv;
    let voters_to_keep = placement.initial.len().max(1);
    join_as_voter(api, group, to).await?;
    let view = group_view(api, group, None).await?;
    if view["reachable"] == false {
        return Err(format!("no member of group {group} answered"));
    }
    let ids = |field: &str| -> Vec<u64> {
        view[field]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default()
    };
    let (members, learners) = (ids("members"), ids("learners"));
    let voters: Vec<u64> = members
        .into_iter()
        .filter(|m| *m != from && !learners.contains(m))
        .collect();
    let mut voters_left = voters.len();
    let candidates = placement
        .members
        .iter()
        .filter(|n| **n != from && !voters.contains(n));
    for candidate in candidates {
        if voters_left >= voters_to_keep {
            break;
        }
        join_as_voter(api, group, *candidate).await?;
        voters_left += 1;
    }
    if voters_left < voters_to_keep {
        return Err(format!(
            "removing node {from} would leave group {group} {voters_left} voters, fewer than \
             its {voters_to_keep}"
        ));
    }
    let removed = api
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/groups/{group}/members/{from}"),
        )
        .send()
        .await
        .map_err(|e| format!("removing node {from}: {e}"))?;
    if !removed.status().is_success() {
        let status = removed.status();
        return Err(format!(
            "removing node {from}: {status} {}",
            removed.text().await.unwrap_or_default()
        ));
    }
    Ok(())
}

/// Makes node `to` a caught-up voter of `group`. A learner first: while it catches up
/// (by snapshot, most likely) the group's quorum is what it was. Each step may have been
/// done already (finishing a half-done move): the API then answers that it is.
async fn join_as_voter(api: &OwnApi, group: u64, to: u64) -> Result<(), String> {
    let reached = add_member(api, group, to, true).await?;
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    loop {
        let view = group_view(api, group, Some(to)).await;
        if view.is_ok_and(|v| v["applied"].as_u64().unwrap_or(0) >= reached) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("node {to} did not catch up to index {reached}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    add_member(api, group, to, false).await?;
    Ok(())
}

/// `POST /v1/groups/<group>/members`: node `to` as a learner, or as a voter (promoting
/// the learner). Returns the index the change was applied at on the node that served it
/// (or, for a retry of an earlier change, the group's applied index now).
async fn add_member(api: &OwnApi, group: u64, to: u64, learner: bool) -> Result<u64, String> {
    let role = if learner { "learner" } else { "voter" };
    let added = api
        .request(
            reqwest::Method::POST,
            &format!("/v1/groups/{group}/members"),
        )
        .json(&serde_json::json!({ "id": to, "learner": learner }))
        .send()
        .await
        .map_err(|e| format!("adding node {to} as a {role}: {e}"))?;
    let status = added.status();
    let body: serde_json::Value = added.json().await.unwrap_or_default();
    match status.as_u16() {
        201 => Ok(body["applied"].as_u64().unwrap_or(0)),
        409 if body["error"]
            .as_str()
            .is_some_and(|e| e.contains("already a member")) =>
        {
            Ok(group_view(api, group, None).await?["applied"]
                .as_u64()
                .unwrap_or(0))
        }
        _ => Err(format!("adding node {to} as a {role}: {status} {body}")),
    }
}

/// `DELETE /v1/members/<node>`: the cluster removes the drained node, which exits.
async fn remove_node(api: &OwnApi, node: u64) -> Result<(), String> {
    let answer = api
        .request(reqwest::Method::DELETE, &format!("/v1/members/{node}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if answer.status().is_success() {
        return Ok(());
    }
    let status = answer.status();
    Err(format!(
        "{status} {}",
        answer.text().await.unwrap_or_default()
    ))
}

/// Group `group` as node `node`'s replica sees it, if that node answers within
/// `LIVENESS_CHECK` (a paused or cut-off node is given no work).
async fn answering_view(api: &OwnApi, group: u64, node: u64) -> Option<serde_json::Value> {
    tokio::time::timeout(LIVENESS_CHECK, group_view(api, group, Some(node)))
        .await
        .ok()?
        .ok()
}

/// `GET /v1/groups/<group>`, as node `node`'s replica sees it if given.
async fn group_view(
    api: &OwnApi,
    group: u64,
    node: Option<u64>,
) -> Result<serde_json::Value, String> {
    let query = node.map(|n| format!("?node={n}")).unwrap_or_default();
    let answer = api
        .request(reqwest::Method::GET, &format!("/v1/groups/{group}{query}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("GET group {group}: {}", answer.status()));
    }
    answer.json().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(nodes: u64, groups: &[(u64, &[u64])]) -> Membership {
        let mut m = Membership::default();
        for n in 1..=nodes {
            m.peer_urls.insert(n, format!("http://127.0.0.1:{n}"));
        }
        for (id, members) in groups {
            let members = members.iter().copied().collect();
            m.groups.insert(
                *id,
                Placement {
                    initial: Default::default(),
                    members,
                    removed: Default::default(),
                },
            );
        }
        m
    }

    fn next_move(m: &Membership) -> Option<Move> {
        match next_step(m, false)? {
            Step::Move(mv) => Some(mv),
            Step::Remove(node) => panic!("removes node {node}"),
        }
    }

    /// Applies steps until none is left; returns the moves.
    fn settle(m: &mut Membership, rehost: bool) -> Vec<Move> {
        let mut moves = Vec::new();
        while let Some(step) = next_step(m, rehost) {
            match step {
                Step::Move(mv) => {
                    let p = m.groups.get_mut(&mv.group).unwrap();
                    let replica = p.replica_of(mv.from);
                    assert!(
                        p.members.remove(&mv.from) && p.members.insert(mv.to),
                        "{mv:?}"
                    );
                    p.removed.insert(replica);
                    moves.push(mv);
                }
                Step::Remove(node) => {
                    m.peer_urls.remove(&node);
                    m.draining.remove(&node);
                }
            }
            assert!(moves.len() < 100, "does not converge");
        }
        moves
    }

    #[test]
    fn leaders_spread_until_no_node_leads_two_more_than_another() {
        let m = cluster(3, &[]);
        let led = |leaders: &[u64]| -> Vec<Led> {
            leaders
                .iter()
                .enumerate()
                .map(|(i, &leader)| Led {
                    group: i as u64 + 2,
                    leader,
                    voters: vec![1, 2, 3],
                    learners: Vec::new(),
                    applied: 0,
                })
                .collect()
        };
        let mut groups = led(&[1, 1, 1, 1, 2, 3]);
        let mut transfers = 0;
        while let Some((group, to)) = next_leader_transfer(&m, &groups) {
            groups.iter_mut().find(|g| g.group == group).unwrap().leader = to;
            transfers += 1;
            assert!(transfers < 10, "transfers never end: {groups:?}");
        }
        let count = |n: u64| groups.iter().filter(|g| g.leader == n).count();
        assert_eq!((count(1), count(2), count(3)), (2, 2, 2));
        // Balanced within one: nothing to do.
        assert_eq!(next_leader_transfer(&m, &led(&[1, 1, 2, 3])), None);
        // A node that is not a voter of any of the busiest node's groups gets none.
        let only_1_and_2 = vec![
            Led {
                group: 2,
                leader: 1,
                voters: vec![1, 2],
                learners: Vec::new(),
                applied: 0,
            },
            Led {
                group: 3,
                leader: 1,
                voters: vec![1, 2],
                learners: Vec::new(),
                applied: 0,
            },
            Led {
                group: 4,
                leader: 2,
                voters: vec![2, 3],
                learners: Vec::new(),
                applied: 0,
            },
        ];
        assert_eq!(next_leader_transfer(&m, &only_1_and_2), None);
    }

    #[test]
    fn a_new_node_takes_its_share_and_then_nothing_moves() {
        let groups: Vec<(u64, Vec<u64>)> = (0..6u64)
            .map(|s| (s + 2, vec![s % 3 + 1, (s + 1) % 3 + 1]))
            .collect();
        let refs: Vec<(u64, &[u64])> = groups.iter().map(|(g, m)| (*g, m.as_slice())).collect();
        let mut m = cluster(3, &refs);
        assert_eq!(next_move(&m), None, "balanced: 4 replicas each");
        m.peer_urls.insert(4, "http://127.0.0.1:4".into());
        let moves = settle(&mut m, false);
        assert_eq!(moves.len(), 3, "{moves:?}");
        assert!(moves.iter().all(|mv| mv.to == 4));
        for p in m.groups.values() {
            assert_eq!(p.members.len(), 2, "replica counts never change");
        }
    }

    #[test]
    fn a_draining_node_is_emptied_then_removed_and_never_chosen() {
        let mut m = cluster(4, &[(2, &[1, 2]), (3, &[3, 4]), (4, &[1, 3])]);
        m.draining.insert(1);
        let moves = settle(&mut m, false);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert!(
            moves.iter().all(|mv| mv.from == 1 && mv.to != 1),
            "{moves:?}"
        );
        assert!(!m.peer_urls.contains_key(&1), "the drained node is removed");
        assert!(m.groups.values().all(|p| p.members.len() == 2));
        // No other node can take a replica of a draining node: it stays.
        let mut m = cluster(2, &[(2, &[1, 2])]);
        m.groups.get_mut(&2).unwrap().initial = [1, 2].into();
        m.draining.insert(1);
        assert_eq!(next_step(&m, true), None);
        // Unless the group has a replica to spare (a move that failed half-way added one):
        // then the draining node's replica just goes.
        let mut m = cluster(3, &[(2, &[1, 2, 3])]);
        m.groups.get_mut(&2).unwrap().initial = [1, 2].into();
        m.draining.insert(1);
        assert_eq!(
            next_step(&m, false),
            Some(Step::Move(Move {
                group: 2,
                from: 1,
                to: 2
            }))
        );
    }

    #[test]
    fn a_removed_node_is_never_chosen_and_one_off_is_balanced() {
        let mut m = cluster(3, &[(2, &[1, 2]), (3, &[1, 2])]);
        assert_eq!(
            next_move(&m),
            Some(Move {
                group: 2,
                from: 1,
                to: 3
            })
        );
        m.groups.get_mut(&2).unwrap().removed.insert(3);
        assert_eq!(next_move(&m).map(|mv| mv.group), Some(3));
        m.groups.get_mut(&3).unwrap().removed.insert(3);
        assert_eq!(next_move(&m), None, "node 3 may host neither group");
        let m = cluster(3, &[(2, &[1, 2]), (3, &[3])]);
        assert_eq!(next_move(&m), None, "2, 1, 1 is within one");
    }

    /// Node 4 joins 3 nodes whose groups have 3 replicas, takes its share, and is then
    /// removed: each of its replicas can only go back to a node it came from.
    #[test]
    fn a_node_that_joined_and_leaves_hands_its_replicas_back() {
        let full: Vec<(u64, &[u64])> = (2..=7).map(|g| (g, &[1u64, 2, 3][..])).collect();
        let mut m = cluster(3, &full);
        for p in m.groups.values_mut() {
            p.initial = p.members.clone();
        }
        m.peer_urls.insert(4, "http://127.0.0.1:4".into());
        let joined = settle(&mut m, false);
        assert!(!joined.is_empty() && joined.iter().all(|mv| mv.to == 4));
        m.draining.insert(4);
        let mut stuck = m.clone();
        settle(&mut stuck, false);
        assert!(
            stuck.peer_urls.contains_key(&4),
            "without placing a node again, the drain stalls"
        );
        let left = settle(&mut m, true);
        assert_eq!(left.len(), joined.len(), "{left:?}");
        assert!(!m.peer_urls.contains_key(&4), "the drained node is removed");
        for p in m.groups.values() {
            assert_eq!(p.members, [1, 2, 3].into(), "each group has its 3 replicas");
        }
        let placed_again = m.groups.values().filter(|p| p.removed.len() > 1).count();
        assert_eq!(
            placed_again,
            joined.len(),
            "each went back under a new raft id"
        );
    }

    #[test]
    fn a_replica_placed_but_not_voting_is_a_move_to_finish() {
        let mut m = cluster(4, &[(2, &[1, 2, 3, 4]), (3, &[1, 2, 3])]);
        let led = |group: u64, voters: &[u64]| Led {
            group,
            leader: voters.first().copied().unwrap_or(0),
            voters: voters.to_vec(),
            learners: Vec::new(),
            applied: 10,
        };
        let complete = [led(2, &[1, 2, 3, 4]), led(3, &[1, 2, 3])];
        assert_eq!(unfinished_placement(&m, &complete), None);
        let half_done = [led(2, &[1, 2, 3]), led(3, &[1, 2, 3])];
        assert_eq!(unfinished_placement(&m, &half_done), Some((2, 4)));
        let mut learning = half_done.clone();
        learning[0].learners = vec![4];
        assert_eq!(
            unfinished_placement(&m, &learning),
            None,
            "a learner serves"
        );
        let mut leaderless = half_done.clone();
        leaderless[0].leader = 0;
        assert_eq!(
            unfinished_placement(&m, &leaderless),
            None,
            "it waits for a leader"
        );
        let unknown = [led(2, &[]), led(3, &[1, 2, 3])];
        assert_eq!(
            unfinished_placement(&m, &unknown),
            None,
            "no view, no guess"
        );
        m.draining.insert(4);
        assert_eq!(unfinished_placement(&m, &half_done), None, "4 is leaving");
    }
}
