//! Every row of the bad-input list: a clear status and message, never a crash or a hang.

mod common;

use common::{free_port, http, lone_joining_node, Cluster, TempDir, BIN};

/// Validation errors, answered without touching raft state.
#[test]
fn malformed_requests_get_4xx_with_a_message() {
    let cluster = Cluster::start("bad-input", 1, &["--max-value-bytes", "10"]);
    let n1 = &cluster.nodes[0];
    let url = |p: &str| n1.url(p);
    let peer = |s: &str| Some(s.as_bytes().to_vec());

    // Malformed node ids and peer URLs: 400.
    for (method, path, body) in [
        ("POST", "abc", peer("http://127.0.0.1:1")),
        ("POST", "0", peer("http://127.0.0.1:1")),
        ("POST", "-4", peer("http://127.0.0.1:1")),
        ("DELETE", "x", None),
        ("POST", "4", peer("not a url")),
        ("POST", "4", peer("ftp://127.0.0.1:1")),
        ("POST", "4", peer("http://127.0.0.1")),
        ("POST", "4", Some(vec![0xff, 0xfe])),
        ("GET", "", None),
        ("PUT", "", peer("v")),
        ("GET", "k?consistency=sometimes", None),
        ("GET", "k?other=1", None),
    ] {
        let (code, text) = http(method, &url(path), body);
        assert_eq!(code, 400, "{method} /{path}: {text}");
        assert!(!text.trim().is_empty(), "{method} /{path} needs a message");
    }

    // Membership conflicts: 409.
    let (code, text) = http("POST", &url("1"), peer("http://127.0.0.1:1"));
    assert_eq!(code, 409, "adding an existing member: {text}");
    assert!(text.contains("already a member"), "{text}");
    let (code, text) = http("DELETE", &url("9"), None);
    assert_eq!(code, 409, "removing a non-member: {text}");
    assert!(text.contains("not a member"), "{text}");
    let (code, text) = http("DELETE", &url("1"), None);
    assert_eq!(code, 409, "removing the last member: {text}");

    // Too large: 413, and the limit is exact.
    let (code, text) = http("PUT", &url("k"), Some(vec![b'x'; 11]));
    assert_eq!(code, 413, "{text}");
    assert_eq!(http("PUT", &url("k"), Some(vec![b'x'; 10])).0, 204);
    assert_eq!(http("POST", &url("4"), Some(vec![b'h'; 100_000])).0, 413);

    // Unsupported method: 405 with Allow.
    let resp = reqwest::blocking::Client::new()
        .request(reqwest::Method::PATCH, url("k"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let allow = resp.headers()["allow"].to_str().unwrap().to_string();
    for m in ["GET", "PUT", "POST", "DELETE"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }

    // The node is still healthy after all of that.
    assert_eq!(http("GET", &url("k"), None), (200, "x".repeat(10)));
}

/// Without a quorum: a write whose commit is not reached within the deadline is 503, and
/// a second membership change while the first is pending is 409, never a false 204.
#[test]
fn no_quorum_gives_503_and_pending_membership_change_gives_409() {
    // A long election timeout keeps node 1 leader (check_quorum would depose it) for the
    // moment it needs to accept the second proposal.
    let cluster = Cluster::start(
        "pending",
        1,
        &["--request-timeout-ms", "1500", "--election-ticks", "30"],
    );
    let n1 = &cluster.nodes[0];
    // Adding node 2 commits with the old single-node quorum; node 2 never starts, so
    // from now on nothing can commit.
    let dead_peer = format!("http://127.0.0.1:{}", free_port());
    let (code, text) = http("POST", &n1.url("2"), Some(dead_peer.into_bytes()));
    assert_eq!(code, 204, "{text}");

    let other_peer = format!("http://127.0.0.1:{}", free_port());
    let (code, text) = http("POST", &n1.url("3"), Some(other_peer.clone().into_bytes()));
    assert_eq!(code, 503, "a conf change that cannot commit: {text}");
    assert!(text.contains("unknown"), "{text}");

    let (code, text) = http("POST", &n1.url("4"), Some(other_peer.into_bytes()));
    assert_eq!(code, 409, "a second change while one is pending: {text}");
    assert!(text.contains("in progress"), "{text}");

    let (code, text) = http("PUT", &n1.url("k"), Some(b"v".to_vec()));
    assert_eq!(code, 503, "a write without quorum: {text}");
    let (code, text) = http("GET", &n1.url("k"), None);
    assert_eq!(code, 503, "a linearizable read without quorum: {text}");
    let local = http("GET", &n1.url("k?consistency=serializable"), None);
    assert_eq!(local.0, 404, "the write must not be visible: {local:?}");
}

/// A node that was never told who leads answers 503 at once rather than hanging.
#[test]
fn joining_node_without_leader_answers_503() {
    let dir = TempDir::new("no-leader");
    let node = lone_joining_node(&dir);
    let (code, text) = http("PUT", &node.url("k"), Some(b"v".to_vec()));
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("no leader"), "{text}");
}

/// Bad flags: a clear message and exit status 2, before anything is written.
#[test]
fn bad_flags_are_refused_with_a_message() {
    for args in [
        vec![
            "--id",
            "3",
            "--cluster",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--port",
            "1",
        ],
        vec!["--id", "1", "--cluster", "127.0.0.1:1", "--port", "1"],
        vec![
            "--id",
            "0",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "1",
        ],
        // --join-via without a way to know this node's own peer URL.
        vec![
            "--id",
            "4",
            "--join-via",
            "http://127.0.0.1:1",
            "--port",
            "1",
        ],
        vec![
            "--id",
            "4",
            "--join-via",
            "not-a-url",
            "--peer-url",
            "http://127.0.0.1:2",
            "--port",
            "1",
        ],
        // A --peer-url that contradicts --cluster.
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--peer-url",
            "http://127.0.0.1:9",
            "--port",
            "1",
        ],
        // Neither --cluster nor --join-via.
        vec!["--id", "1", "--port", "1"],
        // No shards, too many, and more replicas than nodes.
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "1",
            "--shards",
            "0",
        ],
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "1",
            "--shards",
            "100000",
        ],
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--port",
            "1",
            "--shards",
            "4",
            "--replicas",
            "3",
        ],
        // Limits that cannot work: a frame too small for the largest entry, no
        // connections, no time for headers.
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "1",
            "--max-peer-frame-bytes",
            "1000",
        ],
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "1",
            "--max-client-connections",
            "0",
        ],
        vec![
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "1",
            "--header-read-timeout-ms",
            "0",
        ],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // Our own checks say "raftkvd: ...", clap's "error: ...".
        assert!(
            err.contains("raftkvd:") || err.starts_with("error:"),
            "{args:?}: {err}"
        );
    }
}

