//! Tests of the OpenAI adapter against local wiremock servers with fixtures in OpenAI's
//! documented response shapes (`tests-data/openai/`).

use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_application::ports::{
    ChatChunk, EmbeddingCall, FinishReason, ModelSet, Provider, ProviderCall, ProviderError,
    ToolCallDelta,
};
use apikeyrouter_domain::{
    FailureKind, Image, KeyId, KeyMaterial, Message, ModelId, RequestIntent, ResponseFormat,
    TokenUsage, ToolCall, ToolChoice, ToolDefinition,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::OpenAiProvider;
use crate::http::HttpSettings;

/// The key used in every test; no error message may contain it.
pub(crate) const KEY: &str = "sk-test-secret-0000000000007890";

pub(crate) const CHAT_COMPLETION: &str =
    include_str!("../../tests-data/openai/chat_completion.json");
const CHAT_TOOL_CALLS: &str =
    include_str!("../../tests-data/openai/chat_completion_tool_calls.json");
pub(crate) const STREAM_TEXT: &str = include_str!("../../tests-data/openai/stream_text.sse");
const STREAM_TOOL_CALLS: &str = include_str!("../../tests-data/openai/stream_tool_calls.sse");
pub(crate) const EMBEDDINGS: &str = include_str!("../../tests-data/openai/embeddings.json");
pub(crate) const MODELS: &str = include_str!("../../tests-data/openai/models.json");
pub(crate) const ERROR_RATE_LIMIT: &str =
    include_str!("../../tests-data/openai/error_rate_limit.json");
const ERROR_INSUFFICIENT_QUOTA: &str =
    include_str!("../../tests-data/openai/error_insufficient_quota.json");
const ERROR_INVALID_API_KEY: &str =
    include_str!("../../tests-data/openai/error_invalid_api_key.json");
const ERROR_CONTEXT_LENGTH: &str =
    include_str!("../../tests-data/openai/error_context_length.json");
const ERROR_SERVER: &str = include_str!("../../tests-data/openai/error_server.json");

pub(crate) fn material() -> KeyMaterial {
    KeyMaterial::parse(KEY).unwrap()
}

pub(crate) fn call(model: &str, request: RequestIntent) -> ProviderCall {
    ProviderCall {
        key_id: KeyId::new("key-1"),
        material: material(),
        model: ModelId::new(model),
        request: Arc::new(request),
    }
}

pub(crate) fn hello(model: &str) -> ProviderCall {
    call(
        model,
        RequestIntent::new(model, vec![Message::user("Say hello")]),
    )
}

pub(crate) fn json_body(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "application/json")
}

pub(crate) fn sse_body(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")
}

fn provider(server: &MockServer) -> OpenAiProvider {
    OpenAiProvider::new(format!("{}/v1", server.uri()), HttpSettings::default()).unwrap()
}

/// The JSON bodies the server received, in order.
pub(crate) async fn received_bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).unwrap())
        .collect()
}

/// Collects a stream to the end, asserting it yields no error.
pub(crate) async fn collect_ok(provider: &dyn Provider, call: ProviderCall) -> Vec<ChatChunk> {
    let start = provider.chat_stream(call).await.unwrap();
    start
        .chunks
        .map(|item| item.unwrap())
        .collect::<Vec<_>>()
        .await
}

pub(crate) fn assert_no_key(error: &ProviderError) {
    assert!(!error.message.contains(KEY), "key leaked: {error}");
    assert!(
        !error.message.contains("0000000000007890"),
        "key leaked: {error}"
    );
}

