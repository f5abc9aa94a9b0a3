//! The pooled HTTP client of an adapter: hyper's connection pool over rustls (HTTP/2
//! when the server offers it through ALPN), the proxies of `HTTP_PROXY`,
//! `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY`, and the timeouts of [`HttpSettings`].
//!
//! hyper directly rather than a higher-level client: on the proxy's hot path reqwest
//! re-parsed every URL twice (for its redirect policy); the client's share of the
//! proxy's CPU fell from 16% to 8% without it (docs/benchmarks.md).
//!
//! Connections (TLS, proxies, the connect timeout) are opened by [`super::connect`].
//! Redirects are not followed: the request carries a key, and an API that redirects is
//! misconfigured (see [`super::error_from_response`]).

use std::cell::Cell;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apikeyrouter_application::ports::ProviderError;
use apikeyrouter_domain::FailureKind;
use bytes::Bytes;
use http::header::{ACCEPT, PROXY_AUTHORIZATION, USER_AGENT};
use http::uri::Scheme;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::ConfigBuilderExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::{HttpSettings, connect, scrub_message};

/// A response whose body is still to be read.
pub type Response = http::Response<Incoming>;

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Sent with every request, and with the `CONNECT` of a proxy tunnel.
pub(crate) const USER_AGENT_VALUE: &str = concat!("apikeyrouter/", env!("CARGO_PKG_VERSION"));

/// Connection lanes a client keeps at most; higher lane numbers wrap around lanes
/// 1 and up, so that they never share lane 0 (the threads that chose none).
pub(super) const MAX_LANES: usize = 64;

thread_local! {
    /// This thread's connection lane (see [`use_connection_lane`]).
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// Makes the requests this thread sends use connection lane `lane` of every client.
///
/// Each lane has a connection pool of its own, and a connection's I/O is driven by
/// the runtime of the thread that opened it. A server with a runtime per thread gives
/// each serving thread its own lane, so that a request's upstream connection is
/// driven on the request's own thread (measured 7–24% more requests per second than
/// one shared pool). Threads that choose no lane share lane 0, i.e. one pool.
pub fn use_connection_lane(lane: usize) {
    LANE.set(match lane {
        0 => 0,
        n => 1 + (n - 1) % (MAX_LANES - 1),
    });
}

type Pool = Client<connect::Connector, Full<Bytes>>;

/// An adapter's client; cheap to clone (the pools are shared).
#[derive(Clone)]
pub struct HttpClient {
    lanes: Arc<Lanes>,
    proxies: Arc<Matcher>,
    settings: HttpSettings,
}

/// A client's connection pools, one per lane, each made when a thread of its lane
/// first sends.
struct Lanes {
    connector: connect::Connector,
    pools: [OnceLock<Pool>; MAX_LANES],
}

#[cfg(test)]
impl HttpClient {
    /// The address of the pool this thread's requests use (tests of the lanes).
    pub(super) fn pool_address(&self) -> usize {
        std::ptr::from_ref(self.lanes.pool()) as usize
    }
}

impl Lanes {
    fn pool(&self) -> &Pool {
        self.pools[LANE.get()].get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(self.connector.clone())
        })
    }
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client that verifies servers with the platform's trust store and takes its
    /// proxies from the environment.
    ///
    /// # Errors
    /// [`FailureKind::Network`] when the TLS backend cannot be initialised.
    pub fn new(settings: &HttpSettings) -> Result<Self, ProviderError> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_setup_error(&e))?;
        let tls = tls
            .try_with_platform_verifier()
            .map_err(|e| tls_setup_error(&e))?
            .with_no_client_auth();
        Ok(Self::with_parts(settings, tls, Matcher::from_env()))
    }

    /// A client with the given TLS configuration and proxies (tests use their own
    /// certificate authority and proxy).
    pub(crate) fn with_parts(
        settings: &HttpSettings,
        tls: rustls::ClientConfig,
        proxies: Matcher,
    ) -> Self {
        let proxies = Arc::new(proxies);
        let lanes = Lanes {
            connector: connect::connector(settings, tls, proxies.clone()),
            pools: [const { OnceLock::new() }; MAX_LANES],
        };
        Self {
            lanes: Arc::new(lanes),
            proxies,
            settings: *settings,
        }
    }

    /// Sends `request`, waiting at most the first-byte timeout for the response
    /// headers, and records the body's idle and total bounds on the response for
    /// [`super::read_body`], [`super::sse_stream`] and error bodies. Any status is
    /// returned as `Ok`.
    ///
    /// # Errors
    /// [`FailureKind::Timeout`] when no headers arrive in time, else
    /// [`transport_error`].
    pub async fn send(&self, request: Request<Bytes>) -> Result<Response, ProviderError> {
        let (mut parts, body) = request.into_parts();
        parts
            .headers
            .entry(USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT_VALUE));
        parts
            .headers
            .entry(ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        if parts.uri.scheme() == Some(&Scheme::HTTP) {
            // Sent to the proxy itself (absolute form), so it carries the proxy's
            // credentials; a tunnel carries them in its CONNECT instead.
            if let Some(auth) = self
                .proxies
                .intercept(&parts.uri)
                .and_then(|proxy| proxy.basic_auth().cloned())
            {
                parts.headers.insert(PROXY_AUTHORIZATION, auth);
            }
        }
        let started = Instant::now();
        let limits = BodyLimits {
            idle: self.settings.first_byte_timeout,
            deadline: started + self.settings.total_timeout,
            total: self.settings.total_timeout,
        };
        let headers_by = (started + self.settings.first_byte_timeout).min(limits.deadline);
        let pool = self.lanes.pool();
        let call = async {
            let mut nacks = 0;
            loop {
                let mut attempt = Request::new(Full::new(body.clone()));
                *attempt.method_mut() = parts.method.clone();
                *attempt.uri_mut() = parts.uri.clone();
                *attempt.headers_mut() = parts.headers.clone();
                match pool.request(attempt).await {
                    Err(err) if nacks < MAX_NACK_RETRIES && is_protocol_nack(&err) => nacks += 1,
                    result => return result,
                }
            }
        };
        match tokio::time::timeout_at(headers_by, call).await {
            Err(_elapsed) => Err(ProviderError::new(
                FailureKind::Timeout,
                format!(
                    "no response headers within {} ms",
                    headers_by.saturating_duration_since(started).as_millis()
                ),
            )),
            Ok(Err(err)) => Err(transport_error(&err)),
            Ok(Ok(mut response)) => {
                response.extensions_mut().insert(limits);
                Ok(response)
            }
        }
    }
}

