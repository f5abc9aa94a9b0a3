//! OpenAI's chat-completions, embeddings and models wire shapes (private DTOs), and
//! their translation from and to the normalized request and response types.
//!
//! Shared with the OpenAI-compatible adapter: Azure, Groq, Mistral, vLLM and Ollama
//! speak the same format. Responses are read leniently (missing fields default,
//! `null`s accepted) because compatible servers differ in what they fill in.

use std::borrow::Cow;

use apikeyrouter_application::ports::ProviderError;
use apikeyrouter_application::ports::{ChatChunk, FinishReason, ToolCallDelta};
use apikeyrouter_domain::{
    FailureKind, Image, Message, RequestIntent, ResponseFormat, Role, TokenUsage, ToolCall,
    ToolChoice,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of `POST /chat/completions`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    /// OpenAI refuses it without tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    /// `null` only for an assistant message that is all tool calls.
    content: Option<WireContent<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum WireContent<'a> {
    Text(&'a str),
    Parts(Vec<ContentPart<'a>>),
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageUrl<'a> },
}

#[derive(Debug, Serialize)]
struct ImageUrl<'a> {
    url: Cow<'a, str>,
}

#[derive(Debug, Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunctionCall<'a>,
}

#[derive(Debug, Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Debug, Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Debug, Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: Value,
}

/// Whether `model` takes `max_completion_tokens` instead of `max_tokens` (OpenAI's
/// reasoning models refuse the latter).
pub(crate) fn uses_max_completion_tokens(model: &str) -> bool {
    ["o1", "o3", "o4", "gpt-5"]
        .iter()
        .any(|prefix| model.starts_with(prefix))
}

/// Translates `intent` into a request for `model`.
///
/// # Errors
/// [`FailureKind::BadRequest`] when a tool's parameters or the response schema is not
/// valid JSON: no provider could serve such a request.
pub(crate) fn chat_request<'a>(
    model: &'a str,
    intent: &'a RequestIntent,
    stream: bool,
) -> Result<ChatRequest<'a>, ProviderError> {
    let tools = intent
        .tools
        .iter()
        .map(|tool| {
            Ok(WireTool {
                kind: "function",
                function: WireFunction {
                    name: &tool.name,
                    description: tool.description.as_deref(),
                    parameters: parse_json_text(&tool.parameters, || {
                        format!("parameters of tool {}", tool.name)
                    })?,
                },
            })
        })
        .collect::<Result<Vec<_>, ProviderError>>()?;
    let response_format = match &intent.response_format {
        None => None,
        Some(ResponseFormat::Text) => Some(serde_json::json!({ "type": "text" })),
        Some(ResponseFormat::JsonObject) => Some(serde_json::json!({ "type": "json_object" })),
        Some(ResponseFormat::JsonSchema { name, schema }) => {
            let schema = parse_json_text(schema, || format!("response schema {name}"))?;
            Some(serde_json::json!({
                "type": "json_schema",
                "json_schema": { "name": name, "schema": schema, "strict": true },
            }))
        }
    };
    let tool_choice = intent.tool_choice.as_ref().map(|choice| match choice {
        ToolChoice::Auto => Value::from("auto"),
        ToolChoice::None => Value::from("none"),
        ToolChoice::Required => Value::from("required"),
        ToolChoice::Function { name } => {
            serde_json::json!({ "type": "function", "function": { "name": name } })
        }
    });
    let completion_field = uses_max_completion_tokens(model);
    Ok(ChatRequest {
        model,
        messages: intent.messages.iter().map(wire_message).collect(),
        max_tokens: intent.max_tokens.filter(|_| !completion_field),
        max_completion_tokens: intent.max_tokens.filter(|_| completion_field),
        temperature: intent.temperature,
        top_p: intent.top_p,
        stop: &intent.stop,
        parallel_tool_calls: intent.parallel_tool_calls.filter(|_| !tools.is_empty()),
        tools,
        tool_choice,
        response_format,
        seed: intent.seed,
        presence_penalty: intent.presence_penalty,
        frequency_penalty: intent.frequency_penalty,
        user: intent.end_user.as_deref(),
        stream,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
    })
}

fn parse_json_text(text: &str, what: impl FnOnce() -> String) -> Result<Value, ProviderError> {
    serde_json::from_str(text).map_err(|err| {
        ProviderError::new(
            FailureKind::BadRequest,
            format!("{} is not valid json: {err}", what()),
        )
    })
}

fn wire_message(message: &Message) -> WireMessage<'_> {
    let role = match message.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let content = if !message.images.is_empty() {
        let mut parts = Vec::with_capacity(message.images.len() + 1);
        if !message.content.is_empty() {
            parts.push(ContentPart::Text {
                text: &message.content,
            });
        }
        parts.extend(message.images.iter().map(|image| ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: match image {
                    Image::Url { url } => Cow::Borrowed(url.as_str()),
                    Image::Base64 { media_type, data } => {
                        Cow::Owned(format!("data:{media_type};base64,{data}"))
                    }
                },
            },
        }));
        Some(WireContent::Parts(parts))
    } else if message.content.is_empty() && !message.tool_calls.is_empty() {
        None
    } else {
        Some(WireContent::Text(&message.content))
    };
    WireMessage {
        role,
        content,
        tool_calls: message
            .tool_calls
            .iter()
            .map(|call| WireToolCall {
                id: &call.id,
                kind: "function",
                function: WireFunctionCall {
                    name: &call.name,
                    arguments: &call.arguments,
                },
            })
            .collect(),
        tool_call_id: message.tool_call_id.as_deref(),
    }
}

