//! A state store that forwards every call to another one, for tests that need to
//! change one thing about a real store: keep request records elsewhere, or have a
//! route-path operation applied but never answered (a reply lost, a caller gone).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use apikeyrouter_adapters_stores::MemoryStore;
use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, KeyStore, ReclaimedReservations, RequestLog, Settled,
    Settlement, StateStore, StoreChange, StoreChanges, StoreError, StoreErrorKind, UsageLedger,
    VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetStatus, KeyId, KeyMetadata, KeyState, KeyStats, Money, QuotaLimits,
    QuotaSnapshot, RequestId, StateTransition, Timestamp, TransitionTrigger, VirtualKey,
};
use async_trait::async_trait;

/// A route-path operation that can be made to stall once it has been applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    Reserve,
    Settle,
    Release,
    /// A key's state change (cooldown, exhaustion, recovery) after a call.
    Transition,
}

pub struct Forwarding {
    inner: Arc<dyn StateStore>,
    /// Where request records go instead of `inner`, if anywhere.
    requests: Option<MemoryStore>,
    stall: Mutex<Option<Stall>>,
    /// A virtual key revoked (as by another caller) just before the next budget is
    /// created.
    revoke_before_budget: Mutex<Option<String>>,
    /// Budget deletions answer `Unavailable` (a store down for them).
    refuse_budget_deletes: AtomicBool,
    /// Says the store is shared whatever `inner` is.
    presented_as_shared: bool,
    list_keys_calls: AtomicU64,
    list_budgets_calls: AtomicU64,
    /// Change events come from the test instead of `inner`: the current
    /// subscription's sender, once one was made.
    change_feed: Option<Mutex<Option<tokio::sync::mpsc::UnboundedSender<StoreChange>>>>,
    subscriptions: AtomicU64,
    /// Holds the next key listing, once read, until released.
    listing_hold: Mutex<Option<Arc<ListingHold>>>,
    /// The same for the next budget listing.
    budget_listing_hold: Mutex<Option<Arc<ListingHold>>>,
    /// Changes each key of a listing, as a store lagging behind would show it.
    listing_rewrite: Mutex<Option<fn(&mut ApiKey)>>,
    /// The virtual key whose record, read alone, does not decode (`Invalid`).
    undecodable_virtual_key: Mutex<Option<String>>,
}

/// A listing read from the store and held before it is answered: what a change made
/// meanwhile makes stale.
#[derive(Default)]
pub struct ListingHold {
    read: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

impl ListingHold {
    /// Takes the hold out of `slot`, if one is set there, and holds the listing
    /// answering now until released.
    async fn apply(slot: &Mutex<Option<Arc<ListingHold>>>) {
        let hold = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(hold) = hold {
            hold.read.notify_one();
            hold.go.notified().await;
        }
    }

    /// Waits until the listing has been read.
    pub async fn read(&self) {
        self.read.notified().await;
    }

    /// Lets the listing be answered.
    pub fn release(&self) {
        self.go.notify_one();
    }
}

fn hold_in(slot: &Mutex<Option<Arc<ListingHold>>>) -> Arc<ListingHold> {
    let hold = Arc::new(ListingHold::default());
    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(hold.clone());
    hold
}

impl Forwarding {
    /// Forwarding to a fresh memory store.
    pub fn over_memory() -> Self {
        Self::to(Arc::new(MemoryStore::new()))
    }

    pub fn to(inner: Arc<dyn StateStore>) -> Self {
        Self {
            inner,
            requests: None,
            stall: Mutex::new(None),
            revoke_before_budget: Mutex::new(None),
            refuse_budget_deletes: AtomicBool::new(false),
            presented_as_shared: false,
            list_keys_calls: AtomicU64::new(0),
            list_budgets_calls: AtomicU64::new(0),
            change_feed: None,
            subscriptions: AtomicU64::new(0),
            listing_hold: Mutex::new(None),
            budget_listing_hold: Mutex::new(None),
            listing_rewrite: Mutex::new(None),
            undecodable_virtual_key: Mutex::new(None),
        }
    }

    /// Makes the record of virtual key `name`, read alone, one that does not decode,
    /// as a record written by hand or by another version would.
    pub fn undecodable_virtual_key(&self, name: &str) {
        *self
            .undecodable_virtual_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(name.to_owned());
    }

    /// Holds the next key listing once it has read the store, until released.
    pub fn hold_next_key_listing(&self) -> Arc<ListingHold> {
        hold_in(&self.listing_hold)
    }

    /// Holds the next budget listing once it has read the store, until released.
    pub fn hold_next_budget_listing(&self) -> Arc<ListingHold> {
        hold_in(&self.budget_listing_hold)
    }

    /// Applies `rewrite` to every key of the listings from now on.
    pub fn rewrite_key_listings(&self, rewrite: fn(&mut ApiKey)) {
        *self
            .listing_rewrite
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(rewrite);
    }

    /// Presents `inner` as a shared store whose change events the test controls:
    /// none are sent, and [`Forwarding::lose_subscription`] ends the current
    /// subscription as a lost connection would.
    pub fn with_change_feed(mut self) -> Self {
        self.presented_as_shared = true;
        self.change_feed = Some(Mutex::new(None));
        self
    }

    /// Sends `change` on the current change subscription, as another instance's
    /// change would arrive.
    pub fn send_change(&self, change: StoreChange) {
        let feed = self.change_feed.as_ref().expect("built with_change_feed");
        let sender = feed.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = sender.as_ref().map(|s| s.send(change));
        assert!(
            matches!(sent, Some(Ok(()))),
            "no change subscription to send on"
        );
    }

