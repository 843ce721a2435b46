//! Operating the daemon: health and readiness probes, flags from the environment,
//! --version.

mod common;

use common::{http, lone_joining_node, Cluster, TempDir, BIN};

#[test]
fn health_and_readiness() {
    let cluster = Cluster::start("probes", 3, &[]);
    for node in &cluster.nodes {
        assert_eq!(http("GET", &node.url("health"), None), (200, "ok\n".into()));
        cluster.wait_until("readiness", || {
            http("GET", &node.url("readyz"), None).0 == 200
        });
    }

    // A node that was never added knows no leader: alive, but not ready.
    let dir = TempDir::new("not-ready");
    let lone = lone_joining_node(&dir);
    let (code, text) = http("GET", &lone.url("readyz"), None);
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("no leader"), "{text}");
}

#[test]
fn every_flag_can_come_from_the_environment() {
    let mut cluster = Cluster::new("env", 1, &[]);
    let node = cluster.node(1);
    // Move --port and --data-dir from the arguments into the environment.
    let port_at = node.args.iter().position(|a| a == "--port").unwrap();
    let port = node.args.remove(port_at + 1);
    node.args.remove(port_at);
    let dir_at = node.args.iter().position(|a| a == "--data-dir").unwrap();
    let data_dir = node.args.remove(dir_at + 1);
    node.args.remove(dir_at);
    let mut child = std::process::Command::new(BIN)
        .args(&node.args)
        .env("RAFTKVD_PORT", &port)
        .env("RAFTKVD_DATA_DIR", &data_dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/k");
    cluster.wait_until("a PUT on the port from RAFTKVD_PORT", || {
        http("PUT", &url, Some(b"v".to_vec())).0 == 204
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(std::path::Path::new(&data_dir).join("raft-log").is_dir());
}

#[test]
fn version_and_help() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--id",
        "--cluster",
        "--port",
        "--join",
        "--data-dir",
        "--snapshot-count",
    ] {
        assert!(help.contains(flag), "--help must explain {flag}");
    }
    assert!(
        help.contains("RAFTKVD_PORT"),
        "--help names the environment variables"
    );
}

#[test]
fn json_logs_at_the_chosen_level() {
    let mut cluster = Cluster::start("json-logs", 1, &["--log-format", "json"]);
    cluster.put_ok(1, "k", "v");
    let log = cluster.node(1).log_text();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events
        .iter()
        .any(|e| e["msg"] == "leader changed" && e["node"] == 1));
    assert!(events
        .iter()
        .all(|e| e["ts"].is_string() && e["level"].is_string()));

    // At --log-level warning the informational lines are gone, the warnings stay.
    let mut quiet = Cluster::start("quiet-logs", 1, &["--log-level", "warning"]);
    let url = quiet.node(1).url("k");
    assert_eq!(http("PATCH", &url, None).0, 405);
    quiet.node(1).kill();
    let log = quiet.node(1).log_text();
    assert!(log.contains("request failed"), "{log}");
    assert!(!log.contains("INFO"), "{log}");
}

#[test]
fn prometheus_metrics() {
    let cluster = Cluster::start("metrics", 1, &["--snapshot-count", "5"]);
    for i in 0..10 {
        cluster.put_ok(1, &format!("k{i}"), "v");
    }
    assert_eq!(http("GET", &cluster.nodes[0].url("k0"), None).0, 200);
    let (code, text) = http("GET", &cluster.nodes[0].url("metrics"), None);
    assert_eq!(code, 200);
    // Every line is a comment or `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
        assert!(name.starts_with("raftkvd_"), "bad name: {line}");
    }
    let value = |series: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    assert_eq!(
        value("raftkvd_http_requests_total{route=\"put\",status=\"204\"}"),
        10.0
    );
    assert_eq!(
        value("raftkvd_http_requests_total{route=\"get\",status=\"200\"}"),
        1.0
    );
    assert!(value("raftkvd_proposals_total") >= 10.0);
    assert!(value("raftkvd_applied_entries_total") >= 10.0);
    assert!(value("raftkvd_committed_entries_total") >= 10.0);
    assert!(value("raftkvd_log_fsync_duration_seconds_count") >= 10.0);
    assert!(value("raftkvd_leader_changes_total") >= 1.0);
    cluster.wait_until("a snapshot to be counted", || {
        let (_, text) = http("GET", &cluster.nodes[0].url("metrics"), None);
        text.lines()
            .any(|l| l.starts_with("raftkvd_snapshots_total ") && !l.ends_with(" 0"))
    });
}

#[test]
fn status_reports_raft_state_members_and_disk_use() {
    let cluster = Cluster::start("status", 3, &[]);
    cluster.put_ok(1, "k", "v");
    let status = cluster.nodes[0].status().unwrap();
    for field in [
        "id",
        "term",
        "leader",
        "commit",
        "applied",
        "revision",
        "last_snapshot",
    ] {
        assert!(status[field].is_u64(), "{field} in {status}");
    }
    assert_eq!(status["id"], 1);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let entry_format = status["entry_format"].as_u64().unwrap();
    assert!(entry_format >= 4, "{status}");
    // Every member runs this build: once node 1 has heard from both peers, the cluster
    // writes the newest format it reads.
    cluster.wait_until("node 1 to hear every member's entry format", || {
        cluster.nodes[0].status_u64("cluster_entry_format") == entry_format
    });
    assert!(["Leader", "Follower"].contains(&status["role"].as_str().unwrap()));
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(members[1]["peer_url"], cluster.nodes[1].peer_url.as_str());
    // The raft log's files are on disk, so the data dir cannot be empty.
    let size = status["data_dir_bytes"].as_u64().unwrap();
    let on_disk: u64 = std::fs::read_dir(cluster.nodes[0].data_dir.join("raft-log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size >= on_disk && on_disk > 0, "{size} vs {on_disk}");
}
