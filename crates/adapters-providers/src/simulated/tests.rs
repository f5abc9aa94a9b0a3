//! Tests of the simulated provider: replies, usage, injected failures, call counters
//! and timing.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apikeyrouter_application::ports::{FinishReason, ModelSet, Provider, ProviderCall};
use apikeyrouter_domain::{
    FailureKind, KeyId, KeyMaterial, Message, ModelId, QuotaObservation, RequestIntent, Timestamp,
    TokenUsage,
};

use super::{Behaviour, Failure, FailurePlan, SimulatedProvider};

fn call_with(key: &str, request: RequestIntent) -> ProviderCall {
    ProviderCall {
        key_id: KeyId::new(key),
        material: KeyMaterial::parse("sk-simulated-000001").unwrap(),
        model: request.model.clone(),
        request: Arc::new(request),
    }
}

fn call(key: &str) -> ProviderCall {
    call_with(
        key,
        RequestIntent::new("gpt-4o", vec![Message::user("Hello there, how are you?")]),
    )
}

/// Outcome of each call in turn: `None` for success, else the failure kind.
async fn outcomes(
    provider: &SimulatedProvider,
    key: &str,
    n_calls: usize,
) -> Vec<Option<FailureKind>> {
    let mut res = Vec::with_capacity(n_calls);
    for _ in 0..n_calls {
        res.push(provider.chat(call(key)).await.err().map(|e| e.kind));
    }
    res
}

#[tokio::test]
async fn success_reply_and_usage_are_deterministic() {
    let provider = SimulatedProvider::new();
    let request = RequestIntent::new(
        "gpt-4o",
        vec![
            Message::system("You are terse."),
            Message::user("Hello there, how are you?"),
        ],
    );
    let first = provider
        .chat(call_with("k1", request.clone()))
        .await
        .unwrap();
    let second = provider.chat(call_with("k2", request)).await.unwrap();

    assert_eq!(
        first.content,
        "Simulated reply from gpt-4o to: Hello there, how are you?"
    );
    assert_eq!(first.model, ModelId::new("gpt-4o"));
    assert_eq!(first.finish_reason, FinishReason::Stop);
    assert_eq!(first.quota, None);
    // System: ceil(14/4)+4 = 8; user: ceil(25/4)+4 = 11; plus 3. Reply: ceil(57/4) = 15.
    assert_eq!(
        first.usage,
        Some(TokenUsage {
            prompt_tokens: 22,
            completion_tokens: 15,
            cached_tokens: 0
        })
    );
    assert_eq!(first, second);
}

#[tokio::test]
async fn reply_quotes_at_most_forty_characters_of_the_last_user_message() {
    let provider = SimulatedProvider::new();
    let long = "é".repeat(50);
    let request = RequestIntent::new(
        "m",
        vec![
            Message::user("an earlier question"),
            Message::user(long),
            Message::new(apikeyrouter_domain::Role::Assistant, "an answer"),
        ],
    );
    let reply = provider.chat(call_with("k", request)).await.unwrap();
    assert_eq!(
        reply.content,
        format!("Simulated reply from m to: {}", "é".repeat(40))
    );
}

#[tokio::test]
async fn max_tokens_caps_completion_and_reports_length() {
    let provider = SimulatedProvider::new();
    let request = RequestIntent::new("gpt-4o", vec![Message::user("Hello there, how are you?")])
        .with_max_tokens(5);
    let reply = provider.chat(call_with("k", request)).await.unwrap();
    assert_eq!(reply.usage.unwrap().completion_tokens, 5);
    assert_eq!(reply.finish_reason, FinishReason::Length);
}

#[tokio::test]
async fn each_failure_maps_to_its_kind_status_and_retry_after() {
    let cases = [
        (
            Failure::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            },
            FailureKind::RateLimited,
            Some(429),
            Some(Duration::from_secs(30)),
        ),
        (
            Failure::RateLimited { retry_after: None },
            FailureKind::RateLimited,
            Some(429),
            None,
        ),
        (
            Failure::QuotaExhausted,
            FailureKind::QuotaExhausted,
            Some(429),
            None,
        ),
        (
            Failure::Unauthorized,
            FailureKind::Unauthorized,
            Some(401),
            None,
        ),
        (
            Failure::BadRequest,
            FailureKind::BadRequest,
            Some(400),
            None,
        ),
        (
            Failure::ServerError,
            FailureKind::ServerError,
            Some(500),
            None,
        ),
        (
            Failure::Hang(Duration::ZERO),
            FailureKind::Timeout,
            None,
            None,
        ),
    ];
    for (failure, kind, status, retry_after) in cases {
        let provider = SimulatedProvider::new()
            .with_default_behaviour(Behaviour::failing(FailurePlan::always(failure)));
        let err = provider.chat(call("k")).await.unwrap_err();
        assert_eq!(err.kind, kind, "{failure:?}");
        assert_eq!(err.status, status, "{failure:?}");
        assert_eq!(err.retry_after, retry_after, "{failure:?}");
        assert_eq!(err.quota, None, "{failure:?}");
    }
}

#[tokio::test]
async fn every_nth_fails_calls_n_2n_and_so_on() {
    let provider = SimulatedProvider::new().with_key_behaviour(
        &KeyId::new("k"),
        Behaviour::failing(FailurePlan::every_nth(3, Failure::ServerError)),
    );
    let server = Some(FailureKind::ServerError);
    assert_eq!(
        outcomes(&provider, "k", 7).await,
        [None, None, server, None, None, server, None]
    );
}

