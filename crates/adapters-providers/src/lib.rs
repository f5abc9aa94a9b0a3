//! Provider adapters: implementations of the application's
//! [`Provider`](apikeyrouter_application::ports::Provider) port, one module per
//! provider.
//!
//! Each adapter translates its API's errors into
//! [`ProviderError`](apikeyrouter_application::ports::ProviderError) at the seam, so no
//! HTTP-client error type leaves this crate. It depends on the application and domain
//! crates and on hyper (with rustls), never on another adapter crate (stores, observability).
//!
//! - [`anthropic`]: Anthropic's Messages API (Claude), plain and streamed.
//! - [`gemini`]: Google's Gemini API: generateContent, streaming and batch embeddings.
//! - [`http`]: the HTTP plumbing every real adapter shares (client, timeouts,
//!   rate-limit headers, error classification, server-sent events).
//! - [`openai`]: OpenAI's chat completions, embeddings and model list.
//! - [`openai_compatible`]: any OpenAI-compatible base URL (Groq, Mistral, vLLM,
//!   Ollama) and Azure OpenAI.
//! - [`simulated`]: a deterministic in-process provider for tests, benchmarks and demos.

pub mod anthropic;
pub mod gemini;
pub mod http;
pub mod openai;
pub mod openai_compatible;
pub mod simulated;

pub use anthropic::AnthropicProvider;
pub use gemini::GeminiProvider;
pub use openai::OpenAiProvider;
pub use openai_compatible::{AzureSettings, OpenAiCompatibleProvider};
pub use simulated::{Behaviour, Failure, FailurePlan, SimulatedProvider};
