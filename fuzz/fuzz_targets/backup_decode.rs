//! Backup files, as `POST /v1/restore` reads them from any client.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/backup.rs"]
mod backup;

libfuzzer_sys::fuzz_target!(|data: &[u8]| backup::check_decoding(data));
