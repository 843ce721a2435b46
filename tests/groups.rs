//! Many raft groups in one process (seed 002's workflow): an operator creates a group on
//! chosen nodes, and every node of the cluster serves its keys, forwarding to a node that
//! hosts it. Real processes, real HTTP, real disk.

mod common;

use common::{http, http_json, Cluster};
use serde_json::{json, Value};

/// PUTs `value` at `key` of group `group` through node `via` until a 200 (retrying 503s
/// while the group elects its leader); returns the answer.
fn put_in_group(cluster: &Cluster, via: u64, group: u64, key: &str, value: &str) -> Value {
    let node = cluster.nodes.iter().find(|n| n.id == via).unwrap();
    let url = node.url(&format!("v1/groups/{group}/kv/{key}"));
    let mut answer = Value::Null;
    cluster.wait_until(
        &format!("PUT {key} in group {group} via node {via}"),
        || {
            let (code, body) = http("PUT", &url, Some(value.as_bytes().to_vec()));
            assert!(code == 200 || code == 503, "PUT {url}: {code} {body}");
            answer = serde_json::from_str(&body).unwrap_or(Value::Null);
            code == 200
        },
    );
    answer
}

/// The value of `key` in group `group` as node `via` serves it (linearizable).
fn get_in_group(cluster: &Cluster, via: u64, group: u64, key: &str) -> (u16, Value) {
    let node = cluster.nodes.iter().find(|n| n.id == via).unwrap();
    http_json(
        "GET",
        &node.url(&format!("v1/groups/{group}/kv/{key}")),
        None,
    )
}

fn group_of(list: &Value, id: u64) -> &Value {
    list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == id)
        .unwrap_or_else(|| panic!("group {id} missing from {list}"))
}

#[test]
fn a_group_on_two_nodes_is_served_by_every_node() {
    let cluster = Cluster::start("groups-basic", 3, &[]);
    let url = |id: u64, path: &str| cluster.nodes[id as usize - 1].url(path);

    // Bad requests are refused with the reason; nothing is created.
    for (body, why) in [
        (json!({"id": 2, "members": [1, 9]}), "not a member"),
        (json!({"id": 2, "members": []}), "one or more"),
        (json!({"id": 2, "members": [1, 1]}), "distinct"),
        (json!({"id": 0, "members": [1]}), "positive"),
        (
            json!({"id": 2, "members": [1], "extra": 1}),
            "unknown field",
        ),
        (json!({"members": [1]}), "missing field"),
    ] {
        let (code, answer) = http_json("POST", &url(1, "v1/groups"), Some(body.clone()));
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(why), "{answer}");
    }
    let (code, answer) = http_json(
        "POST",
        &url(1, "v1/groups"),
        Some(json!({"id": 1, "members": [1]})),
    );
    assert_eq!(code, 409, "the cluster group exists: {answer}");

    let (code, answer) = http_json(
        "POST",
        &url(3, "v1/groups"),
        Some(json!({"id": 2, "members": [2, 1]})),
    );
    assert_eq!(code, 201, "{answer}");
    assert_eq!(answer["members"], json!([1, 2]));
    let (code, answer) = http_json(
        "POST",
        &url(2, "v1/groups"),
        Some(json!({"id": 2, "members": [3]})),
    );
    assert_eq!(code, 409, "{answer}");

    // Written through node 3, which does not host group 2: forwarded.
    let written = put_in_group(&cluster, 3, 2, "greeting", "hello");
    assert_eq!(written["key"], "greeting");
    for via in 1..=3 {
        let (code, answer) = get_in_group(&cluster, via, 2, "greeting");
        assert_eq!(
            (code, &answer["value"]),
            (200, &json!("hello")),
            "via node {via}"
        );
        assert_eq!(answer["revision"], written["revision"]);
    }
    // Groups do not share keys.
    assert_eq!(http("GET", &url(1, "greeting"), None).0, 404);
    assert_eq!(get_in_group(&cluster, 1, 1, "greeting").0, 404);
    cluster.put_ok(1, "only-in-1", "x");
    assert_eq!(get_in_group(&cluster, 3, 2, "only-in-1").0, 404);

    // Every node lists both groups with the contract's fields.
    for via in 1..=3 {
        let (code, list) = http_json("GET", &url(via, "v1/groups"), None);
        assert_eq!(code, 200);
        let g1 = group_of(&list, 1);
        assert_eq!(g1["members"], json!([1, 2, 3]), "{list}");
        let g2 = group_of(&list, 2);
        assert_eq!(g2["members"], json!([1, 2]), "via {via}: {list}");
        assert_eq!(g2["keys"], 1, "via {via}: {list}");
        assert!([1, 2].contains(&g2["leader"].as_u64().unwrap()), "{list}");
        for field in ["term", "applied"] {
            assert!(g2[field].as_u64().unwrap() > 0, "{field}: {list}");
        }
        let (code, one) = http_json("GET", &url(via, "v1/groups/2"), None);
        assert_eq!((code, &one["id"]), (200, &json!(2)), "{one}");
    }
    let (code, answer) = http_json("GET", &url(3, "v1/groups/9/kv/x"), None);
    assert_eq!(code, 404, "{answer}");
    // A node asked by another node for a group it does not know (its table is behind)
    // must not answer "no such group": that 404 would read as "no such key" where it is
    // relayed. It answers 421 marked not-hosted, and the forwarder tries elsewhere.
    let client = reqwest::blocking::Client::new();
    let (_, members) = http_json("GET", &url(3, "v1/members"), None);
    let answer = client
        .get(format!(
            "{}/client/v1/groups/9/kv/x",
            cluster.nodes[2].peer_url
        ))
        .header("x-raftkvd-forwarded", "1")
        .header(
            "x-raftkvd-cluster-id",
            members["cluster_id"].as_str().unwrap(),
        )
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 421);
    assert_eq!(answer.headers()["x-raftkvd-not-hosted"], "true");
    let (code, _) = http_json("GET", &url(3, "v1/groups/x"), None);
    assert_eq!(code, 400);

    // A delete through the forwarding node, and a compare-and-swap that fails.
    let (code, answer) = http_json("DELETE", &url(3, "v1/groups/2/kv/greeting"), None);
    assert_eq!((code, &answer["deleted"]), (200, &json!(1)), "{answer}");
    let (code, answer) = http_json(
        "PUT",
        &url(3, "v1/groups/2/kv/greeting?if_revision=1"),
        Some(json!({"value": "late"})),
    );
    assert_eq!(code, 412, "{answer}");
    assert_eq!(get_in_group(&cluster, 1, 2, "greeting").0, 404);
}

