//! Hostile input on both ports and what must survive it: a panic stops the process
//! loudly, forged raft frames and abusive snapshot uploads are refused without stopping
//! the node, and malformed or idle HTTP connections cannot wedge the client port.

mod checker;
mod common;
mod history;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{http, Cluster};
use history::{read_counter, Rng, Workload, KEYS};

/// A panic on any thread ends the process with a non-zero status and a log line, so a
/// supervisor restarts it (the async runtime alone would have survived this one).
#[test]
fn a_panic_anywhere_stops_the_process_with_a_failure_status() {
    let mut cluster = Cluster::start("panic", 1, &["--enable-fault-injection"]);
    let (code, _) = http("POST", &cluster.nodes[0].url("debug/panic"), None);
    assert_eq!(code, 0, "the request's connection dies with the process");
    let status = cluster.nodes[0].wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(101), "{status:?}");
    cluster.nodes[0].assert_logged(
        "a thread panicked; stopping the process",
        "the panic is logged",
    );
}

/// The cluster id a node's peer port answers with (what a peer must name).
fn cluster_id_of(peer_url: &str) -> String {
    let (code, body) = http("GET", &format!("{peer_url}/raft/cluster"), None);
    assert_eq!(code, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    view["cluster_id"].as_str().unwrap().to_string()
}

/// POSTs `frames` (raw bytes) to a peer port's `/raft`, as a peer would.
fn post_frames(peer_url: &str, cluster_id: &str, frames: Vec<u8>) -> u16 {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    client
        .post(format!("{peer_url}/raft"))
        .header("x-raftkvd-cluster-id", cluster_id)
        .body(frames)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// One frame: group id, length, protobuf-encoded raft message.
fn frame(group: u64, msg: &raft::eraftpb::Message) -> Vec<u8> {
    use protobuf::Message as _;
    let body = msg.write_to_bytes().unwrap();
    let mut out = group.to_le_bytes().to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Forged raft messages that raft-rs would abort on (a heartbeat committing past the
/// log's end, an empty proposal, a read request without context, entries that do not
/// follow on, a snapshot with an impossible configuration, a local-only message) and
/// random and mutated frames: every node stays up, refuses and counts them, and the
/// cluster keeps serving every write it acknowledged.
#[test]
fn forged_and_random_peer_frames_cannot_stop_a_node() {
    use raft::eraftpb::{Entry, Message, MessageType};
    let cluster = Cluster::start("forged-frames", 3, &[]);
    let leader = cluster.wait_leader();
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    for i in 0..20 {
        cluster.put_ok(leader, &format!("before-{i}"), "v");
    }
    let term = follower.status_u64("term");
    let cluster_id = cluster_id_of(&follower.peer_url);
    let forged = |kind: MessageType, term: u64| {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = leader;
        m.to = follower.id;
        m.term = term;
        m
    };
    let mut attacks = Vec::new();
    let mut heartbeat = forged(MessageType::MsgHeartbeat, term);
    heartbeat.commit = 1 << 40;
    attacks.push(heartbeat);
    attacks.push(forged(MessageType::MsgPropose, 0));
    attacks.push(forged(MessageType::MsgReadIndex, 0));
    attacks.push(forged(MessageType::MsgHup, 0));
    attacks.push(forged(MessageType::MsgTransferLeader, term));
    let mut append = forged(MessageType::MsgAppend, term);
    append.index = 1;
    append.log_term = 1;
    append.entries = vec![Entry {
        index: 1,
        term,
        ..Default::default()
    }]
    .into();
    attacks.push(append);
    let mut snapshot = forged(MessageType::MsgSnapshot, term);
    let meta = snapshot.mut_snapshot().mut_metadata();
    meta.index = 1 << 30;
    meta.term = term;
    meta.mut_conf_state().voters = vec![1, 2, 3];
    meta.mut_conf_state().learners = vec![2];
    attacks.push(snapshot);
    let mut stranger = forged(MessageType::MsgHeartbeat, term);
    stranger.from = 99;
    attacks.push(stranger);
    for attack in &attacks {
        let code = post_frames(&follower.peer_url, &cluster_id, frame(1, attack));
        assert!(
            code == 204 || code == 0,
            "{:?}: {code}",
            attack.get_msg_type()
        );
    }
    // Random bytes and mutations of a real frame, at every node.
    let mut rng = Rng::new(42);
    let mut next = move || rng.next_u64();
    let valid = frame(1, &attacks[0]);
    for node in &cluster.nodes {
        let cluster_id = cluster_id_of(&node.peer_url);
        for _ in 0..200 {
            let mut bytes = if next() % 2 == 0 {
                valid.clone()
            } else {
                (0..next() % 64).map(|_| next() as u8).collect()
            };
            for _ in 0..next() % 4 {
                if !bytes.is_empty() {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = next() as u8;
                }
            }
            post_frames(&node.peer_url, &cluster_id, bytes);
        }
    }
    cluster.assert_every_node_serves();
    follower.assert_logged(
        "refused a peer message raft could not safely take",
        "forged messages are logged",
    );
    let refused = follower
        .metric("raftkvd_peer_messages_refused_total")
        .unwrap_or(0);
    assert!(refused >= 6, "refusals counted: {refused}");
    follower.assert_logged(
        "dropping raft messages from a node that is not a known peer",
        "a stranger's message is logged",
    );
    // The cluster still takes writes through every node and loses none.
    let leader = cluster.wait_leader();
    for node in &cluster.nodes {
        cluster.put_ok(node.id, &format!("after-{}", node.id), "w");
    }
    for node in &cluster.nodes {
        for i in 0..20 {
            cluster.wait_value(node.id, &format!("before-{i}"), "v");
        }
        cluster.wait_value(node.id, &format!("after-{leader}"), "w");
    }
}

/// A cluster member that hosts no replica of a group cannot speak in it: a heartbeat it
/// forges for group 2 (on nodes 1 and 2 only) with a higher term would make node 1's
/// replica follow it at that term; it is refused, and group 2 keeps its own leader.
#[test]
fn a_node_outside_a_group_cannot_speak_in_it() {
    use raft::eraftpb::{Message, MessageType};
    let cluster = Cluster::start("outsider", 3, &[]);
    let (code, body) = common::http_json(
        "POST",
        &cluster.nodes[0].url("v1/groups"),
        Some(serde_json::json!({"id": 2, "members": [1, 2]})),
    );
    assert_eq!(code, 201, "{body}");
    // Group 2's leader and term as node 1's replica sees them (none while it starts).
    let group_on_1 = || {
        let url = cluster.nodes[0].url("v1/groups/2?node=1");
        let (code, view) = common::http_json("GET", &url, None);
        let leader = view["leader"].as_u64().unwrap_or(0);
        (code == 200 && leader != 0).then(|| (leader, view["term"].as_u64().unwrap()))
    };
    let mut before = None;
    cluster.wait_until("group 2 to elect a leader", || {
        before = group_on_1();
        before.is_some()
    });
    let before = before.unwrap();
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    heartbeat.from = 3;
    heartbeat.to = 1;
    heartbeat.term = before.1 + 10;
    let peer_url = &cluster.nodes[0].peer_url;
    let code = post_frames(peer_url, &cluster_id_of(peer_url), frame(2, &heartbeat));
    assert_eq!(code, 204);
    // (An election of its own may still happen on a loaded machine: it moves the term by
    // one or two, never to the forged term, and never to node 3.)
    let mut after = None;
    cluster.wait_until("node 1 to know group 2's leader", || {
        after = group_on_1();
        after.is_some()
    });
    assert!(
        after.is_some_and(|(leader, term)| leader != 3 && term < heartbeat.term),
        "group 2 on node 1 followed the outsider: {after:?}, was {before:?}"
    );
    cluster.nodes[0].assert_logged(
        "node 3 hosts no replica of group 2",
        "a message from outside the group is refused and logged",
    );
}

/// A committed entry this build cannot decode (as if a member of a newer release wrote
/// it) stops the node with an error naming the entry, every time it starts, instead of
/// being skipped while the other replicas apply it.
#[test]
fn an_entry_this_build_cannot_read_stops_the_node_naming_it() {
    use raft::eraftpb::{Entry, Message, MessageType};
    let mut cluster = Cluster::start("unreadable-entry", 3, &[]);
    let leader = cluster.wait_leader();
    cluster.put_ok(leader, "k", "v");
    let follower_id = cluster.nodes.iter().find(|n| n.id != leader).unwrap().id;
    let follower = cluster.node(follower_id);
    common::poll_until(
        "the follower to apply everything",
        || {
            let s = follower.status().unwrap_or_default();
            s["applied"] == s["commit"] && s["commit"].as_u64().unwrap_or(0) > 0
        },
        || follower.log_text(),
    );
    let (term, last) = (follower.status_u64("term"), follower.status_u64("commit"));
    let mut append = Message::default();
    append.set_msg_type(MessageType::MsgAppend);
    append.from = leader;
    append.to = follower_id;
    append.term = term;
    append.index = last;
    append.log_term = term;
    append.commit = last + 1;
    append.entries = vec![Entry {
        index: last + 1,
        term,
        data: vec![9, 1, 2, 3].into(),
        ..Default::default()
    }]
    .into();
    let cluster_id = cluster_id_of(&follower.peer_url);
    post_frames(&follower.peer_url, &cluster_id, frame(1, &append));
    let status = follower.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status:?}");
    let needle = format!("cannot apply the committed entry at index {}", last + 1);
    follower.assert_logged(&needle, "the entry is named");
    // It stays stopped at the same entry: nothing was skipped.
    std::fs::write(&follower.log, "").unwrap();
    follower.start();
    let status = follower.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status:?}");
    follower.assert_logged(&needle, "the entry is named again");
}

/// Uploads `body` to a peer port's snapshot route, announcing `msg`.
fn upload_snapshot(
    peer_url: &str,
    cluster_id: &str,
    msg: &raft::eraftpb::Message,
    body: Vec<u8>,
) -> (u16, String) {
    use protobuf::Message as _;
    let hex: String = msg
        .write_to_bytes()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    match client
        .post(format!("{peer_url}/raft/snapshot"))
        .header("x-raftkvd-cluster-id", cluster_id)
        .header("x-raft-message", hex)
        .header("x-raft-group", "1")
        .body(body)
        .send()
    {
        Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
        Err(e) => (0, format!("{e:?}")),
    }
}

/// Snapshot files in a node's cluster-group snapshot folder.
fn snapshot_files(node: &common::Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.data_dir.join("snap"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Snapshot uploads that do not hold what they announce, are too large, or come two at
/// a time from one peer are refused; none leaves a file behind or takes a snapshot's
/// name, and the node restarts cleanly on what it had.
#[test]
fn abusive_snapshot_uploads_are_refused_and_leave_nothing_behind() {
    use raft::eraftpb::{Message, MessageType};
    let mut cluster = Cluster::start(
        "snapshot-uploads",
        3,
        &["--snapshot-count", "10", "--max-snapshot-bytes", "100000"],
    );
    let leader = cluster.wait_leader();
    for i in 0..40 {
        cluster.put_ok(leader, &format!("k{i}"), "v");
    }
    let leader_node = cluster.nodes.iter().find(|n| n.id == leader).unwrap();
    common::poll_until(
        "the leader to write a snapshot",
        || !snapshot_files(leader_node).is_empty(),
        || leader_node.log_text(),
    );
    // A finished snapshot (the writer's `.tmp` file of the next one may be there too).
    let real_name = snapshot_files(leader_node)
        .into_iter()
        .rfind(|name| name.ends_with(".snap"))
        .unwrap();
    let real = std::fs::read(leader_node.data_dir.join("snap").join(&real_name)).unwrap();
    let real_index = u64::from_str_radix(
        real_name
            .trim_start_matches("snap-")
            .trim_end_matches(".snap"),
        16,
    )
    .unwrap();
    let follower_id = cluster.nodes.iter().find(|n| n.id != leader).unwrap().id;
    let follower = cluster.node(follower_id);
    let cluster_id = cluster_id_of(&follower.peer_url);
    let term = follower.status_u64("term");
    let announce = |index: u64| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        m.from = leader;
        m.to = follower_id;
        m.term = term;
        let meta = m.mut_snapshot().mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.mut_conf_state().voters = vec![1, 2, 3];
        m
    };
    // Garbage announced at a huge index (this once made pruning delete real snapshots).
    let (code, text) = upload_snapshot(
        &follower.peer_url,
        &cluster_id,
        &announce(1 << 40),
        vec![7; 5000],
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("not a raftkvd snapshot"), "{text}");
    // A real file announced as another snapshot.
    let (code, text) = upload_snapshot(
        &follower.peer_url,
        &cluster_id,
        &announce(real_index + 1000),
        real.clone(),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("the message announces"), "{text}");
    // Over --max-snapshot-bytes.
    let (code, text) = upload_snapshot(
        &follower.peer_url,
        &cluster_id,
        &announce(real_index + 1000),
        vec![0; 200_000],
    );
    assert_eq!(code, 413, "{text}");
    // Not a snapshot message at all.
    let mut heartbeat = announce(1);
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    let (code, text) = upload_snapshot(&follower.peer_url, &cluster_id, &heartbeat, real);
    assert_eq!(code, 400, "{text}");

    // Two at once from one peer: the second is refused while the first is still open.
    let first = {
        use protobuf::Message as _;
        use std::io::Write;
        let hex: String = announce(real_index + 2000)
            .write_to_bytes()
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let addr = follower.peer_url.trim_start_matches("http://").to_string();
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            socket,
            "POST /raft/snapshot HTTP/1.1\r\nhost: {addr}\r\nx-raftkvd-cluster-id: {cluster_id}\r\n\
             x-raft-message: {hex}\r\nx-raft-group: 1\r\ntransfer-encoding: chunked\r\n\r\n\
             a\r\n0123456789\r\n"
        )
        .unwrap();
        socket
    };
    let second = std::cell::RefCell::new((0, String::new()));
    common::poll_until(
        "a second concurrent upload to be refused",
        || {
            *second.borrow_mut() = upload_snapshot(
                &follower.peer_url,
                &cluster_id,
                &announce(real_index + 3000),
                vec![2; 10],
            );
            second.borrow().0 == 429
        },
        || format!("{:?}", second.borrow()),
    );
    drop(first);
    // The slot frees when the first upload breaks off.
    common::poll_until(
        "the next upload to be taken in",
        || {
            let (code, _) = upload_snapshot(
                &follower.peer_url,
                &cluster_id,
                &announce(real_index + 3000),
                vec![2; 10],
            );
            code == 400
        },
        String::new,
    );

    // An upload's file is `recv-*.tmp` until raft takes it, then `snap-<index>.snap`; the
    // follower's own snapshots come and go meanwhile (it writes one every 10 writes).
    let announced = [
        1 << 40,
        real_index + 1000,
        real_index + 2000,
        real_index + 3000,
    ];
    let files = snapshot_files(follower);
    assert!(
        !files.iter().any(|name| name.starts_with("recv-")),
        "an upload left a file: {files:?}"
    );
    for index in announced {
        let name = format!("snap-{index:016x}.snap");
        assert!(
            !files.contains(&name),
            "an upload took a snapshot's name: {name}"
        );
    }
    follower.signal("TERM");
    assert!(follower.wait_exit(Duration::from_secs(15)).success());
    follower.start();
    cluster.put_ok(leader, "after", "restart");
    cluster.wait_value(follower_id, "k39", "v");
    cluster.wait_value(follower_id, "after", "restart");
}

/// PUTs 8 MiB with urllib and prints the status (or the error) it gets.
const PYTHON_BIG_PUT: &str = "
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b'x' * (8 << 20), method='PUT'))
    print('accepted')
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print(repr(e))
";

