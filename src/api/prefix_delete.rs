//! `DELETE /v1/kv?prefix=<p>`: every key that starts with p, gone (etcd's `del --prefix`);
//! and the same on one group's map, `DELETE /v1/groups/<g>/kv?prefix=<p>`.
//!
//! | request                                  | does |
//! |------------------------------------------|------|
//! | `DELETE /v1/kv?prefix=<p>`               | 200 `{"prefix","deleted","groups":[{"group","revision","deleted"}]}` |
//! | `DELETE /v1/groups/<g>/kv?prefix=<p>`    | 200 `{"prefix","deleted","revision","group"}` |
//!
//! Within a group the delete is one raft command (`Write::DeletePrefix`): every key under
//! the prefix goes at one revision, including keys written while the request was on its
//! way, and watchers see one delete event per key at that revision. A sharded cluster
//! deletes group by group, so not at one revision across groups (as a listing reads
//! group by group); a delete that fails part-way says which groups it had done, and
//! running it again is harmless. An empty prefix deletes every key. Only once every
//! member reads entry format 5 (`entry_formats::DELETE_PREFIX`; 409 before): an older
//! release would stop at the entry.

use hyper::{Method, StatusCode};

use super::forward::Forwarded;
use super::{json_response, parse_query, Api, Failure, Reply};
use crate::command::{Command, Write};
use crate::entry_formats;
use crate::router::CLUSTER_GROUP;

/// What one group's delete did.
#[derive(serde::Serialize, serde::Deserialize)]
struct GroupDeleted {
    prefix: String,
    deleted: u64,
    revision: u64,
    group: u64,
}

impl Api {
    /// `DELETE /v1/kv?prefix=<p>`: every group that `/v1/kv` routes keys to (the shards,
    /// or the cluster group), one after the other.
    pub(super) async fn delete_prefix(&self, query: Option<&str>) -> Reply {
        let prefix = prefix_param(query)?;
        self.check_every_member_reads_prefix_deletes()?;
        self.settle_shards(None).await?;
        let shards = self.membership.read().unwrap().shards.clone();
        let groups = match shards.is_empty() {
            true => vec![CLUSTER_GROUP],
            false => shards,
        };
        let mut done: Vec<GroupDeleted> = Vec::with_capacity(groups.len());
        for group in groups {
            match self.delete_prefix_anywhere(group, &prefix, query).await {
                Ok(one) => done.push(one),
                Err(failure) if done.is_empty() => return Err(failure),
                Err(failure) => {
                    let ids: Vec<u64> = done.iter().map(|d| d.group).collect();
                    return Err(Failure::new(
                        failure.status,
                        format!(
                            "the keys under the prefix are deleted in groups {ids:?}, but group \
                             {group} failed: {}; run the delete again",
                            failure.message
                        ),
                    ));
                }
            }
        }
        let deleted: u64 = done.iter().map(|d| d.deleted).sum();
        let groups: Vec<serde_json::Value> = done
            .iter()
            .map(|d| serde_json::json!({"group": d.group, "revision": d.revision, "deleted": d.deleted}))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "prefix": prefix, "deleted": deleted, "groups": groups }),
        ))
    }

    /// `DELETE /v1/groups/<g>/kv?prefix=<p>`, on a node that hosts g.
    pub(super) async fn delete_prefix_in(&self, group: u64, query: Option<&str>) -> Reply {
        let prefix = prefix_param(query)?;
        self.check_every_member_reads_prefix_deletes()?;
        let done = self.delete_prefix_here(group, prefix).await?;
        Ok(json_response(StatusCode::OK, &done))
    }

    /// Group `group`'s delete, here or through a node that hosts it.
    async fn delete_prefix_anywhere(
        &self,
        group: u64,
        prefix: &str,
        query: Option<&str>,
    ) -> Result<GroupDeleted, Failure> {
        if self.router.serving(group).is_some() {
            return self.delete_prefix_here(group, prefix.to_string()).await;
        }
        let request = Forwarded {
            method: Method::DELETE,
            path: format!("/v1/groups/{group}/kv?{}", query.unwrap_or_default()),
            headers: Vec::new(),
            body: Default::default(),
        };
        let (_, body) = self.send_for_success(group, request).await?;
        serde_json::from_slice(&body).map_err(|e| {
            Failure::new(
                StatusCode::BAD_GATEWAY,
                format!("a node that hosts group {group} answered a delete with bad JSON: {e}"),
            )
        })
    }

    async fn delete_prefix_here(
        &self,
        group: u64,
        prefix: String,
    ) -> Result<GroupDeleted, Failure> {
        let command = Command {
            checks: Vec::new(),
            writes: vec![Write::DeletePrefix {
                prefix: prefix.clone().into(),
            }],
        };
        let written = self
            .router
            .propose(group, command, self.request_timeout)
            .await?;
        Ok(GroupDeleted {
            prefix,
            deleted: written.deleted,
            revision: written.revision,
            group,
        })
    }

    fn check_every_member_reads_prefix_deletes(&self) -> Result<(), Failure> {
        if self.every_member_reads(entry_formats::DELETE_PREFIX) {
            return Ok(());
        }
        Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "deleting a prefix needs every member to run a release that reads entry \
                 format {} (retry after a rolling upgrade)",
                entry_formats::DELETE_PREFIX
            ),
        ))
    }
}

/// The `prefix` a delete names: required (an empty one, `?prefix=`, means every key).
fn prefix_param(query: Option<&str>) -> Result<String, Failure> {
    let params = parse_query(query, &["prefix"])?;
    params.get("prefix").cloned().ok_or_else(|| {
        Failure::bad_request(
            "DELETE /v1/kv takes ?prefix=<p>: the keys that start with p are deleted \
             (every key if p is empty); delete one key with DELETE /v1/kv/<key>",
        )
    })
}
