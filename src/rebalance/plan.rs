//! The rebalancer's decisions, as pure functions of the cluster's table of groups (and,
//! for leaders, of who leads what): which replica moves where next ([`next_step`]), which
//! half-done move to finish ([`unfinished_placement`]) and which leadership to hand over
//! ([`next_leader_transfer`]). `rebalance.rs` carries them out.
//!
//! Replicas move off a draining node first, each to the least loaded other node that can
//! take it, and a drained node is removed; otherwise a replica moves from the most loaded
//! node to the least loaded one, until every node hosts the mean number of replicas give
//! or take one. A node can take a replica of a group it is not in and (unless every
//! member reads entry format 3) was never removed from: placed again, a node hosts a new
//! replica under a new raft id (`replica_id.rs`), which a release before that format
//! cannot do. Leaders spread the same way: a node that leads two groups more than another
//! hands one over to it.
//!
//! Nothing here does anything: it must never touch the network, the table or a clock, so
//! that every decision can be tested on a table alone.

use std::collections::BTreeMap;

use crate::membership::{Membership, Placement};
use crate::router::CLUSTER_GROUP;

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
