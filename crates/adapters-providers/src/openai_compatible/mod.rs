//! The OpenAI-compatible adapter: any server speaking OpenAI's chat-completions API
//! (Groq, Mistral, a local vLLM or Ollama) and Azure OpenAI.
//!
//! The wire format, streaming and error mapping are the [OpenAI adapter](crate::openai)'s
//! own `OpenAiClient`; only the URL shape and the auth header differ. Azure addresses a
//! deployment rather than a model: the call's model name is used as the deployment
//! name, and the key goes in an `api-key` header instead of `Authorization: Bearer`.

#[cfg(test)]
mod tests;

use apikeyrouter_application::ports::{
    ChatResponse, EmbeddingCall, EmbeddingResponse, ModelSet, Provider, ProviderCall,
    ProviderError, StreamStart,
};
use apikeyrouter_domain::{FailureKind, KeyMaterial, ModelId};
use async_trait::async_trait;

use crate::http::HttpSettings;
use crate::openai::{Endpoint, OpenAiClient, parse_base};

/// How to reach an Azure OpenAI resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureSettings {
    /// The `api-version` query parameter, e.g. `2024-10-21`.
    pub api_version: String,
}

impl AzureSettings {
    /// Settings for API version `api_version`.
    pub fn new(api_version: impl Into<String>) -> Self {
        Self {
            api_version: api_version.into(),
        }
    }
}

/// An OpenAI-compatible API behind the [`Provider`] port; see the
/// [module documentation](self).
///
/// ```
/// use apikeyrouter_adapters_providers::http::HttpSettings;
/// use apikeyrouter_adapters_providers::openai_compatible::{
///     AzureSettings, OpenAiCompatibleProvider,
/// };
/// use apikeyrouter_application::ports::{ModelSet, Provider};
///
/// let ollama = OpenAiCompatibleProvider::new("http://localhost:11434/v1", HttpSettings::default())?;
/// assert_eq!(ollama.default_models(), ModelSet::Any);
/// let azure = OpenAiCompatibleProvider::azure(
///     "https://my-resource.openai.azure.com",
///     AzureSettings::new("2024-10-21"),
///     HttpSettings::default(),
/// )?;
/// assert_eq!(azure.kind(), "openai-compatible");
/// # Ok::<(), apikeyrouter_application::ports::ProviderError>(())
/// ```
#[derive(Debug)]
pub struct OpenAiCompatibleProvider {
    client: OpenAiClient,
    models: Option<Vec<ModelId>>,
}

impl OpenAiCompatibleProvider {
    /// A provider calling `base_url` (the URL that `/chat/completions` is appended to,
    /// e.g. `https://api.groq.com/openai/v1`; a trailing slash is tolerated).
    ///
    /// # Errors
    /// [`FailureKind::BadRequest`] for a URL that is not `http(s)`;
    /// [`FailureKind::Network`] when the HTTP client cannot be built.
    pub fn new(base_url: impl Into<String>, settings: HttpSettings) -> Result<Self, ProviderError> {
        let base = parse_base(&base_url.into())?;
        Ok(Self {
            client: OpenAiClient::new(Endpoint::Compatible { base }, settings)?,
            models: None,
        })
    }

    /// A provider calling the Azure OpenAI resource at `endpoint` (e.g.
    /// `https://my-resource.openai.azure.com`).
    ///
    /// # Errors
    /// As [`Self::new`], and [`FailureKind::BadRequest`] for an empty API version.
    pub fn azure(
        endpoint: impl Into<String>,
        azure: AzureSettings,
        settings: HttpSettings,
    ) -> Result<Self, ProviderError> {
        let endpoint = parse_base(&endpoint.into())?;
        let api_version = azure.api_version.trim().to_owned();
        if api_version.is_empty() {
            return Err(ProviderError::new(
                FailureKind::BadRequest,
                "azure api version is empty",
            ));
        }
        Ok(Self {
            client: OpenAiClient::new(
                Endpoint::Azure {
                    endpoint,
                    api_version,
                },
                settings,
            )?,
            models: None,
        })
    }

    /// Restricts [`Provider::default_models`] to `models` (the default is any model).
    #[must_use]
    pub fn with_models(mut self, models: Vec<ModelId>) -> Self {
        self.models = Some(models);
        self
    }

    /// The models the server offers (`GET /models`; Azure: `GET /openai/models`).
    ///
    /// # Errors
    /// As [`Provider::chat`].
    pub async fn list_models(&self, material: &KeyMaterial) -> Result<Vec<ModelId>, ProviderError> {
        self.client.list_models(material).await
    }
}

#[async_trait]
impl Provider for OpenAiCompatibleProvider {
    fn kind(&self) -> &'static str {
        "openai-compatible"
    }

    fn default_models(&self) -> ModelSet {
        match &self.models {
            Some(models) => ModelSet::Only(models.clone()),
            None => ModelSet::Any,
        }
    }

    async fn chat(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError> {
        self.client.chat(call).await
    }

    async fn chat_stream(&self, call: ProviderCall) -> Result<StreamStart, ProviderError> {
        self.client.chat_stream(call).await
    }

    async fn embed(&self, call: EmbeddingCall) -> Result<EmbeddingResponse, ProviderError> {
        self.client.embed(call).await
    }
}