    /// Ends the current change subscription; the events sent meanwhile are lost.
    pub fn lose_subscription(&self) {
        if let Some(feed) = &self.change_feed {
            feed.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }

    /// How many change subscriptions were made.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::SeqCst)
    }

    /// How many times the budgets were listed.
    pub fn list_budgets_calls(&self) -> u64 {
        self.list_budgets_calls.load(Ordering::SeqCst)
    }

    /// Presents `inner` as a store other processes share (one without change events).
    pub fn presented_as_shared(mut self) -> Self {
        self.presented_as_shared = true;
        self
    }

    /// How many times the keys were listed.
    pub fn list_keys_calls(&self) -> u64 {
        self.list_keys_calls.load(Ordering::SeqCst)
    }

    /// Makes budget deletions fail as if the store were down, or work again.
    pub fn refuse_budget_deletes(&self, refuse: bool) {
        self.refuse_budget_deletes.store(refuse, Ordering::SeqCst);
    }

    /// Revokes virtual key `name` just before the next budget is created: a `DELETE`
    /// that lands between a key's creation and its budget's.
    pub fn revoke_before_next_budget(&self, name: &str) {
        *self
            .revoke_before_budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(name.to_owned());
    }

    /// Keeps request records in memory rather than in `inner`.
    pub fn requests_in_memory(mut self) -> Self {
        self.requests = Some(MemoryStore::new());
        self
    }

    /// From now on `op` is applied to `inner`, then never answers.
    pub fn stall_after(&self, op: Stall) {
        *self.stall.lock().unwrap_or_else(PoisonError::into_inner) = Some(op);
    }

    async fn answer<T>(&self, op: Stall, result: T) -> T {
        if *self.stall.lock().unwrap_or_else(PoisonError::into_inner) == Some(op) {
            std::future::pending::<()>().await;
        }
        result
    }

    fn request_log(&self) -> &dyn RequestLog {
        match &self.requests {
            Some(memory) => memory,
            None => self.inner.as_ref(),
        }
    }
}

#[async_trait]
impl KeyStore for Forwarding {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.inner.insert_key(key).await
    }
    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        self.inner.get_key(id).await
    }
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.list_keys_calls.fetch_add(1, Ordering::SeqCst);
        let mut keys = self.inner.list_keys().await?;
        ListingHold::apply(&self.listing_hold).await;
        let rewrite = *self
            .listing_rewrite
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(rewrite) = rewrite {
            keys.iter_mut().for_each(rewrite);
        }
        Ok(keys)
    }
    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        self.inner.update_metadata(id, metadata).await
    }
    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        self.inner.delete_key(id).await
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
        let result = self
            .inner
            .transition(id, to, trigger, reason, cooldown_until, now)
            .await;
        self.answer(Stall::Transition, result).await
    }
    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        self.inner.transitions(id).await
    }
}

#[async_trait]
impl UsageLedger for Forwarding {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        let result = self.inner.reserve(charge).await;
        self.answer(Stall::Reserve, result).await
    }
    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        let result = self.inner.settle(charge, settlement).await;
        self.answer(Stall::Settle, result).await
    }
    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        let result = self.inner.release(charge, settlement).await;
        self.answer(Stall::Release, result).await
    }
    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        self.inner.quota_snapshot(id, limits, now).await
    }
}

#[async_trait]
impl BudgetStore for Forwarding {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.inner.put_budget(budget, spent, now).await
    }
    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let revoke = self
            .revoke_before_budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(name) = revoke {
            self.inner.revoke_virtual_key(&name, now).await?;
        }
        self.inner.insert_budget(budget, spent, now).await
    }
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.inner.redefine_budget(budget, now).await
    }
    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        self.list_budgets_calls.fetch_add(1, Ordering::SeqCst);
        let budgets = self.inner.list_budgets().await;
        ListingHold::apply(&self.budget_listing_hold).await;
        budgets
    }
    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        self.inner.budget_statuses(now).await
    }
    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        self.inner.budget_status(id, now).await
    }
    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        if self.refuse_budget_deletes.load(Ordering::SeqCst) {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "budget deletes refused by the test",
            ));
        }
        self.inner.delete_budget(id).await
    }
    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        self.inner.add_spend(ids, cost, now).await
    }
    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        self.inner.reclaim_reservations(taken_before, now).await
    }
}

#[async_trait]
impl RequestLog for Forwarding {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        self.request_log().save_request(record).await
    }
    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        self.request_log().get_request(id).await
    }
}

#[async_trait]
impl VirtualKeyStore for Forwarding {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.inner.insert_virtual_key(key).await
    }
    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        self.inner.list_virtual_keys().await
    }
    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        let undecodable = self
            .undecodable_virtual_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            == Some(name);
        if undecodable {
            return Err(StoreError::new(
                StoreErrorKind::Invalid,
                format!("virtual key {name}: bad json"),
            ));
        }
        self.inner.get_virtual_key(name).await
    }
    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.inner.update_virtual_key(key).await
    }
    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        self.inner.rotate_virtual_key(name, token_sha256).await
    }
    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        self.inner.revoke_virtual_key(name, at).await
    }
    async fn announce_virtual_key(&self, name: &str) -> Result<(), StoreError> {
        self.inner.announce_virtual_key(name).await
    }
}

#[async_trait]
impl StateStore for Forwarding {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn is_shared(&self) -> bool {
        self.presented_as_shared || self.inner.is_shared()
    }
    async fn changes(&self) -> Result<Option<StoreChanges>, StoreError> {
        let Some(feed) = &self.change_feed else {
            return self.inner.changes().await;
        };
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        *feed.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Box::pin(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move { receiver.recv().await.map(|change| (change, receiver)) },
        ))))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
