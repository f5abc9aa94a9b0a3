//! Streamed replies and embeddings: accounted like any request, whether the stream
//! completes or the caller goes away.

use std::time::Duration;

use apikeyrouter::providers::{Behaviour, Failure, FailurePlan};
use apikeyrouter::{EmbeddingIntent, FinishReason, KeyMetadata, Objective, Outcome};
use futures_util::StreamExt;

use crate::support::{Harness, ask};

#[tokio::test]
async fn stream_delivers_the_same_text_and_settles_usage_and_cost() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    h.key("openai", 1, KeyMetadata::default()).await;
    h.daily_hard_budget("day", 10.0).await;
    let whole = h
        .router
        .route(ask("gpt-4o", "Tell me a story"), Objective::default())
        .await
        .unwrap();

    let mut stream = h
        .router
        .route_stream(ask("gpt-4o", "Tell me a story"), Objective::default())
        .await
        .unwrap();
    let request_id = stream.request_id.clone();
    let mut text = String::new();
    let mut last = None;
    let mut n_chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&chunk.text);
        n_chunks += 1;
        if chunk.finish_reason.is_some() {
            last = Some(chunk);
        }
    }
    drop(stream);
    assert!(n_chunks > 2);
    assert_eq!(text, whole.content);
    let last = last.unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(last.usage, Some(whole.usage));

    let record = h.router.request(&request_id).await.unwrap().unwrap();
    assert_eq!(record.outcome, Outcome::Success);
    assert_eq!(record.usage, whole.usage);
    assert_eq!(record.actual_cost, whole.actual_cost);
    let spent = h.router.budgets().await.unwrap()[0].spent;
    assert_eq!(
        spent,
        whole.actual_cost.unwrap() + whole.actual_cost.unwrap()
    );
}

#[tokio::test]
async fn stream_fails_over_before_it_starts() {
    let h = Harness::new(|b| b).await;
    let sim = h.provider("openai");
    let limited = h.key("openai", 1, KeyMetadata::default()).await;
    let spare = h.key("openai", 2, KeyMetadata::default()).await;
    sim.set_behaviour(
        &limited,
        Behaviour::failing(FailurePlan::Always(Failure::RateLimited {
            retry_after: None,
        })),
    );
    let stream = h
        .router
        .route_stream(ask("gpt-4o", "hi"), Objective::default())
        .await
        .unwrap();
    assert_eq!(stream.key_id, spare);
    assert_eq!(stream.attempts.len(), 1);
    let chunks: Vec<_> = stream.collect().await;
    assert!(chunks.iter().all(Result::is_ok));
}

#[tokio::test]
async fn dropped_stream_is_still_settled_and_audited() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    h.key("openai", 1, KeyMetadata::default()).await;
    let mut stream = h
        .router
        .route_stream(ask("gpt-4o", "a long story please"), Objective::default())
        .await
        .unwrap();
    let request_id = stream.request_id.clone();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.text.is_empty());
    drop(stream);
    let mut record = None;
    for _ in 0..100 {
        record = h.router.request(&request_id).await.unwrap();
        if record.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let record = record.expect("the dropped stream was audited");
    assert!(
        matches!(&record.outcome, Outcome::Failure { code, .. } if code == "client_disconnected")
    );
    assert!(record.usage.completion_tokens > 0);
    let key = &h.router.keys().await.unwrap()[0];
    assert_eq!(key.stats.requests, 1);
    assert!(key.stats.cost > apikeyrouter::Money::ZERO);
}

#[tokio::test]
async fn embeddings_are_routed_and_costed() {
    let h = Harness::new(|b| b).await;
    h.provider("openai");
    h.key("openai", 1, KeyMetadata::default()).await;
    let intent = EmbeddingIntent {
        model: "text-embedding-3-small".into(),
        input: vec!["first text".into(), "second text".into()],
        dimensions: Some(16),
        tenant: None,
        tags: Default::default(),
    };
    let r = h.router.embed(intent, Objective::default()).await.unwrap();
    assert_eq!(r.vectors.len(), 2);
    assert!(r.vectors.iter().all(|v| v.len() == 16));
    assert_ne!(r.vectors[0], r.vectors[1]);
    assert_eq!(r.usage.prompt_tokens, 3 + 3);
    assert!(r.actual_cost.unwrap() > apikeyrouter::Money::ZERO);
    let empty = EmbeddingIntent {
        model: "text-embedding-3-small".into(),
        input: vec!["ok".into(), String::new()],
        dimensions: None,
        tenant: None,
        tags: Default::default(),
    };
    let err = h
        .router
        .embed(empty, Objective::default())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "invalid request: input[1] is empty");
}
