//! Command-line flags (each with a `RAFTKVD_*` environment fallback; the flag wins) and
//! their validation. Nothing here touches the disk or the network.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::membership::{authority_of, parse_peer_url};
use crate::tls::TlsFiles;

/// Most data groups --shards may ask for.
const MAX_SHARDS: u64 = 4096;

/// raftkvd: a replicated key-value store on raft, in the style of etcd's raftexample.
#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Health checks: `raftkvd probe [URL]` GETs URL (default: this node's \
        /health on RAFTKVD_PORT) and exits 0 on a 2xx answer, 1 otherwise."
)]
pub struct Config {
    /// This node's raft id: its 1-based position in --cluster. Default: the position of
    /// --peer-url in --cluster (so that a StatefulSet's pods, which know their own name
    /// but cannot add one to their ordinal, need no id).
    #[arg(long = "id", env = "RAFTKVD_ID")]
    id_flag: Option<u64>,

    /// The id in force: --id, or the one validate() derived.
    #[arg(skip)]
    pub id: u64,

    /// Comma-separated peer URLs of the cluster (http://host:port), one per node id in
    /// order. This node's raft transport listens on the host:port of its own entry.
    /// Optional with --join-via.
    #[arg(
        long,
        env = "RAFTKVD_CLUSTER",
        value_delimiter = ',',
        required_unless_present = "join_via"
    )]
    pub cluster: Vec<String>,

    /// This node's own peer URL (http://host:port), where its raft transport listens.
    /// Default: the --id'th entry of --cluster. Needed with --join-via without --cluster.
    #[arg(long, env = "RAFTKVD_PEER_URL")]
    pub peer_url: Option<String>,

    /// Where the raft transport listens (http://host:port, e.g. http://0.0.0.0:2380) when
    /// that differs from the peer URL the other nodes reach this node at (containers, NAT).
    /// One URL, as etcd's --listen-peer-urls. Default: the host and port of the peer URL.
    #[arg(long, env = "RAFTKVD_LISTEN_PEER_URLS")]
    pub listen_peer_urls: Option<String>,

    /// Port of the client HTTP API (GET/PUT /<key>, POST/DELETE /<node-id>).
    #[arg(long, env = "RAFTKVD_PORT")]
    pub port: u16,

    /// Address the client HTTP API binds to.
    #[arg(long, env = "RAFTKVD_LISTEN_HOST", default_value = "127.0.0.1")]
    pub listen_host: String,

    /// Join an existing cluster (after `POST /<id>` added this node) instead of forming a
    /// new one from --cluster.
    #[arg(long, env = "RAFTKVD_JOIN")]
    pub join: bool,

    /// Join an existing cluster in one step: on first start (empty data dir), ask the
    /// member whose client API is at this URL (http://host:port) to add this node with
    /// its --peer-url, then start as with --join.
    #[arg(long, env = "RAFTKVD_JOIN_VIA")]
    pub join_via: Option<String>,

    /// Where the raft log is kept. Default: raftkvd-<id> in the working directory.
    #[arg(long, env = "RAFTKVD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Largest value a PUT accepts, in bytes; larger bodies are refused with 413.
    #[arg(long, env = "RAFTKVD_MAX_VALUE_BYTES", default_value_t = 1024 * 1024)]
    pub max_value_bytes: usize,

    /// Client connections open at once; more wait (in the kernel's backlog) until one
    /// closes.
    #[arg(long, env = "RAFTKVD_MAX_CLIENT_CONNECTIONS", default_value_t = 4096)]
    pub max_client_connections: usize,

    /// Peer connections open at once (each peer process holds a few).
    #[arg(long, env = "RAFTKVD_MAX_PEER_CONNECTIONS", default_value_t = 1024)]
    pub max_peer_connections: usize,

    /// Milliseconds a connection may take to send a request's headers, counted from
    /// when it starts to wait for one; a connection that sends nothing for this long
    /// between requests is closed too.
    #[arg(long, env = "RAFTKVD_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub header_read_timeout_ms: u64,

    /// Largest raft message frame a peer may send, in bytes (it must hold the largest
    /// entry: --max-value-bytes and a key, with room to spare).
    #[arg(long, env = "RAFTKVD_MAX_PEER_FRAME_BYTES", default_value_t = 64 << 20)]
    pub max_peer_frame_bytes: usize,

    /// Largest snapshot file a peer may upload to this node, in bytes; a larger upload is
    /// refused with 413 (and the leader keeps trying). Generous by default.
    #[arg(long, env = "RAFTKVD_MAX_SNAPSHOT_BYTES", default_value_t = 32 << 30)]
    pub max_snapshot_bytes: u64,

    /// Take a snapshot after at least this many applied writes since the last one, then
    /// compact the raft log. Once snapshots exceed 4 MiB, the next waits until the log since
    /// the last one is as large as it (at most 10 times this many writes), so rewriting
    /// the map never costs more disk writes than the log itself.
    #[arg(long, env = "RAFTKVD_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,

    /// Changes (puts and deletes) this process keeps for watches, split evenly among the
    /// groups it hosts that hold keys (at least one each): a watch may start this far
    /// back, and a restarted node has those since its last snapshot. 0 keeps none
    /// (watches then start at the current revision only).
    #[arg(long, env = "RAFTKVD_WATCH_HISTORY", default_value_t = crate::history::DEFAULT_CAPACITY)]
    pub watch_history: usize,

    /// Writes kept in the log behind a snapshot, so that a follower that lags a little
    /// catches up from the log instead of a whole snapshot. (Entries carry several writes:
    /// the entries kept are scaled by the writes per entry since the previous snapshot.)
    #[arg(
        long,
        env = "RAFTKVD_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = 5_000
    )]
    pub snapshot_catchup_entries: u64,

    /// How long a request waits for its entry to commit and apply before it is answered
    /// 503 (outcome unknown), in milliseconds.
    #[arg(long, env = "RAFTKVD_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,

    /// Length of one raft tick, in milliseconds.
    #[arg(long, env = "RAFTKVD_TICK_MS", default_value_t = 100)]
    pub tick_ms: u64,

    /// Ticks without a leader before a follower starts an election.
    #[arg(long, env = "RAFTKVD_ELECTION_TICKS", default_value_t = 10)]
    pub election_ticks: usize,

    /// Log format: `text` (readable, one line per event) or `json` (one object per line).
    #[arg(long, env = "RAFTKVD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Least severe level logged: trace, debug, info, warning, error or critical.
    #[arg(long, env = "RAFTKVD_LOG_LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: slog::Level,

    /// TESTS ONLY: enables `POST /debug/partition` (body: comma-separated peer ids whose
    /// raft messages this node drops; empty heals) and `POST /debug/panic`. Never use it
    /// in production.
    #[arg(long, env = "RAFTKVD_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,

    /// When forming a cluster: split the keyspace into this many data groups (shards),
    /// each a raft group of --replicas members spread evenly over the nodes; keys are
    /// routed to their group by a hash of the key. 1 keeps every key in the cluster group,
    /// as releases before sharding did. Only read when the cluster is formed.
    #[arg(long, env = "RAFTKVD_SHARDS", default_value_t = 1)]
    pub shards: u64,

    /// Members of each data group when --shards is above 1: at most the number of nodes.
    /// Default: 3, or the number of nodes if smaller.
    #[arg(long, env = "RAFTKVD_REPLICAS")]
    pub replicas: Option<usize>,

    /// Do not move replicas between nodes on this node's initiative (`src/rebalance.rs`:
    /// while a node leads the cluster group, it moves replicas onto nodes that host fewer
    /// than their share, such as a node that just joined).
    #[arg(long, env = "RAFTKVD_DISABLE_REBALANCING")]
    pub disable_rebalancing: bool,

    /// Certificate (PEM, chain with this node's first) of the client API: with
    /// --key-file, the client API serves HTTPS.
    #[arg(long, env = "RAFTKVD_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) of --cert-file.
    #[arg(long, env = "RAFTKVD_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// Require every client of the client API to present a certificate signed by
    /// --trusted-ca-file (refused at the TLS handshake otherwise).
    #[arg(long, env = "RAFTKVD_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,

    /// CA certificate(s) (PEM) that client certificates must be signed by.
    #[arg(long, env = "RAFTKVD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Certificate (PEM) this node presents to its peers, as a server and as a client:
    /// with --peer-key-file and --peer-trusted-ca-file, peers speak mutual TLS and peer
    /// URLs are https://.
    #[arg(long, env = "RAFTKVD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --peer-cert-file.
    #[arg(long, env = "RAFTKVD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// CA certificate(s) (PEM) that peers' certificates must be signed by; a peer whose
    /// certificate is not is refused at the handshake.
    #[arg(long, env = "RAFTKVD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// When forming a cluster: derive the cluster id from this token alone (as etcd's
    /// flag of the same name), so that nodes may spell each other's URLs differently
    /// (localhost or 127.0.0.1, NAT, containers). Give every node the same token.
    /// Without it, the id is derived from the --cluster URLs, which must then be
    /// spelled alike on every node.
    #[arg(long, env = "RAFTKVD_INITIAL_CLUSTER_TOKEN")]
    pub initial_cluster_token: Option<String>,

    /// With --client-cert-auth: only clients whose certificate's common name is one of
    /// these may change membership, manage raft groups or use /debug routes (403 for
    /// others); reading and writing keys stays open to every authenticated client.
    /// Repeatable, or comma-separated. Needs peer TLS too, or the peer port would be a
    /// way around it.
    #[arg(long, env = "RAFTKVD_ADMIN_CN", value_delimiter = ',')]
    pub admin_cn: Vec<String>,

    /// Ticks between the leader's heartbeats.
    #[arg(long, env = "RAFTKVD_HEARTBEAT_TICKS", default_value_t = 1)]
    pub heartbeat_ticks: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_level(text: &str) -> Result<slog::Level, String> {
    text.parse::<slog::Level>().map_err(|_| {
        format!("unknown log level {text:?}: use trace, debug, info, warning, error or critical")
    })
}

