//! The Anthropic adapter: Claude models through the Messages API
//! (`POST {base}/v1/messages`), plain and streamed.
//!
//! It translates the normalized [`RequestIntent`] into Anthropic's shape and back:
//!
//! - System messages, wherever they appear, become the top-level `system` text (joined
//!   by blank lines). Tool results become `tool_result` blocks of a user turn, assistant
//!   tool calls become `tool_use` blocks, and consecutive turns of the same role are
//!   merged, because Anthropic requires user and assistant turns to alternate. Messages
//!   with no content at all are dropped (Anthropic rejects empty text blocks).
//! - Images come before the text of their turn, as Anthropic recommends. `data:` URLs
//!   are sent as base64 sources, other URLs as `url` sources.
//! - `max_tokens` is required by Anthropic: the request's value, else the model's
//!   `default_max_output` from the built-in price catalogue, else 1024.
//! - Temperature is clamped to Anthropic's range `0..=1` (OpenAI allows up to 2), so a
//!   request that fell back from another provider is not rejected for it. When both
//!   temperature and `top_p` are set only the temperature is sent: recent Claude models
//!   reject the pair.
//! - `parallel_tool_calls: false` becomes `disable_parallel_tool_use` on the tool
//!   choice, the end user's id `metadata.user_id` (left out beyond 256 characters).
//!   Anthropic has no `seed`, `presence_penalty` or `frequency_penalty`: they are
//!   dropped, so a request that falls back from OpenAI is still served.
//! - `response_format` (JSON object or JSON schema) has no native equivalent. It is
//!   emulated with a forced tool named [`JSON_TOOL`] whose input schema is the
//!   requested schema; the tool's input comes back as the reply text with finish reason
//!   `stop`, streamed as text too. A request that sets both `response_format` and
//!   `tools` is rejected with [`FailureKind::BadRequest`] before any call, because the
//!   forced tool would keep the model from calling the caller's tools.
//! - Embeddings are not offered (the port's default answer).
//!
//! Errors: HTTP failures are classified by the shared `http` module (`rate_limit_error`
//! → rate limited, `overloaded_error` → server error, ...), with `retry-after` and the
//! `anthropic-ratelimit-*` headers; an `error` event in a stream ends the stream with an
//! `Err` item classified the same way. Every error message is scrubbed of the key
//! material before it leaves the adapter.
//!
//! Depends on the application port and domain types, hyper through the shared `http`
//! module, and serde for the private wire shapes in `wire`; never on other adapters.

mod wire;

/// The longest `metadata.user_id` Anthropic accepts.
const MAX_USER_ID_CHARS: usize = 256;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::time::SystemTime;

use apikeyrouter_application::ports::{
    ChatChunk, ChatResponse, ChatStream, FinishReason, ModelSet, Provider, ProviderCall,
    ProviderError, StreamStart, ToolCallDelta,
};
use apikeyrouter_domain::{
    FailureKind, Image, KeyMaterial, Message, ModelId, PriceCatalogue, RequestIntent,
    ResponseFormat, Role, TokenUsage, ToolCall, ToolChoice,
};
use async_trait::async_trait;
use futures_core::Stream;
use futures_util::StreamExt;
use serde_json::Value;

use ::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::http::{self, HttpClient, HttpSettings, Response, SseEvent};

use self::wire::{
    BlockDelta, ContentBlock, ImageSource, MessagesRequest, MessagesResponse, Metadata,
    ResponseBlock, StreamEvent, WireMessage, WireTool, WireToolChoice, WireUsage,
};

/// The Messages API version this adapter speaks.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` for models the price catalogue does not know.
const FALLBACK_MAX_TOKENS: u32 = 1024;

/// Name of the forced tool that carries a JSON reply when the request sets a
/// `response_format` (see the module docs).
pub const JSON_TOOL: &str = "json_response";

