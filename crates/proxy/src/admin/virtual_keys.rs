//! `/api/v1/virtual_keys`: client credentials made and revoked at run time.
//!
//! A new key's token is drawn from the OS's random source and shown once, in the
//! answer to its creation; the store keeps only its SHA-256 digest. Revoking keeps the
//! record (listed with `revoked_at`) and its name. Keys of the config file are listed
//! too (`"source": "config"`) but change only with the file.

use std::collections::HashMap;
use std::sync::Arc;

use apikeyrouter::config::virtual_key_budget_id;
use apikeyrouter::{
    AddVirtualKeyError, BudgetServiceError, BudgetStatus, ModelId, StoreErrorKind, TenantId,
    Timestamp, VirtualKey, VirtualKeyError,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Admin, budget_error, store_error};
use crate::auth::digest_hex;
use crate::errors::ApiError;
use crate::openai::parse_json;
use crate::path::PathId;
use crate::state::AppState;

/// What the API takes to make a key; every field optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVirtualKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    rpm: Option<u32>,
    #[serde(default)]
    budget_usd: Option<f64>,
}

/// A virtual key as the API shows it: never its token, except once at creation.
#[derive(Debug, Serialize)]
struct View {
    object: &'static str,
    name: String,
    /// `api` (made through this API, in the store) or `config` (the file).
    source: &'static str,
    tenant: Option<TenantId>,
    models: Option<Vec<ModelId>>,
    rpm: Option<u32>,
    /// Its monthly budget with this month's spend, if it has one.
    budget: Option<BudgetStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<Timestamp>,
    /// When it was revoked; it authenticates no one since.
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl View {
    fn stored(key: VirtualKey, budget: Option<BudgetStatus>) -> Self {
        Self {
            object: "virtual_key",
            budget,
            name: key.name,
            source: "api",
            tenant: key.tenant,
            models: key.models,
            rpm: key.rpm,
            created_at: Some(key.created_at),
            revoked_at: key.revoked_at,
            token: None,
        }
    }

    fn file(key: &crate::auth::VirtualKey, budget: Option<BudgetStatus>) -> Self {
        Self {
            object: "virtual_key",
            budget,
            name: key.name.clone(),
            source: "config",
            tenant: key.tenant.clone(),
            models: key.models.clone(),
            rpm: key.rpm,
            created_at: None,
            revoked_at: None,
            token: None,
        }
    }
}

fn exists(name: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        "virtual_key_exists",
        format!("Virtual key {name} exists{why}."),
    )
    .with_param("name")
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(
        "virtual_key_not_found",
        format!("Virtual key {name} not found."),
    )
}

fn invalid(e: &VirtualKeyError) -> ApiError {
    let param = match e {
        VirtualKeyError::Name => "name",
        VirtualKeyError::Digest => "token",
        VirtualKeyError::Tenant => "tenant",
        VirtualKeyError::Models => "models",
        VirtualKeyError::Rpm => "rpm",
        VirtualKeyError::Budget => "budget_usd",
    };
    ApiError::bad_request("invalid_value", format!("Invalid virtual key: {e}.")).with_param(param)
}

/// A new client token (`sk-akr-` and 32 random bytes) and its digest, the only part
/// stored.
fn new_token() -> Result<(String, String), ApiError> {
    let token = format!("sk-akr-{}", random_text(32)?);
    let digest = digest_hex(&token);
    Ok((token, digest))
}

/// `count` bytes from the OS's random source, URL-safe base64 without padding.
fn random_text(count: usize) -> Result<String, ApiError> {
    let mut bytes = vec![0u8; count];
    getrandom::fill(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "no randomness for a virtual key");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal_error",
            "Internal error.",
        )
    })?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Every virtual key's view, file's and stored, in name order.