impl Config {
    /// Checks the flags against each other and normalises the peer URLs.
    pub fn validate(mut self) -> Result<Config, String> {
        self.check_tls()?;
        let tls = self.peer_tls().is_some();
        self.cluster = self
            .cluster
            .iter()
            .map(|u| parse_peer_url(u, tls).map_err(|e| format!("--cluster: {e}")))
            .collect::<Result<_, _>>()?;
        self.id = self.resolve_id(tls)?;
        if self.id == 0 {
            return Err("--id must be a positive integer".into());
        }
        if self.id > crate::replica_id::MAX_NODE_ID {
            return Err(format!(
                "--id must be at most {} (a raft id's high bits count a node's replicas of a group)",
                crate::replica_id::MAX_NODE_ID
            ));
        }
        if self.max_client_connections == 0 || self.max_peer_connections == 0 {
            return Err(
                "--max-client-connections and --max-peer-connections must be positive".into(),
            );
        }
        if self.header_read_timeout_ms == 0 {
            return Err("--header-read-timeout-ms must be positive".into());
        }
        if self.header_read_timeout_ms < 25_000 {
            // Peers keep an idle connection for 20 s (transport.rs): closing it sooner
            // may catch a forwarded request on the way.
            eprintln!(
                "raftkvd: warning: --header-read-timeout-ms {} is below the 20 s peers keep an \
                 idle connection; a forwarded request may meet a connection being closed",
                self.header_read_timeout_ms
            );
        }
        // An entry holds a value, its key (up to 64 KiB) and a little framing.
        let largest_entry = self.max_value_bytes.saturating_add(128 << 10);
        if self.max_peer_frame_bytes < largest_entry.max(4 << 20) {
            return Err(format!(
                "--max-peer-frame-bytes ({}) must be at least 4 MiB and hold the largest entry \
                 (--max-value-bytes + 128 KiB = {largest_entry})",
                self.max_peer_frame_bytes
            ));
        }
        let joining = self.join || self.join_via.is_some();
        if !joining && self.id as usize > self.cluster.len() {
            return Err(format!(
                "--id {} must be between 1 and the number of --cluster URLs ({}) when forming a cluster",
                self.id,
                self.cluster.len()
            ));
        }
        let listed = self.cluster.get(self.id as usize - 1).cloned();
        let own = self.peer_url.as_deref().map(|u| parse_peer_url(u, tls));
        self.peer_url = match (own, listed) {
            (Some(Err(e)), _) => return Err(format!("--peer-url: {e}")),
            (Some(Ok(own)), Some(listed)) if own != listed => {
                return Err(format!(
                    "--peer-url {own} differs from this node's entry in --cluster ({listed})"
                ))
            }
            (Some(Ok(own)), _) => Some(own),
            (None, Some(listed)) => Some(listed),
            (None, None) if self.join_via.is_some() => {
                return Err("--join-via needs this node's --peer-url (or --cluster)".into())
            }
            (None, None) => {
                return Err(format!(
                    "--id {} has no entry in --cluster ({} URLs): give this node's --peer-url",
                    self.id,
                    self.cluster.len()
                ))
            }
        };
        if let Some(listen) = &self.listen_peer_urls {
            if listen.contains(',') {
                return Err(
                    "--listen-peer-urls takes one URL (this node listens for peers on \
                    one address)"
                        .into(),
                );
            }
            self.listen_peer_urls =
                Some(parse_peer_url(listen, tls).map_err(|e| format!("--listen-peer-urls: {e}"))?);
        }
        if let Some(via) = &self.join_via {
            let https = via.trim().starts_with("https://");
            if https && !tls {
                return Err("--join-via https://... needs peer TLS (--peer-cert-file, \
                    --peer-key-file, --peer-trusted-ca-file): this node presents its peer \
                    certificate to the member and trusts the peers' CA and --trusted-ca-file"
                    .into());
            }
            self.join_via =
                Some(parse_peer_url(via, https).map_err(|e| format!("--join-via: {e}"))?);
            self.join = true;
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err("--election-ticks must be greater than --heartbeat-ticks (> 0)".into());
        }
        if self.snapshot_count == 0 {
            return Err("--snapshot-count must be positive".into());
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(format!("--shards must be between 1 and {MAX_SHARDS}"));
        }
        if !joining {
            let nodes = self.cluster.len();
            match self.replicas {
                Some(r) if r == 0 || r > nodes => {
                    return Err(format!(
                        "--replicas {r} must be between 1 and the number of nodes ({nodes})"
                    ))
                }
                _ => {}
            }
        }
        if self.tick_ms == 0 || self.request_timeout_ms == 0 {
            return Err("--tick-ms and --request-timeout-ms must be positive".into());
        }
        Ok(self)
    }

