//! The shared core behind every service: ports, the local routing table, and cached
//! keys, providers, budgets and prices.
//!
//! Locks here are held for microseconds and never across an `.await`.

use arc_swap::{ArcSwap, Guard};
use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use apikeyrouter_domain::budget::ChargeContext;
use apikeyrouter_domain::cost::TokenEstimate;
use apikeyrouter_domain::routing::ProviderOffer;
use apikeyrouter_domain::{
    ApiKey, Budget, KeyId, KeyMaterial, KeyMetadata, KeyState, ModelId, PriceCatalogue, ProviderId,
    QuotaLimits, RequestId, RoutingTable, TenantId, VirtualKey,
};

use super::budgets::{BudgetService, ReclaimCounters};
use super::delivery::{DeliveryStats, RecordDelivery};
use super::ids::IdGenerator;
use super::keys::KeyService;
use super::quota::QuotaService;
use super::router::RouterService;
use super::settings::RouterSettings;
use crate::ports::{
    AuditSink, Clock, ModelSet, Provider, StateStore, StoreChange, StoreError, StoreErrorKind,
};
use crate::records::AuditRecord;

/// Per-provider settings given at registration.
#[derive(Clone, Debug, Default)]
pub struct ProviderSettings {
    /// Models served; `None` takes the provider's default set.
    pub models: Option<Vec<ModelId>>,
}

/// A registered provider.
pub(crate) struct ProviderEntry {
    pub(crate) id: ProviderId,
    pub(crate) client: Arc<dyn Provider>,
    pub(crate) models: ModelSet,
}

/// What the hot path needs of a key, without a store round trip.
#[derive(Debug)]
pub(crate) struct KeyHandle {
    pub(crate) provider: ProviderId,
    pub(crate) material: KeyMaterial,
    pub(crate) limits: QuotaLimits,
    /// As read, to tell a change made elsewhere when the keys are read again.
    metadata: KeyMetadata,
}

impl KeyHandle {
    pub(crate) fn of(key: &ApiKey) -> Self {
        Self {
            provider: key.provider.clone(),
            material: key.material.clone(),
            limits: QuotaLimits::from_metadata(&key.metadata),
            metadata: key.metadata.clone(),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) records: RecordDelivery,
    pub(crate) reclaimed: ReclaimCounters,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) ids: IdGenerator,
    pub(crate) table: Mutex<RoutingTable>,
    pub(crate) keys: RwLock<HashMap<KeyId, Arc<KeyHandle>>>,
    /// Counts the local key changes a re-read of the store could undo (keys cached or
    /// forgotten, states set by hand). Held across each such change and across
    /// applying a reading, so a reading is applied only if no change landed since it
    /// began (it may lack that change, or hold it stale).
    key_writes: Mutex<u64>,
    /// Copy-on-write: changes are rare, reads are per request. A load writes nothing
    /// the serving threads share (a read lock and an `Arc` clone each wrote a cache
    /// line that then moved between the cores on every request).
    providers: ArcSwap<Vec<Arc<ProviderEntry>>>,
    budgets: ArcSwap<Vec<Budget>>,
    catalogue: ArcSwap<PriceCatalogue>,
    settings: ArcSwap<RouterSettings>,
    /// Counts the local changes to the budget definitions, so that a reading of the
    /// store that one of them overlapped is not applied over it (as `key_writes` does
    /// for keys).
    budget_writes: AtomicU64,
    /// Changes to the stored virtual keys (made here or, through a shared store,
    /// elsewhere), for the proxy to re-read them.
    pub(crate) virtual_keys: tokio::sync::broadcast::Sender<VirtualKeyChange>,
}

/// What may have changed among the stored virtual keys (see
/// [`ApiKeyRouterCore::virtual_key_changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtualKeyChange {
    /// The key of this name: read it alone (`NotFound` when it is gone).
    One(String),
    /// Any of them: read them all.
    All,
}

/// Changes a slow listener may leave unread before it is told it lagged (and reads
/// every virtual key instead).
const VIRTUAL_KEY_CHANGES_QUEUED: usize = 1024;

