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

use super::forward::FORWARDED_HEADER;
use super::request::{number_param, parse_query, Failure};
use super::{json_response, Api, Reply};
use crate::cluster_id;
use crate::history::Event;
use crate::kv::SharedKv;
use crate::response_body::ResponseBody;
use crate::router::Router;
use crate::router::CLUSTER_GROUP;
use crate::transport::FORWARD_PREFIX;
use crate::watch_hub::Keys;

/// The path of the stream.
pub const WATCH_PATH: &str = "/v1/watch";
/// How often a stream says how far it got, unless the request asks otherwise.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Events looked up under the map's lock, or taken from the live channel, at a time.
const EVENTS_PER_READ: usize = 256;
/// Live changes a watcher may have waiting before the hub drops it (it then catches up
/// from the history).
const LIVE_EVENTS: usize = 1024;
/// Chunks a stream may have waiting for a slow client before its groups wait too, and
/// about the most bytes a chunk carries: a slow client costs at most some 512 KiB here
/// (and its live channel, `LIVE_EVENTS`).
const STREAM_BUFFER: usize = 8;
const CHUNK_BYTES: usize = 64 * 1024;
/// A long poll's default and longest wait.
pub(super) const WAIT_DEFAULT: Duration = Duration::from_secs(60);
pub(super) const WAIT_LONGEST: Duration = Duration::from_secs(600);

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
        let shared = self.map_of(group)?;
        let keys = Keys::One(key.clone());
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

/// What the parts of one watch share: the stream to the client and how far each group
/// got in it.
#[derive(Clone)]
struct Stream {
    out: mpsc::Sender<Bytes>,
    sent: Sent,
    /// Ends every part of the watch (one part could not go on).
    end: Arc<watch::Sender<bool>>,
    ended: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
}

impl Stream {
    /// Ends the whole watch with an error line about `group`.
    async fn fail(&self, group: u64, status: StatusCode, why: String) {
        let line = serde_json::json!({
            "type": "error", "group": group, "status": status.as_u16(), "error": why,
        });
        let _ = self.out.send(json_line(&line)).await;
        self.end.send_replace(true);
    }
}

/// One group of a watch, as it is checked before the stream starts.
enum Part {
    /// Hosted here: its map, and the revision to start from.
    Local(u64, SharedKv, u64),
    /// Followed through another node: the open stream, and the revision it starts from
    /// if the request named one.
    Remote(Box<(RemoteFollower, reqwest::Response)>, Option<u64>),
}

/// One group's part of a watch, on a node that hosts it. It catches up from the group's
/// history, then registers with the group's hub (`watch_hub.rs`), which hands it each
/// matching change as it is applied; if the hub drops it (its client reads too slowly
/// for the changes), it catches up from the history again. On each progress tick, and
/// after each batch, it claims every revision up to the map's as sent, when no change
/// is waiting in its channel.
struct GroupFollower {
    group: u64,
    kv: SharedKv,
    keys: Keys,
    stream: Stream,
    /// To notice that the group's replica left this node.
    router: Router,
    progress_every: Duration,
}

/// A registration with a group's hub, undone when the watch part ends.
struct Registration {
    kv: SharedKv,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(kv) = self.kv.read() {
            kv.hub().lock().unwrap().unregister(self.id);
        }
    }
}

/// Where a part of a watch got: `from` is the next revision whose events are all still
/// to send; `partial` the revision after it of which some events were sent (live events
/// come one by one), with their keys, so that catching up resends none of them.
struct Position {
    from: u64,
    partial: Option<(u64, Vec<Bytes>)>,
}

impl Position {
    /// Whether `event` was sent already.
    fn sent(&self, event: &Event) -> bool {
        event.revision < self.from
            || self.partial.as_ref().is_some_and(|(r, keys)| {
                event.revision < *r || (event.revision == *r && keys.contains(&event.key))
            })
    }

    /// `event` was sent.
    fn note(&mut self, event: &Event) {
        match &mut self.partial {
            Some((r, keys)) if *r == event.revision => keys.push(event.key.clone()),
            _ => self.partial = Some((event.revision, vec![event.key.clone()])),
        }
    }
}