    /// --id, else the 1-based position of --peer-url in (the normalised) --cluster.
    fn resolve_id(&self, tls: bool) -> Result<u64, String> {
        if let Some(id) = self.id_flag {
            return Ok(id);
        }
        let Some(own) = &self.peer_url else {
            return Err(
                "--id is required (or --peer-url, whose position in --cluster \
                gives the id)"
                    .into(),
            );
        };
        let own = parse_peer_url(own, tls).map_err(|e| format!("--peer-url: {e}"))?;
        match self.cluster.iter().position(|u| *u == own) {
            Some(at) => Ok(at as u64 + 1),
            None => Err(format!(
                "--id is required: --peer-url {own} is not in --cluster, so it gives no id"
            )),
        }
    }

    /// Checks the TLS flags against each other (the files are read later, in tls.rs).
    fn check_tls(&self) -> Result<(), String> {
        let peer_files = [
            &self.peer_cert_file,
            &self.peer_key_file,
            &self.peer_trusted_ca_file,
        ];
        let given = peer_files.iter().filter(|f| f.is_some()).count();
        if given != 0 && given != 3 {
            return Err(
                "peer TLS needs all three of --peer-cert-file, --peer-key-file and \
                --peer-trusted-ca-file (peers always authenticate each other)"
                    .into(),
            );
        }
        if self.client_cert_auth && (self.cert_file.is_none() || self.trusted_ca_file.is_none()) {
            return Err(
                "--client-cert-auth needs --cert-file, --key-file and --trusted-ca-file".into(),
            );
        }
        if !self.admin_cn.is_empty() && (!self.client_cert_auth || given == 0) {
            return Err(
                "--admin-cn needs --client-cert-auth (to know who a client is) and \
                peer TLS (or anyone who reaches the peer port could forward an operator's \
                request)"
                    .into(),
            );
        }
        if self.enable_fault_injection && !self.client_cert_auth && !is_loopback(&self.listen_host)
        {
            return Err(format!(
                "--enable-fault-injection lets any client cut this node off from its peers: \
                 refused while the client API listens on {} (not loopback) without \
                 --client-cert-auth",
                self.listen_host
            ));
        }
        Ok(())
    }

