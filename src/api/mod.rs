//! The client-facing HTTP API: one router over three families of routes.
//!
//! | routes                                   | file              |
//! |------------------------------------------|-------------------|
//! | raftexample's: `GET`/`PUT /<key>`, `POST`/`DELETE /<node-id>` | `raftexample.rs` |
//! | `/v1/kv...`: keys with revisions, listing, multi-key set, compare-and-swap | `kv_v1.rs` |
//! | `DELETE /v1/kv?prefix=`: every key under a prefix | `prefix_delete.rs` |
//! | `POST /v1/txn`: compares, then one of two branches, atomically | `txn_v1.rs` |
//! | `/v1/members...`: the member list, add, remove | `members_v1.rs` |
//! | `/v1/groups...`: the raft groups, create one, the keys of one (forwarded to a node that hosts it, `forward.rs`) | `groups_v1.rs` |
//! | `/v1/leases...`: grant, keep alive, show and revoke leases | `leases_v1.rs` |
//! | `/v1/backup`, `/v1/restore`: every key in one file, and back | `backup_v1.rs` |
//! | `/status`, `/health`, `/readyz`, `/metrics`, `/debug/partition`, `/debug/panic` | `admin.rs` |
//!
//! `GET /v1/openapi.json` serves the OpenAPI document of the `/v1` routes (`openapi.json`
//! beside this file; `tests/openapi.rs` keeps it true).
//!
//! This module finds the handler, counts the request in the metrics, and turns every
//! failure into one status with a message: plain text on raftexample's routes, a JSON
//! `{"error": ...}` on `/v1`. Each error is logged here, once. No handler ever answers
//! success for a write whose outcome it does not know.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use slog::{warn, Logger};

use crate::cluster_id::ClusterId;
use crate::faults::Partition;
use crate::http_server::{text_response, FromPeer};
use crate::kv::SharedKv;
use crate::leases::LeaseRefusal;
use crate::membership::SharedMembership;
use crate::metrics::Metrics;
use crate::router::{ProposeError, Router};
use crate::tls::ClientCertificate;

mod admin;
mod backup_v1;
mod forward;
mod groups_v1;
mod kv_v1;
mod leases_v1;
mod members_v1;
mod prefix_delete;
mod raftexample;
mod request;
mod txn_v1;
mod watch_stream;
mod watch_v1;

use forward::FORWARDED_HEADER;
use request::{decode_path_segment, number_param, parse_json, parse_query, v1_rest, Failure};

/// The OpenAPI document of the `/v1` routes.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What every request handler needs.
pub struct Api {
    /// This node's id.
    pub id: u64,
    pub router: Router,
    /// The cluster's members and table of groups, for forwarding.
    pub membership: SharedMembership,
    /// The HTTP client that forwards requests to other nodes' peer ports.
    pub peers: reqwest::Client,
    /// The entry formats this node and its peers read (a change some members could not
    /// apply is refused).
    pub entry_formats: Arc<crate::entry_formats::EntryFormats>,
    pub cluster_id: Arc<ClusterId>,
    /// Set once this node's list of shards is known to be current (`settle_shards`).
    pub shards_settled: std::sync::atomic::AtomicBool,
    /// Set while a `POST /v1/restore` runs here: one at a time, as each holds a whole
    /// backup in memory.
    pub restoring: std::sync::atomic::AtomicBool,
    pub max_value_bytes: usize,
    pub request_timeout: Duration,
    /// Present only with `--enable-fault-injection`.
    pub partition: Option<Arc<Partition>>,
    /// Whether peers speak TLS: a new member's peer URL must then be `https://`.
    pub peer_tls: bool,
    /// `--admin-cn`: if not empty, only clients whose certificate has one of these common
    /// names (or a peer forwarding a request) may use the operator routes.
    pub admin_cns: Vec<String>,
    /// Measured for `GET /status`.
    pub data_dir: PathBuf,
    /// Turns true when the servers stop: watches and long polls end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub logger: Logger,
}

type Reply = Result<Response<Full<Bytes>>, Failure>;

