//! `/v1/members`: the member list, and adding and removing members, in JSON.
//!
//! | request                                   | does |
//! |-------------------------------------------|------|
//! | `GET /v1/members`                         | 200 `{"leader", "members": [{"id","peer_url"}...]}`, as this node knows them |
//! | `POST /v1/members` `{"id":4,"peer_url":"http://host:port"}` | adds the node once the change is applied here; 201 `{"revision","members"}` |
//! | `DELETE /v1/members/<id>`                 | removes the node; 200 `{"revision"}` |
//!
//! The same checks as raftexample's `POST`/`DELETE /<id>` apply (409 for an id already a
//! member, a removed id, a URL in use, or while another change is pending). A node started
//! with `--join-via` calls `POST` here and takes the member list it gets back as its
//! first picture of the cluster.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::raftexample::MAX_URL_BYTES;
use super::{json_response, parse_json, read_body, Api, Failure, Reply};
use crate::cluster_id;
use crate::command::Op;
use crate::membership::{parse_node_id, parse_peer_url};
use crate::router::{MemberChange, CLUSTER_GROUP};

/// The body of `POST /v1/members`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    id: u64,
    peer_url: String,
}

impl Api {
    /// A member that hosts replicas of raft groups leaves the cluster in two steps: it is
    /// marked draining, and the rebalancer (`rebalance.rs`) moves each replica to another
    /// node and then removes it. Returns the groups it hosts if it does.
    pub(super) async fn drain_if_hosting(&self, id: u64) -> Result<Option<Vec<u64>>, Failure> {
        let hosted: Vec<u64> = {
            let membership = self.membership.read().unwrap();
            if !membership.peer_urls.contains_key(&id) {
                return Ok(None); // the removal itself answers "not a member"
            }
            membership
                .groups
                .iter()
                .filter(|(_, placement)| placement.members.contains(&id))
                .map(|(group, _)| *group)
                .collect()
        };
        if hosted.is_empty() {
            return Ok(None);
        }
        self.router
            .propose_op(
                CLUSTER_GROUP,
                Op::DrainNode { node: id },
                self.request_timeout,
            )
            .await?;
        Ok(Some(hosted))
    }

    pub(super) async fn list_members(&self) -> Reply {
        let status = self.router.status(CLUSTER_GROUP).await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "leader": status.leader,
                "members": status.members,
                "learners": status.learners,
                "cluster_id": self.cluster_id.get().map(cluster_id::format),
            }),
        ))
    }

    pub(super) async fn add_member_v1(&self, req: Request<Incoming>) -> Reply {
        let body = read_body(req, MAX_URL_BYTES).await?;
        let new: NewMember = parse_json(&body)?;
        if new.id == 0 {
            return Err(Failure::bad_request("id must be a positive integer"));
        }
        let peer_url =
            parse_peer_url(&new.peer_url, self.peer_tls).map_err(Failure::bad_request)?;
        let written = self
            .router
            .change_members(
                CLUSTER_GROUP,
                MemberChange::Add {
                    id: new.id,
                    peer_url,
                },
                self.request_timeout,
            )
            .await?;
        let status = self.router.status(CLUSTER_GROUP).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &serde_json::json!({
                "revision": written.revision,
                "members": status.members,
                "cluster_id": self.cluster_id.get().map(cluster_id::format),
            }),
        ))
    }

    pub(super) async fn remove_member_v1(&self, id: &str) -> Reply {
        let id = parse_node_id(id).map_err(Failure::bad_request)?;
        if let Some(groups) = self.drain_if_hosting(id).await? {
            return Ok(json_response(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "draining": true, "groups": groups }),
            ));
        }
        let written = self
            .router
            .change_members(
                CLUSTER_GROUP,
                MemberChange::Remove { id },
                self.request_timeout,
            )
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "revision": written.revision }),
        ))
    }
}
