//! Several routers sharing one Redis: key changes reach every instance, and limits
//! hold across all of them. Routers sharing only MongoDB (no change events) see each
//! other's key changes at their next reading of the keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeyrouter::providers::SimulatedProvider;
use apikeyrouter::{
    ApiKeyRouter, Budget, BudgetPeriod, BudgetScope, Clock, Enforcement, KeyMetadata, KeyState,
    ManualClock, Money, Objective, RouteErrorKind, VirtualKeyChange,
};
use apikeyrouter_application::ports::{BudgetStore, Charge, KeyStore, StateStore, UsageLedger};
use apikeyrouter_domain::{QuotaLimits, ReservationId};

use crate::support::{ask, base_now, fresh_namespace, redis_store_in};

async fn instance(namespace: &str) -> (ApiKeyRouter, Arc<SimulatedProvider>) {
    instance_on(Arc::new(redis_store_in(namespace).await)).await
}

/// A router on `store` with a simulated `openai` provider.
async fn instance_on(store: Arc<dyn StateStore>) -> (ApiKeyRouter, Arc<SimulatedProvider>) {
    let router = router_on(store).await;
    let sim = Arc::new(SimulatedProvider::new());
    router.register_provider("openai", sim.clone());
    (router, sim)
}

async fn router_on(store: Arc<dyn StateStore>) -> ApiKeyRouter {
    ApiKeyRouter::builder().store(store).build().await.unwrap()
}

/// One chat request with the default objective.
async fn hello(
    router: &ApiKeyRouter,
) -> Result<apikeyrouter::RouteResponse, apikeyrouter::RouteError> {
    router
        .route(ask("gpt-4o", "hi"), Objective::default())
        .await
}

fn namespace() -> String {
    fresh_namespace("multi")
}

async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    within(Duration::from_secs(1), what, check).await;
}

async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mongo_instance(database: &str) -> (ApiKeyRouter, Arc<SimulatedProvider>) {
    instance_on(Arc::new(crate::support::mongo_store_in(database).await)).await
}

