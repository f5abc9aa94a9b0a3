//! The outage's money reaches the shared store when it answers again: the
//! reservations it held are released and the mirror's spend added, once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, Clock, KeyOutcome, KeyStore, ReclaimedReservations,
    RequestLog, Settled, Settlement, StateStore, StoreError, StoreErrorKind, SystemClock,
    UsageLedger, Verdict, VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetPeriod, BudgetScope, BudgetStatus, Enforcement, KeyId, KeyMaterial,
    KeyMetadata, KeyState, KeyStats, Money, ProviderId, QuotaLimits, QuotaSnapshot, RequestId,
    ReservationId, StateTransition, Timestamp, TokenUsage, TransitionTrigger, VirtualKey,
};
use async_trait::async_trait;

use super::FailOpenStore;
use crate::memory::MemoryStore;

/// The wall clock, read once: the wrapper dates the mirror's budgets by it.
fn now() -> Timestamp {
    static NOW: OnceLock<Timestamp> = OnceLock::new();
    *NOW.get_or_init(|| SystemClock.now())
}

/// A memory store standing in for Redis, which can be switched off.
#[derive(Debug, Default)]
struct Switchable {
    inner: MemoryStore,
    down: AtomicBool,
    /// Refuses `add_spend` as unavailable while everything else answers.
    spend_down: AtomicBool,
    /// `add_spend` never answers.
    spend_stalls: AtomicBool,
    /// Refuses `release` and `add_spend` as invalid (an error no retry can mend).
    refuses: AtomicBool,
}

impl Switchable {
    fn up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "connection refused",
            ));
        }
        Ok(())
    }

    fn accepts(&self) -> Result<(), StoreError> {
        if self.refuses.load(Ordering::Relaxed) {
            return Err(StoreError::new(
                StoreErrorKind::Invalid,
                "corrupt budget ledger",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl KeyStore for Switchable {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.up()?;
        self.inner.insert_key(key).await
    }
    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        self.up()?;
        self.inner.get_key(id).await
    }
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.up()?;
        self.inner.list_keys().await
    }
    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        self.up()?;
        self.inner.update_metadata(id, metadata).await
    }
    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        self.up()?;
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
        self.up()?;
        self.inner
            .transition(id, to, trigger, reason, cooldown_until, now)
            .await
    }
    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        self.up()?;
        self.inner.transitions(id).await
    }
}

#[async_trait]
impl UsageLedger for Switchable {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        self.up()?;
        self.inner.reserve(charge).await
    }
    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        self.up()?;
        self.inner.settle(charge, settlement).await
    }
    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        self.up()?;
        self.accepts()?;
        self.inner.release(charge, settlement).await
    }
    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        self.up()?;
        self.inner.quota_snapshot(id, limits, now).await
    }
}

#[async_trait]
impl BudgetStore for Switchable {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.up()?;
        self.inner.put_budget(budget, spent, now).await
    }
    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.up()?;
        self.inner.insert_budget(budget, spent, now).await
    }
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.up()?;
        self.inner.redefine_budget(budget, now).await
    }
    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        self.up()?;
        self.inner.list_budgets().await
    }
    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        self.up()?;
        self.inner.budget_statuses(now).await
    }
    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        self.up()?;
        self.inner.budget_status(id, now).await
    }
    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        self.up()?;
        self.inner.delete_budget(id).await
    }
    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        self.up()?;
        self.accepts()?;
        if self.spend_down.load(Ordering::Relaxed) {
            return Err(StoreError::new(StoreErrorKind::Unavailable, "timed out"));
        }
        if self.spend_stalls.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        self.inner.add_spend(ids, cost, now).await
    }
    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        self.up()?;
        self.inner.reclaim_reservations(taken_before, now).await
    }
}

#[async_trait]
impl RequestLog for Switchable {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        self.up()?;
        self.inner.save_request(record).await
    }
    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        self.up()?;
        self.inner.get_request(id).await
    }
}

