//! Tests of the Gemini adapter: request translation (pure) and calls against a local
//! wiremock server replaying documented Gemini API responses from
//! `tests-data/gemini/`. No network.

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
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::{GeminiProvider, build_request};
use crate::http::HttpSettings;

const KEY: &str = "AIzaSyDSECRETSECRET0123456789abcdefghij";

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests-data/gemini/",
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

fn provider(server: &MockServer) -> GeminiProvider {
    GeminiProvider::new(format!("{}/v1beta/", server.uri()), settings()).unwrap()
}

fn material() -> KeyMaterial {
    KeyMaterial::parse(KEY).unwrap()
}

fn call(request: RequestIntent) -> ProviderCall {
    ProviderCall {
        key_id: KeyId::new("gemini-1"),
        material: material(),
        model: request.model.clone(),
        request: Arc::new(request),
    }
}

fn hello() -> RequestIntent {
    RequestIntent::new("gemini-2.5-flash", vec![Message::user("Hello")])
}

fn weather_tool() -> ToolDefinition {
    ToolDefinition {
        name: "get_weather".to_owned(),
        description: Some("Current weather in a city".to_owned()),
        parameters: r#"{"$schema":"http://json-schema.org/draft-07/schema#","type":"object","properties":{"location":{"type":"string"},"unit":{"type":["string","null"],"enum":["c","f"]}},"required":["location"],"additionalProperties":false}"#
            .to_owned(),
    }
}

fn assistant_calling(calls: &[(&str, &str, &str)]) -> Message {
    let mut message = Message::assistant("");
    message.tool_calls = calls
        .iter()
        .map(|(id, name, arguments)| ToolCall {
            id: (*id).to_owned(),
            name: (*name).to_owned(),
            arguments: (*arguments).to_owned(),
        })
        .collect();
    message
}

/// A mock answering `POST /v1beta/models/gemini-2.5-flash:{method}` (with the key
/// header) with `response`.
async fn mount(server: &MockServer, model_method: &str, response: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path(format!("/v1beta/models/{model_method}")))
        .and(header("x-goog-api-key", KEY))
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

async fn sent_body(server: &MockServer) -> Value {
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    requests[0].body_json().unwrap()
}

async fn chat_error(server: &MockServer, response: ResponseTemplate) -> ProviderError {
    mount(server, "gemini-2.5-flash:generateContent", response).await;
    let error = provider(server).chat(call(hello())).await.unwrap_err();
    assert!(!error.message.contains(KEY), "{error}");
    assert!(!format!("{error:?}").contains(KEY));
    error
}

async fn stream_items(
    server: &MockServer,
    request: RequestIntent,
) -> Vec<Result<ChatChunk, ProviderError>> {
    let start = provider(server).chat_stream(call(request)).await.unwrap();
    start.chunks.collect().await
}

async fn mount_stream(server: &MockServer, body: &str) {
    Mock::given(method("POST"))
        .and(path(
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        ))
        .and(query_param("alt", "sse"))
        .and(header("x-goog-api-key", KEY))
        .respond_with(sse_body(body))
        .mount(server)
        .await;
}

