//! Behaviour specific to [`RedisStore`], against a real server: connection errors,
//! foreign or corrupt data under our names, change events, instances sharing a
//! namespace. The behaviour every store shares is checked by the conformance suite
//! in the workspace's `tests` crate.
//!
//! These tests never skip: without a server they fail, saying how to start one.

use crate::test_time::base_now;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, KeyOutcome, KeyStore, RequestLog, Settlement, StateStore,
    StoreChange, StoreErrorKind, UsageLedger, Verdict, VirtualKeyStore,
};
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetPeriod, BudgetScope, Enforcement, KeyId, KeyMaterial, KeyMetadata,
    KeyState, Money, ProviderId, QuotaLimits, RequestId, ReservationId, TokenUsage,
    TransitionTrigger, VirtualKey, WindowKind,
};
use futures_util::StreamExt;
use redis::AsyncCommands;

use super::RedisStore;
use super::keys::Names;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A namespace no other test uses.
fn fresh_namespace() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "test-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

async fn store_in(namespace: &str) -> RedisStore {
    let url = redis_url();
    match RedisStore::connect(&url, namespace).await {
        Ok(store) => store,
        Err(err) => panic!(
            "no redis server at {url} ({err}); run `cargo xtask services up` or set REDIS_URL"
        ),
    }
}

async fn store() -> RedisStore {
    store_in(&fresh_namespace()).await
}

/// A plain connection, for writing what the store would never write.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A fresh store holding key `k1` and a hard daily budget `b` of $1.
async fn store_with_key_and_budget() -> RedisStore {
    let store = store().await;
    store.insert_key(key("k1")).await.unwrap();
    store
        .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
        .await
        .unwrap();
    store
}

