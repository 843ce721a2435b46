//! What a raft log entry carries, and its byte encoding.
//!
//! A normal entry holds one or more [`Proposal`]s: each an [`Op`] (a command to apply to
//! the key-value map, or in the cluster group the creation of a raft group) and the
//! [`ProposalId`] of the request that proposed it, so that the node that proposed it can
//! answer its waiting client once the entry is applied. A node puts
//! every write it took in during one loop round into one entry (see `Node::propose_batch`).
//! A [`Command`] is a list of writes (puts and deletes) applied together, at one revision,
//! and only if every revision check it carries holds: that is how compare-and-swap and the
//! atomic multi-key set work. A [`Txn`] is etcd's transaction: compares, then one of two
//! branches of writes and reads. A conf-change entry carries a [`MemberContext`] (the
//! proposal id and the new member's peer URL) in its context; a normal entry's context
//! names the term it was proposed in ([`proposed_term_context`]), so that a write lost
//! with a leader can be proposed again without ever applying twice.
//!
//! The format is a small hand-written binary layout with a version byte, so that entries
//! written today stay readable: version 1 is one proposal, version 2 a batch of them
//! (each a version-1 encoding with its length in front). Decoding never panics: bad bytes
//! are an error.

use std::fmt;

use bytes::Bytes;

/// Leading byte of every encoded proposal and member context.
const FORMAT_VERSION: u8 = 1;
/// Leading byte of an entry that carries several proposals.
const FORMAT_BATCH: u8 = 2;
/// Operation tag of one unconditional put: the compact layout of the common case.
const OP_PUT: u8 = 1;
/// Operation tag of a general command: checks, then writes.
const OP_TXN: u8 = 2;
/// Operation tag of the creation of a raft group: its id and its first members.
const OP_CREATE_GROUP: u8 = 3;
/// Operation tags of a node placed in, or taken out of, a raft group: group id, node id.
const OP_ADD_GROUP_MEMBER: u8 = 4;
const OP_REMOVE_GROUP_MEMBER: u8 = 5;
/// Operation tag of the cluster's list of shards: count u32, group ids u64.
const OP_SET_SHARDS: u8 = 6;
/// Operation tag of a member that is to leave the cluster once its replicas moved.
const OP_DRAIN_NODE: u8 = 7;
/// Operation tag of a node placed again in a raft group it was removed from: group id,
/// node id. (A tag of its own: a release that forbids it stops at the entry, rather
/// than apply it differently from the others; see `entry_formats::REHOST`.)
const OP_READD_GROUP_MEMBER: u8 = 8;
/// Operation tags of the leases (`leases.rs`): grant (lease id, TTL in seconds),
/// keepalive (lease id), revoke (lease id, the renewal it expires or 0). A release that
/// knows no leases stops at them (`entry_formats::LEASES`).
const OP_GRANT_LEASE: u8 = 9;
const OP_KEEP_LEASE_ALIVE: u8 = 10;
const OP_REVOKE_LEASE: u8 = 11;
/// Operation tag of a transaction with an else branch ([`Txn`]): compares, then the steps
/// of each branch. A release that knows none stops at it (`entry_formats::TXN`).
const OP_TXN_BRANCHES: u8 = 12;
/// Write tags inside an [`OP_TXN`] command.
const WRITE_PUT: u8 = 1;
const WRITE_DELETE: u8 = 2;
/// A put that attaches its key to a lease: key, value, lease id.
const WRITE_PUT_LEASED: u8 = 3;
/// A delete of every key that starts with a prefix: the prefix. A release that knows
/// none stops at it (`entry_formats::DELETE_PREFIX`).
const WRITE_DELETE_PREFIX: u8 = 4;
/// A read inside a [`Txn`] branch: the key. (Among the write tags, as a branch's steps
/// are writes and reads in one list.)
const STEP_GET: u8 = 16;
/// A [`Compare`]'s target: a key's revision (u64), or its value (length-prefixed).
const TARGET_REVISION: u8 = 1;
const TARGET_VALUE: u8 = 2;

