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
//! The outage's money is owed to the shared store and paid back on its first answer
//! (by that caller, inline, before the mirror is refreshed from it): a request
//! reserved there and settled or released locally is settled or released there
//! exactly, and the spend of requests reserved locally is added to the shared
//! budgets (summed per budget; spend of a period that closed during the outage is
//! dropped when later spend of the same budget is owed). What the shared store
//! refuses as an outage again stays owed.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, Clock, KeyStore, RequestLog, Settled, Settlement,
    StateStore, StoreChanges, StoreError, StoreHealth, SystemClock, UsageLedger,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetStatus, KeyId, KeyMetadata, KeyState, KeyStats, Money, QuotaLimits,
    QuotaSnapshot, RequestId, ReservationId, StateTransition, Timestamp, TransitionTrigger,
};
use async_trait::async_trait;

use crate::memory::MemoryStore;

/// How long the shared store is left alone after it failed.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Reservations on the shared store tracked at most: a request dropped between its
/// reserve and its settlement is never removed, and past this many such leftovers
/// new reservations go untracked (their outage settlement is then counted as
/// locally reserved spend, and the shared reservation stays held).
const MAX_HELD_REMOTELY: usize = 65_536;

/// How a request finished on the mirror while the shared store held its reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finish {
    Settled,
    Released,
}

/// What the shared store is owed from an outage; see the module documentation.
#[derive(Debug, Default)]
struct Owed {
    /// Reservations made on the shared store and not yet settled or released there.
    held_remotely: HashSet<ReservationId>,
    /// Requests reserved on the shared store and finished on the mirror.
    finished: Vec<(Charge, Settlement, Finish)>,
    /// Spend of requests reserved on the mirror, by budget and period start, with
    /// the time of the latest.
    spend: BTreeMap<(String, Timestamp), (Money, Timestamp)>,
}

