//! One peer's raft message stream: a long-lived HTTP/1.1 `POST /raft` whose chunked body
//! carries frames of raft messages, as etcd's rafthttp streams do.
//!
//! The raft node's thread writes each chunk into the socket itself, with a non-blocking
//! write: a message costs one system call and no thread wake-up before it is on the
//! wire (handing it to a task first cost one more wake-up per hop: put1 latency fell
//! 15% without it). Only what the socket does not take at once, and everything
//! while the connection opens, waits in a bounded backlog that a task writes out.
//!
//! That task also opens the connection (never the node's thread: a connect may wait a
//! second) and reads the peer's answer, which comes only when the peer ends the stream:
//! 410 Gone says this node was removed; anything else, or a broken connection, makes
//! the peer unreachable until the next message opens a new stream.
//!
//! [`PeerStream::send`] must never block and never write a partial chunk into the stream
//! out of order: every write happens under the backlog's lock, and only when the
//! backlog ahead of it is empty.
//!
//! With peer TLS the task makes the handshake (tokio-rustls), then keeps the rustls
//! connection beside the socket ([`Wire`]): a write encrypts into TLS records and puts
//! them on the socket the same non-blocking way, and records the socket did not take
//! wait inside rustls until the task sees the socket writable.

use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use slog::{debug, info, warn, Logger};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::cluster_id;
use crate::metrics::Metrics;
use crate::router::Router;