/// The lease id of a key attached to none (etcd's word for it too).
pub const NO_LEASE: u64 = 0;

/// Identifies one client request across the cluster, so its waiter can be found when the
/// entry is applied. `incarnation` is random per process start: a restarted node never
/// mistakes an old entry replayed from the log for one of its new requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProposalId {
    pub incarnation: u64,
    pub seq: u64,
}

impl ProposalId {
    /// The id of entries that no client waits for (bootstrap membership entries).
    pub const NONE: ProposalId = ProposalId {
        incarnation: 0,
        seq: 0,
    };
}

/// One write to the key-value map. Keys and values are shared slices of the bytes they
/// were decoded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Sets `key` to `value`, attached to lease `lease` ([`NO_LEASE`]: detached from any).
    Put {
        key: Bytes,
        value: Bytes,
        lease: u64,
    },
    Delete {
        key: Bytes,
    },
    /// Deletes every key that starts with `prefix` (all of them if it is empty), at the
    /// command's one revision: etcd's `del --prefix`.
    DeletePrefix {
        prefix: Bytes,
    },
}

/// A condition on a key's revision (etcd's mod_revision: the revision of the command that
/// last wrote it). `revision` 0 means "the key must not exist".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevisionCheck {
    pub key: Bytes,
    pub revision: u64,
}

/// A change to the key-value map: all of `writes`, at one revision, if every check holds;
/// otherwise nothing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Command {
    pub checks: Vec<RevisionCheck>,
    pub writes: Vec<Write>,
}

impl Command {
    /// An unconditional put of one key.
    pub fn put(key: Bytes, value: Bytes) -> Command {
        Command {
            checks: Vec::new(),
            writes: vec![Write::Put {
                key,
                value,
                lease: NO_LEASE,
            }],
        }
    }
}

/// How a [`Compare`] relates the key's current state to its operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Equal = 1,
    NotEqual = 2,
    Less = 3,
    Greater = 4,
}

impl Order {
    fn from_tag(tag: u8) -> Result<Order, DecodeError> {
        Ok(match tag {
            1 => Order::Equal,
            2 => Order::NotEqual,
            3 => Order::Less,
            4 => Order::Greater,
            _ => return Err(DecodeError("unknown compare order")),
        })
    }

    /// Whether `current` stands in this order to `operand`.
    pub fn holds<T: Ord + ?Sized>(self, current: &T, operand: &T) -> bool {
        match self {
            Order::Equal => current == operand,
            Order::NotEqual => current != operand,
            Order::Less => current < operand,
            Order::Greater => current > operand,
        }
    }
}

/// What a [`Compare`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The revision that last wrote the key (0: absent).
    Revision(u64),
    /// The key's value, in byte order; a compare on the value of an absent key fails
    /// whatever its order (as etcd's).
    Value(Bytes),
}

/// One condition of a [`Txn`]: `key`'s target stands in `order` to the operand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Bytes,
    pub order: Order,
    pub target: Target,
}

/// One step of a [`Txn`] branch: a write, or a read of one key that sees the branch's
/// writes before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Write(Write),
    Get { key: Bytes },
}

/// etcd's transaction: if every compare holds, the `success` steps, else the `failure`
/// steps; either way at one revision, and atomically.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Step>,
    pub failure: Vec<Step>,
}

