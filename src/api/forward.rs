//! Forwarding: a request for a raft group this node does not host goes to a node that
//! does, through that node's peer port (`<peer-url>/client/v1/groups/...`), and its
//! answer comes back as it is. The seed's multi-raft example answers such a request with
//! an error; here any node serves any group.
//!
//! A forwarded request carries [`FORWARDED_HEADER`] and the cluster id, and is never
//! forwarded again: a node that receives one for a group it does not host answers 503.
//! Another member is tried only when a connection could not be made; a request that may
//! have reached a node is never sent twice (a PUT could apply twice), so its timeout is
//! answered as an unknown outcome.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::kv_v1::REVISION_HEADER;
use super::{read_body, Api, Failure, Reply};
use crate::cluster_id;
use crate::router::ProposeError;
use crate::transport::FORWARD_PREFIX;

/// Marks a forwarded request; its value is the id of the node that forwarded it.
pub const FORWARDED_HEADER: &str = "x-raftkvd-forwarded";
/// Headers of the client's request and of the answer that travel with them.
const REQUEST_HEADERS: [HeaderName; 2] = [CONTENT_TYPE, ACCEPT];
const ANSWER_HEADERS: [HeaderName; 3] = [
    CONTENT_TYPE,
    HeaderName::from_static(REVISION_HEADER),
    ALLOW,
];

impl Api {
    /// Sends `req`, for group `group`, to a node that hosts it, and relays the answer.
    pub(super) async fn forward(&self, group: u64, req: Request<Incoming>) -> Reply {
        if req.headers().contains_key(FORWARDED_HEADER) {
            return Err(ProposeError::NotHosted(group).into());
        }
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
        let headers: Vec<(HeaderName, HeaderValue)> = REQUEST_HEADERS
            .iter()
            .filter_map(|name| Some((name.clone(), req.headers().get(name)?.clone())))
            .collect();
        let body = read_body(req, self.max_value_bytes).await?;
        let mut unreachable = Vec::new();
        for (node, url) in self.hosts_of(group) {
            let mut request = self
                .peers
                .request(method.clone(), format!("{url}{FORWARD_PREFIX}{path}"))
                .header(FORWARDED_HEADER, self.id.to_string())
                .timeout(self.request_timeout + Duration::from_secs(1))
                .body(body.clone());
            if let Some(id) = self.cluster_id.get() {
                request = request.header(cluster_id::HEADER, cluster_id::format(id));
            }
            for (name, value) in &headers {
                request = request.header(name, value);
            }
            match request.send().await {
                Ok(answer) => return relay(answer).await,
                Err(e) if e.is_connect() => unreachable.push(format!("node {node}: {e}")),
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
                unreachable.join("; ")
            ),
        ))
    }

    /// A GET of `path` on a node that hosts `group`: its JSON answer if it gave 200.
    pub(super) async fn ask_member(&self, group: u64, path: &str) -> Option<serde_json::Value> {
        for (_, url) in self.hosts_of(group) {
            let mut request = self
                .peers
                .get(format!("{url}{FORWARD_PREFIX}{path}"))
                .header(FORWARDED_HEADER, self.id.to_string())
                .timeout(self.request_timeout);
            if let Some(id) = self.cluster_id.get() {
                request = request.header(cluster_id::HEADER, cluster_id::format(id));
            }
            if let Ok(answer) = request.send().await {
                if answer.status() == StatusCode::OK {
                    return answer.json().await.ok();
                }
            }
        }
        None
    }

    /// The nodes (and their peer URLs) the cluster's table lists for `group`, this node
    /// left out.
    fn hosts_of(&self, group: u64) -> Vec<(u64, String)> {
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
    let body = answer.bytes().await.map_err(|e| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the forwarded request's answer broke off ({e}): the outcome is unknown"),
        )
    })?;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    Ok(response)
}