/// Sends `request` on a fresh connection to `addr` and returns what comes back before
/// the server closes it (or `deadline` passes).
fn raw_exchange(addr: &str, request: &[u8], deadline: Duration) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(deadline)).unwrap();
    let _ = socket.write_all(request);
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The client port under abuse: a client that sends its whole oversized body before
/// reading (as Python's urllib does) still gets its 413; slow or silent connections are
/// closed after the header deadline; huge headers and broken chunked bodies get a 4xx;
/// two thousand idle connections neither stop the node nor keep it from serving.
#[test]
fn malformed_slow_and_idle_client_connections_cannot_wedge_the_api() {
    let cluster = Cluster::start("client-abuse", 1, &["--header-read-timeout-ms", "1000"]);
    let node = &cluster.nodes[0];
    let addr = format!("127.0.0.1:{}", node.api_port);

    // Python's urllib sends the whole body before it reads an answer.
    let urllib = std::process::Command::new("python3")
        .args(["-c", PYTHON_BIG_PUT, &node.url("big")])
        .output()
        .expect("python3 runs (the CI image has it)");
    let said = String::from_utf8_lossy(&urllib.stdout);
    assert_eq!(
        said.trim(),
        "413",
        "{}",
        String::from_utf8_lossy(&urllib.stderr)
    );

    // Headers that never end: closed after the deadline, with nothing served.
    let started = std::time::Instant::now();
    let answer = raw_exchange(
        &addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(10),
    );
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closed by the deadline"
    );

    let huge = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let answer = raw_exchange(&addr, huge.as_bytes(), Duration::from_secs(10));
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:.200}"
    );
    let answer = raw_exchange(
        &addr,
        b"PUT /k HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nvalue\r\n0\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer:.200}"
    );

    let idle: Vec<std::net::TcpStream> = (0..2000)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let (code, _) = http("PUT", &node.url("k"), Some(b"v".to_vec()));
    assert_eq!(code, 204, "served beside 2000 idle connections");
    // The idle ones are closed by the header deadline.
    common::poll_until(
        "the idle connections to be closed",
        || {
            idle.iter().all(|s| {
                use std::io::Read;
                s.set_nonblocking(true).unwrap();
                matches!((&*s).read(&mut [0; 1]), Ok(0))
            })
        },
        String::new,
    );
    let (code, body) = http("GET", &node.url("k"), None);
    assert_eq!((code, body.as_str()), (200, "v"));
    assert_eq!(
        http("GET", &node.url("big"), None).0,
        404,
        "nothing of the 413 was stored"
    );
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of file descriptors (more clients than `ulimit -n`): the accept loop backs off
/// instead of spinning, logs it once, and serves again as soon as descriptors free up.
#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let dir = common::TempDir::new("emfile");
    let peers = [format!("http://127.0.0.1:{}", common::free_port())];
    let mut node = common::node_spec(&dir.0, 1, &peers, &[], false);
    let log = std::fs::File::create(&node.log).unwrap();
    let child = std::process::Command::new("prlimit")
        .arg("--nofile=128:128")
        .arg(common::BIN)
        .args(&node.args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prlimit (util-linux) runs");
    let pid = child.id();
    node.child = Some(child);
    common::poll_until(
        "the node to serve",
        || http("GET", &node.url("health"), None).0 == 200,
        || node.log_text(),
    );
    let addr = format!("127.0.0.1:{}", node.api_port);
    let clients: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    common::poll_until(
        "the node to run out of descriptors",
        || node.log_text().contains("accept failed; backing off"),
        || node.log_text(),
    );
    let before = cpu_ticks(pid);
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 100 ticks a second is one core; a spinning accept loop would take about that.
    let ticks_per_second = used as f64 / started.elapsed().as_secs_f64();
    assert!(
        ticks_per_second < 30.0,
        "{ticks_per_second} ticks/s while out of descriptors"
    );
    assert_eq!(
        node.log_text()
            .matches("accept failed; backing off")
            .count(),
        1,
        "logged once per outage"
    );
    drop(clients);
    common::poll_until(
        "the node to serve again",
        || http("GET", &node.url("health"), None).0 == 200,
        || node.log_text(),
    );
    node.assert_logged("accepting connections again", "the recovery is logged");
}

