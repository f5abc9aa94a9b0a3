//! The seed's use cases 1, 2, 3, 4, 5 and 8, end to end through the facade.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
use apikeyrouter::{
    Budget, BudgetPeriod, BudgetScope, CapacityState, DowngradeRule, Enforcement, FailureKind,
    KeyMetadata, KeyState, ModelId, ModelPrice, Money, Objective, ObjectiveKind, Outcome,
    PriceCatalogue, ProviderId, RouteErrorKind, TenantId,
};

use crate::support::{Harness, T0, ask};

/// Use case 1: cost optimisation. Short prompts go to the cheaper model, long ones keep
/// the premium model; among providers serving the same model the cheaper one wins.
#[tokio::test]
async fn cost_objective_downgrades_simple_prompts_and_keeps_premium_for_complex_ones() {
    let h = Harness::new(|b| {
        b.downgrade(DowngradeRule {
            from: ModelId::new("gpt-4"),
            to: ModelId::new("gpt-3.5-turbo"),
            max_prompt_tokens: 200,
            max_messages: 4,
        })
    })
    .await;
    h.provider("openai");
    let premium = h
        .key(
            "openai",
            1,
            KeyMetadata {
                models: Some(vec![ModelId::new("gpt-4")]),
                ..Default::default()
            },
        )
        .await;
    let standard = h
        .key(
            "openai",
            2,
            KeyMetadata {
                models: Some(vec![ModelId::new("gpt-3.5-turbo")]),
                ..Default::default()
            },
        )
        .await;

    let simple = h
        .router
        .route(
            ask("gpt-4", "Explain quantum computing"),
            ObjectiveKind::Cost,
        )
        .await
        .unwrap();
    assert_eq!(simple.key_id, standard);
    assert_eq!(simple.model.as_str(), "gpt-3.5-turbo");

    let complex_prompt = "Analyse this contract clause by clause. ".repeat(100);
    let complex = h
        .router
        .route(ask("gpt-4", &complex_prompt), ObjectiveKind::Cost)
        .await
        .unwrap();
    assert_eq!(complex.key_id, premium);
    assert_eq!(complex.model.as_str(), "gpt-4");
    assert!(simple.actual_cost.unwrap() < complex.actual_cost.unwrap());

    // Without a cost objective the requested model is kept.
    let fair = h
        .router
        .route(ask("gpt-4", "hi"), ObjectiveKind::Fairness)
        .await
        .unwrap();
    assert_eq!(fair.model.as_str(), "gpt-4");
}

#[tokio::test]
async fn cost_objective_compares_providers_serving_the_same_model() {
    let mut catalogue = PriceCatalogue::builtin();
    catalogue.set_for_provider(
        ProviderId::new("azure"),
        ModelId::new("gpt-4o"),
        ModelPrice::new(5.0, 20.0),
    );
    let h = Harness::new(|b| b.catalogue(catalogue)).await;
    h.provider("azure");
    h.provider("openai");
    let azure = h.key("azure", 1, KeyMetadata::default()).await;
    let openai = h.key("openai", 1, KeyMetadata::default()).await;
    for _ in 0..5 {
        let r = h
            .router
            .route(ask("gpt-4o", "hello"), ObjectiveKind::Cost)
            .await
            .unwrap();
        assert_eq!(r.key_id, openai);
        assert_eq!(r.decision.alternatives[0].key_id, azure);
        assert!(r.estimated_cost.unwrap() > Money::ZERO);
    }
}

/// Use case 2: high availability. Two of five keys fail with server errors; every
/// request is still served, and reliability routing moves traffic off the bad keys.
#[tokio::test]
async fn failing_keys_never_fail_a_request_while_healthy_keys_remain() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let mut keys = Vec::new();
    for i in 0..5 {
        keys.push(h.key("openai", i, KeyMetadata::default()).await);
    }
    for bad in &keys[..2] {
        sim.set_behaviour(
            bad,
            Behaviour::failing(FailurePlan::Always(Failure::ServerError)),
        );
    }
    let reliability = Objective::primary(ObjectiveKind::Reliability);
    for _ in 0..200 {
        let r = h
            .router
            .route(ask("gpt-4o", "Help me with my order"), reliability.clone())
            .await
            .unwrap();
        assert!(!keys[..2].contains(&r.key_id));
    }
    // Each bad key failed a few times, then was cooled down or outranked.
    for bad in &keys[..2] {
        assert!(
            sim.calls(bad) <= 3,
            "bad key called {} times",
            sim.calls(bad)
        );
    }
    let records = h.audit_records().await;
    assert_eq!(records.len(), 200);
    assert!(records.iter().all(|r| r.outcome == Outcome::Success));
}

