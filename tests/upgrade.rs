//! Upgrades: a data dir written by the previous release starts under this build and
//! serves all its data, then takes new writes and survives a restart.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{free_port, http, node_spec, poll_until, TempDir};

/// The fixture's README says how it was made and what it holds.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v0.1.0-87b80d9/node1"
);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_data_dir_of_the_previous_release_starts_and_serves_its_data() {
    let dir = TempDir::new("upgrade");
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut node = node_spec(&dir.0, 1, &[peer], &[], false);
    copy_dir(Path::new(FIXTURE), &node.data_dir);
    node.start();
    // The old log ended at revision 47; the new leader's empty entry takes 48.
    poll_until(
        "the upgraded node to lead and apply its first entry",
        || {
            node.status()
                .is_some_and(|s| s["role"] == "Leader" && s["revision"] == 48)
        },
        || node.log_text(),
    );
    assert_eq!(http("GET", &node.url("key0"), None), (200, "value0".into()));
    // The old release let raft-engine recycle log files, so this first start took the
    // cut tail on trust; from now on every start judges it (src/log_tail.rs).
    assert!(node
        .data_dir
        .join("raft-log/raftkvd-log-tails-judged")
        .exists());
    assert_eq!(
        http("GET", &node.url("key35"), None),
        (200, "value35".into())
    );
    assert_eq!(http("GET", &node.url("after5"), None), (200, "a5".into()));
    assert_eq!(http("GET", &node.url("key3"), None).0, 404);
    let (code, body) = http("GET", &node.url("v1/kv/hello"), None);
    assert_eq!(code, 200, "{body}");
    let hello: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hello["value"], "world2");
    assert_eq!(hello["revision"], 47);
    let (code, body) = http("GET", &node.url("v1/kv/key35"), None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""revision":40"#), "{body}");

    // New writes land after the old ones, and the whole map survives a restart.
    let (code, body) = http("PUT", &node.url("v1/kv/new"), Some(b"v".to_vec()));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""revision":49"#), "{body}");
    node.signal("TERM");
    assert!(
        node.wait_exit(common::DEADLINE).success(),
        "{}",
        node.log_text()
    );
    node.start();
    poll_until(
        "the restarted node to serve the new key",
        || http("GET", &node.url("new"), None) == (200, "v".into()),
        || node.log_text(),
    );
    assert_eq!(http("GET", &node.url("key1"), None), (200, "value1".into()));
}

/// The fixture's README says how it was made: a release before 16bc608, whose snapshot
/// install forgot the raft id of a replica placed on a node for the second time.
const FORGOTTEN_ID_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/forgotten-replica-id-cc2fc3f"
);

/// The fixture's members stored these peer URLs in their logs; the test needs them free.
const FORGOTTEN_ID_PEERS: [&str; 3] = [
    "http://127.0.0.1:29101",
    "http://127.0.0.1:29102",
    "http://127.0.0.1:29103",
];