impl From<ProposeError> for Failure {
    fn from(e: ProposeError) -> Failure {
        match e {
            ProposeError::Conflict(why) => Failure::new(StatusCode::CONFLICT, why),
            ProposeError::CheckFailed { key, revision } => Failure {
                revision: Some(revision),
                ..Failure::new(
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "revision check failed: key {:?} is at revision {revision}{}; nothing was written",
                        String::from_utf8_lossy(&key),
                        if revision == 0 { " (absent)" } else { "" }
                    ),
                )
            },
            ProposeError::NoLeader => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no leader: the cluster is electing one or this node is cut off; retry",
            ),
            ProposeError::Dropped(why) => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("raft did not accept the proposal ({why}); retry"),
            ),
            ProposeError::LeaderChanged => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the leader changed before the change committed: the outcome is unknown; retry",
            ),
            ProposeError::OvertakenBySnapshot => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node caught up by snapshot before the write was applied here: the \
                 outcome is unknown",
            ),
            ProposeError::Timeout => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not applied within the request timeout: the outcome is unknown",
            ),
            ProposeError::Stopped => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down")
            }
            ProposeError::Misrouted => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key belongs to another raft group than this node took it to; nothing was \
                 written; retry",
            ),
            ProposeError::Overloaded => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node has too many requests waiting for its raft loop; retry later",
            ),
            ProposeError::Lease(LeaseRefusal::NotFound(lease)) => Failure::new(
                StatusCode::NOT_FOUND,
                format!("lease {lease} not found (never granted, expired or revoked); nothing was written"),
            ),
            ProposeError::Lease(LeaseRefusal::Exists(lease)) => {
                Failure::new(StatusCode::CONFLICT, format!("lease {lease} exists already"))
            }
            ProposeError::Lease(LeaseRefusal::Renewed(lease)) => Failure::new(
                StatusCode::CONFLICT,
                format!("lease {lease} was renewed since: it did not expire"),
            ),
            ProposeError::NotHosted(group) => Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("raft group {group} is not (yet) hosted on this node; retry"),
            ),
        }
    }
}

