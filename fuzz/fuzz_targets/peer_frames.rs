//! A peer's raft message stream, as the transport reads it off the socket.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/peer_frame.rs"]
mod peer_frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| peer_frame::check_decoding(data));
