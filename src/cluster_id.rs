//! Which cluster this node belongs to, so that a message from another cluster (a peer
//! URL pointing at the wrong place, a port reused by another cluster's node) is refused
//! instead of obeyed. As etcd does, the id is derived from the initial `--cluster` URLs
//! when a cluster is formed; a node that joins adopts it from the first peer stream it
//! accepts. It is kept in `<data-dir>/cluster-id` (written durably, see durable.rs), and
//! never changes once known.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::durable;

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

    /// The id of a cluster formed from these initial peer URLs.
    pub fn of_initial_cluster(peer_urls: &[String]) -> u64 {
        let mut h = DefaultHasher::new();
        peer_urls.hash(&mut h);
        h.finish()
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
