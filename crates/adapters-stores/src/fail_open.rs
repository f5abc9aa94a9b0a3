//! Fail-open: keep routing on local limits while a shared store is unreachable.
//!
//! [`FailOpenStore`] wraps a shared store (Redis, MongoDB, split) with an in-process
//! [`MemoryStore`] that mirrors its keys and budgets. While the shared store answers,
//! everything goes to it and the mirror follows. When it is unreachable, the routing
//! path (quota windows, reservations, settlement, key counters and state) runs on the
//! mirror: limits then hold per instance rather than across instances. Administrative
//! writes (keys, budgets) still fail, so nothing is accepted that the shared store
//! would not keep. The shared store is retried by one caller at most once a second.
//!
//! The outage's money is owed to the shared store and paid back when it answers
//! again (by the caller that finds it answering, inline, before the mirror is
//! refreshed from it; see `owed`): reservations it holds for requests finished on the
//! mirror are released, and the mirror's spend is added to its budgets. Spend of a
//! budget period that has closed since is dropped; what the shared store fails to
//! take stays owed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, Clock, KeyStore, ReclaimedReservations, RequestLog,
    Settled, Settlement, StateStore, StoreChanges, StoreError, StoreHealth, SystemClock,
    UsageLedger, VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetStatus, KeyId, KeyMetadata, KeyState, KeyStats, Money, QuotaLimits,
    QuotaSnapshot, RequestId, StateTransition, Timestamp, TransitionTrigger, VirtualKey,
};
use async_trait::async_trait;

use crate::memory::MemoryStore;
use owed::Owed;

mod owed;

/// How long the shared store is left alone after it failed.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A shared store with a local fallback; see the module documentation.
pub struct FailOpenStore {
    remote: Arc<dyn StateStore>,
    local: MemoryStore,
    budgets: RwLock<Vec<Budget>>,
    degraded: AtomicBool,
    /// Milliseconds after `started` before which the shared store is not tried.
    retry_at_ms: AtomicU64,
    fallbacks: AtomicU64,
    started: Instant,
    owed: Mutex<Owed>,
    /// Something is owed (set with `owed` held): a shared store answering pays it.
    owing: AtomicBool,
    /// A caller is paying the debt back.
    paying: AtomicBool,
    /// The mirror is to be refreshed from the shared store after an outage.
    mirror_stale: AtomicBool,
    /// The latest time a request brought (milliseconds): the budget periods are
    /// current as of it when the debt is paid.
    latest_ms: AtomicU64,
}