/// A peer that does not accept a connection within this long is unreachable (for
/// snapshot uploads too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes waiting for one peer before new messages to it are dropped (raft resends).
const MAX_BACKLOG_BYTES: usize = 16 * 1024 * 1024;
/// A stream still open this long after it was opened shows the peer reachable again.
const REACHABLE_AFTER: Duration = Duration::from_secs(1);
/// Most bytes of the peer's answer read before it is cut off.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where and how to open the stream.
pub struct StreamTarget {
    /// `host:port` of the peer's raft listener.
    pub authority: String,
    /// With peer TLS: the client configuration and the name the peer's certificate must
    /// carry.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The request path, e.g. `/raft`.
    pub path: String,
    /// Extra request headers (the cluster id), computed when a stream opens.
    pub headers: Box<dyn Fn() -> Vec<(&'static str, String)> + Send + Sync>,
    /// Checks a 410 answer, given the cluster id it carried, before this node believes
    /// that it was removed.
    pub confirm_removal: ConfirmRemoval,
}

/// See [`StreamTarget::confirm_removal`]: Ok once the removal is confirmed.
pub type ConfirmRemoval = Box<
    dyn Fn(Option<u64>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync,
>;

/// The sending end of one peer's stream, shared by the node's thread and its task.
pub struct PeerStream {
    id: u64,
    outbox: Mutex<Outbox>,
    /// Wakes the task: something to connect for, to flush, or the stream was closed.
    wake: Notify,
    closed: AtomicBool,
    logger: Logger,
}

struct Outbox {
    conn: Conn,
    /// Bytes not yet written, whole chunks (and a request head) in stream order.
    backlog: BytesMut,
}

enum Conn {
    /// No connection; the next message asks the task to open one.
    Idle,
    /// The task is connecting; messages wait in the backlog.
    Connecting,
    Open(Arc<Wire>),
    /// A write failed; the task closes the connection.
    Broken(String),
}

/// How a stream ended.
enum Ended {
    /// The peer says this node was removed from the cluster: why, and the cluster id its
    /// answer carried.
    Removed(String, Option<u64>),
    Failed(String),
    /// The transport stopped sending to this peer.
    Closed,
}

impl PeerStream {
    /// Creates the stream to peer `id` and starts its task on `runtime`.
    pub fn start(
        id: u64,
        target: StreamTarget,
        runtime: &tokio::runtime::Handle,
        node: Router,
        metrics: Arc<Metrics>,
        logger: Logger,
    ) -> Arc<PeerStream> {
        let stream = Arc::new(PeerStream {
            id,
            outbox: Mutex::new(Outbox {
                conn: Conn::Idle,
                backlog: BytesMut::new(),
            }),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            logger: logger.clone(),
        });
        let task = StreamTask {
            stream: stream.clone(),
            target,
            node,
            metrics,
            logger,
        };
        runtime.spawn(task.run());
        stream
    }

    /// Writes `frames` (encoded raft messages) as one chunk of the stream, or queues it.
    /// Never blocks; drops the chunk when the backlog is full (raft resends what matters).
    pub fn send(&self, frames: &[u8]) {
        let chunk = chunk_of(frames);
        let mut out = self.outbox.lock().unwrap();
        let mut written = 0;
        match &out.conn {
            Conn::Open(wire) if out.backlog.is_empty() => match wire.try_write(&chunk) {
                Ok(n) if n == chunk.len() => {
                    if wire.holds_records() {
                        self.wake.notify_one(); // the task writes them out
                    }
                    return;
                }
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    out.conn = Conn::Broken(e.to_string());
                    self.wake.notify_one();
                    return;
                }
            },
            Conn::Broken(_) => return,
            _ => {}
        }
        if written == 0 && out.backlog.len() + chunk.len() > MAX_BACKLOG_BYTES {
            debug!(self.logger, "peer backlog full, dropping messages");
            return;
        }
        out.backlog.extend_from_slice(&chunk[written..]);
        if matches!(out.conn, Conn::Idle) {
            out.conn = Conn::Connecting;
        }
        self.wake.notify_one();
    }

    /// Stops the stream: its task closes the connection and ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Writes out as much of the backlog as the socket takes now. Ok(true) once empty.
    fn flush(&self, wire: &Wire) -> io::Result<bool> {
        let mut out = self.outbox.lock().unwrap();
        while !out.backlog.is_empty() {
            match wire.try_write(&out.backlog) {
                Ok(n) => out.backlog.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        wire.write_records().map(|()| !wire.holds_records())
    }
}

/// `<length in hex>\r\n<frames>\r\n`: one chunk of a chunked HTTP/1.1 body.
fn chunk_of(frames: &[u8]) -> Vec<u8> {
    let mut chunk = format!("{:x}\r\n", frames.len()).into_bytes();
    chunk.extend_from_slice(frames);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

/// The task that opens one peer's stream when there is something to send, writes out
/// the backlog, and reads the peer's answer when the stream ends.
struct StreamTask {
    stream: Arc<PeerStream>,
    target: StreamTarget,
    node: Router,
    metrics: Arc<Metrics>,
    logger: Logger,
}

impl StreamTask {
    async fn run(self) {
        let mut reachable = true;
        // A 410 from this peer was not believed, and said so.
        let mut disbelieved = false;
        loop {
            if !self.wait_for_messages().await {
                return;
            }
            let ended = match self.connect().await {
                Ok(socket) => self.serve(&socket, &mut reachable).await,
                Err(e) => Ended::Failed(e),
            };
            {
                let mut out = self.stream.outbox.lock().unwrap();
                out.conn = Conn::Idle;
                out.backlog.clear();
            }
            match ended {
                Ended::Closed => return,
                Ended::Removed(reason, cluster) => {
                    match (self.target.confirm_removal)(cluster).await {
                        Ok(()) => {
                            warn!(self.logger, "peer says this node was removed from the cluster, and the leader confirms it"; "reason" => reason);
                            self.node.removed_by_peer(self.stream.id);
                            return;
                        }
                        Err(why) => {
                            if !disbelieved {
                                warn!(self.logger, "peer says this node was removed from the cluster; not believed (logged once)"; "reason" => reason, "why" => why);
                                disbelieved = true;
                            }
                            self.node.report_unreachable(self.stream.id);
                            tokio::time::sleep(REACHABLE_AFTER).await;
                        }
                    }
                }
                Ended::Failed(why) => {
                    Metrics::inc(&self.metrics.peer_send_errors);
                    if reachable {
                        warn!(self.logger, "peer unreachable; messages to it are dropped until it answers"; "error" => why);
                        reachable = false;
                    }
                    self.node.report_unreachable(self.stream.id);
                }
            }
        }
    }

    /// Waits until a message asks for a connection; false once the stream is closed.
    async fn wait_for_messages(&self) -> bool {
        loop {
            if self.stream.closed.load(Ordering::Relaxed) {
                return false;
            }
            if matches!(self.stream.outbox.lock().unwrap().conn, Conn::Connecting) {
                return true;
            }
            self.stream.wake.notified().await;
        }
    }

    /// Connects (and makes the TLS handshake) and puts the request head in front of the
    /// waiting chunks.
    async fn connect(&self) -> Result<Arc<Wire>, String> {
        let target = &self.target;
        let opened = async {
            let socket = TcpStream::connect(&target.authority)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
            socket.set_nodelay(true).map_err(|e| e.to_string())?;
            let Some((config, name)) = &target.tls else {
                return Ok::<Wire, String>(Wire { socket, tls: None });
            };
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let (socket, session) = connector
                .connect(name.clone(), socket)
                .await
                .map_err(|e| format!("TLS handshake with {} failed: {e}", target.authority))?
                .into_inner();
            Ok(Wire {
                socket,
                tls: Some(Mutex::new(session)),
            })
        };
        let wire = tokio::time::timeout(CONNECT_TIMEOUT, opened)
            .await
            .map_err(|_| {
                format!(
                    "no connection to {} within {CONNECT_TIMEOUT:?}",
                    target.authority
                )
            })??;
        let mut head = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ntransfer-encoding: chunked\r\n",
            target.path, target.authority
        );
        for (name, value) in (target.headers)() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let wire = Arc::new(wire);
        let mut out = self.stream.outbox.lock().unwrap();
        let mut backlog = BytesMut::from(head.as_bytes());
        backlog.extend_from_slice(&out.backlog);
        out.backlog = backlog;
        out.conn = Conn::Open(wire.clone());
        Ok(wire)
    }

    /// Keeps the stream flowing until it ends: writes out the backlog when there is one
    /// and the socket takes it, and reads the peer's answer.
    async fn serve(&self, wire: &Wire, reachable: &mut bool) -> Ended {
        let mut answer = Vec::new();
        let mut backlog_waiting = true;
        let confirm = tokio::time::sleep(REACHABLE_AFTER);
        tokio::pin!(confirm);
        let mut confirmed = *reachable;
        loop {
            if backlog_waiting {
                match self.stream.flush(wire) {
                    Ok(empty) => backlog_waiting = !empty,
                    Err(e) => return Ended::Failed(format!("writing to the peer: {e}")),
                }
            }
            tokio::select! {
                _ = self.stream.wake.notified() => {
                    if self.stream.closed.load(Ordering::Relaxed) {
                        return Ended::Closed;
                    }
                    if let Conn::Broken(why) = &self.stream.outbox.lock().unwrap().conn {
                        return Ended::Failed(format!("writing to the peer: {why}"));
                    }
                    backlog_waiting = true;
                }
                ready = wire.socket.writable(), if backlog_waiting => {
                    if let Err(e) = ready {
                        return Ended::Failed(e.to_string());
                    }
                }
                ready = wire.socket.readable() => {
                    if let Err(e) = ready {
                        return Ended::Failed(e.to_string());
                    }
                    if let Some(ended) = read_answer(wire, &mut answer) {
                        return ended;
                    }
                }
                _ = &mut confirm, if !confirmed => {
                    confirmed = true;
                    if !*reachable {
                        info!(self.logger, "peer is reachable again");
                        *reachable = true;
                    }
                }
            }
        }
    }
}

/// An open connection to the peer: the socket, and the TLS session on it if any. Every
/// call is non-blocking (`WouldBlock` when the socket is not ready).
struct Wire {
    socket: TcpStream,
    tls: Option<Mutex<rustls::ClientConnection>>,
}

impl Wire {
    /// Writes a prefix of `data` and says how long it was. With TLS the prefix is taken
    /// into TLS records, which go on the socket now or at the next
    /// [`Wire::write_records`]; no new data is taken while earlier records wait.
    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.socket.try_write(data);
        };
        let mut session = tls.lock().unwrap();
        if !write_records(&mut session, &self.socket)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let taken = session.writer().write(data)?;
        if taken == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        write_records(&mut session, &self.socket)?;
        Ok(taken)
    }

    /// Puts waiting TLS records on the socket, as far as it takes them.
    fn write_records(&self) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            write_records(&mut tls.lock().unwrap(), &self.socket)?;
        }
        Ok(())
    }

    /// Whether TLS records wait for the socket to take them.
    fn holds_records(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|tls| tls.lock().unwrap().wants_write())
    }

    /// Reads what the peer sent (decrypted); Ok(0) at the end of the stream.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.socket.try_read(buf);
        };
        let mut session = tls.lock().unwrap();
        loop {
            match session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if session.read_tls(&mut SocketIo(&self.socket))? == 0 {
                return Ok(0);
            }
            session.process_new_packets().map_err(io::Error::other)?;
        }
    }
}