/// Use case 3: multi-tenant SaaS. Each customer's requests use only its keys, and
/// spend is tracked per tenant.
#[tokio::test]
async fn tenant_requests_route_only_within_tenant_keys_and_cost_is_tracked_per_tenant() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    let customers = [("customer-a", 2), ("customer-b", 1), ("customer-c", 3)];
    let mut keys_of: HashMap<&str, Vec<apikeyrouter::KeyId>> = HashMap::new();
    let mut n = 0;
    for (customer, count) in customers {
        for _ in 0..count {
            n += 1;
            let meta = KeyMetadata {
                tenant: Some(TenantId::new(customer)),
                tier: Some("premium".into()),
                ..Default::default()
            };
            keys_of
                .entry(customer)
                .or_default()
                .push(h.key("openai", n, meta).await);
        }
        let budget = Budget::new(
            format!("{customer}-monthly"),
            BudgetScope::Tenant {
                tenant: TenantId::new(customer),
            },
            100.0,
            BudgetPeriod::Monthly,
            Enforcement::Soft,
        )
        .unwrap();
        h.router.add_budget(budget).await.unwrap();
    }
    let mut spent: HashMap<&str, Money> = HashMap::new();
    for i in 0..60 {
        let (customer, _) = customers[i % 3];
        let r = h
            .router
            .route(
                ask("gpt-4o", "user message").for_tenant(customer),
                Objective::default(),
            )
            .await
            .unwrap();
        assert!(
            keys_of[customer].contains(&r.key_id),
            "{customer} served by a foreign key"
        );
        *spent.entry(customer).or_default() += r.actual_cost.unwrap();
        assert_eq!(r.budgets.len(), 1);
        assert_eq!(r.budgets[0].budget_id, format!("{customer}-monthly"));
    }
    // Fairness inside each tenant: customer-c's three keys share its 20 requests.
    let c_keys = &keys_of["customer-c"];
    let mut per_key = Vec::new();
    for k in c_keys {
        per_key.push(h.router.key(k).await.unwrap().stats.requests);
    }
    assert!(per_key.iter().all(|&r| (6..=7).contains(&r)), "{per_key:?}");
    for status in h.router.budgets().await.unwrap() {
        let customer = status.budget_id.trim_end_matches("-monthly");
        assert_eq!(status.spent, spent[customer]);
    }
    // A tenant without keys is refused precisely, never served by another tenant's key.
    let err = h
        .router
        .route(
            ask("gpt-4o", "x").for_tenant("customer-z"),
            Objective::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind, RouteErrorKind::NoEligibleKey(_)),
        "{err}"
    );
}

/// Use case 4: rate limits. 1,000 requests over 5 keys, 2 of which answer 429 with
/// Retry-After: no failure reaches the caller, and a throttled key gets no request
/// during its cooldown.
#[tokio::test]
async fn rate_limited_keys_are_throttled_and_no_429_reaches_the_caller() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let mut keys = Vec::new();
    for i in 0..5 {
        keys.push(h.key("openai", i, KeyMetadata::default()).await);
    }
    let retry_after = Duration::from_secs(30);
    for limited in &keys[..2] {
        sim.set_behaviour(
            limited,
            Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
                retry_after: Some(retry_after),
            })),
        );
    }
    for i in 0..1_000 {
        let r = h
            .router
            .route(ask("gpt-4o", &format!("Request {i}")), Objective::default())
            .await
            .unwrap();
        assert!(!keys[..2].contains(&r.key_id));
        if i == 500 {
            // Half-way, still inside the cooldown: the limited keys were called once each.
            for limited in &keys[..2] {
                assert_eq!(sim.calls(limited), 1);
            }
        }
        h.advance(Duration::from_millis(10));
    }
    // 1,000 x 10 ms = 10 s: still inside the 30 s cooldown.
    for limited in &keys[..2] {
        assert_eq!(sim.calls(limited), 1);
        let info = h.router.key(limited).await.unwrap();
        assert_eq!(info.state, KeyState::Throttled);
        let transitions = h.router.key_transitions(limited).await.unwrap();
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].to, KeyState::Throttled);
    }
    // After the cooldown the key is tried again (and throttled again, with backoff).
    h.advance(retry_after);
    sim.set_behaviour(&keys[0], Behaviour::ok());
    let mut served_by_recovered = false;
    for _ in 0..10 {
        let r = h
            .router
            .route(ask("gpt-4o", "again"), Objective::default())
            .await
            .unwrap();
        served_by_recovered |= r.key_id == keys[0];
    }
    assert!(served_by_recovered);
    assert_eq!(
        h.router.key(&keys[0]).await.unwrap().state,
        KeyState::Available
    );
}