impl std::fmt::Debug for FailOpenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailOpenStore")
            .field("remote", &self.remote.kind())
            .field("degraded", &self.degraded.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FailOpenStore {
    /// Keeps a budget the remote store took in the local ledger and the definitions
    /// used while the remote is down.
    async fn mirror_budget(&self, budget: Budget, spent: Money, now: Timestamp) {
        let _ = self.local.put_budget(budget.clone(), spent, now).await;
        self.keep_definition(budget);
    }

    /// A budget put or inserted in the shared store by `call`, then in the mirror.
    async fn mirrored(
        &self,
        call: impl Future<Output = Result<BudgetStatus, StoreError>>,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let status = self.remote_only(call).await?;
        self.mirror_budget(budget, spent, now).await;
        Ok(status)
    }

    /// Makes `budget` the definition used while the remote is down.
    fn keep_definition(&self, budget: Budget) {
        let mut budgets = self.budgets.write().unwrap_or_else(PoisonError::into_inner);
        budgets.retain(|b| b.id != budget.id);
        budgets.push(budget);
    }

    /// Wraps `remote`, copying its keys and budgets into the local mirror.
    ///
    /// # Errors
    /// The shared store's error when it cannot be read now: starting needs it once.
    pub async fn start(remote: Arc<dyn StateStore>) -> Result<Self, StoreError> {
        let store = Self {
            remote,
            local: MemoryStore::new(),
            budgets: RwLock::new(Vec::new()),
            degraded: AtomicBool::new(false),
            retry_at_ms: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            started: Instant::now(),
            owed: Mutex::default(),
            owing: AtomicBool::new(false),
            paying: AtomicBool::new(false),
            mirror_stale: AtomicBool::new(false),
            latest_ms: AtomicU64::new(0),
        };
        store.resync().await?;
        Ok(store)
    }

    /// Copies the shared store's keys and budgets (with their spend) into the mirror.
    async fn resync(&self) -> Result<(), StoreError> {
        let keys = self.remote.list_keys().await?;
        let budgets = self.remote.list_budgets().await?;
        for key in keys {
            self.mirror_key(key).await;
        }
        self.mirror_budgets(budgets).await
    }

    /// Makes the mirror's budgets those of the shared store (added, redefined or
    /// deleted by any instance), with the shared spend.
    async fn mirror_budgets(&self, budgets: Vec<Budget>) -> Result<(), StoreError> {
        let now = SystemClock.now();
        let statuses = self.remote.budget_statuses(now).await?;
        for stale in self.local.list_budgets().await? {
            if !budgets.iter().any(|b| b.id == stale.id) {
                let _ = self.local.delete_budget(&stale.id).await;
            }
        }
        for budget in &budgets {
            let spent = statuses
                .iter()
                .find(|s| s.budget_id == budget.id)
                .map_or(Money::ZERO, |s| s.spent);
            let _ = self.local.put_budget(budget.clone(), spent, now).await;
        }
        *self.budgets.write().unwrap_or_else(PoisonError::into_inner) = budgets;
        Ok(())
    }

    /// Replaces the mirror's copy of `key` (its local counters restart).
    async fn mirror_key(&self, key: ApiKey) {
        let _ = self.local.delete_key(&key.id).await;
        let _ = self.local.insert_key(key).await;
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether to try the shared store now: always while it is up; while it is down,
    /// one caller per second (the one that moves the retry time on), so a dead
    /// server costs one probe's timeout, not one per request.
    fn try_remote(&self) -> bool {
        if !self.degraded.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.elapsed_ms();
        let retry_at = self.retry_at_ms.load(Ordering::Relaxed);
        now >= retry_at
            && self
                .retry_at_ms
                .compare_exchange(
                    retry_at,
                    now + u64::try_from(RETRY_EVERY.as_millis()).unwrap_or(0),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The shared store failed with `e`: true when this is an outage to ride out.
    fn went_down(&self, e: &StoreError) -> bool {
        if !e.is_retryable() {
            return false;
        }
        let retry_at = self.elapsed_ms() + u64::try_from(RETRY_EVERY.as_millis()).unwrap_or(0);
        self.retry_at_ms.store(retry_at, Ordering::Relaxed);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(store = self.remote.kind(), error = %e, "state store unreachable: failing open on local limits");
        }
        true
    }

    /// The shared store answered: leave degraded mode, pay back what is owed, and
    /// after an outage refresh the mirror from it (also when the call that found it
    /// back was dropped before it could).
    async fn answered(&self) {
        let recovered = self.degraded.swap(false, Ordering::Relaxed);
        if recovered {
            tracing::info!(
                store = self.remote.kind(),
                "state store reachable again: shared limits resume"
            );
            self.mirror_stale.store(true, Ordering::Relaxed);
        }
        if recovered || self.owing.load(Ordering::Relaxed) {
            if let Err(e) = self.pay_back().await {
                if self.went_down(&e) {
                    tracing::warn!(error = %e, "outage spend not yet given to the state store; retried when it answers");
                    return;
                }
            }
        }
        // Not while another caller pays back: the mirror would miss that spend.
        if !self.paying.load(Ordering::Acquire) && self.mirror_stale.swap(false, Ordering::Relaxed)
        {
            if let Err(e) = self.resync().await {
                tracing::warn!(error = %e, "local mirror not refreshed");
                if e.is_retryable() {
                    self.mirror_stale.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    fn owed(&self) -> MutexGuard<'_, Owed> {
        self.owed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `charge` finished on the mirror having cost `spent`: note what the shared
    /// store is owed for it.
    fn finished_locally(&self, charge: &Charge, settlement: &Settlement, spent: Money) {
        self.saw(settlement.outcome.now);
        let budgets = self.budgets.read().unwrap_or_else(PoisonError::into_inner);
        let mut owed = self.owed();
        if owed.finished_locally(charge, settlement, spent, &budgets) {
            self.owing.store(true, Ordering::Relaxed);
        }
    }

    fn saw(&self, now: Timestamp) {
        self.latest_ms.fetch_max(now.as_millis(), Ordering::Relaxed);
    }

    /// A call only the shared store can serve (key and budget definitions, virtual
    /// keys): its answer counts as any call's, so one that finds the store down
    /// degrades this instance at once, and one answered after an outage ends it and
    /// pays back what is owed.
    async fn remote_only<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = call.await;
        if !result.as_ref().is_err_and(|e| self.went_down(e)) {
            self.answered().await;
        }
        result
    }

    fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps the mirror's budget spend in step with what the shared store settled.
    async fn mirror_spend(&self, statuses: &[BudgetStatus], now: Timestamp) {
        let budgets = self
            .budgets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for status in statuses {
            if let Some(budget) = budgets.iter().find(|b| b.id == status.budget_id) {
                let _ = self
                    .local
                    .put_budget(budget.clone(), status.spent, now)
                    .await;
            }
        }
    }
}

/// A store error that may mean the shared store is unreachable.
trait Outage {
    fn store_error(&self) -> Option<&StoreError>;
}

impl Outage for StoreError {
    fn store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

impl Outage for ChargeRejection {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Runs `$call` on the shared store, or on the mirror while it is unreachable; the
/// optional `|value| { ... }` runs on what the shared store returned, to keep the
/// mirror in step, and the optional `else { ... }` after the mirror served.
macro_rules! fail_open {
    ($self:ident, |$s:ident| $call:expr) => {
        fail_open!($self, |$s| $call, |_value| {})
    };
    ($self:ident, |$s:ident| $call:expr, |$value:ident| $then:block) => {
        fail_open!($self, |$s| $call, |$value| $then, else {})
    };
    ($self:ident, |$s:ident| $call:expr, |$value:ident| $then:block, else $locally:block) => {{
        if $self.try_remote() {
            let $s = &*$self.remote;
            match $call.await {
                Err(e) if e.store_error().is_some_and(|e| $self.went_down(e)) => {}
                other => {
                    $self.answered().await;
                    if let Ok($value) = &other {
                        $then
                    }
                    return other;
                }
            }
        }
        $self.fell_back();
        let $s = &$self.local;
        let served = $call.await;
        if served.is_ok() {
            $locally
        }
        served
    }};
}

#[async_trait]
impl KeyStore for FailOpenStore {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.remote_only(self.remote.insert_key(key.clone()))
            .await?;
        self.mirror_key(key).await;
        Ok(())
    }

    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        fail_open!(self, |s| s.get_key(id), |key| {
            self.mirror_key(key.clone()).await;
        })
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        fail_open!(self, |s| s.list_keys())
    }

    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        let key = self
            .remote_only(self.remote.update_metadata(id, metadata))
            .await?;
        self.mirror_key(key.clone()).await;
        Ok(key)
    }

    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        self.remote_only(self.remote.delete_key(id)).await?;
        let _ = self.local.delete_key(id).await;
        Ok(())
    }

    async fn transition(
        &self,
        id: &KeyId,
        to: KeyState,
        trigger: TransitionTrigger,
        reason: String,
        cooldown_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<StateTransition, StoreError> {
        fail_open!(
            self,
            |s| s.transition(id, to, trigger, reason.clone(), cooldown_until, now),
            |_done| {
                let _ = self
                    .local
                    .transition(id, to, trigger, reason.clone(), cooldown_until, now)
                    .await;
            }
        )
    }

    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        fail_open!(self, |s| s.transitions(id))
    }
}

#[async_trait]
impl UsageLedger for FailOpenStore {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        self.saw(charge.now);
        fail_open!(self, |s| s.reserve(charge), |_reserved| {
            self.owed().held_remotely(charge);
        })
    }

    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        fail_open!(
            self,
            |s| s.settle(charge, settlement),
            |settled| {
                self.owed().finished_remotely(charge);
                self.mirror_spend(&settled.budgets, settlement.outcome.now)
                    .await;
            },
            else {
                self.finished_locally(charge, settlement, settlement.outcome.cost);
            }
        )
    }

    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        fail_open!(
            self,
            |s| s.release(charge, settlement),
            |_released| {
                self.owed().finished_remotely(charge);
            },
            else {
                self.finished_locally(charge, settlement, Money::ZERO);
            }
        )
    }

    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        fail_open!(self, |s| s.quota_snapshot(id, limits, now))
    }
}