#[test]
fn request_maps_roles_system_tools_images_and_generation_config() {
    let mut first_user = Message::user("Describe these.");
    first_user.images = vec![
        Image::Base64 {
            media_type: "image/png".to_owned(),
            data: "iVBORw0KGgo=".to_owned(),
        },
        Image::Url {
            url: "data:image/jpeg;base64,/9j/4AAQ".to_owned(),
        },
        Image::Url {
            url: "https://generativelanguage.googleapis.com/v1beta/files/abc.JPG?x=1".to_owned(),
        },
    ];
    let mut request = RequestIntent::new(
        "gemini-2.5-flash",
        vec![
            Message::system("You are terse."),
            first_user,
            Message::user("And the weather?"),
            assistant_calling(&[
                ("call_0", "get_weather", r#"{"location":"Paris"}"#),
                ("call_1", "get_time", ""),
            ]),
            Message::tool_result("call_0", r#"{"temp_c": 18}"#),
            Message::tool_result("call_1", "14:05"),
            Message::assistant("It is 18C at 14:05."),
            Message::system("Answer in French."),
            Message::user("And Rome?"),
            // Gemini numbers calls from zero each turn: the same id names another call.
            assistant_calling(&[("call_0", "get_time", r#"{"city":"Rome"}"#)]),
            Message::tool_result("call_0", "14:05"),
        ],
    );
    request.temperature = Some(1.5);
    request.top_p = Some(0.9);
    request.max_tokens = Some(256);
    // Wider than Gemini's 32-bit seed: its low bits are sent.
    request.seed = Some((1_i64 << 32) + 42);
    // Refused by Gemini 2.5 models ("Penalty is not enabled"): dropped.
    request.presence_penalty = Some(0.5);
    request.frequency_penalty = Some(-0.5);
    // Neither has a Gemini equivalent.
    request.parallel_tool_calls = Some(false);
    request.end_user = Some("user-1234".to_owned());
    request.stop = vec!["END".to_owned()];
    request.tools = vec![
        weather_tool(),
        ToolDefinition {
            name: "get_time".to_owned(),
            description: None,
            parameters: r#"{"type":"object","properties":{}}"#.to_owned(),
        },
    ];
    request.tool_choice = Some(ToolChoice::Function {
        name: "get_weather".to_owned(),
    });

    let body = wire_json(&build_request(&request).unwrap());
    assert_eq!(
        body,
        json!({
            "contents": [
                {"role": "user", "parts": [
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                    {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc.JPG?x=1"}},
                    {"text": "Describe these."},
                    {"text": "And the weather?"}
                ]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}},
                    {"functionCall": {"name": "get_time", "args": {}}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"content": {"temp_c": 18}}}},
                    {"functionResponse": {"name": "get_time", "response": {"content": "14:05"}}}
                ]},
                {"role": "model", "parts": [{"text": "It is 18C at 14:05."}]},
                {"role": "user", "parts": [{"text": "And Rome?"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "get_time", "args": {"city": "Rome"}}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_time", "response": {"content": "14:05"}}}
                ]}
            ],
            "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Answer in French."}]},
            "tools": [{"functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string"},
                            "unit": {"type": "string", "nullable": true, "enum": ["c", "f"]}
                        },
                        "required": ["location"]
                    }
                },
                {"name": "get_time"}
            ]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
            "generationConfig": {
                "temperature": 1.5,
                "topP": 0.9,
                "maxOutputTokens": 256,
                "seed": 42,
                "stopSequences": ["END"]
            }
        })
    );
}

#[test]
fn tool_choice_maps_to_function_calling_modes() {
    let check = |choice: ToolChoice, expected: Value| {
        let mut request = hello();
        request.tools = vec![weather_tool()];
        request.tool_choice = Some(choice);
        let body = wire_json(&build_request(&request).unwrap());
        assert_eq!(body["toolConfig"]["functionCallingConfig"], expected);
    };
    check(ToolChoice::Auto, json!({"mode": "AUTO"}));
    check(ToolChoice::None, json!({"mode": "NONE"}));
    check(ToolChoice::Required, json!({"mode": "ANY"}));
}