impl Shared {
    pub(crate) fn table(&self) -> MutexGuard<'_, RoutingTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nobody listening is no error: the proxy listens, a library user may not.
    fn virtual_key_changed(&self, name: &str) {
        let _ = self
            .virtual_keys
            .send(VirtualKeyChange::One(name.to_owned()));
    }

    fn virtual_keys_changed(&self) {
        let _ = self.virtual_keys.send(VirtualKeyChange::All);
    }

    // The current settings, prices, providers and budget definitions, for a short
    // look: a guard is not to be held across an `.await` (copy out what is needed, or
    // take [`Guard::into_inner`]).

    pub(crate) fn settings(&self) -> Guard<Arc<RouterSettings>> {
        self.settings.load()
    }

    pub(crate) fn catalogue(&self) -> Guard<Arc<PriceCatalogue>> {
        self.catalogue.load()
    }

    pub(crate) fn providers(&self) -> Guard<Arc<Vec<Arc<ProviderEntry>>>> {
        self.providers.load()
    }

    pub(crate) fn budgets(&self) -> Guard<Arc<Vec<Budget>>> {
        self.budgets.load()
    }

    /// Replaces the budget definitions by `change` of the current ones, atomically
    /// with respect to other changes (`change` may run more than once).
    pub(crate) fn change_budgets(&self, change: impl Fn(&[Budget]) -> Vec<Budget>) {
        // Counted first: a reading that checks the count after this sees it, and one
        // that checked before swaps first, so this change applies over it.
        self.budget_writes.fetch_add(1, Ordering::SeqCst);
        self.budgets.rcu(|current| change(current));
    }

    /// Applies the definitions read from the store, unless a local change landed since
    /// the reading began, when the change count was `since` (the reading may lack it);
    /// returns whether they were applied.
    fn apply_budget_reading(&self, reading: Vec<Budget>, since: u64) -> bool {
        if self.budget_writes.load(Ordering::SeqCst) != since {
            return false;
        }
        let reading = Arc::new(reading);
        let mut applied = false;
        self.budgets.rcu(|current| {
            applied = self.budget_writes.load(Ordering::SeqCst) == since;
            if applied {
                reading.clone()
            } else {
                current.clone()
            }
        });
        applied
    }

    pub(crate) fn provider(&self, id: &ProviderId) -> Option<Arc<ProviderEntry>> {
        self.providers().iter().find(|p| &p.id == id).cloned()
    }

    pub(crate) fn key_handle(&self, id: &KeyId) -> Option<Arc<KeyHandle>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Caches a key for the hot path and indexes it for routing.
    pub(crate) fn cache_key(&self, key: &ApiKey) {
        let mut writes = self.key_writes();
        *writes += 1;
        self.put_key(key);
    }

    pub(crate) fn forget_key(&self, id: &KeyId) {
        let mut writes = self.key_writes();
        *writes += 1;
        self.drop_key(id);
    }