/// Jepsen-style clients write, read and compare-and-swap through all three nodes while
/// every port is abused at once: forged and random frames at each peer port, slow
/// headers, huge headers, broken chunked bodies and a thousand idle connections at each
/// client port. Every node stays up, and the history is linearizable with the counter
/// exact.
#[test]
fn a_cluster_under_hostile_traffic_stays_linearizable() {
    use raft::eraftpb::{Message, MessageType};
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = Cluster::start("hostile-history", 3, &["--header-read-timeout-ms", "2000"]);
    let bases: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.url("").trim_end_matches('/').to_string())
        .collect();
    let mut workload = Workload::start(bases.clone());
    let stop = AtomicBool::new(false);
    let cluster_id = cluster_id_of(&cluster.nodes[0].peer_url);
    let idle: Vec<std::net::TcpStream> = cluster
        .nodes
        .iter()
        .flat_map(|n| {
            let addr = format!("127.0.0.1:{}", n.api_port);
            (0..1000).filter_map(move |_| std::net::TcpStream::connect(&addr).ok())
        })
        .collect();
    std::thread::scope(|scope| {
        for node in &cluster.nodes {
            let (peer_url, cluster_id, stop) = (&node.peer_url, &cluster_id, &stop);
            let to = node.id;
            scope.spawn(move || {
                let mut rng = Rng::new(to);
                let mut next = move || rng.next_u64();
                while !stop.load(Ordering::Relaxed) {
                    let mut m = Message::default();
                    let kinds = [
                        MessageType::MsgHeartbeat,
                        MessageType::MsgAppend,
                        MessageType::MsgPropose,
                        MessageType::MsgReadIndex,
                        MessageType::MsgSnapshot,
                        MessageType::MsgRequestVote,
                        MessageType::MsgTimeoutNow,
                        MessageType::MsgHup,
                    ];
                    m.set_msg_type(kinds[(next() % kinds.len() as u64) as usize]);
                    m.from = 1 + next() % 3;
                    m.to = to;
                    m.term = next() % 4;
                    m.index = next() % 1000;
                    m.commit = next() % (1 << 20);
                    let mut bytes = frame(1 + next() % 2, &m);
                    if next() % 3 == 0 {
                        let at = (next() % bytes.len() as u64) as usize;
                        bytes[at] = next() as u8;
                    }
                    post_frames(peer_url, cluster_id, bytes);
                }
            });
            let addr = format!("127.0.0.1:{}", node.api_port);
            scope.spawn(move || {
                let junk: [&[u8]; 3] = [
                    b"GET /a HTTP/1.1\r\nhost: x\r\n",
                    b"PUT /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                    b"GET /a HTTP/1.1\r\nx-big: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                ];
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    raw_exchange(&addr, junk[round % junk.len()], Duration::from_millis(300));
                    round += 1;
                }
            });
        }
        // The nemesis here is the traffic; it lasts this long (a duration, not a wait for
        // anything).
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
    });
    drop(idle);
    workload.finish();
    eprintln!("{} operations succeeded under attack", workload.succeeded());
    assert!(
        workload.succeeded() > 50,
        "too few operations succeeded to mean anything"
    );
    cluster.assert_every_node_serves();
    cluster.wait_leader();
    for base in &bases {
        for key in KEYS {
            cluster.wait_until(&format!("{base} to answer GET {key}"), || {
                workload.rec.read(base, key)
            });
        }
    }
    for key in KEYS {
        cluster.wait_until(&format!("every node to agree on {key}"), || {
            let answers: BTreeSet<_> = bases
                .iter()
                .map(|b| http("GET", &format!("{b}/{key}?consistency=serializable"), None))
                .collect();
            answers.len() == 1
        });
    }
    let mut counter = None;
    cluster.wait_until("a linearizable read of the counter", || {
        counter = read_counter(&bases[0]);
        counter.is_some()
    });
    let faults = vec!["hostile traffic on every port".to_string()];
    if let Err(e) = workload.verify(counter.unwrap().0, &faults) {
        panic!("{e}\n{}", cluster.logs());
    }
}
