//! Error responses: reading a bounded error body, extracting the provider's code and
//! message from the common JSON shapes, classifying into the domain's
//! [`FailureKind`]s and scrubbing the message of key material.
//!
//! Shapes understood (the first element is used when the body is a JSON array, as
//! Gemini's streaming endpoint sends):
//! - OpenAI and compatibles: `{"error": {"message", "type", "code", "param"}}`;
//! - Anthropic: `{"type": "error", "error": {"type", "message"}}`;
//! - Gemini: `{"error": {"code": 429, "message", "status", "details": [...]}}`;
//! - loose ones: `{"error": "text"}`, `{"message": "text"}`, `{"detail": "text"}`.

use std::time::{Duration, SystemTime};

use apikeyrouter_application::ports::ProviderError;
use apikeyrouter_domain::{FailureKind, KeyMaterial, QuotaObservation, classify_status};
use http::HeaderMap;
use serde_json::Value;

use super::client::{BodyLimits, Response, next_chunk};
use super::headers::{parse_go_duration, retry_after};

/// Longest message kept in a [`ProviderError`], in characters.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// Bytes of an error body read; the rest is dropped with the connection.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Turns a non-success response into a classified [`ProviderError`]. A redirect is a
/// bad request (a misconfigured base URL; redirects are not followed). Otherwise reads
/// the first 64 KiB of the body (each piece within the response's idle timeout, all
/// within the total timeout; a failed read keeps what arrived), classifies it (see
/// the [classification](super#classification)) and attaches the status, the
/// retry-after and the rate-limit state `quota_fn` reads from the headers.
pub async fn error_from_response(
    mut response: Response,
    quota_fn: fn(&HeaderMap, SystemTime) -> Option<QuotaObservation>,
) -> ProviderError {
    let now = SystemTime::now();
    let status = response.status().as_u16();
    if response.status().is_redirection() {
        // Not followed (the request carries a key), and not the key's fault. The
        // location is left out: its query may hold a key.
        return ProviderError::new(
            FailureKind::BadRequest,
            format!("the provider answered with a redirect ({status}); check the base url"),
        )
        .with_status(status);
    }
    // Moved out: the body is all that is read from the response afterwards.
    let headers = std::mem::take(response.headers_mut());
    let limits = BodyLimits::of(&response);
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match limits.within(next_chunk(&mut response)).await {
            Ok(Ok(Some(chunk))) => {
                let room = MAX_ERROR_BODY_BYTES - body.len();
                body.extend_from_slice(chunk.get(..room).unwrap_or(&chunk));
            }
            // End of body, a failed read or a stall: classify what arrived.
            Ok(Ok(None) | Err(_)) | Err(_) => break,
        }
    }
    error_from_parts(status, &headers, &body, quota_fn(&headers, now), now)
}

/// The classified error of a response with `status`, `headers` and (the start of)
/// `body`; also used for an error object inside a 200 body or an event stream.
pub fn error_from_parts(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    quota: Option<QuotaObservation>,
    now: SystemTime,
) -> ProviderError {
    let text = String::from_utf8_lossy(body);
    let parsed = serde_json::from_str::<Value>(&text).ok();
    let details = parsed
        .as_ref()
        .map(ErrorDetails::from_json)
        .unwrap_or_default();
    let kind = classify_error(status, &details, &text);
    let message = match (details.label(), &details.message) {
        (Some(label), Some(message)) => format!("{label}: {message}"),
        (None, Some(message)) => message.clone(),
        (Some(label), None) => label.to_owned(),
        (None, None) => fallback_message(status, &text),
    };
    let mut error = ProviderError::new(kind, scrub_message(&message))
        .with_status(status)
        .with_quota(quota);
    if let Some(wait) = retry_after(headers, now).or(details.retry_delay) {
        error = error.with_retry_after(wait);
    }
    error
}

/// What an error body says, in provider-independent fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ErrorDetails {
    /// `error.code` when a string (`insufficient_quota`, `rate_limit_exceeded`).
    code: Option<String>,
    /// `error.type` (`rate_limit_error`, `invalid_request_error`).
    kind: Option<String>,
    /// `error.status` (Gemini: `RESOURCE_EXHAUSTED`).
    status: Option<String>,
    /// The human-readable message.
    message: Option<String>,
    /// Gemini's `RetryInfo.retryDelay`.
    retry_delay: Option<Duration>,
}

impl ErrorDetails {
    fn from_json(value: &Value) -> Self {
        let root = match value {
            Value::Array(items) => items.first().unwrap_or(value),
            _ => value,
        };
        let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
        match root.get("error") {
            Some(error @ Value::Object(_)) => Self {
                code: text(error.get("code")),
                kind: text(error.get("type")),
                status: text(error.get("status")),
                message: text(error.get("message")),
                retry_delay: error
                    .get("details")
                    .and_then(Value::as_array)
                    .and_then(|details| {
                        details.iter().find_map(|detail| {
                            parse_go_duration(detail.get("retryDelay")?.as_str()?)
                        })
                    }),
            },
            Some(Value::String(message)) => Self {
                message: Some(message.clone()),
                code: text(root.get("code")),
                kind: text(root.get("type")),
                ..Self::default()
            },
            _ => Self {
                code: text(root.get("code")),
                kind: text(root.get("type")).filter(|kind| kind != "error"),
                message: text(root.get("message")).or_else(|| text(root.get("detail"))),
                ..Self::default()
            },
        }
    }

    /// The most specific label: code, else status, else type.
    fn label(&self) -> Option<&str> {
        self.code
            .as_deref()
            .or(self.status.as_deref())
            .or(self.kind.as_deref())
    }

    fn tokens(&self) -> impl Iterator<Item = &str> {
        [&self.code, &self.kind, &self.status]
            .into_iter()
            .filter_map(|token| token.as_deref())
    }
}

