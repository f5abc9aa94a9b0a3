//! Routing table tests: objectives, eligibility, wake-ups, explanations and the
//! routing invariants as properties.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::key::{KeyMetadata, KeyStats};
use crate::secret::KeyMaterial;

const T0: Timestamp = Timestamp::from_millis(1_795_775_400_000);

fn key(id: &str, provider: &str) -> ApiKey {
    ApiKey::new(
        KeyId::new(id),
        ProviderId::new(provider),
        KeyMaterial::parse("sk-test-00000000").unwrap(),
        KeyMetadata::default(),
        T0,
    )
}

fn offers(providers: &[(&str, f64)]) -> Vec<ProviderOffer> {
    providers
        .iter()
        .map(|(p, usd)| ProviderOffer {
            provider: ProviderId::new(*p),
            est_cost: Some(Money::from_usd(*usd)),
        })
        .collect()
}

fn query<'a>(model: &'a ModelId, offers: &'a [ProviderOffer]) -> RouteQuery<'a> {
    RouteQuery {
        model,
        tenant: None,
        offers,
        exclude: &[],
    }
}

fn table_with(n: usize, provider: &str) -> RoutingTable {
    let mut t = RoutingTable::new();
    for i in 0..n {
        t.upsert(&key(&format!("k{i}"), provider));
    }
    t
}

#[test]
fn fairness_rotates_over_equal_keys() {
    let mut t = table_with(3, "openai");
    let model = ModelId::new("gpt-4o");
    let o = offers(&[("openai", 0.01)]);
    let picks: Vec<String> = (0..6)
        .map(|_| {
            t.choose(&query(&model, &o), &Objective::default(), T0)
                .unwrap()
                .key_id
                .to_string()
        })
        .collect();
    assert_eq!(picks, ["k0", "k1", "k2", "k0", "k1", "k2"]);
}

#[test]
fn cost_prefers_cheaper_provider_and_explains_loss() {
    let mut t = RoutingTable::new();
    t.upsert(&key("expensive", "openai"));
    t.upsert(&key("cheap", "gemini"));
    let model = ModelId::new("any");
    let o = offers(&[("openai", 0.02), ("gemini", 0.005)]);
    let d = t
        .choose(&query(&model, &o), &ObjectiveKind::Cost.into(), T0)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "cheap");
    assert_eq!(d.provider.as_str(), "gemini");
    assert_eq!(d.alternatives.len(), 1);
    assert_eq!(d.alternatives[0].key_id.as_str(), "expensive");
    assert_eq!(d.alternatives[0].lost_because, LossReason::HigherCost);
    assert!((d.score - 1.0).abs() < 1e-9);
    assert!(d.alternatives[0].score < 0.5);
}

#[test]
fn reliability_prefers_better_success_rate() {
    let mut t = table_with(2, "openai");
    let mut poor = KeyStats::new();
    poor.record(false, Duration::ZERO, T0);
    t.record_outcome(&KeyId::new("k0"), &poor);
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    let d = t
        .choose(&query(&model, &o), &ObjectiveKind::Reliability.into(), T0)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "k1");
    assert_eq!(d.alternatives[0].lost_because, LossReason::LowerSuccessRate);
}

#[test]
fn latency_prefers_faster_key() {
    let mut t = table_with(2, "openai");
    let mut slow = KeyStats::new();
    slow.record(true, Duration::from_millis(900), T0);
    let mut fast = KeyStats::new();
    fast.record(true, Duration::from_millis(100), T0);
    t.record_outcome(&KeyId::new("k0"), &slow);
    t.record_outcome(&KeyId::new("k1"), &fast);
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    let d = t
        .choose(&query(&model, &o), &ObjectiveKind::Latency.into(), T0)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "k1");
    assert_eq!(d.alternatives[0].lost_because, LossReason::HigherLatency);
}

#[test]
fn throttled_key_gets_no_traffic_until_cooldown_ends() {
    let mut t = table_with(2, "openai");
    let until = T0.plus(Duration::from_secs(30));
    t.set_state(&KeyId::new("k0"), KeyState::Throttled, Some(until));
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    for _ in 0..10 {
        let d = t
            .choose(&query(&model, &o), &Objective::default(), T0)
            .unwrap();
        assert_eq!(d.key_id.as_str(), "k1");
        assert_eq!(d.ineligible.throttled, 1);
    }
    let d = t
        .choose(&query(&model, &o), &Objective::default(), until)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "k0");
    let transitions: Vec<_> = t.drain_transitions().collect();
    assert_eq!(transitions.len(), 1);
    assert_eq!(
        (transitions[0].from, transitions[0].to),
        (KeyState::Throttled, KeyState::Available)
    );
    assert_eq!(transitions[0].trigger, TransitionTrigger::CooldownElapsed);
}

