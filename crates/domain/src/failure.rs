//! Classifying provider failures and deciding what they mean for the key and the request.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// What went wrong with one provider call, in provider-independent terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Too many requests or tokens for now (HTTP 429 `rate_limit_exceeded`).
    RateLimited,
    /// The key's quota or credit is used up (`insufficient_quota`, `RESOURCE_EXHAUSTED`
    /// with a quota message).
    QuotaExhausted,
    /// The provider rejected the credentials (401, 403).
    Unauthorized,
    /// The request itself is wrong (400, 404, 413, 422, context too long).
    BadRequest,
    /// The provider failed or is overloaded (5xx, 529).
    ServerError,
    /// No answer in time.
    Timeout,
    /// Connection refused, reset, DNS or TLS failure, truncated body.
    Network,
}

impl FailureKind {
    /// A short, stable label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::QuotaExhausted => "quota_exhausted",
            Self::Unauthorized => "unauthorized",
            Self::BadRequest => "bad_request",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Network => "network",
        }
    }

    /// Whether another key could succeed where this one failed. Bad requests fail
    /// the same way everywhere, so they are not retried.
    pub const fn is_retryable(self) -> bool {
        !matches!(self, Self::BadRequest)
    }
}

/// Classifies an HTTP status with an optional provider error code or type from the body
/// (e.g. `insufficient_quota`, `overloaded_error`, `RESOURCE_EXHAUSTED`).
pub fn classify_status(status: u16, error_code: Option<&str>) -> FailureKind {
    let code = error_code.unwrap_or_default();
    let quota_code = matches!(
        code,
        "insufficient_quota" | "billing_hard_limit_reached" | "quota_exceeded"
    );
    match status {
        429 if quota_code => FailureKind::QuotaExhausted,
        429 => FailureKind::RateLimited,
        401 | 403 => FailureKind::Unauthorized,
        402 => FailureKind::QuotaExhausted,
        408 => FailureKind::Timeout,
        400..=499 => FailureKind::BadRequest,
        504 => FailureKind::Timeout,
        _ => FailureKind::ServerError,
    }
}

/// What to do to the key after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum KeyAction {
    /// Nothing: the failure says nothing about the key.
    None,
    /// Throttle the key until `until`.
    Cooldown {
        /// End of the cooldown.
        until: Timestamp,
    },
    /// Mark the key exhausted until `until`, when it starts recovering.
    Exhaust {
        /// When to try it again.
        until: Timestamp,
    },
    /// Mark the key invalid until an operator re-enables it.
    Invalidate,
}

/// The consequence of a failure: the key action and whether to try elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryAdvice {
    /// What happens to the key.
    pub key_action: KeyAction,
    /// Whether the same request may be sent with another key or provider.
    pub retry_elsewhere: bool,
}

/// Defaults for failure handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailurePolicy {
    /// Cooldown after a 429 without `Retry-After`, doubled on each repeat.
    pub base_cooldown: Duration,
    /// Upper bound of the backoff.
    pub max_cooldown: Duration,
    /// How long an exhausted key rests when the provider gives no reset time.
    pub exhausted_rest: Duration,
    /// Consecutive server errors or timeouts after which a key gets a short cooldown.
    pub failures_before_cooldown: u32,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            base_cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(300),
            exhausted_rest: Duration::from_secs(3_600),
            failures_before_cooldown: 3,
        }
    }
}

impl FailurePolicy {
    /// What a failure of `kind` means for a key that has been rate limited
    /// `throttle_streak` times and has failed `consecutive_failures` times in a row
    /// (both counted before this failure).
    pub fn advise(
        &self,
        kind: FailureKind,
        retry_after: Option<Duration>,
        throttle_streak: u32,
        consecutive_failures: u32,
        now: Timestamp,
    ) -> RetryAdvice {
        let key_action = match kind {
            FailureKind::RateLimited => {
                let backoff = self
                    .base_cooldown
                    .saturating_mul(1u32 << throttle_streak.min(16))
                    .min(self.max_cooldown);
                // The provider's word wins when it gives one.
                KeyAction::Cooldown {
                    until: now.plus(retry_after.unwrap_or(backoff)),
                }
            }
            FailureKind::QuotaExhausted => KeyAction::Exhaust {
                until: now.plus(retry_after.unwrap_or(self.exhausted_rest)),
            },
            FailureKind::Unauthorized => KeyAction::Invalidate,
            FailureKind::BadRequest => KeyAction::None,
            FailureKind::ServerError | FailureKind::Timeout | FailureKind::Network => {
                if consecutive_failures + 1 >= self.failures_before_cooldown {
                    KeyAction::Cooldown {
                        until: now.plus(retry_after.unwrap_or(self.base_cooldown)),
                    }
                } else {
                    KeyAction::None
                }
            }
        };
        RetryAdvice {
            key_action,
            retry_elsewhere: kind.is_retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(classify_status(429, None), FailureKind::RateLimited);
        assert_eq!(
            classify_status(429, Some("insufficient_quota")),
            FailureKind::QuotaExhausted
        );
        assert_eq!(classify_status(401, None), FailureKind::Unauthorized);
        assert_eq!(
            classify_status(400, Some("context_length_exceeded")),
            FailureKind::BadRequest
        );
        assert_eq!(classify_status(500, None), FailureKind::ServerError);
        assert_eq!(classify_status(529, None), FailureKind::ServerError);
        assert_eq!(classify_status(504, None), FailureKind::Timeout);
    }

    #[test]
    fn retry_after_is_honoured_and_backoff_doubles_without_it() {
        let p = FailurePolicy::default();
        let a = p.advise(
            FailureKind::RateLimited,
            Some(Duration::from_secs(42)),
            3,
            0,
            NOW,
        );
        assert_eq!(
            a.key_action,
            KeyAction::Cooldown {
                until: NOW.plus(Duration::from_secs(42))
            }
        );
        let first = p.advise(FailureKind::RateLimited, None, 0, 0, NOW);
        let third = p.advise(FailureKind::RateLimited, None, 2, 0, NOW);
        assert_eq!(
            first.key_action,
            KeyAction::Cooldown {
                until: NOW.plus(Duration::from_secs(5))
            }
        );
        assert_eq!(
            third.key_action,
            KeyAction::Cooldown {
                until: NOW.plus(Duration::from_secs(20))
            }
        );
        let capped = p.advise(FailureKind::RateLimited, None, 30, 0, NOW);
        assert_eq!(
            capped.key_action,
            KeyAction::Cooldown {
                until: NOW.plus(Duration::from_secs(300))
            }
        );
        assert!(first.retry_elsewhere);
    }

    #[test]
    fn bad_requests_are_not_retried_and_auth_invalidates() {
        let p = FailurePolicy::default();
        let bad = p.advise(FailureKind::BadRequest, None, 0, 0, NOW);
        assert_eq!(
            bad,
            RetryAdvice {
                key_action: KeyAction::None,
                retry_elsewhere: false
            }
        );
        let auth = p.advise(FailureKind::Unauthorized, None, 0, 0, NOW);
        assert_eq!(auth.key_action, KeyAction::Invalidate);
        assert!(auth.retry_elsewhere);
    }

    #[test]
    fn repeated_server_errors_cool_the_key_down() {
        let p = FailurePolicy::default();
        assert_eq!(
            p.advise(FailureKind::ServerError, None, 0, 0, NOW)
                .key_action,
            KeyAction::None
        );
        assert!(matches!(
            p.advise(FailureKind::ServerError, None, 0, 2, NOW)
                .key_action,
            KeyAction::Cooldown { .. }
        ));
    }
}
