//! The management API under `/api/v1`, behind the admin token: keys, quota, budgets,
//! virtual keys, policies, providers, and the record of a request.

pub mod virtual_keys;

use std::sync::Arc;

use apikeyrouter::config::BudgetConfig;
use apikeyrouter::{
    Budget, BudgetServiceError, KeyId, KeyMetadata, KeyServiceError, KeyState, Money, RequestId,
    StoreError, StoreErrorKind,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::errors::ApiError;
use crate::openai::parse_json;
use crate::path::PathId;
use crate::state::AppState;

/// The admin token was checked: handlers take it first, so a request without the
/// token is refused before its path or body is looked at.
#[derive(Debug)]
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        state.auth().admin.check(&parts.headers)?;
        Ok(Self)
    }
}

fn key_error(e: KeyServiceError) -> ApiError {
    match e {
        KeyServiceError::NotFound(id) => {
            ApiError::not_found("key_not_found", format!("Key {id} not found."))
        }
        KeyServiceError::Store(e) => store_error(&e),
        KeyServiceError::Transition(t) => ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "invalid_transition",
            t.to_string(),
        ),
        other => ApiError::bad_request("invalid_request", other.to_string()),
    }
}

/// A store failure as the management API answers it: an unreachable store is 503
/// (worth retrying), a change that raced another one 409, a record gone meanwhile 404,
/// anything else 500. Store messages name the record, never key material.
fn store_error(e: &StoreError) -> ApiError {
    tracing::warn!(error = %e, kind = ?e.kind, "store failure in management API");
    match e.kind {
        StoreErrorKind::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "store_unavailable",
            "The state store is unavailable.",
        ),
        StoreErrorKind::Conflict => ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "conflict",
            format!(
                "The change conflicts with another made at the same time ({}); read the record again and retry.",
                e.message
            ),
        ),
        StoreErrorKind::NotFound => ApiError::not_found("not_found", format!("{}.", e.message)),
        // The details (which may quote stored values) stay in the log.
        StoreErrorKind::Invalid | StoreErrorKind::Internal => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "store_error",
            "The state store failed; the proxy's log has the details.",
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    key_material: String,
    provider_id: String,
    #[serde(default)]
    metadata: KeyMetadata,
    #[serde(default)]
    id: Option<String>,
}

impl std::fmt::Debug for NewKey {
    /// Without the material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("provider_id", &self.provider_id)
            .field("metadata", &self.metadata)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `POST /api/v1/keys`
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let new: NewKey = parse_json(body)?;
    let keys = state.router.core().keys();
    let provider = new.provider_id.as_str().into();
    let result = match new.id {
        Some(id) => {
            keys.register_with_id(KeyId::new(id), &new.key_material, &provider, new.metadata)
                .await
        }
        None => {
            keys.register(&new.key_material, &provider, new.metadata)
                .await
        }
    };
    match result {
        Ok(info) => Ok((StatusCode::CREATED, Json(info)).into_response()),
        Err(apikeyrouter::RegisterKeyError::Duplicate(id)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "duplicate_key",
            format!("This key material is already registered as {id}."),
        )),
        Err(apikeyrouter::RegisterKeyError::IdTaken(id)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "duplicate_key",
            format!("Key id {id} is already in use."),
        )),
        Err(apikeyrouter::RegisterKeyError::Store(e)) => Err(store_error(&e)),
        Err(e) => Err(ApiError::bad_request("invalid_request", e.to_string())),
    }
}

/// `GET /api/v1/keys`
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Response, ApiError> {
    let keys = state.router.keys().await.map_err(key_error)?;
    Ok(Json(json!({ "object": "list", "data": keys })).into_response())
}

