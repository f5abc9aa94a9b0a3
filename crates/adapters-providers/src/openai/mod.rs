//! The OpenAI adapter: chat completions (plain and streamed), embeddings and the
//! model list of `https://api.openai.com/v1` or any base URL serving the same API.
//!
//! The HTTP client and the wire mapping live in an internal `OpenAiClient`, shared with the
//! [OpenAI-compatible adapter](crate::openai_compatible): only the URL shape and the
//! auth header differ between OpenAI, compatible servers and Azure (an internal
//! `Endpoint`).
//!
//! Invariant: the key material is read ([`KeyMaterial::expose`]) only to build the
//! auth header, which is marked sensitive; every error leaving this module has been
//! passed through [`redact_key`] with the key of its call.

mod wire;

#[cfg(test)]
pub(crate) mod tests;

use std::pin::Pin;
use std::time::SystemTime;

use ::http::header::{ACCEPT, AUTHORIZATION};
use ::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use apikeyrouter_application::ports::{
    ChatChunk, ChatResponse, ChatStream, EmbeddingCall, EmbeddingResponse, ModelSet, Provider,
    ProviderCall, ProviderError, StreamStart,
};
use apikeyrouter_domain::{FailureKind, KeyMaterial, ModelId, PriceCatalogue, TokenUsage};
use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use crate::http::{
    self, HttpClient, HttpSettings, MAX_BODY_BYTES, Response, SseEvent, error_from_parts,
    error_from_response, expect_content_type, openai_quota, parse_body, read_body, redact_key,
    sse_stream,
};

/// Where an OpenAI-shaped API lives and how it authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// OpenAI itself: `{base}/chat/completions`, `Authorization: Bearer`.
    OpenAi {
        /// E.g. `https://api.openai.com/v1`.
        base: Url,
    },
    /// A compatible server (Groq, Mistral, vLLM, Ollama): same shape as OpenAI.
    Compatible {
        /// E.g. `http://localhost:11434/v1`.
        base: Url,
    },
    /// Azure OpenAI: `{endpoint}/openai/deployments/{model}/chat/completions
    /// ?api-version=...`, `api-key` header; the model name is the deployment name.
    Azure {
        /// E.g. `https://my-resource.openai.azure.com`.
        endpoint: Url,
        /// The `api-version` query parameter.
        api_version: String,
    },
}

/// The operations of the API.
#[derive(Clone, Copy, Debug)]
enum Operation {
    ChatCompletions,
    Embeddings,
    Models,
}

impl Endpoint {
    /// The URL of `operation` for `model` (which Azure puts in the path).
    fn url(&self, operation: Operation, model: &str) -> Url {
        let (mut url, prefix): (Url, &[&str]) = match self {
            Self::OpenAi { base } | Self::Compatible { base } => (base.clone(), &[]),
            Self::Azure { endpoint, .. } => match operation {
                Operation::Models => (endpoint.clone(), &["openai"]),
                Operation::ChatCompletions | Operation::Embeddings => {
                    (endpoint.clone(), &["openai", "deployments", model])
                }
            },
        };
        let tail: &[&str] = match operation {
            Operation::ChatCompletions => &["chat", "completions"],
            Operation::Embeddings => &["embeddings"],
            Operation::Models => &["models"],
        };
        // `parse_base` refused URLs that cannot be a base, so this cannot fail.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(prefix).extend(tail);
        }
        if let Self::Azure { api_version, .. } = self {
            url.query_pairs_mut()
                .append_pair("api-version", api_version);
        }
        url
    }

    /// [`Self::url`] as the request URI.
    fn uri(&self, operation: Operation, model: &str) -> Result<Uri, ProviderError> {
        http::parse_uri(self.url(operation, model).as_str())
    }

    /// The auth header carrying `material`, marked sensitive so it is never logged.
    fn auth_header(
        &self,
        material: &KeyMaterial,
    ) -> Result<(HeaderName, HeaderValue), ProviderError> {
        Ok(match self {
            Self::OpenAi { .. } | Self::Compatible { .. } => (
                AUTHORIZATION,
                http::secret_header(&["Bearer ", material.expose()].concat())?,
            ),
            Self::Azure { .. } => (
                HeaderName::from_static("api-key"),
                http::secret_header(material.expose())?,
            ),
        })
    }
}

