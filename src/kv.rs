//! The replicated state machine: an in-memory map from keys to values, each value with
//! its revision (the revision of the command that last wrote it, etcd's mod_revision).
//!
//! The map's revision counts the commands applied: every command takes the next one,
//! whether its checks hold or not, and an entry that carries no command (a new leader's
//! empty entry, a membership change) takes one too. So while every entry carries one
//! command the revision is the raft index, as it was before entries were batched, and a
//! snapshot records the revision it was taken at.
//!
//! Only the node's apply step (or a snapshot install) writes to it, in log order, so every
//! member that has applied the same prefix of the log holds the same map. Readers take the
//! lock briefly to clone a value out (a reference-count increment). It must never be
//! written from anywhere but committed entries. Each key is one [`Record`].
//!
//! The map is split into pieces (by a hash of the key; not to be confused with the
//! cluster's shards, which are raft groups), each behind an `Arc`, so that a snapshot is
//! taken in O(pieces): [`KvStore::freeze`] clones the piece pointers, and a later write to
//! a piece the snapshot writer still holds copies that one piece first (copy-on-write).
//! The cost of copying is spread over the writes that follow instead of pausing the raft
//! loop.
//!
//! The group's leases (`leases.rs`) are part of the map: a put may attach its key to one,
//! and revoking one deletes its keys here, at one revision.
//!
//! A transaction ([`Txn`]) evaluates its compares against the map as the entry finds it,
//! then applies one branch's steps in order at one revision; its reads see the writes
//! before them, and come back in [`TxnOutcome`].

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;

use crate::command::{Command, Compare, Step, Target, Txn, Write, NO_LEASE};
use crate::history::{Event, History};
use crate::leases::{LeaseRefusal, Leases};
use crate::record::{Record, Slot};
use crate::watch_hub::WatchHub;

/// The map, shared between the node (the only writer) and the HTTP API (readers).
pub type SharedKv = Arc<RwLock<KvStore>>;

/// A value and the revision that wrote it, as readers get them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub revision: u64,
}

impl From<&Record> for Versioned {
    fn from(record: &Record) -> Versioned {
        Versioned {
            value: record.value_bytes(),
            revision: record.revision(),
        }
    }
}

/// One piece of the map: records ordered by key.
pub type KvMap = BTreeSet<Slot>;

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Every write happened; `deleted` counts the keys that a delete found.
    Written { deleted: u64 },
    /// A revision check failed, so nothing was written: `key` is at `revision` (0: absent).
    CheckFailed { key: Bytes, revision: u64 },
    /// A lease operation, or a put naming a lease, was refused; nothing was written.
    Lease(LeaseRefusal),
    /// A transaction ran one of its branches.
    Txn(TxnOutcome),
}

/// What a transaction did: which branch ran, and what each of its steps found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held, so the success branch ran (else the failure branch).
    pub succeeded: bool,
    pub steps: Vec<StepOutcome>,
}

/// What one step of a transaction's branch found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Put,
    /// A delete, and how many keys it found.
    Deleted(u64),
    /// A read: the key's value and revision, if the map held it.
    Got {
        key: Bytes,
        found: Option<Versioned>,
    },
}

/// Enough pieces that copying one is a small pause even with millions of keys.
const PIECES: usize = 64;

/// An immutable view of the whole map at one applied index, for a snapshot.
#[derive(Clone)]
pub struct FrozenKv {
    pieces: Vec<Arc<KvMap>>,
    /// The revision of the last command applied.
    revision: u64,
    leases: Arc<Leases>,
}

