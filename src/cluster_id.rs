//! Which cluster this node belongs to, so that a message from another cluster (a peer
//! URL pointing at the wrong place, a port reused by another cluster's node) is refused
//! instead of obeyed. As etcd does, the id is derived when a cluster is formed: from
//! `--initial-cluster-token` if given (so every node gets the same id however it spells
//! the others' URLs), else from the initial `--cluster` URLs, with a hash fixed forever
//! (FNV-1a). A node that joins adopts it only from the cluster it was told to join: the
//! member it joined through (`--join-via`), or a member listed in its `--cluster` that
//! counts this node among its members (`--join`, see join.rs); never from whoever
//! connects first. It is kept in `<data-dir>/cluster-id` (written durably, see
//! durable.rs), and never changes once known.

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use slog::{info, warn, Logger};

use crate::durable;
use crate::http_server::error_chain;
use crate::membership::ListedMember;
use crate::sharding::fnv1a;

pub struct ClusterId {
    value: OnceLock<u64>,
    file: PathBuf,
}

impl ClusterId {
    /// Reads the id stored in `file`, if any.
    pub fn load(file: PathBuf) -> Result<ClusterId, String> {
        let value = OnceLock::new();
        match fs::read_to_string(&file) {
            Ok(text) => {
                let id = u64::from_str_radix(text.trim(), 16)
                    .map_err(|_| format!("{} is not a cluster id", file.display()))?;
                let _ = value.set(id);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        }
        Ok(ClusterId { value, file })
    }

    /// The id of a cluster formed with this token, or else from these initial peer URLs.
    pub fn of_initial_cluster(peer_urls: &[String], token: Option<&str>) -> u64 {
        match token {
            Some(token) => fnv1a(format!("raftkvd cluster token\n{token}").as_bytes()),
            None => fnv1a(format!("raftkvd cluster urls\n{}", peer_urls.join("\n")).as_bytes()),
        }
    }

    pub fn get(&self) -> Option<u64> {
        self.value.get().copied()
    }

    /// Makes `id` this node's cluster id, durably, if it has none yet. Returns the id in
    /// force afterwards.
    pub fn adopt(&self, id: u64) -> Result<u64, String> {
        if let Some(current) = self.get() {
            return Ok(current);
        }
        durable::write_file(&self.file, format!("{}\n", format(id)).as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", self.file.display()))?;
        Ok(*self.value.get_or_init(|| id))
    }
}

/// The request header that carries the sender's cluster id, on every peer request.
pub const HEADER: &str = "x-raftkvd-cluster-id";

pub fn format(id: u64) -> String {
    format!("{id:016x}")
}

pub fn parse(text: &str) -> Option<u64> {
    u64::from_str_radix(text, 16).ok()
}

/// The peer-port path where a node says which cluster it is in (see [`ClusterView`]).
pub const CLUSTER_VIEW_PATH: &str = "/raft/cluster";
/// How often a joining node asks for its cluster's id.
const LEARN_EVERY: Duration = Duration::from_millis(500);

/// What a member's peer port says of its cluster (`GET /raft/cluster`).
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
pub struct ClusterView {
    pub cluster_id: String,
    /// The answering node.
    pub id: u64,
    /// The cluster group's leader as the answering node knows it (0: none).
    pub leader: u64,
    pub members: Vec<ListedMember>,
    pub removed: Vec<u64>,
    /// The newest entry format the answering node reads (`entry_formats.rs`); absent
    /// from older releases' answers, which read format 1 only as far as this build
    /// assumes.
    #[serde(default = "single_format")]
    pub entry_format: u8,
}

fn single_format() -> u8 {
    crate::entry_formats::SINGLE
}

/// Asks each peer in `peers` for its view of the cluster, one after another (a peer that
/// does not answer costs at most two seconds).
pub async fn cluster_views(
    client: &reqwest::Client,
    peers: &[(u64, String)],
) -> Vec<Result<ClusterView, String>> {
    let mut views = Vec::new();
    for (_, url) in peers {
        views.push(cluster_view(client, url).await);
    }
    views
}

pub async fn cluster_view(client: &reqwest::Client, url: &str) -> Result<ClusterView, String> {
    let answer = client
        .get(format!("{url}{CLUSTER_VIEW_PATH}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    if !answer.status().is_success() {
        return Err(format!("{url}: {}", answer.status()));
    }
    answer
        .json::<ClusterView>()
        .await
        .map_err(|e| format!("{url}: {e}"))
}

/// Two-step join: until this node has a cluster id, asks the members in `peers` (its
/// `--cluster` list) for theirs, and adopts the id of the first that lists this node as a
/// member at `own_url`.
pub async fn learn(
    client: reqwest::Client,
    own_id: u64,
    own_url: String,
    peers: Vec<(u64, String)>,
    cluster_id: Arc<ClusterId>,
    logger: Logger,
) {
    let mut told = false;
    while cluster_id.get().is_none() {
        for view in cluster_views(&client, &peers).await.into_iter().flatten() {
            let counts_us = view
                .members
                .iter()
                .any(|m| m.id == own_id && m.peer_url == own_url);
            let Some(id) = parse(&view.cluster_id) else {
                continue;
            };
            if !counts_us {
                continue;
            }
            match cluster_id.adopt(id) {
                Ok(id) => {
                    info!(logger, "joined cluster"; "cluster_id" => format(id), "told_by" => view.id);
                    return;
                }
                Err(e) => {
                    warn!(logger, "could not record the cluster id; will retry"; "error" => e)
                }
            }
        }
        if !told {
            info!(
                logger,
                "waiting for a member in --cluster to list this node as a member"
            );
            told = true;
        }
        tokio::time::sleep(LEARN_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_forever_and_a_token_alone_decides() {
        let urls = [
            "http://127.0.0.1:1".to_string(),
            "http://127.0.0.1:2".to_string(),
        ];
        let spelled = [
            "http://localhost:1".to_string(),
            "http://127.0.0.1:2".to_string(),
        ];
        // Pinned: a change here would split every cluster formed before it.
        assert_eq!(
            format(ClusterId::of_initial_cluster(&urls, None)),
            "3f26c1c8e4c66eda"
        );
        assert_ne!(
            ClusterId::of_initial_cluster(&urls, None),
            ClusterId::of_initial_cluster(&spelled, None)
        );
        assert_eq!(
            ClusterId::of_initial_cluster(&urls, Some("prod")),
            ClusterId::of_initial_cluster(&spelled, Some("prod"))
        );
        assert_ne!(
            ClusterId::of_initial_cluster(&urls, Some("prod")),
            ClusterId::of_initial_cluster(&urls, Some("test"))
        );
    }
}
