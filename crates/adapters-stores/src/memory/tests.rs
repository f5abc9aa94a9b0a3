//! Behaviour of [`MemoryStore`] through the state-store ports, including under
//! concurrent requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, KeyOutcome, KeyStore, RequestLog, StateStore,
    StoreErrorKind, UsageLedger,
};
use apikeyrouter_application::records::{AuditRecord, Outcome};
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetError, BudgetPeriod, BudgetScope, Enforcement, KeyId, KeyMaterial,
    KeyMetadata, KeyState, ModelId, Money, ProviderId, QuotaLimits, QuotaSnapshot, RequestId,
    ReservationId, Timestamp, TokenUsage, TransitionTrigger, WindowKind,
};

use super::MemoryStore;

/// A minute boundary (2026-11-27T10:30:00Z).
const NOW: Timestamp = Timestamp::from_millis(1_795_775_400_000);

fn key(id: &str, rpm: Option<u64>) -> ApiKey {
    ApiKey::new(
        KeyId::new(id),
        ProviderId::new("openai"),
        KeyMaterial::parse("sk-test-0000000000").unwrap(),
        KeyMetadata {
            rpm,
            ..Default::default()
        },
        NOW,
    )
}

fn hard_budget(id: &str, limit_usd: f64) -> Budget {
    Budget::new(
        id,
        BudgetScope::Global,
        limit_usd,
        BudgetPeriod::Daily,
        Enforcement::Hard,
    )
    .unwrap()
}

fn charge(reservation: u64, key_id: &str, rpm: Option<u64>, est_usd: f64) -> Charge {
    Charge {
        reservation: ReservationId(reservation),
        key_id: KeyId::new(key_id),
        limits: QuotaLimits {
            rpm,
            ..QuotaLimits::default()
        },
        est_tokens: 100,
        est_cost: Money::from_usd(est_usd),
        budget_ids: vec!["b".to_owned()],
        now: NOW,
    }
}

fn used(snapshot: &QuotaSnapshot, kind: WindowKind) -> u64 {
    snapshot
        .windows
        .iter()
        .find(|w| w.kind == kind)
        .map(|w| w.used)
        .unwrap()
}

fn record(id: &str) -> AuditRecord {
    AuditRecord {
        request_id: RequestId::new(id),
        correlation_id: None,
        tenant: None,
        tags: BTreeMap::new(),
        requested_model: ModelId::new("gpt-4o"),
        key_id: None,
        provider: None,
        model: None,
        decision: None,
        attempts: Vec::new(),
        usage: TokenUsage::default(),
        estimated_cost: None,
        actual_cost: None,
        outcome: Outcome::Success,
        started_at: NOW,
        finished_at: NOW,
    }
}

#[tokio::test]
async fn key_crud_round_trips_and_reports_conflict_and_not_found() {
    let store = MemoryStore::new();
    store.insert_key(key("k2", None)).await.unwrap();
    store.insert_key(key("k1", Some(10))).await.unwrap();

    let err = store.insert_key(key("k1", None)).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Conflict);
    assert_eq!(err.message, "key k1 already exists");

    let k1 = store.get_key(&KeyId::new("k1")).await.unwrap();
    assert_eq!(k1.metadata.rpm, Some(10));
    let ids: Vec<String> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id.to_string())
        .collect();
    assert_eq!(ids, ["k1", "k2"]);

    let updated = store
        .update_metadata(
            &KeyId::new("k1"),
            KeyMetadata {
                rpm: Some(20),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.metadata.rpm, Some(20));
    assert_eq!(
        store.get_key(&KeyId::new("k1")).await.unwrap().metadata.rpm,
        Some(20)
    );

    store.delete_key(&KeyId::new("k1")).await.unwrap();
    let missing = KeyId::new("k1");
    assert_eq!(
        store.get_key(&missing).await.unwrap_err().kind,
        StoreErrorKind::NotFound
    );
    assert_eq!(
        store.delete_key(&missing).await.unwrap_err().kind,
        StoreErrorKind::NotFound
    );
    assert_eq!(
        store.transitions(&missing).await.unwrap_err().kind,
        StoreErrorKind::NotFound
    );
    assert_eq!(
        store
            .update_metadata(&missing, KeyMetadata::default())
            .await
            .unwrap_err()
            .kind,
        StoreErrorKind::NotFound
    );
    assert_eq!(store.list_keys().await.unwrap().len(), 1);

    // The id is free again, with fresh transitions.
    store.insert_key(key("k1", None)).await.unwrap();
    assert!(store.transitions(&missing).await.unwrap().is_empty());
}

