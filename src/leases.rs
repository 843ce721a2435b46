//! Leases: keys that live only as long as their owner keeps saying it is alive (etcd's
//! leases). A client grants a lease with a TTL, attaches keys to it with its puts, and
//! renews it with keepalives; when the lease is revoked, by the client or because it
//! expired, its keys are deleted at one revision, and watchers see the deletes.
//!
//! This module is the replicated part: which leases exist, their TTLs, the revision of
//! each one's last renewal and the keys attached to it. It changes only as committed
//! entries apply (`kv.rs`), so every replica holds the same table, and snapshots carry it.
//!
//! Time is not replicated. Each replica keeps its own deadline per lease: the moment it
//! applied the last renewal plus the TTL, and after any change of leader, the moment it
//! learned of the change plus the whole TTL again (etcd does the same: a new leader never
//! expires a lease early, since it cannot know how long ago the old one last heard from
//! the owner). Only the leader acts on a deadline, by proposing a revoke that names the
//! renewal it saw (`node/group/lease_expiry.rs`); a keepalive that commits first voids it.
//! This module must never decide an expiry itself.
//!
//! A lease lives in one raft group, and only keys of that group attach to it: its id
//! names the group (`group << 32 | n`), so that any node routes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The longest TTL a lease may ask for: a year.
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// The highest group id a lease id can name.
pub const MAX_GROUP: u64 = u32::MAX as u64;

/// The raft group a lease id names.
pub fn group_of(lease: u64) -> u64 {
    lease >> 32
}

/// A lease id in `group` (at most [`MAX_GROUP`]), with `n` (not 0) telling it from the
/// group's others.
pub fn id_in(group: u64, n: u32) -> u64 {
    debug_assert!(group <= MAX_GROUP, "group {group} has no lease ids");
    group << 32 | u64::from(n.max(1))
}

/// One lease.
#[derive(Clone, Debug)]
pub struct Lease {
    pub ttl_seconds: u64,
    /// The revision of the grant or keepalive that renewed it last.
    pub renewed_at: u64,
    /// The keys attached to it.
    pub keys: BTreeSet<Bytes>,
    /// When this replica counts it expired (local, not replicated: see the module doc).
    deadline: Instant,
}

impl Lease {
    /// When a lease renewed at `now` expires here. (A TTL too long for the clock, which
    /// only a damaged entry could carry, never expires rather than overflow.)
    fn deadline_from(&self, now: Instant) -> Instant {
        let ttl = Duration::from_secs(self.ttl_seconds);
        now.checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(MAX_TTL_SECONDS))
    }

    /// Time left before this replica counts it expired, in whole seconds rounded up: a
    /// lease with time left never shows 0.
    pub fn seconds_left(&self, now: Instant) -> u64 {
        let left = self.deadline.saturating_duration_since(now);
        left.as_millis().div_ceil(1000) as u64
    }
}

/// What a lease operation found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// No lease has that id (never granted, or revoked).
    NotFound(u64),
    /// A lease with that id exists already.
    Exists(u64),
    /// An expiry's revoke came after a renewal it did not see: the lease lives on.
    Renewed(u64),
}

/// The table of one group's leases.
#[derive(Clone, Debug, Default)]
pub struct Leases {
    by_id: BTreeMap<u64, Lease>,
    /// The lease each attached key belongs to.
    of_key: HashMap<Bytes, u64>,
    /// Every lease by its deadline here, so that the leader's check on every tick looks
    /// only at the leases that expired, not at all of them.
    by_deadline: BTreeSet<(Instant, u64)>,
}

impl Leases {
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn get(&self, lease: u64) -> Option<&Lease> {
        self.by_id.get(&lease)
    }

    pub fn contains(&self, lease: u64) -> bool {
        self.by_id.contains_key(&lease)
    }

