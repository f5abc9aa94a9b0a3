//! [`MemoryStore`]: every state-store port over `std::sync` locks.
//!
//! Locking scheme (the reason it stays fast under many concurrent requests):
//! - Each key and each budget sits behind its own `Mutex`, in a map behind a `RwLock`.
//!   The maps are read-locked just long enough to clone an entry's `Arc`, and
//!   write-locked only to insert or remove an entry, so requests for different keys
//!   never wait for each other and no single lock serializes the hot path.
//! - Lock order: a map lock may be held while taking an entry lock (insert, delete,
//!   replace), never the other way round; a key entry is locked before budget entries,
//!   and budget entries in ascending id order. This order rules out deadlock.
//! - No lock is held across an `.await`: every method body is synchronous.
//! - A removed entry is set to `None` under its own lock before the map lock is
//!   released, so an operation that found the entry just before the removal either
//!   completes first or sees `None` and reports `NotFound`.
//! - A poisoned lock is recovered: every critical section leaves its data consistent
//!   between domain calls, and the domain calls do not panic.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, VecDeque};

use foldhash::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, KeyStore, ReclaimedReservations, RequestLog, Settled,
    Settlement, StateStore, StoreError, StoreErrorKind, UsageLedger, Verdict, VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetLedger, BudgetStatus, KeyId, KeyMetadata, KeyState, KeyStats, Money,
    QuotaLimits, QuotaSnapshot, QuotaWindows, RequestId, StateTransition, Timestamp,
    TransitionTrigger, VirtualKey, WindowKind,
};
use async_trait::async_trait;

use crate::config::DEFAULT_REQUEST_CAPACITY;

/// Everything stored about one key.
struct KeyEntry {
    key: ApiKey,
    quota: QuotaWindows,
    /// Oldest first.
    transitions: Vec<StateTransition>,
}

/// `None` once the key or budget has been deleted (see the module docs).
type KeySlot = Arc<Mutex<Option<KeyEntry>>>;
type BudgetSlot = Arc<Mutex<Option<BudgetLedger>>>;

/// The newest request records, at most `capacity` of them.
struct RequestRing {
    capacity: usize,
    /// Ids in insertion order, oldest first. Invariant: the same ids as `records`.
    order: VecDeque<RequestId>,
    records: HashMap<RequestId, Arc<AuditRecord>>,
}

impl RequestRing {
    /// Stores `record` unless its id is taken by a different record (`false`),
    /// returning the evicted records so the caller can drop them after releasing the
    /// lock.
    fn insert(&mut self, record: Arc<AuditRecord>) -> (bool, Vec<Arc<AuditRecord>>) {
        let mut evicted = Vec::new();
        if self.capacity == 0 {
            evicted.push(record);
            return (true, evicted);
        }
        if let Some(kept) = self.records.get(&record.request_id) {
            let same = **kept == *record;
            evicted.push(record);
            return (same, evicted);
        }
        while self.order.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            evicted.extend(self.records.remove(&oldest));
        }
        self.order.push_back(record.request_id.clone());
        self.records.insert(record.request_id.clone(), record);
        (true, evicted)
    }
}

/// Keys, quota windows, budgets and the request log in process memory.
///
/// Implements every state-store port; cheap to share as `Arc<dyn StateStore>`.
/// Safe and fast under concurrency: see the module docs for the locking scheme.
pub struct MemoryStore {
    keys: RwLock<HashMap<KeyId, KeySlot>>,
    budgets: RwLock<HashMap<String, BudgetSlot>>,
    /// Per client: the current minute's start and its request count.
    clients: Mutex<HashMap<String, (Timestamp, u32)>>,
    requests: Mutex<RequestRing>,
    virtual_keys: Mutex<BTreeMap<String, VirtualKey>>,
}

impl MemoryStore {
    /// An empty store keeping up to [`DEFAULT_REQUEST_CAPACITY`] request records.
    pub fn new() -> Self {
        Self::with_request_capacity(DEFAULT_REQUEST_CAPACITY)
    }

    /// An empty store keeping the newest `capacity` request records (none when 0).
    pub fn with_request_capacity(capacity: usize) -> Self {
        Self {
            keys: RwLock::new(HashMap::default()),
            budgets: RwLock::new(HashMap::default()),
            clients: Mutex::new(HashMap::default()),
            requests: Mutex::new(RequestRing {
                capacity,
                order: VecDeque::new(),
                records: HashMap::default(),
            }),
            virtual_keys: Mutex::new(BTreeMap::new()),
        }
    }