#[test]
fn response_format_sets_mime_type_and_schema() {
    let mut request = hello();
    request.response_format = Some(ResponseFormat::JsonObject);
    let body = wire_json(&build_request(&request).unwrap());
    assert_eq!(
        body["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );

    request.response_format = Some(ResponseFormat::JsonSchema {
        name: "city".to_owned(),
        schema: r#"{"type":"object","properties":{"name":{"type":"string"}},"additionalProperties":false}"#
            .to_owned(),
    });
    let body = wire_json(&build_request(&request).unwrap());
    assert_eq!(
        body["generationConfig"],
        json!({
            "responseMimeType": "application/json",
            "responseSchema": {"type": "object", "properties": {"name": {"type": "string"}}}
        })
    );
    // A plain request sends no generation config at all.
    let body = wire_json(&build_request(&hello()).unwrap());
    assert_eq!(body.get("generationConfig"), None);
    assert_eq!(body.get("systemInstruction"), None);
}

#[test]
fn invalid_requests_are_rejected_before_the_call() {
    let check = |request: RequestIntent, needle: &str| {
        let error = build_request(&request).unwrap_err();
        assert_eq!(error.kind, FailureKind::BadRequest, "{error}");
        assert!(error.message.contains(needle), "{error}");
    };
    let mut orphan = hello();
    orphan.messages.push(Message::tool_result("call_9", "42"));
    check(orphan, "answers no earlier assistant tool call");

    let mut bad_schema = hello();
    bad_schema.tools = vec![ToolDefinition {
        parameters: "{".to_owned(),
        ..weather_tool()
    }];
    check(bad_schema, "not valid JSON");

    let mut bad_arguments = hello();
    bad_arguments
        .messages
        .push(assistant_calling(&[("call_0", "get_weather", "{oops")]));
    check(bad_arguments, "arguments of tool call");

    let mut format_with_tools = hello();
    format_with_tools.tools = vec![weather_tool()];
    format_with_tools.response_format = Some(ResponseFormat::JsonObject);
    check(
        format_with_tools,
        "gemini does not support response_format json_object together with tools",
    );

    let mut unknown_choice = hello();
    unknown_choice.tools = vec![weather_tool()];
    unknown_choice.tool_choice = Some(ToolChoice::Function {
        name: "nope".to_owned(),
    });
    check(unknown_choice, "does not define");
}

#[tokio::test]
async fn unsafe_model_names_are_rejected_without_a_call() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(fixture!("generate_text.json")))
        .expect(0)
        .mount(&server)
        .await;
    for model in [
        "../files",
        "gemini?key=x",
        "gemini-2.5-flash:streamGenerateContent",
        "",
    ] {
        let mut request = hello();
        request.model = ModelId::new(model);
        let error = provider(&server).chat(call(request)).await.unwrap_err();
        assert_eq!(error.kind, FailureKind::BadRequest, "{model}: {error}");
    }
}

#[tokio::test]
async fn plain_reply_is_normalized_and_key_stays_out_of_the_url() {
    let server = MockServer::start().await;
    mount(
        &server,
        "gemini-2.5-flash:generateContent",
        json_body(fixture!("generate_text.json")),
    )
    .await;
    let mut request = hello();
    request.messages.insert(0, Message::system("Be nice."));
    let response = provider(&server).chat(call(request)).await.unwrap();
    assert_eq!(response.content, "Hello! How can I help you today?");
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(response.model, ModelId::new("gemini-2.5-flash"));
    assert_eq!(
        response.usage,
        Some(TokenUsage {
            prompt_tokens: 8,
            completion_tokens: 12 + 40,
            cached_tokens: 4,
        })
    );
    assert_eq!(response.quota, None);

    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests[0].url.query(), None);
    assert!(!requests[0].url.as_str().contains(KEY));
    let body = sent_body(&server).await;
    assert_eq!(
        body,
        json!({
            "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
            "systemInstruction": {"parts": [{"text": "Be nice."}]}
        })
    );
}

#[tokio::test]
async fn function_call_reply_becomes_numbered_tool_calls() {
    let server = MockServer::start().await;
    mount(
        &server,
        "gemini-2.5-flash:generateContent",
        json_body(fixture!("generate_function_call.json")),
    )
    .await;
    let mut request = hello();
    request.tools = vec![weather_tool()];
    let response = provider(&server).chat(call(request)).await.unwrap();
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(response.content, "");
    let ids: Vec<&str> = response.tool_calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["call_0", "call_1"]);
    assert_eq!(response.tool_calls[0].name, "get_weather");
    let arguments: Value = serde_json::from_str(&response.tool_calls[0].arguments).unwrap();
    assert_eq!(arguments, json!({"location": "Paris"}));
    assert_eq!(response.model, ModelId::new("gemini-2.5-pro"));
}

#[tokio::test]
async fn safety_stop_and_blocked_prompt_are_content_filtered() {
    for fixture in [
        fixture!("generate_safety.json"),
        fixture!("generate_prompt_blocked.json"),
    ] {
        let server = MockServer::start().await;
        mount(
            &server,
            "gemini-2.5-flash:generateContent",
            json_body(fixture),
        )
        .await;
        let response = provider(&server).chat(call(hello())).await.unwrap();
        assert_eq!(response.finish_reason, FinishReason::ContentFilter);
        assert_eq!(response.content, "");
        assert!(response.usage.unwrap().prompt_tokens > 0);
    }
}

