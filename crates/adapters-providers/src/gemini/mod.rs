//! The Gemini adapter: Google's Gemini models through the Generative Language API
//! (`{base}/models/{model}:generateContent`, `:streamGenerateContent?alt=sse`,
//! `:batchEmbedContents`).
//!
//! The key travels in the `x-goog-api-key` header, never in the URL's query, so it
//! cannot appear in a logged URL. It translates the normalized [`RequestIntent`] into
//! Gemini's shape and back:
//!
//! - System messages, wherever they appear, become `systemInstruction`. Assistant turns
//!   have role `model`; user turns and tool results role `user`; consecutive turns of
//!   the same role are merged. Assistant tool calls become `functionCall` parts; a tool
//!   result becomes a `functionResponse` part `{name, response: {content}}`, its name
//!   taken from the most recent earlier assistant call with the same id (the content is
//!   sent as JSON when it is a JSON object or array, else as text). A tool result that
//!   answers no earlier call is rejected with [`FailureKind::BadRequest`].
//! - Images: base64 images and `data:` URLs become `inlineData`; other URLs become
//!   `fileData {fileUri, mimeType}` with the MIME type guessed from the file extension
//!   (omitted when unknown). Gemini fetches Files API URIs (and, for some models,
//!   public URLs); a URL it cannot fetch comes back as its own 400.
//! - Tool and response schemas are JSON Schema; Gemini takes an OpenAPI subset, so
//!   `$schema`, `$id`, `$comment` and `additionalProperties` are dropped and
//!   `"type": ["T", "null"]` becomes `"type": "T", "nullable": true`. A function whose
//!   parameters are an object without properties is declared without `parameters`
//!   (Gemini rejects an empty object schema).
//! - `response_format` maps to `responseMimeType: application/json` (plus
//!   `responseSchema` for a JSON schema). Gemini cannot combine a JSON response with
//!   function calling, so a request with both is rejected before the call.
//! - `seed` goes to `generationConfig` (its low 32 bits, Gemini's width).
//!   `presence_penalty` and `frequency_penalty` are dropped: Gemini 2.5 models answer
//!   400 "Penalty is not enabled" for them, and a request that falls back from OpenAI
//!   must still be served. `parallel_tool_calls` and the end user's id have no Gemini
//!   equivalent and are dropped.
//! - Function calls carry no id on Gemini: replies number them `call_0`, `call_1`, ...
//!   in order (an id the model does send is kept).
//! - A prompt Gemini blocks (`promptFeedback.blockReason`, no candidates) is answered
//!   as an empty reply with finish reason `content_filter`, as OpenAI reports a
//!   filtered completion; a reply with no candidates and no block reason is a server
//!   error.
//! - Usage: `promptTokenCount` (cached tokens included) as prompt tokens,
//!   `candidatesTokenCount` plus `thoughtsTokenCount` (thinking is billed as output) as
//!   completion tokens, `cachedContentTokenCount` as cached tokens.
//! - Embeddings through `batchEmbedContents`; Gemini reports no usage for them.
//!
//! Gemini sends no rate-limit headers, so responses carry no quota observation; a 429
//! is classified by the shared `http` module (rate limited, or quota exhausted when the
//! message speaks of an exceeded quota), with Google's `retryDelay` as retry-after.
//!
//! Depends on the application port and domain types, hyper through the shared `http`
//! module, and serde for the private wire shapes in `wire`; never on other adapters.

mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::time::SystemTime;

use apikeyrouter_application::ports::{
    ChatChunk, ChatResponse, ChatStream, EmbeddingCall, EmbeddingResponse, FinishReason, ModelSet,
    Provider, ProviderCall, ProviderError, StreamStart, ToolCallDelta,
};
use apikeyrouter_domain::{
    FailureKind, Image, KeyMaterial, ModelId, PriceCatalogue, RequestIntent, ResponseFormat, Role,
    TokenUsage, ToolCall, ToolChoice,
};
use async_trait::async_trait;
use futures_core::Stream;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;