    fn key_slot(&self, id: &KeyId) -> Result<KeySlot, StoreError> {
        read(&self.keys)
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::key_not_found(id))
    }

    /// Runs `f` on a key's entry under its lock.
    fn with_key<R>(&self, id: &KeyId, f: impl FnOnce(&mut KeyEntry) -> R) -> Result<R, StoreError> {
        let slot = self.key_slot(id)?;
        let mut guard = lock(&slot);
        let entry = guard
            .as_mut()
            .ok_or_else(|| StoreError::key_not_found(id))?;
        Ok(f(entry))
    }

    /// The ledgers of the known budgets among `ids`, in ascending id order without
    /// duplicates (the lock order; a duplicate would deadlock).
    fn budget_slots(&self, ids: &[String]) -> Vec<BudgetSlot> {
        let mut ids: Vec<&String> = ids.iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let budgets = read(&self.budgets);
        ids.into_iter()
            .filter_map(|id| budgets.get(id).cloned())
            .collect()
    }

    /// Applies `change` to each known budget among `ids`, one budget at a time
    /// (neither settling nor added spend needs cross-budget atomicity); their statuses.
    fn update_budgets(
        &self,
        ids: &[String],
        change: impl Fn(&mut BudgetLedger),
    ) -> Vec<BudgetStatus> {
        self.budget_slots(ids)
            .iter()
            .filter_map(|slot| {
                lock(slot).as_mut().map(|ledger| {
                    change(ledger);
                    ledger.status()
                })
            })
            .collect()
    }

    /// Every budget's ledger, in id order.
    fn all_budget_slots(&self) -> Vec<BudgetSlot> {
        let budgets = read(&self.budgets);
        let mut slots: Vec<(&String, &BudgetSlot)> = budgets.iter().collect();
        slots.sort_unstable_by(|a, b| a.0.cmp(b.0));
        slots.into_iter().map(|(_, slot)| slot.clone()).collect()
    }

    fn reserve_now(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        let Some(limit) = &charge.client else {
            return self.reserve_key_and_budgets(charge);
        };
        // The client's window is checked first and counted last, under its lock, so
        // a refusal anywhere charges nothing.
        let (start, end) = WindowKind::MinuteRequests.bounds(charge.now);
        let mut clients = lock(&self.clients);
        let used = clients
            .get(&limit.client)
            .filter(|(s, _)| *s == start)
            .map_or(0, |(_, n)| *n);
        if used >= limit.rpm {
            return Err(ChargeRejection::Client { retry_at: end });
        }
        self.reserve_key_and_budgets(charge)?;
        clients.insert(limit.client.clone(), (start, used + 1));
        Ok(())
    }

    fn reserve_key_and_budgets(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        let key_slot = self.key_slot(&charge.key_id)?;
        let budget_slots = self.budget_slots(&charge.budget_ids);
        let mut key_guard = lock(&key_slot);
        let entry = key_guard
            .as_mut()
            .ok_or_else(|| StoreError::key_not_found(&charge.key_id))?;
        let mut ledger_guards: Vec<_> = budget_slots.iter().map(|slot| lock(slot)).collect();
        let mut ledgers: Vec<&mut BudgetLedger> = ledger_guards
            .iter_mut()
            .filter_map(|g| g.as_mut())
            .collect();

        // Check everything first, under every lock, so a refusal changes nothing.
        // Rolling windows and periods to `now` is not a change: every reader rolls too.
        entry
            .quota
            .check(&charge.limits, charge.est_tokens, charge.now)
            .map_err(ChargeRejection::Quota)?;
        for ledger in &mut ledgers {
            ledger.roll(charge.now);
            ledger
                .check(charge.est_cost)
                .map_err(ChargeRejection::Budget)?;
        }

        // Invariant: the applies below cannot fail. Each repeats a check that just
        // passed, at the same instant, under the same locks, with no more already
        // charged (a reservation re-using an id first gives back the one it replaces).
        for ledger in &mut ledgers {
            ledger
                .reserve(charge.reservation, charge.est_cost, charge.now)
                .map_err(ChargeRejection::Budget)?;
        }
        entry
            .quota
            .charge(&charge.limits, charge.est_tokens, charge.now)
            .map_err(ChargeRejection::Quota)
    }

    /// The key's part of a settlement, under its lock: tokens reconciled, the
    /// provider's observation stored, the outcome counted. `None` when the key is gone.
    fn settle_key(
        &self,
        charge: &Charge,
        actual_tokens: u64,
        settlement: &Settlement,
    ) -> Option<KeyStats> {
        let outcome = &settlement.outcome;
        self.with_key(&charge.key_id, |entry| {
            entry
                .quota
                .reconcile_tokens(charge.est_tokens, actual_tokens);
            if let Some(observation) = settlement.observation {
                entry.quota.observe(observation, outcome.now);
            }
            let stats = &mut entry.key.stats;
            if outcome.verdict != Verdict::Abandoned {
                stats.record(outcome.verdict.succeeded(), outcome.latency, outcome.now);
            }
            stats.prompt_tokens = stats
                .prompt_tokens
                .saturating_add(outcome.usage.prompt_tokens);
            stats.completion_tokens = stats
                .completion_tokens
                .saturating_add(outcome.usage.completion_tokens);
            stats.cost = stats.cost.saturating_add(outcome.cost);
            if outcome.verdict.rate_limited() {
                stats.throttle_streak = stats.throttle_streak.saturating_add(1);
            }
            stats.clone()
        })
        .ok()
    }

    fn list_keys_now(&self) -> Vec<ApiKey> {
        let slots: Vec<KeySlot> = read(&self.keys).values().cloned().collect();
        let mut keys: Vec<ApiKey> = slots
            .iter()
            .filter_map(|slot| lock(slot).as_ref().map(|entry| entry.key.clone()))
            .collect();
        keys.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    fn delete_key_now(&self, id: &KeyId) -> Result<(), StoreError> {
        let mut keys = write(&self.keys);
        let slot = keys
            .remove(id)
            .ok_or_else(|| StoreError::key_not_found(id))?;
        *lock(&slot) = None;
        Ok(())
    }

    fn put_budget_now(&self, budget: Budget, spent: Money, now: Timestamp) -> BudgetStatus {
        let ledger = BudgetLedger::new(budget, now).with_spent(spent);
        let status = ledger.status();
        let mut budgets = write(&self.budgets);
        match budgets.entry(ledger.budget.id.clone()) {
            // Replaced in place so that operations holding this entry see the new
            // ledger rather than a detached old one.
            Entry::Occupied(occupied) => *lock(occupied.get()) = Some(ledger),
            Entry::Vacant(vacant) => {
                vacant.insert(Arc::new(Mutex::new(Some(ledger))));
            }
        }
        status
    }

    fn delete_budget_now(&self, id: &str) -> Result<(), StoreError> {
        let mut budgets = write(&self.budgets);
        let slot = budgets
            .remove(id)
            .ok_or_else(|| StoreError::budget_not_found(id))?;
        *lock(&slot) = None;
        Ok(())
    }

    fn save_request_now(&self, record: Arc<AuditRecord>) -> bool {
        let (saved, evicted) = lock(&self.requests).insert(record);
        // Freed here, outside the lock.
        drop(evicted);
        saved
    }

    fn get_request_now(&self, id: &RequestId) -> Option<Arc<AuditRecord>> {
        lock(&self.requests).records.get(id).cloned()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Counts only: key material stays out of logs, and no lock is held for long.
        let n_keys = read(&self.keys).len();
        let n_budgets = read(&self.budgets).len();
        let (n_requests, request_capacity) = {
            let ring = lock(&self.requests);
            (ring.order.len(), ring.capacity)
        };
        f.debug_struct("MemoryStore")
            .field("n_keys", &n_keys)
            .field("n_budgets", &n_budgets)
            .field("n_requests", &n_requests)
            .field("request_capacity", &request_capacity)
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Never `Unavailable`: failures are `NotFound`, `Conflict` and `Invalid` only.
#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        let mut keys = write(&self.keys);
        match keys.entry(key.id.clone()) {
            Entry::Occupied(_) => Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("key {} already exists", key.id),
            )),
            Entry::Vacant(vacant) => {
                vacant.insert(Arc::new(Mutex::new(Some(KeyEntry {
                    key,
                    quota: QuotaWindows::new(),
                    transitions: Vec::new(),
                }))));
                Ok(())
            }
        }
    }

    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        self.with_key(id, |entry| entry.key.clone())
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        Ok(self.list_keys_now())
    }

    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        self.with_key(id, |entry| {
            entry.key.metadata = metadata;
            entry.key.clone()
        })
    }

    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        self.delete_key_now(id)
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
        self.with_key(id, |entry| {
            let record = entry
                .key
                .transition(to, trigger, reason, cooldown_until, now)
                .map_err(|err| StoreError::new(StoreErrorKind::Invalid, err.to_string()))?;
            entry.transitions.push(record.clone());
            Ok(record)
        })?
    }

    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        self.with_key(id, |entry| entry.transitions.clone())
    }
}