#[test]
fn groups_survive_restarts_and_the_loss_of_one_member() {
    // Snapshots every 20 writes, so group 2's restart goes through its own snapshot.
    let flags = ["--snapshot-count", "20", "--snapshot-catchup-entries", "5"];
    let mut cluster = Cluster::start("groups-restart", 3, &flags);
    let (code, answer) = http_json(
        "POST",
        &cluster.nodes[0].url("v1/groups"),
        Some(json!({"id": 7, "members": [1, 2, 3]})),
    );
    assert_eq!(code, 201, "{answer}");
    for i in 0..50 {
        put_in_group(&cluster, 1 + i % 3, 7, &format!("k{i}"), &format!("v{i}"));
    }
    cluster.wait_until("group 7 to write a snapshot on node 2", || {
        std::fs::read_dir(cluster.nodes[1].data_dir.join("groups/7/snap"))
            .is_ok_and(|mut d| d.next().is_some())
    });

    // One member down: the group keeps its quorum and takes writes through every node
    // still up.
    cluster.node(3).kill();
    for via in [1, 2] {
        put_in_group(&cluster, via, 7, &format!("while-3-down-{via}"), "y");
    }
    cluster.node(3).start();
    cluster.wait_until("node 3 to catch up on group 7", || {
        get_in_group(&cluster, 3, 7, "while-3-down-2").0 == 200
    });

    // The whole cluster killed and started again: every group and key comes back.
    for id in 1..=3 {
        cluster.node(id).kill();
    }
    for id in 1..=3 {
        cluster.node(id).start();
    }
    cluster.wait_leader();
    for i in (0..50).step_by(7) {
        let via = 1 + i % 3;
        cluster.wait_until(&format!("k{i} in group 7 via node {via}"), || {
            let (code, answer) = get_in_group(&cluster, via, 7, &format!("k{i}"));
            code == 200 && answer["value"] == format!("v{i}")
        });
    }
    let (code, list) = http_json("GET", &cluster.nodes[2].url("v1/groups"), None);
    assert_eq!(code, 200);
    assert_eq!(group_of(&list, 7)["keys"], 52, "{list}");
}

