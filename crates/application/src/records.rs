//! What the router returns and what it records about each request.

use std::collections::BTreeMap;

use apikeyrouter_domain::{
    BudgetStatus, Decision, FailureKind, KeyId, ModelId, Money, ProviderId, RequestId, TenantId,
    Timestamp, TokenUsage, ToolCall,
};
use serde::{Deserialize, Serialize};

use crate::ports::FinishReason;

/// One attempt at serving a request with one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Key used.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Model called.
    pub model: ModelId,
    /// `None` on success, else the failure kind.
    pub failure: Option<FailureKind>,
    /// Provider's message on failure (never key material).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// HTTP status on failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Time spent.
    pub latency_ms: u64,
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Served.
    Success,
    /// Not served.
    Failure {
        /// Stable error code (`no_eligible_key`, `budget_exceeded`, `rate_limited`, ...).
        code: String,
        /// What went wrong.
        message: String,
    },
}

/// The audit record of one request: who asked, what was decided, what it cost, how it
/// ended. Never key material; never message content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Request id.
    pub request_id: RequestId,
    /// Caller's correlation id, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Request tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Model asked for.
    pub requested_model: ModelId,
    /// Key that served it (the last attempt's key on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
    /// Its provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderId>,
    /// Model that served it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelId>,
    /// The last routing decision, with its explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Every attempt in order.
    pub attempts: Vec<AttemptRecord>,
    /// Tokens used.
    pub usage: TokenUsage,
    /// Estimated cost reserved before the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<Money>,
    /// Actual cost from reported usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_cost: Option<Money>,
    /// How it ended.
    pub outcome: Outcome,
    /// When it arrived.
    pub started_at: Timestamp,
    /// When it was answered.
    pub finished_at: Timestamp,
}

/// A served request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteResponse {
    /// Request id (also in the audit record).
    pub request_id: RequestId,
    /// Assistant text.
    pub content: String,
    /// Tool calls the model made.
    pub tool_calls: Vec<ToolCall>,
    /// Key that served it.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Model that served it (after fallback or downgrade).
    pub model: ModelId,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Tokens used (reported, or estimated when the provider reported none).
    pub usage: TokenUsage,
    /// Cost estimated before the call (`None` when the model has no price).
    pub estimated_cost: Option<Money>,
    /// Cost from reported usage (`None` when the model has no price).
    pub actual_cost: Option<Money>,
    /// The routing decision that picked the key, with its explanation.
    pub decision: Decision,
    /// Every attempt, the last one successful.
    pub attempts: Vec<AttemptRecord>,
    /// Status of each budget the request counted against, after it.
    pub budgets: Vec<BudgetStatus>,
}

impl RouteResponse {
    /// The lowest remaining amount among the budgets that applied, if any.
    pub fn budget_remaining(&self) -> Option<Money> {
        lowest_remaining(&self.budgets)
    }
}

/// A served embeddings request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRouteResponse {
    /// Request id.
    pub request_id: RequestId,
    /// One vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Key that served it.
    pub key_id: KeyId,
    /// Its provider.
    pub provider: ProviderId,
    /// Model that served it.
    pub model: ModelId,
    /// Tokens used.
    pub usage: TokenUsage,
    /// Cost estimated before the call.
    pub estimated_cost: Option<Money>,
    /// Cost from reported usage.
    pub actual_cost: Option<Money>,
    /// The routing decision.
    pub decision: Decision,
    /// Every attempt, the last one successful.
    pub attempts: Vec<AttemptRecord>,
    /// Status of each budget the request counted against, after it.
    pub budgets: Vec<BudgetStatus>,
}

impl EmbeddingRouteResponse {
    /// The lowest remaining amount among the budgets that applied, if any.
    pub fn budget_remaining(&self) -> Option<Money> {
        lowest_remaining(&self.budgets)
    }
}

/// The lowest remaining amount among `budgets`, if any.
fn lowest_remaining(budgets: &[BudgetStatus]) -> Option<Money> {
    budgets.iter().map(|b| b.remaining).min()
}
