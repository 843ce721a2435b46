//! `/v1/leases`: keys that expire with their owner (`leases.rs` says how leases work).
//!
//! | request                                  | does |
//! |------------------------------------------|------|
//! | `POST /v1/leases` body `{"ttl_seconds": T[, "key": K \| "group": G]}` | grants a lease: 201 `{"id","ttl_seconds","group"}` |
//! | `GET /v1/leases[?group=G]`               | every lease (of group G), by id: 200 `{"leases": [{"id","ttl_seconds","granted_ttl_seconds","key_count","group"}]}` |
//! | `GET /v1/leases/<id>`                    | 200 `{"id","ttl_seconds","granted_ttl_seconds","keys","group"}`: `ttl_seconds` is what is left by this node's clock |
//! | `POST /v1/leases/<id>/keepalive`         | renews it: 200 `{"id","ttl_seconds","group"}` |
//! | `DELETE /v1/leases/<id>`                 | revokes it and deletes its keys: 200 `{"id","revision","deleted","group"}` |
//! | `PUT /v1/kv/<key>?lease=<id>`            | attaches the key (`kv_v1.rs`) |
//!
//! A lease lives in one raft group and holds only that group's keys: the group of `key`
//! when the grant names one, else group `G`, else the group of the first shard (group
//! 1 when the cluster has one shard). Its id says which (`leases::group_of`), so any node
//! serves any lease, forwarding to a node that hosts its group. A lease that ended, or
//! never was, is 404; a put naming a lease of another group than the key's is 409.
//! Every route here is linearizable: a keepalive or revoke is a raft proposal, and a GET
//! waits for a read index. Leases exist only once every member reads them (409 before,
//! `entry_formats::LEASES`).

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use super::forward::{Forwarded, FORWARDED_HEADER};
use super::request::{number_param, parse_query};
use super::{json_response, parse_json, read_body, Api, Consistency, Failure, Reply};
use crate::command::Op;
use crate::entry_formats;
use crate::leases::{self, LeaseRefusal, MAX_TTL_SECONDS};
use crate::membership::Membership;
use crate::router::{ProposeError, CLUSTER_GROUP};

/// The largest grant body read.
const GRANT_BODY_BYTES: usize = 64 << 10;
/// Grants tried with fresh ids before giving up (two random 32-bit ids colliding twice
/// in a row in one group is all but impossible).
const GRANT_ATTEMPTS: usize = 3;

/// The body of a grant.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    ttl_seconds: u64,
    /// The lease goes to this key's group.
    key: Option<String>,
    /// ... or to this group.
    group: Option<u64>,
}

impl Api {
    /// `rest` is the path after `/v1/leases`.
    pub(super) async fn route_leases(
        &self,
        req: Request<Incoming>,
        method: &Method,
        rest: &str,
    ) -> Reply {
        if rest.is_empty() {
            return match *method {
                Method::POST => self.grant_lease(req).await,
                Method::GET => self.list_leases(req).await,
                _ => Err(Failure::method_not_allowed(method, "GET, POST")),
            };
        }
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
        let lease = parse_lease_id(id)?;
        let group = leases::group_of(lease);
        self.check_lease_group(group)
            .map_err(|_| lease_not_found(lease))?;
        let allowed = match action {
            "" => "GET, DELETE",
            "keepalive" => "POST",
            _ => {
                return Err(Failure::new(
                    StatusCode::NOT_FOUND,
                    format!("no such route /v1/leases/{rest}; see GET /v1/openapi.json"),
                ))
            }
        };
        let known = matches!(
            (method.as_str(), action),
            ("GET" | "DELETE", "") | ("POST", "keepalive")
        );
        if !known {
            return Err(Failure::method_not_allowed(method, allowed));
        }
        if self.router.serving(group).is_none() {
            return self.forward(group, req, None).await;
        }
        match *method {
            Method::GET => self.show_lease(group, lease).await,
            Method::DELETE => self.revoke_lease(group, lease).await,
            _ => self.keep_lease_alive(group, lease).await,
        }
    }

