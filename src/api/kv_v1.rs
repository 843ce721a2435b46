//! `/v1/kv`: the key-value API with revisions, beside raftexample's routes.
//!
//! | request                                  | does |
//! |------------------------------------------|------|
//! | `GET /v1/kv/<key>`                       | 200 `{"key","value","revision"}`, 404 if absent. With `Accept: application/octet-stream`, the raw value and an `X-Raftkvd-Revision` header |
//! | `PUT /v1/kv/<key>[?if_revision=N]`       | body: the raw value, or `{"value": "..."}` with `Content-Type: application/json`; 200 `{"key","revision"}` |
//! | `DELETE /v1/kv/<key>[?if_revision=N]`    | 200 `{"key","revision","deleted"}` (`deleted` 0 if the key was absent) |
//! | `GET /v1/kv?prefix=<p>&limit=<n>[&after=<key>]` | 200 `{"items": [{"key","value","revision"}...], "more"}`, in key order; the next page starts `after` the last key |
//! | `POST /v1/kv` body `{"k1":"v1",...}`     | sets every key at one revision, atomically; 200 `{"revision","keys"}` |
//!
//! A key's revision is the revision of the write that last changed it (etcd's
//! mod_revision; `kv.rs` says how revisions are counted). `if_revision=N` makes a write
//! conditional: it happens only if the key is at revision N (0: the key must not exist),
//! else 412 with the current revision and nothing is written. The check runs when the entry is applied, so it is atomic with the
//! write. GETs are linearizable unless `?consistency=serializable`. Keys in the path are
//! percent-decoded, must be UTF-8, and may contain `/`. JSON carries text, so a value that is not UTF-8
//! is read with `Accept: application/octet-stream` (406 otherwise).

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::{
    json_response, number_param, parse_json, parse_query, read_body, Api, Consistency, Failure,
    Reply,
};
use crate::command::{Command, RevisionCheck, Write};
use crate::kv::Versioned;
use crate::router::CLUSTER_GROUP;

/// The header that carries a key's revision with a raw value.
pub const REVISION_HEADER: &str = "x-raftkvd-revision";
/// Listing: pairs returned when the request names no limit, and the most it may ask for.
const DEFAULT_LIMIT: u64 = 1000;
const MAX_LIMIT: u64 = 10_000;

/// One key as JSON.
#[derive(serde::Serialize)]
struct KeyValue {
    key: String,
    value: String,
    revision: u64,
}

/// The JSON form of a PUT body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: String,
}

impl Api {
    pub(super) async fn get_versioned(
        &self,
        group: u64,
        key: Bytes,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Reply {
        let params = parse_query(query, &["consistency"])?;
        self.wait_until_readable(group, Consistency::from_params(&params)?)
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
        if wants_raw {
            let mut response = Response::new(Full::new(versioned.value));
            response.headers_mut().insert(
                REVISION_HEADER,
                versioned.revision.to_string().parse().unwrap(),
            );
            return Ok(response);
        }
        Ok(json_response(StatusCode::OK, &as_json(key, versioned)?))
    }

    pub(super) async fn put_versioned(
        &self,
        group: u64,
        key: Bytes,
        query: Option<&str>,
        req: Request<Incoming>,
    ) -> Reply {
        let params = parse_query(query, &["if_revision"])?;
        let check = number_param(&params, "if_revision")?;
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
            }],
        };
        let written = self
            .router
            .propose(group, command, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "key": text_of_key(&key), "revision": written.revision }),
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
            }),
        ))
    }

    pub(super) async fn list_keys(&self, query: Option<&str>) -> Reply {
        let params = parse_query(query, &["prefix", "after", "limit", "consistency"])?;
        let limit = number_param(&params, "limit")?.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Failure::bad_request(format!(
                "limit={limit}: ask for 1 to {MAX_LIMIT} keys"
            )));
        }
        let prefix = params.get("prefix").cloned().unwrap_or_default();
        self.wait_until_readable(CLUSTER_GROUP, Consistency::from_params(&params)?)
            .await?;
        // Freeze (a pointer copy per shard) and walk the copy without holding the lock.
        let frozen = self.kv.read().unwrap().freeze();
        let after = params.get("after").map(String::as_bytes);
        let (pairs, more) = frozen.list(prefix.as_bytes(), after, limit as usize);
        let items = pairs
            .into_iter()
            .map(|(key, versioned)| as_json(key, versioned))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "items": items, "more": more }),
        ))
    }

    pub(super) async fn set_many(&self, req: Request<Incoming>) -> Reply {
        let body = read_body(req, self.max_value_bytes).await?;
        let pairs: BTreeMap<String, String> = parse_json(&body)?;
        if pairs.is_empty() {
            return Err(Failure::bad_request(
                "the body names no keys: send {\"key\": \"value\", ...}",
            ));
        }
        if pairs.contains_key("") {
            return Err(Failure::bad_request("a key must not be empty"));
        }
        let keys = pairs.len();
        let command = Command {
            checks: Vec::new(),
            writes: pairs
                .into_iter()
                .map(|(key, value)| Write::Put {
                    key: key.into(),
                    value: value.into(),
                })
                .collect(),
        };
        let written = self
            .router
            .propose(CLUSTER_GROUP, command, self.request_timeout)
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "revision": written.revision, "keys": keys }),
        ))
    }
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

fn as_json(key: Bytes, versioned: Versioned) -> Result<KeyValue, Failure> {
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
    })
}

/// Keys are always UTF-8: both APIs take them from the request path, which the /v1
/// routes check and raftexample's cannot make otherwise.
fn text_of_key(key: &Bytes) -> String {
    String::from_utf8_lossy(key).into_owned()
}
