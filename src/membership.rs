//! Who is in the cluster and where to reach them: each member's peer URL, the ids that
//! were removed (a removed id is never reused, and its messages are refused), and the
//! table of raft groups beside the cluster group, with the nodes each was created on.
//!
//! The cluster group updates it when it applies a conf-change or group-creation entry, so
//! it is the same on every member that applied the same log; the peer transport and the
//! router read it. Peer URLs are checked
//! here, once, for every path they enter by (command line and HTTP).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use crate::replica_id::{self, MAX_NODE_ID};

/// The most voters the cluster group (the meta group: members, groups, shards) has.
/// Consensus on that table needs no more, and every voter more slows each change. The
/// members beyond them are the group's learners: each keeps a full, current copy of the
/// table, which it routes by, without voting; one is promoted when a voter leaves.
pub const CLUSTER_GROUP_VOTERS: usize = 5;

/// Shared between the node (the only writer) and the peer transport.
pub type SharedMembership = Arc<RwLock<Membership>>;

#[derive(Default, Debug, Clone)]
pub struct Membership {
    pub peer_urls: BTreeMap<u64, String>,
    pub removed: BTreeSet<u64>,
    /// Raft groups other than the cluster group, by id.
    pub groups: BTreeMap<u64, Placement>,
    /// The data groups that own the keys, by hash slot (`sharding.rs`); empty: every key
    /// is the cluster group's. Set once, when the cluster is formed.
    pub shards: Vec<u64>,
    /// Members leaving the cluster: they take no new replicas, theirs move to other nodes
    /// (`rebalance.rs`), and once they host none they are removed.
    pub draining: BTreeSet<u64>,
}

impl Membership {
    /// Every member but `own`.
    pub fn others(&self, own: u64) -> impl Iterator<Item = u64> + '_ {
        self.peer_urls.keys().copied().filter(move |&id| id != own)
    }
}

/// Where one raft group lives.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The nodes it was created on: each writes the same first log.
    pub initial: BTreeSet<u64>,
    /// The nodes that host a replica now; one added later starts empty and is sent the
    /// log or a snapshot by the group's leader.
    pub members: BTreeSet<u64>,
    /// The raft ids of the replicas removed from the group (`replica_id.rs`): a node
    /// placed in it again hosts a new replica under a new raft id, so that a late message
    /// for its old replica never reaches the new one. (Before replicas had incarnations,
    /// a node was never placed in a group again, and this held node ids: the same ids.)
    pub removed: BTreeSet<u64>,
}

impl Placement {
    /// How many of `node`'s replicas the group removed.
    pub fn times_removed(&self, node: u64) -> u64 {
        self.removed
            .iter()
            .filter(|&&replica| replica_id::node_of(replica) == node)
            .count() as u64
    }

    /// Whether `node` hosted the group before and was removed from it.
    pub fn was_removed(&self, node: u64) -> bool {
        self.times_removed(node) > 0
    }

    /// The raft id of `node`'s replica of the group: the one it hosts, or the one it
    /// would host if placed now.
    pub fn replica_of(&self, node: u64) -> u64 {
        replica_id::replica_id(node, self.times_removed(node))
    }
}

/// A member as `/v1/members` lists it.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ListedMember {
    pub id: u64,
    pub peer_url: String,
}

/// Checks that `url` is a `http://host:port` peer URL (`https://` when `tls`, the peers
/// speaking TLS) and returns it normalised (without a trailing slash).
pub fn parse_peer_url(url: &str, tls: bool) -> Result<String, String> {
    let trimmed = url.trim();
    let parsed =
        reqwest::Url::parse(trimmed).map_err(|e| format!("invalid peer URL {trimmed:?}: {e}"))?;
    let scheme = if tls { "https" } else { "http" };
    if parsed.scheme() != scheme {
        let why = if tls {
            "peers speak TLS (--peer-cert-file)"
        } else {
            "peers speak plain HTTP (no --peer-cert-file)"
        };
        return Err(format!(
            "peer URL {trimmed:?} must start with {scheme}://: {why}"
        ));
    }
    if parsed.host_str().is_none() || parsed.port().is_none() {
        return Err(format!("peer URL {trimmed:?} must name a host and a port"));
    }
    if parsed.path() != "/" || parsed.query().is_some() {
        return Err(format!(
            "peer URL {trimmed:?} must not have a path or query"
        ));
    }
    Ok(trimmed.trim_end_matches('/').to_string())
}

/// `host:port` of a peer URL that [`parse_peer_url`] accepted.
pub fn authority_of(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest)
}

/// The host of a peer URL that [`parse_peer_url`] accepted (brackets kept for IPv6).
pub fn host_of(url: &str) -> &str {
    let authority = authority_of(url);
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// Parses a node id: a positive integer up to [`MAX_NODE_ID`].
pub fn parse_node_id(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(id) if id > 0 && id <= MAX_NODE_ID => Ok(id),
        Ok(id) if id > 0 => Err(format!("node id {id} is above the largest, {MAX_NODE_ID}")),
        _ => Err(format!("node id {text:?} is not a positive integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls() {
        assert_eq!(
            parse_peer_url("http://127.0.0.1:42379/", false).unwrap(),
            "http://127.0.0.1:42379"
        );
        assert_eq!(
            parse_peer_url("https://localhost:42379", true).unwrap(),
            "https://localhost:42379"
        );
        assert_eq!(authority_of("https://localhost:42379"), "localhost:42379");
        assert_eq!(host_of("https://[::1]:42379"), "[::1]");
        assert!(parse_peer_url("http://127.0.0.1:1", true).is_err());
        for bad in [
            "",
            "127.0.0.1:42379",
            "https://127.0.0.1:1",
            "http://127.0.0.1",
            "http://h:1/x",
        ] {
            assert!(parse_peer_url(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_node_placed_again_hosts_its_next_replica() {
        let mut placement = Placement::default();
        assert_eq!(placement.replica_of(4), 4);
        assert!(!placement.was_removed(4));
        placement.removed.insert(4);
        placement.removed.insert(replica_id::replica_id(5, 0));
        assert_eq!(placement.replica_of(4), replica_id::replica_id(4, 1));
        placement.removed.insert(placement.replica_of(4));
        assert_eq!(placement.times_removed(4), 2);
        assert_eq!(placement.replica_of(4), replica_id::replica_id(4, 2));
        assert_eq!(placement.replica_of(3), 3);
    }

    #[test]
    fn node_ids() {
        assert_eq!(parse_node_id("4"), Ok(4));
        assert_eq!(parse_node_id("4294967295"), Ok(MAX_NODE_ID));
        for bad in ["0", "-1", "x", "", "4.0", "4294967296"] {
            assert!(parse_node_id(bad).is_err(), "{bad}");
        }
    }
}
