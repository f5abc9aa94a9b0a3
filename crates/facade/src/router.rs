//! The library's entry point: [`ApiKeyRouter`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use apikeyrouter_application::ports::{Provider, ReclaimedReservations};
use apikeyrouter_application::services::{
    BudgetServiceError, KeyQuota, KeyServiceError, RequestContext, RoutedStream,
};
use apikeyrouter_application::{
    ApiKeyRouterCore, AuditRecord, EmbeddingRouteResponse, ProviderSettings, RegisterKeyError,
    RouteError, RouteResponse,
};
use apikeyrouter_domain::key::KeyInfo;
use apikeyrouter_domain::{
    Budget, BudgetStatus, EmbeddingIntent, KeyId, KeyMetadata, KeyState, Money, Objective,
    ProviderId, RequestId, RequestIntent, StateTransition,
};

use crate::builder::ApiKeyRouterBuilder;

/// Routes LLM requests across keys and providers. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct ApiKeyRouter {
    core: ApiKeyRouterCore,
    /// Ids of the keys the last applied configuration declared.
    config_keys: Arc<Mutex<HashSet<KeyId>>>,
    /// Ids of the budgets the last applied configuration declared.
    config_budgets: Arc<Mutex<HashSet<String>>>,
}

impl ApiKeyRouter {
    /// Starts configuring a router.
    pub fn builder() -> ApiKeyRouterBuilder {
        ApiKeyRouterBuilder::default()
    }

    pub(crate) fn from_core(core: ApiKeyRouterCore) -> Self {
        Self {
            core,
            config_keys: Arc::default(),
            config_budgets: Arc::default(),
        }
    }

    /// Records the keys a configuration declares, returning those of the previous one.
    pub(crate) fn take_config_keys(&self, keys: HashSet<KeyId>) -> HashSet<KeyId> {
        replace_locked(&self.config_keys, keys)
    }

    /// Records the budgets a configuration declares, returning those of the previous
    /// one.
    pub(crate) fn take_config_budgets(&self, budgets: HashSet<String>) -> HashSet<String> {
        replace_locked(&self.config_budgets, budgets)
    }

    /// The assembled services, for hosts such as the proxy.
    pub fn core(&self) -> &ApiKeyRouterCore {
        &self.core
    }

    /// Registers (or replaces) a provider; it serves its default models.
    pub fn register_provider(&self, id: impl Into<ProviderId>, provider: Arc<dyn Provider>) {
        self.core
            .register_provider(id.into(), provider, ProviderSettings::default());
    }

    /// Registers a provider serving the listed models (or its defaults when `None`).
    pub fn register_provider_with(
        &self,
        id: impl Into<ProviderId>,
        provider: Arc<dyn Provider>,
        settings: ProviderSettings,
    ) {
        self.core.register_provider(id.into(), provider, settings);
    }

    /// Registers a key. Returns its description with the material masked.
    ///
    /// # Errors
    /// [`RegisterKeyError`] for an unknown provider, malformed material or metadata,
    /// or material already registered; nothing changes then.
    pub async fn register_key(
        &self,
        material: &str,
        provider: impl Into<ProviderId>,
        metadata: KeyMetadata,
    ) -> Result<KeyInfo, RegisterKeyError> {
        self.core
            .keys()
            .register(material, &provider.into(), metadata)
            .await
    }

    /// Serves `intent`, choosing keys by `objective`.
    ///
    /// Dropping the future before it finishes (a caller's own timeout) is safe: a
    /// reservation still being made is released, the estimate of a call that may
    /// have reached the provider is charged (a settlement already under way is left
    /// to the store), and the request is audited as `caller_cancelled`. The same
    /// holds for [`Self::route_stream`] and [`Self::embed`].
    ///
    /// # Errors
    /// [`RouteError`] when no eligible key could serve it, with a precise reason.
    pub async fn route(
        &self,
        intent: RequestIntent,
        objective: impl Into<Objective>,
    ) -> Result<RouteResponse, RouteError> {
        self.core
            .router()
            .route(intent, &objective.into(), RequestContext::default())
            .await
    }

    /// Serves `intent` with a caller-supplied request id or correlation id.
    ///
    /// # Errors
    /// As [`Self::route`].
    pub async fn route_with(
        &self,
        intent: RequestIntent,
        objective: &Objective,
        ctx: RequestContext,
    ) -> Result<RouteResponse, RouteError> {
        self.core.router().route(intent, objective, ctx).await
    }

    /// Starts a streamed reply; usage, cost and audit settle when the stream ends or
    /// is dropped.
    ///
    /// # Errors
    /// As [`Self::route`], for failures before the stream starts.
    pub async fn route_stream(
        &self,
        intent: RequestIntent,
        objective: impl Into<Objective>,
    ) -> Result<RoutedStream, RouteError> {
        self.core
            .router()
            .route_stream(intent, &objective.into(), RequestContext::default())
            .await
    }

    /// Embeds texts with the best key for `objective`.
    ///
    /// # Errors
    /// As [`Self::route`].
    pub async fn embed(
        &self,
        intent: EmbeddingIntent,
        objective: impl Into<Objective>,
    ) -> Result<EmbeddingRouteResponse, RouteError> {
        self.core
            .router()
            .route_embeddings(intent, &objective.into(), RequestContext::default())
            .await
    }

    /// Serves `intent` with the configured default objective.
    ///
    /// # Errors
    /// As [`Self::route`].
    pub async fn route_default(&self, intent: RequestIntent) -> Result<RouteResponse, RouteError> {
        self.core.router().route_default(intent).await
    }

