//! Forwarding: a request for a raft group this node does not host goes to a node that
//! does, through that node's peer port (`<peer-url>/client/v1/groups/<g>/...`), and its
//! answer comes back. The seed's multi-raft example answers such a request with an
//! error; here any node serves any group and any key.
//!
//! A forwarded request carries [`FORWARDED_HEADER`] and the cluster id, and is never
//! forwarded again: a node that receives one for a group it does not host, or does not
//! know yet (its cluster group is behind), answers 421 (Misdirected Request) marked
//! [`NOT_HOSTED_HEADER`], and the forwarder tries the group's next node; if none can
//! serve, the client gets 503 (retry). Such an answer must never pass for the group's
//! own: a "no such group" 404 from a node that is behind would read as "no such key". Another node is
//! also tried when a connection could not be made; a request that may have reached a
//! node is never sent twice (a PUT could apply twice), so its timeout is answered as an
//! unknown outcome.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::{read_body, Api, Failure, Reply};
use crate::cluster_id;
use crate::peer_service::FORWARD_PREFIX;

/// The header that carries a key's revision with a raw value (relayed as it is).
pub const REVISION_HEADER: &str = "x-raftkvd-revision";
/// Marks a forwarded request; its value is the id of the node that forwarded it.
pub const FORWARDED_HEADER: &str = "x-raftkvd-forwarded";
/// On a 421 answer to a forwarded request: the node does not host (or does not know yet)
/// the group, so another node may. A 421 without it is final (the key is not the
/// group's).
pub const NOT_HOSTED_HEADER: &str = "x-raftkvd-not-hosted";
/// On a read of a key: the id of the node whose map answered it (a forwarded read names
/// the host, not the forwarder), as etcd's response header names its member.
pub const SERVED_BY_HEADER: &str = "x-raftkvd-served-by";
/// On a linearizable read of a key: the read index it waited for (the leader's commit
/// index when the read arrived); the map answered once it had applied that much.
pub const READ_INDEX_HEADER: &str = "x-raftkvd-read-index";
/// Headers of the client's request and of the answer that travel with them.
const REQUEST_HEADERS: [HeaderName; 2] = [CONTENT_TYPE, ACCEPT];
const ANSWER_HEADERS: [HeaderName; 5] = [
    CONTENT_TYPE,
    HeaderName::from_static(REVISION_HEADER),
    HeaderName::from_static(SERVED_BY_HEADER),
    HeaderName::from_static(READ_INDEX_HEADER),
    ALLOW,
];

/// A request to send to a node that hosts a group: `path` is the client path (with its
/// query) that node serves it under.
pub(super) struct Forwarded {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Forwarded {
    /// A POST of JSON `body` to client path `path`.
    pub fn json_post(path: String, body: Bytes) -> Forwarded {
        Forwarded {
            method: Method::POST,
            path,
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        }
    }
}

/// How long a host may take to answer a request forwarded under `path`: a long poll
/// (`?wait=true`, `api/watch_v1.rs`) as long as it asks to wait, anything else the
/// request timeout; and a second more, so that the host's own timeout answers first.
fn answer_timeout(path: &str, request_timeout: Duration) -> Duration {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let long_poll = query.split('&').any(|p| p == "wait=true");
    let wait = query
        .split('&')
        .find_map(|p| p.strip_prefix("timeout_ms="))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(super::request::WAIT_DEFAULT, Duration::from_millis)
        .min(super::request::WAIT_LONGEST);
    match long_poll {
        true => wait.max(request_timeout) + Duration::from_secs(1),
        false => request_timeout + Duration::from_secs(1),
    }
}

impl Api {
    /// Sends `req`, for group `group`, to a node that hosts it, under `path` (default:
    /// the request's own path and query), and relays the answer.
    pub(super) async fn forward(
        &self,
        group: u64,
        req: Request<Incoming>,
        path: Option<String>,
    ) -> Reply {
        let hosts = self.hosts_of(group);
        self.forward_to(hosts, group, req, path).await
    }

    /// The same, to one of `hosts` (node id, peer URL).
    pub(super) async fn forward_to(
        &self,
        hosts: Vec<(u64, String)>,
        group: u64,
        req: Request<Incoming>,
        path: Option<String>,
    ) -> Reply {
        if req.headers().contains_key(FORWARDED_HEADER) {
            return Err(Failure::not_hosted_here(group));
        }
        let path = path.unwrap_or_else(|| {
            req.uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string())
        });
        let headers = REQUEST_HEADERS
            .iter()
            .filter_map(|name| Some((name.clone(), req.headers().get(name)?.clone())))
            .collect();
        let method = req.method().clone();
        let body = read_body(req, self.max_value_bytes).await?;
        let request = Forwarded {
            method,
            path,
            headers,
            body,
        };
        let answer = self.send_via(hosts, group, request).await?;
        relay(answer).await
    }

    /// Sends `request` to a node that hosts `group` and returns its answer: from the
    /// first node that answers other than 421.
    async fn send_to_host(
        &self,
        group: u64,
        request: Forwarded,
    ) -> Result<reqwest::Response, Failure> {
        let mut hosts = self.hosts_of(group);
        // Any host will do (a follower passes writes to its leader); starting from a
        // different one each time keeps one slow or paused host from holding up every
        // forwarded request.
        if !hosts.is_empty() {
            let start = (crate::random::random_u64() % hosts.len() as u64) as usize;
            hosts.rotate_left(start);
        }
        self.send_via(hosts, group, request).await
    }

