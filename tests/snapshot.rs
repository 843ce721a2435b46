//! Snapshots, log compaction, and catch-up through a snapshot (issue 3), with real
//! processes and a small --snapshot-count so that compaction happens within seconds.

mod common;

use common::{http, Cluster};
use std::thread;
use std::time::{Duration, Instant};

/// Snapshot every 100 writes, keep 20 entries behind: a node that lags more needs a
/// snapshot.
const FLAGS: &[&str] = &[
    "--snapshot-count",
    "100",
    "--snapshot-catchup-entries",
    "20",
];

/// Writes `n` keys `{prefix}{i}` = `v{i}` through the given nodes, 8 writers at a time.
fn write_keys(cluster: &Cluster, through: &[u64], prefix: &str, n: usize) {
    let ports: Vec<u16> = through
        .iter()
        .map(|id| cluster.nodes.iter().find(|x| x.id == *id).unwrap().api_port)
        .collect();
    thread::scope(|s| {
        for w in 0..8 {
            let ports = ports.clone();
            s.spawn(move || {
                for i in (w..n).step_by(8) {
                    let url = format!("http://127.0.0.1:{}/{prefix}{i}", ports[i % ports.len()]);
                    let (code, text) = http("PUT", &url, Some(format!("v{i}").into_bytes()));
                    assert_eq!(code, 204, "PUT {url}: {text}");
                }
            });
        }
    });
}

/// Every key is served by node `id` from its local map.
fn assert_all_keys(cluster: &Cluster, id: u64, prefix: &str, n: usize) {
    let node = cluster.nodes.iter().find(|x| x.id == id).unwrap();
    cluster.wait_value(id, &format!("{prefix}{}", n - 1), &format!("v{}", n - 1));
    for i in 0..n {
        let url = node.url(&format!("{prefix}{i}?consistency=serializable"));
        assert_eq!(
            http("GET", &url, None),
            (200, format!("v{i}")),
            "node {id} key {prefix}{i}"
        );
    }
}

/// Node `id` snapshotted recently: its last snapshot covers at least three quarters of
/// the entries it applied (writes are batched, several to an entry, so this is counted
/// in entries, not writes). Returns the snapshot's index.
fn assert_recent_snapshot(cluster: &mut Cluster, id: u64) -> u64 {
    let snap = cluster.node(id).status_u64("last_snapshot");
    let applied = cluster.node(id).status_u64("applied");
    assert!(
        snap > 0 && snap >= applied / 4 * 3,
        "node {id}: last snapshot {snap}, applied {applied}"
    );
    snap
}

#[test]
fn new_node_catches_up_through_a_snapshot_then_membership_still_works() {
    let mut cluster = Cluster::start("snap-join", 3, FLAGS);
    write_keys(&cluster, &[1, 2, 3], "k", 5000);
    assert_recent_snapshot(&mut cluster, 1);

    cluster.add_member(4, 1, FLAGS);
    assert_all_keys(&cluster, 4, "k", 5000);
    cluster.node(4).assert_logged(
        "installed a snapshot from the leader",
        "node 4 must have caught up through a snapshot",
    );

    // The snapshot carried the membership: node 4 knows every peer, so its writes reach
    // the leader, and removing a member still works after compaction.
    cluster.put_ok(4, "from-4", "yes");
    let (code, text) = http("DELETE", &cluster.nodes[0].url("3"), None);
    assert_eq!(code, 204, "{text}");
    assert!(cluster.node(3).wait_exit(Duration::from_secs(20)).success());
    cluster.put_ok(4, "after-removal", "ok");
    cluster.wait_value(1, "after-removal", "ok");
}

#[test]
fn lagging_follower_catches_up_through_a_snapshot() {
    let mut cluster = Cluster::start("snap-lag", 3, FLAGS);
    let leader = cluster.wait_leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let other = (1..=3).find(|&id| id != leader && id != follower).unwrap();
    write_keys(&cluster, &[leader], "a", 100);
    cluster.node(follower).kill();

    write_keys(&cluster, &[leader, other], "b", 1000);
    cluster.node(follower).start();
    assert_all_keys(&cluster, follower, "b", 1000);
    assert_all_keys(&cluster, follower, "a", 100);
    cluster.node(follower).assert_logged(
        "installed a snapshot from the leader",
        "it must have caught up through a snapshot",
    );

    // After installing, it restarts from its own snapshot.
    cluster.node(follower).kill();
    cluster.node(follower).start();
    assert_all_keys(&cluster, follower, "b", 1000);
}

