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
//! share one namespace here; `/v1/kv` and `/v1/members` keep them apart.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{no_content, parse_query, read_body, Api, Consistency, Failure, Reply};
use crate::command::Command;
use crate::membership::{parse_node_id, parse_peer_url};
use crate::router::{MemberChange, CLUSTER_GROUP};

/// The methods these routes accept.
pub(super) const ALLOWED_METHODS: &str = "GET, PUT, POST, DELETE";
/// Largest body of a POST /<id> (a peer URL).
pub(super) const MAX_URL_BYTES: usize = 4096;

impl Api {
    pub(super) async fn get_key(&self, key: &str, query: Option<&str>) -> Reply {
        let key = check_key(key)?;
        let params = parse_query(query, &["consistency"])?;
        self.wait_until_readable(CLUSTER_GROUP, Consistency::from_params(&params)?)
            .await?;
        match self.kv.read().unwrap().get(key.as_bytes()) {
            Some(versioned) => Ok(Response::new(Full::new(versioned.value))),
            None => Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("key {key:?} not found"),
            )),
        }
    }

    pub(super) async fn put_key(&self, key: &str, req: Request<Incoming>) -> Reply {
        let key = Bytes::copy_from_slice(check_key(key)?.as_bytes());
        let value = read_body(req, self.max_value_bytes).await?;
        self.router
            .propose(
                CLUSTER_GROUP,
                Command::put(key, value),
                self.request_timeout,
            )
            .await?;
        Ok(no_content())
    }

    pub(super) async fn add_member(&self, id: &str, req: Request<Incoming>) -> Reply {
        let id = parse_node_id(id).map_err(Failure::bad_request)?;
        let body = read_body(req, MAX_URL_BYTES).await?;
        let url = std::str::from_utf8(&body)
            .map_err(|_| Failure::bad_request("peer URL is not UTF-8"))
            .and_then(|u| parse_peer_url(u).map_err(Failure::bad_request))?;
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

fn check_key(key: &str) -> Result<&str, Failure> {
    if key.is_empty() {
        return Err(Failure::bad_request("missing key: use /<key>"));
    }
    Ok(key)
}