    async fn send_via(
        &self,
        hosts: Vec<(u64, String)>,
        group: u64,
        request: Forwarded,
    ) -> Result<reqwest::Response, Failure> {
        let mut passed = Vec::new();
        for (node, url) in hosts {
            let mut attempt = self
                .peers
                .request(
                    request.method.clone(),
                    format!("{url}{FORWARD_PREFIX}{}", request.path),
                )
                .header(FORWARDED_HEADER, self.id.to_string())
                .timeout(answer_timeout(&request.path, self.request_timeout))
                .body(request.body.clone());
            if let Some(id) = self.cluster_id.get() {
                attempt = attempt.header(cluster_id::HEADER, cluster_id::format(id));
            }
            for (name, value) in &request.headers {
                attempt = attempt.header(name, value);
            }
            match attempt.send().await {
                Ok(answer) if answer.headers().contains_key(NOT_HOSTED_HEADER) => {
                    let why = answer.bytes().await.unwrap_or_default();
                    passed.push(format!("node {node}: {}", error_text(&why)));
                }
                Ok(answer) => return Ok(answer),
                Err(e) if e.is_connect() => passed.push(format!("node {node}: {e}")),
                Err(e) => {
                    return Err(Failure::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "forwarded to node {node}, which hosts group {group}, but got no \
                             answer ({e}): the outcome is unknown"
                        ),
                    ))
                }
            }
        }
        Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no node that hosts group {group} could be reached ({}); retry",
                passed.join("; ")
            ),
        ))
    }

    /// Sends `request` to a node that hosts `group` and reads the whole answer. An answer
    /// that breaks off is an unknown outcome (503), never an empty success.
    pub(super) async fn send_and_read(
        &self,
        group: u64,
        request: Forwarded,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let answer = self.send_to_host(group, request).await?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(broken_off)?;
        Ok((status, body))
    }

    /// Sends `request` to a node that hosts `group` and relays its answer as it came
    /// (with the headers that travel with answers).
    pub(super) async fn send_and_relay(&self, group: u64, request: Forwarded) -> Reply {
        let answer = self.send_to_host(group, request).await?;
        relay(answer).await
    }

    /// Sends `request` to a node that hosts `group`: the status and body of a success,
    /// anything else as this node's failure.
    pub(super) async fn send_for_success(
        &self,
        group: u64,
        request: Forwarded,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let (status, body) = self.send_and_read(group, request).await?;
        match status.is_success() {
            true => Ok((status, body)),
            false => Err(failure_of(status, &body)),
        }
    }

    /// POSTs JSON `body` to client path `path` on a node that hosts `group` and relays
    /// its answer: a success as it came, anything else as this node's failure.
    pub(super) async fn post_json(&self, group: u64, path: String, body: Bytes) -> Reply {
        let (status, body) = self
            .send_for_success(group, Forwarded::json_post(path, body))
            .await?;
        Ok(super::json_bytes(status, body.to_vec()))
    }

    /// A GET of the JSON at client path `path` on a node that hosts `group`.
    pub(super) async fn fetch_json(
        &self,
        group: u64,
        path: String,
    ) -> Result<serde_json::Value, Failure> {
        let request = Forwarded {
            method: Method::GET,
            path,
            headers: Vec::new(),
            body: Bytes::new(),
        };
        let (status, body) = self.send_and_read(group, request).await?;
        if status != StatusCode::OK {
            return Err(failure_of(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            Failure::new(
                StatusCode::BAD_GATEWAY,
                format!("a node that hosts group {group} answered with bad JSON: {e}"),
            )
        })
    }

    /// Node `node` and its peer URL, if it is a member of the cluster.
    pub(super) fn node_url(&self, node: u64) -> Option<(u64, String)> {
        let membership = self.membership.read().unwrap();
        Some((node, membership.peer_urls.get(&node)?.clone()))
    }

    /// The nodes (and their peer URLs) the cluster's table lists for `group`, this node
    /// left out.
    pub(super) fn hosts_of(&self, group: u64) -> Vec<(u64, String)> {
        let membership = self.membership.read().unwrap();
        let Some(placement) = membership.groups.get(&group) else {
            return Vec::new();
        };
        placement
            .members
            .iter()
            .filter(|&&id| id != self.id)
            .filter_map(|id| Some((*id, membership.peer_urls.get(id)?.clone())))
            .collect()
    }
}

/// The answer of the node a request was forwarded to, as this node's answer.
async fn relay(answer: reqwest::Response) -> Reply {
    let status = answer.status();
    let headers: Vec<(HeaderName, HeaderValue)> = ANSWER_HEADERS
        .iter()
        .filter_map(|name| Some((name.clone(), answer.headers().get(name)?.clone())))
        .collect();
    let body = answer.bytes().await.map_err(broken_off)?;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    Ok(response)
}

/// The failure a forwarded request's error answer stands for here.
pub(super) fn failure_of(status: StatusCode, body: &[u8]) -> Failure {
    let revision = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["revision"].as_u64());
    Failure {
        revision,
        ..Failure::new(status, error_text(body))
    }
}

/// The message of an error answer: its JSON `error`, or its text.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

fn broken_off(e: reqwest::Error) -> Failure {
    Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the forwarded request's answer broke off ({e}): the outcome is unknown"),
    )
}
