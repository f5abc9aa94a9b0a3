//! HTTP plumbing shared by the real provider adapters (OpenAI, OpenAI-compatible,
//! Anthropic, Gemini): the pooled `reqwest` client, timeouts, rate-limit header
//! parsing, error classification and server-sent events.
//!
//! Everything here turns `reqwest` types into the application's
//! [`ProviderError`] so that no HTTP-client error type leaves this crate. It depends on
//! the application and domain crates and on `reqwest`; never on another adapter.
//!
//! Timeouts, as [`HttpSettings`] describes them:
//! - `connect_timeout` bounds TCP and TLS set-up (the client's connect timeout);
//! - `first_byte_timeout` bounds the wait for the response headers ([`send`]) and the
//!   silence between two chunks of a body ([`sse_stream`], error bodies);
//! - `total_timeout` bounds the whole exchange, body included (the client's timeout).
//!
//! # Classification
//!
//! [`error_from_response`] and [`error_from_parts`] look at the provider's error code,
//! type or status first (they are more precise than the HTTP status, and an error
//! inside a 200 body has no useful status), then fall back to
//! [`classify_status`](apikeyrouter_domain::classify_status):
//! - OpenAI: `insufficient_quota` → quota exhausted, `rate_limit_exceeded` → rate
//!   limited, `context_length_exceeded` → bad request, `invalid_api_key` → unauthorized;
//! - Anthropic: `overloaded_error` (529) → server error, `rate_limit_error` → rate
//!   limited, `authentication_error` / `permission_error` → unauthorized;
//! - Gemini: `RESOURCE_EXHAUSTED` → quota exhausted when the message speaks of an
//!   exceeded quota or of billing and the body names no per-minute window, else rate
//!   limited; `UNAUTHENTICATED` / `PERMISSION_DENIED`, and `INVALID_ARGUMENT` with
//!   reason `API_KEY_INVALID`, → unauthorized; other `INVALID_ARGUMENT` → bad request;
//!   a `RetryInfo.retryDelay` in the body serves as retry-after when no header gives one;
//! - an error object in a 200 body: `invalid_request_error` → bad request, anything
//!   else unrecognised → server error.
//!
//! Invariant: no message built here contains a request URL (its query may hold a key)
//! or key material; provider messages are scrubbed of anything that looks like a key
//! and truncated to [`MAX_MESSAGE_CHARS`] characters.

mod errors;
mod headers;
mod sse;

#[cfg(test)]
mod tests;

use std::error::Error as _;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apikeyrouter_application::ports::ProviderError;
use apikeyrouter_domain::{FailureKind, KeyMaterial, Timestamp};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, RequestBuilder, Response};

pub use errors::{
    MAX_MESSAGE_CHARS, error_from_parts, error_from_response, redact_key, scrub_message,
};
pub use headers::{
    anthropic_quota, no_quota, openai_quota, parse_go_duration, parse_rfc3339, retry_after,
};
pub use sse::{SseEvent, sse_stream};

/// Timeouts of one adapter's HTTP client; see the [module documentation](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpSettings {
    /// Bound on establishing a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Bound on the wait for response headers, and on the silence between two pieces
    /// of a streamed body.
    pub first_byte_timeout: Duration,
    /// Bound on the whole call, body included.
    pub total_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(600),
        }
    }
}

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Largest success body read into memory (a chat completion or embeddings response).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Builds the client an adapter instance keeps for all its calls: pooled connections,
/// `TCP_NODELAY`, the connect and total timeouts of `settings`, HTTP/2 when the server
/// offers it through ALPN, rustls for TLS.
///
/// # Errors
/// [`FailureKind::Network`] when the TLS backend cannot be initialised.
pub fn build_client(settings: &HttpSettings) -> Result<Client, ProviderError> {
    Client::builder()
        .user_agent(concat!("apikeyrouter/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.total_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .map_err(|err| {
            ProviderError::new(
                FailureKind::Network,
                format!(
                    "cannot build http client: {}",
                    transport_error_text(&err.without_url())
                ),
            )
        })
}

/// The idle bound [`send`] records on a response for [`sse_stream`] and body reads.
#[derive(Clone, Copy, Debug)]
struct IdleTimeout(Duration);

/// The idle bound of `response`: the one [`send`] recorded, else the default
/// first-byte timeout.
fn idle_timeout(response: &Response) -> Duration {
    response
        .extensions()
        .get::<IdleTimeout>()
        .map_or(HttpSettings::default().first_byte_timeout, |idle| idle.0)
}

