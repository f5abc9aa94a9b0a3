//! The routing use case: estimate, choose a key, charge quota and budgets, call the
//! provider, learn from the outcome, fail over, and record everything.

use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_domain::budget::ChargeContext;
use apikeyrouter_domain::cost::TokenEstimate;
use apikeyrouter_domain::routing::{Ineligibility, NoEligibleKey, RouteQuery};
use apikeyrouter_domain::{
    BudgetError, BudgetScope, FailureKind, KeyAction, KeyId, KeyState, ModelId, Money, Objective,
    ObjectiveKind, RequestId, RequestIntent, TenantId, Timestamp, TokenUsage, TransitionTrigger,
};
use tokio::time::Instant;
use tracing::Instrument;

use super::core::Shared;
use super::errors::{RouteError, RouteErrorKind};
use super::keys::persist_transitions;
use crate::ports::{Charge, ChargeRejection, KeyOutcome, ProviderCall, ProviderError};
use crate::records::{AttemptRecord, AuditRecord, Outcome, RouteResponse};

/// Caller-supplied context of one request.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// Use this request id instead of generating one (e.g. an incoming `x-request-id`).
    pub request_id: Option<RequestId>,
    /// The caller's correlation id, copied into the audit record.
    pub correlation_id: Option<String>,
}

/// Routes requests.
#[derive(Clone)]
pub struct RouterService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RouterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterService")
    }
}

/// Per-request working state.
struct Run {
    request_id: RequestId,
    attempts: Vec<AttemptRecord>,
    decision: Option<apikeyrouter_domain::Decision>,
    estimated_cost: Option<Money>,
}

const MAX_MESSAGES: usize = 10_000;

