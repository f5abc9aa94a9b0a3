//! Behaviour of [`MongoStore`] against a real MongoDB wire-protocol server: the one
//! `cargo xtask services up` starts (nx-27017) or any server `MONGODB_URL` names
//! (default `mongodb://127.0.0.1:27017`).
//!
//! Each test works in a fresh database `test_<pid>_<nanos>_<n>` and drops it when it
//! passes (a failing test leaves its database behind for inspection). Never skipped:
//! an unreachable server fails the test with a message saying how to start one.

use crate::test_time::base_now;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apikeyrouter_application::ports::{
    AuditSink, BudgetStore, Charge, ChargeRejection, KeyStore, RequestLog, StateStore,
    StoreErrorKind, UsageLedger, VirtualKeyStore,
};
use apikeyrouter_application::records::{AttemptRecord, AuditRecord, Outcome};
use apikeyrouter_domain::{
    ApiKey, FailureKind, KeyId, KeyMaterial, KeyMetadata, KeyState, ModelId, Money, ProviderId,
    QuotaLimits, RequestId, ReservationId, TenantId, TokenUsage, TransitionTrigger, VirtualKey,
};
use mongodb::bson::{Bson, Document, doc};
use mongodb::{Collection, Database};

use super::schema::{IndexInfo, list_indexes, same_keys};
use super::{MongoStore, Retention, SCHEMA_VERSION};
use crate::cipher::{AeadCipher, MasterKeys};

const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";
const MATERIAL: &str = "sk-test-SECRETSECRET0000";

fn url() -> String {
    std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned())
}

fn fresh_database() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("test_{}_{nanos}_{n}", std::process::id())
}

fn cipher(ring: &str) -> Arc<AeadCipher> {
    Arc::new(AeadCipher::new(MasterKeys::parse(ring, "test").unwrap()))
}

async fn open_at(database: &str, ring: &str, retention: Retention) -> MongoStore {
    match MongoStore::connect(&url(), database, cipher(ring), retention).await {
        Ok(store) => store,
        Err(err) => panic!(
            "the MongoDB test server is needed: {err} (source: {:?}). Start it with \
             `cargo xtask services up`, or point MONGODB_URL at a server.",
            err.source
        ),
    }
}

async fn open() -> MongoStore {
    open_at(&fresh_database(), KEY_A, Retention::default()).await
}

async fn finish(store: MongoStore) {
    store.db().drop().await.unwrap();
}

fn raw(db: &Database, collection: &str) -> Collection<Document> {
    db.collection(collection)
}

