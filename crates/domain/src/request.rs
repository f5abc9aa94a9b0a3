//! The normalized request a caller wants served, and the usage a provider reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ModelId, ProviderId, TenantId};

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Author.
    pub role: Role,
    /// Text content.
    pub content: String,
}

impl Message {
    /// A message from `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
}

/// What the caller wants done, independent of provider and key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestIntent {
    /// The preferred model.
    pub model: ModelId,
    /// Conversation so far.
    pub messages: Vec<Message>,
    /// Upper bound on completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Preferred provider; when set, only that provider's keys are used for `model`
    /// (fallback chains may still move to another provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderId>,
    /// Tenant the request is made for; routes only to that tenant's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Labels for cost attribution and tag budgets (e.g. `feature = "chatbot"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl RequestIntent {
    /// A request for `model` with `messages` and nothing else set.
    pub fn new(model: impl Into<ModelId>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            max_tokens: None,
            temperature: None,
            provider: None,
            tenant: None,
            tags: BTreeMap::new(),
        }
    }

    /// Sets the tenant.
    #[must_use]
    pub fn for_tenant(mut self, tenant: impl Into<TenantId>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Sets the preferred provider.
    #[must_use]
    pub fn on_provider(mut self, provider: impl Into<ProviderId>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// Sets the completion limit.
    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Adds a tag.
    #[must_use]
    pub fn with_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }
}

/// Tokens a provider reports for one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Input tokens, including cached ones.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub completion_tokens: u64,
    /// Input tokens served from the provider's prompt cache (a subset of `prompt_tokens`).
    #[serde(default)]
    pub cached_tokens: u64,
}

impl TokenUsage {
    /// Prompt plus completion.
    pub const fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}
