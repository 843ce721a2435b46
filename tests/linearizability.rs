//! Jepsen-style test: concurrent clients PUT unique values and GET a few keys on every
//! node of a 3-node cluster while a nemesis injects faults; the recorded history must be
//! linearizable, and after healing every node must agree.
//!
//! Faults (each at least once per run): kill -9 and restart of one node; kill -9 of every
//! node and restart; SIGSTOP/SIGCONT; partitions that isolate a follower and the leader
//! (with three nodes a majority/minority split is exactly an isolation); removing a node
//! and adding a fresh one under a new id. Partitions use the test-only
//! `POST /debug/partition` hook (`--enable-fault-injection`), which drops raft messages
//! silently, so traffic stalls instead of being reset.
//!
//! Beside them, `CAS_CLIENTS` clients increment one counter with compare-and-swap (read
//! value and revision, write value + 1 only at that revision): half with a conditional
//! PUT on `/v1/kv` (`?if_revision=`), half with a `/v1/txn` transaction, whose failure
//! branch reads the counter (it must have moved past that revision). A CAS that two
//! clients both won from the same revision would write the same number twice; a lost
//! update would leave the counter below the number of acknowledged increments. After
//! healing, the counter must be at least the acknowledged increments and at most those
//! plus the increments whose outcome is unknown, and no number may be acknowledged twice.
//!
//! Watchers follow the counter and every key with `/v1/watch` from a
//! random member, and reconnect elsewhere from the revision after the last they were
//! told of whenever a fault breaks their stream (`history/watchers.rs`): each must have
//! seen, per group, strictly increasing revisions, the counter's values one by one
//! (every increment exactly once), every acknowledged increment at its revision, and at
//! the end the counter's final value.
//!
//! The test runs twice: on one raft group, and on a cluster formed with `--shards 8`
//! (keys in eight data groups). There the first membership fault is a fourth node
//! joining, with replicas moving onto it under the clients; each later one (in a soak)
//! removes a node, which drains it first (its replicas go back to nodes that were moved
//! off those groups, as new replicas), and adds a fresh one.
//!
//! `RAFTKVD_SOAK_SECS=600 cargo test --release --test linearizability -- --nocapture`
//! repeats the nemesis schedule for that long.

mod checker;
mod common;
mod history;

use common::{http, Cluster};
use history::{read_counter, Bases, Rng, Workload, KEYS};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Successful operations to wait for while each fault is in place, and after healing.
const PROGRESS_OPS: usize = 60;
/// Frequent snapshots, so compaction and snapshot transfer happen under faults too.
const FLAGS: &[&str] = &[
    "--enable-fault-injection",
    "--request-timeout-ms",
    "1500",
    "--snapshot-count",
    "200",
    "--snapshot-catchup-entries",
    "50",
];

/// Drives faults against the cluster and waits for progress between them.
struct Nemesis {
    cluster: Cluster,
    bases: Bases,
    rec: Arc<history::Recorder>,
    rng: Rng,
    faults: Vec<String>,
    next_id: u64,
    /// The cluster was formed with --shards: keys live in several raft groups.
    sharded: bool,
}

impl Nemesis {
    fn progress(&self, what: &str) {
        let target = self.rec.succeeded.load(Ordering::SeqCst) + PROGRESS_OPS;
        self.cluster
            .wait_until(&format!("client progress {what}"), || {
                self.rec.succeeded.load(Ordering::SeqCst) >= target
            });
    }

    fn live_ids(&self) -> Vec<u64> {
        self.cluster.running().map(|n| n.id).collect()
    }

    fn random_live(&mut self) -> u64 {
        let ids = self.live_ids();
        ids[self.rng.below(ids.len())]
    }

    /// Records a fault, with the time it began on the history's clock (seconds).
    fn note(&mut self, fault: String) {
        let fault = format!("{:.3} s: {fault}", self.rec.now() as f64 / 1e9);
        eprintln!("nemesis: {fault}");
        self.faults.push(fault);
    }

    fn kill_and_restart_one(&mut self) {
        let id = self.random_live();
        self.note(format!("kill -9 node {id}"));
        self.cluster.node(id).kill();
        self.progress("with a node down");
        self.cluster.node(id).start();
        self.progress("after the restart");
    }

