//! Automatic sharding (`--shards`): keys spread over data groups by hash, served from
//! any node, listed in key order across groups, and still written with one node down.
//! Real processes, real HTTP, real disk.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{http, http_json, Cluster};
use serde_json::{json, Value};

/// PUTs through `/v1/kv` until a 200 (retrying 503s while groups elect leaders); returns
/// the answer.
fn put_v1(cluster: &Cluster, via: u64, key: &str, value: &str) -> Value {
    let url = cluster.nodes[via as usize - 1].url(&format!("v1/kv/{key}"));
    let mut answer = Value::Null;
    cluster.wait_until(&format!("PUT {key} via node {via}"), || {
        let (code, body) = http("PUT", &url, Some(value.as_bytes().to_vec()));
        assert!(code == 200 || code == 503, "PUT {url}: {code} {body}");
        answer = serde_json::from_str(&body).unwrap_or(Value::Null);
        code == 200
    });
    answer
}

#[test]
fn eight_shards_on_three_nodes_serve_every_key_from_every_node() {
    let cluster = Cluster::start("sharding-8", 3, &["--shards", "8", "--replicas", "2"]);
    let url = |via: u64, path: &str| cluster.nodes[via as usize - 1].url(path);

    // The layout: 8 data groups of 2, spread evenly, besides the cluster group.
    let (code, list) = http_json("GET", &url(1, "v1/groups"), None);
    assert_eq!(code, 200);
    let groups = list["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 9, "{list}");
    let mut replicas_per_node: BTreeMap<u64, usize> = BTreeMap::new();
    for group in groups.iter().filter(|g| g["id"] != 1) {
        let members = group["members"].as_array().unwrap();
        assert_eq!(members.len(), 2, "{group}");
        for m in members {
            *replicas_per_node.entry(m.as_u64().unwrap()).or_default() += 1;
        }
    }
    let counts: Vec<usize> = replicas_per_node.values().copied().collect();
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{replicas_per_node:?}"
    );

    // 1,000 keys through all three nodes; each answer names the group that holds it.
    let mut group_of = BTreeMap::new();
    for i in 0..1000u64 {
        let key = format!("key{i:04}");
        let answer = put_v1(&cluster, 1 + i % 3, &key, &format!("value{i}"));
        group_of.insert(key, answer["group"].as_u64().unwrap());
    }
    let used: BTreeSet<u64> = group_of.values().copied().collect();
    assert!(used.len() >= 6, "keys spread over only {used:?}");
    assert!(
        !used.contains(&1),
        "the cluster group holds no keys once sharded"
    );

    // Every node serves every key (a third of them through each API), with its group.
    for (i, (key, group)) in group_of.iter().enumerate() {
        for via in 1..=3 {
            if i % 3 == 0 {
                let want = (200, format!("value{}", &key[3..].parse::<u64>().unwrap()));
                assert_eq!(http("GET", &url(via, key), None), want, "{key} via {via}");
            } else if i % 3 == 1 && via == 1 + (i as u64 / 3) % 3 {
                let (code, answer) = http_json("GET", &url(via, &format!("v1/kv/{key}")), None);
                assert_eq!(code, 200, "{key} via {via}: {answer}");
                assert_eq!(answer["group"], *group, "{answer}");
            }
        }
    }

    // The listing pages through all groups in key order.
    let mut listed = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("v1/kv?prefix=key&limit=128&after={after}");
        let (code, page) = http_json("GET", &url(2, &path), None);
        assert_eq!(code, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap().to_string();
            assert_eq!(item["group"], group_of[&key], "{item}");
            listed.push(key);
        }
        if page["more"] == false {
            break;
        }
        after = listed.last().unwrap().clone();
    }
    assert_eq!(listed, group_of.keys().cloned().collect::<Vec<_>>());

    // A multi-key set is atomic within one group and refused across groups.
    let mut by_group: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for (key, group) in &group_of {
        by_group.entry(*group).or_default().push(key);
    }
    let (group, keys) = by_group.iter().next().unwrap();
    let body: Value = keys[..3]
        .iter()
        .map(|k| (k.to_string(), json!("many")))
        .collect();
    let (code, answer) = http_json("POST", &url(3, "v1/kv"), Some(body));
    assert_eq!((code, &answer["group"]), (200, &json!(group)), "{answer}");
    let (a, b) = (
        by_group.values().next().unwrap()[0],
        by_group.values().nth(1).unwrap()[0],
    );
    let (code, answer) = http_json("POST", &url(3, "v1/kv"), Some(json!({a: "x", b: "y"})));
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("different groups"),
        "{answer}"
    );
    assert_eq!(
        http("GET", &url(1, b), None).1,
        format!("value{}", &b[3..].parse::<u64>().unwrap())
    );

    // A key asked of a shard that does not own it is refused, never served.
    let wrong = used.iter().find(|g| **g != group_of[a]).unwrap();
    let (code, answer) = http_json("GET", &url(1, &format!("v1/groups/{wrong}/kv/{a}")), None);
    assert_eq!(code, 421, "{answer}");

    // A transaction over one group's keys runs there from every node (the two that
    // host it, and the one that forwards it); across groups it is refused.
    let (k0, k1, k2) = (keys[0], keys[1], keys[2]);
    for via in 1..=3u64 {
        let txn = json!({
            "compare": [{"key": k0, "value": "many"}],
            "success": [{"put": {"key": k1, "value": format!("txn{via}")}}, {"get": {"key": k2}}],
        });
        let (code, answer) = http_json("POST", &url(via, "v1/txn"), Some(txn));
        assert_eq!(code, 200, "through node {via}: {answer}");
        assert_eq!(
            (&answer["succeeded"], &answer["group"]),
            (&json!(true), &json!(group)),
            "{answer}"
        );
        assert_eq!(answer["responses"][1]["get"]["value"], "many", "{answer}");
        let (_, got) = http_json("GET", &url(via % 3 + 1, &format!("v1/kv/{k1}")), None);
        assert_eq!(got["value"], format!("txn{via}"), "{got}");
    }
    let across = json!({"success": [{"get": {"key": a}}, {"get": {"key": b}}]});
    let (code, answer) = http_json("POST", &url(2, "v1/txn"), Some(across));
    assert_eq!(code, 409, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("different groups"));
    let misrouted = json!({"success": [{"put": {"key": a, "value": "x"}}]});
    let txn_in_wrong = url(1, &format!("v1/groups/{wrong}/txn"));
    let (code, answer) = http_json("POST", &txn_in_wrong, Some(misrouted));
    assert_eq!(code, 421, "{answer}");
}