#[async_trait]
impl BudgetStore for FailOpenStore {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let put = self.remote.put_budget(budget.clone(), spent, now);
        self.mirrored(put, budget, spent, now).await
    }

    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let inserted = self.remote.insert_budget(budget.clone(), spent, now);
        self.mirrored(inserted, budget, spent, now).await
    }

    /// The local ledger is redefined in place too, keeping the reservations it holds
    /// (or given the budget with the remote's spend if it has none).
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let status = self
            .remote_only(self.remote.redefine_budget(budget.clone(), now))
            .await?;
        if self
            .local
            .redefine_budget(budget.clone(), now)
            .await
            .is_ok()
        {
            self.keep_definition(budget);
        } else {
            self.mirror_budget(budget, status.spent, now).await;
        }
        Ok(status)
    }

    /// Read when budgets change anywhere (change events) and at start: the mirror
    /// follows, so limits set elsewhere hold here during an outage too.
    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        fail_open!(self, |s| s.list_budgets(), |budgets| {
            if let Err(e) = self.mirror_budgets(budgets.clone()).await {
                tracing::warn!(error = %e, "local mirror of budgets not refreshed");
            }
        })
    }

    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        fail_open!(self, |s| s.budget_statuses(now))
    }

    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        fail_open!(self, |s| s.budget_status(id, now))
    }

    /// On the shared store only (it is what this store pays outage spend back
    /// with); the mirror takes the statuses after.
    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        let statuses = self.remote.add_spend(ids, cost, now).await?;
        self.mirror_spend(&statuses, now).await;
        Ok(statuses)
    }

    /// On both: the mirror's own reservations (taken during an outage) age the same way.
    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        let _ = self.local.reclaim_reservations(taken_before, now).await;
        self.remote.reclaim_reservations(taken_before, now).await
    }

    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        self.remote_only(self.remote.delete_budget(id)).await?;
        let _ = self.local.delete_budget(id).await;
        self.budgets
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|b| b.id != id);
        Ok(())
    }
}

