//! Hostile input on both ports and what must survive it: a panic stops the process
//! loudly, forged raft frames and abusive snapshot uploads are refused without stopping
//! the node, and malformed or idle HTTP connections cannot wedge the client port.

mod common;

use std::time::Duration;

use common::{http, Cluster};

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
