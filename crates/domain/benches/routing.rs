//! One routing decision with 10 to 10,000 keys, for each objective.
//!
//! Run with `cargo xtask bench`. Keys are spread over two providers, a tenth of them
//! throttled, so decisions see realistic pools rather than one uniform set.

#![expect(
    clippy::expect_used,
    reason = "benchmark setup with constant, valid inputs"
)]

use std::hint::black_box;
use std::time::Duration;

use apikeyrouter_domain::routing::{ProviderOffer, RouteQuery};
use apikeyrouter_domain::{
    ApiKey, KeyId, KeyMaterial, KeyMetadata, KeyState, ModelId, Money, Objective, ObjectiveKind,
    ProviderId, RoutingTable, Timestamp,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const NOW: Timestamp = Timestamp::from_millis(1_795_775_400_000);

fn table(n: usize) -> RoutingTable {
    let mut t = RoutingTable::new();
    let material = KeyMaterial::parse("sk-bench-0000000000").expect("valid material");
    for i in 0..n {
        let provider = if i % 2 == 0 { "openai" } else { "azure" };
        let key = ApiKey::new(
            KeyId::new(format!("key-{i}")),
            ProviderId::new(provider),
            material.clone(),
            KeyMetadata::default(),
            NOW,
        );
        t.upsert(&key);
        if i % 10 == 3 {
            t.set_state(
                &key.id,
                KeyState::Throttled,
                Some(NOW.plus(Duration::from_secs(3_600))),
            );
        }
    }
    t
}

fn decision(c: &mut Criterion) {
    let model = ModelId::new("gpt-4o");
    let offers = [
        ProviderOffer {
            provider: ProviderId::new("openai"),
            est_cost: Some(Money::from_usd(0.0102)),
        },
        ProviderOffer {
            provider: ProviderId::new("azure"),
            est_cost: Some(Money::from_usd(0.0110)),
        },
    ];
    let objectives = [
        ("cost", Objective::primary(ObjectiveKind::Cost)),
        (
            "reliability",
            Objective::primary(ObjectiveKind::Reliability),
        ),
        ("fairness", Objective::primary(ObjectiveKind::Fairness)),
        ("latency", Objective::primary(ObjectiveKind::Latency)),
    ];
    for (name, objective) in &objectives {
        let mut group = c.benchmark_group(format!("decision/{name}"));
        for n in [10usize, 100, 1_000, 10_000] {
            let mut t = table(n);
            let query = RouteQuery {
                model: &model,
                tenant: None,
                offers: &offers,
                exclude: &[],
            };
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| black_box(t.choose(black_box(&query), objective, NOW)))
            });
        }
        group.finish();
    }
    let weighted = Objective::weighted(&[
        (ObjectiveKind::Cost, 0.5),
        (ObjectiveKind::Reliability, 0.5),
    ])
    .expect("valid weights");
    let mut group = c.benchmark_group("decision/weighted");
    for n in [10usize, 100, 1_000] {
        let mut t = table(n);
        let query = RouteQuery {
            model: &model,
            tenant: None,
            offers: &offers,
            exclude: &[],
        };
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(t.choose(black_box(&query), &weighted, NOW)))
        });
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