/// Unknown budget ids in a [`Charge`] are ignored (the budget was deleted or never
/// existed). `settle` and `release` on a key deleted since `reserve` still settle
/// and release its budgets.
#[async_trait]
impl UsageLedger for MemoryStore {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        self.reserve_now(charge)
    }

    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        let outcome = &settlement.outcome;
        let stats = self.settle_key(charge, outcome.usage.total(), settlement);
        let budgets = self.update_budgets(&charge.budget_ids, |ledger| {
            ledger.commit(charge.reservation, outcome.cost, outcome.now);
        });
        Ok(Settled { budgets, stats })
    }

    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        let stats = self.settle_key(charge, 0, settlement);
        for slot in self.budget_slots(&charge.budget_ids) {
            if let Some(ledger) = lock(&slot).as_mut() {
                ledger.release(charge.reservation);
            }
        }
        Ok(stats)
    }

    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        self.with_key(id, |entry| entry.quota.snapshot(limits, now))
    }
}

/// Replacing a budget with `put_budget` drops its outstanding reservations; settling
/// them later still charges the actual cost.
#[async_trait]
impl BudgetStore for MemoryStore {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        Ok(self.put_budget_now(budget, spent, now))
    }

    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let ledger = BudgetLedger::new(budget, now).with_spent(spent);
        let status = ledger.status();
        match write(&self.budgets).entry(ledger.budget.id.clone()) {
            Entry::Occupied(_) => Err(StoreError::budget_exists(&ledger.budget.id)),
            Entry::Vacant(vacant) => {
                vacant.insert(Arc::new(Mutex::new(Some(ledger))));
                Ok(status)
            }
        }
    }

    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let id = budget.id.clone();
        let slot = read(&self.budgets).get(&id).cloned();
        slot.and_then(|slot| {
            lock(&slot).as_mut().map(|ledger| {
                ledger.redefine(budget, now);
                ledger.status()
            })
        })
        .ok_or_else(|| StoreError::budget_not_found(&id))
    }

    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        Ok(self
            .all_budget_slots()
            .iter()
            .filter_map(|slot| lock(slot).as_ref().map(|ledger| ledger.budget.clone()))
            .collect())
    }

    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        Ok(self
            .all_budget_slots()
            .iter()
            .filter_map(|slot| {
                lock(slot).as_mut().map(|ledger| {
                    ledger.roll(now);
                    ledger.status()
                })
            })
            .collect())
    }

    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        let slot = read(&self.budgets).get(id).cloned();
        slot.and_then(|slot| {
            lock(&slot).as_mut().map(|ledger| {
                ledger.roll(now);
                ledger.status()
            })
        })
        .ok_or_else(|| StoreError::budget_not_found(id))
    }

    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        Ok(self.update_budgets(ids, |ledger| {
            ledger.add_unreserved(cost, now);
        }))
    }

    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        _now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        Ok(self
            .all_budget_slots()
            .iter()
            .filter_map(|slot| {
                let mut guard = lock(slot);
                let ledger = guard.as_mut()?;
                let reclaimed = ledger.reclaim(taken_before);
                (reclaimed.count > 0).then(|| ReclaimedReservations {
                    budget_id: ledger.budget.id.clone(),
                    count: reclaimed.count,
                    amount: reclaimed.amount,
                })
            })
            .collect())
    }

    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        self.delete_budget_now(id)
    }
}

