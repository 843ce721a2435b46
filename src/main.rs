//! raftkvd: the process. Parses the flags, opens the data directory, starts the raft
//! thread (every raft group this process hosts), the peer transport and the client API,
//! and stops them all in order on SIGTERM, SIGINT, or when this node is removed from the
//! cluster.
//!
//! Reading order for a PUT: `api/mod.rs` (routing) -> `api/raftexample.rs` or
//! `api/kv_v1.rs` (the request; `sharding.rs` names the key's group, and `api/forward.rs`
//! sends the request on if this node does not host it) -> `router.rs` (to the raft
//! thread) -> `node/mod.rs` (to the group) -> `node/group/proposals.rs` and `command.rs`
//! (propose) -> `node/group.rs` (Ready) -> `storage.rs` (fsync) and `transport.rs` +
//! `peer_stream.rs` (to peers, whose `peer_service.rs` steps them) -> `node/group.rs`
//! (apply) -> `kv.rs` and `record.rs`.

mod api;
mod background;
mod backup;
mod cluster_id;
mod command;
mod config;
mod durable;
mod entry_cache;
mod entry_formats;
mod faults;
#[cfg(test)]
mod fuzz_corpus;
mod history;
mod http_server;
mod join;
mod kv;
mod leases;
mod log_tail;
mod membership;
mod metrics;
mod node;
mod peer_frame;
mod peer_service;
mod peer_stream;
mod probe;
mod random;
mod read_index;
mod rebalance;
mod record;
mod replica_id;
mod response_body;
mod router;
mod sharding;
mod snapshot;
mod storage;
mod tls;
mod transport;
mod watch_hub;

use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use slog::{error, info, o, warn, Drain, Logger};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::api::Api;
use crate::config::Config;
use crate::membership::{SharedMembership, CLUSTER_GROUP_VOTERS};
use crate::node::{Node, NodeConfig, NodeShared};
use crate::router::{NodeExit, Router, CLUSTER_GROUP};
use crate::storage::LogStore;
use crate::transport::Transport;

/// jemalloc, as TiKV uses: every raft message, entry and request is a few short-lived
/// allocations, and glibc's malloc spent about a tenth of the raft thread's time on
/// them (bench/put-shards.sh, 64 shards).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Written into the data directory when this node is removed from the cluster.
const REMOVED_MARKER: &str = "REMOVED";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("probe") {
        std::process::exit(probe::run(&args[2..]));
    }
    let config = match Config::parse().validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("raftkvd: {e}");
            std::process::exit(2);
        }
    };
    let logger = build_logger(config.log_format, config.log_level).new(o!("node" => config.id));
    exit_on_panic(logger.clone());
    let code = match run(config, &logger) {
        Ok(()) => 0,
        Err(e) => {
            error!(logger, "raftkvd stopped"; "error" => e);
            1
        }
    };
    std::process::exit(code);
}

/// Exit status of a process that stopped because a thread panicked (Rust's own).
const PANIC_EXIT_CODE: i32 = 101;