#[test]
fn exhausted_key_wakes_up_recovering() {
    let mut t = table_with(1, "openai");
    let until = T0.plus(Duration::from_secs(60));
    t.set_state(&KeyId::new("k0"), KeyState::Exhausted, Some(until));
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    let err = t
        .choose(&query(&model, &o), &Objective::default(), T0)
        .unwrap_err();
    assert_eq!(err.ineligible.exhausted, 1);
    assert_eq!(
        err.to_string(),
        "no eligible key for model m: 1 keys considered, 1 exhausted"
    );
    t.choose(&query(&model, &o), &Objective::default(), until)
        .unwrap();
    assert_eq!(t.state(&KeyId::new("k0")), Some(KeyState::Recovering));
}

#[test]
fn parked_key_rejoins_after_window() {
    let mut t = table_with(2, "openai");
    let until = T0.plus(Duration::from_secs(60));
    t.park(&KeyId::new("k0"), until);
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    let d = t
        .choose(&query(&model, &o), &Objective::default(), T0)
        .unwrap();
    assert_eq!((d.key_id.as_str(), d.ineligible.rate_limited), ("k1", 1));
    let d = t
        .choose(&query(&model, &o), &Objective::default(), until)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "k0");
}

#[test]
fn no_key_names_when_the_first_waiting_key_is_ready_again() {
    let mut t = table_with(5, "openai");
    let mut cheap = key("cheap", "gemini");
    cheap.metadata.models = Some(vec![ModelId::new("other")]);
    t.upsert(&cheap);
    let at = |s| T0.plus(Duration::from_secs(s));
    // Throttled for 30 s but parked for 45: ready only when both end.
    t.set_state(&KeyId::new("k0"), KeyState::Throttled, Some(at(30)));
    t.park(&KeyId::new("k0"), at(45));
    t.set_state(&KeyId::new("k1"), KeyState::Exhausted, Some(at(3_600)));
    t.park(&KeyId::new("k2"), at(50));
    // Waiting on nothing that ends by itself: an operator's state, an exhaustion with
    // no known reset.
    t.set_state(&KeyId::new("k3"), KeyState::Disabled, Some(at(1)));
    t.set_state(&KeyId::new("k4"), KeyState::Exhausted, None);
    t.set_state(&KeyId::new("cheap"), KeyState::Throttled, Some(at(2)));
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01), ("gemini", 0.001)]);
    let err = t
        .choose(&query(&model, &o), &Objective::default(), T0)
        .unwrap_err();
    assert_eq!(err.retry_at, Some(at(45)), "{err}");

    // Keys a constraint keeps out do not count, however soon they wake.
    let gemini_only = Objective::default()
        .with_constraints(crate::routing::Constraints {
            allowed_providers: Some(vec![ProviderId::new("gemini")]),
            ..Default::default()
        })
        .unwrap();
    let err = t.choose(&query(&model, &o), &gemini_only, T0).unwrap_err();
    assert_eq!(err.retry_at, None);

    let d = t
        .choose(&query(&model, &o), &Objective::default(), at(46))
        .unwrap();
    assert_eq!(d.key_id.as_str(), "k0");
    t.set_state(&KeyId::new("k0"), KeyState::Disabled, None);
    t.set_state(&KeyId::new("k2"), KeyState::Invalid, None);
    let err = t
        .choose(&query(&model, &o), &Objective::default(), at(46))
        .unwrap_err();
    assert_eq!(err.retry_at, Some(at(3_600)));
}

#[test]
fn tenant_requests_stay_within_tenant_keys() {
    let mut t = RoutingTable::new();
    for (id, tenant) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        let mut k = key(id, "openai");
        k.metadata.tenant = Some(TenantId::new(tenant));
        t.upsert(&k);
    }
    t.upsert(&key("shared", "openai"));
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    let tenant_b = TenantId::new("b");
    for _ in 0..5 {
        let q = RouteQuery {
            tenant: Some(&tenant_b),
            ..query(&model, &o)
        };
        assert_eq!(
            t.choose(&q, &Objective::default(), T0)
                .unwrap()
                .key_id
                .as_str(),
            "b1"
        );
    }
    let d = t
        .choose(&query(&model, &o), &Objective::default(), T0)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "shared");
    let nobody = TenantId::new("nobody");
    let q = RouteQuery {
        tenant: Some(&nobody),
        ..query(&model, &o)
    };
    assert!(t.choose(&q, &Objective::default(), T0).is_err());
}

