//! Raft messages between members, over HTTP.
//!
//! Sending: one queue and one task per peer; the task takes every message waiting in the
//! queue, encodes them into one body and POSTs it to `<peer-url>/raft` over a persistent
//! connection. Raft tolerates lost messages, so a full queue drops rather than blocks the
//! node, and a failed send is reported to raft-rs (`report_unreachable`) and logged once
//! per outage, not once per message.
//!
//! Receiving: [`handle_peer_request`] decodes a body and steps each message into the node.
//! A message from a removed member is answered 410 Gone, which tells that member it was
//! removed. Every message carries its raft group id so that one process can later host
//! many groups. Nothing here interprets raft messages beyond their addressing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use protobuf::Message as _;
use raft::eraftpb::Message;
use slog::{debug, info, warn, Logger};
use tokio::sync::mpsc;

use crate::faults::Partition;
use crate::http_server::text_response as reply;
use crate::membership::SharedMembership;
use crate::node::{NodeHandle, GROUP_ID};

/// The path peers POST raft messages to.
pub const RAFT_PATH: &str = "/raft";
/// Messages waiting for one peer before new ones are dropped.
const PEER_QUEUE_LEN: usize = 4096;
/// Most messages sent in one request.
const MAX_BATCH: usize = 512;
/// Largest body a peer may send.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;
/// A peer that does not answer within this long is treated as unreachable.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One message addressed to one raft group.
type GroupMessage = (u64, Message);

/// The sending half: a queue per peer.
pub struct Transport {
    peers: Mutex<HashMap<u64, Peer>>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    node: NodeHandle,
    partition: Arc<Partition>,
    logger: Logger,
}

struct Peer {
    url: String,
    queue: mpsc::Sender<GroupMessage>,
}

impl Transport {
    pub fn new(
        runtime: tokio::runtime::Handle,
        node: NodeHandle,
        partition: Arc<Partition>,
        logger: Logger,
    ) -> Transport {
        let client = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .build()
            .expect("the HTTP client has a valid static configuration");
        Transport {
            peers: Mutex::new(HashMap::new()),
            client,
            runtime,
            node,
            partition,
            logger,
        }
    }

    /// Starts sending to `id` at `url` (or moves it there).
    pub fn set_peer(&self, id: u64, url: &str) {
        let mut peers = self.peers.lock().unwrap();
        if peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        let (queue, rx) = mpsc::channel(PEER_QUEUE_LEN);
        let sender = PeerSender {
            id,
            endpoint: format!("{url}{RAFT_PATH}"),
            client: self.client.clone(),
            node: self.node.clone(),
            logger: self.logger.new(slog::o!("peer" => id)),
        };
        self.runtime.spawn(sender.run(rx));
        peers.insert(
            id,
            Peer {
                url: url.to_string(),
                queue,
            },
        );
    }

    /// Stops sending to `id`; its task ends when its queue is dropped.
    pub fn remove_peer(&self, id: u64) {
        self.peers.lock().unwrap().remove(&id);
    }

    /// Queues raft messages of `group_id` for their recipients. Never blocks.
    pub fn send(&self, group_id: u64, messages: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        for msg in messages {
            let to = msg.to;
            if self.partition.is_blocked(to) {
                continue;
            }
            match peers.get(&to) {
                Some(peer) => {
                    if peer.queue.try_send((group_id, msg)).is_err() {
                        debug!(self.logger, "peer queue full, dropping a message"; "peer" => to);
                    }
                }
                None => {
                    debug!(self.logger, "no address for peer, dropping a message"; "peer" => to)
                }
            }
        }
    }
}

/// The task that drains one peer's queue.
struct PeerSender {
    id: u64,
    endpoint: String,
    client: reqwest::Client,
    node: NodeHandle,
    logger: Logger,
}

impl PeerSender {
    async fn run(self, mut queue: mpsc::Receiver<GroupMessage>) {
        let mut reachable = true;
        let mut batch = Vec::new();
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let body = encode_batch(&batch);
            batch.clear();
            let failure = match self.client.post(&self.endpoint).body(body).send().await {
                Ok(resp) if resp.status().is_success() => None,
                Ok(resp) if resp.status() == StatusCode::GONE => {
                    let reason = resp.text().await.unwrap_or_default();
                    warn!(self.logger, "peer says this node was removed from the cluster"; "reason" => reason);
                    self.node.removed_by_peer(self.id);
                    return;
                }
                Ok(resp) => Some(format!("HTTP {}", resp.status())),
                Err(e) => Some(e.to_string()),
            };
            match failure {
                None if !reachable => {
                    info!(self.logger, "peer is reachable again");
                    reachable = true;
                }
                None => {}
                Some(error) => {
                    if reachable {
                        warn!(self.logger, "peer unreachable; messages to it are dropped until it answers"; "error" => error);
                        reachable = false;
                    }
                    self.node.report_unreachable(self.id);
                }
            }
        }
    }
}

/// Frames: `group id (u64 LE) | length (u32 LE) | protobuf-encoded raft message`, repeated.
fn encode_batch(batch: &[GroupMessage]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (group_id, msg) in batch {
        let bytes = msg.write_to_bytes().expect("raft messages always encode");
        buf.extend_from_slice(&group_id.to_le_bytes());
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(&bytes);
    }
    buf
}

fn decode_batch(mut bytes: &[u8]) -> Result<Vec<GroupMessage>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 12 {
            return Err("truncated frame header".into());
        }
        let group_id = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        bytes = &bytes[12..];
        if bytes.len() < len {
            return Err("truncated frame".into());
        }
        let msg = Message::parse_from_bytes(&bytes[..len])
            .map_err(|e| format!("bad raft message: {e}"))?;
        out.push((group_id, msg));
        bytes = &bytes[len..];
    }
    Ok(out)
}

/// Answers a request on the peer port: `POST /raft` with a batch of raft messages.
pub async fn handle_peer_request(
    req: Request<Incoming>,
    node: NodeHandle,
    membership: SharedMembership,
    partition: Arc<Partition>,
    logger: Logger,
) -> Response<Full<Bytes>> {
    if req.uri().path() != RAFT_PATH {
        return reply(StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            warn!(logger, "could not read a peer request"; "error" => %e);
            return reply(StatusCode::BAD_REQUEST, "could not read body");
        }
    };
    let batch = match decode_batch(&body) {
        Ok(batch) => batch,
        Err(e) => {
            warn!(logger, "malformed peer request"; "error" => &e);
            return reply(StatusCode::BAD_REQUEST, &e);
        }
    };
    for (group_id, msg) in batch {
        if membership.read().unwrap().removed.contains(&msg.from) {
            return reply(
                StatusCode::GONE,
                &format!("node {} was removed from the cluster", msg.from),
            );
        }
        if group_id != GROUP_ID {
            warn!(logger, "message for an unknown raft group"; "group" => group_id, "from" => msg.from);
            return reply(StatusCode::NOT_FOUND, "unknown raft group");
        }
        if !partition.is_blocked(msg.from) {
            node.step(msg);
        }
    }
    reply(StatusCode::NO_CONTENT, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::MessageType;

    #[test]
    fn batch_round_trips_and_rejects_garbage() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 1;
        m.to = 2;
        m.term = 5;
        let batch = vec![(1, m.clone()), (7, m)];
        let bytes = encode_batch(&batch);
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
        assert!(decode_batch(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_batch(&[1, 2, 3]).is_err());
    }
}