impl FrozenKv {
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// The same view with `leases` (read back from a snapshot file).
    pub fn with_leases(self, leases: Leases) -> FrozenKv {
        FrozenKv {
            leases: Arc::new(leases),
            ..self
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }

    /// Every record, piece by piece (not in key order).
    pub fn iter(&self) -> impl Iterator<Item = &Record> {
        self.pieces.iter().flat_map(|p| p.iter().map(Slot::record))
    }

    /// Up to `limit` pairs whose key starts with `prefix` (and, for the next page, comes
    /// after `after`), in key order, and whether more follow. Each piece is sorted, so
    /// this merges the pieces lazily, smallest key first, and copies out only the pairs
    /// it returns (taking `limit + 1` from every piece first cost up to 64 times the
    /// page in copies).
    pub fn list(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> (Vec<(Bytes, Versioned)>, bool) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let probe;
        let start = match after {
            Some(after) if after >= prefix => {
                probe = Slot::probe(after);
                Excluded(&probe)
            }
            _ => {
                probe = Slot::probe(prefix);
                Included(&probe)
            }
        };
        let mut pieces: Vec<_> = self
            .pieces
            .iter()
            .map(|piece| {
                piece
                    .range((start, Unbounded))
                    .map(Slot::record)
                    .take_while(move |record| record.key().starts_with(prefix))
            })
            .collect();
        // Each piece's next record, smallest first (records order by key; a key is in one
        // piece), with the piece it came from.
        let mut order: BinaryHeap<Reverse<(&Record, usize)>> = pieces
            .iter_mut()
            .enumerate()
            .filter_map(|(i, piece)| piece.next().map(|record| Reverse((record, i))))
            .collect();
        let mut found = Vec::with_capacity(limit.min(1024));
        while let Some(Reverse((record, i))) = order.pop() {
            if found.len() == limit {
                return (found, true);
            }
            found.push((Bytes::copy_from_slice(record.key()), record.into()));
            if let Some(next) = pieces[i].next() {
                order.push(Reverse((next, i)));
            }
        }
        (found, false)
    }

    /// Builds a view at `revision` from records read back from a snapshot file.
    pub fn from_records(records: impl IntoIterator<Item = Record>, revision: u64) -> FrozenKv {
        let mut pieces = vec![KvMap::new(); PIECES];
        for record in records {
            pieces[piece_of(record.key())].replace(Slot::new(record));
        }
        FrozenKv {
            pieces: pieces.into_iter().map(Arc::new).collect(),
            revision,
            leases: Arc::default(),
        }
    }
}

impl Default for FrozenKv {
    fn default() -> FrozenKv {
        FrozenKv::from_records([], 0)
    }
}

fn piece_of(key: &[u8]) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % PIECES as u64) as usize
}

#[derive(Default)]
pub struct KvStore {
    map: FrozenKv,
    /// The recent changes, for watches.
    history: History,
    /// The live watchers, handed each change as it is applied (locked on its own, so
    /// that a watcher registers under the map's read lock).
    hub: Mutex<WatchHub>,
}

impl KvStore {
    pub fn get(&self, key: &[u8]) -> Option<Versioned> {
        self.record_of(key).map(Versioned::from)
    }

    /// `key`'s record, if the map holds the key.
    fn record_of(&self, key: &[u8]) -> Option<&Record> {
        self.map.pieces[piece_of(key)]
            .get(&Slot::probe(key))
            .map(Slot::record)
    }

    /// The whole map as it is now, in O(pieces).
    pub fn freeze(&self) -> FrozenKv {
        self.map.clone()
    }

    /// Replaces the whole map with a snapshot's; the history starts again after it.
    pub fn replace(&mut self, map: FrozenKv) {
        self.map = map;
        self.history.reset(self.map.revision);
        // The watchers catch up from the (new) history, or learn it cannot serve them.
        self.hub.lock().unwrap().clear();
    }

    /// The recent changes (see `history.rs`).
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Keeps up to `capacity` events in the history (`--watch-history`).
    pub fn set_history_capacity(&mut self, capacity: usize) {
        self.history.set_capacity(capacity);
    }

    /// The live watchers. Read the history and register under one read lock, so that no
    /// change falls between the two.
    pub fn hub(&self) -> &Mutex<WatchHub> {
        &self.hub
    }