#[test]
fn model_lists_and_constraints_filter_keys() {
    let mut t = RoutingTable::new();
    let mut mini = key("mini-only", "openai");
    mini.metadata.models = Some(vec![ModelId::new("gpt-4o-mini")]);
    t.upsert(&mini);
    t.upsert(&key("all", "anthropic"));
    let model = ModelId::new("gpt-4o");
    let o = offers(&[("openai", 0.01), ("anthropic", 0.03)]);
    let d = t
        .choose(&query(&model, &o), &Objective::default(), T0)
        .unwrap();
    assert_eq!(d.key_id.as_str(), "all");
    assert_eq!(d.ineligible.model_not_served, 1);

    let cheap_only = Objective::default()
        .with_constraints(crate::routing::Constraints {
            max_cost_per_request: Some(Money::from_usd(0.02)),
            ..Default::default()
        })
        .unwrap();
    let err = t.choose(&query(&model, &o), &cheap_only, T0).unwrap_err();
    assert_eq!(err.ineligible.over_max_cost, 1);

    let exclude = [(KeyId::new("all"), Ineligibility::AlreadyTried)];
    let q = RouteQuery {
        exclude: &exclude,
        ..query(&model, &o)
    };
    let err = t.choose(&q, &Objective::default(), T0).unwrap_err();
    assert_eq!(err.ineligible.already_tried, 1);
}

#[test]
fn min_success_rate_and_allowed_providers_are_hard_constraints() {
    let mut t = RoutingTable::new();
    t.upsert(&key("flaky", "openai"));
    t.upsert(&key("steady", "openai"));
    t.upsert(&key("elsewhere", "gemini"));
    let mut flaky = KeyStats::new();
    for _ in 0..5 {
        flaky.record(false, Duration::ZERO, T0);
    }
    t.record_outcome(&KeyId::new("flaky"), &flaky);
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01), ("gemini", 0.001)]);
    let objective = Objective::primary(ObjectiveKind::Cost)
        .with_constraints(crate::routing::Constraints {
            min_success_rate: Some(0.9),
            allowed_providers: Some(vec![ProviderId::new("openai")]),
            ..Default::default()
        })
        .unwrap();
    for _ in 0..4 {
        let d = t.choose(&query(&model, &o), &objective, T0).unwrap();
        // The cheaper gemini key is not allowed; the flaky one is under 90 %.
        assert_eq!(d.key_id.as_str(), "steady");
        assert_eq!(d.ineligible.provider_not_allowed, 1);
        assert_eq!(d.ineligible.below_min_success_rate, 1);
    }
}

#[test]
fn weighted_objective_balances_cost_and_reliability() {
    let mut t = RoutingTable::new();
    t.upsert(&key("cheap-flaky", "gemini"));
    t.upsert(&key("pricey-solid", "openai"));
    let mut flaky = KeyStats::new();
    for _ in 0..10 {
        flaky.record(false, Duration::ZERO, T0);
    }
    t.record_outcome(&KeyId::new("cheap-flaky"), &flaky);
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.011), ("gemini", 0.010)]);
    let mostly_reliable = Objective::weighted(&[
        (ObjectiveKind::Cost, 0.3),
        (ObjectiveKind::Reliability, 0.7),
    ])
    .unwrap();
    let d = t.choose(&query(&model, &o), &mostly_reliable, T0).unwrap();
    assert_eq!(d.key_id.as_str(), "pricey-solid");
    assert_eq!(d.objective.to_string(), "cost=0.30,reliability=0.70");
    assert_eq!(d.alternatives[0].lost_because, LossReason::LowerScore);
}

#[test]
fn explain_lists_every_key_with_reason() {
    let mut t = table_with(3, "openai");
    t.set_state(&KeyId::new("k2"), KeyState::Disabled, None);
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    let rows = t.explain(&query(&model, &o), &Objective::default(), T0);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].key_id.as_str(), "k2");
    assert_eq!(rows[2].ineligible, Some(Ineligibility::Disabled));
    assert!(rows[0].score.is_some());
}