/// Without change events, a router reads the keys again every 10 s: a key added,
/// disabled, enabled again or deleted on one instance is followed by the other by
/// then (three such readings here, so this test takes up to half a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mongodb_key_changes_reach_the_other_instance_at_its_next_reading() {
    let limit = Duration::from_secs(12);
    let database = fresh_namespace("multi").replace('-', "_");
    let (a, _) = mongo_instance(&database).await;
    let (b, sim_b) = mongo_instance(&database).await;
    let routes_to = async |sim: &SimulatedProvider, id: &apikeyrouter::KeyId| {
        let before = sim.calls(id);
        hello(&b).await.is_ok() && sim.calls(id) > before
    };
    let first = a
        .register_key("sk-mongo-shared-00001", "openai", KeyMetadata::default())
        .await
        .unwrap();
    within(limit, "B routing to A's new key", async || {
        routes_to(&sim_b, &first.id).await
    })
    .await;

    // One disabled and another added through A: B moves to the new one.
    a.set_key_state(&first.id, KeyState::Disabled, "rotating")
        .await
        .unwrap();
    let second = a
        .register_key("sk-mongo-shared-00002", "openai", KeyMetadata::default())
        .await
        .unwrap();
    // Six requests in a row all on the second key: with the first still enabled, it
    // (one use against none) would get some of them.
    within(limit, "B seeing the first key disabled", async || {
        let first_calls = sim_b.calls(&first.id);
        let mut all_second = true;
        for _ in 0..6 {
            all_second &= routes_to(&sim_b, &second.id).await;
        }
        all_second && sim_b.calls(&first.id) == first_calls
    })
    .await;

    // Enabled again and the second deleted through A: B is back on the first only.
    a.set_key_state(&first.id, KeyState::Available, "rotated")
        .await
        .unwrap();
    a.delete_key(&second.id).await.unwrap();
    within(
        limit,
        "B seeing the first key enabled, the second gone",
        async || {
            let gone = sim_b.calls(&second.id);
            let mut only_first = true;
            for _ in 0..4 {
                only_first &= routes_to(&sim_b, &first.id).await;
            }
            only_first && sim_b.calls(&second.id) == gone
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_or_disabled_on_one_instance_is_followed_by_the_other() {
    let ns = namespace();
    let (a, _) = instance(&ns).await;
    let (b, sim_b) = instance(&ns).await;
    let key = a
        .register_key("sk-shared-key-00001", "openai", KeyMetadata::default())
        .await
        .unwrap();

    // B learns about the key from the change event and routes to it.
    eventually("B routing to A's new key", async || hello(&b).await.is_ok()).await;
    assert!(sim_b.calls(&key.id) >= 1);

    // Disabled through A: B stops sending it traffic within a second.
    a.set_key_state(&key.id, KeyState::Disabled, "rotating")
        .await
        .unwrap();
    eventually("B seeing the key disabled", async || {
        matches!(hello(&b).await, Err(e) if matches!(e.kind, RouteErrorKind::NoEligibleKey(_)))
    })
    .await;
    let calls = sim_b.calls(&key.id);
    for _ in 0..5 {
        assert!(hello(&b).await.is_err());
    }
    assert_eq!(sim_b.calls(&key.id), calls, "B kept calling a disabled key");
    assert_eq!(b.key(&key.id).await.unwrap().state, KeyState::Disabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_rpm_holds_across_instances() {
    let ns = namespace();
    let (a, sim_a) = instance(&ns).await;
    let (b, sim_b) = instance(&ns).await;
    let key = a
        .register_key(
            "sk-shared-key-00002",
            "openai",
            KeyMetadata {
                rpm: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually("B knowing the key", async || b.key(&key.id).await.is_ok()).await;
    // Wait until B's routing table has it too.
    eventually("B routing", async || {
        b.route(ask("gpt-4o", "warm"), Objective::default())
            .await
            .is_ok()
    })
    .await;
    let minute = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 60)
    };
    let started_in = minute();
    let mut served = 1;
    for i in 0..40 {
        let router = if i % 2 == 0 { &a } else { &b };
        if router
            .route(ask("gpt-4o", "x"), Objective::default())
            .await
            .is_ok()
        {
            served += 1;
        }
    }
    let calls = sim_a.calls(&key.id) + sim_b.calls(&key.id);
    assert_eq!(calls, served);
    // One minute window, shared by both instances: 10 calls, or up to 20 if the
    // minute turned during the test.
    if minute() == started_in {
        assert_eq!(served, 10, "the rpm limit did not hold across instances");
    } else {
        assert!(served <= 20, "served {served}");
    }
    let quota = a.quota(&key.id).await.unwrap();
    assert!(quota.windows.iter().any(|w| w.limit == 10));
}

/// A hard budget added through one instance stops requests on the other within a
/// second, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_added_on_one_instance_binds_the_other() {
    let ns = namespace();
    let (a, _) = instance(&ns).await;
    let (b, _) = instance(&ns).await;
    a.register_key(
        "sk-openai-multi-budget-01",
        "openai",
        KeyMetadata::default(),
    )
    .await
    .unwrap();
    eventually("the key reaching instance b", async || {
        b.route(ask("gpt-4o-mini", "hi"), Objective::default())
            .await
            .is_ok()
    })
    .await;

    // A budget too small for any request: $0.000001.
    let budget = apikeyrouter::Budget::new(
        "tiny",
        apikeyrouter::BudgetScope::Global,
        0.000_001,
        apikeyrouter::BudgetPeriod::Monthly,
        apikeyrouter::Enforcement::Hard,
    )
    .unwrap();
    a.add_budget(budget).await.unwrap();
    eventually("the budget reaching instance b", async || {
        matches!(
            b.route(ask("gpt-4o-mini", "hi"), Objective::default()).await,
            Err(e) if matches!(e.kind, RouteErrorKind::BudgetExceeded(_))
        )
    })
    .await;

    a.delete_budget("tiny").await.unwrap();
    eventually("the deletion reaching instance b", async || {
        b.route(ask("gpt-4o-mini", "hi"), Objective::default())
            .await
            .is_ok()
    })
    .await;
}

/// An instance that stops between reserve and settle (a crash, `kill -9`) leaves its
/// reservation in the shared budget, where nothing would ever release it. Once it is
/// older than the lease, the surviving instance's sweep gives it back and the budget
/// serves again; until then the budget refuses, so nothing is overspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instances_reservation_is_reclaimed_after_the_lease() {
    let store = Arc::new(redis_store_in(&namespace()).await);
    let clock = Arc::new(ManualClock::new(base_now()));
    let lease = Duration::from_millis(200);
    let survivor = ApiKeyRouter::builder()
        .store(store.clone())
        .clock(clock.clone())
        .total_deadline(lease)
        .reservation_lease(lease)
        .build()
        .await
        .unwrap();
    survivor.register_provider("openai", Arc::new(SimulatedProvider::new()));
    let key = survivor
        .register_key("sk-openai-multi-lease-01", "openai", KeyMetadata::default())
        .await
        .unwrap();
    let budget = Budget::new(
        "global",
        BudgetScope::Global,
        1.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap();
    survivor.add_budget(budget).await.unwrap();

    // What the stopped instance left: the whole budget reserved, never settled.
    store
        .reserve(&Charge {
            reservation: ReservationId(7),
            key_id: key.id.clone(),
            limits: QuotaLimits::default(),
            est_tokens: 100,
            est_cost: Money::from_usd(1.0),
            budget_ids: vec!["global".to_owned()],
            client: None,
            now: clock.now(),
        })
        .await
        .unwrap();
    let refused = survivor
        .route(ask("gpt-4o-mini", "hi"), Objective::default())
        .await;
    assert!(
        matches!(&refused, Err(e) if matches!(e.kind, RouteErrorKind::BudgetExceeded(_))),
        "{refused:?}"
    );
    // Sweeps within the lease keep it, and so does one asked for now.
    tokio::time::sleep(lease).await;
    assert_eq!(survivor.reclaim_stale_reservations().await.unwrap(), []);
    assert_eq!(
        survivor.budgets().await.unwrap()[0].reserved,
        Money::from_usd(1.0)
    );

    clock.advance(lease + Duration::from_millis(1));
    eventually("the sweep giving the reservation back", async || {
        survivor.budgets().await.unwrap()[0].reserved == Money::ZERO
    })
    .await;
    let reclaimed = survivor.reclaimed_reservations();
    assert_eq!(
        (reclaimed.count, reclaimed.amount),
        (1, Money::from_usd(1.0))
    );
    let served = survivor
        .route(ask("gpt-4o-mini", "hi"), Objective::default())
        .await
        .unwrap();
    let status = &survivor.budgets().await.unwrap()[0];
    assert_eq!(Some(status.spent), served.actual_cost);
    assert!(status.spent > Money::ZERO);
    assert_eq!(status.reserved, Money::ZERO);
}

/// A router over a memory store behind the test double that can misbehave on cue.
async fn router_over_a_double() -> (Arc<crate::forwarding::Forwarding>, ApiKeyRouter) {
    let store = Arc::new(crate::forwarding::Forwarding::over_memory());
    let router = router_on(store.clone()).await;
    (store, router)
}

/// A `DELETE` of a virtual key landing between the key's creation and its budget's
/// (here, or on another instance) finds no budget to remove; the creation then
/// removes the budget itself rather than leave it limiting a name no key can use
/// again, and answers with the key as revoked.
#[tokio::test]
async fn a_virtual_key_revoked_while_it_is_made_leaves_no_budget_behind() {
    let (store, router) = router_over_a_double().await;
    let key = apikeyrouter_domain::VirtualKey {
        budget_usd: Some(5.0),
        ..crate::support::virtual_key("racing", '1')
    };

    store.revoke_before_next_budget("racing");
    let (made, budget) = router.add_virtual_key(key).await.expect("made");
    assert!(budget.is_none(), "{budget:?}");
    assert!(!made.is_active(), "answered as revoked");
    let budgets = router.budgets().await.unwrap();
    assert!(
        budgets.iter().all(|b| b.budget_id != "virtual-key-racing"),
        "{budgets:?}"
    );

    // Without the race the budget stays.
    let (_, budget) = router
        .add_virtual_key(apikeyrouter_domain::VirtualKey {
            budget_usd: Some(5.0),
            ..crate::support::virtual_key("calm", '2')
        })
        .await
        .expect("made");
    assert_eq!(budget.expect("its budget").budget_id, "virtual-key-calm");
}

/// The same race on a change: a key given a budget by `PATCH` while a `DELETE` lands
/// keeps no budget once revoked.
#[tokio::test]
async fn a_virtual_key_revoked_while_given_a_budget_leaves_no_budget_behind() {
    let (store, router) = router_over_a_double().await;
    let key = crate::support::virtual_key("patched", '2');
    router.add_virtual_key(key.clone()).await.expect("made");

    store.revoke_before_next_budget("patched");
    router
        .update_virtual_key(apikeyrouter_domain::VirtualKey {
            budget_usd: Some(5.0),
            ..key
        })
        .await
        .expect("the update itself landed before the revocation");
    let budgets = router.budgets().await.unwrap();
    assert!(
        budgets.iter().all(|b| b.budget_id != "virtual-key-patched"),
        "{budgets:?}"
    );
}

/// A budget removed from the file while its deletion fails in the store stays the
/// file's: the next reload deletes it, instead of forgetting it and leaving it to
/// limit traffic for good.
#[tokio::test]
async fn a_budget_whose_removal_failed_is_removed_at_the_next_reload() {
    use apikeyrouter::config::Config;
    let (store, router) = router_over_a_double().await;
    let config = |budgets: &str| {
        Config::parse(
            &format!("[[providers]]\nid = \"sim\"\nkind = \"simulated\"\n{budgets}"),
            "reload.toml",
            &[],
        )
        .unwrap()
    };
    let ids = || async {
        router
            .budgets()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.budget_id)
            .collect::<Vec<_>>()
    };
    let with_cap = config(
        "[[budgets]]\nid = \"cap\"\nscope = \"global\"\nlimit_usd = 5.0\nperiod = \"daily\"\n",
    );
    router.apply_config(&with_cap).await.unwrap();
    assert_eq!(ids().await, ["cap"]);

    store.refuse_budget_deletes(true);
    router.apply_config(&config("")).await.unwrap();
    assert_eq!(ids().await, ["cap"], "the store refused the deletion");

    store.refuse_budget_deletes(false);
    router.apply_config(&config("")).await.unwrap();
    assert_eq!(ids().await, Vec::<String>::new());
}

/// A router on a store only its own process uses has no one else's changes to follow,
/// so it never reads the keys again; the same store presented as shared (without
/// change events) is read again every 10 s.
#[tokio::test(start_paused = true)]
async fn a_store_no_other_process_uses_is_not_read_again() {
    let (own, _router) = router_over_a_double().await;
    let shared = Arc::new(crate::forwarding::Forwarding::over_memory().presented_as_shared());
    let _follower = router_on(shared.clone()).await;
    let (own_loaded, shared_loaded) = (own.list_keys_calls(), shared.list_keys_calls());

    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(own.list_keys_calls(), own_loaded);
    assert_eq!(shared.list_keys_calls(), shared_loaded + 3);
}

/// Without change events, each periodic reading signals the virtual keys once it has
/// read the budgets (not while they are being read), so the proxy reads them then,
/// the budgets once per reading.
#[tokio::test(start_paused = true)]
async fn a_store_without_events_signals_virtual_keys_at_each_reading() {
    let store = Arc::new(crate::forwarding::Forwarding::over_memory().presented_as_shared());
    let router = router_on(store.clone()).await;
    let mut virtual_keys = router.virtual_key_changes();
    let budgets_read = store.list_budgets_calls();

    let hold = store.hold_next_budget_listing();
    hold.read().await;
    assert_eq!(
        signalled(&mut virtual_keys),
        [],
        "signalled before the budgets were read"
    );
    hold.release();
    assert_eq!(virtual_keys.recv().await, Ok(VirtualKeyChange::All));
    assert_eq!(store.list_budgets_calls(), budgets_read + 1);

    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(store.list_budgets_calls(), budgets_read + 3);
    assert_eq!(
        signalled(&mut virtual_keys),
        [VirtualKeyChange::All, VirtualKeyChange::All]
    );
}

/// The virtual-key changes signalled so far and not yet taken.
fn signalled(
    changes: &mut tokio::sync::broadcast::Receiver<VirtualKeyChange>,
) -> Vec<VirtualKeyChange> {
    std::iter::from_fn(|| changes.try_recv().ok()).collect()
}

/// A virtual key changed elsewhere (its change event) or through this router is
/// signalled by name, so the proxy reads that key alone.
#[tokio::test]
async fn a_virtual_key_change_is_signalled_by_its_name() {
    use apikeyrouter_application::ports::StoreChange;

    let store = Arc::new(crate::forwarding::Forwarding::over_memory().with_change_feed());
    let router = router_on(store.clone()).await;
    let mut virtual_keys = router.virtual_key_changes();
    eventually("the router subscribing", async || {
        store.subscriptions() == 1
    })
    .await;

    store.send_change(StoreChange::VirtualKey("made-elsewhere".to_owned()));
    let next = tokio::time::timeout(Duration::from_secs(5), virtual_keys.recv());
    assert_eq!(
        next.await.expect("a signal within 5 s"),
        Ok(VirtualKeyChange::One("made-elsewhere".to_owned()))
    );
    // An instance of a version before named events names no key.
    store.send_change(StoreChange::VirtualKeys);
    let next = tokio::time::timeout(Duration::from_secs(5), virtual_keys.recv());
    assert_eq!(
        next.await.expect("a signal within 5 s"),
        Ok(VirtualKeyChange::All)
    );
    router
        .add_virtual_key(crate::support::virtual_key("made-here", '3'))
        .await
        .unwrap();
    router.revoke_virtual_key("made-here").await.unwrap();
    assert_eq!(
        signalled(&mut virtual_keys),
        [
            VirtualKeyChange::One("made-here".to_owned()),
            VirtualKeyChange::One("made-here".to_owned())
        ]
    );
}

/// A router with one key (of `material`) over a memory store behind a change feed the
/// test controls, with the memory store itself, for changes made as by another
/// instance.
async fn one_key_behind_a_change_feed(
    material: &str,
) -> (
    Arc<dyn StateStore>,
    Arc<crate::forwarding::Forwarding>,
    ApiKeyRouter,
    Arc<SimulatedProvider>,
    apikeyrouter::KeyInfo,
) {
    let inner: Arc<dyn StateStore> = Arc::new(apikeyrouter_adapters_stores::MemoryStore::new());
    let store = Arc::new(crate::forwarding::Forwarding::to(inner.clone()).with_change_feed());
    let (router, sim) = instance_on(store.clone()).await;
    let key = router
        .register_key(material, "openai", KeyMetadata::default())
        .await
        .unwrap();
    (inner, store, router, sim, key)
}

/// The events sent while a change subscription was lost are gone: once subscribed
/// again the router reads the keys again, learning one added meanwhile and
/// forgetting one deleted, and signals the virtual keys.
#[tokio::test]
async fn after_a_lost_subscription_keys_deleted_meanwhile_are_forgotten() {
    let (inner, store, router, sim, gone) =
        one_key_behind_a_change_feed("sk-deleted-elsewhere-01").await;
    let mut virtual_keys = router.virtual_key_changes();

    // Another instance deletes the key and adds one; their events are lost.
    let (other, _) = instance_on(inner).await;
    other.delete_key(&gone.id).await.unwrap();
    let added = other
        .register_key("sk-added-elsewhere-01", "openai", KeyMetadata::default())
        .await
        .unwrap();
    store.lose_subscription();

    eventually("the router subscribing again", async || {
        store.subscriptions() == 2
    })
    .await;
    eventually(
        "the router serving with the key added meanwhile",
        async || hello(&router).await.is_ok_and(|r| r.key_id == added.id),
    )
    .await;
    let calls = sim.calls(&gone.id);
    for _ in 0..10 {
        let served = hello(&router).await.unwrap();
        assert_eq!(served.key_id, added.id);
    }
    assert_eq!(
        sim.calls(&gone.id),
        calls,
        "the deleted key was still called"
    );
    assert!(signalled(&mut virtual_keys).contains(&VirtualKeyChange::All));
}

/// A reading of the keys that a local change overlapped may lack that change (here a
/// key registered while the store was being read): it is not applied, so the key is
/// not forgotten, and the next reading brings the store's view.
#[tokio::test(start_paused = true)]
async fn a_reading_a_local_change_overlapped_is_not_applied() {
    let store = Arc::new(crate::forwarding::Forwarding::over_memory().presented_as_shared());
    let (router, _) = instance_on(store.clone()).await;
    let hold = store.hold_next_key_listing();

    // The periodic reading lists the keys (none yet) and is held there.
    tokio::time::sleep(Duration::from_secs(10)).await;
    hold.read().await;
    let key = router
        .register_key("sk-registered-meanwhile", "openai", KeyMetadata::default())
        .await
        .unwrap();
    let listed = store.list_keys_calls();
    hold.release();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let served = hello(&router)
        .await
        .expect("the key registered during the reading is still served");
    assert_eq!(served.key_id, key.id);

    // The next reading is applied: the key deleted in the store (as by another
    // instance) is forgotten here.
    store.delete_key(&key.id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        store.list_keys_calls(),
        listed + 1,
        "read again at the next tick"
    );
    assert!(hello(&router).await.is_err());
}

/// A reading of the budgets that a budget set here overlapped is not applied over it
/// (the budget would go unenforced here until the next reading); the next reading is.
#[tokio::test(start_paused = true)]
async fn a_budget_reading_a_local_change_overlapped_is_not_applied() {
    let store = Arc::new(crate::forwarding::Forwarding::over_memory().presented_as_shared());
    let (router, _) = instance_on(store.clone()).await;
    let defined = || -> Vec<String> {
        let budgets = router.core().budgets().definitions();
        budgets.iter().map(|b| b.id.clone()).collect()
    };
    let hold = store.hold_next_budget_listing();

    // The periodic reading lists the budgets (none yet) and is held there.
    tokio::time::sleep(Duration::from_secs(10)).await;
    hold.read().await;
    let budget = Budget::new(
        "set-meanwhile",
        BudgetScope::Global,
        1.0,
        BudgetPeriod::Daily,
        Enforcement::Hard,
    )
    .unwrap();
    router.add_budget(budget).await.unwrap();
    hold.release();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        defined(),
        ["set-meanwhile"],
        "the budget set during the reading"
    );

    // The next reading is applied: the budget deleted in the store (as by another
    // instance) is forgotten here.
    store.delete_budget("set-meanwhile").await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(defined().is_empty(), "{:?}", defined());
}

/// A reading of the keys leaves alone a state that follows traffic here: a key this
/// instance saw rate limited stays throttled though a lagging store still lists it as
/// available, instead of being sent traffic during its cooldown.
#[tokio::test(start_paused = true)]
async fn a_reading_leaves_a_key_throttled_here_throttled() {
    let store = Arc::new(crate::forwarding::Forwarding::over_memory().presented_as_shared());
    let (router, sim, key) = a_key_throttled_here_listed_available(&store).await;
    let (listed, calls) = (store.list_keys_calls(), sim.calls(&key));
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        store.list_keys_calls(),
        listed + 1,
        "the keys were read again"
    );
    assert!(hello(&router).await.is_err());
    assert_eq!(sim.calls(&key), calls, "a key in its cooldown was called");
}