    /// Records a change in the history and hands it to its watchers.
    fn changed(&mut self, event: Event) {
        self.hub.get_mut().unwrap().dispatch(&event);
        self.history.record(event);
    }

    fn revision_of(&self, key: &[u8]) -> u64 {
        self.record_of(key).map_or(0, Record::revision)
    }

    /// The revision of the last command applied.
    pub fn revision(&self) -> u64 {
        self.map.revision
    }

    /// The group's leases.
    pub fn leases(&self) -> &Leases {
        &self.map.leases
    }

    /// A leader was elected: every lease's clock starts again here (`leases.rs`).
    pub fn restart_lease_clocks(&mut self, now: Instant) {
        if !self.map.leases.is_empty() {
            Arc::make_mut(&mut self.map.leases).restart_clocks(now);
        }
    }

    /// Applies a lease grant at the next revision.
    pub fn grant_lease(&mut self, lease: u64, ttl_seconds: u64, now: Instant) -> (u64, Applied) {
        let revision = self.skip_revision();
        let leases = Arc::make_mut(&mut self.map.leases);
        (
            revision,
            written(leases.grant(lease, ttl_seconds, revision, now)),
        )
    }

    /// Applies a keepalive at the next revision.
    pub fn keep_lease_alive(&mut self, lease: u64, now: Instant) -> (u64, Applied) {
        let revision = self.skip_revision();
        let leases = Arc::make_mut(&mut self.map.leases);
        (revision, written(leases.keep_alive(lease, revision, now)))
    }

    /// Applies a revoke at the next revision: the lease ends and its keys are deleted.
    pub fn revoke_lease(&mut self, lease: u64, renewed_at: u64) -> (u64, Applied) {
        let revision = self.skip_revision();
        let keys = match self.map.leases.get(lease) {
            Some(_) => Arc::make_mut(&mut self.map.leases).revoke(lease, renewed_at),
            None => Err(LeaseRefusal::NotFound(lease)),
        };
        let Ok(keys) = keys else {
            return (revision, written(keys));
        };
        let mut deleted = 0;
        for key in keys {
            deleted += u64::from(self.delete_at(key, revision));
        }
        (revision, Applied::Written { deleted })
    }

    /// How many keys the map holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Counts an applied entry that carries no command (see the module doc); returns the
    /// revision it took.
    pub fn skip_revision(&mut self) -> u64 {
        self.map.revision += 1;
        self.map.revision
    }

    /// Applies one committed command at the next revision: all of its writes if every
    /// check holds, else none. Returns the revision it took.
    pub fn apply(&mut self, command: Command) -> (u64, Applied) {
        self.map.revision += 1;
        let revision = self.map.revision;
        (revision, self.apply_at(command, revision))
    }

    fn apply_at(&mut self, command: Command, revision: u64) -> Applied {
        for check in &command.checks {
            let current = self.revision_of(&check.key);
            if current != check.revision {
                return Applied::CheckFailed {
                    key: check.key.clone(),
                    revision: current,
                };
            }
        }
        if let Some(refused) = self.missing_lease(&command.writes) {
            return refused;
        }
        let mut deleted = 0;
        for write in command.writes {
            deleted += self.write_at(write, revision);
        }
        Applied::Written { deleted }
    }

    /// Applies one committed transaction at the next revision: the success branch if
    /// every compare holds, else the failure branch. Returns the revision it took.
    pub fn apply_txn(&mut self, txn: Txn) -> (u64, Applied) {
        self.map.revision += 1;
        let revision = self.map.revision;
        let succeeded = txn.compares.iter().all(|c| self.holds(c));
        let branch = match succeeded {
            true => txn.success,
            false => txn.failure,
        };
        let writes = branch.iter().filter_map(|step| match step {
            Step::Write(write) => Some(write),
            Step::Get { .. } => None,
        });
        if let Some(refused) = self.missing_lease(writes) {
            return (revision, refused);
        }
        let steps = branch
            .into_iter()
            .map(|step| match step {
                Step::Write(put @ Write::Put { .. }) => {
                    self.write_at(put, revision);
                    StepOutcome::Put
                }
                Step::Write(delete) => StepOutcome::Deleted(self.write_at(delete, revision)),
                Step::Get { key } => StepOutcome::Got {
                    found: self.get(&key),
                    key,
                },
            })
            .collect();
        (revision, Applied::Txn(TxnOutcome { succeeded, steps }))
    }