use ::http::{HeaderMap, HeaderName, Method};

use crate::http::{self, HttpClient, HttpSettings, Response, SseEvent};

use self::wire::{
    BatchEmbedRequest, BatchEmbedResponse, Blob, Content, EmbedContent, EmbedRequest, FileData,
    FunctionCallOut, FunctionCallingConfig, FunctionDeclaration, FunctionResponse,
    GenerateContentRequest, GenerateContentResponse, GenerationConfig, Part, SystemInstruction,
    ToolConfig, Tools, UsageMetadata,
};

/// Embedding models served besides the catalogue's chat models.
const EMBEDDING_MODELS: [&str; 2] = ["gemini-embedding-001", "text-embedding-004"];

/// A Gemini API client; see the [module documentation](self).
///
/// ```no_run
/// use apikeyrouter_adapters_providers::gemini::GeminiProvider;
/// use apikeyrouter_adapters_providers::http::HttpSettings;
///
/// let provider = GeminiProvider::new(
///     "https://generativelanguage.googleapis.com/v1beta",
///     HttpSettings::default(),
/// )?;
/// # Ok::<(), apikeyrouter_application::ports::ProviderError>(())
/// ```
pub struct GeminiProvider {
    client: HttpClient,
    /// The base URL without a trailing slash, e.g. `.../v1beta`.
    base_url: String,
    /// Gemini models of the built-in catalogue and the embedding models, sorted.
    models: Vec<ModelId>,
}