/// What a proposal asks the group that applies it to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Change the group's key-value map.
    Kv(Command),
    /// Change the group's key-value map by a transaction with an else branch.
    Txn(Txn),
    /// Create raft group `group` on `members` (node ids). This and the next two are
    /// proposed to the cluster group only, whose log is the table of groups.
    CreateGroup { group: u64, members: Vec<u64> },
    /// Node `node` is to host a replica of `group` (before the group adds it).
    AddGroupMember { group: u64, node: u64 },
    /// Node `node` no longer hosts `group` (after the group removed it); its replica's
    /// raft id is never used again.
    RemoveGroupMember { group: u64, node: u64 },
    /// Node `node`, removed from `group` before, is to host a new replica of it, under
    /// its next raft id (`replica_id.rs`).
    ReAddGroupMember { group: u64, node: u64 },
    /// The data groups that own the keys, by hash slot (`sharding.rs`).
    SetShards { groups: Vec<u64> },
    /// Member `node` is leaving the cluster: move its replicas, then remove it.
    DrainNode { node: u64 },
    /// Creates lease `lease`, which expires `ttl_seconds` after its last renewal.
    GrantLease { lease: u64, ttl_seconds: u64 },
    /// Renews lease `lease`: its TTL starts again.
    KeepLeaseAlive { lease: u64 },
    /// Ends lease `lease` and deletes its keys. `renewed_at` is the revision of the
    /// renewal an expiry saw (the revoke is void if the lease was renewed since), or 0
    /// for a client's revoke, which holds whatever the renewals.
    RevokeLease { lease: u64, renewed_at: u64 },
}

/// The payload of a normal raft entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    pub id: ProposalId,
    pub op: Op,
}

/// The context of a conf-change entry: who waits for it and, for an added node, its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberContext {
    pub id: ProposalId,
    pub peer_url: String,
}

/// Bytes that are not a valid encoding.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed entry payload: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

impl Proposal {
    pub fn encode(&self) -> Vec<u8> {
        let Op::Kv(Command { checks, writes }) = &self.op else {
            return self.encode_group_op();
        };
        let mut buf = Vec::with_capacity(64 + writes.iter().map(write_len).sum::<usize>());
        buf.push(FORMAT_VERSION);
        put_id(&mut buf, self.id);
        if let (
            [],
            [Write::Put {
                key,
                value,
                lease: NO_LEASE,
            }],
        ) = (checks.as_slice(), writes.as_slice())
        {
            buf.push(OP_PUT);
            put_bytes(&mut buf, key);
            buf.extend_from_slice(value);
            return buf;
        }
        buf.push(OP_TXN);
        buf.extend_from_slice(&(checks.len() as u32).to_le_bytes());
        for check in checks {
            put_bytes(&mut buf, &check.key);
            buf.extend_from_slice(&check.revision.to_le_bytes());
        }
        buf.extend_from_slice(&(writes.len() as u32).to_le_bytes());
        for write in writes {
            put_write(&mut buf, write);
        }
        buf
    }

    /// Every op but a key-value command: transactions with an else branch, the table of
    /// groups' and the leases'.
    fn encode_group_op(&self) -> Vec<u8> {
        let mut buf = vec![FORMAT_VERSION];
        put_id(&mut buf, self.id);
        match &self.op {
            Op::Kv(_) => unreachable!("encoded by Proposal::encode"),
            Op::Txn(txn) => {
                buf.push(OP_TXN_BRANCHES);
                put_txn(&mut buf, txn);
            }
            Op::CreateGroup { group, members } => {
                buf.push(OP_CREATE_GROUP);
                buf.extend_from_slice(&group.to_le_bytes());
                put_ids(&mut buf, members);
            }
            Op::SetShards { groups } => {
                buf.push(OP_SET_SHARDS);
                put_ids(&mut buf, groups);
            }
            Op::DrainNode { node } => {
                buf.push(OP_DRAIN_NODE);
                buf.extend_from_slice(&node.to_le_bytes());
            }
            Op::GrantLease { lease, ttl_seconds } => {
                buf.push(OP_GRANT_LEASE);
                buf.extend_from_slice(&lease.to_le_bytes());
                buf.extend_from_slice(&ttl_seconds.to_le_bytes());
            }
            Op::KeepLeaseAlive { lease } => {
                buf.push(OP_KEEP_LEASE_ALIVE);
                buf.extend_from_slice(&lease.to_le_bytes());
            }
            Op::RevokeLease { lease, renewed_at } => {
                buf.push(OP_REVOKE_LEASE);
                buf.extend_from_slice(&lease.to_le_bytes());
                buf.extend_from_slice(&renewed_at.to_le_bytes());
            }
            Op::AddGroupMember { group, node }
            | Op::RemoveGroupMember { group, node }
            | Op::ReAddGroupMember { group, node } => {
                let tag = match self.op {
                    Op::AddGroupMember { .. } => OP_ADD_GROUP_MEMBER,
                    Op::ReAddGroupMember { .. } => OP_READD_GROUP_MEMBER,
                    _ => OP_REMOVE_GROUP_MEMBER,
                };
                buf.push(tag);
                buf.extend_from_slice(&group.to_le_bytes());
                buf.extend_from_slice(&node.to_le_bytes());
            }
        }
        buf
    }