#[test]
fn removed_key_is_never_chosen_and_slot_is_reused() {
    let mut t = table_with(2, "openai");
    assert!(t.remove(&KeyId::new("k0")));
    assert!(!t.remove(&KeyId::new("k0")));
    let model = ModelId::new("m");
    let o = offers(&[("openai", 0.01)]);
    for _ in 0..3 {
        assert_eq!(
            t.choose(&query(&model, &o), &Objective::default(), T0)
                .unwrap()
                .key_id
                .as_str(),
            "k1"
        );
    }
    t.upsert(&key("k9", "openai"));
    assert_eq!(t.len(), 2);
    assert_eq!(
        t.choose(&query(&model, &o), &Objective::default(), T0)
            .unwrap()
            .key_id
            .as_str(),
        "k9"
    );
}

fn state() -> impl Strategy<Value = KeyState> {
    prop::sample::select(KeyState::ALL.to_vec())
}

fn objective() -> impl Strategy<Value = Objective> {
    prop_oneof![
        prop::sample::select(ObjectiveKind::ALL.to_vec()).prop_map(Objective::primary),
        (0.0f64..1.0, 0.0f64..1.0, 0.01f64..1.0, 0.0f64..1.0).prop_map(|(c, r, f, l)| {
            Objective::weighted(&[
                (ObjectiveKind::Cost, c),
                (ObjectiveKind::Reliability, r),
                (ObjectiveKind::Fairness, f),
                (ObjectiveKind::Latency, l),
            ])
            .unwrap()
        }),
    ]
}

proptest! {
    /// Whatever the states and objective, the chosen key is routable and not parked,
    /// and a choice is made whenever one routable key exists.
    #[test]
    fn ineligible_key_is_never_chosen(
        states in prop::collection::vec((state(), any::<bool>(), 0u32..3), 1..40),
        objective in objective(),
    ) {
        let mut t = RoutingTable::new();
        let providers = ["openai", "anthropic", "gemini"];
        for (i, (s, parked, p)) in states.iter().enumerate() {
            let id = KeyId::new(format!("k{i}"));
            t.upsert(&key(id.as_str(), providers[*p as usize]));
            t.set_state(&id, *s, Some(T0.plus(Duration::from_secs(60))));
            if *parked {
                t.park(&id, T0.plus(Duration::from_secs(60)));
            }
        }
        let model = ModelId::new("m");
        let o = offers(&[("openai", 0.01), ("anthropic", 0.02), ("gemini", 0.005)]);
        let eligible = states.iter().any(|(s, parked, _)| s.is_routable() && !parked);
        match t.choose(&query(&model, &o), &objective, T0) {
            Ok(d) => {
                let i: usize = d.key_id.as_str()[1..].parse().unwrap();
                prop_assert!(states[i].0.is_routable());
                prop_assert!(!states[i].1);
            }
            Err(e) => {
                prop_assert!(!eligible);
                prop_assert_eq!(e.ineligible.total() as usize, states.len());
                let waiting = states.iter().any(|(s, parked, _)| {
                    matches!(s, KeyState::Throttled | KeyState::Exhausted)
                        || (s.is_routable() && *parked)
                });
                prop_assert_eq!(e.retry_at, waiting.then(|| T0.plus(Duration::from_secs(60))));
            }
        }
    }

    /// Fairness over K equal keys keeps every key within one request of N/K.
    #[test]
    fn fairness_stays_within_one_of_even_share(k in 1usize..20, n in 0usize..300) {
        let mut t = table_with(k, "openai");
        let model = ModelId::new("m");
        let o = offers(&[("openai", 0.01)]);
        let mut counts = vec![0usize; k];
        for _ in 0..n {
            let d = t.choose(&query(&model, &o), &Objective::default(), T0).unwrap();
            counts[d.key_id.as_str()[1..].parse::<usize>().unwrap()] += 1;
        }
        for c in counts {
            prop_assert!((c as f64 - n as f64 / k as f64).abs() <= 1.0);
        }
    }

    /// Two tables built from the same inputs make the same decisions.
    #[test]
    fn decision_is_deterministic(n in 1usize..30, objective in objective(), rounds in 1usize..20) {
        let mut a = table_with(n, "openai");
        let mut b = table_with(n, "openai");
        let model = ModelId::new("m");
        let o = offers(&[("openai", 0.01)]);
        for _ in 0..rounds {
            let da = a.choose(&query(&model, &o), &objective, T0).unwrap();
            let db = b.choose(&query(&model, &o), &objective, T0).unwrap();
            prop_assert_eq!(da, db);
        }
    }
}