/// An Anthropic Messages API client; see the [module documentation](self).
///
/// ```no_run
/// use apikeyrouter_adapters_providers::anthropic::AnthropicProvider;
/// use apikeyrouter_adapters_providers::http::HttpSettings;
///
/// let provider = AnthropicProvider::new("https://api.anthropic.com", HttpSettings::default())?;
/// # Ok::<(), apikeyrouter_application::ports::ProviderError>(())
/// ```
pub struct AnthropicProvider {
    client: HttpClient,
    /// `{base}/v1/messages`.
    messages_url: Uri,
    /// Claude models of the built-in catalogue, sorted.
    models: Vec<ModelId>,
    /// `max_tokens` per catalogue model, for requests that set none.
    default_max_tokens: HashMap<ModelId, u32>,
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("messages_url", &self.messages_url)
            .field("client", &self.client)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl AnthropicProvider {
    /// A client for the API at `base_url` (e.g. `https://api.anthropic.com`, without
    /// `/v1`; a trailing slash is ignored).
    ///
    /// # Errors
    /// [`FailureKind::BadRequest`] when the base URL is empty, and whatever the shared
    /// HTTP client builder reports for `settings`.
    pub fn new(base_url: impl AsRef<str>, settings: HttpSettings) -> Result<Self, ProviderError> {
        let base = base_url.as_ref().trim().trim_end_matches('/');
        if base.is_empty() {
            return Err(ProviderError::new(
                FailureKind::BadRequest,
                "anthropic base url is empty",
            ));
        }
        let client = HttpClient::new(&settings)?;
        let messages_url = http::parse_uri(&format!("{base}/v1/messages"))?;
        let catalogue = PriceCatalogue::builtin();
        let provider = apikeyrouter_domain::ProviderId::new("anthropic");
        let models: Vec<ModelId> = catalogue
            .models()
            .into_iter()
            .filter(|m| m.as_str().starts_with("claude-"))
            .collect();
        let default_max_tokens = catalogue
            .models()
            .into_iter()
            .filter_map(|m| {
                let max = catalogue.price(&provider, &m)?.default_max_output;
                Some((m, max))
            })
            .collect();
        Ok(Self {
            client,
            messages_url,
            models,
            default_max_tokens,
        })
    }

    /// `max_tokens` to send when the request sets none.
    fn default_max_tokens(&self, model: &ModelId) -> u32 {
        self.default_max_tokens
            .get(model)
            .copied()
            .filter(|&n| n > 0)
            .unwrap_or(FALLBACK_MAX_TOKENS)
    }

    /// Posts `body` and returns the response once its status says success.
    async fn post(
        &self,
        material: &KeyMaterial,
        body: &MessagesRequest<'_>,
    ) -> Result<Response, ProviderError> {
        let headers = [
            (
                HeaderName::from_static("x-api-key"),
                http::secret_header(material.expose())?,
            ),
            (
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(ANTHROPIC_VERSION),
            ),
        ];
        let request = http::request(Method::POST, self.messages_url.clone(), headers, Some(body))?;
        let response = self.client.send(request).await?;
        if !response.status().is_success() {
            return Err(http::error_from_response(response, http::anthropic_quota).await);
        }
        Ok(response)
    }

    async fn chat_inner(&self, call: &ProviderCall) -> Result<ChatResponse, ProviderError> {
        let request = build_request(
            &call.request,
            &call.model,
            self.default_max_tokens(&call.model),
            false,
        )?;
        let mut response = self.post(&call.material, &request.body).await?;
        let now = SystemTime::now();
        let quota = http::anthropic_quota(response.headers(), now);
        let status = response.status().as_u16();
        http::expect_content_type(&response, "application/json")
            .map_err(|e| e.with_quota(quota))?;
        // Moved out rather than cloned: only an error in the body needs them again.
        let headers = std::mem::take(response.headers_mut());
        let body = http::read_body(response, http::MAX_BODY_BYTES)
            .await
            .map_err(|e| e.with_quota(quota))?;
        let parsed: MessagesResponse =
            http::parse_body(status, &body).map_err(|e| e.with_quota(quota))?;
        if parsed.kind.as_deref() == Some("error") || parsed.error.is_some() {
            // An error object under a success status (seen behind some proxies).
            return Err(http::error_from_parts(status, &headers, &body, quota, now));
        }
        let mut res = chat_response(parsed, &call.model, request.json_tool);
        res.quota = quota;
        Ok(res)
    }

    async fn chat_stream_inner(&self, call: &ProviderCall) -> Result<StreamStart, ProviderError> {
        let request = build_request(
            &call.request,
            &call.model,
            self.default_max_tokens(&call.model),
            true,
        )?;
        let response = self.post(&call.material, &request.body).await?;
        let quota = http::anthropic_quota(response.headers(), SystemTime::now());
        http::expect_content_type(&response, "text/event-stream")
            .map_err(|e| e.with_quota(quota))?;
        let events = Box::pin(http::sse_stream(response));
        Ok(StreamStart {
            model: call.model.clone(),
            quota,
            chunks: chunk_stream(
                events,
                StreamState::new(request.json_tool),
                call.material.clone(),
            ),
        })
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    fn default_models(&self) -> ModelSet {
        ModelSet::Only(self.models.clone())
    }

    async fn chat(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError> {
        self.chat_inner(&call)
            .await
            .map_err(|e| http::redact_key(e, &call.material))
    }

    async fn chat_stream(&self, call: ProviderCall) -> Result<StreamStart, ProviderError> {
        self.chat_stream_inner(&call)
            .await
            .map_err(|e| http::redact_key(e, &call.material))
    }
}

/// The error an `error` event of a stream describes (classified like an error body
/// under a success status: `overloaded_error` is a server error, and so on).
fn event_error(data: &str) -> ProviderError {
    http::error_from_parts(
        200,
        &HeaderMap::new(),
        data.as_bytes(),
        None,
        SystemTime::now(),
    )
}

fn bad_request(message: impl Into<String>) -> ProviderError {
    ProviderError::new(FailureKind::BadRequest, message)
}

/// A request body and how to read the reply.
#[derive(Debug)]
struct Translated<'a> {
    body: MessagesRequest<'a>,
    /// Whether the [`JSON_TOOL`] emulates `response_format`.
    json_tool: bool,
}

/// Translates `request` for `model`.
///
/// # Errors
/// [`FailureKind::BadRequest`] for what Anthropic cannot take or what is malformed:
/// invalid JSON in tool parameters or tool-call arguments, a tool result without a call
/// id, `response_format` together with tools, a `tool_choice` naming an undefined tool.
fn build_request<'a>(
    request: &'a RequestIntent,
    model: &'a ModelId,
    default_max_tokens: u32,
    stream: bool,
) -> Result<Translated<'a>, ProviderError> {
    let mut system: Vec<&str> = Vec::new();
    let mut messages: Vec<WireMessage<'a>> = Vec::new();
    for message in &request.messages {
        let (role, blocks) = match message.role {
            Role::System => {
                if !message.content.is_empty() {
                    system.push(&message.content);
                }
                continue;
            }
            Role::User => ("user", content_blocks(message)?),
            Role::Assistant => ("assistant", assistant_blocks(message)?),
            Role::Tool => ("user", vec![tool_result_block(message)?]),
        };
        if blocks.is_empty() {
            continue;
        }
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(WireMessage {
                role,
                content: blocks,
            }),
        }
    }

    let mut tools = request
        .tools
        .iter()
        .map(|tool| {
            Ok(WireTool {
                name: &tool.name,
                description: tool.description.clone(),
                input_schema: schema(&tool.parameters, &tool.name)?,
            })
        })
        .collect::<Result<Vec<_>, ProviderError>>()?;
    let disable_parallel_tool_use = request.parallel_tool_calls == Some(false);
    let mut tool_choice = match &request.tool_choice {
        _ if tools.is_empty() => None,
        None if disable_parallel_tool_use => Some(WireToolChoice::Auto {
            disable_parallel_tool_use,
        }),
        None => None,
        Some(ToolChoice::Auto) => Some(WireToolChoice::Auto {
            disable_parallel_tool_use,
        }),
        Some(ToolChoice::None) => Some(WireToolChoice::None),
        Some(ToolChoice::Required) => Some(WireToolChoice::Any {
            disable_parallel_tool_use,
        }),
        Some(ToolChoice::Function { name }) => Some(WireToolChoice::Tool {
            name,
            disable_parallel_tool_use,
        }),
    };
    if let Some(ToolChoice::Function { name }) = &request.tool_choice {
        if !request.tools.iter().any(|t| &t.name == name) {
            return Err(bad_request(format!(
                "tool_choice names function {name:?}, which the request does not define"
            )));
        }
    }

    let json_schema = match &request.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(("json_object", None)),
        Some(ResponseFormat::JsonSchema { name, schema }) => {
            Some(("json_schema", Some((name.as_str(), schema.as_str()))))
        }
    };
    let json_tool = json_schema.is_some();
    if let Some((format, named_schema)) = json_schema {
        if !tools.is_empty() {
            return Err(bad_request(format!(
                "anthropic does not support response_format {format} natively; the adapter \
                 emulates it with a forced tool, which cannot be combined with the request's \
                 tools: drop response_format or the tools"
            )));
        }
        let (description, input_schema) = match named_schema {
            None => (
                "Respond with the answer as a JSON object.".to_owned(),
                serde_json::json!({ "type": "object" }),
            ),
            Some((name, text)) => (
                format!("Respond with the answer as JSON matching the schema {name:?}."),
                schema(text, name)?,
            ),
        };
        tools.push(WireTool {
            name: JSON_TOOL,
            description: Some(description),
            input_schema,
        });
        tool_choice = Some(WireToolChoice::Tool {
            name: JSON_TOOL,
            disable_parallel_tool_use: false,
        });
    }

    let temperature = request.temperature.map(|t| t.clamp(0.0, 1.0));
    Ok(Translated {
        body: MessagesRequest {
            model: model.as_str(),
            max_tokens: request.max_tokens.unwrap_or(default_max_tokens),
            system: (!system.is_empty()).then(|| system.join("\n\n")),
            messages,
            temperature,
            top_p: if temperature.is_some() {
                None
            } else {
                request.top_p
            },
            stop_sequences: request.stop.iter().map(String::as_str).collect(),
            tools,
            tool_choice,
            // Anthropic takes at most 256 characters: a longer id is left out
            // rather than failing the request.
            metadata: request
                .end_user
                .as_deref()
                .filter(|id| id.chars().count() <= MAX_USER_ID_CHARS)
                .map(|user_id| Metadata { user_id }),
            stream,
        },
        json_tool,
    })
}