    pub fn decode(bytes: &Bytes) -> Result<Proposal, DecodeError> {
        let mut r = Reader { all: bytes, at: 0 };
        r.version()?;
        let id = r.id()?;
        let op = match r.u8()? {
            OP_PUT => {
                let key = r.bytes()?;
                let value = bytes.slice(r.at..);
                Op::Kv(Command::put(key, value))
            }
            OP_CREATE_GROUP => {
                let group = r.u64()?;
                let members = r.ids()?;
                if r.at != bytes.len() {
                    return Err(DecodeError("trailing bytes"));
                }
                Op::CreateGroup { group, members }
            }
            OP_DRAIN_NODE => {
                let node = r.u64()?;
                if r.at != bytes.len() {
                    return Err(DecodeError("trailing bytes"));
                }
                Op::DrainNode { node }
            }
            OP_SET_SHARDS => {
                let groups = r.ids()?;
                if r.at != bytes.len() {
                    return Err(DecodeError("trailing bytes"));
                }
                Op::SetShards { groups }
            }
            OP_GRANT_LEASE => {
                let (lease, ttl_seconds) = (r.u64()?, r.u64()?);
                r.end()?;
                Op::GrantLease { lease, ttl_seconds }
            }
            OP_KEEP_LEASE_ALIVE => {
                let lease = r.u64()?;
                r.end()?;
                Op::KeepLeaseAlive { lease }
            }
            OP_REVOKE_LEASE => {
                let (lease, renewed_at) = (r.u64()?, r.u64()?);
                r.end()?;
                Op::RevokeLease { lease, renewed_at }
            }
            tag @ (OP_ADD_GROUP_MEMBER | OP_REMOVE_GROUP_MEMBER | OP_READD_GROUP_MEMBER) => {
                let (group, node) = (r.u64()?, r.u64()?);
                if r.at != bytes.len() {
                    return Err(DecodeError("trailing bytes"));
                }
                match tag {
                    OP_ADD_GROUP_MEMBER => Op::AddGroupMember { group, node },
                    OP_READD_GROUP_MEMBER => Op::ReAddGroupMember { group, node },
                    _ => Op::RemoveGroupMember { group, node },
                }
            }
            OP_TXN => {
                let mut command = Command::default();
                for _ in 0..r.count()? {
                    let key = r.bytes()?;
                    let revision = r.u64()?;
                    command.checks.push(RevisionCheck { key, revision });
                }
                for _ in 0..r.count()? {
                    let tag = r.u8()?;
                    command.writes.push(r.write(tag)?);
                }
                if r.at != bytes.len() {
                    return Err(DecodeError("trailing bytes"));
                }
                Op::Kv(command)
            }
            OP_TXN_BRANCHES => {
                let txn = r.txn()?;
                r.end()?;
                Op::Txn(txn)
            }
            _ => return Err(DecodeError("unknown operation")),
        };
        Ok(Proposal { id, op })
    }
}

/// The payload of an entry carrying all of `encoded` (each a [`Proposal::encode`]), in
/// order: the proposal itself if there is one.
pub fn encode_entry(encoded: &[Vec<u8>]) -> Vec<u8> {
    if let [one] = encoded {
        return one.clone();
    }
    let len = 5 + encoded.iter().map(|p| 4 + p.len()).sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    buf.push(FORMAT_BATCH);
    buf.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    for proposal in encoded {
        put_bytes(&mut buf, proposal);
    }
    buf
}

