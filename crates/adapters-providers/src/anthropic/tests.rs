//! Tests of the Anthropic adapter: request translation (pure) and calls against a
//! local wiremock server replaying documented Messages API responses from
//! `tests-data/anthropic/`. No network.

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

use super::{AnthropicProvider, JSON_TOOL, build_request};
use crate::http::{HttpSettings, parse_rfc3339};

const KEY: &str = "sk-ant-api03-SECRETSECRET0123456789-abcd";

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests-data/anthropic/",
            $name
        ))
    };
}

fn settings() -> HttpSettings {
    HttpSettings {
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(10),
    }
}

fn provider(server: &MockServer) -> AnthropicProvider {
    AnthropicProvider::new(server.uri(), settings()).unwrap()
}

fn call(request: RequestIntent) -> ProviderCall {
    ProviderCall {
        key_id: KeyId::new("anthropic-1"),
        material: KeyMaterial::parse(KEY).unwrap(),
        model: request.model.clone(),
        request: Arc::new(request),
    }
}

fn hello() -> RequestIntent {
    RequestIntent::new("claude-sonnet-4-5", vec![Message::user("Hello")])
}

fn weather_tool() -> ToolDefinition {
    ToolDefinition {
        name: "get_weather".to_owned(),
        description: Some("Current weather in a city".to_owned()),
        parameters: r#"{"type":"object","properties":{"location":{"type":"string"}},"required":["location"]}"#
            .to_owned(),
    }
}

/// A mock answering `POST /v1/messages` (with the key and version headers) with
/// `response`.
async fn mount(server: &MockServer, response: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", KEY))
        .and(header("anthropic-version", "2023-06-01"))
        .respond_with(response)
        .mount(server)
        .await;
}

/// `body` as the bytes sent on the wire, parsed back (a direct `to_value` would widen
/// `f32` values: 0.9 would read 0.8999999761581421).
fn wire_json(body: &impl serde::Serialize) -> Value {
    serde_json::from_slice(&serde_json::to_vec(body).unwrap()).unwrap()
}

fn json_body(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "application/json")
}

fn sse_body(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")
}

/// The JSON body of the only request the server received.
async fn sent_body(server: &MockServer) -> Value {
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    requests[0].body_json().unwrap()
}

async fn chat_error(server: &MockServer, response: ResponseTemplate) -> ProviderError {
    mount(server, response).await;
    let error = provider(server).chat(call(hello())).await.unwrap_err();
    assert!(!error.message.contains(KEY), "{error}");
    error
}

/// Every item of a stream, errors included.
async fn stream_items(
    server: &MockServer,
    request: RequestIntent,
) -> Vec<Result<ChatChunk, ProviderError>> {
    let start = provider(server).chat_stream(call(request)).await.unwrap();
    start.chunks.collect().await
}

#[test]
fn request_hoists_system_merges_turns_and_maps_tools_and_images() {
    let mut first_user = Message::user("What is in these images?");
    first_user.images = vec![
        Image::Base64 {
            media_type: "image/png".to_owned(),
            data: "iVBORw0KGgo=".to_owned(),
        },
        Image::Url {
            url: "data:image/jpeg;base64,/9j/4AAQ".to_owned(),
        },
        Image::Url {
            url: "https://example.com/cat.webp".to_owned(),
        },
    ];
    let mut assistant = Message::assistant("Let me check the weather.");
    assistant.tool_calls = vec![ToolCall {
        id: "toolu_1".to_owned(),
        name: "get_weather".to_owned(),
        arguments: r#"{"location":"Paris"}"#.to_owned(),
    }];
    let mut request = RequestIntent::new(
        "claude-sonnet-4-5",
        vec![
            Message::system("You are terse."),
            first_user,
            Message::user("Also, be quick."),
            assistant,
            Message::tool_result("toolu_1", "18C and sunny"),
            Message::system("Answer in French."),
            Message::user("Thanks!"),
            Message::assistant(""),
        ],
    );
    request.temperature = Some(1.5);
    request.top_p = Some(0.9);
    request.stop = vec!["END".to_owned()];
    request.tools = vec![weather_tool()];
    request.tool_choice = Some(ToolChoice::Required);

    let model = ModelId::new("claude-sonnet-4-5");
    let translated = build_request(&request, &model, 1024, false).unwrap();
    assert!(!translated.json_tool);
    let body = wire_json(&translated.body);
    assert_eq!(
        body,
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are terse.\n\nAnswer in French.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.webp"}},
                    {"type": "text", "text": "What is in these images?"},
                    {"type": "text", "text": "Also, be quick."}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check the weather."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C and sunny"},
                    {"type": "text", "text": "Thanks!"}
                ]}
            ],
            // Clamped to Anthropic's range; top_p dropped because temperature is set.
            "temperature": 1.0,
            "stop_sequences": ["END"],
            "tools": [{
                "name": "get_weather",
                "description": "Current weather in a city",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
            }],
            "tool_choice": {"type": "any"}
        })
    );
}

