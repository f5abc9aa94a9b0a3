//! Assembles an [`ApiKeyRouter`] from a store, an audit sink, a clock, providers and
//! settings, with sensible defaults for each.

use std::sync::Arc;

use apikeyrouter_adapters_stores::StoreConfig;
use apikeyrouter_application::ports::{
    AuditSink, Clock, Provider, StateStore, StoreError, SystemClock,
};
use apikeyrouter_application::{ApiKeyRouterCore, ProviderSettings, RouterSettings};
use apikeyrouter_domain::cost::DowngradeRule;
use apikeyrouter_domain::{ModelId, ModelPrice, Objective, PriceCatalogue, ProviderId};
use apikeyrouter_observability::DiscardAuditSink;
use thiserror::Error;

use crate::router::ApiKeyRouter;

/// Building the router failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The store could not be opened or read.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Setting(String),
}

/// Configures an [`ApiKeyRouter`]. Defaults: the in-memory store, no audit output
/// (records stay queryable by request id), the system clock, the built-in price
/// catalogue, fairness routing with three attempts.
#[must_use]
pub struct ApiKeyRouterBuilder {
    store: Option<Arc<dyn StateStore>>,
    store_config: Option<StoreConfig>,
    audit: Arc<dyn AuditSink>,
    audit_queue: usize,
    clock: Arc<dyn Clock>,
    settings: RouterSettings,
    catalogue: PriceCatalogue,
    providers: Vec<(ProviderId, Arc<dyn Provider>, ProviderSettings)>,
}

impl std::fmt::Debug for ApiKeyRouterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyRouterBuilder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Default for ApiKeyRouterBuilder {
    fn default() -> Self {
        Self {
            store: None,
            store_config: None,
            audit: Arc::new(DiscardAuditSink),
            audit_queue: apikeyrouter_application::DEFAULT_QUEUE_CAPACITY,
            clock: Arc::new(SystemClock),
            settings: RouterSettings::default(),
            catalogue: PriceCatalogue::builtin(),
            providers: Vec::new(),
        }
    }
}

impl ApiKeyRouterBuilder {
    /// Uses an already built store.
    pub fn store(mut self, store: Arc<dyn StateStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Opens a store from configuration when building.
    pub fn store_config(mut self, config: StoreConfig) -> Self {
        self.store_config = Some(config);
        self
    }

    /// Queues at most `records` audit records while the audit sink or the request log
    /// is slow or down (default 10,000), besides the up to 256 being delivered; beyond
    /// that, records are dropped and counted in [`ApiKeyRouter::record_delivery`].
    pub fn audit_queue(mut self, records: usize) -> Self {
        self.audit_queue = records;
        self
    }

    /// Sends audit records to `sink`.
    pub fn audit(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit = sink;
        self
    }

    /// Tells time by `clock` (tests use a manual clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces all router settings.
    pub fn settings(mut self, settings: RouterSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The objective for requests that name none.
    pub fn objective(mut self, objective: impl Into<Objective>) -> Self {
        self.settings.objective = objective.into();
        self
    }

    /// Most provider calls per request.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n;
        self
    }

    /// Most time per request, all attempts included. Raises the reservation lease
    /// to it if that was shorter.
    pub fn total_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.settings.total_deadline = deadline;
        self.settings.reservation_lease = self.settings.reservation_lease.max(deadline);
        self
    }

    /// How long a budget reservation may be held before the router takes it for one
    /// left by a stopped instance and gives it back; at least the total deadline.
    pub fn reservation_lease(mut self, lease: std::time::Duration) -> Self {
        self.settings.reservation_lease = lease;
        self
    }

    /// Most time per provider call.
    pub fn attempt_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.settings.attempt_timeout = timeout;
        self
    }

    /// When no key can serve `model`, try `to` in order.
    pub fn fallback(
        mut self,
        model: impl Into<ModelId>,
        to: impl IntoIterator<Item = impl Into<ModelId>>,
    ) -> Self {
        self.settings
            .fallbacks
            .insert(model.into(), to.into_iter().map(Into::into).collect());
        self
    }

    /// Serves simple requests with a cheaper model when the objective weighs cost.
    pub fn downgrade(mut self, rule: DowngradeRule) -> Self {
        self.settings.downgrades.push(rule);
        self
    }

    /// Replaces the price catalogue.
    pub fn catalogue(mut self, catalogue: PriceCatalogue) -> Self {
        self.catalogue = catalogue;
        self
    }

    /// Sets one model's price (overriding the catalogue).
    pub fn price(mut self, model: impl Into<ModelId>, price: ModelPrice) -> Self {
        self.catalogue.set(model.into(), price);
        self
    }

    /// Registers a provider at build time.
    pub fn provider(
        mut self,
        id: impl Into<ProviderId>,
        provider: Arc<dyn Provider>,
        settings: ProviderSettings,
    ) -> Self {
        self.providers.push((id.into(), provider, settings));
        self
    }

    /// Builds the router, opening the store and loading what it already holds.
    ///
    /// # Errors
    /// [`BuildError`] when the store cannot be opened or a setting is out of range.
    pub async fn build(self) -> Result<ApiKeyRouter, BuildError> {
        if self.settings.max_attempts == 0 {
            return Err(BuildError::Setting(
                "max_attempts must be at least 1".to_owned(),
            ));
        }
        if self.settings.total_deadline.is_zero() || self.settings.attempt_timeout.is_zero() {
            return Err(BuildError::Setting(
                "deadlines must be greater than zero".to_owned(),
            ));
        }
        if self.settings.reservation_lease < self.settings.total_deadline {
            return Err(BuildError::Setting(
                "reservation_lease must be at least total_deadline: a shorter lease would give back the reservations of requests still running".to_owned(),
            ));
        }
        let store = match (self.store, self.store_config) {
            (Some(store), _) => store,
            (None, Some(config)) => apikeyrouter_adapters_stores::connect(&config).await?,
            (None, None) => apikeyrouter_adapters_stores::connect(&StoreConfig::default()).await?,
        };
        let core = ApiKeyRouterCore::with_audit_queue(
            store,
            self.audit,
            self.clock,
            self.settings,
            self.catalogue,
            self.audit_queue,
        );
        for (id, provider, settings) in self.providers {
            core.register_provider(id, provider, settings);
        }
        core.load().await?;
        if core.follow_key_changes().await? {
            tracing::info!(
                store = core.store_kind(),
                "following key changes of other instances"
            );
        }
        core.sweep_stale_reservations();
        Ok(ApiKeyRouter::from_core(core))
    }
}
