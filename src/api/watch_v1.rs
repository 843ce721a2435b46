//! Watches: `GET /v1/watch?prefix=<p>` (or `key=<k>`) streams the changes of the keys as
//! newline-delimited JSON, and `GET /v1/kv/<key>?wait=true&after_revision=<n>` answers
//! once that key changes after revision n (a long poll, for scripts that cannot read a
//! stream).
//!
//! Events come from the history of each watched group's replica on this node
//! (`history.rs`): every replica applies the same entries at the same revisions, so a
//! watch on a follower is as complete as on the leader, and a client that reconnects
//! anywhere with the revision after the last it saw gets exactly the rest. Revisions are
//! per group: each event names its group, a progress line every few seconds says how far
//! each group's events have been sent, and `start_revision` takes one revision for
//! every group or `<group>:<revision>` pairs. A start older than a group's history is
//! answered 410 with the oldest revision still there, and a stream whose group can no
//! longer give it the next events (its history was replaced by a snapshot, or the
//! replica left this node) ends with an error line: never a silent gap. A watch never
//! holds a lock while it waits, and never makes the raft loop wait for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, watch, Mutex};

use super::request::{number_param, parse_query, Failure};
use super::{json_response, Api, Reply};
use crate::history::Event;
use crate::kv::SharedKv;
use crate::response_body::ResponseBody;
use crate::router::CLUSTER_GROUP;

/// The path of the stream.
pub const WATCH_PATH: &str = "/v1/watch";
/// How often a stream says how far it got, unless the request asks otherwise.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Events looked up under the map's lock at a time.
const EVENTS_PER_READ: usize = 256;
/// Chunks a stream may have waiting for a slow client before its groups wait too.
const STREAM_BUFFER: usize = 64;
/// A long poll's default and longest wait.
pub(super) const WAIT_DEFAULT: Duration = Duration::from_secs(60);
pub(super) const WAIT_LONGEST: Duration = Duration::from_secs(600);

/// Which keys a watch follows.
#[derive(Clone)]
enum Keys {
    One(Bytes),
    Prefix(Bytes),
}

impl Keys {
    fn matches(&self, key: &[u8]) -> bool {
        match self {
            Keys::One(one) => key == &one[..],
            Keys::Prefix(prefix) => key.starts_with(prefix),
        }
    }
}

impl Api {
    /// Answers one request on the client port: a watch streams, anything else is
    /// answered whole (`handle`).
    pub async fn handle_client(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        if req.uri().path() != WATCH_PATH {
            return self.handle(req).await.map(ResponseBody::from);
        }
        let method = req.method().clone();
        let started = std::time::Instant::now();
        let response = match self.watch(req).await {
            Ok(stream) => stream,
            Err(failure) => self
                .failure_response(&method, WATCH_PATH, failure)
                .map(ResponseBody::from),
        };
        self.metrics
            .request_done("watch", response.status().as_u16(), started.elapsed());
        response
    }

