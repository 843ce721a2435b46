//! What a raft log entry carries, and its byte encoding.
//!
//! A normal entry holds a [`Proposal`]: the command to apply to the key-value map and the
//! [`ProposalId`] of the request that proposed it, so that the node that proposed it can
//! answer its waiting client once the entry is applied. A conf-change entry carries a
//! [`MemberContext`] (the proposal id and the new member's peer URL) in its context.
//!
//! The format is a small hand-written binary layout with a version byte, so that entries
//! written today stay readable. Decoding never panics: bad bytes are an error.

use std::fmt;

use bytes::Bytes;

/// Leading byte of every encoded proposal and member context.
const FORMAT_VERSION: u8 = 1;
/// Operation tag of [`Command::Put`].
const OP_PUT: u8 = 1;

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

/// A change to the key-value map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Key and value are shared slices of the bytes they were decoded from: the map keeps
    /// them without copying, and a snapshot copies only pointers.
    Put { key: Bytes, value: Bytes },
}

/// The payload of a normal raft entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    pub id: ProposalId,
    pub command: Command,
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
        let Command::Put { key, value } = &self.command;
        let mut buf = Vec::with_capacity(1 + 16 + 1 + 4 + key.len() + value.len());
        buf.push(FORMAT_VERSION);
        put_id(&mut buf, self.id);
        buf.push(OP_PUT);
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(key);
        buf.extend_from_slice(value);
        buf
    }

    pub fn decode(bytes: &Bytes) -> Result<Proposal, DecodeError> {
        let mut r = Reader(bytes);
        r.version()?;
        let id = r.id()?;
        match r.u8()? {
            OP_PUT => {
                let key_len = r.u32()? as usize;
                let key_start = bytes.len() - r.0.len();
                r.take(key_len)?;
                let key = bytes.slice(key_start..key_start + key_len);
                let value = bytes.slice(key_start + key_len..);
                Ok(Proposal {
                    id,
                    command: Command::Put { key, value },
                })
            }
            _ => Err(DecodeError("unknown operation")),
        }
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
        let mut r = Reader(bytes);
        r.version()?;
        let id = r.id()?;
        let peer_url =
            String::from_utf8(r.0.to_vec()).map_err(|_| DecodeError("peer URL is not UTF-8"))?;
        Ok(MemberContext { id, peer_url })
    }
}

fn put_id(buf: &mut Vec<u8>, id: ProposalId) {
    buf.extend_from_slice(&id.incarnation.to_le_bytes());
    buf.extend_from_slice(&id.seq.to_le_bytes());
}

/// A cursor over the bytes being decoded.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposal_round_trips() {
        let p = Proposal {
            id: ProposalId {
                incarnation: 7,
                seq: 42,
            },
            command: Command::Put {
                key: Bytes::from_static(b"my-key"),
                value: Bytes::from_static(b"hello"),
            },
        };
        assert_eq!(Proposal::decode(&p.encode().into()), Ok(p));
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
            command: Command::Put {
                key: Bytes::from_static(b"abc"),
                value: Bytes::new(),
            },
        }
        .encode();
        for cut in 0..p.len() {
            let cut = Bytes::copy_from_slice(&p[..cut]);
            assert!(Proposal::decode(&cut).is_err(), "cut at {cut:?}");
        }
        assert!(Proposal::decode(&Bytes::from_static(&[9, 0, 0])).is_err());
    }
}
