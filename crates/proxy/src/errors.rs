//! Errors as OpenAI-shaped JSON: `{"error": {"message", "type", "param", "code"}}`.
//!
//! 5xx bodies say what failed in stable terms and reveal nothing internal; the detail
//! goes to the log, once, with a low-cardinality code.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use apikeyrouter::{RouteError, RouteErrorKind};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// Stable code, also the metrics label.
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub request_id: Option<String>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            request_id: None,
            retry_after_secs: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message,
        )
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// The answer for a request the router could not serve.
    pub fn from_route(err: &RouteError) -> Self {
        let e = match &err.kind {
            RouteErrorKind::InvalidRequest(m) => Self::bad_request("invalid_request", m.clone()),
            RouteErrorKind::UnknownModel { model } => Self::not_found(
                "model_not_found",
                format!("The model `{model}` does not exist or no configured provider serves it."),
            )
            .with_param("model"),
            RouteErrorKind::NoEligibleKey(no_key) => {
                let busy = no_key.ineligible.throttled
                    + no_key.ineligible.exhausted
                    + no_key.ineligible.rate_limited
                    + no_key.ineligible.already_tried;
                // The counts are the last model's of a fallback chain; a wait known
                // for any model of it makes the request one to retry too.
                if busy > 0 || no_key.retry_at.is_some() {
                    let mut e = Self::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "no_eligible_key",
                        no_key.to_string(),
                    );
                    e.retry_after_secs = Some(
                        no_key
                            .retry_at
                            .map_or(1, |at| secs_until(at).min(MAX_KEY_WAIT_SECS)),
                    );
                    e
                } else {
                    Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service_unavailable",
                        "no_eligible_key",
                        no_key.to_string(),
                    )
                }
            }
            RouteErrorKind::BudgetExceeded(b) => Self::forbidden("budget_exceeded", b.to_string()),
            RouteErrorKind::ClientRateLimited {
                client,
                rpm,
                retry_at,
            } => {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    format!("Rate limit of {rpm} requests per minute reached for client {client}."),
                );
                e.retry_after_secs = Some(secs_until(*retry_at));
                e
            }
            RouteErrorKind::Rejected(p) => Self::bad_request(
                "provider_rejected_request",
                format!("The provider rejected the request: {}", p.message),
            ),
            // Every key tried answered 429: no key can serve now, as when all are
            // cooling down before the request (below), so the client sees the same.
            RouteErrorKind::AttemptsExhausted { attempts, last }
                if !err.attempts.is_empty()
                    && err
                        .attempts
                        .iter()
                        .all(|a| a.failure == Some(apikeyrouter::FailureKind::RateLimited)) =>
            {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "upstream_rate_limited",
                    format!(
                        "Every key tried ({attempts}) is rate limited by its provider; retry later."
                    ),
                );
                e.retry_after_secs = Some(
                    last.retry_after
                        .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                        .max(1),
                );
                e
            }
            RouteErrorKind::AttemptsExhausted { attempts, last } => {
                let status = if last.kind == apikeyrouter::FailureKind::Timeout {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                let http = last.status.map_or(String::new(), |s| format!(", HTTP {s}"));
                Self::new(
                    status,
                    "api_error",
                    "upstream_failed",
                    format!(
                        "Upstream providers failed after {attempts} attempts (last: {}{http}).",
                        last.kind.as_str()
                    ),
                )
            }
            RouteErrorKind::DeadlineExceeded(ms) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "api_error",
                "deadline_exceeded",
                format!("The request did not complete within {ms} ms."),
            ),
            RouteErrorKind::Store(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "store_unavailable",
                "The router's state store is unavailable; try again shortly.",
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "internal_error",
                "Internal error.",
            ),
        };
        e.with_request_id(err.request_id.to_string())
    }
}

/// The longest `Retry-After` for `no_eligible_key`: a key exhausted until next month
/// must not park a client for weeks when an operator may add or re-enable a key
/// within minutes.
const MAX_KEY_WAIT_SECS: u64 = 60;

/// Whole seconds from now until `at` for a `Retry-After`, rounded up and at least 1
/// (a client told 0 would retry at once).
fn secs_until(at: apikeyrouter::Timestamp) -> u64 {
    secs_between(apikeyrouter::Clock::now(&apikeyrouter::SystemClock), at)
}

fn secs_between(now: apikeyrouter::Timestamp, at: apikeyrouter::Timestamp) -> u64 {
    at.as_millis()
        .saturating_sub(now.as_millis())
        .div_ceil(1000)
        .max(1)
}

impl IntoResponse for ApiError {
    /// The answer; it is logged by the request counter (`count_requests`), which
    /// knows the endpoint and gives an id to refusals that have none yet.
    fn into_response(self) -> Response {
        let details = ErrorDetails {
            code: self.code,
            message: self.message.clone(),
        };
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(id) = self
            .request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert(crate::openai::headers::REQUEST_ID, id);
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(details);
        response
    }
}

/// What went wrong with an answer, for the request counter's metrics and log line.
#[derive(Clone, Debug)]
pub struct ErrorDetails {
    /// The error code, as in the body.
    pub code: &'static str,
    /// The message, as in the body.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use apikeyrouter::domain::routing::{IneligibleCounts, NoEligibleKey};
    use apikeyrouter::{ModelId, RequestId, Timestamp};

    use super::*;

    #[test]
    fn waits_round_up_to_whole_seconds_of_at_least_one() {
        let now = Timestamp::from_millis(1_000_000);
        for (later_ms, secs) in [(0, 1), (1, 1), (1_000, 1), (1_001, 2), (59_999, 60)] {
            assert_eq!(
                secs_between(now, now.plus(std::time::Duration::from_millis(later_ms))),
                secs,
                "{later_ms}"
            );
        }
        assert_eq!(secs_between(now, Timestamp::from_millis(5)), 1);
    }

    fn no_key(ineligible: IneligibleCounts, retry_in_secs: Option<u64>) -> ApiError {
        let now = apikeyrouter::Clock::now(&apikeyrouter::SystemClock);
        ApiError::from_route(&RouteError {
            request_id: RequestId::new("req-1"),
            kind: RouteErrorKind::NoEligibleKey(NoEligibleKey {
                model: ModelId::new("m"),
                considered: 1,
                ineligible,
                retry_at: retry_in_secs.map(|s| now.plus(std::time::Duration::from_secs(s))),
            }),
            attempts: Vec::new(),
        })
    }

    /// The last model of a chain has only disabled keys, an earlier one a key cooling
    /// down: the client is told to retry when that one is back, at most a minute on.
    #[test]
    fn a_known_wait_makes_no_eligible_key_a_429_with_its_retry_after() {
        let disabled = IneligibleCounts {
            disabled: 1,
            ..IneligibleCounts::default()
        };
        let e = no_key(disabled, Some(30));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            matches!(e.retry_after_secs, Some(29..=30)),
            "{:?}",
            e.retry_after_secs
        );
        let e = no_key(disabled, Some(40 * 86_400));
        assert_eq!(e.retry_after_secs, Some(MAX_KEY_WAIT_SECS));
        let e = no_key(disabled, None);
        assert_eq!(
            (e.status, e.retry_after_secs),
            (StatusCode::SERVICE_UNAVAILABLE, None)
        );
    }
}
