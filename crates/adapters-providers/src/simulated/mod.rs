//! A deterministic, in-process [`Provider`] for tests, benchmarks and demos.
//!
//! [`SimulatedProvider`] answers every call from the request alone: the same request
//! always gets the same reply and the same token usage, and no network, randomness or
//! clock is involved. Behaviour is set per key id (with a default for keys not listed):
//! an artificial latency, a script of injected failures ([`FailurePlan`]) and an
//! optional rate-limit observation to report. It counts calls per key so tests can
//! assert, for example, that a throttled key was never called.
//!
//! With zero latency (the default) a call completes on its first poll: it neither
//! sleeps nor yields, so benchmarks measure the router rather than the timer. A
//! non-zero latency or a [`Failure::Hang`] uses `tokio::time::sleep` and must then be
//! polled inside a Tokio runtime with the time driver enabled.
//!
//! Invariant: the behaviour lock is a `std::sync::Mutex` taken and released before any
//! `.await`, so it is never held across a suspension point.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use apikeyrouter_application::ports::{
    ChatChunk, ChatResponse, EmbeddingCall, EmbeddingResponse, FinishReason, ModelSet, Provider,
    ProviderCall, ProviderError, StreamStart,
};
use apikeyrouter_domain::{FailureKind, KeyId, ModelId, QuotaObservation, Role, TokenUsage};
use async_trait::async_trait;
use futures_core::Stream;

#[cfg(test)]
mod tests;

/// How many characters of the last user message the simulated reply quotes.
const QUOTED_CHARS: usize = 40;

/// A failure the simulation can inject into a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// HTTP 429, [`FailureKind::RateLimited`], with an optional `Retry-After`.
    RateLimited {
        /// The wait the simulated provider asks for.
        retry_after: Option<Duration>,
    },
    /// HTTP 429, [`FailureKind::QuotaExhausted`] (`insufficient_quota`).
    QuotaExhausted,
    /// HTTP 401, [`FailureKind::Unauthorized`].
    Unauthorized,
    /// HTTP 400, [`FailureKind::BadRequest`].
    BadRequest,
    /// HTTP 500, [`FailureKind::ServerError`].
    ServerError,
    /// The call sleeps this long (choose it longer than the router's timeout, so the
    /// timeout fires first) and then fails with [`FailureKind::Timeout`] and no status.
    Hang(Duration),
}

impl Failure {
    /// The error a call failing this way returns (for [`Failure::Hang`], the one it
    /// returns after sleeping).
    pub fn to_provider_error(self) -> ProviderError {
        match self {
            Self::RateLimited { retry_after } => {
                let error = ProviderError::new(FailureKind::RateLimited, "simulated rate limit")
                    .with_status(429);
                match retry_after {
                    Some(wait) => error.with_retry_after(wait),
                    None => error,
                }
            }
            Self::QuotaExhausted => {
                ProviderError::new(FailureKind::QuotaExhausted, "simulated insufficient quota")
                    .with_status(429)
            }
            Self::Unauthorized => {
                ProviderError::new(FailureKind::Unauthorized, "simulated invalid api key")
                    .with_status(401)
            }
            Self::BadRequest => {
                ProviderError::new(FailureKind::BadRequest, "simulated bad request")
                    .with_status(400)
            }
            Self::ServerError => {
                ProviderError::new(FailureKind::ServerError, "simulated server error")
                    .with_status(500)
            }
            Self::Hang(duration) => ProviderError::new(
                FailureKind::Timeout,
                format!("simulated provider hung for {} ms", duration.as_millis()),
            ),
        }
    }
}

/// Which calls to a key fail, counted from 1 since the key's behaviour was last set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePlan {
    /// Every call fails.
    Always(Failure),
    /// Calls `n`, `2n`, `3n`, ... fail; the others succeed. `n = 0` never fails.
    EveryNth {
        /// The period.
        n: u64,
        /// What the failing calls return.
        failure: Failure,
    },
    /// The first `n` calls fail, then every call succeeds.
    FirstN {
        /// How many calls fail.
        n: u64,
        /// What they return.
        failure: Failure,
    },
}

impl FailurePlan {
    /// Every call fails with `failure`.
    pub const fn always(failure: Failure) -> Self {
        Self::Always(failure)
    }

    /// Calls `n`, `2n`, ... fail with `failure`.
    pub const fn every_nth(n: u64, failure: Failure) -> Self {
        Self::EveryNth { n, failure }
    }

    /// The first `n` calls fail with `failure`, the rest succeed.
    pub const fn first_n(n: u64, failure: Failure) -> Self {
        Self::FirstN { n, failure }
    }

    /// The first call fails with `failure`, the rest succeed.
    pub const fn fail_once_then_ok(failure: Failure) -> Self {
        Self::FirstN { n: 1, failure }
    }

    /// The failure of call number `call` (counted from 1), if it fails.
    pub fn failure_for(&self, call: u64) -> Option<Failure> {
        match *self {
            Self::Always(failure) => Some(failure),
            Self::EveryNth { n, failure } => (n != 0 && call % n == 0).then_some(failure),
            Self::FirstN { n, failure } => (call <= n).then_some(failure),
        }
    }
}