async fn views(state: &AppState) -> Result<Vec<View>, ApiError> {
    let stored = state
        .router
        .virtual_keys()
        .await
        .map_err(|e| store_error(&e))?;
    let mut budgets: HashMap<String, BudgetStatus> = state
        .router
        .budgets()
        .await
        .map_err(budget_error)?
        .into_iter()
        .map(|b| (b.budget_id.clone(), b))
        .collect();
    let auth = state.auth();
    let mut views: Vec<View> = auth
        .clients()
        .filter(|v| !v.stored)
        .map(|v| View::file(v, budgets.remove(&virtual_key_budget_id(&v.name))))
        .collect();
    let file_names = auth.file_names();
    views.extend(
        stored
            .into_iter()
            .filter(|v| !file_names.contains(&v.name))
            .map(|v| {
                let budget = budgets.remove(&virtual_key_budget_id(&v.name));
                View::stored(v, budget)
            }),
    );
    views.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

/// One key's view, `None` for an unknown name: the key and its budget read alone,
/// not every key and every budget's status. A key of the file hides a stored one of
/// the same name, as in [`views`].
async fn view_of(state: &AppState, name: &str) -> Result<Option<View>, ApiError> {
    let auth = state.auth();
    let file = auth.clients().find(|v| !v.stored && v.name == name);
    let stored = match file {
        Some(_) => None,
        None => match state.router.virtual_key(name).await {
            Ok(key) => Some(key),
            Err(e) if e.kind == StoreErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(store_error(&e)),
        },
    };
    let budget = match state
        .router
        .core()
        .budgets()
        .get(&virtual_key_budget_id(name))
        .await
    {
        Ok(status) => Some(status),
        Err(BudgetServiceError::NotFound(_)) => None,
        Err(e) => return Err(budget_error(e)),
    };
    Ok(match file {
        Some(file) => Some(View::file(file, budget)),
        None => stored.map(|key| View::stored(key, budget)),
    })
}

/// Takes a change to the stored key `name` into this instance's credentials now, so
/// the caller's next request sees it (the change follower would, moments later).
async fn apply_now(state: &AppState, name: &str) {
    if let Err(e) = state.refresh_named_virtual_keys([name]).await {
        tracing::warn!(error = %e, "stored virtual keys not re-read after a change; retrying in the background");
    }
}

/// `GET /api/v1/virtual_keys`
pub async fn list(State(state): State<Arc<AppState>>, _admin: Admin) -> Result<Response, ApiError> {
    let data = views(&state).await?;
    Ok(Json(json!({ "object": "list", "data": data })).into_response())
}

/// `GET /api/v1/virtual_keys/{name}`
pub async fn get(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(name): PathId,
) -> Result<Response, ApiError> {
    view_of(&state, &name)
        .await?
        .map(|v| Json(v).into_response())
        .ok_or_else(|| not_found(&name))
}

/// `POST /api/v1/virtual_keys`: 201 with the key and its token, shown only here. The
/// name defaults to `vk-` and 12 random characters.
pub async fn create(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let new: NewVirtualKey = parse_json(body)?;
    let name = match new.name {
        Some(name) => name,
        None => format!("vk-{}", random_text(9)?),
    };
    let (token, token_sha256) = new_token()?;
    let key = VirtualKey {
        name,
        token_sha256,
        tenant: new.tenant.map(TenantId::new),
        models: new
            .models
            .map(|m| m.into_iter().map(ModelId::new).collect()),
        rpm: new.rpm,
        budget_usd: new.budget_usd,
        // Set by the router from its clock.
        created_at: Timestamp::EPOCH,
        revoked_at: None,
    };
    key.validate().map_err(|e| invalid(&e))?;
    if state.auth().file_names().contains(&key.name) {
        return Err(exists(&key.name, " in the config file"));
    }
    let name = key.name.clone();
    let (stored, budget) = match state.router.add_virtual_key(key).await {
        Ok(added) => added,
        Err(AddVirtualKeyError::Invalid(e)) => return Err(invalid(&e)),
        Err(AddVirtualKeyError::NameTaken(_)) => return Err(exists(&name, "")),
        Err(AddVirtualKeyError::BudgetTaken(id)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "budget_exists",
                format!("Budget {id}, which would limit this key, exists; delete it or choose another name."),
            )
            .with_param("name"));
        }
        Err(AddVirtualKeyError::Store(e)) => return Err(store_error(&e)),
    };
    apply_now(&state, &name).await;
    let view = View::stored(stored, budget);
    Ok((
        StatusCode::CREATED,
        Json(View {
            token: Some(token),
            ..view
        }),
    )
        .into_response())
}