/// Node 3's replica of group 2 in the fixture is its second (incarnation 1), and its log
/// lost the record of that raft id when it installed the group's snapshot. Started under
/// this build, node 3 takes the id from the configuration its log stores and keeps its
/// data and its vote: it is not dropped as its first, removed, replica (which deleted the
/// log of a voter, so it rejoined empty), it serves every key from its own map, and it
/// applies new writes.
#[test]
fn a_replica_whose_raft_id_an_earlier_release_forgot_keeps_its_log() {
    let dir = TempDir::new("upgrade-forgotten-id");
    let peers: Vec<String> = FORGOTTEN_ID_PEERS.iter().map(|p| p.to_string()).collect();
    let mut nodes: Vec<common::Node> = (1..=3)
        .map(|id| {
            let node = node_spec(&dir.0, id, &peers, &[], false);
            copy_dir(
                &Path::new(FORGOTTEN_ID_FIXTURE).join(format!("n{id}")),
                &node.data_dir,
            );
            node
        })
        .collect();
    for node in &mut nodes {
        node.start();
    }
    let node3 = &nodes[2];
    let logs = || {
        nodes
            .iter()
            .map(|n| format!("--- node {}\n{}", n.id, n.log_text()))
            .collect::<String>()
    };
    poll_until(
        "node 3 to serve group 2 from its own replica",
        || {
            http(
                "GET",
                &node3.url("v1/groups/2/kv/h?consistency=serializable"),
                None,
            )
            .0 == 200
        },
        logs,
    );
    node3.assert_logged(
        "this replica's raft id was not recorded; taken from the configuration its log stores",
        "node 3 recovers its replica's raft id",
    );
    assert!(
        !node3.log_text().contains("dropped this node's replica"),
        "node 3 dropped its replica of group 2:\n{}",
        logs()
    );
    for (key, value) in [("a", "a-1"), ("e", "e-1"), ("f", "f-2"), ("h", "h-2")] {
        let url = node3.url(&format!("v1/groups/2/kv/{key}?consistency=serializable"));
        let (code, body) = common::http_json("GET", &url, None);
        assert_eq!((code, body["value"].as_str()), (200, Some(value)), "{body}");
    }
    let (code, body) = common::http_json(
        "PUT",
        &nodes[0].url("v1/groups/2/kv/new"),
        Some(serde_json::json!({ "value": "n" })),
    );
    assert_eq!(code, 200, "{body}\n{}", logs());
    poll_until(
        "node 3 to apply a new write",
        || {
            http(
                "GET",
                &node3.url("v1/groups/2/kv/new?consistency=serializable"),
                None,
            )
            .0 == 200
        },
        logs,
    );
}

/// Concurrent PUTs through node `via` (so that rounds carry several writes each), keys
/// `<prefix>-<thread>-<i>`; returns once all are acknowledged.
fn concurrent_puts(cluster: &common::Cluster, via: u64, prefix: &str) {
    let url = cluster.nodes[via as usize - 1].url("");
    std::thread::scope(|scope| {
        for thread in 0..16 {
            let url = url.clone();
            scope.spawn(move || {
                for i in 0..25 {
                    let (code, text) = http(
                        "PUT",
                        &format!("{url}{prefix}-{thread}-{i}"),
                        Some(b"v".to_vec()),
                    );
                    assert_eq!(code, 204, "{text}");
                }
            });
        }
    });
}

