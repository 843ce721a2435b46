//! raftkvd in containers, each container its own host with its own address on a private
//! Docker network, as the hashicorp-raft seed runs its cluster: the image the project
//! ships (`docker/build-image.sh`, the `Dockerfile`), `docker-compose.yml`, and faults
//! that cut a host rather than a port (`docker kill`, `docker pause`, `docker network
//! disconnect`), with the Jepsen-style clients of `history/` writing and reading through
//! every member.
//!
//! The image is built once per run from the binary cargo just built (the same script and
//! Dockerfile as a release image). Without a Docker engine these tests print a loud notice
//! and pass without running; `.ci/run` says so too. The last two tests need no Docker:
//! the deployment files use only flags raftkvd has, and `raftkvd probe` (the image's
//! health check) tells a healthy node from a missing one.

mod checker;
mod common;
mod history;

use common::{free_port, http, http_with_timeout, Cluster, BIN};
use history::{read_counter, Workload, KEYS};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Containers start, stop and elect slower than local processes on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);
/// The default election timeout (10 ticks of 100 ms).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Successful client operations to wait for while each fault is in place, and after.
const PROGRESS_OPS: usize = 60;
/// The image the tests build from the binary under test.
const TEST_IMAGE: &str = "raftkvd-test:latest";
/// The client and peer ports inside every container (the image's defaults are etcd's).
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// Frequent snapshots, so snapshot transfer happens under the faults too.
const FAULT_ENV: &[(&str, &str)] = &[
    ("RAFTKVD_REQUEST_TIMEOUT_MS", "1500"),
    ("RAFTKVD_SNAPSHOT_COUNT", "200"),
    ("RAFTKVD_SNAPSHOT_CATCHUP_ENTRIES", "50"),
];

/// One container test at a time: each runs three or four nodes and a set of clients,
/// which is all two cores can take while keeping elections steady.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the docker CLI; its trimmed stdout, or what it printed on failure.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The test image, built once from the binary under test; None, after a loud notice, if
/// no Docker engine answers.
fn image() -> Option<&'static str> {
    static IMAGE: OnceLock<Option<&'static str>> = OnceLock::new();
    *IMAGE.get_or_init(|| {
        if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
            eprintln!(
                "\n*** SKIPPED: no Docker engine answers, so the container tests did not run ***\n{e}\n"
            );
            return None;
        }
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/build-image.sh"))
            .arg(TEST_IMAGE)
            .env("BINARY", BIN)
            .output()
            .expect("run docker/build-image.sh");
        assert!(
            out.status.success(),
            "docker/build-image.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
        Some(TEST_IMAGE)
    })
}

