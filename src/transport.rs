//! Raft messages to the other members, over HTTP: the sending half of the peer port
//! (`peer_service.rs` is the receiving half).
//!
//! As etcd's rafthttp does, one long-lived `POST <peer-url>/raft` per peer whose chunked
//! body carries frames of raft messages as they come: no round trip per message, no
//! waiting for an answer before the next. `peer_stream.rs` keeps that stream (the node's
//! thread writes into the socket itself); this file routes each Ready's messages to their
//! peers' streams, one chunk per peer. When a stream breaks the next message opens a new
//! one. Raft tolerates lost messages, so a full backlog drops rather than blocks the node,
//! and a failed stream is reported to raft-rs (`report_unreachable`) and logged once per
//! outage, not once per message.
//!
//! Snapshots do not travel inside a raft message: raft-rs's `MsgSnapshot` carries only the
//! metadata, and its sender streams the snapshot file (read in chunks, never whole in
//! memory) to `<peer-url>/raft/snapshot`, with the message itself in a header. The outcome
//! goes back to raft-rs through `report_snapshot`.
//!
//! Every stream and upload names this node's cluster id. A "you were removed" (410) answer
//! is believed only once [`RemovalCheck`] confirms it. Nothing here interprets raft
//! messages beyond their addressing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use slog::{debug, info, warn, Logger};

use crate::cluster_id::{self, ClusterId};
use crate::entry_formats::{self, EntryFormats};
use crate::faults::Partition;
use crate::membership::{self, Membership, SharedMembership};
use crate::metrics::Metrics;
use crate::peer_frame::encode_frame;
use crate::peer_stream::{PeerStream, StreamTarget, CONNECT_TIMEOUT};
use crate::replica_id::node_of;
use crate::router::Router;
use crate::snapshot;
use crate::tls::{self, Tls};

/// The path peers POST raft messages to.
pub const RAFT_PATH: &str = "/raft";
/// The path peers stream snapshot files to.
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";
/// Headers of a snapshot upload: the hex-encoded MsgSnapshot and its raft group.
pub const MESSAGE_HEADER: &str = "x-raft-message";
pub const GROUP_HEADER: &str = "x-raft-group";
/// A snapshot upload may take this long before it is given up.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

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

/// A raft message in a header: two lowercase hex digits a byte.
fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes [`hex_encode`] wrote, or `None` for text it could not have written.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
