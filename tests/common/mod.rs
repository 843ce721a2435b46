//! Test harness: runs real `raftkvd` processes on free local ports with their own data
//! directories, talks to them over real HTTP, and waits by polling with deadlines.
//! Each test binary includes this module; not every binary uses every helper.
#![allow(dead_code)]

pub mod watcher;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_raftkvd");
/// Generous: CI machines have two cores shared by several clusters.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Ports handed out in this process, so parallel tests never share one.
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that is free now, chosen below Linux's ephemeral range (32768+) so that the
/// kernel does not hand it to an outgoing connection before the node binds it.
pub fn free_port() -> u16 {
    let mut used = USED_PORTS.lock().unwrap();
    let used = used.get_or_insert_with(HashSet::new);
    let mut candidate = 20000 + (std::process::id() as u16 % 100) * 120;
    loop {
        candidate = if candidate >= 32000 {
            20000
        } else {
            candidate + 1
        };
        if used.contains(&candidate) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            used.insert(candidate);
            return candidate;
        }
    }
}

/// A directory under the system temp dir, removed when the test passes.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "raftkvd-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept test files in {}", self.0.display());
        }
    }
}

/// One raftkvd process (or the command to start it again).
pub struct Node {
    pub id: u64,
    pub api_port: u16,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// Extra environment for the process (fault-injection shims).
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.api_port,
            path.trim_start_matches('/')
        )
    }

    /// The value of the unlabelled series `name` in the node's `/metrics` (None if the
    /// node does not answer 200 or has no such series).
    pub fn metric(&self, name: &str) -> Option<u64> {
        let (code, text) = http("GET", &self.url("metrics"), None);
        if code != 200 {
            return None;
        }
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|value| value.trim().parse().ok())
    }

    /// Starts the process with its recorded arguments; its stderr is appended to its log.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn raftkvd");
        self.child = Some(child);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {} did not exit within {within:?}\n{}",
                    self.id,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test unless this node's log contains `needle`.
    pub fn assert_logged(&self, needle: &str, why: &str) {
        let log = self.log_text();
        assert!(log.contains(needle), "node {}: {why}\n{log}", self.id);
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = http("GET", &self.url("status"), None);
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// A number field of this node's `/status` (the node must answer).
    pub fn status_u64(&self, field: &str) -> u64 {
        let status = self.status().expect("the node answers /status");
        status[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of nodes started like the Procfile: ids 1..=n, one peer URL each.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub dir: TempDir,
}

impl Cluster {
    /// Starts `n` nodes with `extra` flags each and waits until they agree on a leader.
    pub fn start(name: &str, n: usize, extra: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(name, n, extra);
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster.wait_leader();
        cluster
    }

    /// Prepares `n` nodes without starting them.
    pub fn new(name: &str, n: usize, extra: &[&str]) -> Cluster {
        let dir = TempDir::new(name);
        let peer_urls: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
        };
        for id in 1..=n as u64 {
            cluster.add_node_spec(id, &peer_urls, extra, false);
        }
        cluster
    }

    /// Records (does not start) a node with `--cluster peer_urls`, `--join` if asked.
    pub fn add_node_spec(&mut self, id: u64, peer_urls: &[String], extra: &[&str], join: bool) {
        let node = node_spec(&self.dir.0, id, peer_urls, extra, join);
        self.nodes.push(node);
    }

    /// Adds node `id` (the next id: ids are positions in `--cluster`) through node `via`
    /// with `POST /<id>`, then starts it with `--join` and the grown `--cluster` list.
    pub fn add_member(&mut self, id: u64, via: u64, extra: &[&str]) {
        assert_eq!(
            id as usize,
            self.nodes.len() + 1,
            "node ids are positions in --cluster"
        );
        let mut urls: Vec<String> = self.nodes.iter().map(|n| n.peer_url.clone()).collect();
        urls.push(format!("http://127.0.0.1:{}", free_port()));
        let url = self.node(via).url(&id.to_string());
        let (code, text) = http(
            "POST",
            &url,
            Some(urls[id as usize - 1].clone().into_bytes()),
        );
        assert_eq!(code, 204, "POST /{id} on node {via}: {text}");
        self.add_node_spec(id, &urls, extra, true);
        self.node(id).start();
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id")
    }

    pub fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// Waits until every running node reports the same leader, itself running; returns it.
    pub fn wait_leader(&self) -> u64 {
        let mut leader = 0;
        self.wait_until("the running nodes to agree on a leader", || {
            let leaders: HashSet<u64> = self
                .running()
                .map(|n| n.status().map_or(0, |s| s["leader"].as_u64().unwrap()))
                .collect();
            leader = *leaders.iter().next().unwrap_or(&0);
            leaders.len() == 1 && leader != 0 && self.running().any(|n| n.id == leader)
        });
        leader
    }

    /// Fails the test unless every running node answers `/health` with 200.
    pub fn assert_every_node_serves(&self) {
        for node in self.running() {
            let (code, _) = http("GET", &node.url("health"), None);
            assert_eq!(
                code,
                200,
                "node {} must serve\n{}",
                node.id,
                node.log_text()
            );
        }
    }

    /// Polls `cond` until it holds, or fails the test with every node's log.
    pub fn wait_until(&self, what: &str, cond: impl FnMut() -> bool) {
        poll_until(what, cond, || self.logs());
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("----- node {} log -----\n{}", n.id, tail(&n.log_text(), 60)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// PUTs until a 204 (retrying 503s while a leader is elected); fails after the deadline.
    pub fn put_ok(&self, id: u64, key: &str, value: &str) {
        let node = self.nodes.iter().find(|n| n.id == id).unwrap();
        let mut last = (0, String::new());
        self.wait_until(&format!("PUT {key} on node {id} to succeed"), || {
            last = http("PUT", &node.url(key), Some(value.as_bytes().to_vec()));
            assert!(
                last.0 == 204 || last.0 == 503,
                "PUT {key} on node {id}: unexpected {last:?}"
            );
            last.0 == 204
        });
    }

    /// Waits until node `id` serves `value` for `key`.
    pub fn wait_value(&self, id: u64, key: &str, value: &str) {
        let node = self.nodes.iter().find(|n| n.id == id).unwrap();
        self.wait_until(&format!("node {id} to serve {key}={value}"), || {
            http("GET", &node.url(key), None) == (200, value.to_string())
        });
    }
}

/// Polls `cond` every 50 ms until it holds; after `DEADLINE` fails the test, showing
/// `context()`.
pub fn poll_until(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node (not started) with its data dir and log under `dir`, a free client port, and
/// `--cluster peer_urls`; `--join` if asked.
pub fn node_spec(dir: &Path, id: u64, peer_urls: &[String], extra: &[&str], join: bool) -> Node {
    let api_port = free_port();
    let data_dir = dir.join(format!("n{id}"));
    let mut args = vec![
        "--id".to_string(),
        id.to_string(),
        "--cluster".into(),
        peer_urls.join(","),
        "--port".into(),
        api_port.to_string(),
        "--data-dir".into(),
        data_dir.to_string_lossy().into_owned(),
    ];
    if join {
        args.push("--join".into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Node {
        id,
        api_port,
        peer_url: peer_urls[id as usize - 1].clone(),
        data_dir,
        args,
        log: dir.join(format!("n{id}.log")),
        env: Vec::new(),
        child: None,
    }
}

/// A node started with `--join` that no cluster ever added: alive, but it knows no
/// leader. Returns once it answers HTTP.
pub fn lone_joining_node(dir: &TempDir) -> Node {
    let peers = [free_port(), free_port()].map(|p| format!("http://127.0.0.1:{p}"));
    let mut node = node_spec(&dir.0, 2, &peers, &[], true);
    node.start();
    poll_until(
        "the lone node to answer",
        || http("GET", &node.url("health"), None).0 == 200,
        || node.log_text(),
    );
    node
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One HTTP request; returns (status, body), or (0, error) if no answer came.
pub fn http(method: &str, url: &str, body: Option<Vec<u8>>) -> (u16, String) {
    http_with_timeout(method, url, body, Duration::from_secs(15))
}

pub fn http_with_timeout(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> (u16, String) {
    let (code, body, _) = http_with_headers(method, url, body, timeout, &[]);
    (code, body)
}

/// The same, with the values of the answer's headers `names` ("" for one it lacks).
pub fn http_with_headers(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
    names: &[&str],
) -> (u16, String, Vec<String>) {
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .unwrap();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(body) = body {
        req = req.body(body);
    }
    match req.send() {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let values = names
                .iter()
                .map(|name| {
                    resp.headers()
                        .get(*name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            (code, resp.text().unwrap_or_default(), values)
        }
        Err(e) => (0, e.to_string(), Vec::new()),
    }
}

/// One request with an optional JSON body; returns the status and the parsed JSON answer
/// (Null if the body is not JSON, or no answer came).
pub fn http_json(
    method: &str,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| serde_json::to_vec(&b).unwrap());
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    match req.send() {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let text = resp.text().unwrap_or_default();
            (
                code,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            )
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// A node (not started) that joins in one step: `--join-via via_api --peer-url <fresh>`,
/// without `--cluster`.
pub fn join_via_spec(dir: &Path, id: u64, via_api: &str) -> Node {
    let api_port = free_port();
    let peer_url = format!("http://127.0.0.1:{}", free_port());
    let data_dir = dir.join(format!("n{id}"));
    let args = vec![
        "--id".to_string(),
        id.to_string(),
        "--peer-url".into(),
        peer_url.clone(),
        "--join-via".into(),
        via_api.to_string(),
        "--port".into(),
        api_port.to_string(),
        "--data-dir".into(),
        data_dir.to_string_lossy().into_owned(),
    ];
    Node {
        id,
        api_port,
        peer_url,
        data_dir,
        args,
        log: dir.join(format!("n{id}.log")),
        env: Vec::new(),
        child: None,
    }
}