impl GroupFollower {
    async fn run(self, from: u64) {
        let Stream {
            out,
            sent,
            mut ended,
            mut stopping,
            ..
        } = self.stream.clone();
        let mut at = Position {
            from,
            partial: None,
        };
        let mut ticks = tokio::time::interval(self.progress_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Catch up from the history, and once at the map's revision, register.
            let (found, live) = {
                let kv = self.kv.read().unwrap();
                let start = at.partial.as_ref().map_or(at.from, |(r, _)| *r);
                match kv.history().since(
                    start,
                    kv.revision(),
                    |k| self.keys.matches(k),
                    EVENTS_PER_READ,
                ) {
                    Err(first) => (Err(first), None),
                    Ok(found) => {
                        let live = (found.next > kv.revision()).then(|| {
                            let (tx, rx) = mpsc::channel(LIVE_EVENTS);
                            let id = kv.hub().lock().unwrap().register(self.keys.clone(), tx);
                            (
                                Registration {
                                    kv: self.kv.clone(),
                                    id,
                                },
                                rx,
                            )
                        });
                        (Ok(found), live)
                    }
                }
            };
            let found = match found {
                Ok(found) => found,
                Err(first) => {
                    let why = format!(
                        "this node's replica of group {} no longer has the events from revision \
                         {} on (it was replaced by a snapshot); the oldest it has is {first}: \
                         watch again from there, or read the keys and watch from the revision after",
                        self.group, at.from
                    );
                    return self.stream.fail(self.group, StatusCode::GONE, why).await;
                }
            };
            let fresh: Vec<&Event> = found.events.iter().filter(|e| !at.sent(e)).collect();
            if !self
                .send(&fresh, &out, &sent, &mut at, Some(found.next))
                .await
            {
                return;
            }
            let Some((_registration, mut rx)) = live else {
                continue; // more than one read's worth was waiting
            };
            // Live: the hub hands over each change as it is applied.
            loop {
                let why = tokio::select! {
                    event = rx.recv() => {
                        let Some(event) = event else {
                            break; // dropped by the hub: catch up from the history
                        };
                        let mut batch = vec![event];
                        while batch.len() < EVENTS_PER_READ {
                            match rx.try_recv() {
                                Ok(event) => batch.push(event),
                                Err(_) => break,
                            }
                        }
                        let fresh: Vec<&Event> = batch.iter().filter(|e| !at.sent(e)).collect();
                        if !self.send(&fresh, &out, &sent, &mut at, None).await {
                            return;
                        }
                        self.claim(&rx, &sent, &mut at).await;
                        continue;
                    }
                    _ = ticks.tick() => {
                        let served = self.router.serving(self.group);
                        if served.is_some_and(|kv| Arc::ptr_eq(&kv, &self.kv)) {
                            self.claim(&rx, &sent, &mut at).await;
                            continue;
                        }
                        format!("this node's replica of group {} left it", self.group)
                    }
                    _ = out.closed() => return,
                    _ = ended.changed() => return,
                    _ = stopping.changed() => "the node is shutting down".to_string(),
                };
                let why = format!(
                    "{why}; watch again elsewhere from revision {} of group {}",
                    at.partial.as_ref().map_or(at.from, |(r, _)| *r),
                    self.group
                );
                return self
                    .stream
                    .fail(self.group, StatusCode::SERVICE_UNAVAILABLE, why)
                    .await;
            }
        }
    }

    /// Sends `events` to the client and notes them; with `complete`, every revision
    /// before it has been sent whole. False if the client went away.
    async fn send(
        &self,
        events: &[&Event],
        out: &mpsc::Sender<Bytes>,
        sent: &Sent,
        at: &mut Position,
        complete: Option<u64>,
    ) -> bool {
        let mut sent = sent.lock().await;
        let mut chunk = Vec::new();
        for (i, event) in events.iter().enumerate() {
            chunk.extend_from_slice(&json_line(&event_json(self.group, event)));
            at.note(event);
            let last = i + 1 == events.len();
            if (chunk.len() >= CHUNK_BYTES || last)
                && out
                    .send(Bytes::from(std::mem::take(&mut chunk)))
                    .await
                    .is_err()
            {
                return false;
            }
        }
        if let Some(next) = complete {
            at.from = next;
            at.partial = None;
        }
        let done = match &at.partial {
            Some((r, _)) => r - 1,
            None => at.from - 1,
        };
        let entry = sent.entry(self.group).or_insert(0);
        *entry = (*entry).max(done);
        true
    }