#[test]
fn tool_choice_maps_to_anthropic_types() {
    let check = |choice: ToolChoice, expected: Value| {
        let mut request = hello();
        request.tools = vec![weather_tool()];
        request.tool_choice = Some(choice);
        let model = ModelId::new("claude-sonnet-4-5");
        let translated = build_request(&request, &model, 1024, true).unwrap();
        let body = wire_json(&translated.body);
        assert_eq!(body["tool_choice"], expected);
        assert_eq!(body["stream"], json!(true));
    };
    check(ToolChoice::Auto, json!({"type": "auto"}));
    check(ToolChoice::None, json!({"type": "none"}));
    check(ToolChoice::Required, json!({"type": "any"}));
    check(
        ToolChoice::Function {
            name: "get_weather".to_owned(),
        },
        json!({"type": "tool", "name": "get_weather"}),
    );
}

/// `parallel_tool_calls: false` rides on the tool choice (an `auto` one when the
/// request named none), the end user goes to `metadata.user_id`, and the sampling
/// options Anthropic lacks are dropped rather than refused.
#[test]
fn openai_only_options_are_mapped_or_dropped() {
    let model = ModelId::new("claude-sonnet-4-5");
    let mut request = hello();
    request.tools = vec![weather_tool()];
    request.parallel_tool_calls = Some(false);
    request.end_user = Some("user-1234".to_owned());
    request.seed = Some(7);
    request.presence_penalty = Some(1.0);
    request.frequency_penalty = Some(1.0);
    let body = wire_json(&build_request(&request, &model, 1024, false).unwrap().body);
    assert_eq!(
        body["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(body["metadata"], json!({"user_id": "user-1234"}));
    for dropped in ["seed", "presence_penalty", "frequency_penalty"] {
        assert!(body.get(dropped).is_none(), "{dropped} sent: {body}");
    }

    request.tool_choice = Some(ToolChoice::Function {
        name: "get_weather".to_owned(),
    });
    let body = wire_json(&build_request(&request, &model, 1024, false).unwrap().body);
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
    );

    // An end-user id longer than Anthropic takes is left out.
    request.end_user = Some("u".repeat(257));
    let body = wire_json(&build_request(&request, &model, 1024, false).unwrap().body);
    assert!(body.get("metadata").is_none(), "{body}");

    // Parallel calls allowed, or no tools at all: nothing to say.
    request.parallel_tool_calls = Some(true);
    request.tool_choice = None;
    let body = wire_json(&build_request(&request, &model, 1024, false).unwrap().body);
    assert!(body.get("tool_choice").is_none(), "{body}");
    request.parallel_tool_calls = Some(false);
    request.tools.clear();
    let body = wire_json(&build_request(&request, &model, 1024, false).unwrap().body);
    assert!(body.get("tool_choice").is_none(), "{body}");
}

#[test]
fn max_tokens_is_always_sent() {
    let model = ModelId::new("claude-sonnet-4-5");
    let request = hello();
    let body = wire_json(&build_request(&request, &model, 777, false).unwrap().body);
    assert_eq!(body["max_tokens"], json!(777));
    assert_eq!(body.get("stream"), None);
    let request = hello().with_max_tokens(50);
    let body = wire_json(&build_request(&request, &model, 777, false).unwrap().body);
    assert_eq!(body["max_tokens"], json!(50));
}

#[tokio::test]
async fn default_max_tokens_comes_from_the_price_catalogue() {
    let server = MockServer::start().await;
    mount(&server, json_body(fixture!("messages_text.json"))).await;
    provider(&server).chat(call(hello())).await.unwrap();
    // claude-sonnet-4-5's default_max_output in data/prices.csv.
    assert_eq!(sent_body(&server).await["max_tokens"], json!(1024));
}

#[test]
fn invalid_requests_are_rejected_before_the_call() {
    let model = ModelId::new("claude-sonnet-4-5");
    let check = |request: RequestIntent, needle: &str| {
        let error = build_request(&request, &model, 1024, false).unwrap_err();
        assert_eq!(error.kind, FailureKind::BadRequest, "{error}");
        assert!(error.message.contains(needle), "{error}");
        assert_eq!(error.status, None);
    };

    let mut bad_schema = hello();
    bad_schema.tools = vec![ToolDefinition {
        parameters: "{not json".to_owned(),
        ..weather_tool()
    }];
    check(bad_schema, "not valid JSON");

    let mut bad_arguments = hello();
    let mut assistant = Message::assistant("");
    assistant.tool_calls = vec![ToolCall {
        id: "toolu_1".to_owned(),
        name: "get_weather".to_owned(),
        arguments: "{\"location\":".to_owned(),
    }];
    bad_arguments.messages.push(assistant);
    check(bad_arguments, "arguments of tool call");

    let mut orphan_result = hello();
    orphan_result.messages.push(Message::new(
        apikeyrouter_domain::Role::Tool,
        "result without id",
    ));
    check(orphan_result, "tool message without tool_call_id");

    let mut unknown_choice = hello();
    unknown_choice.tools = vec![weather_tool()];
    unknown_choice.tool_choice = Some(ToolChoice::Function {
        name: "get_time".to_owned(),
    });
    check(unknown_choice, "does not define");

    let mut format_with_tools = hello();
    format_with_tools.tools = vec![weather_tool()];
    format_with_tools.response_format = Some(ResponseFormat::JsonSchema {
        name: "weather".to_owned(),
        schema: r#"{"type":"object"}"#.to_owned(),
    });
    check(
        format_with_tools,
        "anthropic does not support response_format json_schema natively",
    );

    let mut bad_data_url = hello();
    bad_data_url.messages[0].images = vec![Image::Url {
        url: "data:image/png,rawbytes".to_owned(),
    }];
    check(bad_data_url, "data url must be base64");
}

#[tokio::test]
async fn bad_request_is_returned_without_calling_anthropic() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(fixture!("messages_text.json")))
        .expect(0)
        .mount(&server)
        .await;
    let mut request = hello();
    request.tools = vec![ToolDefinition {
        parameters: "[1, 2".to_owned(),
        ..weather_tool()
    }];
    let error = provider(&server).chat(call(request)).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
}

