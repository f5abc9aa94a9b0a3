//! Budget ledger tests, including the never-overspend property.

use proptest::prelude::*;

use super::*;

fn hard(limit_usd: f64) -> Budget {
    Budget::new(
        "b",
        BudgetScope::Global,
        limit_usd,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap()
}

const NOW: Timestamp = Timestamp::from_millis(1_795_775_400_000);

#[test]
fn budget_rejects_overspend() {
    let mut l = BudgetLedger::new(hard(1.0), NOW);
    l.reserve(ReservationId(1), Money::from_usd(0.6), NOW)
        .unwrap();
    let err = l
        .reserve(ReservationId(2), Money::from_usd(0.5), NOW)
        .unwrap_err();
    assert!(matches!(err, BudgetError::WouldExceed { .. }));
    assert_eq!(l.reserved(), Money::from_usd(0.6));
    l.commit(ReservationId(1), Money::from_usd(0.2), NOW);
    assert_eq!(l.remaining(), Money::from_usd(0.8));
    l.reserve(ReservationId(2), Money::from_usd(0.5), NOW)
        .unwrap();
}

#[test]
fn reclaim_drops_only_reservations_taken_before_the_cutoff() {
    let later = NOW.plus(std::time::Duration::from_secs(600));
    let mut l = BudgetLedger::new(hard(1.0), NOW);
    l.reserve(ReservationId(1), Money::from_usd(0.3), NOW)
        .unwrap();
    l.reserve(ReservationId(2), Money::from_usd(0.2), NOW)
        .unwrap();
    l.reserve(ReservationId(3), Money::from_usd(0.4), later)
        .unwrap();

    assert_eq!(l.reclaim(NOW), Reclaimed::default());
    let reclaimed = l.reclaim(later);
    assert_eq!(
        reclaimed,
        Reclaimed {
            count: 2,
            amount: Money::from_usd(0.5)
        }
    );
    assert_eq!(l.reserved(), Money::from_usd(0.4));
    assert_eq!(l.remaining(), Money::from_usd(0.6));
    assert_eq!(l.spent, Money::ZERO);

    // The request did finish after all: its cost is charged, nothing more is given back.
    l.commit(ReservationId(1), Money::from_usd(0.1), later);
    assert_eq!(l.spent, Money::from_usd(0.1));
    assert_eq!(l.reserved(), Money::from_usd(0.4));
}

#[test]
fn soft_budget_allows_and_flags() {
    let b = Budget::new(
        "s",
        BudgetScope::Global,
        1.0,
        BudgetPeriod::Daily,
        Enforcement::Soft,
    )
    .unwrap();
    let mut l = BudgetLedger::new(b, NOW);
    l.reserve(ReservationId(1), Money::from_usd(2.0), NOW)
        .unwrap();
    assert!(l.status().over_limit);
}

#[test]
fn bad_budgets_are_refused_precisely() {
    let e = Budget::new(
        "x",
        BudgetScope::Global,
        0.0,
        BudgetPeriod::Daily,
        Enforcement::Hard,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "budget x has a non-positive limit; limits must be greater than zero"
    );
    assert!(
        Budget::new(
            "x",
            BudgetScope::Global,
            -5.0,
            BudgetPeriod::Daily,
            Enforcement::Hard
        )
        .is_err()
    );
    assert!(
        Budget::new(
            "x",
            BudgetScope::Global,
            f64::NAN,
            BudgetPeriod::Daily,
            Enforcement::Hard
        )
        .is_err()
    );
    assert_eq!(
        Budget::new(
            " ",
            BudgetScope::Global,
            1.0,
            BudgetPeriod::Daily,
            Enforcement::Hard
        ),
        Err(BudgetError::EmptyId)
    );
}

#[test]
fn redefining_keeps_the_spend_and_the_reservations() {
    let mut l = BudgetLedger::new(hard(1.0), NOW);
    l.commit(ReservationId(1), Money::from_usd(0.3), NOW);
    l.reserve(ReservationId(2), Money::from_usd(0.2), NOW)
        .unwrap();
    let month = (l.period_start, l.period_end);

    l.redefine(hard(2.0), NOW);
    assert_eq!(
        (l.spent, l.reserved()),
        (Money::from_usd(0.3), Money::from_usd(0.2))
    );
    assert_eq!(l.remaining(), Money::from_usd(1.5));
    assert_eq!((l.period_start, l.period_end), month);
    // The reservation held before is still the one a settlement commits.
    l.commit(ReservationId(2), Money::from_usd(0.1), NOW);
    assert_eq!((l.spent, l.reserved()), (Money::from_usd(0.4), Money::ZERO));

    let mut daily = hard(0.5);
    daily.period = BudgetPeriod::Daily;
    daily.enforcement = Enforcement::Soft;
    l.redefine(daily.clone(), NOW);
    assert_eq!(
        (l.period_start, l.period_end),
        BudgetPeriod::Daily.bounds(NOW)
    );
    assert_eq!(l.spent, Money::from_usd(0.4));
    assert_eq!(l.budget, daily);

    // A redefinition after the period ended starts the new one empty.
    let next_day = l.period_end;
    l.redefine(hard(1.0), next_day);
    assert_eq!(l.spent, Money::ZERO);
    assert_eq!(
        (l.period_start, l.period_end),
        BudgetPeriod::Monthly.bounds(next_day)
    );
}

#[test]
fn period_rolls_over_and_resets_spend() {
    let mut l = BudgetLedger::new(hard(1.0), NOW);
    l.commit(ReservationId(1), Money::from_usd(1.0), NOW);
    assert!(l.check(Money::from_usd(0.1)).is_err());
    let next_month = NOW.start_of_next_month();
    l.reserve(ReservationId(2), Money::from_usd(0.5), next_month)
        .unwrap();
    assert_eq!(l.spent, Money::ZERO);
    assert_eq!(l.period_start, next_month);
}

#[test]
fn scopes_cover_matching_requests_only() {
    let provider = ProviderId::new("openai");
    let key = KeyId::new("k1");
    let tenant = TenantId::new("acme");
    let mut tags = BTreeMap::new();
    tags.insert("feature".to_owned(), "chatbot".to_owned());
    let ctx = ChargeContext {
        provider: &provider,
        key: &key,
        tenant: Some(&tenant),
        tags: &tags,
    };
    assert!(BudgetScope::Global.covers(&ctx));
    assert!(
        BudgetScope::Tenant {
            tenant: TenantId::new("acme")
        }
        .covers(&ctx)
    );
    assert!(
        !BudgetScope::Tenant {
            tenant: TenantId::new("other")
        }
        .covers(&ctx)
    );
    assert!(
        BudgetScope::Tag {
            key: "feature".into(),
            value: "chatbot".into()
        }
        .covers(&ctx)
    );
    assert!(
        !BudgetScope::Provider {
            provider: ProviderId::new("anthropic")
        }
        .covers(&ctx)
    );
}

#[test]
fn custom_period_bounds() {
    let p = BudgetPeriod::Custom {
        anchor: Timestamp::from_millis(1_000),
        length_secs: 10,
    };
    assert_eq!(
        p.bounds(Timestamp::from_millis(25_500)),
        (
            Timestamp::from_millis(21_000),
            Timestamp::from_millis(31_000)
        )
    );
}

#[derive(Clone, Debug)]
enum Op {
    Reserve(u64, u64),
    Commit(u64, u64),
    Release(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..20, 1u64..400).prop_map(|(id, c)| Op::Reserve(id, c)),
        (0u64..20, 0u64..400).prop_map(|(id, c)| Op::Commit(id, c)),
        (0u64..20).prop_map(Op::Release),
    ]
}

