//! One conformance suite every provider adapter passes, against local mock servers
//! that answer in each provider's documented wire format: a plain reply, a stream
//! with usage at the end, each error class with its HTTP status and body, a
//! malformed body, and a hang. Plus the facade failing over from a rate-limited
//! OpenAI key to an Anthropic fallback over real HTTP.

use std::sync::Arc;
use std::time::Duration;

use apikeyrouter::{
    FailureKind, KeyId, KeyMetadata, Message, ObjectiveKind, Provider, ProviderCall, RequestIntent,
};
use apikeyrouter_adapters_providers::http::HttpSettings;
use apikeyrouter_adapters_providers::{
    AnthropicProvider, AzureSettings, GeminiProvider, OpenAiCompatibleProvider, OpenAiProvider,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// How one adapter looks on the wire.
struct Fixture {
    name: &'static str,
    model: &'static str,
    /// Builds the adapter against the mock server's URL.
    build: fn(&str, HttpSettings) -> Arc<dyn Provider>,
    /// Path of a plain call, and of a streamed one.
    chat_path: &'static str,
    stream_path: &'static str,
    plain: Value,
    stream: &'static str,
    rate_limit_body: Value,
    auth_body: Value,
    bad_request_body: Value,
}

fn settings() -> HttpSettings {
    HttpSettings {
        first_byte_timeout: Duration::from_millis(300),
        ..HttpSettings::default()
    }
}

const OPENAI_STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
    "data: [DONE]\n\n",
);

const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\":\"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

const GEMINI_STREAM: &str = concat!(
    "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hel\"}]}}],\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":1,\"totalTokenCount\":6}}\r\n\r\n",
    "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"lo\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":2,\"totalTokenCount\":7}}\r\n\r\n",
);