#[test]
fn with_one_node_killed_every_shard_takes_writes_and_a_restart_keeps_them() {
    let mut cluster = Cluster::start("sharding-kill", 3, &["--shards", "4"]);
    let mut keys_of_group: BTreeMap<u64, String> = BTreeMap::new();
    let mut i = 0;
    while keys_of_group.len() < 4 {
        let key = format!("k{i}");
        let answer = put_v1(&cluster, 1, &key, "before");
        keys_of_group
            .entry(answer["group"].as_u64().unwrap())
            .or_insert(key);
        i += 1;
    }
    cluster.node(2).kill();
    for (group, key) in &keys_of_group {
        for via in [1, 3] {
            let answer = put_v1(&cluster, via, key, &format!("after-{via}"));
            assert_eq!(answer["group"], *group);
        }
    }
    for id in [1, 3] {
        cluster.node(id).kill();
    }
    for id in 1..=3 {
        cluster.node(id).start();
    }
    for key in keys_of_group.values() {
        cluster.wait_value(2, key, "after-3");
    }
}

#[test]
fn idle_groups_sleep_and_wake_for_work_even_when_their_leader_died() {
    let mut cluster = Cluster::start("sharding-sleep", 3, &["--shards", "4"]);
    let groups = |via: u64| -> Vec<Value> {
        let (code, list) = http_json(
            "GET",
            &cluster.nodes[via as usize - 1].url("v1/groups"),
            None,
        );
        assert_eq!(code, 200, "{list}");
        list["groups"].as_array().unwrap().clone()
    };
    cluster.wait_until("every data group to fall asleep", || {
        groups(1)
            .iter()
            .all(|g| g["id"] == 1 || g["asleep"] == true)
    });
    assert!(
        groups(1)
            .iter()
            .any(|g| g["id"] == 1 && g["asleep"] == false),
        "the cluster group never sleeps"
    );
    // /status and /metrics show every hosted group.
    let status = cluster.nodes[0].status().unwrap();
    let ids: Vec<u64> = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "{status}");
    let (code, metrics) = http("GET", &cluster.nodes[0].url("metrics"), None);
    assert_eq!(code, 200);
    for series in [
        "raftkvd_group_asleep{group=\"2\"}",
        "raftkvd_group_asleep{group=\"1\"} 0",
        "raftkvd_group_applied_index{group=\"5\"}",
        "raftkvd_group_is_leader{group=\"3\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }

    // Work wakes a sleeping group; it is served and sleeps again.
    let written = put_v1(&cluster, 2, "wake-up", "1");
    let group = written["group"].as_u64().unwrap();
    assert_eq!(
        http("GET", &cluster.nodes[0].url("wake-up"), None),
        (200, "1".into())
    );
    cluster.wait_until("the group to fall asleep again", || {
        groups(3)
            .iter()
            .any(|g| g["id"] == group && g["asleep"] == true)
    });

    // Its leader dies while it sleeps: the next request wakes a follower, which gets the
    // group a new leader. The dead node led the cluster group too: a node serves keys
    // while the cluster group elects (it knows the shards, which never change).
    let leader = groups(3).iter().find(|g| g["id"] == group).unwrap()["leader"]
        .as_u64()
        .unwrap();
    let url = cluster.nodes[0].url("v1/groups/1/leader");
    let (code, answer) = http_json("POST", &url, Some(json!({ "id": leader })));
    assert_eq!((code, &answer["leader"]), (200, &json!(leader)), "{answer}");
    cluster.node(leader).kill();
    let via = (1..=3).find(|&id| id != leader).unwrap();
    put_v1(&cluster, via, "wake-up", "2");
    for id in (1..=3).filter(|&id| id != leader).rev() {
        assert_eq!(
            http("GET", &cluster.nodes[id as usize - 1].url("wake-up"), None),
            (200, "2".into())
        );
    }
}