/// Classifies an error response: provider-specific codes first (they are more precise
/// than the status, and an error inside a 200 body has no useful status), then
/// [`classify_status`].
///
/// - OpenAI: `insufficient_quota` → quota exhausted, `rate_limit_exceeded` → rate
///   limited, `context_length_exceeded` → bad request, `invalid_api_key` → unauthorized;
/// - Anthropic: `overloaded_error` → server error, `rate_limit_error` → rate limited,
///   `authentication_error` / `permission_error` → unauthorized;
/// - Gemini: `RESOURCE_EXHAUSTED` → quota exhausted when the message speaks of an
///   exceeded quota or billing and not of a per-minute window, else rate limited;
///   `UNAUTHENTICATED` / `PERMISSION_DENIED` and `INVALID_ARGUMENT` with reason
///   `API_KEY_INVALID` → unauthorized; other `INVALID_ARGUMENT` → bad request.
///
/// `raw_body` is the body as text, searched for Gemini's reasons and quota ids.
fn classify_error(status: u16, details: &ErrorDetails, raw_body: &str) -> FailureKind {
    for token in details.tokens() {
        let kind = match token {
            "insufficient_quota" | "billing_hard_limit_reached" | "quota_exceeded" => {
                Some(FailureKind::QuotaExhausted)
            }
            "rate_limit_exceeded" | "rate_limit_error" => Some(FailureKind::RateLimited),
            "context_length_exceeded" => Some(FailureKind::BadRequest),
            "overloaded_error" => Some(FailureKind::ServerError),
            "authentication_error"
            | "permission_error"
            | "invalid_api_key"
            | "UNAUTHENTICATED"
            | "PERMISSION_DENIED" => Some(FailureKind::Unauthorized),
            "RESOURCE_EXHAUSTED" => Some(gemini_exhaustion(details, raw_body)),
            "INVALID_ARGUMENT" if raw_body.contains("API_KEY_INVALID") => {
                Some(FailureKind::Unauthorized)
            }
            "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "NOT_FOUND" => {
                Some(FailureKind::BadRequest)
            }
            _ => None,
        };
        if let Some(kind) = kind {
            return kind;
        }
    }
    if (200..300).contains(&status) {
        // An error object inside a success response: only its type can tell.
        return match details.kind.as_deref() {
            Some("invalid_request_error") => FailureKind::BadRequest,
            _ => FailureKind::ServerError,
        };
    }
    classify_status(status, details.code.as_deref())
}

/// Gemini's `RESOURCE_EXHAUSTED` covers both per-minute limits and spent quotas.
fn gemini_exhaustion(details: &ErrorDetails, raw_body: &str) -> FailureKind {
    let message = details
        .message
        .as_deref()
        .unwrap_or_default()
        .to_lowercase();
    let per_minute = raw_body.contains("PerMinute") || message.contains("per minute");
    let quota =
        message.contains("quota") && (message.contains("exceeded") || message.contains("billing"));
    if quota && !per_minute {
        FailureKind::QuotaExhausted
    } else {
        FailureKind::RateLimited
    }
}

/// A message for a body without a recognised error object: the start of the body
/// (HTML pages, plain text), else the status's reason phrase.
fn fallback_message(status: u16, body: &str) -> String {
    let collapsed = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|status| status.canonical_reason())
            .map_or_else(|| "no error message".to_owned(), str::to_lowercase)
    } else {
        collapsed.chars().take(200).collect()
    }
}

/// Masks anything in `message` that looks like an API key (`sk-...`, `AIza...`, or any
/// long run of letters, digits, `-` and `_` mixing letters and digits) down to its
/// last four characters, and truncates to [`MAX_MESSAGE_CHARS`] characters.
pub fn scrub_message(message: &str) -> String {
    let mut scrubbed = String::with_capacity(message.len().min(MAX_MESSAGE_CHARS * 4));
    let mut word = String::new();
    for c in message.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            word.push(c);
            continue;
        }
        push_masked(&mut scrubbed, &word);
        word.clear();
        scrubbed.push(c);
    }
    scrubbed.pop();
    if scrubbed.chars().count() > MAX_MESSAGE_CHARS {
        scrubbed = scrubbed.chars().take(MAX_MESSAGE_CHARS - 3).collect();
        scrubbed.push_str("...");
    }
    scrubbed
}

fn push_masked(out: &mut String, word: &str) {
    const KEY_PREFIXES: [&str; 6] = ["sk-", "sk_", "AIza", "gsk_", "xai-", "key-"];
    let prefixed = word.len() >= 16 && KEY_PREFIXES.iter().any(|p| word.starts_with(p));
    let long_mixed = word.len() >= 32
        && word.bytes().any(|b| b.is_ascii_digit())
        && word.bytes().any(|b| b.is_ascii_alphabetic());
    if prefixed || long_mixed {
        let last4 = word.get(word.len() - 4..).unwrap_or_default();
        out.push_str("[redacted]...");
        out.push_str(last4);
    } else {
        out.push_str(word);
    }
}

/// Replaces every occurrence of `material` in the error's message with `[redacted]`:
/// the last line of defence when a provider echoes the key it was sent.
pub fn redact_key(mut error: ProviderError, material: &KeyMaterial) -> ProviderError {
    let secret = material.expose();
    if !secret.is_empty() && error.message.contains(secret) {
        error.message = error.message.replace(secret, "[redacted]");
    }
    error
}

#[cfg(test)]
pub(super) fn classify_body(status: u16, body: &str) -> FailureKind {
    let details = serde_json::from_str::<Value>(body)
        .ok()
        .as_ref()
        .map(ErrorDetails::from_json)
        .unwrap_or_default();
    classify_error(status, &details, body)
}
