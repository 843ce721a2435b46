//! The `/v1` API on real clusters: revisions and compare-and-swap, ordered prefix
//! listing, the atomic multi-key set, `/v1/members`, and the one-step `--join-via`.

mod common;

use std::time::Duration;

use common::{http, http_json, join_via_spec, Cluster};
use serde_json::{json, Value};

fn revision(body: &Value) -> u64 {
    body["revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("no revision in {body}"))
}

#[test]
fn revisions_and_compare_and_swap() {
    let cluster = Cluster::start("v1-cas", 3, &[]);
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);

    // A raw PUT answers the revision; every member then reads the same revision.
    let (code, put) = http_json("PUT", &n1.url("v1/kv/cfg/a"), None);
    assert_eq!(code, 200, "{put}");
    let (code, _) = http("PUT", &n1.url("v1/kv/cfg/a"), Some(b"one".to_vec()));
    assert_eq!(code, 200);
    let (_, got) = http_json("GET", &n2.url("v1/kv/cfg%2Fa"), None);
    assert_eq!(got["key"], "cfg/a");
    assert_eq!(got["value"], "one");
    let r1 = revision(&got);
    assert!(r1 > revision(&put), "a later write has a later revision");

    // Compare-and-swap: the right revision wins once; the stale one gets 412 and the
    // current revision, and changes nothing.
    let url = |rev: u64| n2.url(&format!("v1/kv/cfg/a?if_revision={rev}"));
    let (code, swapped) = http_json("PUT", &url(r1), Some(json!({"value": "two"})));
    assert_eq!(code, 200, "{swapped}");
    let r2 = revision(&swapped);
    let (code, refused) = http_json("PUT", &url(r1), Some(json!({"value": "three"})));
    assert_eq!(code, 412, "{refused}");
    assert_eq!(revision(&refused), r2);
    let (_, got) = http_json("GET", &n1.url("v1/kv/cfg/a"), None);
    assert_eq!((got["value"].as_str(), revision(&got)), (Some("two"), r2));

    // Revision 0: create only if absent.
    let (code, _) = http_json("PUT", &url(0), Some(json!({"value": "x"})));
    assert_eq!(code, 412);
    let create = n1.url("v1/kv/fresh?if_revision=0");
    assert_eq!(http("PUT", &create, Some(b"new".to_vec())).0, 200);
    assert_eq!(http("PUT", &create, Some(b"again".to_vec())).0, 412);

    // Conditional delete, then an unconditional one of an absent key.
    let (code, refused) = http_json("DELETE", &url(r1), None);
    assert_eq!((code, revision(&refused)), (412, r2), "{refused}");
    let (code, deleted) = http_json("DELETE", &url(r2), None);
    assert_eq!(
        (code, deleted["deleted"].as_u64()),
        (200, Some(1)),
        "{deleted}"
    );
    let (code, deleted) = http_json("DELETE", &n1.url("v1/kv/cfg/a"), None);
    assert_eq!(
        (code, deleted["deleted"].as_u64()),
        (200, Some(0)),
        "{deleted}"
    );
    let (code, missing) = http_json("GET", &n1.url("v1/kv/cfg/a"), None);
    assert_eq!(code, 404);
    assert!(missing["error"].as_str().unwrap().contains("not found"));

    // The raftexample routes write the same map: a key PUT there has a revision here,
    // and the raw form carries it in a header.
    cluster.put_ok(1, "plain", "text");
    let raw = reqwest::blocking::Client::new()
        .get(n2.url("v1/kv/plain"))
        .header("accept", "application/octet-stream")
        .send()
        .unwrap();
    let header = raw.headers()["x-raftkvd-revision"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(raw.text().unwrap(), "text");
    let (_, got) = http_json("GET", &n2.url("v1/kv/plain"), None);
    assert_eq!(header, revision(&got).to_string());
}

/// Concurrent writes are batched, several to a raft entry, yet each takes its own
/// revision, every member agrees on it, and compare-and-swaps that land in the same
/// entry still see each other: of many racing from one revision, exactly one wins.
/// `POST /v1/txn`: a lock taken by the first of two clients (the second learns the
/// holder in its failure branch), released by a compare on the value; a counter that
/// four clients on three nodes increment by compare-and-swap transactions loses no
/// increment; bad bodies are refused and write nothing.
#[test]
fn transactions_compare_then_run_one_branch_atomically() {
    let cluster = Cluster::start("v1-txn", 3, &[]);
    let url = |via: u64, path: &str| cluster.nodes[via as usize - 1].url(path);
    let acquire = |owner: &str| {
        json!({
            "compare": [{"key": "lock", "revision": 0}],
            "success": [{"put": {"key": "lock", "value": owner}}],
            "failure": [{"get": {"key": "lock"}}],
        })
    };
    let (code, first) = http_json("POST", &url(1, "v1/txn"), Some(acquire("alice")));
    assert_eq!((code, &first["succeeded"]), (200, &json!(true)), "{first}");
    assert_eq!(first["responses"], json!([{"put": {}}]), "{first}");
    let (code, second) = http_json("POST", &url(2, "v1/txn"), Some(acquire("bob")));
    assert_eq!(
        (code, &second["succeeded"]),
        (200, &json!(false)),
        "{second}"
    );
    let holder = &second["responses"][0]["get"];
    assert_eq!(holder["value"], "alice", "{second}");
    assert_eq!(holder["revision"], first["revision"], "{second}");
    let release = |owner: &str| {
        json!({
            "compare": [{"key": "lock", "value": owner}],
            "success": [{"delete": {"key": "lock"}}, {"get": {"key": "lock"}}],
        })
    };
    let (code, refused) = http_json("POST", &url(3, "v1/txn"), Some(release("bob")));
    assert_eq!(
        (code, &refused["succeeded"]),
        (200, &json!(false)),
        "{refused}"
    );
    assert_eq!(
        refused["responses"],
        json!([]),
        "no failure branch: {refused}"
    );
    let (_, got) = http_json("GET", &url(3, "v1/kv/lock"), None);
    assert_eq!(got["value"], "alice");
    let (code, released) = http_json("POST", &url(3, "v1/txn"), Some(release("alice")));
    assert_eq!(code, 200, "{released}");
    assert_eq!(
        released["responses"],
        json!([{"delete": {"deleted": 1}}, {"get": {"key": "lock", "found": false}}]),
        "the read sees the delete before it: {released}"
    );
    for via in 1..=3 {
        assert_eq!(http("GET", &url(via, "v1/kv/lock"), None).0, 404);
    }

    // Read-modify-write by compare-and-swap: every increment lands exactly once.
    let (clients, increments) = (4u64, 10u64);
    std::thread::scope(|scope| {
        for client in 0..clients {
            let url = &url;
            scope.spawn(move || {
                let via = 1 + client % 3;
                let mut done = 0;
                while done < increments {
                    let (code, now) = http_json("GET", &url(via, "v1/kv/counter"), None);
                    let (count, at) = match code {
                        404 => (0, 0),
                        200 => (
                            now["value"].as_str().unwrap().parse::<u64>().unwrap(),
                            revision(&now),
                        ),
                        _ => continue,
                    };
                    let txn = json!({
                        "compare": [{"key": "counter", "revision": at}],
                        "success": [{"put": {"key": "counter", "value": (count + 1).to_string()}}],
                    });
                    let (code, answer) = http_json("POST", &url(via, "v1/txn"), Some(txn));
                    if code == 200 && answer["succeeded"] == json!(true) {
                        done += 1;
                    }
                }
            });
        }
    });
    let total = (clients * increments).to_string();
    for via in 1..=3 {
        cluster.wait_value(via, "counter", &total);
    }
    // Orders other than equality, on revisions and on values.
    let (_, counter) = http_json("GET", &url(1, "v1/kv/counter"), None);
    let ordered = json!({
        "compare": [
            {"key": "counter", "op": ">", "revision": 0},
            {"key": "counter", "op": "<", "revision": revision(&counter) + 1},
            {"key": "counter", "op": "!=", "value": "0"},
            {"key": "counter", "op": "<", "value": "9"},
        ],
        "success": [{"get": {"key": "counter"}}],
    });
    let (code, answer) = http_json("POST", &url(2, "v1/txn"), Some(ordered));
    assert_eq!(
        (code, &answer["succeeded"]),
        (200, &json!(true)),
        "{answer}"
    );

    // Refused before anything is proposed, or applied without writing.
    let bad = [
        (json!({"success": []}), "no steps"),
        (json!({"success": [{"get": {"key": ""}}]}), "empty"),
        (
            json!({"compare": [{"key": "a"}], "success": [{"get": {"key": "a"}}]}),
            "exactly one",
        ),
        (
            json!({"compare": [{"key": "a", "revision": 1, "value": "v"}], "success": [{"get": {"key": "a"}}]}),
            "exactly one",
        ),
        (
            json!({"compare": [{"key": "a", "op": "~", "revision": 1}], "success": [{"get": {"key": "a"}}]}),
            "invalid JSON",
        ),
        (
            json!({"success": [{"put": {"key": "a", "value": "1"}}, {"delete": {"key": "a"}}]}),
            "twice",
        ),
        (
            json!({"success": [{"range": {"key": "a"}}]}),
            "invalid JSON",
        ),
        (
            json!({"success": [{"get": {"key": "a"}}], "else": []}),
            "invalid JSON",
        ),
        (
            json!({"success": vec![json!({"get": {"key": "a"}}); 129]}),
            "at most 128",
        ),
    ];
    for (body, why) in bad {
        let (code, answer) = http_json("POST", &url(1, "v1/txn"), Some(body.clone()));
        assert_eq!(code, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(why), "{body}: {error}");
    }
    assert_eq!(http("GET", &url(1, "v1/txn"), None).0, 405);
    // A key longer than a backup may hold is refused here as by the multi-key set.
    let long = "k".repeat(64 * 1024 + 1);
    let too_long = json!({"success": [{"put": {"key": long, "value": "v"}}]});
    let (code, answer) = http_json("POST", &url(1, "v1/txn"), Some(too_long));
    assert_eq!(code, 413, "{answer}");
    let (code, answer) = http_json("POST", &url(1, "v1/kv"), Some(json!({ long: "v" })));
    assert_eq!(code, 413, "{answer}");
    let leased = json!({"success": [
        {"put": {"key": "unleased", "value": "v"}},
        {"put": {"key": "leased", "value": "v", "lease": (1u64 << 32) | 77}},
    ]});
    let (code, answer) = http_json("POST", &url(1, "v1/txn"), Some(leased));
    assert_eq!(code, 404, "{answer}");
    assert_eq!(http("GET", &url(1, "v1/kv/unleased"), None).0, 404);
}

#[test]
fn batched_writes_each_take_their_own_revision() {
    const WRITERS: usize = 16;
    const EACH: usize = 40;
    let cluster = Cluster::start("v1-batch", 3, &[]);
    let applied_before = cluster.nodes[0].status_u64("applied");
    let written: Vec<(String, u64)> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let node = &cluster.nodes[w % 2];
                s.spawn(move || {
                    (0..EACH)
                        .map(|i| {
                            let key = format!("batch/{w}-{i}");
                            let (code, body) = http_json(
                                "PUT",
                                &node.url(&format!("v1/kv/{key}")),
                                Some(json!({"value": "v"})),
                            );
                            assert_eq!(code, 200, "{body}");
                            (key, revision(&body))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let mut revisions: Vec<u64> = written.iter().map(|(_, r)| *r).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        WRITERS * EACH,
        "two writes shared a revision"
    );
    let applied = cluster.nodes[0].status_u64("applied");
    assert!(
        applied - applied_before < (WRITERS * EACH) as u64,
        "{} writes took {} entries: none were batched",
        WRITERS * EACH,
        applied - applied_before
    );
    let n3 = &cluster.nodes[2];
    for (key, rev) in &written {
        let (_, got) = http_json("GET", &n3.url(&format!("v1/kv/{key}")), None);
        assert_eq!(revision(&got), *rev, "{key} on node 3: {got}");
    }

    let (_, base) = http_json(
        "PUT",
        &cluster.nodes[0].url("v1/kv/race"),
        Some(json!({"value": "0"})),
    );
    let from = revision(&base);
    let codes: Vec<u16> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let url = cluster.nodes[w % 3].url(&format!("v1/kv/race?if_revision={from}"));
                s.spawn(move || http("PUT", &url, Some(format!("{w}").into_bytes())).0)
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 1, "{codes:?}");
    assert_eq!(
        codes.iter().filter(|&&c| c == 412).count(),
        WRITERS - 1,
        "{codes:?}"
    );
}

#[test]
fn prefix_listing_and_atomic_multi_set() {
    let cluster = Cluster::start("v1-list", 3, &[]);
    let (n1, n3) = (&cluster.nodes[0], &cluster.nodes[2]);

    let mut pairs = serde_json::Map::new();
    for i in (0..300).rev() {
        pairs.insert(format!("user/{i:03}"), json!(format!("v{i}")));
    }
    pairs.insert("userx".into(), json!("not under user/"));
    let (code, set) = http_json("POST", &n1.url("v1/kv"), Some(Value::Object(pairs)));
    assert_eq!((code, set["keys"].as_u64()), (200, Some(301)), "{set}");
    let at = revision(&set);

    // Pages in key order; `more` says whether another page follows, `after` asks for it.
    let mut listed: Vec<String> = Vec::new();
    loop {
        let after = listed
            .last()
            .map_or(String::new(), |k| format!("&after={k}"));
        let url = n3.url(&format!("v1/kv?prefix=user%2F&limit=128{after}"));
        let (code, page) = http_json("GET", &url, None);
        assert_eq!(code, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            assert_eq!(revision(item), at, "one revision for the whole multi-set");
            listed.push(item["key"].as_str().unwrap().to_string());
        }
        if !page["more"].as_bool().unwrap() {
            break;
        }
    }
    let expected: Vec<String> = (0..300).map(|i| format!("user/{i:03}")).collect();
    assert_eq!(listed, expected);

    let (_, all) = http_json("GET", &n1.url("v1/kv?prefix=user&limit=1000"), None);
    assert_eq!(all["items"].as_array().unwrap().len(), 301);
    assert_eq!(all["more"], false);
    let (_, none) = http_json("GET", &n1.url("v1/kv?prefix=zzz"), None);
    assert_eq!(none, json!({"items": [], "more": false}));

    // A bad multi-set writes nothing.
    for bad in [
        json!({}),
        json!({"k": 1}),
        json!(["k", "v"]),
        json!({"": "v"}),
    ] {
        let (code, body) = http_json("POST", &n1.url("v1/kv"), Some(bad.clone()));
        assert_eq!(code, 400, "{bad} -> {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(http_json("GET", &n1.url("v1/kv/k"), None).0, 404);
}

#[test]
fn members_can_be_listed_added_and_removed() {
    let mut cluster = Cluster::start("v1-members", 3, &[]);
    let (code, list) = http_json("GET", &cluster.nodes[1].url("v1/members"), None);
    assert_eq!(code, 200);
    assert_eq!(list["members"].as_array().unwrap().len(), 3);
    assert_ne!(list["leader"], 0);

    // Add node 4 through /v1/members, then start it with --join (the two-step flow).
    let mut urls: Vec<String> = cluster.nodes.iter().map(|n| n.peer_url.clone()).collect();
    urls.push(format!("http://127.0.0.1:{}", common::free_port()));
    let new = json!({"id": 4, "peer_url": urls[3]});
    let (code, added) = http_json(
        "POST",
        &cluster.nodes[2].url("v1/members"),
        Some(new.clone()),
    );
    assert_eq!(code, 201, "{added}");
    let members = added["members"].as_array().unwrap();
    assert!(
        members.contains(&json!({"id": 4, "peer_url": urls[3]})),
        "{added}"
    );
    let (code, again) = http_json("POST", &cluster.nodes[0].url("v1/members"), Some(new));
    assert_eq!(code, 409, "{again}");
    cluster.add_node_spec(4, &urls, &[], true);
    cluster.node(4).start();
    cluster.put_ok(1, "after-add", "yes");
    cluster.wait_value(4, "after-add", "yes");

    // Remove it: it shuts itself down, and the list no longer has it.
    let (code, removed) = http_json("DELETE", &cluster.nodes[0].url("v1/members/4"), None);
    assert_eq!(code, 200, "{removed}");
    let status = cluster.node(4).wait_exit(Duration::from_secs(30));
    assert!(status.success(), "a removed node exits 0");
    cluster.wait_until("node 4 to leave the member list", || {
        let (_, list) = http_json("GET", &cluster.nodes[1].url("v1/members"), None);
        list["members"].as_array().is_some_and(|m| m.len() == 3)
    });
    let (code, body) = http_json("DELETE", &cluster.nodes[0].url("v1/members/4"), None);
    assert_eq!(code, 409, "{body}");
}

#[test]
fn join_via_adds_a_node_in_one_step() {
    let mut cluster = Cluster::start("v1-join-via", 3, &[]);
    cluster.put_ok(1, "before-join", "old");
    // Ask a follower, so the change is forwarded to the leader.
    let leader = cluster.wait_leader();
    let via = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .unwrap()
        .url("");
    let node = join_via_spec(&cluster.dir.0, 4, via.trim_end_matches('/'));
    cluster.nodes.push(node);
    cluster.node(4).start();
    cluster.wait_value(4, "before-join", "old");
    cluster.put_ok(4, "from-the-new-node", "hello");
    cluster.wait_value(2, "from-the-new-node", "hello");
    let (_, list) = http_json("GET", &cluster.nodes[0].url("v1/members"), None);
    assert_eq!(list["members"].as_array().unwrap().len(), 4, "{list}");

    // A restart finds its data and does not ask to join again.
    cluster.node(4).kill();
    cluster.node(4).start();
    cluster.wait_value(4, "from-the-new-node", "hello");
    let log = cluster.node(4).log_text();
    assert_eq!(log.matches("added to the cluster").count(), 1, "{log}");
    assert!(log.contains("restarting from the data dir"), "{log}");
}