#[tokio::test]
async fn forbidden_transition_is_invalid_and_changes_nothing() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", None)).await.unwrap();
    let id = KeyId::new("k1");

    let err = store
        .transition(
            &id,
            KeyState::Recovering,
            TransitionTrigger::QuotaReset,
            "reset".to_owned(),
            None,
            NOW,
        )
        .await
        .unwrap_err();

    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(err.message, "key k1 cannot go from available to recovering");
    assert_eq!(store.get_key(&id).await.unwrap().state, KeyState::Available);
    assert!(store.transitions(&id).await.unwrap().is_empty());
}

#[tokio::test]
async fn transitions_are_recorded_in_order() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", None)).await.unwrap();
    let id = KeyId::new("k1");
    let cooldown = NOW.plus(Duration::from_secs(30));

    let first = store
        .transition(
            &id,
            KeyState::Throttled,
            TransitionTrigger::RateLimited,
            "429 from provider".to_owned(),
            Some(cooldown),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(
        (first.from, first.to),
        (KeyState::Available, KeyState::Throttled)
    );
    let throttled = store.get_key(&id).await.unwrap();
    assert_eq!(throttled.cooldown_until, Some(cooldown));
    assert_eq!(throttled.state_reason, "429 from provider");

    for (to, trigger) in [
        (KeyState::Available, TransitionTrigger::CooldownElapsed),
        (KeyState::Disabled, TransitionTrigger::Manual),
    ] {
        store
            .transition(&id, to, trigger, "next".to_owned(), None, cooldown)
            .await
            .unwrap();
    }

    let path: Vec<(KeyState, KeyState)> = store
        .transitions(&id)
        .await
        .unwrap()
        .iter()
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        path,
        [
            (KeyState::Available, KeyState::Throttled),
            (KeyState::Throttled, KeyState::Available),
            (KeyState::Available, KeyState::Disabled),
        ]
    );
    assert_eq!(store.get_key(&id).await.unwrap().state, KeyState::Disabled);
}

#[tokio::test]
async fn record_outcome_accumulates_usage_and_throttle_streak() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", None)).await.unwrap();
    let id = KeyId::new("k1");
    let rate_limited = KeyOutcome {
        success: false,
        rate_limited: true,
        latency: Duration::from_millis(50),
        usage: TokenUsage::default(),
        cost: Money::ZERO,
        now: NOW,
    };
    store.record_outcome(&id, rate_limited).await.unwrap();
    let stats = store.record_outcome(&id, rate_limited).await.unwrap();
    assert_eq!((stats.failures, stats.throttle_streak), (2, 2));

    let stats = store
        .record_outcome(
            &id,
            KeyOutcome {
                success: true,
                rate_limited: false,
                latency: Duration::from_millis(200),
                usage: TokenUsage {
                    prompt_tokens: 30,
                    completion_tokens: 12,
                    cached_tokens: 0,
                },
                cost: Money::from_usd(0.002),
                now: NOW,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (stats.requests, stats.successes, stats.throttle_streak),
        (3, 1, 0)
    );
    assert_eq!((stats.prompt_tokens, stats.completion_tokens), (30, 12));
    assert_eq!(stats.cost, Money::from_usd(0.002));
    assert_eq!(store.get_key(&id).await.unwrap().stats, stats);
}

#[tokio::test]
async fn rpm_limit_denies_until_the_next_minute() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", Some(3))).await.unwrap();

    for reservation in 0..3 {
        store
            .reserve(&charge(reservation, "k1", Some(3), 0.0))
            .await
            .unwrap();
    }
    let Err(ChargeRejection::Quota(denial)) = store.reserve(&charge(3, "k1", Some(3), 0.0)).await
    else {
        panic!("the fourth request in a minute must be refused by the rpm window");
    };

    assert_eq!(denial.window, WindowKind::MinuteRequests);
    assert_eq!(denial.retry_at, NOW.plus(Duration::from_secs(60)));
    let mut next_minute = charge(4, "k1", Some(3), 0.0);
    next_minute.now = denial.retry_at;
    store.reserve(&next_minute).await.unwrap();
}

#[tokio::test]
async fn unknown_key_is_not_found_and_unknown_budgets_are_ignored() {
    let store = MemoryStore::new();
    let Err(ChargeRejection::Store(err)) = store.reserve(&charge(0, "nope", None, 0.01)).await
    else {
        panic!("a charge for an unknown key must fail with a store error");
    };
    assert_eq!(err.kind, StoreErrorKind::NotFound);

    store.insert_key(key("k1", None)).await.unwrap();
    // Budget "b" does not exist: nothing limits the charge and settling reports nothing.
    let c = charge(1, "k1", None, 1_000.0);
    store.reserve(&c).await.unwrap();
    let statuses = store.settle(&c, 10, Money::from_usd(1_000.0), NOW).await;
    assert!(statuses.unwrap().is_empty());
}

