//! Running the proxy: bind, serve with TCP_NODELAY, reload on SIGHUP or file change,
//! shut down gracefully on SIGINT/SIGTERM (in-flight requests finish, within a limit).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use apikeyrouter::ApiKeyRouter;
use apikeyrouter::config::{Config, ServerConfig, ServerRuntime};
use tokio::net::TcpListener;

use crate::auth::Auth;
use crate::state::AppState;

mod connections;
mod follower;
mod per_core;

/// Builds the shared state from a configuration.
///
/// # Errors
/// When the router cannot be built (store unreachable, bad adapter settings) or the
/// admin API would be exposed without a token.
pub async fn build_state(config: &Config) -> anyhow::Result<Arc<AppState>> {
    let router = ApiKeyRouter::from_config(config)
        .await
        .with_context(|| format!("cannot start from {}", config.source_name))?;
    let auth = Auth::from_config(config).map_err(anyhow::Error::msg)?;
    let state = Arc::new(AppState::new(router, auth, config.clone()));
    // Subscribed before the first read: a change made in between is not missed.
    let changes = state.router.virtual_key_changes();
    state
        .refresh_virtual_keys()
        .await
        .context("cannot read the stored virtual keys")?;
    follower::follow_virtual_keys(&state, changes);
    Ok(state)
}

/// The runtime the command runs on. With the shared arrangement it is the one that
/// serves: work-stealing over `server.threads` workers. Per core, it only runs the
/// router's background work (sweeps, reload, store connections) on the main thread;
/// [`serve`] starts the serving threads (each delivers the audit records of its own
/// requests).
///
/// # Errors
/// When the runtime cannot be built.
pub fn main_runtime(server: &ServerConfig) -> std::io::Result<tokio::runtime::Runtime> {
    match server.runtime {
        ServerRuntime::Shared => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            // Unset, tokio's default: `TOKIO_WORKER_THREADS`, else one per core.
            if let Some(threads) = server.threads {
                builder.worker_threads(threads);
            }
            builder.enable_all().build()
        }
        ServerRuntime::PerCore => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
}

/// Serves until SIGINT/SIGTERM, as `server` arranges it (see [`main_runtime`]).
/// `on_bound` receives the bound address (port 0 picks one).
///
/// # Errors
/// When the address cannot be bound or the server fails.
pub async fn serve(
    state: Arc<AppState>,
    listen: SocketAddr,
    server: ServerConfig,
    config_path: Option<PathBuf>,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    // Per core, the serving threads' runtimes run until this is dropped, after the
    // flush: tasks that requests left there (settling a request whose client went
    // away) must finish.
    // Installed before the address is announced: a SIGHUP that arrives after it must
    // not meet the signal's default action, which ends the process.
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let hangup = None;
    let drained = match server.runtime {
        ServerRuntime::Shared => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            tokio::spawn(watch_config(state.clone(), config_path, hangup));
            on_bound(listener.local_addr()?);
            serve_on(listener, state.clone(), shutdown_signal()).await?;
            None
        }
        ServerRuntime::PerCore => {
            let listeners = per_core::bind(listen, server.threads())
                .with_context(|| format!("cannot listen on {listen}"))?;
            tokio::spawn(watch_config(state.clone(), config_path, hangup));
            on_bound(listeners[0].local_addr()?);
            Some(per_core::serve(listeners, state.clone(), shutdown_signal()).await?)
        }
    };
    // In-flight requests are done; let their audit records reach the sink.
    if !state.router.flush_records(SHUTDOWN_RECORD_WAIT).await {
        let pending = state.router.record_delivery().pending;
        tracing::error!(
            pending,
            "shut down with audit records undelivered (sink or store down)"
        );
    }
    drop(drained);
    tracing::info!("shut down");
    Ok(())
}

/// Serves the application on `listener` until `shutdown` completes, then until the
/// requests in flight have finished (within `[limits] drain_timeout_ms`).
async fn serve_on(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = state.launched.limits.clone();
    let near = tokio::spawn(keep_a_timer_near());
    connections::serve(listener, crate::app(state), &limits, shutdown).await;
    near.abort();
    Ok(())
}

/// Keeps a timer due within a second pending on the serving runtime.
///
/// Tokio's time driver wakes its own thread (an `eventfd` write, then an extra
/// `epoll_wait`) whenever a timer is armed earlier than every timer that was pending
/// when the thread last parked. Between requests only the idle connections' header
/// timers (75 s by default) are pending, so each request's attempt and first-byte
/// timers (60 s) did that: 1.66 writes per request at 64 paced clients (session 14),
/// on the path before the upstream call. With this timer pending they never do; it
/// costs one wake-up a second.
async fn keep_a_timer_near() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// How long shutdown waits for audit records to reach a slow or recovering sink.
const SHUTDOWN_RECORD_WAIT: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// The SIGHUP stream (none off Unix).
#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = std::convert::Infallible;

/// Reloads the configuration on SIGHUP or when the file changes (checked every two
/// seconds). A file that does not validate is reported and ignored: the running
/// configuration stays. Without a file (`serve` from the environment, `demo`) SIGHUP
/// is logged and ignored rather than left to its default action, which would end the
/// process without draining.
async fn watch_config(state: Arc<AppState>, path: Option<PathBuf>, mut hangup: Option<Hangup>) {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = path.as_ref().and_then(modified);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = {
            let _ = &mut hangup;
            std::future::pending::<()>()
        };
        let polled = async {
            match &path {
                Some(_) => tokio::time::sleep(Duration::from_secs(2)).await,
                None => std::future::pending::<()>().await,
            }
        };
        let reason = tokio::select! {
            () = signalled => "SIGHUP",
            () = polled => {
                let now = path.as_ref().and_then(modified);
                if now == last { continue; }
                last = now;
                "file changed"
            }
        };
        match &path {
            Some(path) => reload(&state, path, reason).await,
            None => tracing::warn!(reason, "no configuration file to reload"),
        }
    }
}

/// Applies the file at `path` to the running proxy.
pub async fn reload(state: &AppState, path: &std::path::Path, reason: &str) {
    let mut config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(reason, error = %e, "configuration not reloaded");
            return;
        }
    };
    // The socket was bound at start (perhaps at `--listen`, not the file's address):
    // whether the management API may go without a token depends on the one in use.
    config.listen = state.launched.listen;
    let auth = match Auth::from_config(&config) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(reason, error = %e, "configuration not reloaded");
            return;
        }
    };
    if let Err(e) = state.router.apply_config(&config).await {
        tracing::error!(reason, error = %e, "configuration partly reloaded");
        return;
    }
    let needs_restart = state.launched.start_only_changes(&config);
    if !needs_restart.is_empty() {
        tracing::warn!(reason, sections = ?needs_restart, "these sections changed but apply only at start; restart to apply them");
    }
    state.update_auth(|current| auth.keeping_stored(current));
    // A stored key the file's key of the same name hid may be back.
    if let Err(e) = state.reapply_virtual_keys().await {
        tracing::warn!(error = %e, "stored virtual keys not re-read after a reload");
    }
    tracing::info!(reason, path = %path.display(), "configuration reloaded");
}
