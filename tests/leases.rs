//! Leases (`/v1/leases`, `PUT /v1/kv/<key>?lease=`): real processes, real HTTP. A lease
//! holds keys until it is revoked or its owner stops renewing it; only the leader expires
//! it, a new leader first gives it its whole TTL again, and leases survive restarts and
//! snapshots. With shards, a lease lives in one group and any node serves it.

mod common;

use std::time::{Duration, Instant};

use common::watcher::Watcher;
use common::{http, http_json, Cluster, DEADLINE};
use serde_json::{json, Value};

/// Grants a lease of `ttl` seconds through `node_url` (a node's client URL base, as
/// `Node::url("")`), with `extra` fields in the body; returns its id.
fn grant(url: &str, ttl: u64, extra: Value) -> u64 {
    let mut body = json!({ "ttl_seconds": ttl });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let (code, answer) = http_json("POST", &format!("{url}v1/leases"), Some(body));
    assert_eq!(code, 201, "grant: {answer}");
    assert_eq!(answer["ttl_seconds"], ttl);
    answer["id"].as_u64().unwrap()
}

/// PUTs `key` attached to `lease`; returns the answer's status and JSON.
fn put_leased(url: &str, key: &str, lease: u64) -> (u16, Value) {
    http_json(
        "PUT",
        &format!("{url}v1/kv/{key}?lease={lease}"),
        Some(json!({ "value": "held" })),
    )
}

fn get_status(url: &str, path: &str) -> u16 {
    http("GET", &format!("{url}{path}"), None).0
}

/// Every route and its refusals on one group: grant, attach, show, detach by a plain
/// put, renew, and revoke (which deletes the keys, and a watcher sees the deletes).
#[test]
fn a_lease_is_granted_holds_keys_is_renewed_and_revoked_with_its_keys() {
    let cluster = Cluster::start("leases", 3, &[]);
    cluster.wait_leader();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url("")).collect();

    for bad in [
        json!({}),
        json!({"ttl_seconds": 0}),
        json!({"ttl_seconds": 10, "ttl": 3}),
        json!({"ttl_seconds": 10, "key": "a", "group": 1}),
        json!({"ttl_seconds": 10, "group": 9}),
        json!({"ttl_seconds": 10, "group": 1u64 << 32}),
        json!({"ttl_seconds": 100_000_000}),
    ] {
        let (code, answer) = http_json("POST", &format!("{}v1/leases", urls[0]), Some(bad));
        assert_eq!(code, 400, "{answer}");
    }
    assert_eq!(get_status(&urls[0], "v1/leases/12"), 404, "group 0");
    assert_eq!(get_status(&urls[0], "v1/leases/x"), 400);
    assert_eq!(
        get_status(&urls[0], &format!("v1/leases/{}", 1u64 << 32 | 5)),
        404
    );
    assert_eq!(http("PUT", &format!("{}v1/leases", urls[0]), None).0, 405);
    let (code, listed) = http_json("GET", &format!("{}v1/leases", urls[0]), None);
    assert_eq!((code, &listed), (200, &json!({"leases": []})));

    let lease = grant(&urls[1], 30, json!({}));
    assert_eq!(lease >> 32, 1, "the one group's lease: {lease}");
    let (code, _) = http("PUT", &format!("{}v1/leases/{lease}", urls[0]), None);
    assert_eq!(code, 405);
    for key in ["a", "b"] {
        let (code, answer) = put_leased(&urls[0], key, lease);
        assert_eq!(code, 200, "{answer}");
    }
    let (code, answer) = put_leased(&urls[0], "c", lease + 1);
    assert_eq!(code, 404, "a lease that does not exist: {answer}");
    assert_eq!(get_status(&urls[0], "v1/kv/c"), 404, "nothing was written");
    let (code, listed) = http_json("GET", &format!("{}v1/leases", urls[2]), None);
    assert_eq!(code, 200);
    let only = &listed["leases"][0];
    assert_eq!(listed["leases"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        (
            &only["id"],
            &only["key_count"],
            &only["group"],
            &only["granted_ttl_seconds"]
        ),
        (&json!(lease), &json!(2), &json!(1), &json!(30)),
        "{listed}"
    );

    let (_, metrics) = http("GET", &format!("{}metrics", urls[2]), None);
    assert!(
        metrics.contains("raftkvd_group_leases{group=\"1\"} 1"),
        "{metrics}"
    );
    let (code, shown) = http_json("GET", &format!("{}v1/leases/{lease}", urls[2]), None);
    assert_eq!(code, 200, "{shown}");
    assert_eq!(shown["keys"], json!(["a", "b"]));
    assert_eq!(shown["granted_ttl_seconds"], 30);
    let left = shown["ttl_seconds"].as_u64().unwrap();
    assert!((1..=30).contains(&left), "{shown}");

    // A put without the lease detaches the key; lease=0 too.
    let (code, _) = http(
        "PUT",
        &format!("{}v1/kv/b", urls[2]),
        Some(b"free".to_vec()),
    );
    assert_eq!(code, 200);
    let (code, _) = http(
        "PUT",
        &format!("{}v1/kv/d?lease=0", urls[2]),
        Some(b"x".to_vec()),
    );
    assert_eq!(code, 200);
    let (_, shown) = http_json("GET", &format!("{}v1/leases/{lease}", urls[0]), None);
    assert_eq!(shown["keys"], json!(["a"]));

    let (code, renewed) = http_json(
        "POST",
        &format!("{}v1/leases/{lease}/keepalive", urls[2]),
        None,
    );
    assert_eq!(
        (code, &renewed["ttl_seconds"]),
        (200, &json!(30)),
        "{renewed}"
    );

    let watcher = Watcher::open(&format!("{}v1/watch?prefix=", urls[2]));
    let (code, revoked) = http_json("DELETE", &format!("{}v1/leases/{lease}", urls[1]), None);
    assert_eq!(code, 200, "{revoked}");
    assert_eq!(revoked["deleted"], 1);
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(events[0]["type"], "delete");
    assert_eq!(events[0]["key"], "a");
    assert_eq!(events[0]["revision"], revoked["revision"]);
    for url in &urls {
        assert_eq!(get_status(url, "v1/kv/a"), 404);
        assert_eq!(get_status(url, "v1/kv/b"), 200);
        assert_eq!(get_status(url, &format!("v1/leases/{lease}")), 404);
    }
    let keepalive = format!("{}v1/leases/{lease}/keepalive", urls[0]);
    assert_eq!(http("POST", &keepalive, None).0, 404);
    assert_eq!(
        http("DELETE", &format!("{}v1/leases/{lease}", urls[0]), None).0,
        404
    );
    assert_eq!(put_leased(&urls[0], "a", lease).0, 404);
}

