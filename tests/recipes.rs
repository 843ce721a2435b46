//! The README's coordination recipes, run end to end against a real cluster with the
//! same HTTP calls the README makes with curl: leader election, a lock with fencing
//! tokens, and a service registry. Each owner that "dies" simply stops its keepalives.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::watcher::Watcher;
use common::{http, http_json, http_with_timeout, Cluster, DEADLINE};
use serde_json::{json, Value};

/// TTL of the recipes' leases: short, so that a dead owner is noticed quickly.
const TTL: u64 = 2;

/// A lease and the thread that renews it every third of its TTL, until stopped (the
/// owner "dies") or the lease is gone.
struct Owner {
    lease: u64,
    alive: Arc<AtomicBool>,
    renewer: Option<JoinHandle<()>>,
}

impl Owner {
    /// Grants a lease through `base` (a node's client URL, `Node::url("")`) and starts
    /// renewing it: `curl -XPOST .../v1/leases -d '{"ttl_seconds": 2}'`, then
    /// `curl -XPOST .../v1/leases/$LEASE/keepalive` in a loop.
    fn start(base: &str) -> Owner {
        let (code, answer) = http_json(
            "POST",
            &format!("{base}v1/leases"),
            Some(json!({ "ttl_seconds": TTL })),
        );
        assert_eq!(code, 201, "{answer}");
        let lease = answer["id"].as_u64().unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        let keepalive = format!("{base}v1/leases/{lease}/keepalive");
        let still = alive.clone();
        let renewer = std::thread::spawn(move || {
            while still.load(Ordering::Relaxed) {
                let (code, _) = http("POST", &keepalive, None);
                if code == 404 {
                    return; // the lease is gone: this owner lost whatever it held
                }
                std::thread::sleep(Duration::from_millis(TTL * 1000 / 3));
            }
        });
        Owner {
            lease,
            alive,
            renewer: Some(renewer),
        }
    }