fn full_intent() -> RequestIntent {
    let mut user = Message::user("What is in these images?");
    user.images = vec![
        Image::Url {
            url: "https://example.com/cat.png".to_owned(),
        },
        Image::Base64 {
            media_type: "image/png".to_owned(),
            data: "iVBORw0KGgo=".to_owned(),
        },
    ];
    let mut assistant = Message::assistant("");
    assistant.tool_calls = vec![ToolCall {
        id: "call_1".to_owned(),
        name: "get_weather".to_owned(),
        arguments: r#"{"location":"Paris"}"#.to_owned(),
    }];
    let mut intent = RequestIntent::new(
        "gpt-4o",
        vec![
            Message::system("You are terse."),
            user,
            assistant,
            Message::tool_result("call_1", "22C and sunny"),
        ],
    )
    .with_max_tokens(256);
    intent.temperature = Some(0.5);
    intent.top_p = Some(0.25);
    intent.seed = Some(42);
    intent.presence_penalty = Some(0.5);
    intent.frequency_penalty = Some(-0.25);
    intent.parallel_tool_calls = Some(false);
    intent.end_user = Some("user-1234".to_owned());
    intent.stop = vec!["\n\n".to_owned()];
    intent.tools = vec![ToolDefinition {
        name: "get_weather".to_owned(),
        description: Some("Current weather".to_owned()),
        parameters: r#"{"type":"object","properties":{"location":{"type":"string"}},"required":["location"]}"#.to_owned(),
    }];
    intent.tool_choice = Some(ToolChoice::Function {
        name: "get_weather".to_owned(),
    });
    intent.response_format = Some(ResponseFormat::JsonSchema {
        name: "answer".to_owned(),
        schema: r#"{"type":"object","properties":{"text":{"type":"string"}}}"#.to_owned(),
    });
    intent
}

#[tokio::test]
async fn chat_sends_the_translated_request_and_maps_the_reply() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(
            json_body(CHAT_COMPLETION)
                .insert_header("x-ratelimit-limit-requests", "500")
                .insert_header("x-ratelimit-remaining-requests", "499")
                .insert_header("x-ratelimit-reset-requests", "120ms")
                .insert_header("x-ratelimit-remaining-tokens", "29000"),
        )
        .expect(1)
        .mount(&server)
        .await;

    let reply = provider(&server)
        .chat(call("gpt-4o", full_intent()))
        .await
        .unwrap();

    assert_eq!(reply.content, "Hello! How can I assist you today?");
    assert_eq!(reply.model, ModelId::new("gpt-4o-2024-08-06"));
    assert_eq!(reply.finish_reason, FinishReason::Stop);
    assert!(reply.tool_calls.is_empty());
    assert_eq!(
        reply.usage,
        Some(TokenUsage {
            prompt_tokens: 19,
            completion_tokens: 10,
            cached_tokens: 4,
        })
    );
    let quota = reply.quota.unwrap();
    assert_eq!(quota.limit_requests, Some(500));
    assert_eq!(quota.remaining_requests, Some(499));
    assert_eq!(quota.remaining_tokens, Some(29_000));
    assert!(quota.reset_requests_at.is_some());

    let bodies = received_bodies(&server).await;
    assert_eq!(
        bodies[0],
        json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in these images?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}
                ]},
                {"role": "tool", "content": "22C and sunny", "tool_call_id": "call_1"}
            ],
            "max_tokens": 256,
            "temperature": 0.5,
            "top_p": 0.25,
            "seed": 42,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.25,
            "parallel_tool_calls": false,
            "user": "user-1234",
            "stop": ["\n\n"],
            "tools": [{"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]}
            }}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"text": {"type": "string"}}},
                "strict": true
            }}
        })
    );
}

#[tokio::test]
async fn reasoning_models_get_max_completion_tokens() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(CHAT_COMPLETION))
        .mount(&server)
        .await;
    let provider = provider(&server);
    let mut intent = RequestIntent::new("o3-mini", vec![Message::user("hi")]).with_max_tokens(99);
    intent.response_format = Some(ResponseFormat::JsonObject);
    intent.tool_choice = Some(ToolChoice::Required);
    // Without tools OpenAI refuses `parallel_tool_calls`: it is not sent.
    intent.parallel_tool_calls = Some(false);
    provider
        .chat(call("o3-mini", intent.clone()))
        .await
        .unwrap();
    provider.chat(call("gpt-4o-mini", intent)).await.unwrap();

    let bodies = received_bodies(&server).await;
    assert_eq!(bodies[0]["max_completion_tokens"], json!(99));
    assert!(bodies[0].get("max_tokens").is_none(), "{}", bodies[0]);
    assert_eq!(bodies[0]["response_format"], json!({"type": "json_object"}));
    assert_eq!(bodies[0]["tool_choice"], json!("required"));
    assert!(bodies[0].get("parallel_tool_calls").is_none());
    assert_eq!(bodies[1]["max_tokens"], json!(99));
    assert!(bodies[1].get("max_completion_tokens").is_none());
    assert!(bodies[1].get("stream").is_none());
}

