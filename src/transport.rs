//! Raft messages between members, over HTTP.
//!
//! Sending: as etcd's rafthttp does, one long-lived `POST <peer-url>/raft` per peer whose
//! chunked body carries frames of raft messages as they come: no round trip per
//! message, no waiting for an answer before the next. `peer_stream.rs` keeps that stream
//! (the node's thread writes into the socket itself); this file routes each Ready's
//! messages to their peers' streams, one chunk per peer. When a stream breaks the next
//! message opens a new one. Raft tolerates lost messages, so a full backlog drops rather
//! than blocks the node, and a failed stream is reported to raft-rs
//! (`report_unreachable`) and logged once per outage, not once per message.
//!
//! Snapshots do not travel inside a raft message: raft-rs's `MsgSnapshot` carries only the
//! metadata, and its sender streams the snapshot file (read in chunks, never whole in
//! memory) to `<peer-url>/raft/snapshot`, with the message itself in a header. The
//! receiver takes one upload per peer at a time, up to `--max-snapshot-bytes` and within
//! a deadline; it writes the file under a temporary name, makes it durable, checks its
//! checksum and that its header matches the message, and only then hands the message to
//! the group, which names the file as a snapshot only if raft takes it. The outcome goes
//! back to raft-rs through `report_snapshot`.
//!
//! Receiving: [`handle_peer_request`] decodes frames as they arrive and steps each message
//! into the node. Every stream and upload names its cluster id; one from another cluster
//! is refused with 412, so a stray peer can neither feed raft nor tell a node it was
//! removed.
//! A message from a removed member is answered 410 Gone, which tells that member it was
//! removed. Every message carries its raft group id, and one stream carries every
//! group's messages between two processes, addressed by the node part of their raft ids
//! (`replica_id.rs`); a message for a group not in the cluster's table is dropped (raft
//! sends again), and one from a replica the table does not place in its group is
//! refused (a snapshot upload with 403, before a byte is written). The peer port also takes client requests that
//! another node forwards to a group hosted here (`/client/v1/groups/...`, see
//! `api/forward.rs`). Nothing here interprets raft messages beyond their addressing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use slog::{debug, info, warn, Logger};
use tokio::io::AsyncWriteExt;

use crate::cluster_id::{self, ClusterId};
use crate::entry_formats::{self, EntryFormats};
use crate::faults::Partition;
use crate::http_server::{text_response as reply, FromPeer};
use crate::membership::{self, Membership, SharedMembership};
use crate::metrics::Metrics;
use crate::peer_frame::{encode_frame, take_frames};
use crate::peer_stream::{PeerStream, StreamTarget, CONNECT_TIMEOUT};
use crate::replica_id::{incarnation_of, node_of};
use crate::response_body::ResponseBody;
use crate::router::{Router, CLUSTER_GROUP};
use crate::snapshot;
use crate::tls::{self, Tls};

/// The path peers POST raft messages to.
pub const RAFT_PATH: &str = "/raft";
/// The path peers stream snapshot files to.
const SNAPSHOT_PATH: &str = "/raft/snapshot";
/// Headers of a snapshot upload: the hex-encoded MsgSnapshot and its raft group.
const MESSAGE_HEADER: &str = "x-raft-message";
const GROUP_HEADER: &str = "x-raft-group";
/// A snapshot upload may take this long before it is given up.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// ... and may pause this long between two chunks.
const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an idle connection to a peer is kept for the next request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often peers that may read an older entry format are asked again, and how often
/// once every peer reads the newest.
const FORMAT_POLL: Duration = Duration::from_secs(1);
const FORMAT_RECHECK: Duration = Duration::from_secs(30);

/// The sending half: a stream per peer.
pub struct Transport {
    own_id: u64,
    /// The entry formats this node and its peers read.
    formats: Arc<EntryFormats>,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Told when a peer is added, so that its entry format is asked at once.
    peer_added: tokio::sync::Notify,
    /// The cluster as this node applied it: who may tell it that it was removed.
    membership: SharedMembership,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    node: Router,
    partition: Arc<Partition>,
    /// Each group's snapshots are in a folder of it.
    data_dir: PathBuf,
    cluster_id: Arc<ClusterId>,
    /// Mutual TLS with the peers, if configured.
    tls: Option<Arc<Tls>>,
    metrics: Arc<Metrics>,
    logger: Logger,
}

struct Peer {
    url: String,
    stream: Arc<PeerStream>,
}

