//! The raftexample walkthroughs (issue 2), each against real raftkvd processes.

mod common;

use common::{http, Cluster};
use std::time::Duration;

/// Walkthrough 1: a single-node cluster stores and returns a value.
#[test]
fn single_node_put_then_get() {
    let cluster = Cluster::start("single", 1, &[]);
    let n1 = &cluster.nodes[0];
    assert_eq!(
        http("PUT", &n1.url("my-key"), Some(b"hello".to_vec())).0,
        204
    );
    assert_eq!(http("GET", &n1.url("my-key"), None), (200, "hello".into()));
    assert_eq!(http("GET", &n1.url("other-key"), None).0, 404);
}

/// Walkthrough 2: a PUT on any node of three is readable on every node.
#[test]
fn three_nodes_put_anywhere_read_everywhere() {
    let cluster = Cluster::start("three", 3, &[]);
    for writer in 1..=3u64 {
        let key = format!("key-from-{writer}");
        cluster.put_ok(writer, &key, &format!("value-{writer}"));
        for reader in 1..=3u64 {
            cluster.wait_value(reader, &key, &format!("value-{writer}"));
        }
    }
}

/// Walkthrough 3a: kill -9 a follower, write through another node, the survivors serve
/// it; the restarted node catches up and serves the new value.
#[test]
fn killed_follower_restarts_and_catches_up() {
    let mut cluster = Cluster::start("follower-restart", 3, &[]);
    let leader = cluster.wait_leader();
    cluster.put_ok(leader, "my-key", "foo");
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    let writer = (1..=3).find(|&id| id != leader && id != victim).unwrap();
    cluster.node(victim).kill();

    cluster.put_ok(writer, "my-key", "bar");
    cluster.wait_value(leader, "my-key", "bar");
    cluster.wait_value(writer, "my-key", "bar");

    cluster.node(victim).start();
    cluster.wait_value(victim, "my-key", "bar");
}

/// Walkthrough 3b: killing the leader elects a new one, which takes writes; the old
/// leader comes back as a follower and catches up.
#[test]
fn leader_failover_and_old_leader_rejoins_as_follower() {
    let mut cluster = Cluster::start("failover", 3, &[]);
    let old = cluster.wait_leader();
    cluster.put_ok(old, "k", "before");
    cluster.node(old).kill();

    let new = cluster.wait_leader();
    assert_ne!(new, old);
    cluster.put_ok(new, "k", "after");

    cluster.node(old).start();
    cluster.wait_value(old, "k", "after");
    let status = cluster.node(old).status().unwrap();
    assert_eq!(status["role"], "Follower", "{status}");
    assert_eq!(
        cluster.wait_leader(),
        new,
        "the returning node must not disrupt the leader"
    );
}

/// Walkthrough 4: add node 4 (POST + --join), it catches up and serves keys; remove node
/// 3 (DELETE), it exits by itself with status 0 and refuses to restart on its old data.
#[test]
fn add_a_fourth_node_then_remove_the_third() {
    let mut cluster = Cluster::start("membership", 3, &[]);
    cluster.put_ok(1, "my-key", "before-join");

    // Add node 4 through node 1, whether or not it leads.
    cluster.add_member(4, 1, &[]);
    cluster.wait_value(4, "my-key", "before-join");
    cluster.put_ok(4, "written-on-4", "yes");
    for id in 1..=3 {
        cluster.wait_value(id, "written-on-4", "yes");
    }
    let members = cluster.node(1).status().unwrap()["members"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(members, 4);

    // Remove node 3 through node 1.
    let (code, body) = http("DELETE", &cluster.nodes[0].url("3"), None);
    assert_eq!(code, 204, "{body}");
    let status = cluster.node(3).wait_exit(Duration::from_secs(20));
    assert!(status.success(), "node 3 exited with {status}");
    cluster
        .node(3)
        .assert_logged("removed from the cluster", "node 3 must say why it exits");

    // The rest keep serving.
    cluster.put_ok(2, "after-removal", "ok");
    for id in [1, 2, 4] {
        cluster.wait_value(id, "after-removal", "ok");
    }

    // Its id is not reused.
    let (code, text) = http(
        "POST",
        &cluster.nodes[0].url("3"),
        Some(cluster.node(3).peer_url.clone().into_bytes()),
    );
    assert_eq!(code, 409, "{text}");

    // Node 3 refuses to start again on its old data, with a clear message.
    cluster.node(3).start();
    let status = cluster.node(3).wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    cluster.node(3).assert_logged(
        "refusing to start",
        "a removed node must say why it refuses",
    );
}

/// A rolling restart costs no election timeout: SIGTERM on the leader hands leadership to
/// a follower (raft's MsgTimeoutNow) before the process exits 0.
#[test]
fn sigterm_on_the_leader_hands_off_leadership() {
    let mut cluster = Cluster::start("handoff", 3, &[]);
    let old = cluster.wait_leader();
    cluster.put_ok(old, "k", "v");
    cluster.node(old).signal("TERM");
    let status = cluster.node(old).wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    cluster
        .node(old)
        .assert_logged("leadership handed off", "it must hand off before exiting");

    let new = cluster.wait_leader();
    assert_ne!(new, old);
    cluster.node(new).assert_logged(
        "MsgTimeoutNow",
        "the new leader must have been elected by the hand-off",
    );
    cluster.put_ok(new, "k", "after");
}
