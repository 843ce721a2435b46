//! The clients of the Jepsen-style tests and what they record: `CLIENTS` threads PUT
//! unique values to and GET a few keys from random members, `CAS_CLIENTS` threads
//! increment one counter with compare-and-swap on `/v1/kv`, and the checks run on what
//! they saw (the history through `checker`, the counter against the acknowledged
//! increments). Members are named by the base URL of their client API
//! (`http://host:port`), so the same clients drive processes on loopback
//! (`linearizability.rs`) and containers with their own addresses (`containers.rs`).
#![allow(dead_code)]

mod watchers;

use crate::checker::{self, Kind, Op};
use crate::common::{http_with_headers, http_with_timeout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

pub const KEYS: [&str; 4] = ["a", "b", "c", "d"];
pub const CLIENTS: usize = 6;
pub const CAS_CLIENTS: usize = 2;
pub const COUNTER: &str = "cas-counter";
/// Each client sends at most this many requests, a bound on the run.
const MAX_OPS_PER_CLIENT: usize = 100_000;
/// (At 20,000 every client had used its budget five minutes into a soak on an idle
/// machine, and the nemesis then waited in vain for progress.) The same for a
/// compare-and-swap client, whose requests are not in the history the checker searches:
/// one refused with 412 is retried at once, as a real client would, so they go fast.
const MAX_CAS_OPS_PER_CLIENT: usize = 1_000_000;
/// A client waits this long after a request that failed (no leader, no answer) before
/// its next, as a real client backs off: without it, the fast 503s of an election spend
/// a long soak's whole budget of requests (a 600 s soak ran out and stalled).
const RETRY_PAUSE: Duration = Duration::from_millis(20);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// The client API base URLs the clients pick from; the test changes it as members come
/// and go (or a container's address changes).
pub type Bases = Arc<RwLock<Vec<String>>>;

/// A tiny xorshift generator: the tests need variety, not cryptography.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// One of `items`, at random.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// One of `items` (which must not be empty), cloned.
    pub fn pick_cloned<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The history, and counters the nemesis waits on.
pub struct Recorder {
    pub epoch: Instant,
    pub ops: Mutex<Vec<Op>>,
    pub succeeded: AtomicUsize,
    pub unknown_writes: AtomicUsize,
    pub failed_reads: AtomicUsize,
    pub unexpected: Mutex<Vec<String>>,
}

impl Recorder {
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn record(&self, op: Op) {
        if op.ret.is_some() {
            self.succeeded.fetch_add(1, Ordering::SeqCst);
        }
        self.ops.lock().unwrap().push(op);
    }

    /// One GET (linearizable) on `port`; records it if it succeeded.
    pub fn read(&self, base: &str, key: &str) -> bool {
        let call = self.now();
        let url = format!("{base}/{key}");
        let (code, body, served) = http_with_headers(
            "GET",
            &url,
            None,
            CLIENT_TIMEOUT,
            &[
                "x-raftkvd-served-by",
                "x-raftkvd-read-index",
                "x-raftkvd-revision",
            ],
        );
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
            via: match served.as_slice() {
                [node, index, revision] => {
                    format!("{base} served-by={node} read-index={index} revision={revision}")
                }
                _ => base.to_string(),
            },
        });
        true
    }

    /// One PUT of a unique value; an unanswered or 503 PUT is recorded as open-ended.
    /// Returns whether it was acknowledged.
    pub fn write(&self, base: &str, key: &str, value: String) -> bool {
        let call = self.now();
        let url = format!("{base}/{key}");
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
            via: base.to_string(),
        });
        ret.is_some()
    }
}

pub fn run_client(id: usize, bases: Bases, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut rng = Rng::new(id as u64 + 1);
    for n in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let base = rng.pick_cloned(&bases.read().unwrap());
        let key = rng.pick(&KEYS);
        let ok = if rng.below(2) == 0 {
            rec.write(&base, key, format!("c{id}-{n}"))
        } else {
            rec.read(&base, key)
        };
        if !ok {
            thread::sleep(RETRY_PAUSE);
        }
    }
}

/// What the compare-and-swap clients saw.
#[derive(Default)]
pub struct CasTally {
    /// Counter values written by a CAS that was answered 200.
    pub acked: Vec<u64>,
    /// The same, each with the revision it was written at.
    pub acked_at: Vec<(u64, u64)>,
    /// CAS writes with no answer or a 503: they may or may not have landed.
    pub unknown: usize,
    /// CAS writes refused with 412 (another client got there first).
    pub refused: usize,
    /// Transactions refused with 409 while a member's entry format was not yet known
    /// (a node just added, not heard from yet): nothing was written.
    pub gated: usize,
    pub unexpected: Vec<String>,
}