fn key(id: &str, rpm: Option<u64>) -> ApiKey {
    ApiKey::new(
        KeyId::new(id),
        ProviderId::new("openai"),
        KeyMaterial::parse(MATERIAL).unwrap(),
        KeyMetadata {
            rpm,
            tenant: Some(TenantId::new("customer-a")),
            ..Default::default()
        },
        base_now(),
    )
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

fn record(id: &str) -> AuditRecord {
    let decision = serde_json::from_value(serde_json::json!({
        "key_id": "k1",
        "provider": "openai",
        "model": "gpt-4o",
        "objective": "cost=0.70,reliability=0.30",
        "score": 0.8125,
        "metrics": { "uses": 3, "success_rate": 0.95, "latency_ms": 120.5, "est_cost": 0.0025 },
        "alternatives": [{
            "key_id": "k2",
            "provider": "openai",
            "score": 0.5,
            "metrics": { "uses": 9, "success_rate": 0.9, "latency_ms": 300.0, "est_cost": null },
            "lost_because": "higher_cost",
        }],
        "ready": 2,
        "ineligible": {
            "throttled": 1, "exhausted": 0, "disabled": 0, "invalid": 0, "rate_limited": 0,
            "model_not_served": 0, "provider_not_allowed": 0, "over_max_cost": 0,
            "below_min_success_rate": 0, "already_tried": 0, "budget_exceeded": 0,
        },
        "at": base_now().as_millis(),
    }))
    .unwrap();
    AuditRecord {
        request_id: RequestId::new(id),
        correlation_id: Some("corr-1".to_owned()),
        tenant: Some(TenantId::new("customer-a")),
        tags: BTreeMap::from([("feature".to_owned(), "chatbot".to_owned())]),
        requested_model: ModelId::new("gpt-4o"),
        key_id: Some(KeyId::new("k1")),
        provider: Some(ProviderId::new("openai")),
        model: Some(ModelId::new("gpt-4o")),
        decision: Some(decision),
        attempts: vec![
            AttemptRecord {
                key_id: KeyId::new("k2"),
                provider: ProviderId::new("openai"),
                model: ModelId::new("gpt-4o"),
                failure: Some(FailureKind::RateLimited),
                message: Some("slow down".to_owned()),
                status: Some(429),
                latency_ms: 12,
            },
            AttemptRecord {
                key_id: KeyId::new("k1"),
                provider: ProviderId::new("openai"),
                model: ModelId::new("gpt-4o"),
                failure: None,
                message: None,
                status: None,
                latency_ms: 340,
            },
        ],
        usage: TokenUsage {
            prompt_tokens: 30,
            completion_tokens: 12,
            cached_tokens: 0,
        },
        estimated_cost: Some(Money::from_usd(0.0025)),
        actual_cost: Some(Money::from_usd(0.002)),
        outcome: Outcome::Success,
        started_at: base_now(),
        finished_at: base_now().plus(Duration::from_millis(352)),
    }
}

fn encoded(doc: &Document) -> Vec<u8> {
    let mut bytes = Vec::new();
    doc.to_writer(&mut bytes).unwrap();
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn key_crud_round_trips_with_material_sealed_at_rest() {
    let store = open().await;
    store.insert_key(key("k2", None)).await.unwrap();
    store.insert_key(key("k1", Some(10))).await.unwrap();

    let err = store.insert_key(key("k1", None)).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Conflict);
    assert_eq!(err.message, "key k1 already exists");

    let k1 = store.get_key(&KeyId::new("k1")).await.unwrap();
    assert_eq!(k1.material.expose(), MATERIAL);
    assert_eq!(k1.metadata.rpm, Some(10));
    assert_eq!(k1.metadata.tenant, Some(TenantId::new("customer-a")));
    assert_eq!((k1.state, k1.created_at), (KeyState::Available, base_now()));
    let ids: Vec<String> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id.to_string())
        .collect();
    assert_eq!(ids, ["k1", "k2"]);

    // At rest: binary ciphertext, and the material nowhere in the document.
    let stored = raw(store.db(), "keys")
        .find_one(doc! { "_id": "k1" })
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(stored.get("material"), Some(Bson::Binary(_))));
    let bytes = encoded(&stored);
    assert!(!contains(&bytes, MATERIAL));
    assert!(!contains(&bytes, "SECRETSECRET"));

    let updated = store
        .update_metadata(
            &KeyId::new("k1"),
            KeyMetadata {
                rpm: Some(20),
                tags: BTreeMap::from([("feature".to_owned(), "chatbot".to_owned())]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.metadata.rpm, Some(20));
    let reread = store.get_key(&KeyId::new("k1")).await.unwrap();
    assert_eq!(reread.metadata, updated.metadata);
    assert_eq!(reread.material.expose(), MATERIAL);

    store.delete_key(&KeyId::new("k1")).await.unwrap();
    let missing = KeyId::new("k1");
    for kind in [
        store.get_key(&missing).await.unwrap_err().kind,
        store.delete_key(&missing).await.unwrap_err().kind,
        store.transitions(&missing).await.unwrap_err().kind,
        store
            .update_metadata(&missing, KeyMetadata::default())
            .await
            .unwrap_err()
            .kind,
    ] {
        assert_eq!(kind, StoreErrorKind::NotFound);
    }
    assert_eq!(store.list_keys().await.unwrap().len(), 1);
    finish(store).await;
}

#[tokio::test]
async fn transitions_are_persisted_in_order_and_survive_a_reconnect() {
    let database = fresh_database();
    let store = open_at(&database, KEY_A, Retention::default()).await;
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
        (first.from, first.to),
        (KeyState::Available, KeyState::Throttled)
    );
    let throttled = store.get_key(&id).await.unwrap();
    assert_eq!(throttled.cooldown_until, Some(cooldown));
    assert_eq!(throttled.state_reason, "429 from provider");
    for (to, trigger) in [
        (KeyState::Available, TransitionTrigger::CooldownElapsed),
        (KeyState::Disabled, TransitionTrigger::Manual),
    ] {
        store
            .transition(&id, to, trigger, "next".to_owned(), None, cooldown)
            .await
            .unwrap();
    }

    // A forbidden move is refused and changes nothing.
    let err = store
        .transition(
            &id,
            KeyState::Recovering,
            TransitionTrigger::QuotaReset,
            "reset".to_owned(),
            None,
            cooldown,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(err.message, "key k1 cannot go from disabled to recovering");

    // Another connection (another instance, or after a restart) sees the same.
    let other = open_at(&database, KEY_A, Retention::default()).await;
    let path: Vec<(KeyState, KeyState, TransitionTrigger)> = other
        .transitions(&id)
        .await
        .unwrap()
        .iter()
        .map(|t| (t.from, t.to, t.trigger))
        .collect();
    assert_eq!(
        path,
        [
            (
                KeyState::Available,
                KeyState::Throttled,
                TransitionTrigger::RateLimited
            ),
            (
                KeyState::Throttled,
                KeyState::Available,
                TransitionTrigger::CooldownElapsed
            ),
            (
                KeyState::Available,
                KeyState::Disabled,
                TransitionTrigger::Manual
            ),
        ]
    );
    assert_eq!(other.get_key(&id).await.unwrap().state, KeyState::Disabled);
    let n_stored = raw(store.db(), "transitions")
        .count_documents(doc! { "key_id": "k1" })
        .await
        .unwrap();
    assert_eq!(n_stored, 3);

    // A key inserted again under the id starts with no history.
    store.delete_key(&id).await.unwrap();
    store.insert_key(key("k1", None)).await.unwrap();
    assert!(store.transitions(&id).await.unwrap().is_empty());
    finish(store).await;
}

#[tokio::test]
async fn corrupt_documents_are_invalid_naming_the_record_and_left_alone() {
    let store = open().await;
    store.insert_key(key("good", None)).await.unwrap();
    let foreign = doc! { "_id": "bad", "provider": 42_i32, "material": "sk-plain", "state": "on" };
    raw(store.db(), "keys")
        .insert_one(foreign.clone())
        .await
        .unwrap();

    let err = store.get_key(&KeyId::new("bad")).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(err.message, "mongodb keys: record bad is malformed");
    assert!(!err.to_string().contains("sk-plain"));
    let err = store.list_keys().await.unwrap_err();
    assert_eq!(err.message, "mongodb keys: record bad is malformed");
    let Err(ChargeRejection::Store(err)) = store.reserve(&charge(0, "bad", None, 0.0)).await else {
        panic!("a charge on a corrupt key must fail with a store error");
    };
    assert_eq!(err.message, "mongodb keys: record bad is malformed");
    // The good key still works and the corrupt one is untouched.
    assert_eq!(
        store
            .get_key(&KeyId::new("good"))
            .await
            .unwrap()
            .material
            .expose(),
        MATERIAL
    );
    let after = raw(store.db(), "keys")
        .find_one(doc! { "_id": "bad" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, foreign);

    raw(store.db(), "budgets")
        .insert_one(doc! { "_id": "weird", "limit": "a lot" })
        .await
        .unwrap();
    let err = store.budget_statuses(base_now()).await.unwrap_err();
    assert_eq!(
        (err.kind, err.message.as_str()),
        (
            StoreErrorKind::Invalid,
            "mongodb budgets: record weird is malformed"
        )
    );

    raw(store.db(), "requests")
        .insert_one(doc! { "request_id": "r-bad", "record": 7_i32 })
        .await
        .unwrap();
    let err = store
        .get_request(&RequestId::new("r-bad"))
        .await
        .unwrap_err();
    assert_eq!(err.message, "mongodb requests: record r-bad is malformed");

    // A virtual key that does not decode is left out of the list: one bad record
    // must not lock every client out.
    let good = VirtualKey {
        name: "good".to_owned(),
        token_sha256: "b".repeat(64),
        tenant: None,
        models: None,
        rpm: Some(5),
        budget_usd: None,
        created_at: base_now(),
        revoked_at: None,
    };
    store.insert_virtual_key(good.clone()).await.unwrap();
    raw(store.db(), "virtual_keys")
        .insert_one(doc! { "_id": "bad", "rpm": "many" })
        .await
        .unwrap();
    assert_eq!(
        store.list_virtual_keys().await.unwrap(),
        std::slice::from_ref(&good)
    );
    // A record written with `revoked_at: null` is revoked like one without it.
    raw(store.db(), "virtual_keys")
        .update_one(
            doc! { "_id": "good" },
            doc! { "$set": { "revoked_at": Bson::Null } },
        )
        .await
        .unwrap();
    let revoked = store.revoke_virtual_key("good", base_now()).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(base_now()));
    // When none decodes, the list fails rather than say no key was ever made.
    raw(store.db(), "virtual_keys")
        .update_one(doc! { "_id": "good" }, doc! { "$set": { "rpm": "many" } })
        .await
        .unwrap();
    let err = store.list_virtual_keys().await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid, "{err}");
    finish(store).await;
}