/// Polls `cond` every 100 ms until it holds; after `DEADLINE` fails, showing `context()`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status_of(base: &str) -> Option<serde_json::Value> {
    let (code, body) = http_with_timeout(
        "GET",
        &format!("{base}/status"),
        None,
        Duration::from_secs(2),
    );
    (code == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// The leader `base` knows of (0 for none), if it answers.
fn leader_seen_by(base: &str) -> Option<u64> {
    status_of(base).and_then(|s| s["leader"].as_u64())
}

/// A cluster of containers on its own network; removed (with its volumes) when dropped.
struct Containers {
    image: &'static str,
    /// Unique to this test run and test: names the network and the containers.
    prefix: String,
    network: String,
    /// Node ids whose containers exist.
    ids: Vec<u64>,
}

impl Containers {
    /// Forms a cluster of `n` containers, each told only its peer URL (its id is its
    /// position in the cluster list, as in the Kubernetes manifests), and waits for a
    /// leader.
    fn start(image: &'static str, name: &str, n: u64, env: &[(&str, &str)]) -> Containers {
        let prefix = format!("raftkvd-test-{name}-{}", std::process::id());
        let network = format!("{prefix}-net");
        docker(&["network", "create", &network]).unwrap();
        let mut cluster = Containers {
            image,
            prefix,
            network,
            ids: Vec::new(),
        };
        let peers: Vec<String> = (1..=n).map(peer_url).collect();
        for id in 1..=n {
            let mut vars = vec![
                ("RAFTKVD_CLUSTER".to_string(), peers.join(",")),
                ("RAFTKVD_PEER_URL".to_string(), peer_url(id)),
            ];
            vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            cluster.run(id, &vars);
        }
        cluster.wait_leader();
        cluster
    }

    fn name(&self, id: u64) -> String {
        format!("{}-{id}", self.prefix)
    }

    /// Starts node `id`'s container with `vars` (plus the listen address for peers).
    fn run(&mut self, id: u64, vars: &[(String, String)]) {
        let (name, host) = (self.name(id), host(id));
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &host,
            "--network",
            &self.network,
            "--network-alias",
            &host,
            "-e",
            "RAFTKVD_LISTEN_PEER_URLS=http://0.0.0.0:2380",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (k, v) in vars {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push(self.image.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args).unwrap();
        self.ids.push(id);
    }

    /// The client API of node `id` at its container's current address (which changes
    /// when the container restarts or reconnects), waiting for it to have one.
    fn base(&self, id: u64) -> String {
        let mut ip = String::new();
        wait_for(
            &format!("container of node {id} to have an address"),
            || {
                ip = docker(&[
                    "inspect",
                    "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                    &self.name(id),
                ])
                .unwrap_or_default();
                !ip.is_empty()
            },
            || self.logs(),
        );
        format!("http://{ip}:{CLIENT_PORT}")
    }

    /// Every running member's client API.
    fn bases(&self, ids: &[u64]) -> Vec<String> {
        ids.iter().map(|&id| self.base(id)).collect()
    }

    /// Waits until every container in `ids` names the same leader; returns it.
    fn wait_leader_among(&self, ids: &[u64]) -> u64 {
        let mut leader = 0;
        wait_for(
            &format!("nodes {ids:?} to agree on a leader"),
            || {
                let seen: BTreeSet<Option<u64>> = ids
                    .iter()
                    .map(|&id| leader_seen_by(&self.base(id)))
                    .collect();
                leader = seen.iter().next().copied().flatten().unwrap_or(0);
                seen.len() == 1 && leader != 0 && ids.contains(&leader)
            },
            || self.logs(),
        );
        leader
    }

    fn wait_leader(&self) -> u64 {
        self.wait_leader_among(&self.ids)
    }

    fn docker_on(&self, verb: &str, id: u64) {
        docker(&[verb, &self.name(id)]).unwrap();
    }

    /// Cuts node `id`'s host off the network, as a pulled cable would.
    fn disconnect(&self, id: u64) {
        docker(&["network", "disconnect", &self.network, &self.name(id)]).unwrap();
    }

    /// Plugs it back in, under its name (the alias the peers' URLs use).
    fn connect(&self, id: u64) {
        docker(&[
            "network",
            "connect",
            "--alias",
            &host(id),
            &self.network,
            &self.name(id),
        ])
        .unwrap();
    }

    fn exit_code(&self, id: u64) -> String {
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &self.name(id)]).unwrap()
    }

    /// The last lines each container logged.
    fn logs(&self) -> String {
        self.ids
            .iter()
            .map(|&id| {
                let out = Command::new("docker")
                    .args(["logs", "--tail", "40", &self.name(id)])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                format!("--- node {id} ---\n{out}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for &id in &self.ids {
            let _ = docker(&["rm", "-f", "-v", &self.name(id)]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

fn host(id: u64) -> String {
    format!("raftkvd{id}")
}

fn peer_url(id: u64) -> String {
    format!("http://{}:{PEER_PORT}", host(id))
}

/// Waits until the clients have made `PROGRESS_OPS` more successful operations.
fn progress(workload: &Workload, cluster: &Containers, what: &str) {
    let target = workload.succeeded() + PROGRESS_OPS;
    wait_for(
        &format!("client progress {what}"),
        || workload.succeeded() >= target,
        || cluster.logs(),
    );
}

/// After the faults: every member answers a linearizable read of every key (recorded),
/// their local maps agree, and the history and the counter check out.
fn converge_and_verify(workload: &mut Workload, cluster: &Containers, faults: &[String]) {
    workload.finish();
    let ids = cluster.ids.clone();
    cluster.wait_leader_among(&ids);
    for &id in &ids {
        let base = cluster.base(id);
        for key in KEYS {
            wait_for(
                &format!("node {id} to answer GET {key}"),
                || workload.rec.read(&base, key),
                || cluster.logs(),
            );
        }
    }
    for key in KEYS {
        wait_for(
            &format!("every node to agree on {key}"),
            || {
                let answers: BTreeSet<_> = ids
                    .iter()
                    .map(|&id| {
                        let url = format!("{}/{key}?consistency=serializable", cluster.base(id));
                        http("GET", &url, None)
                    })
                    .collect();
                answers.len() == 1
            },
            || cluster.logs(),
        );
    }
    let mut counter = None;
    let base = cluster.base(ids[0]);
    wait_for(
        "a linearizable read of the counter",
        || {
            counter = read_counter(&base);
            counter.is_some()
        },
        || cluster.logs(),
    );
    if let Err(e) = workload.verify(counter.unwrap().0, faults) {
        panic!("{e}\n{}", cluster.logs());
    }
}

/// kill, pause and partition whole hosts, leader and follower, while clients write and
/// read through all three: the history stays linearizable and nothing acknowledged is
/// lost.
#[test]
fn faults_that_cut_whole_hosts_keep_the_history_linearizable() {
    let Some(image) = image() else { return };
    let _serial = one_at_a_time();
    let cluster = Containers::start(image, "faults", 3, FAULT_ENV);
    let ids = cluster.ids.clone();
    let mut workload = Workload::start(cluster.bases(&ids));
    let refresh = |workload: &Workload| *workload.bases.write().unwrap() = cluster.bases(&ids);
    let mut faults = Vec::new();
    progress(&workload, &cluster, "before any fault");

    for target in ["leader", "follower"] {
        let leader = cluster.wait_leader();
        let victim = match target {
            "leader" => leader,
            _ => *ids.iter().find(|&&id| id != leader).unwrap(),
        };

        faults.push(format!("docker kill the {target}, node {victim}"));
        cluster.docker_on("kill", victim);
        progress(&workload, &cluster, "with a host down");
        cluster.docker_on("start", victim);
        refresh(&workload);
        progress(&workload, &cluster, "after the restart");

        let victim = match target {
            "leader" => cluster.wait_leader(),
            _ => victim,
        };
        faults.push(format!("docker pause the {target}, node {victim}"));
        cluster.docker_on("pause", victim);
        progress(&workload, &cluster, "with a host paused");
        cluster.docker_on("unpause", victim);
        progress(&workload, &cluster, "after unpausing");

        let victim = match target {
            "leader" => cluster.wait_leader(),
            _ => victim,
        };
        faults.push(format!("network disconnect of the {target}, node {victim}"));
        cluster.disconnect(victim);
        progress(&workload, &cluster, "with a host cut off");
        cluster.connect(victim);
        refresh(&workload);
        progress(&workload, &cluster, "after reconnecting");
    }
    converge_and_verify(&mut workload, &cluster, &faults);
}

/// `docker restart` of every container in turn (SIGTERM: a leader hands off first) while
/// clients write and read through all three: nothing acknowledged is lost and the history
/// is linearizable. Each restart's unavailability is reported, and must stay under one
/// election timeout: the longest time a writer that uses another member waited between
/// two acknowledged writes. (The clients' own gaps would mostly measure their connect
/// timeouts to the stopped host's address.)
#[test]
fn a_rolling_restart_loses_no_write() {
    let Some(image) = image() else { return };
    let _serial = one_at_a_time();
    // The default request timeout (5 s): a write left waiting for it would show.
    let cluster = Containers::start(image, "rolling", 3, &[]);
    let ids = cluster.ids.clone();
    let mut workload = Workload::start(cluster.bases(&ids));
    progress(&workload, &cluster, "before the restarts");
    let mut faults = Vec::new();
    for &id in &ids {
        let was_leader = cluster.wait_leader() == id;
        let other = *ids.iter().find(|&&other| other != id).unwrap();
        let writer = GapWriter::start(cluster.base(other));
        // docker stop's SIGTERM, then SIGKILL after 30 s (never reached: the hand-off
        // takes at most two election timeouts).
        docker(&["restart", "-t", "30", &cluster.name(id)]).unwrap();
        let base = cluster.base(id);
        wait_for(
            &format!("node {id} to be ready after its restart"),
            || {
                let url = format!("{base}/readyz");
                http_with_timeout("GET", &url, None, Duration::from_secs(2)).0 == 200
            },
            || cluster.logs(),
        );
        *workload.bases.write().unwrap() = cluster.bases(&ids);
        progress(&workload, &cluster, "after the restart");
        let longest = writer.finish();
        let role = if was_leader { "leader" } else { "follower" };
        let text = format!(
            "restart of node {id} ({role}): longest wait for an acknowledged write through \
             node {other} {} ms",
            longest.as_millis()
        );
        eprintln!("rolling restart: {text}");
        // A bound far above what a hand-off costs (tens of ms here), far below the
        // request timeout a dropped write used to wait for: one election timeout (1 s).
        assert!(
            longest < ELECTION_TIMEOUT,
            "{text}: more than one election timeout\n{}",
            cluster.logs()
        );
        faults.push(text);
        assert_eq!(cluster.exit_code(id), "0", "node {id} stopped by SIGTERM");
    }
    converge_and_verify(&mut workload, &cluster, &faults);
}

/// One writer PUTting to one member back to back, timing the longest gap between two
/// acknowledgements.
struct GapWriter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl GapWriter {
    fn start(base: String) -> GapWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
            let mut n = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                n += 1;
                let url = format!("{base}/rolling-writer");
                let body = Some(n.to_string().into_bytes());
                if http_with_timeout("PUT", &url, body, Duration::from_secs(5)).0 == 204 {
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                }
            }
            longest.max(last.elapsed())
        });
        GapWriter { stop, thread }
    }

    fn finish(self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// A fourth container joins with `--join-via` a member's client API (by DNS name), gets
/// the data, and one of the first three is removed: its container exits 0.
#[test]
fn a_fourth_container_joins_via_a_member_and_one_is_removed() {
    let Some(image) = image() else { return };
    let _serial = one_at_a_time();
    let mut cluster = Containers::start(image, "join", 3, &[]);
    let base1 = cluster.base(1);
    for i in 0..20 {
        let (code, body) = http(
            "PUT",
            &format!("{base1}/k{i}"),
            Some(format!("v{i}").into()),
        );
        assert_eq!(code, 204, "PUT k{i}: {body}");
    }
    cluster.run(
        4,
        &[
            ("RAFTKVD_ID".into(), "4".into()),
            ("RAFTKVD_PEER_URL".into(), peer_url(4)),
            (
                "RAFTKVD_JOIN_VIA".into(),
                format!("http://{}:{CLIENT_PORT}", host(1)),
            ),
        ],
    );
    let base4 = cluster.base(4);
    wait_for(
        "node 4 to serve the data written before it joined",
        || (0..20).all(|i| http("GET", &format!("{base4}/k{i}"), None) == (200, format!("v{i}"))),
        || cluster.logs(),
    );
    let (_, members) = common::http_json("GET", &format!("{base1}/v1/members"), None);
    assert!(
        members["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == 4 && m["peer_url"] == peer_url(4).as_str()),
        "node 4 is a member at its DNS name: {members}"
    );

    let (code, body) = http("DELETE", &format!("{base1}/3"), None);
    assert_eq!(code, 204, "DELETE /3: {body}");
    let status = docker(&["wait", &cluster.name(3)]).unwrap();
    assert_eq!(status, "0", "the removed node's container exits 0");
    let (code, body) = http("PUT", &format!("{base4}/after"), Some(b"removal".to_vec()));
    assert_eq!(code, 204, "PUT after the removal: {body}");
    wait_for(
        "node 1 to serve the write made through node 4",
        || http("GET", &format!("{base1}/after"), None) == (200, "removal".into()),
        || cluster.logs(),
    );
}

/// The top-level docker-compose.yml as the README uses it, and the seed's walkthrough:
/// stop the leader's container (it exits 0 after handing off), a new leader is elected,
/// start it again and it rejoins as a follower holding every acknowledged write. The
/// image's HEALTHCHECK reports healthy.
#[test]
fn the_compose_cluster_survives_stopping_its_leader() {
    let Some(image) = image() else { return };
    let _serial = one_at_a_time();
    let project = format!("raftkvdtest{}", std::process::id());
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let compose = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("docker-compose")
            .args([
                "-p",
                &project,
                "-f",
                concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"),
            ])
            .args(args)
            .env("RAFTKVD_IMAGE", image)
            .env("RAFTKVD1_PORT", ports[0].to_string())
            .env("RAFTKVD2_PORT", ports[1].to_string())
            .env("RAFTKVD3_PORT", ports[2].to_string())
            .output()
            .map_err(|e| format!("docker-compose: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("docker-compose {}: {text}", args.join(" ")))
        }
    };
    struct Down<'a>(&'a dyn Fn(&[&str]) -> Result<String, String>);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "{}",
                    (self.0)(&["logs", "--tail", "40"]).unwrap_or_else(|e| e)
                );
            }
            let _ = (self.0)(&["down", "-v"]);
        }
    }
    let _down = Down(&compose);
    compose(&["up", "-d"]).unwrap();
    let logs = || compose(&["logs", "--tail", "40"]).unwrap_or_else(|e| e);
    let base = |id: u64| format!("http://127.0.0.1:{}", ports[id as usize - 1]);

    // The README's walkthrough, unchanged but for the ports.
    wait_for(
        "PUT my-key through the first node",
        || {
            http(
                "PUT",
                &format!("{}/my-key", base(1)),
                Some(b"hello".to_vec()),
            )
            .0 == 204
        },
        logs,
    );
    wait_for(
        "the second node to answer GET my-key",
        || http("GET", &format!("{}/my-key", base(2)), None) == (200, "hello".into()),
        logs,
    );
    let leader = leader_seen_by(&base(1)).unwrap();
    let mut acked = vec![("my-key".to_string(), "hello".to_string())];
    for i in 0..20 {
        let (key, value) = (format!("before-{i}"), format!("v{i}"));
        let (code, body) = http(
            "PUT",
            &format!("{}/{key}", base(1 + i % 3)),
            Some(value.clone().into()),
        );
        assert_eq!(code, 204, "PUT {key}: {body}");
        acked.push((key, value));
    }

    let service = format!("raftkvd{leader}");
    compose(&["stop", &service]).unwrap();
    let container = format!("{project}_{service}_1");
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &container]).unwrap();
    assert_eq!(code, "0", "the leader's container exits 0 on docker stop");
    let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    wait_for(
        "the other two to elect a new leader",
        || {
            others
                .iter()
                .all(|&id| leader_seen_by(&base(id)).is_some_and(|l| l != 0 && l != leader))
        },
        logs,
    );
    for i in 0..20 {
        let (key, value) = (format!("during-{i}"), format!("w{i}"));
        let (code, body) = http(
            "PUT",
            &format!("{}/{key}", base(others[i % 2])),
            Some(value.clone().into()),
        );
        assert_eq!(code, 204, "PUT {key} with the old leader stopped: {body}");
        acked.push((key, value));
    }

    compose(&["start", &service]).unwrap();
    wait_for(
        "the old leader to rejoin as a follower",
        || leader_seen_by(&base(leader)).is_some_and(|l| l != 0 && l != leader),
        logs,
    );
    wait_for(
        "the old leader to hold every acknowledged write",
        || {
            acked.iter().all(|(key, value)| {
                let url = format!("{}/{key}?consistency=serializable", base(leader));
                http("GET", &url, None) == (200, value.clone())
            })
        },
        logs,
    );
    wait_for(
        "the HEALTHCHECK to report the restarted container healthy",
        || {
            docker(&["inspect", "-f", "{{.State.Health.Status}}", &container])
                .is_ok_and(|s| s == "healthy")
        },
        logs,
    );
}

