//! The operator's routes:
//!
//! | request                  | does                                        |
//! |--------------------------|---------------------------------------------|
//! | `GET /status`            | JSON: the cluster group's id, term, role, leader, commit, applied, last snapshot, members; data-dir size; release and entry formats; every hosted group (`groups`) |
//! | `GET /health`            | 200 while the process serves                 |
//! | `GET /readyz`            | 200 once a leader is known and all known commits are applied; else 503 |
//! | `GET /metrics`           | Prometheus text format (`metrics.rs`), with gauges per hosted group |
//! | `POST /debug/partition`  | test-only (`--enable-fault-injection`): drop raft messages to/from the listed peers |
//! | `POST /debug/panic`      | test-only (`--enable-fault-injection`): panic, to show a panic stops the process |
//!
//! Nothing here changes replicated state.

use std::collections::BTreeSet;
use std::path::Path;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use slog::warn;

use super::raftexample::MAX_URL_BYTES;
use super::{json_response, no_content, read_body, Api, Failure, Reply};
use crate::http_server::text_response;
use crate::membership::parse_node_id;
use crate::metrics::{render_groups, GroupGauges};
use crate::router::{NodeStatus, CLUSTER_GROUP};

/// The fault-injection routes (without their leading slash).
pub(super) const PARTITION_ROUTE: &str = "debug/partition";
pub(super) const PANIC_ROUTE: &str = "debug/panic";

/// `GET /status`: the node's view (of the cluster group) plus what only the process
/// knows.
#[derive(serde::Serialize)]
struct Status {
    #[serde(flatten)]
    node: NodeStatus,
    /// This build's release.
    version: &'static str,
    /// The newest entry format this node reads (`entry_formats.rs`), and the newest that
    /// every member of the cluster reads, which is what the cluster writes: below this
    /// node's during a rolling upgrade, until every member runs the new release.
    entry_format: u8,
    cluster_entry_format: u8,
    /// Bytes under the data dir: raft log, snapshots, markers.
    data_dir_bytes: u64,
    /// Every group hosted here, the cluster group first.
    groups: Vec<GroupState>,
}

/// One hosted group in `/status`.
#[derive(serde::Serialize)]
struct GroupState {
    id: u64,
    role: String,
    leader: u64,
    term: u64,
    commit: u64,
    applied: u64,
    asleep: bool,
    keys: usize,
    leases: usize,
}

impl Api {
    pub(super) async fn status(&self) -> Reply {
        let node = self.router.status(CLUSTER_GROUP).await?;
        let dir = self.data_dir.clone();
        let data_dir_bytes = tokio::task::spawn_blocking(move || size_of_dir(&dir))
            .await
            .unwrap_or(0);
        let groups = self.hosted_groups().await;
        let cluster_entry_format = {
            let membership = self.membership.read().unwrap();
            let members = membership
                .others(self.id)
                .filter(|id| !membership.removed.contains(id));
            self.entry_formats.newest_all_read(members)
        };
        Ok(json_response(
            StatusCode::OK,
            &Status {
                node,
                version: env!("CARGO_PKG_VERSION"),
                entry_format: self.entry_formats.own(),
                cluster_entry_format,
                data_dir_bytes,
                groups,
            },
        ))
    }

    /// `GET /metrics`: the process's counters and every hosted group's gauges.
    pub(super) async fn metrics(&self) -> Reply {
        let mut text = self.metrics.render();
        let gauges: Vec<GroupGauges> = self
            .hosted_groups()
            .await
            .into_iter()
            .map(|g| GroupGauges {
                group: g.id,
                term: g.term,
                commit: g.commit,
                applied: g.applied,
                leader: g.leader == self.id,
                asleep: g.asleep,
                keys: g.keys,
                leases: g.leases,
            })
            .collect();
        render_groups(&mut text, &gauges);
        Ok(text_response(StatusCode::OK, &text))
    }

    /// Every group hosted here, as its replica sees it (one that stops meanwhile is left
    /// out).
    async fn hosted_groups(&self) -> Vec<GroupState> {
        let hosted = self.router.hosted();
        let statuses = self.router.statuses(&hosted).await;
        let mut groups = Vec::new();
        for (group, status) in hosted.into_iter().zip(statuses) {
            let (Ok(status), Some(kv)) = (status, self.router.kv(group)) else {
                continue;
            };
            let map = kv.read().unwrap();
            groups.push(GroupState {
                id: group,
                role: status.role,
                leader: status.leader,
                term: status.term,
                commit: status.commit,
                applied: status.applied,
                asleep: status.asleep,
                keys: map.len(),
                leases: map.leases().len(),
            });
        }
        groups
    }

    /// Ready to serve: a leader is known and this node has applied all it knows is
    /// committed.
    pub(super) async fn ready(&self) -> Reply {
        let status = self.router.status(CLUSTER_GROUP).await?;
        let unavailable = |why: String| Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, why));
        if status.leader == 0 {
            return unavailable("not ready: no leader known".into());
        }
        if status.applied < status.commit {
            return unavailable(format!(
                "not ready: applied {} of {} committed entries",
                status.applied, status.commit
            ));
        }
        Ok(text_response(StatusCode::OK, "ready\n"))
    }

    pub(super) async fn set_partition(&self, req: Request<Incoming>) -> Reply {
        let body = read_body(req, MAX_URL_BYTES).await?;
        let text = String::from_utf8_lossy(&body);
        let peers = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_node_id)
            .collect::<Result<BTreeSet<u64>, String>>()
            .map_err(Failure::bad_request)?;
        warn!(self.logger, "fault injection: dropping raft messages to and from peers"; "peers" => ?peers);
        if let Some(partition) = &self.partition {
            partition.set(peers);
        }
        Ok(no_content())
    }
}

/// `POST /debug/panic` (test-only): panics on the request's task, which the async
/// runtime alone would survive; the process's panic hook must stop it (non-zero status).
pub(super) fn panic_on_purpose() -> Reply {
    panic!("fault injection: POST /debug/panic");
}

/// Total size of the files under `dir` (files that vanish meanwhile count as 0).
fn size_of_dir(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => size_of_dir(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