#[tokio::test]
async fn tool_call_replies_are_mapped() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(CHAT_TOOL_CALLS))
        .mount(&server)
        .await;
    let reply = provider(&server).chat(hello("gpt-4o-mini")).await.unwrap();
    assert_eq!(reply.content, "");
    assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        reply.tool_calls,
        vec![ToolCall {
            id: "call_abc123".to_owned(),
            name: "get_current_weather".to_owned(),
            arguments: "{\n\"location\": \"Boston, MA\"\n}".to_owned(),
        }]
    );
    assert_eq!(reply.usage.map(|u| u.cached_tokens), Some(0));
}

#[tokio::test]
async fn legacy_function_call_finish_maps_to_tool_calls() {
    let server = MockServer::start().await;
    let body = json!({
        "model": "gpt-3.5-turbo",
        "choices": [{"index": 0, "finish_reason": "function_call", "message": {
            "role": "assistant", "content": null,
            "function_call": {"name": "f", "arguments": "{}"}
        }}]
    });
    Mock::given(method("POST"))
        .respond_with(json_body(&body.to_string()))
        .mount(&server)
        .await;
    let reply = provider(&server)
        .chat(hello("gpt-3.5-turbo"))
        .await
        .unwrap();
    assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    assert_eq!(reply.tool_calls[0].name, "f");
    assert_eq!(reply.usage, None);
}

#[tokio::test]
async fn streamed_text_arrives_in_deltas_with_final_usage() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(sse_body(STREAM_TEXT).insert_header("x-ratelimit-remaining-requests", "7"))
        .mount(&server)
        .await;
    let provider = provider(&server);
    let start = provider.chat_stream(hello("gpt-4o-mini")).await.unwrap();
    assert_eq!(start.model, ModelId::new("gpt-4o-mini"));
    assert_eq!(start.quota.and_then(|q| q.remaining_requests), Some(7));
    let chunks: Vec<ChatChunk> = start.chunks.map(|c| c.unwrap()).collect().await;

    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "Hello world");
    assert_eq!(
        chunks
            .iter()
            .filter_map(|c| c.finish_reason)
            .collect::<Vec<_>>(),
        vec![FinishReason::Stop]
    );
    assert_eq!(
        chunks.last().unwrap().usage,
        Some(TokenUsage {
            prompt_tokens: 9,
            completion_tokens: 2,
            cached_tokens: 0,
        })
    );
    // The role announcement with empty content is not a chunk.
    assert!(chunks.iter().all(|c| *c != ChatChunk::default()));

    let body = &received_bodies(&server).await[0];
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    let request = &server.received_requests().await.unwrap()[0];
    assert_eq!(
        request.headers.get("accept").unwrap().to_str().unwrap(),
        "text/event-stream"
    );
}

#[tokio::test]
async fn streamed_tool_calls_arrive_as_fragments() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(sse_body(STREAM_TOOL_CALLS))
        .mount(&server)
        .await;
    let chunks = collect_ok(&provider(&server), hello("gpt-4o")).await;
    let deltas: Vec<ToolCallDelta> = chunks.iter().flat_map(|c| c.tool_calls.clone()).collect();
    assert_eq!(
        deltas,
        vec![
            ToolCallDelta {
                index: 0,
                id: Some("call_DdmO9pD3xa9XTPNJ32zg2hcA".to_owned()),
                name: Some("get_weather".to_owned()),
                arguments: String::new(),
            },
            ToolCallDelta {
                index: 0,
                id: None,
                name: None,
                arguments: "{\"".to_owned(),
            },
            ToolCallDelta {
                index: 0,
                id: None,
                name: None,
                arguments: "location\":\"Paris\"}".to_owned(),
            },
            ToolCallDelta {
                index: 1,
                id: Some("call_2".to_owned()),
                name: Some("get_time".to_owned()),
                arguments: "{}".to_owned(),
            },
        ]
    );
    let finish: Vec<_> = chunks.iter().filter_map(|c| c.finish_reason).collect();
    assert_eq!(finish, vec![FinishReason::ToolCalls]);
    assert_eq!(chunks.last().unwrap().usage.map(|u| u.total()), Some(95));
}