fn openai_plain(model: &str) -> Value {
    json!({"id":"chatcmpl-1","object":"chat.completion","created":1,"model":model,
        "choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}})
}

fn openai_error(code: &str, kind: &str) -> Value {
    json!({"error":{"message":"simulated","type":kind,"param":null,"code":code}})
}

fn anthropic_error(kind: &str) -> Value {
    json!({"type":"error","error":{"type":kind,"message":"simulated"}})
}

fn gemini_error(code: u16, status: &str, message: &str) -> Value {
    json!({"error":{"code":code,"message":message,"status":status}})
}

fn fixtures() -> Vec<Fixture> {
    vec![
        Fixture {
            name: "openai",
            model: "gpt-4o",
            build: |url, s| Arc::new(OpenAiProvider::new(format!("{url}/v1"), s).unwrap()),
            chat_path: "/v1/chat/completions",
            stream_path: "/v1/chat/completions",
            plain: openai_plain("gpt-4o"),
            stream: OPENAI_STREAM,
            rate_limit_body: openai_error("rate_limit_exceeded", "requests"),
            auth_body: openai_error("invalid_api_key", "invalid_request_error"),
            bad_request_body: openai_error("context_length_exceeded", "invalid_request_error"),
        },
        Fixture {
            name: "openai-compatible",
            model: "llama-3.1-8b",
            build: |url, s| {
                Arc::new(OpenAiCompatibleProvider::new(format!("{url}/openai/v1"), s).unwrap())
            },
            chat_path: "/openai/v1/chat/completions",
            stream_path: "/openai/v1/chat/completions",
            plain: openai_plain("llama-3.1-8b"),
            stream: OPENAI_STREAM,
            rate_limit_body: openai_error("rate_limit_exceeded", "requests"),
            auth_body: openai_error("invalid_api_key", "invalid_request_error"),
            bad_request_body: openai_error("invalid_request", "invalid_request_error"),
        },
        Fixture {
            name: "azure-openai",
            model: "gpt-4o",
            build: |url, s| {
                Arc::new(
                    OpenAiCompatibleProvider::azure(url, AzureSettings::new("2024-10-21"), s)
                        .unwrap(),
                )
            },
            chat_path: "/openai/deployments/gpt-4o/chat/completions",
            stream_path: "/openai/deployments/gpt-4o/chat/completions",
            plain: openai_plain("gpt-4o"),
            stream: OPENAI_STREAM,
            rate_limit_body: openai_error("429", "requests"),
            auth_body: openai_error("401", "invalid_request_error"),
            bad_request_body: openai_error("invalid_request", "invalid_request_error"),
        },
        Fixture {
            name: "anthropic",
            model: "claude-sonnet-4-5",
            build: |url, s| Arc::new(AnthropicProvider::new(url, s).unwrap()),
            chat_path: "/v1/messages",
            stream_path: "/v1/messages",
            plain: json!({"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5",
                "content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn","stop_sequence":null,
                "usage":{"input_tokens":5,"output_tokens":2}}),
            stream: ANTHROPIC_STREAM,
            rate_limit_body: anthropic_error("rate_limit_error"),
            auth_body: anthropic_error("authentication_error"),
            bad_request_body: anthropic_error("invalid_request_error"),
        },
        Fixture {
            name: "gemini",
            model: "gemini-2.5-flash",
            build: |url, s| Arc::new(GeminiProvider::new(format!("{url}/v1beta"), s).unwrap()),
            chat_path: "/v1beta/models/gemini-2.5-flash:generateContent",
            stream_path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            plain: json!({"candidates":[{"content":{"role":"model","parts":[{"text":"Hello"}]},"finishReason":"STOP"}],
                "usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2,"totalTokenCount":7}}),
            stream: GEMINI_STREAM,
            rate_limit_body: gemini_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
            ),
            auth_body: gemini_error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers.",
            ),
            bad_request_body: gemini_error(
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
            ),
        },
    ]
}

fn call(model: &str) -> ProviderCall {
    ProviderCall {
        key_id: KeyId::new("conformance-key"),
        material: apikeyrouter::domain::KeyMaterial::parse("sk-conformance-secret-0001").unwrap(),
        model: model.into(),
        request: Arc::new(RequestIntent::new(
            model,
            vec![Message::system("Be brief."), Message::user("Say hello")],
        )),
    }
}

async fn mount(server: &MockServer, p: &str, response: ResponseTemplate) {
    server.reset().await;
    Mock::given(method("POST"))
        .and(path(p))
        .respond_with(response)
        .mount(server)
        .await;
}

async fn check(f: &Fixture) {
    let server = MockServer::start().await;
    let provider = (f.build)(&server.uri(), settings());

    // A plain reply.
    mount(
        &server,
        f.chat_path,
        ResponseTemplate::new(200).set_body_json(&f.plain),
    )
    .await;
    let reply = provider
        .chat(call(f.model))
        .await
        .unwrap_or_else(|e| panic!("{}: plain reply failed: {e}", f.name));
    assert_eq!(reply.content, "Hello", "{}", f.name);
    assert_eq!(
        reply.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((5, 2)),
        "{}",
        f.name
    );
    assert_eq!(
        reply.finish_reason,
        apikeyrouter::FinishReason::Stop,
        "{}",
        f.name
    );
    let sent = &server.received_requests().await.unwrap()[0];
    let auth: Vec<String> = sent
        .headers
        .iter()
        .map(|(_, v)| v.to_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        auth.iter()
            .any(|v| v.contains("sk-conformance-secret-0001")),
        "{}: the key is not in an auth header",
        f.name
    );
    assert!(
        !sent.url.as_str().contains("sk-conformance-secret"),
        "{}: the key is in the URL",
        f.name
    );

    // A stream: text in pieces, usage and finish reason at the end.
    mount(
        &server,
        f.stream_path,
        ResponseTemplate::new(200).set_body_raw(f.stream, "text/event-stream"),
    )
    .await;
    let started = provider
        .chat_stream(call(f.model))
        .await
        .unwrap_or_else(|e| panic!("{}: stream failed to start: {e}", f.name));
    let chunks: Vec<_> = started.chunks.collect().await;
    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    for c in chunks {
        let c = c.unwrap_or_else(|e| panic!("{}: stream chunk failed: {e}", f.name));
        text.push_str(&c.text);
        usage = c.usage.or(usage);
        finish = c.finish_reason.or(finish);
    }
    assert_eq!(text, "Hello", "{}", f.name);
    assert_eq!(usage.map(|u| u.completion_tokens), Some(2), "{}", f.name);
    assert_eq!(finish, Some(apikeyrouter::FinishReason::Stop), "{}", f.name);

    // Error classes.
    let cases = [
        (429, f.rate_limit_body.clone(), FailureKind::RateLimited),
        (
            if f.name == "gemini" { 403 } else { 401 },
            f.auth_body.clone(),
            FailureKind::Unauthorized,
        ),
        (400, f.bad_request_body.clone(), FailureKind::BadRequest),
        (
            500,
            json!({"error": {"message": "internal", "type": "server_error"}}),
            FailureKind::ServerError,
        ),
        (
            503,
            json!({"error": {"message": "overloaded"}}),
            FailureKind::ServerError,
        ),
    ];
    for (status, body, kind) in cases {
        let mut response = ResponseTemplate::new(status).set_body_json(&body);
        if status == 429 {
            response = response.insert_header("retry-after", "7");
        }
        mount(&server, f.chat_path, response).await;
        let err = provider.chat(call(f.model)).await.expect_err("an error");
        assert_eq!(
            err.kind, kind,
            "{}: HTTP {status} classified as {:?}",
            f.name, err.kind
        );
        assert_eq!(err.status, Some(status), "{}", f.name);
        if status == 429 {
            assert_eq!(err.retry_after, Some(Duration::from_secs(7)), "{}", f.name);
        }
        assert!(
            !err.message.contains("sk-conformance-secret"),
            "{}: key in error message",
            f.name
        );
    }

    // Malformed body and a hang: classified errors, no panic.
    mount(
        &server,
        f.chat_path,
        ResponseTemplate::new(200).set_body_raw("{\"choices\": [", "application/json"),
    )
    .await;
    let err = provider.chat(call(f.model)).await.expect_err("malformed");
    assert!(
        err.kind.is_retryable(),
        "{}: malformed body should fail over, got {:?}",
        f.name,
        err.kind
    );
    mount(
        &server,
        f.chat_path,
        ResponseTemplate::new(200)
            .set_body_json(&f.plain)
            .set_delay(Duration::from_secs(3)),
    )
    .await;
    let err = provider.chat(call(f.model)).await.expect_err("hang");
    assert_eq!(err.kind, FailureKind::Timeout, "{}", f.name);
}

#[tokio::test]
async fn every_adapter_passes_the_conformance_suite() {
    for f in fixtures() {
        check(&f).await;
    }
}

/// Through the facade: OpenAI answers 429, the fallback chain moves to Anthropic,
/// the caller gets a normal reply, and the OpenAI key is throttled for Retry-After.
#[tokio::test]
async fn rate_limited_openai_key_fails_over_to_anthropic_fallback() {
    let openai = MockServer::start().await;
    let anthropic = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "20")
                .insert_header("x-ratelimit-limit-requests", "500")
                .insert_header("x-ratelimit-remaining-requests", "0")
                .insert_header("x-ratelimit-reset-requests", "20s")
                .set_body_json(openai_error("rate_limit_exceeded", "requests")),
        )
        .mount(&openai)
        .await;
    let fixture = &fixtures()[3];
    Mock::given(method("POST"))
        .and(path_regex("^/v1/messages$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&fixture.plain))
        .mount(&anthropic)
        .await;

    let router = apikeyrouter::ApiKeyRouter::builder()
        .fallback("gpt-4o", ["claude-sonnet-4-5"])
        .build()
        .await
        .unwrap();
    router.register_provider(
        "openai",
        Arc::new(OpenAiProvider::new(format!("{}/v1", openai.uri()), settings()).unwrap()),
    );
    router.register_provider(
        "anthropic",
        Arc::new(AnthropicProvider::new(anthropic.uri(), settings()).unwrap()),
    );
    let o = router
        .register_key("sk-openai-live-0001", "openai", KeyMetadata::default())
        .await
        .unwrap();
    let a = router
        .register_key("sk-ant-live-0001", "anthropic", KeyMetadata::default())
        .await
        .unwrap();

    let r = router
        .route(
            RequestIntent::new("gpt-4o", vec![Message::user("hi")]),
            ObjectiveKind::Reliability,
        )
        .await
        .unwrap();
    assert_eq!(r.content, "Hello");
    assert_eq!(r.key_id, a.id);
    assert_eq!(r.model.as_str(), "claude-sonnet-4-5");
    assert_eq!(r.attempts.len(), 2);
    assert_eq!(r.attempts[0].failure, Some(FailureKind::RateLimited));
    assert_eq!(r.attempts[0].status, Some(429));
    let info = router.key(&o.id).await.unwrap();
    assert_eq!(info.state, apikeyrouter::KeyState::Throttled);
    let until = info.cooldown_until.unwrap();
    let throttled_for = until.as_millis() - info.stats.last_used.unwrap().as_millis();
    assert!(
        (19_000..=21_000).contains(&throttled_for),
        "cooldown {throttled_for} ms should honour Retry-After: 20"
    );
    let quota = router.quota(&o.id).await.unwrap();
    assert_eq!(
        quota.uncertainty,
        apikeyrouter::Uncertainty::Low,
        "the rate-limit headers were applied"
    );

    // While throttled, the OpenAI key gets no traffic: the next request goes straight to Anthropic.
    let r = router
        .route(
            RequestIntent::new("gpt-4o", vec![Message::user("again")]),
            ObjectiveKind::Reliability,
        )
        .await
        .unwrap();
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(openai.received_requests().await.unwrap().len(), 1);
}
