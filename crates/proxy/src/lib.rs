//! The `apikeyrouter` proxy: an OpenAI-compatible HTTP API in front of the router, a
//! management API, virtual keys, metrics, and the command line.
//!
//! Handlers are thin (extract, call the facade, shape the answer). This crate depends
//! on the `apikeyrouter` facade only, never on adapters or inner layers directly.

pub mod admin;
pub mod auth;
pub mod demo;
pub mod errors;
pub mod metrics;
pub mod openai;
pub mod path;
pub mod server;
pub mod state;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tower::{Layer, Service};

use crate::errors::{ApiError, ErrorDetails};
use crate::metrics::RequestLabels;
use crate::state::AppState;

/// The HTTP application: the routes, inside the request counter and the body limit.
///
/// The two wrap the router once rather than being `Router::layer`s, which wrap every
/// route and so clone and box each layer's service per request (14 allocations).
pub fn app(
    state: Arc<AppState>,
) -> impl Service<Request, Response = Response, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    let max_body_bytes = state.max_body_bytes;
    let routes = routes(state.clone());
    let counted = middleware::from_fn_with_state(state, count_requests).layer(routes);
    DefaultBodyLimit::max(max_body_bytes).layer(counted)
}

fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*model}", get(openai::model))
        .route(
            "/api/v1/keys",
            post(admin::create_key).get(admin::list_keys),
        )
        .route(
            "/api/v1/keys/{id}",
            get(admin::get_key)
                .patch(admin::update_key)
                .delete(admin::delete_key),
        )
        .route("/api/v1/keys/{id}/state", put(admin::set_key_state))
        .route("/api/v1/keys/{id}/quota", get(admin::key_quota))
        .route("/api/v1/keys/{id}/transitions", get(admin::key_transitions))
        .route(
            "/api/v1/budgets",
            get(admin::list_budgets).post(admin::create_budget),
        )
        .route(
            "/api/v1/budgets/{id}",
            get(admin::get_budget)
                .put(admin::put_budget)
                .delete(admin::delete_budget),
        )
        .route(
            "/api/v1/virtual_keys",
            get(admin::virtual_keys::list).post(admin::virtual_keys::create),
        )
        .route(
            "/api/v1/virtual_keys/{id}",
            get(admin::virtual_keys::get)
                .patch(admin::virtual_keys::update)
                .delete(admin::virtual_keys::delete),
        )
        .route(
            "/api/v1/virtual_keys/{id}/rotate",
            post(admin::virtual_keys::rotate),
        )
        .route("/api/v1/policies", get(admin::policies))
        .route("/api/v1/providers", get(admin::providers))
        .route("/api/v1/requests/{id}", get(admin::request_record))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the state store answers.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.router.core().ping().await {
        Ok(()) => axum::Json(
            serde_json::json!({ "status": "ready", "store": state.router.core().store_kind() }),
        )
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: store unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "unavailable", "store": state.router.core().store_kind() }))).into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Key states are read at scrape time: they change rarely, scrapes are rare.
    let key_states = state.router.keys().await.ok().map(|keys| {
        let mut counts = foldhash::HashMap::default();
        for k in keys {
            let labels = metrics::KeyStateLabels {
                provider: metrics::IdLabel(k.provider_id.clone()),
                state: k.state.as_str(),
            };
            *counts.entry(labels).or_insert(0) += 1;
        }
        counts
    });
    state.metrics.set_audit(state.router.record_delivery());
    state.metrics.set_store_health(state.router.store_health());
    state
        .metrics
        .set_reclaimed(state.router.reclaimed_reservations());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.scrape(key_states),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "unknown_url",
        "Unknown request URL. See /v1/chat/completions, /v1/embeddings, /v1/models and /api/v1.",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "This method is not allowed on this URL.",
    )
}

/// Counts every answer by endpoint, status and error code, and logs it once.
async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let endpoint = match request.uri().path() {
        "/v1/chat/completions" => "chat",
        "/v1/embeddings" => "embeddings",
        "/v1/models" => "models",
        p if p.starts_with("/api/v1/") => "admin",
        "/health" | "/ready" | "/metrics" => "ops",
        _ => "other",
    };
    // Shares the request's buffer: no copy unless the request is refused.
    let client_id = request.headers().get(&openai::headers::REQUEST_ID).cloned();
    let mut response = next.run(request).await;
    let status = response.status().as_u16();
    let error = response.extensions_mut().remove::<ErrorDetails>();
    let code = error.as_ref().map_or("ok", |e| e.code);
    if let Some(error) = &error {
        log_refusal(&state, &mut response, client_id, endpoint, error);
    }
    state.metrics.count_answer(&RequestLabels {
        endpoint,
        status,
        code,
    });
    tracing::debug!(
        endpoint,
        status,
        code,
        elapsed_us = started.elapsed().as_micros() as u64,
        "answered"
    );
    response
}

/// Logs an answer that is an error with its request id, giving it one (the client's
/// `x-request-id` if valid, else a new one) when it failed before routing assigned
/// one, so that a refusal can be found from the client's side as a served request can.
fn log_refusal(
    state: &AppState,
    response: &mut Response,
    client_id: Option<HeaderValue>,
    endpoint: &str,
    error: &ErrorDetails,
) {
    let headers = response.headers_mut();
    let id = match headers.get(&openai::headers::REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = client_id
                .filter(|id| id.len() <= 128 && id.as_bytes().iter().all(u8::is_ascii_graphic))
                .or_else(|| {
                    HeaderValue::from_str(state.router.core().new_request_id().as_str()).ok()
                });
            let Some(id) = id else { return };
            headers.insert(openai::headers::REQUEST_ID, id.clone());
            id
        }
    };
    let request_id = id.to_str().unwrap_or_default();
    let status = response.status();
    if status.is_server_error() {
        tracing::warn!(request_id, endpoint, status = status.as_u16(), code = error.code, detail = %error.message, "request failed");
    } else {
        tracing::info!(request_id, endpoint, status = status.as_u16(), code = error.code, detail = %error.message, "request refused");
    }
}
