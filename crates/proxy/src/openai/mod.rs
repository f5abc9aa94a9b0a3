//! The OpenAI-compatible API: `POST /v1/chat/completions` (JSON and SSE),
//! `POST /v1/embeddings`, `GET /v1/models`.
//!
//! Handlers are thin: authenticate, parse, call the router, shape the answer.

mod convert;
pub mod headers;
pub mod wire;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use apikeyrouter::config::VIRTUAL_KEY_TAG;
use apikeyrouter::{
    ClientLimit, EmbeddingIntent, ModelId, Objective, RequestContext, RequestId, TenantId,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::auth::VirtualKey;
use crate::errors::ApiError;
use crate::metrics::Timed;
use crate::path::PathId;
use crate::state::AppState;
use headers::RoutingHeaders;
use wire::{
    EmbeddingData, EmbeddingInput, EmbeddingList, EmbeddingRequest, EmbeddingUsage, ModelEntry,
    ModelList,
};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses a JSON body, answering 400/413 in OpenAI's shape.
pub fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                "The request body is too large.",
            )
        } else {
            ApiError::bad_request(
                "invalid_body",
                format!("The request body could not be read: {e}"),
            )
        }
    })?;
    // One UTF-8 pass over the body instead of one per string (see `parse_body` in
    // the provider adapters).
    let text = std::str::from_utf8(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("The request body is not valid JSON: it is not UTF-8 ({e})"),
        )
    })?;
    serde_json::from_str(text).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "is not valid JSON"
        } else {
            "does not match the expected shape"
        };
        ApiError::bad_request("invalid_json", format!("The request body {what}: {e}"))
    })
}

/// A routed call that runs to completion even when its client hangs up: the HTTP
/// server then drops the handler, and the rest of the call is handed to a task of
/// its own, so it finishes, its cost is settled and its record written (the provider
/// bills it anyway) and no budget reservation is left held. Boxed so that it can be
/// moved when that happens; spawning every call instead cost 6% more instructions
/// per request (callgrind). Streams settle on drop instead (`RoutedStream`).
struct Completing<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    call: Option<Pin<Box<F>>>,
}

fn run_to_completion<F>(call: F) -> Completing<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Completing {
        call: Some(Box::pin(call)),
    }
}

impl<F> Future for Completing<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(call) = self.call.as_mut() else {
            // Already finished: a future is not polled again after `Ready`.
            return Poll::Pending;
        };
        let output = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for Completing<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = call.await;
                });
            }
            Err(_) => tracing::error!("a routed call was cut off outside a runtime"),
        }
    }
}

/// `value` as a JSON response, as `axum::Json` makes it but written into a buffer the
/// size of a typical completion, which axum's (128 bytes to start) grew three times.
fn json_response<T: serde::Serialize>(value: &T) -> Response {
    let mut body = Vec::with_capacity(1024);
    match serde_json::to_writer(&mut body, value) {
        Ok(()) => {
            let mut response = Response::new(axum::body::Body::from(body));
            let headers = response.headers_mut();
            // Room for the routing headers written next, so the map is allocated once.
            headers.reserve(8);
            headers.insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "response not serialised");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "internal_error",
                "The response could not be written.",
            )
            .into_response()
        }
    }
}

/// A client's request: its headers, its virtual key, and its body, read only once the
/// credentials are checked (a stranger gets 401 without the server buffering up to
/// `max_body_bytes` for it). axum's `HeaderMap` extractor clones the headers (and each
/// value's buffer on first share); this moves them out of the request instead.
pub struct ClientRequest {
    headers: HeaderMap,
    client: Option<Arc<VirtualKey>>,
    body: Result<Bytes, BytesRejection>,
}

impl std::fmt::Debug for ClientRequest {
    /// Says nothing of the headers: they carry the client's credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRequest").finish_non_exhaustive()
    }
}

impl FromRequest<Arc<AppState>> for ClientRequest {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        let client = state.auth().client(&headers)?;
        // The body limit travels in the extensions, which stay with the body.
        let body = Bytes::from_request(Request::from_parts(parts, body), state).await;
        Ok(Self {
            headers,
            client,
            body,
        })
    }
}

