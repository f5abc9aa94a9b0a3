//! What only the memory store does: its bounded request log. Everything the ports
//! promise is checked for every store by the conformance suite
//! (`tests/src/store_conformance.rs`), the memory store included.

use std::collections::BTreeMap;
use std::sync::Arc;

use apikeyrouter_application::ports::RequestLog;
use apikeyrouter_application::records::{AuditRecord, Outcome};
use apikeyrouter_domain::{ModelId, RequestId, Timestamp, TokenUsage};

use super::MemoryStore;

/// A minute boundary (2026-11-27T10:30:00Z).
const NOW: Timestamp = Timestamp::from_millis(1_795_775_400_000);

fn record(id: &str) -> AuditRecord {
    AuditRecord {
        request_id: RequestId::new(id),
        correlation_id: None,
        tenant: None,
        tags: BTreeMap::new(),
        requested_model: ModelId::new("gpt-4o"),
        key_id: None,
        provider: None,
        model: None,
        decision: None,
        attempts: Vec::new(),
        usage: TokenUsage::default(),
        estimated_cost: None,
        actual_cost: None,
        outcome: Outcome::Success,
        started_at: NOW,
        finished_at: NOW,
    }
}

#[tokio::test]
async fn request_log_keeps_the_newest_records() {
    let store = MemoryStore::with_request_capacity(3);
    for n in 0..5 {
        store
            .save_request(Arc::new(record(&format!("r{n}"))))
            .await
            .unwrap();
    }
    // Another record under a kept id is refused without evicting anything.
    let mut other = record("r2");
    other.correlation_id = Some("second".to_owned());
    assert!(!store.save_request(Arc::new(other)).await.unwrap());

    for gone in ["r0", "r1"] {
        let res = store.get_request(&RequestId::new(gone)).await.unwrap();
        assert_eq!(res, None, "{gone} should have been evicted");
    }
    for kept in ["r3", "r4"] {
        let res = store.get_request(&RequestId::new(kept)).await.unwrap();
        assert_eq!(res, Some(record(kept)));
    }
    let r2 = store.get_request(&RequestId::new("r2")).await.unwrap();
    assert_eq!(r2, Some(record("r2")));
}

#[tokio::test]
async fn zero_capacity_request_log_keeps_nothing() {
    let store = MemoryStore::with_request_capacity(0);
    store.save_request(Arc::new(record("r0"))).await.unwrap();
    assert_eq!(
        store.get_request(&RequestId::new("r0")).await.unwrap(),
        None
    );
}

/// Opens the store `config` names, saves records `r0` to `r{kept}` through the port,
/// and checks that the first is gone and the oldest and newest of the `kept` after it
/// are found.
async fn keeps_the_newest(config: &crate::StoreConfig, kept: usize) {
    let store = crate::connect(config).await.unwrap();
    for i in 0..=kept {
        let saved = store
            .save_request(Arc::new(record(&format!("r{i}"))))
            .await
            .unwrap();
        assert!(saved, "r{i} not saved");
    }
    for (i, expected) in [(0, false), (1, true), (kept, true)] {
        let id = RequestId::new(format!("r{i}"));
        let found = store.get_request(&id).await.unwrap().is_some();
        assert_eq!(found, expected, "r{i} of {} saved", kept + 1);
    }
}

#[tokio::test]
async fn the_memory_config_sets_how_many_records_are_kept() {
    let config = crate::StoreConfig::Memory {
        requests_kept: Some(2),
    };
    keeps_the_newest(&config, 2).await;
}

#[tokio::test]
async fn by_default_the_newest_thousand_records_are_kept() {
    assert_eq!(crate::DEFAULT_REQUEST_CAPACITY, 1_000);
    keeps_the_newest(&crate::StoreConfig::default(), 1_000).await;
}
