//! A streamed reply that settles its own accounting: when the stream ends, fails, or
//! is dropped by a caller that went away, usage and cost are settled, the key learns
//! the outcome and the audit record is written, exactly once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use apikeyrouter_domain::cost::TokenEstimate;
use apikeyrouter_domain::{
    Decision, FailureKind, KeyId, ModelId, Money, ProviderId, QuotaObservation, RequestId,
    TokenUsage,
};
use futures_core::Stream;
use tokio::time::Instant;

use super::{Run, Served, learn, millis, write_audit};
use crate::ports::{
    ChatChunk, ChatStream, KeyOutcome, ProviderError, Settlement, StreamStart, Verdict,
};
use crate::records::{AttemptRecord, Outcome};

/// A routed, streaming chat reply. Poll it as a [`Stream`] of [`ChatChunk`]s.
pub struct RoutedStream {
    /// Request id.
    pub request_id: RequestId,
    /// Key serving the stream.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Model streaming.
    pub model: ModelId,
    /// The routing decision.
    pub decision: Decision,
    /// Cost reserved before the call.
    pub estimated_cost: Option<Money>,
    /// Failed attempts before the stream started.
    pub attempts: Vec<AttemptRecord>,
    chunks: ChatStream,
    tally: Option<Tally>,
    ended: bool,
    finishing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for RoutedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutedStream")
            .field("request_id", &self.request_id)
            .field("key_id", &self.key_id)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// What the stream has seen, for settling it.
struct Tally {
    run: Run,
    key_id: KeyId,
    provider: ProviderId,
    model: ModelId,
    quota: Option<QuotaObservation>,
    estimate: TokenEstimate,
    started: Instant,
    usage: Option<TokenUsage>,
    text_bytes: usize,
    failure: Option<ProviderError>,
    cancelled: bool,
    span: tracing::Span,
    on_settled: Option<SettledHook>,
}

/// Called once with a stream's totals when it settles.
type SettledHook = Box<dyn FnOnce(&StreamTotals) + Send>;

/// What a stream used, as settled: when it ended, failed or its caller went away.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamTotals {
    /// Tokens: the provider's count, or, for a stream cut short before it reported
    /// one, the prompt's estimate and the completion's text so far.
    pub usage: TokenUsage,
    /// Their cost, when the model has a price.
    pub cost: Option<Money>,
    /// The caller dropped the stream before its end.
    pub cancelled: bool,
}

impl RoutedStream {
    pub(crate) fn new(
        run: Run,
        served: Served<StreamStart>,
        estimate: TokenEstimate,
        span: tracing::Span,
    ) -> Self {
        let Served {
            output,
            key_id,
            provider,
            model,
            cost_estimate,
            quota,
            ..
        } = served;
        let decision = run
            .decision
            .clone()
            .unwrap_or_else(|| placeholder_decision(&key_id, &provider, &model));
        Self {
            request_id: run.request_id.clone(),
            key_id: key_id.clone(),
            provider: provider.clone(),
            model: model.clone(),
            decision,
            estimated_cost: cost_estimate.cost,
            attempts: run.attempts.clone(),
            chunks: output.chunks,
            tally: Some(Tally {
                run,
                key_id,
                provider,
                model,
                quota,
                estimate,
                started: Instant::now(),
                usage: None,
                text_bytes: 0,
                failure: None,
                cancelled: false,
                span,
                on_settled: None,
            }),
            ended: false,
            finishing: None,
        }
    }

    /// Calls `hook` with the stream's totals once it settles, also when the caller
    /// drops it mid-stream (which settles it in the background): for counters that
    /// must see every stream's tokens and cost.
    #[must_use]
    pub fn on_settled(mut self, hook: impl FnOnce(&StreamTotals) + Send + 'static) -> Self {
        if let Some(tally) = self.tally.as_mut() {
            tally.on_settled = Some(Box::new(hook));
        }
        self
    }

    fn start_finishing(&mut self) {
        if let Some(tally) = self.tally.take() {
            self.finishing = Some(Box::pin(settle(tally)));
        }
    }
}

impl Stream for RoutedStream {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(finishing) = this.finishing.as_mut() {
                return match finishing.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.finishing = None;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            if this.ended {
                if this.tally.is_some() {
                    this.start_finishing();
                    continue;
                }
                return Poll::Ready(None);
            }
            return match this.chunks.as_mut().poll_next(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if let Some(tally) = this.tally.as_mut() {
                        tally.text_bytes += chunk.text.len()
                            + chunk
                                .tool_calls
                                .iter()
                                .map(|c| c.arguments.len())
                                .sum::<usize>();
                        if chunk.usage.is_some() {
                            tally.usage = chunk.usage;
                        }
                    }
                    Poll::Ready(Some(Ok(chunk)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(tally) = this.tally.as_mut() {
                        tally.failure = Some(e.clone());
                    }
                    this.ended = true;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    continue;
                }
            };
        }
    }
}

