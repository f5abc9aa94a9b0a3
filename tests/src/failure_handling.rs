//! How the router reacts to each class of provider failure: key actions, retries
//! elsewhere, timeouts and deadlines.

use std::sync::Arc;
use std::time::Duration;

use apikeyrouter::mocks::{MockAuditSink, MockProvider};
use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
use apikeyrouter::{
    FailureKind, KeyMetadata, KeyState, ModelSet, Objective, ProviderError, RouteErrorKind,
};

use crate::support::{Harness, ask};

#[tokio::test]
async fn auth_failure_invalidates_the_key_for_good() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let bad = h.key("openai", 1, KeyMetadata::default()).await;
    let good = h.key("openai", 2, KeyMetadata::default()).await;
    sim.set_behaviour(
        &bad,
        Behaviour::failing(FailurePlan::Always(Failure::Unauthorized)),
    );
    for _ in 0..20 {
        let r = h
            .router
            .route(ask("gpt-4o", "x"), Objective::default())
            .await
            .unwrap();
        assert_eq!(r.key_id, good);
        h.advance(Duration::from_secs(600));
    }
    assert_eq!(sim.calls(&bad), 1);
    let info = h.router.key(&bad).await.unwrap();
    assert_eq!(info.state, KeyState::Invalid);
    let t = h.router.key_transitions(&bad).await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0].trigger,
        apikeyrouter::domain::TransitionTrigger::AuthFailure
    );
}

#[tokio::test]
async fn exhausted_key_recovers_after_its_rest_and_a_successful_probe() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let k = h.key("openai", 1, KeyMetadata::default()).await;
    let spare = h.key("openai", 2, KeyMetadata::default()).await;
    sim.set_behaviour(
        &k,
        Behaviour::failing(FailurePlan::first_n(1, Failure::QuotaExhausted)),
    );
    let r = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap();
    assert_eq!(r.key_id, spare);
    assert_eq!(h.router.key(&k).await.unwrap().state, KeyState::Exhausted);
    // The default rest for an exhausted key without a reset time is one hour.
    h.advance(Duration::from_secs(3_599));
    for _ in 0..4 {
        assert_eq!(
            h.router
                .route(ask("gpt-4o", "x"), Objective::default())
                .await
                .unwrap()
                .key_id,
            spare
        );
    }
    h.advance(Duration::from_secs(1));
    assert_eq!(h.router.key(&k).await.unwrap().state, KeyState::Recovering);
    let r = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap();
    assert_eq!(
        r.key_id, k,
        "the recovering key is probed first (it has served least)"
    );
    let states: Vec<_> = h
        .router
        .key_transitions(&k)
        .await
        .unwrap()
        .iter()
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        states,
        [
            (KeyState::Available, KeyState::Exhausted),
            (KeyState::Exhausted, KeyState::Recovering),
            (KeyState::Recovering, KeyState::Available),
        ]
    );
}

#[tokio::test]
async fn hanging_provider_times_out_and_the_request_fails_over() {
    let h = Harness::new(|b| b.attempt_timeout(Duration::from_millis(50))).await;
    let sim = h.provider("openai");
    let slow = h.key("openai", 1, KeyMetadata::default()).await;
    let fast = h.key("openai", 2, KeyMetadata::default()).await;
    sim.set_behaviour(
        &slow,
        Behaviour::failing(FailurePlan::Always(Failure::Hang(Duration::from_secs(30)))),
    );
    let r = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap();
    assert_eq!(r.key_id, fast);
    assert_eq!(r.attempts[0].failure, Some(FailureKind::Timeout));
}

#[tokio::test]
async fn total_deadline_bounds_the_whole_request() {
    let h = Harness::new(|b| b.total_deadline(Duration::from_millis(80)).max_attempts(10)).await;
    let sim = h.provider("openai");
    sim.set_default_behaviour(Behaviour::failing(FailurePlan::Always(Failure::Hang(
        Duration::from_secs(30),
    ))));
    for i in 0..5 {
        h.key("openai", i, KeyMetadata::default()).await;
    }
    let started = std::time::Instant::now();
    let err = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            err.kind,
            RouteErrorKind::DeadlineExceeded(80) | RouteErrorKind::AttemptsExhausted { .. }
        ),
        "{err}"
    );
    assert!(
        err.attempts
            .iter()
            .all(|a| a.failure == Some(FailureKind::Timeout))
    );
}

#[tokio::test]
async fn attempts_are_bounded_and_the_error_names_the_last_failure() {
    let h = Harness::new(|b| b.max_attempts(3)).await;
    let sim = h.provider("openai");
    sim.set_default_behaviour(Behaviour::failing(FailurePlan::Always(
        Failure::ServerError,
    )));
    for i in 0..5 {
        h.key("openai", i, KeyMetadata::default()).await;
    }
    let err = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "all 3 attempts failed; last: server_error (HTTP 500): simulated server error"
    );
    assert_eq!(sim.total_calls(), 3);
    assert_eq!(err.attempts.len(), 3);
}

/// A bad request fails the same way on every key: one call, no retry, and exactly one
/// audit record. Mocks stand in for the provider and the audit sink.
#[tokio::test]
async fn bad_request_is_not_retried_and_is_audited_once() {
    let mut provider = MockProvider::new();
    provider.expect_kind().return_const("mock");
    provider.expect_default_models().returning(|| ModelSet::Any);
    provider.expect_chat().times(1).returning(|_| {
        Err(ProviderError::new(FailureKind::BadRequest, "context length exceeded").with_status(400))
    });
    let mut audit = MockAuditSink::new();
    audit
        .expect_record()
        .times(1)
        .withf(|r| matches!(&r.outcome, apikeyrouter::Outcome::Failure { code, .. } if code == "provider_rejected_request"))
        .returning(|_| Ok(()));
    // Flushed once, by flush_records below.
    audit.expect_flush().times(1).returning(|| Ok(()));
    let router = apikeyrouter::ApiKeyRouter::builder()
        .audit(Arc::new(audit))
        .build()
        .await
        .unwrap();
    router.register_provider("openai", Arc::new(provider));
    for i in 0..3 {
        router
            .register_key(
                &format!("sk-mock-key-{i:04}"),
                "openai",
                KeyMetadata::default(),
            )
            .await
            .unwrap();
    }
    let err = router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind.code(), "provider_rejected_request");
    assert_eq!(
        err.to_string(),
        "provider rejected the request: bad_request (HTTP 400): context length exceeded"
    );
    assert!(router.flush_records(Duration::from_secs(5)).await);
}