#[test]
fn a_node_that_joins_the_cluster_hosts_no_group_but_serves_them_all() {
    let mut cluster = Cluster::start("groups-join", 3, &[]);
    let (code, answer) = http_json(
        "POST",
        &cluster.nodes[0].url("v1/groups"),
        Some(json!({"id": 2, "members": [2, 3]})),
    );
    assert_eq!(code, 201, "{answer}");
    put_in_group(&cluster, 1, 2, "before-4", "a");
    cluster.add_member(4, 1, &[]);
    cluster.wait_until("node 4 to learn the table of groups", || {
        http_json("GET", &cluster.nodes[3].url("v1/groups/2"), None).0 == 200
    });
    let (_, one) = http_json("GET", &cluster.nodes[3].url("v1/groups/2"), None);
    assert_eq!(one["members"], json!([2, 3]), "{one}");
    let (code, answer) = get_in_group(&cluster, 4, 2, "before-4");
    assert_eq!((code, &answer["value"]), (200, &json!("a")), "{answer}");
    put_in_group(&cluster, 4, 2, "from-4", "b");
    assert!(
        !cluster.nodes[3].data_dir.join("groups").exists(),
        "node 4 must not hold a replica of group 2"
    );

    // A node that hosts a replica leaves the cluster only after its replica moved to
    // another node (202 at once); one that hosts none is removed at once.
    let (code, text) = http("DELETE", &cluster.nodes[0].url("3"), None);
    assert_eq!(code, 202, "{text}");
    assert!(text.contains("groups [2]"), "{text}");
    let status = cluster.node(3).wait_exit(common::DEADLINE);
    assert!(
        status.success(),
        "node 3 exits 0 once drained and removed: {status}"
    );
    let (code, one) = http_json("GET", &cluster.nodes[0].url("v1/groups/2"), None);
    assert_eq!(code, 200, "{one}");
    let members = one["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "group 2 kept its two replicas: {one}");
    assert!(!members.contains(&json!(3)), "{one}");
    let (code, answer) = get_in_group(&cluster, 4, 2, "from-4");
    assert_eq!((code, &answer["value"]), (200, &json!("b")), "{answer}");
    let idle = [1, 4]
        .into_iter()
        .find(|id| !members.contains(&json!(id)))
        .unwrap();
    // Node 3 may have led the cluster group (its own rebalancer then removed it): let
    // the others elect a leader first, since a proposal lost with a dead leader is not
    // proposed again yet.
    cluster.wait_leader();
    let (code, text) = http("DELETE", &cluster.nodes[1].url(&idle.to_string()), None);
    assert_eq!(code, 204, "node {idle} hosts no data group: {text}");
    let status = cluster.node(idle).wait_exit(common::DEADLINE);
    assert!(
        status.success(),
        "node {idle} exits 0 once removed: {status}"
    );
}

#[test]
fn a_group_gains_a_member_by_snapshot_and_a_removed_member_drops_its_data() {
    let flags = ["--snapshot-count", "20", "--snapshot-catchup-entries", "5"];
    let mut cluster = Cluster::start("groups-members", 3, &flags);
    let url = |cluster: &Cluster, id: u64, path: &str| cluster.nodes[id as usize - 1].url(path);
    let (code, answer) = http_json(
        "POST",
        &url(&cluster, 1, "v1/groups"),
        Some(json!({"id": 5, "members": [1, 2]})),
    );
    assert_eq!(code, 201, "{answer}");
    for i in 0..60 {
        put_in_group(&cluster, 1, 5, &format!("k{i}"), &format!("v{i}"));
    }

    // Node 3 joins group 5 (asked through node 3 itself, which forwards): the log it
    // needs was compacted, so it is sent a snapshot.
    let add = |cluster: &Cluster, via: u64, id: u64| {
        http_json(
            "POST",
            &url(cluster, via, "v1/groups/5/members"),
            Some(json!({ "id": id })),
        )
    };
    let (code, answer) = add(&cluster, 3, 9);
    assert_eq!(code, 400, "not a cluster member: {answer}");
    // First as a learner: it gets the group's data but does not vote.
    let (code, answer) = http_json(
        "POST",
        &url(&cluster, 3, "v1/groups/5/members"),
        Some(json!({ "id": 3, "learner": true })),
    );
    assert_eq!(code, 201, "{answer}");
    assert_eq!(answer["members"], json!([1, 2, 3]));
    assert_eq!(answer["learners"], json!([3]));
    cluster.wait_until("node 3 to install group 5's snapshot", || {
        cluster.nodes[2]
            .log_text()
            .contains("installed a snapshot from the leader")
    });
    let node3 = &cluster.nodes[2];
    let serializable = |key: &str| {
        http_json(
            "GET",
            &node3.url(&format!("v1/groups/5/kv/{key}?consistency=serializable")),
            None,
        )
    };
    cluster.wait_until("node 3's own replica to hold k59", || {
        serializable("k59").1["value"] == "v59"
    });
    assert_eq!(serializable("k0").1["value"], "v0");
    // Then promoted to a voter.
    let (code, answer) = add(&cluster, 2, 3);
    assert_eq!(code, 201, "promotion: {answer}");
    assert_eq!(answer["learners"], json!([]));
    let (code, answer) = add(&cluster, 2, 3);
    assert_eq!(code, 409, "already a member: {answer}");

    // Node 1 leaves group 5: it deletes the group's data, keeps serving group 1 and
    // still answers for group 5 by forwarding.
    let (code, answer) = http_json("DELETE", &url(&cluster, 2, "v1/groups/5/members/1"), None);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["members"], json!([2, 3]));
    let group_dir = cluster.nodes[0].data_dir.join("groups/5");
    cluster.wait_until("node 1 to delete its replica of group 5", || {
        !group_dir.exists()
    });
    cluster.put_ok(1, "still-serving", "yes");
    put_in_group(&cluster, 1, 5, "after-removal", "z");
    assert_eq!(get_in_group(&cluster, 1, 5, "k7").1["value"], "v7");
    let (code, answer) = http_json("DELETE", &url(&cluster, 2, "v1/groups/5/members/1"), None);
    assert_eq!(code, 409, "{answer}");
    let (code, answer) = http_json("DELETE", &url(&cluster, 2, "v1/groups/1/members/1"), None);
    assert_eq!(
        code, 409,
        "the cluster group changes through /v1/members: {answer}"
    );

    // Restarted, node 1 does not bring the replica back, though the table's log says
    // it was created there (storage.rs's tombstone test covers a replay that stops
    // between the creation and the removal).
    cluster.node(1).kill();
    cluster.node(1).start();
    cluster.wait_until("node 1 to serve group 5 again, by forwarding", || {
        get_in_group(&cluster, 1, 5, "after-removal").0 == 200
    });
    assert!(!group_dir.exists(), "the dropped replica came back");
    cluster.wait_leader();

    // Placed in group 5 again, node 1 hosts a new replica under a new raft id, sent the
    // group's data by snapshot; twice, and across a restart (while the cluster group
    // replays a table older than the replica).
    let own_replica_of_1 = |cluster: &Cluster, key: &str| {
        let path = format!("v1/groups/5/kv/{key}?consistency=serializable");
        http_json("GET", &cluster.nodes[0].url(&path), None).1["value"].clone()
    };
    let count_logged =
        |cluster: &Cluster, line: &str| cluster.nodes[0].log_text().matches(line).count();
    for again in ["again-1", "again-2"] {
        let installed = count_logged(&cluster, "installed a snapshot from the leader");
        let (code, answer) = add(&cluster, 2, 1);
        assert_eq!(code, 201, "a removed node hosts the group again: {answer}");
        assert_eq!(answer["members"], json!([1, 2, 3]), "{answer}");
        put_in_group(&cluster, 3, 5, again, "yes");
        cluster.wait_until("node 1's new replica to hold the group's keys", || {
            own_replica_of_1(&cluster, again) == "yes"
        });
        assert_eq!(own_replica_of_1(&cluster, "k7"), "v7");
        // (Until then a read on node 1 is forwarded to a host.)
        cluster.wait_until(
            "node 1's new replica to install the group's snapshot",
            || count_logged(&cluster, "installed a snapshot from the leader") > installed,
        );
        let dropped =
            |cluster: &Cluster| count_logged(cluster, "dropped this node's replica of a group");
        let dropped_before = dropped(&cluster);
        cluster.node(1).kill();
        cluster.node(1).start();
        cluster.wait_until("node 1's replica to come back with its data", || {
            own_replica_of_1(&cluster, again) == "yes"
        });
        // Its cluster group has replayed the table of groups (two writes through node 1
        // applied there, the second after the round that handled the first's events),
        // and the replica is the one it was: it did not take itself for the replica
        // removed before (its raft id was kept through the snapshot it installed), drop
        // its own log and come back empty, a voter without its log.
        cluster.put_ok(1, &format!("{again}-settled"), "yes");
        cluster.put_ok(1, &format!("{again}-settled"), "again");
        assert_eq!(
            dropped(&cluster),
            dropped_before,
            "restarted, node 1 dropped its replica of group 5:\n{}",
            cluster.nodes[0].log_text()
        );
        put_in_group(&cluster, 1, 5, &format!("{again}-after-restart"), "yes");
        if again == "again-1" {
            let (code, answer) =
                http_json("DELETE", &url(&cluster, 2, "v1/groups/5/members/1"), None);
            assert_eq!(code, 200, "{answer}");
            cluster.wait_until("node 1 to delete its second replica of group 5", || {
                !group_dir.exists()
            });
        }
    }
    cluster.nodes[0].assert_logged(
        "started an empty replica; the group's leader sends it the log",
        "a replica placed again starts empty",
    );
    cluster.wait_leader();

    // Down to one member, then no further.
    for gone in [2, 3] {
        let path = format!("v1/groups/5/members/{gone}");
        let (code, answer) = http_json("DELETE", &url(&cluster, 1, &path), None);
        assert_eq!(code, 200, "{answer}");
    }
    let (code, answer) = http_json("DELETE", &url(&cluster, 3, "v1/groups/5/members/1"), None);
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("last member of group 5"),
        "{answer}"
    );
    assert_eq!(
        get_in_group(&cluster, 2, 5, "again-2-after-restart").1["value"],
        "yes"
    );
}