/// Leading byte of a normal entry's context that names the term it was proposed in.
const CONTEXT_PROPOSED_TERM: u8 = 1;

/// The context of a normal entry proposed in `term`: a leader appends the entry only in
/// that term (`node/group/proposals.rs`), so a proposal cannot be appended by a later
/// leader after its proposer has given it up and proposed it again. Releases that do not
/// know the context ignore it (raft-rs carries it untouched).
pub fn proposed_term_context(term: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(9);
    buf.push(CONTEXT_PROPOSED_TERM);
    buf.extend_from_slice(&term.to_le_bytes());
    buf
}

/// The term a normal entry's context names, if it names one this release knows.
pub fn proposed_term(context: &[u8]) -> Option<u64> {
    match context {
        [CONTEXT_PROPOSED_TERM, term @ ..] => Some(u64::from_le_bytes(term.try_into().ok()?)),
        _ => None,
    }
}

/// The proposals of a normal entry's payload, in order.
pub fn decode_entry(bytes: &Bytes) -> Result<Vec<Proposal>, DecodeError> {
    if bytes.first() != Some(&FORMAT_BATCH) {
        return Proposal::decode(bytes).map(|p| vec![p]);
    }
    let mut r = Reader { all: bytes, at: 1 };
    let count = r.count()?;
    let mut proposals = Vec::with_capacity(count as usize);
    for _ in 0..count {
        proposals.push(Proposal::decode(&r.bytes()?)?);
    }
    if r.at != bytes.len() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(proposals)
}

/// One write, as a command's and a transaction's steps carry it: its tag, then its fields.
fn put_write(buf: &mut Vec<u8>, write: &Write) {
    match write {
        Write::Put {
            key,
            value,
            lease: NO_LEASE,
        } => {
            buf.push(WRITE_PUT);
            put_bytes(buf, key);
            put_bytes(buf, value);
        }
        Write::Put { key, value, lease } => {
            buf.push(WRITE_PUT_LEASED);
            put_bytes(buf, key);
            put_bytes(buf, value);
            buf.extend_from_slice(&lease.to_le_bytes());
        }
        Write::Delete { key } => {
            buf.push(WRITE_DELETE);
            put_bytes(buf, key);
        }
        Write::DeletePrefix { prefix } => {
            buf.push(WRITE_DELETE_PREFIX);
            put_bytes(buf, prefix);
        }
    }
}

/// A [`Txn`]: the compares (count u32; each key, target tag, order tag, operand), then
/// each branch's steps (count u32; each a write, or [`STEP_GET`] and a key).
fn put_txn(buf: &mut Vec<u8>, txn: &Txn) {
    buf.extend_from_slice(&(txn.compares.len() as u32).to_le_bytes());
    for compare in &txn.compares {
        put_bytes(buf, &compare.key);
        match &compare.target {
            Target::Revision(revision) => {
                buf.extend_from_slice(&[TARGET_REVISION, compare.order as u8]);
                buf.extend_from_slice(&revision.to_le_bytes());
            }
            Target::Value(value) => {
                buf.extend_from_slice(&[TARGET_VALUE, compare.order as u8]);
                put_bytes(buf, value);
            }
        }
    }
    for branch in [&txn.success, &txn.failure] {
        buf.extend_from_slice(&(branch.len() as u32).to_le_bytes());
        for step in branch {
            match step {
                Step::Write(write) => put_write(buf, write),
                Step::Get { key } => {
                    buf.push(STEP_GET);
                    put_bytes(buf, key);
                }
            }
        }
    }
}

fn write_len(write: &Write) -> usize {
    match write {
        Write::Put { key, value, .. } => 17 + key.len() + value.len(),
        Write::Delete { key } | Write::DeletePrefix { prefix: key } => 5 + key.len(),
    }
}