/// Reads the counter linearizably: Some((value, revision)), (0, 0) if absent, None if
/// the read failed.
pub fn read_counter(base: &str) -> Option<(u64, u64)> {
    let url = format!("{base}/v1/kv/{COUNTER}");
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

pub fn run_cas_client(id: usize, bases: Bases, tally: Arc<Mutex<CasTally>>, stop: Arc<AtomicBool>) {
    let mut rng = Rng::new(1000 + id as u64);
    for _ in 0..MAX_CAS_OPS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let base = rng.pick_cloned(&bases.read().unwrap());
        let Some((value, revision)) = read_counter(&base) else {
            thread::sleep(RETRY_PAUSE);
            continue;
        };
        let next = value + 1;
        // Odd clients swap through a transaction, even ones through a conditional PUT:
        // both must win at most once from a revision.
        let by_txn = id % 2 == 1;
        let (method, url, body) = match by_txn {
            false => (
                "PUT",
                format!("{base}/v1/kv/{COUNTER}?if_revision={revision}"),
                next.to_string(),
            ),
            true => (
                "POST",
                format!("{base}/v1/txn"),
                serde_json::json!({
                    "compare": [{"key": COUNTER, "revision": revision}],
                    "success": [{"put": {"key": COUNTER, "value": next.to_string()}}],
                    "failure": [{"get": {"key": COUNTER}}],
                })
                .to_string(),
            ),
        };
        let (code, body) = http_with_timeout(method, &url, Some(body.into_bytes()), CLIENT_TIMEOUT);
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let mut tally = tally.lock().unwrap();
        let code = match (code, &answer["succeeded"]) {
            (200, serde_json::Value::Bool(false)) => {
                // The compare failed: the counter the failure branch read must have moved.
                let seen = &answer["responses"][0]["get"];
                if seen["revision"].as_u64().unwrap_or(0) == revision {
                    tally.unexpected.push(format!(
                        "POST {url}: the compare on revision {revision} failed, yet the \
                         failure branch read that revision: {body}"
                    ));
                }
                412
            }
            (code, _) => code,
        };
        match code {
            200 => {
                tally.acked.push(next);
                match answer["revision"].as_u64() {
                    Some(revision) => tally.acked_at.push((next, revision)),
                    None => tally
                        .unexpected
                        .push(format!("{method} {url}: 200 without a revision: {body}")),
                }
            }
            412 => tally.refused += 1,
            409 if by_txn && body.contains("entry format") => tally.gated += 1,
            0 | 503 => {
                tally.unknown += 1;
                drop(tally);
                thread::sleep(RETRY_PAUSE);
            }
            other => tally
                .unexpected
                .push(format!("{method} {url}: {other} {body}")),
        }
    }
}

/// The client threads, running until [`Workload::finish`].
pub struct Workload {
    pub bases: Bases,
    pub rec: Arc<Recorder>,
    pub tally: Arc<Mutex<CasTally>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    watchers: Vec<thread::JoinHandle<watchers::WatchLog>>,
    /// The newest counter value each watcher received.
    watched_counters: Vec<Arc<std::sync::atomic::AtomicU64>>,
    /// Stops the watchers (after the clients: they follow the last writes first).
    stop_watchers: Arc<AtomicBool>,
}

impl Workload {
    /// Starts every client against `bases`.
    pub fn start(bases: Vec<String>) -> Workload {
        Workload::start_with_watchers(bases, &[])
    }