#[tokio::test]
async fn declared_rpm_is_never_exceeded_and_the_key_is_predicted_to_run_out() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let small = h
        .key(
            "openai",
            1,
            KeyMetadata {
                rpm: Some(10),
                ..Default::default()
            },
        )
        .await;
    let big = h
        .key(
            "openai",
            2,
            KeyMetadata {
                rpm: Some(1_000),
                ..Default::default()
            },
        )
        .await;
    for _ in 0..100 {
        h.router
            .route(ask("gpt-4o", "x"), Objective::default())
            .await
            .unwrap();
    }
    assert_eq!(
        sim.calls(&small),
        10,
        "the 10 rpm key got more than its minute allowance"
    );
    assert_eq!(sim.calls(&big), 90);
    let quota = h.router.quota(&small).await.unwrap();
    assert_eq!(quota.capacity, CapacityState::Exhausted);
    let prediction = quota.prediction.unwrap();
    assert_eq!(prediction.exhausts_at, Some(crate::support::T0));
    let big_quota = h.router.quota(&big).await.unwrap();
    assert_eq!(big_quota.capacity, CapacityState::Abundant);
    // Next minute, the small key serves again.
    h.advance(Duration::from_secs(60));
    for _ in 0..4 {
        h.router
            .route(ask("gpt-4o", "x"), Objective::default())
            .await
            .unwrap();
    }
    assert!(sim.calls(&small) > 10);
}

/// Use case 5: budget enforcement. A hard budget rejects before execution; remaining
/// budget comes back with each response; concurrency never overspends.
#[tokio::test]
async fn hard_budget_rejects_before_execution_and_reports_remaining() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    h.key("openai", 1, KeyMetadata::default()).await;
    let budget = Budget::new(
        "monthly",
        BudgetScope::Global,
        10_000.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap();
    h.router
        .add_budget_with_spend(budget, Money::from_usd(8_500.0))
        .await
        .unwrap();

    let ok = h
        .router
        .route(
            ask("gpt-4o", "Analyze this data").with_max_tokens(100),
            ObjectiveKind::Cost,
        )
        .await
        .unwrap();
    let remaining = ok.budget_remaining().unwrap();
    assert_eq!(
        remaining,
        Money::from_usd(1_500.0).saturating_sub(ok.actual_cost.unwrap())
    );

    // Spend up to a few cents under the limit, then ask for more than fits.
    let nearly_all = Budget::new(
        "monthly",
        BudgetScope::Global,
        10_000.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap();
    h.router
        .add_budget_with_spend(nearly_all, Money::from_usd(9_999.999))
        .await
        .unwrap();
    let calls_before = sim.total_calls();
    let err = h
        .router
        .route(
            ask("gpt-4o", "Analyze this data").with_max_tokens(4_000),
            ObjectiveKind::Cost,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind, RouteErrorKind::BudgetExceeded(_)),
        "{err}"
    );
    assert_eq!(
        sim.total_calls(),
        calls_before,
        "a rejected request must not reach the provider"
    );
    let record = h.router.request(&err.request_id).await.unwrap().unwrap();
    assert!(
        matches!(record.outcome, Outcome::Failure { ref code, .. } if code == "budget_exceeded")
    );
}

#[tokio::test]
async fn concurrent_requests_never_overspend_a_hard_budget() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    sim.set_default_latency(Duration::from_millis(2));
    for i in 0..4 {
        h.key("openai", i, KeyMetadata::default()).await;
    }
    // Each request reserves at most 100 completion tokens of gpt-4o-mini.
    let limit = 0.002;
    h.daily_hard_budget("tight", limit).await;
    let router = Arc::new(h.router.clone());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            router
                .route(
                    ask("gpt-4o-mini", &format!("question {i}")).with_max_tokens(100),
                    Objective::default(),
                )
                .await
        }));
    }
    let mut served = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => served += 1,
            Err(e) => {
                assert!(matches!(e.kind, RouteErrorKind::BudgetExceeded(_)), "{e}");
                refused += 1;
            }
        }
    }
    let status = &h.router.budgets().await.unwrap()[0];
    assert!(
        status.spent <= Money::from_usd(limit),
        "spent {} over limit",
        status.spent
    );
    assert_eq!(status.reserved, Money::ZERO);
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
}

