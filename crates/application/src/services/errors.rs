//! Errors of the services, each naming precisely what went wrong.

use apikeyrouter_domain::routing::NoEligibleKey;
use apikeyrouter_domain::{
    BudgetError, KeyId, KeyMaterialError, ModelId, ProviderId, RequestId, Timestamp,
    TransitionError,
};
use thiserror::Error;

use crate::ports::{ProviderError, StoreError, StoreErrorKind};
use crate::records::AttemptRecord;

/// A request could not be served.
#[derive(Debug, Error)]
#[error("{kind}")]
pub struct RouteError {
    /// The request's id (also in its audit record).
    pub request_id: RequestId,
    /// What went wrong.
    pub kind: RouteErrorKind,
    /// Attempts made before giving up.
    pub attempts: Vec<AttemptRecord>,
}

/// Why a request could not be served.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RouteErrorKind {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No registered provider serves the model or any of its fallbacks.
    #[error("no provider serves model {model}")]
    UnknownModel {
        /// Model asked for.
        model: ModelId,
    },
    /// Keys exist but none could serve.
    #[error("{0}")]
    NoEligibleKey(NoEligibleKey),
    /// A hard budget cannot take the request.
    #[error("{0}")]
    BudgetExceeded(BudgetError),
    /// The provider refused the request itself (not retried: it would fail everywhere).
    #[error("provider rejected the request: {0}")]
    Rejected(ProviderError),
    /// Every attempt failed.
    #[error("all {attempts} attempts failed; last: {last}")]
    AttemptsExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: ProviderError,
    },
    /// The total deadline passed.
    #[error("request deadline of {0} ms exceeded")]
    DeadlineExceeded(u64),
    /// The state store failed.
    #[error("state store failure: {0}")]
    Store(StoreError),
    /// The calling client used its requests for this minute.
    #[error("client {client} reached its limit of {rpm} requests per minute")]
    ClientRateLimited {
        /// The client.
        client: String,
        /// Its limit.
        rpm: u32,
        /// When its window resets.
        retry_at: Timestamp,
    },
}

impl RouteErrorKind {
    /// A stable, low-cardinality code for metrics, logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::UnknownModel { .. } => "model_not_found",
            Self::NoEligibleKey(_) => "no_eligible_key",
            Self::BudgetExceeded(_) => "budget_exceeded",
            Self::Rejected(_) => "provider_rejected_request",
            Self::AttemptsExhausted { .. } => "upstream_failed",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Store(_) => "store_unavailable",
            Self::ClientRateLimited { .. } => "rate_limit_exceeded",
        }
    }
}

/// Registering a key failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegisterKeyError {
    /// The provider is not registered.
    #[error("unknown provider {0}; register it before adding keys")]
    UnknownProvider(ProviderId),
    /// The material is malformed.
    #[error(transparent)]
    Material(#[from] KeyMaterialError),
    /// The metadata is inconsistent.
    #[error("invalid key metadata: {0}")]
    Metadata(String),
    /// The id is already used by another key.
    #[error("key id {0} is already in use")]
    IdTaken(KeyId),
    /// The same material is already registered.
    #[error("this key material is already registered as {0}")]
    Duplicate(KeyId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyServiceError {
    /// No such key.
    #[error("key {0} not found")]
    NotFound(KeyId),
    /// The requested state change is not allowed.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Only `disabled` and `available` can be set by hand.
    #[error("state {0} cannot be set manually; use disabled or available")]
    NotManual(&'static str),
    /// The metadata is inconsistent.
    #[error("invalid key metadata: {0}")]
    Metadata(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl KeyServiceError {
    pub(crate) fn from_store(id: &KeyId, e: StoreError) -> Self {
        if e.kind == StoreErrorKind::NotFound {
            Self::NotFound(id.clone())
        } else {
            Self::Store(e)
        }
    }
}

/// A budget operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BudgetServiceError {
    /// The budget definition is invalid.
    #[error(transparent)]
    Invalid(#[from] BudgetError),
    /// No such budget.
    #[error("budget {0} not found")]
    NotFound(String),
    /// A budget with that id exists (a create only).
    #[error("budget {0} already exists")]
    Exists(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
