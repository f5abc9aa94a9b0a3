//! The routing use case: estimate, choose a key, charge quota and budgets, call the
//! provider, learn from the outcome, fail over, and record everything.
//!
//! One attempt loop ([`RouterService::attempt`]) serves chat, streamed chat and
//! embeddings; only the provider call ([`Operation`]) and what happens after a
//! successful call differ.

mod learn;
mod plan;
mod run;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_domain::budget::ChargeContext;
use apikeyrouter_domain::cost::CostEstimate;
use apikeyrouter_domain::routing::{Ineligibility, NoEligibleKey, RouteQuery};
use apikeyrouter_domain::{
    BudgetError, BudgetStatus, EmbeddingIntent, FailureKind, KeyId, KeyMaterial, ModelId, Money,
    Objective, ProviderId, QuotaObservation, RequestId, RequestIntent, TenantId, TokenUsage,
};
use tokio::time::Instant;
use tracing::Instrument;

use super::core::Shared;
use super::errors::{RouteError, RouteErrorKind};
use super::keys::persist_transitions;
use crate::ports::{
    Charge, ChargeRejection, ChatResponse, ClientLimit, EmbeddingCall, EmbeddingResponse,
    KeyOutcome, Provider, ProviderCall, ProviderError, Settled, Settlement, StreamStart, Verdict,
};
use crate::records::{AttemptRecord, AuditRecord, EmbeddingRouteResponse, Outcome, RouteResponse};

pub use stream::{RoutedStream, StreamTotals};

use run::{Held, Phase, Run};

/// Caller-supplied context of one request.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// Use this request id instead of generating one (e.g. an incoming `x-request-id`).
    pub request_id: Option<RequestId>,
    /// The caller's correlation id, copied into the audit record.
    pub correlation_id: Option<String>,
    /// The calling client's rate limit, counted once per request in the store (so
    /// every instance sharing it enforces it together).
    pub client: Option<ClientLimit>,
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

/// Hands a record over for delivery to the audit sink and the request log; never
/// waits for them, never fails the request.
pub(crate) fn write_audit(shared: &Shared, record: AuditRecord) {
    shared.records.submit(record);
}

/// The provider call that differs between chat, streams and embeddings.
pub(crate) trait Operation: Sync {
    type Output: Send;

    fn call(
        &self,
        provider: &Arc<dyn Provider>,
        key_id: KeyId,
        material: KeyMaterial,
        model: ModelId,
    ) -> impl Future<Output = Result<Self::Output, ProviderError>> + Send;

    fn quota(output: &Self::Output) -> Option<QuotaObservation>;
}

struct Chat(Arc<RequestIntent>);
struct ChatStream(Arc<RequestIntent>);
struct Embed(Arc<Vec<String>>, Option<u32>);

impl Operation for Chat {
    type Output = ChatResponse;

    async fn call(
        &self,
        p: &Arc<dyn Provider>,
        key_id: KeyId,
        material: KeyMaterial,
        model: ModelId,
    ) -> Result<ChatResponse, ProviderError> {
        p.chat(ProviderCall {
            key_id,
            material,
            model,
            request: self.0.clone(),
        })
        .await
    }

    fn quota(output: &ChatResponse) -> Option<QuotaObservation> {
        output.quota
    }
}

impl Operation for ChatStream {
    type Output = StreamStart;

    async fn call(
        &self,
        p: &Arc<dyn Provider>,
        key_id: KeyId,
        material: KeyMaterial,
        model: ModelId,
    ) -> Result<StreamStart, ProviderError> {
        p.chat_stream(ProviderCall {
            key_id,
            material,
            model,
            request: self.0.clone(),
        })
        .await
    }

    fn quota(output: &StreamStart) -> Option<QuotaObservation> {
        output.quota
    }
}

impl Operation for Embed {
    type Output = EmbeddingResponse;

    async fn call(
        &self,
        p: &Arc<dyn Provider>,
        key_id: KeyId,
        material: KeyMaterial,
        model: ModelId,
    ) -> Result<EmbeddingResponse, ProviderError> {
        p.embed(EmbeddingCall {
            key_id,
            material,
            model,
            input: self.0.clone(),
            dimensions: self.1,
        })
        .await
    }

