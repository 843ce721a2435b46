//! Linearizable reads by raft's ReadIndex, as bookkeeping for the node thread.
//!
//! A read may be answered from the local map once this node has applied everything the
//! leader had committed when the read arrived. Waiting reads are gathered into batches:
//! all reads that arrive between two rounds of the node loop share one `read_index`
//! request (one heartbeat round on the leader). A batch moves through three stages:
//!
//! `unsent` -> `in_flight` (raft asked, keyed by a context) -> `waiting_apply` (the read
//! index is known) -> answered once `applied >= index`.
//!
//! raft-rs drops a ReadIndex silently when there is no leader, or when a new leader has not
//! yet committed an entry in its term; so a batch in flight for too long is sent again. The
//! client's own deadline (in the API) bounds the whole wait. This module never answers a
//! read before its index is applied.
//!
//! A leader keeps pending reads, and counts heartbeat answers for them, by context alone,
//! whoever asked. So a context is never used twice by anyone: it is this queue's random
//! nonce followed by its batch number (a counter alone starts again at 1 on every replica
//! and after every restart, and two replicas' batches, or an answer to a batch of an
//! earlier process, could be taken for each other).

use std::collections::HashMap;

use crate::random::random_u64;
use crate::router::ReadReply;

pub struct ReadQueue {
    /// Random per queue: the first half of every context it sends.
    nonce: u64,
    next_ctx: u64,
    unsent: Vec<ReadReply>,
    in_flight: HashMap<u64, InFlight>,
    waiting_apply: Vec<(u64, Vec<ReadReply>)>,
}

struct InFlight {
    replies: Vec<ReadReply>,
    sent_at_tick: u64,
}

impl Default for ReadQueue {
    fn default() -> Self {
        ReadQueue {
            nonce: random_u64(),
            next_ctx: 0,
            unsent: Vec::new(),
            in_flight: HashMap::new(),
            waiting_apply: Vec::new(),
        }
    }
}

impl ReadQueue {
    /// True when no read waits.
    pub fn is_empty(&self) -> bool {
        self.unsent.is_empty() && self.in_flight.is_empty() && self.waiting_apply.is_empty()
    }

    pub fn push(&mut self, reply: ReadReply) {
        self.unsent.push(reply);
    }

    /// Moves every unsent read into one new batch; returns the context to hand to
    /// `RawNode::read_index`, or None if nothing waits.
    pub fn start_batch(&mut self, now_tick: u64) -> Option<Vec<u8>> {
        if self.unsent.is_empty() {
            return None;
        }
        self.next_ctx += 1;
        let replies = std::mem::take(&mut self.unsent);
        self.in_flight.insert(
            self.next_ctx,
            InFlight {
                replies,
                sent_at_tick: now_tick,
            },
        );
        let mut ctx = self.nonce.to_le_bytes().to_vec();
        ctx.extend_from_slice(&self.next_ctx.to_le_bytes());
        Some(ctx)
    }

    /// The batch number in `ctx`, if this queue sent it.
    fn batch_of(&self, ctx: &[u8]) -> Option<u64> {
        let (nonce, batch) = ctx.split_at_checked(8)?;
        if nonce != self.nonce.to_le_bytes() {
            return None;
        }
        Some(u64::from_le_bytes(batch.try_into().ok()?))
    }

    /// Raft answered the batch `ctx` with read index `index`.
    pub fn on_read_state(&mut self, ctx: &[u8], index: u64, applied: u64) {
        let Some(ctx) = self.batch_of(ctx) else {
            return;
        };
        if let Some(batch) = self.in_flight.remove(&ctx) {
            self.waiting_apply.push((index, batch.replies));
            self.on_applied(applied);
        }
    }

    /// Answers every read whose index is now applied.
    pub fn on_applied(&mut self, applied: u64) {
        self.waiting_apply.retain_mut(|(index, replies)| {
            if *index > applied {
                return true;
            }
            for reply in replies.drain(..) {
                let _ = reply.send(Ok(*index));
            }
            false
        });
    }

    /// Sends again the batches raft has not answered for `retry_ticks` ticks, and forgets
    /// reads whose client gave up.
    pub fn retry_stale(&mut self, now_tick: u64, retry_ticks: u64) {
        let stale: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, b)| now_tick.saturating_sub(b.sent_at_tick) >= retry_ticks)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            let batch = self.in_flight.remove(&ctx).unwrap();
            self.unsent.extend(batch.replies);
        }
        self.unsent.retain(|r| !r.is_closed());
        for (_, replies) in &mut self.waiting_apply {
            replies.retain(|r| !r.is_closed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::ProposeError;
    use tokio::sync::oneshot;

    fn read(q: &mut ReadQueue) -> oneshot::Receiver<Result<u64, ProposeError>> {
        let (tx, rx) = oneshot::channel();
        q.push(tx);
        rx
    }

    #[test]
    fn a_batch_is_answered_only_once_its_index_is_applied() {
        let mut q = ReadQueue::default();
        let (mut a, mut b) = (read(&mut q), read(&mut q));
        let ctx = q.start_batch(0).unwrap();
        assert!(q.start_batch(0).is_none(), "one batch for both reads");
        q.on_read_state(&ctx, 10, 9);
        assert!(a.try_recv().is_err() && b.try_recv().is_err());
        q.on_applied(10);
        assert_eq!(a.try_recv().unwrap(), Ok(10));
        assert_eq!(b.try_recv().unwrap(), Ok(10));
    }

    #[test]
    fn unanswered_batches_are_sent_again() {
        let mut q = ReadQueue::default();
        let mut r = read(&mut q);
        let first = q.start_batch(0).unwrap();
        q.retry_stale(1, 3);
        assert!(q.start_batch(1).is_none(), "not stale yet");
        q.retry_stale(3, 3);
        let second = q.start_batch(3).unwrap();
        assert_ne!(first, second);
        q.on_read_state(&first, 5, 5); // a late answer to the old context is ignored
        assert!(r.try_recv().is_err());
        q.on_read_state(&second, 5, 5);
        assert_eq!(r.try_recv().unwrap(), Ok(5));
    }

    #[test]
    fn no_two_queues_send_the_same_context() {
        // Two replicas, or one before and after a restart: each numbers its batches
        // from 1, and neither takes the other's answer for its own.
        let (mut a, mut b) = (ReadQueue::default(), ReadQueue::default());
        let mut read_a = read(&mut a);
        let _read_b = read(&mut b);
        let (ctx_a, ctx_b) = (a.start_batch(0).unwrap(), b.start_batch(0).unwrap());
        assert_ne!(ctx_a, ctx_b);
        a.on_read_state(&ctx_b, 3, 10);
        assert!(
            read_a.try_recv().is_err(),
            "answered by another queue's read state"
        );
        a.on_read_state(&ctx_a[..8], 3, 10);
        assert!(read_a.try_recv().is_err());
        a.on_read_state(&ctx_a, 3, 10);
        assert_eq!(read_a.try_recv().unwrap(), Ok(3));
    }
}
