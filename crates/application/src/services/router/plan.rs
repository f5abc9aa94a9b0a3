//! Before any key is chosen: validation, the tenant, the model chain and the estimate.

use std::collections::BTreeMap;

use apikeyrouter_domain::cost::TokenEstimate;
use apikeyrouter_domain::{
    BudgetError, BudgetScope, EmbeddingIntent, ModelId, Objective, ObjectiveKind, ProviderId,
    RequestIntent, TenantId,
};

use crate::services::core::Shared;
use crate::services::errors::RouteErrorKind;
use crate::services::settings::RouterSettings;

const MAX_MESSAGES: usize = 10_000;
const MAX_EMBEDDING_INPUTS: usize = 2_048;

/// What a request will try, decided once before the attempt loop.
pub(crate) struct Plan {
    /// Models to try, in order.
    pub(crate) chain: Vec<ModelId>,
    pub(crate) requested_model: ModelId,
    /// A provider the caller named for the requested model.
    pub(crate) provider: Option<ProviderId>,
    pub(crate) tenant: Option<TenantId>,
    pub(crate) tags: BTreeMap<String, String>,
    pub(crate) estimate: TokenEstimate,
}

impl Plan {
    pub(crate) fn for_chat(
        shared: &Shared,
        intent: &RequestIntent,
        objective: &Objective,
    ) -> Result<Self, RouteErrorKind> {
        let tenant = resolve_tenant(intent.tenant.as_ref(), objective)?;
        let estimate = TokenEstimate::of(intent);
        let chain = model_chain(intent, objective, &shared.settings(), &estimate);
        Self::new(
            chain,
            intent.model.clone(),
            intent.provider.clone(),
            tenant,
            intent.tags.clone(),
            estimate,
        )
    }

    pub(crate) fn for_embeddings(
        shared: &Shared,
        intent: &EmbeddingIntent,
        objective: &Objective,
    ) -> Result<Self, RouteErrorKind> {
        let tenant = resolve_tenant(intent.tenant.as_ref(), objective)?;
        let mut chain = vec![intent.model.clone()];
        if let Some(fallbacks) = shared.settings().fallbacks.get(&intent.model) {
            chain.extend(fallbacks.iter().filter(|m| **m != intent.model).cloned());
        }
        chain.retain(|m| objective.constraints.allows_model(m));
        let estimate = TokenEstimate::of_texts(&intent.input);
        Self::new(
            chain,
            intent.model.clone(),
            None,
            tenant,
            intent.tags.clone(),
            estimate,
        )
    }

    fn new(
        chain: Vec<ModelId>,
        requested_model: ModelId,
        provider: Option<ProviderId>,
        tenant: Option<TenantId>,
        tags: BTreeMap<String, String>,
        estimate: TokenEstimate,
    ) -> Result<Self, RouteErrorKind> {
        if chain.is_empty() {
            return Err(RouteErrorKind::InvalidRequest(format!(
                "model {requested_model} is not allowed by the request's constraints"
            )));
        }
        Ok(Self {
            chain,
            requested_model,
            provider,
            tenant,
            tags,
            estimate,
        })
    }

    /// The provider `model` must be served by: the named one applies to the requested
    /// model only, fallbacks may leave it.
    pub(crate) fn only_provider(&self, model: &ModelId) -> Option<&ProviderId> {
        self.provider
            .as_ref()
            .filter(|_| *model == self.requested_model)
    }
}

pub(crate) fn validate_chat(intent: &RequestIntent) -> Result<(), RouteErrorKind> {
    let invalid = |m: String| Err(RouteErrorKind::InvalidRequest(m));
    if intent.model.as_str().trim().is_empty() {
        return invalid("model must not be empty".to_owned());
    }
    if intent.messages.is_empty() {
        return invalid("messages must not be empty".to_owned());
    }
    if intent.messages.len() > MAX_MESSAGES {
        return invalid(format!(
            "too many messages: {}, at most {MAX_MESSAGES}",
            intent.messages.len()
        ));
    }
    if intent.max_tokens == Some(0) {
        return invalid("max_tokens must be greater than zero".to_owned());
    }
    if let Some(t) = intent.temperature {
        if !(0.0..=2.0).contains(&t) {
            return invalid(format!("temperature must be between 0 and 2, got {t}"));
        }
    }
    if let Some(p) = intent.top_p {
        if !(0.0..=1.0).contains(&p) {
            return invalid(format!("top_p must be between 0 and 1, got {p}"));
        }
    }
    for (name, penalty) in [
        ("presence_penalty", intent.presence_penalty),
        ("frequency_penalty", intent.frequency_penalty),
    ] {
        if let Some(p) = penalty.filter(|p| !(-2.0..=2.0).contains(p)) {
            return invalid(format!("{name} must be between -2 and 2, got {p}"));
        }
    }
    if let Some(tool) = intent.tools.iter().find(|t| t.name.trim().is_empty()) {
        return invalid(format!(
            "tool name must not be empty (description: {:?})",
            tool.description
        ));
    }
    Ok(())
}

pub(crate) fn validate_embeddings(intent: &EmbeddingIntent) -> Result<(), RouteErrorKind> {
    let invalid = |m: String| Err(RouteErrorKind::InvalidRequest(m));
    if intent.model.as_str().trim().is_empty() {
        return invalid("model must not be empty".to_owned());
    }
    if intent.input.is_empty() {
        return invalid("input must not be empty".to_owned());
    }
    if intent.input.len() > MAX_EMBEDDING_INPUTS {
        return invalid(format!(
            "too many inputs: {}, at most {MAX_EMBEDDING_INPUTS}",
            intent.input.len()
        ));
    }
    if let Some(i) = intent.input.iter().position(String::is_empty) {
        return invalid(format!("input[{i}] is empty"));
    }
    Ok(())
}

pub(crate) fn resolve_tenant(
    tenant: Option<&TenantId>,
    objective: &Objective,
) -> Result<Option<TenantId>, RouteErrorKind> {
    match (tenant, &objective.constraints.required_tenant) {
        (Some(a), Some(b)) if a != b => Err(RouteErrorKind::InvalidRequest(format!(
            "request tenant {a} differs from the required tenant {b}"
        ))),
        (a, b) => Ok(a.cloned().or_else(|| b.clone())),
    }
}

/// The models to try in order: the (possibly downgraded) model, the requested one if
/// downgraded, then its fallbacks; only those the constraints allow.
pub(crate) fn model_chain(
    intent: &RequestIntent,
    objective: &Objective,
    settings: &RouterSettings,
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
pub(crate) fn budget_depends_on_key(shared: &Shared, err: &BudgetError) -> bool {
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
