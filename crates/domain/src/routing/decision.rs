//! The explanation that comes with every routing decision.
//!
//! A decision records the winner, a few runners-up with why each lost, and counts of
//! each reason keys were ineligible. The full per-key table is built only on request
//! ([`super::RoutingTable::explain`]), which keeps the hot path cheap.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{KeyId, ModelId, ProviderId};
use crate::key::KeyState;
use crate::money::Money;
use crate::time::Timestamp;

use super::objective::ObjectiveWeights;
use super::table::Ineligibility;

/// The per-key figures a decision compared.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyMetrics {
    /// Requests routed to the key so far.
    pub uses: u64,
    /// Recent success rate in `[0, 1]`.
    pub success_rate: f64,
    /// Recent latency in milliseconds (0 before the first sample).
    pub latency_ms: f64,
    /// Estimated cost of this request on the key's provider, if priced.
    pub est_cost: Option<Money>,
}

/// Why a runner-up lost to the winner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// It would cost more.
    HigherCost,
    /// Its recent success rate is lower.
    LowerSuccessRate,
    /// Its recent latency is higher.
    HigherLatency,
    /// It has served more requests.
    MoreUsed,
    /// Its weighted score is lower.
    LowerScore,
    /// Equal on every figure; the stable order decided.
    TieBreak,
}

/// A key that could have served the request but scored lower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alternative {
    /// The key.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Its score in `[0, 1]`; the winner's is the highest.
    pub score: f64,
    /// The figures compared.
    pub metrics: KeyMetrics,
    /// Why it lost.
    pub lost_because: LossReason,
}

/// How many keys were ineligible, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IneligibleCounts {
    /// Throttled (cooling down after a rate limit).
    pub throttled: u32,
    /// Quota exhausted.
    pub exhausted: u32,
    /// Disabled by an operator.
    pub disabled: u32,
    /// Credentials rejected.
    pub invalid: u32,
    /// Our own accounting says its rpm/tpm window is full.
    pub rate_limited: u32,
    /// Does not serve the requested model.
    pub model_not_served: u32,
    /// Its provider is excluded by the constraints.
    pub provider_not_allowed: u32,
    /// Estimated cost above the request's maximum.
    pub over_max_cost: u32,
    /// Success rate below the request's minimum.
    pub below_min_success_rate: u32,
    /// Already tried for this request.
    pub already_tried: u32,
    /// A budget it charges would be exceeded.
    pub budget_exceeded: u32,
}

impl IneligibleCounts {
    /// Adds one key ineligible for `reason`.
    pub fn add(&mut self, reason: Ineligibility, n: u32) {
        let slot = match reason {
            Ineligibility::Throttled => &mut self.throttled,
            Ineligibility::Exhausted => &mut self.exhausted,
            Ineligibility::Disabled => &mut self.disabled,
            Ineligibility::Invalid => &mut self.invalid,
            Ineligibility::RateLimited => &mut self.rate_limited,
            Ineligibility::ModelNotServed => &mut self.model_not_served,
            Ineligibility::ProviderNotAllowed => &mut self.provider_not_allowed,
            Ineligibility::OverMaxCost => &mut self.over_max_cost,
            Ineligibility::BelowMinSuccessRate => &mut self.below_min_success_rate,
            Ineligibility::AlreadyTried => &mut self.already_tried,
            Ineligibility::BudgetExceeded => &mut self.budget_exceeded,
        };
        *slot = slot.saturating_add(n);
    }

    /// Non-zero counts with their reasons.
    pub fn iter(&self) -> impl Iterator<Item = (Ineligibility, u32)> + '_ {
        [
            (Ineligibility::Throttled, self.throttled),
            (Ineligibility::Exhausted, self.exhausted),
            (Ineligibility::Disabled, self.disabled),
            (Ineligibility::Invalid, self.invalid),
            (Ineligibility::RateLimited, self.rate_limited),
            (Ineligibility::ModelNotServed, self.model_not_served),
            (Ineligibility::ProviderNotAllowed, self.provider_not_allowed),
            (Ineligibility::OverMaxCost, self.over_max_cost),
            (
                Ineligibility::BelowMinSuccessRate,
                self.below_min_success_rate,
            ),
            (Ineligibility::AlreadyTried, self.already_tried),
            (Ineligibility::BudgetExceeded, self.budget_exceeded),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
    }

    /// Total ineligible keys.
    pub fn total(&self) -> u32 {
        self.iter().map(|(_, n)| n).sum()
    }
}

/// The routing decision for one attempt, with its explanation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Chosen key.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Model to call.
    pub model: ModelId,
    /// Objective weights (serialized as `fairness`, `cost=0.70,reliability=0.30`).
    pub objective: ObjectiveWeights,
    /// The winner's score in `[0, 1]`.
    pub score: f64,
    /// The winner's figures.
    pub metrics: KeyMetrics,
    /// Up to three runners-up, best first.
    pub alternatives: Vec<Alternative>,
    /// Keys that were ready to serve before per-request filters.
    pub ready: u32,
    /// Ineligible keys by reason (state counts are complete; per-request filters are
    /// counted for the keys inspected).
    pub ineligible: IneligibleCounts,
    /// When it was made.
    pub at: Timestamp,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chose {} ({}, {}) by {}: score {:.3}, {} uses, success {:.0}%",
            self.key_id,
            self.provider,
            self.model,
            self.objective,
            self.score,
            self.metrics.uses,
            self.metrics.success_rate * 100.0
        )?;
        if let Some(cost) = self.metrics.est_cost {
            write!(f, ", est. {cost}")?;
        }
        write!(f, "; {} ready", self.ready)?;
        for alt in &self.alternatives {
            write!(
                f,
                "; {} lost ({:?}, score {:.3})",
                alt.key_id, alt.lost_because, alt.score
            )?;
        }
        for (reason, n) in self.ineligible.iter() {
            write!(f, "; {n} {}", reason.as_str())?;
        }
        Ok(())
    }
}

/// No key could take the request.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("no eligible key for model {model}: {considered} keys considered{}", describe(.ineligible))]
pub struct NoEligibleKey {
    /// Model asked for.
    pub model: ModelId,
    /// Keys looked at (those of the allowed providers and the request's tenant).
    pub considered: u32,
    /// Why each was ineligible.
    pub ineligible: IneligibleCounts,
    /// When the first of the keys now cooling down or over a rate window can serve
    /// again (what a client's retry should wait for); `None` when none is waiting on
    /// a time, e.g. every key is disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
}

fn describe(counts: &IneligibleCounts) -> String {
    counts
        .iter()
        .map(|(r, n)| format!(", {n} {}", r.as_str()))
        .collect()
}

/// One row of the full explanation table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateRow {
    /// The key.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Its state.
    pub state: KeyState,
    /// Why it could not serve, or `None` if it could.
    pub ineligible: Option<Ineligibility>,
    /// Its score if eligible.
    pub score: Option<f64>,
    /// Its figures.
    pub metrics: KeyMetrics,
}
