//! Watches (`GET /v1/watch`) and long polls (`?wait=true`): real processes, real HTTP.
//! A watcher's events are checked against the writes the cluster acknowledged: every
//! one exactly once, in revision order, across a leader kill and a reconnect.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::watcher::Watcher;
use common::{http, http_json, Cluster, DEADLINE};
use serde_json::{json, Value};

/// One acknowledged write: key, value (None for a delete) and revision.
type Write = (String, Option<String>, u64);

/// PUT (or DELETE with `None`) through node `via`; Some(revision) once acknowledged,
/// None if the outcome is unknown (it may still have applied).
fn write(cluster: &Cluster, via: u64, key: &str, value: Option<&str>) -> Option<u64> {
    let url = cluster.nodes[via as usize - 1].url(&format!("v1/kv/{key}"));
    let (code, answer) = match value {
        Some(value) => http_json("PUT", &url, Some(json!({ "value": value }))),
        None => http_json("DELETE", &url, None),
    };
    (code == 200).then(|| answer["revision"].as_u64().unwrap())
}

fn as_write(event: &Value) -> Write {
    (
        event["key"].as_str().unwrap().to_string(),
        event["value"].as_str().map(str::to_string),
        event["revision"].as_u64().unwrap(),
    )
}

/// A watcher on the leader sees every write under its prefix, in order, and no other;
/// the leader is killed; the watcher reconnects to another node from the revision after
/// the last it saw, while writes go on: across both streams it sees every acknowledged
/// write exactly once, in revision order. Also: progress lines, bad requests.
#[test]
fn a_watcher_sees_every_write_once_across_a_leader_kill_and_a_reconnect() {
    let mut cluster = Cluster::start("watch", 3, &[]);
    let leader = cluster.wait_leader();
    let others: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    let node_url =
        |cluster: &Cluster, id: u64, path: &str| cluster.nodes[id as usize - 1].url(path);
    for bad in [
        "v1/watch",
        "v1/watch?key=",
        "v1/watch?prefix=&start_revision=0",
    ] {
        let (code, answer) = http_json("GET", &node_url(&cluster, leader, bad), None);
        assert_eq!(code, 400, "{bad}: {answer}");
    }
    let (code, _) = http(
        "POST",
        &node_url(&cluster, leader, "v1/watch?prefix="),
        None,
    );
    assert_eq!(code, 405);

    let first = Watcher::open(&node_url(
        &cluster,
        leader,
        "v1/watch?prefix=w/&progress_ms=200",
    ));
    let mut acked: Vec<Write> = Vec::new();
    for i in 0..20 {
        let value = format!("v{i}");
        let revision = write(
            &cluster,
            others[i % 2],
            &format!("w/{}", i % 7),
            Some(&value),
        )
        .unwrap();
        acked.push((format!("w/{}", i % 7), Some(value), revision));
        write(&cluster, leader, &format!("other/{i}"), Some("x")).unwrap();
    }
    for key in ["w/1", "w/2", "w/nothing"] {
        if let Some(revision) = write(&cluster, leader, key, None) {
            if key != "w/nothing" {
                acked.push((key.to_string(), None, revision));
            }
        }
    }
    let (events, open) = first.events_until(|seen| seen.len() >= acked.len());
    assert!(open);
    let seen: Vec<Write> = events.iter().map(as_write).collect();
    assert_eq!(
        seen, acked,
        "every write under w/, in order, and nothing else"
    );
    // Progress counts the last event's revision once the stream knows that revision is
    // whole: at once, or at the stream's next look at the map (each 200 ms here), so
    // the first progress line may still stop one short of it.
    let last = acked.last().unwrap().2;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let line = first.next_line().unwrap();
        assert!(line["type"] == "progress", "no more events: {line}");
        if line["revisions"]["1"].as_u64().unwrap() >= last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress line counted revision {last}: {line}"
        );
    }
    let (code, metrics) = http("GET", &node_url(&cluster, leader, "metrics"), None);
    assert_eq!(code, 200);
    let value = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("raftkvd_watches_open"), 1, "{metrics}");
    assert!(value("raftkvd_watch_events_sent_total") >= acked.len() as u64);

    // Writes go on while the leader dies; the first stream ends with it.
    let writer = {
        let urls: Vec<String> = others.iter().map(|&n| node_url(&cluster, n, "")).collect();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..60 {
                let key = format!("w/after-{}", i % 5);
                let value = format!("a{i}");
                let url = format!("{}v1/kv/{key}", urls[i % 2]);
                let (code, answer) = http_json("PUT", &url, Some(json!({ "value": value })));
                if code == 200 {
                    acked.push((key, Some(value), answer["revision"].as_u64().unwrap()));
                }
            }
            acked
        })
    };
    cluster.node(leader).kill();
    let (mut events, open) = first.events_until(|_| false);
    assert!(!open, "the stream ends when its node dies");
    let last_seen = events
        .last()
        .map_or(acked.last().unwrap().2, |e| e["revision"].as_u64().unwrap());
    let later = writer.join().unwrap();
    assert!(later.len() >= 30, "writes went on: {}", later.len());
    let resumed = Watcher::open(&node_url(
        &cluster,
        others[0],
        &format!("v1/watch?prefix=w/after-&start_revision={}", last_seen + 1),
    ));
    let newest = later.last().unwrap().2;
    let (more, open) = resumed.events_until(|seen| {
        seen.last()
            .is_some_and(|e| e["revision"].as_u64().unwrap() >= newest)
    });
    assert!(open);
    events.extend(more);
    let events: Vec<Write> = events.iter().map(as_write).collect();
    let mut revisions: Vec<u64> = events.iter().map(|e| e.2).collect();
    let count = revisions.len();
    revisions.dedup();
    assert_eq!(revisions.len(), count, "no event twice");
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "in revision order"
    );
    // Every acknowledged write is there; a write whose answer was lost with the leader
    // may be there too (it applied), but nothing else.
    let by_revision: BTreeMap<u64, &Write> = events.iter().map(|e| (e.2, e)).collect();
    for write in &later {
        assert_eq!(
            by_revision.get(&write.2),
            Some(&write),
            "acknowledged {write:?} missing"
        );
    }
    assert!(events
        .iter()
        .all(|(key, value, _)| key.starts_with("w/after-")
            && value.as_deref().is_some_and(|v| v.starts_with('a'))));
}