impl fmt::Debug for GeminiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeminiProvider")
            .field("base_url", &self.base_url)
            .field("client", &self.client)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl GeminiProvider {
    /// A client for the API at `base_url` (e.g.
    /// `https://generativelanguage.googleapis.com/v1beta`; a trailing slash is ignored).
    ///
    /// # Errors
    /// [`FailureKind::BadRequest`] when the base URL is empty, and whatever the shared
    /// HTTP client builder reports for `settings`.
    pub fn new(base_url: impl AsRef<str>, settings: HttpSettings) -> Result<Self, ProviderError> {
        let base = base_url.as_ref().trim().trim_end_matches('/');
        if base.is_empty() {
            return Err(ProviderError::new(
                FailureKind::BadRequest,
                "gemini base url is empty",
            ));
        }
        // URLs are built per request (the model is in the path); refuse a bad base now.
        http::parse_uri(&format!("{base}/models/model:generateContent"))?;
        let client = HttpClient::new(&settings)?;
        let mut models: Vec<ModelId> = PriceCatalogue::builtin()
            .models()
            .into_iter()
            .filter(|m| m.as_str().starts_with("gemini-"))
            .chain(EMBEDDING_MODELS.into_iter().map(ModelId::new))
            .collect();
        models.sort();
        models.dedup();
        Ok(Self {
            client,
            base_url: base.to_owned(),
            models,
        })
    }

    /// `{base}/models/{model}:{method}`.
    fn url(&self, model: &ModelId, method: &str) -> Result<String, ProviderError> {
        Ok(format!(
            "{}/models/{}:{method}",
            self.base_url,
            model_name(model)?
        ))
    }

    /// Posts `body` to `url` and returns the response once its status says success.
    async fn post(
        &self,
        url: &str,
        material: &KeyMaterial,
        body: &impl Serialize,
    ) -> Result<Response, ProviderError> {
        let key = (
            HeaderName::from_static("x-goog-api-key"),
            http::secret_header(material.expose())?,
        );
        let request = http::request(Method::POST, http::parse_uri(url)?, [key], Some(body))?;
        let response = self.client.send(request).await?;
        if !response.status().is_success() {
            return Err(http::error_from_response(response, http::no_quota).await);
        }
        Ok(response)
    }

    /// Posts `body` and reads a JSON reply. Returns the parsed reply, or the error an
    /// error object in a success body describes.
    async fn post_json<T>(
        &self,
        url: &str,
        material: &KeyMaterial,
        body: &impl Serialize,
        is_error: impl Fn(&T) -> bool,
    ) -> Result<T, ProviderError>
    where
        T: serde::de::DeserializeOwned,
    {
        let mut response = self.post(url, material, body).await?;
        let status = response.status().as_u16();
        http::expect_content_type(&response, "application/json")?;
        // Moved out rather than cloned: only an error in the body needs them again.
        let headers = std::mem::take(response.headers_mut());
        let bytes = http::read_body(response, http::MAX_BODY_BYTES).await?;
        let parsed: T = http::parse_body(status, &bytes)?;
        if is_error(&parsed) {
            return Err(http::error_from_parts(
                status,
                &headers,
                &bytes,
                None,
                SystemTime::now(),
            ));
        }
        Ok(parsed)
    }

    async fn chat_inner(&self, call: &ProviderCall) -> Result<ChatResponse, ProviderError> {
        let body = build_request(&call.request)?;
        let url = self.url(&call.model, "generateContent")?;
        let parsed: GenerateContentResponse = self
            .post_json(
                &url,
                &call.material,
                &body,
                |r: &GenerateContentResponse| r.error.is_some(),
            )
            .await?;
        chat_response(parsed, &call.model)
    }

    async fn chat_stream_inner(&self, call: &ProviderCall) -> Result<StreamStart, ProviderError> {
        let body = build_request(&call.request)?;
        let url = self.url(&call.model, "streamGenerateContent?alt=sse")?;
        let response = self.post(&url, &call.material, &body).await?;
        http::expect_content_type(&response, "text/event-stream")?;
        let events = Box::pin(http::sse_stream(response));
        Ok(StreamStart {
            model: call.model.clone(),
            quota: None,
            chunks: chunk_stream(events, call.material.clone()),
        })
    }

    async fn embed_inner(&self, call: &EmbeddingCall) -> Result<EmbeddingResponse, ProviderError> {
        if call.input.is_empty() {
            return Err(bad_request("embeddings request has no input"));
        }
        let url = self.url(&call.model, "batchEmbedContents")?;
        let model_path = format!("models/{}", model_name(&call.model)?);
        let body = BatchEmbedRequest {
            requests: call
                .input
                .iter()
                .map(|text| EmbedRequest {
                    model: &model_path,
                    content: EmbedContent {
                        parts: vec![text_part(text)],
                    },
                    output_dimensionality: call.dimensions,
                })
                .collect(),
        };
        let parsed: BatchEmbedResponse = self
            .post_json(&url, &call.material, &body, |r: &BatchEmbedResponse| {
                r.error.is_some()
            })
            .await?;
        if parsed.embeddings.len() != call.input.len() {
            return Err(ProviderError::new(
                FailureKind::ServerError,
                format!(
                    "gemini returned {} embeddings for {} inputs",
                    parsed.embeddings.len(),
                    call.input.len()
                ),
            )
            .with_status(200));
        }
        Ok(EmbeddingResponse {
            vectors: parsed.embeddings.into_iter().map(|e| e.values).collect(),
            model: call.model.clone(),
            usage: None,
            quota: None,
        })
    }
}

#[async_trait]
impl Provider for GeminiProvider {
    fn kind(&self) -> &'static str {
        "gemini"
    }

    fn default_models(&self) -> ModelSet {
        ModelSet::Only(self.models.clone())
    }

    async fn chat(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError> {
        http::redacted(self.chat_inner(&call).await, &call.material)
    }

    async fn chat_stream(&self, call: ProviderCall) -> Result<StreamStart, ProviderError> {
        http::redacted(self.chat_stream_inner(&call).await, &call.material)
    }

    async fn embed(&self, call: EmbeddingCall) -> Result<EmbeddingResponse, ProviderError> {
        http::redacted(self.embed_inner(&call).await, &call.material)
    }
}

fn bad_request(message: impl Into<String>) -> ProviderError {
    ProviderError::new(FailureKind::BadRequest, message)
}

