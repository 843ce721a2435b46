//! Tells a write torn by a crash from damage, where raft-engine's recovery cuts the log.
//!
//! At start-up raft-engine reads the newest file of each of its queues up to the first
//! batch it cannot read, cuts the file there and carries on (`TolerateTailCorruption`).
//! That is right for a write a crash tore: it was never fsynced, so never acknowledged.
//! It is wrong for bytes damaged at rest in batches that were synced: those may hold
//! writes this node acknowledged and votes it cast, and forgetting them breaks raft. So
//! the newest files are copied before the engine opens and what it cut is judged after.
//! A whole batch signed for this file after the cut means synced data follows: damage.
//! Otherwise the rule etcd applies to its write-ahead log's last record decides: a cut
//! tail is torn if it runs out before its batch ends or holds a sector the disk never
//! wrote (zeros), and nothing follows that batch. Anything else is damage too: the file
//! is put back as it was and the node refuses to start, saying where.
//!
//! The rule needs the space past the log's end to read as zeros: raft-engine must not
//! recycle log files (their old contents would follow the end), so the store turns
//! recycling off, and a data dir written by a release that recycled is judged only from
//! its second start on (the marker file below says when).
//!
//! The search for signed batches looks at every offset, not only where the broken
//! batch's header says the next one starts, because that header may be what is
//! damaged. So a value crafted to hold a signed batch, torn by a crash as it was
//! written, is refused rather than cut: a refusal an operator must answer, never a loss.
//!
//! The batch layout read here (header, signed checksum) is raft-engine 0.4's, log format
//! 2; the disk-fault tests judge real log files by it, so a format change fails them.
//!
//! This module must never let a cut of synced batches pass silently, and never refuse a
//! tail that kill -9 can leave, or a power cut with one write in flight.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::durable;

/// Written into the log dir once its files are known not to be recycled ones.
const JUDGED_MARKER: &str = "raftkvd-log-tails-judged";
/// The unit a disk writes whole or not at all.
const SECTOR: usize = 512;
/// The unit a crashing process's write stops at (the page cache's page).
const PAGE: usize = 4096;
/// raft-engine's log batch header: the batch's length and compression type, then the
/// offset of its item footer, each a big-endian u64.
const BATCH_HEADER: usize = 16;
/// The CRC32 (little-endian) that ends every batch.
const CHECKSUM: usize = 4;

/// What follows the point where recovery cut a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Nothing but zeros: the space raft-engine allocates ahead of its writes.
    Clean,
    /// One batch a crash cut short or left with unwritten sectors, and nothing after it.
    Torn,
    /// Bytes a crash does not leave; `why` says what gives it away.
    Damaged { why: &'static str },
}

/// Judges the bytes of `file` from `cut`, where recovery cut it. `signature` is what
/// raft-engine signs this file's batches with (the low 32 bits of its number).
pub fn judge(file: &[u8], cut: usize, signature: u32) -> Tail {
    let after = &file[cut.min(file.len())..];
    let written = written_len(after);
    if written == 0 {
        return Tail::Clean;
    }
    // The surest sign: a whole batch written for this very file comes after the cut.
    // A crash tears only the last write, so nothing synced can follow a torn one.
    if signed_batch_within(file, cut + 1, cut + written, signature) {
        return Tail::Damaged {
            why: "whole log batches of this file follow it",
        };
    }
    if cut == 0 {
        // The file's own header was cut. A file a crash caught while it was being made
        // holds nothing past its first sector.
        return if written <= SECTOR {
            Tail::Torn
        } else {
            Tail::Damaged {
                why: "the file's header cannot be read and log batches follow it",
            }
        };
    }
    match batch_header(after).map(|(len, _)| len) {
        Some(len) if len > after.len() => {
            // raft-engine allocates room before it writes, so only a file whose
            // allocation failed ends inside a batch, and then right where the write stopped.
            if after.len() - written < PAGE {
                Tail::Torn
            } else {
                Tail::Damaged {
                    why: "its header claims more bytes than the file holds",
                }
            }
        }
        Some(len) if written > len => Tail::Damaged {
            why: "more log batches follow it",
        },
        Some(len) if has_unwritten_sector(file, cut, cut + len) => Tail::Torn,
        Some(_) => Tail::Damaged {
            why: "it is whole, yet fails its checksum",
        },
        None if written < BATCH_HEADER => Tail::Torn,
        None if has_unwritten_sector(file, cut, cut + written) => Tail::Torn,
        None => Tail::Damaged {
            why: "its header cannot be read, and it is not a write cut short",
        },
    }
}