/// A router on `store` with a simulated `openai` provider, reading `clock`.
async fn instance_at(
    store: &Arc<dyn StateStore>,
    clock: &Arc<ManualClock>,
) -> (ApiKeyRouter, Arc<SimulatedProvider>) {
    let router = ApiKeyRouter::builder()
        .store(store.clone())
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let sim = Arc::new(SimulatedProvider::new());
    router.register_provider("openai", sim.clone());
    (router, sim)
}

/// A key disabled on another instance and then rate limited here (the store refuses
/// the throttle: the key is no longer available) is re-read here, and gets no traffic
/// once the cooldown would have ended.
#[tokio::test]
async fn a_refused_transition_after_a_call_takes_the_stored_state() {
    use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
    let store: Arc<dyn StateStore> = Arc::new(apikeyrouter_adapters_stores::MemoryStore::new());
    let clock = Arc::new(ManualClock::new(crate::support::T0));
    let (here, sim) = instance_at(&store, &clock).await;
    let key = here
        .register_key("sk-refused-throttle-01", "openai", KeyMetadata::default())
        .await
        .unwrap()
        .id;
    let (elsewhere, _) = instance_at(&store, &clock).await;
    elsewhere
        .set_key_state(&key, KeyState::Disabled, "retired by an operator")
        .await
        .unwrap();
    sim.set_behaviour(
        &key,
        Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
            retry_after: Some(Duration::from_secs(60)),
        })),
    );
    // This instance has not heard of the disable yet: one call goes out, and its
    // throttle is refused by the store.
    assert!(hello(&here).await.is_err());
    assert_eq!(sim.calls(&key), 1);
    sim.set_behaviour(&key, Behaviour::ok());
    clock.advance(Duration::from_secs(600));

    let refused = hello(&here).await.unwrap_err();
    assert_eq!(refused.kind.code(), "no_eligible_key", "{refused:?}");
    assert_eq!(sim.calls(&key), 1, "the disabled key was called again");
}

