//! Automatic sharding: which raft group owns a key, and how a new cluster lays out its
//! data groups over its nodes.
//!
//! Keys are spread by a hash: the key's 64-bit FNV-1a hash picks a slot in the cluster's
//! list of shards (`Membership::shards`, set once when the cluster is formed with
//! `--shards`), and the slot names the group. The hash is written out here, not taken
//! from the standard library, so that it never changes between builds: every node must
//! route a key to the same group forever. An empty list means one shard, the cluster
//! group itself, which is how a cluster formed before sharding (or with `--shards 1`)
//! keeps its data where it was. This module is pure: no I/O, no locks.

use crate::command::Op;
use crate::router::CLUSTER_GROUP;

/// The group that owns `key` under the cluster's list of shards.
pub fn group_of(key: &[u8], shards: &[u64]) -> u64 {
    if shards.is_empty() {
        return CLUSTER_GROUP;
    }
    shards[(fnv1a(key) % shards.len() as u64) as usize]
}

/// The data groups of a new cluster of `nodes` nodes (ids 1..=nodes) split into
/// `shards` shards: groups 2, 3, ... each on `replicas` consecutive nodes, the first of
/// shard s being node s mod nodes + 1, so every node hosts as many replicas as any other
/// give or take one. One shard: none (the cluster group holds the keys).
pub fn initial_layout(shards: u64, nodes: u64, replicas: usize) -> Vec<(u64, Vec<u64>)> {
    if shards <= 1 {
        return Vec::new();
    }
    (0..shards)
        .map(|s| {
            let members = (0..replicas as u64).map(|r| (s + r) % nodes + 1).collect();
            (CLUSTER_GROUP + 1 + s, members)
        })
        .collect()
}

/// The entries a new cluster's cluster group starts with besides its members: the
/// creation of each data group of `initial_layout`, then the list of shards.
pub fn formation_ops(shards: u64, nodes: u64, replicas: usize) -> Vec<Op> {
    let layout = initial_layout(shards, nodes, replicas);
    if layout.is_empty() {
        return Vec::new();
    }
    let groups = layout.iter().map(|(group, _)| *group).collect();
    let mut ops: Vec<Op> = layout
        .into_iter()
        .map(|(group, members)| Op::CreateGroup { group, members })
        .collect();
    ops.push(Op::SetShards { groups });
    ops
}

/// 64-bit FNV-1a: simple, fast on short keys, and fixed forever.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_hash_is_fixed() {
        // Published FNV-1a test vectors: a changed hash would move keys between groups.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn keys_spread_over_every_shard_and_one_shard_is_the_cluster_group() {
        assert_eq!(group_of(b"anything", &[]), CLUSTER_GROUP);
        let shards: Vec<u64> = (2..10).collect();
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for i in 0..8000 {
            *counts
                .entry(group_of(format!("key{i}").as_bytes(), &shards))
                .or_default() += 1;
        }
        assert_eq!(counts.len(), 8);
        assert!(
            counts.values().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_initial_layout_spreads_replicas_evenly() {
        assert!(initial_layout(1, 3, 3).is_empty());
        let layout = initial_layout(8, 3, 2);
        assert_eq!(layout.len(), 8);
        assert_eq!(layout[0], (2, vec![1, 2]));
        assert_eq!(layout[2], (4, vec![3, 1]));
        let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, members) in &layout {
            assert_eq!(members.len(), 2);
            for m in members {
                *per_node.entry(*m).or_default() += 1;
            }
        }
        let (min, max) = (per_node.values().min(), per_node.values().max());
        assert!(max.unwrap() - min.unwrap() <= 1, "{per_node:?}");
    }
}