#[tokio::test]
async fn embeddings_are_returned_in_input_order() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/embeddings"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(json_body(EMBEDDINGS))
        .mount(&server)
        .await;
    let reply = provider(&server)
        .embed(EmbeddingCall {
            key_id: KeyId::new("key-1"),
            material: material(),
            model: ModelId::new("text-embedding-3-small"),
            input: Arc::new(vec!["first".to_owned(), "second".to_owned()]),
            dimensions: Some(3),
        })
        .await
        .unwrap();
    assert_eq!(
        reply.vectors,
        vec![
            vec![0.002_306_425_5, -0.009_327_292, -0.002_884_222_2],
            vec![0.25, -0.5, 0.125],
        ]
    );
    assert_eq!(reply.model, ModelId::new("text-embedding-3-small"));
    assert_eq!(
        reply.usage,
        Some(TokenUsage {
            prompt_tokens: 8,
            completion_tokens: 0,
            cached_tokens: 0,
        })
    );
    assert_eq!(
        received_bodies(&server).await[0],
        json!({
            "model": "text-embedding-3-small",
            "input": ["first", "second"],
            "dimensions": 3,
            "encoding_format": "float"
        })
    );
}

#[tokio::test]
async fn embeddings_with_a_wrong_vector_count_are_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(EMBEDDINGS))
        .mount(&server)
        .await;
    let error = provider(&server)
        .embed(EmbeddingCall {
            key_id: KeyId::new("key-1"),
            material: material(),
            model: ModelId::new("text-embedding-3-small"),
            input: Arc::new(vec!["only one".to_owned()]),
            dimensions: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(
        error.message.starts_with("malformed response body"),
        "{error}"
    );
}

#[tokio::test]
async fn models_are_listed() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(json_body(MODELS))
        .mount(&server)
        .await;
    let models = provider(&server).list_models(&material()).await.unwrap();
    assert_eq!(
        models,
        vec![
            ModelId::new("gpt-4o"),
            ModelId::new("gpt-4o-mini"),
            ModelId::new("text-embedding-3-small"),
        ]
    );
}

#[tokio::test]
async fn error_responses_are_classified() {
    struct Case {
        status: u16,
        body: &'static str,
        expected: FailureKind,
    }
    let cases = [
        Case {
            status: 429,
            body: ERROR_INSUFFICIENT_QUOTA,
            expected: FailureKind::QuotaExhausted,
        },
        Case {
            status: 401,
            body: ERROR_INVALID_API_KEY,
            expected: FailureKind::Unauthorized,
        },
        Case {
            status: 400,
            body: ERROR_CONTEXT_LENGTH,
            expected: FailureKind::BadRequest,
        },
        Case {
            status: 500,
            body: ERROR_SERVER,
            expected: FailureKind::ServerError,
        },
        Case {
            status: 503,
            body: "upstream connect error",
            expected: FailureKind::ServerError,
        },
    ];
    for case in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(case.status).set_body_raw(case.body, "application/json"),
            )
            .mount(&server)
            .await;
        let provider = provider(&server);
        let error = provider.chat(hello("gpt-4o")).await.unwrap_err();
        assert_eq!(error.kind, case.expected, "{}: {error}", case.status);
        assert_eq!(error.status, Some(case.status));
        assert_no_key(&error);
        // The streaming call fails the same way, before the stream starts.
        let error = provider.chat_stream(hello("gpt-4o")).await.unwrap_err();
        assert_eq!(error.kind, case.expected, "stream {}: {error}", case.status);
    }
}