    fn kill_and_restart_all(&mut self) {
        self.note("kill -9 every node".into());
        for id in self.live_ids() {
            self.cluster.node(id).kill();
        }
        for id in self.live_ids_all() {
            self.cluster.node(id).start();
        }
        self.progress("after restarting every node");
    }

    /// Ids of nodes that are members (started at least once and not removed).
    fn live_ids_all(&self) -> Vec<u64> {
        self.cluster
            .nodes
            .iter()
            .filter(|n| !n.data_dir.join("REMOVED").exists())
            .map(|n| n.id)
            .collect()
    }

    fn pause_one(&mut self) {
        let id = self.random_live();
        self.note(format!("SIGSTOP node {id}"));
        self.cluster.node(id).signal("STOP");
        self.progress("with a node paused");
        self.cluster.node(id).signal("CONT");
        self.progress("after SIGCONT");
    }

    fn partition(&self, isolated: u64) {
        let others: Vec<u64> = self
            .live_ids()
            .into_iter()
            .filter(|&i| i != isolated)
            .collect();
        for node in self.cluster.running() {
            let blocked: Vec<String> = if node.id == isolated {
                others.iter().map(u64::to_string).collect()
            } else {
                vec![isolated.to_string()]
            };
            let body = blocked.join(",").into_bytes();
            assert_eq!(
                http("POST", &node.url("debug/partition"), Some(body)).0,
                204
            );
        }
    }

    fn heal(&self) {
        for node in self.cluster.running() {
            assert_eq!(
                http("POST", &node.url("debug/partition"), Some(vec![])).0,
                204
            );
        }
    }

    fn isolate(&mut self, leader: bool) {
        let current = self.cluster.wait_leader();
        let id = if leader {
            current
        } else {
            let followers: Vec<u64> = self
                .live_ids()
                .into_iter()
                .filter(|&i| i != current)
                .collect();
            followers[self.rng.below(followers.len())]
        };
        let role = if leader { "leader" } else { "follower" };
        self.note(format!("partition: isolate the {role}, node {id}"));
        self.partition(id);
        self.progress("on the majority side");
        self.heal();
        self.progress("after healing");
    }

    /// Removes a follower, then adds a brand-new node under a new id with a fresh data dir.
    fn replace_a_node(&mut self) {
        let leader = self.cluster.wait_leader();
        let victim = self.live_ids().into_iter().find(|&i| i != leader).unwrap();
        self.note(format!("membership: remove node {victim}"));
        let gone = base_url(self.cluster.node(victim));
        self.bases.write().unwrap().retain(|b| *b != gone);
        let leader_url = self.cluster.node(leader).url(&victim.to_string());
        let (code, text) = http("DELETE", &leader_url, None);
        // 202: it hosts replicas of data groups, which move off it first (draining).
        assert!(
            code == 204 || code == 202,
            "remove node {victim}: {code} {text}"
        );
        let status = self
            .cluster
            .node(victim)
            .wait_exit(Duration::from_secs(180));
        assert!(status.success(), "removed node exited with {status}");
        self.progress("after the removal");

        let id = self.next_id;
        self.next_id += 1;
        self.note(format!("membership: add node {id} with a fresh data dir"));
        self.cluster.add_member(id, leader, FLAGS);
        let base = base_url(self.cluster.node(id));
        self.cluster
            .wait_until(&format!("node {id} to catch up"), || {
                let s = self
                    .cluster
                    .nodes
                    .iter()
                    .find(|n| n.id == id)
                    .unwrap()
                    .status();
                s.is_some_and(|s| {
                    s["leader"].as_u64() != Some(0) && s["applied"].as_u64() > Some(0)
                })
            });
        self.bases.write().unwrap().push(base);
        self.progress("with the new node serving");
    }