/// How the simulated provider treats calls made with one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// Time each call takes; `None` uses the provider's latency
    /// ([`SimulatedProvider::with_latency`]).
    pub latency: Option<Duration>,
    /// Injected failures; `None` means every call succeeds.
    pub failure: Option<FailurePlan>,
    /// Rate-limit state reported with every response and error; `None` reports none.
    pub report_quota: Option<QuotaObservation>,
}

impl Behaviour {
    /// Every call succeeds, with the provider's latency and no quota report.
    pub fn ok() -> Self {
        Self::default()
    }

    /// Calls fail according to `plan`.
    pub fn failing(plan: FailurePlan) -> Self {
        Self {
            failure: Some(plan),
            ..Self::default()
        }
    }

    /// Sets this key's latency, overriding the provider's.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = Some(latency);
        self
    }

    /// Reports `observation` with every response and error.
    #[must_use]
    pub fn reporting_quota(mut self, observation: QuotaObservation) -> Self {
        self.report_quota = Some(observation);
        self
    }
}

/// A deterministic fake LLM provider; see the [module documentation](self).
///
/// ```
/// use std::time::Duration;
/// use apikeyrouter_adapters_providers::simulated::{
///     Behaviour, Failure, FailurePlan, SimulatedProvider,
/// };
/// use apikeyrouter_domain::KeyId;
///
/// let provider = SimulatedProvider::new()
///     .with_latency(Duration::from_millis(20))
///     .with_key_behaviour(
///         &KeyId::new("throttled"),
///         Behaviour::failing(FailurePlan::always(Failure::RateLimited {
///             retry_after: Some(Duration::from_secs(30)),
///         })),
///     );
/// assert_eq!(provider.total_calls(), 0);
/// ```
#[derive(Debug, Default)]
pub struct SimulatedProvider {
    models: Option<Vec<ModelId>>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Latency of keys whose behaviour sets none.
    latency: Duration,
    /// Behaviour of keys without their own.
    default_behaviour: Behaviour,
    keys: HashMap<KeyId, KeyEntry>,
    total_calls: u64,
}

#[derive(Debug, Default)]
struct KeyEntry {
    /// `None`: the default behaviour applies.
    behaviour: Option<Behaviour>,
    calls: u64,
    /// Calls since the behaviour that applies was last set; what failure plans count.
    plan_calls: u64,
}

/// What one call will do, decided under the lock.
struct Script {
    latency: Duration,
    failure: Option<Failure>,
    quota: Option<QuotaObservation>,
}

impl SimulatedProvider {
    /// A provider that answers every call at once, successfully, for any model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the latency of every key whose behaviour sets none.
    #[must_use]
    pub fn with_latency(self, latency: Duration) -> Self {
        self.lock().latency = latency;
        self
    }

    /// Sets the behaviour of keys that have none of their own.
    #[must_use]
    pub fn with_default_behaviour(self, behaviour: Behaviour) -> Self {
        self.set_default_behaviour(behaviour);
        self
    }

    /// Sets the behaviour of `key_id`.
    #[must_use]
    pub fn with_key_behaviour(self, key_id: &KeyId, behaviour: Behaviour) -> Self {
        self.set_behaviour(key_id, behaviour);
        self
    }

    /// Restricts [`Provider::default_models`] to `models` (the default is any model).
    /// Calls for other models are still answered: the router, not the provider,
    /// decides what to send here.
    #[must_use]
    pub fn with_models(mut self, models: Vec<ModelId>) -> Self {
        self.models = Some(models);
        self
    }

    /// Changes the behaviour of `key_id` at run time. Its failure plan starts counting
    /// from the next call; its call counter is kept.
    pub fn set_behaviour(&self, key_id: &KeyId, behaviour: Behaviour) {
        let mut state = self.lock();
        let entry = state.keys.entry(key_id.clone()).or_default();
        entry.behaviour = Some(behaviour);
        entry.plan_calls = 0;
    }

    /// Changes the behaviour of keys that have none of their own. Their failure plans
    /// start counting from their next call.
    pub fn set_default_behaviour(&self, behaviour: Behaviour) {
        let mut state = self.lock();
        state.default_behaviour = behaviour;
        for entry in state.keys.values_mut() {
            if entry.behaviour.is_none() {
                entry.plan_calls = 0;
            }
        }
    }

    /// Changes the latency of keys whose behaviour sets none.
    pub fn set_default_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Calls made with `key_id` so far, failed ones included.
    pub fn calls(&self, key_id: &KeyId) -> u64 {
        self.lock().keys.get(key_id).map_or(0, |entry| entry.calls)
    }