    /// `POST /v1/leases`.
    async fn grant_lease(&self, req: Request<Incoming>) -> Reply {
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        let query = req.uri().query().map(str::to_string);
        let body = read_body(req, GRANT_BODY_BYTES).await?;
        let grant: GrantBody = parse_json(&body)?;
        if grant.ttl_seconds == 0 || grant.ttl_seconds > MAX_TTL_SECONDS {
            return Err(Failure::bad_request(format!(
                "ttl_seconds={}: ask for 1 to {MAX_TTL_SECONDS} seconds",
                grant.ttl_seconds
            )));
        }
        let group = match (&grant.key, grant.group) {
            (Some(_), Some(_)) => {
                return Err(Failure::bad_request(
                    "name a key or a group for the lease, not both",
                ))
            }
            (Some(key), None) if key.is_empty() => {
                return Err(Failure::bad_request("a key must not be empty"))
            }
            (Some(key), None) => {
                self.settle_shards(query.as_deref()).await?;
                self.owner_of(key.as_bytes())
            }
            (None, Some(group)) => group,
            (None, None) => {
                self.settle_shards(query.as_deref()).await?;
                self.default_lease_group()
            }
        };
        self.check_lease_group(group)?;
        self.check_every_member_reads_leases()?;
        if self.router.serving(group).is_none() {
            if forwarded {
                return Err(Failure::not_hosted_here(group));
            }
            // The host is told the group, so that it places the lease where this node
            // routed it.
            let body = serde_json::json!({"ttl_seconds": grant.ttl_seconds, "group": group});
            return self
                .post_json(group, "/v1/leases".into(), body.to_string().into())
                .await;
        }
        let lease = self.grant_here(group, grant.ttl_seconds).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &serde_json::json!({
                "id": lease,
                "ttl_seconds": grant.ttl_seconds,
                "group": group,
            }),
        ))
    }

    /// Grants a lease of `ttl_seconds` in `group`, which this node hosts, under a fresh
    /// id; returns the id.
    async fn grant_here(&self, group: u64, ttl_seconds: u64) -> Result<u64, Failure> {
        let mut refusal = None;
        for _ in 0..GRANT_ATTEMPTS {
            let lease = leases::id_in(group, crate::random::random_u64() as u32);
            let op = Op::GrantLease { lease, ttl_seconds };
            match self
                .router
                .propose_op(group, op, self.request_timeout)
                .await
            {
                Ok(_) => return Ok(lease),
                Err(ProposeError::Lease(LeaseRefusal::Exists(_))) => {
                    refusal = Some(ProposeError::Lease(LeaseRefusal::Exists(lease)))
                }
                Err(other) => return Err(other.into()),
            }
        }
        Err(refusal.expect("every attempt was refused").into())
    }

    /// Grants a lease of `ttl_seconds` in `group`, here or on a node that hosts it;
    /// returns its id.
    pub(super) async fn grant_in(&self, group: u64, ttl_seconds: u64) -> Result<u64, Failure> {
        if self.router.serving(group).is_some() {
            return self.grant_here(group, ttl_seconds).await;
        }
        let body = serde_json::json!({"ttl_seconds": ttl_seconds, "group": group});
        let grant = Forwarded::json_post("/v1/leases".into(), body.to_string().into());
        let (_, answer) = self.send_for_success(group, grant).await?;
        let id = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|granted| granted["id"].as_u64());
        id.ok_or_else(|| {
            Failure::new(
                StatusCode::BAD_GATEWAY,
                format!("a node that hosts group {group} granted a lease but named no id"),
            )
        })
    }

    /// `GET /v1/leases[?group=G]`: the leases of every group that holds keys (or of
    /// group G), each group's read linearizably here or on a node that hosts it.
    async fn list_leases(&self, req: Request<Incoming>) -> Reply {
        let params = parse_query(req.uri().query(), &["group"])?;
        let groups = match number_param(&params, "group")? {
            Some(group) => {
                self.check_lease_group(group)?;
                vec![group]
            }
            None => {
                self.settle_shards(None).await?;
                self.groups_holding_keys()
            }
        };
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        let mut listed = Vec::new();
        for group in groups {
            if self.router.serving(group).is_some() {
                listed.extend(self.leases_here(group).await?);
            } else if forwarded {
                return Err(Failure::not_hosted_here(group));
            } else {
                let there = self
                    .fetch_json(group, format!("/v1/leases?group={group}"))
                    .await?;
                listed.extend(there["leases"].as_array().cloned().unwrap_or_default());
            }
        }
        listed.sort_by_key(|lease| lease["id"].as_u64());
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "leases": listed }),
        ))
    }

    /// The leases of `group`, which this node hosts, after a read index.
    async fn leases_here(&self, group: u64) -> Result<Vec<serde_json::Value>, Failure> {
        self.wait_until_readable(group, Consistency::Linearizable)
            .await?;
        let map = self.map_of(group)?;
        let map = map.read().unwrap();
        let now = std::time::Instant::now();
        Ok(map
            .leases()
            .iter()
            .map(|(id, lease)| {
                serde_json::json!({
                    "id": id,
                    "ttl_seconds": lease.seconds_left(now),
                    "granted_ttl_seconds": lease.ttl_seconds,
                    "key_count": lease.keys.len(),
                    "group": group,
                })
            })
            .collect())
    }

    /// Every group that holds keys, so leases (see [`holds_keys`]).
    pub(super) fn groups_holding_keys(&self) -> Vec<u64> {
        let membership = self.membership.read().unwrap();
        std::iter::once(CLUSTER_GROUP)
            .chain(membership.groups.keys().copied())
            .filter(|&group| holds_keys(&membership, group))
            .collect()
    }

    /// `GET /v1/leases/<id>`, on a node that hosts its group.
    async fn show_lease(&self, group: u64, lease: u64) -> Reply {
        self.wait_until_readable(group, Consistency::Linearizable)
            .await?;
        let map = self.map_of(group)?;
        let map = map.read().unwrap();
        let found = map
            .leases()
            .get(lease)
            .ok_or_else(|| lease_not_found(lease))?;
        let keys: Vec<String> = found
            .keys
            .iter()
            .map(|key| String::from_utf8_lossy(key).into_owned())
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "id": lease,
                "ttl_seconds": found.seconds_left(std::time::Instant::now()),
                "granted_ttl_seconds": found.ttl_seconds,
                "keys": keys,
                "group": group,
            }),
        ))
    }

    /// `POST /v1/leases/<id>/keepalive`, on a node that hosts its group.
    async fn keep_lease_alive(&self, group: u64, lease: u64) -> Reply {
        self.router
            .propose_op(group, Op::KeepLeaseAlive { lease }, self.request_timeout)
            .await?;
        let ttl_seconds = self
            .map_of(group)?
            .read()
            .unwrap()
            .leases()
            .get(lease)
            .map(|found| found.ttl_seconds);
        // Revoked between the keepalive's apply and this read: it did not live on.
        let ttl_seconds = ttl_seconds.ok_or_else(|| lease_not_found(lease))?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "id": lease, "ttl_seconds": ttl_seconds, "group": group }),
        ))
    }

    /// `DELETE /v1/leases/<id>`, on a node that hosts its group.
    async fn revoke_lease(&self, group: u64, lease: u64) -> Reply {
        let revoke = Op::RevokeLease {
            lease,
            renewed_at: 0,
        };
        let written = self
            .router
            .propose_op(group, revoke, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "id": lease,
                "revision": written.revision,
                "deleted": written.deleted,
                "group": group,
            }),
        ))
    }

    /// Where a grant that names no key or group puts its lease: the first shard's group
    /// (the cluster group when there is one shard).
    fn default_lease_group(&self) -> u64 {
        let membership = self.membership.read().unwrap();
        membership.shards.first().copied().unwrap_or(CLUSTER_GROUP)
    }

    /// Refuses a group that does not exist or holds no keys (the cluster group of a
    /// sharded cluster).
    fn check_lease_group(&self, group: u64) -> Result<(), Failure> {
        if group > leases::MAX_GROUP {
            return Err(Failure::bad_request(format!(
                "group {group}: leases live only in groups whose id fits in 32 bits (a \
                 lease id is the group's id and 32 bits of its own)"
            )));
        }
        if holds_keys(&self.membership.read().unwrap(), group) {
            return Ok(());
        }
        Err(Failure::bad_request(format!(
            "group {group} holds no keys, so no lease either (groups: GET /v1/groups)"
        )))
    }

    /// Leases are written only once every member reads them.
    pub(super) fn check_every_member_reads_leases(&self) -> Result<(), Failure> {
        if self.every_member_reads(entry_formats::LEASES) {
            return Ok(());
        }
        Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "leases need every member to run a release that reads entry format {} \
                 (retry after a rolling upgrade)",
                entry_formats::LEASES
            ),
        ))
    }

    /// Refuses a put of `key` (in `group`) that names `lease` of another group, or any
    /// lease before every member reads them.
    pub(super) fn check_lease_holds(
        &self,
        lease: u64,
        group: u64,
        key: &[u8],
    ) -> Result<(), Failure> {
        self.check_every_member_reads_leases()?;
        let lease_group = leases::group_of(lease);
        if lease_group == group {
            return Ok(());
        }
        Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "lease {lease} lives in group {lease_group}, but key {:?} belongs to group \
                 {group}: a lease holds keys of its own group only (grant one with \
                 {{\"key\": ...}} naming the key)",
                String::from_utf8_lossy(key)
            ),
        ))
    }
}

/// Whether `group` holds keys, so leases: a data group, or the cluster group when the
/// cluster has one shard.
fn holds_keys(membership: &Membership, group: u64) -> bool {
    match group {
        CLUSTER_GROUP => membership.shards.is_empty(),
        _ => membership.groups.contains_key(&group),
    }
}

/// A lease id from the path: a number whose group part is not 0.
fn parse_lease_id(text: &str) -> Result<u64, Failure> {
    let lease = text.parse::<u64>().map_err(|_| {
        Failure::bad_request(format!("lease id {text:?} is not a non-negative integer"))
    })?;
    if leases::group_of(lease) == 0 {
        return Err(lease_not_found(lease));
    }
    Ok(lease)
}

fn lease_not_found(lease: u64) -> Failure {
    ProposeError::Lease(LeaseRefusal::NotFound(lease)).into()
}
