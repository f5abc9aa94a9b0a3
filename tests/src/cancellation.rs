//! A caller that drops a routing future before it finishes (a timeout of its own, a
//! client gone): the reservation is not left held, the estimate is charged because the
//! provider may bill the call, and the request is audited as cancelled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
use apikeyrouter::{
    BudgetStatus, EmbeddingIntent, FailureKind, KeyMetadata, KeyState, Money, Objective, Outcome,
};
use apikeyrouter_adapters_stores::MemoryStore;

use crate::forwarding::{Forwarding, Stall};
use crate::support::{Harness, ask};

/// A router whose one key hangs on every call, under a daily hard budget of $10.
async fn hanging_under_a_budget() -> Harness {
    let h = Harness::new(|b| b.attempt_timeout(Duration::from_secs(30))).await;
    let sim = h.provider("openai");
    sim.set_default_behaviour(Behaviour::failing(FailurePlan::Always(Failure::Hang(
        Duration::from_secs(60),
    ))));
    h.key("openai", 1, KeyMetadata::default()).await;
    h.daily_hard_budget("day", 10.0).await;
    h
}

/// Starts `call`, gives up on it mid-call, and returns the budget once its
/// reservation is settled, with the request's audit record.
async fn give_up_on<T>(
    h: &Harness,
    call: impl Future<Output = T>,
) -> (BudgetStatus, apikeyrouter::AuditRecord) {
    let gave_up = tokio::time::timeout(Duration::from_millis(50), call).await;
    assert!(gave_up.is_err(), "the call answered before it was given up");
    let mut status = h.router.budgets().await.unwrap().remove(0);
    for _ in 0..200 {
        if status.reserved == Money::ZERO {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        status = h.router.budgets().await.unwrap().remove(0);
    }
    let records = h.audit_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    (status, records.into_iter().next().unwrap())
}

/// The key counted no request, failure or failure streak.
fn assert_no_health_counted(key: &apikeyrouter::KeyInfo) {
    assert_eq!(
        (
            key.stats.requests,
            key.stats.failures,
            key.stats.consecutive_failures
        ),
        (0, 0, 0)
    );
}

fn assert_charged_and_audited(status: &BudgetStatus, record: &apikeyrouter::AuditRecord) {
    assert_eq!(
        status.reserved,
        Money::ZERO,
        "the reservation is still held"
    );
    let estimate = record.estimated_cost.expect("the model is priced");
    assert!(estimate > Money::ZERO);
    assert_eq!(status.spent, estimate, "the estimate is spent");
    let Outcome::Failure { code, message } = &record.outcome else {
        panic!("a cancelled request audited as {:?}", record.outcome);
    };
    assert_eq!(code, "caller_cancelled");
    assert!(message.contains("during the provider call"), "{message}");
    assert!(record.decision.is_some());
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.key_id.as_ref(), Some(&record.attempts[0].key_id));
}

#[tokio::test]
async fn a_dropped_route_charges_its_estimate_and_is_audited() {
    let h = hanging_under_a_budget().await;
    let call = h.router.route(
        ask("gpt-4o", "hello").with_max_tokens(200),
        Objective::default(),
    );
    let (status, record) = give_up_on(&h, call).await;
    assert_charged_and_audited(&status, &record);
    assert_eq!(record.requested_model.as_str(), "gpt-4o");
    // The caller's impatience says nothing about the key: its health counters stay
    // as they were, and only the estimate it may be billed is added.
    let key = &h.router.keys().await.unwrap()[0];
    assert_no_health_counted(key);
    assert_eq!(key.stats.success_ewma, 1.0);
    assert_eq!(key.stats.cost, record.estimated_cost.unwrap());
}

/// Clients that keep timing out before the provider answers do not build up a
/// failure streak: the key stays available and the next genuine failure is its first,
/// which does not yet put it into cooldown (three in a row do).
#[tokio::test]
async fn callers_giving_up_do_not_push_a_key_towards_cooldown() {
    let h = hanging_under_a_budget().await;
    for _ in 0..4 {
        let call = h.router.route(ask("gpt-4o", "hello"), Objective::default());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call)
                .await
                .is_err()
        );
    }
    // The four abandoned calls are settled in the background.
    let mut budget = h.router.budgets().await.unwrap().remove(0);
    for _ in 0..200 {
        if budget.reserved == Money::ZERO {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        budget = h.router.budgets().await.unwrap().remove(0);
    }
    assert_eq!(budget.reserved, Money::ZERO, "a reservation is still held");
    assert_eq!(h.audit_records().await.len(), 4);
    let key = &h.router.keys().await.unwrap()[0];
    assert!(budget.spent > Money::ZERO, "the estimates are charged");
    assert_eq!(key.stats.cost, budget.spent);
    assert_eq!((key.stats.failures, key.stats.consecutive_failures), (0, 0));
    assert_eq!(key.state, KeyState::Available);

    h.provider("openai")
        .set_default_behaviour(Behaviour::failing(FailurePlan::Always(
            Failure::ServerError,
        )));
    assert!(
        h.router
            .route(ask("gpt-4o", "hello"), Objective::default())
            .await
            .is_err()
    );
    let key = &h.router.keys().await.unwrap()[0];
    assert_eq!((key.stats.failures, key.stats.consecutive_failures), (1, 1));
    assert_eq!(key.state, KeyState::Available, "{:?}", key.state_reason);
}