/// A key throttled on one instance and disabled by an operator on another while its
/// cooldown runs stays disabled when the cooldown ends on the first: the store refuses
/// that instance's wake-up (only an operator takes a key out of Disabled), the instance
/// re-reads the key, and no request goes to it.
#[tokio::test]
async fn a_key_disabled_elsewhere_during_its_cooldown_stays_disabled() {
    use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
    let store: Arc<dyn StateStore> = Arc::new(apikeyrouter_adapters_stores::MemoryStore::new());
    let clock = Arc::new(ManualClock::new(crate::support::T0));
    let (here, sim) = instance_at(&store, &clock).await;
    let key = here
        .register_key("sk-disabled-elsewhere-01", "openai", KeyMetadata::default())
        .await
        .unwrap()
        .id;
    sim.set_behaviour(
        &key,
        Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
            retry_after: Some(Duration::from_secs(60)),
        })),
    );
    assert!(hello(&here).await.is_err());
    assert_eq!(here.key(&key).await.unwrap().state, KeyState::Throttled);
    sim.set_behaviour(&key, Behaviour::ok());
    let calls = sim.calls(&key);

    let (elsewhere, _) = instance_at(&store, &clock).await;
    elsewhere
        .set_key_state(&key, KeyState::Disabled, "retired by an operator")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(600));

    let refused = hello(&here).await.unwrap_err();
    assert_eq!(refused.kind.code(), "no_eligible_key", "{refused:?}");
    assert_eq!(sim.calls(&key), calls, "the disabled key was called");
    assert_eq!(store.get_key(&key).await.unwrap().state, KeyState::Disabled);
    assert_eq!(here.key(&key).await.unwrap().state, KeyState::Disabled);
    let last = here.key_transitions(&key).await.unwrap().pop().unwrap();
    assert_eq!(
        (last.from, last.to),
        (KeyState::Throttled, KeyState::Disabled)
    );
}