    /// Calls made with any key so far.
    pub fn total_calls(&self) -> u64 {
        self.lock().total_calls
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a
        // plain field store.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call with `key_id` and decides its fate.
    fn script(&self, key_id: &KeyId) -> Script {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.total_calls += 1;
        // Cloning a `KeyId` is a reference-count increment.
        let entry = state.keys.entry(key_id.clone()).or_default();
        entry.calls += 1;
        entry.plan_calls += 1;
        let behaviour = entry.behaviour.as_ref().unwrap_or(&state.default_behaviour);
        Script {
            latency: behaviour.latency.unwrap_or(state.latency),
            failure: behaviour
                .failure
                .and_then(|plan| plan.failure_for(entry.plan_calls)),
            quota: behaviour.report_quota,
        }
    }
}

#[async_trait]
impl Provider for SimulatedProvider {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn default_models(&self) -> ModelSet {
        match &self.models {
            Some(models) => ModelSet::Only(models.clone()),
            None => ModelSet::Any,
        }
    }

    async fn chat(&self, call: ProviderCall) -> Result<ChatResponse, ProviderError> {
        let quota = self.begin(&call.key_id).await?;
        Ok(reply(&call, quota))
    }

    async fn chat_stream(&self, call: ProviderCall) -> Result<StreamStart, ProviderError> {
        let quota = self.begin(&call.key_id).await?;
        let answer = reply(&call, quota);
        // One chunk per word, then a final chunk with the finish reason and usage, as
        // OpenAI sends with `stream_options.include_usage`.
        let mut chunks: VecDeque<Result<ChatChunk, ProviderError>> = answer
            .content
            .split_inclusive(' ')
            .map(|word| {
                Ok(ChatChunk {
                    text: word.to_owned(),
                    ..ChatChunk::default()
                })
            })
            .collect();
        chunks.push_back(Ok(ChatChunk {
            finish_reason: Some(answer.finish_reason),
            usage: answer.usage,
            ..ChatChunk::default()
        }));
        Ok(StreamStart {
            model: answer.model,
            quota,
            chunks: Box::pin(ReadyStream(chunks)),
        })
    }

    async fn embed(&self, call: EmbeddingCall) -> Result<EmbeddingResponse, ProviderError> {
        let quota = self.begin(&call.key_id).await?;
        let dimensions = call.dimensions.unwrap_or(EMBEDDING_DIMENSIONS).max(1) as usize;
        let vectors = call
            .input
            .iter()
            .map(|text| embedding(text, dimensions))
            .collect();
        let prompt_tokens = call.input.iter().map(|t| approx_tokens(t.len())).sum();
        Ok(EmbeddingResponse {
            vectors,
            model: call.model,
            usage: Some(TokenUsage {
                prompt_tokens,
                completion_tokens: 0,
                cached_tokens: 0,
            }),
            quota,
        })
    }
}

impl SimulatedProvider {
    /// Counts the call, waits its latency and applies its scripted failure.
    async fn begin(&self, key_id: &KeyId) -> Result<Option<QuotaObservation>, ProviderError> {
        let script = self.script(key_id);
        if let Some(Failure::Hang(duration)) = script.failure {
            tokio::time::sleep(duration).await;
        } else if !script.latency.is_zero() {
            // Zero latency must not touch the timer at all: see the module docs.
            tokio::time::sleep(script.latency).await;
        }
        match script.failure {
            Some(failure) => Err(ProviderError {
                quota: script.quota,
                ..failure.to_provider_error()
            }),
            None => Ok(script.quota),
        }
    }
}

/// Dimensions of simulated embeddings unless the request asks otherwise.
const EMBEDDING_DIMENSIONS: u32 = 8;

/// A deterministic unit vector derived from the text (FNV-1a seeded per dimension).
fn embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..dimensions)
        .map(|d| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ d as u64;
            for b in text.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            (h % 2_000) as f32 / 1_000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.into_iter().map(|x| x / norm).collect()
}

/// A stream whose items are all ready: the simulation has nothing to wait for.
struct ReadyStream(VecDeque<Result<ChatChunk, ProviderError>>);

impl Stream for ReadyStream {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.get_mut().0.pop_front())
    }
}

/// The deterministic successful answer to `call`.
fn reply(call: &ProviderCall, quota: Option<QuotaObservation>) -> ChatResponse {
    let request = &call.request;
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|message| message.role == Role::User)
        .map_or("", |message| message.content.as_str());
    let quoted: String = last_user.chars().take(QUOTED_CHARS).collect();
    let content = format!("Simulated reply from {} to: {quoted}", call.model);
    // Roughly four bytes per token, plus the per-message and per-reply overheads of
    // OpenAI's chat format.
    let prompt_tokens = request
        .messages
        .iter()
        .map(|message| approx_tokens(message.content.len()) + 4)
        .sum::<u64>()
        + 3;
    let natural_tokens = approx_tokens(content.len());
    let (completion_tokens, finish_reason) = match request.max_tokens.map(u64::from) {
        Some(max_tokens) if natural_tokens > max_tokens => (max_tokens, FinishReason::Length),
        _ => (natural_tokens, FinishReason::Stop),
    };
    ChatResponse {
        content,
        tool_calls: Vec::new(),
        model: call.model.clone(),
        usage: Some(TokenUsage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        }),
        finish_reason,
        quota,
    }
}

/// `ceil(bytes / 4)`.
fn approx_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX).div_ceil(4)
}