    /// With no change waiting in `rx` (and the hub still holding its other end), every
    /// revision up to the map's has been sent (the map's read lock keeps a change from
    /// being applied meanwhile).
    async fn claim(&self, rx: &mpsc::Receiver<Event>, sent: &Sent, at: &mut Position) {
        let revision = {
            let kv = self.kv.read().unwrap();
            // Closed: the hub dropped this watcher, and changes since went elsewhere.
            if !rx.is_empty() || rx.is_closed() {
                return;
            }
            kv.revision()
        };
        let mut sent = sent.lock().await;
        if revision + 1 > at.from {
            at.from = revision + 1;
            at.partial = None;
        }
        let entry = sent.entry(self.group).or_insert(0);
        *entry = (*entry).max(revision);
    }
}

/// One group's part of a watch, on a node that does not host it: relays the events of
/// a stream from a node that does (`/v1/groups/<g>/watch` over its peer port), and when
/// that stream breaks, opens one on another host from where it got (a revision already
/// partly relayed is asked again, and what was relayed of it is skipped).
struct RemoteFollower {
    group: u64,
    api: Arc<Api>,
    keys: Keys,
    progress_every: Duration,
    /// The revision to ask from next; None until the first stream said where it starts.
    next: Option<u64>,
    /// The newest revision relayed, and the keys relayed at it.
    last: Option<(u64, Vec<String>)>,
}

impl RemoteFollower {
    /// Opens a stream of the group's events on one of its hosts: the answer and the
    /// revision it starts from (if known). A 410 is the client's; no host answering is
    /// a 503.
    async fn open(&self) -> Result<(reqwest::Response, Option<u64>), Failure> {
        let (name, value) = match &self.keys {
            Keys::One(key) => ("key", key),
            Keys::Prefix(prefix) => ("prefix", prefix),
        };
        let mut query = format!(
            "{name}={}&progress_ms={}",
            percent_encoding::percent_encode(value, percent_encoding::NON_ALPHANUMERIC),
            self.progress_every.as_millis()
        );
        if let Some(next) = self.next {
            query.push_str(&format!("&start_revision={next}"));
        }
        let mut passed = Vec::new();
        for (node, url) in self.api.hosts_of(self.group) {
            let mut request = self
                .api
                .peers
                .get(format!(
                    "{url}{FORWARD_PREFIX}/v1/groups/{}/watch?{query}",
                    self.group
                ))
                .header(FORWARDED_HEADER, self.api.id.to_string())
                .timeout(Duration::from_secs(24 * 3600));
            if let Some(id) = self.api.cluster_id.get() {
                request = request.header(cluster_id::HEADER, cluster_id::format(id));
            }
            let answer = match tokio::time::timeout(self.api.request_timeout, request.send()).await
            {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    passed.push(format!("node {node}: {e}"));
                    continue;
                }
                Err(_) => {
                    passed.push(format!("node {node}: no answer in time"));
                    continue;
                }
            };
            match answer.status() {
                StatusCode::OK => return Ok((answer, self.next)),
                StatusCode::GONE => {
                    let body: serde_json::Value = answer.json().await.unwrap_or_default();
                    let first = body["revision"].as_u64().unwrap_or(0);
                    return Err(gone(self.group, self.next.unwrap_or(0), first));
                }
                status => {
                    let text = answer.text().await.unwrap_or_default();
                    passed.push(format!("node {node}: {status} {}", text.trim()));
                }
            }
        }
        Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no node that hosts group {} could stream its events: {}",
                self.group,
                passed.join("; ")
            ),
        ))
    }

    async fn run(mut self, first: reqwest::Response, stream: Stream) {
        let (mut ended, mut stopping) = (stream.ended.clone(), stream.stopping.clone());
        let mut answer = Some(first);
        loop {
            let mut current = match answer.take() {
                Some(current) => current,
                None if self.next.is_none() => {
                    let why =
                        format!(
                        "the stream of group {}'s events broke before it said where it started; \
                         watch again", self.group);
                    return stream
                        .fail(self.group, StatusCode::SERVICE_UNAVAILABLE, why)
                        .await;
                }
                None => match self.open().await {
                    Ok((current, _)) => current,
                    Err(failure) => {
                        let why =
                            format!("{} (resume from revision {:?})", failure.message, self.next);
                        return stream.fail(self.group, failure.status, why).await;
                    }
                },
            };
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let chunk = tokio::select! {
                    chunk = current.chunk() => chunk,
                    _ = stream.out.closed() => return,
                    _ = ended.changed() => return,
                    _ = stopping.changed() => {
                        let why = format!("the node is shutting down; watch again elsewhere from revision {:?} of group {}", self.next, self.group);
                        return stream.fail(self.group, StatusCode::SERVICE_UNAVAILABLE, why).await;
                    }
                };
                let Ok(Some(chunk)) = chunk else {
                    break; // the host went away: another one takes over
                };
                pending.extend_from_slice(&chunk);
                let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
                    continue;
                };
                let lines: Vec<u8> = pending.drain(..=end).collect();
                match self.relay(&lines, &stream).await {
                    Relayed::Going => {}
                    Relayed::ClientGone => return,
                    Relayed::Broke => break,
                    Relayed::Gone(why) => {
                        return stream.fail(self.group, StatusCode::GONE, why).await
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Relays complete `lines` from a host, skipping what was relayed already.
    async fn relay(&mut self, lines: &[u8], stream: &Stream) -> Relayed {
        let mut sent = stream.sent.lock().await;
        let mut chunk = Vec::new();
        let mut outcome = Relayed::Going;
        for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
                outcome = Relayed::Broke;
                break;
            };
            match value["type"].as_str() {
                Some("put") | Some("delete") => {
                    let revision = value["revision"].as_u64().unwrap_or(0);
                    let key = value["key"].as_str().unwrap_or_default().to_string();
                    match &mut self.last {
                        Some((last, _)) if revision < *last => continue,
                        Some((last, keys)) if revision == *last => {
                            if keys.contains(&key) {
                                continue;
                            }
                            keys.push(key);
                        }
                        _ => self.last = Some((revision, vec![key])),
                    }
                    chunk.extend_from_slice(line);
                    chunk.push(b'\n');
                    // Revision `revision` may not be whole yet: ask again from it.
                    self.next = Some(revision);
                    let done = sent.entry(self.group).or_insert(0);
                    *done = (*done).max(revision - 1);
                }
                Some("progress") => {
                    let group = self.group.to_string();
                    if let Some(revision) = value["revisions"][&group].as_u64() {
                        self.next = Some(self.next.unwrap_or(0).max(revision + 1));
                        let done = sent.entry(self.group).or_insert(0);
                        *done = (*done).max(revision);
                    }
                }
                _ if value["status"] == 410 => {
                    outcome =
                        Relayed::Gone(value["error"].as_str().unwrap_or_default().to_string());
                    break;
                }
                _ => {
                    outcome = Relayed::Broke;
                    break;
                }
            }
        }
        if !chunk.is_empty() && stream.out.send(Bytes::from(chunk)).await.is_err() {
            return Relayed::ClientGone;
        }
        outcome
    }
}

