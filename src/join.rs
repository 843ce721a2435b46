//! One-step join (`--join-via`), as in the hashicorp raft examples: before a new node
//! starts, it asks a member to add it (`POST /v1/members`) and learns the members' peer
//! URLs from the answer, so that it can answer the leader as soon as the leader calls.
//!
//! It retries while the cluster cannot take the change (no leader, another change
//! pending, the member unreachable) until a deadline. A 409 that says this very node is
//! already a member with this URL is success: an earlier attempt got through but its
//! answer was lost. It never starts a node whose addition it could not confirm.

use std::time::{Duration, Instant};

use slog::{info, warn, Logger};

use crate::node::CHANGE_IN_PROGRESS;

/// How long to keep asking before giving up.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// A member as `/v1/members` lists it.
#[derive(serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListedMember {
    pub id: u64,
    pub peer_url: String,
}

#[derive(serde::Deserialize)]
struct Members {
    members: Vec<ListedMember>,
}

/// Asks the member whose client API is at `via` to add node `id` at `peer_url`; returns
/// the members (this node included) once the change is applied there.
pub async fn ask_to_join(
    via: &str,
    id: u64,
    peer_url: &str,
    logger: &Logger,
) -> Result<Vec<ListedMember>, String> {
    let client = reqwest::Client::new();
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
                        Ok(members)
                            if members.iter().any(|m| m.id == id && m.peer_url == peer_url) =>
                        {
                            info!(logger, "already a member of the cluster"; "via" => via);
                            return Ok(members);
                        }
                        _ if text.contains(CHANGE_IN_PROGRESS) => format!("{status}: {text}"),
                        _ => return Err(format!("{via} refused to add this node: {text}")),
                    },
                    503 => format!("{status}: {text}"),
                    _ => return Err(format!("{via} refused to add this node ({status}): {text}")),
                }
            }
            Err(e) => format!("cannot reach {via}: {e}"),
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

async fn members_of(client: &reqwest::Client, via: &str) -> Result<Vec<ListedMember>, String> {
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

fn parse_members(text: &str) -> Result<Vec<ListedMember>, String> {
    serde_json::from_str::<Members>(text)
        .map(|m| m.members)
        .map_err(|e| format!("unexpected member list {text:?}: {e}"))
}
