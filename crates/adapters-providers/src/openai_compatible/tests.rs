//! Tests of the OpenAI-compatible adapter against local wiremock servers: plain
//! compatible servers (Bearer auth under any base path) and Azure's URL and header
//! shape.

use std::sync::Arc;

use apikeyrouter_application::ports::{EmbeddingCall, FinishReason, ModelSet, Provider};
use apikeyrouter_domain::{FailureKind, KeyId, ModelId};
use futures_util::StreamExt;
use serde_json::json;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::{AzureSettings, OpenAiCompatibleProvider};
use crate::http::HttpSettings;
use crate::openai::tests::{
    CHAT_COMPLETION, EMBEDDINGS, ERROR_RATE_LIMIT, KEY, MODELS, STREAM_TEXT, assert_no_key,
    collect_ok, hello, json_body, material, received_bodies, sse_body,
};

const API_VERSION: &str = "2024-10-21";

fn azure(server: &MockServer) -> OpenAiCompatibleProvider {
    OpenAiCompatibleProvider::azure(
        server.uri(),
        AzureSettings::new(API_VERSION),
        HttpSettings::default(),
    )
    .unwrap()
}

#[tokio::test]
async fn compatible_server_gets_openai_requests_under_its_base_path() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/openai/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(json_body(CHAT_COMPLETION))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/openai/v1/models"))
        .respond_with(json_body(MODELS))
        .mount(&server)
        .await;
    let provider = OpenAiCompatibleProvider::new(
        format!("{}/openai/v1/", server.uri()),
        HttpSettings::default(),
    )
    .unwrap();
    assert_eq!(provider.kind(), "openai-compatible");
    assert_eq!(provider.default_models(), ModelSet::Any);

    let reply = provider.chat(hello("llama-3.1-8b-instant")).await.unwrap();
    assert_eq!(reply.content, "Hello! How can I assist you today?");
    assert_eq!(reply.finish_reason, FinishReason::Stop);
    assert_eq!(
        received_bodies(&server).await[0]["model"],
        json!("llama-3.1-8b-instant")
    );
    assert_eq!(provider.list_models(&material()).await.unwrap().len(), 3);
}

#[test]
fn listed_models_restrict_the_default_set() {
    let provider =
        OpenAiCompatibleProvider::new("http://localhost:11434/v1", HttpSettings::default())
            .unwrap()
            .with_models(vec![ModelId::new("llama3.2")]);
    assert_eq!(
        provider.default_models(),
        ModelSet::Only(vec![ModelId::new("llama3.2")])
    );
}

#[tokio::test]
async fn azure_chat_uses_the_deployment_url_api_version_and_api_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/openai/deployments/my-gpt4o/chat/completions"))
        .and(query_param("api-version", API_VERSION))
        .and(header("api-key", KEY))
        .respond_with(json_body(CHAT_COMPLETION))
        .expect(1)
        .mount(&server)
        .await;
    let reply = azure(&server).chat(hello("my-gpt4o")).await.unwrap();
    assert_eq!(reply.usage.map(|u| u.prompt_tokens), Some(19));
    let request = &server.received_requests().await.unwrap()[0];
    assert!(
        request.headers.get("authorization").is_none(),
        "azure must not get a bearer token"
    );
}

#[tokio::test]
async fn azure_streams_skip_filter_result_chunks() {
    let server = MockServer::start().await;
    // Azure opens with a chunk that has no choices, only prompt filter results.
    let body = format!(
        "data: {{\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\
         \"prompt_filter_results\":[{{\"prompt_index\":0,\"content_filter_results\":{{}}}}]}}\n\n{STREAM_TEXT}"
    );
    Mock::given(method("POST"))
        .and(path("/openai/deployments/my-gpt4o/chat/completions"))
        .and(query_param("api-version", API_VERSION))
        .and(header("api-key", KEY))
        .respond_with(sse_body(&body))
        .mount(&server)
        .await;
    let chunks = collect_ok(&azure(&server), hello("my-gpt4o")).await;
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "Hello world");
    assert!(chunks.last().unwrap().usage.is_some());
}

#[tokio::test]
async fn azure_embeddings_and_models_use_azure_paths() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/openai/deployments/embed-small/embeddings"))
        .and(query_param("api-version", API_VERSION))
        .and(header("api-key", KEY))
        .respond_with(json_body(EMBEDDINGS))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/openai/models"))
        .and(query_param("api-version", API_VERSION))
        .and(header("api-key", KEY))
        .respond_with(json_body(MODELS))
        .mount(&server)
        .await;
    let provider = azure(&server);
    let reply = provider
        .embed(EmbeddingCall {
            key_id: KeyId::new("key-1"),
            material: material(),
            model: ModelId::new("embed-small"),
            input: Arc::new(vec!["a".to_owned(), "b".to_owned()]),
            dimensions: None,
        })
        .await
        .unwrap();
    assert_eq!(reply.vectors.len(), 2);
    assert_eq!(provider.list_models(&material()).await.unwrap().len(), 3);
}

#[tokio::test]
async fn azure_errors_are_classified_without_the_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .set_body_raw(ERROR_RATE_LIMIT, "application/json")
                .insert_header("retry-after-ms", "1500")
                .insert_header("x-ratelimit-remaining-tokens", "0"),
        )
        .mount(&server)
        .await;
    let error = azure(&server).chat(hello("my-gpt4o")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::RateLimited);
    assert_eq!(
        error.retry_after,
        Some(std::time::Duration::from_millis(1_500))
    );
    assert_eq!(error.quota.and_then(|q| q.remaining_tokens), Some(0));
    assert_no_key(&error);
}

#[tokio::test]
async fn deployment_names_are_escaped_in_the_path() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/openai/deployments/a%2Fb/chat/completions"))
        .respond_with(json_body(CHAT_COMPLETION))
        .expect(1)
        .mount(&server)
        .await;
    let start = azure(&server).chat(hello("a/b")).await;
    assert!(start.is_ok(), "{start:?}");
}

#[test]
fn azure_needs_an_api_version() {
    let error = OpenAiCompatibleProvider::azure(
        "https://my-resource.openai.azure.com",
        AzureSettings::new(" "),
        HttpSettings::default(),
    )
    .unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
}

#[tokio::test]
async fn compatible_stream_without_done_but_finished_is_complete() {
    // Some compatible servers close the stream after the finish reason without
    // sending `[DONE]`.
    let server = MockServer::start().await;
    let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n\
                data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n";
    Mock::given(method("POST"))
        .respond_with(sse_body(body))
        .mount(&server)
        .await;
    let provider =
        OpenAiCompatibleProvider::new(format!("{}/v1", server.uri()), HttpSettings::default())
            .unwrap();
    let start = provider.chat_stream(hello("qwen2.5")).await.unwrap();
    let items: Vec<_> = start.chunks.collect().await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        items[1].as_ref().unwrap().finish_reason,
        Some(FinishReason::Length)
    );
}