#[tokio::test]
async fn rate_limit_carries_retry_after_and_quota() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .set_body_raw(ERROR_RATE_LIMIT, "application/json")
                .insert_header("retry-after", "20")
                .insert_header("x-ratelimit-limit-requests", "500")
                .insert_header("x-ratelimit-remaining-requests", "0")
                .insert_header("x-ratelimit-reset-requests", "6m0s")
                .insert_header("x-ratelimit-limit-tokens", "30000")
                .insert_header("x-ratelimit-remaining-tokens", "12000")
                .insert_header("x-ratelimit-reset-tokens", "1s"),
        )
        .mount(&server)
        .await;
    let error = provider(&server).chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::RateLimited);
    assert_eq!(error.status, Some(429));
    assert_eq!(error.retry_after, Some(Duration::from_secs(20)));
    assert!(
        error
            .message
            .starts_with("rate_limit_exceeded: Rate limit reached")
    );
    let quota = error.quota.unwrap();
    assert_eq!(quota.limit_requests, Some(500));
    assert_eq!(quota.remaining_requests, Some(0));
    assert_eq!(quota.limit_tokens, Some(30_000));
    assert_eq!(quota.remaining_tokens, Some(12_000));
    let reset_requests = quota.reset_requests_at.unwrap().as_millis();
    let reset_tokens = quota.reset_tokens_at.unwrap().as_millis();
    assert_eq!(reset_requests - reset_tokens, 359_000);
}

#[tokio::test]
async fn malformed_json_is_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(r#"{"choices": [{"message": "#))
        .mount(&server)
        .await;
    let error = provider(&server).chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert_eq!(error.status, Some(200));
    assert!(
        error.message.starts_with("malformed response body: "),
        "{error}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(b"{\"id\": \"caf\xe9\"}".to_vec(), "application/json"),
        )
        .mount(&server)
        .await;
    let error = provider(&server).chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(
        error
            .message
            .starts_with("malformed response body: invalid utf-8"),
        "{error}"
    );
}

#[tokio::test]
async fn error_object_in_a_200_body_is_classified() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(ERROR_INSUFFICIENT_QUOTA))
        .mount(&server)
        .await;
    let error = provider(&server).chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::QuotaExhausted, "{error}");

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(ERROR_SERVER))
        .mount(&server)
        .await;
    let error = provider(&server).chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError, "{error}");
}

#[tokio::test]
async fn html_instead_of_json_is_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw("<html><body>Captive portal</body></html>", "text/html"),
        )
        .mount(&server)
        .await;
    let provider = provider(&server);
    let error = provider.chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(
        error.message.contains("unexpected content type text/html"),
        "{error}"
    );
    let error = provider.chat_stream(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
}

#[tokio::test]
async fn truncated_stream_ends_with_an_error_item() {
    let server = MockServer::start().await;
    let truncated = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n\
                     data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo";
    Mock::given(method("POST"))
        .respond_with(sse_body(truncated))
        .mount(&server)
        .await;
    let start = provider(&server)
        .chat_stream(hello("gpt-4o"))
        .await
        .unwrap();
    let items: Vec<_> = start.chunks.collect().await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap().text, "Hel");
    let error = items[1].as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Network);
    assert!(
        error
            .message
            .starts_with("truncated or malformed event stream"),
        "{error}"
    );
}

#[tokio::test]
async fn stream_ending_without_done_or_finish_is_an_error() {
    let server = MockServer::start().await;
    let cut = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    Mock::given(method("POST"))
        .respond_with(sse_body(cut))
        .mount(&server)
        .await;
    let start = provider(&server)
        .chat_stream(hello("gpt-4o"))
        .await
        .unwrap();
    let items: Vec<_> = start.chunks.collect().await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(items[1].as_ref().unwrap_err().message.contains("[DONE]"));
}

#[tokio::test]
async fn invalid_chunk_and_error_chunk_end_the_stream() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(sse_body("data: {not json}\n\ndata: [DONE]\n\n"))
        .mount(&server)
        .await;
    let items: Vec<_> = provider(&server)
        .chat_stream(hello("gpt-4o"))
        .await
        .unwrap()
        .chunks
        .collect()
        .await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].as_ref().unwrap_err().kind, FailureKind::Network);

    let server = MockServer::start().await;
    let with_error = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n\
                      data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}\n\n";
    Mock::given(method("POST"))
        .respond_with(sse_body(with_error))
        .mount(&server)
        .await;
    let items: Vec<_> = provider(&server)
        .chat_stream(hello("gpt-4o"))
        .await
        .unwrap()
        .chunks
        .collect()
        .await;
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[1].as_ref().unwrap_err().kind,
        FailureKind::ServerError
    );
}