    /// A transaction whose steps are all reads, evaluated on the map as it is, writing
    /// nothing (a linearizable reader waits for its read index first, as for a GET).
    pub fn read_txn(&self, txn: &Txn) -> TxnOutcome {
        let succeeded = txn.compares.iter().all(|c| self.holds(c));
        let branch = match succeeded {
            true => &txn.success,
            false => &txn.failure,
        };
        let steps = branch
            .iter()
            .filter_map(|step| match step {
                Step::Get { key } => Some(StepOutcome::Got {
                    key: key.clone(),
                    found: self.get(key),
                }),
                Step::Write(_) => None,
            })
            .collect();
        TxnOutcome { succeeded, steps }
    }

    /// Whether `compare` holds of the map as it is.
    fn holds(&self, compare: &Compare) -> bool {
        let record = self.record_of(&compare.key);
        match &compare.target {
            Target::Revision(operand) => {
                let current = record.map_or(0, Record::revision);
                compare.order.holds(&current, operand)
            }
            Target::Value(operand) => {
                record.is_some_and(|r| compare.order.holds(r.value(), &operand[..]))
            }
        }
    }

    /// The refusal of `writes` if a put among them names a lease the map lacks: they
    /// must then write nothing.
    fn missing_lease<'w>(&self, writes: impl IntoIterator<Item = &'w Write>) -> Option<Applied> {
        writes.into_iter().find_map(|write| match write {
            Write::Put { lease, .. } if *lease != NO_LEASE && !self.map.leases.contains(*lease) => {
                Some(Applied::Lease(LeaseRefusal::NotFound(*lease)))
            }
            _ => None,
        })
    }

    /// Applies one write at `revision`; returns how many keys its delete found.
    fn write_at(&mut self, write: Write, revision: u64) -> u64 {
        match write {
            Write::Put { key, value, lease } => {
                // A record of its own: slices of the entry would pin the whole buffer it
                // was read into (raft-engine reads whole, possibly compressed, blocks).
                // The history's copy too.
                let piece = &mut self.map.pieces[piece_of(&key)];
                Arc::make_mut(piece).replace(Slot::new(Record::new(&key, &value, revision)));
                let key = Bytes::copy_from_slice(&key);
                if lease != NO_LEASE || self.map.leases.lease_of(&key).is_some() {
                    Arc::make_mut(&mut self.map.leases).attach(&key, lease);
                }
                self.changed(Event {
                    revision,
                    key,
                    value: Some(Bytes::copy_from_slice(&value)),
                });
                0
            }
            Write::Delete { key } => u64::from(self.delete_at(key, revision)),
            Write::DeletePrefix { prefix } => {
                let (under, _) = self.map.list(&prefix, None, usize::MAX);
                under
                    .into_iter()
                    .map(|(key, _)| u64::from(self.delete_at(key, revision)))
                    .sum()
            }
        }
    }

    /// Deletes `key` at `revision`; whether it was there.
    fn delete_at(&mut self, key: Bytes, revision: u64) -> bool {
        let piece = &mut self.map.pieces[piece_of(&key)];
        let probe = Slot::probe(&key);
        if !(piece.contains(&probe) && Arc::make_mut(piece).remove(&probe)) {
            return false;
        }
        if self.map.leases.lease_of(&key).is_some() {
            Arc::make_mut(&mut self.map.leases).detach(&key);
        }
        self.changed(Event {
            revision,
            key: Bytes::copy_from_slice(&key),
            value: None,
        });
        true
    }
}

