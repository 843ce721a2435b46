//! `/v1/backup` and `/v1/restore`: every key of the cluster in one file, and that file
//! written back into a cluster (etcd's `etcdctl snapshot save` and `etcdutl snapshot
//! restore`, rqlite's `/db/backup` and `/db/load`). The file's format is `backup.rs`.
//!
//! | request                                  | does |
//! |------------------------------------------|------|
//! | `GET /v1/backup`                         | 200, `application/octet-stream`: the backup file, one section per group that holds keys, each read linearizably |
//! | `GET /v1/groups/<g>/backup`              | the same for group g alone (what `/v1/backup` asks of a node that hosts g) |
//! | `POST /v1/restore[?merge=true]` body = a backup file | writes every key of it: 200 `{"keys","leases","groups"}`. 409 if the cluster holds keys, unless `merge=true` |
//! | `POST /v1/groups/<g>/restore` body = a backup file of group g | writes its keys into g as one command (what `/v1/restore` sends a host of g, a chunk at a time) |
//!
//! Each group's section is one consistent read of that group; a backup of several groups
//! is not one snapshot of them all (as a listing is not). A restore checks the whole file
//! (format, checksum, every key's size and destination) before it writes anything. Keys
//! of the cluster group or of a shard go to the group that the restoring cluster's shards
//! give each, so a backup restores into any number of shards; keys of a group an operator
//! created go to the group of the same id, which must exist (409 otherwise). Each lease
//! that keys were attached to is granted again, with its granted TTL, in every group its
//! keys now land in (new ids; its clock starts at the restore), and its keys are attached
//! to it. Keys are written in chunks of at most `--max-value-bytes`, each one raft
//! command: a restore is not atomic, and one that stops part-way says how far it got; run
//! it again with `?merge=true` (puts overwrite, so the keys end up as in the file).
//! Revisions start afresh: each key takes the revision of the chunk that wrote it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::forward::Forwarded;
use super::request::MAX_KEY_BYTES;
use super::{parse_query, read_body, Api, Consistency, Failure, Reply};
use crate::backup::{self, Backup, GroupBackup, Kind, Pair};
use crate::command::{Command, Write, NO_LEASE};
use crate::router::CLUSTER_GROUP;

/// The largest backup file `POST /v1/restore` reads (the map lives in memory, so a
/// larger one would not fit a small node anyway).
const MAX_RESTORE_BYTES: usize = 1 << 30;
/// What a pair costs in a command besides its key and value (lengths, tag, lease).
const PAIR_OVERHEAD: usize = 32;

const OCTET_STREAM: &str = "application/octet-stream";

impl Api {
    /// `GET /v1/backup`.
    pub(super) async fn backup(&self) -> Reply {
        self.settle_shards(None).await?;
        let mut backup = Backup::default();
        for group in self.groups_holding_keys() {
            backup.groups.push(self.group_backup(group).await?);
        }
        slog::info!(self.logger, "backup served";
            "groups" => backup.groups.len(), "keys" => backup.key_count());
        Ok(octet_response(backup::encode(&backup)))
    }

    /// `GET /v1/groups/<g>/backup`, on a node that hosts g.
    pub(super) async fn backup_one_group(&self, group: u64) -> Reply {
        let section = self.group_backup_here(group).await?;
        Ok(octet_response(backup::encode(&Backup {
            groups: vec![section],
        })))
    }

    /// Group `group`'s section, read here or on a node that hosts it.
    async fn group_backup(&self, group: u64) -> Result<GroupBackup, Failure> {
        if self.router.serving(group).is_some() {
            return self.group_backup_here(group).await;
        }
        let request = Forwarded {
            method: Method::GET,
            path: format!("/v1/groups/{group}/backup"),
            headers: Vec::new(),
            body: Bytes::new(),
        };
        let (_, body) = self.send_for_success(group, request).await?;
        let mut there = backup::decode(&body).map_err(|why| {
            Failure::new(
                StatusCode::BAD_GATEWAY,
                format!("a node that hosts group {group} answered a backup that is not one: {why}"),
            )
        })?;
        match there.groups.pop() {
            Some(section) if section.id == group && there.groups.is_empty() => Ok(section),
            _ => Err(Failure::new(
                StatusCode::BAD_GATEWAY,
                format!("a node that hosts group {group} answered another group's backup"),
            )),
        }
    }

