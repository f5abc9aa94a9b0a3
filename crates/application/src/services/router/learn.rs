//! After a call: update the key's counters, quota view and state from the outcome.

use apikeyrouter_domain::{
    FailureKind, KeyAction, KeyId, KeyState, KeyStats, Timestamp, TransitionTrigger,
};

use crate::ports::{KeyOutcome, ProviderError, StoreErrorKind};
use crate::services::core::{Shared, refresh_key};

/// Updates the key's routing view and state after a call, from the counters the
/// store's `settle` or `release` returned (`None` when they were not updated);
/// returns whether the request may be retried elsewhere.
pub(crate) async fn learn(
    shared: &Shared,
    key_id: &KeyId,
    outcome: &KeyOutcome,
    stats: Option<KeyStats>,
    failure: Option<&ProviderError>,
) -> bool {
    let now = outcome.now;
    if let Some(stats) = &stats {
        shared.table().record_outcome(key_id, stats);
    }
    let Some(failure) = failure else {
        if shared.table().state(key_id) == Some(KeyState::Recovering) {
            let reason = "request succeeded after recovery".to_owned();
            transition(
                shared,
                key_id,
                KeyState::Available,
                TransitionTrigger::ProbeSucceeded,
                reason,
                None,
                now,
            )
            .await;
        }
        return true;
    };
    let stats = stats.unwrap_or_default();
    // The counters already include this failure; the policy wants them before it.
    let streak_before = if outcome.verdict.rate_limited() {
        stats.throttle_streak.saturating_sub(1)
    } else {
        stats.throttle_streak
    };
    let advice = shared.settings().failure_policy.advise(
        failure.kind,
        failure.retry_after,
        streak_before,
        stats.consecutive_failures.saturating_sub(1),
        now,
    );
    let reason = failure.to_string();
    match advice.key_action {
        KeyAction::None => {}
        KeyAction::Cooldown { until } => {
            let trigger = if failure.kind == FailureKind::RateLimited {
                TransitionTrigger::RateLimited
            } else {
                TransitionTrigger::RepeatedFailures
            };
            if !transition(
                shared,
                key_id,
                KeyState::Throttled,
                trigger,
                reason,
                Some(until),
                now,
            )
            .await
            {
                // Already throttled by a concurrent request: keep it out locally.
                shared.table().park(key_id, until);
            }
        }
        KeyAction::Exhaust { until } => {
            let trigger = TransitionTrigger::QuotaExhausted;
            if !transition(
                shared,
                key_id,
                KeyState::Exhausted,
                trigger,
                reason,
                Some(until),
                now,
            )
            .await
            {
                shared.table().park(key_id, until);
            }
        }
        KeyAction::Invalidate => {
            transition(
                shared,
                key_id,
                KeyState::Invalid,
                TransitionTrigger::AuthFailure,
                reason,
                None,
                now,
            )
            .await;
        }
    }
    advice.retry_elsewhere
}

/// Records a transition in the store and mirrors it in the table; returns whether it
/// happened (a concurrent request may have moved the key already).
pub(crate) async fn transition(
    shared: &Shared,
    key_id: &KeyId,
    to: KeyState,
    trigger: TransitionTrigger,
    reason: String,
    cooldown_until: Option<Timestamp>,
    now: Timestamp,
) -> bool {
    match shared
        .store
        .transition(key_id, to, trigger, reason, cooldown_until, now)
        .await
    {
        Ok(t) => {
            shared.set_key_state(key_id, to, cooldown_until);
            tracing::info!(key_id = %key_id, from = t.from.as_str(), to = to.as_str(), "key state changed");
            true
        }
        Err(e) => {
            tracing::debug!(key_id = %key_id, error = %e, "transition skipped");
            // The key moved meanwhile. When a concurrent request here made the same
            // move, the table holds it already; otherwise (an operator, another
            // instance) the table takes the store's state.
            if e.kind == StoreErrorKind::Invalid && shared.table().state(key_id) != Some(to) {
                refresh_key(shared, key_id).await;
            }
            false
        }
    }
}
