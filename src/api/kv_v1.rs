//! `/v1/kv`: the key-value API with revisions, beside raftexample's routes; and the same
//! on one chosen group's map under `/v1/groups/<g>/kv`.
//!
//! | request                                  | does |
//! |------------------------------------------|------|
//! | `GET /v1/kv/<key>`                       | 200 `{"key","value","revision","group"}`, 404 if absent. With `Accept: application/octet-stream`, the raw value and an `X-Raftkvd-Revision` header |
//! | `PUT /v1/kv/<key>[?if_revision=N][&lease=ID]` | body: the raw value, or `{"value": "..."}` with `Content-Type: application/json`; 200 `{"key","revision","group"}`. With `lease`, the key is deleted when the lease ends (`leases_v1.rs`); without, it is detached from any |
//! | `DELETE /v1/kv/<key>[?if_revision=N]`    | 200 `{"key","revision","deleted","group"}` (`deleted` 0 if the key was absent) |
//! | `GET /v1/kv?prefix=<p>&limit=<n>[&after=<key>]` | 200 `{"items": [{"key","value","revision","group"}...], "more"}`, in key order across all groups; the next page starts `after` the last key |
//! | `POST /v1/kv` body `{"k1":"v1",...}`     | sets every key at one revision, atomically, if they all belong to one group (409 otherwise); 200 `{"revision","keys","group"}` |
//!
//! Each key belongs to one raft group (`sharding.rs`; the cluster group when the cluster
//! has one shard), and every answer names it in `group`. A key whose group this node
//! does not host is served by a node that does (`forward.rs`). A key's revision is the
//! revision of its group's write that last changed it (etcd's mod_revision; `kv.rs` says
//! how revisions are counted; each group counts its own). `if_revision=N` makes a write
//! conditional: it happens only if the key is at revision N (0: the key must not exist),
//! else 412 with the current revision and nothing is written. The check runs when the
//! entry is applied, so it is atomic with the write. GETs are linearizable unless
//! `?consistency=serializable`; a listing over several groups is linearizable per group,
//! not one snapshot of them all. Keys in the path are percent-decoded, must be UTF-8, and
//! may contain `/`. JSON carries text, so a value that is not UTF-8 is read with
//! `Accept: application/octet-stream` (406 otherwise).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::request::parse_pairs;
use super::{
    decode_path_segment, json_response, number_param, parse_json, parse_query, read_body, Api,
    Consistency, Failure, Reply,
};
use crate::command::{Command, RevisionCheck, Write, NO_LEASE};
use crate::kv::Versioned;
use crate::router::{ProposeError, CLUSTER_GROUP};
use crate::sharding;

/// Listing: pairs returned when the request names no limit, and the most it may ask for.
const DEFAULT_LIMIT: u64 = 1000;
const MAX_LIMIT: u64 = 10_000;

/// One key as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyValue {
    key: String,
    value: String,
    revision: u64,
    /// The raft group that holds it.
    group: u64,
}

/// One page of a listing as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct Page {
    items: Vec<KeyValue>,
    more: bool,
}

/// What a listing asks for.
struct ListRequest {
    prefix: String,
    after: Option<String>,
    limit: u64,
}

impl ListRequest {
    fn parse(params: &HashMap<String, String>) -> Result<ListRequest, Failure> {
        let limit = number_param(params, "limit")?.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Failure::bad_request(format!(
                "limit={limit}: ask for 1 to {MAX_LIMIT} keys"
            )));
        }
        Ok(ListRequest {
            prefix: params.get("prefix").cloned().unwrap_or_default(),
            after: params.get("after").cloned(),
            limit,
        })
    }
}

/// The query parameters of a listing.
const LIST_PARAMS: [&str; 4] = ["prefix", "after", "limit", "consistency"];

/// The JSON form of a PUT body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: String,
}