#[tokio::test]
async fn every_zeroth_never_fails() {
    let provider = SimulatedProvider::new().with_default_behaviour(Behaviour::failing(
        FailurePlan::every_nth(0, Failure::ServerError),
    ));
    assert_eq!(outcomes(&provider, "k", 3).await, [None, None, None]);
}

#[tokio::test]
async fn first_n_fails_then_succeeds() {
    let provider = SimulatedProvider::new().with_key_behaviour(
        &KeyId::new("k"),
        Behaviour::failing(FailurePlan::first_n(2, Failure::Unauthorized)),
    );
    let auth = Some(FailureKind::Unauthorized);
    assert_eq!(outcomes(&provider, "k", 4).await, [auth, auth, None, None]);
}

#[tokio::test]
async fn fail_once_then_ok_fails_only_the_first_call() {
    let provider = SimulatedProvider::new().with_default_behaviour(Behaviour::failing(
        FailurePlan::fail_once_then_ok(Failure::QuotaExhausted),
    ));
    // Plans count per key: each key's first call fails.
    let quota = Some(FailureKind::QuotaExhausted);
    assert_eq!(outcomes(&provider, "a", 2).await, [quota, None]);
    assert_eq!(outcomes(&provider, "b", 2).await, [quota, None]);
}

#[tokio::test]
async fn set_behaviour_takes_effect_and_restarts_the_plan() {
    let provider = SimulatedProvider::new();
    let key = KeyId::new("k");
    assert_eq!(outcomes(&provider, "k", 2).await, [None, None]);
    provider.set_behaviour(
        &key,
        Behaviour::failing(FailurePlan::first_n(1, Failure::ServerError)),
    );
    assert_eq!(
        outcomes(&provider, "k", 2).await,
        [Some(FailureKind::ServerError), None]
    );
    provider.set_behaviour(&key, Behaviour::ok());
    assert_eq!(outcomes(&provider, "k", 1).await, [None]);
    assert_eq!(provider.calls(&key), 5);
}

#[tokio::test]
async fn counters_track_calls_per_key_and_in_total() {
    let provider = SimulatedProvider::new().with_key_behaviour(
        &KeyId::new("throttled"),
        Behaviour::failing(FailurePlan::always(Failure::RateLimited {
            retry_after: None,
        })),
    );
    outcomes(&provider, "a", 3).await;
    outcomes(&provider, "throttled", 2).await;
    assert_eq!(provider.calls(&KeyId::new("a")), 3);
    assert_eq!(provider.calls(&KeyId::new("throttled")), 2);
    assert_eq!(provider.calls(&KeyId::new("never-called")), 0);
    assert_eq!(provider.total_calls(), 5);
}

#[tokio::test]
async fn reported_quota_comes_with_replies_and_errors() {
    let observation = QuotaObservation {
        limit_requests: Some(100),
        remaining_requests: Some(7),
        reset_requests_at: Some(Timestamp::from_millis(60_000)),
        ..QuotaObservation::default()
    };
    let provider = SimulatedProvider::new()
        .with_key_behaviour(
            &KeyId::new("ok"),
            Behaviour::ok().reporting_quota(observation),
        )
        .with_key_behaviour(
            &KeyId::new("bad"),
            Behaviour::failing(FailurePlan::always(Failure::ServerError))
                .reporting_quota(observation),
        );
    assert_eq!(
        provider.chat(call("ok")).await.unwrap().quota,
        Some(observation)
    );
    assert_eq!(
        provider.chat(call("bad")).await.unwrap_err().quota,
        Some(observation)
    );
}

#[tokio::test(start_paused = true)]
async fn hang_outlasts_a_shorter_timeout() {
    let provider = SimulatedProvider::new().with_default_behaviour(Behaviour::failing(
        FailurePlan::always(Failure::Hang(Duration::from_millis(200))),
    ));
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_millis(50), provider.chat(call("k"))).await;
    assert!(res.is_err(), "the hang returned before the timeout");
    assert_eq!(started.elapsed(), Duration::from_millis(50));

    // Without a timeout it gives up after the hang, as a timeout.
    let err = provider.chat(call("k")).await.unwrap_err();
    assert_eq!(err.kind, FailureKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn latency_delays_the_reply_and_key_latency_overrides_it() {
    let provider = SimulatedProvider::new()
        .with_latency(Duration::from_millis(30))
        .with_key_behaviour(
            &KeyId::new("slow"),
            Behaviour::ok().with_latency(Duration::from_millis(100)),
        );
    let started = tokio::time::Instant::now();
    provider.chat(call("k")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(30));
    provider.chat(call("slow")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(130));
}

/// No runtime at all: a zero-latency call must complete on its first poll without
/// touching the timer.
#[test]
fn zero_latency_is_ready_on_first_poll() {
    let provider = SimulatedProvider::new();
    let mut reply = provider.chat(call("k"));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(reply.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));

    let failing = SimulatedProvider::new().with_default_behaviour(Behaviour::failing(
        FailurePlan::always(Failure::ServerError),
    ));
    let mut error = failing.chat(call("k"));
    assert!(matches!(error.as_mut().poll(&mut cx), Poll::Ready(Err(_))));
}

#[test]
fn kind_and_models() {
    let any = SimulatedProvider::new();
    assert_eq!(any.kind(), "simulated");
    assert_eq!(any.default_models(), ModelSet::Any);
    let only = SimulatedProvider::new().with_models(vec![ModelId::new("gpt-4o")]);
    assert_eq!(
        only.default_models(),
        ModelSet::Only(vec![ModelId::new("gpt-4o")])
    );
}