/// A panic on any thread stops the whole process with a non-zero status and a log line:
/// a node whose raft thread died must not linger half-alive, nor exit 0 (a supervisor
/// restarts only what failed). Whatever panicked may have left shared state
/// half-changed, so nothing else gets to run on it.
fn exit_on_panic(logger: Logger) {
    let print_default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print_default(info);
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        error!(logger, "a thread panicked; stopping the process";
            "thread" => thread, "panic" => %info, "exit_status" => PANIC_EXIT_CODE);
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

/// Logs go to stderr, synchronously: nothing is lost when the process exits.
fn build_logger(format: config::LogFormat, level: slog::Level) -> Logger {
    match format {
        config::LogFormat::Text => {
            let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
            let drain = slog_term::FullFormat::new(decorator).build().fuse();
            Logger::root(slog::LevelFilter::new(drain, level).fuse(), o!())
        }
        config::LogFormat::Json => {
            let json = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build();
            let drain = std::sync::Mutex::new(json).fuse();
            Logger::root(slog::LevelFilter::new(drain, level).fuse(), o!())
        }
    }
}

fn run(config: Config, logger: &Logger) -> Result<(), String> {
    let data_dir = config.data_dir();
    refuse_if_removed(&data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    let engine = storage::open_engine(&data_dir.join("raft-log"), logger)
        .map_err(|e| format!("cannot open the raft log in {}: {e}", data_dir.display()))?;
    let (mut store, recovered) = node::open_group(&engine, &data_dir, CLUSTER_GROUP, logger)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let tls = TlsSet::load(&config)?;
    // Until the log is replayed, the command line (or the join answer) is the best guess
    // at where the peers are.
    let mut known_peers: Vec<(u64, String)> = (1..).zip(config.cluster.iter().cloned()).collect();
    // The cluster a node joining with --join-via was added to.
    let mut joined_cluster = None;
    if !store.is_empty() {
        info!(logger, "restarting from the data dir";
            "data_dir" => %data_dir.display(), "term" => store.hard_state().term,
            "commit" => store.hard_state().commit);
    } else if config.join {
        if let Some(via) = &config.join_via {
            let joined = runtime.block_on(join::ask_to_join(
                via,
                config.id,
                config.own_peer_url(),
                tls.join.clone(),
                logger,
            ))?;
            known_peers = joined
                .members
                .into_iter()
                .map(|m| (m.id, m.peer_url))
                .collect();
            joined_cluster = Some(joined.cluster_id);
        }
        info!(
            logger,
            "joining an existing cluster; waiting for the leader to send the log"
        );
    } else {
        let members: Vec<(u64, String)> = (1..).zip(config.cluster.iter().cloned()).collect();
        let nodes = members.len() as u64;
        let data_groups = sharding::formation_ops(config.shards, nodes, config.replicas());
        node::bootstrap(&mut store, &members, CLUSTER_GROUP_VOTERS, data_groups)?;
        info!(logger, "formed a new cluster"; "members" => nodes, "shards" => config.shards);
    }
    let cluster_id = Arc::new(cluster_id::ClusterId::load(data_dir.join("cluster-id"))?);
    if cluster_id.get().is_none() {
        if let Some(joined) = joined_cluster {
            cluster_id.adopt(joined)?;
        } else if !config.join {
            let token = config.initial_cluster_token.as_deref();
            cluster_id.adopt(cluster_id::ClusterId::of_initial_cluster(
                &config.cluster,
                token,
            ))?;
        }
    }

    let exit = runtime.block_on(serve(
        config,
        engine,
        Recovered {
            store,
            snapshot: recovered,
            known_peers,
        },
        Identity { cluster_id, tls },
        logger.clone(),
    ))?;
    match exit {
        NodeExit::Stopped => {
            info!(logger, "stopped");
            Ok(())
        }
        NodeExit::Removed { index } => {
            let marker = data_dir.join(REMOVED_MARKER);
            durable::write_file(
                &marker,
                format!("removed at raft index {index}\n").as_bytes(),
            )
            .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
            info!(logger, "this node was removed from the cluster; exiting"; "index" => index);
            Ok(())
        }
        NodeExit::Failed(e) => Err(e),
    }
}

/// A removed node's data must not rejoin the cluster under its old id.
fn refuse_if_removed(data_dir: &Path) -> Result<(), String> {
    let marker = data_dir.join(REMOVED_MARKER);
    if marker.exists() {
        return Err(format!(
            "this node was removed from the cluster ({} exists); refusing to start on its old data. \
             To rejoin, add it under a new id (POST /<id>) and start it with an empty --data-dir and --join",
            marker.display()
        ));
    }
    Ok(())
}

/// What the data dir (or the join) told about the cluster group before serving.
struct Recovered {
    store: LogStore,
    /// The cluster group's latest snapshot, if any.
    snapshot: Option<snapshot::SnapshotData>,
    /// Where the peers are, until the log says otherwise.
    known_peers: Vec<(u64, String)>,
}

/// Which cluster this node is in, and the certificates it proves who it is with.
struct Identity {
    cluster_id: Arc<cluster_id::ClusterId>,
    tls: TlsSet,
}

/// Runs the node thread and both HTTP servers until the node stops; returns why it did.
async fn serve(
    config: Config,
    engine: Arc<raft_engine::Engine>,
    recovered: Recovered,
    identity: Identity,
    logger: Logger,
) -> Result<NodeExit, String> {
    let Recovered {
        store,
        snapshot: recovered,
        known_peers,
    } = recovered;
    let Identity { cluster_id, tls } = identity;
    let peer_addr = config.peer_listen_addr();
    // Bound here, served on the raft thread (see below).
    let peer_listener = std::net::TcpListener::bind(&peer_addr)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|e| format!("cannot listen for peers on {peer_addr}: {e}"))?;
    let api_addr = format!("{}:{}", config.listen_host, config.port);
    let api_listener = TcpListener::bind(&api_addr)
        .await
        .map_err(|e| format!("cannot listen for clients on {api_addr}: {e}"))?;

    let (router, inbox) = Router::new();
    let kv = kv::SharedKv::default();
    let membership = SharedMembership::default();
    let partition = Arc::new(faults::Partition::default());
    let metrics = Arc::new(metrics::Metrics::default());
    let formats = Arc::new(entry_formats::EntryFormats::remembered_in(
        config.entry_format_read(),
        config.data_dir().join("entry-formats"),
    ));
    let transport = Arc::new(Transport::new(
        config.id,
        formats.clone(),
        tokio::runtime::Handle::current(),
        router.clone(),
        membership.clone(),
        partition.clone(),
        config.data_dir(),
        cluster_id.clone(),
        tls.peer.clone(),
        metrics.clone(),
        logger.new(o!("component" => "transport")),
    ));
    for (id, url) in &known_peers {
        if *id != config.id {
            transport.set_peer(*id, url);
        }
    }
    if let Some(data) = recovered {
        transport.follow(config.id, &data.membership);
        kv.write().unwrap().replace(data.kv);
        *membership.write().unwrap() = data.membership;
    }
    let node = Node::new(
        NodeConfig {
            id: config.id,
            tick: config.tick(),
            election_ticks: config.election_ticks,
            heartbeat_ticks: config.heartbeat_ticks,
            data_dir: config.data_dir(),
            snapshot_count: config.snapshot_count,
            watch_history: config.watch_history,
            catchup_entries: config.snapshot_catchup_entries,
        },
        engine,
        store,
        kv.clone(),
        NodeShared {
            membership: membership.clone(),
            transport: transport.clone(),
            router: router.clone(),
            metrics: metrics.clone(),
        },
        logger.clone(),
    )?;
    let (stop_servers, servers_stopping) = watch::channel(false);
    let api = Arc::new(Api {
        id: config.id,
        router: router.clone(),
        membership: membership.clone(),
        peers: transport.client(),
        entry_formats: formats.clone(),
        cluster_id: cluster_id.clone(),
        shards_settled: Default::default(),
        restoring: Default::default(),
        max_value_bytes: config.max_value_bytes,
        request_timeout: config.request_timeout(),
        partition: config.enable_fault_injection.then_some(partition.clone()),
        peer_tls: tls.peer.is_some(),
        admin_cns: config.admin_cn.clone(),
        data_dir: config.data_dir(),
        stopping: servers_stopping.clone(),
        metrics: metrics.clone(),
        logger: logger.new(o!("component" => "api")),
    });
    if cluster_id.get().is_none() {
        // Joining with --join: learn the cluster id from a member that lists this node.
        tokio::spawn(cluster_id::learn(
            transport.client(),
            config.id,
            config.own_peer_url().to_string(),
            known_peers
                .iter()
                .filter(|(id, _)| *id != config.id)
                .cloned()
                .collect(),
            cluster_id.clone(),
            logger.clone(),
        ));
    }
    let peer_service = Arc::new(peer_service::PeerService {
        own_id: config.id,
        node: router.clone(),
        membership: membership.clone(),
        partition,
        data_dir: config.data_dir(),
        cluster_id: cluster_id.clone(),
        forwarded: forwarded_requests_to(api.clone()),
        strangers: Default::default(),
        transport: transport.clone(),
        unknown_senders: Default::default(),
        outsiders: Default::default(),
        metrics: metrics.clone(),
        uploads: Default::default(),
        max_snapshot_bytes: config.max_snapshot_bytes,
        max_frame_bytes: config.max_peer_frame_bytes,
        logger: logger.new(o!("component" => "transport")),
    });
    let (exit_tx, mut exit_rx) = oneshot::channel();
    let peer_server = PeerServer {
        listener: peer_listener,
        tls: tls.peer.clone(),
        limits: config.peer_limits(),
        service: peer_service,
        stopping: servers_stopping.clone(),
        logger: logger.clone(),
    };
    std::thread::Builder::new()
        .name("raft-node".into())
        .spawn(move || {
            let _ = exit_tx.send(run_raft_thread(node, inbox, peer_server));
        })
        .map_err(|e| format!("cannot start the node thread: {e}"))?;

    if !config.disable_rebalancing {
        tokio::spawn(rebalance::run(
            config.id,
            rebalance::OwnApi {
                client: transport.client(),
                base: format!("{}{}", config.own_peer_url(), peer_service::FORWARD_PREFIX),
                cluster_id,
            },
            router.clone(),
            membership.clone(),
            formats.clone(),
            servers_stopping.clone(),
            logger.new(o!("component" => "rebalance")),
        ));
    }
    tokio::spawn(tls.clone().reload_on_sighup(logger.clone()));
    tokio::spawn(
        transport
            .clone()
            .learn_entry_formats(servers_stopping.clone()),
    );
    let api_server = tokio::spawn(http_server::serve(
        "api",
        api_listener,
        tls.client.clone(),
        config.client_limits(),
        move |req| api.clone().handle_client(req),
        servers_stopping,
        logger.clone(),
    ));
    info!(logger, "serving"; "api" => &api_addr, "peer" => config.own_peer_url(),
        "api_tls" => tls.client.is_some(), "peer_tls" => tls.peer.is_some());

    let exit = tokio::select! {
        signal = shutdown_signal() => {
            info!(logger, "shutting down"; "signal" => signal);
            // Stop taking requests and let those in flight finish, then stop raft.
            let _ = stop_servers.send(true);
            let _ = api_server.await;
            router.shutdown();
            exit_rx.await.unwrap_or_else(|_| raft_thread_vanished())
        }
        exit = &mut exit_rx => {
            let exit = exit.unwrap_or_else(|_| raft_thread_vanished());
            let _ = stop_servers.send(true);
            let _ = api_server.await;
            exit
        }
    };
    Ok(exit)
}

/// The raft thread ended without saying how (only a panic does that, and the panic hook
/// exits first): never reported as a clean stop.
fn raft_thread_vanished() -> NodeExit {
    NodeExit::Failed("the raft thread ended without reporting why".into())
}

/// How the peer server hands a client request that another node forwarded (under
/// `/client`) to this node's API: on the main runtime, off the raft thread.
fn forwarded_requests_to(api: Arc<Api>) -> peer_service::ClientApi {
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move |req| {
        let (api, runtime) = (api.clone(), runtime.clone());
        Box::pin(async move {
            runtime
                .spawn(api.handle_client(req))
                .await
                .unwrap_or_else(|e| {
                    http_server::text_response(
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("the forwarded request failed: {e}"),
                    )
                    .map(Into::into)
                })
        })
    })
}