impl MemberContext {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(1 + 16 + self.peer_url.len());
        buf.push(FORMAT_VERSION);
        put_id(&mut buf, self.id);
        buf.extend_from_slice(self.peer_url.as_bytes());
        buf
    }

    pub fn decode(bytes: &[u8]) -> Result<MemberContext, DecodeError> {
        let mut r = Reader { all: bytes, at: 0 };
        r.version()?;
        let id = r.id()?;
        let peer_url = String::from_utf8(bytes[r.at..].to_vec())
            .map_err(|_| DecodeError("peer URL is not UTF-8"))?;
        Ok(MemberContext { id, peer_url })
    }
}

fn put_id(buf: &mut Vec<u8>, id: ProposalId) {
    buf.extend_from_slice(&id.incarnation.to_le_bytes());
    buf.extend_from_slice(&id.seq.to_le_bytes());
}

/// A list of ids: count u32, then each u64.
fn put_ids(buf: &mut Vec<u8>, ids: &[u64]) {
    buf.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        buf.extend_from_slice(&id.to_le_bytes());
    }
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// A cursor over the bytes being decoded.
struct Reader<'a, B: AsRef<[u8]> + ?Sized> {
    all: &'a B,
    at: usize,
}

impl<B: AsRef<[u8]> + ?Sized> Reader<'_, B> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let rest = &self.all.as_ref()[self.at..];
        if rest.len() < n {
            return Err(DecodeError("truncated"));
        }
        self.at += n;
        Ok(&rest[..n])
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A count of items, each at least one byte long (so a forged count cannot make the
    /// decoder loop far past the end of the bytes).
    fn count(&mut self) -> Result<u32, DecodeError> {
        let n = self.u32()?;
        if n as usize > self.all.as_ref().len() - self.at {
            return Err(DecodeError("count larger than the payload"));
        }
        Ok(n)
    }

    /// A list written by `put_ids`.
    fn ids(&mut self) -> Result<Vec<u64>, DecodeError> {
        (0..self.count()?).map(|_| self.u64()).collect()
    }

    /// Every byte was read.
    fn end(&self) -> Result<(), DecodeError> {
        match self.at == self.all.as_ref().len() {
            true => Ok(()),
            false => Err(DecodeError("trailing bytes")),
        }
    }

    fn version(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            FORMAT_VERSION => Ok(()),
            _ => Err(DecodeError("unknown format version")),
        }
    }

    fn id(&mut self) -> Result<ProposalId, DecodeError> {
        Ok(ProposalId {
            incarnation: self.u64()?,
            seq: self.u64()?,
        })
    }
}

impl Reader<'_, Bytes> {
    /// A write written by `put_write`, whose tag was just read.
    fn write(&mut self, tag: u8) -> Result<Write, DecodeError> {
        Ok(match tag {
            WRITE_PUT => Write::Put {
                key: self.bytes()?,
                value: self.bytes()?,
                lease: NO_LEASE,
            },
            WRITE_PUT_LEASED => {
                let (key, value, lease) = (self.bytes()?, self.bytes()?, self.u64()?);
                if lease == NO_LEASE {
                    // Written as WRITE_PUT: one encoding per value.
                    return Err(DecodeError("a leased put without a lease"));
                }
                Write::Put { key, value, lease }
            }
            WRITE_DELETE => Write::Delete { key: self.bytes()? },
            WRITE_DELETE_PREFIX => Write::DeletePrefix {
                prefix: self.bytes()?,
            },
            _ => return Err(DecodeError("unknown write")),
        })
    }

    /// A transaction written by `put_txn`.
    fn txn(&mut self) -> Result<Txn, DecodeError> {
        let mut txn = Txn::default();
        for _ in 0..self.count()? {
            let key = self.bytes()?;
            let (target, order) = (self.u8()?, Order::from_tag(self.u8()?)?);
            let target = match target {
                TARGET_REVISION => Target::Revision(self.u64()?),
                TARGET_VALUE => Target::Value(self.bytes()?),
                _ => return Err(DecodeError("unknown compare target")),
            };
            txn.compares.push(Compare { key, order, target });
        }
        for branch in [&mut txn.success, &mut txn.failure] {
            for _ in 0..self.count()? {
                let step = match self.u8()? {
                    STEP_GET => Step::Get { key: self.bytes()? },
                    tag => Step::Write(self.write(tag)?),
                };
                branch.push(step);
            }
        }
        Ok(txn)
    }

    /// A length-prefixed field, as a slice sharing the payload's buffer.
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        let start = self.at;
        self.take(len)?;
        Ok(self.all.slice(start..start + len))
    }
}