/// How far into `bytes` something was written: up to its last byte that is not zero.
fn written_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// The length of the batch whose header starts `bytes`, and the offset of its item
/// footer within it, if the header is well formed.
fn batch_header(bytes: &[u8]) -> Option<(usize, usize)> {
    let header = bytes.get(..BATCH_HEADER)?;
    let len_and_type = u64::from_be_bytes(header[..8].try_into().ok()?);
    let footer = u64::from_be_bytes(header[8..].try_into().ok()?);
    let len = usize::try_from(len_and_type >> 8).ok()?;
    let footer = usize::try_from(footer).ok()?;
    let compression_known = (len_and_type & 0xff) <= 1;
    let footer_fits = (BATCH_HEADER..=len).contains(&footer);
    (compression_known && footer_fits).then_some((len, footer))
}

/// Whether a whole batch signed for this file starts anywhere in `file[from..to]` and
/// ends by `to`: its header well formed, and the checksum that ends it (over its item
/// footer, XORed with `signature`) right. Another file's batches (a recycled file's
/// old contents) are signed otherwise and do not count.
fn signed_batch_within(file: &[u8], from: usize, to: usize, signature: u32) -> bool {
    let to = to.min(file.len());
    (from..to.saturating_sub(BATCH_HEADER)).any(|at| {
        let Some((len, footer)) = batch_header(&file[at..to]) else {
            return false;
        };
        if len > to - at || len < footer + CHECKSUM {
            return false;
        }
        let (items, sum) = file[at + footer..at + len].split_at(len - footer - CHECKSUM);
        crc32fast::hash(items) ^ signature == u32::from_le_bytes(sum.try_into().unwrap())
    })
}

/// Whether some sector of the batch at `file[from..to]` reads as zeros: what a write
/// leaves where it never reached the disk. Sectors are counted from the start of the
/// file, as the disk counts them; the batch's first and last sectors are the parts of
/// them inside it, and the first counts only if it could hold a whole batch header
/// (the first four bytes of a header are zeros for any batch under 16 MiB).
fn has_unwritten_sector(file: &[u8], from: usize, to: usize) -> bool {
    let to = to.min(file.len());
    let mut start = from;
    while start < to {
        let end = ((start / SECTOR + 1) * SECTOR).min(to);
        let counts = start != from || end - start >= BATCH_HEADER;
        if counts && file[start..end].iter().all(|&b| b == 0) {
            return true;
        }
        start = end;
    }
    false
}

/// A newest log file as it was before the engine opened.
struct FileCopy {
    path: PathBuf,
    /// The file's number, whose low 32 bits sign its batches.
    seq: u64,
    bytes: Vec<u8>,
}

/// Synced batches that recovery cut from a newest log file.
#[derive(Debug)]
pub struct Damage {
    pub path: PathBuf,
    pub offset: usize,
    /// How many bytes from `offset` hold data (the zeros after them do not count).
    pub bytes: usize,
    pub why: &'static str,
}

/// A torn write that recovery cut, which the caller logs.
#[derive(Debug)]
pub struct TornWrite {
    pub path: PathBuf,
    pub offset: usize,
    /// How many bytes of the write reached the file.
    pub bytes: usize,
}

/// The newest files of a log dir, copied before the engine opens them.
pub struct NewestFiles {
    dir: PathBuf,
    copies: Vec<FileCopy>,
}

impl NewestFiles {
    /// Copies the newest file of each raft-engine queue in `dir`, unless `dir` was last
    /// written by a release that recycled log files (then nothing is judged this time).
    pub fn copy(dir: &Path) -> io::Result<NewestFiles> {
        let mut copies = Vec::new();
        let logs = log_files(dir)?;
        if logs.is_empty() || dir.join(JUDGED_MARKER).exists() {
            for suffix in ["raftlog", "rewrite"] {
                let newest = logs
                    .iter()
                    .filter(|(_, s, _)| s == suffix)
                    .max_by_key(|(seq, _, _)| *seq);
                if let Some((seq, _, path)) = newest {
                    let bytes = fs::read(path)?;
                    copies.push(FileCopy {
                        path: path.clone(),
                        seq: *seq,
                        bytes,
                    });
                }
            }
        }
        Ok(NewestFiles {
            dir: dir.to_path_buf(),
            copies,
        })
    }