/// Waits until `key` is gone from node `url`; returns when that was seen.
fn wait_gone(url: &str, key: &str, logs: impl Fn() -> String) -> Instant {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match get_status(url, &format!("v1/kv/{key}")) {
            404 => return Instant::now(),
            200 | 503 => {}
            other => panic!("GET {key}: {other}"),
        }
        assert!(Instant::now() < deadline, "{key} never expired\n{}", logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that `key` is there on `url` at every poll until `until`.
fn assert_held_until(url: &str, key: &str, until: Instant, logs: impl Fn() -> String) {
    while Instant::now() < until {
        let code = get_status(url, &format!("v1/kv/{key}"));
        assert!(
            code == 200 || code == 503,
            "{key} is gone early ({code})\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lease kept alive outlives its TTL many times over; once its owner stops renewing
/// it, its key disappears within the TTL and an election timeout (1 to 2 s here), never
/// before the TTL, and watchers see the delete. Then 250 leases expire together.
#[test]
fn a_lease_whose_owner_stops_renewing_expires_within_its_ttl_and_an_election_timeout() {
    let cluster = Cluster::start("lease-expiry", 3, &[]);
    let leader = cluster.wait_leader();
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    let url = follower.url("");
    let ttl = 2;
    let lease = grant(&url, ttl, json!({"key": "owner"}));
    assert_eq!(put_leased(&url, "owner", lease).0, 200);
    let watcher = Watcher::open(&format!("{url}v1/watch?key=owner"));

    let keepalive = format!("{url}v1/leases/{lease}/keepalive");
    let mut last_renewal = Instant::now();
    let renew_until = Instant::now() + Duration::from_secs(3 * ttl);
    while Instant::now() < renew_until {
        let (code, answer) = http("POST", &keepalive, None);
        assert_eq!(code, 200, "{answer}\n{}", cluster.logs());
        last_renewal = Instant::now();
        assert_held_until(
            &url,
            "owner",
            last_renewal + Duration::from_millis(500),
            || cluster.logs(),
        );
    }
    let gone = wait_gone(&url, "owner", || cluster.logs());
    let after = gone - last_renewal;
    let ttl = Duration::from_secs(ttl);
    let bound = ttl + Duration::from_secs(2) + Duration::from_millis(700);
    assert!(
        after >= ttl - Duration::from_millis(300) && after <= bound,
        "gone {after:?} after the last renewal (TTL {ttl:?}, at most {bound:?})"
    );
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(events[0]["type"], "delete", "{events:?}");
    assert_eq!(get_status(&url, &format!("v1/leases/{lease}")), 404);
    assert!(cluster
        .nodes
        .iter()
        .any(|n| n.log_text().contains("lease expired: revoking it")));

    // 250 leases that expire together are revoked over a few ticks (100 a tick), all.
    for i in 0..250 {
        let lease = grant(&url, 1, json!({}));
        assert_eq!(put_leased(&url, &format!("mass/{i}"), lease).0, 200);
    }
    cluster.wait_until("every lease of the 250 to expire", || {
        let (code, listed) = http_json("GET", &format!("{url}v1/kv?prefix=mass/"), None);
        code == 200
            && listed["items"]
                .as_array()
                .is_some_and(|items| items.is_empty())
    });
}

/// Leases are in snapshots and survive restarts (and are granted while a member that
/// reads them is down: its format is remembered); a leader killed shortly before a
/// lease's deadline does not make it expire then: the new leader gives it its whole TTL.
#[test]
fn a_leader_change_never_expires_a_lease_early_and_leases_survive_restarts_and_snapshots() {
    let mut cluster = Cluster::start("lease-restarts", 3, &["--snapshot-count", "20"]);
    let leader = cluster.wait_leader();
    let via = cluster.nodes.iter().find(|n| n.id != leader).unwrap().id;
    let url = cluster.node(via).url("");
    let long = grant(&url, 600, json!({}));
    assert_eq!(put_leased(&url, "long", long).0, 200);
    for i in 0..60 {
        let (code, _) = http("PUT", &format!("{url}v1/kv/fill-{i}"), Some(b"v".to_vec()));
        assert_eq!(code, 200);
    }
    cluster.wait_until("every node to snapshot past the lease", || {
        cluster
            .running()
            .all(|n| n.status_u64("last_snapshot") > 20)
    });

    // Every node restarts from its snapshot: the lease and its key are still there.
    // One stays down a while: the others remember that it reads leases, and grant them.
    let down = cluster.nodes.iter().find(|n| n.id != via).unwrap().id;
    for node in &mut cluster.nodes {
        node.signal("TERM");
        assert!(node.wait_exit(Duration::from_secs(15)).success());
    }
    for node in cluster.nodes.iter_mut().filter(|n| n.id != down) {
        node.start();
    }
    cluster.wait_leader();
    cluster.wait_until("the lease to be served after the restart", || {
        let (code, shown) = http_json("GET", &format!("{url}v1/leases/{long}"), None);
        code == 200 && shown["keys"] == json!(["long"])
    });
    let while_down = grant(&url, 60, json!({}));
    cluster.node(down).start();
    let (code, _) = http("DELETE", &format!("{url}v1/leases/{while_down}"), None);
    assert_eq!(code, 200);

    // A short lease, renewed once; its leader dies 3 s into its 6 s.
    let ttl = Duration::from_secs(6);
    let leader = cluster.wait_leader();
    let url = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .unwrap()
        .url("");
    let short = grant(&url, ttl.as_secs(), json!({}));
    assert_eq!(put_leased(&url, "short", short).0, 200);
    let renewed = Instant::now();
    let (code, _) = http("POST", &format!("{url}v1/leases/{short}/keepalive"), None);
    assert_eq!(code, 200);
    assert_held_until(&url, "short", renewed + Duration::from_secs(3), || {
        cluster.logs()
    });
    let killed = Instant::now();
    cluster.node(leader).kill();
    // The old leader would have expired it by `renewed + ttl`; the new one counts a whole
    // TTL from its election, which came after the kill.
    assert_held_until(&url, "short", killed + ttl, || cluster.logs());
    let gone = wait_gone(&url, "short", || cluster.logs());
    assert!(gone - killed >= ttl);
    let (code, shown) = http_json("GET", &format!("{url}v1/leases/{long}"), None);
    assert_eq!((code, &shown["keys"]), (200, &json!(["long"])), "{shown}");
    cluster.node(leader).start();
    let back = cluster.node(leader).url("");
    cluster.wait_until("the restarted leader to serve the lease", || {
        http_json("GET", &format!("{back}v1/leases/{long}"), None).0 == 200
    });
}

/// With shards, a lease lives in the group of the key it was granted for; any node
/// grants, shows, renews and revokes it (forwarding to a host), and a key of another
/// group cannot be attached to it.
#[test]
fn with_shards_a_lease_lives_in_its_keys_group_and_every_node_serves_it() {
    let cluster = Cluster::start("lease-shards", 3, &["--shards", "4", "--replicas", "2"]);
    cluster.wait_leader();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url("")).collect();
    // Written until the key's group has a leader.
    let group_of = |key: &str| {
        let mut group = None;
        cluster.wait_until(&format!("a put of {key}"), || {
            let (code, answer) = http_json(
                "PUT",
                &format!("{}v1/kv/{key}", urls[0]),
                Some(json!({"value": "probe"})),
            );
            assert!(code == 200 || code == 503, "{answer}");
            group = answer["group"].as_u64();
            code == 200
        });
        group.unwrap()
    };
    let home = group_of("svc/a");
    let other_key = (0..100)
        .map(|i| format!("other-{i}"))
        .find(|key| group_of(key) != home)
        .expect("a key of another group");

    let (code, answer) = http_json(
        "POST",
        &format!("{}v1/leases", urls[0]),
        Some(json!({"ttl_seconds": 30, "group": 1})),
    );
    assert_eq!(code, 400, "the cluster group holds no keys: {answer}");
    for (i, url) in urls.iter().enumerate() {
        let lease = grant(url, 30, json!({"key": "svc/a"}));
        assert_eq!(lease >> 32, home, "granted on node {}", i + 1);
        for (j, via) in urls.iter().enumerate() {
            let (code, answer) = put_leased(via, "svc/a", lease);
            assert_eq!(code, 200, "node {} attaches: {answer}", j + 1);
            assert_eq!(answer["group"], home);
            let (code, shown) = http_json("GET", &format!("{via}v1/leases/{lease}"), None);
            assert_eq!((code, &shown["keys"]), (200, &json!(["svc/a"])), "{shown}");
            let keepalive = format!("{via}v1/leases/{lease}/keepalive");
            assert_eq!(http("POST", &keepalive, None).0, 200);
        }
        let (code, answer) = put_leased(url, &other_key, lease);
        assert_eq!(code, 409, "{answer}");
        let revoker = &urls[(i + 1) % urls.len()];
        let (code, revoked) = http_json("DELETE", &format!("{revoker}v1/leases/{lease}"), None);
        assert_eq!((code, &revoked["deleted"]), (200, &json!(1)), "{revoked}");
        for via in &urls {
            assert_eq!(get_status(via, "v1/kv/svc/a"), 404);
        }
    }
    let default = grant(&urls[2], 30, json!({}));
    assert_ne!(default >> 32, 1, "a lease never lives in the cluster group");

    // Every node lists the leases of every group (each node hosts two groups of four,
    // so some are read through their hosts), or of one group.
    let here = grant(&urls[0], 30, json!({"key": "svc/a"}));
    let there = grant(&urls[1], 30, json!({"key": other_key}));
    assert_eq!(put_leased(&urls[2], "svc/a", here).0, 200);
    let listed = |via: &str, query: &str| {
        let (code, answer) = http_json("GET", &format!("{via}v1/leases{query}"), None);
        assert_eq!(code, 200, "{answer}");
        answer["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["id"].as_u64().unwrap(),
                    l["group"].as_u64().unwrap(),
                    l["key_count"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut expected = vec![
        (default, default >> 32, 0),
        (here, home, 1),
        (there, there >> 32, 0),
    ];
    expected.sort();
    for via in &urls {
        assert_eq!(listed(via, ""), expected, "listed by {via}");
        let of_home: Vec<_> = expected.iter().copied().filter(|l| l.1 == home).collect();
        assert_eq!(listed(via, &format!("?group={home}")), of_home);
    }
    let (code, answer) = http_json("GET", &format!("{}v1/leases?group=1", urls[0]), None);
    assert_eq!(code, 400, "the cluster group holds no leases: {answer}");
    // A multi-set attaches every key it writes (here through a node that may not host
    // the group); a revoke deletes them all.
    let same_group: Vec<String> = (0..200)
        .map(|i| format!("other-{i}"))
        .filter(|key| group_of(key) == there >> 32)
        .take(2)
        .collect();
    let body: Value = same_group
        .iter()
        .map(|key| (key.clone(), json!("v")))
        .collect::<serde_json::Map<_, _>>()
        .into();
    for via in &urls {
        let (code, answer) = http_json(
            "POST",
            &format!("{via}v1/kv?lease={there}"),
            Some(body.clone()),
        );
        assert_eq!(code, 200, "{answer}");
        let (code, answer) = http_json(
            "POST",
            &format!("{via}v1/kv?lease={here}"),
            Some(body.clone()),
        );
        assert_eq!(code, 409, "a lease of another group: {answer}");
    }
    let (code, shown) = http_json("GET", &format!("{}v1/leases/{there}", urls[0]), None);
    assert_eq!(code, 200);
    let mut keys: Vec<String> = serde_json::from_value(shown["keys"].clone()).unwrap();
    keys.sort();
    assert_eq!(keys, same_group, "{shown}");
    let (code, _) = http_json("DELETE", &format!("{}v1/leases/{there}", urls[2]), None);
    assert_eq!(code, 200);
    for key in &same_group {
        assert_eq!(get_status(&urls[1], &format!("v1/kv/{key}")), 404);
    }
    expected.retain(|l| l.0 != there);
    assert_eq!(listed(&urls[1], ""), expected);
}

/// Keeps polling until `stop`, and records what one client did: (sent, answered,
/// status) for each request.
type Record = Vec<(Instant, Instant, u16)>;

/// Sends `method` to `path` on each of `urls` in turn every `every`, with a two-second
/// timeout (a paused node costs two seconds, not the test), until `stop` is set or a 404.
fn poll_in_turn(
    urls: Vec<String>,
    method: &'static str,
    path: String,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Record> {
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let mut record = Record::new();
        for url in urls.iter().cycle() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let sent = Instant::now();
            let answer = client
                .request(method.parse().unwrap(), format!("{url}{path}"))
                .send();
            let code = answer.map_or(0, |a| a.status().as_u16());
            record.push((sent, Instant::now(), code));
            if code == 404 {
                break;
            }
            std::thread::sleep(every);
        }
        record
    })
}

/// The safety of expiry under faults: an owner renews its 8 s lease every 300 ms through
/// any node while leaders are killed and paused; the key must never be seen gone less
/// than a TTL after a keepalive that was then acknowledged was sent (the leader counts
/// from when it applied the keepalive, and a new leader from its election: both later).
/// The lease outlives the faults, and expires once its owner stops.
#[test]
fn a_lease_renewed_through_leader_kills_and_pauses_never_expires_early() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut cluster = Cluster::start("lease-faults", 3, &[]);
    cluster.wait_leader();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url("")).collect();
    let ttl = Duration::from_secs(8);
    let lease = grant(&urls[0], ttl.as_secs(), json!({}));
    assert_eq!(put_leased(&urls[0], "held", lease).0, 200);

    let stop_renewing = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let renewer = poll_in_turn(
        urls.clone(),
        "POST",
        format!("v1/leases/{lease}/keepalive"),
        Duration::from_millis(300),
        stop_renewing.clone(),
    );
    let reader = poll_in_turn(
        urls.clone(),
        "GET",
        "v1/kv/held".into(),
        Duration::from_millis(50),
        stop_reading.clone(),
    );
    // Faults for 20 s at least: a leader killed (and restarted), or paused for an
    // election (and resumed), in turn.
    let faults_until = Instant::now() + Duration::from_secs(20);
    for round in 0.. {
        if round >= 4 && Instant::now() > faults_until {
            break;
        }
        let leader = cluster.wait_leader();
        if round % 2 == 0 {
            cluster.node(leader).kill();
            cluster.wait_leader();
            cluster.node(leader).start();
        } else {
            cluster.node(leader).signal("STOP");
            let others: Vec<&common::Node> =
                cluster.nodes.iter().filter(|n| n.id != leader).collect();
            cluster.wait_until("the others to elect a leader", || {
                let seen: Vec<u64> = others
                    .iter()
                    .map(|n| n.status().map_or(0, |s| s["leader"].as_u64().unwrap()))
                    .collect();
                seen[0] != 0 && seen[0] != leader && seen.iter().all(|&l| l == seen[0])
            });
            cluster.node(leader).signal("CONT");
        }
    }
    cluster.wait_leader();
    let (code, shown) = http_json("GET", &format!("{}v1/leases/{lease}", urls[0]), None);
    assert_eq!(
        code,
        200,
        "the lease outlived the faults: {shown}\n{}",
        cluster.logs()
    );
    stop_renewing.store(true, Ordering::Relaxed);
    let renewals = renewer.join().unwrap();
    let reads = reader.join().unwrap();
    let (_, gone_at, last) = *reads.last().unwrap();
    assert_eq!(last, 404, "the key expired after the owner stopped");
    let acked: Vec<Instant> = renewals
        .iter()
        .filter(|(_, _, code)| *code == 200)
        .map(|(sent, _, _)| *sent)
        .collect();
    let late = acked.iter().filter(|&&sent| sent + ttl > gone_at).count();
    assert_eq!(
        late, 0,
        "the key was seen gone less than a TTL after {late} acknowledged keepalives were sent"
    );
    assert!(acked.len() >= 5, "{} keepalives acknowledged", acked.len());
    stop_reading.store(true, Ordering::Relaxed);
}