impl Api {
    /// Answers one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = std::time::Instant::now();
        self.metrics.requests_in_flight.fetch_add(1, Relaxed);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let route = route_of(&method, &path);
        let response = match self.route(req, &method, &path).await {
            Ok(response) => response,
            Err(failure) => self.failure_response(&method, &path, failure),
        };
        self.metrics.requests_in_flight.fetch_sub(1, Relaxed);
        self.metrics
            .request_done(route, response.status().as_u16(), started.elapsed());
        response
    }

    async fn route(&self, req: Request<Incoming>, method: &Method, path: &str) -> Reply {
        let target = path.strip_prefix('/').unwrap_or(path);
        self.check_operator(&req, method, target)?;
        if let Some(rest) = v1_rest(target) {
            return self.route_v1(req, method, rest).await;
        }
        match (method, target) {
            (&Method::GET, "status") => self.status().await,
            (&Method::GET, "health") => Ok(text_response(StatusCode::OK, "ok\n")),
            (&Method::GET, "readyz") => self.ready().await,
            (&Method::GET, "metrics") => self.metrics().await,
            (&Method::POST, admin::PARTITION_ROUTE) if self.partition.is_some() => {
                self.set_partition(req).await
            }
            (&Method::POST, admin::PANIC_ROUTE) if self.partition.is_some() => {
                admin::panic_on_purpose()
            }
            (&Method::GET, key) => self.get_key(key, req.uri().query()).await,
            (&Method::PUT, key) => self.put_key(key, req).await,
            (&Method::POST, id) => self.add_member(id, req).await,
            (&Method::DELETE, id) => self.remove_member(id).await,
            _ => Err(Failure::method_not_allowed(
                method,
                raftexample::ALLOWED_METHODS,
            )),
        }
    }

    /// `rest` is the path after `/v1`.
    async fn route_v1(&self, req: Request<Incoming>, method: &Method, rest: &str) -> Reply {
        let query = req.uri().query().map(str::to_string);
        let query = query.as_deref();
        if rest == "/kv" {
            return match *method {
                Method::GET => self.list_keys(query).await,
                Method::POST => self.set_many(req).await,
                Method::DELETE => self.delete_prefix(query).await,
                _ => Err(Failure::method_not_allowed(method, "GET, POST, DELETE")),
            };
        }
        if let Some(raw) = rest.strip_prefix("/kv/") {
            return self.route_key(req, method, raw).await;
        }
        if rest == "/txn" {
            return match *method {
                Method::POST => self.txn(req).await,
                _ => Err(Failure::method_not_allowed(method, "POST")),
            };
        }
        if let Some(leases) = rest.strip_prefix("/leases") {
            if leases.is_empty() || leases.starts_with('/') {
                return self.route_leases(req, method, leases).await;
            }
        }
        if rest == "/members" {
            return match *method {
                Method::GET => self.list_members().await,
                Method::POST => self.add_member_v1(req).await,
                _ => Err(Failure::method_not_allowed(method, "GET, POST")),
            };
        }
        if let Some(id) = rest.strip_prefix("/members/") {
            return match *method {
                Method::DELETE => self.remove_member_v1(id).await,
                _ => Err(Failure::method_not_allowed(method, "DELETE")),
            };
        }
        if rest == "/backup" || rest == "/restore" {
            return match (method.clone(), rest) {
                (Method::GET, "/backup") => self.backup().await,
                (Method::POST, "/restore") => self.restore(req).await,
                (_, "/backup") => Err(Failure::method_not_allowed(method, "GET")),
                _ => Err(Failure::method_not_allowed(method, "POST")),
            };
        }
        if let Some(groups) = rest.strip_prefix("/groups") {
            if groups.is_empty() || groups.starts_with('/') {
                return self.route_groups(req, method, groups).await;
            }
        }
        if rest == "/openapi.json" {
            return match *method {
                Method::GET => Ok(json_bytes(StatusCode::OK, OPENAPI.as_bytes().to_vec())),
                _ => Err(Failure::method_not_allowed(method, "GET")),
            };
        }
        Err(Failure::new(
            StatusCode::NOT_FOUND,
            format!("no such route /v1{rest}; see GET /v1/openapi.json"),
        ))
    }

    /// The response for a failure, logged once (a missing key is an ordinary answer, not
    /// an error worth a log line).
    fn failure_response(
        &self,
        method: &Method,
        path: &str,
        failure: Failure,
    ) -> Response<Full<Bytes>> {
        let Failure {
            status,
            message,
            revision,
            allow,
            not_hosted,
        } = failure;
        if status != StatusCode::NOT_FOUND {
            warn!(self.logger, "request failed";
                "method" => %method, "path" => path,
                "status" => status.as_u16(), "reason" => &message);
        }
        let on_v1 = v1_rest(path.strip_prefix('/').unwrap_or(path)).is_some();
        let mut response = if on_v1 {
            let mut body = serde_json::json!({ "error": message });
            if let Some(revision) = revision {
                body["revision"] = revision.into();
            }
            json_response(status, &body)
        } else {
            text_response(status, &format!("{message}\n"))
        };
        if let Some(allow) = allow {
            response.headers_mut().insert(ALLOW, allow.parse().unwrap());
        }
        if not_hosted {
            response
                .headers_mut()
                .insert(forward::NOT_HOSTED_HEADER, "true".parse().unwrap());
        }
        response
    }

    /// With `--admin-cn`, refuses (403) an operator route to a client that is not an
    /// operator: membership changes, group management and `/debug/*`.
    fn check_operator(
        &self,
        req: &Request<Incoming>,
        method: &Method,
        target: &str,
    ) -> Result<(), Failure> {
        if self.admin_cns.is_empty() || !is_operator_route(method, target) {
            return Ok(());
        }
        if req.extensions().get::<FromPeer>().is_some() {
            return Ok(()); // checked where the client sent it
        }
        let name = req
            .extensions()
            .get::<ClientCertificate>()
            .and_then(|c| c.common_name.as_deref());
        match name {
            Some(name) if self.admin_cns.iter().any(|admin| admin == name) => Ok(()),
            _ => Err(Failure::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{method} /{target} is for operators only: the client certificate's \
                     common name ({}) is not one of --admin-cn",
                    name.unwrap_or("none")
                ),
            )),
        }
    }

    /// The map of group `group`, if this node hosts it.
    fn map_of(&self, group: u64) -> Result<SharedKv, Failure> {
        self.router
            .kv(group)
            .ok_or_else(|| ProposeError::NotHosted(group).into())
    }

    /// Marks the answer to a read of a key: the key's revision, this node as the one
    /// whose map answered, and the read index it waited for (none if serializable).
    fn mark_read(
        &self,
        response: &mut Response<Full<Bytes>>,
        revision: u64,
        read_index: Option<u64>,
    ) {
        let headers = response.headers_mut();
        headers.insert(forward::REVISION_HEADER, revision.into());
        headers.insert(forward::SERVED_BY_HEADER, self.id.into());
        if let Some(index) = read_index {
            headers.insert(forward::READ_INDEX_HEADER, index.into());
        }
    }

    /// Returns once a linearizable read of the local map is allowed (raft ReadIndex),
    /// with the read index; at once, with None, for a serializable read.
    async fn wait_until_readable(
        &self,
        group: u64,
        consistency: Consistency,
    ) -> Result<Option<u64>, Failure> {
        if consistency == Consistency::Serializable {
            return Ok(None);
        }
        self.router
            .read_index(group, self.request_timeout)
            .await
            .map(Some)
            .map_err(|e| match e {
                ProposeError::Timeout => Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "could not confirm with a quorum that this node is up to date; retry, \
                     or ask for ?consistency=serializable",
                ),
                other => other.into(),
            })
    }
}