/// A lease operation's outcome as an [`Applied`].
fn written<T>(outcome: Result<T, LeaseRefusal>) -> Applied {
    match outcome {
        Ok(_) => Applied::Written { deleted: 0 },
        Err(refusal) => Applied::Lease(refusal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::RevisionCheck;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn put(kv: &mut KvStore, k: &str, v: &str) -> Applied {
        kv.apply(Command::put(b(k), b(v))).1
    }

    #[test]
    fn a_frozen_view_does_not_see_later_writes() {
        let mut kv = KvStore::default();
        for i in 0..1000 {
            put(&mut kv, &format!("k{i}"), "old");
        }
        let frozen = kv.freeze();
        for i in 0..1000 {
            put(&mut kv, &format!("k{i}"), "new");
        }
        put(&mut kv, "extra", "x");
        assert_eq!(frozen.len(), 1000);
        assert!(frozen.iter().all(|r| r.value() == b"old"));
        assert_eq!(kv.get(b"k7").unwrap().value, "new");
        assert_eq!(kv.freeze().len(), 1001);
    }

    #[test]
    fn writes_record_their_revision_and_checks_guard_them() {
        let mut kv = KvStore::default();
        let create = |value: &str| Command {
            checks: vec![RevisionCheck {
                key: b("k"),
                revision: 0,
            }],
            writes: vec![Write::Put {
                key: b("k"),
                value: b(value),
                lease: NO_LEASE,
            }],
        };
        kv.skip_revision();
        assert_eq!(kv.apply(create("a")), (2, Applied::Written { deleted: 0 }));
        assert_eq!(kv.get(b"k").unwrap().revision, 2);
        let refused = Applied::CheckFailed {
            key: b("k"),
            revision: 2,
        };
        assert_eq!(
            kv.apply(create("b")),
            (3, refused),
            "a failed check takes one too"
        );
        assert_eq!(kv.get(b"k").unwrap().value, "a");
        let delete = Command {
            checks: vec![],
            writes: vec![Write::Delete { key: b("k") }, Write::Delete { key: b("x") }],
        };
        assert_eq!(kv.apply(delete), (4, Applied::Written { deleted: 1 }));
        assert!(kv.get(b"k").is_none());
        assert_eq!(kv.freeze().revision(), 4);
    }

    #[test]
    fn a_txn_runs_one_branch_at_one_revision_and_its_reads_see_its_writes() {
        use crate::command::{Compare, Order, Step, Target, Txn};
        let mut kv = KvStore::default();
        put(&mut kv, "k", "b"); // revision 1
        let compare = |order, target| Compare {
            key: b("k"),
            order,
            target,
        };
        let txn = |compares: Vec<Compare>| Txn {
            compares,
            success: vec![
                Step::Write(Write::Put {
                    key: b("s"),
                    value: b("yes"),
                    lease: NO_LEASE,
                }),
                Step::Get { key: b("s") },
            ],
            failure: vec![
                Step::Write(Write::Delete { key: b("k") }),
                Step::Get { key: b("k") },
                Step::Write(Write::Delete { key: b("none") }),
            ],
        };
        let ran = |kv: &mut KvStore, compares| match kv.apply_txn(txn(compares)) {
            (revision, Applied::Txn(outcome)) => (revision, outcome),
            other => panic!("{other:?}"),
        };
        // Every order of both targets, against k = "b" at revision 1.
        for (order, target, holds) in [
            (Order::Equal, Target::Revision(1), true),
            (Order::NotEqual, Target::Revision(1), false),
            (Order::Less, Target::Revision(2), true),
            (Order::Greater, Target::Revision(1), false),
            (Order::Equal, Target::Value(b("b")), true),
            (Order::Less, Target::Value(b("c")), true),
            (Order::Greater, Target::Value(b("c")), false),
            (Order::NotEqual, Target::Value(b("a")), true),
        ] {
            let c = compare(order, target.clone());
            assert_eq!(kv.holds(&c), holds, "{order:?} {target:?}");
        }
        let (revision, outcome) = ran(&mut kv, vec![compare(Order::Equal, Target::Revision(1))]);
        assert_eq!(revision, 2);
        assert!(outcome.succeeded);
        let got = Some(Versioned {
            value: b("yes"),
            revision: 2,
        });
        assert_eq!(
            outcome.steps,
            vec![
                StepOutcome::Put,
                StepOutcome::Got {
                    key: b("s"),
                    found: got
                }
            ]
        );
        // Every compare must hold; the failure branch's read sees its own delete.
        let both = vec![
            compare(Order::Equal, Target::Revision(1)),
            compare(Order::Equal, Target::Value(b("nope"))),
        ];
        let (revision, outcome) = ran(&mut kv, both);
        assert_eq!(revision, 3);
        assert!(!outcome.succeeded);
        assert_eq!(
            outcome.steps,
            vec![
                StepOutcome::Deleted(1),
                StepOutcome::Got {
                    key: b("k"),
                    found: None
                },
                StepOutcome::Deleted(0),
            ]
        );
        // An absent key is at revision 0, and no compare of its value holds.
        assert!(kv.holds(&compare(Order::Equal, Target::Revision(0))));
        for order in [Order::Equal, Order::NotEqual, Order::Less, Order::Greater] {
            assert!(!kv.holds(&compare(order, Target::Value(b("")))));
        }
        // A put naming a lease the map lacks: the branch writes nothing.
        let leased = Txn {
            success: vec![
                Step::Write(Write::Delete { key: b("s") }),
                Step::Write(Write::Put {
                    key: b("t"),
                    value: b("v"),
                    lease: 1 << 32 | 9,
                }),
            ],
            ..Txn::default()
        };
        let refused = Applied::Lease(LeaseRefusal::NotFound(1 << 32 | 9));
        assert_eq!(kv.apply_txn(leased), (4, refused));
        assert_eq!(kv.get(b"s").unwrap().value, "yes");
        assert!(kv.get(b"t").is_none());
        // Only reads: evaluated as the map is, at no new revision.
        let read = Txn {
            compares: vec![compare(Order::Equal, Target::Revision(0))],
            success: vec![Step::Get { key: b("s") }],
            failure: vec![Step::Get { key: b("k") }],
        };
        let outcome = kv.read_txn(&read);
        assert!(outcome.succeeded, "k is absent");
        let found = Some(Versioned {
            value: b("yes"),
            revision: 2,
        });
        assert_eq!(outcome.steps, vec![StepOutcome::Got { key: b("s"), found }]);
        assert_eq!(kv.revision(), 4);
    }

    #[test]
    fn a_prefix_delete_takes_every_key_under_it_at_one_revision_and_nothing_else() {
        let now = Instant::now();
        let mut kv = KvStore::default();
        for i in 0..1000 {
            put(&mut kv, &format!("a/{i}"), "v");
        }
        for key in ["a", "ab", "a.", "b/1"] {
            put(&mut kv, key, "stays");
        }
        let (lease, _) = (1 << 32 | 5, kv.grant_lease(1 << 32 | 5, 60, now));
        let leased = Command {
            checks: vec![],
            writes: vec![Write::Put {
                key: b("a/leased"),
                value: b("v"),
                lease,
            }],
        };
        kv.apply(leased);
        let under = |prefix: &str| Command {
            checks: vec![],
            writes: vec![Write::DeletePrefix { prefix: b(prefix) }],
        };
        let (revision, applied) = kv.apply(under("a/"));
        assert_eq!(applied, Applied::Written { deleted: 1001 });
        assert_eq!(kv.len(), 4);
        for key in ["a", "ab", "a.", "b/1"] {
            assert_eq!(kv.get(key.as_bytes()).unwrap().value, "stays", "{key}");
        }
        assert_eq!(kv.leases().get(lease).unwrap().keys.len(), 0, "detached");
        let found = kv.history().since(revision, revision, |_| true, usize::MAX);
        let events = found.ok().unwrap().events;
        assert_eq!(events.len(), 1001);
        assert!(events
            .iter()
            .all(|e| e.revision == revision && e.value.is_none()));
        assert_eq!(kv.apply(under("a/")).1, Applied::Written { deleted: 0 });
        assert_eq!(kv.apply(under("")).1, Applied::Written { deleted: 4 });
        assert_eq!(kv.len(), 0);
    }

    #[test]
    fn a_revoke_deletes_the_leases_keys_and_a_plain_put_detaches_one() {
        let now = Instant::now();
        let mut kv = KvStore::default();
        let lease = crate::leases::id_in(1, 5);
        let leased = |key: &str| Command {
            checks: vec![],
            writes: vec![Write::Put {
                key: b(key),
                value: b("v"),
                lease,
            }],
        };
        kv.set_history_capacity(100);
        let missing = Applied::Lease(LeaseRefusal::NotFound(lease));
        assert_eq!(kv.apply(leased("a")), (1, missing.clone()));
        assert!(
            kv.get(b"a").is_none(),
            "nothing is written for a missing lease"
        );
        assert_eq!(
            kv.grant_lease(lease, 10, now).1,
            Applied::Written { deleted: 0 }
        );
        for key in ["a", "b", "c"] {
            assert_eq!(kv.apply(leased(key)).1, Applied::Written { deleted: 0 });
        }
        put(&mut kv, "b", "plain");
        kv.apply(Command {
            checks: vec![],
            writes: vec![Write::Delete { key: b("c") }],
        });
        let frozen = kv.freeze();
        let keys: Vec<_> = frozen
            .leases()
            .get(lease)
            .unwrap()
            .keys
            .iter()
            .cloned()
            .collect();
        assert_eq!(keys, vec![b("a")]);
        let (revision, applied) = kv.revoke_lease(lease, 0);
        assert_eq!(applied, Applied::Written { deleted: 1 });
        assert!(kv.get(b"a").is_none());
        assert_eq!(kv.get(b"b").unwrap().value, "plain");
        let events = kv
            .history()
            .since(revision, revision, |_| true, 10)
            .unwrap()
            .events;
        assert_eq!(
            (events.len(), &events[0].key[..], &events[0].value),
            (1, &b"a"[..], &None)
        );
        assert_eq!(kv.revoke_lease(lease, 0).1, missing);
        assert!(
            frozen.leases().contains(lease),
            "a frozen view keeps its leases"
        );
    }

    #[test]
    fn listing_is_in_key_order_across_pieces() {
        let mut kv = KvStore::default();
        for i in (0..500).rev() {
            put(&mut kv, &format!("p/{i:04}"), "v");
            put(&mut kv, &format!("q/{i:04}"), "v");
        }
        let frozen = kv.freeze();
        let (page, more) = frozen.list(b"p/", None, 100);
        let keys: Vec<String> = page
            .iter()
            .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
            .collect();
        let expected: Vec<String> = (0..100).map(|i| format!("p/{i:04}")).collect();
        assert_eq!(keys, expected);
        assert!(more);
        let (next, _) = frozen.list(b"p/", Some(b"p/0099"), 1);
        assert_eq!(next[0].0, "p/0100");
        let (all, more) = frozen.list(b"p/", None, 1000);
        assert_eq!((all.len(), more), (500, false));
        assert_eq!(frozen.list(b"", None, 2000).0.len(), 1000);
        assert!(frozen.list(b"z", None, 10).0.is_empty());
        assert!(frozen.list(b"p/", Some(b"p/0499"), 10).0.is_empty());
        // A page that ends exactly at the last match has no more after it.
        assert_eq!(frozen.list(b"p/", Some(b"p/0489"), 10).0.len(), 10);
        assert!(!frozen.list(b"p/", Some(b"p/0489"), 10).1);
        assert!(frozen.list(b"p/", Some(b"p/0488"), 10).1);
        assert_eq!(frozen.list(b"q/", None, 0), (Vec::new(), true));
    }
}
