//! Thread per core: each serving thread runs a single-threaded runtime that accepts on
//! its own listener, all bound to one address with `SO_REUSEPORT`, so the kernel
//! spreads connections over the threads and a connection's requests stay on one core
//! (no task moves between cores, no cache lines bouncing with it).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};

use crate::state::AppState;

/// Binds `threads` listeners (at least one) to `listen`.
///
/// A plain bind comes first: it proves the port free (with `SO_REUSEPORT` alone these
/// listeners could join another process's group on the port and silently share its
/// traffic) and picks the port when `listen`'s is 0.
///
/// # Errors
/// When the address is in use or cannot be bound.
#[cfg(target_os = "linux")]
pub(super) fn bind(
    listen: SocketAddr,
    threads: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let addr = std::net::TcpListener::bind(listen)?.local_addr()?;
    (0..threads.max(1))
        .map(|_| {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            socket.listen(1024)?.into_std()
        })
        .collect()
}

/// Elsewhere `SO_REUSEPORT` does not spread connections over the listeners (or does
/// not exist).
#[cfg(not(target_os = "linux"))]
pub(super) fn bind(
    _listen: SocketAddr,
    _threads: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "the per-core runtime needs Linux (SO_REUSEPORT spreading connections over listeners)",
    ))
}

/// The serving threads after they drained; dropping it lets them end.
#[must_use = "dropping it ends the serving threads' runtimes and the tasks left on them"]
pub(super) struct Drained {
    _release: watch::Sender<bool>,
}

/// Serves on one thread per listener until `shutdown` completes (or a thread fails),
/// then until every thread has finished its requests in flight.
///
/// The threads keep their runtimes until the returned [`Drained`] is dropped: tasks
/// that requests left behind (the settlement of a request whose client went away)
/// run there while the caller flushes the audit records.
///
/// # Errors
/// When a thread cannot start or its server fails.
pub(super) async fn serve(
    listeners: Vec<std::net::TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Drained> {
    let (draining, stage) = watch::channel(false);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (state, stage, done) = (state.clone(), stage.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("apikeyrouter-serve-{i}"))
            .spawn(move || {
                // Upstream connections opened here are driven here and reused only by
                // this thread's requests (lane 0 is the main thread's).
                apikeyrouter::providers::use_connection_lane(i + 1);
                serving_thread(listener, state, stage, done);
            })
            .context("cannot start a serving thread")?;
    }
    drop(done_tx);
    let mut failure = None;
    tokio::select! {
        () = shutdown => {}
        // A thread stopped on its own: its server failed.
        Some(result) = done.recv() => failure = result.err(),
    }
    let _ = draining.send(true);
    // Each thread drops its sender once drained (or when it panics), so this ends
    // when the last one has.
    while let Some(result) = done.recv().await {
        if let Err(e) = result {
            failure.get_or_insert(e);
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(Drained { _release: draining }),
    }
}

/// One serving thread: serves until `stage` turns to draining, reports on `done` and
/// drops it, then keeps its runtime running until `stage`'s sender is dropped.
fn serving_thread(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    mut stage: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<anyhow::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = done.send(Err(e).context("cannot start a serving thread's runtime"));
            return;
        }
    };
    runtime.block_on(async move {
        let mut draining = stage.clone();
        let drained = async move {
            let _ = draining.wait_for(|draining| *draining).await;
        };
        let served = match TcpListener::from_std(listener) {
            Ok(listener) => super::serve_on(listener, state, drained).await,
            Err(e) => Err(e).context("cannot register a listener"),
        };
        let _ = done.send(served);
        drop(done);
        while stage.changed().await.is_ok() {}
    });
}
