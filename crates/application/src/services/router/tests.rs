//! Unit tests of the routing use case's pure helpers. Multi-step routing scenarios run
//! against the in-memory store in the workspace's `tests` crate.

use std::collections::HashMap;

use apikeyrouter_domain::cost::DowngradeRule;
use apikeyrouter_domain::{Constraints, Message};

use super::plan::{model_chain, resolve_tenant, validate_chat as validate};
use crate::services::settings::RouterSettings;
use apikeyrouter_domain::cost::TokenEstimate;
use apikeyrouter_domain::{ModelId, Objective, ObjectiveKind, RequestIntent, TenantId};

fn intent(model: &str, text: &str) -> RequestIntent {
    RequestIntent::new(model, vec![Message::user(text)])
}

#[test]
fn invalid_requests_are_named_precisely() {
    let empty = RequestIntent::new("gpt-4o", vec![]);
    assert_eq!(
        validate(&empty).unwrap_err().to_string(),
        "invalid request: messages must not be empty"
    );
    let no_model = intent(" ", "hi");
    assert_eq!(
        validate(&no_model).unwrap_err().to_string(),
        "invalid request: model must not be empty"
    );
    let mut hot = intent("gpt-4o", "hi");
    hot.temperature = Some(3.5);
    assert_eq!(
        validate(&hot).unwrap_err().to_string(),
        "invalid request: temperature must be between 0 and 2, got 3.5"
    );
    let mut repetitive = intent("gpt-4o", "hi");
    repetitive.frequency_penalty = Some(-2.5);
    assert_eq!(
        validate(&repetitive).unwrap_err().to_string(),
        "invalid request: frequency_penalty must be between -2 and 2, got -2.5"
    );
    repetitive.frequency_penalty = Some(-2.0);
    repetitive.presence_penalty = Some(2.1);
    assert_eq!(
        validate(&repetitive).unwrap_err().to_string(),
        "invalid request: presence_penalty must be between -2 and 2, got 2.1"
    );
    repetitive.presence_penalty = Some(2.0);
    assert!(validate(&repetitive).is_ok());
    assert!(validate(&intent("gpt-4o", "hi").with_max_tokens(0)).is_err());
    assert!(validate(&intent("gpt-4o", "hi")).is_ok());
}

#[test]
fn tenant_conflict_is_rejected() {
    let objective = Objective::default()
        .with_constraints(Constraints {
            required_tenant: Some(TenantId::new("a")),
            ..Constraints::default()
        })
        .unwrap();
    let for_b = intent("m", "hi").for_tenant("b");
    assert!(resolve_tenant(for_b.tenant.as_ref(), &objective).is_err());
    assert_eq!(
        resolve_tenant(None, &objective).unwrap(),
        Some(TenantId::new("a"))
    );
}

#[test]
fn chain_downgrades_short_prompts_under_cost_and_keeps_fallbacks() {
    let settings = RouterSettings {
        fallbacks: HashMap::from([(
            ModelId::new("gpt-4o"),
            vec![
                ModelId::new("claude-sonnet-4-5"),
                ModelId::new("gemini-2.5-pro"),
            ],
        )]),
        downgrades: vec![DowngradeRule {
            from: ModelId::new("gpt-4o"),
            to: ModelId::new("gpt-4o-mini"),
            max_prompt_tokens: 100,
            max_messages: 4,
        }],
        ..RouterSettings::default()
    };
    let short = intent("gpt-4o", "hi");
    let est = TokenEstimate::of(&short);
    let cost = Objective::primary(ObjectiveKind::Cost);
    let names = |c: Vec<ModelId>| c.iter().map(|m| m.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(model_chain(&short, &cost, &settings, &est)),
        [
            "gpt-4o-mini",
            "gpt-4o",
            "claude-sonnet-4-5",
            "gemini-2.5-pro"
        ]
    );
    let fairness = Objective::default();
    assert_eq!(
        names(model_chain(&short, &fairness, &settings, &est)),
        ["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro"]
    );
    let long = intent("gpt-4o", &"x".repeat(2_000));
    assert_eq!(
        model_chain(&long, &cost, &settings, &TokenEstimate::of(&long))[0].as_str(),
        "gpt-4o"
    );
    let only_claude = Objective::default()
        .with_constraints(Constraints {
            allowed_models: Some(vec![ModelId::new("claude-sonnet-4-5")]),
            ..Constraints::default()
        })
        .unwrap();
    assert_eq!(
        names(model_chain(&short, &only_claude, &settings, &est)),
        ["claude-sonnet-4-5"]
    );
}
