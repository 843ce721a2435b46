//! Security by configuration (issue 13), end to end over real TLS: the walkthrough over
//! HTTPS with mutual TLS between peers, certificates from another CA refused on both
//! ports, operator-only routes (`--admin-cn`), certificates reloaded on SIGHUP, the
//! cluster token that makes URL spelling irrelevant, refused peer traffic that names no
//! cluster, and a "you were removed" answer that is not believed without the leader.
//!
//! Certificates are made at run time by `tls/dev-certs.sh` (the README's script), so the
//! script is tested too.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A CA and its certificates, as `tls/dev-certs.sh` makes them.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make(dir: &Path, name: &str) -> Pki {
        let dir = dir.join(name);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tls/dev-certs.sh");
        let out = Command::new("sh").arg(&script).arg(&dir).output().unwrap();
        assert!(out.status.success(), "dev-certs.sh: {out:?}");
        Pki { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Every TLS flag: HTTPS with client certificates on the client API, mutual TLS
    /// between peers, and `admin` as the only operator.
    fn node_flags(&self) -> Vec<String> {
        let (cert, key, ca) = (
            self.file("node.pem"),
            self.file("node-key.pem"),
            self.file("ca.pem"),
        );
        [
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--client-cert-auth",
            "--trusted-ca-file",
            &ca,
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--admin-cn",
            "admin",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// A client that trusts this CA and presents `who`'s certificate (`None`: none).
    fn client(&self, who: Option<&str>) -> reqwest::blocking::Client {
        let ca = std::fs::read(self.dir.join("ca.pem")).unwrap();
        let mut client = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(15));
        if let Some(who) = who {
            let mut pem = std::fs::read(self.dir.join(format!("{who}.pem"))).unwrap();
            pem.extend(std::fs::read(self.dir.join(format!("{who}-key.pem"))).unwrap());
            client = client.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        client.build().unwrap()
    }
}

fn https(node: &Node, path: &str) -> String {
    node.url(path).replacen("http://", "https://", 1)
}

/// One request; (status, body), or (0, the error with its causes) when no answer came.
fn call(
    client: &reqwest::blocking::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(body) = body {
        req = req.body(body.to_string());
    }
    match req.send() {
        Ok(resp) => (resp.status().as_u16(), resp.text().unwrap_or_default()),
        Err(e) => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            (0, text)
        }
    }
}

/// Nodes 1..=n with https:// peer URLs and `flags`, started, with a leader.
fn tls_cluster(dir: &TempDir, n: u64, flags: &[String]) -> (Vec<Node>, Vec<String>) {
    let urls: Vec<String> = (0..n)
        .map(|_| format!("https://127.0.0.1:{}", free_port()))
        .collect();
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut nodes: Vec<Node> = (1..=n)
        .map(|id| node_spec(&dir.0, id, &urls, &extra, false))
        .collect();
    for node in &mut nodes {
        node.start();
    }
    (nodes, urls)
}

fn logs(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("----- node {} -----\n{}", n.id, n.log_text()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_walkthrough_runs_over_https_with_mutual_tls_and_operator_only_membership() {
    let dir = TempDir::new("tls-walkthrough");
    let pki = Pki::make(&dir.0, "pki");
    let flags = pki.node_flags();
    let (mut nodes, mut urls) = tls_cluster(&dir, 3, &flags);
    let client = pki.client(Some("client"));
    let admin = pki.client(Some("admin"));

    poll_until(
        "a PUT over HTTPS to succeed",
        || call(&client, "PUT", &https(&nodes[0], "my-key"), Some("hello")).0 == 204,
        || logs(&nodes),
    );
    for node in &nodes {
        poll_until(
            "every node to serve the key over HTTPS",
            || call(&client, "GET", &https(node, "my-key"), None) == (200, "hello".into()),
            || logs(&nodes),
        );
    }

    // No certificate, another CA's certificate, or plain HTTP: refused before any route.
    let (code, why) = call(&pki.client(None), "GET", &https(&nodes[0], "my-key"), None);
    assert_eq!(
        code, 0,
        "a client without a certificate was answered: {why}"
    );
    let other = Pki::make(&dir.0, "other");
    let stranger = other.client(Some("admin"));
    let (code, why) = call(&stranger, "GET", &https(&nodes[0], "my-key"), None);
    assert_eq!(code, 0, "another CA's client was answered: {why}");
    let (code, _) = http("GET", &nodes[0].url("my-key"), None);
    assert_ne!(code, 200, "plain HTTP was served on the HTTPS port");

    // Operators only: membership changes need the admin certificate; reads do not.
    urls.push(format!("https://127.0.0.1:{}", free_port()));
    let (code, text) = call(&client, "POST", &https(&nodes[0], "4"), Some(&urls[3]));
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("operators only"), "{text}");
    let (code, text) = call(&client, "DELETE", &https(&nodes[0], "v1/members/3"), None);
    assert_eq!(code, 403, "{text}");
    let (code, text) = call(&client, "GET", &https(&nodes[0], "v1/members"), None);
    assert_eq!(code, 200, "{text}");
    let (code, text) = call(
        &client,
        "POST",
        &https(&nodes[0], "debug/partition"),
        Some(""),
    );
    assert_eq!(code, 403, "{text}");
    // An http:// peer URL is refused when peers speak TLS.
    let (code, text) = call(
        &admin,
        "POST",
        &https(&nodes[0], "4"),
        Some(&urls[3].replace("https", "http")),
    );
    assert_eq!(code, 400, "{text}");
    let (code, text) = call(&admin, "POST", &https(&nodes[0], "4"), Some(&urls[3]));
    assert_eq!(code, 204, "{text}");

    // A group on nodes 1 and 2 only: node 3 serves it by forwarding over the peer
    // port's mutual TLS.
    let (code, text) = call(
        &admin,
        "POST",
        &https(&nodes[0], "v1/groups"),
        Some(r#"{"id": 2, "members": [1, 2]}"#),
    );
    assert_eq!(code, 201, "{text}");
    poll_until(
        "a write to group 2 through node 3",
        || {
            call(
                &client,
                "PUT",
                &https(&nodes[2], "v1/groups/2/kv/g"),
                Some("x"),
            )
            .0 == 200
        },
        || logs(&nodes),
    );
    let (code, text) = call(&client, "GET", &https(&nodes[2], "v1/groups/2/kv/g"), None);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(r#""value":"x""#), "{text}");

    // Node 4 joins over mutual TLS and catches up.
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut fourth = node_spec(&dir.0, 4, &urls, &extra, true);
    fourth.start();
    poll_until(
        "node 4 to serve the key",
        || call(&client, "GET", &https(&fourth, "my-key"), None) == (200, "hello".into()),
        || format!("{}\n{}", logs(&nodes), fourth.log_text()),
    );

    // Node 3 is removed by an operator and shuts itself down.
    let (code, text) = call(&admin, "DELETE", &https(&nodes[0], "3"), None);
    assert_eq!(code, 204, "{text}");
    let status = nodes[2].wait_exit(DEADLINE);
    assert!(status.success(), "node 3 exited with {status}");
    poll_until(
        "a PUT after the removal",
        || call(&client, "PUT", &https(&fourth, "after"), Some("x")).0 == 204,
        || logs(&nodes),
    );
    nodes.push(fourth);
}

#[test]
fn a_node_or_client_with_another_cas_certificate_cannot_join_or_inject_traffic() {
    let dir = TempDir::new("tls-strangers");
    let pki = Pki::make(&dir.0, "pki");
    let other = Pki::make(&dir.0, "other");
    let (nodes, urls) = tls_cluster(&dir, 3, &pki.node_flags());
    let client = pki.client(Some("client"));
    poll_until(
        "a PUT over HTTPS to succeed",
        || call(&client, "PUT", &https(&nodes[0], "k"), Some("v")).0 == 204,
        || logs(&nodes),
    );

    // A node whose certificates come from another CA cannot join in one step.
    let mut intruder = join_via_spec(&dir.0, 4, https(&nodes[0], "").trim_end_matches('/'));
    let peer_port = intruder.peer_url.rsplit(':').next().unwrap().to_string();
    intruder.args[3] = format!("https://127.0.0.1:{peer_port}");
    intruder.args.extend(other.node_flags());
    intruder.start();
    // Well within the 30 s a join keeps retrying: a refused handshake is not retried.
    let status = intruder.wait_exit(Duration::from_secs(20));
    assert!(
        !status.success(),
        "a node with another CA's certificate joined"
    );
    intruder.assert_logged(
        "the TLS handshake with",
        "a refused handshake ends the join",
    );
    let (code, members) = call(&client, "GET", &https(&nodes[0], "v1/members"), None);
    assert_eq!(code, 200);
    assert!(
        !members.contains(&peer_port),
        "the intruder was added: {members}"
    );

    // Raft traffic and snapshot uploads from another CA's certificate, or from no
    // certificate, are refused at the handshake.
    for path in ["raft", "raft/snapshot"] {
        let url = format!("{}/{path}", urls[0]);
        for (who, stranger) in [
            ("another CA", other.client(Some("client"))),
            ("no certificate", pki.client(None)),
        ] {
            let (code, why) = call(&stranger, "POST", &url, Some("garbage"));
            assert_eq!(code, 0, "{who} was answered on /{path}: {why}");
        }
    }
    nodes[0].assert_logged("TLS handshake refused", "refused peers are logged");
    // The cluster never noticed: it still serves.
    let (code, _) = call(&client, "PUT", &https(&nodes[1], "k2"), Some("v2"));
    assert_eq!(code, 204);
}

#[test]
fn certificates_are_reloaded_on_sighup() {
    let dir = TempDir::new("tls-reload");
    let first = Pki::make(&dir.0, "first");
    let second = Pki::make(&dir.0, "second");
    // The client API serves the files in `live`; both CAs' clients may connect.
    let live = dir.0.join("live");
    std::fs::create_dir_all(&live).unwrap();
    for f in ["node.pem", "node-key.pem"] {
        std::fs::copy(first.dir.join(f), live.join(f)).unwrap();
    }
    let cas = format!(
        "{}{}",
        std::fs::read_to_string(first.dir.join("ca.pem")).unwrap(),
        std::fs::read_to_string(second.dir.join("ca.pem")).unwrap()
    );
    std::fs::write(live.join("cas.pem"), cas).unwrap();
    let live_file = |f: &str| live.join(f).to_string_lossy().into_owned();
    let flags = [
        "--cert-file".to_string(),
        live_file("node.pem"),
        "--key-file".into(),
        live_file("node-key.pem"),
        "--client-cert-auth".into(),
        "--trusted-ca-file".into(),
        live_file("cas.pem"),
    ];
    let urls = vec![format!("http://127.0.0.1:{}", free_port())];
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut node = node_spec(&dir.0, 1, &urls, &extra, false);
    node.start();
    // A client trusting only the first CA reaches the node; one trusting the second does not.
    let health_for = |pki: &Pki| {
        call(
            &pki.client(Some("client")),
            "GET",
            &https(&node, "health"),
            None,
        )
        .0
    };
    poll_until(
        "the node to serve its first certificate",
        || health_for(&first) == 200,
        || node.log_text(),
    );
    assert_eq!(health_for(&second), 0);

    // New files, then SIGHUP: the next handshake uses the second CA's certificate.
    for f in ["node.pem", "node-key.pem"] {
        std::fs::copy(second.dir.join(f), live.join(f)).unwrap();
    }
    node.signal("HUP");
    poll_until(
        "the node to serve its new certificate",
        || health_for(&second) == 200,
        || node.log_text(),
    );
    node.assert_logged("reloaded TLS certificates", "a reload is logged");

    // A broken file on reload leaves the certificate in force, and the node running.
    std::fs::write(live.join("node.pem"), "not a certificate").unwrap();
    node.signal("HUP");
    poll_until(
        "the failed reload to be logged",
        || {
            node.log_text()
                .contains("could not reload TLS certificates")
        },
        || node.log_text(),
    );
    assert_eq!(health_for(&second), 200);
}

#[test]
fn with_a_cluster_token_nodes_may_spell_each_others_urls_differently() {
    // Node 1 calls itself 127.0.0.1; nodes 2 and 3 call it localhost.
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let own: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut theirs = own.clone();
    theirs[0] = format!("http://localhost:{}", ports[0]);
    let start = |dir: &TempDir, token: Option<&str>| -> Vec<Node> {
        let mut flags = vec![];
        if let Some(token) = token {
            flags = vec!["--initial-cluster-token", token];
        }
        let mut nodes = vec![node_spec(&dir.0, 1, &own, &flags, false)];
        for id in 2..=3 {
            nodes.push(node_spec(&dir.0, id, &theirs, &flags, false));
        }
        for node in &mut nodes {
            node.start();
        }
        nodes
    };

    // Without a token each spelling makes another cluster id: node 1 is shut out.
    let dir = TempDir::new("token-without");
    let mut nodes = start(&dir, None);
    poll_until(
        "node 1 to be refused as a stranger",
        || logs(&nodes).contains("refusing raft traffic from another cluster"),
        || logs(&nodes),
    );
    for node in &mut nodes {
        node.kill();
    }

    // With one: one cluster; a write on node 1 reaches every node.
    let dir = TempDir::new("token-with");
    let nodes = start(&dir, Some("my-cluster"));
    poll_until(
        "a PUT on node 1",
        || http("PUT", &nodes[0].url("k"), Some(b"v".to_vec())).0 == 204,
        || logs(&nodes),
    );
    for node in &nodes {
        poll_until(
            "every node to serve the key",
            || http("GET", &node.url("k"), None) == (200, "v".into()),
            || logs(&nodes),
        );
    }
    assert!(
        !logs(&nodes).contains("refusing raft traffic"),
        "{}",
        logs(&nodes)
    );
}

#[test]
fn peer_traffic_must_name_this_cluster_and_a_joining_node_adopts_no_strangers_id() {
    let cluster = Cluster::start("cluster-id", 3, &[]);
    let client = reqwest::blocking::Client::new();
    for path in ["raft", "raft/snapshot"] {
        for (header, what) in [
            (None, "without a cluster id"),
            (Some("00000000000000ab"), "from another cluster"),
        ] {
            let mut request = client.post(format!("{}/{path}", cluster.nodes[0].peer_url));
            if let Some(id) = header {
                request = request.header("x-raftkvd-cluster-id", id);
            }
            let answer = request.body("garbage").send().unwrap();
            assert_eq!(answer.status().as_u16(), 412, "/{path} {what}");
        }
    }

    // A node started with --join that no member lists yet adopts no id from whoever
    // calls first.
    let dir = TempDir::new("cluster-id-joiner");
    let lone = lone_joining_node(&dir);
    let answer = client
        .post(format!("{}/raft", lone.peer_url))
        .header("x-raftkvd-cluster-id", "00000000000000ab")
        .body("")
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 503);
    assert!(
        !lone.data_dir.join("cluster-id").exists(),
        "the joining node adopted a stranger's id"
    );
}

#[test]
fn a_removal_that_the_leader_does_not_confirm_is_not_believed() {
    // "Node 3" is an impostor that answers every request 410 Gone, with the cluster id
    // the request carried: nodes 1 and 2 must keep running and serving.
    let impostor = TcpListener::bind("127.0.0.1:0").unwrap();
    let impostor_url = format!("http://{}", impostor.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in impostor.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let cluster = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-raftkvd-cluster-id:"))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let body = "node 1 was removed from the cluster";
                let _ = write!(
                    conn,
                    "HTTP/1.1 410 Gone\r\nx-raftkvd-cluster-id: {cluster}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let dir = TempDir::new("stray-410");
    let urls = vec![
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
        impostor_url,
    ];
    let mut nodes: Vec<Node> = (1..=2)
        .map(|id| node_spec(&dir.0, id, &urls, &[], false))
        .collect();
    for node in &mut nodes {
        node.start();
    }
    poll_until(
        "the stray 410 to be seen (by the leader, which sends to node 3) and disbelieved",
        || nodes.iter().any(|n| n.log_text().contains("not believed")),
        || logs(&nodes),
    );
    poll_until(
        "a PUT on the two real nodes",
        || http("PUT", &nodes[0].url("k"), Some(b"v".to_vec())).0 == 204,
        || logs(&nodes),
    );
    for node in &mut nodes {
        assert!(
            node.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "node {} exited",
            node.id
        );
    }
    assert!(!nodes[0].data_dir.join("REMOVED").exists());
}

#[test]
fn fault_injection_is_refused_on_a_public_address_without_client_certificates() {
    let out = Command::new(BIN)
        .args([
            "--id",
            "1",
            "--cluster",
            "http://127.0.0.1:1",
            "--port",
            "2",
            "--listen-host",
            "0.0.0.0",
            "--enable-fault-injection",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--enable-fault-injection") && stderr.contains("--client-cert-auth"),
        "{stderr}"
    );
    // Incomplete TLS flag sets are refused with a message too.
    let out = Command::new(BIN)
        .args([
            "--id",
            "1",
            "--cluster",
            "https://127.0.0.1:1",
            "--port",
            "2",
            "--peer-cert-file",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--peer-trusted-ca-file"));
}

#[test]
fn a_node_removed_while_down_believes_the_leader_and_exits_when_it_returns() {
    let mut cluster = Cluster::start("removed-while-down", 3, &[]);
    cluster.put_ok(1, "k", "v");
    cluster.node(3).kill();
    let leader = cluster.wait_leader();
    let (code, text) = http("DELETE", &cluster.node(leader).url("3"), None);
    assert_eq!(code, 204, "{text}");
    // Node 3 never applied its removal; the others answer its messages 410, and the
    // leader's view of the cluster confirms it.
    cluster.node(3).start();
    let status = cluster.node(3).wait_exit(DEADLINE);
    assert!(status.success(), "node 3 exited with {status}");
    cluster
        .node(3)
        .assert_logged("the leader confirms it", "node 3 says who told it");
    assert!(cluster.node(3).data_dir.join("REMOVED").exists());
}