const OBJECTIVE: HeaderName = HeaderName::from_static("x-apikeyrouter-objective");
const TAGS: HeaderName = HeaderName::from_static("x-apikeyrouter-tags");
const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// What the routing headers and the client's credential say about a request.
struct Routing {
    ctx: RequestContext,
    objective: Objective,
    tenant: Option<TenantId>,
    tags: BTreeMap<String, String>,
}

/// How a request routes: `client` is its virtual key, checked before its body is
/// parsed (a request without valid credentials gets 401 whatever its body).
fn routing(
    state: &AppState,
    headers: &HeaderMap,
    client: Option<Arc<VirtualKey>>,
    model: &str,
) -> Result<Routing, ApiError> {
    if let Some(vk) = &client {
        if !vk.allows(&ModelId::new(model)) {
            return Err(ApiError::forbidden(
                "model_not_allowed",
                format!("This API key may not use model `{model}`."),
            )
            .with_param("model"));
        }
    }
    let header = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let request_id = match header(&headers::REQUEST_ID) {
        Some(id) if id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()) => {
            Some(RequestId::new(id))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_header",
                "x-request-id must be at most 128 visible ASCII characters.",
            ));
        }
        None => None,
    };
    let mut objective = match header(&OBJECTIVE) {
        Some(spec) => Objective::parse(spec).map_err(|e| {
            ApiError::bad_request("invalid_header", format!("x-apikeyrouter-objective: {e}"))
        })?,
        None => state.router.core().settings().objective.clone(),
    };
    let mut tags = BTreeMap::new();
    if let Some(list) = header(&TAGS) {
        for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .filter(|(k, v)| !k.trim().is_empty() && !v.trim().is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_header",
                        format!("x-apikeyrouter-tags: {pair:?} is not name=value"),
                    )
                })?;
            let k = k.trim();
            if k == VIRTUAL_KEY_TAG {
                // Set by the proxy from the credentials: a client naming another
                // virtual key would charge that key's budget.
                return Err(ApiError::bad_request(
                    "invalid_header",
                    format!(
                        "x-apikeyrouter-tags: {VIRTUAL_KEY_TAG} is set by the proxy from the API key"
                    ),
                ));
            }
            tags.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    let tenant = client.as_ref().and_then(|vk| vk.tenant.clone());
    if let Some(vk) = &client {
        tags.insert(VIRTUAL_KEY_TAG.to_owned(), vk.name.clone());
        if let Some(models) = &vk.models {
            objective.constraints.allowed_models = Some(models.clone());
        }
    }
    let correlation_id = header(&CORRELATION_ID).map(str::to_owned);
    Ok(Routing {
        ctx: RequestContext {
            request_id,
            correlation_id,
            // Counted in the store with the request's first charge, so the limit holds
            // across every instance sharing it.
            client: client.as_ref().and_then(|vk| {
                vk.rpm.map(|rpm| ClientLimit {
                    client: vk.name.clone(),
                    rpm,
                })
            }),
        },
        objective,
        tenant,
        tags,
    })
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ClientRequest {
        headers,
        client,
        body,
    }: ClientRequest,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request: wire::ChatRequest = parse_json(body)?;
    let stream = request.stream;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let r = routing(&state, &headers, client, &request.model)?;
    let mut intent = convert::intent(request)?;
    intent.tenant = r.tenant;
    intent.tags = r.tags;
    let created = unix_now();
    if stream {
        // Boxed: awaited inline, its 4 KB future made the handler's 5 KB, copied
        // whole at every move on the way in (callgrind: 58 fewer D1 write misses
        // per request on the non-streamed path).
        let routed = Box::pin(state.router.core().router().route_stream(
            intent,
            &r.objective,
            r.ctx,
        ))
        .await
        .map_err(|e| ApiError::from_route(&e))?;
        let id = wire::CompletionId(routed.request_id.clone()).to_string();
        let model = routed.model.to_string();
        // The cost is known only when the stream ends, after the headers.
        let routing_headers = RoutingHeaders::new(
            &routed.request_id,
            &routed.key_id,
            &routed.provider,
        )
        .with_amounts(None, routed.estimated_cost, None);
        // Counted when the stream settles, so that a stream its client left still
        // adds the tokens generated and their cost.
        let (provider, model_id) = (routed.provider.clone(), routed.model.clone());
        let attempts = routed.attempts.len() + 1;
        let metrics_state = state.clone();
        // The settled cost, for the comment sent before `[DONE]`.
        let settled_cost = Arc::new(std::sync::OnceLock::new());
        let cost_slot = settled_cost.clone();
        let routed = routed.on_settled(move |totals| {
            if let Some(cost) = totals.cost {
                let _ = cost_slot.set(cost);
            }
            metrics_state.metrics.record_usage(
                &provider,
                &model_id,
                totals.usage.prompt_tokens,
                totals.usage.completion_tokens,
                totals.cost.map(apikeyrouter::Money::as_usd),
                attempts,
            );
        });
        let mut first = true;
        let events = routed
            .map(move |item| match item {
                Ok(chunk) => {
                    let mut out = Vec::with_capacity(2);
                    let json = convert::chunk(&id, &model, created, &chunk, first);
                    first = false;
                    if !(json.choices[0].delta.content.as_deref().unwrap_or_default().is_empty()
                        && json.choices[0].delta.tool_calls.is_none()
                        && json.choices[0].finish_reason.is_none()
                        && json.choices[0].delta.role.is_none())
                    {
                        out.push(Event::default().json_data(&json));
                    }
                    if let (Some(u), true) = (&chunk.usage, include_usage) {
                        out.push(Event::default().json_data(convert::usage_chunk(&id, &model, created, u)));
                    }
                    out
                }
                Err(e) => {
                    let body = serde_json::json!({"error": {"message": format!("The upstream stream failed: {}", e.kind.as_str()), "type": "api_error", "param": null, "code": "upstream_stream_error"}});
                    vec![Event::default().json_data(body)]
                }
            })
            .flat_map(futures_util::stream::iter)
            .map(|event| Ok::<Event, Infallible>(event.unwrap_or_else(|_| Event::default().data("{}"))))
            .chain(futures_util::stream::iter(std::iter::from_fn(move || {
                // Headers went out before the cost was known: it follows as an SSE
                // comment, which clients and SDKs skip, for those that want it.
                settled_cost.get().map(|cost: &apikeyrouter::Money| {
                    Ok(Event::default().comment(format!("x-apikeyrouter-cost-usd: {}", cost.usd_decimal())))
                })
            }).take(1)))
            .chain(futures_util::stream::once(async { Ok(Event::default().data("[DONE]")) }));
        let mut response = Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response();
        routing_headers.write(response.headers_mut());
        state
            .metrics
            .observe_latency(Timed::Chat, started.elapsed());
        return Ok(response);
    }
    let router = state.router.core().router();
    // Counted inside the call: it also finishes when the client has hung up.
    let counting = state.clone();
    let served = run_to_completion(async move {
        let served = router.route(intent, &r.objective, r.ctx).await?;
        counting.metrics.record_usage(
            &served.provider,
            &served.model,
            served.usage.prompt_tokens,
            served.usage.completion_tokens,
            served.actual_cost.map(apikeyrouter::Money::as_usd),
            served.attempts.len(),
        );
        Ok(served)
    })
    .await
    .map_err(|e| ApiError::from_route(&e))?;
    let routing_headers = RoutingHeaders::new(&served.request_id, &served.key_id, &served.provider)
        .with_amounts(
            served.actual_cost,
            served.estimated_cost,
            served.budget_remaining(),
        );
    let mut response = json_response(&convert::completion(served, created));
    routing_headers.write(response.headers_mut());
    state
        .metrics
        .observe_latency(Timed::Chat, started.elapsed());
    Ok(response)
}

