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
//! Beside them, `CAS_CLIENTS` clients increment one counter with compare-and-swap on
//! `/v1/kv` (read value and revision, write value + 1 `?if_revision=`). A CAS that two
//! clients both won from the same revision would write the same number twice; a lost
//! update would leave the counter below the number of acknowledged increments. After
//! healing, the counter must be at least the acknowledged increments and at most those
//! plus the increments whose outcome is unknown, and no number may be acknowledged twice.
//!
//! The test runs twice: on one raft group, and on a cluster formed with `--shards 8`
//! (keys in eight data groups). There the membership fault is a fourth node joining once,
//! with replicas moving onto it under the clients (no node is removed: see `round`).
//!
//! `RAFTKVD_SOAK_SECS=600 cargo test --release --test linearizability -- --nocapture`
//! repeats the nemesis schedule for that long.

mod checker;
mod common;

use checker::{Kind, Op};
use common::{http, http_with_timeout, Cluster};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

const KEYS: [&str; 4] = ["a", "b", "c", "d"];
const CLIENTS: usize = 6;
const CAS_CLIENTS: usize = 2;
const COUNTER: &str = "cas-counter";
/// Each client sends at most this many requests, a bound on the run.
const MAX_OPS_PER_CLIENT: usize = 20_000;
/// A client waits this long after a request that failed (no leader, no answer) before
/// its next, as a real client backs off: without it, the fast 503s of an election spend
/// a long soak's whole budget of requests (a 600 s soak ran out and stalled).
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Successful operations to wait for while each fault is in place, and after healing.
const PROGRESS_OPS: usize = 60;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
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

/// A tiny xorshift generator: the tests need variety, not cryptography.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// One of `items`, at random.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The history, and counters the nemesis waits on.
struct Recorder {
    epoch: Instant,
    ops: Mutex<Vec<Op>>,
    succeeded: AtomicUsize,
    unknown_writes: AtomicUsize,
    failed_reads: AtomicUsize,
    unexpected: Mutex<Vec<String>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn record(&self, op: Op) {
        if op.ret.is_some() {
            self.succeeded.fetch_add(1, Ordering::SeqCst);
        }
        self.ops.lock().unwrap().push(op);
    }

    /// One GET (linearizable) on `port`; records it if it succeeded.
    fn read(&self, port: u16, key: &str) -> bool {
        let call = self.now();
        let url = format!("http://127.0.0.1:{port}/{key}");
        let (code, body) = http_with_timeout("GET", &url, None, CLIENT_TIMEOUT);
        let ret = self.now();
        let value = match code {
            200 => Some(body),
            404 => None,
            0 | 503 => {
                self.failed_reads.fetch_add(1, Ordering::SeqCst);
                return false;
            }
            other => {
                self.unexpected
                    .lock()
                    .unwrap()
                    .push(format!("GET {url}: {other} {body}"));
                return false;
            }
        };
        self.record(Op {
            key: key.into(),
            call,
            ret: Some(ret),
            kind: Kind::Read(value),
        });
        true
    }

    /// One PUT of a unique value; an unanswered or 503 PUT is recorded as open-ended.
    /// Returns whether it was acknowledged.
    fn write(&self, port: u16, key: &str, value: String) -> bool {
        let call = self.now();
        let url = format!("http://127.0.0.1:{port}/{key}");
        let (code, body) = http_with_timeout(
            "PUT",
            &url,
            Some(value.clone().into_bytes()),
            CLIENT_TIMEOUT,
        );
        let ret = match code {
            204 => Some(self.now()),
            0 | 503 => {
                self.unknown_writes.fetch_add(1, Ordering::SeqCst);
                None
            }
            other => {
                self.unexpected
                    .lock()
                    .unwrap()
                    .push(format!("PUT {url}: {other} {body}"));
                None
            }
        };
        self.record(Op {
            key: key.into(),
            call,
            ret,
            kind: Kind::Write(value),
        });
        ret.is_some()
    }
}

