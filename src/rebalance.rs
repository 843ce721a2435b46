//! Rebalancing: replicas move onto nodes that host fewer than their share, one at a
//! time, until every node of the cluster hosts the mean number of replicas give or take
//! one (a node that joins starts with none); and off a node that is leaving the cluster
//! (draining, asked for by removing a node that hosts replicas), which is then removed.
//!
//! The node that leads the cluster group decides what to do next (`rebalance/plan.rs`:
//! [`next_step`], [`unfinished_placement`], [`next_leader_transfer`]) and carries it out
//! here as an operator would, through this node's own client API (`run`, reached over
//! its peer port as a forwarded request): add the new node to the group as a learner (it
//! is sent the log or a snapshot, and does not vote, so the group's quorum is unchanged
//! while it catches up), wait until its replica has applied the group's log up to the
//! addition, promote it to a voter, then remove the old node, which deletes its copy.
//! The group has one replica more, not less, while a move runs, and a move that fails
//! half-way leaves it so (possibly as a learner, or placed and not yet added), never
//! short. Once replicas are balanced, a move that stopped between placing the new
//! replica in the table and the group's adding it is finished (otherwise its node would
//! count as a replica and serve nothing), and then leaders are spread the same way
//! (`POST /v1/groups/<g>/leader`), so that every node's share of the groups' write work
//! is even too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{info, warn, Logger};
use tokio::sync::watch;

use crate::cluster_id::{self, ClusterId};
use crate::entry_formats::{self, EntryFormats};
use crate::membership::{Membership, Placement, SharedMembership};
use crate::router::{Router, CLUSTER_GROUP};

mod plan;

use plan::{next_leader_transfer, next_step, unfinished_placement, Led, Move, Step};

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