impl Drop for RoutedStream {
    fn drop(&mut self) {
        if let Some(tally) = self.tally.as_mut() {
            tally.cancelled = !self.ended;
        }
        self.start_finishing();
        if let Some(finishing) = self.finishing.take() {
            // The caller went away mid-stream: settle in the background so the money
            // spent and the audit record are not lost.
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(finishing);
                }
                Err(_) => {
                    tracing::error!(request_id = %self.request_id, "stream dropped outside a runtime; its accounting is lost")
                }
            }
        }
    }
}

async fn settle(tally: Tally) {
    let Tally {
        mut run,
        key_id,
        provider,
        model,
        quota,
        estimate,
        started,
        usage,
        text_bytes,
        failure,
        cancelled,
        span,
        on_settled,
    } = tally;
    let shared = run.shared.clone();
    let now = shared.clock.now();
    let usage = usage.unwrap_or(TokenUsage {
        prompt_tokens: estimate.prompt_tokens,
        completion_tokens: (text_bytes as u64).div_ceil(4),
        cached_tokens: 0,
    });
    // Tokens generated are billed whether or not the stream completed.
    let actual_cost = shared
        .catalogue()
        .price(&provider, &model)
        .map(|p| p.cost(&usage));
    if let Some(hook) = on_settled {
        hook(&StreamTotals {
            usage,
            cost: actual_cost,
            cancelled,
        });
    }
    let latency = started.elapsed();
    let outcome = KeyOutcome {
        verdict: match &failure {
            None => Verdict::Succeeded,
            Some(f) => Verdict::Failed {
                rate_limited: f.kind == FailureKind::RateLimited,
            },
        },
        latency,
        usage,
        cost: actual_cost.unwrap_or(Money::ZERO),
        now,
    };
    // The headers came with the stream's start; they are stored with its settlement
    // so the whole reconciliation stays one store call.
    let settlement = Settlement {
        outcome,
        observation: quota,
    };
    let settled = match run.settling() {
        Some(charge) => shared
            .store
            .settle(charge, &settlement)
            .await
            .map(|s| s.stats),
        None => Ok(None),
    };
    run.held = None;
    let stats = settled.unwrap_or_else(|e| {
        tracing::error!(parent: &span, key_id = %key_id, error = %e, "stream spend not settled");
        None
    });
    learn::learn(&shared, &key_id, &outcome, stats, failure.as_ref()).await;
    run.attempts.push(AttemptRecord {
        key_id: key_id.clone(),
        provider,
        model,
        failure: failure.as_ref().map(|f| f.kind),
        message: failure.as_ref().map(|f| f.message.clone()),
        status: failure.as_ref().and_then(|f| f.status),
        latency_ms: millis(latency),
    });
    let record_outcome = match (&failure, cancelled) {
        (Some(f), _) => Outcome::Failure {
            code: "upstream_stream_error".to_owned(),
            message: f.to_string(),
        },
        (None, true) => Outcome::Failure {
            code: "client_disconnected".to_owned(),
            message: format!("the caller closed the stream after {text_bytes} bytes"),
        },
        (None, false) => Outcome::Success,
    };
    let record = run.take_audit_record(record_outcome, usage, actual_cost, now);
    write_audit(&shared, record);
    tracing::info!(parent: &span, key_id = %key_id, cancelled, failed = failure.is_some(), "stream settled");
}

/// Only reachable if the attempt loop returned without recording its decision, which
/// it never does; keeps the public field non-optional without a panic.
fn placeholder_decision(key_id: &KeyId, provider: &ProviderId, model: &ModelId) -> Decision {
    Decision {
        key_id: key_id.clone(),
        provider: provider.clone(),
        model: model.clone(),
        objective: apikeyrouter_domain::Objective::default().weights,
        score: 0.0,
        metrics: apikeyrouter_domain::routing::KeyMetrics {
            uses: 0,
            success_rate: 0.0,
            latency_ms: 0.0,
            est_cost: None,
        },
        alternatives: Vec::new(),
        ready: 0,
        ineligible: Default::default(),
        at: apikeyrouter_domain::Timestamp::EPOCH,
    }
}