impl RouterService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Serves `intent` with the router's default objective.
    ///
    /// # Errors
    /// [`RouteError`] when no key could serve it; see [`RouteErrorKind`].
    pub async fn route_default(&self, intent: RequestIntent) -> Result<RouteResponse, RouteError> {
        let objective = self.shared.settings().objective.clone();
        self.route(intent, &objective, RequestContext::default())
            .await
    }

    /// Serves `intent`, choosing keys by `objective`.
    ///
    /// # Errors
    /// [`RouteError`] when no key could serve it; see [`RouteErrorKind`].
    pub async fn route(
        &self,
        intent: RequestIntent,
        objective: &Objective,
        ctx: RequestContext,
    ) -> Result<RouteResponse, RouteError> {
        let shared = &*self.shared;
        let started_at = shared.clock.now();
        let request_id = ctx.request_id.unwrap_or_else(|| shared.ids.request_id());
        let span = tracing::info_span!(
            "route",
            request_id = %request_id,
            model = %intent.model,
            tenant = intent.tenant.as_ref().map(|t| t.as_str()),
        );
        let mut run = Run {
            request_id,
            attempts: Vec::new(),
            decision: None,
            estimated_cost: None,
        };
        let requested_model = intent.model.clone();
        let tenant = intent.tenant.clone();
        let tags = intent.tags.clone();
        let result = self
            .serve(intent, objective, &mut run)
            .instrument(span.clone())
            .await;

        let finished_at = shared.clock.now();
        let (outcome, usage, actual_cost) = match &result {
            Ok(r) => (Outcome::Success, r.usage, r.actual_cost),
            Err(kind) => (
                Outcome::Failure {
                    code: kind.code().to_owned(),
                    message: kind.to_string(),
                },
                TokenUsage::default(),
                None,
            ),
        };
        let last = run.attempts.last();
        let record = AuditRecord {
            request_id: run.request_id.clone(),
            correlation_id: ctx.correlation_id,
            tenant,
            tags,
            requested_model,
            key_id: last.map(|a| a.key_id.clone()),
            provider: last.map(|a| a.provider.clone()),
            model: last.map(|a| a.model.clone()),
            decision: run.decision.clone(),
            attempts: run.attempts.clone(),
            usage,
            estimated_cost: run.estimated_cost,
            actual_cost,
            outcome,
            started_at,
            finished_at,
        };
        if let Err(e) = shared.audit.record(&record).await {
            tracing::warn!(parent: &span, error = %e, "audit record not accepted");
        }
        if let Err(e) = shared.store.save_request(&record).await {
            tracing::warn!(parent: &span, error = %e, "request record not saved");
        }
        match result {
            Ok(response) => {
                tracing::info!(parent: &span, key_id = %response.key_id, provider = %response.provider, attempts = response.attempts.len(), "request served");
                Ok(response)
            }
            Err(kind) => {
                tracing::warn!(parent: &span, code = kind.code(), error = %kind, "request failed");
                Err(RouteError {
                    request_id: run.request_id,
                    kind,
                    attempts: run.attempts,
                })
            }
        }
    }

    async fn serve(
        &self,
        intent: RequestIntent,
        objective: &Objective,
        run: &mut Run,
    ) -> Result<RouteResponse, RouteErrorKind> {
        let shared = &*self.shared;
        validate(&intent)?;
        let tenant = resolve_tenant(&intent, objective)?;
        let settings = shared.settings();
        let estimate = TokenEstimate::of(&intent);
        let chain = model_chain(&intent, objective, &settings, &estimate);
        if chain.is_empty() {
            return Err(RouteErrorKind::InvalidRequest(format!(
                "model {} is not allowed by the request's constraints",
                intent.model
            )));
        }
        let deadline = Instant::now() + settings.total_deadline;
        let intent = Arc::new(intent);
        let mut tried: Vec<(KeyId, Ineligibility)> = Vec::new();
        let mut any_provider = false;
        let mut last_failure: Option<ProviderError> = None;
        let mut last_no_key: Option<NoEligibleKey> = None;
        let mut budget_block: Option<BudgetError> = None;
        let mut n_attempts = 0u32;

        'models: for model in &chain {
            // A named provider applies to the requested model; fallbacks may leave it.
            let only = intent.provider.as_ref().filter(|_| model == &intent.model);
            let offers = shared.offers(model, only, &estimate);
            if offers.is_empty() {
                continue;
            }
            any_provider = true;
            loop {
                if n_attempts >= settings.max_attempts {
                    break 'models;
                }
                if Instant::now() >= deadline {
                    return Err(RouteErrorKind::DeadlineExceeded(millis(
                        settings.total_deadline,
                    )));
                }
                let now = shared.clock.now();
                let query = RouteQuery {
                    model,
                    tenant: tenant.as_ref(),
                    offers: &offers,
                    exclude: &tried,
                };
                let (choice, woken) = {
                    let mut table = shared.table();
                    let choice = table.choose(&query, objective, now);
                    (choice, table.drain_transitions().collect::<Vec<_>>())
                };
                if !woken.is_empty() {
                    persist_transitions(shared, woken).await;
                }
                let decision = match choice {
                    Ok(d) => d,
                    Err(no_key) => {
                        last_no_key = Some(no_key);
                        continue 'models;
                    }
                };
                let key_id = decision.key_id.clone();
                let Some(key) = shared.key_handle(&key_id) else {
                    // Deleted between the decision and now.
                    tried.push((key_id, Ineligibility::AlreadyTried));
                    continue;
                };
                let Some(provider) = shared.provider(&key.provider) else {
                    tried.push((key_id, Ineligibility::AlreadyTried));
                    continue;
                };
                let cost_estimate = shared.catalogue().estimate(&key.provider, model, &estimate);
                let ctx = ChargeContext {
                    provider: &key.provider,
                    key: &key_id,
                    tenant: tenant.as_ref(),
                    tags: &intent.tags,
                };
                let charge = Charge {
                    reservation: shared.ids.reservation_id(),
                    key_id: key_id.clone(),
                    limits: key.limits,
                    est_tokens: cost_estimate.usage.total(),
                    est_cost: cost_estimate.cost.unwrap_or(Money::ZERO),
                    budget_ids: shared.applicable_budgets(&ctx),
                    now,
                };
                match shared.store.reserve(&charge).await {
                    Ok(()) => {}
                    Err(ChargeRejection::Quota(denial)) => {
                        shared.table().park(&key_id, denial.retry_at);
                        tried.push((key_id, Ineligibility::RateLimited));
                        continue;
                    }
                    Err(ChargeRejection::Budget(err)) => {
                        if !budget_depends_on_key(shared, &err) {
                            return Err(RouteErrorKind::BudgetExceeded(err));
                        }
                        tried.push((key_id, Ineligibility::BudgetExceeded));
                        budget_block = Some(err);
                        continue;
                    }
                    Err(ChargeRejection::Store(e)) => return Err(RouteErrorKind::Store(e)),
                }
                n_attempts += 1;
                run.decision = Some(decision);
                run.estimated_cost = cost_estimate.cost;

                let call = ProviderCall {
                    key_id: key_id.clone(),
                    material: key.material.clone(),
                    model: model.clone(),
                    request: intent.clone(),
                };
                let call_started = Instant::now();
                let budget = settings
                    .attempt_timeout
                    .min(deadline.saturating_duration_since(call_started));
                let result = match tokio::time::timeout(budget, provider.client.chat(call)).await {
                    Ok(result) => result,
                    Err(_) => Err(ProviderError::new(
                        FailureKind::Timeout,
                        format!("no answer within {} ms", millis(budget)),
                    )),
                };
                let latency = call_started.elapsed();
                let done_at = shared.clock.now();
                match result {
                    Ok(answer) => {
                        let usage = answer.usage.unwrap_or_else(|| TokenUsage {
                            prompt_tokens: estimate.prompt_tokens,
                            completion_tokens: (answer.content.len() as u64).div_ceil(4),
                            cached_tokens: 0,
                        });
                        let actual_cost = shared
                            .catalogue()
                            .price(&key.provider, model)
                            .map(|p| p.cost(&usage));
                        let budgets = match shared
                            .store
                            .settle(
                                &charge,
                                usage.total(),
                                actual_cost.unwrap_or(Money::ZERO),
                                done_at,
                            )
                            .await
                        {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!(key_id = %key_id, error = %e, "spend not settled");
                                Vec::new()
                            }
                        };
                        let outcome = KeyOutcome {
                            success: true,
                            rate_limited: false,
                            latency,
                            usage,
                            cost: actual_cost.unwrap_or(Money::ZERO),
                            now: done_at,
                        };
                        self.learn(&key_id, outcome, answer.quota, None).await;
                        run.attempts.push(AttemptRecord {
                            key_id: key_id.clone(),
                            provider: key.provider.clone(),
                            model: model.clone(),
                            failure: None,
                            message: None,
                            status: None,
                            latency_ms: millis(latency),
                        });
                        let Some(decision) = run.decision.clone() else {
                            return Err(RouteErrorKind::InvalidRequest(
                                "internal: decision lost".to_owned(),
                            ));
                        };
                        return Ok(RouteResponse {
                            request_id: run.request_id.clone(),
                            content: answer.content,
                            key_id,
                            provider: key.provider.clone(),
                            model: model.clone(),
                            finish_reason: answer.finish_reason,
                            usage,
                            estimated_cost: cost_estimate.cost,
                            actual_cost,
                            decision,
                            attempts: run.attempts.clone(),
                            budgets,
                        });
                    }
                    Err(failure) => {
                        if let Err(e) = shared.store.release(&charge).await {
                            tracing::warn!(key_id = %key_id, error = %e, "reservation not released");
                        }
                        let outcome = KeyOutcome {
                            success: false,
                            rate_limited: failure.kind == FailureKind::RateLimited,
                            latency,
                            usage: TokenUsage::default(),
                            cost: Money::ZERO,
                            now: done_at,
                        };
                        tracing::info!(key_id = %key_id, kind = failure.kind.as_str(), status = failure.status, "attempt failed");
                        let retry_elsewhere = self
                            .learn(&key_id, outcome, failure.quota, Some(&failure))
                            .await;
                        run.attempts.push(AttemptRecord {
                            key_id: key_id.clone(),
                            provider: key.provider.clone(),
                            model: model.clone(),
                            failure: Some(failure.kind),
                            message: Some(failure.message.clone()),
                            status: failure.status,
                            latency_ms: millis(latency),
                        });
                        if !retry_elsewhere {
                            return Err(RouteErrorKind::Rejected(failure));
                        }
                        tried.push((key_id, Ineligibility::AlreadyTried));
                        last_failure = Some(failure);
                    }
                }
            }
        }

        if !any_provider {
            return Err(RouteErrorKind::UnknownModel {
                model: intent.model.clone(),
            });
        }
        if let Some(last) = last_failure {
            return Err(RouteErrorKind::AttemptsExhausted {
                attempts: n_attempts,
                last,
            });
        }
        if let Some(err) = budget_block {
            return Err(RouteErrorKind::BudgetExceeded(err));
        }
        Err(RouteErrorKind::NoEligibleKey(last_no_key.unwrap_or_else(
            || NoEligibleKey {
                model: intent.model.clone(),
                considered: 0,
                ineligible: Default::default(),
            },
        )))
    }

    /// Updates the key's counters, quota view and state after a call; returns whether
    /// the request may be retried elsewhere.
    async fn learn(
        &self,
        key_id: &KeyId,
        outcome: KeyOutcome,
        quota: Option<apikeyrouter_domain::QuotaObservation>,
        failure: Option<&ProviderError>,
    ) -> bool {
        let shared = &*self.shared;
        let now = outcome.now;
        if let Some(observation) = quota {
            if let Err(e) = shared.store.observe_quota(key_id, observation, now).await {
                tracing::warn!(key_id = %key_id, error = %e, "quota observation not stored");
            }
        }
        let stats = match shared.store.record_outcome(key_id, outcome).await {
            Ok(stats) => {
                shared.table().record_outcome(key_id, &stats);
                Some(stats)
            }
            Err(e) => {
                tracing::warn!(key_id = %key_id, error = %e, "key outcome not recorded");
                None
            }
        };
        let Some(failure) = failure else {
            if shared.table().state(key_id) == Some(KeyState::Recovering) {
                self.transition(
                    key_id,
                    KeyState::Available,
                    TransitionTrigger::ProbeSucceeded,
                    "request succeeded after recovery".to_owned(),
                    None,
                    now,
                )
                .await;
            }
            return true;
        };
        let stats = stats.unwrap_or_default();
        // The counters already include this failure; the policy wants them before it.
        let streak_before = if outcome.rate_limited {
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
                if !self
                    .transition(
                        key_id,
                        KeyState::Throttled,
                        trigger,
                        reason,
                        Some(until),
                        now,
                    )
                    .await
                {
                    // Already throttled by a concurrent request: extend locally.
                    shared.table().park(key_id, until);
                }
            }
            KeyAction::Exhaust { until } => {
                if !self
                    .transition(
                        key_id,
                        KeyState::Exhausted,
                        TransitionTrigger::QuotaExhausted,
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
                self.transition(
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

    /// Records a transition in the store and mirrors it in the table; returns whether
    /// it happened (a concurrent request may have moved the key already).
    async fn transition(
        &self,
        key_id: &KeyId,
        to: KeyState,
        trigger: TransitionTrigger,
        reason: String,
        cooldown_until: Option<Timestamp>,
        now: Timestamp,
    ) -> bool {
        match self
            .shared
            .store
            .transition(key_id, to, trigger, reason, cooldown_until, now)
            .await
        {
            Ok(t) => {
                self.shared.table().set_state(key_id, to, cooldown_until);
                tracing::info!(key_id = %key_id, from = t.from.as_str(), to = to.as_str(), "key state changed");
                true
            }
            Err(e) => {
                tracing::debug!(key_id = %key_id, error = %e, "transition skipped");
                false
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn validate(intent: &RequestIntent) -> Result<(), RouteErrorKind> {
    if intent.model.as_str().trim().is_empty() {
        return Err(RouteErrorKind::InvalidRequest(
            "model must not be empty".to_owned(),
        ));
    }
    if intent.messages.is_empty() {
        return Err(RouteErrorKind::InvalidRequest(
            "messages must not be empty".to_owned(),
        ));
    }
    if intent.messages.len() > MAX_MESSAGES {
        return Err(RouteErrorKind::InvalidRequest(format!(
            "too many messages: {}, at most {MAX_MESSAGES}",
            intent.messages.len()
        )));
    }
    if intent.max_tokens == Some(0) {
        return Err(RouteErrorKind::InvalidRequest(
            "max_tokens must be greater than zero".to_owned(),
        ));
    }
    if let Some(t) = intent.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(RouteErrorKind::InvalidRequest(format!(
                "temperature must be between 0 and 2, got {t}"
            )));
        }
    }
    Ok(())
}

fn resolve_tenant(
    intent: &RequestIntent,
    objective: &Objective,
) -> Result<Option<TenantId>, RouteErrorKind> {
    match (&intent.tenant, &objective.constraints.required_tenant) {
        (Some(a), Some(b)) if a != b => Err(RouteErrorKind::InvalidRequest(format!(
            "request tenant {a} differs from the required tenant {b}"
        ))),
        (a, b) => Ok(a.clone().or_else(|| b.clone())),
    }
}

/// The models to try in order: the (possibly downgraded) model, the requested one if
/// downgraded, then its fallbacks; only those the constraints allow.
fn model_chain(
    intent: &RequestIntent,
    objective: &Objective,
    settings: &super::settings::RouterSettings,
    estimate: &TokenEstimate,
) -> Vec<ModelId> {
    let mut chain = Vec::with_capacity(4);
    if objective.weight(ObjectiveKind::Cost) > 0.0 {
        if let Some(cheaper) = settings
            .downgrades
            .iter()
            .find_map(|r| r.apply(intent, estimate))
        {
            chain.push(cheaper.clone());
        }
    }
    chain.push(intent.model.clone());
    if let Some(fallbacks) = settings.fallbacks.get(&intent.model) {
        for m in fallbacks {
            if !chain.contains(m) {
                chain.push(m.clone());
            }
        }
    }
    chain.retain(|m| objective.constraints.allows_model(m));
    chain
}

/// Whether a refused budget is tied to the key or provider (so another key may fit).
fn budget_depends_on_key(shared: &Shared, err: &BudgetError) -> bool {
    let BudgetError::WouldExceed { id, .. } = err else {
        return false;
    };
    shared
        .budgets()
        .iter()
        .find(|b| &b.id == id)
        .is_some_and(|b| {
            matches!(
                b.scope,
                BudgetScope::Key { .. } | BudgetScope::Provider { .. }
            )
        })
}

#[cfg(test)]
mod tests;
