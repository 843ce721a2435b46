//! The client-facing HTTP API, raftexample's routes:
//!
//! | request                  | does                                        |
//! |--------------------------|---------------------------------------------|
//! | `GET /<key>`             | 200 with the value, 404 if absent; linearizable (ReadIndex) unless `?consistency=serializable` |
//! | `PUT /<key>` body=value  | 204 once committed and applied on this node  |
//! | `POST /<id>` body=URL    | adds node `<id>` with that peer URL; 204     |
//! | `DELETE /<id>`           | removes node `<id>`; 204                      |
//! | `POST /debug/partition`  | test-only (`--enable-fault-injection`): drop raft messages to/from the listed peers |
//! | `GET /status`            | JSON: id, term, role, leader, commit, applied, members |
//! | `GET /health`            | 200 while the process serves                 |
//! | `GET /metrics`           | Prometheus text format                        |
//! | `GET /readyz`            | 200 once a leader is known and all known commits are applied; else 503 |
//!
//! This module parses and validates requests, hands them to the node, and maps every
//! outcome to one status with a plain-text message; each error is logged here, once. It
//! never answers 204 for a write whose outcome it does not know.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use slog::{warn, Logger};

use crate::command::Command;
use crate::faults::Partition;
use crate::http_server::text_response;
use crate::kv::SharedKv;
use crate::membership::{parse_node_id, parse_peer_url};
use crate::metrics::Metrics;
use crate::node::{MemberChange, NodeHandle, ProposeError};

/// The methods the key and node routes accept.
const ALLOWED: &str = "GET, PUT, POST, DELETE";
/// Largest body of a POST /<id> (a peer URL).
const MAX_URL_BYTES: usize = 4096;
/// The fault-injection route (without its leading slash).
const PARTITION_ROUTE: &str = "debug/partition";

/// What every request handler needs.
pub struct Api {
    pub node: NodeHandle,
    pub kv: SharedKv,
    pub max_value_bytes: usize,
    pub request_timeout: Duration,
    /// Present only with `--enable-fault-injection`.
    pub partition: Option<Arc<Partition>>,
    pub metrics: Arc<Metrics>,
    pub logger: Logger,
}

/// A request that failed: the status and the message the client sees.
struct Failure(StatusCode, String);

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure(status, message.into())
    }
}

impl From<ProposeError> for Failure {
    fn from(e: ProposeError) -> Failure {
        match e {
            ProposeError::Conflict(why) => Failure::new(StatusCode::CONFLICT, why),
            ProposeError::NoLeader => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no leader: the cluster is electing one or this node is cut off; retry",
            ),
            ProposeError::Dropped(why) => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("raft did not accept the proposal ({why}); retry"),
            ),
            ProposeError::Timeout => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not applied within the request timeout: the outcome is unknown",
            ),
            ProposeError::Stopped => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down")
            }
        }
    }
}