/// The fuzzers' oracle (`fuzz/fuzz_targets/entry_decode.rs`, and the corpus replay in
/// the tests): decoding arbitrary bytes never panics, and whatever decodes encodes back
/// to the same value.
#[cfg(any(test, fuzzing))]
pub fn check_decoding(data: &[u8]) {
    if let Ok(proposals) = decode_entry(&Bytes::copy_from_slice(data)) {
        for proposal in proposals {
            let again = Proposal::decode(&Bytes::from(proposal.encode()));
            assert_eq!(
                again.as_ref(),
                Ok(&proposal),
                "a proposal re-encodes to itself"
            );
        }
    }
    if let Ok(context) = MemberContext::decode(data) {
        assert_eq!(MemberContext::decode(&context.encode()), Ok(context));
    }
    if let Some(term) = proposed_term(data) {
        assert_eq!(proposed_term(&proposed_term_context(term)), Some(term));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzer kept (`fuzz/corpus/entry_decode`) still passes its oracle.
    #[test]
    fn replays_the_fuzz_corpus() {
        crate::fuzz_corpus::replay("entry_decode", check_decoding);
    }

    #[test]
    fn proposal_round_trips() {
        let p = Proposal {
            id: ProposalId {
                incarnation: 7,
                seq: 42,
            },
            op: Op::Kv(Command::put(
                Bytes::from_static(b"my-key"),
                Bytes::from_static(b"hello"),
            )),
        };
        assert_eq!(Proposal::decode(&p.encode().into()), Ok(p));
    }

    fn checked_txn() -> Proposal {
        Proposal {
            id: ProposalId {
                incarnation: 1,
                seq: 2,
            },
            op: Op::Kv(Command {
                checks: vec![RevisionCheck {
                    key: Bytes::from_static(b"a"),
                    revision: 0,
                }],
                writes: vec![
                    Write::Put {
                        key: Bytes::from_static(b"a"),
                        value: Bytes::from_static(b"1"),
                        lease: NO_LEASE,
                    },
                    Write::Delete {
                        key: Bytes::from_static(b"b"),
                    },
                    Write::Put {
                        key: Bytes::from_static(b"c"),
                        value: Bytes::from_static(b"2"),
                        lease: 1 << 32 | 3,
                    },
                    Write::DeletePrefix {
                        prefix: Bytes::from_static(b"d/"),
                    },
                ],
            }),
        }
    }

    #[test]
    fn checked_multi_write_round_trips() {
        let p = checked_txn();
        assert_eq!(Proposal::decode(&p.encode().into()), Ok(p));
    }

    #[test]
    fn a_txn_with_both_branches_round_trips_and_truncations_are_errors() {
        let b = |text: &'static str| Bytes::from_static(text.as_bytes());
        let txn = Txn {
            compares: vec![
                Compare {
                    key: b("a"),
                    order: Order::Less,
                    target: Target::Revision(9),
                },
                Compare {
                    key: b("b"),
                    order: Order::NotEqual,
                    target: Target::Value(b("x")),
                },
            ],
            success: vec![
                Step::Write(Write::Put {
                    key: b("a"),
                    value: b("1"),
                    lease: 1 << 32 | 3,
                }),
                Step::Get { key: b("a") },
            ],
            failure: vec![
                Step::Write(Write::Delete { key: b("b") }),
                Step::Write(Write::DeletePrefix { prefix: b("p/") }),
                Step::Get { key: b("c") },
            ],
        };
        let p = Proposal {
            id: ProposalId {
                incarnation: 3,
                seq: 4,
            },
            op: Op::Txn(txn),
        };
        let encoded = p.encode();
        assert_eq!(Proposal::decode(&encoded.clone().into()), Ok(p));
        for cut in 0..encoded.len() {
            let cut = Bytes::copy_from_slice(&encoded[..cut]);
            assert!(Proposal::decode(&cut).is_err(), "cut at {cut:?}");
        }
        let empty = Proposal {
            id: ProposalId::NONE,
            op: Op::Txn(Txn::default()),
        };
        assert_eq!(Proposal::decode(&empty.encode().into()), Ok(empty));
    }

    #[test]
    fn the_proposed_term_round_trips_and_anything_else_names_none() {
        assert_eq!(proposed_term(&proposed_term_context(7)), Some(7));
        assert_eq!(
            proposed_term(&proposed_term_context(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(proposed_term(&[]), None);
        assert_eq!(proposed_term(&proposed_term_context(7)[..8]), None);
        assert_eq!(proposed_term(&[9, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn an_entry_carries_one_proposal_or_a_batch() {
        let single = checked_txn();
        let one = encode_entry(&[single.encode()]);
        assert_eq!(one, single.encode(), "a lone proposal is written as before");
        assert_eq!(decode_entry(&one.into()), Ok(vec![single.clone()]));
        let put = Proposal {
            id: ProposalId::NONE,
            op: Op::Kv(Command::put(
                Bytes::from_static(b"k"),
                Bytes::from_static(b"v"),
            )),
        };
        let batch = encode_entry(&[put.encode(), single.encode(), put.encode()]);
        assert_eq!(
            decode_entry(&Bytes::copy_from_slice(&batch)),
            Ok(vec![put.clone(), single, put])
        );
        for cut in 0..batch.len() {
            let cut = Bytes::copy_from_slice(&batch[..cut]);
            assert!(decode_entry(&cut).is_err(), "cut at {cut:?}");
        }
    }

    #[test]
    fn group_operations_round_trip_and_truncations_are_errors() {
        for op in [
            Op::CreateGroup {
                group: 2,
                members: vec![1, 3],
            },
            Op::AddGroupMember { group: 2, node: 4 },
            Op::RemoveGroupMember { group: 9, node: 1 },
            Op::ReAddGroupMember { group: 9, node: 1 },
            Op::SetShards {
                groups: vec![2, 3, 4],
            },
            Op::DrainNode { node: 3 },
            Op::GrantLease {
                lease: 5 << 32 | 9,
                ttl_seconds: 10,
            },
            Op::KeepLeaseAlive { lease: 7 },
            Op::RevokeLease {
                lease: 7,
                renewed_at: 12,
            },
        ] {
            let p = Proposal {
                id: ProposalId {
                    incarnation: 3,
                    seq: 4,
                },
                op,
            };
            let bytes = p.encode();
            assert_eq!(Proposal::decode(&Bytes::copy_from_slice(&bytes)), Ok(p));
            for cut in 0..bytes.len() {
                let cut = Bytes::copy_from_slice(&bytes[..cut]);
                assert!(Proposal::decode(&cut).is_err(), "cut at {cut:?}");
            }
        }
    }

    #[test]
    fn member_context_round_trips() {
        let c = MemberContext {
            id: ProposalId::NONE,
            peer_url: "http://127.0.0.1:42379".into(),
        };
        assert_eq!(MemberContext::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_errors() {
        let p = Proposal {
            id: ProposalId::NONE,
            op: Op::Kv(Command::put(Bytes::from_static(b"abc"), Bytes::new())),
        }
        .encode();
        for cut in 0..p.len() {
            let cut = Bytes::copy_from_slice(&p[..cut]);
            assert!(Proposal::decode(&cut).is_err(), "cut at {cut:?}");
        }
        let txn = checked_txn().encode();
        for cut in 0..txn.len() {
            let cut = Bytes::copy_from_slice(&txn[..cut]);
            assert!(Proposal::decode(&cut).is_err(), "cut at {cut:?}");
        }
        assert!(Proposal::decode(&Bytes::from_static(&[9, 0, 0])).is_err());
    }
}
