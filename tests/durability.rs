//! Every acknowledged PUT survives kill -9: of a single node, and of a whole cluster at
//! once, with writes in flight at the moment of the kill. A SIGTERM with writes in flight
//! answers each of them (success, or 503 / a closed connection) and exits 0. Writes lost
//! with a frozen leader are proposed again and apply exactly once.

mod common;

use common::{http, http_json, Cluster};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

const WRITERS: usize = 6;
/// Stop writing (and kill) once this many PUTs were acknowledged.
const ACKED_BEFORE_KILL: usize = 150;

/// (key, value) pairs whose PUT was answered 204.
type Acked = Arc<Mutex<Vec<(String, String)>>>;
/// Answers other than 204, 503 and "no answer" (connection refused or closed).
type Unexpected = Arc<Mutex<Vec<(u16, String)>>>;

/// Runs `WRITERS` threads PUTting unique keys round-robin over `ports` until `stop`;
/// returns the shared list of acknowledged (key, value) pairs.
fn start_writers(ports: Vec<u16>, stop: Arc<AtomicBool>) -> (Acked, Vec<thread::JoinHandle<()>>) {
    let (acked, _, handles) = start_checked_writers(ports, stop);
    (acked, handles)
}

/// As `start_writers`, and also collects the answers no write should ever get.
fn start_checked_writers(
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
) -> (Acked, Unexpected, Vec<thread::JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let unexpected: Unexpected = Arc::new(Mutex::new(Vec::new()));
    let handles = (0..WRITERS)
        .map(|w| {
            let (ports, stop, acked) = (ports.clone(), stop.clone(), acked.clone());
            let unexpected = unexpected.clone();
            thread::spawn(move || {
                // Bounded: each writer sends at most 2,000 requests.
                for i in 0..2000 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let port = ports[(w + i) % ports.len()];
                    let (key, value) = (format!("w{w}-k{i}"), format!("value-{w}-{i}"));
                    let url = format!("http://127.0.0.1:{port}/{key}");
                    match http("PUT", &url, Some(value.clone().into_bytes())) {
                        (204, _) => acked.lock().unwrap().push((key, value)),
                        (0 | 503, _) => {}
                        other => unexpected.lock().unwrap().push(other),
                    }
                }
            })
        })
        .collect();
    (acked, unexpected, handles)
}

fn check_all_acked(cluster: &Cluster, acked: &[(String, String)]) {
    for node in cluster.running() {
        for (key, value) in acked {
            cluster.wait_value(node.id, key, value);
        }
    }
}

#[test]
fn single_node_kill9_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start("durable-single", 1, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, writers) = start_writers(vec![cluster.nodes[0].api_port], stop.clone());
    cluster.wait_until("enough acknowledged writes", || {
        acked.lock().unwrap().len() >= ACKED_BEFORE_KILL
    });
    cluster.node(1).kill();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    cluster.node(1).start();
    cluster.wait_leader();
    check_all_acked(&cluster, &acked);
}

#[test]
fn whole_cluster_kill9_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start("durable-cluster", 3, &[]);
    let ports = cluster.nodes.iter().map(|n| n.api_port).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, writers) = start_writers(ports, stop.clone());
    cluster.wait_until("enough acknowledged writes", || {
        acked.lock().unwrap().len() >= ACKED_BEFORE_KILL
    });
    for node in &mut cluster.nodes {
        node.kill();
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_leader();
    check_all_acked(&cluster, &acked);
}

#[test]
fn sigterm_stops_cleanly_and_restart_keeps_data() {
    let mut cluster = Cluster::start("sigterm", 1, &[]);
    cluster.put_ok(1, "k", "v");
    cluster.node(1).signal("TERM");
    let status = cluster
        .node(1)
        .wait_exit(std::time::Duration::from_secs(20));
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    cluster.node(1).start();
    cluster.wait_value(1, "k", "v");
}

#[test]
fn sigterm_with_writes_in_flight_answers_them_and_exits_0() {
    let mut cluster = Cluster::start("sigterm-busy", 3, &[]);
    let leader = cluster.wait_leader();
    let port = cluster.node(leader).api_port;
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, unexpected, writers) = start_checked_writers(vec![port], stop.clone());
    cluster.wait_until("enough acknowledged writes", || {
        acked.lock().unwrap().len() >= ACKED_BEFORE_KILL
    });
    cluster.node(leader).signal("TERM");
    let status = cluster
        .node(leader)
        .wait_exit(std::time::Duration::from_secs(30));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let unexpected = unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "answers during shutdown: {unexpected:?}"
    );
    cluster
        .node(leader)
        .assert_logged("transferring leadership", "a stopping leader hands off");

    // The others elect a leader at once and hold every acknowledged write; so does the
    // stopped node once restarted.
    cluster.wait_leader();
    let acked = acked.lock().unwrap().clone();
    check_all_acked(&cluster, &acked);
    cluster.node(leader).start();
    check_all_acked(&cluster, &acked);
}