impl Drop for Peer {
    /// A peer the transport no longer holds (removed, or moved to a new URL) gets no
    /// more messages: its stream's task closes the connection and ends.
    fn drop(&mut self) {
        self.stream.close();
    }
}

impl Transport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        own_id: u64,
        formats: Arc<EntryFormats>,
        runtime: tokio::runtime::Handle,
        node: Router,
        membership: SharedMembership,
        partition: Arc<Partition>,
        data_dir: PathBuf,
        cluster_id: Arc<ClusterId>,
        tls: Option<Arc<Tls>>,
        metrics: Arc<Metrics>,
        logger: Logger,
    ) -> Transport {
        // Each request sets its own timeout (a stream or a snapshot upload). An idle
        // pooled connection is let go before a peer's default --header-read-timeout-ms
        // (30 s) closes it, so a request never goes out on one the peer is closing.
        let mut client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT);
        if let Some(tls) = &tls {
            client = client.use_preconfigured_tls((*tls.client_config()).clone());
        }
        let client = client
            .build()
            .expect("the HTTP client has a valid static configuration");
        Transport {
            own_id,
            formats,
            peers: Mutex::new(HashMap::new()),
            peer_added: tokio::sync::Notify::new(),
            membership,
            client,
            runtime,
            node,
            partition,
            data_dir,
            cluster_id,
            tls,
            metrics,
            logger,
        }
    }

    /// The HTTP client for requests to peers, beside their raft streams.
    pub fn client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// Starts sending to `id` at `url` (or moves it there).
    pub fn set_peer(&self, id: u64, url: &str) {
        let mut peers = self.peers.lock().unwrap();
        if peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        let cluster_id = self.cluster_id.clone();
        let own_format = self.formats.own();
        let tls = match &self.tls {
            None => None,
            Some(tls) => match tls::server_name(membership::host_of(url)) {
                Ok(name) => Some((tls.client_config(), name)),
                Err(e) => {
                    warn!(self.logger, "cannot check the certificate of a peer: no messages go to it"; "peer" => id, "url" => url, "error" => e);
                    return;
                }
            },
        };
        let check = RemovalCheck {
            client: self.client.clone(),
            own_id: self.own_id,
            peer: id,
            membership: self.membership.clone(),
            cluster_id: self.cluster_id.clone(),
        };
        let target = StreamTarget {
            authority: membership::authority_of(url).to_string(),
            tls,
            confirm_removal: Box::new(move |answered| Box::pin(check.clone().confirm(answered))),
            path: RAFT_PATH.to_string(),
            headers: Box::new(move || {
                let id = cluster_id.get().map(cluster_id::format);
                let mut headers: Vec<_> =
                    id.map(|id| (cluster_id::HEADER, id)).into_iter().collect();
                headers.push((entry_formats::HEADER, own_format.to_string()));
                headers
            }),
        };
        let stream = PeerStream::start(
            id,
            target,
            &self.runtime,
            self.node.clone(),
            self.metrics.clone(),
            self.logger.new(slog::o!("peer" => id)),
        );
        peers.insert(
            id,
            Peer {
                url: url.to_string(),
                stream,
            },
        );
        self.peer_added.notify_one();
    }

    /// Sends to every member of `membership` but `own_id`, and to none of the removed.
    pub fn follow(&self, own_id: u64, membership: &Membership) {
        for (&id, url) in &membership.peer_urls {
            if id != own_id {
                self.set_peer(id, url);
            }
        }
        for id in &membership.removed {
            self.remove_peer(*id);
        }
    }

    /// The entry formats this node and its peers read.
    pub fn formats(&self) -> &EntryFormats {
        &self.formats
    }

    /// Peer `peer` said it reads entry formats up to `newest`.
    pub fn heard_format(&self, peer: u64, newest: u8) {
        if let Err(e) = self.formats.heard(peer, newest) {
            warn!(self.logger, "could not remember a peer's entry format in the data dir; it counts as reading the older of the two until it is written";
                "peer" => peer, "format" => newest, "error" => %e);
        }
    }

    /// Asks every peer that has not said it reads this build's newest entry format which
    /// one it reads (`GET /raft/cluster`), every `FORMAT_POLL` until all have, then
    /// every `FORMAT_RECHECK` or as soon as a peer is added: a follower hears no stream
    /// from the other followers, so it learns their formats this way. Ends when the
    /// servers stop.
    pub async fn learn_entry_formats(
        self: Arc<Self>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let peers: Vec<(u64, String)> = {
                let peers = self.peers.lock().unwrap();
                peers.iter().map(|(id, p)| (*id, p.url.clone())).collect()
            };
            let mut all_newest = true;
            for (id, url) in peers {
                match cluster_id::cluster_view(&self.client, &url).await {
                    Ok(view) if view.id == id => {
                        self.heard_format(id, view.entry_format);
                        all_newest &= view.entry_format >= entry_formats::NEWEST;
                    }
                    _ => all_newest = false,
                }
            }
            let pause = if all_newest {
                FORMAT_RECHECK
            } else {
                FORMAT_POLL
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.peer_added.notified() => {}
                _ = stopping.changed() => return,
            }
        }
    }

    /// Whether `id` is a peer this node knows where to reach: one named on its command
    /// line or in its join answer, or a member it has applied since.
    pub fn knows_peer(&self, id: u64) -> bool {
        self.peers.lock().unwrap().contains_key(&id)
    }

    /// The peers this node knows (itself not among them).
    pub fn peer_ids(&self) -> Vec<u64> {
        self.peers.lock().unwrap().keys().copied().collect()
    }

    /// Stops sending to `id`.
    pub fn remove_peer(&self, id: u64) {
        self.peers.lock().unwrap().remove(&id);
    }

    /// Sends raft messages, each of the group it is paired with, to their recipients: one
    /// chunk per peer process for every group's messages of a loop round, one write
    /// into its stream. Never blocks.
    pub fn send(&self, messages: Vec<(u64, Message)>) {
        let peers = self.peers.lock().unwrap();
        let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (group_id, msg) in messages {
            let to = node_of(msg.to);
            if self.partition.is_blocked(to) {
                continue;
            }
            match peers.get(&to) {
                Some(peer) if msg.get_msg_type() == MessageType::MsgSnapshot => {
                    self.send_snapshot(&peer.url, group_id, msg)
                }
                Some(_) => {
                    let at = match chunks.iter().position(|(id, _)| *id == to) {
                        Some(at) => at,
                        None => {
                            chunks.push((to, Vec::new()));
                            chunks.len() - 1
                        }
                    };
                    encode_frame(&mut chunks[at].1, group_id, &msg);
                }
                None => {
                    debug!(self.logger, "no address for peer, dropping a message"; "peer" => to)
                }
            }
        }
        for (to, frames) in chunks {
            peers[&to].stream.send(&frames);
        }
    }
}

