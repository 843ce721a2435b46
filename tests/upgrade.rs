//! Upgrades: a data dir written by the previous release starts under this build and
//! serves all its data, then takes new writes and survives a restart.

mod common;

use std::path::Path;

use common::{free_port, http, node_spec, poll_until, TempDir};

/// The fixture's README says how it was made and what it holds.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v0.1.0-87b80d9/node1"
);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_data_dir_of_the_previous_release_starts_and_serves_its_data() {
    let dir = TempDir::new("upgrade");
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut node = node_spec(&dir.0, 1, &[peer], &[], false);
    copy_dir(Path::new(FIXTURE), &node.data_dir);
    node.start();
    // The old log ended at revision 47; the new leader's empty entry takes 48.
    poll_until(
        "the upgraded node to lead and apply its first entry",
        || {
            node.status()
                .is_some_and(|s| s["role"] == "Leader" && s["revision"] == 48)
        },
        || node.log_text(),
    );
    assert_eq!(http("GET", &node.url("key0"), None), (200, "value0".into()));
    assert_eq!(
        http("GET", &node.url("key35"), None),
        (200, "value35".into())
    );
    assert_eq!(http("GET", &node.url("after5"), None), (200, "a5".into()));
    assert_eq!(http("GET", &node.url("key3"), None).0, 404);
    let (code, body) = http("GET", &node.url("v1/kv/hello"), None);
    assert_eq!(code, 200, "{body}");
    let hello: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hello["value"], "world2");
    assert_eq!(hello["revision"], 47);
    let (code, body) = http("GET", &node.url("v1/kv/key35"), None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""revision":40"#), "{body}");

    // New writes land after the old ones, and the whole map survives a restart.
    let (code, body) = http("PUT", &node.url("v1/kv/new"), Some(b"v".to_vec()));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""revision":49"#), "{body}");
    node.signal("TERM");
    assert!(
        node.wait_exit(common::DEADLINE).success(),
        "{}",
        node.log_text()
    );
    node.start();
    poll_until(
        "the restarted node to serve the new key",
        || http("GET", &node.url("new"), None) == (200, "v".into()),
        || node.log_text(),
    );
    assert_eq!(http("GET", &node.url("key1"), None), (200, "value1".into()));
}
