//! Wire shapes of the Gemini API (`generateContent`, `streamGenerateContent`,
//! `batchEmbedContents`), request and response.
//!
//! Private to the adapter: nothing here leaves the `gemini` module. Request types
//! borrow from the normalized request where they can. Response fields are all optional
//! or defaulted, and unknown fields are ignored, so a new Gemini feature does not break
//! parsing of the parts we understand.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of `models/{model}:generateContent` and `:streamGenerateContent`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GenerateContentRequest<'a> {
    pub contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_instruction: Option<SystemInstruction<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tools<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_config: Option<ToolConfig<'a>>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    pub generation_config: GenerationConfig<'a>,
}

/// One turn: `user` or `model`.
#[derive(Debug, Serialize)]
pub(super) struct Content<'a> {
    pub role: &'static str,
    pub parts: Vec<Part<'a>>,
}

/// The system prompt (a content without a role).
#[derive(Debug, Serialize)]
pub(super) struct SystemInstruction<'a> {
    pub parts: Vec<Part<'a>>,
}

/// One part of a turn: exactly one of its fields is set.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Part<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_data: Option<Blob<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_data: Option<FileData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCallOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_response: Option<FunctionResponse<'a>>,
}

/// Inline bytes, base64-encoded.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Blob<'a> {
    pub mime_type: &'a str,
    pub data: &'a str,
}

/// A file Gemini fetches by URI.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FileData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<&'static str>,
    pub file_uri: &'a str,
}

/// A function call the model made earlier in the conversation.
#[derive(Debug, Serialize)]
pub(super) struct FunctionCallOut<'a> {
    pub name: &'a str,
    pub args: Value,
}

/// A function's result.
#[derive(Debug, Serialize)]
pub(super) struct FunctionResponse<'a> {
    pub name: &'a str,
    pub response: Value,
}

/// A group of function declarations.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Tools<'a> {
    pub function_declarations: Vec<FunctionDeclaration<'a>>,
}

/// A function the model may call.
#[derive(Debug, Serialize)]
pub(super) struct FunctionDeclaration<'a> {
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
    /// Omitted for functions without parameters: Gemini rejects an object schema with
    /// no properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// How the model may call functions.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ToolConfig<'a> {
    pub function_calling_config: FunctionCallingConfig<'a>,
}

/// `AUTO`, `ANY` or `NONE`, optionally restricted to some functions.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FunctionCallingConfig<'a> {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_function_names: Vec<&'a str>,
}

/// Sampling and output settings.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    /// 32 bits in Gemini's API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_schema: Option<Value>,
}

impl GenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.max_output_tokens.is_none()
            && self.seed.is_none()
            && self.stop_sequences.is_empty()
            && self.response_mime_type.is_none()
            && self.response_schema.is_none()
    }
}

/// A reply, or one event of a streamed reply.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GenerateContentResponse {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    pub model_version: Option<String>,
    /// Set when an error arrives in place of a reply (status 200 or mid-stream); the
    /// shared classifier reads it from the raw body.
    #[serde(default)]
    pub error: Option<IgnoredAny>,
}

/// One candidate reply; the adapter reads the first.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Candidate {
    #[serde(default)]
    pub content: Option<CandidateContent>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// The parts of a candidate.
#[derive(Debug, Default, Deserialize)]
pub(super) struct CandidateContent {
    #[serde(default)]
    pub parts: Vec<ResponsePart>,
}

/// A part of a reply: text, a thought summary, or a function call.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ResponsePart {
    #[serde(default)]
    pub text: Option<String>,
    /// Thought summaries are not part of the answer.
    #[serde(default)]
    pub thought: Option<bool>,
    #[serde(default)]
    pub function_call: Option<FunctionCallIn>,
}

/// A function call in a reply.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FunctionCallIn {
    /// Set by some models; otherwise the adapter numbers the calls.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub args: Option<Value>,
}

/// Why a prompt was refused.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PromptFeedback {
    #[serde(default)]
    pub block_reason: Option<String>,
}

/// Token counts.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UsageMetadata {
    /// Includes the cached tokens.
    #[serde(default)]
    pub prompt_token_count: u64,
    #[serde(default)]
    pub candidates_token_count: u64,
    /// Thinking tokens, billed as output.
    #[serde(default)]
    pub thoughts_token_count: u64,
    #[serde(default)]
    pub cached_content_token_count: u64,
}

/// The body of `models/{model}:batchEmbedContents`.
#[derive(Debug, Serialize)]
pub(super) struct BatchEmbedRequest<'a> {
    pub requests: Vec<EmbedRequest<'a>>,
}

/// One text to embed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EmbedRequest<'a> {
    /// `models/{model}`.
    pub model: &'a str,
    pub content: EmbedContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_dimensionality: Option<u32>,
}

/// The text, as one part.
#[derive(Debug, Serialize)]
pub(super) struct EmbedContent<'a> {
    pub parts: Vec<Part<'a>>,
}

/// The reply of `batchEmbedContents`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct BatchEmbedResponse {
    #[serde(default)]
    pub embeddings: Vec<Embedding>,
    /// As in [`GenerateContentResponse::error`].
    #[serde(default)]
    pub error: Option<IgnoredAny>,
}

/// One vector.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Embedding {
    #[serde(default)]
    pub values: Vec<f32>,
}
