//! Backup and restore (`GET /v1/backup`, `POST /v1/restore`): a backup of a one-shard
//! cluster, taken from any node, restores into a cluster of eight shards, with binary
//! values, leases and a group an operator created; a damaged or oversized backup writes
//! nothing. Real processes, real HTTP, real disk.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{http, http_json, Cluster};
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `GET /v1/backup` until a 200 (retrying 503s while groups elect leaders).
fn backup(cluster: &Cluster, via: u64) -> Vec<u8> {
    let url = cluster.nodes[via as usize - 1].url("v1/backup");
    let mut file = Vec::new();
    cluster.wait_until(&format!("a backup from node {via}"), || {
        let answer = client().get(&url).send().unwrap();
        let code = answer.status().as_u16();
        let kind = answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        let body = answer.bytes().unwrap().to_vec();
        assert!(code == 200 || code == 503, "GET {url}: {code} {body:?}");
        if code == 200 {
            assert_eq!(kind, "application/octet-stream");
        }
        file = body;
        code == 200
    });
    file
}

/// `POST /v1/restore[query]`: the status and the JSON answer.
fn restore(cluster: &Cluster, via: u64, query: &str, file: &[u8]) -> (u16, Value) {
    let url = cluster.nodes[via as usize - 1].url(&format!("v1/restore{query}"));
    let answer = client().post(&url).body(file.to_vec()).send().unwrap();
    let code = answer.status().as_u16();
    (code, answer.json().unwrap_or(Value::Null))
}

/// A key's raw value, read from node `via`.
fn raw_value(cluster: &Cluster, via: u64, path: &str) -> (u16, Vec<u8>) {
    let url = cluster.nodes[via as usize - 1].url(path);
    let answer = client()
        .get(&url)
        .header("accept", "application/octet-stream")
        .send()
        .unwrap();
    (answer.status().as_u16(), answer.bytes().unwrap().to_vec())
}

/// Whether the cluster holds no key (read from node `via`).
fn is_empty(cluster: &Cluster, via: u64) -> bool {
    let (code, page) = http_json(
        "GET",
        &cluster.nodes[via as usize - 1].url("v1/kv?limit=1"),
        None,
    );
    assert_eq!(code, 200, "{page}");
    page["items"].as_array().unwrap().is_empty()
}

fn put_raw(cluster: &Cluster, via: u64, path: &str, value: &[u8]) {
    let url = cluster.nodes[via as usize - 1].url(path);
    cluster.wait_until(&format!("PUT {path}"), || {
        let (code, body) = http("PUT", &url, Some(value.to_vec()));
        assert!(code == 200 || code == 503, "PUT {url}: {code} {body}");
        code == 200
    });
}

fn create_group(cluster: &Cluster, via: u64, id: u64, members: &[u64]) {
    let url = cluster.nodes[via as usize - 1].url("v1/groups");
    let (code, body) = http_json("POST", &url, Some(json!({"id": id, "members": members})));
    assert_eq!(code, 201, "{body}");
}