/// The list of shards is set when the cluster forms and never changes, so a node that
/// knows it routes keys without the cluster group: even a freshly restarted node serves
/// a shard while the cluster group has lost its quorum.
#[test]
fn a_shard_with_its_quorum_serves_while_the_cluster_group_has_none() {
    let mut cluster = Cluster::start(
        "sharding-no-cluster-leader",
        5,
        &["--shards", "2", "--replicas", "3"],
    );
    let group = put_v1(&cluster, 1, "k", "before")["group"]
        .as_u64()
        .unwrap();
    let (code, list) = http_json("GET", &cluster.nodes[0].url("v1/groups"), None);
    assert_eq!(code, 200, "{list}");
    let members: Vec<u64> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == group)
        .unwrap()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap())
        .collect();
    assert_eq!(members.len(), 3, "{list}");
    // Three of the five nodes die (two outside the shard, one inside): the cluster group
    // keeps two of its five voters, the shard two of its three.
    let (kept, restarted) = (members[1], members[2]);
    for id in (1..=5).filter(|id| *id != kept && *id != restarted) {
        cluster.node(id).kill();
    }
    cluster.node(restarted).kill();
    cluster.node(restarted).start();
    // Once the cluster group's leader, if it survived, has stepped down (it hears from no
    // quorum), both nodes know it has none.
    cluster.wait_until(
        "both nodes to see the cluster group without a leader",
        || {
            [kept, restarted].iter().all(|&id| {
                let node = cluster.nodes.iter().find(|n| n.id == id).unwrap();
                node.status().is_some_and(|s| s["leader"] == 0)
            })
        },
    );
    put_v1(&cluster, kept, "k", "during");
    cluster.wait_value(restarted, "k", "during");
}