#[tokio::test]
async fn plain_reply_is_normalized_with_usage_and_quota() {
    let server = MockServer::start().await;
    mount(
        &server,
        json_body(fixture!("messages_text.json"))
            .insert_header("anthropic-ratelimit-requests-limit", "50")
            .insert_header("anthropic-ratelimit-requests-remaining", "49")
            .insert_header("anthropic-ratelimit-requests-reset", "2024-06-01T00:00:10Z")
            .insert_header("anthropic-ratelimit-tokens-limit", "40000")
            .insert_header("anthropic-ratelimit-tokens-remaining", "39000"),
    )
    .await;
    let mut request = hello();
    request.messages.insert(0, Message::system("Be nice."));
    let response = provider(&server).chat(call(request)).await.unwrap();
    assert_eq!(response.content, "Hello! How can I help you today?");
    assert!(response.tool_calls.is_empty());
    assert_eq!(response.model, ModelId::new("claude-sonnet-4-5-20250929"));
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(
        response.usage,
        Some(TokenUsage {
            prompt_tokens: 12 + 100 + 2048,
            completion_tokens: 9,
            cached_tokens: 2048,
        })
    );
    let quota = response.quota.unwrap();
    assert_eq!(quota.limit_requests, Some(50));
    assert_eq!(quota.remaining_requests, Some(49));
    assert_eq!(
        quota.reset_requests_at,
        parse_rfc3339("2024-06-01T00:00:10Z")
    );
    assert_eq!(quota.remaining_tokens, Some(39_000));

    let body = sent_body(&server).await;
    assert_eq!(body["system"], json!("Be nice."));
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    );
}

#[tokio::test]
async fn tool_use_reply_becomes_tool_calls() {
    let server = MockServer::start().await;
    mount(&server, json_body(fixture!("messages_tool_use.json"))).await;
    let mut request = hello();
    request.tools = vec![weather_tool()];
    let response = provider(&server).chat(call(request)).await.unwrap();
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.content,
        "I'll check the current weather in San Francisco for you."
    );
    assert_eq!(response.tool_calls.len(), 2);
    assert_eq!(response.tool_calls[0].id, "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(response.tool_calls[0].name, "get_weather");
    let arguments: Value = serde_json::from_str(&response.tool_calls[0].arguments).unwrap();
    assert_eq!(
        arguments,
        json!({"location": "San Francisco, CA", "unit": "celsius"})
    );
    assert_eq!(response.tool_calls[1].arguments, "{}");
    assert_eq!(
        response.usage,
        Some(TokenUsage {
            prompt_tokens: 472,
            completion_tokens: 91,
            cached_tokens: 0,
        })
    );
}

