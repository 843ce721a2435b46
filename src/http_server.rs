//! The accept loop shared by the client API and the peer transport: one hyper HTTP/1
//! connection task per accepted socket (after a TLS handshake when the listener has TLS),
//! and a graceful stop that lets in-flight requests finish (up to a deadline) once
//! shutdown is signalled. It knows nothing about routes; it only tells handlers which
//! certificate the client presented ([`ClientCertificate`] in each request's
//! extensions).
//!
//! It bounds what a client can hold ([`Limits`]): at most so many open connections
//! (beyond them, new ones wait in the kernel's backlog until one closes), and a deadline
//! for a request's headers, so that a connection that sends nothing, or sends slowly, is
//! closed. An accept error (such as running out of file descriptors) backs off instead
//! of spinning, and is logged once per outage.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use slog::{info, warn, Logger};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::tls::{ClientCertificate, Tls};

/// How long a stopping server waits for requests already in progress.
const DRAIN_DEADLINE: Duration = Duration::from_secs(6);
/// A client that has not finished its TLS handshake within this long is dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// What one listener allows its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From the moment a connection waits for a request until its headers are in.
    pub header_read_timeout: Duration,
}

/// Serves `handler` on `listener` (over TLS if `tls` is given) until `shutdown` turns
/// true, then drains.
#[allow(clippy::too_many_arguments)]
pub async fn serve<H, F, B>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    logger: Logger,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff: Option<Duration> = None;
    let mut full_logged = false;
    loop {
        if connections.available_permits() == 0 && !full_logged {
            warn!(logger, "connection limit reached; new connections wait until one closes";
                "server" => name, "max_connections" => limits.max_connections);
        }
        full_logged = connections.available_permits() == 0;
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if backoff.take().is_some() {
                    info!(logger, "accepting connections again"; "server" => name);
                }
                stream
            }
            Err(e) => {
                let pause = match backoff {
                    None => {
                        warn!(logger, "accept failed; backing off"; "server" => name, "error" => %e);
                        ACCEPT_BACKOFF.0
                    }
                    Some(pause) => (pause * 2).min(ACCEPT_BACKOFF.1),
                };
                backoff = Some(pause);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let (handler, tls, logger) = (handler.clone(), tls.clone(), logger.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    serve_connection(TokioIo::new(stream), None, limits, handler, watcher).await
                }
                Some(tls) => {
                    let Some((stream, certificate)) = handshake(&tls, stream, name, &logger).await
                    else {
                        return;
                    };
                    let io = TokioIo::new(stream);
                    serve_connection(io, certificate, limits, handler, watcher).await
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_DEADLINE) => {
            warn!(logger, "connections still open after the drain deadline"; "server" => name);
        }
    }
    info!(logger, "server stopped"; "server" => name);
}

/// The server's side of a TLS handshake; logs (at debug: a scanner or a peer with the
/// wrong CA may retry often) and drops a client that fails it.
async fn handshake(
    tls: &Tls,
    stream: TcpStream,
    server: &'static str,
    logger: &Logger,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<ClientCertificate>,
)> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let accepted = tokio::time::timeout(HANDSHAKE_DEADLINE, tls.acceptor().accept(stream)).await;
    match accepted {
        Ok(Ok(stream)) => {
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|der| ClientCertificate::of(der));
            Some((stream, certificate))
        }
        Ok(Err(e)) => {
            info!(logger, "TLS handshake refused"; "server" => server, "client" => peer, "error" => %e);
            None
        }
        Err(_) => {
            info!(logger, "TLS handshake timed out"; "server" => server, "client" => peer);
            None
        }
    }
}

/// Serves one connection's requests with `handler` until it closes or the server stops.
async fn serve_connection<I, H, F, B>(
    io: I,
    certificate: Option<ClientCertificate>,
    limits: Limits,
    handler: H,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        if let Some(certificate) = &certificate {
            req.extensions_mut().insert(certificate.clone());
        }
        let response = handler(req);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(io, service);
    // A client that goes away mid-request is not an error of ours.
    let _ = watcher.watch(conn).await;
}

/// Marks a client request that another member forwarded over the peer port (mutual TLS
/// when `--admin-cn` is in force): its origin already checked who sent it.
#[derive(Clone, Copy, Debug)]
pub struct FromPeer;

/// A response with `status` and a plain-text body.
pub fn text_response(status: hyper::StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response
}

/// An error and its causes, on one line (reqwest's own message hides the cause, such as
/// a refused certificate).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