/// Node 4 joins 3 nodes whose 4 groups have 3 replicas each, takes its share, and is
/// then removed: each of its replicas can only go back to a node it was moved off, which
/// hosts a new replica of that group under a new raft id.
#[test]
fn a_joining_node_takes_its_share_of_replicas_and_can_leave_again_losing_no_write() {
    let mut cluster = Cluster::start(
        "sharding-rebalance",
        3,
        &["--shards", "4", "--replicas", "3"],
    );
    for i in 0..120 {
        put_v1(&cluster, 1 + i % 3, &format!("r{i}"), &format!("v{i}"));
    }
    cluster.add_member(4, 1, &[]);
    // Replicas per node, and the smallest group (a move adds before it removes).
    let load = |cluster: &Cluster| -> (BTreeMap<u64, usize>, usize) {
        let (code, list) = http_json("GET", &cluster.nodes[0].url("v1/groups"), None);
        assert_eq!(code, 200, "{list}");
        let mut load: BTreeMap<u64, usize> = (1..=4).map(|n| (n, 0)).collect();
        let mut smallest = usize::MAX;
        let groups = list["groups"].as_array().unwrap();
        for group in groups.iter().filter(|g| g["id"] != 1) {
            let members = group["members"].as_array().unwrap();
            smallest = smallest.min(members.len());
            for m in members {
                *load.get_mut(&m.as_u64().unwrap()).unwrap() += 1;
            }
        }
        (load, smallest)
    };
    cluster.wait_until("every node to host 3 of the 12 replicas", || {
        let (load, smallest) = load(&cluster);
        assert!(smallest >= 3, "a group ran short of replicas: {load:?}");
        load.values().all(|&n| n == 3)
    });
    // Writes through the new node and reads of every earlier write from it.
    put_v1(&cluster, 4, "after-rebalance", "x");
    for i in 0..120 {
        let (code, answer) = http_json("GET", &cluster.nodes[3].url(&format!("v1/kv/r{i}")), None);
        assert_eq!(
            (code, &answer["value"]),
            (200, &json!(format!("v{i}"))),
            "r{i}: {answer}"
        );
    }
    let status = cluster.nodes[3].status().unwrap();
    let hosted = status["groups"].as_array().unwrap().len();
    assert_eq!(
        hosted, 4,
        "node 4 hosts the cluster group and 3 data groups: {status}"
    );
    // Each move added node 4 as a learner first, then promoted it.
    let logs: String = cluster.nodes.iter().map(|n| n.log_text()).collect();
    assert!(
        logs.contains("node: 4, change: AddLearnerNode"),
        "moves add node 4 as a learner first"
    );

    // Node 4 leaves: drained first (202), its 3 replicas go back to nodes 1-3, then it
    // is removed and exits 0.
    cluster.wait_leader();
    let (code, text) = http("DELETE", &cluster.nodes[0].url("4"), None);
    assert_eq!(code, 202, "{text}");
    let status = cluster.node(4).wait_exit(common::DEADLINE);
    assert!(status.success(), "node 4 exits 0 once drained: {status}");
    let (load, smallest) = load(&cluster);
    assert_eq!(smallest, 3, "every group kept its 3 replicas: {load:?}");
    assert_eq!(load.values().sum::<usize>(), 12, "{load:?}");
    assert_eq!(load[&4], 0, "{load:?}");
    for i in (0..120).step_by(7) {
        let key = format!("r{i}");
        let path = format!("v1/kv/{key}?consistency=serializable");
        for node in &cluster.nodes[..3] {
            cluster.wait_until(&format!("node {} to hold {key} itself", node.id), || {
                http_json("GET", &node.url(&path), None).1["value"] == json!(format!("v{i}"))
            });
        }
    }
    put_v1(&cluster, 2, "after-drain", "y");
    let logs: String = cluster.nodes.iter().map(|n| n.log_text()).collect();
    assert!(
        logs.contains("node placed again, under a new raft id"),
        "the replicas went back as new replicas"
    );
}