#[tokio::test]
async fn reply_without_candidates_is_a_server_error() {
    let server = MockServer::start().await;
    let error = chat_error(
        &server,
        json_body(r#"{"modelVersion": "gemini-2.5-flash"}"#),
    )
    .await;
    assert_eq!(error.kind, FailureKind::ServerError);
}

#[tokio::test]
async fn text_stream_yields_parts_then_finish_and_last_usage() {
    let server = MockServer::start().await;
    mount_stream(&server, fixture!("stream_text.sse")).await;
    let chunks: Vec<ChatChunk> = stream_items(&server, hello())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "The quick brown fox jumps.");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        last.usage,
        Some(TokenUsage {
            prompt_tokens: 9,
            completion_tokens: 26,
            cached_tokens: 0,
        })
    );
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.finish_reason.is_none() && c.usage.is_none())
    );
}

#[tokio::test]
async fn function_call_stream_yields_complete_indexed_calls() {
    let server = MockServer::start().await;
    mount_stream(&server, fixture!("stream_function_call.sse")).await;
    let mut request = hello();
    request.tools = vec![weather_tool()];
    let chunks: Vec<ChatChunk> = stream_items(&server, request)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(chunks[0].text, "Checking both.");
    let deltas: Vec<&ToolCallDelta> = chunks.iter().flat_map(|c| &c.tool_calls).collect();
    assert_eq!(
        deltas,
        [
            &ToolCallDelta {
                index: 0,
                id: Some("call_0".to_owned()),
                name: Some("get_weather".to_owned()),
                arguments: r#"{"location":"Paris"}"#.to_owned(),
            },
            &ToolCallDelta {
                index: 1,
                id: Some("call_1".to_owned()),
                name: Some("get_time".to_owned()),
                arguments: r#"{"timezone":"Europe/Paris"}"#.to_owned(),
            },
        ]
    );
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(last.usage.unwrap().completion_tokens, 21);
}

#[tokio::test]
async fn stream_without_finish_reason_ends_with_a_network_error() {
    let server = MockServer::start().await;
    mount_stream(&server, fixture!("stream_truncated.sse")).await;
    let items = stream_items(&server, hello()).await;
    assert_eq!(items.len(), 3, "{items:?}");
    let error = items[2].as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Network);
    assert!(error.message.contains("finish reason"), "{error}");
}

#[tokio::test]
async fn stream_cut_inside_an_event_ends_with_a_network_error() {
    let server = MockServer::start().await;
    mount_stream(&server, fixture!("stream_cut_mid_event.sse")).await;
    let items = stream_items(&server, hello()).await;
    let error = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Network, "{error}");
}

#[tokio::test]
async fn error_event_in_a_stream_is_classified() {
    let server = MockServer::start().await;
    mount_stream(&server, fixture!("stream_error.sse")).await;
    let items = stream_items(&server, hello()).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap().text, "The quick");
    let error = items[1].as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(error.message.contains("overloaded"), "{error}");
}

#[tokio::test]
async fn stream_that_fails_before_starting_returns_the_classified_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        ))
        .respond_with(
            ResponseTemplate::new(429)
                .set_body_raw(fixture!("error_rate_limit.json"), "application/json"),
        )
        .mount(&server)
        .await;
    let error = provider(&server)
        .chat_stream(call(hello()))
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::RateLimited);
    assert_eq!(error.retry_after, Some(Duration::from_secs(41)));
}

#[tokio::test]
async fn error_statuses_are_classified() {
    let cases = [
        (
            429,
            fixture!("error_rate_limit.json"),
            FailureKind::RateLimited,
        ),
        (
            429,
            fixture!("error_quota_exhausted.json"),
            FailureKind::QuotaExhausted,
        ),
        (
            403,
            fixture!("error_permission_denied.json"),
            FailureKind::Unauthorized,
        ),
        (
            400,
            fixture!("error_api_key_invalid.json"),
            FailureKind::Unauthorized,
        ),
        (
            400,
            fixture!("error_invalid_argument.json"),
            FailureKind::BadRequest,
        ),
        (
            500,
            fixture!("error_internal.json"),
            FailureKind::ServerError,
        ),
        (
            503,
            fixture!("error_unavailable.json"),
            FailureKind::ServerError,
        ),
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
        assert_eq!(error.quota, None);
    }
}