impl Transport {
    /// Streams the snapshot file that `msg` refers to, then reports the outcome to raft.
    fn send_snapshot(&self, peer_url: &str, group_id: u64, msg: Message) {
        let to = msg.to;
        let index = msg.get_snapshot().get_metadata().index;
        let path = snapshot::path_of(&snapshot::dir_of(&self.data_dir, group_id), index);
        let url = format!("{peer_url}{SNAPSHOT_PATH}");
        let header = hex_encode(&msg.write_to_bytes().expect("raft messages always encode"));
        let (client, node) = (self.client.clone(), self.node.clone());
        let cluster = self
            .cluster_id
            .get()
            .map(cluster_id::format)
            .unwrap_or_default();
        let logger = self
            .logger
            .new(slog::o!("peer" => node_of(to), "raft_id" => to, "index" => index));
        info!(logger, "sending a snapshot");
        self.runtime.spawn(async move {
            let started = Instant::now();
            let sent = async {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let bytes = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                let resp = client
                    .post(&url)
                    .header(MESSAGE_HEADER, header)
                    .header(GROUP_HEADER, group_id.to_string())
                    .header(cluster_id::HEADER, cluster)
                    .timeout(SNAPSHOT_TIMEOUT)
                    .body(reqwest::Body::from(file))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    return Err(format!("HTTP {status}: {}", resp.text().await.unwrap_or_default()));
                }
                Ok(bytes)
            }
            .await;
            match sent {
                Ok(bytes) => {
                    info!(logger, "snapshot sent"; "bytes" => bytes, "ms" => started.elapsed().as_millis());
                    node.report_snapshot(group_id, to, true);
                }
                Err(e) => {
                    warn!(logger, "sending a snapshot failed; raft will retry"; "error" => e);
                    node.report_snapshot(group_id, to, false);
                }
            }
        });
    }
}