/// Virtual keys go to the shared store only: the proxy keeps the ones it read, so its
/// clients are still served while the store is down.
#[async_trait]
impl VirtualKeyStore for FailOpenStore {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.remote_only(self.remote.insert_virtual_key(key)).await
    }

    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        self.remote_only(self.remote.list_virtual_keys()).await
    }

    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        self.remote_only(self.remote.get_virtual_key(name)).await
    }

    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.remote_only(self.remote.update_virtual_key(key)).await
    }

    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        self.remote_only(self.remote.rotate_virtual_key(name, token_sha256))
            .await
    }

    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        self.remote_only(self.remote.revoke_virtual_key(name, at))
            .await
    }

    async fn announce_virtual_key(&self, name: &str) -> Result<(), StoreError> {
        self.remote_only(self.remote.announce_virtual_key(name))
            .await
    }
}

/// Request records go to the shared store only: the audit delivery retries them
/// until it is back.
#[async_trait]
impl RequestLog for FailOpenStore {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        self.remote.save_request(record).await
    }

    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        self.remote.get_request(id).await
    }
}

#[async_trait]
impl StateStore for FailOpenStore {
    fn kind(&self) -> &'static str {
        self.remote.kind()
    }

    fn is_shared(&self) -> bool {
        self.remote.is_shared()
    }

    async fn changes(&self) -> Result<Option<StoreChanges>, StoreError> {
        self.remote.changes().await
    }

    /// Ready while the mirror can serve: an unreachable shared store degrades this
    /// instance (see [`StateStore::health`]) but does not stop it.
    async fn ping(&self) -> Result<(), StoreError> {
        match self.remote.ping().await {
            Err(e) if self.went_down(&e) => Ok(()),
            other => {
                if other.is_ok() {
                    self.answered().await;
                }
                other
            }
        }
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            degraded: self.degraded.load(Ordering::Relaxed),
            local_fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