#[async_trait]
impl VirtualKeyStore for Switchable {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.up()?;
        self.inner.insert_virtual_key(key).await
    }
    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        self.up()?;
        self.inner.list_virtual_keys().await
    }
    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        self.up()?;
        self.inner.get_virtual_key(name).await
    }
    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.up()?;
        self.inner.update_virtual_key(key).await
    }
    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        self.up()?;
        self.inner.rotate_virtual_key(name, token_sha256).await
    }
    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        self.up()?;
        self.inner.revoke_virtual_key(name, at).await
    }
    async fn announce_virtual_key(&self, name: &str) -> Result<(), StoreError> {
        self.up()?;
        self.inner.announce_virtual_key(name).await
    }
}

#[async_trait]
impl StateStore for Switchable {
    fn kind(&self) -> &'static str {
        "switchable"
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.up()
    }
}

/// A shared store with key `k1` and a hard daily budget `b` of $10 that has spent $1,
/// wrapped fail-open.
async fn fail_open() -> (Arc<Switchable>, FailOpenStore) {
    let shared = Arc::new(Switchable::default());
    let material = KeyMaterial::parse("sk-test-0000000000").unwrap();
    let key = ApiKey::new(
        KeyId::new("k1"),
        ProviderId::new("openai"),
        material,
        KeyMetadata::default(),
        now(),
    );
    shared.insert_key(key).await.unwrap();
    let budget = Budget::new(
        "b",
        BudgetScope::Global,
        10.0,
        BudgetPeriod::Daily,
        Enforcement::Hard,
    )
    .unwrap();
    shared
        .put_budget(budget, Money::from_usd(1.0), now())
        .await
        .unwrap();
    let store = FailOpenStore::start(shared.clone()).await.unwrap();
    (shared, store)
}

fn charge(reservation: u64, est_usd: f64, now: Timestamp) -> Charge {
    Charge {
        reservation: ReservationId(reservation),
        key_id: KeyId::new("k1"),
        limits: QuotaLimits::default(),
        est_tokens: 100,
        est_cost: Money::from_usd(est_usd),
        budget_ids: vec!["b".to_owned()],
        client: None,
        now,
    }
}

fn outcome(cost_usd: f64, now: Timestamp) -> Settlement {
    Settlement {
        outcome: KeyOutcome {
            verdict: Verdict::Succeeded,
            latency: Duration::from_millis(100),
            usage: TokenUsage {
                prompt_tokens: 10,
                completion_tokens: 20,
                cached_tokens: 0,
            },
            cost: Money::from_usd(cost_usd),
            now,
        },
        observation: None,
    }
}

/// A request reserved and settled for `cost_usd` at `at` through the wrapper.
async fn served(store: &FailOpenStore, n: u64, cost_usd: f64, at: Timestamp) {
    store.reserve(&charge(n, 1.0, at)).await.unwrap();
    store
        .settle(&charge(n, 1.0, at), &outcome(cost_usd, at))
        .await
        .unwrap();
}

/// The next call tries the shared store rather than waiting out the retry second.
fn probe_now(store: &FailOpenStore) {
    store.retry_at_ms.store(0, Ordering::Relaxed);
}

/// The shared store answers again, and the next call will find out.
fn back_up(shared: &Switchable, store: &FailOpenStore) {
    shared.down.store(false, Ordering::Relaxed);
    probe_now(store);
}

/// The shared budget's (spent, reserved), read behind the wrapper's back.
async fn shared_budget(shared: &Switchable, now: Timestamp) -> (Money, Money) {
    let status = &shared.inner.budget_statuses(now).await.unwrap()[0];
    (status.spent, status.reserved)
}

fn usd(v: f64) -> Money {
    Money::from_usd(v)
}

