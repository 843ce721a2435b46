//! The leader's half of leases (`leases.rs` holds the replicated table): it watches the
//! deadlines and proposes a revoke for each lease whose deadline passed, naming the
//! renewal it saw, so that a keepalive that commits first voids the revoke. A follower
//! never revokes anything; every replica restarts every lease's clock when it learns of a
//! new leader, so a new leader gives every lease its whole TTL before expiring it.
//!
//! A group that holds leases never sleeps (`hibernation.rs`): its leader must tick to
//! see deadlines pass.

use raft::StateRole;
use slog::info;
use std::time::Instant;
use tokio::sync::oneshot;

use super::Group;
use crate::command::Op;

/// The most revokes proposed per tick (1,000 a second at the default tick, etcd's
/// rate): leases that expire together go over a few ticks rather than in one huge entry.
const REVOKES_PER_TICK: usize = 100;

impl Group {
    /// On every tick: a leader proposes the revoke of each expired lease, once, and again
    /// only if it has not applied an election timeout later (the proposal was lost).
    pub(super) fn expire_leases(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let expired = {
            let kv = self.kv.read().unwrap();
            let leases = kv.leases();
            // Revokes that applied, or that a renewal voided, are done with.
            self.expiring.retain(|lease, (seen, _)| {
                leases.get(*lease).is_some_and(|l| l.renewed_at == *seen)
            });
            leases.expired(Instant::now(), REVOKES_PER_TICK + self.expiring.len())
        };
        let mut fresh = 0;
        for (lease, renewed_at) in expired {
            let proposed = self.expiring.get(&lease);
            let retry_after = self.sleep_after_ticks;
            if proposed
                .is_some_and(|&(seen, tick)| seen == renewed_at && self.ticks < tick + retry_after)
            {
                continue;
            }
            if proposed.is_none() {
                if fresh == REVOKES_PER_TICK {
                    break; // the rest wait for the next tick
                }
                fresh += 1;
            }
            info!(self.logger, "lease expired: revoking it"; "lease" => lease, "renewed_at" => renewed_at);
            self.expiring.insert(lease, (renewed_at, self.ticks));
            // Nobody waits for the answer: the revoke is void if a renewal came first.
            let (reply, _) = oneshot::channel();
            self.propose(Op::RevokeLease { lease, renewed_at }, reply);
        }
    }

    /// A new leader is known: every lease's clock starts again here, and a revoke this
    /// node proposed as leader is the new leader's to decide.
    pub(super) fn restart_lease_clocks(&mut self) {
        self.expiring.clear();
        self.kv
            .write()
            .unwrap()
            .restart_lease_clocks(Instant::now());
    }
}
