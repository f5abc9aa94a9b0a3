//! One request's working state, and what happens when its caller drops it unfinished.
//!
//! A caller may drop a routing future at any `.await` (a timeout of its own, a client
//! that hung up). The reservation the request holds would then stay in the store for
//! good, slowly using up a hard budget, and no audit record would say what happened.
//! [`Run`]'s drop settles what it still holds and writes a `caller_cancelled` record.

use std::collections::BTreeMap;
use std::sync::Arc;

use apikeyrouter_domain::{
    Decision, ModelId, Money, ProviderId, RequestId, TenantId, Timestamp, TokenUsage,
};
use tokio::time::Instant;

use super::{millis, write_audit};
use crate::ports::{Charge, ClientLimit, KeyOutcome, Settlement, Verdict};
use crate::records::{AttemptRecord, AuditRecord, Outcome};
use crate::services::core::Shared;

/// Per-request working state, and what its audit record will say.
pub(crate) struct Run {
    pub(crate) shared: Arc<Shared>,
    pub(crate) request_id: RequestId,
    pub(crate) correlation_id: Option<String>,
    pub(crate) tenant: Option<TenantId>,
    pub(crate) tags: BTreeMap<String, String>,
    pub(crate) requested_model: ModelId,
    pub(crate) started_at: Timestamp,
    pub(crate) attempts: Vec<AttemptRecord>,
    pub(crate) decision: Option<Decision>,
    pub(crate) estimated_cost: Option<Money>,
    /// The client's rate limit, until a reservation has counted it.
    pub(crate) client: Option<ClientLimit>,
    /// The reservation in the store not yet settled or released.
    pub(crate) held: Option<Held>,
    /// Set once the audit record is taken; a run dropped before that was cancelled.
    concluded: bool,
}

/// A reservation a request holds, from just before it is asked for until it is
/// settled or released.
pub(crate) struct Held {
    pub(crate) charge: Charge,
    pub(crate) provider: ProviderId,
    pub(crate) model: ModelId,
    pub(crate) phase: Phase,
}

/// Where a held reservation is, which decides what a drop does with it.
pub(crate) enum Phase {
    /// The store is being asked for it: a drop releases it.
    Reserving,
    /// The provider may have been called since this instant: a drop spends the
    /// estimate.
    Calling(Instant),
    /// The store has been asked to settle or release it: a drop leaves it to the
    /// store, since doing it again would count it twice.
    Settling,
}

impl Held {
    /// The charge for the call, before the store has been asked to reserve it.
    pub(crate) fn reserving(charge: Charge, provider: ProviderId, model: ModelId) -> Self {
        Self {
            charge,
            provider,
            model,
            phase: Phase::Reserving,
        }
    }
}

/// The code of the audit record of a request its caller dropped.
pub(crate) const CALLER_CANCELLED: &str = "caller_cancelled";

impl Run {
    pub(crate) fn new(
        shared: Arc<Shared>,
        request_id: RequestId,
        correlation_id: Option<String>,
        client: Option<ClientLimit>,
        requested_model: ModelId,
        tenant: Option<TenantId>,
        tags: BTreeMap<String, String>,
    ) -> Self {
        let started_at = shared.clock.now();
        Self {
            shared,
            request_id,
            correlation_id,
            tenant,
            tags,
            requested_model,
            started_at,
            attempts: Vec::new(),
            decision: None,
            estimated_cost: None,
            client,
            held: None,
            concluded: false,
        }
    }

    /// The charge of the reservation held, if any, about to be settled or released:
    /// from here a drop leaves it to the store. Clear `held` once the store answers.
    pub(crate) fn settling(&mut self) -> Option<&Charge> {
        let held = self.held.as_mut()?;
        held.phase = Phase::Settling;
        Some(&held.charge)
    }