    fn round(&mut self) {
        self.kill_and_restart_one();
        self.pause_one();
        self.isolate(false);
        self.isolate(true);
        self.kill_and_restart_all();
        if self.sharded && self.next_id == 4 {
            // A fourth node joins: replicas move onto it under the clients.
            self.add_a_node_and_rebalance();
        } else {
            // In a sharded cluster the removed node is drained first: its replicas go
            // back to nodes that were moved off those groups before, each as a new
            // replica under a new raft id.
            self.replace_a_node();
        }
    }

    /// Adds a fresh node 4; the cluster group's leader moves replicas onto it while the
    /// clients run.
    fn add_a_node_and_rebalance(&mut self) {
        let leader = self.cluster.wait_leader();
        let id = self.next_id;
        self.next_id += 1;
        self.note(format!(
            "membership: add node {id}; replicas rebalance onto it"
        ));
        self.cluster.add_member(id, leader, FLAGS);
        let base = base_url(self.cluster.node(id));
        let hosted = |node: &common::Node| {
            node.status()
                .and_then(|s| s["groups"].as_array().map(Vec::len))
                .unwrap_or(0)
        };
        self.cluster
            .wait_until(&format!("node {id} to host data groups"), || {
                hosted(self.cluster.nodes.iter().find(|n| n.id == id).unwrap()) > 1
            });
        self.bases.write().unwrap().push(base);
        self.progress("while replicas move onto the new node");
    }
}

/// A node's client API as the clients name it.
fn base_url(node: &common::Node) -> String {
    format!("http://127.0.0.1:{}", node.api_port)
}

#[test]
fn history_under_faults_is_linearizable() {
    run_history("linearizable", FLAGS, false);
}

/// The same with the keys spread over 8 data groups of 3 replicas: each request goes to
/// its key's group, and the faults hit every group at once.
#[test]
fn sharded_history_under_faults_is_linearizable() {
    let flags: Vec<&str> = FLAGS.iter().copied().chain(["--shards", "8"]).collect();
    run_history("linearizable-sharded", &flags, true);
}

fn run_history(name: &str, flags: &[&str], sharded: bool) {
    let cluster = Cluster::start(name, 3, flags);
    // Watchers of the counter and of every key (in a sharded cluster, a node follows
    // the groups it does not host through their hosts).
    let watches = ["key=cas-counter", "prefix="];
    let mut workload =
        Workload::start_with_watchers(cluster.nodes.iter().map(base_url).collect(), &watches);
    let mut nemesis = Nemesis {
        cluster,
        bases: workload.bases.clone(),
        rec: workload.rec.clone(),
        rng: Rng::new(std::process::id() as u64),
        faults: Vec::new(),
        next_id: 4,
        sharded,
    };
    let soak = std::env::var("RAFTKVD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    nemesis.progress("before any fault");
    loop {
        nemesis.round();
        if soak.is_none_or(|d| started.elapsed() >= d) {
            break;
        }
    }
    nemesis.heal();
    workload.finish();

    // Every member converges: each answers a linearizable read of every key (recorded in
    // the history), and their local maps agree.
    let cluster = &nemesis.cluster;
    cluster.wait_leader();
    for node in cluster.running() {
        for key in KEYS {
            cluster.wait_until(&format!("node {} to answer GET {key}", node.id), || {
                workload.rec.read(&base_url(node), key)
            });
        }
    }
    for key in KEYS {
        let local = |port: u16| {
            http(
                "GET",
                &format!("http://127.0.0.1:{port}/{key}?consistency=serializable"),
                None,
            )
        };
        cluster.wait_until(&format!("every node to agree on {key}"), || {
            let answers: BTreeSet<_> = cluster.running().map(|n| local(n.api_port)).collect();
            answers.len() == 1
        });
    }

    let mut counter = None;
    let base = base_url(cluster.running().next().unwrap());
    cluster.wait_until("a linearizable read of the counter", || {
        counter = read_counter(&base);
        counter.is_some()
    });
    if let Err(e) = workload.verify(counter.unwrap().0, &nemesis.faults) {
        let saved = cluster.dir.0.join("history.tsv");
        let note = match workload.save_history(&saved) {
            Ok(()) => format!("the whole history is in {}", saved.display()),
            Err(why) => format!("could not save the history: {why}"),
        };
        panic!("{e}\n{note}\n{}", cluster.logs());
    }
}