/// A rolling upgrade that brings new entry formats: while one member reads only the
/// oldest format (node 3 plays a member of an older release), the others write only that
/// format, so it applies every write and stays up, a node removed from a group is not
/// placed in it again (format 3), no lease is granted nor key attached to one (format
/// 4), no prefix is deleted (format 5), no transaction runs (format 6), and no watch of
/// several keys is relayed from it (an older release would watch the last only); once it
/// reads the newest too, the others start writing batches, may place the node again,
/// grant leases, delete prefixes, run transactions and relay such watches.
#[test]
fn a_new_entry_format_is_written_only_once_every_member_reads_it() {
    let mut cluster = common::Cluster::new("entry-format", 3, &["--enable-fault-injection"]);
    cluster.nodes[2].env = vec![("RAFTKVD_FAULT_ENTRY_FORMAT".into(), "1".into())];
    for node in &mut cluster.nodes {
        node.start();
    }
    let leader = cluster.wait_leader();
    concurrent_puts(&cluster, leader, "old");
    for thread in 0..16 {
        cluster.wait_value(3, &format!("old-{thread}-24"), "v");
    }
    let writes_batches = "entry format written changed: every member reads it, format: 6";
    assert!(!cluster.nodes[0].log_text().contains(writes_batches));
    // `/status` tells an operator how far the upgrade is: what a node reads, and what
    // every member reads (what the cluster writes).
    assert_eq!(
        entry_formats(&cluster.nodes[0]),
        (6, 1),
        "node 3 reads format 1 only"
    );
    assert_eq!(entry_formats(&cluster.nodes[2]).0, 1);
    assert_eq!(http("GET", &cluster.nodes[2].url("health"), None).0, 200);
    let groups = cluster.nodes[0].url("v1/groups");
    let (code, text) = http(
        "POST",
        &groups,
        Some(br#"{"id": 2, "members": [1, 2]}"#.to_vec()),
    );
    assert_eq!(code, 201, "{text}");
    let (code, text) = http("DELETE", &format!("{groups}/2/members/2"), None);
    assert_eq!(code, 200, "{text}");
    let place_2_again = || {
        http(
            "POST",
            &format!("{groups}/2/members"),
            Some(br#"{"id": 2}"#.to_vec()),
        )
    };
    let (code, text) = place_2_again();
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("entry format 3"), "{text}");
    let leases = cluster.nodes[0].url("v1/leases");
    let grant = || http("POST", &leases, Some(br#"{"ttl_seconds": 60}"#.to_vec()));
    let (code, text) = grant();
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("entry format 4"), "{text}");
    let leased_put = http(
        "PUT",
        &cluster.nodes[0].url(&format!("v1/kv/leased?lease={}", 1u64 << 32 | 1)),
        Some(b"v".to_vec()),
    );
    assert_eq!(leased_put.0, 409, "{leased_put:?}");
    let delete_old = cluster.nodes[0].url("v1/kv?prefix=old-");
    let delete_prefix = || http("DELETE", &delete_old, None);
    let (code, text) = delete_prefix();
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("entry format 5"), "{text}");
    let txn_url = cluster.nodes[0].url("v1/txn");
    let txn = || {
        let body = br#"{"compare": [{"key": "old-0-0", "value": "v"}], "success": [{"delete": {"key": "old-0-0"}}]}"#;
        http("POST", &txn_url, Some(body.to_vec()))
    };
    let (code, text) = txn();
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("entry format 6"), "{text}");
    // A transaction that only reads takes no entry, so it runs already.
    let body = br#"{"compare": [{"key": "old-0-0", "value": "v"}], "success": [{"get": {"key": "old-0-1"}}]}"#;
    let (code, text) = http("POST", &txn_url, Some(body.to_vec()));
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"succeeded\":true"), "{text}");
    // Group 3 lives on node 3 alone: node 1 relays its watches from there, but not one
    // of several keys, which an older release would cut to the last.
    let (code, text) = http(
        "POST",
        &groups,
        Some(br#"{"id": 3, "members": [3]}"#.to_vec()),
    );
    assert_eq!(code, 201, "{text}");
    let node1_watch = cluster.nodes[0].url("v1/groups/3/watch");
    let group_3_watch = |query: &str| format!("{node1_watch}?{query}");
    poll_until(
        "group 3 to serve a watch of one key through node 3",
        || {
            let client = reqwest::blocking::Client::new();
            let answer = client.get(group_3_watch("key=a")).send();
            answer.is_ok_and(|a| a.status() == 200)
        },
        || cluster.logs(),
    );
    let (code, text) = http("GET", &group_3_watch("key=a&key=b"), None);
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("older release"), "{text}");

    // Node 3 is upgraded: the others hear it reads batches, and write them.
    let node3 = cluster.node(3);
    node3.signal("TERM");
    assert!(node3.wait_exit(Duration::from_secs(15)).success());
    node3.env.clear();
    node3.start();
    poll_until(
        "nodes 1 and 2 to write batches",
        || {
            // A node decides what it writes when it has something to write.
            cluster.nodes[..2].iter().all(|n| {
                http("PUT", &n.url("probe"), Some(b"v".to_vec()));
                n.log_text().contains(writes_batches)
            })
        },
        || cluster.logs(),
    );
    assert_eq!(
        entry_formats(&cluster.nodes[0]),
        (6, 6),
        "every member reads format 6 now"
    );
    assert_eq!(entry_formats(&cluster.nodes[2]).0, 6);
    let leader = cluster.wait_leader();
    concurrent_puts(&cluster, leader, "new");
    for thread in 0..16 {
        cluster.wait_value(3, &format!("new-{thread}-24"), "v");
    }
    let (code, text) = place_2_again();
    assert_eq!(code, 201, "every member reads format 3 now: {text}");
    let (code, text) = grant();
    assert_eq!(code, 201, "every member reads format 4 now: {text}");
    let (code, text) = txn();
    assert_eq!(code, 200, "every member reads format 6 now: {text}");
    assert!(text.contains("\"succeeded\":true"), "{text}");
    let (code, text) = delete_prefix();
    assert_eq!(code, 200, "every member reads format 5 now: {text}");
    assert!(
        text.contains("\"deleted\":399"),
        "16 threads of 25 old keys, one deleted by the transaction: {text}"
    );
    let several = reqwest::blocking::Client::new()
        .get(group_3_watch("key=a&key=b"))
        .send()
        .unwrap();
    assert_eq!(several.status(), 200);
}