    /// Every key, material masked.
    ///
    /// # Errors
    /// A store failure.
    pub async fn keys(&self) -> Result<Vec<KeyInfo>, KeyServiceError> {
        self.core.keys().list().await
    }

    /// One key.
    ///
    /// # Errors
    /// Not found, or a store failure.
    pub async fn key(&self, id: &KeyId) -> Result<KeyInfo, KeyServiceError> {
        self.core.keys().get(id).await
    }

    /// Disables a key or makes it available again.
    ///
    /// # Errors
    /// A state that cannot be set by hand, a forbidden transition, not found, or a store failure.
    pub async fn set_key_state(
        &self,
        id: &KeyId,
        state: KeyState,
        reason: &str,
    ) -> Result<StateTransition, KeyServiceError> {
        self.core.keys().set_state(id, state, reason).await
    }

    /// Replaces a key's metadata.
    ///
    /// # Errors
    /// Invalid metadata, not found, or a store failure.
    pub async fn update_key_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<KeyInfo, KeyServiceError> {
        self.core.keys().update_metadata(id, metadata).await
    }

    /// Removes a key.
    ///
    /// # Errors
    /// Not found, or a store failure.
    pub async fn delete_key(&self, id: &KeyId) -> Result<(), KeyServiceError> {
        self.core.keys().delete(id).await
    }

    /// A key's state transitions, oldest first.
    ///
    /// # Errors
    /// Not found, or a store failure.
    pub async fn key_transitions(
        &self,
        id: &KeyId,
    ) -> Result<Vec<StateTransition>, KeyServiceError> {
        self.core.keys().transitions(id).await
    }

    /// A key's quota state and exhaustion prediction.
    ///
    /// # Errors
    /// Not found, or a store failure.
    pub async fn quota(&self, id: &KeyId) -> Result<KeyQuota, KeyServiceError> {
        self.core.quota().key_quota(id).await
    }

    /// Adds or replaces a budget.
    ///
    /// # Errors
    /// A store failure.
    pub async fn add_budget(&self, budget: Budget) -> Result<BudgetStatus, BudgetServiceError> {
        self.core.budgets().put(budget, Money::ZERO).await
    }

    /// Adds or replaces a budget that already spent `spent` this period.
    ///
    /// # Errors
    /// A store failure.
    pub async fn add_budget_with_spend(
        &self,
        budget: Budget,
        spent: Money,
    ) -> Result<BudgetStatus, BudgetServiceError> {
        self.core.budgets().put(budget, spent).await
    }

    /// The models a request of `tenant` can be routed to, with the provider serving
    /// each (see [`ApiKeyRouterCore::served_models`]).
    ///
    /// # Errors
    /// A store failure.
    pub async fn served_models(
        &self,
        tenant: Option<&crate::TenantId>,
    ) -> Result<Vec<(crate::ModelId, crate::ProviderId)>, crate::StoreError> {
        self.core.served_models(tenant).await
    }

    /// Removes a budget.
    ///
    /// # Errors
    /// Not found, or a store failure.
    pub async fn delete_budget(&self, id: &str) -> Result<(), BudgetServiceError> {
        self.core.budgets().remove(id).await
    }

    /// Gives back now the budget reservations held longer than
    /// `RouterSettings::reservation_lease`, left by an instance that stopped between
    /// reserve and settle; returns what each budget gave back. The router also does
    /// this by itself about once a minute.
    ///
    /// # Errors
    /// A store failure.
    pub async fn reclaim_stale_reservations(
        &self,
    ) -> Result<Vec<ReclaimedReservations>, BudgetServiceError> {
        self.core.budgets().reclaim_stale().await
    }

    /// Every budget's status.
    ///
    /// # Errors
    /// A store failure.
    pub async fn budgets(&self) -> Result<Vec<BudgetStatus>, BudgetServiceError> {
        self.core.budgets().list().await
    }

    /// The decision and audit record of a past request.
    ///
    /// # Errors
    /// A store failure.
    pub async fn request(
        &self,
        id: &RequestId,
    ) -> Result<Option<AuditRecord>, apikeyrouter_application::ports::StoreError> {
        self.core.request(id).await
    }

    /// Waits until the audit sink and the request log hold the records of every
    /// request finished so far (they are written in the background), or until
    /// `timeout`; returns whether they do. Call it before shutting down.
    pub async fn flush_records(&self, timeout: std::time::Duration) -> bool {
        self.core.flush_records(timeout).await
    }

    /// Whether the store is degraded (fail-open on local limits) and how many
    /// operations it served locally.
    pub fn store_health(&self) -> crate::StoreHealth {
        self.core.store_health()
    }

    /// Counters of the background audit delivery: pending, delivered, dropped
    /// (queue full), rejected and retried.
    pub fn record_delivery(&self) -> crate::DeliveryStats {
        self.core.record_delivery()
    }

    /// What this router's sweeps gave back of budget reservations held longer than
    /// the lease, since it started (a rising count means instances stop between
    /// reserve and settle).
    pub fn reclaimed_reservations(&self) -> crate::domain::Reclaimed {
        self.core.reclaimed_reservations()
    }
}

fn replace_locked<T>(slot: &Mutex<T>, value: T) -> T {
    std::mem::replace(
        &mut *slot.lock().unwrap_or_else(PoisonError::into_inner),
        value,
    )
}