    /// The owner dies: no keepalive after this returns.
    fn die(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        if let Some(renewer) = self.renewer.take() {
            renewer.join().unwrap();
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// Creates `key` only if it does not exist, attached to `lease`:
/// `curl -XPUT ".../v1/kv/<key>?if_revision=0&lease=$LEASE" -d <value>`. Ok(revision)
/// if created, Err(revision of the key that is there) if not.
fn create_if_absent(base: &str, key: &str, value: &str, lease: u64) -> Result<u64, u64> {
    let url = format!("{base}v1/kv/{key}?if_revision=0&lease={lease}");
    let (code, answer) = http_json("PUT", &url, Some(json!({ "value": value })));
    let revision = answer["revision"].as_u64().unwrap_or(0);
    match code {
        200 => Ok(revision),
        412 => Err(revision),
        other => panic!("create {key}: {other} {answer}"),
    }
}

/// Waits for the next change of `key` after `revision`:
/// `curl ".../v1/kv/<key>?wait=true&after_revision=<revision>"`.
fn wait_for_change(base: &str, key: &str, revision: u64) -> Value {
    let timeout = DEADLINE.as_millis();
    let url = format!("{base}v1/kv/{key}?wait=true&after_revision={revision}&timeout_ms={timeout}");
    let (code, text) = http_with_timeout("GET", &url, None, DEADLINE + Duration::from_secs(5));
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Leader election: each candidate creates the leader key with its lease if absent; the
/// one that did leads while it renews its lease; the others wait for the key to change
/// and try again. When the leader dies, its key expires and a waiting candidate takes
/// over; the dead leader's next keepalive tells it it lost.
#[test]
fn leader_election_with_a_lease_a_create_if_absent_and_a_wait() {
    let cluster = Cluster::start("recipe-election", 3, &[]);
    cluster.wait_leader();
    let (a_url, b_url) = (cluster.nodes[0].url(""), cluster.nodes[2].url(""));
    let key = "election/leader";

    let mut a = Owner::start(&a_url);
    let won = create_if_absent(&a_url, key, "a", a.lease).expect("a is first");
    let b = Owner::start(&b_url);
    let held_at = create_if_absent(&b_url, key, "b", b.lease).expect_err("a leads");
    assert_eq!(held_at, won);

    // b waits for the key to change; a stays leader as long as it renews.
    let waiting = {
        let b_url = b_url.clone();
        std::thread::spawn(move || wait_for_change(&b_url, key, held_at))
    };
    std::thread::sleep(Duration::from_secs(2 * TTL));
    assert!(!waiting.is_finished(), "a's renewals keep its key");
    a.die();
    let change = waiting.join().unwrap();
    assert_eq!(change["type"], "delete", "{change}");
    let took_over = create_if_absent(&b_url, key, "b", b.lease).expect("b takes over");
    assert!(took_over > won);
    let (code, leader) = http_json("GET", &format!("{a_url}v1/kv/{key}"), None);
    assert_eq!((code, &leader["value"]), (200, &json!("b")), "{leader}");
    let keepalive = format!("{a_url}v1/leases/{}/keepalive", a.lease);
    assert_eq!(http("POST", &keepalive, None).0, 404, "a learns it lost");
}

/// The resource a lock protects, as a fencing-token aware service keeps it: it takes a
/// write only with a token at least as high as any it has seen.
#[derive(Default)]
struct FencedResource {
    highest: u64,
    writes: Vec<(u64, &'static str)>,
}

impl FencedResource {
    fn write(&mut self, token: u64, what: &'static str) -> bool {
        if token < self.highest {
            return false;
        }
        self.highest = token;
        self.writes.push((token, what));
        true
    }
}

/// A lock with fencing: the lock is a key created if absent with the holder's lease; the
/// revision it was created at is the fencing token. A holder that stalls past its TTL
/// loses the lock to the next one, whose token is higher, so the resource refuses the
/// stalled holder's late write.
#[test]
fn a_lock_with_a_lease_hands_out_increasing_fencing_tokens() {
    let cluster = Cluster::start("recipe-lock", 3, &[]);
    cluster.wait_leader();
    let (one_url, two_url) = (cluster.nodes[1].url(""), cluster.nodes[2].url(""));
    let lock = "locks/printer";
    let mut resource = FencedResource::default();

    let mut one = Owner::start(&one_url);
    let token_one = create_if_absent(&one_url, lock, "one", one.lease).expect("free");
    assert!(resource.write(token_one, "one: first page"));

    let two = Owner::start(&two_url);
    let held_at = create_if_absent(&two_url, lock, "two", two.lease).expect_err("held");
    // One stalls (a long pause): its lease expires, and two gets the lock.
    one.die();
    let change = wait_for_change(&two_url, lock, held_at);
    assert_eq!(change["type"], "delete", "{change}");
    let token_two = create_if_absent(&two_url, lock, "two", two.lease).expect("freed");
    assert!(token_two > token_one, "{token_two} > {token_one}");
    assert!(resource.write(token_two, "two: its page"));
    assert!(
        !resource.write(token_one, "one: a late second page"),
        "the stalled holder's token is refused"
    );
    // A holder checks it still holds the lock: the key's revision is its token.
    let (_, held) = http_json("GET", &format!("{one_url}v1/kv/{lock}"), None);
    assert_eq!(held["revision"], token_two);
    // Unlock: revoking the lease deletes the key.
    let (code, _) = http("DELETE", &format!("{two_url}v1/leases/{}", two.lease), None);
    assert_eq!(code, 200);
    assert_eq!(http("GET", &format!("{one_url}v1/kv/{lock}"), None).0, 404);
    assert_eq!(resource.writes.len(), 2);
}

/// A service registry: each instance registers a key under a prefix with its own lease
/// and renews it; a watcher of the prefix sees instances come and go: one that dies
/// disappears within its TTL, one that leaves revokes its lease.
#[test]
fn a_service_registry_of_leased_keys_under_a_watched_prefix() {
    let cluster = Cluster::start("recipe-registry", 3, &[]);
    cluster.wait_leader();
    let base = cluster.nodes[0].url("");
    let watcher = Watcher::open(&cluster.nodes[1].url("v1/watch?prefix=services/web/"));
    let mut instances: Vec<Owner> = (1..=3).map(|_| Owner::start(&base)).collect();
    for (i, instance) in instances.iter().enumerate() {
        let url = format!("{base}v1/kv/services/web/{i}?lease={}", instance.lease);
        let address = format!("http://10.0.0.{i}:8080");
        assert_eq!(http("PUT", &url, Some(address.into_bytes())).0, 200);
    }
    let (events, _) = watcher.events_until(|seen| seen.len() >= 3);
    assert!(events.iter().all(|e| e["type"] == "put"), "{events:?}");
    let (_, listed) = http_json("GET", &format!("{base}v1/kv?prefix=services/web/"), None);
    assert_eq!(listed["items"].as_array().unwrap().len(), 3, "{listed}");

    instances[1].die();
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(
        (&events[0]["type"], &events[0]["key"]),
        (&json!("delete"), &json!("services/web/1"))
    );
    let lease = instances[2].lease;
    assert_eq!(
        http("DELETE", &format!("{base}v1/leases/{lease}"), None).0,
        200
    );
    let (events, _) = watcher.events_until(|seen| !seen.is_empty());
    assert_eq!(
        (&events[0]["type"], &events[0]["key"]),
        (&json!("delete"), &json!("services/web/2"))
    );
    let (_, listed) = http_json("GET", &format!("{base}v1/kv?prefix=services/web/"), None);
    let items = listed["items"].as_array().unwrap();
    assert_eq!(
        (items.len(), &items[0]["key"]),
        (1, &json!("services/web/0")),
        "{listed}"
    );
}
