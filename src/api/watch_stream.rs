//! The parts of one watch stream (`watch_v1.rs` checks the request and starts them):
//! for each watched group, a [`GroupFollower`] on a node that hosts it (it catches up
//! from the group's history, then takes live changes from the group's hub) or a
//! [`RemoteFollower`] that relays a host's stream and moves to another host when that
//! one goes; and [`report_progress`], which says every so often how far each group's
//! events have been sent. They share a [`Stream`]: the channel to the client, and the
//! revisions sent per group, updated under the same lock as the sending, so that a
//! progress line never claims an event the client has not been sent, nor comes after
//! one without counting it. No part may send an event twice or skip one: what it cannot
//! continue, it ends with an error line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::{mpsc, watch, Mutex};

use super::forward::FORWARDED_HEADER;
use super::request::Failure;
use super::Api;
use crate::cluster_id;
use crate::entry_formats;
use crate::history::Event;
use crate::kv::SharedKv;
use crate::metrics::Metrics;
use crate::peer_service::FORWARD_PREFIX;
use crate::router::Router;
use crate::watch_hub::Keys;

/// Events looked up under the map's lock, or taken from the live channel, at a time.
const EVENTS_PER_READ: usize = 256;
/// Under load, the least time between two chunks of live events of one stream: a write
/// (and a wake-up, here and in the client) per event would cost more than the events.
const LIVE_COALESCE: Duration = Duration::from_millis(5);
/// Live changes a watcher may have waiting before the hub drops it (it then catches up
/// from the history).
const LIVE_EVENTS: usize = 1024;
/// Chunks a stream may have waiting for a slow client before its groups wait too, and
/// about the most bytes a chunk carries: a slow client costs at most some 512 KiB here
/// (and its live channel, `LIVE_EVENTS`).
pub(super) const STREAM_BUFFER: usize = 8;
const CHUNK_BYTES: usize = 64 * 1024;
/// The longest line a relayed stream may send (an event carries a key and a value, each
/// bounded by `--max-value-bytes`).
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// The last revision of each group whose events have been sent. Whoever sends holds it,
/// so that a progress line never claims events the stream has not carried yet, nor
/// comes after events without counting them.
pub(super) type Sent = Arc<Mutex<BTreeMap<u64, u64>>>;

/// What the parts of one watch share: the stream to the client and how far each group
/// got in it.
#[derive(Clone)]
pub(super) struct Stream {
    pub(super) out: mpsc::Sender<Bytes>,
    /// Counts the stream while it is open, and the events it sends.
    pub(super) metrics: Arc<Metrics>,
    pub(super) sent: Sent,
    /// Ends every part of the watch (one part could not go on).
    pub(super) end: Arc<watch::Sender<bool>>,
    pub(super) ended: watch::Receiver<bool>,
    pub(super) stopping: watch::Receiver<bool>,
}

impl Stream {
    /// Ends the whole watch with an error line about `group`.
    pub(super) async fn fail(&self, group: u64, status: StatusCode, why: String) {
        let line = serde_json::json!({
            "type": "error", "group": group, "status": status.as_u16(), "error": why,
        });
        let _ = self.out.send(json_line(&line)).await;
        self.end.send_replace(true);
    }
}

/// One group's part of a watch, on a node that hosts it. It catches up from the group's
/// history, then registers with the group's hub (`watch_hub.rs`), which hands it each
/// matching change as it is applied; if the hub drops it (its client reads too slowly
/// for the changes), it catches up from the history again. On each progress tick, and
/// after each batch, it claims every revision up to the map's as sent, when no change
/// is waiting in its channel.
pub(super) struct GroupFollower {
    pub(super) group: u64,
    pub(super) kv: SharedKv,
    pub(super) keys: Keys,
    pub(super) stream: Stream,
    /// To notice that the group's replica left this node.
    pub(super) router: Router,
    pub(super) progress_every: Duration,
}