#[tokio::test]
async fn wrong_master_key_is_invalid_naming_the_key_and_rotation_keeps_it_readable() {
    let database = fresh_database();
    let store = open_at(&database, &format!("v1:{KEY_A}"), Retention::default()).await;
    store.insert_key(key("k1", None)).await.unwrap();

    let wrong = open_at(&database, &format!("v1:{KEY_B}"), Retention::default()).await;
    let err = wrong.get_key(&KeyId::new("k1")).await.unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(
        err.message,
        "mongodb keys: record k1: key material cannot be opened: wrong master key or corrupted data"
    );
    assert!(!format!("{err:?}").contains("SECRET"));
    assert_eq!(
        wrong.list_keys().await.unwrap_err().kind,
        StoreErrorKind::Invalid
    );

    // Rotation: a new current key, the old one kept to open what it sealed.
    let rotated = open_at(
        &database,
        &format!("v2:{KEY_B}\nv1:{KEY_A}"),
        Retention::default(),
    )
    .await;
    assert_eq!(
        rotated
            .get_key(&KeyId::new("k1"))
            .await
            .unwrap()
            .material
            .expose(),
        MATERIAL
    );
    rotated.insert_key(key("k2", None)).await.unwrap();
    let sealed = raw(rotated.db(), "keys")
        .find_one(doc! { "_id": "k2" })
        .await
        .unwrap()
        .unwrap();
    let Some(Bson::Binary(material)) = sealed.get("material") else {
        panic!("material is stored as binary");
    };
    assert_eq!(AeadCipher::key_id_of(&material.bytes), Some("v2"));
    finish(store).await;
}