    /// `GET /v1/watch`: checks the request and every start position, then streams.
    async fn watch(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Failure> {
        if req.method() != Method::GET {
            return Err(Failure::method_not_allowed(req.method(), "GET"));
        }
        let params = parse_query(
            req.uri().query(),
            &["key", "prefix", "start_revision", "progress_ms"],
        )?;
        let keys = match (params.get("key"), params.get("prefix")) {
            (Some(key), None) if !key.is_empty() => Keys::One(Bytes::from(key.clone())),
            (None, Some(prefix)) => Keys::Prefix(Bytes::from(prefix.clone())),
            _ => {
                return Err(Failure::bad_request(
                    "name the keys to watch: key=<key> or prefix=<prefix> (prefix= for all)",
                ))
            }
        };
        let progress_every = match number_param(&params, "progress_ms")? {
            None => PROGRESS_EVERY,
            Some(ms) if (100..=600_000).contains(&ms) => Duration::from_millis(ms),
            Some(_) => return Err(Failure::bad_request("progress_ms must be 100..=600000")),
        };
        let starts = parse_starts(params.get("start_revision").map(String::as_str))?;
        self.settle_shards(None).await?;
        let groups = self.groups_of(&keys);
        if let Some(unknown) = starts.per_group.keys().find(|g| !groups.contains(g)) {
            return Err(Failure::bad_request(format!(
                "start_revision names group {unknown}, which holds none of these keys (groups: {groups:?})"
            )));
        }
        let mut followed = Vec::new();
        for group in groups {
            let Some(kv) = self.router.serving(group) else {
                return Err(Failure::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "group {group} holds some of these keys and has no replica on this node; \
                         watch on a node that hosts it (GET /v1/groups/{group} lists them)"
                    ),
                ));
            };
            let from = {
                let kv = kv.read().unwrap();
                let from = starts.of(group).unwrap_or(kv.revision() + 1);
                if from < kv.history().first() {
                    return Err(Failure {
                        revision: Some(kv.history().first()),
                        ..Failure::new(
                            StatusCode::GONE,
                            format!(
                                "group {group}'s events from revision {from} on are no longer \
                                 kept here; the oldest still kept is {} (in \"revision\")",
                                kv.history().first()
                            ),
                        )
                    });
                }
                from
            };
            followed.push((group, kv, from));
        }
        let (out, body) = mpsc::channel(STREAM_BUFFER);
        let sent: Sent = Arc::new(Mutex::new(
            followed.iter().map(|(g, _, from)| (*g, from - 1)).collect(),
        ));
        let (end, ended) = watch::channel(false);
        let end = Arc::new(end);
        for (group, kv, from) in followed {
            let follower = GroupFollower {
                group,
                kv,
                keys: keys.clone(),
                out: out.clone(),
                sent: sent.clone(),
                end: end.clone(),
                ended: ended.clone(),
                stopping: self.stopping.clone(),
            };
            tokio::spawn(follower.run(from));
        }
        tokio::spawn(report_progress(out, sent, progress_every, ended));
        let mut response = Response::new(ResponseBody::Streamed(body));
        response.headers_mut().insert(
            CONTENT_TYPE,
            "application/x-ndjson"
                .parse()
                .expect("a valid header value"),
        );
        Ok(response)
    }

    /// The groups that hold `keys`: the key's, or for a prefix every group that owns keys.
    fn groups_of(&self, keys: &Keys) -> Vec<u64> {
        match keys {
            Keys::One(key) => vec![self.owner_of(key)],
            Keys::Prefix(_) => {
                let shards = self.membership.read().unwrap().shards.clone();
                if shards.is_empty() {
                    return vec![CLUSTER_GROUP];
                }
                let mut groups = shards;
                groups.sort_unstable();
                groups.dedup();
                groups
            }
        }
    }

    /// `GET .../kv/<key>?wait=true&after_revision=<n>[&timeout_ms=<t>]` on a group this
    /// node hosts: the first change of `key` after revision n, as an event (200), at
    /// once if it happened already; 408 if none comes within the wait; 410 if the
    /// group's history no longer reaches back to n.
    pub(super) async fn wait_for_change(
        &self,
        group: u64,
        key: Bytes,
        query: Option<&str>,
    ) -> Reply {
        let params = parse_query(query, &["wait", "after_revision", "timeout_ms"])?;
        if params.get("wait").map(String::as_str) != Some("true") {
            return Err(Failure::bad_request("wait must be true"));
        }
        let Some(after) = number_param(&params, "after_revision")? else {
            return Err(Failure::bad_request(
                "wait=true needs after_revision=<n>: the revision the change must come after",
            ));
        };
        let wait = match number_param(&params, "timeout_ms")? {
            None => WAIT_DEFAULT,
            Some(ms) if ms > 0 && ms <= WAIT_LONGEST.as_millis() as u64 => {
                Duration::from_millis(ms)
            }
            Some(_) => {
                return Err(Failure::bad_request(format!(
                    "timeout_ms must be 1..={}",
                    WAIT_LONGEST.as_millis()
                )))
            }
        };
        let kv = self.map_of(group)?;
        let keys = Keys::One(key.clone());
        let deadline = tokio::time::Instant::now() + wait;
        let mut from = after + 1;
        loop {
            let (mut changes, found) = {
                let kv = kv.read().unwrap();
                let found = kv
                    .history()
                    .since(from, kv.revision(), |k| keys.matches(k), 1);
                (kv.subscribe(), found)
            };
            match found {
                Err(first) => {
                    return Err(Failure {
                        revision: Some(first),
                        ..Failure::new(
                            StatusCode::GONE,
                            format!(
                                "changes after revision {after} are no longer kept here; the \
                                 oldest still kept is {first} (in \"revision\")"
                            ),
                        )
                    })
                }
                Ok(found) => {
                    if let Some(event) = found.events.first() {
                        return Ok(json_response(StatusCode::OK, &event_json(group, event)));
                    }
                    from = found.next;
                }
            }
            let mut stopping = self.stopping.clone();
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Failure::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("group {group}'s replica left this node; retry"),
                        ));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Failure {
                        revision: Some(from - 1),
                        ..Failure::new(
                            StatusCode::REQUEST_TIMEOUT,
                            format!(
                                "key {:?} did not change within {} ms; ask again with \
                                 after_revision set to \"revision\"",
                                String::from_utf8_lossy(&key),
                                wait.as_millis()
                            ),
                        )
                    });
                }
                _ = stopping.changed() => {
                    return Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down"));
                }
            }
        }
    }
}