/// The body of a chat completion (or an error object in its place).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatCompletion {
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) choices: Vec<Choice>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
    #[serde(default)]
    pub(crate) error: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Choice {
    #[serde(default)]
    message: ResponseMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ResponseToolCall>>,
    /// The legacy single function call.
    #[serde(default)]
    function_call: Option<ResponseFunction>,
}

#[derive(Debug, Deserialize)]
struct ResponseToolCall {
    #[serde(default)]
    id: String,
    function: ResponseFunction,
}

#[derive(Debug, Deserialize)]
struct ResponseFunction {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: String,
}

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub(crate) struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<Usage> for TokenUsage {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage
                .prompt_tokens_details
                .and_then(|details| details.cached_tokens)
                .unwrap_or(0),
        }
    }
}

/// The normalized parts of the first choice: content, tool calls, finish reason.
pub(crate) fn first_choice(choice: Choice) -> (String, Vec<ToolCall>, FinishReason) {
    let message = choice.message;
    let mut tool_calls: Vec<ToolCall> = message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .map(|call| ToolCall {
            id: call.id,
            name: call.function.name,
            arguments: call.function.arguments,
        })
        .collect();
    if let Some(function) = message.function_call {
        tool_calls.push(ToolCall {
            id: String::new(),
            name: function.name,
            arguments: function.arguments,
        });
    }
    let content = match (message.content, message.refusal) {
        (Some(content), _) if !content.is_empty() => content,
        (_, Some(refusal)) => refusal,
        (content, None) => content.unwrap_or_default(),
    };
    let finish = finish_reason(choice.finish_reason.as_deref(), !tool_calls.is_empty());
    (content, tool_calls, finish)
}

/// Maps OpenAI's finish reasons; an unknown or missing one is `tool_calls` when the
/// reply has tool calls, else `stop`.
pub(crate) fn finish_reason(reason: Option<&str>, has_tool_calls: bool) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        Some("content_filter") => FinishReason::ContentFilter,
        _ if has_tool_calls => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// One `data:` payload of a streamed chat completion.
#[derive(Debug, Deserialize)]
pub(crate) struct StreamChunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    pub(crate) error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Delta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Debug, Deserialize)]
struct DeltaToolCall {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<DeltaFunction>,
}

#[derive(Debug, Deserialize)]
struct DeltaFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl StreamChunk {
    /// The normalized piece: the first choice's delta (requests ask for one choice),
    /// its finish reason, and the usage of the final chunk. `None` when the chunk
    /// carries nothing (role announcements, Azure's filter results).
    pub(crate) fn into_chat_chunk(self, saw_tool_calls: &mut bool) -> Option<ChatChunk> {
        let mut chunk = ChatChunk {
            usage: self.usage.map(TokenUsage::from),
            ..ChatChunk::default()
        };
        if let Some(choice) = self.choices.into_iter().find(|choice| choice.index == 0) {
            let delta = choice.delta;
            chunk.text = delta.content.or(delta.refusal).unwrap_or_default();
            chunk.tool_calls = delta
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|call| {
                    let function = call.function;
                    ToolCallDelta {
                        index: call.index,
                        id: call.id,
                        name: function.as_ref().and_then(|f| f.name.clone()),
                        arguments: function.and_then(|f| f.arguments).unwrap_or_default(),
                    }
                })
                .collect();
            *saw_tool_calls |= !chunk.tool_calls.is_empty();
            chunk.finish_reason = choice
                .finish_reason
                .as_deref()
                .map(|reason| finish_reason(Some(reason), *saw_tool_calls));
        }
        let empty = chunk.text.is_empty()
            && chunk.tool_calls.is_empty()
            && chunk.finish_reason.is_none()
            && chunk.usage.is_none();
        (!empty).then_some(chunk)
    }
}

/// The body of `POST /embeddings`.
#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingRequest<'a> {
    pub(crate) model: &'a str,
    pub(crate) input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dimensions: Option<u32>,
    pub(crate) encoding_format: &'static str,
}

/// Its answer.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingList {
    #[serde(default)]
    pub(crate) data: Vec<EmbeddingData>,
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) usage: Option<Usage>,
    #[serde(default)]
    pub(crate) error: Option<Value>,
}

/// One vector.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingData {
    #[serde(default)]
    pub(crate) index: usize,
    pub(crate) embedding: Vec<f32>,
}

/// The body of `GET /models`.
#[derive(Debug, Deserialize)]
pub(crate) struct ModelList {
    #[serde(default)]
    pub(crate) data: Vec<ModelEntry>,
    #[serde(default)]
    pub(crate) error: Option<Value>,
}

/// One model.
#[derive(Debug, Deserialize)]
pub(crate) struct ModelEntry {
    pub(crate) id: String,
}