/// Every `RAFTKVD_*` variable and `--flag` the deployment files hand to raftkvd exists in
/// `raftkvd --help` (the Kubernetes manifests cannot be run here; this keeps them honest).
#[test]
fn deployment_files_use_only_flags_and_variables_raftkvd_has() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![
        format!("{root}/docker-compose.yml"),
        format!("{root}/Dockerfile"),
    ];
    for entry in std::fs::read_dir(format!("{root}/deploy/kubernetes")).unwrap() {
        files.push(entry.unwrap().path().to_string_lossy().into_owned());
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')) {
                if let Some(name) = word.strip_prefix("RAFTKVD_") {
                    // ${RAFTKVD_IMAGE} and ${RAFTKVD1_PORT}-style names are the compose
                    // file's own variables, not raftkvd's.
                    if line.contains(&format!("${{{word}")) {
                        continue;
                    }
                    assert!(
                        help.contains(&format!("[env: RAFTKVD_{name}=")),
                        "{file} sets {word}, which raftkvd --help does not list"
                    );
                    checked += 1;
                } else if word.len() > 2
                    && word.starts_with("--")
                    && word.as_bytes()[2].is_ascii_lowercase()
                    && !file.ends_with("Dockerfile")
                {
                    // (The Dockerfile's own --flags are Docker's.)
                    assert!(
                        help.contains(&format!("{word} ")) || help.contains(&format!("{word}\n")),
                        "{file} passes {word}, which raftkvd --help does not list"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} names found: is the scan broken?"
    );
    assert!(help.contains("raftkvd probe"), "--help mentions the probe");
}