impl Api {
    /// `/v1/kv/<key>` (`raw` is the key as the path spells it): served by the group that
    /// owns the key, here or on a node that hosts it.
    pub(super) async fn route_key(
        &self,
        req: Request<Incoming>,
        method: &Method,
        raw: &str,
    ) -> Reply {
        let key = decode_path_segment(raw)?;
        self.settle_shards(req.uri().query()).await?;
        let group = self.owner_of(&key);
        if self.router.serving(group).is_none() {
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let path = format!("/v1/groups/{group}/kv/{raw}{query}");
            return self.forward(group, req, Some(path)).await;
        }
        self.serve_key(group, key, method, req).await
    }

    /// A key of `group`, which this node hosts.
    pub(super) async fn serve_key(
        &self,
        group: u64,
        key: Bytes,
        method: &Method,
        req: Request<Incoming>,
    ) -> Reply {
        self.check_owner(group, &key)?;
        let query = req.uri().query().map(str::to_string);
        let query = query.as_deref();
        match *method {
            Method::GET => self.get_versioned(group, key, query, req.headers()).await,
            Method::PUT => self.put_versioned(group, key, query, req).await,
            Method::DELETE => self.delete_versioned(group, key, query).await,
            _ => Err(Failure::method_not_allowed(method, "GET, PUT, DELETE")),
        }
    }

    /// The group that owns `key`.
    pub(super) fn owner_of(&self, key: &[u8]) -> u64 {
        sharding::group_of(key, &self.membership.read().unwrap().shards)
    }

    /// Makes sure this node's copy of the list of shards is current before it routes a
    /// key by it, unless the read may be stale anyway (`serializable`). A node that just
    /// started or joined has not applied the cluster group's log yet: knowing no shards,
    /// it would take the cluster group for every key's owner and answer "not found". The
    /// list is set once, when the cluster is formed, and never changes after; so a node
    /// that knows a list knows the current one, and one that knows none asks a read index
    /// of the cluster group, once per process. (Asking when the list is known would make
    /// every shard unreachable from this node while the cluster group elects a leader.)
    pub(super) async fn settle_shards(&self, query: Option<&str>) -> Result<(), Failure> {
        use std::sync::atomic::Ordering;
        let serializable =
            query.is_some_and(|q| q.split('&').any(|p| p == "consistency=serializable"));
        if serializable || self.shards_settled.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.membership.read().unwrap().shards.is_empty() {
            self.shards_settled.store(true, Ordering::Release);
            return Ok(());
        }
        // Without a leader the read index would wait out the whole request timeout.
        if self.router.status(CLUSTER_GROUP).await?.leader == 0 {
            return Err(ProposeError::NoLeader.into());
        }
        self.wait_until_readable(CLUSTER_GROUP, Consistency::Linearizable)
            .await?;
        self.shards_settled.store(true, Ordering::Release);
        Ok(())
    }