impl Api {
    /// Answers one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = std::time::Instant::now();
        self.metrics
            .requests_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let target = path.strip_prefix('/').unwrap_or(&path).to_string();
        let route = route_of(&method, &target);
        let response = self.route(req, &method, &path, &target).await;
        self.metrics
            .requests_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .request_done(route, response.status().as_u16(), started.elapsed());
        response
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        method: &Method,
        path: &str,
        target: &str,
    ) -> Response<Full<Bytes>> {
        let result = match method.clone() {
            Method::GET if target == "status" => self.status().await,
            Method::GET if target == "health" => Ok(text_response(StatusCode::OK, "ok\n")),
            Method::GET if target == "readyz" => self.ready().await,
            Method::GET if target == "metrics" => {
                Ok(text_response(StatusCode::OK, &self.metrics.render()))
            }
            Method::GET => self.get(target, req.uri().query()).await,
            Method::PUT => self.put(target, req).await,
            Method::POST if target == PARTITION_ROUTE && self.partition.is_some() => {
                self.set_partition(req).await
            }
            Method::POST => self.add_member(target, req).await,
            Method::DELETE => self.remove_member(target).await,
            _ => Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} is not allowed; use {ALLOWED}"),
            )),
        };
        match result {
            Ok(response) => response,
            Err(Failure(status, message)) => {
                // A missing key is an ordinary answer, not an error worth a log line.
                if status != StatusCode::NOT_FOUND {
                    warn!(self.logger, "request failed";
                        "method" => %method, "path" => path,
                        "status" => status.as_u16(), "reason" => &message);
                }
                let mut response = text_response(status, &format!("{message}\n"));
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    response
                        .headers_mut()
                        .insert(ALLOW, ALLOWED.parse().unwrap());
                }
                response
            }
        }
    }

    async fn get(&self, key: &str, query: Option<&str>) -> Result<Response<Full<Bytes>>, Failure> {
        let key = check_key(key)?;
        if read_consistency(query)? == Consistency::Linearizable {
            self.node
                .read_index(self.request_timeout)
                .await
                .map_err(|e| match e {
                    ProposeError::Timeout => Failure::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "could not confirm with a quorum that this node is up to date; retry, \
                         or ask for ?consistency=serializable",
                    ),
                    other => other.into(),
                })?;
        }
        match self.kv.read().unwrap().get(key.as_bytes()) {
            Some(value) => Ok(Response::new(Full::new(value))),
            None => Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("key {key:?} not found"),
            )),
        }
    }

    async fn status(&self) -> Result<Response<Full<Bytes>>, Failure> {
        let status = self.node.status().await?;
        let body = serde_json::to_vec_pretty(&status).expect("status serialises");
        let mut response = Response::new(Full::new(Bytes::from(body)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, "application/json".parse().unwrap());
        Ok(response)
    }

    /// Ready to serve: a leader is known and this node has applied all it knows is
    /// committed.
    async fn ready(&self) -> Result<Response<Full<Bytes>>, Failure> {
        let status = self.node.status().await?;
        let unavailable = |why: String| Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, why));
        if status.leader == 0 {
            return unavailable("not ready: no leader known".into());
        }
        if status.applied < status.commit {
            return unavailable(format!(
                "not ready: applied {} of {} committed entries",
                status.applied, status.commit
            ));
        }
        Ok(text_response(StatusCode::OK, "ready\n"))
    }

    async fn put(
        &self,
        key: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let key = Bytes::copy_from_slice(check_key(key)?.as_bytes());
        let value = read_body(req, self.max_value_bytes).await?;
        self.node
            .propose(Command::Put { key, value }, self.request_timeout)
            .await?;
        Ok(no_content())
    }

    async fn add_member(
        &self,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let id = parse_node_id(id).map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e))?;
        let body = read_body(req, MAX_URL_BYTES).await?;
        let url = std::str::from_utf8(&body)
            .map_err(|_| Failure::new(StatusCode::BAD_REQUEST, "peer URL is not UTF-8"))
            .and_then(|u| {
                parse_peer_url(u).map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e))
            })?;
        self.node
            .change_members(
                MemberChange::Add { id, peer_url: url },
                self.request_timeout,
            )
            .await?;
        Ok(no_content())
    }

    async fn set_partition(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let body = read_body(req, MAX_URL_BYTES).await?;
        let text = String::from_utf8_lossy(&body);
        let peers = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_node_id)
            .collect::<Result<BTreeSet<u64>, String>>()
            .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e))?;
        warn!(self.logger, "fault injection: dropping raft messages to and from peers"; "peers" => ?peers);
        if let Some(partition) = &self.partition {
            partition.set(peers);
        }
        Ok(no_content())
    }

    async fn remove_member(&self, id: &str) -> Result<Response<Full<Bytes>>, Failure> {
        let id = parse_node_id(id).map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e))?;
        self.node
            .change_members(MemberChange::Remove { id }, self.request_timeout)
            .await?;
        Ok(no_content())
    }
}

#[derive(PartialEq, Eq)]
enum Consistency {
    /// Sees every write acknowledged before the read began (raft ReadIndex). The default.
    Linearizable,
    /// This node's map as it is: fast, possibly stale (etcd's word for it).
    Serializable,
}

fn read_consistency(query: Option<&str>) -> Result<Consistency, Failure> {
    let mut consistency = Consistency::Linearizable;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        consistency = match pair {
            "consistency=linearizable" => Consistency::Linearizable,
            "consistency=serializable" => Consistency::Serializable,
            _ => {
                return Err(Failure::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown query parameter {pair:?}: use consistency=linearizable (the default) or consistency=serializable"
                    ),
                ))
            }
        };
    }
    Ok(consistency)
}

/// The `route` label of a request in the metrics.
fn route_of(method: &Method, target: &str) -> &'static str {
    match (method.as_str(), target) {
        ("GET", "status" | "health" | "readyz" | "metrics") => "admin",
        ("POST", PARTITION_ROUTE) => "admin",
        ("GET", _) => "get",
        ("PUT", _) => "put",
        ("POST", _) => "add_member",
        ("DELETE", _) => "remove_member",
        _ => "other",
    }
}

fn check_key(key: &str) -> Result<&str, Failure> {
    if key.is_empty() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "missing key: use /<key>",
        ));
    }
    Ok(key)
}

/// Reads a whole body of at most `limit` bytes; a larger one is refused with 413.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {e}"),
        )),
    }
}

fn no_content() -> Response<Full<Bytes>> {
    text_response(StatusCode::NO_CONTENT, "")
}