    /// Group `group`'s section, from this node's map after a read index.
    async fn group_backup_here(&self, group: u64) -> Result<GroupBackup, Failure> {
        self.wait_until_readable(group, Consistency::Linearizable)
            .await?;
        // Freeze (a pointer copy per piece) and walk the copy without holding the lock.
        let frozen = self.map_of(group)?.read().unwrap().freeze();
        let leases = frozen.leases();
        let (every_key, _) = frozen.list(b"", None, usize::MAX);
        let pairs: Vec<Pair> = every_key
            .into_iter()
            .map(|(key, versioned)| Pair {
                lease: leases
                    .lease_of(&key)
                    .filter(|&id| leases.contains(id))
                    .unwrap_or(NO_LEASE),
                key,
                value: versioned.value,
                revision: versioned.revision,
            })
            .collect();
        let mut used: Vec<u64> = pairs
            .iter()
            .map(|p| p.lease)
            .filter(|&l| l != NO_LEASE)
            .collect();
        used.sort_unstable();
        used.dedup();
        let leases = used
            .into_iter()
            .filter_map(|id| Some((id, leases.get(id)?.ttl_seconds)))
            .collect();
        Ok(GroupBackup {
            id: group,
            kind: self.kind_of(group),
            revision: frozen.revision(),
            leases,
            pairs,
        })
    }

    fn kind_of(&self, group: u64) -> Kind {
        let sharded =
            group == CLUSTER_GROUP || self.membership.read().unwrap().shards.contains(&group);
        match sharded {
            true => Kind::Sharded,
            false => Kind::Named,
        }
    }