#[tokio::test]
async fn budget_refusal_leaves_the_key_windows_unchanged() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", Some(2))).await.unwrap();
    store
        .put_budget(hard_budget("b", 1.0), Money::from_usd(1.0), NOW)
        .await
        .unwrap();

    let Err(ChargeRejection::Budget(err)) = store.reserve(&charge(0, "k1", Some(2), 0.01)).await
    else {
        panic!("a full hard budget must refuse the charge");
    };
    assert!(matches!(err, BudgetError::WouldExceed { ref id, .. } if id == "b"));

    let snapshot = store
        .quota_snapshot(
            &KeyId::new("k1"),
            &QuotaLimits {
                rpm: Some(2),
                ..QuotaLimits::default()
            },
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(used(&snapshot, WindowKind::MinuteRequests), 0);
    // Exactly rpm free charges still fit.
    let mut free = charge(1, "k1", Some(2), 0.0);
    free.budget_ids.clear();
    store.reserve(&free).await.unwrap();
    free.reservation = ReservationId(2);
    store.reserve(&free).await.unwrap();
    free.reservation = ReservationId(3);
    assert!(matches!(
        store.reserve(&free).await,
        Err(ChargeRejection::Quota(_))
    ));
}

#[tokio::test]
async fn quota_refusal_reserves_nothing_in_budgets() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", Some(1))).await.unwrap();
    store
        .put_budget(hard_budget("b", 1.0), Money::ZERO, NOW)
        .await
        .unwrap();
    store.reserve(&charge(0, "k1", Some(1), 0.1)).await.unwrap();

    let res = store.reserve(&charge(1, "k1", Some(1), 0.1)).await;

    assert!(matches!(res, Err(ChargeRejection::Quota(_))));
    let statuses = store.budget_statuses(NOW).await.unwrap();
    assert_eq!(statuses[0].reserved, Money::from_usd(0.1));
}

#[tokio::test]
async fn settle_commits_actual_cost_and_tokens() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", None)).await.unwrap();
    store
        .put_budget(hard_budget("b", 1.0), Money::ZERO, NOW)
        .await
        .unwrap();
    store
        .put_budget(hard_budget("a", 5.0), Money::ZERO, NOW)
        .await
        .unwrap();
    let limits = QuotaLimits {
        tpm: Some(1_000),
        ..QuotaLimits::default()
    };
    let mut c = charge(7, "k1", None, 0.05);
    c.limits = limits;
    c.est_tokens = 600;
    c.budget_ids = vec!["b".to_owned(), "a".to_owned(), "b".to_owned()];
    store.reserve(&c).await.unwrap();

    let statuses = store
        .settle(&c, 100, Money::from_usd(0.03), NOW)
        .await
        .unwrap();

    let ids: Vec<&str> = statuses.iter().map(|s| s.budget_id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    for status in &statuses {
        assert_eq!(status.spent, Money::from_usd(0.03));
        assert_eq!(status.reserved, Money::ZERO);
    }
    let snapshot = store
        .quota_snapshot(&KeyId::new("k1"), &limits, NOW)
        .await
        .unwrap();
    assert_eq!(used(&snapshot, WindowKind::MinuteTokens), 100);
}

#[tokio::test]
async fn release_gives_back_budget_and_tokens_but_counts_the_request() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", Some(10))).await.unwrap();
    store
        .put_budget(hard_budget("b", 1.0), Money::ZERO, NOW)
        .await
        .unwrap();
    let limits = QuotaLimits {
        rpm: Some(10),
        tpm: Some(1_000),
        ..QuotaLimits::default()
    };
    let mut c = charge(1, "k1", Some(10), 0.6);
    c.limits = limits;
    store.reserve(&c).await.unwrap();
    assert_eq!(
        store.budget_statuses(NOW).await.unwrap()[0].reserved,
        Money::from_usd(0.6)
    );

    store.release(&c).await.unwrap();

    let status = &store.budget_statuses(NOW).await.unwrap()[0];
    assert_eq!((status.spent, status.reserved), (Money::ZERO, Money::ZERO));
    assert_eq!(status.remaining, Money::from_usd(1.0));
    let snapshot = store
        .quota_snapshot(&KeyId::new("k1"), &limits, NOW)
        .await
        .unwrap();
    assert_eq!(used(&snapshot, WindowKind::MinuteTokens), 0);
    assert_eq!(used(&snapshot, WindowKind::MinuteRequests), 1);
    // The whole budget is available again.
    let mut again = charge(2, "k1", Some(10), 1.0);
    again.limits = limits;
    store.reserve(&again).await.unwrap();
}

