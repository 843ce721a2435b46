//! raftexample's routes, unchanged for its users:
//!
//! | request                  | does                                        |
//! |--------------------------|---------------------------------------------|
//! | `GET /<key>`             | 200 with the value, 404 if absent; linearizable (ReadIndex) unless `?consistency=serializable` |
//! | `PUT /<key>` body=value  | 204 once committed and applied on this node  |
//! | `POST /<id>` body=URL    | adds node `<id>` with that peer URL; 204     |
//! | `DELETE /<id>`           | removes node `<id>`; 204                      |
//!
//! Keys are the path as sent (not percent-decoded), as in raftexample. A key and a node id
//! share one namespace here; `/v1/kv` and `/v1/members` keep them apart. In a sharded
//! cluster a key is served by its group, here or on a node that hosts it (`forward.rs`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::forward::{failure_of, Forwarded};
use super::{no_content, parse_query, read_body, Api, Consistency, Failure, Reply};
use crate::command::Command;
use crate::http_server::text_response;
use crate::membership::{parse_node_id, parse_peer_url};
use crate::router::{MemberChange, CLUSTER_GROUP};

/// The methods these routes accept.
pub(super) const ALLOWED_METHODS: &str = "GET, PUT, POST, DELETE";
/// The content type of a raw value.
const RAW: &str = "application/octet-stream";
/// Largest body of a POST /<id> (a peer URL).
pub(super) const MAX_URL_BYTES: usize = 4096;

impl Api {
    pub(super) async fn get_key(&self, key: &str, query: Option<&str>) -> Reply {
        let key = check_key(key)?;
        let params = parse_query(query, &["consistency"])?;
        let consistency = Consistency::from_params(&params)?;
        self.settle_shards(query).await?;
        let group = self.owner_of(key.as_bytes());
        if self.router.serving(group).is_none() {
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            let request = Forwarded {
                method: Method::GET,
                path: format!("{}{query}", group_key_path(group, key)),
                headers: vec![(ACCEPT, HeaderValue::from_static(RAW))],
                body: Bytes::new(),
            };
            return self.forwarded_raw(group, key, request).await;
        }
        let read_index = self.wait_until_readable(group, consistency).await?;
        match self.map_of(group)?.read().unwrap().get(key.as_bytes()) {
            Some(versioned) => {
                let mut response = Response::new(Full::new(versioned.value));
                self.mark_read(&mut response, versioned.revision, read_index);
                Ok(response)
            }
            None => Err(not_found(key)),
        }
    }

    pub(super) async fn put_key(&self, key: &str, req: Request<Incoming>) -> Reply {
        let key = check_key(key)?;
        let value = read_body(req, self.max_value_bytes).await?;
        self.settle_shards(None).await?;
        let group = self.owner_of(key.as_bytes());
        if self.router.serving(group).is_none() {
            let request = Forwarded {
                method: Method::PUT,
                path: group_key_path(group, key),
                headers: vec![(CONTENT_TYPE, HeaderValue::from_static(RAW))],
                body: value,
            };
            return self.forwarded_raw(group, key, request).await;
        }
        let key = Bytes::copy_from_slice(key.as_bytes());
        self.router
            .propose(group, Command::put(key, value), self.request_timeout)
            .await?;
        Ok(no_content())
    }

    /// Sends a GET or PUT of `key` to a node that hosts `group` and answers as these
    /// routes do: the raw value, 204 for a write, plain-text errors.
    async fn forwarded_raw(&self, group: u64, key: &str, request: Forwarded) -> Reply {
        let is_get = request.method == Method::GET;
        let answer = self.send_and_relay(group, request).await?;
        let status = answer.status();
        match status {
            StatusCode::OK if is_get => Ok(answer),
            StatusCode::OK => Ok(no_content()),
            StatusCode::NOT_FOUND => Err(not_found(key)),
            _ => {
                let body = answer.into_body().collect().await.unwrap().to_bytes();
                Err(failure_of(status, &body))
            }
        }
    }

    pub(super) async fn add_member(&self, id: &str, req: Request<Incoming>) -> Reply {
        let id = parse_node_id(id).map_err(Failure::bad_request)?;
        let body = read_body(req, MAX_URL_BYTES).await?;
        let url = std::str::from_utf8(&body)
            .map_err(|_| Failure::bad_request("peer URL is not UTF-8"))
            .and_then(|u| parse_peer_url(u, self.peer_tls).map_err(Failure::bad_request))?;
        self.router
            .change_members(
                CLUSTER_GROUP,
                MemberChange::Add { id, peer_url: url },
                self.request_timeout,
            )
            .await?;
        Ok(no_content())
    }

    pub(super) async fn remove_member(&self, id: &str) -> Reply {
        let id = parse_node_id(id).map_err(Failure::bad_request)?;
        if let Some(groups) = self.drain_if_hosting(id).await? {
            return Ok(text_response(
                StatusCode::ACCEPTED,
                &format!(
                    "node {id} hosts replicas of groups {groups:?}: they are moving to other \
                     nodes, and node {id} is removed once they have\n"
                ),
            ));
        }
        self.router
            .change_members(
                CLUSTER_GROUP,
                MemberChange::Remove { id },
                self.request_timeout,
            )
            .await?;
        Ok(no_content())
    }
}

fn not_found(key: &str) -> Failure {
    Failure::new(StatusCode::NOT_FOUND, format!("key {key:?} not found"))
}

/// The `/v1/groups` path of `key` (taken as it is, not percent-decoded, here) in `group`.
fn group_key_path(group: u64, key: &str) -> String {
    let encoded = percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC);
    format!("/v1/groups/{group}/kv/{encoded}")
}

fn check_key(key: &str) -> Result<&str, Failure> {
    if key.is_empty() {
        return Err(Failure::bad_request("missing key: use /<key>"));
    }
    Ok(key)
}