    /// The client API's TLS files, if it serves HTTPS.
    pub fn client_tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            trusted_ca: self
                .trusted_ca_file
                .clone()
                .filter(|_| self.client_cert_auth),
        })
    }

    /// The peers' TLS files, if peers speak mutual TLS.
    pub fn peer_tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.peer_cert_file.clone()?,
            key: self.peer_key_file.clone()?,
            trusted_ca: Some(self.peer_trusted_ca_file.clone()?),
        })
    }

    /// Members of each data group of a cluster formed with --shards.
    pub fn replicas(&self) -> usize {
        self.replicas.unwrap_or(3).min(self.cluster.len())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("raftkvd-{}", self.id)))
    }

    /// This node's own peer URL.
    pub fn own_peer_url(&self) -> &str {
        self.peer_url.as_deref().expect("set by validate")
    }

    /// The `host:port` the raft transport binds: --listen-peer-urls, else the peer URL's.
    pub fn peer_listen_addr(&self) -> String {
        let url = self.listen_peer_urls.as_deref();
        authority_of(url.unwrap_or_else(|| self.own_peer_url())).to_string()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// The newest entry format this node reads: `entry_formats::NEWEST`, or under
    /// `--enable-fault-injection` what `RAFTKVD_FAULT_ENTRY_FORMAT` says, so that a test
    /// can play a member of an older release.
    pub fn entry_format_read(&self) -> u8 {
        let pretend = std::env::var("RAFTKVD_FAULT_ENTRY_FORMAT").ok();
        match pretend.and_then(|v| v.parse::<u8>().ok()) {
            Some(older) if self.enable_fault_injection && older >= 1 => {
                older.min(crate::entry_formats::NEWEST)
            }
            _ => crate::entry_formats::NEWEST,
        }
    }

    /// What the client API's listener allows.
    pub fn client_limits(&self) -> crate::http_server::Limits {
        crate::http_server::Limits {
            max_connections: self.max_client_connections,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
        }
    }

    /// What the peer listener allows.
    pub fn peer_limits(&self) -> crate::http_server::Limits {
        crate::http_server::Limits {
            max_connections: self.max_peer_connections,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
        }
    }
}