/// `GET /api/v1/keys/{id}`
pub async fn get_key(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let info = state.router.key(&KeyId::new(id)).await.map_err(key_error)?;
    Ok(Json(info).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// `PATCH /api/v1/keys/{id}`: merges into the metadata as a JSON merge patch (RFC
/// 7396): a field given replaces its value, a field given as `null` is removed, the
/// others are kept, so that changing `rpm` cannot drop a key's `tenant` by omission.
/// Two patches of one key at the same moment: the later write wins whole.
pub async fn update_key(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let patch: KeyPatch = parse_json(body)?;
    let id = KeyId::new(id);
    let current = state.router.key(&id).await.map_err(key_error)?;
    let metadata = merged(&current.metadata, patch.metadata)?;
    let info = state
        .router
        .update_key_metadata(&id, metadata)
        .await
        .map_err(key_error)?;
    Ok(Json(info).into_response())
}

/// `current` with `patch` merged in; a patch's aliases (`customer_id`, `env`) replace
/// the fields they stand for.
fn merged(
    current: &KeyMetadata,
    patch: serde_json::Map<String, serde_json::Value>,
) -> Result<KeyMetadata, ApiError> {
    let invalid = |e: serde_json::Error| {
        ApiError::bad_request("invalid_value", format!("metadata: {e}")).with_param("metadata")
    };
    let mut fields: serde_json::Map<String, serde_json::Value> = serde_json::to_value(current)
        .and_then(serde_json::from_value)
        .map_err(invalid)?;
    for (field, value) in patch {
        let field = match field.as_str() {
            "customer_id" => "tenant".to_owned(),
            "env" => "environment".to_owned(),
            _ => field,
        };
        if value.is_null() {
            fields.remove(&field);
        } else {
            fields.insert(field, value);
        }
    }
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(invalid)
}

/// `DELETE /api/v1/keys/{id}`
pub async fn delete_key(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    state
        .router
        .delete_key(&KeyId::new(id))
        .await
        .map_err(key_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    state: String,
    #[serde(default)]
    reason: String,
}

/// `PUT /api/v1/keys/{id}/state` with `{"state": "disabled" | "available", "reason": "..."}`
pub async fn set_key_state(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let change: StateChange = parse_json(body)?;
    let target = match change.state.as_str() {
        "disabled" => KeyState::Disabled,
        "available" => KeyState::Available,
        other => {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("state must be \"disabled\" or \"available\", got {other:?}."),
            )
            .with_param("state"));
        }
    };
    let transition = state
        .router
        .set_key_state(&KeyId::new(id), target, &change.reason)
        .await
        .map_err(key_error)?;
    Ok(Json(transition).into_response())
}

/// `GET /api/v1/keys/{id}/quota`: capacity state, windows and exhaustion prediction.
pub async fn key_quota(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let quota = state
        .router
        .quota(&KeyId::new(id))
        .await
        .map_err(key_error)?;
    Ok(Json(quota).into_response())
}

/// `GET /api/v1/keys/{id}/transitions`
pub async fn key_transitions(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let transitions = state
        .router
        .key_transitions(&KeyId::new(id))
        .await
        .map_err(key_error)?;
    Ok(Json(json!({ "object": "list", "data": transitions })).into_response())
}

/// `GET /api/v1/budgets`: every budget with its current spend.
pub async fn list_budgets(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Response, ApiError> {
    let budgets = state.router.budgets().await.map_err(budget_error)?;
    Ok(Json(json!({ "object": "list", "data": budgets })).into_response())
}

/// A budget as the API takes it: a `[[budgets]]` entry plus `spent_usd`, the spend
/// of the current period so far.
#[derive(Debug)]
pub struct NewBudget {
    budget: BudgetConfig,
    spent: Option<Money>,
}

impl NewBudget {
    /// Parses `body`, refusing unknown fields (a `#[serde(flatten)]` would let them
    /// pass silently) and a negative or non-finite `spent_usd`.
    fn parse(body: Result<Bytes, BytesRejection>) -> Result<Self, ApiError> {
        let mut fields: serde_json::Map<String, serde_json::Value> = parse_json(body)?;
        let spent = match fields.remove("spent_usd") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(s) if s.is_finite() && s >= 0.0 => Some(Money::from_usd(s)),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_value",
                        "spent_usd must be a number, zero or more.",
                    )
                    .with_param("spent_usd"));
                }
            },
        };
        let budget = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| ApiError::bad_request("invalid_value", format!("Invalid budget: {e}.")))?;
        Ok(Self { budget, spent })
    }
}

fn budget_error(e: BudgetServiceError) -> ApiError {
    match e {
        BudgetServiceError::NotFound(id) => {
            ApiError::not_found("budget_not_found", format!("Budget {id} not found."))
        }
        BudgetServiceError::Invalid(e) => ApiError::bad_request("invalid_value", e.to_string()),
        BudgetServiceError::Exists(id) => ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "budget_exists",
            format!("Budget {id} exists; PUT /api/v1/budgets/{id} redefines it."),
        ),
        BudgetServiceError::Store(e) => store_error(&e),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "budget_error",
            other.to_string(),
        ),
    }
}

fn to_budget(config: &BudgetConfig) -> Result<Budget, ApiError> {
    config.to_budget().map_err(|(field, message)| {
        ApiError::bad_request("invalid_value", message).with_param(field)
    })
}

/// `POST /api/v1/budgets`: a new budget; an id already in use is 409 (redefine it
/// with `PUT /api/v1/budgets/{id}`, which keeps its spend).
pub async fn create_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let new = NewBudget::parse(body)?;
    let budget = to_budget(&new.budget)?;
    // Created in the store, which refuses a taken id whichever instance took it.
    let status = state
        .router
        .core()
        .budgets()
        .create(budget, new.spent.unwrap_or(Money::ZERO))
        .await
        .map_err(budget_error)?;
    Ok((StatusCode::CREATED, Json(status)).into_response())
}