fn run_client(id: usize, ports: Arc<RwLock<Vec<u16>>>, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut rng = Rng::new(id as u64 + 1);
    for n in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let port = rng.pick(&ports.read().unwrap());
        let key = rng.pick(&KEYS);
        let ok = if rng.below(2) == 0 {
            rec.write(port, key, format!("c{id}-{n}"))
        } else {
            rec.read(port, key)
        };
        if !ok {
            thread::sleep(RETRY_PAUSE);
        }
    }
}

/// What the compare-and-swap clients saw.
#[derive(Default)]
struct CasTally {
    /// Counter values written by a CAS that was answered 200.
    acked: Vec<u64>,
    /// CAS writes with no answer or a 503: they may or may not have landed.
    unknown: usize,
    /// CAS writes refused with 412 (another client got there first).
    refused: usize,
    unexpected: Vec<String>,
}

/// Reads the counter linearizably: Some((value, revision)), (0, 0) if absent, None if
/// the read failed.
fn read_counter(port: u16) -> Option<(u64, u64)> {
    let url = format!("http://127.0.0.1:{port}/v1/kv/{COUNTER}");
    let (code, body) = http_with_timeout("GET", &url, None, CLIENT_TIMEOUT);
    match code {
        200 => {
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let value = v["value"].as_str()?.parse().ok()?;
            Some((value, v["revision"].as_u64()?))
        }
        404 => Some((0, 0)),
        _ => None,
    }
}

fn run_cas_client(
    id: usize,
    ports: Arc<RwLock<Vec<u16>>>,
    tally: Arc<Mutex<CasTally>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(1000 + id as u64);
    for _ in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let port = rng.pick(&ports.read().unwrap());
        let Some((value, revision)) = read_counter(port) else {
            thread::sleep(RETRY_PAUSE);
            continue;
        };
        let next = value + 1;
        let url = format!("http://127.0.0.1:{port}/v1/kv/{COUNTER}?if_revision={revision}");
        let (code, body) = http_with_timeout(
            "PUT",
            &url,
            Some(next.to_string().into_bytes()),
            CLIENT_TIMEOUT,
        );
        let mut tally = tally.lock().unwrap();
        match code {
            200 => tally.acked.push(next),
            412 => tally.refused += 1,
            0 | 503 => {
                tally.unknown += 1;
                drop(tally);
                thread::sleep(RETRY_PAUSE);
            }
            other => tally.unexpected.push(format!("PUT {url}: {other} {body}")),
        }
    }
}

/// Drives faults against the cluster and waits for progress between them.
struct Nemesis {
    cluster: Cluster,
    ports: Arc<RwLock<Vec<u16>>>,
    rec: Arc<Recorder>,
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

    fn note(&mut self, fault: String) {
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
        self.ports
            .write()
            .unwrap()
            .retain(|&p| p != self.cluster.node(victim).api_port);
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
        let port = self.cluster.node(id).api_port;
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
        self.ports.write().unwrap().push(port);
        self.progress("with the new node serving");
    }

