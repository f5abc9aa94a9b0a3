//! Bad input gets a precise error and leaves the router unchanged.

use apikeyrouter::{
    Budget, BudgetPeriod, BudgetScope, Enforcement, KeyMetadata, KeyState, Message, Objective,
    ObjectiveKind, RegisterKeyError, RequestIntent, RouteErrorKind,
};

use crate::support::{Harness, ask};

#[tokio::test]
async fn bad_registrations_are_refused_and_change_nothing() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    let err = h
        .router
        .register_key("sk-valid-key-0001", "nope", KeyMetadata::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown provider nope; register it before adding keys"
    );
    let err = h
        .router
        .register_key("   ", "openai", KeyMetadata::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegisterKeyError::Material(_)), "{err}");
    let err = h
        .router
        .register_key("sk-has space-0001", "openai", KeyMetadata::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegisterKeyError::Material(_)), "{err}");
    let err = h
        .router
        .register_key(
            "sk-valid-key-0002",
            "openai",
            KeyMetadata {
                rpm: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid key metadata: rpm must be greater than zero when set"
    );
    assert!(h.router.keys().await.unwrap().is_empty());

    let first = h
        .router
        .register_key("sk-valid-key-0003", "openai", KeyMetadata::default())
        .await
        .unwrap();
    let err = h
        .router
        .register_key("sk-valid-key-0003", "openai", KeyMetadata::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("this key material is already registered as {}", first.id)
    );
    assert_eq!(h.router.keys().await.unwrap().len(), 1);
    assert_eq!(first.key_material, "sk-...0003");
}

#[test]
fn bad_objectives_and_budgets_are_refused_precisely() {
    let err = Objective::weighted(&[(ObjectiveKind::Cost, -0.5)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "objective weight for cost is negative (-0.5); weights must be zero or more"
    );
    let err = Objective::weighted(&[(ObjectiveKind::Cost, 0.0), (ObjectiveKind::Fairness, 0.0)])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "objective weights are all zero; give at least one a positive weight"
    );
    let err = Budget::new(
        "b",
        BudgetScope::Global,
        -1.0,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "budget b has a non-positive limit; limits must be greater than zero"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_before_any_provider_call() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    h.key("openai", 1, KeyMetadata::default()).await;
    let err = h
        .router
        .route(RequestIntent::new("gpt-4o", vec![]), Objective::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind.code(), "invalid_request");
    assert_eq!(
        err.to_string(),
        "invalid request: messages must not be empty"
    );
    let err = h
        .router
        .route(
            RequestIntent::new("", vec![Message::user("x")]),
            Objective::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind.code(), "invalid_request");
    assert_eq!(sim.total_calls(), 0);
}

#[tokio::test]
async fn unknown_model_and_no_keys_are_distinguished() {
    let h = Harness::new(|b| b).await;
    h.router.register_provider_with(
        "openai",
        std::sync::Arc::new(apikeyrouter::providers::SimulatedProvider::new()),
        apikeyrouter::ProviderSettings {
            models: Some(vec!["gpt-4o".into()]),
        },
    );
    let err = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind, RouteErrorKind::NoEligibleKey(_)),
        "{err}"
    );
    let err = h
        .router
        .route(ask("llama-9000", "x"), Objective::default())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "no provider serves model llama-9000");
}

#[tokio::test]
async fn manual_state_changes_follow_the_state_machine() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    let k = h.key("openai", 1, KeyMetadata::default()).await;
    h.router
        .set_key_state(&k, KeyState::Disabled, "rotating")
        .await
        .unwrap();
    let err = h
        .router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1 disabled"), "{err}");
    let err = h
        .router
        .set_key_state(&k, KeyState::Disabled, "again")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("key {k} cannot go from disabled to disabled")
    );
    let err = h
        .router
        .set_key_state(&k, KeyState::Throttled, "x")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "state throttled cannot be set manually; use disabled or available"
    );
    h.router
        .set_key_state(&k, KeyState::Available, "rotated")
        .await
        .unwrap();
    h.router
        .route(ask("gpt-4o", "x"), Objective::default())
        .await
        .unwrap();
    let transitions = h.router.key_transitions(&k).await.unwrap();
    assert_eq!(transitions.len(), 2);
    assert_eq!(transitions[0].reason, "rotating");
}