/// How many times a request the server refused unprocessed is sent again.
const MAX_NACK_RETRIES: u32 = 2;

/// Whether an HTTP/2 server refused the request without processing it (a graceful
/// `GOAWAY`, or `REFUSED_STREAM`), so that sending it again is safe: without the retry
/// a server recycling its connections would count as a failing key.
fn is_protocol_nack(err: &(dyn StdError + 'static)) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return h2.is_remote()
                && ((h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM)));
        }
        source = cause.source();
    }
    false
}

fn tls_setup_error(err: &dyn std::fmt::Display) -> ProviderError {
    ProviderError::new(
        FailureKind::Network,
        format!("cannot build http client: {err}"),
    )
}

/// The bounds on reading a response body: the silence between two pieces, and the
/// end of the whole exchange.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyLimits {
    idle: Duration,
    deadline: Instant,
    total: Duration,
}

/// Why a body read was cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Nothing arrived for the idle bound.
    Idle(Duration),
    /// The whole exchange's bound passed.
    Total(Duration),
}

impl BodyLimits {
    /// The limits [`HttpClient::send`] recorded on `response`, else the defaults.
    pub(crate) fn of(response: &Response) -> Self {
        response
            .extensions()
            .get::<Self>()
            .copied()
            .unwrap_or_else(|| {
                let defaults = HttpSettings::default();
                Self {
                    idle: defaults.first_byte_timeout,
                    deadline: Instant::now() + defaults.total_timeout,
                    total: defaults.total_timeout,
                }
            })
    }

    /// Awaits `step` within the idle bound and the deadline.
    pub(crate) async fn within<F: Future>(&self, step: F) -> Result<F::Output, Cut> {
        let idle_until = Instant::now() + self.idle;
        let (until, cut) = if idle_until < self.deadline {
            (idle_until, Cut::Idle(self.idle))
        } else {
            (self.deadline, Cut::Total(self.total))
        };
        tokio::time::timeout_at(until, step).await.map_err(|_| cut)
    }
}

impl Cut {
    /// The timeout error of a cut body, `what` naming the body ("response body").
    pub(crate) fn error(self, what: &str) -> ProviderError {
        let message = match self {
            Self::Idle(idle) => format!("{what} stalled for {} ms", idle.as_millis()),
            Self::Total(total) => {
                format!(
                    "{what} not complete within the total timeout of {} ms",
                    total.as_millis()
                )
            }
        };
        ProviderError::new(FailureKind::Timeout, message)
    }
}

/// The next piece of `response`'s body (trailers skipped), `None` at its end.
pub(crate) async fn next_chunk(response: &mut Response) -> Result<Option<Bytes>, hyper::Error> {
    loop {
        match response.body_mut().frame().await {
            None => return Ok(None),
            Some(Err(err)) => return Err(err),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Classifies a failed exchange: an I/O timeout anywhere in the causes as
/// [`FailureKind::Timeout`], anything else (connect, TLS, proxy, protocol) as
/// [`FailureKind::Network`]. The message holds the error and its causes; neither
/// hyper nor this module puts a URL in them.
pub fn transport_error(err: &(dyn StdError + 'static)) -> ProviderError {
    let mut kind = FailureKind::Network;
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(cause) = source {
        let timed_out = cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
            || cause
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            kind = FailureKind::Timeout;
        }
        source = cause.source();
    }
    ProviderError::new(kind, scrub_message(&error_text(err)))
}

/// `err: cause: cause`, each level once (some errors repeat their source).
pub(crate) fn error_text(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