#[tokio::test]
async fn spend_of_the_outage_is_added_to_the_shared_budget_when_it_answers() {
    let (shared, store) = fail_open().await;
    shared.down.store(true, Ordering::Relaxed);

    for (n, cost) in [(1, 0.5), (2, 0.25)] {
        served(&store, n, cost, now()).await;
    }
    let released = charge(3, 1.0, now());
    store.reserve(&released).await.unwrap();
    store
        .release(&released, &outcome(0.0, now()))
        .await
        .unwrap();
    assert!(store.health().degraded);
    // The mirror counted it; the shared store has not seen it.
    let local = &store.local.budget_statuses(now()).await.unwrap()[0];
    assert_eq!((local.spent, local.reserved), (usd(1.75), Money::ZERO));
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), Money::ZERO));

    back_up(&shared, &store);
    store.ping().await.unwrap();

    assert!(!store.health().degraded);
    assert_eq!(
        shared_budget(&shared, now()).await,
        (usd(1.75), Money::ZERO)
    );
    // Paid once: a later answer adds nothing more.
    store.ping().await.unwrap();
    let statuses = store.budget_statuses(now()).await.unwrap();
    assert_eq!(
        (statuses[0].spent, statuses[0].reserved),
        (usd(1.75), Money::ZERO)
    );
}

#[tokio::test]
async fn a_shared_reservation_finished_during_the_outage_is_released_there_and_its_spend_added() {
    let (shared, store) = fail_open().await;
    let settled = charge(1, 2.0, now());
    let released = charge(2, 3.0, now());
    store.reserve(&settled).await.unwrap();
    store.reserve(&released).await.unwrap();
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), usd(5.0)));

    shared.down.store(true, Ordering::Relaxed);
    store.settle(&settled, &outcome(0.5, now())).await.unwrap();
    store
        .release(&released, &outcome(0.0, now()))
        .await
        .unwrap();
    assert!(store.health().degraded);
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), usd(5.0)));

    back_up(&shared, &store);
    store.ping().await.unwrap();

    // Both reservations gone from the shared budget, the actual cost counted once.
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.5), Money::ZERO));
    let stats = shared.inner.get_key(&KeyId::new("k1")).await.unwrap().stats;
    assert_eq!(stats.requests, 2, "the key's counters saw both calls");
}

#[tokio::test]
async fn what_the_shared_store_fails_to_take_stays_owed() {
    let (shared, store) = fail_open().await;
    shared.down.store(true, Ordering::Relaxed);
    served(&store, 1, 0.5, now()).await;

    // It answers the probe, then times out on the pay-back: degraded again.
    shared.down.store(false, Ordering::Relaxed);
    shared.spend_down.store(true, Ordering::Relaxed);
    probe_now(&store);
    store.ping().await.unwrap();
    assert!(store.health().degraded);
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), Money::ZERO));

    shared.spend_down.store(false, Ordering::Relaxed);
    probe_now(&store);
    store.ping().await.unwrap();
    assert!(!store.health().degraded);
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.5), Money::ZERO));
}

#[tokio::test]
async fn what_the_shared_store_refuses_as_invalid_is_dropped_not_retried_forever() {
    let (shared, store) = fail_open().await;
    let held_there = charge(1, 2.0, now());
    store.reserve(&held_there).await.unwrap();
    shared.down.store(true, Ordering::Relaxed);
    store
        .settle(&held_there, &outcome(0.5, now()))
        .await
        .unwrap();
    served(&store, 2, 0.25, now()).await;

    // Back, but it refuses both the release and the spend as invalid.
    shared.refuses.store(true, Ordering::Relaxed);
    back_up(&shared, &store);
    store.ping().await.unwrap();
    assert!(!store.health().degraded, "a refusal is not an outage");
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), usd(2.0)));

    // Nothing of it is owed any more: accepting again changes nothing.
    shared.refuses.store(false, Ordering::Relaxed);
    store.ping().await.unwrap();
    assert!(!store.owing.load(Ordering::Relaxed));
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), usd(2.0)));
}

#[tokio::test]
async fn spend_of_a_period_closed_during_the_outage_is_not_carried_into_the_next() {
    let (shared, store) = fail_open().await;
    let tomorrow = now().plus(Duration::from_secs(86_400));
    shared.down.store(true, Ordering::Relaxed);
    served(&store, 1, 0.5, now()).await;

    // The store answers again the next day: the call that finds it rolls the day.
    back_up(&shared, &store);
    store.reserve(&charge(2, 1.0, tomorrow)).await.unwrap();

    assert!(!store.health().degraded);
    assert_eq!(
        shared_budget(&shared, tomorrow).await,
        (Money::ZERO, usd(1.0))
    );
    assert!(store.owed().is_empty(), "nothing left owed");
}