#[tokio::test]
async fn response_format_is_emulated_with_a_forced_tool() {
    let server = MockServer::start().await;
    mount(&server, json_body(fixture!("messages_json_tool.json"))).await;
    let mut request = RequestIntent::new("claude-haiku-4-5", vec![Message::user("Paris?")]);
    request.response_format = Some(ResponseFormat::JsonSchema {
        name: "city".to_owned(),
        schema: r#"{"type":"object","properties":{"city":{"type":"string"},"population":{"type":"integer"}}}"#
            .to_owned(),
    });
    let response = provider(&server).chat(call(request)).await.unwrap();
    assert!(response.tool_calls.is_empty());
    assert_eq!(response.finish_reason, FinishReason::Stop);
    let content: Value = serde_json::from_str(&response.content).unwrap();
    assert_eq!(content, json!({"city": "Paris", "population": 2_102_650}));

    let body = sent_body(&server).await;
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": JSON_TOOL})
    );
    assert_eq!(body["tools"][0]["name"], json!(JSON_TOOL));
    assert_eq!(
        body["tools"][0]["input_schema"]["properties"]["population"],
        json!({"type": "integer"})
    );
}

#[tokio::test]
async fn text_stream_yields_deltas_then_finish_and_usage() {
    let server = MockServer::start().await;
    mount(&server, sse_body(fixture!("stream_text.sse"))).await;
    let items = stream_items(&server, hello()).await;
    let chunks: Vec<ChatChunk> = items.into_iter().map(Result::unwrap).collect();
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "Hello, world!");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        last.usage,
        Some(TokenUsage {
            prompt_tokens: 35,
            completion_tokens: 15,
            cached_tokens: 10,
        })
    );
    // Only the last chunk finishes.
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.finish_reason.is_none())
    );
    assert_eq!(sent_body(&server).await["stream"], json!(true));
}

#[tokio::test]
async fn tool_use_stream_yields_indexed_call_fragments() {
    let server = MockServer::start().await;
    mount(&server, sse_body(fixture!("stream_tool_use.sse"))).await;
    let mut request = hello();
    request.tools = vec![weather_tool()];
    let chunks: Vec<ChatChunk> = stream_items(&server, request)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let deltas: Vec<&ToolCallDelta> = chunks.iter().flat_map(|c| &c.tool_calls).collect();
    assert_eq!(
        deltas[0],
        &ToolCallDelta {
            index: 0,
            id: Some("toolu_01T1x1fJ34qAmk2tNTrN7Up6".to_owned()),
            name: Some("get_weather".to_owned()),
            arguments: String::new(),
        }
    );
    assert!(deltas.iter().all(|d| d.index == 0));
    let arguments: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
    let arguments: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(arguments, json!({"location": "San Francisco, CA"}));
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(last.usage.unwrap().completion_tokens, 89);
    assert_eq!(last.usage.unwrap().prompt_tokens, 472);
}

#[tokio::test]
async fn overloaded_error_event_ends_the_stream_with_a_server_error() {
    let server = MockServer::start().await;
    mount(&server, sse_body(fixture!("stream_overloaded.sse"))).await;
    let items = stream_items(&server, hello()).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap().text, "Partial");
    let error = items[1].as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(error.message.contains("overloaded_error"), "{error}");
}

#[tokio::test]
async fn stream_without_message_stop_ends_with_a_network_error() {
    let server = MockServer::start().await;
    mount(&server, sse_body(fixture!("stream_truncated.sse"))).await;
    let items = stream_items(&server, hello()).await;
    let error = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Network);
    assert!(error.message.contains("message_stop"), "{error}");
    assert!(items[..items.len() - 1].iter().all(Result::is_ok));
}

#[tokio::test]
async fn stream_cut_inside_an_event_ends_with_a_network_error() {
    let server = MockServer::start().await;
    mount(&server, sse_body(fixture!("stream_cut_mid_event.sse"))).await;
    let items = stream_items(&server, hello()).await;
    let error = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Network, "{error}");
}