/// The TLS of each side, loaded from the files the flags name.
#[derive(Clone)]
struct TlsSet {
    /// The client API's, if it serves HTTPS.
    client: Option<Arc<tls::Tls>>,
    /// The peers' (both ends of every peer connection), if peers speak mutual TLS.
    peer: Option<Arc<tls::Tls>>,
    /// What `--join-via` presents and trusts: the peer certificate, and the peers' CA
    /// with the client API's.
    join: Option<Arc<tls::Tls>>,
}

impl TlsSet {
    fn load(config: &Config) -> Result<TlsSet, String> {
        let load = |files: Option<tls::TlsFiles>, extra: Vec<std::path::PathBuf>| {
            files.map(|files| tls::Tls::load(files, extra)).transpose()
        };
        Ok(TlsSet {
            client: load(config.client_tls(), vec![])?,
            peer: load(config.peer_tls(), vec![])?,
            join: load(
                config.peer_tls(),
                config.trusted_ca_file.iter().cloned().collect(),
            )?,
        })
    }

    /// Reads every certificate, key and CA file again on each SIGHUP, as etcd does; a
    /// file that does not load leaves the old ones in force.
    async fn reload_on_sighup(self, logger: Logger) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            warn!(
                logger,
                "cannot install a SIGHUP handler: certificates are not reloaded"
            );
            return;
        };
        while hangups.recv().await.is_some() {
            for (side, tls) in [
                ("api", &self.client),
                ("peer", &self.peer),
                ("join", &self.join),
            ] {
                let Some(tls) = tls else { continue };
                match tls.reload() {
                    Ok(()) => info!(logger, "reloaded TLS certificates"; "side" => side,
                        "cert" => %tls.files().cert.display()),
                    Err(e) => {
                        error!(logger, "could not reload TLS certificates; the previous ones stay in force";
                        "side" => side, "error" => e)
                    }
                }
            }
        }
    }
}