/// A registration with a group's hub, undone when the watch part ends.
pub(super) struct Registration {
    pub(super) kv: SharedKv,
    pub(super) id: u64,
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
            // A new revision: its list reuses the last one's room.
            Some((r, keys)) => {
                *r = event.revision;
                keys.clear();
                keys.push(event.key.clone());
            }
            None => self.partial = Some((event.revision, vec![event.key.clone()])),
        }
    }
}

impl GroupFollower {
    pub(super) async fn run(self, from: u64) {
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
            let now = tokio::time::Instant::now();
            let mut last_chunk = now.checked_sub(LIVE_COALESCE).unwrap_or(now);
            loop {
                let why = tokio::select! {
                    event = rx.recv() => {
                        let Some(event) = event else {
                            break; // dropped by the hub: catch up from the history
                        };
                        let mut batch = vec![event];
                        // Events that come fast share chunks: at most one per
                        // LIVE_COALESCE, the first after a quiet spell at once.
                        let due = last_chunk + LIVE_COALESCE;
                        if rx.len() < EVENTS_PER_READ && due > tokio::time::Instant::now() {
                            tokio::time::sleep_until(due).await;
                        }
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
                        last_chunk = tokio::time::Instant::now();
                        self.claim(&rx, &sent, &mut at, Lock::IfFree).await;
                        continue;
                    }
                    _ = ticks.tick() => {
                        let served = self.router.serving(self.group);
                        if served.is_some_and(|kv| Arc::ptr_eq(&kv, &self.kv)) {
                            self.claim(&rx, &sent, &mut at, Lock::Wait).await;
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
        Metrics::add(&self.stream.metrics.watch_events_sent, events.len() as u64);
        let mut chunk = Vec::new();
        for (i, event) in events.iter().enumerate() {
            push_json_line(&mut chunk, &event_json(self.group, event));
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
    /// being applied meanwhile). With [`Lock::IfFree`] it gives up rather than wait for
    /// the lock (the raft thread holds it to apply changes).
    async fn claim(&self, rx: &mpsc::Receiver<Event>, sent: &Sent, at: &mut Position, lock: Lock) {
        if !rx.is_empty() || rx.is_closed() {
            return;
        }
        let revision = {
            let kv = match lock {
                Lock::Wait => self.kv.read().unwrap(),
                Lock::IfFree => match self.kv.try_read() {
                    Ok(kv) => kv,
                    Err(std::sync::TryLockError::WouldBlock) => return,
                    Err(std::sync::TryLockError::Poisoned(e)) => panic!("{e}"),
                },
            };
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

/// How [`GroupFollower::claim`] takes the map's read lock.
#[derive(Clone, Copy)]
enum Lock {
    /// Waits for it: on the progress tick, so that a quiet stream's position moves.
    Wait,
    /// Only if no one holds it: after each batch of live events, which come while the
    /// raft thread applies more (it holds the lock then; waiting for it, each stream
    /// would put the raft thread and itself through a context switch per batch). The
    /// next batch, or tick, claims instead.
    IfFree,
}

/// One group's part of a watch, on a node that does not host it: relays the events of
/// a stream from a node that does (`/v1/groups/<g>/watch` over its peer port), and when
/// that stream breaks, opens one on another host from where it got (a revision already
/// partly relayed is asked again, and what was relayed of it is skipped).
pub(super) struct RemoteFollower {
    pub(super) group: u64,
    pub(super) api: Arc<Api>,
    pub(super) keys: Keys,
    pub(super) progress_every: Duration,
    /// The revision to ask from next; None until the first stream said where it starts.
    pub(super) next: Option<u64>,
    /// The newest revision relayed, and the keys relayed at it.
    pub(super) last: Option<(u64, Vec<String>)>,
}

impl RemoteFollower {
    /// Opens a stream of the group's events on one of its hosts: the answer and the
    /// revision it starts from (if known). A 410 is the client's; no host answering is
    /// a 503.
    pub(super) async fn open(&self) -> Result<(reqwest::Response, Option<u64>), Failure> {
        let encode = |bytes: &Bytes| {
            percent_encoding::percent_encode(bytes, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let keys = self
            .keys
            .keys
            .iter()
            .map(|key| format!("key={}&", encode(key)));
        let prefixes = (self.keys.prefixes.iter()).map(|p| format!("prefix={}&", encode(p)));
        let mut query: String = keys.chain(prefixes).collect();
        query.push_str(&format!("progress_ms={}", self.progress_every.as_millis()));
        if let Some(next) = self.next {
            query.push_str(&format!("&start_revision={next}"));
        }
        let mut passed = Vec::new();
        for (node, url) in self.api.hosts_of(self.group) {
            if self.keys.len() > 1 && !self.host_reads_several_keys(node) {
                passed.push(format!(
                    "node {node} runs an older release, which would watch only the last \
                     key or prefix (watch one per stream until the upgrade is done)"
                ));
                continue;
            }
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

    /// Whether `node` serves a watch of several keys and prefixes: releases before it
    /// (those before entry format 4, `entry_formats::LEASES`) take only the last, and a
    /// relay through one would miss the others' events without a word.
    fn host_reads_several_keys(&self, node: u64) -> bool {
        (self.api.entry_formats).said(node, entry_formats::LEASES)
    }

    pub(super) async fn run(mut self, first: reqwest::Response, stream: Stream) {
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
                // A host sends a progress line every `progress_every`: one that says nothing
                // for twice that (it is paused, or cut off) is given up.
                let silence = self.progress_every * 2 + self.api.request_timeout;
                let chunk = tokio::select! {
                    chunk = tokio::time::timeout(silence, current.chunk()) => chunk.unwrap_or(Ok(None)),
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
                    if pending.len() > MAX_LINE_BYTES {
                        break; // not a stream of events
                    }
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
                    let Some(revision) = value["revision"].as_u64().filter(|&r| r > 0) else {
                        outcome = Relayed::Broke; // not an event of a group's history
                        break;
                    };
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
                    Metrics::inc(&stream.metrics.watch_events_sent);
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
pub(super) async fn report_progress(stream: Stream, every: Duration) {
    let Stream {
        out,
        sent,
        mut ended,
        metrics,
        ..
    } = stream;
    // This task lives as long as the stream: it counts it as open meanwhile.
    struct Open(Arc<Metrics>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0
                .watches_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    metrics
        .watches_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _open = Open(metrics);
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
pub(super) fn json_line(value: &impl serde::Serialize) -> Bytes {
    let mut line = Vec::new();
    push_json_line(&mut line, value);
    Bytes::from(line)
}

/// Appends `value` to `buf` as one line of a stream.
fn push_json_line(buf: &mut Vec<u8>, value: &impl serde::Serialize) {
    serde_json::to_writer(&mut *buf, value).expect("JSON values always encode");
    buf.push(b'\n');
}

/// 410 for a watch of `group` from revision `from`, older than the oldest kept, `first`.
pub(super) fn gone(group: u64, from: u64, first: u64) -> Failure {
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

/// An event as a watch sends it: `value` for a put (`value_hex` if it is not UTF-8).
#[derive(serde::Serialize)]
pub(super) struct EventLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    key: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    revision: u64,
    group: u64,
}

pub(super) fn event_json(group: u64, event: &Event) -> EventLine<'_> {
    let text = event.value.as_deref().map(std::str::from_utf8);
    EventLine {
        kind: if event.value.is_some() {
            "put"
        } else {
            "delete"
        },
        key: String::from_utf8_lossy(&event.key),
        value: text.and_then(Result::ok),
        value_hex: match (text, &event.value) {
            (Some(Err(_)), Some(value)) => Some(super::request::hex(value)),
            _ => None,
        },
        revision: event.revision,
        group,
    }
}