#[test]
fn restart_after_compaction_loads_the_snapshot_and_replays_a_short_tail() {
    let mut cluster = Cluster::start("snap-restart", 1, FLAGS);
    write_keys(&cluster, &[1], "k", 1000);
    let snap = assert_recent_snapshot(&mut cluster, 1);
    cluster.node(1).kill();
    cluster.node(1).start();
    cluster.wait_leader();
    assert_all_keys(&cluster, 1, "k", 1000);
    cluster
        .node(1)
        .assert_logged("loaded snapshot", "it must restart from its snapshot");
    // It started from its newest snapshot, so it replayed only the entries after it.
    let loaded = cluster.node(1).status_u64("last_snapshot");
    let applied = cluster.node(1).status_u64("applied");
    assert!(
        loaded >= snap,
        "restarted from snapshot {loaded}, had {snap}"
    );
    assert!(
        applied - loaded <= 200,
        "replayed {} entries",
        applied - loaded
    );
    let data_dir = cluster.node(1).data_dir.clone();
    let snap_files = std::fs::read_dir(data_dir.join("snap"))
        .unwrap()
        .filter(|f| f.as_ref().unwrap().path().extension() == Some("snap".as_ref()))
        .count();
    assert!(
        (1..=3).contains(&snap_files),
        "old snapshots are pruned: {snap_files}"
    );
}

/// Flips a byte in the middle of the newest snapshot file of `data_dir`.
fn corrupt_newest_snapshot(data_dir: &std::path::Path) {
    let mut files: Vec<_> = std::fs::read_dir(data_dir.join("snap"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .collect();
    files.sort();
    let newest = files.last().expect("a snapshot file");
    let mut bytes = std::fs::read(newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(newest, bytes).unwrap();
}

#[test]
fn corrupt_newest_snapshot_falls_back_when_the_log_covers_it() {
    // Keep plenty of log behind each snapshot so that the previous snapshot is covered.
    let flags = [
        "--snapshot-count",
        "100",
        "--snapshot-catchup-entries",
        "1000",
    ];
    let mut cluster = Cluster::start("snap-corrupt-ok", 1, &flags);
    write_keys(&cluster, &[1], "k", 350);
    cluster.node(1).kill();
    corrupt_newest_snapshot(&cluster.node(1).data_dir.clone());
    cluster.node(1).start();
    cluster.wait_leader();
    assert_all_keys(&cluster, 1, "k", 350);
    let node = cluster.node(1);
    node.assert_logged(
        "snapshot file is unusable",
        "the corruption must be reported",
    );
    node.assert_logged(
        "using an older snapshot",
        "it must fall back to the previous one",
    );
}

#[test]
fn corrupt_newest_snapshot_refuses_to_start_when_the_log_does_not_cover() {
    let mut cluster = Cluster::start("snap-corrupt-refuse", 1, FLAGS);
    write_keys(&cluster, &[1], "k", 350);
    cluster.node(1).kill();
    corrupt_newest_snapshot(&cluster.node(1).data_dir.clone());
    cluster.node(1).start();
    let status = cluster.node(1).wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    cluster
        .node(1)
        .assert_logged("no usable snapshot", "it must say why it refuses");
}

/// With many groups none reaches --snapshot-count, yet their live entries keep every
/// raft-engine file alive: the node asks raft-engine which groups hold old files and has
/// them compact early, so the shared log stays near its 32 MiB purge threshold instead
/// of growing with every write. Nothing written is lost, and a restart reads it back.
#[test]
fn many_groups_keep_the_shared_raft_log_near_its_purge_threshold() {
    const KEYS: usize = 2_500;
    const VALUE_BYTES: usize = 40 << 10;
    let mut cluster = Cluster::start("snap-purge", 3, &["--shards", "16"]);
    // Values that raft-engine's compression cannot shrink: 100 MB of them in all.
    let value_of = |i: usize| -> String {
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut value = String::with_capacity(VALUE_BYTES);
        while value.len() < VALUE_BYTES {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            value.push_str(&format!("{x:016x}"));
        }
        value
    };
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.api_port).collect();
    thread::scope(|s| {
        for w in 0..4 {
            let ports = &ports;
            s.spawn(move || {
                for i in (w..KEYS).step_by(4) {
                    let url = format!("http://127.0.0.1:{}/big{i}", ports[i % ports.len()]);
                    let (code, text) = http("PUT", &url, Some(value_of(i).into_bytes()));
                    assert_eq!(code, 204, "PUT {url}: {text}");
                }
            });
        }
    });
    // Without early compaction all 100 MB would stay in use: 12 files of 8 MiB. With
    // it, about the purge threshold (32 MiB), the active file and the rewrite queue's
    // file. (The files on disk also count the purged ones raft-engine keeps to write
    // over again, up to six: their total does not tell the two apart.)
    let limit = 56 << 20;
    for id in 1..=3 {
        // The groups' snapshots are paced (8 MiB/s): about 100 MB of maps to write here.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let in_use = cluster
                .node(id)
                .metric("raftkvd_raft_log_in_use_bytes")
                .expect("every node reports raftkvd_raft_log_in_use_bytes");
            if in_use <= limit {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id}'s raft log still has {in_use} bytes in use, above {limit}\n{}",
                cluster.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
    cluster.node(1).assert_logged(
        "snapshot written",
        "groups compact at raft-engine's request",
    );
    cluster.node(2).kill();
    cluster.node(2).start();
    for i in (0..KEYS).step_by(7) {
        let url = cluster.node(2).url(&format!("big{i}"));
        cluster.wait_until(&format!("node 2 serves big{i}"), || {
            let (code, text) = http("GET", &url, None);
            code == 200 && text == value_of(i)
        });
    }
}
