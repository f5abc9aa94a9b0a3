//! HTTP plumbing shared by the real provider adapters (OpenAI, OpenAI-compatible,
//! Anthropic, Gemini): the pooled client ([`HttpClient`], hyper over rustls, proxies
//! from the environment), timeouts, rate-limit header parsing, error classification
//! and server-sent events.
//!
//! Everything here turns HTTP-client failures into the application's
//! [`ProviderError`] so that no HTTP-client error type leaves this crate. It depends on
//! the application and domain crates and on hyper; never on another adapter.
//!
//! Timeouts, as [`HttpSettings`] describes them:
//! - `connect_timeout` bounds opening a connection: name lookup, TCP, a proxy's
//!   tunnel and the TLS handshake;
//! - `first_byte_timeout` bounds the wait for the response headers
//!   ([`HttpClient::send`]) and the silence between two chunks of a body
//!   ([`read_body`], [`sse_stream`], error bodies);
//! - `total_timeout` bounds the whole exchange, body included.
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
//!   else unrecognised → server error;
//! - a redirect (3xx) → bad request naming the status (redirects are not followed).
//!
//! Invariant: no message built here contains a request URL (its query may hold a key)
//! or key material; provider messages are scrubbed of anything that looks like a key
//! and truncated to [`MAX_MESSAGE_CHARS`] characters.

mod client;
mod connect;
mod errors;
mod headers;
mod sse;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apikeyrouter_application::ports::ProviderError;
use apikeyrouter_domain::{FailureKind, KeyMaterial, Timestamp};
use bytes::Bytes;
use http::header::CONTENT_TYPE;

use client::{BodyLimits, next_chunk};
pub use client::{HttpClient, Response, transport_error, use_connection_lane};
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
    /// Bound on opening a connection (lookup, TCP, proxy tunnel, TLS).
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

/// Largest success body read into memory (a chat completion or embeddings response).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A request of `method` to `uri` with `headers` and, when given, the JSON encoding
/// of `body`.
///
/// # Errors
/// [`FailureKind::BadRequest`] when `body` cannot be encoded.
pub fn request<B: serde::Serialize + ?Sized>(
    method: http::Method,
    uri: http::Uri,
    headers: impl IntoIterator<Item = (http::HeaderName, http::HeaderValue)>,
    body: Option<&B>,
) -> Result<http::Request<bytes::Bytes>, ProviderError> {
    let encoded = match body {
        Some(body) => {
            // Sized for a typical chat request, so the buffer is not regrown while
            // writing (`to_vec` starts empty).
            let mut encoded = Vec::with_capacity(1024);
            serde_json::to_writer(&mut encoded, body).map_err(|err| {
                ProviderError::new(
                    FailureKind::BadRequest,
                    format!("cannot encode request: {err}"),
                )
            })?;
            encoded
        }
        None => Vec::new(),
    };
    let mut request = http::Request::new(bytes::Bytes::from(encoded));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    // Room for the caller's headers and the client's defaults without regrowing.
    *request.headers_mut() = http::HeaderMap::with_capacity(8);
    request.headers_mut().extend(headers);
    if body.is_some() {
        request.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    Ok(request)
}

/// A header value holding key material, marked sensitive so that it is never logged.
///
/// # Errors
/// [`FailureKind::Unauthorized`] when the material cannot be a header value.
pub fn secret_header(value: &str) -> Result<http::HeaderValue, ProviderError> {
    let mut value = http::HeaderValue::from_str(value).map_err(|_| {
        ProviderError::new(
            FailureKind::Unauthorized,
            "key material is not a valid http header value",
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Parses an adapter's request URL. Credentials in it are refused: they would travel
/// in the request line or HTTP/2 authority; keys go in headers.
///
/// # Errors
/// [`FailureKind::BadRequest`] naming what is wrong (never the URL: a query may hold
/// a key).
pub fn parse_uri(text: &str) -> Result<http::Uri, ProviderError> {
    let uri = http::Uri::try_from(text).map_err(|err| {
        ProviderError::new(FailureKind::BadRequest, format!("invalid url: {err}"))
    })?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ProviderError::new(
            FailureKind::BadRequest,
            "invalid url: user or password in a url is not supported",
        ));
    }
    Ok(uri)
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
/// idle timeout and all of it within the total timeout. A body that arrives in one
/// piece is returned as it came, without a copy.
///
/// # Errors
/// [`transport_error`] on a failed read, [`FailureKind::Timeout`] when the body
/// stalls or the total timeout passes, [`FailureKind::ServerError`] when it exceeds
/// `limit`.
pub async fn read_body(mut response: Response, limit: usize) -> Result<Bytes, ProviderError> {
    let status = response.status().as_u16();
    let limits = BodyLimits::of(&response);
    // The body while it is one piece; once a second comes, `joined` holds it all.
    let mut only: Option<Bytes> = None;
    let mut joined = Vec::new();
    let mut length = 0;
    loop {
        let chunk = match limits.within(next_chunk(&mut response)).await {
            Err(cut) => return Err(cut.error("response body").with_status(status)),
            Ok(Err(err)) => return Err(transport_error(&err).with_status(status)),
            Ok(Ok(None)) => return Ok(only.unwrap_or_else(|| Bytes::from(joined))),
            Ok(Ok(Some(chunk))) => chunk,
        };
        length += chunk.len();
        if length > limit {
            return Err(ProviderError::new(
                FailureKind::ServerError,
                format!("response body larger than {limit} bytes"),
            )
            .with_status(status));
        }
        if let Some(earlier) = only.take() {
            joined.extend_from_slice(&earlier);
            joined.extend_from_slice(&chunk);
        } else if joined.is_empty() {
            only = Some(chunk);
        } else {
            joined.extend_from_slice(&chunk);
        }
    }
}

/// A JSON response body as `T`. The text is checked as UTF-8 once, in one pass,
/// rather than string by string as `serde_json::from_slice` does (measured: about 2%
/// of the proxy's instructions per request went to the per-string checks).
///
/// # Errors
/// A [`malformed_body`] error naming what is wrong.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    status: u16,
    body: &[u8],
) -> Result<T, ProviderError> {
    let text = std::str::from_utf8(body).map_err(|e| malformed_body(status, &e))?;
    serde_json::from_str(text).map_err(|e| malformed_body(status, &e))
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