/// `POST /v1/embeddings`
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    ClientRequest {
        headers,
        client,
        body,
    }: ClientRequest,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request: EmbeddingRequest = parse_json(body)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("encoding_format must be float or base64, got {other:?}."),
            )
            .with_param("encoding_format"));
        }
    };
    let input = match request.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
        EmbeddingInput::Tokens(_) => {
            return Err(ApiError::bad_request(
                "unsupported_value",
                "Token-array inputs are not supported; send text.",
            )
            .with_param("input"));
        }
    };
    let r = routing(&state, &headers, client, &request.model)?;
    let intent = EmbeddingIntent {
        model: request.model.as_str().into(),
        input,
        dimensions: request.dimensions,
        tenant: r.tenant,
        tags: r.tags,
    };
    let router = state.router.core().router();
    // Counted inside the call: it also finishes when the client has hung up.
    let counting = state.clone();
    let served = run_to_completion(async move {
        let served = router.route_embeddings(intent, &r.objective, r.ctx).await?;
        counting.metrics.record_usage(
            &served.provider,
            &served.model,
            served.usage.prompt_tokens,
            0,
            served.actual_cost.map(apikeyrouter::Money::as_usd),
            served.attempts.len(),
        );
        Ok(served)
    })
    .await
    .map_err(|e| ApiError::from_route(&e))?;
    let data = served
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            },
        })
        .collect();
    let body = EmbeddingList {
        object: "list",
        data,
        model: served.model.to_string(),
        usage: EmbeddingUsage {
            prompt_tokens: served.usage.prompt_tokens,
            total_tokens: served.usage.prompt_tokens,
        },
    };
    let mut response = json_response(&body);
    RoutingHeaders::new(&served.request_id, &served.key_id, &served.provider)
        .with_amounts(
            served.actual_cost,
            served.estimated_cost,
            served.budget_remaining(),
        )
        .write(response.headers_mut());
    state
        .metrics
        .observe_latency(Timed::Embeddings, started.elapsed());
    Ok(response)
}

