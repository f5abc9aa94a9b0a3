//! The full `route()` call on the in-memory store with an instant simulated provider:
//! everything the router adds around a provider call, on one thread and on two.

#![expect(
    clippy::expect_used,
    reason = "benchmark set-up with constant, valid inputs"
)]

use std::hint::black_box;
use std::sync::Arc;

use apikeyrouter::providers::SimulatedProvider;
use apikeyrouter::{ApiKeyRouter, KeyMetadata, Message, Objective, ObjectiveKind, RequestIntent};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn router(n_keys: usize) -> ApiKeyRouter {
    let router = ApiKeyRouter::builder().build().await.expect("router");
    router.register_provider("openai", Arc::new(SimulatedProvider::new()));
    for i in 0..n_keys {
        router
            .register_key(
                &format!("sk-bench-{i:08}"),
                "openai",
                KeyMetadata::default(),
            )
            .await
            .expect("key");
    }
    router
}

/// The simulated provider's own cost per call: subtracted from `route` to get the
/// router's overhead.
fn provider_alone(c: &mut Criterion) {
    use apikeyrouter::{KeyId, Provider, ProviderCall};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let provider = SimulatedProvider::new();
    let call = ProviderCall {
        key_id: KeyId::new("key-1"),
        material: apikeyrouter::domain::KeyMaterial::parse("sk-bench-00000001").expect("material"),
        model: "gpt-4o-mini".into(),
        request: Arc::new(RequestIntent::new(
            "gpt-4o-mini",
            vec![Message::user("What is the capital of France?")],
        )),
    };
    c.bench_function("route/provider_alone", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(provider.chat(call.clone()).await.expect("answer")) })
    });
}

fn route(c: &mut Criterion) {
    let intent = RequestIntent::new(
        "gpt-4o-mini",
        vec![Message::user("What is the capital of France?")],
    );
    let mut group = c.benchmark_group("route/one_thread");
    for n_keys in [10usize, 1_000] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let router = rt.block_on(router(n_keys));
        for (name, objective) in [
            ("fairness", Objective::primary(ObjectiveKind::Fairness)),
            ("cost", Objective::primary(ObjectiveKind::Cost)),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n_keys), &n_keys, |b, _| {
                b.to_async(&rt).iter(|| async {
                    black_box(
                        router
                            .route(intent.clone(), objective.clone())
                            .await
                            .expect("served"),
                    )
                })
            });
        }
    }
    group.finish();

    // Two worker threads, 64 requests in flight: throughput of the whole router.
    const BATCH: u64 = 64;
    let mut group = c.benchmark_group("route/two_threads");
    group.throughput(Throughput::Elements(BATCH));
    let rt = runtime(2);
    let router = Arc::new(rt.block_on(router(1_000)));
    group.bench_function("fairness_64_in_flight", |b| {
        b.to_async(&rt).iter(|| {
            let router = router.clone();
            let intent = intent.clone();
            async move {
                let mut tasks = Vec::with_capacity(BATCH as usize);
                for _ in 0..BATCH {
                    let router = router.clone();
                    let intent = intent.clone();
                    tasks.push(tokio::spawn(async move {
                        router.route_default(intent).await.is_ok()
                    }));
                }
                for t in tasks {
                    assert!(t.await.expect("task"));
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, provider_alone, route);
criterion_main!(benches);