/// Whether a route changes who is in the cluster or in a group, or is a `/debug` route:
/// what `--admin-cn` keeps to operators. Reads of the same resources stay open.
fn is_operator_route(method: &Method, target: &str) -> bool {
    if target.starts_with("debug/") {
        return true;
    }
    if *method == Method::GET || *method == Method::HEAD {
        return false;
    }
    if let Some(rest) = v1_rest(target) {
        let group_members = rest
            .strip_prefix("/groups/")
            .and_then(|g| g.split_once('/'))
            .is_some_and(|(_, sub)| {
                sub == "members"
                    || sub.starts_with("members/")
                    || sub == "leader"
                    || sub == "restore"
            });
        return rest == "/members"
            || rest == "/restore"
            || rest.starts_with("/members/")
            || rest == "/groups"
            || group_members;
    }
    // raftexample's routes: POST and DELETE /<id> change membership, PUT writes a key.
    *method == Method::POST || *method == Method::DELETE
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Consistency {
    /// Sees every write acknowledged before the read began (raft ReadIndex). The default.
    Linearizable,
    /// This node's map as it is: fast, possibly stale (etcd's word for it).
    Serializable,
}

impl Consistency {
    /// The `consistency` query parameter, if any; linearizable when absent.
    fn from_params(params: &HashMap<String, String>) -> Result<Consistency, Failure> {
        match params.get("consistency").map(String::as_str) {
            None | Some("linearizable") => Ok(Consistency::Linearizable),
            Some("serializable") => Ok(Consistency::Serializable),
            Some(other) => Err(Failure::bad_request(format!(
                "consistency={other:?}: use linearizable (the default) or serializable"
            ))),
        }
    }
}

/// The `route` label of a request in the metrics.
fn route_of(method: &Method, path: &str) -> &'static str {
    let target = path.strip_prefix('/').unwrap_or(path);
    match (method.as_str(), target) {
        ("GET", "status" | "health" | "readyz" | "metrics") => "admin",
        ("POST", admin::PARTITION_ROUTE | admin::PANIC_ROUTE) => "admin",
        ("GET", "v1/kv") => "v1_list",
        ("POST", "v1/kv") => "v1_set_many",
        ("DELETE", "v1/kv") => "v1_delete",
        ("POST", "v1/txn") => "v1_txn",
        ("GET", "v1/backup") => "v1_backup",
        ("POST", "v1/restore") => "v1_restore",
        (_, t) if t.starts_with("v1/kv/") => match method.as_str() {
            "GET" => "v1_get",
            "PUT" => "v1_put",
            "DELETE" => "v1_delete",
            _ => "other",
        },
        (_, t) if t == "v1/members" || t.starts_with("v1/members/") => "v1_members",
        (_, t) if t == "v1/groups" || t.starts_with("v1/groups/") => "v1_groups",
        (_, t) if t == "v1/leases" || t.starts_with("v1/leases/") => "v1_leases",
        (_, t) if v1_rest(t).is_some() => "other",
        ("GET", _) => "get",
        ("PUT", _) => "put",
        ("POST", _) => "add_member",
        ("DELETE", _) => "remove_member",
        _ => "other",
    }
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
    let mut body = req.into_body();
    if declared.is_some_and(|len| len > limit as u64) {
        drain(body, declared).await;
        return Err(too_large());
    }
    let mut chunks = Vec::new();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| Failure::bad_request(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        len += data.len();
        if len > limit {
            drain(body, declared).await;
            return Err(too_large());
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        1 => chunks.pop().expect("one chunk"),
        _ => chunks.concat().into(),
    })
}

