//! `route()` on the Redis store against the memory store: requests per second, p50
//! and p99 latency per request, and Redis round trips per request, at one request
//! in flight and at sixteen. The provider is the instant simulated one, so what is
//! measured is the router plus its store.
//!
//! Run with `cargo xtask bench redis [REQUESTS]`. Needs the Redis server at
//! `REDIS_URL` (default `redis://127.0.0.1:6379`) and fails, never skips, without it.
//! Not a criterion bench: the numbers wanted are a throughput and a latency
//! distribution under concurrency, which criterion does not report.

#![expect(
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: a failed set-up must stop it loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeyrouter::providers::SimulatedProvider;
use apikeyrouter::{ApiKeyRouter, KeyMetadata, Message, Objective, RequestIntent, StateStore};
use apikeyrouter_adapters_stores::{MemoryStore, RedisStore};

const N_KEYS: usize = 10;
const WARM_UP: usize = 500;

/// What one run measured.
struct Measured {
    rps: f64,
    p50: Duration,
    p99: Duration,
    round_trips_per_request: Option<f64>,
}

async fn router(store: Arc<dyn StateStore>) -> ApiKeyRouter {
    let router = ApiKeyRouter::builder()
        .store(store)
        .build()
        .await
        .expect("router");
    router.register_provider("openai", Arc::new(SimulatedProvider::new()));
    for i in 0..N_KEYS {
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

async fn redis_store() -> Arc<RedisStore> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let namespace = format!("bench-{}-{nanos}", std::process::id());
    match RedisStore::connect(&url, &namespace).await {
        Ok(store) => Arc::new(store),
        Err(err) => panic!(
            "the redis benchmark needs a redis server at {url} ({err}); \
             run `cargo xtask services up` (or set REDIS_URL)"
        ),
    }
}

/// `n_requests` routes split over `concurrency` tasks, each sending one after the
/// other; latency is taken per request.
async fn run(
    router: Arc<ApiKeyRouter>,
    n_requests: usize,
    concurrency: usize,
    redis: Option<&RedisStore>,
) -> Measured {
    let intent = RequestIntent::new(
        "gpt-4o-mini",
        vec![Message::user("What is the capital of France?")],
    );
    let route_n = |n: usize| {
        let router = router.clone();
        let intent = intent.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            for _ in 0..n {
                let started = Instant::now();
                router
                    .route(intent.clone(), Objective::default())
                    .await
                    .expect("served");
                latencies.push(started.elapsed());
            }
            latencies
        })
    };
    route_n(WARM_UP).await.expect("warm-up");

    let trips_before = redis.map(RedisStore::round_trips);
    let started = Instant::now();
    let per_task = n_requests / concurrency;
    let tasks: Vec<_> = (0..concurrency).map(|_| route_n(per_task)).collect();
    let mut latencies = Vec::with_capacity(per_task * concurrency);
    for task in tasks {
        latencies.extend(task.await.expect("task"));
    }
    let elapsed = started.elapsed();
    let n_done = latencies.len();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((n_done as f64 * q) as usize).min(n_done - 1)];
    Measured {
        rps: n_done as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        round_trips_per_request: redis
            .zip(trips_before)
            .map(|(store, before)| (store.round_trips() - before) as f64 / n_done as f64),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    // `cargo bench` passes `--bench` (and criterion flags under `cargo xtask bench`):
    // only `--requests N` is ours.
    let args: Vec<String> = std::env::args().collect();
    let n_requests = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|idx| args.get(idx + 1))
        .map_or(20_000, |n| n.parse().expect("--requests takes a number"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    println!("route() with an instant provider, {N_KEYS} keys, {n_requests} requests per case");
    println!(
        "{:<8} {:>11} {:>12} {:>10} {:>10} {:>12} {:>12} {:>14}",
        "store", "in flight", "requests/s", "p50 µs", "p99 µs", "+p50 µs", "+p99 µs", "round trips"
    );
    for concurrency in [1usize, 16] {
        let memory = rt.block_on(async {
            let router = Arc::new(router(Arc::new(MemoryStore::new())).await);
            run(router, n_requests, concurrency, None).await
        });
        let redis = rt.block_on(async {
            let store = redis_store().await;
            let router = Arc::new(router(store.clone()).await);
            run(router, n_requests, concurrency, Some(&store)).await
        });
        for (name, m) in [("memory", &memory), ("redis", &redis)] {
            println!(
                "{:<8} {:>11} {:>12.0} {:>10.1} {:>10.1} {:>12.1} {:>12.1} {:>14}",
                name,
                concurrency,
                m.rps,
                micros(m.p50),
                micros(m.p99),
                micros(m.p50) - micros(memory.p50),
                micros(m.p99) - micros(memory.p99),
                m.round_trips_per_request
                    .map_or("-".to_owned(), |n| format!("{n:.2}")),
            );
        }
    }
}
