//! One conformance suite every state store passes: each case is written once, as an
//! async function of an `Arc<dyn StateStore>`, and [`conformance_suite!`] turns the
//! whole list into `#[tokio::test]`s for one backend.
//!
//! Backends: `memory`, `redis` against the server at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `redis_cluster` against a private three-node Redis
//! Cluster started by the tests ([`crate::redis_cluster`]), `mongodb` and `split`,
//! each test in a fresh namespace. The Redis tests never skip: without a server they
//! fail, saying to run `cargo xtask services up`.
//! Adding a backend is one line:
//!
//! ```ignore
//! conformance_suite!(mongodb, || async { Arc::new(connect_mongo().await) as Arc<dyn StateStore> });
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use apikeyrouter_adapters_stores::{MemoryStore, MongoStore, RedisStore, SplitStore};
use apikeyrouter_application::ports::StateStore;

/// Generates one `#[tokio::test]` per conformance case for a backend. `$make` is a
/// closure returning a future of a fresh, empty `Arc<dyn StateStore>`.
macro_rules! conformance_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            async fn fresh() -> Arc<dyn StateStore> {
                ($make)().await
            }

            conformance_suite!(@cases
                store_reports_its_kind_and_answers_ping,
                key_crud_round_trips_and_reports_conflict_and_not_found,
                forbidden_transition_is_invalid_and_changes_nothing,
                a_disabled_key_is_left_only_by_hand,
                transitions_persist_in_order,
                settle_and_release_accumulate_counters,
                abandoned_attempts_add_spend_but_leave_the_key_health_alone,
                settle_updates_windows_counters_observation_and_budget_at_once,
                unknown_key_is_not_found_and_unknown_budgets_are_ignored,
                budget_refusal_leaves_the_key_windows_unchanged,
                quota_refusal_reserves_nothing_in_budgets,
                client_rpm_counts_once_per_charge_and_refusals_charge_nothing,
                key_refusal_gives_back_the_budget_and_the_client_count,
                rpm_window_refuses_until_the_next_minute_then_rolls_over,
                tpm_estimate_is_reconciled_to_the_actual_tokens,
                settle_returns_statuses_with_spent_equal_to_actual,
                release_returns_the_money_but_counts_the_request,
                added_spend_counts_without_touching_reservations,
                added_spend_of_a_closed_period_is_not_carried_into_the_next,
                reserving_an_id_again_replaces_the_reservation,
                soft_budget_allows_overrun_and_flags_it,
                budget_period_rolls_over_and_keeps_reservations,
                stale_reservations_are_reclaimed_once_and_late_settles_still_charge,
                custom_budget_period_rolls_over,
                budgets_are_listed_replaced_and_deleted,
                observed_quota_blocks_until_its_reset,
                quota_snapshot_reports_capacity_and_prediction,
                request_log_round_trips,
                virtual_keys_are_unique_by_name_listed_in_order_and_revoked,
                virtual_key_rotation_replaces_the_digest_alone,
                a_budget_is_created_once_whoever_races_for_its_id,
                a_budget_is_redefined_in_place_keeping_its_account,
                one_budget_is_read_alone_as_the_listing_shows_it,
            );

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_charges_never_overspend_a_hard_budget() {
                cases::concurrent_charges_never_overspend_a_hard_budget(fresh().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redefinitions_racing_settlements_lose_no_spend() {
                cases::redefinitions_racing_settlements_lose_no_spend(fresh().await).await;
            }
        }
    };
    (@cases $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                cases::$case(fresh().await).await;
            }
        )*
    };
}

conformance_suite!(memory, || async {
    Arc::new(MemoryStore::new()) as Arc<dyn StateStore>
});

conformance_suite!(redis, || async {
    Arc::new(redis_store().await) as Arc<dyn StateStore>
});

conformance_suite!(redis_cluster, || async {
    Arc::new(redis_cluster_store().await) as Arc<dyn StateStore>
});

conformance_suite!(mongodb, || async {
    Arc::new(mongo_store().await) as Arc<dyn StateStore>
});

conformance_suite!(split, || async {
    Arc::new(SplitStore::new(
        Arc::new(redis_store().await),
        Arc::new(mongo_store().await),
    )) as Arc<dyn StateStore>
});

/// The split store keeps virtual keys in the records store only and announces their
/// changes through the counters store (Redis), which other instances listen to.
#[tokio::test]
async fn split_store_announces_virtual_key_changes_through_the_counters() {
    use std::time::Duration;

    use apikeyrouter_application::ports::{StoreChange, VirtualKeyStore};
    use apikeyrouter_domain::Timestamp;
    use futures_util::StreamExt;

    let namespace = crate::support::fresh_namespace("split-vk");
    let watcher = crate::support::redis_store_in(&namespace).await;
    let counters: Arc<dyn StateStore> = Arc::new(crate::support::redis_store_in(&namespace).await);
    let split = SplitStore::new(counters.clone(), Arc::new(mongo_store().await));
    let mut changes = Box::pin(watcher.subscribe_changes().await.unwrap());
    let mut next_change = async || {
        tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("no change event")
    };
    split
        .insert_virtual_key(crate::support::virtual_key("client", '0'))
        .await
        .unwrap();
    assert_eq!(
        next_change().await,
        Some(StoreChange::VirtualKey("client".to_owned()))
    );
    assert!(counters.list_virtual_keys().await.unwrap().is_empty());
    split
        .revoke_virtual_key("client", Timestamp::from_millis(2_000))
        .await
        .unwrap();
    assert_eq!(
        next_change().await,
        Some(StoreChange::VirtualKey("client".to_owned()))
    );
    assert_eq!(split.list_virtual_keys().await.unwrap().len(), 1);
}

/// The split store keeps material out of the counters store and restores keys the
/// counters store lost (a Redis restarted without persistence) from the records.
#[tokio::test]
async fn split_store_keeps_material_in_the_records_and_restores_lost_counters() {
    use apikeyrouter_domain::{ApiKey, KeyId, KeyMaterial, KeyMetadata, ProviderId, Timestamp};

    let counters: Arc<dyn StateStore> = Arc::new(redis_store().await);
    let records: Arc<dyn StateStore> = Arc::new(mongo_store().await);
    let split: Arc<dyn StateStore> = Arc::new(SplitStore::new(counters.clone(), records.clone()));
    let material = KeyMaterial::parse("sk-split-secret-0001").unwrap();
    let key = ApiKey::new(
        KeyId::new("k1"),
        ProviderId::new("openai"),
        material.clone(),
        KeyMetadata::default(),
        Timestamp::from_millis(1_000),
    );
    split.insert_key(key).await.unwrap();

    let in_counters = counters.get_key(&KeyId::new("k1")).await.unwrap();
    assert_ne!(in_counters.material.expose(), material.expose());
    assert_eq!(
        records
            .get_key(&KeyId::new("k1"))
            .await
            .unwrap()
            .material
            .expose(),
        material.expose()
    );
    assert_eq!(
        split
            .get_key(&KeyId::new("k1"))
            .await
            .unwrap()
            .material
            .expose(),
        material.expose()
    );

    // The counters store loses the key; listing restores it from the records.
    counters.delete_key(&KeyId::new("k1")).await.unwrap();
    let listed = split.list_keys().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].material.expose(), material.expose());
    assert!(counters.get_key(&KeyId::new("k1")).await.is_ok());
    assert_eq!(split.kind(), "split");

    // A budget ledger the counters store lost is restored from the records, so a
    // hard budget keeps being enforced.
    let budget = apikeyrouter_domain::Budget::new(
        "b1",
        apikeyrouter_domain::BudgetScope::Global,
        1.0,
        apikeyrouter_domain::BudgetPeriod::Monthly,
        apikeyrouter_domain::Enforcement::Hard,
    )
    .unwrap();
    split
        .put_budget(
            budget,
            apikeyrouter_domain::Money::ZERO,
            Timestamp::from_millis(1_000),
        )
        .await
        .unwrap();
    counters.delete_budget("b1").await.unwrap();
    assert!(counters.list_budgets().await.unwrap().is_empty());
    let budgets = split.list_budgets().await.unwrap();
    assert_eq!(budgets.len(), 1);
    assert_eq!(counters.list_budgets().await.unwrap()[0].id, "b1");
}

/// MongoDB as the audit sink needs no master key: it stores no key material.
#[tokio::test]
async fn mongodb_audit_sink_records_without_a_master_key() {
    use apikeyrouter_adapters_stores::{StoreConfig, connect_audit_sink};

    let url =
        std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned());
    let sink = connect_audit_sink(&StoreConfig::Mongodb {
        url,
        database: Some(format!("audit_sink_{}", std::process::id())),
        decisions_retention_days: None,
        audit_retention_days: None,
        on_unavailable: None,
    })
    .await
    .expect("audit sink opens (run `cargo xtask services up`)");
    let record = apikeyrouter_application::records::AuditRecord {
        request_id: apikeyrouter_domain::RequestId::new("audit-sink-1"),
        correlation_id: None,
        tenant: None,
        tags: Default::default(),
        requested_model: apikeyrouter_domain::ModelId::new("gpt-4o"),
        key_id: None,
        provider: None,
        model: None,
        decision: None,
        attempts: Vec::new(),
        usage: Default::default(),
        estimated_cost: None,
        actual_cost: None,
        outcome: apikeyrouter_application::records::Outcome::Success,
        started_at: apikeyrouter_domain::Timestamp::from_millis(1_000),
        finished_at: apikeyrouter_domain::Timestamp::from_millis(2_000),
    };
    sink.record(&record).await.unwrap();
    // Recording the same request again keeps one record and is not an error.
    sink.record(&record).await.unwrap();
}

/// A MongoDB store in a database no other test uses; fails (never skips) without a
/// server.
async fn mongo_store() -> MongoStore {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let database = format!(
        "conformance_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    crate::support::mongo_store_in(&database).await
}

/// A Redis Cluster store (the process's private cluster) in a namespace no other
/// test uses.
async fn redis_cluster_store() -> RedisStore {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let cluster = crate::redis_cluster::TestCluster::shared();
    let namespace = format!(
        "cluster-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let store = RedisStore::connect_cluster(&cluster.urls(), &namespace)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test cluster at {}: {e}",
                cluster.urls()
            )
        });
    assert!(store.is_cluster());
    store
}