#[test]
fn leaders_spread_over_the_nodes_and_a_leadership_can_be_handed_over() {
    let cluster = Cluster::start("sharding-leaders", 3, &["--shards", "6"]);
    let leaders = || -> Vec<(u64, u64)> {
        let (_, list) = http_json("GET", &cluster.nodes[0].url("v1/groups"), None);
        list["groups"]
            .as_array()
            .map(|groups| {
                groups
                    .iter()
                    .filter(|g| g["id"] != 1)
                    .map(|g| (g["id"].as_u64().unwrap(), g["leader"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Six data groups of three on three nodes: each node ends up leading two.
    cluster.wait_until("each node to lead two of the six data groups", || {
        let led = leaders();
        led.len() == 6 && (1..=3).all(|n| led.iter().filter(|(_, l)| *l == n).count() == 2)
    });

    let (group, leader) = leaders()[0];
    let other = if leader == 1 { 2 } else { 1 };
    let url = cluster.nodes[2].url(&format!("v1/groups/{group}/leader"));
    let (code, answer) = http_json("POST", &url, Some(json!({ "id": other })));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["leader"], json!(other), "{answer}");
    let (code, answer) = http_json("POST", &url, Some(json!({ "id": 9 })));
    assert_eq!(code, 400, "not a voter: {answer}");
}

/// `DELETE /v1/kv?prefix=`: every key under the prefix, from every group (through the
/// hosts of the groups the node does not host), one revision per group; watchers see
/// each delete; keys beside the prefix stay.
#[test]
fn a_prefix_delete_takes_every_key_under_it_from_every_shard() {
    let cluster = Cluster::start(
        "sharding-del-prefix",
        3,
        &["--shards", "4", "--replicas", "2"],
    );
    let url = |via: u64, path: &str| cluster.nodes[via as usize - 1].url(path);
    for i in 0..100u64 {
        put_v1(&cluster, 1 + i % 3, &format!("app/{i:03}"), "v");
    }
    for key in ["app", "apple", "b/1"] {
        put_v1(&cluster, 1, key, "stays");
    }
    let watcher = common::watcher::Watcher::open(&url(2, "v1/watch?prefix=app"));

    let (code, body) = http_json("DELETE", &url(1, "v1/kv"), None);
    assert_eq!(code, 400, "no prefix: {body}");
    let (code, done) = http_json("DELETE", &url(3, "v1/kv?prefix=app%2F"), None);
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["deleted"], 100, "{done}");
    let groups = done["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 4, "{done}");
    let per_group: u64 = groups.iter().map(|g| g["deleted"].as_u64().unwrap()).sum();
    assert_eq!(per_group, 100);

    let (events, _) = watcher.events_until(|events| events.len() >= 100);
    assert!(events.iter().all(|e| e["type"] == "delete"), "{events:?}");
    for group in groups {
        let at = events.iter().filter(|e| e["group"] == group["group"]);
        assert!(
            at.clone().all(|e| e["revision"] == group["revision"]),
            "{group}"
        );
        assert_eq!(
            at.count() as u64,
            group["deleted"].as_u64().unwrap(),
            "{group}"
        );
    }
    for via in 1..=3 {
        let (code, page) = http_json("GET", &url(via, "v1/kv?prefix=app"), None);
        assert_eq!(code, 200, "{page}");
        let keys: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["app", "apple"], "node {via}");
    }
    let (code, again) = http_json("DELETE", &url(2, "v1/kv?prefix=app%2F"), None);
    assert_eq!((code, &again["deleted"]), (200, &json!(0)), "{again}");

    // One group's keys, all of them (an empty prefix), through a node that may not host it.
    let (_, owner) = http_json("GET", &url(1, "v1/kv/b%2F1"), None);
    let group = owner["group"].as_u64().unwrap();
    let (code, one) = http_json(
        "DELETE",
        &url(3, &format!("v1/groups/{group}/kv?prefix=")),
        None,
    );
    assert_eq!(code, 200, "{one}");
    assert!(one["deleted"].as_u64().unwrap() >= 1, "{one}");
    let (code, _) = http("GET", &url(2, "v1/kv/b%2F1"), None);
    assert_eq!(code, 404);
}