    /// The key-write count (and lock): taken before the key map and the table.
    fn key_writes(&self) -> MutexGuard<'_, u64> {
        self.key_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn put_key(&self, key: &ApiKey) {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.id.clone(), Arc::new(KeyHandle::of(key)));
        self.table().upsert(key);
    }

    fn drop_key(&self, id: &KeyId) {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        self.table().remove(id);
    }

    /// Sets a key's state in the routing table, after the store took it; a change
    /// into or out of a state set by hand is one a re-read must not undo.
    pub(crate) fn set_key_state(
        &self,
        id: &KeyId,
        state: KeyState,
        cooldown_until: Option<apikeyrouter_domain::Timestamp>,
    ) {
        let mut writes = self.key_writes();
        let mut table = self.table();
        if state.is_set_by_hand() || table.state(id).is_some_and(KeyState::is_set_by_hand) {
            *writes += 1;
        }
        table.set_state(id, state, cooldown_until);
    }

    /// Applies the keys as read from the store: adds those new here, forgets those
    /// gone, and re-reads those whose provider or metadata changed, or that were
    /// disabled (or found invalid) or enabled again elsewhere. A key in a state that
    /// follows traffic and time (throttled, exhausted, recovering, available) is left
    /// as this instance knows it: the store may lag behind it, and re-reading would
    /// reset its statistics and repeat its transitions.
    ///
    /// Applied only if no local key change landed since the reading began, when the
    /// write count was `since`; returns whether it was.
    pub(crate) fn reconcile_keys(&self, stored: &[ApiKey], since: u64) -> bool {
        let writes = self.key_writes();
        if *writes != since {
            return false;
        }
        let gone: Vec<KeyId> = {
            let ids: std::collections::HashSet<&KeyId> = stored.iter().map(|k| &k.id).collect();
            self.keys
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .filter(|id| !ids.contains(id))
                .cloned()
                .collect()
        };
        for id in &gone {
            self.drop_key(id);
        }
        for key in stored {
            let same_key = self
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key.id)
                .is_some_and(|h| h.provider == key.provider && h.metadata == key.metadata);
            let here = self.table().state(&key.id);
            let same_state = here.is_some_and(|here| {
                here == key.state || !(here.is_set_by_hand() || key.state.is_set_by_hand())
            });
            if !(same_key && same_state) {
                self.put_key(key);
            }
        }
        drop(writes);
        true
    }

    /// Providers that may serve `model`, with this request's estimated cost on each.
    pub(crate) fn offers(
        &self,
        model: &ModelId,
        only: Option<&ProviderId>,
        estimate: &TokenEstimate,
    ) -> Vec<ProviderOffer> {
        let catalogue = self.catalogue();
        self.providers()
            .iter()
            .filter(|p| only.is_none_or(|o| o == &p.id) && p.models.contains(model))
            .map(|p| ProviderOffer {
                provider: p.id.clone(),
                est_cost: catalogue.estimate(&p.id, model, estimate).cost,
            })
            .collect()
    }

    /// Ids of the budgets a request described by `ctx` counts against.
    pub(crate) fn applicable_budgets(&self, ctx: &ChargeContext<'_>) -> Vec<String> {
        self.budgets()
            .iter()
            .filter(|b| b.scope.covers(ctx))
            .map(|b| b.id.clone())
            .collect()
    }
}

/// How long a request look-up waits for records still being delivered.
const REQUEST_LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// Re-reads one key after another instance changed it, or after the store refused a
/// transition the table made (the key had moved meanwhile).
pub(crate) async fn refresh_key(shared: &Shared, id: &KeyId) {
    match shared.store.get_key(id).await {
        Ok(key) => shared.cache_key(&key),
        Err(e) if e.kind == crate::ports::StoreErrorKind::NotFound => shared.forget_key(id),
        Err(e) => tracing::warn!(key_id = %id, error = %e, "changed key not refreshed"),
    }
}

/// How often a store without change events is read again for the key, budget and
/// virtual-key changes other instances made.
const REREAD_WITHOUT_EVENTS: Duration = Duration::from_secs(10);

/// How often a store with change events is read again all the same: what catches an
/// event that never came (an announcement that failed after its change, a
/// subscription that died without closing, a catch-up that kept overlapping local
/// changes).
const REREAD_WITH_EVENTS: Duration = Duration::from_secs(60);

impl ApiKeyRouterCore {
    /// Reads the keys, the budgets and then the virtual keys again `every` so
    /// often, until the router is dropped: without change events (MongoDB) how
    /// instances sharing the store see each other's changes, with them a safety net.
    /// The virtual keys are signalled after the budgets are read, so a virtual key
    /// made elsewhere is not served here before its budget is known.
    fn reread_keys_and_budgets(&self, every: Duration) {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is at once: the keys were just loaded
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                // A reading a local change overlapped is taken again at the next tick.
                if let Err(e) = reread_keys(&shared).await {
                    tracing::warn!(error = %e, "keys not read again");
                }
                // Unless the budgets failed or were overlapped by a local change: the next
                // tick tries both again.
                if refresh_budgets(&shared).await {
                    shared.virtual_keys_changed();
                }
            }
        });
    }
}