/// On Cluster the keys of one namespace spread over several nodes (each key id is
/// its own hash tag), so the per-slot paths are really exercised.
#[tokio::test]
async fn redis_cluster_spreads_one_namespace_over_several_nodes() {
    use apikeyrouter_application::ports::KeyStore;
    use apikeyrouter_domain::{ApiKey, KeyId, KeyMaterial, KeyMetadata, ProviderId, Timestamp};

    let store = redis_cluster_store().await;
    for n in 0..24 {
        let key = ApiKey::new(
            KeyId::new(format!("k{n}")),
            ProviderId::new("openai"),
            KeyMaterial::parse("sk-cluster-0000000001").unwrap(),
            KeyMetadata::default(),
            Timestamp::from_millis(1_000),
        );
        store.insert_key(key).await.unwrap();
    }
    assert_eq!(store.list_keys().await.unwrap().len(), 24);
    let pattern = format!("{{{}:key:*", store.namespace());
    let nodes_with_keys = crate::redis_cluster::TestCluster::shared()
        .ports()
        .iter()
        .filter(|port| {
            let out = std::process::Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["--scan", "--pattern", &pattern])
                .output()
                .expect("redis-cli");
            !out.stdout.is_empty()
        })
        .count();
    assert!(nodes_with_keys >= 2, "keys on {nodes_with_keys} node(s)");
}

/// On Cluster, key, budget and virtual-key changes made through any node reach a subscriber
/// (subscribed through the first seed node; Cluster broadcasts `PUBLISH`), and the
/// `cluster = true` configuration opens such a store.
#[tokio::test]
async fn redis_cluster_announces_key_budget_and_virtual_key_changes_and_opens_from_config() {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use apikeyrouter_adapters_stores::{StoreConfig, connect};
    use apikeyrouter_application::ports::StoreChange;
    use apikeyrouter_domain::{
        ApiKey, Budget, BudgetPeriod, BudgetScope, Enforcement, KeyId, KeyMaterial, KeyMetadata,
        Money, ProviderId, Timestamp,
    };
    use futures_util::StreamExt;

    let watcher = redis_cluster_store().await;
    let config = StoreConfig::Redis {
        url: crate::redis_cluster::TestCluster::shared().urls(),
        namespace: Some(watcher.namespace().to_owned()),
        cluster: Some(true),
        on_unavailable: None,
    };
    let writer = connect(&config).await.unwrap();
    writer.ping().await.unwrap();
    let mut changes = Box::pin(watcher.subscribe_changes().await.unwrap());
    let now = Timestamp::from_millis(1_000);
    let mut expected = BTreeSet::new();
    for n in 0..8 {
        let id = format!("k{n}");
        writer
            .insert_key(ApiKey::new(
                KeyId::new(id.as_str()),
                ProviderId::new("openai"),
                KeyMaterial::parse("sk-cluster-0000000002").unwrap(),
                KeyMetadata::default(),
                now,
            ))
            .await
            .unwrap();
        expected.insert(id);
    }
    let budget = Budget::new(
        "b",
        BudgetScope::Global,
        1.0,
        BudgetPeriod::Daily,
        Enforcement::Hard,
    )
    .unwrap();
    writer.put_budget(budget, Money::ZERO, now).await.unwrap();
    writer.delete_key(&KeyId::new("k0")).await.unwrap();
    writer
        .insert_virtual_key(crate::support::virtual_key("client", '0'))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut budgets = 0;
    let mut virtual_keys = 0;
    let mut deleted_seen = false;
    tokio::time::timeout(Duration::from_secs(10), async {
        while seen != expected || budgets == 0 || virtual_keys == 0 || !deleted_seen {
            match changes.next().await.expect("the change stream ended") {
                StoreChange::Key(id) if seen.contains(id.as_str()) => {
                    deleted_seen |= id.as_str() == "k0";
                }
                StoreChange::Key(id) => {
                    seen.insert(id.as_str().to_owned());
                }
                StoreChange::Budgets => budgets += 1,
                StoreChange::VirtualKey(_) | StoreChange::VirtualKeys => virtual_keys += 1,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("changes seen: {seen:?}, budgets: {budgets}, virtual keys: {virtual_keys}")
    });
    assert_eq!(writer.list_keys().await.unwrap().len(), 7);
}

/// A budget created or redefined is announced by the script that makes the change,
/// so other instances re-read their budgets; on a single server and on Cluster.
#[tokio::test]
async fn budget_inserts_and_redefinitions_are_announced() {
    use apikeyrouter_application::ports::{BudgetStore, StoreChange};
    use apikeyrouter_domain::{Budget, BudgetPeriod, BudgetScope, Enforcement, Money, Timestamp};

    let budget = |limit_usd| {
        Budget::new(
            "b",
            BudgetScope::Global,
            limit_usd,
            BudgetPeriod::Daily,
            Enforcement::Hard,
        )
        .unwrap()
    };
    let now = Timestamp::from_millis(1_000);
    for store in [redis_store().await, redis_cluster_store().await] {
        let mut changes = Box::pin(store.subscribe_changes().await.unwrap());
        store
            .insert_budget(budget(1.0), Money::ZERO, now)
            .await
            .unwrap();
        store.redefine_budget(budget(2.0), now).await.unwrap();
        expect_announced(&mut changes, StoreChange::Budgets, 2).await;
    }
}

/// Waits (up to 10 s) until `changes` has carried `wanted` `n` times.
async fn expect_announced(
    changes: &mut (
             impl futures_util::Stream<Item = apikeyrouter_application::ports::StoreChange> + Unpin
         ),
    wanted: apikeyrouter_application::ports::StoreChange,
    n: usize,
) {
    use futures_util::StreamExt;

    let mut announced = 0;
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while announced < n {
            let change = changes.next().await.expect("the change stream ended");
            if change == wanted {
                announced += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{announced} of {n} {wanted:?} changes announced"));
}

/// Each virtual-key change (insert, limits update, rotation, revocation) is announced
/// by the script that makes it, with the key's name, so other instances re-read that
/// key; on a single server and on Cluster.
#[tokio::test]
async fn virtual_key_changes_are_announced() {
    use apikeyrouter_application::ports::{StoreChange, VirtualKeyStore};
    use apikeyrouter_domain::Timestamp;

    for store in [redis_store().await, redis_cluster_store().await] {
        let mut changes = Box::pin(store.subscribe_changes().await.unwrap());
        let mut key = crate::support::virtual_key("announced", '0');
        store.insert_virtual_key(key.clone()).await.unwrap();
        key.rpm = Some(10);
        store.update_virtual_key(key).await.unwrap();
        store
            .rotate_virtual_key("announced", &"1".repeat(64))
            .await
            .unwrap();
        store
            .revoke_virtual_key("announced", Timestamp::from_millis(2_000))
            .await
            .unwrap();
        let named = StoreChange::VirtualKey("announced".to_owned());
        expect_announced(&mut changes, named, 4).await;
    }
}

/// What the per-slot path costs on Cluster, as documented: a charge with budgets
/// and a client takes three sequential calls, settle and release two each.
#[tokio::test]
async fn redis_cluster_charge_round_trips() {
    cases::redis_cluster_charge_round_trips(redis_cluster_store().await).await;
}

/// A Redis store in a namespace no other test uses; fails (never skips) without a
/// server.
async fn redis_store() -> RedisStore {
    crate::support::redis_store_in(&crate::support::fresh_namespace("conformance")).await
}

/// Redis writes a limits update as the whole record it read: one that read before a
/// rotation must not write the old digest back after it. Each rotation's answer says
/// what digest it replaced, which must be the one the rotation before set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limits_updates_racing_rotations_never_bring_an_old_token_back() {
    use apikeyrouter_application::ports::{StoreErrorKind, VirtualKeyStore};

    let store = Arc::new(redis_store().await);
    let key = crate::support::virtual_key("racer", '0');
    store.insert_virtual_key(key.clone()).await.unwrap();
    // Under this much contention an update may give up (Conflict, "kept changing"),
    // which the management API answers 409: retry. It must never win wrongly.
    let updates = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut last_applied = None;
            for rpm in 1..=300 {
                let limits = apikeyrouter_domain::VirtualKey {
                    rpm: Some(rpm),
                    ..crate::support::virtual_key("racer", '0')
                };
                match store.update_virtual_key(limits).await {
                    Ok(()) => last_applied = Some(rpm),
                    Err(e) => assert_eq!(e.kind, StoreErrorKind::Conflict, "{e}"),
                }
            }
            last_applied
        })
    };
    let mut current = key.token_sha256.clone();
    for i in 0..300u32 {
        let next = format!("{i:064x}");
        let before = store.rotate_virtual_key("racer", &next).await.unwrap();
        assert_eq!(
            before.token_sha256, current,
            "rotation {i} replaced a digest put back"
        );
        current = next;
    }
    let last_applied = updates.await.unwrap();
    assert!(last_applied.is_some(), "no update got through");
    let last = store.list_virtual_keys().await.unwrap().remove(0);
    assert_eq!((last.token_sha256, last.rpm), (current, last_applied));
}

/// The cases, each a function of a fresh, empty store.
mod cases {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use apikeyrouter_application::ports::{
        Charge, ChargeRejection, KeyOutcome, ReclaimedReservations, Settlement, StateStore,
        StoreErrorKind, Verdict,
    };
    use apikeyrouter_application::records::{AuditRecord, Outcome};
    use apikeyrouter_domain::{
        ApiKey, Budget, BudgetError, BudgetPeriod, BudgetScope, CapacityState, Enforcement, KeyId,
        KeyMaterial, KeyMetadata, KeyState, ModelId, Money, ProviderId, QuotaLimits,
        QuotaObservation, QuotaSnapshot, RequestId, ReservationId, TenantId, Timestamp, TokenUsage,
        TransitionTrigger, Uncertainty, VirtualKey, WindowKind,
    };

    type Store = Arc<dyn StateStore>;

    use crate::support::{base_now, virtual_key};

    fn key(id: &str, rpm: Option<u64>) -> ApiKey {
        ApiKey::new(
            KeyId::new(id),
            ProviderId::new("openai"),
            KeyMaterial::parse("sk-test-0000000000").unwrap(),
            KeyMetadata {
                rpm,
                ..Default::default()
            },
            base_now(),
        )
    }

    fn budget(id: &str, limit_usd: f64, period: BudgetPeriod, enforcement: Enforcement) -> Budget {
        Budget::new(id, BudgetScope::Global, limit_usd, period, enforcement).unwrap()
    }