    /// The audit record of the finished request. Moves the decision and attempts out
    /// rather than copying them; the run is spent afterwards.
    pub(crate) fn take_audit_record(
        &mut self,
        outcome: Outcome,
        usage: TokenUsage,
        actual_cost: Option<Money>,
        finished_at: Timestamp,
    ) -> AuditRecord {
        self.concluded = true;
        let last = self.attempts.last();
        let (key_id, provider, model) = (
            last.map(|a| a.key_id.clone()),
            last.map(|a| a.provider.clone()),
            last.map(|a| a.model.clone()),
        );
        AuditRecord {
            request_id: self.request_id.clone(),
            correlation_id: self.correlation_id.take(),
            tenant: self.tenant.take(),
            tags: std::mem::take(&mut self.tags),
            requested_model: self.requested_model.clone(),
            key_id,
            provider,
            model,
            decision: self.decision.take(),
            attempts: std::mem::take(&mut self.attempts),
            usage,
            estimated_cost: self.estimated_cost,
            actual_cost,
            outcome,
            started_at: self.started_at,
            finished_at,
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.concluded {
            return;
        }
        let shared = self.shared.clone();
        let now = shared.clock.now();
        let message = match self.held.take() {
            Some(held) => abandon(&shared, held, now, &mut self.attempts),
            None if self.decision.is_none() => {
                "the caller dropped the request before a provider was called"
            }
            None => "the caller dropped the request after its last provider call was settled",
        }
        .to_owned();
        tracing::warn!(request_id = %self.request_id, "{message}");
        let outcome = Outcome::Failure {
            code: CALLER_CANCELLED.to_owned(),
            message,
        };
        let record = self.take_audit_record(outcome, TokenUsage::default(), None, now);
        write_audit(&shared, record);
    }
}

/// Settles a reservation whose request was dropped, in a task of its own. Before the
/// provider was called it is released (nothing was spent, and if the reserve never
/// reached the store its token windows lose the estimate); once it may have been
/// called, its estimate is spent: the provider may bill the call, and a budget errs
/// towards refusing. Either way the verdict is [`Verdict::Abandoned`], which leaves the
/// key's health counters alone. A settlement already asked of the store is left to
/// it. Returns what the audit record says.
fn abandon(
    shared: &Arc<Shared>,
    held: Held,
    now: Timestamp,
    attempts: &mut Vec<AttemptRecord>,
) -> &'static str {
    let Held {
        charge,
        provider,
        model,
        phase,
    } = held;
    let (spent, latency) = match phase {
        Phase::Settling => {
            return "the caller dropped the request while the store settled its call";
        }
        Phase::Calling(started) => (true, started.elapsed()),
        Phase::Reserving => (false, std::time::Duration::ZERO),
    };
    if spent {
        attempts.push(AttemptRecord {
            key_id: charge.key_id.clone(),
            provider,
            model,
            failure: None,
            message: Some("the caller went away during this call".to_owned()),
            status: None,
            latency_ms: millis(latency),
        });
    }
    let outcome = KeyOutcome {
        verdict: Verdict::Abandoned,
        latency,
        usage: TokenUsage {
            prompt_tokens: if spent { charge.est_tokens } else { 0 },
            completion_tokens: 0,
            cached_tokens: 0,
        },
        cost: if spent { charge.est_cost } else { Money::ZERO },
        now,
    };
    let settlement = Settlement {
        outcome,
        observation: None,
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(key_id = %charge.key_id, "request dropped outside a runtime; its reservation stays held until the reservation lease passes");
        return "the caller dropped the request; its reservation could not be settled and is held until the reservation lease passes";
    };
    let shared = shared.clone();
    runtime.spawn(async move {
        let settled = if spent {
            shared.store.settle(&charge, &settlement).await.map(|_| ())
        } else {
            shared.store.release(&charge, &settlement).await.map(|_| ())
        };
        if let Err(e) = settled {
            tracing::error!(key_id = %charge.key_id, error = %e, "reservation of a dropped request not settled");
        }
    });
    if spent {
        "the caller dropped the request during the provider call; its estimate was charged"
    } else {
        "the caller dropped the request while its reservation was made; it was released"
    }
}