/// Raft traffic from another cluster (here: a node of cluster A reaching a stranger that
/// took over a dead member's port) is refused, and neither side is disturbed by it.
#[test]
fn traffic_from_another_cluster_is_refused() {
    let mut a = Cluster::start("cluster-a", 3, &[]);
    let leader = a.wait_leader();
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    a.node(victim).kill();
    let victim_peer = a.node(victim).peer_url.clone();

    // Cluster B: one node listening on the dead member's peer address.
    let b_dir = TempDir::new("cluster-b");
    let mut b = common::node_spec(&b_dir.0, 1, &[victim_peer], &[], false);
    b.start();
    let b = Cluster {
        nodes: vec![b],
        dir: b_dir,
    };
    b.wait_leader();
    b.put_ok(1, "owner", "b");

    a.put_ok(leader, "owner", "a");
    b.wait_until("B to log the refusal", || {
        b.nodes[0]
            .log_text()
            .contains("refusing raft traffic from another cluster")
    });
    a.put_ok(leader, "still", "serving");
    assert_eq!(
        http("GET", &b.nodes[0].url("owner"), None),
        (200, "b".into())
    );
    assert_eq!(b.nodes[0].status().unwrap()["role"], "Leader");
    let log = b.nodes[0].log_text();
    assert_eq!(
        log.matches("refusing raft traffic from another cluster")
            .count(),
        1,
        "logged once per stranger:\n{log}"
    );
}

/// The `/v1` routes answer bad requests with a JSON `{"error": ...}` and the right status.
#[test]
fn v1_bad_requests_get_json_errors() {
    let cluster = Cluster::start("bad-input-v1", 1, &["--max-value-bytes", "10"]);
    let url = |p: &str| cluster.nodes[0].url(p);
    let json = |s: &str| Some(s.as_bytes().to_vec());
    for (method, path, body, status) in [
        ("GET", "v1/kv/", None, 400),
        ("GET", "v1/kv/%FF", None, 400),
        ("GET", "v1/kv/k?consistency=maybe", None, 400),
        ("GET", "v1/kv/k?if_revison=1", None, 400),
        ("PUT", "v1/kv/k?if_revision=-1", json("v"), 400),
        ("PUT", "v1/kv/k?if_revision=1&colour=red", json("v"), 400),
        ("PUT", "v1/kv/k", json("0123456789abc"), 413),
        ("GET", "v1/kv?limit=10001", None, 400),
        ("GET", "v1/kv?limit=ten", None, 400),
        ("POST", "v1/kv", json("not json"), 400),
        ("POST", "v1/kv", json("{\"k\":1}"), 400),
        ("POST", "v1/members", json("{\"id\": 5}"), 400),
        (
            "POST",
            "v1/members",
            json("{\"id\": 5, \"peer_url\": \"ftp://x:1\"}"),
            400,
        ),
        (
            "POST",
            "v1/members",
            json("{\"id\": 1, \"peer_url\": \"http://127.0.0.1:1\"}"),
            409,
        ),
        ("DELETE", "v1/members/1", None, 409),
        ("DELETE", "v1/members/x", None, 400),
        ("PATCH", "v1/kv/k", None, 405),
        ("PUT", "v1/kv", None, 405),
        ("GET", "v1/members/1", None, 405),
        ("GET", "v1/nothing", None, 404),
    ] {
        let (code, text) = http(method, &url(path), body);
        assert_eq!(code, status, "{method} /{path}: {text}");
        let body: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} /{path}: not JSON: {text}"));
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} /{path}: {text}"
        );
    }
    // A JSON PUT with the wrong shape is refused, and nothing was written.
    let client = reqwest::blocking::Client::new();
    let answer = client
        .put(url("v1/kv/k"))
        .header("content-type", "application/json")
        .body("{\"val\":1}")
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 400);
    assert_eq!(http("GET", &url("v1/kv/k"), None).0, 404);
}