/// `raftkvd probe URL` (the image's HEALTHCHECK) exits 0 for a node that serves and 1
/// for a port where none does; without a URL it asks RAFTKVD_PORT's /health.
#[test]
fn probe_tells_a_healthy_node_from_a_missing_one() {
    let cluster = Cluster::start("probe", 1, &[]);
    let port = cluster.nodes[0].api_port;
    let probe = |args: &[&str], env_port: Option<u16>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("probe").args(args).env_remove("RAFTKVD_CERT_FILE");
        match env_port {
            Some(p) => cmd.env("RAFTKVD_PORT", p.to_string()),
            None => cmd.env_remove("RAFTKVD_PORT"),
        };
        cmd.output().unwrap()
    };
    let healthy = format!("http://127.0.0.1:{port}/health");
    assert_eq!(probe(&[&healthy], None).status.code(), Some(0));
    assert_eq!(probe(&[], Some(port)).status.code(), Some(0));
    let missing = probe(&[&format!("http://127.0.0.1:{}/health", free_port())], None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("raftkvd probe: GET"));
    let not_found = format!("http://127.0.0.1:{port}/v1/groups/99");
    assert_eq!(probe(&[&not_found], None).status.code(), Some(1));
    assert_eq!(
        probe(&[], None).status.code(),
        Some(2),
        "no URL and no RAFTKVD_PORT"
    );
}