    /// Judges what the opened engine cut from each copied file: the torn writes it let
    /// go, or the first damage.
    pub fn judge_cuts(&self) -> io::Result<Result<Vec<TornWrite>, Damage>> {
        let mut torn = Vec::new();
        for copy in &self.copies {
            let now = match fs::read(&copy.path) {
                Ok(now) => now,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let cut = if copy.bytes.starts_with(&now) {
                now.len()
            } else {
                0 // the header was cut and written again
            };
            // Counted only for a cut that is reported: a clean one is all zeros.
            let bytes = || written_len(&copy.bytes[cut.min(copy.bytes.len())..]);
            match judge(&copy.bytes, cut, copy.seq as u32) {
                Tail::Clean => {}
                Tail::Torn => torn.push(TornWrite {
                    path: copy.path.clone(),
                    offset: cut,
                    bytes: bytes(),
                }),
                Tail::Damaged { why } => {
                    return Ok(Err(Damage {
                        path: copy.path.clone(),
                        offset: cut,
                        bytes: bytes(),
                        why,
                    }))
                }
            }
        }
        Ok(Ok(torn))
    }

    /// Puts the damaged file back as it was before the engine cut it, durably, so that
    /// every start refuses it until an operator acts. The engine must be closed.
    pub fn put_back(&self, damage: &Damage) -> io::Result<()> {
        let Some(copy) = self.copies.iter().find(|c| c.path == damage.path) else {
            return Ok(());
        };
        let file = OpenOptions::new().write(true).open(&copy.path)?;
        file.set_len(copy.bytes.len() as u64)?;
        file.write_all_at(&copy.bytes, 0)?;
        file.sync_all()
    }

    /// Records that this dir's log files are not recycled, so that every later start
    /// judges their tails.
    pub fn mark_judged(&self) -> io::Result<()> {
        let marker = self.dir.join(JUDGED_MARKER);
        if marker.exists() {
            return Ok(());
        }
        durable::write_file(
            &marker,
            b"raftkvd: this raft-engine log does not recycle files, so a cut tail is judged\n",
        )
    }
}

/// The raft-engine log files in `dir`: (sequence number, suffix, path).
fn log_files(dir: &Path) -> io::Result<Vec<(u64, String, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some((seq, suffix)) = name.split_once('.') else {
            continue;
        };
        if let (Ok(seq), "raftlog" | "rewrite") = (seq.parse::<u64>(), suffix) {
            files.push((seq, suffix.to_string(), path));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature of the files made here.
    const SIG: u32 = 9;

    /// A file of a 69-byte header, then batches of the given lengths (each at least 56:
    /// a header, non-zero entries, a 40-byte item footer whose last 4 bytes are its
    /// signed checksum), then `zeros` zero bytes. Returns it and each batch's offset.
    fn log_file(batches: &[usize], zeros: usize) -> (Vec<u8>, Vec<usize>) {
        let mut file = vec![0xaa; 69];
        let mut offsets = Vec::new();
        for &len in batches {
            offsets.push(file.len());
            let footer = len - 40;
            file.extend_from_slice(&((len as u64) << 8).to_be_bytes());
            file.extend_from_slice(&(footer as u64).to_be_bytes());
            file.extend((BATCH_HEADER..len - CHECKSUM).map(|i| (i % 251) as u8 + 1));
            let items = &file[file.len() - (40 - CHECKSUM)..];
            let sum = crc32fast::hash(items) ^ SIG;
            file.extend_from_slice(&sum.to_le_bytes());
        }
        file.resize(file.len() + zeros, 0);
        (file, offsets)
    }

    fn damaged(tail: Tail, because: &str) -> bool {
        matches!(tail, Tail::Damaged { why } if why.contains(because))
    }

    #[test]
    fn zeros_after_the_cut_are_clean() {
        let (file, offsets) = log_file(&[300, 5000], 8192);
        let end = offsets[1] + 5000;
        assert_eq!(judge(&file, end, SIG), Tail::Clean);
        assert_eq!(judge(&file[..end], end, SIG), Tail::Clean);
    }

    #[test]
    fn a_batch_cut_short_by_a_killed_process_is_torn() {
        let (mut file, offsets) = log_file(&[300, 20_000], 8192);
        // The write stopped at a page: the rest of the batch is zeros.
        let stop = (offsets[1] / PAGE + 2) * PAGE;
        file[stop..offsets[1] + 20_000].fill(0);
        assert_eq!(judge(&file, offsets[1], SIG), Tail::Torn);
        // Or inside the header itself.
        let (mut file, offsets) = log_file(&[300, 300], 8192);
        file[offsets[1] + 8..].fill(0);
        assert_eq!(judge(&file, offsets[1], SIG), Tail::Torn);
        // Or where the file ends, if it could not be allocated ahead.
        let (file, offsets) = log_file(&[300, 20_000], 0);
        let end = offsets[1] + 9000;
        assert_eq!(judge(&file[..end], offsets[1], SIG), Tail::Torn);
    }

    #[test]
    fn a_batch_with_a_sector_lost_in_a_power_cut_is_torn() {
        let (mut file, offsets) = log_file(&[300, 5000], 8192);
        let sector = (offsets[1] / SECTOR + 3) * SECTOR;
        file[sector..sector + SECTOR].fill(0);
        assert_eq!(judge(&file, offsets[1], SIG), Tail::Torn);
        // The header's sector lost, later ones written.
        let (mut file, offsets) = log_file(&[1000, 5000], 8192);
        let first = offsets[1] / SECTOR * SECTOR;
        file[offsets[1]..first + SECTOR].fill(0);
        assert_eq!(judge(&file, offsets[1], SIG), Tail::Torn);
    }

    #[test]
    fn a_whole_batch_that_fails_its_checksum_is_damage() {
        let (mut file, offsets) = log_file(&[300, 5000], 8192);
        file[offsets[1] + 2000] ^= 0x10;
        assert!(damaged(judge(&file, offsets[1], SIG), "whole, yet"));
    }

    #[test]
    fn a_broken_batch_with_batches_after_it_is_damage() {
        let (file, offsets) = log_file(&[300, 400, 500, 600], 8192);
        assert!(damaged(
            judge(&file, offsets[1], SIG),
            "of this file follow"
        ));
        // Its header flipped into nonsense.
        let (mut file, offsets) = log_file(&[300, 400, 500, 600], 8192);
        file[offsets[1] + 9] ^= 0xff;
        assert!(damaged(judge(&file, offsets[1], SIG), "follow"));
        // Its length flipped past the end of the file.
        let (mut file, offsets) = log_file(&[300, 400, 500, 600], 8192);
        file[offsets[1]] ^= 0x01;
        assert!(damaged(judge(&file, offsets[1], SIG), "follow"));
        // Its length flipped to end in the zeros past the log: alone, that looks like a
        // write cut short.
        let (mut file, offsets) = log_file(&[300, 400, 500, 600], 1 << 20);
        file[offsets[1] + 4] ^= 0x01;
        assert!(damaged(
            judge(&file, offsets[1], SIG),
            "of this file follow"
        ));
        // Its header's sector zeroed (a write the disk lost): alone, that looks torn.
        let (mut file, offsets) = log_file(&[1000, 5000, 600], 8192);
        let first = offsets[1] / SECTOR * SECTOR;
        file[offsets[1]..first + SECTOR].fill(0);
        assert!(damaged(
            judge(&file, offsets[1], SIG),
            "of this file follow"
        ));
    }

    #[test]
    fn only_batches_signed_for_this_file_count() {
        let (file, offsets) = log_file(&[300, 400, 500], 0);
        let (last, end) = (offsets[2], file.len());
        assert!(signed_batch_within(&file, last, end, SIG));
        assert!(!signed_batch_within(&file, last, end, SIG + 1));
        // Not whole by `to`, or starting before `from`.
        assert!(!signed_batch_within(&file, last, end - 1, SIG));
        assert!(!signed_batch_within(&file, last + 1, end, SIG));
    }

    #[test]
    fn a_file_header_cut_is_torn_only_when_nothing_follows() {
        let (mut file, _) = log_file(&[], 8192);
        file[40..].fill(0);
        assert_eq!(judge(&file, 0, SIG), Tail::Torn);
        let (file, _) = log_file(&[300, 400, 500], 8192);
        assert!(damaged(judge(&file, 0, SIG), "follow"));
    }

    #[test]
    fn any_bytes_and_any_cut_are_judged_without_a_panic() {
        let mut next = crate::random::seeded(0x2545_f491_4f6c_dd1d);
        for _ in 0..2_000 {
            let (mut file, offsets) = log_file(&[300, 56, 700], (next() % 3000) as usize);
            for _ in 0..(next() % 40) {
                let at = (next() as usize) % file.len();
                file[at] = next() as u8;
            }
            let cut = match next() % 3 {
                0 => offsets[(next() % 3) as usize],
                _ => (next() as usize) % (file.len() + 10),
            };
            let _ = judge(&file, cut, SIG);
            let _ = judge(&file[..cut.min(file.len())], cut, SIG);
        }
    }
}
