//! Redis round trips per routed request: reserving before the provider call and
//! settling (or releasing) after it take one each, so a served request costs two.
//!
//! The request-record write is left out of the count (it is moving off the request
//! path): the store under test keeps request records in memory, and follows no key
//! changes, so every round trip counted is one the route path itself made.

use std::sync::Arc;

use apikeyrouter::providers::{Behaviour, Failure, FailurePlan, SimulatedProvider};
use apikeyrouter::{ApiKeyRouter, KeyMetadata, Objective};
use apikeyrouter_adapters_stores::{MemoryStore, RedisStore};
use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, KeyStore, RequestLog, Settled, Settlement, StateStore,
    StoreError, UsageLedger,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetStatus, KeyId, KeyMetadata as Metadata, KeyState, KeyStats, Money,
    QuotaLimits, QuotaSnapshot, RequestId, StateTransition, Timestamp, TransitionTrigger,
};
use async_trait::async_trait;

use crate::support::ask;

/// Redis for everything but the request log.
struct RoutePathOnly {
    redis: Arc<RedisStore>,
    requests: MemoryStore,
}

#[async_trait]
impl KeyStore for RoutePathOnly {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        self.redis.insert_key(key).await
    }
    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        self.redis.get_key(id).await
    }
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.redis.list_keys().await
    }
    async fn update_metadata(&self, id: &KeyId, metadata: Metadata) -> Result<ApiKey, StoreError> {
        self.redis.update_metadata(id, metadata).await
    }
    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        self.redis.delete_key(id).await
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
        self.redis
            .transition(id, to, trigger, reason, cooldown_until, now)
            .await
    }
    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        self.redis.transitions(id).await
    }
}

#[async_trait]
impl UsageLedger for RoutePathOnly {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        self.redis.reserve(charge).await
    }
    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        self.redis.settle(charge, settlement).await
    }
    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        self.redis.release(charge, settlement).await
    }
    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        self.redis.quota_snapshot(id, limits, now).await
    }
}

#[async_trait]
impl BudgetStore for RoutePathOnly {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        self.redis.put_budget(budget, spent, now).await
    }
    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        self.redis.list_budgets().await
    }
    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        self.redis.budget_statuses(now).await
    }
    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        self.redis.delete_budget(id).await
    }
    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        self.redis.add_spend(ids, cost, now).await
    }
}

#[async_trait]
impl RequestLog for RoutePathOnly {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<(), StoreError> {
        self.requests.save_request(record).await
    }
    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        self.requests.get_request(id).await
    }
}

#[async_trait]
impl StateStore for RoutePathOnly {
    fn kind(&self) -> &'static str {
        "redis"
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.redis.ping().await
    }
}

/// A router on a fresh Redis namespace with two keys, `ok` answering and `flaky`
/// failing every call with a 500 (below the cooldown threshold for a few calls, so
/// no state transition adds round trips).
async fn router() -> (ApiKeyRouter, Arc<RedisStore>, KeyId) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let namespace = format!("round-trips-{}-{nanos}", std::process::id());
    let redis = Arc::new(RedisStore::connect(&url, &namespace).await.unwrap_or_else(|e| {
        panic!("Redis unreachable at {url}: {e}; run `cargo xtask services up` (or set REDIS_URL)")
    }));
    let store = RoutePathOnly {
        redis: redis.clone(),
        requests: MemoryStore::new(),
    };
    let router = ApiKeyRouter::builder()
        .store(Arc::new(store))
        .build()
        .await
        .unwrap();
    let sim = Arc::new(SimulatedProvider::new());
    router.register_provider("openai", sim.clone());
    router
        .register_key("sk-ok-000000000001", "openai", KeyMetadata::default())
        .await
        .unwrap();
    let flaky = router
        .register_key("sk-flaky-0000000002", "openai", KeyMetadata::default())
        .await
        .unwrap()
        .id;
    sim.set_behaviour(
        &flaky,
        Behaviour::failing(FailurePlan::always(Failure::ServerError)),
    );
    (router, redis, flaky)
}

#[tokio::test]
async fn a_served_request_costs_two_round_trips_and_a_failover_four() {
    let (router, redis, flaky) = router().await;
    let mut saw_failover = false;
    // Fairness spreads requests over both keys: within a few requests one goes to
    // the flaky key first and fails over.
    for _ in 0..2 {
        let before = redis.round_trips();
        let served = router
            .route(ask("gpt-4o", "hi"), Objective::default())
            .await
            .unwrap();
        let n_trips = redis.round_trips() - before;
        match served.attempts.as_slice() {
            // reserve + settle
            [only] => {
                assert!(only.failure.is_none());
                assert_eq!(n_trips, 2);
            }
            // reserve + release on the flaky key, reserve + settle on the other
            [failed, ok] => {
                assert_eq!(failed.key_id, flaky);
                assert!(ok.failure.is_none());
                assert_eq!(n_trips, 4);
                saw_failover = true;
            }
            other => panic!("unexpected attempts: {other:?}"),
        }
    }
    assert!(saw_failover, "no request was tried on the flaky key first");
}