/// Use case 8: fairness. 1,000 requests over 10 keys: each serves 100 ± 1.
#[tokio::test]
async fn fairness_spreads_load_evenly() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let mut keys = Vec::new();
    for i in 0..10 {
        keys.push(h.key("openai", i, KeyMetadata::default()).await);
    }
    for _ in 0..1_000 {
        h.router
            .route(
                ask("gpt-4o", "Process this request"),
                ObjectiveKind::Fairness,
            )
            .await
            .unwrap();
    }
    for k in &keys {
        let calls = sim.calls(k);
        assert!((99..=101).contains(&calls), "key {k} served {calls}");
    }
}

/// Use case 7 in brief: a fallback chain moves to another provider when no key of the
/// first can serve, and the response says so.
#[tokio::test]
async fn fallback_chain_moves_to_another_provider() {
    let h = Harness::new(|b| b.fallback("gpt-4o", ["claude-sonnet-4-5"])).await;
    let openai = h.provider("openai");
    h.provider("anthropic");
    let o = h
        .key(
            "openai",
            1,
            KeyMetadata {
                models: Some(vec![ModelId::new("gpt-4o")]),
                ..Default::default()
            },
        )
        .await;
    let a = h
        .key(
            "anthropic",
            1,
            KeyMetadata {
                models: Some(vec![ModelId::new("claude-sonnet-4-5")]),
                ..Default::default()
            },
        )
        .await;
    openai.set_behaviour(
        &o,
        Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
            retry_after: None,
        })),
    );
    let r = h
        .router
        .route(
            ask("gpt-4o", "Explain AI safety"),
            ObjectiveKind::Reliability,
        )
        .await
        .unwrap();
    assert_eq!(r.key_id, a);
    assert_eq!(r.model.as_str(), "claude-sonnet-4-5");
    assert_eq!(r.attempts.len(), 2);
    assert_eq!(r.attempts[0].failure, Some(FailureKind::RateLimited));
    assert_eq!(r.attempts[1].failure, None);
}

/// When every key of a fallback chain is cooling down, the refusal says when the
/// first one is back, whichever model of the chain it serves.
#[tokio::test]
async fn no_eligible_key_names_the_earliest_cooldown_end_of_the_chain() {
    let h = Harness::new(|b| b.fallback("gpt-4o", ["claude-sonnet-4-5"])).await;
    let openai = h.provider("openai");
    let anthropic = h.provider("anthropic");
    let only = |model: &str| KeyMetadata {
        models: Some(vec![ModelId::new(model)]),
        ..Default::default()
    };
    let o = h.key("openai", 1, only("gpt-4o")).await;
    let a = h.key("anthropic", 1, only("claude-sonnet-4-5")).await;
    for (sim, key, secs) in [(&openai, &o, 20), (&anthropic, &a, 30)] {
        sim.set_behaviour(
            key,
            Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
                retry_after: Some(Duration::from_secs(secs)),
            })),
        );
    }
    let err = h
        .router
        .route(ask("gpt-4o", "hi"), Objective::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind, RouteErrorKind::AttemptsExhausted { .. }),
        "{err}"
    );
    h.advance(Duration::from_secs(5));
    let err = h
        .router
        .route(ask("gpt-4o", "hi"), Objective::default())
        .await
        .unwrap_err();
    let RouteErrorKind::NoEligibleKey(no_key) = &err.kind else {
        panic!("expected no eligible key, got {err}");
    };
    // The Claude key, last in the chain, waits 30 s; the GPT-4o key is back at 20.
    assert_eq!(no_key.model.as_str(), "claude-sonnet-4-5");
    assert_eq!(no_key.retry_at, Some(T0.plus(Duration::from_secs(20))));
}

/// Use case 9 in brief: the audit record of a request explains the decision and
/// carries tokens and cost, and never the key material.
#[tokio::test]
async fn audit_record_explains_the_decision_without_key_material() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    for i in 0..3 {
        h.key("openai", i, KeyMetadata::default()).await;
    }
    let r = h
        .router
        .route(
            ask("gpt-4o", "Sensitive data analysis").with_tag("feature", "chatbot"),
            ObjectiveKind::Cost,
        )
        .await
        .unwrap();
    let record = h.router.request(&r.request_id).await.unwrap().unwrap();
    assert_eq!(record.key_id.as_ref(), Some(&r.key_id));
    let decision = record.decision.as_ref().unwrap();
    assert_eq!(decision.alternatives.len(), 2);
    assert_eq!(decision.ready, 3);
    assert_eq!(record.usage, r.usage);
    assert_eq!(
        record.tags.get("feature").map(String::as_str),
        Some("chatbot")
    );
    let json = serde_json::to_string(&record).unwrap();
    assert!(
        !json.contains("sk-openai-test-key"),
        "key material leaked into the audit record"
    );
    assert!(
        !json.contains("Sensitive data analysis"),
        "message content leaked into the audit record"
    );
    assert_eq!(h.audit_records().await.len(), 1);
}

