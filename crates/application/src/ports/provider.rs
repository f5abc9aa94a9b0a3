//! The provider port: one LLM API (OpenAI, Anthropic, Gemini, a simulation) called
//! with one key.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_domain::{
    FailureKind, KeyId, KeyMaterial, ModelId, QuotaObservation, RequestIntent, TokenUsage, ToolCall,
};
use async_trait::async_trait;
use futures_core::Stream;
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

/// One chat call to a provider: which key, which model, what request.
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

/// One embeddings call to a provider.
#[derive(Clone, Debug)]
pub struct EmbeddingCall {
    /// Key id, for logs and errors.
    pub key_id: KeyId,
    /// The secret to authenticate with.
    pub material: KeyMaterial,
    /// The embedding model.
    pub model: ModelId,
    /// Texts to embed.
    pub input: Arc<Vec<String>>,
    /// Requested dimensions.
    pub dimensions: Option<u32>,
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

impl FinishReason {
    /// OpenAI's name for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
        }
    }
}

/// A provider's answer, normalized.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    /// Assistant text.
    pub content: String,
    /// Tool calls the model made.
    pub tool_calls: Vec<ToolCall>,
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

/// A fragment of a tool call in a stream; fragments with the same `index` concatenate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// Which call of the reply this belongs to.
    pub index: u32,
    /// The call id (first fragment only).
    pub id: Option<String>,
    /// The function name (first fragment only).
    pub name: Option<String>,
    /// More argument text.
    pub arguments: String,
}

/// One piece of a streamed reply, normalized.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatChunk {
    /// More assistant text.
    pub text: String,
    /// Tool-call fragments.
    pub tool_calls: Vec<ToolCallDelta>,
    /// Set on the last content chunk.
    pub finish_reason: Option<FinishReason>,
    /// Set once, usually at the end.
    pub usage: Option<TokenUsage>,
}

/// A stream of reply pieces. Dropping it cancels the upstream request.
pub type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, ProviderError>> + Send>>;

/// A stream that has started: the provider accepted the request and sent its headers.
pub struct StreamStart {
    /// Model that answers.
    pub model: ModelId,
    /// Rate-limit state from the response headers.
    pub quota: Option<QuotaObservation>,
    /// The pieces.
    pub chunks: ChatStream,
}

impl fmt::Debug for StreamStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamStart")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Vectors for an embeddings call.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingResponse {
    /// One vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Model that answered.
    pub model: ModelId,
    /// Reported usage (prompt tokens only).
    pub usage: Option<TokenUsage>,
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

    /// Adds rate-limit state.
    #[must_use]
    pub fn with_quota(mut self, quota: Option<QuotaObservation>) -> Self {
        self.quota = quota;
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

    /// Starts a streamed chat completion. Returns once the provider has accepted the
    /// request (status and headers received), so failures before any output can fail
    /// over; the last chunk carries the usage.
    ///
    /// # Errors
    /// As [`Self::chat`], for failures before the stream starts.
    async fn chat_stream(&self, call: ProviderCall) -> Result<StreamStart, ProviderError>;

    /// Embeds texts.
    ///
    /// # Errors
    /// As [`Self::chat`]; [`FailureKind::BadRequest`] from providers without embeddings.
    async fn embed(&self, call: EmbeddingCall) -> Result<EmbeddingResponse, ProviderError> {
        Err(ProviderError::new(
            FailureKind::BadRequest,
            format!(
                "provider {} offers no embeddings (model {})",
                self.kind(),
                call.model
            ),
        ))
    }
}
