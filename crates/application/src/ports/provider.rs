//! The provider port: one LLM API (OpenAI, Anthropic, Gemini, a simulation) called
//! with one key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_domain::{
    FailureKind, KeyId, KeyMaterial, ModelId, QuotaObservation, RequestIntent, TokenUsage,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Which models a provider serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSet {
    /// Any model name (simulations, pass-through gateways).
    Any,
    /// Exactly these.
    Only(Vec<ModelId>),
}

impl ModelSet {
    /// Whether `model` is in the set.
    pub fn contains(&self, model: &ModelId) -> bool {
        match self {
            Self::Any => true,
            Self::Only(models) => models.contains(model),
        }
    }
}

/// One call to a provider: which key, which model, what request.
#[derive(Clone, Debug)]
pub struct ProviderCall {
    /// Key id, for logs and errors (never the material).
    pub key_id: KeyId,
    /// The secret to authenticate with.
    pub material: KeyMaterial,
    /// The model to call (may differ from the request's after fallback or downgrade).
    pub model: ModelId,
    /// The request.
    pub request: Arc<RequestIntent>,
}

/// Why a completion stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end or a stop sequence.
    Stop,
    /// Hit the token limit.
    Length,
    /// The model called tools.
    ToolCalls,
    /// Withheld by a content filter.
    ContentFilter,
}

/// A provider's answer, normalized.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    /// Assistant text.
    pub content: String,
    /// Model that answered, as the provider names it.
    pub model: ModelId,
    /// Reported usage; `None` when the provider did not report it (the estimate is
    /// used then).
    pub usage: Option<TokenUsage>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Rate-limit state from the response headers.
    pub quota: Option<QuotaObservation>,
}

/// A failed call, classified.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderError {
    /// What kind of failure.
    pub kind: FailureKind,
    /// Provider's message, scrubbed of key material.
    pub message: String,
    /// HTTP status, if there was a response.
    pub status: Option<u16>,
    /// How long the provider asked us to wait.
    pub retry_after: Option<Duration>,
    /// Rate-limit state from the response headers.
    pub quota: Option<QuotaObservation>,
}

impl ProviderError {
    /// An error of `kind` with `message` and nothing else.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
            quota: None,
        }
    }

    /// Adds the HTTP status.
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Adds a retry-after.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.as_str())?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ProviderError {}

/// An LLM API.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The adapter kind (`openai`, `anthropic`, `gemini`, `openai-compatible`,
    /// `simulated`).
    fn kind(&self) -> &'static str;

    /// Models served when configuration does not list them.
    fn default_models(&self) -> ModelSet;

    /// Sends a chat completion.
    ///
    /// # Errors
    /// [`ProviderError`] classified into the domain's failure kinds, with any
    /// retry-after and rate-limit headers the provider sent.
    async fn chat(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError>;
}