/// `GET /v1/models`: the models the registered providers serve and some key of the
/// caller can use.
pub async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let data = visible_models(&state, &headers).await?;
    Ok(axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response())
}

/// `GET /v1/models/{model}`: one of those models, or 404 as OpenAI answers for a model
/// the caller cannot use. The id may hold slashes (`meta-llama/Llama-3-70b`).
pub async fn model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    visible_models(&state, &headers)
        .await?
        .into_iter()
        .find(|entry| entry.id == id)
        .map(|entry| axum::Json(entry).into_response())
        .ok_or_else(|| {
            ApiError::not_found(
                "model_not_found",
                format!("The model `{id}` does not exist or no configured key serves it."),
            )
            .with_param("model")
        })
}

/// The models the configured keys can serve, within the virtual key's tenant and
/// allowed models when there is one.
async fn visible_models(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Vec<ModelEntry>, ApiError> {
    let client = state.auth().client(headers)?;
    let tenant = client.as_ref().and_then(|vk| vk.tenant.as_ref());
    let served = state.router.served_models(tenant).await.map_err(|e| {
        // The store's own words (addresses, names) stay in the log.
        tracing::warn!(error = %e, "models not listed: store failure");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "store_unavailable",
            "The state store is unavailable.",
        )
    })?;
    Ok(served
        .into_iter()
        .filter(|(model, _)| client.as_ref().is_none_or(|vk| vk.allows(model)))
        .map(|(id, owned_by)| ModelEntry {
            id: id.to_string(),
            object: "model",
            created: 0,
            owned_by: owned_by.to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::body::to_bytes;

    use super::*;

    #[tokio::test]
    async fn a_body_that_cannot_be_serialised_is_a_500_in_openai_shape() {
        // JSON object keys must be strings: a map keyed by pairs cannot be written.
        let unwritable = BTreeMap::from([((1u8, 2u8), 3u8)]);
        let response = json_response(&unwritable);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = to_bytes(response.into_body(), 4096).await.unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "internal_error");
        assert_eq!(json["error"]["type"], "api_error");
        assert_eq!(
            json["error"]["message"],
            "The response could not be written."
        );
    }

    #[tokio::test]
    async fn a_serialisable_body_is_json() {
        let response = json_response(&serde_json::json!({ "ok": true }));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[axum::http::header::CONTENT_TYPE],
            "application/json"
        );
        let body = to_bytes(response.into_body(), 4096).await.unwrap();
        assert_eq!(&body[..], br#"{"ok":true}"#);
    }
}