/// Images, then text, of a user (or assistant) message.
fn content_blocks(message: &Message) -> Result<Vec<ContentBlock<'_>>, ProviderError> {
    let mut blocks = Vec::with_capacity(message.images.len() + 1);
    for image in &message.images {
        blocks.push(ContentBlock::Image {
            source: image_source(image)?,
        });
    }
    if !message.content.is_empty() {
        blocks.push(ContentBlock::Text {
            text: &message.content,
        });
    }
    Ok(blocks)
}

/// Text, then one `tool_use` block per call, of an assistant message.
fn assistant_blocks(message: &Message) -> Result<Vec<ContentBlock<'_>>, ProviderError> {
    let mut blocks = content_blocks(message)?;
    for call in &message.tool_calls {
        blocks.push(ContentBlock::ToolUse {
            id: &call.id,
            name: &call.name,
            input: arguments(call)?,
        });
    }
    Ok(blocks)
}

fn tool_result_block(message: &Message) -> Result<ContentBlock<'_>, ProviderError> {
    let tool_use_id = message
        .tool_call_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| bad_request("tool message without tool_call_id"))?;
    Ok(ContentBlock::ToolResult {
        tool_use_id,
        content: &message.content,
    })
}

/// A tool call's arguments as a JSON object; empty text means no arguments.
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