/// Checks that a "you were removed" (410) answer on a peer stream is true before this
/// node believes it and deletes itself: it must come from this cluster, from a current
/// member, and the cluster's leader must list this node as removed.
#[derive(Clone)]
struct RemovalCheck {
    client: reqwest::Client,
    own_id: u64,
    /// The member that answered 410.
    peer: u64,
    membership: SharedMembership,
    cluster_id: Arc<ClusterId>,
}

impl RemovalCheck {
    /// `answered`: the cluster id the 410 answer carried.
    async fn confirm(self, answered: Option<u64>) -> Result<(), String> {
        let ours = self.cluster_id.get();
        if ours.is_none() || answered != ours {
            return Err(format!(
                "the answer names cluster {}, not this node's ({})",
                answered.map_or("none".into(), cluster_id::format),
                ours.map_or("none".into(), cluster_id::format)
            ));
        }
        let members: Vec<(u64, String)> = {
            let membership = self.membership.read().unwrap();
            membership
                .peer_urls
                .iter()
                .filter(|(id, _)| **id != self.own_id && !membership.removed.contains(id))
                .map(|(id, url)| (*id, url.clone()))
                .collect()
        };
        if !members.iter().any(|(id, _)| *id == self.peer) {
            return Err(format!(
                "node {} is not a member of this cluster",
                self.peer
            ));
        }
        let ours = cluster_id::format(ours.unwrap_or_default());
        for view in cluster_id::cluster_views(&self.client, &members)
            .await
            .into_iter()
            .flatten()
        {
            let leads = view.leader == view.id && members.iter().any(|(id, _)| *id == view.id);
            if leads && view.cluster_id == ours && view.removed.contains(&self.own_id) {
                return Ok(());
            }
        }
        Err("no leader of this cluster confirms it".into())
    }
}