#[test]
fn a_backup_of_one_shard_restores_into_eight_with_leases_and_named_groups() {
    let from = Cluster::start("backup-from", 3, &[]);
    // Keys of every size the restoring cluster takes, one value that is not UTF-8.
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..200u64 {
        let value = format!("value-{i}-{}", "x".repeat((i * 13 % 300) as usize));
        expected.insert(format!("k/{i:03}"), value.into_bytes());
    }
    expected.insert("binary".into(), vec![0, 255, 1, 254, 0]);
    for (n, (key, value)) in expected.iter().enumerate() {
        put_raw(&from, 1 + n as u64 % 3, &format!("v1/kv/{key}"), value);
    }
    // Two keys on a lease, and a group an operator made, on nodes 1 and 2 only.
    let (code, lease) = http_json(
        "POST",
        &from.nodes[0].url("v1/leases"),
        Some(json!({"ttl_seconds": 600})),
    );
    assert_eq!(code, 201, "{lease}");
    let lease = lease["id"].as_u64().unwrap();
    for key in ["session/a", "session/b"] {
        put_raw(&from, 2, &format!("v1/kv/{key}?lease={lease}"), b"alive");
    }
    create_group(&from, 1, 50, &[1, 2]);
    put_raw(&from, 1, "v1/groups/50/kv/named", b"in group 50");
    // A value too large for the restoring cluster's --max-value-bytes 4096: first in the
    // backup, then deleted.
    put_raw(&from, 1, "v1/kv/huge", &vec![b'h'; 6000]);
    // Node 3 does not host group 50: its backup asks a node that does.
    let with_huge = backup(&from, 3);
    let (code, body) = http("DELETE", &from.nodes[0].url("v1/kv/huge"), None);
    assert_eq!(code, 200, "{body}");
    let file = backup(&from, 3);

    let to = Cluster::start(
        "backup-to",
        3,
        &[
            "--shards",
            "8",
            "--replicas",
            "2",
            "--max-value-bytes",
            "4096",
        ],
    );
    // What must never be written: something else, a damaged backup, a too-large value.
    let (code, answer) = restore(&to, 1, "", b"{\"k\": \"v\"}");
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("RKVDBACK"),
        "{answer}"
    );
    let mut damaged = file.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    let (code, answer) = restore(&to, 1, "", &damaged);
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("checksum"),
        "{answer}"
    );
    let (code, answer) = restore(&to, 1, "", &with_huge);
    assert_eq!(code, 413, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("\"huge\""),
        "{answer}"
    );
    // Group 50 is an operator's: the restoring cluster must have it first.
    let (code, answer) = restore(&to, 1, "", &file);
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("group 50"),
        "{answer}"
    );
    assert!(is_empty(&to, 2), "a refused restore wrote keys");

    // Through node 3, which hosts only some of the eight shards: the rest are written
    // by a node that hosts them, in chunks of at most 4 KiB.
    create_group(&to, 1, 50, &[1, 3]);
    let (code, answer) = restore(&to, 3, "", &file);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["keys"], expected.len() + 3, "{answer}");
    // One lease for each shard its two keys landed in.
    let granted = answer["leases"].as_u64().unwrap();
    assert!((1..=2).contains(&granted), "{answer}");
    let groups: Vec<u64> = serde_json::from_value(answer["groups"].clone()).unwrap();
    assert!(groups.len() >= 7 && groups.contains(&50), "{answer}");

    for (n, (key, value)) in expected.iter().enumerate() {
        let via = 1 + n as u64 % 3;
        let (code, got) = raw_value(&to, via, &format!("v1/kv/{key}"));
        assert_eq!((code, &got), (200, value), "{key} from node {via}");
    }
    let (code, got) = raw_value(&to, 2, "v1/groups/50/kv/named");
    assert_eq!((code, got.as_slice()), (200, &b"in group 50"[..]));
    let (code, got) = raw_value(&to, 1, "v1/kv/huge");
    assert_eq!(code, 404, "{got:?}");

    // The leased keys are on a new lease with the old TTL; revoking it deletes them.
    let (code, session) = http_json("GET", &to.nodes[1].url("v1/kv/session/a"), None);
    assert_eq!(code, 200, "{session}");
    let (code, listed) = http_json("GET", &to.nodes[0].url("v1/leases"), None);
    assert_eq!(code, 200, "{listed}");
    let leases = listed["leases"].as_array().unwrap();
    let with_keys: Vec<&Value> = leases.iter().filter(|l| l["key_count"] != 0).collect();
    let keys: u64 = with_keys
        .iter()
        .map(|l| l["key_count"].as_u64().unwrap())
        .sum();
    assert_eq!(keys, 2, "{listed}");
    assert_eq!(with_keys.len() as u64, granted, "{listed}");
    for restored in &with_keys {
        assert_eq!(restored["granted_ttl_seconds"], 600, "{listed}");
        assert_ne!(restored["id"], lease, "a restored lease keeps no old id");
        let url = to.nodes[2].url(&format!("v1/leases/{}", restored["id"]));
        let (code, body) = http("DELETE", &url, None);
        assert_eq!(code, 200, "{body}");
    }
    for key in ["session/a", "session/b"] {
        let (code, body) = http("GET", &to.nodes[0].url(&format!("v1/kv/{key}")), None);
        assert_eq!(code, 404, "{key}: {body}");
    }

    // A second restore is refused, unless it merges: puts overwrite, so the keys end as
    // in the file.
    let (code, answer) = restore(&to, 2, "", &file);
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("merge"),
        "{answer}"
    );
    put_raw(&to, 1, "v1/kv/k/000", b"changed");
    let (code, answer) = restore(&to, 2, "?merge=true", &file);
    assert_eq!(code, 200, "{answer}");
    let (code, got) = raw_value(&to, 3, "v1/kv/k/000");
    assert_eq!((code, &got), (200, &expected["k/000"]));

    // A backup of the eight shards holds the same keys, and restores into one.
    let again = backup(&to, 1);
    let one = Cluster::start("backup-one", 1, &[]);
    let (code, answer) = restore(&one, 1, "", &again);
    assert_eq!(code, 409, "group 50 is missing: {answer}");
    create_group(&one, 1, 50, &[1]);
    let (code, answer) = restore(&one, 1, "", &again);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["keys"], expected.len() + 3, "{answer}");
    let (code, got) = raw_value(&one, 1, "v1/kv/binary");
    assert_eq!((code, &got), (200, &expected["binary"]));
}