/// A JSON schema given as text; empty text means an object with any properties.
fn schema(text: &str, name: &str) -> Result<Value, ProviderError> {
    if text.trim().is_empty() {
        return Ok(serde_json::json!({ "type": "object" }));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| bad_request(format!("schema of {name:?} is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad_request(format!(
            "schema of {name:?} is not a JSON object"
        )));
    }
    Ok(value)
}

fn image_source(image: &Image) -> Result<ImageSource<'_>, ProviderError> {
    Ok(match image {
        Image::Base64 { media_type, data } => ImageSource::Base64 { media_type, data },
        Image::Url { url } => match parse_data_url(url)? {
            Some((media_type, data)) => ImageSource::Base64 { media_type, data },
            None => ImageSource::Url { url },
        },
    })
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

/// Normalized usage: cache reads and writes are input tokens too.
fn token_usage(usage: &WireUsage) -> TokenUsage {
    let cache_read = usage.cache_read_input_tokens.unwrap_or(0);
    TokenUsage {
        prompt_tokens: usage.input_tokens.unwrap_or(0)
            + cache_read
            + usage.cache_creation_input_tokens.unwrap_or(0),
        completion_tokens: usage.output_tokens.unwrap_or(0),
        cached_tokens: cache_read,
    }
}

fn finish_reason(stop_reason: Option<&str>, json_tool: bool) -> FinishReason {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        // With the JSON tool forced, a tool use is the answer itself.
        Some("tool_use") if json_tool => FinishReason::Stop,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        // `end_turn`, `stop_sequence`, `pause_turn`, missing, and anything new.
        _ => FinishReason::Stop,
    }
}