/// Reads every key again and applies what was read (see [`Shared::reconcile_keys`]).
/// A key changed here while the store was read may be missing from the reading, or
/// stale in it: such a reading is not applied, and `Ok(false)` says so.
async fn reread_keys(shared: &Shared) -> Result<bool, StoreError> {
    let since = *shared.key_writes();
    let keys = shared.store.list_keys().await?;
    Ok(shared.reconcile_keys(&keys, since))
}

/// How many times the keys are read again after a lost subscription while local
/// changes keep overlapping the reading; the new subscription carries changes from
/// then on, and the periodic reading catches what the catch-up could not apply.
const CATCH_UP_READINGS: usize = 3;

/// After a lost subscription, whose events in between are gone: reads every key,
/// budget and virtual key again, as [`reread_keys`] applies them (so that keys
/// deleted meanwhile are forgotten, and states that follow traffic keep their
/// statistics).
async fn catch_up(shared: &Shared) {
    for reading in 1..=CATCH_UP_READINGS {
        match reread_keys(shared).await {
            Ok(true) => break,
            Ok(false) if reading == CATCH_UP_READINGS => tracing::warn!(
                "keys read after a lost subscription kept overlapping local changes; the next periodic reading applies them"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "keys not read again after a lost subscription");
                break;
            }
        }
    }
    if refresh_budgets(shared).await {
        shared.virtual_keys_changed();
    }
}

/// Readings of the budget definitions taken at once when local changes overlap them;
/// after that the next event or periodic reading tries again.
const BUDGET_READINGS: usize = 3;

/// Re-reads the budget definitions after another instance changed one; returns
/// whether they were read and applied. A reading a local change overlapped is not
/// applied over it, and is taken again (up to [`BUDGET_READINGS`] in all).
async fn refresh_budgets(shared: &Shared) -> bool {
    for _ in 0..BUDGET_READINGS {
        match read_budgets(shared).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "changed budgets not refreshed");
                return false;
            }
        }
    }
    tracing::warn!(
        "budget definitions read while local changes kept landing; the next reading applies them"
    );
    false
}

/// Reads the budget definitions and applies them unless a local change overlapped
/// the reading (see [`Shared::apply_budget_reading`]).
async fn read_budgets(shared: &Shared) -> Result<bool, StoreError> {
    let since = shared.budget_writes.load(Ordering::SeqCst);
    let budgets = shared.store.list_budgets().await?;
    Ok(shared.apply_budget_reading(budgets, since))
}

/// The assembled services over one store, audit sink and clock.
#[derive(Clone)]
pub struct ApiKeyRouterCore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ApiKeyRouterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyRouterCore")
            .field("store", &self.shared.store.kind())
            .finish()
    }
}

impl ApiKeyRouterCore {
    /// Services over `store`, recording to `audit`, telling time by `clock`.
    pub fn new(
        store: Arc<dyn StateStore>,
        audit: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        settings: RouterSettings,
        catalogue: PriceCatalogue,
    ) -> Self {
        Self::with_audit_queue(
            store,
            audit,
            clock,
            settings,
            catalogue,
            super::delivery::DEFAULT_QUEUE_CAPACITY,
        )
    }

