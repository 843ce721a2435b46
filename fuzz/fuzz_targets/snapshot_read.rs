//! Snapshot files, as a node reads them at start-up or after an upload.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../src/command.rs"]
mod command;
#[path = "../../src/durable.rs"]
mod durable;
#[path = "../../src/kv.rs"]
mod kv;
#[path = "../../src/leases.rs"]
mod leases;
#[path = "../../src/membership.rs"]
mod membership;
#[path = "../../src/replica_id.rs"]
mod replica_id;
#[path = "../../src/record.rs"]
mod record;
#[path = "../../src/snapshot.rs"]
mod snapshot;
#[path = "../../src/history.rs"]
mod history;
#[path = "../../src/watch_hub.rs"]
mod watch_hub;

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapshot::check_reading(data));