    fn hard_budget(id: &str, limit_usd: f64) -> Budget {
        budget(id, limit_usd, BudgetPeriod::Daily, Enforcement::Hard)
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
            client: None,
            now: base_now(),
        }
    }

    /// A successful call that used `tokens` (all completion) and cost `cost`.
    fn spent(tokens: u64, cost: Money, now: Timestamp) -> Settlement {
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
                now,
            },
            observation: None,
        }
    }

    /// A failed call that cost nothing.
    fn nothing_spent(now: Timestamp) -> Settlement {
        Settlement {
            outcome: KeyOutcome {
                verdict: Verdict::Failed {
                    rate_limited: false,
                },
                latency: Duration::from_millis(100),
                usage: TokenUsage::default(),
                cost: Money::ZERO,
                now,
            },
            observation: None,
        }
    }

    fn used(snapshot: &QuotaSnapshot, kind: WindowKind) -> u64 {
        snapshot.window(kind).unwrap().used
    }

    async fn window_used(store: &Store, id: &str, limits: QuotaLimits, kind: WindowKind) -> u64 {
        let snapshot = store
            .quota_snapshot(&KeyId::new(id), &limits, base_now())
            .await
            .unwrap();
        used(&snapshot, kind)
    }

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            request_id: RequestId::new(id),
            correlation_id: None,
            tenant: None,
            tags: BTreeMap::new(),
            requested_model: ModelId::new("gpt-4o"),
            key_id: Some(KeyId::new("k1")),
            provider: Some(ProviderId::new("openai")),
            model: Some(ModelId::new("gpt-4o")),
            decision: None,
            attempts: Vec::new(),
            usage: TokenUsage {
                prompt_tokens: 12,
                completion_tokens: 30,
                cached_tokens: 0,
            },
            estimated_cost: Some(Money::from_usd(0.002)),
            actual_cost: Some(Money::from_usd(0.0015)),
            outcome: Outcome::Success,
            started_at: base_now(),
            finished_at: base_now().plus(Duration::from_millis(420)),
        }
    }

    pub(super) async fn store_reports_its_kind_and_answers_ping(store: Store) {
        assert!(["memory", "redis", "mongodb", "split"].contains(&store.kind()));
        store.ping().await.unwrap();
    }

    pub(super) async fn key_crud_round_trips_and_reports_conflict_and_not_found(store: Store) {
        store.insert_key(key("k2", None)).await.unwrap();
        let mut k1 = key("k1", Some(10));
        k1.metadata.tenant = Some("customer-a".into());
        k1.metadata
            .tags
            .insert("feature".to_owned(), "chatbot".to_owned());
        store.insert_key(k1.clone()).await.unwrap();

        let err = store.insert_key(key("k1", None)).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict);
        assert_eq!(err.message, "key k1 already exists");

        let got = store.get_key(&KeyId::new("k1")).await.unwrap();
        assert_eq!(got.id, k1.id);
        assert_eq!(got.provider, k1.provider);
        assert_eq!(got.material, k1.material);
        assert_eq!(got.metadata, k1.metadata);
        assert_eq!(got.state, KeyState::Available);
        assert_eq!(got.state_reason, k1.state_reason);
        assert_eq!(got.cooldown_until, None);
        assert_eq!(got.stats, k1.stats);
        assert_eq!(got.created_at, base_now());
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
        assert_eq!(updated.metadata.tenant, None);
        assert_eq!(
            store.get_key(&KeyId::new("k1")).await.unwrap().metadata.rpm,
            Some(20)
        );

        let missing = KeyId::new("k1");
        store.delete_key(&missing).await.unwrap();
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
        // Settling for a key deleted since the reserve has no counters to update, but
        // its budgets are still charged.
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        let settled = store
            .settle(
                &charge(100, "k1", None, 0.0),
                &spent(10, Money::from_usd(0.25), base_now()),
            )
            .await
            .unwrap();
        assert_eq!(settled.stats, None);
        assert_eq!(settled.budgets.len(), 1);
        assert_eq!(settled.budgets[0].spent, Money::from_usd(0.25));
        let released = store
            .release(&charge(1, "k1", None, 0.0), &nothing_spent(base_now()))
            .await
            .unwrap();
        assert_eq!(released, None);
        let transition = store
            .transition(
                &missing,
                KeyState::Disabled,
                TransitionTrigger::Manual,
                "off".to_owned(),
                None,
                base_now(),
            )
            .await;
        assert_eq!(transition.unwrap_err().kind, StoreErrorKind::NotFound);
        assert_eq!(store.list_keys().await.unwrap().len(), 1);

        // The id is free again, with fresh transitions.
        store.insert_key(key("k1", None)).await.unwrap();
        assert!(store.transitions(&missing).await.unwrap().is_empty());
    }

    pub(super) async fn forbidden_transition_is_invalid_and_changes_nothing(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let id = KeyId::new("k1");

        let err = store
            .transition(
                &id,
                KeyState::Recovering,
                TransitionTrigger::QuotaReset,
                "reset".to_owned(),
                None,
                base_now(),
            )
            .await
            .unwrap_err();

        assert_eq!(err.kind, StoreErrorKind::Invalid);
        assert_eq!(err.message, "key k1 cannot go from available to recovering");
        let after = store.get_key(&id).await.unwrap();
        assert_eq!(after.state, KeyState::Available);
        assert_eq!(after.state_reason, "registered");
        assert!(store.transitions(&id).await.unwrap().is_empty());
    }

    /// A cooldown that ends (decided by an instance that had not seen the disable yet)
    /// does not re-enable a key an operator disabled; the operator does.
    pub(super) async fn a_disabled_key_is_left_only_by_hand(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let id = KeyId::new("k1");
        let move_to =
            |to, trigger| store.transition(&id, to, trigger, "test".to_owned(), None, base_now());
        move_to(KeyState::Throttled, TransitionTrigger::RateLimited)
            .await
            .unwrap();
        move_to(KeyState::Disabled, TransitionTrigger::Manual)
            .await
            .unwrap();

        let err = move_to(KeyState::Available, TransitionTrigger::CooldownElapsed)
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Invalid);
        assert_eq!(err.message, "key k1 cannot go from disabled to available");
        assert_eq!(store.get_key(&id).await.unwrap().state, KeyState::Disabled);
        assert_eq!(store.transitions(&id).await.unwrap().len(), 2);

        let back = move_to(KeyState::Available, TransitionTrigger::Manual)
            .await
            .unwrap();
        assert_eq!(
            (back.from, back.to),
            (KeyState::Disabled, KeyState::Available)
        );
    }

    pub(super) async fn transitions_persist_in_order(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let id = KeyId::new("k1");
        let cooldown = base_now().plus(Duration::from_secs(30));

        let first = store
            .transition(
                &id,
                KeyState::Throttled,
                TransitionTrigger::RateLimited,
                "429 from provider".to_owned(),
                Some(cooldown),
                base_now(),
            )
            .await
            .unwrap();
        assert_eq!(
            (first.from, first.to, first.at),
            (KeyState::Available, KeyState::Throttled, base_now())
        );
        let throttled = store.get_key(&id).await.unwrap();
        assert_eq!(throttled.state, KeyState::Throttled);
        assert_eq!(throttled.cooldown_until, Some(cooldown));
        assert_eq!(throttled.state_reason, "429 from provider");

        for (to, trigger) in [
            (KeyState::Available, TransitionTrigger::CooldownElapsed),
            (KeyState::Exhausted, TransitionTrigger::QuotaExhausted),
            (KeyState::Recovering, TransitionTrigger::QuotaReset),
            (KeyState::Disabled, TransitionTrigger::Manual),
        ] {
            store
                .transition(&id, to, trigger, "next".to_owned(), None, cooldown)
                .await
                .unwrap();
        }

        let recorded = store.transitions(&id).await.unwrap();
        let path: Vec<(KeyState, KeyState)> = recorded.iter().map(|t| (t.from, t.to)).collect();
        assert_eq!(
            path,
            [
                (KeyState::Available, KeyState::Throttled),
                (KeyState::Throttled, KeyState::Available),
                (KeyState::Available, KeyState::Exhausted),
                (KeyState::Exhausted, KeyState::Recovering),
                (KeyState::Recovering, KeyState::Disabled),
            ]
        );
        assert_eq!(recorded[0], first);
        assert_eq!(recorded[4].trigger, TransitionTrigger::Manual);
        assert_eq!(recorded[4].key_id, id);
        let disabled = store.get_key(&id).await.unwrap();
        assert_eq!(disabled.state, KeyState::Disabled);
        assert_eq!(disabled.cooldown_until, None);
    }

    pub(super) async fn settle_and_release_accumulate_counters(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let id = KeyId::new("k1");
        let mut c = charge(100, "k1", None, 0.0);
        c.budget_ids.clear();
        let rate_limited = Settlement {
            outcome: KeyOutcome {
                verdict: Verdict::Failed { rate_limited: true },
                latency: Duration::from_millis(50),
                usage: TokenUsage::default(),
                cost: Money::ZERO,
                now: base_now(),
            },
            observation: None,
        };
        store.release(&c, &rate_limited).await.unwrap();
        let stats = store.release(&c, &rate_limited).await.unwrap().unwrap();
        assert_eq!(
            (
                stats.failures,
                stats.consecutive_failures,
                stats.throttle_streak
            ),
            (2, 2, 2)
        );

        let success = |latency_ms: u64, at: Timestamp| Settlement {
            outcome: KeyOutcome {
                verdict: Verdict::Succeeded,
                latency: Duration::from_millis(latency_ms),
                usage: TokenUsage {
                    prompt_tokens: 30,
                    completion_tokens: 12,
                    cached_tokens: 0,
                },
                cost: Money::from_usd(0.002),
                now: at,
            },
            observation: None,
        };
        store.settle(&c, &success(200, base_now())).await.unwrap();
        let later = base_now().plus(Duration::from_secs(5));
        let stats = store
            .settle(&c, &success(137, later))
            .await
            .unwrap()
            .stats
            .unwrap();

        // The domain's arithmetic is the reference, to the last bit of the averages.
        let mut expected = apikeyrouter_domain::KeyStats::new();
        expected.record(false, Duration::from_millis(50), base_now());
        expected.record(false, Duration::from_millis(50), base_now());
        expected.record(true, Duration::from_millis(200), base_now());
        expected.record(true, Duration::from_millis(137), later);
        expected.prompt_tokens = 60;
        expected.completion_tokens = 24;
        expected.cost = Money::from_usd(0.004);
        assert_eq!(stats, expected);
        assert_eq!(
            (stats.requests, stats.successes, stats.throttle_streak),
            (4, 2, 0)
        );
        assert_eq!(stats.last_used, Some(later));
        assert_eq!(store.get_key(&id).await.unwrap().stats, stats);
    }

    /// A caller that went away says nothing about the key: after two failures, an
    /// abandoned settle and an abandoned release leave the request, success, failure
    /// and latency counters where they were (so the failure streak that leads to a
    /// cooldown does not grow), while what the settled one spent is still added.
    pub(super) async fn abandoned_attempts_add_spend_but_leave_the_key_health_alone(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let id = KeyId::new("k1");
        let mut c = charge(100, "k1", None, 0.0);
        c.budget_ids.clear();
        store.release(&c, &nothing_spent(base_now())).await.unwrap();
        let mut rate_limited = nothing_spent(base_now());
        rate_limited.outcome.verdict = Verdict::Failed { rate_limited: true };
        let before = store.release(&c, &rate_limited).await.unwrap().unwrap();
        assert_eq!(
            (
                before.requests,
                before.consecutive_failures,
                before.throttle_streak
            ),
            (2, 2, 1)
        );

        let later = base_now().plus(Duration::from_secs(5));
        let mut abandoned = spent(40, Money::from_usd(0.003), later);
        abandoned.outcome.verdict = Verdict::Abandoned;
        let after_settle = store.settle(&c, &abandoned).await.unwrap().stats.unwrap();
        abandoned.outcome.usage = TokenUsage::default();
        abandoned.outcome.cost = Money::ZERO;
        let after_release = store.release(&c, &abandoned).await.unwrap().unwrap();

        let mut expected = before.clone();
        expected.completion_tokens += 40;
        expected.cost = expected.cost.saturating_add(Money::from_usd(0.003));
        assert_eq!(after_settle, expected);
        assert_eq!(after_release, expected);
        assert_eq!(after_release.last_used, Some(base_now()));
        assert_eq!(store.get_key(&id).await.unwrap().stats, expected);
    }

    /// One settle call does the whole reconciliation: token windows, the key's
    /// counters, the provider's observation and every budget.
    pub(super) async fn settle_updates_windows_counters_observation_and_budget_at_once(
        store: Store,
    ) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::from_usd(0.1), base_now())
            .await
            .unwrap();
        let id = KeyId::new("k1");
        let limits = QuotaLimits {
            rpm: Some(10),
            tpm: Some(1_000),
            ..QuotaLimits::default()
        };
        let mut c = charge(1, "k1", Some(10), 0.05);
        c.limits = limits;
        c.est_tokens = 500;
        store.reserve(&c).await.unwrap();
        let reset = base_now().plus(Duration::from_secs(20));
        let settlement = Settlement {
            outcome: KeyOutcome {
                verdict: Verdict::Succeeded,
                latency: Duration::from_millis(80),
                usage: TokenUsage {
                    prompt_tokens: 30,
                    completion_tokens: 12,
                    cached_tokens: 0,
                },
                cost: Money::from_usd(0.02),
                now: base_now(),
            },
            observation: Some(QuotaObservation {
                limit_requests: Some(100),
                remaining_requests: Some(0),
                reset_requests_at: Some(reset),
                limit_tokens: None,
                remaining_tokens: None,
                reset_tokens_at: None,
            }),
        };

        let settled = store.settle(&c, &settlement).await.unwrap();

        assert_eq!(settled.budgets.len(), 1);
        let status = &settled.budgets[0];
        assert_eq!(status.budget_id, "b");
        assert_eq!(
            (status.spent, status.reserved),
            (Money::from_usd(0.12), Money::ZERO)
        );
        let mut expected = apikeyrouter_domain::KeyStats::new();
        expected.record(true, Duration::from_millis(80), base_now());
        expected.prompt_tokens = 30;
        expected.completion_tokens = 12;
        expected.cost = Money::from_usd(0.02);
        assert_eq!(settled.stats.as_ref(), Some(&expected));
        assert_eq!(store.get_key(&id).await.unwrap().stats, expected);
        assert_eq!(
            store.budget_statuses(base_now()).await.unwrap(),
            settled.budgets
        );
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteTokens).await,
            42
        );
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteRequests).await,
            1
        );
        // The provider said no requests are left until `reset`.
        let Err(ChargeRejection::Quota(denial)) = store.reserve(&charge(2, "k1", None, 0.0)).await
        else {
            panic!("the observation stored by settle must block the key");
        };
        assert_eq!(
            (denial.window, denial.retry_at),
            (WindowKind::MinuteRequests, reset)
        );

        // A release does the same for a failed attempt and gives the estimate back.
        let mut after_reset = charge(3, "k1", Some(10), 0.3);
        after_reset.limits = limits;
        after_reset.now = reset;
        store.reserve(&after_reset).await.unwrap();
        let throttled = Settlement {
            outcome: KeyOutcome {
                verdict: Verdict::Failed { rate_limited: true },
                latency: Duration::from_millis(10),
                usage: TokenUsage::default(),
                cost: Money::ZERO,
                now: reset,
            },
            observation: Some(QuotaObservation {
                remaining_requests: Some(0),
                reset_requests_at: Some(reset.plus(Duration::from_secs(30))),
                ..QuotaObservation::default()
            }),
        };
        let stats = store
            .release(&after_reset, &throttled)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (stats.requests, stats.failures, stats.throttle_streak),
            (2, 1, 1)
        );
        let status = &store.budget_statuses(reset).await.unwrap()[0];
        assert_eq!(
            (status.spent, status.reserved),
            (Money::from_usd(0.12), Money::ZERO)
        );
        let mut next = charge(4, "k1", None, 0.0);
        next.now = reset;
        assert!(matches!(
            store.reserve(&next).await,
            Err(ChargeRejection::Quota(_))
        ));
    }

    pub(super) async fn unknown_key_is_not_found_and_unknown_budgets_are_ignored(store: Store) {
        let Err(ChargeRejection::Store(err)) =
            store.reserve(&charge(100, "nope", None, 0.01)).await
        else {
            panic!("a charge for an unknown key must fail with a store error");
        };
        assert_eq!(err.kind, StoreErrorKind::NotFound);

        store.insert_key(key("k1", None)).await.unwrap();
        // Budget "b" does not exist: nothing limits the charge and settling reports nothing.
        let c = charge(1, "k1", None, 1_000.0);
        store.reserve(&c).await.unwrap();
        let settled = store
            .settle(&c, &spent(10, Money::from_usd(1_000.0), base_now()))
            .await
            .unwrap();
        assert!(settled.budgets.is_empty());
        store.release(&c, &nothing_spent(base_now())).await.unwrap();
    }

    pub(super) async fn budget_refusal_leaves_the_key_windows_unchanged(store: Store) {
        store.insert_key(key("k1", Some(2))).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::from_usd(0.995), base_now())
            .await
            .unwrap();
        let limits = QuotaLimits {
            rpm: Some(2),
            tpm: Some(1_000),
            ..QuotaLimits::default()
        };

        let mut c = charge(100, "k1", Some(2), 0.01);
        c.limits = limits;
        let Err(ChargeRejection::Budget(err)) = store.reserve(&c).await else {
            panic!("a hard budget without room must refuse the charge");
        };
        assert_eq!(
            err,
            BudgetError::WouldExceed {
                id: "b".to_owned(),
                limit: Money::from_usd(1.0),
                spent: Money::from_usd(0.995),
                reserved: Money::ZERO,
                requested: Money::from_usd(0.01),
            }
        );

        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteRequests).await,
            0
        );
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteTokens).await,
            0
        );
        assert_eq!(
            store.budget_statuses(base_now()).await.unwrap()[0].reserved,
            Money::ZERO
        );
        // Exactly rpm free charges still fit.
        let mut free = c.clone();
        free.budget_ids.clear();
        for reservation in 1..=2 {
            free.reservation = ReservationId(reservation);
            store.reserve(&free).await.unwrap();
        }
        free.reservation = ReservationId(3);
        assert!(matches!(
            store.reserve(&free).await,
            Err(ChargeRejection::Quota(_))
        ));
    }

    pub(super) async fn quota_refusal_reserves_nothing_in_budgets(store: Store) {
        store.insert_key(key("k1", Some(1))).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        store
            .put_budget(hard_budget("a", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        let mut first = charge(100, "k1", Some(1), 0.1);
        first.budget_ids = vec!["a".to_owned(), "b".to_owned()];
        store.reserve(&first).await.unwrap();

        let mut second = first.clone();
        second.reservation = ReservationId(1);
        let res = store.reserve(&second).await;

        assert!(matches!(res, Err(ChargeRejection::Quota(_))));
        for status in store.budget_statuses(base_now()).await.unwrap() {
            assert_eq!(
                status.reserved,
                Money::from_usd(0.1),
                "{}",
                status.budget_id
            );
        }
    }

    pub(super) async fn client_rpm_counts_once_per_charge_and_refusals_charge_nothing(
        store: Store,
    ) {
        use apikeyrouter_application::ports::ClientLimit;

        store.insert_key(key("k1", None)).await.unwrap();
        store.insert_key(key("k2", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        let limited = |reservation: u64, key_id: &str, usd: f64| {
            let mut c = charge(reservation, key_id, None, usd);
            c.client = Some(ClientLimit {
                client: "client-a".to_owned(),
                rpm: 2,
            });
            c.now = base_now().plus(Duration::from_secs(reservation));
            c
        };
        // A charge refused by the budget does not use the client's allowance.
        assert!(matches!(
            store.reserve(&limited(0, "k1", 5.0)).await,
            Err(ChargeRejection::Budget(_))
        ));
        // Two requests, on different keys: the client's limit spans keys.
        store.reserve(&limited(1, "k1", 0.1)).await.unwrap();
        store.reserve(&limited(2, "k2", 0.1)).await.unwrap();
        let Err(ChargeRejection::Client { retry_at }) = store.reserve(&limited(3, "k1", 0.1)).await
        else {
            panic!("the third request of the minute must be refused for the client");
        };
        assert_eq!(retry_at, base_now().plus(Duration::from_secs(60)));
        // The refusal charged nothing: the key's window and the budget are unchanged.
        let limits = QuotaLimits {
            rpm: Some(100),
            ..QuotaLimits::default()
        };
        let snapshot = store
            .quota_snapshot(
                &KeyId::new("k1"),
                &limits,
                base_now().plus(Duration::from_secs(3)),
            )
            .await
            .unwrap();
        let rpm = snapshot.window(WindowKind::MinuteRequests).unwrap();
        assert_eq!(rpm.used, 1);
        let budget = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(budget.reserved, Money::from_usd(0.2));
        // Other clients and requests without a client are not affected.
        let mut other = limited(4, "k1", 0.1);
        other.client = Some(ClientLimit {
            client: "client-b".to_owned(),
            rpm: 2,
        });
        store.reserve(&other).await.unwrap();
        store.reserve(&charge(5, "k1", None, 0.1)).await.unwrap();
        // The next minute has a fresh allowance.
        let mut next = limited(6, "k1", 0.1);
        next.now = base_now().plus(Duration::from_secs(61));
        store.reserve(&next).await.unwrap();
    }

    /// A charge the key's windows refuse, after its budgets and its client's minute
    /// would fit, leaves nothing reserved or counted (on Cluster the earlier parts
    /// are given back).
    pub(super) async fn key_refusal_gives_back_the_budget_and_the_client_count(store: Store) {
        use apikeyrouter_application::ports::ClientLimit;

        store.insert_key(key("k1", Some(1))).await.unwrap();
        store.insert_key(key("k2", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        let limited = |reservation: u64, key_id: &str, rpm: Option<u64>| {
            let mut c = charge(reservation, key_id, rpm, 0.3);
            c.client = Some(ClientLimit {
                client: "client-a".to_owned(),
                rpm: 2,
            });
            c
        };
        store.reserve(&limited(1, "k1", Some(1))).await.unwrap();
        // k1's minute is full: refused by the key, after budget and client fit.
        assert!(matches!(
            store.reserve(&limited(2, "k1", Some(1))).await,
            Err(ChargeRejection::Quota(_))
        ));
        let budget = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(budget.reserved, Money::from_usd(0.3));
        // The client's second request of the minute is still available, and the
        // budget still has room for it (and for a third, which the client's minute
        // refuses).
        store.reserve(&limited(3, "k2", None)).await.unwrap();
        let budget = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(budget.reserved, Money::from_usd(0.6));
        assert!(matches!(
            store.reserve(&limited(4, "k2", None)).await,
            Err(ChargeRejection::Client { .. })
        ));
        // A key that does not exist gives everything back too.
        assert!(matches!(
            store.reserve(&charge(5, "nope", None, 0.1)).await,
            Err(ChargeRejection::Store(_))
        ));
        let budget = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(budget.reserved, Money::from_usd(0.6));
    }

    /// See [`super::redis_cluster_charge_round_trips`].
    pub(super) async fn redis_cluster_charge_round_trips(store: super::RedisStore) {
        use apikeyrouter_application::ports::{BudgetStore, ClientLimit, KeyStore, UsageLedger};

        store.insert_key(key("k1", Some(10))).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        let mut c = charge(1, "k1", Some(10), 0.1);
        c.client = Some(ClientLimit {
            client: "client-a".to_owned(),
            rpm: 5,
        });
        let before = store.round_trips();
        store.reserve(&c).await.unwrap();
        assert_eq!(store.round_trips() - before, 3);
        store
            .settle(&c, &spent(10, Money::from_usd(0.05), base_now()))
            .await
            .unwrap();
        assert_eq!(store.round_trips() - before, 5);
        // Without a client: budgets and key only.
        let c = charge(2, "k1", Some(10), 0.1);
        store.reserve(&c).await.unwrap();
        assert_eq!(store.round_trips() - before, 7);
        store.release(&c, &nothing_spent(base_now())).await.unwrap();
        assert_eq!(store.round_trips() - before, 9);
    }

    pub(super) async fn rpm_window_refuses_until_the_next_minute_then_rolls_over(store: Store) {
        store.insert_key(key("k1", Some(3))).await.unwrap();
        // Spread over the minute: the window is the calendar minute, not a sliding one.
        for reservation in 0..3 {
            let mut c = charge(reservation, "k1", Some(3), 0.0);
            c.now = base_now().plus(Duration::from_secs(reservation * 20));
            store.reserve(&c).await.unwrap();
        }
        let mut fourth = charge(3, "k1", Some(3), 0.0);
        fourth.now = base_now().plus(Duration::from_secs(59));
        let Err(ChargeRejection::Quota(denial)) = store.reserve(&fourth).await else {
            panic!("the fourth request in a minute must be refused by the rpm window");
        };

        assert_eq!(denial.window, WindowKind::MinuteRequests);
        assert_eq!(denial.retry_at, base_now().plus(Duration::from_secs(60)));
        let mut next_minute = charge(4, "k1", Some(3), 0.0);
        next_minute.now = denial.retry_at;
        for reservation in 4..7 {
            next_minute.reservation = ReservationId(reservation);
            store.reserve(&next_minute).await.unwrap();
        }
        next_minute.reservation = ReservationId(7);
        assert!(matches!(
            store.reserve(&next_minute).await,
            Err(ChargeRejection::Quota(_))
        ));
    }

    pub(super) async fn tpm_estimate_is_reconciled_to_the_actual_tokens(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let limits = QuotaLimits {
            tpm: Some(1_000),
            ..QuotaLimits::default()
        };
        let mut big = charge(100, "k1", None, 0.0);
        big.limits = limits;
        big.est_tokens = 900;
        big.budget_ids.clear();
        store.reserve(&big).await.unwrap();

        let mut next = big.clone();
        next.reservation = ReservationId(1);
        next.est_tokens = 200;
        let Err(ChargeRejection::Quota(denial)) = store.reserve(&next).await else {
            panic!("900 + 200 tokens must not fit a tpm of 1000");
        };
        assert_eq!(denial.window, WindowKind::MinuteTokens);
        assert_eq!(denial.retry_at, base_now().plus(Duration::from_secs(60)));

        store
            .settle(&big, &spent(100, Money::ZERO, base_now()))
            .await
            .unwrap();
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteTokens).await,
            100
        );
        store.reserve(&next).await.unwrap();
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteTokens).await,
            300
        );
    }

    /// Key `k1`, a hard daily budget `b` of $1 that has spent `b_spent`, and a soft
    /// monthly budget `a` of $5.
    async fn key_with_budgets_b_and_a(store: &Store, b_spent: Money) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), b_spent, base_now())
            .await
            .unwrap();
        store
            .put_budget(
                budget("a", 5.0, BudgetPeriod::Monthly, Enforcement::Soft),
                Money::ZERO,
                base_now(),
            )
            .await
            .unwrap();
    }

    pub(super) async fn settle_returns_statuses_with_spent_equal_to_actual(store: Store) {
        key_with_budgets_b_and_a(&store, Money::ZERO).await;
        let mut c = charge(7, "k1", None, 0.05);
        c.budget_ids = vec!["b".to_owned(), "a".to_owned(), "b".to_owned()];
        store.reserve(&c).await.unwrap();
        let reserved = store.budget_statuses(base_now()).await.unwrap();
        assert!(reserved.iter().all(|s| s.reserved == Money::from_usd(0.05)));

        let statuses = store
            .settle(&c, &spent(100, Money::from_usd(0.03), base_now()))
            .await
            .unwrap()
            .budgets;

        let ids: Vec<&str> = statuses.iter().map(|s| s.budget_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        for status in &statuses {
            assert_eq!(status.spent, Money::from_usd(0.03));
            assert_eq!(status.reserved, Money::ZERO);
            assert_eq!(
                status.remaining,
                status.limit.saturating_sub(Money::from_usd(0.03))
            );
            assert!(!status.over_limit);
        }
        assert_eq!(statuses[0].enforcement, Enforcement::Soft);
        assert_eq!(statuses[0].period_end, base_now().start_of_next_month());
        assert_eq!(
            statuses[1].period_end,
            base_now().start_of_day().plus(Duration::from_secs(86_400))
        );
        assert_eq!(store.budget_statuses(base_now()).await.unwrap(), statuses);

        // Settling again (a retried settle) never forgets money spent.
        let again = store
            .settle(&c, &spent(100, Money::from_usd(0.03), base_now()))
            .await
            .unwrap()
            .budgets;
        assert_eq!(again[1].spent, Money::from_usd(0.06));
    }

    pub(super) async fn added_spend_counts_without_touching_reservations(store: Store) {
        key_with_budgets_b_and_a(&store, Money::from_usd(0.1)).await;
        let c = charge(7, "k1", None, 0.05);
        store.reserve(&c).await.unwrap();

        let ids = ["b", "gone", "a", "b"].map(str::to_owned);
        let statuses = store
            .add_spend(&ids, Money::from_usd(0.25), base_now())
            .await
            .unwrap();

        let seen: Vec<(&str, Money, Money)> = statuses
            .iter()
            .map(|s| (s.budget_id.as_str(), s.spent, s.reserved))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", Money::from_usd(0.25), Money::ZERO),
                ("b", Money::from_usd(0.35), Money::from_usd(0.05)),
            ]
        );
        assert_eq!(store.budget_statuses(base_now()).await.unwrap(), statuses);
        // The reservation is still the request's: settling it replaces it as usual.
        let settled = store
            .settle(&c, &spent(10, Money::from_usd(0.02), base_now()))
            .await
            .unwrap()
            .budgets;
        assert_eq!(
            (settled[0].spent, settled[0].reserved),
            (Money::from_usd(0.37), Money::ZERO)
        );
        // Nothing to add to is no error.
        assert_eq!(
            store
                .add_spend(&["gone".to_owned()], Money::from_usd(1.0), base_now())
                .await
                .unwrap(),
            []
        );
    }

    pub(super) async fn added_spend_of_a_closed_period_is_not_carried_into_the_next(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 10.0), Money::ZERO, base_now())
            .await
            .unwrap();
        // Another caller has already moved the daily budget on to tomorrow.
        let tomorrow = base_now().plus(Duration::from_secs(86_400));
        let mut c = charge(1, "k1", None, 0.1);
        c.now = tomorrow;
        store.reserve(&c).await.unwrap();
        store
            .settle(&c, &spent(10, Money::from_usd(0.1), tomorrow))
            .await
            .unwrap();

        let ids = ["b".to_owned()];
        let today = store
            .add_spend(&ids, Money::from_usd(1.0), base_now())
            .await
            .unwrap();
        assert_eq!(today[0].spent, Money::from_usd(0.1), "yesterday's spend");
        let later = store
            .add_spend(&ids, Money::from_usd(1.0), tomorrow)
            .await
            .unwrap();
        assert_eq!(later[0].spent, Money::from_usd(1.1));
        assert_eq!(store.budget_statuses(tomorrow).await.unwrap(), later);
    }

    pub(super) async fn release_returns_the_money_but_counts_the_request(store: Store) {
        store.insert_key(key("k1", Some(10))).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
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
            store.budget_statuses(base_now()).await.unwrap()[0].reserved,
            Money::from_usd(0.6)
        );

        store.release(&c, &nothing_spent(base_now())).await.unwrap();

        let status = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!((status.spent, status.reserved), (Money::ZERO, Money::ZERO));
        assert_eq!(status.remaining, Money::from_usd(1.0));
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteTokens).await,
            0
        );
        assert_eq!(
            window_used(&store, "k1", limits, WindowKind::MinuteRequests).await,
            1
        );
        // The whole budget is available again.
        let mut again = charge(2, "k1", Some(10), 1.0);
        again.limits = limits;
        store.reserve(&again).await.unwrap();
    }

    pub(super) async fn reserving_an_id_again_replaces_the_reservation(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
            .await
            .unwrap();
        store.reserve(&charge(1, "k1", None, 0.4)).await.unwrap();
        store.reserve(&charge(1, "k1", None, 0.3)).await.unwrap();

        let status = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(status.reserved, Money::from_usd(0.3));

        // A replacement that does not fit is refused and keeps the reservation it
        // would have replaced.
        let res = store.reserve(&charge(1, "k1", None, 1.5)).await;
        assert!(matches!(res, Err(ChargeRejection::Budget(_))), "{res:?}");
        let status = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(status.reserved, Money::from_usd(0.3));
    }

    pub(super) async fn soft_budget_allows_overrun_and_flags_it(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(
                budget("b", 1.0, BudgetPeriod::Daily, Enforcement::Soft),
                Money::from_usd(0.9),
                base_now(),
            )
            .await
            .unwrap();
        let c = charge(1, "k1", None, 0.5);
        store.reserve(&c).await.unwrap();
        let statuses = store
            .settle(&c, &spent(10, Money::from_usd(0.4), base_now()))
            .await
            .unwrap()
            .budgets;

        assert_eq!(statuses[0].spent, Money::from_usd(1.3));
        assert_eq!(statuses[0].remaining, Money::ZERO);
        assert!(statuses[0].over_limit);
    }

    pub(super) async fn budget_period_rolls_over_and_keeps_reservations(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let status = store
            .put_budget(hard_budget("b", 1.0), Money::from_usd(0.7), base_now())
            .await
            .unwrap();
        assert_eq!(status.spent, Money::from_usd(0.7));
        assert_eq!(status.remaining, Money::from_usd(0.3));
        let held = charge(1, "k1", None, 0.2);
        store.reserve(&held).await.unwrap();
        assert!(matches!(
            store.reserve(&charge(2, "k1", None, 0.2)).await,
            Err(ChargeRejection::Budget(_))
        ));

        let tomorrow = base_now().plus(Duration::from_secs(86_400));
        let status = &store.budget_statuses(tomorrow).await.unwrap()[0];
        assert_eq!(status.spent, Money::ZERO);
        assert_eq!(status.reserved, Money::from_usd(0.2));
        assert_eq!(
            status.period_end,
            tomorrow.start_of_day().plus(Duration::from_secs(86_400))
        );

        let mut next_day = charge(2, "k1", None, 0.8);
        next_day.now = tomorrow;
        store.reserve(&next_day).await.unwrap();
        // The old reservation is committed into the new period.
        let statuses = store
            .settle(&held, &spent(10, Money::from_usd(0.1), tomorrow))
            .await
            .unwrap()
            .budgets;
        assert_eq!(statuses[0].spent, Money::from_usd(0.1));
        assert_eq!(statuses[0].reserved, Money::from_usd(0.8));
    }

    pub(super) async fn stale_reservations_are_reclaimed_once_and_late_settles_still_charge(
        store: Store,
    ) {
        store.insert_key(key("k1", None)).await.unwrap();
        for id in ["b", "a", "idle"] {
            store
                .put_budget(hard_budget(id, 1.0), Money::ZERO, base_now())
                .await
                .unwrap();
        }
        let mut stale = charge(1, "k1", None, 0.3);
        stale.budget_ids = vec!["b".to_owned(), "a".to_owned()];
        store.reserve(&stale).await.unwrap();
        let later = base_now().plus(Duration::from_secs(600));
        let mut live = charge(2, "k1", None, 0.2);
        live.now = later;
        store.reserve(&live).await.unwrap();

        // Nothing was taken before the reservations' own time.
        assert_eq!(
            store.reclaim_reservations(base_now(), later).await.unwrap(),
            []
        );

        let cutoff = base_now().plus(Duration::from_secs(60));
        let reclaimed = store.reclaim_reservations(cutoff, later).await.unwrap();
        let gave_back = |id: &str| ReclaimedReservations {
            budget_id: id.to_owned(),
            count: 1,
            amount: Money::from_usd(0.3),
        };
        assert_eq!(reclaimed, [gave_back("a"), gave_back("b")]);
        let reserved = |statuses: &[apikeyrouter_domain::BudgetStatus]| {
            statuses
                .iter()
                .map(|s| (s.budget_id.clone(), s.reserved))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reserved(&store.budget_statuses(later).await.unwrap()),
            [
                ("a".to_owned(), Money::ZERO),
                ("b".to_owned(), Money::from_usd(0.2)),
                ("idle".to_owned(), Money::ZERO),
            ]
        );
        // Another instance sweeping the same store finds nothing left.
        assert_eq!(store.reclaim_reservations(cutoff, later).await.unwrap(), []);

        // The money given back can be reserved again.
        let mut again = charge(3, "k1", None, 0.8);
        again.now = later;
        store.reserve(&again).await.unwrap();

        // The stale request finished after all: its cost is charged and nothing more
        // is given back.
        let settled = store
            .settle(&stale, &spent(10, Money::from_usd(0.1), later))
            .await
            .unwrap()
            .budgets;
        assert_eq!(
            settled
                .iter()
                .map(|s| (s.budget_id.as_str(), s.spent, s.reserved))
                .collect::<Vec<_>>(),
            [
                ("a", Money::from_usd(0.1), Money::ZERO),
                ("b", Money::from_usd(0.1), Money::from_usd(1.0)),
            ]
        );
    }

    pub(super) async fn custom_budget_period_rolls_over(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let anchor = base_now().plus(Duration::from_secs(15));
        let period = BudgetPeriod::Custom {
            anchor,
            length_secs: 3_600,
        };
        let start = base_now().plus(Duration::from_secs(30));
        let status = store
            .put_budget(
                budget("b", 1.0, period, Enforcement::Hard),
                Money::ZERO,
                start,
            )
            .await
            .unwrap();
        assert_eq!(status.period_end, anchor.plus(Duration::from_secs(3_600)));

        let mut c = charge(1, "k1", None, 1.0);
        c.now = start;
        store.reserve(&c).await.unwrap();
        store
            .settle(&c, &spent(10, Money::from_usd(1.0), start))
            .await
            .unwrap();

        let three_hours_later = anchor.plus(Duration::from_secs(3 * 3_600 + 10));
        let status = &store.budget_statuses(three_hours_later).await.unwrap()[0];
        assert_eq!(status.spent, Money::ZERO);
        assert_eq!(
            status.period_end,
            anchor.plus(Duration::from_secs(4 * 3_600))
        );
    }

    /// Creating is one step in the store: of several creators racing for one id,
    /// one wins and the others get `Conflict`, and the winner's budget (and spend)
    /// stays. Once deleted, the id can be created again.
    pub(super) async fn a_budget_is_created_once_whoever_races_for_its_id(store: Store) {
        let racers: Vec<_> = (1..=6u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let spent = Money::from_usd(f64::from(i) / 10.0);
                    let made = store
                        .insert_budget(hard_budget("contested", 5.0), spent, base_now())
                        .await;
                    (spent, made)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            let (spent, made) = racer.await.unwrap();
            match made {
                Ok(status) => {
                    assert_eq!(status.spent, spent);
                    winners.push(spent);
                }
                Err(e) => assert_eq!(e.kind, StoreErrorKind::Conflict, "{e}"),
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let statuses = store.budget_statuses(base_now()).await.unwrap();
        assert_eq!(statuses.len(), 1);
        assert_eq!(
            (statuses[0].budget_id.as_str(), statuses[0].spent),
            ("contested", winners[0])
        );

        store.delete_budget("contested").await.unwrap();
        let again = store
            .insert_budget(hard_budget("contested", 7.0), Money::ZERO, base_now())
            .await
            .unwrap();
        assert_eq!(
            (again.limit, again.spent),
            (Money::from_usd(7.0), Money::ZERO)
        );
        assert_eq!(
            store.list_budgets().await.unwrap(),
            [hard_budget("contested", 7.0)]
        );
    }

    pub(super) async fn budgets_are_listed_replaced_and_deleted(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("daily", 2.0), Money::from_usd(0.5), base_now())
            .await
            .unwrap();
        let tenant = Budget::new(
            "another",
            BudgetScope::Tenant {
                tenant: "customer-a".into(),
            },
            1.0,
            BudgetPeriod::Weekly,
            Enforcement::Soft,
        )
        .unwrap();
        store
            .put_budget(tenant.clone(), Money::ZERO, base_now())
            .await
            .unwrap();
        let mut c = charge(1, "k1", None, 0.1);
        c.budget_ids = vec!["daily".to_owned()];
        store.reserve(&c).await.unwrap();
        // Replacing keeps one budget under the id and drops its reservations.
        store
            .put_budget(hard_budget("daily", 3.0), Money::from_usd(0.5), base_now())
            .await
            .unwrap();

        let budgets = store.list_budgets().await.unwrap();
        assert_eq!(budgets, [tenant, hard_budget("daily", 3.0)]);
        let statuses = store.budget_statuses(base_now()).await.unwrap();
        assert_eq!(statuses[1].limit, Money::from_usd(3.0));
        assert_eq!(statuses[1].spent, Money::from_usd(0.5));
        assert_eq!(statuses[1].reserved, Money::ZERO);
        assert_eq!(
            statuses[0].scope,
            BudgetScope::Tenant {
                tenant: "customer-a".into()
            }
        );

        store.delete_budget("daily").await.unwrap();
        let err = store.delete_budget("daily").await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NotFound);
        assert_eq!(store.list_budgets().await.unwrap().len(), 1);
        // A charge naming the deleted budget is no longer limited by it.
        let mut big = charge(2, "k1", None, 100.0);
        big.budget_ids = vec!["daily".to_owned()];
        store.reserve(&big).await.unwrap();
    }

    /// Redefining changes the limit, enforcement and period in one store step and
    /// keeps the account: this period's spend, and the reservations of requests in
    /// flight, which still settle against it. An unknown id is `NotFound`.
    pub(super) async fn a_budget_is_redefined_in_place_keeping_its_account(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::from_usd(0.3), base_now())
            .await
            .unwrap();
        let held = charge(1, "k1", None, 0.2);
        store.reserve(&held).await.unwrap();
        assert!(matches!(
            store.reserve(&charge(2, "k1", None, 0.6)).await,
            Err(ChargeRejection::Budget(_))
        ));

        let status = store
            .redefine_budget(hard_budget("b", 2.0), base_now())
            .await
            .unwrap();
        assert_eq!(
            (
                status.limit,
                status.spent,
                status.reserved,
                status.remaining
            ),
            (
                Money::from_usd(2.0),
                Money::from_usd(0.3),
                Money::from_usd(0.2),
                Money::from_usd(1.5)
            )
        );
        assert_eq!(
            status.period_end,
            base_now().start_of_day().plus(Duration::from_secs(86_400))
        );
        // The new limit holds at once: 0.3 spent, 0.8 held, 0.9 left.
        store.reserve(&charge(2, "k1", None, 0.6)).await.unwrap();
        assert!(matches!(
            store.reserve(&charge(3, "k1", None, 1.0)).await,
            Err(ChargeRejection::Budget(_))
        ));
        // The reservation held before is the one its settlement commits.
        let statuses = store
            .settle(&held, &spent(10, Money::from_usd(0.1), base_now()))
            .await
            .unwrap()
            .budgets;
        assert_eq!(
            (statuses[0].spent, statuses[0].reserved),
            (Money::from_usd(0.4), Money::from_usd(0.6))
        );

        // A new period kind moves the period and carries the spend into it; a soft
        // budget lets an overrun through.
        let monthly = budget("b", 0.5, BudgetPeriod::Monthly, Enforcement::Soft);
        let status = store
            .redefine_budget(monthly.clone(), base_now())
            .await
            .unwrap();
        assert_eq!(status.period_end, base_now().start_of_next_month());
        assert_eq!(
            (status.spent, status.reserved, status.enforcement),
            (
                Money::from_usd(0.4),
                Money::from_usd(0.6),
                Enforcement::Soft
            )
        );
        assert!(status.over_limit);
        store.reserve(&charge(4, "k1", None, 1.0)).await.unwrap();
        assert_eq!(store.list_budgets().await.unwrap(), [monthly]);
        // A custom period, then another length of it: the period follows each.
        for length_secs in [3_600, 7_200] {
            let custom = budget(
                "b",
                5.0,
                BudgetPeriod::Custom {
                    anchor: base_now(),
                    length_secs,
                },
                Enforcement::Soft,
            );
            let status = store
                .redefine_budget(custom.clone(), base_now())
                .await
                .unwrap();
            assert_eq!(
                (status.period_end, status.spent),
                (
                    base_now().plus(Duration::from_secs(length_secs)),
                    Money::from_usd(0.4)
                )
            );
            assert_eq!(store.list_budgets().await.unwrap(), [custom]);
        }

        let err = store
            .redefine_budget(hard_budget("missing", 1.0), base_now())
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NotFound, "{err}");
        assert_eq!(store.list_budgets().await.unwrap().len(), 1);
    }

    /// One budget's status, read alone, is what the listing says of it: its spend,
    /// its reservations, and a period rolled to `now`. An unknown id (or one deleted)
    /// is `NotFound`.
    pub(super) async fn one_budget_is_read_alone_as_the_listing_shows_it(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("a", 5.0), Money::ZERO, base_now())
            .await
            .unwrap();
        store
            .put_budget(hard_budget("b", 1.0), Money::from_usd(0.3), base_now())
            .await
            .unwrap();
        store.reserve(&charge(1, "k1", None, 0.2)).await.unwrap();

        let b = store.budget_status("b", base_now()).await.unwrap();
        assert_eq!(
            (b.budget_id.as_str(), b.spent, b.reserved, b.remaining),
            (
                "b",
                Money::from_usd(0.3),
                Money::from_usd(0.2),
                Money::from_usd(0.5)
            )
        );
        let listed = store.budget_statuses(base_now()).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1], b);
        assert_eq!(
            store.budget_status("a", base_now()).await.unwrap(),
            listed[0]
        );

        // The next day: a new period, nothing spent, the reservation still held.
        let tomorrow = base_now().plus(Duration::from_secs(86_400));
        let rolled = store.budget_status("b", tomorrow).await.unwrap();
        assert_eq!(
            (rolled.spent, rolled.reserved, rolled.period_end),
            (
                Money::ZERO,
                Money::from_usd(0.2),
                tomorrow.start_of_day().plus(Duration::from_secs(86_400))
            )
        );

        for id in ["missing", "a"] {
            if id == "a" {
                store.delete_budget("a").await.unwrap();
            }
            let err = store.budget_status(id, base_now()).await.unwrap_err();
            assert_eq!(err.kind, StoreErrorKind::NotFound, "{id}: {err}");
        }
    }

    /// Settlements landing while the budget is redefined over and over all count:
    /// nothing spent is lost and no reservation is left held.
    pub(super) async fn redefinitions_racing_settlements_lose_no_spend(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        store
            .put_budget(hard_budget("b", 10.0), Money::ZERO, base_now())
            .await
            .unwrap();
        let charges: Vec<Charge> = (1..=24).map(|i| charge(i, "k1", None, 0.1)).collect();
        for c in &charges {
            store.reserve(c).await.unwrap();
        }
        let settling = charges
            .into_iter()
            .map(|c| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .settle(&c, &spent(10, Money::from_usd(0.05), base_now()))
                        .await
                        .map(drop)
                })
            })
            .collect::<Vec<_>>();
        let redefining = (0..12u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .redefine_budget(hard_budget("b", 10.0 + f64::from(i)), base_now())
                        .await
                        .map(drop)
                })
            })
            .collect::<Vec<_>>();
        for task in settling.into_iter().chain(redefining) {
            task.await.unwrap().unwrap();
        }
        let status = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!(
            (status.spent, status.reserved),
            (Money::from_usd(1.2), Money::ZERO)
        );
        assert_eq!(
            status.remaining,
            status.limit.saturating_sub(status.spent),
            "{status:?}"
        );
        // What the store enforces agrees: the remaining amount fits, a cent more not.
        store
            .reserve(&charge(100, "k1", None, status.remaining.as_usd()))
            .await
            .unwrap();
        assert!(matches!(
            store.reserve(&charge(101, "k1", None, 0.01)).await,
            Err(ChargeRejection::Budget(_))
        ));
    }

    pub(super) async fn virtual_keys_are_unique_by_name_listed_in_order_and_revoked(store: Store) {
        assert!(store.list_virtual_keys().await.unwrap().is_empty());
        let full = VirtualKey {
            tenant: Some(TenantId::new("customer-a")),
            models: Some(vec![ModelId::new("gpt-4o"), ModelId::new("gpt-4o-mini")]),
            rpm: Some(u32::MAX),
            budget_usd: Some(12.5),
            ..virtual_key("team-b", '1')
        };
        store.insert_virtual_key(full.clone()).await.unwrap();
        store
            .insert_virtual_key(virtual_key("team-a", '2'))
            .await
            .unwrap();
        let err = store
            .insert_virtual_key(virtual_key("team-b", '3'))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
        assert_eq!(
            store.list_virtual_keys().await.unwrap(),
            [virtual_key("team-a", '2'), full.clone()]
        );

        // Limits change in place; name, digest and times stay.
        let limited = VirtualKey {
            tenant: None,
            models: Some(vec![ModelId::new("o3")]),
            rpm: Some(5),
            budget_usd: None,
            token_sha256: "f".repeat(64),
            ..virtual_key("team-a", '9')
        };
        store.update_virtual_key(limited).await.unwrap();
        let team_a = store.list_virtual_keys().await.unwrap().remove(0);
        assert_eq!(
            team_a,
            VirtualKey {
                models: Some(vec![ModelId::new("o3")]),
                rpm: Some(5),
                ..virtual_key("team-a", '2')
            }
        );
        store
            .update_virtual_key(virtual_key("team-a", '2'))
            .await
            .unwrap();
        assert_eq!(
            store.list_virtual_keys().await.unwrap()[0],
            virtual_key("team-a", '2')
        );
        let err = store
            .update_virtual_key(virtual_key("nobody", '2'))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NotFound, "{err}");

        // Revoked once: a second revocation keeps the first time; the record stays,
        // and so does its name.
        let at = base_now().plus(Duration::from_secs(5));
        let revoked = store.revoke_virtual_key("team-b", at).await.unwrap();
        assert_eq!(revoked.revoked_at, Some(at));
        let again = store
            .revoke_virtual_key("team-b", at.plus(Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(again, revoked);
        let listed = store.list_virtual_keys().await.unwrap();
        assert_eq!(
            listed[1],
            VirtualKey {
                revoked_at: Some(at),
                ..full
            }
        );
        assert!(listed[0].is_active() && !listed[1].is_active());
        // One record read alone is what the listing shows of it, revoked or not.
        for key in &listed {
            assert_eq!(&store.get_virtual_key(&key.name).await.unwrap(), key);
        }
        let err = store.get_virtual_key("nobody").await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NotFound, "{err}");
        let err = store
            .insert_virtual_key(virtual_key("team-b", '4'))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
        let err = store.revoke_virtual_key("nobody", at).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NotFound, "{err}");
        let err = store
            .update_virtual_key(virtual_key("team-b", '1'))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
        assert_eq!(
            store.list_virtual_keys().await.unwrap()[1].revoked_at,
            Some(at)
        );
        store.announce_virtual_key("team-a").await.unwrap();
    }

    pub(super) async fn virtual_key_rotation_replaces_the_digest_alone(store: Store) {
        let limited = VirtualKey {
            tenant: Some(TenantId::new("customer-a")),
            models: Some(vec![ModelId::new("gpt-4o-mini")]),
            rpm: Some(7),
            budget_usd: Some(3.25),
            ..virtual_key("team-r", '1')
        };
        store.insert_virtual_key(limited.clone()).await.unwrap();
        let new_digest = "ab".repeat(32);
        let before = store
            .rotate_virtual_key("team-r", &new_digest)
            .await
            .unwrap();
        assert_eq!(before, limited, "the record as it was, old digest included");
        let rotated = VirtualKey {
            token_sha256: new_digest.clone(),
            ..limited.clone()
        };
        assert_eq!(
            store.list_virtual_keys().await.unwrap(),
            std::slice::from_ref(&rotated)
        );

        // A limits update after it keeps the new digest (Redis writes the whole record
        // back, and must not write the old one).
        store
            .update_virtual_key(VirtualKey {
                rpm: Some(8),
                ..limited.clone()
            })
            .await
            .unwrap();
        assert_eq!(
            store.list_virtual_keys().await.unwrap(),
            [VirtualKey {
                rpm: Some(8),
                ..rotated.clone()
            }]
        );

        let err = store
            .rotate_virtual_key("nobody", &new_digest)
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NotFound, "{err}");
        let at = base_now().plus(Duration::from_secs(5));
        store.revoke_virtual_key("team-r", at).await.unwrap();
        let err = store
            .rotate_virtual_key("team-r", &"cd".repeat(32))
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Conflict, "{err}");
        let listed = store.list_virtual_keys().await.unwrap();
        assert_eq!(
            listed[0].token_sha256, new_digest,
            "a revoked key keeps its digest"
        );
    }

    pub(super) async fn observed_quota_blocks_until_its_reset(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let reset = base_now().plus(Duration::from_secs(20));
        // The provider's headers arrive with an attempt's settlement.
        let mut first = charge(9, "k1", None, 0.0);
        first.budget_ids.clear();
        store.reserve(&first).await.unwrap();
        let mut with_headers = spent(10, Money::ZERO, base_now());
        with_headers.observation = Some(QuotaObservation {
            limit_requests: Some(100),
            remaining_requests: Some(0),
            reset_requests_at: Some(reset),
            limit_tokens: Some(10_000),
            remaining_tokens: Some(5_000),
            reset_tokens_at: Some(reset),
        });
        store.settle(&first, &with_headers).await.unwrap();

        let Err(ChargeRejection::Quota(denial)) =
            store.reserve(&charge(100, "k1", None, 0.0)).await
        else {
            panic!("the provider said no requests are left");
        };
        assert_eq!(denial.window, WindowKind::MinuteRequests);
        assert_eq!(denial.retry_at, reset);
        let snapshot = store
            .quota_snapshot(&KeyId::new("k1"), &QuotaLimits::default(), base_now())
            .await
            .unwrap();
        assert_eq!(snapshot.uncertainty, Uncertainty::Low);
        assert_eq!(snapshot.capacity, CapacityState::Exhausted);

        let mut after_reset = charge(1, "k1", None, 0.0);
        after_reset.now = reset;
        store.reserve(&after_reset).await.unwrap();
        // After the reset the window keeps the limit the provider announced.
        let snapshot = store
            .quota_snapshot(&KeyId::new("k1"), &QuotaLimits::default(), reset)
            .await
            .unwrap();
        let window = snapshot.window(WindowKind::MinuteRequests).unwrap();
        assert_eq!(window.remaining, 99, "{snapshot:?}");

        // One request left by the provider's count is used by the next reservation.
        store.insert_key(key("k2", None)).await.unwrap();
        let mut observed = charge(19, "k2", None, 0.0);
        observed.budget_ids.clear();
        store.reserve(&observed).await.unwrap();
        let mut one_left = spent(10, Money::ZERO, base_now());
        one_left.observation = Some(QuotaObservation {
            limit_requests: Some(100),
            remaining_requests: Some(1),
            reset_requests_at: Some(reset),
            ..QuotaObservation::default()
        });
        store.settle(&observed, &one_left).await.unwrap();
        store.reserve(&charge(20, "k2", None, 0.0)).await.unwrap();
        let Err(ChargeRejection::Quota(denial)) = store.reserve(&charge(21, "k2", None, 0.0)).await
        else {
            panic!("the one request the provider had left is used");
        };
        assert_eq!(denial.retry_at, reset);
    }

    pub(super) async fn quota_snapshot_reports_capacity_and_prediction(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let id = KeyId::new("k1");
        let limits = QuotaLimits {
            rpm: Some(10),
            rpd: Some(1_000),
            ..QuotaLimits::default()
        };
        let empty = store
            .quota_snapshot(&id, &limits, base_now())
            .await
            .unwrap();
        assert_eq!(empty.capacity, CapacityState::Abundant);
        assert_eq!(empty.uncertainty, Uncertainty::Medium);
        let unknown = store
            .quota_snapshot(&id, &QuotaLimits::default(), base_now())
            .await
            .unwrap();
        assert_eq!(unknown.uncertainty, Uncertainty::High);

        let mut c = charge(100, "k1", None, 0.0);
        c.limits = limits;
        c.budget_ids.clear();
        for reservation in 0..6 {
            c.reservation = ReservationId(reservation);
            store.reserve(&c).await.unwrap();
        }
        let later = base_now().plus(Duration::from_secs(30));
        let snapshot = store.quota_snapshot(&id, &limits, later).await.unwrap();
        assert_eq!(snapshot.capacity, CapacityState::Constrained);
        assert_eq!(used(&snapshot, WindowKind::MinuteRequests), 6);
        assert_eq!(used(&snapshot, WindowKind::DayRequests), 6);
        let prediction = snapshot.prediction.unwrap();
        assert_eq!(prediction.window, WindowKind::MinuteRequests);
        // 6 requests in 30 s: the 4 left go in 20 s.
        assert_eq!(
            prediction.exhausts_at,
            Some(later.plus(Duration::from_secs(20)))
        );

        for reservation in 6..10 {
            c.reservation = ReservationId(reservation);
            store.reserve(&c).await.unwrap();
        }
        let full = store
            .quota_snapshot(&id, &limits, base_now())
            .await
            .unwrap();
        assert_eq!(full.capacity, CapacityState::Exhausted);
        // The first minute after an exhausted window is reported as recovering.
        let next_minute = base_now().plus(Duration::from_secs(61));
        let recovering = store
            .quota_snapshot(&id, &limits, next_minute)
            .await
            .unwrap();
        assert_eq!(recovering.capacity, CapacityState::Recovering);
        assert_eq!(used(&recovering, WindowKind::MinuteRequests), 0);
        assert_eq!(used(&recovering, WindowKind::DayRequests), 10);
    }

    pub(super) async fn request_log_round_trips(store: Store) {
        let first = record("r1");
        assert!(store.save_request(Arc::new(first.clone())).await.unwrap());
        assert_eq!(
            store.get_request(&RequestId::new("r1")).await.unwrap(),
            Some(first.clone())
        );
        assert_eq!(
            store.get_request(&RequestId::new("r2")).await.unwrap(),
            None
        );

        // Another request's record under a taken id (a client reused it) is refused,
        // and the first record stays.
        let mut other = record("r1");
        other.outcome = Outcome::Failure {
            code: "rate_limited".to_owned(),
            message: "every key is throttled".to_owned(),
        };
        assert!(!store.save_request(Arc::new(other)).await.unwrap());
        assert_eq!(
            store.get_request(&RequestId::new("r1")).await.unwrap(),
            Some(first.clone())
        );
        // The same record again (a delivery retried after a lost answer) is saved,
        // also when its objective weights (1/3, 2/3) read back rounded in their label.
        assert!(store.save_request(Arc::new(first)).await.unwrap());
        let mut weighted = record("r3");
        let mut decision: apikeyrouter_domain::Decision = serde_json::from_value(serde_json::json!({
            "key_id": "k1", "provider": "openai", "model": "gpt-4o", "objective": "fairness",
            "score": 0.8125,
            "metrics": { "uses": 3, "success_rate": 0.95, "latency_ms": 120.5, "est_cost": null },
            "alternatives": [], "ready": 1,
            "ineligible": {
                "throttled": 0, "exhausted": 0, "disabled": 0, "invalid": 0, "rate_limited": 0,
                "model_not_served": 0, "provider_not_allowed": 0, "over_max_cost": 0,
                "below_min_success_rate": 0, "already_tried": 0, "budget_exceeded": 0,
            },
            "at": base_now().as_millis(),
        }))
        .unwrap();
        decision.objective = apikeyrouter_domain::Objective::parse("cost=1,latency=2")
            .unwrap()
            .weights;
        weighted.decision = Some(decision);
        let weighted = Arc::new(weighted);
        assert!(store.save_request(weighted.clone()).await.unwrap());
        assert!(store.save_request(weighted).await.unwrap());
    }

    /// 200 concurrent charges of $0.01 against a hard $1.00 budget: exactly 100 fit.
    pub(super) async fn concurrent_charges_never_overspend_a_hard_budget(store: Store) {
        store.insert_key(key("k1", None)).await.unwrap();
        let limit = Money::from_usd(1.0);
        store
            .put_budget(hard_budget("b", 1.0), Money::ZERO, base_now())
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
                                .settle(&c, &spent(100, Money::from_usd(0.01), base_now()))
                                .await
                                .unwrap()
                                .budgets;
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
        let status = &store.budget_statuses(base_now()).await.unwrap()[0];
        assert_eq!((status.spent, status.reserved), (limit, Money::ZERO));
        // The refused charges counted no request against the key.
        let limits = QuotaLimits {
            rpm: Some(1_000),
            ..QuotaLimits::default()
        };
        let snapshot = store
            .quota_snapshot(&KeyId::new("k1"), &limits, base_now())
            .await
            .unwrap();
        let window = snapshot.window(WindowKind::MinuteRequests).unwrap();
        assert_eq!(window.used, 100, "{snapshot:?}");
    }
}