#[tokio::test]
async fn rate_limit_carries_google_retry_delay() {
    let server = MockServer::start().await;
    let error = chat_error(
        &server,
        ResponseTemplate::new(429)
            .set_body_raw(fixture!("error_rate_limit.json"), "application/json"),
    )
    .await;
    assert_eq!(error.retry_after, Some(Duration::from_secs(41)));
    assert!(error.message.contains("RESOURCE_EXHAUSTED"), "{error}");
}

#[tokio::test]
async fn malformed_json_is_a_server_error() {
    let server = MockServer::start().await;
    let error = chat_error(&server, json_body(r#"{"candidates": [{"content": "#)).await;
    assert_eq!(error.kind, FailureKind::ServerError);
    assert!(error.message.contains("malformed"), "{error}");
}

#[tokio::test]
async fn error_body_under_status_200_is_classified() {
    let server = MockServer::start().await;
    let error = chat_error(&server, json_body(fixture!("error_permission_denied.json"))).await;
    assert_eq!(error.kind, FailureKind::Unauthorized);
    assert_eq!(error.status, Some(200));
}

#[tokio::test]
async fn unexpected_content_type_is_a_server_error() {
    let server = MockServer::start().await;
    let error = chat_error(
        &server,
        ResponseTemplate::new(200).set_body_raw("<html>sign in</html>", "text/html"),
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
        "gemini-2.5-flash:generateContent",
        json_body(fixture!("generate_text.json")).set_delay(Duration::from_secs(3)),
    )
    .await;
    let provider = GeminiProvider::new(
        format!("{}/v1beta", server.uri()),
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
        r#"{{"error":{{"code":400,"message":"API key {KEY} not valid.","status":"INVALID_ARGUMENT","details":[{{"reason":"API_KEY_INVALID"}}]}}}}"#
    );
    let error = chat_error(
        &server,
        ResponseTemplate::new(400).set_body_raw(body, "application/json"),
    )
    .await;
    assert_eq!(error.kind, FailureKind::Unauthorized);
    assert!(!error.to_string().contains(KEY));
}

fn embedding_call(model: &str, input: &[&str]) -> EmbeddingCall {
    EmbeddingCall {
        key_id: KeyId::new("gemini-1"),
        material: material(),
        model: ModelId::new(model),
        input: Arc::new(input.iter().map(|t| (*t).to_owned()).collect()),
        dimensions: Some(4),
    }
}

#[tokio::test]
async fn embeddings_use_batch_embed_contents() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1beta/models/text-embedding-004:batchEmbedContents"))
        .and(header("x-goog-api-key", KEY))
        .respond_with(json_body(fixture!("batch_embed.json")))
        .mount(&server)
        .await;
    let response = provider(&server)
        .embed(embedding_call("text-embedding-004", &["hello", "world"]))
        .await
        .unwrap();
    assert_eq!(response.vectors.len(), 2);
    assert_eq!(response.vectors[1], vec![-0.0233, 0.0151, 0.0542, -0.0045]);
    assert_eq!(response.model, ModelId::new("text-embedding-004"));
    assert_eq!(response.usage, None);
    assert_eq!(
        sent_body(&server).await,
        json!({"requests": [
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 4},
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": "world"}]}, "outputDimensionality": 4}
        ]})
    );
}

#[tokio::test]
async fn embeddings_count_mismatch_is_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_body(fixture!("batch_embed.json")))
        .mount(&server)
        .await;
    let error = provider(&server)
        .embed(embedding_call("gemini-embedding-001", &["only one"]))
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    let error = provider(&server)
        .embed(embedding_call("gemini-embedding-001", &[]))
        .await
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
}

#[test]
fn models_and_kind() {
    let provider = GeminiProvider::new(
        "https://generativelanguage.googleapis.com/v1beta",
        settings(),
    )
    .unwrap();
    assert_eq!(provider.kind(), "gemini");
    let ModelSet::Only(models) = provider.default_models() else {
        panic!("expected a model list");
    };
    for model in [
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "text-embedding-004",
        "gemini-embedding-001",
    ] {
        assert!(models.contains(&ModelId::new(model)), "{model}");
    }
    assert!(!models.iter().any(|m| m.as_str().starts_with("gpt")));
    assert!(format!("{provider:?}").contains("generativelanguage"));
    assert_eq!(
        GeminiProvider::new("", settings()).unwrap_err().kind,
        FailureKind::BadRequest
    );
}
