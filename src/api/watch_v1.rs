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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, watch};

use super::forward::FORWARDED_HEADER;
use super::request::{
    number_param, parse_query, repeated_param, Failure, WAIT_DEFAULT, WAIT_LONGEST,
};
use super::watch_stream::{
    event_json, gone, report_progress, GroupFollower, Registration, RemoteFollower, Stream,
    STREAM_BUFFER,
};
use super::{json_response, Api, Reply};
use crate::kv::SharedKv;
use crate::response_body::ResponseBody;
use crate::router::CLUSTER_GROUP;
use crate::watch_hub::Keys;

/// The path of the stream.
pub const WATCH_PATH: &str = "/v1/watch";
/// How often a stream says how far it got, unless the request asks otherwise.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Api {
    /// Answers one request on the client port (and one another node forwarded): a
    /// watch streams, anything else is answered whole (`handle`).
    pub async fn handle_client(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let path = req.uri().path().to_string();
        let Some(only) = watched_group(&path) else {
            return self.handle(req).await.map(ResponseBody::from);
        };
        let method = req.method().clone();
        let started = std::time::Instant::now();
        let response = match self.watch(req, only).await {
            Ok(stream) => stream,
            Err(failure) => self
                .failure_response(&method, &path, failure)
                .map(ResponseBody::from),
        };
        self.metrics
            .request_done("watch", response.status().as_u16(), started.elapsed());
        response
    }

    /// `GET /v1/watch` (every group that holds the keys), or `GET /v1/groups/<g>/watch`
    /// (`only` that group, as a node that does not host it asks one that does): checks
    /// the request and every start position, then streams. A group with no replica here
    /// is followed through a node that hosts it.
    async fn watch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        only: Option<u64>,
    ) -> Result<Response<ResponseBody>, Failure> {
        if req.method() != Method::GET {
            return Err(Failure::method_not_allowed(req.method(), "GET"));
        }
        let params = parse_query(
            req.uri().query(),
            &["key", "prefix", "start_revision", "progress_ms"],
        )?;
        let keys = watched_keys(req.uri().query())?;
        let progress_every = match number_param(&params, "progress_ms")? {
            None => PROGRESS_EVERY,
            Some(ms) if (100..=600_000).contains(&ms) => Duration::from_millis(ms),
            Some(_) => return Err(Failure::bad_request("progress_ms must be 100..=600000")),
        };
        let starts = parse_starts(params.get("start_revision").map(String::as_str))?;
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        if !forwarded {
            self.settle_shards(None).await?;
        }
        let groups = match only {
            Some(group) => {
                let known = group == CLUSTER_GROUP
                    || self.membership.read().unwrap().groups.contains_key(&group);
                if !known && !forwarded {
                    return Err(Failure::new(
                        StatusCode::NOT_FOUND,
                        format!("no raft group {group}"),
                    ));
                }
                vec![group]
            }
            None => self.groups_of(&keys),
        };
        if let Some(unknown) = starts.per_group.keys().find(|g| !groups.contains(g)) {
            return Err(Failure::bad_request(format!(
                "start_revision names group {unknown}, which holds none of these keys (groups: {groups:?})"
            )));
        }
        let (out, body) = mpsc::channel(STREAM_BUFFER);
        let (end, ended) = watch::channel(false);
        let stream = Stream {
            out,
            metrics: self.metrics.clone(),
            sent: Arc::default(),
            end: Arc::new(end),
            ended,
            stopping: self.stopping.clone(),
        };
        let mut parts: Vec<Part> = Vec::new();
        for group in groups {
            match self.router.serving(group) {
                Some(kv) => {
                    let from = {
                        let kv = kv.read().unwrap();
                        let from = starts.of(group).unwrap_or(kv.revision() + 1);
                        if from < kv.history().first() {
                            return Err(gone(group, from, kv.history().first()));
                        }
                        from
                    };
                    parts.push(Part::Local(group, kv, from));
                }
                None if forwarded => return Err(Failure::not_hosted_here(group)),
                None => {
                    let remote = RemoteFollower {
                        group,
                        api: self.clone(),
                        keys: keys.clone(),
                        progress_every,
                        next: starts.of(group),
                        last: None,
                    };
                    let (response, from) = remote.open().await?;
                    parts.push(Part::Remote(Box::new((remote, response)), from));
                }
            }
        }
        {
            let mut sent = stream.sent.try_lock().expect("nobody else has it yet");
            for part in &parts {
                match part {
                    Part::Local(group, _, from) => {
                        sent.insert(*group, from - 1);
                    }
                    Part::Remote(remote, Some(from)) => {
                        sent.insert(remote.0.group, from - 1);
                    }
                    Part::Remote(..) => {}
                }
            }
        }
        for part in parts {
            match part {
                Part::Local(group, kv, from) => {
                    let follower = GroupFollower {
                        group,
                        kv,
                        keys: keys.clone(),
                        stream: stream.clone(),
                        router: self.router.clone(),
                        progress_every,
                    };
                    tokio::spawn(follower.run(from));
                }
                Part::Remote(remote, _) => {
                    let (remote, response) = *remote;
                    tokio::spawn(remote.run(response, stream.clone()));
                }
            }
        }
        tokio::spawn(report_progress(stream, progress_every));
        let mut response = Response::new(ResponseBody::Streamed(body));
        response.headers_mut().insert(
            CONTENT_TYPE,
            "application/x-ndjson"
                .parse()
                .expect("a valid header value"),
        );
        Ok(response)
    }

    /// The groups that hold `keys`: the keys' own, or with a prefix every group that
    /// owns keys.
    fn groups_of(&self, keys: &Keys) -> Vec<u64> {
        let mut groups: Vec<u64> = match keys.prefixes.is_empty() {
            true => keys.keys.iter().map(|key| self.owner_of(key)).collect(),
            false => self.membership.read().unwrap().shards.clone(),
        };
        if groups.is_empty() {
            return vec![CLUSTER_GROUP];
        }
        groups.sort_unstable();
        groups.dedup();
        groups
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
        let shared = self.map_of(group)?;
        let keys = Keys::one(key.clone());
        let deadline = tokio::time::Instant::now() + wait;
        let mut from = after + 1;
        loop {
            let (found, live) = {
                let kv = shared.read().unwrap();
                let found = kv
                    .history()
                    .since(from, kv.revision(), |k| keys.matches(k), 1);
                let (tx, rx) = mpsc::channel(1);
                let id = kv.hub().lock().unwrap().register(keys.clone(), tx);
                let registration = Registration {
                    kv: shared.clone(),
                    id,
                };
                (found, (registration, rx))
            };
            let (_registration, mut rx) = live;
            match found {
                Err(first) => return Err(gone(group, after + 1, first)),
                Ok(found) => {
                    if let Some(event) = found.events.first() {
                        return Ok(json_response(StatusCode::OK, &event_json(group, event)));
                    }
                    from = found.next;
                }
            }
            let mut stopping = self.stopping.clone();
            tokio::select! {
                event = rx.recv() => {
                    if let Some(event) = event {
                        return Ok(json_response(StatusCode::OK, &event_json(group, &event)));
                    }
                    // Dropped by the hub (a snapshot replaced the history): look again.
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

/// The most keys and prefixes one stream may watch.
pub const MAX_WATCHED: usize = 1000;

/// The keys a watch names: every `key=<k>` (not empty) and `prefix=<p>` (`prefix=` for
/// all), at least one, at most [`MAX_WATCHED`].
fn watched_keys(query: Option<&str>) -> Result<Keys, Failure> {
    let keys = repeated_param(query, "key")?;
    let prefixes = repeated_param(query, "prefix")?;
    if keys.iter().any(String::is_empty) || keys.len() + prefixes.len() == 0 {
        return Err(Failure::bad_request(
            "name the keys to watch: key=<key> or prefix=<prefix> (prefix= for all), \
             as many of either as you like",
        ));
    }
    if keys.len() + prefixes.len() > MAX_WATCHED {
        return Err(Failure::bad_request(format!(
            "a stream watches at most {MAX_WATCHED} keys and prefixes; open another"
        )));
    }
    Ok(Keys {
        keys: keys.into_iter().map(Bytes::from).collect(),
        prefixes: prefixes.into_iter().map(Bytes::from).collect(),
    })
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

/// One group of a watch, as it is checked before the stream starts.
enum Part {
    /// Hosted here: its map, and the revision to start from.
    Local(u64, SharedKv, u64),
    /// Followed through another node: the open stream, and the revision it starts from
    /// if the request named one.
    Remote(Box<(RemoteFollower, reqwest::Response)>, Option<u64>),
}

/// Which watch a path asks for: `Some(None)` every group's (`/v1/watch`),
/// `Some(Some(g))` group g's (`/v1/groups/<g>/watch`); None for any other route.
fn watched_group(path: &str) -> Option<Option<u64>> {
    if path == WATCH_PATH {
        return Some(None);
    }
    let group = path.strip_prefix("/v1/groups/")?.strip_suffix("/watch")?;
    group.parse::<u64>().ok().filter(|&g| g > 0).map(Some)
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
