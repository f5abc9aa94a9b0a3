//! The connection loop: accepts, serves each connection with hyper's HTTP/1 server,
//! and drains on shutdown within a limit.
//!
//! Written out instead of `axum::serve`, which gives hyper no timer: without one the
//! header read timeout is off, and a client that opens a connection and never
//! finishes its request head holds it (and a descriptor) forever; its graceful
//! shutdown also waits without limit for such connections.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use apikeyrouter::config::LimitsConfig;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

/// Serves `app` on `listener` until `shutdown` completes, then until the requests in
/// flight have finished or `[limits] drain_timeout_ms` has passed. A client gets
/// `[limits] header_read_timeout_ms` to send each request head, counted from the
/// connection's first read or the end of its previous request: idle kept-alive
/// connections are closed after it too.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    limits: &LimitsConfig,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without it a kept-alive connection waits ~40 ms per small reply (Nagle).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            app.clone().oneshot(req.map(Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain_timeout()) => {
            tracing::warn!(limit_ms = limits.drain_timeout_ms, "requests still in flight at the drain limit; shutting down without waiting for them");
        }
    }
}

/// An accept that failed: out of descriptors (or memory), wait for some to be freed
/// rather than spin; anything else concerns the one connection.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionAborted
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionRefused => {}
        _ => {
            tracing::error!(error = %e, "accept failed; retrying in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