#[tokio::test]
async fn budgets_are_listed_rolled_and_deleted() {
    let store = MemoryStore::new();
    let status = store
        .put_budget(hard_budget("daily", 2.0), Money::from_usd(0.5), NOW)
        .await
        .unwrap();
    assert_eq!(status.spent, Money::from_usd(0.5));
    assert_eq!(status.remaining, Money::from_usd(1.5));
    store
        .put_budget(hard_budget("another", 1.0), Money::ZERO, NOW)
        .await
        .unwrap();
    // Replacing keeps one budget under the id.
    store
        .put_budget(hard_budget("daily", 3.0), Money::from_usd(0.5), NOW)
        .await
        .unwrap();

    let ids: Vec<String> = store
        .list_budgets()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(ids, ["another", "daily"]);
    let tomorrow = NOW.plus(Duration::from_secs(86_400));
    let statuses = store.budget_statuses(tomorrow).await.unwrap();
    assert_eq!(statuses[1].limit, Money::from_usd(3.0));
    assert_eq!(statuses[1].spent, Money::ZERO);

    store.delete_budget("daily").await.unwrap();
    let err = store.delete_budget("daily").await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::NotFound);
    assert_eq!(store.list_budgets().await.unwrap().len(), 1);
}

#[tokio::test]
async fn observed_quota_blocks_until_its_reset() {
    let store = MemoryStore::new();
    store.insert_key(key("k1", None)).await.unwrap();
    let reset = NOW.plus(Duration::from_secs(20));
    store
        .observe_quota(
            &KeyId::new("k1"),
            apikeyrouter_domain::QuotaObservation {
                limit_requests: Some(100),
                remaining_requests: Some(0),
                reset_requests_at: Some(reset),
                ..Default::default()
            },
            NOW,
        )
        .await
        .unwrap();

    let Err(ChargeRejection::Quota(denial)) = store.reserve(&charge(0, "k1", None, 0.0)).await
    else {
        panic!("the provider said no requests are left");
    };
    assert_eq!(denial.retry_at, reset);
    assert_eq!(
        store
            .observe_quota(&KeyId::new("nope"), Default::default(), NOW)
            .await
            .unwrap_err()
            .kind,
        StoreErrorKind::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_never_overspend_a_hard_budget() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    store.insert_key(key("k1", None)).await.unwrap();
    let limit = Money::from_usd(1.0);
    store
        .put_budget(hard_budget("b", 1.0), Money::ZERO, NOW)
        .await
        .unwrap();

    let tasks: Vec<_> = (0..200)
        .map(|reservation| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let c = charge(reservation, "k1", None, 0.01);
                match store.reserve(&c).await {
                    Ok(()) => {
                        let statuses = store
                            .settle(&c, 100, Money::from_usd(0.01), NOW)
                            .await
                            .unwrap();
                        assert!(statuses[0].spent <= limit);
                        true
                    }
                    Err(ChargeRejection::Budget(_)) => false,
                    Err(other) => panic!("unexpected rejection: {other:?}"),
                }
            })
        })
        .collect();
    let mut n_succeeded = 0;
    for task in tasks {
        if task.await.unwrap() {
            n_succeeded += 1;
        }
    }

    assert_eq!(n_succeeded, 100);
    let status = &store.budget_statuses(NOW).await.unwrap()[0];
    assert_eq!((status.spent, status.reserved), (limit, Money::ZERO));
}

#[tokio::test]
async fn request_log_keeps_the_newest_records() {
    let store = MemoryStore::with_request_capacity(3);
    for n in 0..5 {
        store.save_request(&record(&format!("r{n}"))).await.unwrap();
    }
    // Saving a kept id again replaces it without evicting anything.
    let mut replaced = record("r2");
    replaced.correlation_id = Some("second".to_owned());
    store.save_request(&replaced).await.unwrap();

    for gone in ["r0", "r1"] {
        let res = store.get_request(&RequestId::new(gone)).await.unwrap();
        assert_eq!(res, None, "{gone} should have been evicted");
    }
    for kept in ["r3", "r4"] {
        let res = store.get_request(&RequestId::new(kept)).await.unwrap();
        assert_eq!(res, Some(record(kept)));
    }
    let r2 = store.get_request(&RequestId::new("r2")).await.unwrap();
    assert_eq!(r2, Some(replaced));
}

#[tokio::test]
async fn zero_capacity_request_log_keeps_nothing() {
    let store = MemoryStore::with_request_capacity(0);
    store.save_request(&record("r0")).await.unwrap();
    assert_eq!(
        store.get_request(&RequestId::new("r0")).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn store_reports_its_kind_and_is_reachable() {
    let store = MemoryStore::default();
    assert_eq!(store.kind(), "memory");
    store.ping().await.unwrap();
    assert!(format!("{store:?}").contains("request_capacity: 10000"));
}
