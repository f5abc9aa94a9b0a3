//! Redis round trips per routed request: reserving before the provider call and
//! settling (or releasing) after it take one each, so a served request costs two.
//!
//! The request-record write is left out of the count (it is moving off the request
//! path): the store under test keeps request records in memory. The router's own
//! background reads (each registration's key event read back, the first sweep of
//! stale reservations) are let finish before counting, so every round trip counted
//! is one the route path itself made.

use std::sync::Arc;

use apikeyrouter::providers::{Behaviour, Failure, FailurePlan, SimulatedProvider};
use apikeyrouter::{ApiKeyRouter, KeyMetadata, Objective};
use apikeyrouter_adapters_stores::RedisStore;
use apikeyrouter_domain::KeyId;

use crate::forwarding::Forwarding;
use crate::support::{ask, fresh_namespace, redis_store_in};

/// A router on a fresh Redis namespace with two keys, `ok` answering and `flaky`
/// failing every call with a 500 (below the cooldown threshold for a few calls, so
/// no state transition adds round trips).
async fn router() -> (ApiKeyRouter, Arc<RedisStore>, KeyId) {
    let redis = Arc::new(redis_store_in(&fresh_namespace("round-trips")).await);
    let store = Forwarding::to(redis.clone()).requests_in_memory();
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
    // The background reads are done once no round trip is made for 100 ms.
    loop {
        let made = redis.round_trips();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if redis.round_trips() == made {
            break;
        }
    }
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