/// With change events the router still reads everything again every minute, which
/// is what catches an event that never came (an announcement that failed after its
/// change, a subscription that died without closing).
#[tokio::test(start_paused = true)]
async fn a_store_with_events_is_read_again_every_minute() {
    let (inner, store, router, _, key) =
        one_key_behind_a_change_feed("sk-deleted-unannounced").await;
    let mut virtual_keys = router.virtual_key_changes();
    // Deleted elsewhere; its event never comes.
    inner.delete_key(&key.id).await.unwrap();
    let listed = store.list_keys_calls();

    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(store.list_keys_calls(), listed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.list_keys_calls(), listed + 1);
    assert!(
        hello(&router).await.is_err(),
        "the deleted key is forgotten"
    );
    assert_eq!(signalled(&mut virtual_keys), [VirtualKeyChange::All]);
}

/// The catch-up after a lost subscription, like the periodic reading, leaves a key
/// throttled here throttled though the store lists it as available.
#[tokio::test]
async fn after_a_lost_subscription_a_key_throttled_here_stays_throttled() {
    let store = Arc::new(crate::forwarding::Forwarding::over_memory().with_change_feed());
    let (router, sim, key) = a_key_throttled_here_listed_available(&store).await;
    let (listed, calls) = (store.list_keys_calls(), sim.calls(&key));

    store.lose_subscription();
    eventually("the catch-up reading", async || {
        store.list_keys_calls() > listed
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(hello(&router).await.is_err());
    assert_eq!(sim.calls(&key), calls, "a key in its cooldown was called");
}

/// A catch-up reading that a local change overlapped is not applied but taken again:
/// here the first two readings are overlapped, and the third forgets the key deleted
/// elsewhere while the subscription was lost.
#[tokio::test(start_paused = true)]
async fn a_catch_up_reading_a_local_change_overlapped_is_taken_again() {
    let (store, router, gone, listed) = deleted_elsewhere_then_subscription_lost().await;
    let hold = overlap_catch_up_readings(&store, &router, 2).await;
    // Within seconds: the periodic reading, a minute on, would read too.
    tokio::time::timeout(Duration::from_secs(5), hold.read())
        .await
        .expect("no third catch-up reading");
    assert!(
        chooses_deleted(&router, &gone).await,
        "an overlapped reading was applied"
    );
    hold.release();

    tokio::time::timeout(Duration::from_secs(5), async {
        while chooses_deleted(&router, &gone).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the third catch-up reading was not applied");
    assert_eq!(store.list_keys_calls(), listed + 3);
    assert!(hello(&router).await.is_err(), "no chat key is left");
}

/// A catch-up whose three readings were all overlapped by local changes stops there;
/// the periodic reading, a minute on, applies the store's view.
#[tokio::test(start_paused = true)]
async fn a_catch_up_overlapped_every_time_is_left_to_the_periodic_reading() {
    let (store, router, gone, listed) = deleted_elsewhere_then_subscription_lost().await;
    // The hold set on a fourth listing lets it answer at once.
    overlap_catch_up_readings(&store, &router, 3)
        .await
        .release();

    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        store.list_keys_calls(),
        listed + 3,
        "no fourth catch-up reading"
    );
    assert!(
        chooses_deleted(&router, &gone).await,
        "an overlapped reading was applied"
    );

    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(store.list_keys_calls(), listed + 4, "the periodic reading");
    assert!(
        !chooses_deleted(&router, &gone).await,
        "the deleted key is still known"
    );
    assert!(hello(&router).await.is_err(), "no chat key is left");
}

/// Whether `router` still chooses `key`, deleted in the store: its charge on the key
/// is then refused as not found.
async fn chooses_deleted(router: &ApiKeyRouter, key: &apikeyrouter::KeyInfo) -> bool {
    matches!(
        hello(router).await,
        Err(e) if matches!(&e.kind, RouteErrorKind::Store(s) if s.message.contains(key.id.as_str()))
    )
}

/// A router behind a change feed whose only chat key was deleted in the store (its
/// event never came) and whose subscription is then lost, with the key listings
/// counted before that.
async fn deleted_elsewhere_then_subscription_lost() -> (
    Arc<crate::forwarding::Forwarding>,
    ApiKeyRouter,
    apikeyrouter::KeyInfo,
    u64,
) {
    let (inner, store, router, _, gone) =
        one_key_behind_a_change_feed("sk-deleted-elsewhere-02").await;
    inner.delete_key(&gone.id).await.unwrap();
    let listed = store.list_keys_calls();
    store.lose_subscription();
    (store, router, gone, listed)
}

/// Holds each of the catch-up's next `overlapped` key listings until a key is
/// registered (disabled) here, then lets it answer; returns the hold set on the listing after them.
async fn overlap_catch_up_readings(
    store: &crate::forwarding::Forwarding,
    router: &ApiKeyRouter,
    overlapped: usize,
) -> Arc<crate::forwarding::ListingHold> {
    let mut hold = store.hold_next_key_listing();
    for reading in 1..=overlapped {
        tokio::time::timeout(Duration::from_secs(5), hold.read())
            .await
            .unwrap_or_else(|_| panic!("no catch-up reading {reading}"));
        // Disabled, so that only the deleted key can be chosen.
        let key = router
            .register_key(
                &format!("sk-registered-meanwhile-{reading}"),
                "openai",
                KeyMetadata::default(),
            )
            .await
            .unwrap();
        router
            .set_key_state(&key.id, KeyState::Disabled, "test")
            .await
            .unwrap();
        // Set before the release, so that the next reading cannot slip past it.
        let next = store.hold_next_key_listing();
        hold.release();
        hold = next;
    }
    hold
}

/// A router over `store` whose only key it saw rate limited (a 10-minute cooldown),
/// whose provider answers again, and which `store` now lists as available, as a store
/// lagging behind would.
async fn a_key_throttled_here_listed_available(
    store: &Arc<crate::forwarding::Forwarding>,
) -> (ApiKeyRouter, Arc<SimulatedProvider>, apikeyrouter::KeyId) {
    use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
    let (router, sim) = instance_on(store.clone()).await;
    let key = router
        .register_key("sk-throttled-here-0001", "openai", KeyMetadata::default())
        .await
        .unwrap();
    sim.set_behaviour(
        &key.id,
        Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
            retry_after: Some(Duration::from_secs(600)),
        })),
    );
    assert!(hello(&router).await.is_err());
    assert_eq!(
        router.key(&key.id).await.unwrap().state,
        KeyState::Throttled
    );
    sim.set_behaviour(&key.id, Behaviour::ok());
    store.rewrite_key_listings(|k| {
        k.state = KeyState::Available;
        k.cooldown_until = None;
    });
    (router, sim, key.id)
}