#[tokio::test]
async fn request_log_and_audit_trail_round_trip() {
    let store = open().await;
    assert_eq!(
        store.get_request(&RequestId::new("r1")).await.unwrap(),
        None
    );
    let first = record("r1");
    assert!(store.save_request(Arc::new(first.clone())).await.unwrap());
    assert_eq!(
        store.get_request(&RequestId::new("r1")).await.unwrap(),
        Some(first.clone())
    );
    // Another record under a taken id is refused; the same one again is saved.
    let mut other = record("r1");
    other.outcome = Outcome::Failure {
        code: "no_eligible_key".to_owned(),
        message: "every key is throttled".to_owned(),
    };
    assert!(!store.save_request(Arc::new(other)).await.unwrap());
    assert!(store.save_request(Arc::new(first.clone())).await.unwrap());
    assert_eq!(
        store.get_request(&RequestId::new("r1")).await.unwrap(),
        Some(first.clone())
    );
    let requests = raw(store.db(), "requests");
    assert_eq!(requests.count_documents(doc! {}).await.unwrap(), 1);
    let stored = requests.find_one(doc! {}).await.unwrap().unwrap();
    assert!(matches!(stored.get("finished_at"), Some(Bson::DateTime(_))));

    // The audit sink appends; recording a request twice keeps one record.
    store.record(&first).await.unwrap();
    store.record(&first).await.unwrap();
    store.record(&record("r2")).await.unwrap();
    let audit = raw(store.db(), "audit");
    assert_eq!(audit.count_documents(doc! {}).await.unwrap(), 2);
    let audited = audit
        .find_one(doc! { "request_id": "r1" })
        .await
        .unwrap()
        .unwrap();
    let decoded: AuditRecord =
        mongodb::bson::from_document(audited.get_document("record").unwrap().clone()).unwrap();
    assert_eq!(decoded, first);
    // Another request's record under a taken id is kept too, under a new id.
    let mut reused = record("r1");
    reused.correlation_id = Some("second request".to_owned());
    store.record(&reused).await.unwrap();
    assert_eq!(audit.count_documents(doc! {}).await.unwrap(), 3);
    let moved = audit
        .find_one(doc! { "record.correlation_id": "second request" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        moved.get_str("request_id").unwrap().starts_with("r1~"),
        "{moved}"
    );
    finish(store).await;
}

/// The index of `collection` over `keys`, recognised by key pattern (servers may
/// rename the indexes they create).
async fn index_on(db: &Database, collection: &str, keys: Document) -> Option<IndexInfo> {
    list_indexes(db, collection)
        .await
        .unwrap()
        .into_iter()
        .find(|index| same_keys(&index.keys, &keys))
}

#[tokio::test]
async fn indexes_retention_and_schema_version_are_set_up_at_connect() {
    let database = fresh_database();
    let store = open_at(&database, KEY_A, Retention::default()).await;
    let db = store.db();

    let by_key = index_on(db, "transitions", doc! { "key_id": 1, "at": 1 }).await;
    assert!(by_key.is_some(), "transitions need a key_id + at index");
    for (collection, days) in [("requests", 30), ("audit", 365)] {
        let request_id = index_on(db, collection, doc! { "request_id": 1 })
            .await
            .unwrap();
        assert!(request_id.unique, "{collection}: {request_id:?}");
        let ttl = index_on(db, collection, doc! { "finished_at": 1 })
            .await
            .unwrap();
        assert_eq!(
            ttl.expire_after,
            Some(Duration::from_secs(days * 86_400)),
            "{collection}"
        );
    }
    let version = raw(db, "meta")
        .find_one(doc! { "_id": "schema_version" })
        .await
        .unwrap()
        .unwrap();
    let recorded = match version.get("version") {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        other => panic!("schema version is not a number: {other:?}"),
    };
    assert_eq!(recorded, SCHEMA_VERSION);

    // Retention is configuration: reconnecting with another one replaces the TTLs.
    let changed = Retention {
        decisions_days: Some(7),
        audit_days: None,
    };
    let reopened = open_at(&database, KEY_A, changed).await;
    let requests_ttl = index_on(reopened.db(), "requests", doc! { "finished_at": 1 })
        .await
        .unwrap();
    assert_eq!(
        requests_ttl.expire_after,
        Some(Duration::from_secs(7 * 86_400))
    );
    let audit_ttl = index_on(reopened.db(), "audit", doc! { "finished_at": 1 }).await;
    assert_eq!(audit_ttl, None);
    // Connecting again with the same retention changes nothing.
    let before = list_indexes(reopened.db(), "requests").await.unwrap();
    let again = open_at(&database, KEY_A, changed).await;
    assert_eq!(list_indexes(again.db(), "requests").await.unwrap(), before);
    finish(store).await;
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let database = fresh_database();
    let store = open_at(&database, KEY_A, Retention::default()).await;
    raw(store.db(), "meta")
        .update_one(
            doc! { "_id": "schema_version" },
            doc! { "$set": { "version": 99_i64 } },
        )
        .await
        .unwrap();

    let err = MongoStore::connect(&url(), &database, cipher(KEY_A), Retention::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Invalid);
    assert_eq!(
        err.message,
        format!(
            "mongodb database {database} has schema version 99, newer than this build's \
             {SCHEMA_VERSION}: upgrade apikeyrouter"
        )
    );
    finish(store).await;
}

#[tokio::test]
async fn unreachable_server_is_unavailable_naming_the_url_without_password() {
    // Port 1 on loopback: nothing listens there.
    let err = MongoStore::connect(
        "mongodb://router:hunter2@127.0.0.1:1/?serverSelectionTimeoutMS=500",
        "apikeyrouter",
        cipher(KEY_A),
        Retention::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Unavailable);
    assert_eq!(
        err.message,
        "mongodb at mongodb://router:***@127.0.0.1:1/?*** is unreachable"
    );
    assert!(!format!("{err:?}").contains("hunter2"));
}

#[tokio::test]
async fn store_reports_its_kind_pings_and_hides_secrets_in_debug() {
    let store = open().await;
    assert_eq!(store.kind(), "mongodb");
    store.ping().await.unwrap();
    let shown = format!("{store:?}");
    assert!(
        shown.starts_with("MongoStore { url: \"mongodb://"),
        "{shown}"
    );
    assert!(!shown.contains("AAECAwQF"));
    finish(store).await;
}