/// Ok(true) once rustls holds no more records to send.
fn write_records(session: &mut rustls::ClientConnection, socket: &TcpStream) -> io::Result<bool> {
    while session.wants_write() {
        match session.write_tls(&mut SocketIo(socket)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The socket as `std::io` (non-blocking) for rustls.
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads what the peer sent. The peer answers only to end the stream, so once the
/// answer is whole (or the connection closed) the stream is over.
fn read_answer(wire: &Wire, answer: &mut Vec<u8>) -> Option<Ended> {
    let mut buf = [0u8; 4096];
    match wire.try_read(&mut buf) {
        Ok(0) => Some(
            ended_by(answer, true)
                .unwrap_or_else(|| Ended::Failed("the peer closed the stream".into())),
        ),
        Ok(n) => {
            answer.extend_from_slice(&buf[..n]);
            if answer.len() > MAX_ANSWER_BYTES {
                return Some(Ended::Failed("the peer sent an oversized answer".into()));
            }
            ended_by(answer, false)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => Some(Ended::Failed(e.to_string())),
    }
}

/// What the peer's answer says, once it is whole: its head and `content-length` bytes
/// of body, or whatever came before the connection closed (`eof`).
fn ended_by(answer: &[u8], eof: bool) -> Option<Ended> {
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let body = &answer[head_end + 4..];
    let length = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
    let body = match length {
        Some(length) if body.len() >= length => &body[..length],
        _ if eof => body,
        _ => return None,
    };
    let reason = String::from_utf8_lossy(body).trim().to_string();
    let cluster = header(&head, cluster_id::HEADER).and_then(cluster_id::parse);
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    Some(match status {
        Some(410) => Ended::Removed(reason, cluster),
        Some(status) => Ended::Failed(format!(
            "the peer ended the stream: HTTP {status}: {reason}"
        )),
        None => Ended::Failed("the peer sent an unreadable answer".into()),
    })
}

/// The value of header `name` in an HTTP answer's `head`.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_framed_as_http_chunked_encoding() {
        assert_eq!(chunk_of(b"hello, world"), b"c\r\nhello, world\r\n");
    }

    #[test]
    fn answers_are_read_once_whole() {
        let gone = b"HTTP/1.1 410 Gone\r\ncontent-length: 9\r\n\r\nnode 3 was";
        assert!(ended_by(&gone[..40], false).is_none());
        assert!(matches!(ended_by(gone, false), Some(Ended::Removed(r, None)) if r == "node 3 wa"));
        let signed = b"HTTP/1.1 410 Gone\r\nx-raftkvd-cluster-id: 00000000000000ab\r\ncontent-length: 0\r\n\r\n";
        assert!(matches!(
            ended_by(signed, false),
            Some(Ended::Removed(_, Some(0xab)))
        ));
        let refused = b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 5\r\n\r\nother";
        assert!(matches!(ended_by(refused, false),
            Some(Ended::Failed(w)) if w == "the peer ended the stream: HTTP 412: other"));
        assert!(ended_by(b"HTTP/1.1 204 No", true).is_none());
        assert!(matches!(ended_by(b"HTTP/1.1 204 No Content\r\n\r\n", true),
            Some(Ended::Failed(w)) if w == "the peer ended the stream: HTTP 204: "));
    }
}
