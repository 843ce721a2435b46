//! Watchers of the Jepsen-style tests: each follows the keys (`/v1/watch`) from a random
//! member while the nemesis runs; when its stream breaks (the member killed, paused,
//! partitioned away or removed) it reconnects to another member from the revision after
//! the last one it was told it has, per group. What it saw must be gap-free and
//! duplicate-free: per group, revisions strictly increasing; the compare-and-swap
//! counter's values consecutive (each increment exactly once, none missing); and every
//! increment the CAS clients had acknowledged, at its revision. A start older than the
//! history (410, after a node restarted from a snapshot) is a break the watcher was told
//! of: what follows is checked as a new segment.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{Bases, Rng, COUNTER};

/// A stream that says nothing for this long (no event, no progress line) is given up.
const SILENCE: Duration = Duration::from_secs(3);
/// What the watcher asks for between progress lines.
const PROGRESS_MS: u64 = 300;

/// One event a watcher received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub group: u64,
    pub revision: u64,
    pub key: String,
    pub value: Option<String>,
}

/// Events received without a break the server told of.
#[derive(Default, Debug)]
pub struct Segment {
    /// Per group, the first revision this segment surely has every event from.
    pub covered_from: BTreeMap<u64, u64>,
    /// Per group, the last revision the server said all events up to were sent.
    pub reached: BTreeMap<u64, u64>,
    pub events: Vec<Seen>,
}

/// What one watcher saw.
#[derive(Default, Debug)]
pub struct WatchLog {
    pub segments: Vec<Segment>,
    pub connections: usize,
}

/// Watches `what` (`key=...` or `prefix=...`) until `stop`, reconnecting as needed;
/// keeps `last_counter` at the newest counter value it received.
pub fn run_watcher(
    id: usize,
    what: String,
    bases: Bases,
    last_counter: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> WatchLog {
    let mut rng = Rng::new(5000 + id as u64);
    let mut log = WatchLog::default();
    // Per group, the next revision to ask for; empty: from revision 1 (a new cluster).
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    let mut segment = Segment::default();
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut fresh_start = true;
    // 410s in a row: another member may still keep those events (one restarted from a
    // snapshot keeps fewer); only when none does is it a break.
    let mut gone = 0;
    while !stop.load(Ordering::SeqCst) {
        let base = rng.pick_cloned(&bases.read().unwrap());
        let start = if next.is_empty() && fresh_start {
            "&start_revision=1".to_string()
        } else if next.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = next.iter().map(|(g, r)| format!("{g}:{r}")).collect();
            format!("&start_revision={}", pairs.join(","))
        };
        let url = format!("{base}/v1/watch?{what}&progress_ms={PROGRESS_MS}{start}");
        let response = match client.get(&url).send() {
            Ok(response) => response,
            Err(_) => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match response.status().as_u16() {
            200 => {}
            410 if gone < 3 * bases.read().unwrap().len() => {
                gone += 1;
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            410 => {
                // The events from where it was are gone (a snapshot): a new segment from
                // the next write on, and the check knows of the break.
                gone = 0;
                log.segments.push(std::mem::take(&mut segment));
                next.clear();
                fresh_start = false;
                continue;
            }
            _ => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        log.connections += 1;
        gone = 0;
        let lines = read_lines(response);
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(line) = lines.recv_timeout(SILENCE) else {
                break; // ended, or silent (a paused or cut-off member)
            };
            match line["type"].as_str() {
                Some("put") | Some("delete") => {
                    let seen = Seen {
                        group: line["group"].as_u64().unwrap(),
                        revision: line["revision"].as_u64().unwrap(),
                        key: line["key"].as_str().unwrap().to_string(),
                        value: line["value"].as_str().map(str::to_string),
                    };
                    let covered = if fresh_start { 1 } else { seen.revision };
                    segment.covered_from.entry(seen.group).or_insert(covered);
                    let at = next.entry(seen.group).or_insert(0);
                    *at = (*at).max(seen.revision + 1);
                    if seen.key == COUNTER {
                        let value = seen.value.as_deref().and_then(|v| v.parse().ok());
                        last_counter.store(value.unwrap_or(0), Ordering::SeqCst);
                    }
                    segment.events.push(seen);
                }
                Some("progress") => {
                    for (group, revision) in line["revisions"].as_object().unwrap() {
                        let (group, revision) =
                            (group.parse::<u64>().unwrap(), revision.as_u64().unwrap());
                        let covered = if fresh_start { 1 } else { revision + 1 };
                        segment.covered_from.entry(group).or_insert(covered);
                        segment.reached.insert(group, revision);
                        let at = next.entry(group).or_insert(0);
                        *at = (*at).max(revision + 1);
                    }
                }
                _ => break, // an error line: the stream ends; resume elsewhere
            }
        }
    }
    log.segments.push(segment);
    log
}

/// The stream's JSON lines, read on a thread of its own (a paused member would block
/// the read; the watcher gives up on silence and leaves that thread to end with the
/// connection).
fn read_lines(response: reqwest::blocking::Response) -> mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(response).lines() {
            let Ok(line) = line else { break };
            let Ok(value) = serde_json::from_str(&line) else {
                break;
            };
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    rx
}

/// Checks what a watcher saw against the acknowledged CAS increments `(value,
/// revision)`; returns a summary line.
pub fn check(log: &WatchLog, acked_increments: &[(u64, u64)]) -> Result<String, String> {
    let mut events = 0;
    let mut counter_events = 0;
    for (n, segment) in log.segments.iter().enumerate() {
        events += segment.events.len();
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for seen in &segment.events {
            if let Some(&before) = last.get(&seen.group) {
                if seen.revision <= before {
                    return Err(format!(
                        "segment {n}: group {} revision {} came after {before} (a repeat or \
                         out of order): {seen:?}",
                        seen.group, seen.revision
                    ));
                }
            }
            last.insert(seen.group, seen.revision);
        }
        let counter: Vec<&Seen> = segment.events.iter().filter(|s| s.key == COUNTER).collect();
        counter_events += counter.len();
        let values: Vec<u64> = counter
            .iter()
            .map(|s| s.value.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0))
            .collect();
        for pair in values.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(format!(
                    "segment {n}: the counter went from {} to {}: an increment missing or \
                     seen twice",
                    pair[0], pair[1]
                ));
            }
        }
        let Some(group) = counter.first().map(|s| s.group) else {
            continue;
        };
        let from = segment
            .covered_from
            .get(&group)
            .copied()
            .unwrap_or(u64::MAX);
        let to = segment
            .reached
            .get(&group)
            .copied()
            .unwrap_or(0)
            .max(counter.last().map_or(0, |s| s.revision));
        if from == 1 && values.first().is_some_and(|&v| v != 1) {
            return Err(format!(
                "segment {n} covers the counter's group from its start, but its first value is {:?}",
                values.first()
            ));
        }
        for &(value, revision) in acked_increments {
            if (from..=to).contains(&revision)
                && !counter
                    .iter()
                    .any(|s| s.revision == revision && s.value == Some(value.to_string()))
            {
                return Err(format!(
                    "segment {n} covers revisions {from}..={to} of group {group}, but not the \
                     acknowledged increment to {value} at revision {revision}"
                ));
            }
        }
    }
    Ok(format!(
        "{events} events ({counter_events} of the counter) over {} connections, {} segments",
        log.connections,
        log.segments.len()
    ))
}