/// The model's name for the URL path: a `models/` prefix is dropped, and only
/// letters, digits, `.`, `-` and `_` are accepted, so a model id cannot change the
/// path or query of the request.
fn model_name(model: &ModelId) -> Result<&str, ProviderError> {
    let name = model
        .as_str()
        .strip_prefix("models/")
        .unwrap_or(model.as_str());
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(name)
    } else {
        Err(bad_request(format!(
            "gemini model name {:?} has characters other than letters, digits, '.', '-' and '_'",
            model.as_str()
        )))
    }
}

fn text_part(text: &str) -> Part<'_> {
    Part {
        text: Some(text),
        ..Part::default()
    }
}

/// Translates `request`.
///
/// # Errors
/// [`FailureKind::BadRequest`] for what Gemini cannot take or what is malformed: invalid
/// JSON in schemas or tool-call arguments, a tool result that answers no earlier call,
/// `response_format` together with tools, a `tool_choice` naming an undefined tool.
fn build_request(request: &RequestIntent) -> Result<GenerateContentRequest<'_>, ProviderError> {
    let mut system: Vec<Part<'_>> = Vec::new();
    let mut contents: Vec<Content<'_>> = Vec::new();
    // Call id -> function name, of the calls made so far. Gemini's generated ids repeat
    // across turns (`call_0` each time), so a later call replaces an earlier one.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    for message in &request.messages {
        let mut parts = Vec::new();
        let role = match message.role {
            Role::System => {
                if !message.content.is_empty() {
                    system.push(text_part(&message.content));
                }
                continue;
            }
            Role::User | Role::Assistant => {
                for image in &message.images {
                    parts.push(image_part(image)?);
                }
                if !message.content.is_empty() {
                    parts.push(text_part(&message.content));
                }
                for call in &message.tool_calls {
                    call_names.insert(&call.id, &call.name);
                    parts.push(Part {
                        function_call: Some(FunctionCallOut {
                            name: &call.name,
                            args: arguments(call)?,
                        }),
                        ..Part::default()
                    });
                }
                if message.role == Role::User {
                    "user"
                } else {
                    "model"
                }
            }
            Role::Tool => {
                let id = message
                    .tool_call_id
                    .as_deref()
                    .ok_or_else(|| bad_request("tool message without tool_call_id"))?;
                let name = *call_names.get(id).ok_or_else(|| {
                    bad_request(format!(
                        "tool result for call {id:?} answers no earlier assistant tool call"
                    ))
                })?;
                parts.push(Part {
                    function_response: Some(FunctionResponse {
                        name,
                        response: serde_json::json!({ "content": tool_content(&message.content) }),
                    }),
                    ..Part::default()
                });
                "user"
            }
        };
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some(last) if last.role == role => last.parts.extend(parts),
            _ => contents.push(Content { role, parts }),
        }
    }

    let declarations = request
        .tools
        .iter()
        .map(|tool| {
            let schema = parse_schema(&tool.parameters, &tool.name)?;
            Ok(FunctionDeclaration {
                name: &tool.name,
                description: tool.description.as_deref(),
                parameters: (!is_empty_object_schema(&schema)).then_some(schema),
            })
        })
        .collect::<Result<Vec<_>, ProviderError>>()?;
    if let Some(ToolChoice::Function { name }) = &request.tool_choice {
        if !request.tools.iter().any(|t| &t.name == name) {
            return Err(bad_request(format!(
                "tool_choice names function {name:?}, which the request does not define"
            )));
        }
    }
    let tool_config = match &request.tool_choice {
        _ if declarations.is_empty() => None,
        None => None,
        Some(choice) => {
            let (mode, allowed_function_names) = match choice {
                ToolChoice::Auto => ("AUTO", Vec::new()),
                ToolChoice::None => ("NONE", Vec::new()),
                ToolChoice::Required => ("ANY", Vec::new()),
                ToolChoice::Function { name } => ("ANY", vec![name.as_str()]),
            };
            Some(ToolConfig {
                function_calling_config: FunctionCallingConfig {
                    mode,
                    allowed_function_names,
                },
            })
        }
    };

    let (response_mime_type, response_schema) = match &request.response_format {
        None | Some(ResponseFormat::Text) => (None, None),
        Some(format) if !declarations.is_empty() => {
            let name = match format {
                ResponseFormat::JsonSchema { .. } => "json_schema",
                _ => "json_object",
            };
            return Err(bad_request(format!(
                "gemini does not support response_format {name} together with tools: \
                 drop response_format or the tools"
            )));
        }
        Some(ResponseFormat::JsonObject) => (Some("application/json"), None),
        Some(ResponseFormat::JsonSchema { name, schema }) => {
            (Some("application/json"), Some(parse_schema(schema, name)?))
        }
    };

    Ok(GenerateContentRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(SystemInstruction { parts: system }),
        tools: if declarations.is_empty() {
            Vec::new()
        } else {
            vec![Tools {
                function_declarations: declarations,
            }]
        },
        tool_config,
        generation_config: GenerationConfig {
            temperature: request.temperature,
            top_p: request.top_p,
            max_output_tokens: request.max_tokens,
            // A seed wider than Gemini's 32 bits keeps its low bits: still repeatable.
            seed: request.seed.map(|seed| seed as i32),
            stop_sequences: request.stop.iter().map(String::as_str).collect(),
            response_mime_type,
            response_schema,
        },
    })
}