#[tokio::test]
async fn hanging_upstream_times_out() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(CHAT_COMPLETION).set_delay(Duration::from_secs(10)))
        .mount(&server)
        .await;
    let settings = HttpSettings {
        first_byte_timeout: Duration::from_millis(150),
        ..HttpSettings::default()
    };
    let provider = OpenAiProvider::new(format!("{}/v1", server.uri()), settings).unwrap();
    let error = provider.chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
    let error = provider.chat_stream(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
}

#[tokio::test]
async fn echoed_key_never_reaches_the_error_message() {
    let server = MockServer::start().await;
    let body = json!({"error": {
        "message": format!("Incorrect API key provided: {KEY}."),
        "type": "invalid_request_error",
        "code": "invalid_api_key"
    }});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(body))
        .mount(&server)
        .await;
    let error = provider(&server).chat(hello("gpt-4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Unauthorized);
    assert_no_key(&error);
    assert!(!format!("{error:?}").contains(KEY));
    let request = &server.received_requests().await.unwrap()[0];
    assert_eq!(
        request
            .headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        format!("Bearer {KEY}")
    );
}

#[tokio::test]
async fn dropping_a_stream_early_does_not_panic() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(sse_body(STREAM_TEXT))
        .mount(&server)
        .await;
    let provider = provider(&server);
    let mut start = provider.chat_stream(hello("gpt-4o-mini")).await.unwrap();
    let first = start.chunks.next().await.unwrap().unwrap();
    assert_eq!(first.text, "Hello");
    drop(start);
    // The client is still usable afterwards.
    let chunks = collect_ok(&provider, hello("gpt-4o-mini")).await;
    assert!(!chunks.is_empty());
}

#[tokio::test]
async fn invalid_tool_schema_is_refused_before_the_call() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(CHAT_COMPLETION))
        .expect(0)
        .mount(&server)
        .await;
    let mut intent = RequestIntent::new("gpt-4o", vec![Message::user("hi")]);
    intent.tools = vec![ToolDefinition {
        name: "broken".to_owned(),
        description: None,
        parameters: "{not json".to_owned(),
    }];
    let error = provider(&server)
        .chat(call("gpt-4o", intent.clone()))
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
    assert!(error.message.contains("tool broken"), "{error}");

    intent.tools.clear();
    intent.response_format = Some(ResponseFormat::JsonSchema {
        name: "s".to_owned(),
        schema: "[".to_owned(),
    });
    let error = provider(&server)
        .chat_stream(call("gpt-4o", intent))
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
}

#[tokio::test]
async fn trailing_slash_in_the_base_url_is_tolerated() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(json_body(CHAT_COMPLETION))
        .mount(&server)
        .await;
    let provider =
        OpenAiProvider::new(format!("{}/v1/", server.uri()), HttpSettings::default()).unwrap();
    assert!(provider.chat(hello("gpt-4o")).await.is_ok());
}

#[test]
fn invalid_base_urls_are_refused() {
    for url in [
        "not a url",
        "ftp://example.com/v1",
        "mailto:someone@example.com",
    ] {
        let error = OpenAiProvider::new(url, HttpSettings::default()).unwrap_err();
        assert_eq!(error.kind, FailureKind::BadRequest, "{url}");
    }
}

#[test]
fn default_models_are_the_openai_part_of_the_catalogue() {
    let provider =
        OpenAiProvider::new("https://api.openai.com/v1", HttpSettings::default()).unwrap();
    assert_eq!(provider.kind(), "openai");
    let ModelSet::Only(models) = provider.default_models() else {
        panic!("expected a closed model set");
    };
    for expected in ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"] {
        assert!(models.contains(&ModelId::new(expected)), "{expected}");
    }
    assert!(
        models
            .iter()
            .all(|m| !m.as_str().starts_with("claude") && !m.as_str().starts_with("gemini")),
        "{models:?}"
    );
    assert!(
        !models.contains(&ModelId::new("text-embedding-004")),
        "{models:?}"
    );
    assert!(!format!("{provider:?}").is_empty());
}
