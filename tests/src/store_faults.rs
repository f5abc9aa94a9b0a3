//! A shared store lost during traffic: fail-closed answers 503 in OpenAI's error
//! shape, fail-open keeps serving on local limits; both recover when the store comes
//! back, and the audit records and the spend of the outage reach it, not lost.
//!
//! Each test runs its own `redis-server` (from Debian's package, installed by
//! `cargo xtask services up`) on a free port, with an append-only file so that a
//! restart keeps the data, and kills it mid-test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeyrouter::providers::SimulatedProvider;
use apikeyrouter::{
    ApiKeyRouter, Budget, BudgetPeriod, BudgetScope, Enforcement, KeyMetadata, ManualClock,
    Objective, RequestContext,
};
use apikeyrouter_adapters_stores::{FailMode, StoreConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{ask, base_now};

/// A private redis-server that can be killed and started again on the same port.
struct OwnRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("akr-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis data dir");
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        redis.resume();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run `cargo xtask services up`");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Retries `attempt` until it returns `Some`, for at most `within`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    within: Duration,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = attempt().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not recovered within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_then_recovers_and_delivers_the_outage_records() {
    let mut redis = OwnRedis::start();
    let text = format!(
        r#"listen = "127.0.0.1:0"
[store]
kind = "redis"
url = "{}"
on_unavailable = "fail_closed"
[admin]
token_env = "FAULTS_ADMIN"
[[providers]]
id = "sim"
kind = "simulated"
models = ["gpt-4o-mini"]
[[keys]]
provider = "sim"
material = "sk-sim-fault-000001"
"#,
        redis.url()
    );
    let vars = [("FAULTS_ADMIN".to_owned(), "faults-admin-token".to_owned())];
    let config = apikeyrouter::config::Config::parse(&text, "faults.toml", &vars).expect("config");
    let base = format!("http://{}", crate::support::spawn_proxy(&config).await);
    let client = reqwest::Client::new();
    let chat = |id: &str| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-request-id", id)
            .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };

    assert_eq!(chat("before").await.unwrap().status(), StatusCode::OK);

    redis.kill();
    let down = chat("during").await.unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = down.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The management API says the same, in the same shape: worth retrying.
    let budgets = client
        .get(format!("{base}/api/v1/budgets"))
        .bearer_auth("faults-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(budgets.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = budgets.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");

    redis.resume();
    let mut n = 0;
    eventually(Duration::from_secs(10), || {
        n += 1;
        let id = format!("after-{n}");
        let sent = chat(&id);
        async move { (sent.await.ok()?.status() == StatusCode::OK).then_some(()) }
    })
    .await;

    // Every request has its record, the refused one included: it waited in the
    // delivery queue while Redis was down.
    for id in ["before", "during", &format!("after-{n}")] {
        let record: Value = client
            .get(format!("{base}/api/v1/requests/{id}"))
            .bearer_auth("faults-admin-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(record["request_id"], id, "{record}");
    }
    let record: Value = client
        .get(format!("{base}/api/v1/requests/during"))
        .bearer_auth("faults-admin-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["outcome"]["code"], "store_unavailable", "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_serves_on_local_limits_and_resumes_shared_ones() {
    let mut redis = OwnRedis::start();
    let clock = Arc::new(ManualClock::new(base_now()));
    let router = ApiKeyRouter::builder()
        .clock(clock.clone())
        .store_config(StoreConfig::Redis {
            url: redis.url(),
            namespace: None,
            cluster: None,
            on_unavailable: Some(FailMode::FailOpen),
        })
        .build()
        .await
        .expect("router");
    router.register_provider("sim", Arc::new(SimulatedProvider::new()));
    let metadata = KeyMetadata {
        rpm: Some(3),
        ..KeyMetadata::default()
    };
    let key = router
        .register_key("sk-sim-fault-000002", "sim", metadata)
        .await
        .expect("key")
        .id;
    let budget = Budget::new(
        "all",
        BudgetScope::Global,
        100.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .expect("budget");
    router.add_budget(budget).await.expect("budget in redis");
    let objective = Objective::default();
    let route = |i: usize| {
        router.route_with(
            ask("gpt-4o-mini", "hi"),
            &objective,
            RequestContext {
                request_id: Some(apikeyrouter::RequestId::new(format!("open-{i}"))),
                ..RequestContext::default()
            },
        )
    };

    let cost = |served: &apikeyrouter::RouteResponse| served.actual_cost.expect("priced model");
    let mut spent = cost(&route(0).await.expect("served with redis up"));
    assert!(!router.store_health().degraded);

    redis.kill();
    // Served locally: the local mirror counts its own rpm window.
    spent += cost(&route(1).await.expect("served on local limits"));
    let health = router.store_health();
    assert!(health.degraded);
    assert!(health.local_fallbacks > 0);
    spent += cost(&route(2).await.expect("served on local limits"));
    spent += cost(&route(3).await.expect("served on local limits"));
    let refused = route(4).await.expect_err("local rpm limit of 3 holds");
    assert_eq!(refused.kind.code(), "no_eligible_key", "{refused}");

    redis.resume();
    clock.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut i = 4;
    let served = eventually(Duration::from_secs(10), || {
        i += 1;
        let sent = route(i);
        async move { sent.await.ok() }
    })
    .await;
    spent += cost(&served);
    assert!(!router.store_health().degraded);
    // Redis's budget counts what was spent during the outage too.
    let budgets = router.budgets().await.expect("budgets from redis");
    assert_eq!(
        (budgets[0].spent, budgets[0].reserved),
        (spent, apikeyrouter::Money::ZERO),
        "{budgets:?}"
    );
    // The shared window counts again: the new minute's request is in Redis.
    let quota = router.quota(&key).await.expect("quota from redis");
    let rpm = quota
        .windows
        .iter()
        .find(|w| w.kind == apikeyrouter::domain::quota::WindowKind::MinuteRequests)
        .expect("rpm window");
    assert_eq!(rpm.used, 1, "{quota:?}");

    // The records of the outage reached the request log once Redis was back.
    assert!(router.flush_records(Duration::from_secs(10)).await);
    for n in 1..=4 {
        let id = apikeyrouter::RequestId::new(format!("open-{n}"));
        assert!(router.request(&id).await.unwrap().is_some(), "open-{n}");
    }
}

/// A budget created in the split store while its counters store (Redis) is down is
/// created: the records store (MongoDB) decides and holds it, the answer says so
/// (a retry would only be told the id is taken), and the counters get it, with its
/// spend, at the next read of the budgets once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_created_while_the_counters_store_is_down_exists_and_reaches_it_later() {
    use apikeyrouter_adapters_stores::{RedisStore, SplitStore};
    use apikeyrouter_application::ports::BudgetStore;

    let mut redis = OwnRedis::start();
    let namespace = crate::support::fresh_namespace("split-fault");
    let counters = Arc::new(RedisStore::connect(&redis.url(), &namespace).await.unwrap());
    let database = crate::support::fresh_namespace("split_fault").replace('-', "_");
    let records = Arc::new(crate::support::mongo_store_in(&database).await);
    let split = SplitStore::new(counters.clone(), records);
    let budget = Budget::new(
        "made-in-outage",
        BudgetScope::Global,
        4.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap();
    let now = base_now();

    redis.kill();
    let made = split
        .insert_budget(budget.clone(), apikeyrouter::Money::from_usd(0.25), now)
        .await
        .expect("created although the counters store is down");
    assert_eq!(made.spent, apikeyrouter::Money::from_usd(0.25));
    let err = split
        .insert_budget(budget.clone(), apikeyrouter::Money::ZERO, now)
        .await
        .unwrap_err();
    assert_eq!(err.kind, apikeyrouter::StoreErrorKind::Conflict, "{err}");

    redis.resume();
    let listed = eventually(Duration::from_secs(10), || async {
        split.list_budgets().await.ok()
    })
    .await;
    assert_eq!(listed, std::slice::from_ref(&budget));
    let in_counters = counters.budget_statuses(now).await.unwrap();
    assert_eq!(in_counters.len(), 1);
    assert_eq!(
        (in_counters[0].budget_id.as_str(), in_counters[0].spent),
        ("made-in-outage", apikeyrouter::Money::from_usd(0.25))
    );
}