/// The builder keeps the reservation lease at least as long as the request deadline:
/// a longer deadline raises it, and settings that break the rule are refused.
#[tokio::test]
async fn the_reservation_lease_never_falls_below_the_deadline() {
    let two_hours = Duration::from_secs(7_200);
    let router = apikeyrouter::ApiKeyRouter::builder()
        .total_deadline(two_hours)
        .build()
        .await
        .unwrap();
    assert_eq!(router.core().settings().reservation_lease, two_hours);

    let settings = apikeyrouter::RouterSettings {
        reservation_lease: Duration::from_secs(10),
        ..Default::default()
    };
    let refused = apikeyrouter::ApiKeyRouter::builder()
        .settings(settings)
        .build()
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("reservation_lease must be at least total_deadline"),
        "{refused}"
    );
}

/// A budget redefined while a request is in flight keeps that request's reservation,
/// which its settlement commits against the new limit, and what was spent before; a
/// spend given replaces the account, and an unknown id is created.
#[tokio::test]
async fn a_budget_redefined_while_a_request_is_in_flight_keeps_its_account() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    h.key("openai", 1, KeyMetadata::default()).await;
    h.daily_hard_budget("team", 1.0).await;
    let team = |limit_usd: f64| {
        Budget::new(
            "team",
            BudgetScope::Global,
            limit_usd,
            BudgetPeriod::Daily,
            Enforcement::Hard,
        )
        .unwrap()
    };
    let budgets = h.router.core().budgets();
    let first = h
        .router
        .route(ask("gpt-4o-mini", "first"), Objective::default())
        .await
        .unwrap();
    let spent_before = first.actual_cost.unwrap();

    sim.set_default_latency(Duration::from_millis(300));
    let router = h.router.clone();
    let in_flight = tokio::spawn(async move {
        router
            .route(
                ask("gpt-4o-mini", "second").with_max_tokens(100),
                Objective::default(),
            )
            .await
    });
    let held = loop {
        let status = budgets.get("team").await.unwrap();
        if status.reserved > Money::ZERO {
            break status.reserved;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let defined = budgets.define(team(2.0), None).await.unwrap();
    assert!(!defined.created);
    assert_eq!(
        (
            defined.status.limit,
            defined.status.spent,
            defined.status.reserved
        ),
        (Money::from_usd(2.0), spent_before, held)
    );

    let second = in_flight.await.unwrap().unwrap();
    let after = budgets.get("team").await.unwrap();
    assert_eq!(
        (after.limit, after.spent, after.reserved),
        (
            Money::from_usd(2.0),
            spent_before.saturating_add(second.actual_cost.unwrap()),
            Money::ZERO
        )
    );

    let reset = budgets
        .define(team(2.0), Some(Money::from_usd(0.5)))
        .await
        .unwrap();
    assert!(!reset.created);
    assert_eq!(reset.status.spent, Money::from_usd(0.5));
    let mut other = team(3.0);
    other.id = "other".to_owned();
    let created = budgets.define(other, None).await.unwrap();
    assert!(created.created);
    assert_eq!(created.status.spent, Money::ZERO);
    assert_eq!(h.router.core().budgets().definitions().len(), 2);
}

/// Budgets set and removed from many tasks at once, on several threads: the definitions
/// this instance enforces keep every change (each is one atomic update of the list, so
/// two changes racing cannot both start from the same list and lose one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_changed_concurrently_are_all_kept() {
    let h = Harness::new(|b| b).await;
    let budget = |id: String| {
        Budget::new(
            id,
            BudgetScope::Global,
            1.0,
            BudgetPeriod::Daily,
            Enforcement::Hard,
        )
        .unwrap()
    };
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let router = h.router.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    router
                        .add_budget(budget(format!("b{t}-{i}")))
                        .await
                        .unwrap();
                }
                for i in (0..50).step_by(2) {
                    router.delete_budget(&format!("b{t}-{i}")).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let defined: BTreeSet<String> = h
        .router
        .core()
        .budgets()
        .definitions()
        .iter()
        .map(|b| b.id.clone())
        .collect();
    let expected: BTreeSet<String> = (0..8)
        .flat_map(|t| (1..50).step_by(2).map(move |i| format!("b{t}-{i}")))
        .collect();
    let lost: Vec<_> = expected.difference(&defined).collect();
    let not_removed: Vec<_> = defined.difference(&expected).collect();
    assert_eq!(
        (lost, not_removed),
        (Vec::new(), Vec::new()),
        "budgets lost, and removals undone"
    );
}