/// What relaying a host's lines came to.
enum Relayed {
    Going,
    ClientGone,
    /// The host's stream ended or said it cannot go on: open one elsewhere.
    Broke,
    /// The events to come are no longer kept anywhere (the host's 410).
    Gone(String),
}

/// Every `every`, a line saying the last revision of each group whose events were sent:
/// a client resumes from the next ones (`start_revision=<group>:<revision + 1>,...`).
/// The first comes at once, so that a client (or another node relaying this stream)
/// learns where the stream starts.
async fn report_progress(stream: Stream, every: Duration) {
    let Stream {
        out,
        sent,
        mut ended,
        ..
    } = stream;
    let mut ticks = tokio::time::interval(every);
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
        if out.send(json_line(&line)).await.is_err() {
            return;
        }
        drop(sent);
    }
}

/// `value` as one line of a stream.
fn json_line(value: &serde_json::Value) -> Bytes {
    let mut line = serde_json::to_vec(value).expect("JSON values always encode");
    line.push(b'\n');
    Bytes::from(line)
}

/// 410 for a watch of `group` from revision `from`, older than the oldest kept, `first`.
fn gone(group: u64, from: u64, first: u64) -> Failure {
    Failure {
        revision: Some(first),
        ..Failure::new(
            StatusCode::GONE,
            format!(
                "group {group}'s events from revision {from} on are no longer kept; the \
                 oldest still kept is {first} (in \"revision\")"
            ),
        )
    }
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
