//! A watch stream (`GET /v1/watch`) read line by line on a thread of its own, for the
//! tests of watches and of the recipes built on them.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::Value;

use super::DEADLINE;

/// A watch stream read line by line on a thread of its own.
pub struct Watcher {
    lines: mpsc::Receiver<Value>,
}

impl Watcher {
    /// Opens `url` and asserts the stream started (200).
    pub fn open(url: &str) -> Watcher {
        let client = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .unwrap();
        let response = client.get(url).send().expect("the watch request");
        assert_eq!(response.status().as_u16(), 200, "{url}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(content_type, "application/x-ndjson");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(response).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).expect("every line is JSON");
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Watcher { lines }
    }

    /// The next line, or None once the stream ended.
    pub fn next_line(&self) -> Option<Value> {
        match self.lines.recv_timeout(DEADLINE) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no line within {DEADLINE:?}"),
        }
    }

    /// Events (puts and deletes) until `done` says enough, or the stream ends; fails the
    /// test if that takes longer than `DEADLINE` (progress lines keep coming meanwhile).
    pub fn events_until(&self, mut done: impl FnMut(&[Value]) -> bool) -> (Vec<Value>, bool) {
        let mut events = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        while !done(&events) {
            assert!(
                Instant::now() < deadline,
                "events still missing after {DEADLINE:?}; got {events:?}"
            );
            match self.next_line() {
                Some(line) if line["type"] == "put" || line["type"] == "delete" => {
                    events.push(line)
                }
                Some(line) if line["type"] == "progress" => {}
                Some(line) => panic!("unexpected line {line}"),
                None => return (events, false),
            }
        }
        (events, true)
    }
}