impl Owed {
    fn add_spend(&mut self, budget_period: (String, Timestamp), cost: Money, at: Timestamp) {
        let entry = self.spend.entry(budget_period).or_insert((Money::ZERO, at));
        entry.0 = entry.0.saturating_add(cost);
        entry.1 = entry.1.max(at);
    }
}

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

    /// The shared store answered: leave degraded mode, paying back what the outage
    /// owes it, then refreshing the mirror from it.
    async fn answered(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!(
                store = self.remote.kind(),
                "state store reachable again: shared limits resume"
            );
            if let Err(e) = self.pay_back().await {
                if self.went_down(&e) {
                    tracing::warn!(error = %e, "outage spend not yet given to the state store; retried when it answers");
                    return;
                }
            }
            if let Err(e) = self.resync().await {
                tracing::warn!(error = %e, "local mirror not refreshed");
            }
        }
    }

    fn owed(&self) -> MutexGuard<'_, Owed> {
        self.owed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `charge` was reserved on the shared store.
    fn held_remotely(&self, charge: &Charge) {
        let mut owed = self.owed();
        if owed.held_remotely.len() < MAX_HELD_REMOTELY {
            owed.held_remotely.insert(charge.reservation);
        }
    }

    /// `charge` was settled or released on the shared store.
    fn finished_remotely(&self, charge: &Charge) {
        self.owed().held_remotely.remove(&charge.reservation);
    }

    /// `charge` was settled or released on the mirror: note what the shared store
    /// is owed for it.
    fn finished_locally(&self, charge: &Charge, settlement: &Settlement, finish: Finish) {
        let mut owed = self.owed();
        if owed.held_remotely.remove(&charge.reservation) {
            owed.finished.push((charge.clone(), *settlement, finish));
            return;
        }
        let cost = settlement.outcome.cost;
        if finish == Finish::Released || cost == Money::ZERO {
            return;
        }
        let at = settlement.outcome.now;
        let budgets = self.budgets.read().unwrap_or_else(PoisonError::into_inner);
        for budget in budgets.iter().filter(|b| charge.budget_ids.contains(&b.id)) {
            let (period_start, _) = budget.period.bounds(at);
            owed.add_spend((budget.id.clone(), period_start), cost, at);
        }
    }

    /// Gives the shared store what the outage owes it. On an error the rest stays
    /// owed (what the store refused for good is dropped and logged).
    async fn pay_back(&self) -> Result<(), StoreError> {
        let (finished, spend) = {
            let mut owed = self.owed();
            (
                std::mem::take(&mut owed.finished),
                std::mem::take(&mut owed.spend),
            )
        };
        let mut finished = finished.into_iter();
        while let Some((charge, settlement, finish)) = finished.next() {
            let paid = match finish {
                Finish::Settled => self.remote.settle(&charge, &settlement).await.map(drop),
                Finish::Released => self.remote.release(&charge, &settlement).await.map(drop),
            };
            match paid {
                Ok(()) => {}
                Err(e) if e.is_retryable() => {
                    let mut owed = self.owed();
                    owed.finished.splice(
                        0..0,
                        std::iter::once((charge, settlement, finish)).chain(finished),
                    );
                    for (key, (cost, at)) in spend {
                        owed.add_spend(key, cost, at);
                    }
                    return Err(e);
                }
                Err(e) => {
                    tracing::error!(key_id = %charge.key_id, error = %e, "outage settlement refused by the state store");
                }
            }
        }
        // Per budget, the latest period only: an earlier one has closed.
        let mut latest: BTreeMap<&str, Timestamp> = BTreeMap::new();
        for (id, start) in spend.keys() {
            let newest = latest.entry(id.as_str()).or_insert(*start);
            *newest = (*newest).max(*start);
        }
        let latest: BTreeMap<String, Timestamp> = latest
            .into_iter()
            .map(|(id, start)| (id.to_owned(), start))
            .collect();
        let mut spend = spend.into_iter();
        while let Some(((id, start), (cost, at))) = spend.next() {
            if latest.get(&id) != Some(&start) {
                tracing::info!(budget_id = %id, "outage spend of a closed period not given to the state store");
                continue;
            }
            match self
                .remote
                .add_spend(std::slice::from_ref(&id), cost, at)
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    let mut owed = self.owed();
                    owed.add_spend((id, start), cost, at);
                    for (key, (cost, at)) in spend {
                        owed.add_spend(key, cost, at);
                    }
                    return Err(e);
                }
                Err(e) => {
                    tracing::error!(budget_id = %id, error = %e, "outage spend refused by the state store");
                }
            }
        }
        Ok(())
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
        self.remote.insert_key(key.clone()).await?;
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
        let key = self.remote.update_metadata(id, metadata).await?;
        self.mirror_key(key.clone()).await;
        Ok(key)
    }

    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        self.remote.delete_key(id).await?;
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
        fail_open!(self, |s| s.reserve(charge), |_reserved| {
            self.held_remotely(charge);
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
                self.finished_remotely(charge);
                self.mirror_spend(&settled.budgets, settlement.outcome.now)
                    .await;
            },
            else {
                self.finished_locally(charge, settlement, Finish::Settled);
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
                self.finished_remotely(charge);
            },
            else {
                self.finished_locally(charge, settlement, Finish::Released);
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
        let status = self.remote.put_budget(budget.clone(), spent, now).await?;
        let _ = self.local.put_budget(budget.clone(), spent, now).await;
        let mut budgets = self.budgets.write().unwrap_or_else(PoisonError::into_inner);
        budgets.retain(|b| b.id != budget.id);
        budgets.push(budget);
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

    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        self.remote.delete_budget(id).await?;
        let _ = self.local.delete_budget(id).await;
        self.budgets
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|b| b.id != id);
        Ok(())
    }
}

/// Request records go to the shared store only: the audit delivery retries them
/// until it is back.
#[async_trait]
impl RequestLog for FailOpenStore {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<(), StoreError> {
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