fn image_part(image: &Image) -> Result<Part<'_>, ProviderError> {
    let part = match image {
        Image::Base64 { media_type, data } => Part {
            inline_data: Some(Blob {
                mime_type: media_type,
                data,
            }),
            ..Part::default()
        },
        Image::Url { url } => match parse_data_url(url)? {
            Some((mime_type, data)) => Part {
                inline_data: Some(Blob { mime_type, data }),
                ..Part::default()
            },
            None => Part {
                file_data: Some(FileData {
                    mime_type: guess_image_type(url),
                    file_uri: url,
                }),
                ..Part::default()
            },
        },
    };
    Ok(part)
}

/// Splits `data:<media type>;base64,<data>` into its parts; `None` for other URLs.
fn parse_data_url(url: &str) -> Result<Option<(&str, &str)>, ProviderError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Ok(None);
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| bad_request("image data url has no data"))?;
    let media_type = meta
        .strip_suffix(";base64")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad_request("image data url must be base64 with a media type"))?;
    Ok(Some((media_type, data)))
}

/// The image MIME type a URL's file extension suggests.
fn guess_image_type(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let extension = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        _ => return None,
    })
}

/// A tool call's arguments as a JSON value; empty text means no arguments.
fn arguments(call: &ToolCall) -> Result<Value, ProviderError> {
    if call.arguments.trim().is_empty() {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    serde_json::from_str(&call.arguments).map_err(|e| {
        bad_request(format!(
            "arguments of tool call {:?} ({}) are not valid JSON: {e}",
            call.id, call.name
        ))
    })
}

/// A tool result: structured when it is a JSON object or array, else text.
fn tool_content(content: &str) -> Value {
    match serde_json::from_str::<Value>(content) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) => value,
        _ => Value::String(content.to_owned()),
    }
}

/// A JSON schema given as text, translated to Gemini's subset; empty text means an
/// object with any properties.
fn parse_schema(text: &str, name: &str) -> Result<Value, ProviderError> {
    if text.trim().is_empty() {
        return Ok(serde_json::json!({ "type": "object" }));
    }
    let mut value: Value = serde_json::from_str(text)
        .map_err(|e| bad_request(format!("schema of {name:?} is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad_request(format!(
            "schema of {name:?} is not a JSON object"
        )));
    }
    to_gemini_schema(&mut value);
    Ok(value)
}