    /// The same, plus a watcher of each of `watches` (`key=<k>` or `prefix=<p>`).
    pub fn start_with_watchers(bases: Vec<String>, watches: &[&str]) -> Workload {
        let bases: Bases = Arc::new(RwLock::new(bases));
        let rec = Arc::new(Recorder {
            epoch: Instant::now(),
            ops: Mutex::new(Vec::new()),
            succeeded: AtomicUsize::new(0),
            unknown_writes: AtomicUsize::new(0),
            failed_reads: AtomicUsize::new(0),
            unexpected: Mutex::new(Vec::new()),
        });
        let tally = Arc::new(Mutex::new(CasTally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..CLIENTS {
            let (bases, rec, stop) = (bases.clone(), rec.clone(), stop.clone());
            threads.push(thread::spawn(move || run_client(i, bases, rec, stop)));
        }
        for i in 0..CAS_CLIENTS {
            let (bases, tally, stop) = (bases.clone(), tally.clone(), stop.clone());
            threads.push(thread::spawn(move || run_cas_client(i, bases, tally, stop)));
        }
        let stop_watchers = Arc::new(AtomicBool::new(false));
        let watched_counters: Vec<_> = watches.iter().map(|_| Arc::default()).collect();
        let watchers = watches
            .iter()
            .zip(&watched_counters)
            .enumerate()
            .map(|(i, (what, counter))| {
                let (what, bases) = (what.to_string(), bases.clone());
                let (counter, stop) = (Arc::clone(counter), stop_watchers.clone());
                thread::spawn(move || watchers::run_watcher(i, what, bases, counter, stop))
            })
            .collect();
        Workload {
            bases,
            rec,
            tally,
            stop,
            threads,
            watchers,
            watched_counters,
            stop_watchers,
        }
    }

    /// Operations answered so far.
    pub fn succeeded(&self) -> usize {
        self.rec.succeeded.load(Ordering::SeqCst)
    }

    /// Stops the clients and waits for them.
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }

    /// After [`Workload::finish`]: no unexpected answer, the counter (`counter`, read
    /// linearizably after healing) against what the CAS clients were told, and every key's
    /// history linearizable. Prints what was checked.
    pub fn verify(&mut self, counter: u64, faults: &[String]) -> Result<(), String> {
        let unexpected = self.rec.unexpected.lock().unwrap().clone();
        if !unexpected.is_empty() {
            return Err(format!("unexpected answers: {unexpected:#?}"));
        }
        check_counter(&self.tally.lock().unwrap(), counter)?;
        self.check_watchers(counter)?;
        let history = self.rec.ops.lock().unwrap().clone();
        let writes = history
            .iter()
            .filter(|o| matches!(o.kind, Kind::Write(_)))
            .count();
        eprintln!(
            "linearizability: {} ops checked ({} writes, {} of them unknown outcome; {} reads, \
             {} failed reads dropped), faults injected: {} ({})",
            history.len(),
            writes,
            self.rec.unknown_writes.load(Ordering::SeqCst),
            history.len() - writes,
            self.rec.failed_reads.load(Ordering::SeqCst),
            faults.len(),
            faults.join("; "),
        );
        // The search recurses once per operation of a key: give it a deep stack.
        thread::Builder::new()
            .stack_size(512 * 1024 * 1024)
            .spawn(move || checker::check(&history))
            .unwrap()
            .join()
            .unwrap()
    }
}

impl Workload {
    /// Writes every recorded operation to `path`, one a line: key, call, return (- if
    /// unknown), kind, the write's value or the read's answer (- for absent), and where
    /// it went (`Op::via`), tab-separated; for a history the checker refused, to look at
    /// after the run.
    pub fn save_history(&self, path: &std::path::Path) -> std::io::Result<()> {
        let ops = self.rec.ops.lock().unwrap();
        let mut text = String::new();
        for op in ops.iter() {
            let ret = op.ret.map_or("-".to_string(), |r| r.to_string());
            let (kind, value) = match &op.kind {
                Kind::Write(v) => ("write", v.as_str()),
                Kind::Read(v) => ("read", v.as_deref().unwrap_or("-")),
            };
            text.push_str(&format!(
                "{}\t{}\t{ret}\t{kind}\t{value}\t{}\n",
                op.key, op.call, op.via
            ));
        }
        std::fs::write(path, text)
    }

    /// Lets every watcher receive the counter's final value `counter` (within a
    /// deadline), stops them, and checks what each saw.
    fn check_watchers(&mut self, counter: u64) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let behind = |w: &Vec<Arc<std::sync::atomic::AtomicU64>>| {
            w.iter().any(|c| c.load(Ordering::SeqCst) != counter)
        };
        while behind(&self.watched_counters) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        self.stop_watchers.store(true, Ordering::SeqCst);
        let logs: Vec<_> = self.watchers.drain(..).map(|w| w.join().unwrap()).collect();
        let acked_at = self.tally.lock().unwrap().acked_at.clone();
        for (i, log) in logs.iter().enumerate() {
            let last = self.watched_counters[i].load(Ordering::SeqCst);
            // After a break (410) the watcher starts at the next write, which may never
            // come: only an unbroken watcher must reach the final value.
            if last != counter && log.segments.len() == 1 {
                return Err(format!(
                    "watcher {i}: its last counter value is {last}, the counter is {counter}"
                ));
            }
            let summary =
                watchers::check(log, &acked_at).map_err(|e| format!("watcher {i}: {e}"))?;
            eprintln!("watcher {i}: gap-free, duplicate-free, up to the final counter: {summary}");
        }
        Ok(())
    }
}

/// The counter after healing against what the CAS clients were told.
fn check_counter(tally: &CasTally, value: u64) -> Result<(), String> {
    if !tally.unexpected.is_empty() {
        return Err(format!("unexpected CAS answers: {:#?}", tally.unexpected));
    }
    let mut acked = tally.acked.clone();
    acked.sort_unstable();
    let distinct = acked.len();
    acked.dedup();
    if acked.len() != distinct {
        return Err("two compare-and-swaps won from the same revision".into());
    }
    let low = distinct as u64;
    let high = low + tally.unknown as u64;
    eprintln!(
        "compare-and-swap counter: {value}; {distinct} increments acknowledged, {} refused \
         (412, or a failed transaction compare), {} transactions refused while a new \
         member's entry format was unknown (409), {} of unknown outcome",
        tally.refused, tally.gated, tally.unknown
    );
    if !(low..=high).contains(&value) || acked.last().is_some_and(|&max| value < max) {
        return Err(format!(
            "counter is {value}, but {low} increments were acknowledged (max {:?}) and {} \
             unknown",
            acked.last(),
            tally.unknown
        ));
    }
    if low == 0 {
        return Err("no compare-and-swap ever succeeded".into());
    }
    Ok(())
}