/// A write sent while no leader is known (the leader and the other follower are frozen,
/// so the one left campaigns in vain) waits for one instead of failing at once: once the
/// other follower wakes up and the two elect a leader, the write is proposed and
/// acknowledged, within its request timeout.
#[test]
fn a_write_sent_during_an_election_waits_for_the_new_leader() {
    let mut cluster = Cluster::start("leaderless-write", 3, &["--request-timeout-ms", "15000"]);
    let leader = cluster.wait_leader();
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let (asked, other) = (followers[0], followers[1]);
    let (code, _) = http("GET", &cluster.node(asked).url("v1/kv/warm-up"), None);
    assert_eq!(code, 404);
    cluster.node(leader).signal("STOP");
    cluster.node(other).signal("STOP");
    cluster.wait_until("the follower left to know no leader", || {
        cluster.nodes[asked as usize - 1]
            .status()
            .is_some_and(|s| s["leader"] == 0)
    });
    let waits = |cluster: &Cluster| {
        let log = cluster.nodes[asked as usize - 1].log_text();
        log.matches("writes wait for one to be elected").count()
    };
    let waited_before = waits(&cluster);
    let url = cluster.node(asked).url("v1/kv/waited");
    let writer =
        thread::spawn(move || http_json("PUT", &url, Some(serde_json::json!({ "value": "v" }))));
    cluster.wait_until("the write to wait for a leader", || {
        waits(&cluster) > waited_before
    });
    cluster.node(other).signal("CONT");
    let (code, answer) = writer.join().unwrap();
    assert_eq!(code, 200, "{answer}\n{}", cluster.logs());
    cluster.node(leader).signal("CONT");
    for node in &cluster.nodes {
        let url = node.url("v1/kv/waited?consistency=serializable");
        cluster.wait_until(&format!("node {} to apply the write", node.id), || {
            http_json("GET", &url, None).1["value"] == "v"
        });
    }
}

/// Writes sent through the followers just after the leader froze (SIGSTOP: the proposals
/// they forward sit unread in its socket) are proposed again once a new leader is elected,
/// within the default request timeout: 200, not 503. And each applies once: after the old
/// leader wakes up, reads its socket and learns of the new term, every key is still at
/// the revision its write was acknowledged with (a second application would have moved
/// it).
#[test]
fn writes_lost_with_a_frozen_leader_are_proposed_again_and_apply_once() {
    let mut cluster = Cluster::start("repropose", 3, &[]);
    let leader = cluster.wait_leader();
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    // A node's first /v1 request waits for a read index of the cluster group, which
    // would hold these writes back until a new leader is elected: make it now.
    for &id in &followers {
        let (code, _) = http("GET", &cluster.node(id).url("v1/kv/warm-up"), None);
        assert_eq!(code, 404);
    }
    cluster.node(leader).signal("STOP");
    let frozen = Instant::now();
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let url = cluster
                .node(followers[i % 2])
                .url(&format!("v1/kv/lost-{i}"));
            thread::spawn(move || {
                let body = Some(serde_json::json!({ "value": format!("v{i}") }));
                (i, http_json("PUT", &url, body))
            })
        })
        .collect();
    let mut acked = Vec::new();
    for writer in writers {
        let (i, (code, answer)) = writer.join().unwrap();
        assert_eq!(
            code,
            200,
            "PUT lost-{i} through a follower: {answer}\n{}",
            cluster.logs()
        );
        acked.push((i, answer["revision"].as_u64().unwrap()));
    }
    eprintln!("all six answered {:?} after the freeze", frozen.elapsed());
    cluster.node(leader).signal("CONT");
    cluster.wait_until("the old leader to follow the new one", || {
        cluster.nodes.iter().all(|n| {
            n.status()
                .is_some_and(|s| s["leader"].as_u64().is_some_and(|l| l != 0 && l != leader))
        })
    });
    // One more write through the old leader; a node that serves it has applied every
    // entry before it, including any second copy of the writes above.
    let (code, _) = http(
        "PUT",
        &cluster.node(leader).url("after"),
        Some(b"x".to_vec()),
    );
    assert_eq!(code, 204);
    for node in &cluster.nodes {
        let after = node.url("after?consistency=serializable");
        cluster.wait_until(&format!("node {} to apply the last write", node.id), || {
            http("GET", &after, None).0 == 200
        });
        for &(i, revision) in &acked {
            let url = node.url(&format!("v1/kv/lost-{i}?consistency=serializable"));
            cluster.wait_until(&format!("node {} to hold lost-{i}", node.id), || {
                http_json("GET", &url, None).0 == 200
            });
            let (_, got) = http_json("GET", &url, None);
            assert_eq!(got["value"], format!("v{i}"));
            assert_eq!(
                got["revision"].as_u64(),
                Some(revision),
                "node {}: lost-{i} was applied again after it was acknowledged\n{}",
                node.id,
                cluster.logs()
            );
        }
    }
}