/// Rewrites a JSON Schema into the OpenAPI subset Gemini accepts; see the module docs.
fn to_gemini_schema(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    for key in ["$schema", "$id", "$comment", "additionalProperties"] {
        map.remove(key);
    }
    let nullable_type = match map.get("type") {
        Some(Value::Array(types)) => {
            let non_null: Vec<&Value> = types
                .iter()
                .filter(|t| t.as_str() != Some("null"))
                .collect();
            match non_null.as_slice() {
                [only] if non_null.len() < types.len() => Some((*only).clone()),
                _ => None,
            }
        }
        _ => None,
    };
    if let Some(single) = nullable_type {
        map.insert("type".to_owned(), single);
        map.insert("nullable".to_owned(), Value::Bool(true));
    }
    if let Some(Value::Object(properties)) = map.get_mut("properties") {
        properties.values_mut().for_each(to_gemini_schema);
    }
    match map.get_mut("items") {
        Some(Value::Array(items)) => items.iter_mut().for_each(to_gemini_schema),
        Some(items) => to_gemini_schema(items),
        None => {}
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(variants)) = map.get_mut(key) {
            variants.iter_mut().for_each(to_gemini_schema);
        }
    }
}

/// Whether `schema` is an object schema without properties (a function without
/// parameters).
fn is_empty_object_schema(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object")
        && schema
            .get("properties")
            .and_then(Value::as_object)
            .is_none_or(serde_json::Map::is_empty)
}

fn token_usage(usage: &UsageMetadata) -> TokenUsage {
    TokenUsage {
        prompt_tokens: usage.prompt_token_count,
        completion_tokens: usage.candidates_token_count + usage.thoughts_token_count,
        cached_tokens: usage.cached_content_token_count,
    }
}

fn finish_reason(reason: Option<&str>, made_tool_calls: bool) -> FinishReason {
    match reason {
        Some("MAX_TOKENS") => FinishReason::Length,
        Some(
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY",
        ) => FinishReason::ContentFilter,
        _ if made_tool_calls => FinishReason::ToolCalls,
        // `STOP`, `OTHER`, missing, and anything new.
        _ => FinishReason::Stop,
    }
}

/// The text and function calls of a reply's first candidate; calls are numbered from
/// `first_call`.
fn candidate_output(
    body: &mut GenerateContentResponse,
    first_call: usize,
) -> (String, Vec<ToolCall>, Option<String>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    let Some(candidate) = body.candidates.first_mut() else {
        return (text, calls, None);
    };
    let parts = candidate
        .content
        .take()
        .map(|content| content.parts)
        .unwrap_or_default();
    for part in parts {
        if let Some(call) = part.function_call {
            let index = first_call + calls.len();
            calls.push(ToolCall {
                id: call
                    .id
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| format!("call_{index}")),
                name: call.name,
                arguments: call
                    .args
                    .unwrap_or_else(|| Value::Object(serde_json::Map::new()))
                    .to_string(),
            });
        } else if let Some(part_text) = part.text {
            if part.thought != Some(true) {
                text.push_str(&part_text);
            }
        }
    }
    (text, calls, candidate.finish_reason.take())
}

/// Normalizes a parsed reply (one that is not an error object).
fn chat_response(
    mut body: GenerateContentResponse,
    requested_model: &ModelId,
) -> Result<ChatResponse, ProviderError> {
    let blocked = body
        .prompt_feedback
        .as_ref()
        .and_then(|f| f.block_reason.as_deref())
        .is_some();
    if body.candidates.is_empty() && !blocked {
        return Err(ProviderError::new(
            FailureKind::ServerError,
            "gemini returned no candidates and no block reason",
        )
        .with_status(200));
    }
    let (content, tool_calls, reason) = candidate_output(&mut body, 0);
    let finish_reason = if body.candidates.is_empty() {
        FinishReason::ContentFilter
    } else {
        finish_reason(reason.as_deref(), !tool_calls.is_empty())
    };
    Ok(ChatResponse {
        content,
        tool_calls,
        model: body
            .model_version
            .map_or_else(|| requested_model.clone(), ModelId::new),
        usage: body.usage_metadata.as_ref().map(token_usage),
        finish_reason,
        quota: None,
    })
}