/// The peer-facing server, before it starts on the raft thread.
struct PeerServer {
    listener: std::net::TcpListener,
    tls: Option<Arc<tls::Tls>>,
    limits: http_server::Limits,
    service: Arc<peer_service::PeerService>,
    stopping: watch::Receiver<bool>,
    logger: Logger,
}

/// The raft thread: a single-threaded runtime that runs the node loop and the peer
/// server, so that a message from a peer is read and stepped on one thread without a
/// wake-up between them. When the loop ends, the runtime and the peer server go with it.
fn run_raft_thread(node: Node, inbox: router::Inbox, peers: PeerServer) -> NodeExit {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return NodeExit::Failed(format!("cannot start the raft thread's runtime: {e}")),
    };
    let exit = runtime.block_on(async move {
        let listener = match TcpListener::from_std(peers.listener) {
            Ok(listener) => listener,
            Err(e) => return NodeExit::Failed(format!("cannot serve peers: {e}")),
        };
        let service = peers.service;
        tokio::spawn(http_server::serve(
            "peer",
            listener,
            peers.tls,
            peers.limits,
            move |req| peer_service::handle_peer_request(req, service.clone()),
            peers.stopping,
            peers.logger,
        ));
        node.run(inbox).await
    });
    runtime.shutdown_background();
    exit
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