    /// Refuses (421) a key that `group` must not hold: in a sharded cluster the shards and
    /// the cluster group hold only their own keys, so that `/v1/kv` finds every key where
    /// it looks. (A group an operator created holds any key.)
    pub(super) fn check_owner(&self, group: u64, key: &[u8]) -> Result<(), Failure> {
        let membership = self.membership.read().unwrap();
        let owner = sharding::group_of(key, &membership.shards);
        let sharded = group == CLUSTER_GROUP || membership.shards.contains(&group);
        if owner == group || !sharded {
            return Ok(());
        }
        Err(Failure::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "key {:?} belongs to group {owner}, not group {group}: use /v1/kv/<key>",
                String::from_utf8_lossy(key)
            ),
        ))
    }

    pub(super) async fn get_versioned(
        &self,
        group: u64,
        key: Bytes,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Reply {
        if query.is_some_and(|q| q.split('&').any(|p| p.starts_with("wait="))) {
            return self.wait_for_change(group, key, query).await;
        }
        let params = parse_query(query, &["consistency"])?;
        let read_index = self
            .wait_until_readable(group, Consistency::from_params(&params)?)
            .await?;
        let found = self.map_of(group)?.read().unwrap().get(&key);
        let Some(versioned) = found else {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                format!("key {:?} not found", String::from_utf8_lossy(&key)),
            ));
        };
        let wants_raw = headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/octet-stream"));
        let revision = versioned.revision;
        let mut response = match wants_raw {
            true => Response::new(Full::new(versioned.value)),
            false => json_response(StatusCode::OK, &as_json(key, versioned, group)?),
        };
        self.mark_read(&mut response, revision, read_index);
        Ok(response)
    }

    pub(super) async fn put_versioned(
        &self,
        group: u64,
        key: Bytes,
        query: Option<&str>,
        req: Request<Incoming>,
    ) -> Reply {
        let params = parse_query(query, &["if_revision", "lease"])?;
        let check = number_param(&params, "if_revision")?;
        let lease = number_param(&params, "lease")?.unwrap_or(NO_LEASE);
        if lease != NO_LEASE {
            self.check_lease_holds(lease, group, &key)?;
        }
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = read_body(req, self.max_value_bytes).await?;
        let value = if is_json {
            Bytes::from(parse_json::<PutBody>(&body)?.value)
        } else {
            body
        };
        let command = Command {
            checks: revision_check(&key, check),
            writes: vec![Write::Put {
                key: key.clone(),
                value,
                lease,
            }],
        };
        let written = self
            .router
            .propose(group, command, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "key": text_of_key(&key),
                "revision": written.revision,
                "group": group,
            }),
        ))
    }

    pub(super) async fn delete_versioned(
        &self,
        group: u64,
        key: Bytes,
        query: Option<&str>,
    ) -> Reply {
        let params = parse_query(query, &["if_revision"])?;
        let check = number_param(&params, "if_revision")?;
        let command = Command {
            checks: revision_check(&key, check),
            writes: vec![Write::Delete { key: key.clone() }],
        };
        let written = self
            .router
            .propose(group, command, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "key": text_of_key(&key),
                "revision": written.revision,
                "deleted": written.deleted,
                "group": group,
            }),
        ))
    }

    /// `GET /v1/kv`: one page of the keys of every group that holds keys, merged in key
    /// order. Each group's first `limit` matches are enough to know the first `limit` of
    /// them all.
    pub(super) async fn list_keys(&self, query: Option<&str>) -> Reply {
        self.settle_shards(query).await?;
        let shards = self.membership.read().unwrap().shards.clone();
        if shards.is_empty() {
            return self.list_group(CLUSTER_GROUP, query).await;
        }
        let params = parse_query(query, &LIST_PARAMS)?;
        let list = ListRequest::parse(&params)?;
        let consistency = Consistency::from_params(&params)?;
        let groups: BTreeSet<u64> = shards.into_iter().collect();
        let mut items = Vec::new();
        let mut more = false;
        for group in groups {
            let page = if self.router.serving(group).is_some() {
                self.page_of(group, &list, consistency).await?
            } else {
                let query = query.map(|q| format!("?{q}")).unwrap_or_default();
                let page = self
                    .fetch_json(group, format!("/v1/groups/{group}/kv{query}"))
                    .await?;
                serde_json::from_value::<Page>(page).map_err(|e| {
                    Failure::new(
                        StatusCode::BAD_GATEWAY,
                        format!("group {group} answered a listing that is not one: {e}"),
                    )
                })?
            };
            more |= page.more;
            items.extend(page.items);
        }
        items.sort_by(|a, b| a.key.cmp(&b.key));
        if items.len() > list.limit as usize {
            items.truncate(list.limit as usize);
            more = true;
        }
        Ok(json_response(StatusCode::OK, &Page { items, more }))
    }

    /// `GET /v1/groups/<g>/kv`: one page of one group's keys, which this node hosts.
    pub(super) async fn list_group(&self, group: u64, query: Option<&str>) -> Reply {
        let params = parse_query(query, &LIST_PARAMS)?;
        let list = ListRequest::parse(&params)?;
        let page = self
            .page_of(group, &list, Consistency::from_params(&params)?)
            .await?;
        Ok(json_response(StatusCode::OK, &page))
    }

    async fn page_of(
        &self,
        group: u64,
        list: &ListRequest,
        consistency: Consistency,
    ) -> Result<Page, Failure> {
        self.wait_until_readable(group, consistency).await?;
        // Freeze (a pointer copy per shard) and walk the copy without holding the lock.
        let frozen = self.map_of(group)?.read().unwrap().freeze();
        let after = list.after.as_deref().map(str::as_bytes);
        let (pairs, more) = frozen.list(list.prefix.as_bytes(), after, list.limit as usize);
        let items = pairs
            .into_iter()
            .map(|(key, versioned)| as_json(key, versioned, group))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page { items, more })
    }

    /// `POST /v1/kv`: atomic within the one group that owns every key; keys of several
    /// groups are refused (409) until cross-group transactions exist.
    pub(super) async fn set_many(&self, req: Request<Incoming>) -> Reply {
        let lease = lease_param(req.uri().query())?;
        let body = read_body(req, self.max_value_bytes).await?;
        let pairs = parse_pairs(&body)?;
        self.settle_shards(None).await?;
        let groups: BTreeSet<u64> = pairs.keys().map(|k| self.owner_of(k.as_bytes())).collect();
        if groups.len() > 1 {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!(
                    "the keys belong to different groups ({groups:?}); POST /v1/kv is atomic \
                     within one group only: send them in separate requests"
                ),
            ));
        }
        let group = groups.into_iter().next().expect("one key at least");
        if self.router.serving(group).is_some() {
            return self.write_pairs(group, pairs, lease).await;
        }
        let query = match lease {
            NO_LEASE => String::new(),
            lease => format!("?lease={lease}"),
        };
        self.post_json(group, format!("/v1/groups/{group}/kv{query}"), body)
            .await
    }

    /// `POST /v1/groups/<g>/kv`: the same on one group, which this node hosts.
    pub(super) async fn set_many_in(&self, group: u64, req: Request<Incoming>) -> Reply {
        let lease = lease_param(req.uri().query())?;
        let body = read_body(req, self.max_value_bytes).await?;
        let pairs = parse_pairs(&body)?;
        for key in pairs.keys() {
            self.check_owner(group, key.as_bytes())?;
        }
        self.write_pairs(group, pairs, lease).await
    }

    /// Writes `pairs` to `group` at one revision, each key attached to `lease` (or to
    /// none).
    async fn write_pairs(&self, group: u64, pairs: BTreeMap<String, String>, lease: u64) -> Reply {
        if let Some(key) = pairs.keys().next().filter(|_| lease != NO_LEASE) {
            self.check_lease_holds(lease, group, key.as_bytes())?;
        }
        let keys = pairs.len();
        let command = Command {
            checks: Vec::new(),
            writes: pairs
                .into_iter()
                .map(|(key, value)| Write::Put {
                    key: key.into(),
                    value: value.into(),
                    lease,
                })
                .collect(),
        };
        let written = self
            .router
            .propose(group, command, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "revision": written.revision, "keys": keys, "group": group }),
        ))
    }
}