/// The forwarded request as the client sent it: its path without `/client`, marked as
/// coming from a peer.
fn without_forward_prefix(req: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(FromPeer);
    let original = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .strip_prefix(FORWARD_PREFIX)
        .unwrap_or("/")
        .to_string();
    if let Ok(uri) = original.parse() {
        parts.uri = uri;
    }
    Request::from_parts(parts, body)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Keys (cluster ids, node ids) whose refusal was logged, so that each is logged once.
/// Forged traffic can name endless keys: past `MAX_LOGGED_KEYS` no new one is
/// remembered, or logged (the metrics still count every refusal).
#[derive(Default)]
pub struct LoggedOnce(Mutex<std::collections::HashSet<u64>>);

/// How many keys a [`LoggedOnce`] remembers.
const MAX_LOGGED_KEYS: usize = 1024;

impl LoggedOnce {
    /// Whether `key` is new here (and so to be logged).
    fn first(&self, key: u64) -> bool {
        let mut seen = self.0.lock().unwrap();
        seen.len() < MAX_LOGGED_KEYS && seen.insert(key)
    }
}

/// Answers a client request forwarded by another node (see `api/forward.rs`).
pub type ClientApi = Arc<
    dyn Fn(
            Request<Incoming>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<ResponseBody>> + Send>>
        + Send
        + Sync,
>;

/// The peer-port path under which another node forwards client requests.
pub const FORWARD_PREFIX: &str = "/client";
/// The only client routes that may be forwarded: a group's keys, status and members,
/// and leases (from another node's API), and the list of groups, the removal of a member
/// and a group's leader (from this node's rebalancer).
fn forwardable(path: &str) -> bool {
    const UNDER: [&str; 3] = [
        "/client/v1/groups/",
        "/client/v1/members/",
        "/client/v1/leases/",
    ];
    ["/client/v1/groups", "/client/v1/leases"].contains(&path)
        || UNDER.iter().any(|p| path.starts_with(p))
}

/// What the peer-facing server needs.
pub struct PeerService {
    pub own_id: u64,
    pub node: Router,
    pub membership: SharedMembership,
    pub partition: Arc<Partition>,
    /// Each group's snapshots are in a folder of it.
    pub data_dir: PathBuf,
    pub cluster_id: Arc<ClusterId>,
    /// Where client requests that another node forwarded go.
    pub forwarded: ClientApi,
    /// Clusters whose traffic was refused, each logged once.
    pub strangers: LoggedOnce,
    /// The sending half, which knows the peers this node can answer.
    pub transport: Arc<Transport>,
    /// Senders that are no peer of this node, each logged once.
    pub unknown_senders: LoggedOnce,
    /// Senders refused by a group they are not placed in, each logged once.
    pub outsiders: LoggedOnce,
    pub metrics: Arc<Metrics>,
    /// Peers with a snapshot upload in progress (one each at a time).
    pub uploads: Mutex<std::collections::HashSet<u64>>,
    /// Largest snapshot upload taken (`--max-snapshot-bytes`).
    pub max_snapshot_bytes: u64,
    /// Largest raft message frame taken (`--max-peer-frame-bytes`).
    pub max_frame_bytes: usize,
    pub logger: Logger,
}

/// What a raft group makes of a message from a peer (`PeerService::admission`).
enum Admission {
    Admitted,
    /// The group is not in this node's table of groups (yet): dropped silently.
    Unknown,
    /// The sender is not the replica the table places in the group: refused, and why.
    Outsider(String),
}

/// Answers a request on the peer port: `POST /raft` with a batch of raft messages,
/// `POST /raft/snapshot` with a snapshot file, or a client request for a raft group that
/// another node forwarded (`/client/v1/groups/...`).
pub async fn handle_peer_request(
    req: Request<Incoming>,
    service: Arc<PeerService>,
) -> Response<ResponseBody> {
    let forwarded = forwardable(req.uri().path()) && service.check_cluster(&req).is_none();
    if forwarded {
        // Streamed when it is a watch (`api/watch_v1.rs`).
        return (service.forwarded)(without_forward_prefix(req)).await;
    }
    answer_peer_request(req, service).await.map(Into::into)
}

async fn answer_peer_request(
    req: Request<Incoming>,
    service: Arc<PeerService>,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == cluster_id::CLUSTER_VIEW_PATH {
        return service.cluster_view(&req).await;
    }
    if let Some(refusal) = service.check_cluster(&req) {
        return refusal;
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    match req.uri().path() {
        RAFT_PATH => service.receive_messages(req).await,
        SNAPSHOT_PATH => match service.receive_snapshot(req).await {
            Ok(response) => response,
            Err(e) => {
                warn!(service.logger, "receiving a snapshot failed"; "error" => &e);
                reply(StatusCode::INTERNAL_SERVER_ERROR, &e)
            }
        },
        _ => reply(StatusCode::NOT_FOUND, "not found"),
    }
}

impl PeerService {
    /// Refuses (412) a request from another cluster or that names none, and (503) every
    /// request while this node does not know its cluster yet (it is joining).
    fn check_cluster(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let Some(ours) = self.cluster_id.get() else {
            return Some(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node is joining and does not know its cluster's id yet",
            ));
        };
        let theirs = req
            .headers()
            .get(cluster_id::HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(cluster_id::parse);
        if theirs == Some(ours) {
            return None;
        }
        let why = match theirs {
            Some(theirs) => format!(
                "this node belongs to cluster {}, the sender to cluster {}",
                cluster_id::format(ours),
                cluster_id::format(theirs)
            ),
            None => format!(
                "this node belongs to cluster {}; the request names no cluster ({} header)",
                cluster_id::format(ours),
                cluster_id::HEADER
            ),
        };
        if self.strangers.first(theirs.unwrap_or(0)) {
            warn!(self.logger, "refusing raft traffic from another cluster"; "reason" => &why);
        }
        Some(reply(StatusCode::PRECONDITION_FAILED, &why))
    }

    /// `GET /raft/cluster`: which cluster this node is in, its members and its leader as
    /// this node knows them. Open to a joining node, which knows no cluster id yet (with
    /// peer TLS, only to holders of a certificate from the peers' CA).
    async fn cluster_view(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let asked = req
            .headers()
            .get(cluster_id::HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(cluster_id::parse);
        let Some(ours) = self.cluster_id.get() else {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node is joining a cluster",
            );
        };
        if asked.is_some_and(|asked| asked != ours) {
            return reply(
                StatusCode::PRECONDITION_FAILED,
                "this node is in another cluster",
            );
        }
        let leader = self
            .node
            .status(CLUSTER_GROUP)
            .await
            .map_or(0, |status| status.leader);
        let view = {
            let membership = self.membership.read().unwrap();
            cluster_id::ClusterView {
                cluster_id: cluster_id::format(ours),
                id: self.own_id,
                leader,
                members: membership
                    .peer_urls
                    .iter()
                    .filter(|(id, _)| !membership.removed.contains(id))
                    .map(|(id, url)| membership::ListedMember {
                        id: *id,
                        peer_url: url.clone(),
                    })
                    .collect(),
                removed: membership.removed.iter().copied().collect(),
                entry_format: self.transport.formats().own(),
            }
        };
        let mut response = reply(StatusCode::OK, "");
        *response.body_mut() = Full::new(Bytes::from(
            serde_json::to_vec(&view).expect("a view always encodes"),
        ));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }

    /// The answer to a message from `from`, if it must not be stepped: 410 for a removed
    /// member.
    fn refuse(&self, from: u64) -> Option<Response<Full<Bytes>>> {
        if self.membership.read().unwrap().removed.contains(&from) {
            let mut gone = reply(
                StatusCode::GONE,
                &format!("node {from} was removed from the cluster"),
            );
            if let Some(ours) = self.cluster_id.get() {
                let value = cluster_id::format(ours)
                    .parse()
                    .expect("hex is a header value");
                gone.headers_mut().insert(cluster_id::HEADER, value);
            }
            return Some(gone);
        }
        None
    }

    /// Whether `msg` comes from a peer of this node, addressed to it (to a replica on
    /// this node: a raft id's node part, `replica_id.rs`). Anything else is dropped,
    /// counted and logged once per sender: a member this node has not applied yet is
    /// heard from once it has (raft sends again).
    fn sent_by_a_peer(&self, msg: &Message) -> bool {
        if node_of(msg.to) == self.own_id && self.transport.knows_peer(node_of(msg.from)) {
            return true;
        }
        Metrics::inc(&self.metrics.peer_messages_refused);
        if self.unknown_senders.first(msg.from) {
            warn!(self.logger, "dropping raft messages from a node that is not a known peer, or addressed to another";
                "from" => msg.from, "to" => msg.to);
        }
        false
    }

    /// Whether group `group_id` takes a message from the replica with raft id `from`, as
    /// the table of groups this node applied so far says. The cluster group takes every
    /// member's (checked before) under its node id. A data group takes only the replica
    /// the table places in it: a node is placed before the group adds its replica and
    /// taken out only after the group removed it, so every replica the group's
    /// configuration names passes; a cluster member that hosts no replica of the group,
    /// or speaks for one the group removed (an earlier incarnation), does not. A group
    /// not in the table is [`Admission::Unknown`]: one this node has not learnt of yet
    /// will be sent to again.
    fn admission(&self, group_id: u64, from: u64) -> Admission {
        if group_id == CLUSTER_GROUP {
            return match incarnation_of(from) {
                0 => Admission::Admitted,
                _ => Admission::Outsider(format!("raft id {from} is no member's in group 1")),
            };
        }
        let membership = self.membership.read().unwrap();
        let Some(placement) = membership.groups.get(&group_id) else {
            return Admission::Unknown;
        };
        let node = node_of(from);
        if !placement.members.contains(&node) {
            return Admission::Outsider(format!(
                "node {node} hosts no replica of group {group_id}"
            ));
        }
        match placement.replica_of(node) {
            current if current == from => Admission::Admitted,
            current => Admission::Outsider(format!(
                "raft id {from} is not node {node}'s replica of group {group_id} (that is {current})"
            )),
        }
    }

    /// Counts a message refused as [`Admission::Outsider`], and logs it once per sender.
    fn refuse_outsider(&self, from: u64, why: &str) {
        Metrics::inc(&self.metrics.peer_messages_refused);
        if self.outsiders.first(from) {
            warn!(self.logger, "refused raft messages from a replica the table of groups does not place in their group";
                "from" => from, "reason" => why);
        }
    }

    /// Reads a message stream: frames may arrive split across chunks; each complete one is
    /// stepped at once.
    async fn receive_messages(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let format = entry_formats::parse(
            req.headers()
                .get(entry_formats::HEADER)
                .and_then(|v| v.to_str().ok()),
        );
        let mut format_heard_from = None;
        let mut body = req.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(chunk) = frame.map(|f| f.into_data().unwrap_or_default()) else {
                break; // the sender went away; whatever it sent has been stepped
            };
            pending.extend_from_slice(&chunk);
            let messages = match take_frames(&mut pending, self.max_frame_bytes) {
                Ok(messages) => messages,
                Err(e) => {
                    warn!(self.logger, "malformed peer message stream"; "error" => &e);
                    return reply(StatusCode::BAD_REQUEST, &e);
                }
            };
            for (group_id, msg) in messages {
                let peer = node_of(msg.from);
                if let Some(refusal) = self.refuse(peer) {
                    return refusal;
                }
                if !self.sent_by_a_peer(&msg) {
                    continue;
                }
                if format_heard_from != Some(peer) {
                    self.transport.heard_format(peer, format);
                    format_heard_from = Some(peer);
                }
                if self.partition.is_blocked(peer) {
                    continue;
                }
                match self.admission(group_id, msg.from) {
                    Admission::Admitted => self.node.step(group_id, msg),
                    Admission::Unknown => {}
                    Admission::Outsider(why) => self.refuse_outsider(msg.from, &why),
                }
            }
        }
        if !pending.is_empty() {
            warn!(self.logger, "peer message stream ended inside a frame");
        }
        reply(StatusCode::NO_CONTENT, "")
    }

    /// Receives a snapshot file: at most one upload per peer at a time, at most
    /// `max_snapshot_bytes`, within `SNAPSHOT_TIMEOUT` (and `SNAPSHOT_IDLE_TIMEOUT`
    /// between chunks). The file is written and fsynced under a temporary name, its
    /// checksum and its header's metadata are checked against the message, and only
    /// then is the message handed to the group, which gives the file its final name
    /// only if raft takes the snapshot (`Group::take_received_snapshot`). Anything else
    /// deletes the file.
    async fn receive_snapshot(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, String> {
        static UPLOADS: AtomicU64 = AtomicU64::new(0);
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let msg = header(MESSAGE_HEADER)
            .and_then(hex_decode)
            .and_then(|bytes| Message::parse_from_bytes(&bytes).ok())
            .filter(|msg| msg.get_msg_type() == MessageType::MsgSnapshot);
        let group_id = header(GROUP_HEADER).and_then(|g| g.parse::<u64>().ok());
        let (Some(msg), Some(group_id)) = (msg, group_id) else {
            let why = "missing or malformed raft message (a MsgSnapshot) or raft group header";
            warn!(self.logger, "refused a snapshot upload"; "reason" => why);
            return Ok(reply(StatusCode::BAD_REQUEST, why));
        };
        let declared =
            header(hyper::header::CONTENT_LENGTH.as_str()).and_then(|n| n.parse::<u64>().ok());
        let peer = node_of(msg.from);
        if let Some(refusal) = self.refuse(peer) {
            return Ok(refusal);
        }
        if !self.sent_by_a_peer(&msg) {
            return Ok(reply(
                StatusCode::FORBIDDEN,
                &format!("node {peer} is not a member this node knows of"),
            ));
        }
        match self.admission(group_id, msg.from) {
            Admission::Admitted => {}
            Admission::Unknown => {
                return Ok(reply(
                    StatusCode::NOT_FOUND,
                    &format!("raft group {group_id} is unknown here"),
                ));
            }
            Admission::Outsider(why) => {
                self.refuse_outsider(msg.from, &why);
                return Ok(reply(StatusCode::FORBIDDEN, &why));
            }
        }
        if self.partition.is_blocked(peer) {
            return Ok(reply(StatusCode::NO_CONTENT, ""));
        }
        if declared.is_some_and(|bytes| bytes > self.max_snapshot_bytes) {
            return Ok(self.too_large(peer, declared.unwrap_or_default()));
        }
        let Some(_upload) = UploadSlot::take(&self.uploads, peer) else {
            return Ok(reply(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("a snapshot upload from node {peer} is already in progress"),
            ));
        };
        let meta = msg.get_snapshot().get_metadata().clone();
        let index = meta.index;
        let snap_dir = snapshot::dir_of(&self.data_dir, group_id);
        let upload = UPLOADS.fetch_add(1, Ordering::Relaxed);
        let tmp = snap_dir.join(format!("recv-{index:016x}-{upload}.tmp"));
        let received = tokio::time::timeout(
            SNAPSHOT_TIMEOUT,
            self.write_upload(req.into_body(), &snap_dir, &tmp),
        )
        .await
        .unwrap_or(Err(Upload::TooSlow(SNAPSHOT_TIMEOUT)));
        let checked = match received {
            Ok(bytes) => {
                let file = tmp.clone();
                tokio::task::spawn_blocking(move || snapshot::verify(&file))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .and_then(|found| same_snapshot(&found, &meta))
                    .map(|()| bytes)
                    .map_err(Upload::Bad)
            }
            Err(e) => Err(e),
        };
        let outcome = match checked {
            Ok(bytes) => {
                let from = msg.from;
                match self
                    .node
                    .snapshot_received(group_id, msg, tmp.clone())
                    .await
                {
                    Ok(()) => {
                        info!(self.logger, "received a snapshot"; "group" => group_id, "from" => from, "index" => index, "bytes" => bytes);
                        Ok(reply(StatusCode::NO_CONTENT, ""))
                    }
                    Err(why) => {
                        info!(self.logger, "a received snapshot was not taken"; "group" => group_id, "from" => from, "index" => index, "reason" => &why);
                        Ok(reply(StatusCode::CONFLICT, &why))
                    }
                }
            }
            Err(Upload::TooLarge(bytes)) => Ok(self.too_large(msg.from, bytes)),
            Err(Upload::Bad(why)) => {
                warn!(self.logger, "refused a snapshot upload"; "from" => msg.from, "reason" => &why);
                Ok(reply(StatusCode::BAD_REQUEST, &why))
            }
            Err(Upload::TooSlow(limit)) => {
                let why = format!("the upload took longer than {limit:?} (or paused that long)");
                warn!(self.logger, "refused a snapshot upload"; "from" => msg.from, "reason" => &why);
                Ok(reply(StatusCode::REQUEST_TIMEOUT, &why))
            }
            Err(Upload::Io(e)) => Err(e),
        };
        // Moved away if raft took it; otherwise it must not stay.
        let _ = tokio::fs::remove_file(&tmp).await;
        outcome
    }

    fn too_large(&self, from: u64, bytes: u64) -> Response<Full<Bytes>> {
        let why = format!(
            "a snapshot upload of at least {bytes} bytes from node {from} is over this node's \
             --max-snapshot-bytes ({})",
            self.max_snapshot_bytes
        );
        warn!(self.logger, "refused a snapshot upload"; "reason" => &why);
        reply(StatusCode::PAYLOAD_TOO_LARGE, &why)
    }

    async fn write_upload(
        &self,
        mut body: Incoming,
        dir: &std::path::Path,
        path: &std::path::Path,
    ) -> Result<u64, Upload> {
        let failed = |e: String| Upload::Io(e);
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| failed(format!("cannot create {}: {e}", path.display())))?;
        let mut bytes = 0;
        loop {
            let frame = tokio::time::timeout(SNAPSHOT_IDLE_TIMEOUT, body.frame())
                .await
                .map_err(|_| Upload::TooSlow(SNAPSHOT_IDLE_TIMEOUT))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| Upload::Bad(format!("upload interrupted: {e}")))?;
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
                if bytes > self.max_snapshot_bytes {
                    return Err(Upload::TooLarge(bytes));
                }
                file.write_all(data)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
            }
        }
        file.sync_all().await.map_err(|e| failed(e.to_string()))?;
        Ok(bytes)
    }
}

