//! The split store: counters in one backend (Redis, shared and fast), records in
//! another (MongoDB, durable).
//!
//! | port | goes to |
//! |---|---|
//! | quota windows, reservations, budget ledgers, key counters | counters |
//! | key state (routing view, change events) | counters, mirrored to records |
//! | keys with their material, transition history, budget definitions, request records | records |
//! | virtual keys | records (their change events go through counters) |
//!
//! Key material stays in the records store (sealed at rest in MongoDB): the counters
//! store holds each key under a placeholder, and reads put the real material back.
//! A key the records store has but the counters store lost (Redis restarted without
//! persistence) is restored into the counters store when keys are listed.

use std::collections::HashMap;
use std::sync::Arc;

use apikeyrouter_application::ports::BudgetStore;
use apikeyrouter_application::ports::{
    Charge, ChargeRejection, Clock, KeyStore, ReclaimedReservations, RequestLog, Settled,
    Settlement, StateStore, StoreChanges, StoreError, StoreErrorKind, SystemClock, UsageLedger,
    VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetStatus, KeyId, KeyMaterial, KeyMetadata, KeyState, KeyStats, Money,
    QuotaLimits, QuotaSnapshot, RequestId, StateTransition, Timestamp, TransitionTrigger,
    VirtualKey,
};
use async_trait::async_trait;

/// What the counters store holds instead of key material.
const PLACEHOLDER: &str = "material-kept-in-the-records-store";

/// Counters in `counters`, records in `records`.
pub struct SplitStore {
    counters: Arc<dyn StateStore>,
    records: Arc<dyn StateStore>,
}

impl std::fmt::Debug for SplitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitStore")
            .field("counters", &self.counters.kind())
            .field("records", &self.records.kind())
            .finish()
    }
}

impl SplitStore {
    /// Counters (quota, budgets' ledgers, key state) in `counters`; keys, history and
    /// request records in `records`.
    pub fn new(counters: Arc<dyn StateStore>, records: Arc<dyn StateStore>) -> Self {
        Self { counters, records }
    }

    fn shadow(key: &ApiKey) -> Result<ApiKey, StoreError> {
        let material = KeyMaterial::parse(PLACEHOLDER)
            .map_err(|e| StoreError::new(StoreErrorKind::Internal, e.to_string()))?;
        Ok(ApiKey {
            material,
            ..key.clone()
        })
    }

    /// Puts a key the counters store lost back into it; another instance restoring it
    /// at the same moment is as good.
    async fn restore(&self, key: &ApiKey) -> Result<(), StoreError> {
        match self.counters.insert_key(Self::shadow(key)?).await {
            Err(e) if e.kind != StoreErrorKind::Conflict => Err(e),
            _ => Ok(()),
        }
    }

    /// The counters store's view of a key with the records store's material.
    fn join(mut live: ApiKey, durable: &ApiKey) -> ApiKey {
        live.material = durable.material.clone();
        live
    }
}

/// `Ok` for `NotFound`: the other half of a split operation may already be gone.
fn tolerate_missing(result: Result<(), StoreError>) -> Result<(), StoreError> {
    match result {
        Err(e) if e.kind == StoreErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[async_trait]
impl KeyStore for SplitStore {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        let shadow = Self::shadow(&key)?;
        let id = key.id.clone();
        self.records.insert_key(key).await?;
        if let Err(e) = self.counters.insert_key(shadow).await {
            // Keep the two halves in step: undo the durable insert.
            if let Err(undo) = self.records.delete_key(&id).await {
                tracing::error!(key_id = %id, error = %undo, "split store: key left in the records store only");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        let durable = self.records.get_key(id).await?;
        match self.counters.get_key(id).await {
            Ok(live) => Ok(Self::join(live, &durable)),
            Err(e) if e.kind == StoreErrorKind::NotFound => {
                self.restore(&durable).await?;
                Ok(durable)
            }
            Err(e) => Err(e),
        }
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let durable = self.records.list_keys().await?;
        let mut live: HashMap<KeyId, ApiKey> = self
            .counters
            .list_keys()
            .await?
            .into_iter()
            .map(|k| (k.id.clone(), k))
            .collect();
        let mut keys = Vec::with_capacity(durable.len());
        for key in durable {
            match live.remove(&key.id) {
                Some(l) => keys.push(Self::join(l, &key)),
                None => {
                    tracing::warn!(key_id = %key.id, "split store: key missing from the counters store; restored");
                    self.restore(&key).await?;
                    keys.push(key);
                }
            }
        }
        for orphan in live.keys() {
            tracing::warn!(key_id = %orphan, "split store: key in the counters store only; ignored");
        }
        Ok(keys)
    }

    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        let durable = self.records.update_metadata(id, metadata.clone()).await?;
        let live = self.counters.update_metadata(id, metadata).await?;
        Ok(Self::join(live, &durable))
    }

    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        let counters = self.counters.delete_key(id).await;
        let records = self.records.delete_key(id).await;
        match (counters, records) {
            (Err(a), Err(b)) if a.kind == StoreErrorKind::NotFound => Err(b),
            (a, b) => {
                tolerate_missing(a)?;
                tolerate_missing(b)
            }
        }
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
        // The counters store decides (atomically, and tells other instances); the
        // records store keeps the history.
        let done = self
            .counters
            .transition(id, to, trigger, reason.clone(), cooldown_until, now)
            .await?;
        if let Err(e) = self
            .records
            .transition(id, to, trigger, reason, cooldown_until, now)
            .await
        {
            tracing::warn!(key_id = %id, error = %e, "split store: transition not kept in the records store");
        }
        Ok(done)
    }

    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        self.records.transitions(id).await
    }
}