/// Whether the client API's --listen-host is reachable from this machine only.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["raftkvd", "--port", "2379"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .validate()
    }

    const CLUSTER: &str = "http://raftkvd1:2380,http://raftkvd2:2380,http://raftkvd3:2380";

    #[test]
    fn the_id_is_the_position_of_the_peer_url_when_not_given() {
        let config = parse(&["--cluster", CLUSTER, "--peer-url", "http://raftkvd2:2380/"]).unwrap();
        assert_eq!(config.id, 2);
        let config = parse(&["--cluster", CLUSTER, "--id", "3"]).unwrap();
        assert_eq!(
            (config.id, config.own_peer_url()),
            (3, "http://raftkvd3:2380")
        );
        let unlisted = parse(&["--cluster", CLUSTER, "--peer-url", "http://other:2380"]);
        assert!(unlisted.unwrap_err().contains("is not in --cluster"));
        assert!(parse(&["--cluster", CLUSTER])
            .unwrap_err()
            .contains("--id is required"));
    }

    #[test]
    fn peers_are_heard_on_the_listen_url_or_else_the_peer_url() {
        let config = parse(&["--cluster", CLUSTER, "--id", "1"]).unwrap();
        assert_eq!(config.peer_listen_addr(), "raftkvd1:2380");
        let args = [
            "--cluster",
            CLUSTER,
            "--id",
            "1",
            "--listen-peer-urls",
            "http://0.0.0.0:2390",
        ];
        assert_eq!(parse(&args).unwrap().peer_listen_addr(), "0.0.0.0:2390");
        let two = [
            "--cluster",
            CLUSTER,
            "--id",
            "1",
            "--listen-peer-urls",
            "http://a:1,http://b:2",
        ];
        assert!(parse(&two).unwrap_err().contains("one URL"));
        let tls = [
            "--cluster",
            CLUSTER,
            "--id",
            "1",
            "--listen-peer-urls",
            "https://0.0.0.0:2380",
        ];
        assert!(parse(&tls).unwrap_err().contains("--listen-peer-urls"));
    }
}