/// Normalizes a parsed reply (one that is not an error object).
fn chat_response(
    body: MessagesResponse,
    requested_model: &ModelId,
    json_tool: bool,
) -> ChatResponse {
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for block in body.content {
        match block {
            ResponseBlock::Text { text } => content.push_str(&text),
            ResponseBlock::ToolUse { name, input, .. } if json_tool && name == JSON_TOOL => {
                content.push_str(&input.to_string());
            }
            ResponseBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                name,
                arguments: input.to_string(),
            }),
            ResponseBlock::Other => {}
        }
    }
    ChatResponse {
        content,
        tool_calls,
        model: body
            .model
            .map_or_else(|| requested_model.clone(), ModelId::new),
        usage: body.usage.as_ref().map(token_usage),
        finish_reason: finish_reason(body.stop_reason.as_deref(), json_tool),
        quota: None,
    }
}

/// What one stream event means for the caller.
#[derive(Debug, PartialEq)]
enum Step {
    /// Nothing to pass on (pings, block ends, empty deltas).
    Skip,
    /// A chunk for the caller.
    Emit(ChatChunk),
    /// `message_stop`: the stream is complete.
    End,
    /// The stream failed; nothing follows.
    Fail(ProviderError),
}

/// Where a stream is: usage so far and which content blocks are tool calls.
#[derive(Debug, Default)]
struct StreamState {
    /// Whether the [`JSON_TOOL`] emulates `response_format`.
    json_tool: bool,
    /// Usage merged from `message_start` and `message_delta`.
    usage: WireUsage,
    /// `(content block index, tool call ordinal)` of each `tool_use` block.
    tool_blocks: Vec<(u32, u32)>,
    /// Content block indexes of JSON-tool blocks, whose input is reply text.
    json_blocks: Vec<u32>,
}

impl StreamState {
    fn new(json_tool: bool) -> Self {
        Self {
            json_tool,
            ..Self::default()
        }
    }

