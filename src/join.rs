//! Joining a cluster. One-step join (`--join-via`), as in the hashicorp raft examples:
//! before a new node starts, it asks a member to add it (`POST /v1/members`) and learns
//! the members' peer URLs and the cluster's id from the answer, so that it can answer the
//! leader as soon as the leader calls. Two-step join (`POST /<id>`, then `--join`): the
//! node learns the cluster id from a member listed in its `--cluster` that already counts
//! it as a member (`cluster_id::learn`); until then it refuses raft traffic.
//!
//! It retries while the cluster cannot take the change (no leader, another change
//! pending, the member unreachable) until a deadline. A 409 that says this very node is
//! already a member with this URL is success: an earlier attempt got through but its
//! answer was lost. It never starts a node whose addition it could not confirm.

use std::time::{Duration, Instant};

use std::sync::Arc;

use slog::{info, warn, Logger};

use crate::cluster_id;
use crate::http_server::error_chain;
use crate::membership::ListedMember;
use crate::node::CHANGE_IN_PROGRESS;
use crate::tls::Tls;

/// How long to keep asking before giving up.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(500);

#[derive(serde::Deserialize)]
struct Members {
    members: Vec<ListedMember>,
    /// Absent from releases before the cluster id was listed.
    cluster_id: Option<String>,
}

/// What a member said when it added this node.
pub struct Joined {
    pub members: Vec<ListedMember>,
    pub cluster_id: u64,
}

/// Asks the member whose client API is at `via` to add node `id` at `peer_url`; returns
/// the members (this node included) and the cluster's id once the change is applied there.
pub async fn ask_to_join(
    via: &str,
    id: u64,
    peer_url: &str,
    tls: Option<Arc<Tls>>,
    logger: &Logger,
) -> Result<Joined, String> {
    let mut client = reqwest::Client::builder();
    if let Some(tls) = tls {
        // Presents this node's peer certificate; trusts the peers' CA and the client API's.
        client = client.use_preconfigured_tls((*tls.client_config()).clone());
    }
    let client = client
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let deadline = Instant::now() + JOIN_DEADLINE;
    let body = serde_json::json!({ "id": id, "peer_url": peer_url });
    loop {
        let attempt = client
            .post(format!("{via}/v1/members"))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let why = match attempt {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                match status {
                    201 => {
                        info!(logger, "added to the cluster"; "via" => via);
                        return parse_members(&text);
                    }
                    409 => match members_of(&client, via).await {
                        Ok(joined)
                            if joined
                                .members
                                .iter()
                                .any(|m| m.id == id && m.peer_url == peer_url) =>
                        {
                            info!(logger, "already a member of the cluster"; "via" => via);
                            return Ok(joined);
                        }
                        _ if text.contains(CHANGE_IN_PROGRESS) => format!("{status}: {text}"),
                        _ => return Err(format!("{via} refused to add this node: {text}")),
                    },
                    503 => format!("{status}: {text}"),
                    _ => return Err(format!("{via} refused to add this node ({status}): {text}")),
                }
            }
            Err(e) => {
                let why = error_chain(&e);
                // A handshake either side refuses (a certificate, a CA) fails the same
                // way on a retry.
                if tls_handshake_failed(&e) {
                    return Err(format!("the TLS handshake with {via} failed: {why}"));
                }
                format!("cannot reach {via}: {why}")
            }
        };
        if Instant::now() + RETRY_EVERY > deadline {
            return Err(format!(
                "could not join via {via} within {JOIN_DEADLINE:?}; last answer: {why}"
            ));
        }
        warn!(logger, "join attempt failed; retrying"; "via" => via, "reason" => &why);
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

async fn members_of(client: &reqwest::Client, via: &str) -> Result<Joined, String> {
    let text = client
        .get(format!("{via}/v1/members"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    parse_members(&text)
}

fn parse_members(text: &str) -> Result<Joined, String> {
    let listed = serde_json::from_str::<Members>(text)
        .map_err(|e| format!("unexpected member list {text:?}: {e}"))?;
    let cluster_id = listed
        .cluster_id
        .as_deref()
        .and_then(cluster_id::parse)
        .ok_or_else(|| format!("the member did not say which cluster it is in: {text:?}"))?;
    Ok(Joined {
        members: listed.members,
        cluster_id,
    })
}

/// Whether `e` was caused by a TLS error (rustls's own type, somewhere in its chain of
/// causes). An I/O error's `source()` skips the error it wraps, so the walk looks
/// inside each one instead; the handshake's error comes wrapped in two.
fn tls_handshake_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<rustls::Error>() {
            return true;
        }
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::tls_handshake_failed;

    #[test]
    fn a_tls_error_is_found_inside_an_io_error() {
        let tls = rustls::Error::NoCertificatesPresented;
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let wrapped = std::io::Error::other(io);
        assert!(tls_handshake_failed(&wrapped));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!tls_handshake_failed(&refused));
    }
}