/// The `lease` a multi-set attaches its keys to (`NO_LEASE` when absent).
fn lease_param(query: Option<&str>) -> Result<u64, Failure> {
    let params = parse_query(query, &["lease"])?;
    Ok(number_param(&params, "lease")?.unwrap_or(NO_LEASE))
}

fn revision_check(key: &Bytes, revision: Option<u64>) -> Vec<RevisionCheck> {
    revision
        .map(|revision| RevisionCheck {
            key: key.clone(),
            revision,
        })
        .into_iter()
        .collect()
}

fn as_json(key: Bytes, versioned: Versioned, group: u64) -> Result<KeyValue, Failure> {
    let value = String::from_utf8(versioned.value.to_vec()).map_err(|_| {
        Failure::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "the value of key {:?} is not UTF-8, so JSON cannot carry it; \
                 GET /v1/kv/<key> with Accept: application/octet-stream",
                text_of_key(&key)
            ),
        )
    })?;
    Ok(KeyValue {
        key: text_of_key(&key),
        value,
        revision: versioned.revision,
        group,
    })
}

/// Keys are always UTF-8: both APIs take them from the request path, which the /v1
/// routes check and raftexample's cannot make otherwise.
fn text_of_key(key: &Bytes) -> String {
    String::from_utf8_lossy(key).into_owned()
}