#[async_trait]
impl UsageLedger for SplitStore {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        self.counters.reserve(charge).await
    }

    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        self.counters.settle(charge, settlement).await
    }

    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        self.counters.release(charge, settlement).await
    }

    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        self.counters.quota_snapshot(id, limits, now).await
    }
}

#[async_trait]
impl BudgetStore for SplitStore {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.records.put_budget(budget.clone(), spent, now).await?;
        self.counters.put_budget(budget, spent, now).await
    }

    /// The records store decides whether the id is free; the counters store then
    /// mirrors the budget as for a put. Once the records hold it the budget exists: a
    /// counters store that cannot take it now is logged, not returned (a retry would
    /// only be told the id is taken), and gets it back at the next `list_budgets`.
    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let id = budget.id.clone();
        let status = self
            .records
            .insert_budget(budget.clone(), spent, now)
            .await?;
        match self.counters.put_budget(budget, spent, now).await {
            Ok(status) => Ok(status),
            Err(e) => {
                tracing::error!(budget_id = %id, error = %e, "split store: budget created without its counters; restored at the next read of the budgets");
                Ok(status)
            }
        }
    }

    /// The records store decides whether the budget exists; the counters store, which
    /// holds its spend and reservations, is then redefined in place (given the budget
    /// back, with the records' spend, if it lost it). A counters store that cannot be
    /// changed fails the call, which can be retried: until then it enforces the old
    /// definition.
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let recorded = self.records.redefine_budget(budget.clone(), now).await?;
        match self.counters.redefine_budget(budget.clone(), now).await {
            Err(e) if e.kind == StoreErrorKind::NotFound => {
                // An insert, so that a ledger another instance restored meanwhile
                // (with its reservations) is redefined rather than replaced.
                match self
                    .counters
                    .insert_budget(budget.clone(), recorded.spent, now)
                    .await
                {
                    Err(e) if e.kind == StoreErrorKind::Conflict => {
                        self.counters.redefine_budget(budget, now).await
                    }
                    inserted => inserted,
                }
            }
            other => other,
        }
    }

    /// The records' definitions; a budget the counters store lost (a Redis restarted
    /// without persistence) is put back, with the spend the records know, so hard
    /// budgets keep being enforced.
    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        let budgets = self.records.list_budgets().await?;
        let live = self.counters.list_budgets().await?;
        let missing: Vec<&Budget> = budgets
            .iter()
            .filter(|b| !live.iter().any(|l| l.id == b.id))
            .collect();
        if !missing.is_empty() {
            let now = SystemClock.now();
            let statuses = self.records.budget_statuses(now).await?;
            for budget in missing {
                let spent = statuses
                    .iter()
                    .find(|s| s.budget_id == budget.id)
                    .map_or(Money::ZERO, |s| s.spent);
                tracing::warn!(budget_id = %budget.id, "split store: budget missing from the counters store; restored");
                self.counters.put_budget(budget.clone(), spent, now).await?;
            }
        }
        Ok(budgets)
    }

    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        self.counters.budget_statuses(now).await
    }

    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        self.counters.budget_status(id, now).await
    }

    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        self.counters.add_spend(ids, cost, now).await
    }

    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        self.counters.reclaim_reservations(taken_before, now).await
    }

    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        let counters = self.counters.delete_budget(id).await;
        let records = self.records.delete_budget(id).await;
        match (counters, records) {
            (Err(a), Err(b)) if a.kind == StoreErrorKind::NotFound => Err(b),
            (a, b) => {
                tolerate_missing(a)?;
                tolerate_missing(b)
            }
        }
    }
}

#[async_trait]
impl RequestLog for SplitStore {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        self.records.save_request(record).await
    }

    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        self.records.get_request(id).await
    }
}

/// Kept in the records store; the change events go through the counters store.
#[async_trait]
impl VirtualKeyStore for SplitStore {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let name = key.name.clone();
        self.records.insert_virtual_key(key).await?;
        self.announce_virtual_key(&name).await
    }

    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        self.records.list_virtual_keys().await
    }

    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        self.records.get_virtual_key(name).await
    }

    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let name = key.name.clone();
        self.records.update_virtual_key(key).await?;
        self.announce_virtual_key(&name).await
    }

    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        let before = self.records.rotate_virtual_key(name, token_sha256).await?;
        self.announce_virtual_key(name).await?;
        Ok(before)
    }

    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        let revoked = self.records.revoke_virtual_key(name, at).await?;
        self.announce_virtual_key(name).await?;
        Ok(revoked)
    }

    /// Through the counters store; a failure is logged, not returned: the change is
    /// made, and the other instances' periodic reading (every minute with change
    /// events) brings it.
    async fn announce_virtual_key(&self, name: &str) -> Result<(), StoreError> {
        if let Err(e) = self.counters.announce_virtual_key(name).await {
            tracing::warn!(error = %e, "split store: virtual-key change not announced");
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for SplitStore {
    fn kind(&self) -> &'static str {
        "split"
    }

    fn is_shared(&self) -> bool {
        self.counters.is_shared() || self.records.is_shared()
    }

    async fn changes(&self) -> Result<Option<StoreChanges>, StoreError> {
        self.counters.changes().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.counters.ping().await?;
        self.records.ping().await
    }
}