#[tokio::test]
async fn malformed_stream_event_is_a_server_error() {
    let server = MockServer::start().await;
    mount(
        &server,
        sse_body("event: message_start\ndata: {\"type\": \"message_start\", \"message\": \n\n"),
    )
    .await;
    let items = stream_items(&server, hello()).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].as_ref().unwrap_err().kind,
        FailureKind::ServerError
    );
}

#[tokio::test]
async fn stream_that_fails_before_starting_returns_the_classified_error() {
    let server = MockServer::start().await;
    mount(
        &server,
        ResponseTemplate::new(429)
            .insert_header("retry-after", "3")
            .set_body_raw(fixture!("error_rate_limit.json"), "application/json"),
    )
    .await;
    let error = provider(&server)
        .chat_stream(call(hello()))
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::RateLimited);
    assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn rate_limit_carries_retry_after_and_quota() {
    let server = MockServer::start().await;
    let error = chat_error(
        &server,
        ResponseTemplate::new(429)
            .insert_header("retry-after", "17")
            .insert_header("anthropic-ratelimit-requests-limit", "50")
            .insert_header("anthropic-ratelimit-requests-remaining", "0")
            .insert_header("anthropic-ratelimit-requests-reset", "2024-06-01T00:00:17Z")
            .insert_header("anthropic-ratelimit-tokens-limit", "40000")
            .insert_header("anthropic-ratelimit-tokens-remaining", "120")
            .insert_header("anthropic-ratelimit-tokens-reset", "2024-06-01T00:00:05Z")
            .set_body_raw(fixture!("error_rate_limit.json"), "application/json"),
    )
    .await;
    assert_eq!(error.kind, FailureKind::RateLimited);
    assert_eq!(error.status, Some(429));
    assert_eq!(error.retry_after, Some(Duration::from_secs(17)));
    let quota = error.quota.unwrap();
    assert_eq!(quota.remaining_requests, Some(0));
    assert_eq!(quota.limit_tokens, Some(40_000));
    assert_eq!(quota.remaining_tokens, Some(120));
    assert_eq!(quota.reset_tokens_at, parse_rfc3339("2024-06-01T00:00:05Z"));
    assert!(error.message.contains("rate_limit_error"), "{error}");
}

#[tokio::test]
async fn error_statuses_are_classified() {
    let cases = [
        (
            529,
            fixture!("error_overloaded.json"),
            FailureKind::ServerError,
        ),
        (
            401,
            fixture!("error_authentication.json"),
            FailureKind::Unauthorized,
        ),
        (
            400,
            fixture!("error_invalid_request.json"),
            FailureKind::BadRequest,
        ),
        (500, "Internal Server Error", FailureKind::ServerError),
    ];
    for (status, body, expected) in cases {
        let server = MockServer::start().await;
        let error = chat_error(
            &server,
            ResponseTemplate::new(status).set_body_raw(body, "application/json"),
        )
        .await;
        assert_eq!(error.kind, expected, "{status}: {error}");
        assert_eq!(error.status, Some(status));
    }
}

