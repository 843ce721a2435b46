//! Process metrics in the Prometheus text format (`GET /metrics`): plain atomic counters
//! and fixed-bucket histograms, updated where things happen and rendered on demand.
//! Updating a metric never blocks on anything but a short uncontended lock, and never
//! fails.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bucket upper bounds in seconds, from 100 us to 10 s.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

/// A latency histogram with cumulative buckets, as Prometheus expects.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let n = bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (route, status) -> requests answered.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// route -> latency.
    request_latency: Mutex<BTreeMap<&'static str, Arc<Histogram>>>,
    pub requests_in_flight: AtomicI64,
    /// Watch streams open (`api/watch_v1.rs`), and the events they sent.
    pub watches_open: AtomicI64,
    pub watch_events_sent: AtomicU64,
    pub proposals: AtomicU64,
    pub committed_entries: AtomicU64,
    pub applied_entries: AtomicU64,
    pub leader_changes: AtomicU64,
    pub peer_send_errors: AtomicU64,
    /// Peer messages dropped before raft saw them (implausible, or from a non-member).
    pub peer_messages_refused: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_duration: Histogram,
    /// One synced write of entries and hard state to the raft log.
    pub log_fsync: Histogram,
    /// The raft log's files in use, as raft-engine counts them (set by the raft loop).
    pub raft_log_in_use_bytes: AtomicU64,
}

impl Metrics {
    /// Counts one answered request and its latency.
    pub fn request_done(&self, route: &'static str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((route, status))
            .or_default() += 1;
        let histogram = self
            .request_latency
            .lock()
            .unwrap()
            .entry(route)
            .or_default()
            .clone();
        histogram.observe(took);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = "raftkvd_http_requests_total";
        header(
            &mut out,
            name,
            "counter",
            "Client requests answered, by route and status.",
        );
        for ((route, status), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(out, "{name}{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let name = "raftkvd_http_request_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Client request latency, by route.",
        );
        for (route, h) in self.request_latency.lock().unwrap().iter() {
            h.render(&mut out, name, &format!("route=\"{route}\""));
        }
        let name = "raftkvd_http_requests_in_flight";
        header(&mut out, name, "gauge", "Client requests being served.");
        let in_flight = self.requests_in_flight.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name} {in_flight}");
        let name = "raftkvd_watches_open";
        header(&mut out, name, "gauge", "Watch streams open on this node.");
        let open = self.watches_open.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name} {open}");
        let name = "raftkvd_raft_log_in_use_bytes";
        header(
            &mut out,
            name,
            "gauge",
            "Bytes of raft log files in use (whole files; purged files kept to be written over again are left out).",
        );
        let in_use = self.raft_log_in_use_bytes.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name} {in_use}");
        let counters = [
            (
                "raftkvd_watch_events_sent_total",
                "Events (puts and deletes) sent to watch streams.",
                &self.watch_events_sent,
            ),
            (
                "raftkvd_proposals_total",
                "Entries proposed by this node.",
                &self.proposals,
            ),
            (
                "raftkvd_committed_entries_total",
                "Entries this node learned are committed (its commit index advanced by them).",
                &self.committed_entries,
            ),
            (
                "raftkvd_applied_entries_total",
                "Committed entries applied to the state machine.",
                &self.applied_entries,
            ),
            (
                "raftkvd_leader_changes_total",
                "Times this node saw the leader change.",
                &self.leader_changes,
            ),
            (
                "raftkvd_peer_send_errors_total",
                "Peer message streams that failed.",
                &self.peer_send_errors,
            ),
            (
                "raftkvd_peer_messages_refused_total",
                "Peer raft messages dropped unstepped: implausible for the group's state, or from a node that is not a member.",
                &self.peer_messages_refused,
            ),
            (
                "raftkvd_snapshots_total",
                "Snapshots written.",
                &self.snapshots,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let histograms = [
            (
                "raftkvd_snapshot_duration_seconds",
                "Time to write a snapshot file.",
                &self.snapshot_duration,
            ),
            (
                "raftkvd_log_fsync_duration_seconds",
                "Synced raft log writes (entries and hard state).",
                &self.log_fsync,
            ),
        ];
        for (name, help, histogram) in histograms {
            header(&mut out, name, "histogram", help);
            histogram.render(&mut out, name, "");
        }
        out
    }
}

/// One raft group's state on this node, for the per-group gauges.
pub struct GroupGauges {
    pub group: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub leader: bool,
    pub asleep: bool,
    pub keys: usize,
    pub leases: usize,
}

/// A per-group gauge: its name, its help text, and how to read it.
type GroupGauge = (&'static str, &'static str, fn(&GroupGauges) -> u64);

/// Gauges labelled by group, one series per group hosted on this node.
pub fn render_groups(out: &mut String, groups: &[GroupGauges]) {
    let gauges: [GroupGauge; 7] = [
        ("raftkvd_group_term", "The group's raft term here.", |g| {
            g.term
        }),
        (
            "raftkvd_group_commit_index",
            "The group's commit index here.",
            |g| g.commit,
        ),
        (
            "raftkvd_group_applied_index",
            "The group's applied index here.",
            |g| g.applied,
        ),
        (
            "raftkvd_group_is_leader",
            "1 if this node leads the group.",
            |g| g.leader.into(),
        ),
        (
            "raftkvd_group_asleep",
            "1 if the group sleeps (idle, not ticking).",
            |g| g.asleep.into(),
        ),
        ("raftkvd_group_keys", "Keys in the group's map.", |g| {
            g.keys as u64
        }),
        ("raftkvd_group_leases", "Leases the group holds.", |g| {
            g.leases as u64
        }),
    ];
    for (name, help, value) in gauges {
        header(out, name, "gauge", help);
        for g in groups {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", g.group, value(g));
        }
    }
}

/// The `# HELP` and `# TYPE` lines that precede a metric's samples.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}