/// `PATCH /api/v1/virtual_keys/{name}`: a JSON merge patch of the key's limits
/// (`tenant`, `models`, `rpm`, `budget_usd`; `null` removes one), under the same
/// token: 200 with the key. A new `budget_usd` keeps this month's spend. A revoked key
/// is 409 `virtual_key_revoked`; a key of the config file 409 `defined_in_config`.
pub async fn update(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(name): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let patch: serde_json::Map<String, serde_json::Value> = parse_json(body)?;
    if state.auth().file_names().contains(&name) {
        return Err(in_config(&name));
    }
    let Some(mut key) = state
        .router
        .virtual_keys()
        .await
        .map_err(|e| store_error(&e))?
        .into_iter()
        .find(|k| k.name == name)
    else {
        return Err(not_found(&name));
    };
    for (field, value) in patch {
        let bad = |param: &'static str, what: &str| {
            ApiError::bad_request("invalid_value", format!("{param} must be {what}."))
                .with_param(param)
        };
        let value = (!value.is_null()).then_some(value);
        match field.as_str() {
            "tenant" => {
                key.tenant = value
                    .map(|v| {
                        v.as_str()
                            .map(TenantId::new)
                            .ok_or_else(|| bad("tenant", "a string"))
                    })
                    .transpose()?;
            }
            "models" => {
                key.models = value
                    .map(|v| {
                        serde_json::from_value::<Vec<String>>(v)
                            .map(|m| m.into_iter().map(ModelId::new).collect())
                            .map_err(|_| bad("models", "a list of model names"))
                    })
                    .transpose()?;
            }
            "rpm" => {
                key.rpm = value
                    .map(|v| {
                        serde_json::from_value::<u32>(v).map_err(|_| bad("rpm", "a whole number"))
                    })
                    .transpose()?;
            }
            "budget_usd" => {
                key.budget_usd = value
                    .map(|v| v.as_f64().ok_or_else(|| bad("budget_usd", "a number")))
                    .transpose()?;
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("{field} cannot be changed; tenant, models, rpm and budget_usd can."),
                ));
            }
        }
    }
    key.validate().map_err(|e| invalid(&e))?;
    match state.router.update_virtual_key(key).await {
        Ok(()) => {}
        Err(e) if e.kind == StoreErrorKind::NotFound => return Err(not_found(&name)),
        // Revoked, or changed (rotated) over and over while being updated: only the
        // first is for good.
        Err(e) if e.kind == StoreErrorKind::Conflict => {
            let revoked_now = state
                .router
                .virtual_key(&name)
                .await
                .is_ok_and(|k| !k.is_active());
            return Err(if revoked_now {
                revoked(&name)
            } else {
                store_error(&e)
            });
        }
        Err(e) => return Err(store_error(&e)),
    }
    apply_now(&state, &name).await;
    view_of(&state, &name)
        .await?
        .map(|v| Json(v).into_response())
        .ok_or_else(|| not_found(&name))
}

fn revoked(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        "virtual_key_revoked",
        format!("Virtual key {name} is revoked; make a new one."),
    )
}

/// `POST /api/v1/virtual_keys/{name}/rotate`: a new token for the key under the same
/// name, limits and budget (this month's spend kept): 200 with the key and the new
/// token, shown only here. The old token is refused by this instance before the
/// answer, and by the others as after a revocation. A revoked key is 409
/// `virtual_key_revoked`, a key of the config file 409 `defined_in_config`.
pub async fn rotate(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(name): PathId,
) -> Result<Response, ApiError> {
    if state.auth().file_names().contains(&name) {
        return Err(in_config(&name));
    }
    let (token, digest) = new_token()?;
    let before = match state.router.rotate_virtual_key(&name, &digest).await {
        Ok(before) => before,
        Err(e) if e.kind == StoreErrorKind::NotFound => return Err(not_found(&name)),
        Err(e) if e.kind == StoreErrorKind::Conflict => return Err(revoked(&name)),
        Err(e) => return Err(store_error(&e)),
    };
    state.revoke_locally(&before.token_sha256).await;
    apply_now(&state, &name).await;
    // The token must reach the caller even if the store cannot be read back now: it
    // is the only copy.
    let view = view_of(&state, &name)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            View::stored(
                VirtualKey {
                    token_sha256: digest,
                    ..before
                },
                None,
            )
        });
    Ok(Json(View {
        token: Some(token),
        ..view
    })
    .into_response())
}

fn in_config(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        "defined_in_config",
        format!("Virtual key {name} is defined in the config file; change it there."),
    )
}

/// `DELETE /api/v1/virtual_keys/{name}`: revokes the key, 204; the token is refused
/// from then on and the key's budget is removed. The record stays (listed with
/// `revoked_at`), and so does its name. Revoking a revoked key is 204 again (and
/// retries the budget's removal). A key of the config file is 409: remove it there.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    PathId(name): PathId,
) -> Result<Response, ApiError> {
    if state.auth().file_names().contains(&name) {
        return Err(in_config(&name));
    }
    match state.router.revoke_virtual_key(&name).await {
        // Refused here before the answer, whether or not the store can be re-read.
        Ok(revoked) => state.revoke_locally(&revoked.token_sha256).await,
        Err(e) if e.kind == StoreErrorKind::NotFound => return Err(not_found(&name)),
        Err(e) => return Err(store_error(&e)),
    }
    apply_now(&state, &name).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
