//! Raft log entries and conf-change contexts, as a member reads them from the log.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/command.rs"]
mod command;

libfuzzer_sys::fuzz_target!(|data: &[u8]| command::check_decoding(data));