fn key(id: &str) -> ApiKey {
    ApiKey::new(
        KeyId::new(id),
        ProviderId::new("openai"),
        KeyMaterial::parse("sk-test-0000000000").unwrap(),
        KeyMetadata::default(),
        base_now(),
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

fn charge(reservation: u64, key_id: &str, est_usd: f64) -> Charge {
    Charge {
        reservation: ReservationId(reservation),
        key_id: KeyId::new(key_id),
        limits: QuotaLimits::default(),
        est_tokens: 100,
        est_cost: Money::from_usd(est_usd),
        budget_ids: vec!["b".to_owned()],
        client: None,
        now: base_now(),
    }
}

#[tokio::test]
async fn unreachable_server_is_unavailable_and_the_password_stays_hidden() {
    let err = RedisStore::connect("redis://:s3cret@127.0.0.1:1", "ns")
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable);
    assert!(
        err.message
            .starts_with("cannot reach redis at redis://:***@127.0.0.1:1:"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("s3cret"));
    assert!(err.is_retryable());
}

#[tokio::test]
async fn unreachable_cluster_is_unavailable_and_the_passwords_stay_hidden() {
    let err = RedisStore::connect_cluster(
        "redis://:s3cret@127.0.0.1:1, redis://:s3cret@127.0.0.1:2",
        "ns",
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{}", err.message);
    assert!(
        err.message.starts_with(
            "cannot reach redis cluster at redis://:***@127.0.0.1:1,redis://:***@127.0.0.1:2:"
        ),
        "{}",
        err.message
    );
    assert!(!err.message.contains("s3cret"));
}

#[tokio::test]
async fn malformed_cluster_urls_and_namespace_are_invalid() {
    let err = RedisStore::connect_cluster("http://:s3cret@host", "ns")
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(err.message, "invalid redis cluster url http://:***@host");
    let err = RedisStore::connect_cluster(" , ", "ns").await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    let err = RedisStore::connect_cluster("redis://127.0.0.1:1", "a b")
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
}

#[tokio::test]
async fn malformed_url_and_namespace_are_invalid() {
    let err = RedisStore::connect("http://:s3cret@host", "ns")
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(err.message, "invalid redis url http://:***@host");

    let err = RedisStore::connect(&redis_url(), "a{b}").await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
}

#[tokio::test]
async fn store_reports_its_kind_and_hides_the_password_in_debug() {
    let store = store().await;
    assert_eq!(store.kind(), "redis");
    store.ping().await.unwrap();
    let shown = format!("{store:?}");
    assert!(shown.contains("RedisStore"), "{shown}");
    assert!(shown.contains(store.namespace()), "{shown}");
    assert!(!shown.contains("sk-test"), "{shown}");
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_invalid_and_names_the_redis_key() {
    let store = store().await;
    let names = Names::new(store.namespace()).unwrap();
    let id = KeyId::new("k1");
    let doc = names.key(&id);
    let _: () = raw().await.set(&doc, "not a hash").await.unwrap();

    let err = store.get_key(&id).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert!(err.message.contains(&doc), "{}", err.message);

    // The same through a script.
    let Err(ChargeRejection::Store(err)) = store.reserve(&charge(1, "k1", 0.01)).await else {
        panic!("a reserve on a corrupt key must fail with a store error");
    };
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(
        err.message,
        format!(
            "redis key {doc} holds invalid data: WRONGTYPE Operation against a key holding the wrong kind of value"
        )
    );
    let err = store.insert_key(key("k1")).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
}

#[tokio::test]
async fn corrupt_json_and_counters_are_invalid_and_name_the_redis_key() {
    let store = store().await;
    let names = Names::new(store.namespace()).unwrap();
    let id = KeyId::new("k1");
    store.insert_key(key("k1")).await.unwrap();
    store
        .transition(
            &id,
            KeyState::Disabled,
            TransitionTrigger::Manual,
            "off".to_owned(),
            None,
            base_now(),
        )
        .await
        .unwrap();
    let mut conn = raw().await;

    let _: () = conn
        .rpush(names.transitions(&id), "{not json")
        .await
        .unwrap();
    let err = store.transitions(&id).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert!(
        err.message.contains(&names.transitions(&id)),
        "{}",
        err.message
    );

    let _: () = conn.hset(names.key(&id), "meta", "[1,").await.unwrap();
    let err = store.get_key(&id).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert!(err.message.contains(&names.key(&id)), "{}", err.message);
    assert_eq!(
        store.list_keys().await.unwrap_err().kind,
        StoreErrorKind::Invalid
    );

    store
        .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
        .await
        .unwrap();
    let _: () = conn.hset(names.budget("b"), "spent", "lots").await.unwrap();
    let Err(ChargeRejection::Store(err)) = store.reserve(&charge(1, "k1", 0.01)).await else {
        panic!("a reserve against a corrupt budget must fail with a store error");
    };
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(
        err.message,
        format!(
            "redis key {} holds invalid data: field spent is not a number",
            names.budget("b")
        )
    );

    let request = RequestId::new("r1");
    let _: () = conn.set(names.request(&request), "{").await.unwrap();
    let err = store.get_request(&request).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert!(err.message.contains(&names.request(&request)));
}

#[tokio::test]
async fn key_changes_are_announced_to_subscribers() {
    let store = store().await;
    let mut events = Box::pin(store.subscribe_changes().await.unwrap());
    let id = KeyId::new("k1");

    store.insert_key(key("k1")).await.unwrap();
    store
        .update_metadata(&id, KeyMetadata::default())
        .await
        .unwrap();
    store
        .transition(
            &id,
            KeyState::Throttled,
            TransitionTrigger::RateLimited,
            "429".to_owned(),
            Some(base_now().plus(Duration::from_secs(30))),
            base_now(),
        )
        .await
        .unwrap();
    store.delete_key(&id).await.unwrap();

    for _ in 0..4 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s");
        assert_eq!(event, Some(StoreChange::Key(id.clone())));
    }
}

#[tokio::test]
async fn budget_changes_are_announced_to_subscribers() {
    let store = store().await;
    let mut events = Box::pin(store.subscribe_changes().await.unwrap());
    let budget = Budget::new(
        "b1",
        BudgetScope::Global,
        5.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap();
    store
        .put_budget(budget, Money::ZERO, base_now())
        .await
        .unwrap();
    store.delete_budget("b1").await.unwrap();
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s");
        assert_eq!(event, Some(StoreChange::Budgets));
    }
}

/// Virtual-key changes reach subscribers, and a stored record that does not decode
/// (written by another version, or by hand) is left out of the list rather than
/// failing it: one bad record must not lock every client out.
#[tokio::test]
async fn virtual_key_changes_are_announced_and_a_bad_record_is_left_out() {
    let store = store().await;
    let names = Names::new(store.namespace()).unwrap();
    let mut events = Box::pin(store.subscribe_changes().await.unwrap());
    let key = VirtualKey {
        name: "good".to_owned(),
        token_sha256: "a".repeat(64),
        tenant: None,
        models: None,
        rpm: None,
        budget_usd: None,
        created_at: base_now(),
        revoked_at: None,
    };
    store.insert_virtual_key(key.clone()).await.unwrap();
    store.revoke_virtual_key("good", base_now()).await.unwrap();
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s");
        assert_eq!(event, Some(StoreChange::VirtualKey("good".to_owned())));
    }
    // An older instance's event names no key: every virtual key is read again.
    let _: () = raw()
        .await
        .publish(names.virtual_key_events(), "changed")
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5 s");
    assert_eq!(event, Some(StoreChange::VirtualKeys));
    let _: () = raw()
        .await
        .hset(names.virtual_keys(), "bad", "{not json")
        .await
        .unwrap();
    let listed = store.list_virtual_keys().await.unwrap();
    assert_eq!(
        listed,
        [VirtualKey {
            revoked_at: Some(base_now()),
            ..key
        }]
    );
    // When none decodes, the list fails rather than say no key was ever made.
    let _: () = raw()
        .await
        .hset(names.virtual_keys(), "good", "[]")
        .await
        .unwrap();
    let err = store.list_virtual_keys().await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
}

#[tokio::test]
async fn a_re_registered_key_starts_with_fresh_windows() {
    let store = store().await;
    let id = KeyId::new("k1");
    let limits = QuotaLimits {
        rpm: Some(1),
        ..QuotaLimits::default()
    };
    store.insert_key(key("k1")).await.unwrap();
    let mut c = charge(1, "k1", 0.0);
    c.limits = limits;
    store.reserve(&c).await.unwrap();
    assert!(matches!(
        store.reserve(&c).await,
        Err(ChargeRejection::Quota(_))
    ));

    store.delete_key(&id).await.unwrap();
    store.insert_key(key("k1")).await.unwrap();

    store.reserve(&c).await.unwrap();
    let snapshot = store
        .quota_snapshot(&id, &limits, base_now())
        .await
        .unwrap();
    let window = snapshot.window(WindowKind::MinuteRequests).unwrap();
    assert_eq!(window.used, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_sharing_a_namespace_never_overspend_together() {
    let namespace = fresh_namespace();
    let first: Arc<dyn StateStore> = Arc::new(store_in(&namespace).await);
    let second: Arc<dyn StateStore> = Arc::new(store_in(&namespace).await);
    first.insert_key(key("k1")).await.unwrap();
    first
        .put_budget(hard_budget("b", 0.5), Money::ZERO, base_now())
        .await
        .unwrap();

    let tasks: Vec<_> = (0..100)
        .map(|reservation| {
            let store = if reservation % 2 == 0 {
                Arc::clone(&first)
            } else {
                Arc::clone(&second)
            };
            tokio::spawn(async move {
                let c = charge(reservation, "k1", 0.01);
                match store.reserve(&c).await {
                    Ok(()) => {
                        store
                            .settle(&c, &spent(100, Money::from_usd(0.01)))
                            .await
                            .unwrap();
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

    assert_eq!(n_succeeded, 50);
    let status = &second.budget_statuses(base_now()).await.unwrap()[0];
    assert_eq!(status.spent, Money::from_usd(0.5));
    assert_eq!(status.reserved, Money::ZERO);
}

/// A successful call at `base_now()` that used `tokens` and cost `cost`.
fn spent(tokens: u64, cost: Money) -> Settlement {
    Settlement {
        outcome: KeyOutcome {
            verdict: Verdict::Succeeded,
            latency: Duration::from_millis(100),
            usage: TokenUsage {
                prompt_tokens: 0,
                completion_tokens: tokens,
                cached_tokens: 0,
            },
            cost,
            now: base_now(),
        },
        observation: None,
    }
}

/// A reservation stored as `amount:taken_at`; one written before the time was kept (a
/// bare amount, perhaps by an instance still running the old version) still settles,
/// and the first sweep dates it instead of reclaiming it: it goes one lease later.
#[tokio::test]
async fn reservations_keep_their_time_and_the_first_sweep_dates_undated_ones() {
    let store = store_with_key_and_budget().await;
    store.reserve(&charge(1, "k1", 0.25)).await.unwrap();
    store.reserve(&charge(2, "k1", 0.5)).await.unwrap();
    let reservations = Names::new(store.namespace()).unwrap().reservations("b");
    let mut raw = raw().await;
    let held: String = raw.hget(&reservations, "1").await.unwrap();
    assert_eq!(held, format!("250000000:{}", base_now().as_millis()));
    let _: () = raw.hset(&reservations, "2", "500000000").await.unwrap();

    let swept_at = base_now().plus(Duration::from_secs(60));
    assert_eq!(
        store
            .reclaim_reservations(base_now(), swept_at)
            .await
            .unwrap(),
        []
    );
    let dated: String = raw.hget(&reservations, "2").await.unwrap();
    assert_eq!(dated, format!("500000000:{}", swept_at.as_millis()));
    let reclaimed = store
        .reclaim_reservations(swept_at.plus(Duration::from_millis(1)), swept_at)
        .await
        .unwrap();
    // Reservation 1 (taken at base_now) goes with it.
    assert_eq!(
        (reclaimed[0].count, reclaimed[0].amount),
        (2, Money::from_usd(0.75))
    );
    // A malformed value stops the sweep with the budget unchanged.
    store.reserve(&charge(3, "k1", 0.25)).await.unwrap();
    let _: () = raw.hset(&reservations, "4", "lots").await.unwrap();
    let err = store
        .reclaim_reservations(swept_at.plus(Duration::from_secs(3_600)), swept_at)
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
    let _: () = raw.hdel(&reservations, "4").await.unwrap();
    let status = &store.budget_statuses(base_now()).await.unwrap()[0];
    assert_eq!(status.reserved, Money::from_usd(0.25));
    let held: String = raw.hget(&reservations, "3").await.unwrap();
    assert!(held.starts_with("250000000:"), "{held}");
    let settled = store
        .settle(&charge(3, "k1", 0.25), &spent(10, Money::from_usd(0.2)))
        .await
        .unwrap();
    assert_eq!(
        (settled.budgets[0].spent, settled.budgets[0].reserved),
        (Money::from_usd(0.2), Money::ZERO)
    );
}

#[tokio::test]
async fn reserve_settle_and_release_take_one_round_trip_each() {
    let store = store_with_key_and_budget().await;
    let c = charge(1, "k1", 0.1);
    let failed = Settlement {
        outcome: KeyOutcome {
            verdict: Verdict::Failed {
                rate_limited: false,
            },
            ..spent(0, Money::ZERO).outcome
        },
        observation: None,
    };

    let before = store.round_trips();
    store.reserve(&c).await.unwrap();
    assert_eq!(store.round_trips() - before, 1);
    let stats = store.release(&c, &failed).await.unwrap().unwrap();
    assert_eq!(store.round_trips() - before, 2);
    assert_eq!((stats.requests, stats.failures), (1, 1));

    let c = charge(2, "k1", 0.1);
    store.reserve(&c).await.unwrap();
    let settled = store
        .settle(&c, &spent(40, Money::from_usd(0.05)))
        .await
        .unwrap();
    assert_eq!(store.round_trips() - before, 4);
    assert_eq!(settled.budgets[0].spent, Money::from_usd(0.05));
    assert_eq!(settled.stats.unwrap().successes, 1);
}

#[tokio::test]
async fn settle_loads_its_scripts_again_after_the_server_lost_them() {
    let store = store_with_key_and_budget().await;
    let c = charge(1, "k1", 0.1);
    store.reserve(&c).await.unwrap();
    // Other tests' stores reload on NOSCRIPT too, so flushing the shared cache is safe.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw().await)
        .await
        .unwrap();

    let settled = store
        .settle(&c, &spent(40, Money::from_usd(0.05)))
        .await
        .unwrap();

    // Each part ran exactly once: spent once, counted once.
    assert_eq!(settled.budgets[0].spent, Money::from_usd(0.05));
    assert_eq!(settled.budgets[0].reserved, Money::ZERO);
    let stats = settled.stats.unwrap();
    assert_eq!((stats.requests, stats.successes), (1, 1));
    assert_eq!(store.get_key(&KeyId::new("k1")).await.unwrap().stats, stats);
    assert_eq!(
        store.budget_statuses(base_now()).await.unwrap()[0].spent,
        Money::from_usd(0.05)
    );
}

#[tokio::test]
async fn request_records_expire_after_their_ttl() {
    let store = store().await.with_request_ttl(Duration::from_millis(50));
    let record = apikeyrouter_application::records::AuditRecord {
        request_id: RequestId::new("r1"),
        correlation_id: None,
        tenant: None,
        tags: std::collections::BTreeMap::new(),
        requested_model: apikeyrouter_domain::ModelId::new("gpt-4o"),
        key_id: None,
        provider: None,
        model: None,
        decision: None,
        attempts: Vec::new(),
        usage: apikeyrouter_domain::TokenUsage::default(),
        estimated_cost: None,
        actual_cost: None,
        outcome: apikeyrouter_application::records::Outcome::Success,
        started_at: base_now(),
        finished_at: base_now(),
    };
    store.save_request(Arc::new(record.clone())).await.unwrap();
    assert_eq!(
        store.get_request(&RequestId::new("r1")).await.unwrap(),
        Some(record)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.get_request(&RequestId::new("r1")).await.unwrap(),
        None
    );
}

/// A redis-server of this test's own on a free port, stopped when dropped.
struct OwnServer {
    child: std::process::Child,
    port: u16,
}

impl OwnServer {
    fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot run redis-server ({err}); run `cargo xtask services up`")
            });
        Self { child, port }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn connect_with_retries(url: &str) -> RedisStore {
    for _ in 0..50 {
        if let Ok(store) = RedisStore::connect(url, "outage").await {
            return store;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("redis-server at {url} did not come up within 5 s");
}

#[tokio::test]
async fn an_outage_is_unavailable_and_the_store_recovers_after_it() {
    let port = OwnServer::free_port();
    let mut server = OwnServer::start(port);
    let store = connect_with_retries(&server.url()).await;
    store.insert_key(key("k1")).await.unwrap();

    server.stop();
    let started = std::time::Instant::now();
    let err = store.get_key(&KeyId::new("k1")).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{}", err.message);
    let Err(ChargeRejection::Store(err)) = store.reserve(&charge(1, "k1", 0.01)).await else {
        panic!("a reserve during an outage must fail with a store error");
    };
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(10));

    // The server comes back (empty: no persistence); the same store works again.
    let _server = OwnServer::start(port);
    let mut recovered = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if store.ping().await.is_ok() {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "the store did not reconnect within 5 s");
    assert_eq!(
        store.get_key(&KeyId::new("k1")).await.unwrap_err().kind,
        StoreErrorKind::NotFound
    );
    store.insert_key(key("k1")).await.unwrap();
    store.reserve(&charge(2, "k1", 0.01)).await.unwrap();
}
