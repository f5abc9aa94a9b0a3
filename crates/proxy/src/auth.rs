//! Who may call: the admin token for the management API, virtual keys (client tokens
//! mapped to a tenant and its limits) for the OpenAI-compatible API.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time.

use std::collections::HashMap;

use apikeyrouter::config::{Config, ResolvedVirtualKey};
use apikeyrouter::domain::secret::constant_time_eq;
use apikeyrouter::{ModelId, TenantId};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::errors::ApiError;

type TokenHash = [u8; 32];

fn digest(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Access to the management API.
#[derive(Debug)]
pub enum AdminAuth {
    /// Requests must carry this token.
    Token(TokenHash),
    /// No token configured: allowed only because the proxy listens on loopback.
    Open,
}

impl AdminAuth {
    /// Checks a management request.
    ///
    /// # Errors
    /// 401 in OpenAI's shape when the token is missing or wrong.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self {
            Self::Open => Ok(()),
            Self::Token(expected) => match bearer(headers) {
                Some(token) if constant_time_eq(&digest(token), expected) => Ok(()),
                Some(_) => Err(ApiError::unauthorized("Incorrect admin token.")),
                None => Err(ApiError::unauthorized(
                    "The management API requires `Authorization: Bearer <admin token>`.",
                )),
            },
        }
    }
}

/// A client credential and its limits.
#[derive(Debug)]
pub struct VirtualKey {
    pub name: String,
    pub tenant: Option<TenantId>,
    pub models: Option<Vec<ModelId>>,
    pub rpm: Option<u32>,
}

impl VirtualKey {
    fn of(v: &ResolvedVirtualKey) -> Self {
        Self {
            name: v.name.clone(),
            tenant: v.tenant.clone(),
            models: v.models.clone(),
            rpm: v.rpm,
        }
    }

    /// Whether the key may use `model`.
    pub fn allows(&self, model: &ModelId) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

/// The credentials in force (replaced whole on reload).
#[derive(Debug)]
pub struct Auth {
    pub admin: AdminAuth,
    clients: HashMap<TokenHash, std::sync::Arc<VirtualKey>>,
}

impl Auth {
    /// Credentials from a configuration. Without an admin token the management API is
    /// open only on a loopback address.
    ///
    /// # Errors
    /// A message when the proxy would listen publicly without an admin token.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let admin = match &config.admin_token {
            Some(token) => AdminAuth::Token(digest(token)),
            None if config.listen.ip().is_loopback() => AdminAuth::Open,
            None => {
                return Err(format!(
                    "listening on {} without an admin token would expose the management API; set [admin] token_env (or APIKEYROUTER_ADMIN_TOKEN)",
                    config.listen
                ));
            }
        };
        let clients = config
            .virtual_keys
            .iter()
            .map(|v| (digest(&v.token), std::sync::Arc::new(VirtualKey::of(v))))
            .collect();
        Ok(Self { admin, clients })
    }

    /// The client making a request: `None` when no virtual keys are configured (the
    /// API is open), else the matching key.
    ///
    /// # Errors
    /// 401 when virtual keys are configured and the token is missing or unknown.
    pub fn client(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<std::sync::Arc<VirtualKey>>, ApiError> {
        if self.clients.is_empty() {
            return Ok(None);
        }
        let Some(token) = bearer(headers) else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Use `Authorization: Bearer <virtual key>`.",
            ));
        };
        // A map lookup by digest: timing depends on the digest, never on how much of
        // the token matched.
        self.clients
            .get(&digest(token))
            .cloned()
            .map(Some)
            .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
    }

    /// The virtual keys, for budgets at start-up.
    pub fn clients(&self) -> impl Iterator<Item = &VirtualKey> {
        self.clients.values().map(|v| &**v)
    }
}