#[tokio::test]
async fn spend_of_a_day_the_shared_store_has_closed_is_not_given_to_the_next() {
    let (shared, store) = fail_open().await;
    let tomorrow = now().plus(Duration::from_secs(86_400));
    shared.down.store(true, Ordering::Relaxed);
    served(&store, 1, 0.5, now()).await;
    // Another instance served tomorrow's first request through the shared store.
    shared.down.store(false, Ordering::Relaxed);
    let other = charge(2, 1.0, tomorrow);
    shared.inner.reserve(&other).await.unwrap();
    shared
        .inner
        .settle(&other, &outcome(0.25, tomorrow))
        .await
        .unwrap();

    // A probe without a time finds the store back.
    probe_now(&store);
    store.ping().await.unwrap();

    assert_eq!(
        shared_budget(&shared, tomorrow).await,
        (usd(0.25), Money::ZERO)
    );
    assert!(store.owed().is_empty());
}

#[tokio::test]
async fn a_pay_back_cut_off_by_its_caller_is_paid_by_a_later_one() {
    let (shared, store) = fail_open().await;
    shared.down.store(true, Ordering::Relaxed);
    served(&store, 1, 0.5, now()).await;

    shared.down.store(false, Ordering::Relaxed);
    shared.spend_stalls.store(true, Ordering::Relaxed);
    probe_now(&store);
    let cut = tokio::time::timeout(Duration::from_millis(50), store.ping()).await;
    assert!(cut.is_err(), "the pay-back stalled and its caller gave up");
    assert!(!store.health().degraded);

    // Meanwhile another instance spent $2 through the shared store.
    shared
        .inner
        .add_spend(&["b".to_owned()], usd(2.0), now())
        .await
        .unwrap();

    shared.spend_stalls.store(false, Ordering::Relaxed);
    store.ping().await.unwrap();
    assert_eq!(shared_budget(&shared, now()).await, (usd(3.5), Money::ZERO));
    // The mirror was refreshed from it too, by the later call.
    let mirror = &store.local.budget_statuses(now()).await.unwrap()[0];
    assert_eq!((mirror.spent, mirror.reserved), (usd(3.5), Money::ZERO));
    store.ping().await.unwrap();
    assert_eq!(
        shared_budget(&shared, now()).await,
        (usd(3.5), Money::ZERO),
        "paid once"
    );
}

#[tokio::test]
async fn spend_finished_on_the_mirror_after_the_pay_back_is_paid_on_a_later_answer() {
    let (shared, store) = fail_open().await;
    let late = charge(1, 1.0, now());
    shared.down.store(true, Ordering::Relaxed);
    store.reserve(&late).await.unwrap();
    back_up(&shared, &store);
    store.ping().await.unwrap();
    assert!(!store.health().degraded);

    // Its settlement had already gone to the mirror when the store came back.
    store
        .local
        .settle(&late, &outcome(0.5, now()))
        .await
        .unwrap();
    store.finished_locally(&late, &outcome(0.5, now()), usd(0.5));
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), Money::ZERO));

    store.ping().await.unwrap();
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.5), Money::ZERO));
}

/// Stale reservations are reclaimed in the shared store, where a stopped instance
/// left them; while it is unreachable the sweep reports the outage.
#[tokio::test]
async fn stale_reservations_are_reclaimed_in_the_shared_store() {
    let (shared, store) = fail_open().await;
    store.reserve(&charge(1, 2.0, now())).await.unwrap();
    let later = now().plus(Duration::from_secs(3_600));

    shared.down.store(true, Ordering::Relaxed);
    let err = store.reclaim_reservations(later, later).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable);
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), usd(2.0)));

    shared.down.store(false, Ordering::Relaxed);
    let reclaimed = store.reclaim_reservations(later, later).await.unwrap();
    assert_eq!(
        (
            reclaimed[0].budget_id.as_str(),
            reclaimed[0].count,
            reclaimed[0].amount
        ),
        ("b", 1, usd(2.0))
    );
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), Money::ZERO));
}