/// A member added to a group while the group has no leader is placed in the table of
/// groups but never added by the group (503 to the operator): its node would count as a
/// replica and serve nothing. Once the group has a leader again, the rebalancer finishes
/// the move: the node becomes a voter and serves the group's keys from its own replica.
#[test]
fn a_member_placed_but_never_added_is_finished_by_the_rebalancer() {
    let mut cluster = Cluster::start("groups-unfinished", 4, &[]);
    let url = |cluster: &Cluster, id: u64, path: &str| cluster.nodes[id as usize - 1].url(path);
    let (code, answer) = http_json(
        "POST",
        &url(&cluster, 1, "v1/groups"),
        Some(json!({"id": 2, "members": [1, 2]})),
    );
    assert_eq!(code, 201, "{answer}");
    for i in 0..10 {
        put_in_group(&cluster, 1, 2, &format!("k{i}"), &format!("v{i}"));
    }
    // Group 2 loses its quorum (the cluster group, 3 of 4, keeps its own). Writes keep
    // node 1's replica awake until it knows it has no leader.
    cluster.node(2).kill();
    let view = url(&cluster, 1, "v1/groups/2?node=1");
    let write = url(&cluster, 1, "v1/groups/2/kv/x");
    cluster.wait_until("node 1 to know group 2 has no leader", || {
        http("PUT", &write, Some(b"x".to_vec()));
        http_json("GET", &view, None).1["leader"] == 0
    });
    let (code, answer) = http_json(
        "POST",
        &url(&cluster, 1, "v1/groups/2/members"),
        Some(json!({ "id": 4 })),
    );
    assert_eq!(code, 503, "group 2 has no leader: {answer}");
    let (_, group) = http_json("GET", &view, None);
    assert_eq!(
        group["members"],
        json!([1, 2]),
        "placed, not added: {group}"
    );

    cluster.node(2).start();
    let voters = |group: &Value| -> Vec<u64> {
        let mut ids: Vec<u64> = group["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        ids.sort_unstable();
        ids
    };
    cluster.wait_until("the rebalancer to make node 4 a voter of group 2", || {
        let (_, group) = http_json("GET", &url(&cluster, 1, "v1/groups/2"), None);
        voters(&group) == [1, 2, 4] && group["learners"] == json!([])
    });
    let own = url(&cluster, 4, "v1/groups/2/kv/k9?consistency=serializable");
    cluster.wait_until("node 4's own replica to hold k9", || {
        http_json("GET", &own, None).1["value"] == "v9"
    });
    let finished = cluster.nodes.iter().any(|n| {
        n.log_text()
            .contains("finishing a move that stopped half-way")
    });
    assert!(
        finished,
        "the cluster group's leader finished it\n{}",
        cluster.logs()
    );
}

/// A replica placed on a node but still waiting for the group's data (here: cut off from
/// the group's leader, not from the cluster's) knows no configuration and no leader: the
/// node forwards the group's requests to a host that does instead of answering 503, and
/// serves them itself once the data arrived.
#[test]
fn a_replica_waiting_for_its_data_forwards_the_groups_requests() {
    let cluster = Cluster::start(
        "groups-waiting-replica",
        3,
        &["--enable-fault-injection", "--disable-rebalancing"],
    );
    let url = |id: u64, path: &str| cluster.nodes[id as usize - 1].url(path);
    let (code, body) = http_json(
        "POST",
        &url(1, "v1/groups"),
        Some(json!({"id": 2, "members": [1, 2]})),
    );
    assert_eq!(code, 201, "{body}");
    put_in_group(&cluster, 1, 2, "k", "v");
    // The group's leader must not lead the cluster group too: node 3 has to keep
    // learning the cluster's table while it is cut off from the group's leader.
    let cluster_leader = cluster.wait_leader();
    let mut group_leader = 0;
    cluster.wait_until("group 2 to have a leader", || {
        group_leader = http_json("GET", &url(1, "v1/groups/2"), None).1["leader"]
            .as_u64()
            .unwrap_or(0);
        group_leader != 0
    });
    if group_leader == cluster_leader {
        let heir = if group_leader == 1 { 2 } else { 1 };
        let (code, body) = http_json(
            "POST",
            &url(1, "v1/groups/2/leader"),
            Some(json!({"id": heir})),
        );
        assert_eq!(code, 200, "{body}");
        group_leader = heir;
    }
    let (code, _) = http(
        "POST",
        &url(3, "debug/partition"),
        Some(group_leader.to_string().into_bytes()),
    );
    assert_eq!(code, 204);
    // Through the group's other member: the group's leader may be cut off from the
    // cluster group's leader now (if node 3 leads it).
    let other = if group_leader == 1 { 2 } else { 1 };
    let (code, body) = http_json(
        "POST",
        &url(other, "v1/groups/2/members"),
        Some(json!({"id": 3, "learner": true})),
    );
    assert_eq!(code, 201, "{body}");
    cluster.wait_until("node 3 to host a replica of group 2", || {
        cluster.nodes[2].status().is_some_and(|s| {
            s["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["id"] == 2))
        })
    });
    let (code, body) = get_in_group(&cluster, 3, 2, "k");
    assert_eq!((code, &body["value"]), (200, &json!("v")), "{body}");
    let (code, body) = http_json("GET", &url(3, "v1/groups/2"), None);
    assert_eq!(code, 200, "{body}");
    assert!(body["leader"].as_u64().unwrap_or(0) != 0, "{body}");

    // Healed: the snapshot arrives and node 3's own replica serves.
    assert_eq!(
        http("POST", &url(3, "debug/partition"), Some(Vec::new())).0,
        204
    );
    cluster.wait_until("node 3's replica to know the group", || {
        let (_, own) = http_json("GET", &url(3, "v1/groups/2?node=3"), None);
        own["members"].as_array().is_some_and(|m| !m.is_empty())
    });
    let (code, body) = get_in_group(&cluster, 3, 2, "k");
    assert_eq!((code, &body["value"]), (200, &json!("v")), "{body}");
}

/// The cluster group (the meta group: members, groups, shards; and the keys, with one
/// shard) votes on at most five nodes. The other members are its learners: they keep a
/// current copy, route by it and serve reads and writes, but never vote or lead. When
/// a voter leaves, the leader promotes a learner in its place.
#[test]
fn the_cluster_group_votes_on_five_nodes_and_the_others_learn() {
    let mut cluster = Cluster::start("meta-voters", 6, &[]);
    let view = |cluster: &Cluster, via: u64| {
        let node = cluster.nodes.iter().find(|n| n.id == via).unwrap();
        let (code, one) = http_json("GET", &node.url("v1/groups/1"), None);
        assert_eq!(code, 200, "{one}");
        let ids = |field: &str| -> Vec<u64> {
            let list = one[field].as_array().cloned().unwrap_or_default();
            list.iter().filter_map(Value::as_u64).collect()
        };
        let (members, learners) = (ids("members"), ids("learners"));
        let voters: Vec<u64> = members
            .into_iter()
            .filter(|m| !learners.contains(m))
            .collect();
        (voters, learners)
    };
    assert_eq!(view(&cluster, 1), (vec![1, 2, 3, 4, 5], vec![6]));
    let (_, listed) = http_json("GET", &cluster.nodes[1].url("v1/members"), None);
    assert_eq!(listed["learners"], json!([6]), "{listed}");
    assert_eq!(listed["members"].as_array().unwrap().len(), 6, "{listed}");
    let elsewhere = format!("http://127.0.0.1:{}", common::free_port());
    let (code, text) = http(
        "POST",
        &cluster.nodes[0].url("6"),
        Some(elsewhere.into_bytes()),
    );
    assert_eq!(code, 409, "a learner is a member already: {text}");

    cluster.add_member(7, 1, &[]);
    cluster.wait_until("node 7 to join the cluster group as a learner", || {
        view(&cluster, 1) == (vec![1, 2, 3, 4, 5], vec![6, 7])
    });
    cluster.put_ok(1, "before-7", "x");
    cluster.wait_value(7, "before-7", "x");
    cluster.put_ok(7, "from-a-learner", "a");
    cluster.wait_value(6, "from-a-learner", "a");
    let leader = cluster.wait_leader();
    assert!(leader <= 5, "a learner never leads: node {leader} does");

    let voter = (1..=5).find(|&id| id != leader).unwrap();
    let (code, text) = http(
        "DELETE",
        &cluster.node(leader).url(&voter.to_string()),
        None,
    );
    assert_eq!(code, 204, "DELETE /{voter}: {text}");
    let status = cluster.node(voter).wait_exit(common::DEADLINE);
    assert!(
        status.success(),
        "node {voter} exits 0 once removed: {status}"
    );
    cluster.wait_until("a learner to take the removed voter's place", || {
        let (voters, learners) = view(&cluster, leader);
        voters.len() == 5 && !voters.contains(&voter) && learners.len() == 1
    });
    let (_, learners) = view(&cluster, leader);
    cluster.put_ok(learners[0], "after-the-promotion", "b");
    cluster.wait_until("every node to see five voters", || {
        cluster
            .running()
            .all(|node| view(&cluster, node.id).0.len() == 5)
    });
    cluster.wait_value(learners[0], "after-the-promotion", "b");
}

/// Group 2 has three voters and a learner (as a move that stopped half-way leaves it, or
/// an operator adds one). Node 1 is drained: every other node hosts group 2 already, so
/// its replica there is simply dropped; the learner is made a voter first, so the group
/// keeps three voters (it used to keep two, and lost its quorum with one more down).
#[test]
fn a_drain_that_drops_a_replica_keeps_the_groups_voters() {
    let mut cluster = Cluster::start("groups-drain-learner", 3, &[]);
    cluster.add_member(4, 1, &[]);
    let url = |cluster: &Cluster, path: &str| cluster.nodes[1].url(path);
    let (code, answer) = http_json(
        "POST",
        &url(&cluster, "v1/groups"),
        Some(json!({"id": 2, "members": [1, 2, 3]})),
    );
    assert_eq!(code, 201, "{answer}");
    put_in_group(&cluster, 2, 2, "k", "v");
    let (code, answer) = http_json(
        "POST",
        &url(&cluster, "v1/groups/2/members"),
        Some(json!({"id": 4, "learner": true})),
    );
    assert_eq!(code, 201, "{answer}");
    assert_eq!(answer["learners"], json!([4]), "{answer}");
    let (code, text) = http("DELETE", &url(&cluster, "1"), None);
    assert_eq!(code, 202, "{text}");
    let status = cluster.node(1).wait_exit(common::DEADLINE);
    assert!(status.success(), "node 1 exits once drained: {status}");
    let (code, group) = http_json("GET", &url(&cluster, "v1/groups/2"), None);
    assert_eq!(code, 200, "{group}");
    assert_eq!(group["members"], json!([2, 3, 4]), "{group}");
    assert_eq!(group["learners"], json!([]), "three voters: {group}");
    assert_eq!(get_in_group(&cluster, 4, 2, "k").1["value"], "v");
}