    /// Like [`Self::new`], holding at most `audit_queue` records while the audit sink
    /// or the request log is slow or down.
    pub fn with_audit_queue(
        store: Arc<dyn StateStore>,
        audit: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        settings: RouterSettings,
        catalogue: PriceCatalogue,
        audit_queue: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                records: RecordDelivery::with_capacity(audit, store.clone(), audit_queue),
                reclaimed: ReclaimCounters::default(),
                store,
                clock,
                ids: IdGenerator::new(),
                table: Mutex::new(RoutingTable::new()),
                keys: RwLock::new(HashMap::default()),
                key_writes: Mutex::new(0),
                providers: ArcSwap::from_pointee(Vec::new()),
                budgets: ArcSwap::from_pointee(Vec::new()),
                catalogue: ArcSwap::from_pointee(catalogue),
                settings: ArcSwap::from_pointee(settings),
                budget_writes: AtomicU64::new(0),
                virtual_keys: tokio::sync::broadcast::Sender::new(VIRTUAL_KEY_CHANGES_QUEUED),
            }),
        }
    }

    /// Loads keys and budgets already in the store (a durable store after a restart).
    ///
    /// # Errors
    /// The store's error when it cannot be read.
    pub async fn load(&self) -> Result<usize, StoreError> {
        let keys = self.shared.store.list_keys().await?;
        for key in &keys {
            self.shared.cache_key(key);
        }
        // Nothing else runs yet: the first reading is applied.
        read_budgets(&self.shared).await?;
        Ok(keys.len())
    }

    /// Follows the key, budget and virtual-key changes other instances make through a
    /// shared store. With change events (Redis) each changed key is re-read and the
    /// local routing table updated, so a key disabled elsewhere stops getting traffic
    /// here within moments, and a budget change re-reads the budgets; everything is
    /// also read again every minute, in case an event was lost. Without events
    /// (MongoDB), keys, budgets and virtual keys are read again every 10 s. Returns
    /// whether the store offers change events. The follower stops when the router is
    /// dropped.
    ///
    /// # Errors
    /// The store's error when the first subscription fails.
    pub async fn follow_key_changes(&self) -> Result<bool, StoreError> {
        if !self.store_is_shared() {
            return Ok(false);
        }
        let Some(first) = self.shared.store.changes().await? else {
            self.reread_keys_and_budgets(REREAD_WITHOUT_EVENTS);
            return Ok(false);
        };
        self.reread_keys_and_budgets(REREAD_WITH_EVENTS);
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let mut changes = first;
            loop {
                while let Some(change) =
                    std::future::poll_fn(|cx| changes.as_mut().poll_next(cx)).await
                {
                    let Some(shared) = weak.upgrade() else { return };
                    match change {
                        StoreChange::Key(id) => refresh_key(&shared, &id).await,
                        StoreChange::Budgets => {
                            refresh_budgets(&shared).await;
                        }
                        StoreChange::VirtualKey(name) => shared.virtual_key_changed(&name),
                        StoreChange::VirtualKeys => shared.virtual_keys_changed(),
                    }
                }
                // The subscription was lost: events in between are gone, so resubscribe
                // and re-read every key and budget.
                loop {
                    let Some(shared) = weak.upgrade() else { return };
                    match shared.store.changes().await {
                        Ok(Some(next)) => {
                            changes = next;
                            catch_up(&shared).await;
                            break;
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "change subscription lost; retrying")
                        }
                    }
                    drop(shared);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(true)
    }

    /// Reclaims budget reservations held longer than the lease (see
    /// [`BudgetService::reclaim_stale`]) now and then every minute, or every quarter
    /// of the lease if that is shorter, until the router is dropped. Every instance
    /// sweeping a shared store is safe: each reservation is reclaimed once. A sweep
    /// that fails (the store is down, holds a malformed budget, or cannot reclaim at
    /// all) is logged and tried again at the next interval.
    pub fn sweep_stale_reservations(&self) {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                let Some(shared) = weak.upgrade() else { return };
                let every = (shared.settings().reservation_lease / 4)
                    .clamp(Duration::from_millis(10), Duration::from_secs(60));
                if let Err(e) = super::budgets::reclaim_stale(&shared).await {
                    tracing::warn!(error = %e, "stale budget reservations not reclaimed; retrying");
                }
                drop(shared);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Registers (or replaces) a provider under `id`.
    pub fn register_provider(
        &self,
        id: ProviderId,
        client: Arc<dyn Provider>,
        settings: ProviderSettings,
    ) {
        let models = settings
            .models
            .map_or_else(|| client.default_models(), ModelSet::Only);
        let entry = Arc::new(ProviderEntry {
            id: id.clone(),
            client,
            models,
        });
        self.shared.providers.rcu(|current| {
            let mut providers: Vec<_> = current.iter().filter(|p| p.id != id).cloned().collect();
            providers.push(entry.clone());
            providers
        });
    }

    /// Registered provider ids, in registration order, with their adapter kinds.
    pub fn providers(&self) -> Vec<(ProviderId, &'static str)> {
        self.shared
            .providers()
            .iter()
            .map(|p| (p.id.clone(), p.client.kind()))
            .collect()
    }

    /// Models the registered providers serve (`None` for a provider serving any).
    pub fn models(&self) -> Vec<(ProviderId, Option<Vec<ModelId>>)> {
        self.shared
            .providers()
            .iter()
            .map(|p| {
                let models = match &p.models {
                    ModelSet::Any => None,
                    ModelSet::Only(m) => Some(m.clone()),
                };
                (p.id.clone(), models)
            })
            .collect()
    }

    /// The models a request of `tenant` can be routed to, each with the first
    /// registered provider serving it: a model counts when a provider serves it and
    /// one of that provider's keys for the tenant (untenanted keys when `tenant` is
    /// `None`, as routing does) serves it and is not disabled or invalid. Sorted by
    /// model id.
    ///
    /// # Errors
    /// The store's error when the keys cannot be read.
    pub async fn served_models(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<(ModelId, ProviderId)>, StoreError> {
        let keys = self.shared.store.list_keys().await?;
        let catalogue = self.shared.catalogue();
        let mut served: std::collections::BTreeMap<ModelId, ProviderId> =
            std::collections::BTreeMap::new();
        for provider in self.shared.providers().iter() {
            let usable: Vec<_> = keys
                .iter()
                .filter(|k| k.provider == provider.id && k.metadata.tenant.as_ref() == tenant)
                .filter(|k| !matches!(k.state, KeyState::Disabled | KeyState::Invalid))
                .collect();
            if usable.is_empty() {
                continue;
            }
            let models = match &provider.models {
                ModelSet::Only(list) => list.clone(),
                ModelSet::Any => catalogue.models(),
            };
            for model in models {
                if usable.iter().any(|k| k.metadata.serves(&model)) {
                    served.entry(model).or_insert_with(|| provider.id.clone());
                }
            }
        }
        Ok(served.into_iter().collect())
    }

    /// Replaces the router settings (objective, attempts, fallbacks...).
    pub fn set_settings(&self, settings: RouterSettings) {
        self.shared.settings.store(Arc::new(settings));
    }

    /// The current settings.
    pub fn settings(&self) -> Arc<RouterSettings> {
        self.shared.settings.load_full()
    }

    /// Replaces the price catalogue.
    pub fn set_catalogue(&self, catalogue: PriceCatalogue) {
        self.shared.catalogue.store(Arc::new(catalogue));
    }

    /// The price catalogue.
    pub fn catalogue(&self) -> Arc<PriceCatalogue> {
        self.shared.catalogue.load_full()
    }

    /// Routing.
    pub fn router(&self) -> RouterService {
        RouterService::new(self.shared.clone())
    }

    /// Key management.
    pub fn keys(&self) -> KeyService {
        KeyService::new(self.shared.clone())
    }

    /// Quota queries.
    pub fn quota(&self) -> QuotaService {
        QuotaService::new(self.shared.clone())
    }

    /// Budgets.
    pub fn budgets(&self) -> BudgetService {
        BudgetService::new(self.shared.clone())
    }

    /// The decision and audit record of a past request, if the store kept it.
    ///
    /// # Errors
    /// The store's error when it cannot be read.
    pub async fn request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        // Records are written in the background: let the ones already handed over land
        // first, so a caller finds the request it just made.
        self.shared.records.settled(REQUEST_LOOKUP_WAIT).await;
        self.shared.store.get_request(id).await
    }

    /// Waits until the audit sink and the request log hold every record of requests
    /// finished so far, or until `timeout`; returns whether they do. Call it before
    /// shutting down so no record is lost.
    pub async fn flush_records(&self, timeout: Duration) -> bool {
        self.shared.records.flushed(timeout).await
    }

    /// Stores a virtual key made now (its `created_at` is set from the router's clock);
    /// returns the record stored.
    ///
    /// # Errors
    /// `Invalid` for a malformed key, `Conflict` when its name is taken, or the store's
    /// error.
    pub async fn insert_virtual_key(&self, mut key: VirtualKey) -> Result<VirtualKey, StoreError> {
        key.created_at = self.shared.clock.now();
        key.revoked_at = None;
        key.validate()
            .map_err(|e| StoreError::new(StoreErrorKind::Invalid, e.to_string()))?;
        let inserted = self.shared.store.insert_virtual_key(key.clone()).await;
        // Even after an error: the write may have landed before the failure.
        self.shared.virtual_key_changed(&key.name);
        inserted.map(|()| key)
    }

    /// The stored virtual keys, revoked ones included, in name order.
    ///
    /// # Errors
    /// The store's error when it cannot be read.
    pub async fn virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        self.shared.store.list_virtual_keys().await
    }

    /// One stored virtual key, revoked or not, read alone.
    ///
    /// # Errors
    /// `NotFound` for an unknown name, or the store's error.
    pub async fn virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        self.shared.store.get_virtual_key(name).await
    }

    /// Replaces the limits of an active stored virtual key with `key`'s (its name,
    /// digest and times stay).
    ///
    /// # Errors
    /// `Invalid` for malformed limits, `NotFound` if absent, `Conflict` if revoked, or
    /// the store's error.
    pub async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        key.validate()
            .map_err(|e| StoreError::new(StoreErrorKind::Invalid, e.to_string()))?;
        let name = key.name.clone();
        let updated = self.shared.store.update_virtual_key(key).await;
        self.shared.virtual_key_changed(&name);
        updated
    }

    /// Gives a stored, active virtual key a new token digest; returns its record as it
    /// was (with the old digest).
    ///
    /// # Errors
    /// `Invalid` for a digest that is not 64 lowercase hex digits, `NotFound` if
    /// absent, `Conflict` if revoked, or the store's error.
    pub async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        if apikeyrouter_domain::virtual_key::parse_sha256_hex(token_sha256).is_none() {
            return Err(StoreError::new(
                StoreErrorKind::Invalid,
                "a token digest is 64 lowercase hex digits",
            ));
        }
        let rotated = self
            .shared
            .store
            .rotate_virtual_key(name, token_sha256)
            .await;
        self.shared.virtual_key_changed(name);
        rotated
    }

    /// Revokes a stored virtual key now (keeping the first time if it was already);
    /// returns its record.
    ///
    /// # Errors
    /// `NotFound` if absent, or the store's error.
    pub async fn revoke_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        let now = self.shared.clock.now();
        let revoked = self.shared.store.revoke_virtual_key(name, now).await;
        self.shared.virtual_key_changed(name);
        revoked
    }

    /// The changes to the stored virtual keys from now on: one key, when it changed
    /// through this router or through another instance (by its change event, on
    /// Redis); all of them at each periodic reading of a shared store (every 10 s
    /// without events, every minute with them), after the budgets, and after a lost
    /// change subscription, when changes may have been missed. A receiver that lags
    /// more than 1,024 changes behind is told so (`RecvError::Lagged`): it should then
    /// read them all.
    pub fn virtual_key_changes(&self) -> tokio::sync::broadcast::Receiver<VirtualKeyChange> {
        self.shared.virtual_keys.subscribe()
    }

    /// Counters of the background record delivery.
    pub fn record_delivery(&self) -> DeliveryStats {
        self.shared.records.stats()
    }

    /// What the sweeps of stale budget reservations gave back since start, for metrics.
    pub fn reclaimed_reservations(&self) -> apikeyrouter_domain::Reclaimed {
        self.shared.reclaimed.stats()
    }

    /// Whether the store runs degraded (fail-open on local limits), for metrics.
    pub fn store_health(&self) -> crate::ports::StoreHealth {
        self.shared.store.health()
    }

    /// A fresh request id, for answers given before a request reaches the router
    /// (refused ones), so that every answer and its log line carry one.
    pub fn new_request_id(&self) -> RequestId {
        self.shared.ids.request_id()
    }

    /// The store's backend name.
    pub fn store_kind(&self) -> &'static str {
        self.shared.store.kind()
    }

    /// Whether other processes can change the store (see [`StateStore::is_shared`]).
    pub fn store_is_shared(&self) -> bool {
        self.shared.store.is_shared()
    }

    /// Checks the store is reachable.
    ///
    /// # Errors
    /// The store's error when it is not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.shared.store.ping().await
    }
}