/// `GET /api/v1/budgets/{id}`: one budget with its spend, reserved and remaining.
pub async fn get_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let status = state
        .router
        .core()
        .budgets()
        .get(&id)
        .await
        .map_err(budget_error)?;
    Ok(Json(status).into_response())
}

/// `PUT /api/v1/budgets/{id}`: defines the budget `id` (the body's `id`, if given,
/// must match): a new one starts at `spent_usd` (default zero), 201; an existing one
/// is redefined in place keeping what this period has spent and the reservations of
/// requests in flight, 200, unless `spent_usd` is given, which replaces its account.
pub async fn put_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut new = NewBudget::parse(body)?;
    match &new.budget.id {
        Some(named) if *named != id => {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("The body names budget {named}, the path {id}."),
            )
            .with_param("id"));
        }
        _ => new.budget.id = Some(id.clone()),
    }
    let budget = to_budget(&new.budget)?;
    let defined = state
        .router
        .core()
        .budgets()
        .define(budget, new.spent)
        .await
        .map_err(budget_error)?;
    let code = if defined.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(defined.status)).into_response())
}

/// `DELETE /api/v1/budgets/{id}`: 204. A budget of the config file comes back on the
/// next reload; remove it from the file.
pub async fn delete_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    state
        .router
        .delete_budget(&id)
        .await
        .map_err(budget_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/policies`: routing settings and fallback chains.
pub async fn policies(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Response, ApiError> {
    let s = state.router.core().settings();
    let mut fallbacks: Vec<_> = s
        .fallbacks
        .iter()
        .map(|(m, to)| json!({ "model": m, "to": to }))
        .collect();
    fallbacks.sort_by_key(|f| f["model"].as_str().map(str::to_owned));
    Ok(Json(json!({
        "objective": s.objective.label(),
        "max_attempts": s.max_attempts,
        "total_deadline_ms": s.total_deadline.as_millis() as u64,
        "attempt_timeout_ms": s.attempt_timeout.as_millis() as u64,
        "reservation_lease_ms": s.reservation_lease.as_millis() as u64,
        "fallbacks": fallbacks,
        "downgrades": s.downgrades,
    }))
    .into_response())
}

/// `GET /api/v1/providers`
pub async fn providers(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Response, ApiError> {
    let kinds: std::collections::HashMap<_, _> =
        state.router.core().providers().into_iter().collect();
    let data: Vec<_> = state
        .router
        .core()
        .models()
        .into_iter()
        .map(|(id, models)| json!({ "id": id, "kind": kinds.get(&id), "models": models }))
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })).into_response())
}

/// `GET /api/v1/requests/{request_id}`: the decision and audit record.
pub async fn request_record(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    match state
        .router
        .request(&RequestId::new(id.as_str()))
        .await
        .map_err(|e| store_error(&e))?
    {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::not_found(
            "request_not_found",
            format!("No record of request {id} (never seen, or past retention)."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;

    async fn answer(kind: StoreErrorKind) -> (StatusCode, serde_json::Value) {
        let response = store_error(&StoreError::new(kind, "budget b1")).into_response();
        let status = response.status();
        let body = to_bytes(response.into_body(), 4096).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// Only an unreachable store asks the client to come back later; a race and a
    /// record gone say so, naming the record; a store failing otherwise is a 500 whose
    /// details (which may quote stored values) stay in the log.
    #[tokio::test]
    async fn store_failures_answer_by_their_kind() {
        let cases = [
            (
                StoreErrorKind::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
            ),
            (StoreErrorKind::Conflict, StatusCode::CONFLICT, "conflict"),
            (StoreErrorKind::NotFound, StatusCode::NOT_FOUND, "not_found"),
            (
                StoreErrorKind::Invalid,
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
            ),
            (
                StoreErrorKind::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
            ),
        ];
        for (kind, status, code) in cases {
            let (got, body) = answer(kind).await;
            assert_eq!(got, status, "{kind:?}: {body}");
            assert_eq!(body["error"]["code"], code, "{kind:?}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            match kind {
                StoreErrorKind::Unavailable => {
                    assert_eq!(message, "The state store is unavailable.");
                }
                StoreErrorKind::Conflict | StoreErrorKind::NotFound => {
                    assert!(message.contains("budget b1"), "{kind:?}: {message}");
                }
                _ => assert!(!message.contains("budget b1"), "{kind:?}: {message}"),
            }
        }
    }
}