/// Where each group's stream starts: `start_revision=<n>` for every group, or
/// `<group>:<n>,...` for each (a group it does not name starts now).
#[derive(Default)]
struct Starts {
    all: Option<u64>,
    per_group: HashMap<u64, u64>,
}

impl Starts {
    fn of(&self, group: u64) -> Option<u64> {
        self.per_group.get(&group).copied().or(self.all)
    }
}

fn parse_starts(text: Option<&str>) -> Result<Starts, Failure> {
    let mut starts = Starts::default();
    let Some(text) = text else {
        return Ok(starts);
    };
    let bad = || {
        Failure::bad_request(format!(
            "start_revision={text:?} is neither a revision (1 or more) nor a list of \
             <group>:<revision>"
        ))
    };
    if !text.contains(':') {
        starts.all = Some(
            text.parse::<u64>()
                .ok()
                .filter(|&r| r > 0)
                .ok_or_else(bad)?,
        );
        return Ok(starts);
    }
    for pair in text.split(',') {
        let (group, revision) = pair.split_once(':').ok_or_else(bad)?;
        let group = group.parse::<u64>().map_err(|_| bad())?;
        let revision = revision
            .parse::<u64>()
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(bad)?;
        if starts.per_group.insert(group, revision).is_some() {
            return Err(bad());
        }
    }
    Ok(starts)
}

/// The last revision of each group whose events have been sent. Whoever sends holds it,
/// so that a progress line never claims events the stream has not carried yet, nor
/// comes after events without counting them.
type Sent = Arc<Mutex<BTreeMap<u64, u64>>>;

/// One group's part of a watch: sends its matching events from `from` on, in revision
/// order, as they are applied here.
struct GroupFollower {
    group: u64,
    kv: SharedKv,
    keys: Keys,
    out: mpsc::Sender<Bytes>,
    sent: Sent,
    /// Ends every part of the watch (one part could not go on).
    end: Arc<watch::Sender<bool>>,
    ended: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
}