/// Bytes of a refused body read and thrown away, so that a client that sends its whole
/// body before reading the answer (Python's urllib, for one) gets its 413 rather than a
/// reset connection; a body declared larger than this is not read at all.
const DRAIN_BYTES: u64 = 16 << 20;
/// ... and no longer than this.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and discards what is left of a refused body, within [`DRAIN_BYTES`] and
/// [`DRAIN_TIME`].
async fn drain(mut body: Incoming, declared: Option<u64>) {
    if declared.is_some_and(|len| len > DRAIN_BYTES) {
        return;
    }
    let discard = async {
        let mut read = 0;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > DRAIN_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    json_bytes(
        status,
        serde_json::to_vec(body).expect("JSON values serialise"),
    )
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().unwrap());
    response
}

fn no_content() -> Response<Full<Bytes>> {
    text_response(StatusCode::NO_CONTENT, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_routes_are_membership_groups_and_debug_never_keys() {
        let (get, put, post, delete) = (Method::GET, Method::PUT, Method::POST, Method::DELETE);
        for (method, target) in [
            (&post, "4"),
            (&delete, "3"),
            (&post, "v1/members"),
            (&delete, "v1/members/3"),
            (&post, "v1/groups"),
            (&post, "v1/groups/2/members"),
            (&delete, "v1/groups/2/members/1"),
            (&post, "v1/groups/2/leader"),
            (&post, "v1/restore"),
            (&post, "v1/groups/2/restore"),
            (&post, "debug/partition"),
            (&post, "debug/panic"),
        ] {
            assert!(is_operator_route(method, target), "{method} {target}");
        }
        for (method, target) in [
            (&put, "my-key"),
            (&get, "my-key"),
            (&get, "v1/members"),
            (&get, "v1/groups/2"),
            (&put, "v1/kv/members"),
            (&post, "v1/kv"),
            (&put, "v1/groups/2/kv/members"),
            (&delete, "v1/groups/2/kv/leader"),
            (&get, "v1/backup"),
            (&get, "v1/groups/2/backup"),
            (&put, "v1/groups/2/kv/restore"),
        ] {
            assert!(!is_operator_route(method, target), "{method} {target}");
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_unknown_ones_refused() {
        let params = parse_query(Some("prefix=a%2Fb+c&limit=5"), &["prefix", "limit"])
            .ok()
            .unwrap();
        assert_eq!(params["prefix"], "a/b c");
        assert_eq!(number_param(&params, "limit").ok().unwrap(), Some(5));
        assert!(parse_query(Some("prefx=a"), &["prefix"]).is_err());
        let bad = parse_query(Some("limit=-1"), &["limit"]).ok().unwrap();
        assert!(number_param(&bad, "limit").is_err());
    }

    #[test]
    fn metrics_routes_keep_v1_apart_from_raftexample_keys() {
        assert_eq!(route_of(&Method::GET, "/v1/kv/a/b"), "v1_get");
        assert_eq!(route_of(&Method::GET, "/v1/kv"), "v1_list");
        assert_eq!(route_of(&Method::GET, "/v1/backup"), "v1_backup");
        assert_eq!(route_of(&Method::POST, "/v1/restore"), "v1_restore");
        assert_eq!(route_of(&Method::DELETE, "/v1/members/3"), "v1_members");
        assert_eq!(route_of(&Method::GET, "/a"), "get");
        assert_eq!(route_of(&Method::DELETE, "/3"), "remove_member");
    }
}