    fn quota(output: &EmbeddingResponse) -> Option<QuotaObservation> {
        output.quota
    }
}

/// A call that succeeded, with what is needed to settle it.
pub(crate) struct Served<T> {
    pub(crate) output: T,
    pub(crate) key_id: KeyId,
    pub(crate) provider: ProviderId,
    pub(crate) model: ModelId,
    pub(crate) cost_estimate: CostEstimate,
    pub(crate) latency: Duration,
    /// Rate-limit headers the provider sent, stored when the call is settled.
    pub(crate) quota: Option<QuotaObservation>,
}

const fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl RouterService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn start_run(
        &self,
        ctx: RequestContext,
        model: &ModelId,
        tenant: Option<&TenantId>,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Run {
        Run::new(
            self.shared.clone(),
            ctx.request_id
                .unwrap_or_else(|| self.shared.ids.request_id()),
            ctx.correlation_id,
            ctx.client,
            model.clone(),
            tenant.cloned(),
            tags.clone(),
        )
    }

    fn span(run: &Run) -> tracing::Span {
        tracing::info_span!(
            "route",
            request_id = %run.request_id,
            model = %run.requested_model,
            tenant = run.tenant.as_ref().map(|t| t.as_str()),
        )
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
        let mut run = self.start_run(ctx, &intent.model, intent.tenant.as_ref(), &intent.tags);
        let span = Self::span(&run);
        // Boxed: a future of several KB, which moving into this one's state (and
        // this one into its callers') would copy whole at each step.
        let result = Box::pin(self.serve_chat(intent, objective, &mut run))
            .instrument(span.clone())
            .await;
        conclude(
            &self.shared,
            run,
            result,
            |r| (r.usage, r.actual_cost),
            &span,
        )
    }

    async fn serve_chat(
        &self,
        intent: RequestIntent,
        objective: &Objective,
        run: &mut Run,
    ) -> Result<RouteResponse, RouteErrorKind> {
        plan::validate_chat(&intent)?;
        let plan = plan::Plan::for_chat(&self.shared, &intent, objective)?;
        let op = Chat(Arc::new(intent));
        let served = self.attempt(&plan, objective, run, &op).await?;
        let answer = &served.output;
        let usage = answer.usage.unwrap_or_else(|| TokenUsage {
            prompt_tokens: plan.estimate.prompt_tokens,
            completion_tokens: (answer.content.len() as u64).div_ceil(4),
            cached_tokens: 0,
        });
        let (actual_cost, budgets) = self.settle_success(&served, usage, run).await;
        let Served {
            output: answer,
            key_id,
            provider,
            model,
            cost_estimate,
            ..
        } = served;
        Ok(RouteResponse {
            request_id: run.request_id.clone(),
            content: answer.content,
            tool_calls: answer.tool_calls,
            key_id,
            provider,
            model,
            finish_reason: answer.finish_reason,
            usage,
            estimated_cost: cost_estimate.cost,
            actual_cost,
            decision: run.decision.clone().ok_or_else(lost_decision)?,
            attempts: run.attempts.clone(),
            budgets,
        })
    }

    /// Starts a streamed reply for `intent`. Failures before the provider starts
    /// streaming fail over like any request; once it streams, the key is committed.
    /// Usage, cost and the audit record are settled when the stream ends or is dropped.
    ///
    /// # Errors
    /// [`RouteError`] when no key could start the stream.
    pub async fn route_stream(
        &self,
        intent: RequestIntent,
        objective: &Objective,
        ctx: RequestContext,
    ) -> Result<RoutedStream, RouteError> {
        let mut run = self.start_run(ctx, &intent.model, intent.tenant.as_ref(), &intent.tags);
        let span = Self::span(&run);
        let started = async {
            plan::validate_chat(&intent)?;
            let plan = plan::Plan::for_chat(&self.shared, &intent, objective)?;
            let op = ChatStream(Arc::new(intent));
            let served = self.attempt(&plan, objective, &mut run, &op).await?;
            Ok::<_, RouteErrorKind>((served, plan.estimate))
        }
        .instrument(span.clone())
        .await;
        match started {
            Ok((served, estimate)) => Ok(RoutedStream::new(run, served, estimate, span)),
            Err(kind) => {
                let no_usage = |_: &RoutedStream| (TokenUsage::default(), None);
                conclude(&self.shared, run, Err(kind), no_usage, &span)
            }
        }
    }

    /// Embeds texts with the best key for `objective`.
    ///
    /// # Errors
    /// [`RouteError`] when no key could serve it.
    pub async fn route_embeddings(
        &self,
        intent: EmbeddingIntent,
        objective: &Objective,
        ctx: RequestContext,
    ) -> Result<EmbeddingRouteResponse, RouteError> {
        let mut run = self.start_run(ctx, &intent.model, intent.tenant.as_ref(), &intent.tags);
        let span = Self::span(&run);
        let result = self
            .serve_embeddings(intent, objective, &mut run)
            .instrument(span.clone())
            .await;
        conclude(
            &self.shared,
            run,
            result,
            |r| (r.usage, r.actual_cost),
            &span,
        )
    }

    async fn serve_embeddings(
        &self,
        intent: EmbeddingIntent,
        objective: &Objective,
        run: &mut Run,
    ) -> Result<EmbeddingRouteResponse, RouteErrorKind> {
        plan::validate_embeddings(&intent)?;
        let plan = plan::Plan::for_embeddings(&self.shared, &intent, objective)?;
        let op = Embed(Arc::new(intent.input), intent.dimensions);
        let served = self.attempt(&plan, objective, run, &op).await?;
        let usage = served.output.usage.unwrap_or(TokenUsage {
            prompt_tokens: plan.estimate.prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
        });
        let (actual_cost, budgets) = self.settle_success(&served, usage, run).await;
        let Served {
            output,
            key_id,
            provider,
            model,
            cost_estimate,
            ..
        } = served;
        Ok(EmbeddingRouteResponse {
            request_id: run.request_id.clone(),
            vectors: output.vectors,
            key_id,
            provider,
            model,
            usage,
            estimated_cost: cost_estimate.cost,
            actual_cost,
            decision: run.decision.clone().ok_or_else(lost_decision)?,
            attempts: run.attempts.clone(),
            budgets,
        })
    }

    /// Settles a successful call: actual cost against budgets, key counters, the
    /// attempt record.
    async fn settle_success<T>(
        &self,
        served: &Served<T>,
        usage: TokenUsage,
        run: &mut Run,
    ) -> (Option<Money>, Vec<BudgetStatus>) {
        let shared = &*self.shared;
        let now = shared.clock.now();
        let actual_cost = shared
            .catalogue()
            .price(&served.provider, &served.model)
            .map(|p| p.cost(&usage));
        let outcome = KeyOutcome {
            verdict: Verdict::Succeeded,
            latency: served.latency,
            usage,
            cost: actual_cost.unwrap_or(Money::ZERO),
            now,
        };
        let settlement = Settlement {
            outcome,
            observation: served.quota,
        };
        // Recorded before the store is asked, so a drop from here keeps it.
        run.attempts.push(AttemptRecord {
            key_id: served.key_id.clone(),
            provider: served.provider.clone(),
            model: served.model.clone(),
            failure: None,
            message: None,
            status: None,
            latency_ms: millis(served.latency),
        });
        let settled = match run.settling() {
            Some(charge) => match shared.store.settle(charge, &settlement).await {
                Ok(settled) => settled,
                Err(e) => {
                    tracing::error!(key_id = %served.key_id, error = %e, "spend not settled");
                    Settled::default()
                }
            },
            None => Settled::default(),
        };
        run.held = None;
        learn::learn(shared, &served.key_id, &outcome, settled.stats, None).await;
        (actual_cost, settled.budgets)
    }

    /// Tries keys and fallback models until one call of `op` succeeds, within the
    /// attempt limit and the deadline. Failed attempts are settled here (estimate
    /// released, key updated); the successful one is returned unsettled.
    async fn attempt<O: Operation>(
        &self,
        plan: &plan::Plan,
        objective: &Objective,
        run: &mut Run,
        op: &O,
    ) -> Result<Served<O::Output>, RouteErrorKind> {
        let shared = &*self.shared;
        let (max_attempts, total_deadline, attempt_timeout) = {
            let s = shared.settings();
            (s.max_attempts, s.total_deadline, s.attempt_timeout)
        };
        let deadline = Instant::now() + total_deadline;
        let mut tried: Vec<(KeyId, Ineligibility)> = Vec::new();
        let mut any_provider = false;
        let mut last_failure: Option<ProviderError> = None;
        let mut last_no_key: Option<NoEligibleKey> = None;
        let mut budget_block: Option<BudgetError> = None;
        let mut n_attempts = 0u32;

        'models: for model in &plan.chain {
            let offers = shared.offers(model, plan.only_provider(model), &plan.estimate);
            if offers.is_empty() {
                continue;
            }
            any_provider = true;
            loop {
                if n_attempts >= max_attempts {
                    break 'models;
                }
                if Instant::now() >= deadline {
                    return Err(RouteErrorKind::DeadlineExceeded(millis(total_deadline)));
                }
                let now = shared.clock.now();
                let query = RouteQuery {
                    model,
                    tenant: plan.tenant.as_ref(),
                    offers: &offers,
                    exclude: &tried,
                };
                let (choice, woken) = {
                    let mut table = shared.table();
                    let choice = table.choose(&query, objective, now);
                    (choice, table.drain_transitions().collect::<Vec<_>>())
                };
                // A key woken here that the store had meanwhile moved (disabled, say)
                // is re-read, and the choice made again without it.
                if !woken.is_empty() && persist_transitions(shared, woken).await {
                    continue;
                }
                let decision = match choice {
                    Ok(d) => d,
                    Err(mut no_key) => {
                        // A retry may be served by any model of the chain: the
                        // earliest of their waits is the one to report.
                        if let Some(earlier) = last_no_key.and_then(|k| k.retry_at) {
                            no_key.retry_at =
                                Some(no_key.retry_at.map_or(earlier, |t| t.min(earlier)));
                        }
                        last_no_key = Some(no_key);
                        continue 'models;
                    }
                };
                let key_id = decision.key_id.clone();
                let (Some(key), Some(provider)) = (
                    shared.key_handle(&key_id),
                    shared.provider(&decision.provider),
                ) else {
                    // Deleted between the decision and now.
                    tried.push((key_id, Ineligibility::AlreadyTried));
                    continue;
                };
                let cost_estimate =
                    shared
                        .catalogue()
                        .estimate(&key.provider, model, &plan.estimate);
                let ctx = ChargeContext {
                    provider: &key.provider,
                    key: &key_id,
                    tenant: plan.tenant.as_ref(),
                    tags: &plan.tags,
                };
                let charge = Charge {
                    reservation: shared.ids.reservation_id(),
                    key_id: key_id.clone(),
                    limits: key.limits,
                    est_tokens: cost_estimate.usage.total(),
                    est_cost: cost_estimate.cost.unwrap_or(Money::ZERO),
                    budget_ids: shared.applicable_budgets(&ctx),
                    client: run.client.clone(),
                    now,
                };
                let held =
                    run.held
                        .insert(Held::reserving(charge, key.provider.clone(), model.clone()));
                let reserved = shared.store.reserve(&held.charge).await;
                if let Err(rejection) = reserved {
                    let client = held.charge.client.take();
                    run.held = None;
                    match rejection {
                        ChargeRejection::Client { retry_at } => {
                            let limit = client.unwrap_or(ClientLimit {
                                client: String::new(),
                                rpm: 0,
                            });
                            return Err(RouteErrorKind::ClientRateLimited {
                                client: limit.client,
                                rpm: limit.rpm,
                                retry_at,
                            });
                        }
                        ChargeRejection::Quota(denial) => {
                            shared.table().park(&key_id, denial.retry_at);
                            tried.push((key_id, Ineligibility::RateLimited));
                            continue;
                        }
                        ChargeRejection::Budget(err) => {
                            if !plan::budget_depends_on_key(shared, &err) {
                                return Err(RouteErrorKind::BudgetExceeded(err));
                            }
                            tried.push((key_id, Ineligibility::BudgetExceeded));
                            budget_block = Some(err);
                            continue;
                        }
                        ChargeRejection::Store(e) => return Err(RouteErrorKind::Store(e)),
                    }
                }
                run.client = None;
                n_attempts += 1;
                run.decision = Some(decision);
                run.estimated_cost = cost_estimate.cost;

                let call_started = Instant::now();
                held.phase = Phase::Calling(call_started);
                let timeout = attempt_timeout.min(deadline.saturating_duration_since(call_started));
                let call = op.call(
                    &provider.client,
                    key_id.clone(),
                    key.material.clone(),
                    model.clone(),
                );
                let result = match tokio::time::timeout(timeout, call).await {
                    Ok(result) => result,
                    Err(_) => Err(ProviderError::new(
                        FailureKind::Timeout,
                        format!("no answer within {} ms", millis(timeout)),
                    )),
                };
                let latency = call_started.elapsed();
                match result {
                    Ok(output) => {
                        return Ok(Served {
                            quota: O::quota(&output),
                            output,
                            key_id,
                            provider: key.provider.clone(),
                            model: model.clone(),
                            cost_estimate,
                            latency,
                        });
                    }
                    Err(failure) => {
                        tracing::info!(key_id = %key_id, kind = failure.kind.as_str(), status = failure.status, "attempt failed");
                        let outcome = KeyOutcome {
                            verdict: Verdict::Failed {
                                rate_limited: failure.kind == FailureKind::RateLimited,
                            },
                            latency,
                            usage: TokenUsage::default(),
                            cost: Money::ZERO,
                            now: shared.clock.now(),
                        };
                        let settlement = Settlement {
                            outcome,
                            observation: failure.quota,
                        };
                        run.attempts.push(AttemptRecord {
                            key_id: key_id.clone(),
                            provider: key.provider.clone(),
                            model: model.clone(),
                            failure: Some(failure.kind),
                            message: Some(failure.message.clone()),
                            status: failure.status,
                            latency_ms: millis(latency),
                        });
                        let released = match run.settling() {
                            Some(charge) => shared.store.release(charge, &settlement).await,
                            None => Ok(None),
                        };
                        run.held = None;
                        let stats = released.unwrap_or_else(|e| {
                            tracing::warn!(key_id = %key_id, error = %e, "reservation not released");
                            None
                        });
                        let retry_elsewhere =
                            learn::learn(shared, &key_id, &outcome, stats, Some(&failure)).await;
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
                model: plan.requested_model.clone(),
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
                model: plan.requested_model.clone(),
                considered: 0,
                ineligible: Default::default(),
                retry_at: None,
            },
        )))
    }
}

