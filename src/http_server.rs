//! The accept loop shared by the client API and the peer transport: one hyper HTTP/1
//! connection task per accepted socket, and a graceful stop that lets in-flight requests
//! finish (up to a deadline) once shutdown is signalled. It knows nothing about routes.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use slog::{info, warn, Logger};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long a stopping server waits for requests already in progress.
const DRAIN_DEADLINE: Duration = Duration::from_secs(6);

/// Serves `handler` on `listener` until `shutdown` turns true, then drains.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    logger: Logger,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(logger, "accept failed"; "server" => name, "error" => %e);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    // A client that goes away mid-request is not an error of ours.
                    let _ = conn.await;
                });
            }
            _ = shutdown.changed() => break,
        }
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

/// A response with `status` and a plain-text body.
pub fn text_response(status: hyper::StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response
}
