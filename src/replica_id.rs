//! A replica's raft id: which node hosts it, and which of that node's replicas of the
//! group it is. Raft needs a fresh id for a replica that starts over with an empty log:
//! a node removed from a group forgot its log and its votes, so if it came back under its
//! old id, a vote or an acknowledgement it gave before its removal could be given again,
//! differently, by the empty replica (two leaders in one term; an entry counted as
//! replicated where it no longer is). TiKV gives every peer a new id for the same reason.
//!
//! So a replica's raft id is its node id in the low 32 bits and its *incarnation* (how
//! many times that node was removed from the group before) in the high 32: a node's first
//! replica of a group has the node id itself as raft id, as every release before this one
//! used, and the cluster group, from which a node is removed only once, never has another.
//! The API, the table of groups and the transport speak node ids; a group translates at
//! its edge (`node/group.rs`), and the transport addresses a message by the node part of
//! its raft ids. This module must never let an id's node part and incarnation overlap.

/// The largest node id: the rest of a raft id's bits count incarnations.
pub const MAX_NODE_ID: u64 = u32::MAX as u64;

/// The raft id of `node`'s replica number `incarnation` (0: its first) of a group.
pub fn replica_id(node: u64, incarnation: u64) -> u64 {
    debug_assert!(node <= MAX_NODE_ID && incarnation <= MAX_NODE_ID);
    (incarnation << 32) | (node & MAX_NODE_ID)
}

/// The node that hosts the replica with raft id `replica` (0 stays 0: raft's "none").
pub fn node_of(replica: u64) -> u64 {
    replica & MAX_NODE_ID
}

/// How many replicas of the group the node of `replica` had before this one.
pub fn incarnation_of(replica: u64) -> u64 {
    replica >> 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_replica_is_its_node_and_later_ones_count_up() {
        assert_eq!(
            replica_id(7, 0),
            7,
            "the raft id every earlier release used"
        );
        let second = replica_id(7, 1);
        assert_ne!(second, 7);
        assert_eq!((node_of(second), incarnation_of(second)), (7, 1));
        let last = replica_id(MAX_NODE_ID, MAX_NODE_ID);
        assert_eq!(
            (node_of(last), incarnation_of(last)),
            (MAX_NODE_ID, MAX_NODE_ID)
        );
        assert_eq!(node_of(0), 0);
    }
}