fn lost_decision() -> RouteErrorKind {
    RouteErrorKind::InvalidRequest("internal error: the routing decision was not kept".to_owned())
}

/// Writes the audit record of a finished request and turns its result into the
/// caller's, logging the outcome once.
fn conclude<T>(
    shared: &Shared,
    mut run: Run,
    result: Result<T, RouteErrorKind>,
    usage_and_cost: impl FnOnce(&T) -> (TokenUsage, Option<Money>),
    span: &tracing::Span,
) -> Result<T, RouteError> {
    let now = shared.clock.now();
    match result {
        Ok(response) => {
            let (usage, cost) = usage_and_cost(&response);
            let attempts = run.attempts.len();
            write_audit(
                shared,
                run.take_audit_record(Outcome::Success, usage, cost, now),
            );
            tracing::info!(parent: span, attempts, "request served");
            Ok(response)
        }
        Err(kind) => {
            let request_id = run.request_id.clone();
            let attempts = run.attempts.clone();
            let outcome = Outcome::Failure {
                code: kind.code().to_owned(),
                message: kind.to_string(),
            };
            write_audit(
                shared,
                run.take_audit_record(outcome, TokenUsage::default(), None, now),
            );
            tracing::warn!(parent: span, code = kind.code(), error = %kind, "request failed");
            Err(RouteError {
                request_id,
                kind,
                attempts,
            })
        }
    }
}

#[cfg(test)]
mod tests;
