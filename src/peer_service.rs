//! The receiving half of the peer port (`transport.rs` is the sending half): raft message
//! streams, snapshot uploads, and client requests that another node forwards.
//!
//! [`handle_peer_request`] decodes frames as they arrive and steps each message into its
//! group through the router. Every stream and upload names its cluster id; one from
//! another cluster is refused with 412, so a stray peer can neither feed raft nor tell a
//! node it was removed. A message from a removed member is answered 410 Gone, which tells
//! that member it was removed. Every message carries its raft group id, and one stream
//! carries every group's messages between two processes, addressed by the node part of
//! their raft ids (`replica_id.rs`); a message for a group not in the cluster's table is
//! dropped (raft sends again), and one from a replica the table does not place in its
//! group is refused (a snapshot upload with 403, before a byte is written).
//!
//! A snapshot upload: one per peer at a time, up to `--max-snapshot-bytes` and within a
//! deadline; the file is written under a temporary name and made durable, its checksum and
//! its header are checked against the message, and only then is the message handed to the
//! group, which names the file as a snapshot only if raft takes it.
//!
//! The peer port also takes client requests that another node forwards to a group hosted
//! here (`/client/v1/groups/...`, see `api/forward.rs`). Nothing here interprets raft
//! messages beyond their addressing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use slog::{info, warn, Logger};
use tokio::io::AsyncWriteExt;

use crate::cluster_id::{self, ClusterId};
use crate::entry_formats;
use crate::faults::Partition;
use crate::http_server::{text_response as reply, FromPeer};
use crate::membership::{self, SharedMembership};
use crate::metrics::Metrics;
use crate::peer_frame::take_frames;
use crate::replica_id::{incarnation_of, node_of};
use crate::response_body::ResponseBody;
use crate::router::{Router, CLUSTER_GROUP};
use crate::snapshot;
use crate::transport::{
    hex_decode, Transport, GROUP_HEADER, MESSAGE_HEADER, RAFT_PATH, SNAPSHOT_PATH, SNAPSHOT_TIMEOUT,
};

/// A snapshot upload may pause this long between two chunks before it is given up.
const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