#[tokio::test]
async fn malformed_json_is_a_server_error() {
    let server = MockServer::start().await;
    let error = chat_error(
        &server,
        json_body(r#"{"id": "msg_1", "content": [{"type": "#),
    )
    .await;
    assert_eq!(error.kind, FailureKind::ServerError);
    assert_eq!(error.status, Some(200));
    assert!(error.message.contains("malformed"), "{error}");
}

#[tokio::test]
async fn error_body_under_status_200_is_classified() {
    let server = MockServer::start().await;
    let error = chat_error(&server, json_body(fixture!("error_overloaded.json"))).await;
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(error.message.contains("Overloaded"), "{error}");
}

#[tokio::test]
async fn unexpected_content_type_is_a_server_error() {
    let server = MockServer::start().await;
    let error = chat_error(
        &server,
        ResponseTemplate::new(200).set_body_raw("<html>captive portal</html>", "text/html"),
    )
    .await;
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(error.message.contains("text/html"), "{error}");
}

#[tokio::test]
async fn hang_beyond_first_byte_timeout_is_a_timeout() {
    let server = MockServer::start().await;
    mount(
        &server,
        json_body(fixture!("messages_text.json")).set_delay(Duration::from_secs(3)),
    )
    .await;
    let provider = AnthropicProvider::new(
        server.uri(),
        HttpSettings {
            first_byte_timeout: Duration::from_millis(200),
            ..settings()
        },
    )
    .unwrap();
    let error = provider.chat(call(hello())).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
}

#[tokio::test]
async fn echoed_key_never_appears_in_errors() {
    let server = MockServer::start().await;
    let body = format!(
        r#"{{"type":"error","error":{{"type":"authentication_error","message":"invalid x-api-key {KEY}"}}}}"#
    );
    let error = chat_error(
        &server,
        ResponseTemplate::new(401).set_body_raw(body, "application/json"),
    )
    .await;
    assert_eq!(error.kind, FailureKind::Unauthorized);
    assert!(!error.to_string().contains(KEY));
    assert!(!format!("{error:?}").contains(KEY));
}

#[tokio::test]
async fn unreachable_server_is_a_network_error() {
    // Port 9 (discard) on localhost: nothing listens there in the test environment.
    let provider = AnthropicProvider::new("http://127.0.0.1:9", settings()).unwrap();
    let error = provider.chat(call(hello())).await.unwrap_err();
    assert!(
        matches!(error.kind, FailureKind::Network | FailureKind::Timeout),
        "{error}"
    );
    assert!(!error.message.contains(KEY));
}

#[tokio::test]
async fn models_kind_and_embeddings() {
    let provider = AnthropicProvider::new("https://api.anthropic.com/", settings()).unwrap();
    assert_eq!(provider.kind(), "anthropic");
    let ModelSet::Only(models) = provider.default_models() else {
        panic!("expected a model list");
    };
    assert!(models.contains(&ModelId::new("claude-sonnet-4-5")));
    assert!(models.iter().all(|m| m.as_str().starts_with("claude-")));
    let debug = format!("{provider:?}");
    assert!(
        debug.contains("https://api.anthropic.com/v1/messages"),
        "{debug}"
    );

    let error = provider
        .embed(EmbeddingCall {
            key_id: KeyId::new("anthropic-1"),
            material: KeyMaterial::parse(KEY).unwrap(),
            model: ModelId::new("claude-sonnet-4-5"),
            input: Arc::new(vec!["hi".to_owned()]),
            dimensions: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);

    let error = AnthropicProvider::new("  ", settings()).unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
}

#[test]
fn streamed_json_tool_input_becomes_text() {
    use super::{Step, StreamState};
    let mut state = StreamState::new(true);
    let events = [
        r#"{"type":"message_start","message":{"usage":{"input_tokens":40,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"json_response","input":{}}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":" \"Paris\"}"}}"#,
        r#"{"type":"content_block_stop","index":0}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":12}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let steps: Vec<Step> = events.iter().map(|e| state.on_event(e)).collect();
    let text: String = steps
        .iter()
        .filter_map(|s| match s {
            Step::Emit(chunk) => {
                assert!(chunk.tool_calls.is_empty());
                Some(chunk.text.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(text, r#"{"city": "Paris"}"#);
    assert_eq!(
        steps[5],
        Step::Emit(ChatChunk {
            finish_reason: Some(FinishReason::Stop),
            usage: Some(TokenUsage {
                prompt_tokens: 40,
                completion_tokens: 12,
                cached_tokens: 0,
            }),
            ..ChatChunk::default()
        })
    );
    assert_eq!(steps[6], Step::End);
}

#[test]
fn parallel_streamed_tool_calls_get_consecutive_indexes() {
    use super::{Step, StreamState};
    let mut state = StreamState::new(false);
    let start = |index: u32, id: &str| {
        format!(
            r#"{{"type":"content_block_start","index":{index},"content_block":{{"type":"tool_use","id":"{id}","name":"f","input":{{}}}}}}"#
        )
    };
    let delta = |index: u32| {
        format!(
            r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"input_json_delta","partial_json":"{{}}"}}}}"#
        )
    };
    let index_of = |step: Step| match step {
        Step::Emit(chunk) => chunk.tool_calls[0].index,
        other => panic!("unexpected {other:?}"),
    };
    // Block 0 is text; blocks 1 and 2 are calls 0 and 1.
    assert_eq!(index_of(state.on_event(&start(1, "a"))), 0);
    assert_eq!(index_of(state.on_event(&start(2, "b"))), 1);
    assert_eq!(index_of(state.on_event(&delta(2))), 1);
    assert_eq!(index_of(state.on_event(&delta(1))), 0);
    assert_eq!(state.on_event(r#"{"type":"ping"}"#), Step::Skip);
    assert_eq!(
        state.on_event(r#"{"type":"some_future_event"}"#),
        Step::Skip
    );
}