#[tokio::test]
async fn a_stream_dropped_before_it_starts_is_settled_the_same_way() {
    let h = hanging_under_a_budget().await;
    let call = h.router.route_stream(
        ask("gpt-4o", "hello").with_max_tokens(200),
        Objective::default(),
    );
    let (status, record) = give_up_on(&h, call).await;
    assert_charged_and_audited(&status, &record);
}

#[tokio::test]
async fn dropped_embeddings_are_settled_the_same_way() {
    let h = hanging_under_a_budget().await;
    let intent = EmbeddingIntent {
        model: "text-embedding-3-small".into(),
        input: vec!["a text to embed".into()],
        dimensions: None,
        tenant: None,
        tags: Default::default(),
    };
    let call = h.router.embed(intent, Objective::default());
    let (status, record) = give_up_on(&h, call).await;
    assert_charged_and_audited(&status, &record);
}

/// A router on a memory store behind a [`Forwarding`] one, with one key and a daily
/// hard budget of $10; the provider answers at once, or fails every call.
async fn behind_a_forwarding_store(failing: bool) -> (Harness, Arc<Forwarding>) {
    let store = Arc::new(Forwarding::to(Arc::new(MemoryStore::new())));
    let h = Harness::new(|b| b.store(store.clone())).await;
    let sim = h.provider("openai");
    if failing {
        sim.set_default_behaviour(Behaviour::failing(FailurePlan::Always(
            Failure::ServerError,
        )));
    }
    h.key("openai", 1, KeyMetadata::default()).await;
    h.daily_hard_budget("day", 10.0).await;
    (h, store)
}

fn cancelled_because(record: &apikeyrouter::AuditRecord) -> &str {
    match &record.outcome {
        Outcome::Failure { code, message } if code == "caller_cancelled" => message,
        other => panic!("not a cancelled request: {other:?}"),
    }
}

#[tokio::test]
async fn dropped_while_the_store_settles_it_is_counted_once() {
    let (h, store) = behind_a_forwarding_store(false).await;
    store.stall_after(Stall::Settle);
    let call = h.router.route(
        ask("gpt-4o", "hello").with_max_tokens(200),
        Objective::default(),
    );
    let (status, record) = give_up_on(&h, call).await;
    assert!(cancelled_because(&record).contains("while the store settled"));
    let key = &h.router.keys().await.unwrap()[0];
    assert_eq!((key.stats.requests, key.stats.failures), (1, 0));
    // The actual cost once; not the estimate on top of it.
    assert!(key.stats.cost > Money::ZERO);
    assert_eq!(
        (status.spent, status.reserved),
        (key.stats.cost, Money::ZERO)
    );
    assert!(status.spent < record.estimated_cost.unwrap());
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].failure, None);
}

#[tokio::test]
async fn dropped_while_the_store_releases_a_failed_call_it_spends_nothing() {
    let (h, store) = behind_a_forwarding_store(true).await;
    store.stall_after(Stall::Release);
    let call = h.router.route(
        ask("gpt-4o", "hello").with_max_tokens(200),
        Objective::default(),
    );
    let (status, record) = give_up_on(&h, call).await;
    assert!(cancelled_because(&record).contains("while the store settled"));
    assert_eq!((status.spent, status.reserved), (Money::ZERO, Money::ZERO));
    let key = &h.router.keys().await.unwrap()[0];
    assert_eq!((key.stats.requests, key.stats.failures), (1, 1));
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].failure, Some(FailureKind::ServerError));
}

#[tokio::test]
async fn dropped_while_the_reservation_is_made_it_is_released() {
    let (h, store) = behind_a_forwarding_store(false).await;
    store.stall_after(Stall::Reserve);
    let call = h.router.route(
        ask("gpt-4o", "hello").with_max_tokens(200),
        Objective::default(),
    );
    let (status, record) = give_up_on(&h, call).await;
    assert!(cancelled_because(&record).contains("while its reservation was made"));
    assert_eq!((status.spent, status.reserved), (Money::ZERO, Money::ZERO));
    assert!(record.attempts.is_empty());
    // No call was made, so the key has nothing to learn.
    let key = &h.router.keys().await.unwrap()[0];
    assert_no_health_counted(key);
}

/// Dropped after its call was released, while the key's cooldown is written: nothing
/// is left to settle, and the record says so.
#[tokio::test]
async fn dropped_after_its_last_call_was_settled_it_leaves_nothing_held() {
    let store = Arc::new(Forwarding::to(Arc::new(MemoryStore::new())));
    let h = Harness::new(|b| b.store(store.clone()).max_attempts(1)).await;
    let sim = h.provider("openai");
    sim.set_default_behaviour(Behaviour::failing(FailurePlan::Always(
        Failure::RateLimited { retry_after: None },
    )));
    h.key("openai", 1, KeyMetadata::default()).await;
    h.daily_hard_budget("day", 10.0).await;
    store.stall_after(Stall::Transition);
    let call = h.router.route(
        ask("gpt-4o", "hello").with_max_tokens(200),
        Objective::default(),
    );
    let (status, record) = give_up_on(&h, call).await;
    assert!(
        cancelled_because(&record).contains("after its last provider call was settled"),
        "{record:?}"
    );
    assert_eq!((status.spent, status.reserved), (Money::ZERO, Money::ZERO));
    let key = &h.router.keys().await.unwrap()[0];
    assert_eq!((key.stats.requests, key.stats.failures), (1, 1));
    assert_eq!(key.state, KeyState::Throttled);
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].failure, Some(FailureKind::RateLimited));
}