/// A node's `entry_format` and `cluster_entry_format` from `/status`: the newest entry
/// format it reads, and the newest every member reads (what the cluster writes).
fn entry_formats(node: &common::Node) -> (u64, u64) {
    (
        node.status_u64("entry_format"),
        node.status_u64("cluster_entry_format"),
    )
}

/// Once every member has said it reads the newest format, a member added later counts
/// as reading it too until it talks (etcd's cluster version never goes down either): in
/// the time between `POST /<id>` and the new node's first word, the cluster keeps
/// writing batches and takes transactions and leases (all were refused or off before).
/// The new node then joins and serves what was written meanwhile.
#[test]
fn a_member_added_later_counts_as_reading_what_the_cluster_writes() {
    let mut cluster = common::Cluster::start("format-reached", 3, &[]);
    cluster.wait_leader();
    poll_until(
        "every node to hear that every member reads the newest format",
        || cluster.nodes.iter().all(|n| entry_formats(n) == (6, 6)),
        || cluster.logs(),
    );
    // Each node logs the format it writes when it first proposes (then at each change).
    for id in 1..=3 {
        cluster.put_ok(id, &format!("first{id}"), "v");
    }
    let mut urls: Vec<String> = cluster.nodes.iter().map(|n| n.peer_url.clone()).collect();
    urls.push(format!("http://127.0.0.1:{}", free_port()));
    let (code, text) = http(
        "POST",
        &cluster.nodes[0].url("4"),
        Some(urls[3].clone().into_bytes()),
    );
    assert_eq!(code, 204, "{text}");
    let changes = |node: &common::Node| {
        node.log_text()
            .matches("entry format written changed")
            .count()
    };
    let before: Vec<usize> = cluster.nodes.iter().map(changes).collect();
    // Node 4 is a member that no one has heard from.
    for node in &cluster.nodes {
        assert_eq!(entry_formats(node), (6, 6), "node {}", node.id);
    }
    let txn = br#"{"compare": [{"key": "meanwhile", "revision": 0}], "success": [{"put": {"key": "meanwhile", "value": "v"}}]}"#;
    let (code, text) = http("POST", &cluster.nodes[1].url("v1/txn"), Some(txn.to_vec()));
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"succeeded\":true"), "{text}");
    let grant = br#"{"ttl_seconds": 60}"#.to_vec();
    let (code, text) = http("POST", &cluster.nodes[2].url("v1/leases"), Some(grant));
    assert_eq!(code, 201, "{text}");
    for i in 0..20 {
        cluster.put_ok(1 + i % 3, &format!("k{i}"), "v");
    }
    let after: Vec<usize> = cluster.nodes.iter().map(changes).collect();
    assert_eq!(before, after, "no node fell back to an older format");

    cluster.add_node_spec(4, &urls, &[], true);
    cluster.node(4).start();
    cluster.wait_value(4, "meanwhile", "v");
    cluster.wait_value(4, "k19", "v");
}