/// Keeps the newest records up to its capacity; older ones are forgotten.
#[async_trait]
impl RequestLog for MemoryStore {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        Ok(self.save_request_now(record))
    }

    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        Ok(self.get_request_now(id).map(|record| (*record).clone()))
    }
}

#[async_trait]
impl VirtualKeyStore for MemoryStore {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let mut keys = lock(&self.virtual_keys);
        if keys.contains_key(&key.name) {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("virtual key {} already exists", key.name),
            ));
        }
        keys.insert(key.name.clone(), key);
        Ok(())
    }

    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        Ok(lock(&self.virtual_keys).values().cloned().collect())
    }

    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        lock(&self.virtual_keys)
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::virtual_key_not_found(name))
    }

    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let mut keys = lock(&self.virtual_keys);
        let stored = keys
            .get_mut(&key.name)
            .ok_or_else(|| StoreError::virtual_key_not_found(&key.name))?;
        if !stored.is_active() {
            return Err(StoreError::virtual_key_revoked(&key.name));
        }
        stored.tenant = key.tenant;
        stored.models = key.models;
        stored.rpm = key.rpm;
        stored.budget_usd = key.budget_usd;
        Ok(())
    }

    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        let mut keys = lock(&self.virtual_keys);
        let stored = keys
            .get_mut(name)
            .ok_or_else(|| StoreError::virtual_key_not_found(name))?;
        if !stored.is_active() {
            return Err(StoreError::virtual_key_revoked(name));
        }
        let before = stored.clone();
        token_sha256.clone_into(&mut stored.token_sha256);
        Ok(before)
    }

    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        let mut keys = lock(&self.virtual_keys);
        let key = keys
            .get_mut(name)
            .ok_or_else(|| StoreError::virtual_key_not_found(name))?;
        key.revoked_at.get_or_insert(at);
        Ok(key.clone())
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_shared(&self) -> bool {
        false
    }

    /// Always reachable.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