    /// Interprets one event's data.
    fn on_event(&mut self, data: &str) -> Step {
        let event: StreamEvent = match serde_json::from_str(data) {
            Ok(event) => event,
            Err(e) => {
                return Step::Fail(ProviderError::new(
                    FailureKind::ServerError,
                    format!("malformed anthropic stream event: {e}"),
                ));
            }
        };
        match event {
            StreamEvent::MessageStart { message } => {
                if let Some(usage) = message.usage {
                    self.merge_usage(&usage);
                }
                Step::Skip
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                ResponseBlock::Text { text } => text_chunk(text),
                ResponseBlock::ToolUse { name, .. } if self.json_tool && name == JSON_TOOL => {
                    self.json_blocks.push(index);
                    Step::Skip
                }
                ResponseBlock::ToolUse { id, name, .. } => {
                    let ordinal = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                    self.tool_blocks.push((index, ordinal));
                    Step::Emit(ChatChunk {
                        tool_calls: vec![ToolCallDelta {
                            index: ordinal,
                            id: Some(id),
                            name: Some(name),
                            arguments: String::new(),
                        }],
                        ..ChatChunk::default()
                    })
                }
                ResponseBlock::Other => Step::Skip,
            },
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => text_chunk(text),
                BlockDelta::InputJsonDelta { partial_json } if partial_json.is_empty() => {
                    Step::Skip
                }
                BlockDelta::InputJsonDelta { partial_json } => {
                    if self.json_blocks.contains(&index) {
                        return text_chunk(partial_json);
                    }
                    match self.tool_blocks.iter().find(|(block, _)| *block == index) {
                        Some(&(_, ordinal)) => Step::Emit(ChatChunk {
                            tool_calls: vec![ToolCallDelta {
                                index: ordinal,
                                arguments: partial_json,
                                ..ToolCallDelta::default()
                            }],
                            ..ChatChunk::default()
                        }),
                        None => Step::Skip,
                    }
                }
                BlockDelta::Other => Step::Skip,
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    self.merge_usage(&usage);
                }
                Step::Emit(ChatChunk {
                    finish_reason: Some(finish_reason(
                        delta.stop_reason.as_deref(),
                        self.json_tool,
                    )),
                    usage: Some(token_usage(&self.usage)),
                    ..ChatChunk::default()
                })
            }
            StreamEvent::MessageStop {} => Step::End,
            StreamEvent::Error {} => Step::Fail(event_error(data)),
            StreamEvent::ContentBlockStop {} | StreamEvent::Ping {} | StreamEvent::Other => {
                Step::Skip
            }
        }
    }

    /// Counts present in `usage` replace those seen before (`message_delta` usage is
    /// cumulative).
    fn merge_usage(&mut self, usage: &WireUsage) {
        let merged = &mut self.usage;
        merged.input_tokens = usage.input_tokens.or(merged.input_tokens);
        merged.output_tokens = usage.output_tokens.or(merged.output_tokens);
        merged.cache_creation_input_tokens = usage
            .cache_creation_input_tokens
            .or(merged.cache_creation_input_tokens);
        merged.cache_read_input_tokens = usage
            .cache_read_input_tokens
            .or(merged.cache_read_input_tokens);
    }
}

fn text_chunk(text: String) -> Step {
    if text.is_empty() {
        Step::Skip
    } else {
        Step::Emit(ChatChunk {
            text,
            ..ChatChunk::default()
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<SseEvent, ProviderError>> + Send>>;

/// Turns server-sent events into chunks. The stream ends after `message_stop`, or with
/// one `Err` item when the events fail, carry an `error`, or stop before `message_stop`.
fn chunk_stream(events: EventStream, state: StreamState, material: KeyMaterial) -> ChatStream {
    let chunks =
        futures_util::stream::unfold(Some((events, state, material)), |progress| async move {
            let (mut events, mut state, material) = progress?;
            loop {
                let step = match events.next().await {
                    None => Step::Fail(ProviderError::new(
                        FailureKind::Network,
                        "anthropic stream ended before message_stop",
                    )),
                    Some(Err(error)) => Step::Fail(error),
                    Some(Ok(event)) => state.on_event(&event.data),
                };
                match step {
                    Step::Skip => {}
                    Step::Emit(chunk) => return Some((Ok(chunk), Some((events, state, material)))),
                    Step::End => return None,
                    Step::Fail(error) => {
                        return Some((Err(http::redact_key(error, &material)), None));
                    }
                }
            }
        });
    Box::pin(chunks)
}