/// Parses a base URL: `http` or `https`, able to carry a path. A trailing slash is
/// tolerated.
pub(crate) fn parse_base(text: &str) -> Result<Url, ProviderError> {
    let url = Url::parse(text.trim()).map_err(|err| {
        ProviderError::new(FailureKind::BadRequest, format!("invalid base url: {err}"))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(ProviderError::new(
            FailureKind::BadRequest,
            format!(
                "invalid base url: scheme {} is not http or https",
                url.scheme()
            ),
        ));
    }
    Ok(url)
}

/// An HTTP client for one OpenAI-shaped endpoint: the pooled connection, the
/// timeouts, and the mapping between normalized and wire types.
#[derive(Debug)]
pub(crate) struct OpenAiClient {
    http: HttpClient,
    endpoint: Endpoint,
    /// The URLs of the operations, built once when they do not depend on the model
    /// (all but Azure): building one per request re-parses the path each time.
    fixed_urls: Option<FixedUrls>,
}

/// Prebuilt operation URLs of an endpoint whose URLs do not depend on the model.
#[derive(Debug)]
struct FixedUrls {
    chat_completions: Uri,
    embeddings: Uri,
    models: Uri,
}

impl FixedUrls {
    fn of(endpoint: &Endpoint) -> Result<Option<Self>, ProviderError> {
        Ok(match endpoint {
            Endpoint::Azure { .. } => None,
            Endpoint::OpenAi { .. } | Endpoint::Compatible { .. } => Some(Self {
                chat_completions: endpoint.uri(Operation::ChatCompletions, "")?,
                embeddings: endpoint.uri(Operation::Embeddings, "")?,
                models: endpoint.uri(Operation::Models, "")?,
            }),
        })
    }

    fn get(&self, operation: Operation) -> &Uri {
        match operation {
            Operation::ChatCompletions => &self.chat_completions,
            Operation::Embeddings => &self.embeddings,
            Operation::Models => &self.models,
        }
    }
}

impl OpenAiClient {
    /// A client for `endpoint` with its own connection pool.
    pub(crate) fn new(endpoint: Endpoint, settings: HttpSettings) -> Result<Self, ProviderError> {
        let fixed_urls = FixedUrls::of(&endpoint)?;
        if fixed_urls.is_none() {
            // Azure builds its URLs per request; refuse a bad endpoint now, not per call.
            endpoint.uri(Operation::ChatCompletions, "deployment")?;
        }
        Ok(Self {
            http: HttpClient::new(&settings)?,
            fixed_urls,
            endpoint,
        })
    }

    /// A request to `operation`, authenticated with `material`, with a JSON `body`.
    fn request<B: Serialize>(
        &self,
        method: Method,
        operation: Operation,
        model: &str,
        material: &KeyMaterial,
        body: Option<&B>,
    ) -> Result<Request<Bytes>, ProviderError> {
        let auth = self.endpoint.auth_header(material)?;
        let uri = match &self.fixed_urls {
            Some(urls) => urls.get(operation).clone(),
            None => self.endpoint.uri(operation, model)?,
        };
        http::request(method, uri, [auth], body)
    }

    /// Sends `request`; a non-success status becomes a classified error.
    async fn send(&self, request: Request<Bytes>) -> Result<Response, ProviderError> {
        let response = self.http.send(request).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_from_response(response, openai_quota).await)
        }
    }

    /// Sends `request` and parses the JSON answer as `T`, with the rate-limit state
    /// from the headers. An `error` object in a 200 body is classified as the error it
    /// is; a body that does not parse is a server error.
    async fn json_call<T: DeserializeOwned + HasError>(
        &self,
        request: Request<Bytes>,
    ) -> Result<(T, Option<apikeyrouter_domain::QuotaObservation>), ProviderError> {
        let mut response = self.send(request).await?;
        let now = SystemTime::now();
        let status = response.status().as_u16();
        let quota = openai_quota(response.headers(), now);
        expect_content_type(&response, "application/json")
            .map_err(|error| error.with_quota(quota))?;
        // Moved out rather than cloned: only an error in the body needs them again.
        let headers: HeaderMap = std::mem::take(response.headers_mut());
        let body = read_body(response, MAX_BODY_BYTES).await?;
        let parsed: T = parse_body(status, &body).map_err(|err| err.with_quota(quota))?;
        if parsed.has_error() {
            return Err(error_from_parts(status, &headers, &body, quota, now));
        }
        Ok((parsed, quota))
    }

    /// `POST /chat/completions`.
    pub(crate) async fn chat(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError> {
        let material = call.material.clone();
        http::redacted(self.chat_inner(call).await, &material)
    }

    /// The `POST /chat/completions` request of `call`, streamed or not.
    fn chat_request(
        &self,
        call: &ProviderCall,
        stream: bool,
    ) -> Result<Request<Bytes>, ProviderError> {
        let body = wire::chat_request(call.model.as_str(), &call.request, stream)?;
        let mut request = self.request(
            Method::POST,
            Operation::ChatCompletions,
            call.model.as_str(),
            &call.material,
            Some(&body),
        )?;
        if stream {
            request
                .headers_mut()
                .insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        }
        Ok(request)
    }

    async fn chat_inner(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError> {
        let request = self.chat_request(&call, false)?;
        let (completion, quota) = self.json_call::<wire::ChatCompletion>(request).await?;
        let model = completion
            .model
            .filter(|model| !model.is_empty())
            .map_or_else(|| call.model.clone(), ModelId::new);
        let usage = completion.usage.map(TokenUsage::from);
        let choice = completion.choices.into_iter().next().ok_or_else(|| {
            ProviderError::new(FailureKind::ServerError, "response has no choices")
                .with_status(200)
                .with_quota(quota)
        })?;
        let (content, tool_calls, finish_reason) = wire::first_choice(choice);
        Ok(ChatResponse {
            content,
            tool_calls,
            model,
            usage,
            finish_reason,
            quota,
        })
    }

    /// `POST /chat/completions` with `"stream": true`.
    pub(crate) async fn chat_stream(
        &self,
        call: ProviderCall,
    ) -> Result<StreamStart, ProviderError> {
        let material = call.material.clone();
        http::redacted(self.chat_stream_inner(call).await, &material)
    }

    async fn chat_stream_inner(&self, call: ProviderCall) -> Result<StreamStart, ProviderError> {
        let request = self.chat_request(&call, true)?;
        let response = self.send(request).await?;
        let quota = openai_quota(response.headers(), SystemTime::now());
        expect_content_type(&response, "text/event-stream")
            .map_err(|error| error.with_quota(quota))?;
        Ok(StreamStart {
            model: call.model,
            quota,
            chunks: chunk_stream(sse_stream(response), call.material),
        })
    }

    /// `POST /embeddings`.
    pub(crate) async fn embed(
        &self,
        call: EmbeddingCall,
    ) -> Result<EmbeddingResponse, ProviderError> {
        let material = call.material.clone();
        http::redacted(self.embed_inner(call).await, &material)
    }

    async fn embed_inner(&self, call: EmbeddingCall) -> Result<EmbeddingResponse, ProviderError> {
        let body = wire::EmbeddingRequest {
            model: call.model.as_str(),
            input: &call.input,
            dimensions: call.dimensions,
            encoding_format: "float",
        };
        let request = self.request(
            Method::POST,
            Operation::Embeddings,
            call.model.as_str(),
            &call.material,
            Some(&body),
        )?;
        let (mut list, quota) = self.json_call::<wire::EmbeddingList>(request).await?;
        if list.data.len() != call.input.len() {
            return Err(ProviderError::new(
                FailureKind::ServerError,
                format!(
                    "malformed response body: {} vectors for {} inputs",
                    list.data.len(),
                    call.input.len()
                ),
            )
            .with_status(200)
            .with_quota(quota));
        }
        list.data.sort_by_key(|data| data.index);
        Ok(EmbeddingResponse {
            vectors: list.data.into_iter().map(|data| data.embedding).collect(),
            model: list
                .model
                .filter(|model| !model.is_empty())
                .map_or_else(|| call.model.clone(), ModelId::new),
            usage: list.usage.map(|usage| TokenUsage {
                completion_tokens: 0,
                ..TokenUsage::from(usage)
            }),
            quota,
        })
    }

    /// `GET /models`.
    pub(crate) async fn list_models(
        &self,
        material: &KeyMaterial,
    ) -> Result<Vec<ModelId>, ProviderError> {
        let result = async {
            let request =
                self.request::<Value>(Method::GET, Operation::Models, "", material, None)?;
            let (list, _quota) = self.json_call::<wire::ModelList>(request).await?;
            Ok(list
                .data
                .into_iter()
                .map(|entry| ModelId::new(entry.id))
                .collect())
        }
        .await;
        http::redacted(result, material)
    }
}

/// Response bodies that may hold an `error` object instead of a result.
trait HasError {
    fn has_error(&self) -> bool;
}

impl HasError for wire::ChatCompletion {
    fn has_error(&self) -> bool {
        self.error.as_ref().is_some_and(|error| !error.is_null())
    }
}

impl HasError for wire::EmbeddingList {
    fn has_error(&self) -> bool {
        self.error.as_ref().is_some_and(|error| !error.is_null())
    }
}

impl HasError for wire::ModelList {
    fn has_error(&self) -> bool {
        self.error.as_ref().is_some_and(|error| !error.is_null())
    }
}

/// Where a chat stream is.
struct StreamState {
    events: Pin<Box<dyn Stream<Item = Result<SseEvent, ProviderError>> + Send>>,
    material: KeyMaterial,
    saw_finish: bool,
    saw_tool_calls: bool,
}

/// Maps the events of a chat-completions stream to chunks. `data: [DONE]` ends it; a
/// stream that ends before `[DONE]` and before any finish reason yields a
/// [`FailureKind::Network`] error, as does an unparsable chunk; an `error` object in
/// a chunk yields its classified error. Nothing follows an error.
fn chunk_stream(
    events: impl Stream<Item = Result<SseEvent, ProviderError>> + Send + 'static,
    material: KeyMaterial,
) -> ChatStream {
    let state = StreamState {
        events: Box::pin(events),
        material,
        saw_finish: false,
        saw_tool_calls: false,
    };
    Box::pin(futures_util::stream::unfold(
        Some(state),
        |state| async move {
            let mut state = state?;
            loop {
                let error = match state.events.next().await {
                    None if state.saw_finish => return None,
                    None => ProviderError::new(
                        FailureKind::Network,
                        "truncated or malformed event stream: ended before [DONE]",
                    ),
                    Some(Err(error)) => error,
                    Some(Ok(event)) => {
                        let data = event.data.trim();
                        if data == "[DONE]" {
                            return None;
                        }
                        if data.is_empty() {
                            continue;
                        }
                        match serde_json::from_str::<wire::StreamChunk>(data) {
                            Err(err) => ProviderError::new(
                                FailureKind::Network,
                                format!(
                                    "truncated or malformed event stream: invalid chunk: {}",
                                    err.to_string().chars().take(200).collect::<String>()
                                ),
                            ),
                            Ok(chunk) if chunk.error.as_ref().is_some_and(|e| !e.is_null()) => {
                                error_from_parts(
                                    200,
                                    &HeaderMap::new(),
                                    data.as_bytes(),
                                    None,
                                    SystemTime::now(),
                                )
                            }
                            Ok(chunk) => match chunk.into_chat_chunk(&mut state.saw_tool_calls) {
                                None => continue,
                                Some(chat_chunk) => {
                                    state.saw_finish |= chat_chunk.finish_reason.is_some();
                                    return Some((
                                        Ok::<ChatChunk, ProviderError>(chat_chunk),
                                        Some(state),
                                    ));
                                }
                            },
                        }
                    }
                };
                let error = redact_key(error, &state.material);
                return Some((Err(error), None));
            }
        },
    ))
}

/// The models of the built-in price catalogue that OpenAI serves (chat and
/// embeddings). Embedding models are matched by their OpenAI families, as Google's
/// `text-embedding-004` shares the generic prefix.
fn openai_catalogue_models() -> Vec<ModelId> {
    const PREFIXES: [&str; 6] = [
        "gpt-",
        "o1",
        "o3",
        "o4",
        "text-embedding-3-",
        "text-embedding-ada-",
    ];
    PriceCatalogue::builtin()
        .models()
        .into_iter()
        .filter(|model| {
            PREFIXES
                .iter()
                .any(|prefix| model.as_str().starts_with(prefix))
        })
        .collect()
}

/// OpenAI's API behind the [`Provider`] port; see the [module documentation](self).
///
/// ```
/// use apikeyrouter_adapters_providers::http::HttpSettings;
/// use apikeyrouter_adapters_providers::openai::OpenAiProvider;
/// use apikeyrouter_application::ports::Provider;
///
/// let provider = OpenAiProvider::new("https://api.openai.com/v1", HttpSettings::default())?;
/// assert_eq!(provider.kind(), "openai");
/// # Ok::<(), apikeyrouter_application::ports::ProviderError>(())
/// ```
#[derive(Debug)]
pub struct OpenAiProvider {
    client: OpenAiClient,
}

impl OpenAiProvider {
    /// A provider calling `base_url` (e.g. `https://api.openai.com/v1`; a trailing
    /// slash is tolerated) with its own pooled HTTP client.
    ///
    /// # Errors
    /// [`FailureKind::BadRequest`] for a URL that is not `http(s)`;
    /// [`FailureKind::Network`] when the HTTP client cannot be built.
    pub fn new(base_url: impl Into<String>, settings: HttpSettings) -> Result<Self, ProviderError> {
        let base = parse_base(&base_url.into())?;
        Ok(Self {
            client: OpenAiClient::new(Endpoint::OpenAi { base }, settings)?,
        })
    }

    /// The models the key can use (`GET /models`).
    ///
    /// # Errors
    /// As [`Provider::chat`].
    pub async fn list_models(&self, material: &KeyMaterial) -> Result<Vec<ModelId>, ProviderError> {
        self.client.list_models(material).await
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }

    fn default_models(&self) -> ModelSet {
        ModelSet::Only(openai_catalogue_models())
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