/// What one stream event means for the caller.
#[derive(Debug, PartialEq)]
enum Step {
    /// Nothing to pass on.
    Skip,
    /// A chunk for the caller.
    Emit(ChatChunk),
    /// The stream failed; nothing follows.
    Fail(ProviderError),
}

/// Where a stream is: calls numbered so far, the finish reason and the last usage.
#[derive(Debug, Default)]
struct StreamState {
    n_tool_calls: usize,
    /// The last `finishReason` seen.
    finish: Option<String>,
    /// Whether the prompt was blocked.
    blocked: bool,
    /// The last usage seen (Gemini repeats it, cumulatively, on each event).
    usage: Option<UsageMetadata>,
}

impl StreamState {
    /// Interprets one event's data: a partial `GenerateContentResponse`.
    fn on_event(&mut self, data: &str) -> Step {
        let mut body: GenerateContentResponse = match serde_json::from_str(data) {
            Ok(body) => body,
            Err(e) => {
                return Step::Fail(ProviderError::new(
                    FailureKind::ServerError,
                    format!("malformed gemini stream event: {e}"),
                ));
            }
        };
        if body.error.is_some() {
            return Step::Fail(http::error_from_parts(
                200,
                &HeaderMap::new(),
                data.as_bytes(),
                None,
                SystemTime::now(),
            ));
        }
        if body.usage_metadata.is_some() {
            self.usage = body.usage_metadata;
        }
        if body
            .prompt_feedback
            .as_ref()
            .is_some_and(|f| f.block_reason.is_some())
        {
            self.blocked = true;
        }
        let (text, calls, finish) = candidate_output(&mut body, self.n_tool_calls);
        if finish.is_some() {
            self.finish = finish;
        }
        let first = self.n_tool_calls;
        self.n_tool_calls += calls.len();
        if text.is_empty() && calls.is_empty() {
            return Step::Skip;
        }
        Step::Emit(ChatChunk {
            text,
            tool_calls: calls
                .into_iter()
                .enumerate()
                .map(|(offset, call)| ToolCallDelta {
                    index: u32::try_from(first + offset).unwrap_or(u32::MAX),
                    id: Some(call.id),
                    name: Some(call.name),
                    arguments: call.arguments,
                })
                .collect(),
            ..ChatChunk::default()
        })
    }

    /// The body ended: the final chunk with finish reason and usage, or an error when
    /// Gemini never said it had finished.
    fn on_end(&self) -> Step {
        let finish_reason = if self.finish.is_some() {
            finish_reason(self.finish.as_deref(), self.n_tool_calls > 0)
        } else if self.blocked {
            FinishReason::ContentFilter
        } else {
            return Step::Fail(ProviderError::new(
                FailureKind::Network,
                "gemini stream ended without a finish reason",
            ));
        };
        Step::Emit(ChatChunk {
            finish_reason: Some(finish_reason),
            usage: self.usage.as_ref().map(token_usage),
            ..ChatChunk::default()
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<SseEvent, ProviderError>> + Send>>;

/// Turns server-sent events into chunks: content chunks as they come, then one final
/// chunk with the finish reason and usage when the body ends. The stream ends with one
/// `Err` item when the events fail, carry an error, or end before a finish reason.
fn chunk_stream(events: EventStream, material: KeyMaterial) -> ChatStream {
    let chunks = futures_util::stream::unfold(
        Some((events, StreamState::default(), material)),
        |progress| async move {
            let (mut events, mut state, material) = progress?;
            loop {
                let (step, at_end) = match events.next().await {
                    None => (state.on_end(), true),
                    Some(Err(error)) => (Step::Fail(error), true),
                    Some(Ok(event)) => (state.on_event(&event.data), false),
                };
                match step {
                    Step::Skip => {}
                    Step::Emit(chunk) if at_end => return Some((Ok(chunk), None)),
                    Step::Emit(chunk) => {
                        return Some((Ok(chunk), Some((events, state, material))));
                    }
                    Step::Fail(error) => {
                        return Some((Err(http::redact_key(error, &material)), None));
                    }
                }
            }
        },
    );
    Box::pin(chunks)
}
