//! OpenAI wire shapes to and from the router's normalized model.

use apikeyrouter::domain::{
    Image, ResponseFormat as NormFormat, ToolCall, ToolChoice, ToolDefinition,
};
use apikeyrouter::{ChatChunk, Message, RequestIntent, Role, RouteResponse, TokenUsage};

use super::wire::{
    AssistantMessage, ChatChunkOut, ChatCompletion, ChatRequest, Choice, ChunkChoice, CompletionId,
    Content, ContentPart, Delta, FunctionCall, FunctionDelta, PromptTokensDetails, ResponseFormat,
    Stop, ToolCallDeltaOut, ToolCallOut, Usage,
};
use crate::errors::ApiError;

/// Converts a chat request, refusing what the router cannot honour.
///
/// # Errors
/// 400 naming the offending parameter.
pub fn intent(req: ChatRequest) -> Result<RequestIntent, ApiError> {
    if req.model.trim().is_empty() {
        return Err(
            ApiError::bad_request("invalid_value", "`model` must not be empty.")
                .with_param("model"),
        );
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(
            ApiError::bad_request("unsupported_value", "Only n=1 is supported.").with_param("n"),
        );
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some() {
        let param = if req.logprobs == Some(true) {
            "logprobs"
        } else {
            "top_logprobs"
        };
        return Err(ApiError::bad_request(
            "unsupported_value",
            "Log probabilities are not supported: replies carry none.",
        )
        .with_param(param));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_value",
            "`messages` must contain at least one message.",
        )
        .with_param("messages"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("Unknown message role {other:?}."),
                )
                .with_param("messages"));
            }
        };
        let mut message = Message::new(role, String::new());
        match m.content {
            None => {}
            Some(Content::Text(text)) => message.content = text,
            Some(Content::Parts(parts)) => {
                for part in parts {
                    match part {
                        ContentPart::Text { text } => message.content.push_str(&text),
                        ContentPart::ImageUrl { image_url } => {
                            message.images.push(image(&image_url.url)?)
                        }
                    }
                }
            }
        }
        message.tool_calls = m
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(|c| ToolCall {
                id: c.id,
                name: c.function.name,
                arguments: c.function.arguments,
            })
            .collect();
        message.tool_call_id = m.tool_call_id;
        if role == Role::Tool && message.tool_call_id.is_none() {
            return Err(ApiError::bad_request(
                "invalid_value",
                "A tool message needs `tool_call_id`.",
            )
            .with_param("messages"));
        }
        messages.push(message);
    }
    let mut intent = RequestIntent::new(req.model.as_str(), messages);
    intent.max_tokens = req.max_completion_tokens.or(req.max_tokens);
    intent.temperature = req.temperature;
    intent.top_p = req.top_p;
    intent.seed = req.seed;
    intent.presence_penalty = req.presence_penalty;
    intent.frequency_penalty = req.frequency_penalty;
    intent.parallel_tool_calls = req.parallel_tool_calls;
    intent.end_user = req.user;
    intent.stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    for tool in req.tools.unwrap_or_default() {
        if tool.kind != "function" {
            return Err(ApiError::bad_request(
                "unsupported_value",
                format!("Tool type {:?} is not supported.", tool.kind),
            )
            .with_param("tools"));
        }
        intent.tools.push(ToolDefinition {
            name: tool.function.name,
            description: tool.function.description,
            parameters: tool.function.parameters.map_or_else(
                || "{\"type\":\"object\",\"properties\":{}}".to_owned(),
                |p| p.to_string(),
            ),
        });
    }
    intent.tool_choice = match req.tool_choice {
        None => None,
        Some(serde_json::Value::String(s)) => Some(match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => return Err(ApiError::bad_request("invalid_value", format!("Unknown tool_choice {other:?}.")).with_param("tool_choice")),
        }),
        Some(v) => match v.pointer("/function/name").and_then(|n| n.as_str()) {
            Some(name) => Some(ToolChoice::Function { name: name.to_owned() }),
            None => return Err(ApiError::bad_request("invalid_value", "tool_choice must be a mode or {\"type\":\"function\",\"function\":{\"name\":...}}.").with_param("tool_choice")),
        },
    };
    intent.response_format = match req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(NormFormat::JsonObject),
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(NormFormat::JsonSchema {
            name: json_schema.name,
            schema: json_schema
                .schema
                .map_or_else(|| "{}".to_owned(), |s| s.to_string()),
        }),
    };
    Ok(intent)
}

fn image(url: &str) -> Result<Image, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,").ok_or_else(|| {
            ApiError::bad_request("invalid_value", "Image data URLs must be base64 encoded.")
                .with_param("messages")
        })?;
        return Ok(Image::Base64 {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Image::Url {
            url: url.to_owned(),
        });
    }
    Err(
        ApiError::bad_request("invalid_value", "Image URLs must be http(s) or data URLs.")
            .with_param("messages"),
    )
}

pub fn usage(u: &TokenUsage) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total(),
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: u.cached_tokens,
        },
    }
}

pub fn completion(r: RouteResponse, created: u64) -> ChatCompletion {
    let tool_calls = (!r.tool_calls.is_empty()).then(|| {
        r.tool_calls
            .into_iter()
            .map(|c| ToolCallOut {
                id: c.id,
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: c.name,
                    arguments: c.arguments,
                },
            })
            .collect()
    });
    let content = if r.content.is_empty() && tool_calls.is_some() {
        None
    } else {
        Some(r.content)
    };
    ChatCompletion {
        id: CompletionId(r.request_id),
        object: "chat.completion",
        created,
        model: r.model,
        choices: [Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
                tool_calls,
            },
            finish_reason: r.finish_reason.as_str(),
            logprobs: None,
        }],
        usage: usage(&r.usage),
    }
}

/// One streamed chunk in OpenAI's shape; the usage chunk has no choices.
pub fn chunk(id: &str, model: &str, created: u64, c: &ChatChunk, first: bool) -> ChatChunkOut {
    let tool_calls = (!c.tool_calls.is_empty()).then(|| {
        c.tool_calls
            .iter()
            .map(|t| ToolCallDeltaOut {
                index: t.index,
                id: t.id.clone(),
                kind: t.id.as_ref().map(|_| "function"),
                function: FunctionDelta {
                    name: t.name.clone(),
                    arguments: t.arguments.clone(),
                },
            })
            .collect()
    });
    ChatChunkOut {
        id: id.to_owned(),
        object: "chat.completion.chunk",
        created,
        model: model.to_owned(),
        choices: vec![ChunkChoice {
            index: 0,
            delta: Delta {
                role: first.then_some("assistant"),
                content: (!c.text.is_empty() || first).then(|| c.text.clone()),
                tool_calls,
            },
            finish_reason: c.finish_reason.map(|f| f.as_str()),
        }],
        usage: None,
    }
}

pub fn usage_chunk(id: &str, model: &str, created: u64, u: &TokenUsage) -> ChatChunkOut {
    ChatChunkOut {
        id: id.to_owned(),
        object: "chat.completion.chunk",
        created,
        model: model.to_owned(),
        choices: Vec::new(),
        usage: Some(usage(u)),
    }
}