    /// Every lease, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Lease)> {
        self.by_id.iter().map(|(id, lease)| (*id, lease))
    }

    /// Creates `lease`, renewed at `revision`.
    pub fn grant(
        &mut self,
        lease: u64,
        ttl_seconds: u64,
        revision: u64,
        now: Instant,
    ) -> Result<(), LeaseRefusal> {
        if self.by_id.contains_key(&lease) {
            return Err(LeaseRefusal::Exists(lease));
        }
        let mut granted = Lease {
            ttl_seconds,
            renewed_at: revision,
            keys: BTreeSet::new(),
            deadline: now,
        };
        granted.deadline = granted.deadline_from(now);
        self.by_deadline.insert((granted.deadline, lease));
        self.by_id.insert(lease, granted);
        Ok(())
    }

    /// Renews `lease` at `revision`: its whole TTL starts again.
    pub fn keep_alive(
        &mut self,
        lease: u64,
        revision: u64,
        now: Instant,
    ) -> Result<u64, LeaseRefusal> {
        let found = self
            .by_id
            .get_mut(&lease)
            .ok_or(LeaseRefusal::NotFound(lease))?;
        found.renewed_at = revision;
        self.by_deadline.remove(&(found.deadline, lease));
        found.deadline = found.deadline_from(now);
        self.by_deadline.insert((found.deadline, lease));
        Ok(found.ttl_seconds)
    }

    /// Ends `lease` (if `renewed_at` is 0 or its last renewal) and returns its keys, which
    /// the caller deletes.
    pub fn revoke(&mut self, lease: u64, renewed_at: u64) -> Result<Vec<Bytes>, LeaseRefusal> {
        let found = self
            .by_id
            .get(&lease)
            .ok_or(LeaseRefusal::NotFound(lease))?;
        if renewed_at != 0 && found.renewed_at != renewed_at {
            return Err(LeaseRefusal::Renewed(lease));
        }
        let ended = self.by_id.remove(&lease).expect("found above");
        self.by_deadline.remove(&(ended.deadline, lease));
        for key in &ended.keys {
            self.of_key.remove(key);
        }
        Ok(ended.keys.into_iter().collect())
    }

    /// `key` was written: it now belongs to `lease` (0: to none).
    pub fn attach(&mut self, key: &Bytes, lease: u64) {
        self.detach(key);
        if let Some(found) = self.by_id.get_mut(&lease) {
            found.keys.insert(key.clone());
            self.of_key.insert(key.clone(), lease);
        }
    }

    /// `key` was deleted, or written without a lease.
    pub fn detach(&mut self, key: &[u8]) {
        if self.of_key.is_empty() {
            return;
        }
        if let Some(lease) = self.of_key.remove(key) {
            if let Some(found) = self.by_id.get_mut(&lease) {
                found.keys.remove(key);
            }
        }
    }

    /// The lease `key` is attached to, if any. (Asked on every write: without leased
    /// keys it does not even hash the key.)
    pub fn lease_of(&self, key: &[u8]) -> Option<u64> {
        if self.of_key.is_empty() {
            return None;
        }
        self.of_key.get(key).copied()
    }

    /// A leader was elected (or this replica learned of one, or started): every lease
    /// gets its whole TTL from `now`.
    pub fn restart_clocks(&mut self, now: Instant) {
        self.by_deadline.clear();
        for (id, lease) in self.by_id.iter_mut() {
            lease.deadline = lease.deadline_from(now);
            self.by_deadline.insert((lease.deadline, *id));
        }
    }

    /// Up to `most` of the leases whose deadline passed, the earliest first, with the
    /// renewal each was last seen at.
    pub fn expired(&self, now: Instant, most: usize) -> Vec<(u64, u64)> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .take(most)
            .map(|(_, id)| (*id, self.by_id[id].renewed_at))
            .collect()
    }

    /// Rebuilds the table from a snapshot's leases (id, TTL, last renewal, keys); every
    /// clock starts at `now`.
    pub fn from_saved(
        saved: impl IntoIterator<Item = (u64, u64, u64, Vec<Bytes>)>,
        now: Instant,
    ) -> Leases {
        let mut leases = Leases::default();
        for (id, ttl_seconds, renewed_at, keys) in saved {
            let _ = leases.grant(id, ttl_seconds, renewed_at, now);
            for key in keys {
                leases.attach(&key, id);
            }
        }
        leases
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn keys_follow_their_last_write_and_a_revoke_returns_them() {
        let now = Instant::now();
        let mut leases = Leases::default();
        let (one, two) = (id_in(1, 7), id_in(1, 8));
        leases.grant(one, 10, 3, now).unwrap();
        leases.grant(two, 10, 4, now).unwrap();
        assert_eq!(leases.grant(one, 5, 5, now), Err(LeaseRefusal::Exists(one)));
        leases.attach(&b("a"), one);
        leases.attach(&b("b"), one);
        leases.attach(&b("b"), two);
        leases.attach(&b("c"), one);
        leases.detach(b"c");
        assert_eq!(leases.lease_of(b"b"), Some(two));
        assert_eq!(leases.lease_of(b"c"), None);
        assert_eq!(leases.revoke(one, 0), Ok(vec![b("a")]));
        assert_eq!(leases.revoke(one, 0), Err(LeaseRefusal::NotFound(one)));
        assert_eq!(leases.lease_of(b"a"), None);
        assert_eq!(leases.lease_of(b"b"), Some(two));
    }

    #[test]
    fn an_expiry_is_void_after_a_renewal_it_did_not_see() {
        let now = Instant::now();
        let mut leases = Leases::default();
        let lease = id_in(2, 1);
        leases.grant(lease, 1, 10, now).unwrap();
        assert!(leases.expired(now, 10).is_empty());
        let later = now + Duration::from_secs(2);
        assert_eq!(leases.expired(later, 10), vec![(lease, 10)]);
        assert_eq!(leases.keep_alive(lease, 12, now), Ok(1));
        assert_eq!(leases.revoke(lease, 10), Err(LeaseRefusal::Renewed(lease)));
        leases.restart_clocks(later);
        assert!(
            leases.expired(later, 10).is_empty(),
            "a new leader's full TTL"
        );
        let other = id_in(2, 3);
        leases.grant(other, 1, 14, now).unwrap();
        assert_eq!(
            leases.expired(later, 10),
            vec![(other, 14)],
            "by deadline, not by id"
        );
        assert_eq!(leases.revoke(other, 0), Ok(vec![]));
        assert!(leases.expired(later + Duration::from_secs(1), 10).len() == 1);
        assert_eq!(leases.revoke(lease, 12), Ok(vec![]));
        assert_eq!(group_of(lease), 2);
        assert_ne!(id_in(2, 0), id_in(2, 0) & !0xffff_ffff, "n is never 0");
        let forever = id_in(2, 2);
        leases.grant(forever, u64::MAX, 13, now).unwrap();
        assert!(
            leases.expired(later, 10).is_empty(),
            "no overflow, no expiry"
        );
    }
}