/// Why an upload was not taken in.
enum Upload {
    /// Over `--max-snapshot-bytes` (413).
    TooLarge(u64),
    /// Not a whole, valid file of the announced snapshot (400).
    Bad(String),
    /// Over the deadline, or paused too long (408).
    TooSlow(Duration),
    /// This node could not write it (500).
    Io(String),
}

/// A peer's one upload in progress; the slot frees when it is dropped.
struct UploadSlot<'a> {
    uploads: &'a Mutex<std::collections::HashSet<u64>>,
    peer: u64,
}

impl<'a> UploadSlot<'a> {
    fn take(uploads: &'a Mutex<std::collections::HashSet<u64>>, peer: u64) -> Option<Self> {
        let free = uploads.lock().unwrap().insert(peer);
        // Built only if taken: dropping a slot frees it.
        free.then(|| UploadSlot { uploads, peer })
    }
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        self.uploads.lock().unwrap().remove(&self.peer);
    }
}

/// The file must hold the snapshot the message announces: same index, term and
/// configuration.
fn same_snapshot(
    found: &snapshot::SnapshotMeta,
    sent: &raft::eraftpb::SnapshotMetadata,
) -> Result<(), String> {
    if found.index != sent.index
        || found.term != sent.term
        || found.conf_state != *sent.get_conf_state()
    {
        return Err(format!(
            "the uploaded file holds the snapshot at index {} term {}, the message announces index {} term {} (or another configuration)",
            found.index, found.term, sent.index, sent.term
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_is_logged_once_and_only_so_many_are_remembered() {
        let logged = LoggedOnce::default();
        assert!(logged.first(7));
        assert!(!logged.first(7));
        for key in 100..100 + MAX_LOGGED_KEYS as u64 {
            logged.first(key);
        }
        assert!(
            !logged.first(1 << 40),
            "past the bound nothing new is remembered"
        );
        assert_eq!(logged.0.lock().unwrap().len(), MAX_LOGGED_KEYS);
    }
}
