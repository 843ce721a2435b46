//! A client request's query string, path and JSON body, as the API parses them.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/membership.rs"]
mod membership;
#[path = "../../src/replica_id.rs"]
mod replica_id;

#[path = "../../src/command.rs"]
mod command;

#[path = "../../src/api/request.rs"]
mod request;

libfuzzer_sys::fuzz_target!(|data: &[u8]| request::check_parsing(data));