/// With keys in 4 groups: a prefix watch names each event's group, starts per group,
/// and a start older than a group's history is 410 with the oldest still kept; the
/// history of 16 changes is the process's, so each of its 4 groups keeps its last 4. A
/// long poll answers a change at once if it happened, waits for one that has not, and
/// 408s.
#[test]
fn sharded_watches_start_per_group_and_long_polls_wait_for_a_change() {
    let cluster = Cluster::start(
        "watch-sharded",
        3,
        &["--shards", "4", "--watch-history", "16"],
    );
    let url = |path: &str| cluster.nodes[0].url(path);
    // Each group's writes: (revision, key).
    let mut groups: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    let deadline = Instant::now() + DEADLINE;
    for i in 0..40 {
        let answer = loop {
            let (code, answer) = http_json(
                "PUT",
                &url(&format!("v1/kv/s/{i}")),
                Some(json!({"value": "v"})),
            );
            if code == 200 {
                break answer;
            }
            assert!(Instant::now() < deadline, "{code} {answer}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let group = answer["group"].as_u64().unwrap();
        let revision = answer["revision"].as_u64().unwrap();
        groups
            .entry(group)
            .or_default()
            .push((revision, format!("s/{i}")));
    }
    assert_eq!(groups.len(), 4, "{groups:?}");
    let (busiest, writes) = groups.iter().max_by_key(|(_, w)| w.len()).unwrap();
    assert!(writes.len() > 5);
    // Its oldest events went for room: 410, naming the oldest still kept; for a long
    // poll too.
    let (oldest, oldest_key) = &writes[0];
    let (code, answer) = http_json(
        "GET",
        &url(&format!(
            "v1/watch?prefix=s/&start_revision={busiest}:{oldest}"
        )),
        None,
    );
    assert_eq!(code, 410, "{answer}");
    assert!(answer["revision"].as_u64().unwrap() > *oldest, "{answer}");
    let (code, answer) = http_json(
        "GET",
        &url(&format!(
            "v1/kv/{oldest_key}?wait=true&after_revision={}",
            oldest - 1
        )),
        None,
    );
    assert_eq!(code, 410, "{answer}");
    // Every node hosts the 4 groups, so each keeps 16 / 4 changes: the busiest group's
    // 4th newest is still there, its 5th newest is not.
    let poll_from = |(revision, key): &(u64, String)| {
        http_json(
            "GET",
            &url(&format!(
                "v1/kv/{key}?wait=true&after_revision={}&timeout_ms=100",
                revision - 1
            )),
            None,
        )
    };
    let (code, answer) = poll_from(&writes[writes.len() - 4]);
    assert_eq!(code, 200, "the 4th newest change is kept: {answer}");
    // (Once node 1 has applied the newest: it may follow the group's leader.)
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, answer) = poll_from(&writes[writes.len() - 5]);
        if code == 410 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 5th newest change is kept: {code} {answer}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each group from its own last 2 writes on.
    let start: Vec<String> = groups
        .iter()
        .map(|(g, w)| format!("{g}:{}", w[w.len() - 2].0))
        .collect();
    let watcher = Watcher::open(&url(&format!(
        "v1/watch?prefix=s/&start_revision={}",
        start.join(",")
    )));
    let (events, _) = watcher.events_until(|seen| seen.len() >= 8);
    let mut per_group: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for event in &events {
        per_group
            .entry(event["group"].as_u64().unwrap())
            .or_default()
            .push(event["revision"].as_u64().unwrap());
    }
    for (group, writes) in &groups {
        let last_two: Vec<u64> = writes[writes.len() - 2..].iter().map(|w| w.0).collect();
        assert_eq!(per_group[group], last_two, "group {group}");
    }
    let (code, answer) = http_json("GET", &url("v1/watch?prefix=s/&start_revision=99:5"), None);
    assert_eq!(code, 400, "no such group among the key's: {answer}");

    // Long polls.
    let (code, put) = http_json("PUT", &url("v1/kv/polled"), Some(json!({"value": "one"})));
    assert_eq!(code, 200, "{put}");
    let before = put["revision"].as_u64().unwrap() - 1;
    let poll = |after: u64, timeout_ms: u64| {
        http_json(
            "GET",
            &cluster.nodes[1].url(&format!(
                "v1/kv/polled?wait=true&after_revision={after}&timeout_ms={timeout_ms}"
            )),
            None,
        )
    };
    let (code, event) = poll(before, 5000);
    assert_eq!(
        (code, &event["type"], &event["value"]),
        (200, &json!("put"), &json!("one")),
        "{event}"
    );
    let (code, answer) = poll(put["revision"].as_u64().unwrap(), 300);
    assert_eq!(code, 408, "no change yet: {answer}");
    let waiting = {
        let url = cluster.nodes[2].url(&format!(
            "v1/kv/polled?wait=true&after_revision={}&timeout_ms=20000",
            put["revision"]
        ));
        std::thread::spawn(move || http_json("GET", &url, None))
    };
    let (code, deleted) = http_json("DELETE", &url("v1/kv/polled"), None);
    assert_eq!(code, 200, "{deleted}");
    let (code, event) = waiting.join().unwrap();
    assert_eq!(code, 200, "{event}");
    assert_eq!(
        (&event["type"], &event["revision"]),
        (&json!("delete"), &deleted["revision"])
    );
}

/// Node 1 hosts only some of the 4 groups (2 replicas each on 3 nodes): its watch of
/// every key follows the other groups through nodes that host them, and when one of
/// those dies, through the other host, from where it got: every write exactly once, in
/// each group's order.
#[test]
fn a_watch_follows_the_groups_its_node_does_not_host_through_their_hosts() {
    let mut cluster = Cluster::start("watch-remote", 3, &["--shards", "4", "--replicas", "2"]);
    let put = |cluster: &Cluster, via: usize, key: &str| -> (u64, u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let url = cluster.nodes[via].url(&format!("v1/kv/{key}"));
            let (code, answer) = http_json("PUT", &url, Some(json!({"value": key})));
            if code == 200 {
                return (
                    answer["group"].as_u64().unwrap(),
                    answer["revision"].as_u64().unwrap(),
                );
            }
            assert!(Instant::now() < deadline, "{code} {answer}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut written: Vec<(u64, u64, String)> = Vec::new();
    for i in 0..40 {
        let key = format!("r/{i}");
        let (group, revision) = put(&cluster, 1 + i % 2, &key);
        written.push((group, revision, key));
    }
    let (_, status) = http_json("GET", &cluster.nodes[0].url("status"), None);
    let hosted = status["groups"].as_array().unwrap().len() - 1;
    assert!(
        hosted < 4,
        "node 1 hosts {hosted} of the 4 data groups: {status}"
    );
    let firsts: BTreeMap<u64, u64> = written.iter().fold(BTreeMap::new(), |mut m, (g, r, _)| {
        m.entry(*g).or_insert(*r);
        m
    });
    let start: Vec<String> = firsts.iter().map(|(g, r)| format!("{g}:{r}")).collect();
    let watcher = Watcher::open(&cluster.nodes[0].url(&format!(
        "v1/watch?prefix=r/&progress_ms=200&start_revision={}",
        start.join(",")
    )));
    let (mut events, _) = watcher.events_until(|seen| seen.len() >= 40);
    // A host of a group node 1 does not host dies; the watch moves to the other one.
    let remote_host = (2..=3u64)
        .find(|&n| {
            let (_, s) = http_json("GET", &cluster.nodes[n as usize - 1].url("status"), None);
            s["groups"].as_array().unwrap().len() > 1
        })
        .unwrap();
    cluster.node(remote_host).kill();
    cluster.node(remote_host).start();
    for i in 40..60 {
        let key = format!("r/{i}");
        let (group, revision) = put(&cluster, 0, &key);
        written.push((group, revision, key));
    }
    let (more, open) = watcher.events_until(|seen| events.len() + seen.len() >= 60);
    assert!(open);
    events.extend(more);
    let mut seen: Vec<(u64, u64, String)> = events
        .iter()
        .map(|e| {
            (
                e["group"].as_u64().unwrap(),
                e["revision"].as_u64().unwrap(),
                e["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for (group, revision, _) in &seen {
        assert!(
            last.insert(*group, *revision)
                .is_none_or(|before| before < *revision),
            "{seen:?}"
        );
    }
    seen.sort();
    written.sort();
    assert_eq!(seen, written, "every write exactly once");
}

/// A watcher that reads nothing while 4,000 changes of 4 KiB are applied (far more than
/// the socket, the stream's buffer and its live channel hold): the group's hub drops it,
/// and once it reads again it catches up from the history: every change exactly once,
/// in order.
#[test]
fn a_slow_watcher_catches_up_from_the_history_and_misses_nothing() {
    let cluster = Cluster::start("watch-slow", 3, &[]);
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader as usize - 1];
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap();
    let response = client
        .get(node.url("v1/watch?prefix=slow/&progress_ms=100000"))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let value = "x".repeat(4096);
    for batch in 0..40 {
        let body: serde_json::Map<String, Value> = (0..100)
            .map(|i| (format!("slow/{batch:02}-{i:03}"), json!(value)))
            .collect();
        let (code, answer) = http_json("POST", &node.url("v1/kv"), Some(Value::Object(body)));
        assert_eq!(code, 200, "{answer}");
    }
    let mut seen = Vec::new();
    for line in BufReader::new(response).lines() {
        let line: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if line["type"] == "put" {
            seen.push((
                line["revision"].as_u64().unwrap(),
                line["key"].as_str().unwrap().to_string(),
            ));
            if seen.len() == 4000 {
                break;
            }
        } else {
            assert_eq!(line["type"], "progress", "{line}");
        }
    }
    let mut want = seen.clone();
    want.sort();
    want.dedup();
    assert_eq!(seen, want, "in order, none twice");
    let keys: std::collections::BTreeSet<&String> = seen.iter().map(|(_, k)| k).collect();
    assert_eq!(keys.len(), 4000, "every change");
}

/// Node 4 does not host group 5 (on nodes 1-3): its watch of the group relays node 1's
/// stream. Node 1 is paused (SIGSTOP): the relay hears nothing, gives node 1 up after
/// twice the progress interval (and the request timeout), and follows node 2 from where
/// it got; a write made meanwhile arrives once.
#[test]
fn a_relayed_watch_leaves_a_paused_host_for_another() {
    let cluster = Cluster::start("watch-paused", 4, &["--request-timeout-ms", "1500"]);
    let (code, answer) = http_json(
        "POST",
        &cluster.nodes[0].url("v1/groups"),
        Some(json!({"id": 5, "members": [1, 2, 3]})),
    );
    assert_eq!(code, 201, "{answer}");
    // Writes `key` once: after an answer that leaves the outcome unknown (a 503 when the
    // request timed out while a new leader was elected), it first reads whether the
    // write applied, and writes again only if not (a second write would be a second
    // event).
    let put = |via: usize, key: &str| {
        let url = cluster.nodes[via].url(&format!("v1/groups/5/kv/{key}"));
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (code, answer) = http_json("PUT", &url, Some(json!({ "value": key })));
            if code == 200 {
                return answer["revision"].as_u64().unwrap();
            }
            assert!(Instant::now() < deadline, "{code} {answer}");
            loop {
                let (code, stored) = http_json("GET", &url, None);
                match code {
                    200 if stored["value"] == key => return stored["revision"].as_u64().unwrap(),
                    200 | 404 => break,
                    _ => {
                        assert!(Instant::now() < deadline, "{code} {stored}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let first = put(1, "before");
    let watcher = Watcher::open(&cluster.nodes[3].url(&format!(
        "v1/groups/5/watch?prefix=&progress_ms=200&start_revision={first}"
    )));
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(events[0]["key"], "before");
    cluster.nodes[0].signal("STOP");
    let during = put(1, "during");
    let (events, open) = watcher.events_until(|seen| !seen.is_empty());
    cluster.nodes[0].signal("CONT");
    assert!(open);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (&events[0]["key"], events[0]["revision"].as_u64()),
        (&json!("during"), Some(during))
    );
    let after = put(2, "after");
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (&events[0]["key"], events[0]["revision"].as_u64()),
        (&json!("after"), Some(after))
    );
    let logs = cluster.nodes[3].log_text();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// One stream may watch several keys and prefixes (as etcd multiplexes watches on one
/// stream): on 4 shards of 2 replicas, a stream on node 1 of two overlapping prefixes,
/// two keys and 990 more prefixes gets every matching change once (one that two of its
/// prefixes match, once), from groups node 1 hosts and from those it follows through
/// their hosts, and nothing else. Over 1,000 keys and prefixes is 400.
#[test]
fn one_stream_watches_several_keys_and_prefixes_and_gets_each_change_once() {
    let cluster = Cluster::start("watch-several", 3, &["--shards", "4", "--replicas", "2"]);
    let mut query: Vec<String> = ["prefix=a%2F", "prefix=a%2Fb%2F", "key=c", "key=d%2F1"]
        .map(String::from)
        .to_vec();
    query.extend((0..990).map(|i| format!("prefix=zz{i}%2F")));
    query.push("progress_ms=200".into());
    let base = cluster.nodes[0].url("v1/watch");
    let mut too_many = query.clone();
    too_many.extend((0..10).map(|i| format!("key=more{i}")));
    let (code, answer) = http_json("GET", &format!("{base}?{}", too_many.join("&")), None);
    assert_eq!(code, 400, "{answer}");
    let (code, _) = http_json("GET", &format!("{base}?prefix=a&key="), None);
    assert_eq!(code, 400);

    // Written until every group has a leader, before the watch starts.
    let write = |key: &str| {
        let url = cluster.nodes[1].url(&format!("v1/kv/{key}"));
        cluster.wait_until(&format!("a put of {key}"), || {
            http_json("PUT", &url, Some(json!({"value": key}))).0 == 200
        });
    };
    for i in 0..8 {
        write(&format!("warm-{i}"));
    }
    let watcher = Watcher::open(&format!("{base}?{}", query.join("&")));
    let matching = ["a/1", "a/b/2", "c", "d/1", "zz5/x", "zz989/y"];
    for key in [
        "a/1", "a/b/2", "c", "d/1", "d/2", "e", "zz5/x", "zz990/no", "zz989/y",
    ] {
        write(key);
    }
    let (events, _) = watcher.events_until(|seen| seen.len() >= matching.len());
    let mut seen: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    seen.sort_unstable();
    let mut want = matching.to_vec();
    want.sort_unstable();
    assert_eq!(seen, want);
    write("zz0/last");
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(
        events[0]["key"], "zz0/last",
        "and nothing else came between"
    );
}