    fn round(&mut self) {
        self.kill_and_restart_one();
        self.pause_one();
        self.isolate(false);
        self.isolate(true);
        self.kill_and_restart_all();
        if !self.sharded {
            self.replace_a_node();
        } else if self.next_id == 4 {
            // A fourth node joins: replicas move onto it under the clients. (Removing a
            // node from a sharded cluster drains it, which can stall once every spare
            // node was moved off a group before, since a node never hosts a group again;
            // so the soak does not replace nodes here.)
            self.add_a_node_and_rebalance();
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
        let node = self.cluster.node(id);
        let port = node.api_port;
        let hosted = |node: &common::Node| {
            node.status()
                .and_then(|s| s["groups"].as_array().map(Vec::len))
                .unwrap_or(0)
        };
        self.cluster
            .wait_until(&format!("node {id} to host data groups"), || {
                hosted(self.cluster.nodes.iter().find(|n| n.id == id).unwrap()) > 1
            });
        self.ports.write().unwrap().push(port);
        self.progress("while replicas move onto the new node");
    }
}

/// The counter after healing against what the CAS clients were told.
fn check_counter(cluster: &Cluster, tally: &CasTally) {
    assert!(
        tally.unexpected.is_empty(),
        "unexpected CAS answers: {:#?}",
        tally.unexpected
    );
    let mut acked = tally.acked.clone();
    acked.sort_unstable();
    let distinct = acked.len();
    acked.dedup();
    assert_eq!(
        acked.len(),
        distinct,
        "two compare-and-swaps won from the same revision"
    );
    let mut counter = None;
    let port = cluster.running().next().unwrap().api_port;
    cluster.wait_until("a linearizable read of the counter", || {
        counter = read_counter(port);
        counter.is_some()
    });
    let (value, _) = counter.unwrap();
    let low = distinct as u64;
    let high = low + tally.unknown as u64;
    eprintln!(
        "compare-and-swap counter: {value}; {distinct} increments acknowledged, {} refused \
         (412), {} of unknown outcome",
        tally.refused, tally.unknown
    );
    assert!(
        (low..=high).contains(&value) && acked.last().is_none_or(|&max| value >= max),
        "counter is {value}, but {low} increments were acknowledged (max {:?}) and {} unknown",
        acked.last(),
        tally.unknown
    );
    assert!(low > 0, "no compare-and-swap ever succeeded");
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
    let ports = Arc::new(RwLock::new(
        cluster.nodes.iter().map(|n| n.api_port).collect::<Vec<_>>(),
    ));
    let rec = Arc::new(Recorder {
        epoch: Instant::now(),
        ops: Mutex::new(Vec::new()),
        succeeded: AtomicUsize::new(0),
        unknown_writes: AtomicUsize::new(0),
        failed_reads: AtomicUsize::new(0),
        unexpected: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (ports, rec, stop) = (ports.clone(), rec.clone(), stop.clone());
            thread::spawn(move || run_client(i, ports, rec, stop))
        })
        .collect();
    let tally = Arc::new(Mutex::new(CasTally::default()));
    let cas_clients: Vec<_> = (0..CAS_CLIENTS)
        .map(|i| {
            let (ports, tally, stop) = (ports.clone(), tally.clone(), stop.clone());
            thread::spawn(move || run_cas_client(i, ports, tally, stop))
        })
        .collect();

    let mut nemesis = Nemesis {
        cluster,
        ports,
        rec: rec.clone(),
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
    stop.store(true, Ordering::SeqCst);
    for c in clients.into_iter().chain(cas_clients) {
        c.join().unwrap();
    }

    // Every member converges: each answers a linearizable read of every key (recorded in
    // the history), and their local maps agree.
    let cluster = &nemesis.cluster;
    cluster.wait_leader();
    for node in cluster.running() {
        for key in KEYS {
            cluster.wait_until(&format!("node {} to answer GET {key}", node.id), || {
                rec.read(node.api_port, key)
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

    let unexpected = rec.unexpected.lock().unwrap().clone();
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:#?}");
    check_counter(cluster, &tally.lock().unwrap());
    let history = rec.ops.lock().unwrap().clone();
    let writes = history
        .iter()
        .filter(|o| matches!(o.kind, Kind::Write(_)))
        .count();
    eprintln!(
        "linearizability: {} ops checked ({} writes, {} of them unknown outcome; {} reads, \
         {} failed reads dropped), faults injected: {} ({})",
        history.len(),
        writes,
        rec.unknown_writes.load(Ordering::SeqCst),
        history.len() - writes,
        rec.failed_reads.load(Ordering::SeqCst),
        nemesis.faults.len(),
        nemesis.faults.join("; "),
    );
    // The search recurses once per operation of a key: give it a deep stack.
    let verdict = thread::Builder::new()
        .stack_size(512 * 1024 * 1024)
        .spawn(move || checker::check(&history))
        .unwrap()
        .join()
        .unwrap();
    if let Err(e) = verdict {
        panic!("{e}\n{}", cluster.logs());
    }
}