    /// `POST /v1/restore`, one at a time on this node.
    pub(super) async fn restore(&self, req: Request<Incoming>) -> Reply {
        if self.restoring.swap(true, Ordering::AcqRel) {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "a restore is already running on this node: wait for its answer",
            ));
        }
        // Let go however this ends, a client that hangs up included (the future is then
        // dropped mid-way).
        let _running = RestoreRunning(&self.restoring);
        self.restore_file(req).await
    }

    async fn restore_file(&self, req: Request<Incoming>) -> Reply {
        let params = parse_query(req.uri().query(), &["merge"])?;
        let merge = match params.get("merge").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(Failure::bad_request(format!(
                    "merge={other:?}: use true or false"
                )))
            }
        };
        let body = read_body(req, MAX_RESTORE_BYTES).await?;
        let backup = backup::decode(&body).map_err(|why| {
            Failure::bad_request(format!("not a backup this release restores: {why}"))
        })?;
        self.settle_shards(None).await?;
        let chunks = self.plan_restore(&backup)?;
        if !merge {
            self.check_empty().await?;
        }
        if chunks.iter().any(|c| !c.leases.is_empty()) {
            self.check_every_member_reads_leases()?;
        }
        let total = backup.key_count();
        let mut written = 0;
        let mut granted = HashMap::new();
        let mut groups = BTreeSet::new();
        for mut chunk in chunks {
            let (keys, group) = (chunk.pairs.len(), chunk.id);
            let step = match self.grant_chunk_leases(&mut chunk, &mut granted).await {
                Ok(()) => self.write_chunk(chunk).await,
                Err(e) => Err(e),
            };
            if let Err(failure) = step {
                return Err(Failure::new(
                    failure.status,
                    format!(
                        "the restore stopped after {written} of {total} keys: {}; the keys \
                         written stay, so run it again with ?merge=true",
                        failure.message
                    ),
                ));
            }
            written += keys;
            groups.insert(group);
        }
        slog::info!(self.logger, "backup restored";
            "keys" => written, "leases" => granted.len(), "merge" => merge);
        Ok(super::json_response(
            StatusCode::OK,
            &serde_json::json!({ "keys": written, "leases": granted.len(), "groups": groups }),
        ))
    }

    /// Where every key of `backup` goes, in chunks of at most `--max-value-bytes`, each a
    /// section of the group it goes to (with the backed-up lease ids, and no revision);
    /// refuses the whole backup if any key could not be written.
    fn plan_restore(&self, backup: &Backup) -> Result<Vec<GroupBackup>, Failure> {
        // Pairs by the group they go to, each with its lease's TTL (a lease is granted
        // anew in each group its keys land in).
        let mut by_group: BTreeMap<u64, Vec<(Pair, u64)>> = BTreeMap::new();
        for section in &backup.groups {
            if section.kind == Kind::Named && !self.group_exists(section.id) {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    format!(
                        "the backup holds keys of group {}, which an operator created and this \
                         cluster does not have: create it (POST /v1/groups) and restore again",
                        section.id
                    ),
                ));
            }
            if section.kind == Kind::Named && self.kind_of(section.id) == Kind::Sharded {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    format!(
                        "the backup holds keys of group {}, which an operator created, but \
                         group {0} is a shard of this cluster and holds only the keys its \
                         shard owns: restore into a cluster where group {0} is an operator's",
                        section.id
                    ),
                ));
            }
            for pair in &section.pairs {
                if pair.key.len() > MAX_KEY_BYTES || pair.value.len() > self.max_value_bytes {
                    return Err(Failure::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "key {:?} of group {} is longer than {MAX_KEY_BYTES} bytes or its \
                             value than --max-value-bytes ({}): nothing was written",
                            String::from_utf8_lossy(&pair.key),
                            section.id,
                            self.max_value_bytes
                        ),
                    ));
                }
                let group = match section.kind {
                    Kind::Sharded => self.owner_of(&pair.key),
                    Kind::Named => section.id,
                };
                let ttl = section.leases.iter().find(|(id, _)| *id == pair.lease);
                let lease_ttl = ttl.map_or(0, |(_, ttl)| *ttl);
                by_group
                    .entry(group)
                    .or_default()
                    .push((pair.clone(), lease_ttl));
            }
        }
        let mut chunks = Vec::new();
        for (group, pairs) in by_group {
            let kind = self.kind_of(group);
            let mut chunk = chunk_of(group, kind);
            let mut bytes = 0;
            for (pair, ttl) in pairs {
                let size = pair.key.len() + pair.value.len() + PAIR_OVERHEAD;
                if !chunk.pairs.is_empty() && bytes + size > self.max_value_bytes {
                    chunks.push(std::mem::replace(&mut chunk, chunk_of(group, kind)));
                    bytes = 0;
                }
                if pair.lease != NO_LEASE && !chunk.leases.iter().any(|(id, _)| *id == pair.lease) {
                    chunk.leases.push((pair.lease, ttl));
                }
                bytes += size;
                chunk.pairs.push(pair);
            }
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    /// Refuses (409) a restore into a cluster that holds keys.
    async fn check_empty(&self) -> Result<(), Failure> {
        for group in self.groups_holding_keys() {
            let empty = match self.router.serving(group) {
                Some(_) => {
                    self.wait_until_readable(group, Consistency::Linearizable)
                        .await?;
                    self.map_of(group)?.read().unwrap().len() == 0
                }
                // A page of one key; 406 if its value is not UTF-8, which is a key too.
                None => match self
                    .fetch_json(group, format!("/v1/groups/{group}/kv?limit=1"))
                    .await
                {
                    Ok(page) => page["items"].as_array().is_some_and(Vec::is_empty),
                    Err(failure) if failure.status == StatusCode::NOT_ACCEPTABLE => false,
                    Err(failure) => return Err(failure),
                },
            };
            if !empty {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    format!(
                        "the cluster holds keys (group {group} has some): restore into an empty \
                         cluster, or add ?merge=true to write the backup's keys over what is there"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Grants, in the chunk's group, each lease its pairs name that no earlier chunk of
    /// the same group had granted (`granted`: (group, backed-up id) to new id), and renames
    /// the pairs' leases to the new ids.
    async fn grant_chunk_leases(
        &self,
        chunk: &mut GroupBackup,
        granted: &mut HashMap<(u64, u64), u64>,
    ) -> Result<(), Failure> {
        let mut renamed = HashMap::new();
        for (lease, ttl) in &mut chunk.leases {
            let new = match granted.get(&(chunk.id, *lease)) {
                Some(&new) => new,
                None => {
                    let new = self.grant_in(chunk.id, *ttl).await?;
                    granted.insert((chunk.id, *lease), new);
                    new
                }
            };
            renamed.insert(*lease, new);
            *lease = new;
        }
        for pair in &mut chunk.pairs {
            if let Some(&new) = renamed.get(&pair.lease) {
                pair.lease = new;
            }
        }
        Ok(())
    }

    /// Writes one chunk, here or on a node that hosts its group.
    async fn write_chunk(&self, chunk: GroupBackup) -> Result<(), Failure> {
        let group = chunk.id;
        if self.router.serving(group).is_some() {
            return self.write_pairs_here(group, &chunk.pairs).await.map(|_| ());
        }
        let file = backup::encode(&Backup {
            groups: vec![chunk],
        });
        let request = Forwarded {
            method: Method::POST,
            path: format!("/v1/groups/{group}/restore"),
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM))],
            body: file.into(),
        };
        self.send_for_success(group, request).await.map(|_| ())
    }

    /// `POST /v1/groups/<g>/restore`, on a node that hosts g: the file's one section, which
    /// must be g's, written as one command.
    pub(super) async fn restore_one_group(&self, group: u64, req: Request<Incoming>) -> Reply {
        let limit = self
            .max_value_bytes
            .saturating_mul(2)
            .saturating_add(1 << 20);
        let body = read_body(req, limit).await?;
        let backup = backup::decode(&body).map_err(|why| {
            Failure::bad_request(format!("not a backup this release restores: {why}"))
        })?;
        let section = match backup.groups.as_slice() {
            [section] if section.id == group => section,
            _ => {
                return Err(Failure::bad_request(format!(
                    "a restore of group {group} takes a backup of group {group} alone"
                )))
            }
        };
        for pair in &section.pairs {
            self.check_owner(group, &pair.key)?;
            if pair.lease != NO_LEASE {
                self.check_lease_holds(pair.lease, group, &pair.key)?;
            }
        }
        let revision = match section.pairs.is_empty() {
            true => 0,
            false => self.write_pairs_here(group, &section.pairs).await?,
        };
        Ok(super::json_response(
            StatusCode::OK,
            &serde_json::json!({ "keys": section.pairs.len(), "revision": revision, "group": group }),
        ))
    }

    /// Puts `pairs` into `group`, which this node hosts, as one command; its revision.
    async fn write_pairs_here(&self, group: u64, pairs: &[Pair]) -> Result<u64, Failure> {
        let command = Command {
            checks: Vec::new(),
            writes: pairs
                .iter()
                .map(|pair| Write::Put {
                    key: pair.key.clone(),
                    value: pair.value.clone(),
                    lease: pair.lease,
                })
                .collect(),
        };
        let written = self
            .router
            .propose(group, command, self.request_timeout)
            .await?;
        Ok(written.revision)
    }
}

/// Clears the flag of a running restore when dropped.
struct RestoreRunning<'a>(&'a AtomicBool);

impl Drop for RestoreRunning<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// An empty chunk of a restore for `group`.
fn chunk_of(group: u64, kind: Kind) -> GroupBackup {
    GroupBackup {
        id: group,
        kind,
        revision: 0,
        leases: Vec::new(),
        pairs: Vec::new(),
    }
}

fn octet_response(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
    response
}