proptest! {
    /// Under any interleaving of reserve, commit (never above what was reserved) and
    /// release, committed plus reserved money never exceeds a hard limit.
    #[test]
    fn hard_budget_is_never_exceeded(ops in proptest::collection::vec(op(), 1..200)) {
        let mut l = BudgetLedger::new(hard(0.001), NOW);
        let mut held: HashMap<u64, u64> = HashMap::default();
        for op in ops {
            match op {
                Op::Reserve(id, cents) => {
                    let amount = Money::from_nanos(cents * 1_000);
                    if l.reserve(ReservationId(id), amount, NOW).is_ok() {
                        held.insert(id, cents);
                    }
                }
                Op::Commit(id, cents) => {
                    // A real call never costs more than its reserved upper bound.
                    if let Some(max) = held.remove(&id) {
                        l.commit(ReservationId(id), Money::from_nanos(cents.min(max) * 1_000), NOW);
                    }
                }
                Op::Release(id) => { held.remove(&id); l.release(ReservationId(id)); }
            }
            prop_assert!(l.spent.saturating_add(l.reserved()) <= l.budget.limit);
            let expected: u64 = held.values().map(|c| c * 1_000).sum();
            prop_assert_eq!(l.reserved(), Money::from_nanos(expected));
        }
    }
}