/// Sends `request`, waiting at most `settings.first_byte_timeout` for the response
/// headers, and records that bound on the response as the idle timeout of its body
/// ([`sse_stream`], [`read_body`]). Any status is returned as `Ok`; see
/// [`error_from_response`] for non-success ones.
///
/// # Errors
/// [`FailureKind::Timeout`] when no headers arrive in time, else [`transport_error`].
pub async fn send(
    request: RequestBuilder,
    settings: &HttpSettings,
) -> Result<Response, ProviderError> {
    match tokio::time::timeout(settings.first_byte_timeout, request.send()).await {
        Err(_elapsed) => Err(ProviderError::new(
            FailureKind::Timeout,
            format!(
                "no response headers within {} ms",
                settings.first_byte_timeout.as_millis()
            ),
        )),
        Ok(Err(err)) => Err(transport_error(err)),
        Ok(Ok(mut response)) => {
            response
                .extensions_mut()
                .insert(IdleTimeout(settings.first_byte_timeout));
            Ok(response)
        }
    }
}

/// Classifies a `reqwest` failure: timeouts as [`FailureKind::Timeout`], everything
/// else (connect, request, body, decode) as [`FailureKind::Network`]. The message
/// holds the error and its causes, never the URL.
pub fn transport_error(err: reqwest::Error) -> ProviderError {
    let err = err.without_url();
    let kind = if err.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Network
    };
    let mut error = ProviderError::new(kind, scrub_message(&transport_error_text(&err)));
    if let Some(status) = err.status() {
        error = error.with_status(status.as_u16());
    }
    error
}

/// `err: cause: cause`, each level once (reqwest repeats its source in some displays).
/// Callers strip the URL first (`without_url`).
fn transport_error_text(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Checks that `response` declares the media type `expected` (parameters such as
/// `charset` ignored, case-insensitive). A response without a content type passes:
/// the body parser has the last word.
///
/// # Errors
/// [`FailureKind::ServerError`] (so the call fails over) with the status and
/// `unexpected content type X`.
pub fn expect_content_type(response: &Response, expected: &str) -> Result<(), ProviderError> {
    let Some(value) = response.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let declared = value.to_str().unwrap_or("(not text)");
    let essence = declared.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        let shown: String = declared.chars().take(100).collect();
        Err(ProviderError::new(
            FailureKind::ServerError,
            format!("unexpected content type {shown}, expected {expected}"),
        )
        .with_status(response.status().as_u16()))
    }
}

/// Reads a success body of at most `limit` bytes, each piece within the response's
/// idle timeout.
///
/// # Errors
/// [`transport_error`] on a failed read, [`FailureKind::Timeout`] when the body
/// stalls, [`FailureKind::ServerError`] when it exceeds `limit`.
pub async fn read_body(mut response: Response, limit: usize) -> Result<Vec<u8>, ProviderError> {
    let status = response.status().as_u16();
    let idle = idle_timeout(&response);
    let mut body = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, response.chunk()).await {
            Err(_elapsed) => {
                return Err(ProviderError::new(
                    FailureKind::Timeout,
                    format!("response body stalled for {} ms", idle.as_millis()),
                )
                .with_status(status));
            }
            Ok(Err(err)) => return Err(transport_error(err).with_status(status)),
            Ok(Ok(None)) => return Ok(body),
            Ok(Ok(Some(chunk))) => chunk,
        };
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::new(
                FailureKind::ServerError,
                format!("response body larger than {limit} bytes"),
            )
            .with_status(status));
        }
        body.extend_from_slice(&chunk);
    }
}

/// A parse failure of a success body: [`FailureKind::ServerError`] with
/// `malformed response body: ...`, so the call fails over.
pub fn malformed_body(status: u16, err: &dyn std::fmt::Display) -> ProviderError {
    let detail: String = err.to_string().chars().take(200).collect();
    ProviderError::new(
        FailureKind::ServerError,
        format!("malformed response body: {detail}"),
    )
    .with_status(status)
}

/// `now` as a domain timestamp (milliseconds since the epoch; the epoch if `now` is
/// before it).
pub fn timestamp(now: SystemTime) -> Timestamp {
    let ms = now.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    });
    Timestamp::from_millis(ms)
}

/// `result` with its error passed through [`redact_key`]: shorthand for
/// `result.map_err(|error| redact_key(error, material))`.
///
/// # Errors
/// `result`'s error, with every occurrence of the key material replaced.
pub fn redacted<T>(
    result: Result<T, ProviderError>,
    material: &KeyMaterial,
) -> Result<T, ProviderError> {
    result.map_err(|error| redact_key(error, material))
}