#[tokio::test]
async fn a_budget_is_redefined_in_the_shared_store_then_in_the_mirror() {
    let (shared, store) = fail_open().await;
    store.reserve(&charge(1, 2.0, now())).await.unwrap();
    let wider = Budget::new(
        "b",
        BudgetScope::Global,
        20.0,
        BudgetPeriod::Daily,
        Enforcement::Soft,
    )
    .unwrap();

    shared.down.store(true, Ordering::Relaxed);
    let err = store
        .redefine_budget(wider.clone(), now())
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert_eq!(
        store.local.budget_statuses(now()).await.unwrap()[0].limit,
        usd(10.0)
    );

    back_up(&shared, &store);
    let status = store.redefine_budget(wider.clone(), now()).await.unwrap();
    assert_eq!(
        (status.limit, status.spent, status.reserved),
        (usd(20.0), usd(1.0), usd(2.0))
    );
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), usd(2.0)));
    let local = &store.local.budget_statuses(now()).await.unwrap()[0];
    assert_eq!(
        (local.limit, local.enforcement),
        (usd(20.0), Enforcement::Soft)
    );
    let degraded = store
        .budgets
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(degraded, [wider]);
}

/// Calls only the shared store serves (here the virtual keys) count for the outage as
/// the routing path's do: one that finds the store down degrades the instance at once,
/// one answered afterwards ends the outage and pays back the spend it owes.
#[tokio::test]
async fn calls_to_the_shared_store_alone_start_and_end_an_outage() {
    let (shared, store) = fail_open().await;
    shared.down.store(true, Ordering::Relaxed);
    let err = store.list_virtual_keys().await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert!(store.health().degraded, "degraded by the failed call");
    served(&store, 1, 0.5, now()).await;
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), Money::ZERO));

    back_up(&shared, &store);
    assert_eq!(store.list_virtual_keys().await.unwrap(), []);
    assert!(!store.health().degraded, "the answer ended the outage");
    assert_eq!(
        shared_budget(&shared, now()).await,
        (usd(1.5), Money::ZERO),
        "the outage's spend was paid back"
    );
}

/// Spend of an outage is paid back before a redefinition changes the period kind it
/// was counted in, so it is carried over with the rest of the period's spend rather
/// than dropped as belonging to a closed period.
#[tokio::test]
async fn outage_spend_is_paid_back_before_a_new_period_kind_takes_effect() {
    let (shared, store) = fail_open().await;
    shared.down.store(true, Ordering::Relaxed);
    served(&store, 1, 0.5, now()).await;
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.0), Money::ZERO));

    back_up(&shared, &store);
    let monthly = Budget::new(
        "b",
        BudgetScope::Global,
        10.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap();
    let status = store.redefine_budget(monthly, now()).await.unwrap();
    assert_eq!(status.period_end, now().start_of_next_month());
    assert_eq!(shared_budget(&shared, now()).await, (usd(1.5), Money::ZERO));
    assert!(!store.health().degraded);
}

/// One budget's status is read as the listing is (from the shared store, or during
/// an outage from the mirror, which counts the outage's spend); one virtual key only
/// from the shared store, so a store found down answers `Unavailable` and degrades.
#[tokio::test]
async fn one_budget_and_one_virtual_key_are_read_as_their_listings_are() {
    let (shared, store) = fail_open().await;
    let key = VirtualKey {
        name: "team".to_owned(),
        token_sha256: "a".repeat(64),
        tenant: None,
        models: None,
        rpm: Some(5),
        budget_usd: None,
        created_at: now(),
        revoked_at: None,
    };
    shared.inner.insert_virtual_key(key.clone()).await.unwrap();
    assert_eq!(store.get_virtual_key("team").await.unwrap(), key);
    assert_eq!(
        store.budget_status("b", now()).await.unwrap().spent,
        usd(1.0)
    );

    shared.down.store(true, Ordering::Relaxed);
    let err = store.get_virtual_key("team").await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert!(store.health().degraded, "degraded by the failed read");
    served(&store, 1, 0.5, now()).await;
    let status = store.budget_status("b", now()).await.unwrap();
    assert_eq!(
        status.spent,
        usd(1.5),
        "the mirror's, with the outage's spend"
    );
    assert_eq!(store.budget_statuses(now()).await.unwrap(), [status]);
}