impl GroupFollower {
    async fn run(mut self, mut from: u64) {
        loop {
            let (mut changes, found, revision) = {
                let kv = self.kv.read().unwrap();
                let found = kv.history().since(
                    from,
                    kv.revision(),
                    |k| self.keys.matches(k),
                    EVENTS_PER_READ,
                );
                (kv.subscribe(), found, kv.revision())
            };
            let found = match found {
                Ok(found) => found,
                Err(first) => {
                    let why = format!(
                        "this node's replica of group {} no longer has the events from revision \
                         {from} on (it was replaced by a snapshot); the oldest it has is {first}: \
                         watch again from there, or read the keys and watch from the revision after",
                        self.group
                    );
                    return self.fail(StatusCode::GONE, why).await;
                }
            };
            let mut sent = self.sent.lock().await;
            if !found.events.is_empty() {
                let mut chunk = Vec::new();
                for event in &found.events {
                    serde_json::to_writer(&mut chunk, &event_json(self.group, event))
                        .expect("an event always encodes");
                    chunk.push(b'\n');
                }
                if self.out.send(Bytes::from(chunk)).await.is_err() {
                    return; // the client went away
                }
            }
            from = found.next;
            sent.insert(self.group, from - 1);
            drop(sent);
            if from <= revision {
                continue; // more than one read's worth was waiting
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        let why = format!(
                            "this node's replica of group {} left it; watch again elsewhere from \
                             revision {from}", self.group);
                        return self.fail(StatusCode::SERVICE_UNAVAILABLE, why).await;
                    }
                }
                _ = self.out.closed() => return,
                _ = self.ended.changed() => return,
                _ = self.stopping.changed() => {
                    let why = format!("the node is shutting down; watch again elsewhere from revision {from} of group {}", self.group);
                    return self.fail(StatusCode::SERVICE_UNAVAILABLE, why).await;
                }
            }
        }
    }

    /// Ends the whole watch with an error line.
    async fn fail(self, status: StatusCode, why: String) {
        let line = serde_json::json!({
            "type": "error", "group": self.group, "status": status.as_u16(), "error": why,
        });
        let mut chunk = serde_json::to_vec(&line).expect("an error always encodes");
        chunk.push(b'\n');
        let _ = self.out.send(Bytes::from(chunk)).await;
        self.end.send_replace(true);
    }
}

/// Every `every`, a line saying the last revision of each group whose events were sent:
/// a client resumes from the next ones (`start_revision=<group>:<revision + 1>,...`).
async fn report_progress(
    out: mpsc::Sender<Bytes>,
    sent: Sent,
    every: Duration,
    mut ended: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = out.closed() => return,
            _ = ended.changed() => return,
        }
        let sent = sent.lock().await;
        let revisions: BTreeMap<String, u64> = sent
            .iter()
            .map(|(group, revision)| (group.to_string(), *revision))
            .collect();
        let line = serde_json::json!({ "type": "progress", "revisions": revisions });
        let mut chunk = serde_json::to_vec(&line).expect("progress always encodes");
        chunk.push(b'\n');
        if out.send(Bytes::from(chunk)).await.is_err() {
            return;
        }
        drop(sent);
    }
}

/// An event as a watch sends it: `value` for a put (`value_hex` if it is not UTF-8).
fn event_json(group: u64, event: &Event) -> serde_json::Value {
    let mut json = serde_json::json!({
        "type": if event.value.is_some() { "put" } else { "delete" },
        "key": String::from_utf8_lossy(&event.key),
        "revision": event.revision,
        "group": group,
    });
    if let Some(value) = &event.value {
        match std::str::from_utf8(value) {
            Ok(text) => json["value"] = text.into(),
            Err(_) => {
                json["value_hex"] = value
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    .into()
            }
        }
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_revisions_are_one_for_all_or_one_per_group() {
        let starts = parse_starts(Some("7")).ok().unwrap();
        assert_eq!((starts.of(2), starts.of(3)), (Some(7), Some(7)));
        let starts = parse_starts(Some("2:5,3:9")).ok().unwrap();
        assert_eq!(
            (starts.of(2), starts.of(3), starts.of(4)),
            (Some(5), Some(9), None)
        );
        for bad in ["0", "x", "2:0", "2:5,2:6", "2:", ":5", "2:5,"] {
            assert!(parse_starts(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_starts(None).ok().unwrap().of(1), None);
    }
}
