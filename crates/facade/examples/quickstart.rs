//! A tour of ApiKeyRouter on simulated providers: no database, no keys, no network.
//!
//! Run with `cargo run --release -p apikeyrouter --example quickstart`.
//! It registers three providers and six keys (one of them rate limited, one with a
//! small rpm allowance), sets a budget and a fallback chain, routes requests under
//! different objectives, and prints which key served each request, what it cost, why
//! that key was chosen, and what the router learned.

use std::sync::Arc;
use std::time::Duration;

use apikeyrouter::providers::{Behaviour, Failure, FailurePlan, SimulatedProvider};
use apikeyrouter::{
    ApiKeyRouter, Budget, BudgetPeriod, BudgetScope, DowngradeRule, Enforcement, KeyMetadata,
    Message, ModelId, Objective, ObjectiveKind, RequestIntent, RouteResponse, TenantId,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let router = ApiKeyRouter::builder()
        .fallback("gpt-4o", ["claude-sonnet-4-5", "gemini-2.5-pro"])
        .downgrade(DowngradeRule {
            from: ModelId::new("gpt-4o"),
            to: ModelId::new("gpt-4o-mini"),
            max_prompt_tokens: 50,
            max_messages: 2,
        })
        .build()
        .await?;

    let openai = Arc::new(SimulatedProvider::new().with_latency(Duration::from_millis(2)));
    let anthropic = Arc::new(SimulatedProvider::new().with_latency(Duration::from_millis(3)));
    let gemini = Arc::new(SimulatedProvider::new().with_latency(Duration::from_millis(1)));
    router.register_provider("openai", openai.clone());
    router.register_provider("anthropic", anthropic);
    router.register_provider("gemini", gemini);

    let gpt = || KeyMetadata {
        models: Some(vec!["gpt-4o".into(), "gpt-4o-mini".into()]),
        ..Default::default()
    };
    let healthy = router
        .register_key("sk-demo-openai-000001", "openai", gpt())
        .await?;
    let limited = router
        .register_key("sk-demo-openai-000002", "openai", gpt())
        .await?;
    let small = router
        .register_key(
            "sk-demo-openai-000003",
            "openai",
            KeyMetadata {
                rpm: Some(3),
                ..gpt()
            },
        )
        .await?;
    router
        .register_key(
            "sk-ant-demo-000001",
            "anthropic",
            KeyMetadata {
                models: Some(vec!["claude-sonnet-4-5".into()]),
                ..Default::default()
            },
        )
        .await?;
    router
        .register_key(
            "AIza-demo-gemini-01",
            "gemini",
            KeyMetadata {
                models: Some(vec!["gemini-2.5-pro".into()]),
                ..Default::default()
            },
        )
        .await?;
    let tenant_key = router
        .register_key(
            "sk-demo-customer-a-01",
            "openai",
            KeyMetadata {
                tenant: Some(TenantId::new("customer-a")),
                ..gpt()
            },
        )
        .await?;
    openai.set_behaviour(
        &limited.id,
        Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
        })),
    );
    router
        .add_budget(Budget::new(
            "monthly",
            BudgetScope::Global,
            50.0,
            BudgetPeriod::Monthly,
            Enforcement::Hard,
        )?)
        .await?;

    println!("keys:");
    for key in router.keys().await? {
        println!(
            "  {}  {:<9}  {}  {:?}",
            key.id, key.provider_id, key.key_material, key.state
        );
    }

    println!("\nten requests, fairness (one key answers 429, one allows 3 requests per minute):");
    println!(
        "  {:<32} {:<21} {:<9} {:<12} {:>11} {:>11}  attempts",
        "request", "key", "provider", "model", "estimated", "actual"
    );
    let question =
        "Summarise the causes of the French Revolution in three short paragraphs for a student.";
    for _ in 0..10 {
        let r = router
            .route(ask(question).with_max_tokens(300), ObjectiveKind::Fairness)
            .await?;
        print_row(&r);
    }

    println!("\ncost objective, short prompt (downgraded to a cheaper model):");
    let r = router.route(ask("Hi!"), ObjectiveKind::Cost).await?;
    print_row(&r);
    println!("  why: {}", r.decision);

    println!("\nonly claude allowed (a constraint), so the fallback chain decides:");
    let only_claude = Objective::primary(ObjectiveKind::Reliability).with_constraints(
        apikeyrouter::Constraints {
            allowed_models: Some(vec!["claude-sonnet-4-5".into()]),
            ..Default::default()
        },
    )?;
    let r = router.route(ask(question), only_claude).await?;
    print_row(&r);

    println!("\ntenant customer-a routes only to its own key:");
    let r = router
        .route(ask(question).for_tenant("customer-a"), Objective::default())
        .await?;
    print_row(&r);
    assert_eq!(r.key_id, tenant_key.id);

    println!("\nwhat the router learned:");
    let info = router.key(&limited.id).await?;
    println!(
        "  {} is {:?} until {:?}: {}",
        info.id, info.state, info.cooldown_until, info.state_reason
    );
    for t in router.key_transitions(&limited.id).await? {
        println!(
            "    transition {:?} -> {:?} ({:?}): {}",
            t.from, t.to, t.trigger, t.reason
        );
    }
    for id in [&healthy.id, &small.id] {
        let q = router.quota(id).await?;
        let prediction = q.prediction.map_or("no limit declared".to_owned(), |p| {
            format!(
                "{:?} runs out at {:?} (confidence {:.2})",
                p.window, p.exhausts_at, p.confidence
            )
        });
        println!(
            "  {id}: capacity {:?}, uncertainty {:?}; {prediction}",
            q.capacity, q.uncertainty
        );
    }
    for b in router.budgets().await? {
        println!(
            "  budget {}: spent {} of {}, {} remaining",
            b.budget_id, b.spent, b.limit, b.remaining
        );
    }

    println!("\naudit record of the last request (no key material, no message content):");
    if let Some(record) = router.request(&r.request_id).await? {
        println!(
            "  {} tenant={:?} key={:?} model={:?} tokens={} cost={:?} outcome={:?}",
            record.request_id,
            record.tenant.map(|t| t.to_string()),
            record.key_id.map(|k| k.to_string()),
            record.model.map(|m| m.to_string()),
            record.usage.total(),
            record.actual_cost,
            record.outcome
        );
    }
    Ok(())
}

fn ask(text: &str) -> RequestIntent {
    RequestIntent::new("gpt-4o", vec![Message::user(text)])
}

fn print_row(r: &RouteResponse) {
    let money =
        |m: Option<apikeyrouter::Money>| m.map_or("no price".to_owned(), |m| format!("{m}"));
    println!(
        "  {:<32} {:<21} {:<9} {:<12} {:>11} {:>11}  {}",
        r.request_id,
        r.key_id,
        r.provider,
        r.model,
        money(r.estimated_cost),
        money(r.actual_cost),
        r.attempts.len()
    );
}
