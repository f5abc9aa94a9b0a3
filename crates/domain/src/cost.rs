//! Prices, token estimation before a call, cost after it, and their reconciliation.

use foldhash::HashMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ModelId, ProviderId};
use crate::money::Money;
use crate::request::{RequestIntent, TokenUsage};

/// Prices of one model, in dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// Uncached input tokens.
    pub input_per_mtok: f64,
    /// Output tokens.
    pub output_per_mtok: f64,
    /// Cached input tokens; defaults to the input price when the provider has no discount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// Completion tokens assumed when a request sets no `max_tokens`.
    #[serde(default = "default_max_output")]
    pub default_max_output: u32,
}

const fn default_max_output() -> u32 {
    1024
}

impl ModelPrice {
    /// A price with no cache discount and the default output allowance.
    pub const fn new(input_per_mtok: f64, output_per_mtok: f64) -> Self {
        Self {
            input_per_mtok,
            output_per_mtok,
            cached_input_per_mtok: None,
            default_max_output: default_max_output(),
        }
    }

    /// Sets the cached-input price.
    #[must_use]
    pub const fn with_cached(mut self, cached_input_per_mtok: f64) -> Self {
        self.cached_input_per_mtok = Some(cached_input_per_mtok);
        self
    }

    /// Whether every price is finite and non-negative.
    pub fn is_valid(&self) -> bool {
        [
            self.input_per_mtok,
            self.output_per_mtok,
            self.cached_input_per_mtok.unwrap_or(0.0),
        ]
        .iter()
        .all(|p| p.is_finite() && *p >= 0.0)
    }

    /// The cost of `usage` at these prices.
    pub fn cost(&self, usage: &TokenUsage) -> Money {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let uncached = usage.prompt_tokens - cached;
        let cached_price = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        per_mtok(uncached, self.input_per_mtok)
            + per_mtok(cached, cached_price)
            + per_mtok(usage.completion_tokens, self.output_per_mtok)
    }
}

fn per_mtok(tokens: u64, usd_per_mtok: f64) -> Money {
    let nanos_per_mtok = (usd_per_mtok * 1e9).round().max(0.0) as u128;
    let nanos = u128::from(tokens) * nanos_per_mtok / 1_000_000;
    Money::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Model prices, looked up by provider-specific entry first and model name second.
#[derive(Clone, Debug, Default)]
pub struct PriceCatalogue {
    by_model: HashMap<ModelId, ModelPrice>,
    by_provider_model: HashMap<(ProviderId, ModelId), ModelPrice>,
}

/// Built-in list prices, a data file kept in the repository with its date.
const BUILTIN_CSV: &str = include_str!("../data/prices.csv");

/// The date the built-in prices were taken (the `as_of:` line of the data file).
pub fn builtin_prices_as_of() -> &'static str {
    BUILTIN_CSV
        .lines()
        .find_map(|l| l.strip_prefix("# as_of:"))
        .map_or("unknown", str::trim)
}

/// Parses `model,input,output,cached_input,default_max_output` lines; `#` starts a
/// comment. Malformed lines are skipped (a unit test keeps the shipped file clean).
fn parse_prices(csv: &str) -> impl Iterator<Item = (&str, ModelPrice)> {
    csv.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let mut fields = line.split(',').map(str::trim);
            let model = fields.next()?;
            let mut number = || fields.next()?.parse::<f64>().ok();
            let (input, output, cached, max_output) = (number()?, number()?, number()?, number()?);
            let mut price = ModelPrice::new(input, output).with_cached(cached);
            price.default_max_output = max_output as u32;
            Some((model, price))
        })
}

impl PriceCatalogue {
    /// An empty catalogue.
    pub fn new() -> Self {
        Self::default()
    }

    /// The catalogue of list prices shipped with the code.
    pub fn builtin() -> Self {
        let mut catalogue = Self::new();
        for (model, price) in parse_prices(BUILTIN_CSV) {
            catalogue.set(ModelId::new(model), price);
        }
        catalogue
    }

    /// Sets the price of `model` for every provider without a specific entry.
    pub fn set(&mut self, model: ModelId, price: ModelPrice) {
        self.by_model.insert(model, price);
    }

    /// Sets the price of `model` when served by `provider` (e.g. a reseller's markup).
    pub fn set_for_provider(&mut self, provider: ProviderId, model: ModelId, price: ModelPrice) {
        self.by_provider_model.insert((provider, model), price);
    }

    /// The price of `model` on `provider`, if known.
    pub fn price(&self, provider: &ProviderId, model: &ModelId) -> Option<&ModelPrice> {
        if !self.by_provider_model.is_empty() {
            if let Some(p) = self
                .by_provider_model
                .get(&(provider.clone(), model.clone()))
            {
                return Some(p);
            }
        }
        self.by_model.get(model)
    }

    /// Every model with a generic price, sorted.
    pub fn models(&self) -> Vec<ModelId> {
        let mut models: Vec<ModelId> = self.by_model.keys().cloned().collect();
        models.sort();
        models
    }

    /// Estimates the cost of serving `estimate` with `model` on `provider`.
    pub fn estimate(
        &self,
        provider: &ProviderId,
        model: &ModelId,
        estimate: &TokenEstimate,
    ) -> CostEstimate {
        let price = self.price(provider, model);
        let completion_tokens = estimate
            .max_completion_tokens
            .or_else(|| price.map(|p| u64::from(p.default_max_output)))
            .unwrap_or(u64::from(default_max_output()));
        let usage = TokenUsage {
            prompt_tokens: estimate.prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        };
        CostEstimate {
            usage,
            cost: price.map(|p| p.cost(&usage)),
        }
    }
}

/// Tokens a request is expected to use, computed before the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEstimate {
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
    /// The request's completion limit, if it set one.
    pub max_completion_tokens: Option<u64>,
}

/// Tokens of framing the chat format adds per message and per reply.
const TOKENS_PER_MESSAGE: u64 = 4;
const TOKENS_PER_REPLY: u64 = 3;
/// A typical image's token cost (a 512x512 tile at high detail); providers differ.
const IMAGE_TOKENS: u64 = 255;

impl TokenEstimate {
    /// A fast estimate: about four characters per token (the usual ratio for English
    /// with BPE tokenizers) plus chat framing. Exact counts come back with the usage.
    pub fn of(intent: &RequestIntent) -> Self {
        let prompt_tokens = intent
            .messages
            .iter()
            .map(|m| {
                (m.text_len() as u64).div_ceil(4)
                    + TOKENS_PER_MESSAGE
                    + IMAGE_TOKENS * m.images.len() as u64
            })
            .sum::<u64>()
            + TOKENS_PER_REPLY;
        let tool_tokens: u64 = intent
            .tools
            .iter()
            .map(|t| {
                let chars = t.name.len()
                    + t.parameters.len()
                    + t.description.as_ref().map_or(0, String::len);
                (chars as u64).div_ceil(4)
            })
            .sum();
        Self {
            prompt_tokens: prompt_tokens + tool_tokens,
            max_completion_tokens: intent.max_tokens.map(u64::from),
        }
    }

    /// Estimate for embedding `input`: its tokens, no completion.
    pub fn of_texts(input: &[String]) -> Self {
        let prompt_tokens = input.iter().map(|t| (t.len() as u64).div_ceil(4)).sum();
        Self {
            prompt_tokens,
            max_completion_tokens: Some(0),
        }
    }
}

/// The expected cost of one request; `cost` is `None` when the model has no price.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostEstimate {
    /// Tokens assumed (completion at its upper bound).
    pub usage: TokenUsage,
    /// Cost at list price, or `None` when the catalogue has no price for the model.
    pub cost: Option<Money>,
}

/// Estimate versus actual for one request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reconciliation {
    /// What was reserved before the call.
    pub estimated: Money,
    /// What the call cost.
    pub actual: Money,
}

impl Reconciliation {
    /// Positive when the estimate was too high (money released back to the budget).
    pub fn released(&self) -> Money {
        self.estimated.saturating_sub(self.actual)
    }

    /// Positive when the call cost more than estimated.
    pub fn overrun(&self) -> Money {
        self.actual.saturating_sub(self.estimated)
    }

    /// `actual / estimated`, or `None` for a zero estimate.
    pub fn ratio(&self) -> Option<f64> {
        (self.estimated.as_nanos() > 0).then(|| self.actual.as_usd() / self.estimated.as_usd())
    }
}

/// Serve a cheaper model when a request is simple enough for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DowngradeRule {
    /// Model asked for.
    pub from: ModelId,
    /// Cheaper model to use instead.
    pub to: ModelId,
    /// Only prompts of at most this many estimated tokens are downgraded.
    pub max_prompt_tokens: u64,
    /// Only conversations of at most this many messages are downgraded.
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
}

const fn default_max_messages() -> usize {
    4
}

impl DowngradeRule {
    /// The model to use for `intent`, if this rule applies to it.
    pub fn apply(&self, intent: &RequestIntent, estimate: &TokenEstimate) -> Option<&ModelId> {
        (intent.model == self.from
            && estimate.prompt_tokens <= self.max_prompt_tokens
            && intent.messages.len() <= self.max_messages)
            .then_some(&self.to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Message;

    #[test]
    fn cost_uses_cached_discount_and_output_price() {
        let price = ModelPrice::new(2.50, 10.00).with_cached(1.25);
        let usage = TokenUsage {
            prompt_tokens: 1_000,
            completion_tokens: 500,
            cached_tokens: 400,
        };
        // 600 * 2.5e-6 + 400 * 1.25e-6 + 500 * 10e-6 = 0.0015 + 0.0005 + 0.005
        assert_eq!(price.cost(&usage), Money::from_usd(0.0070));
    }

    #[test]
    fn estimate_assumes_max_tokens_or_model_default() {
        let catalogue = PriceCatalogue::builtin();
        let intent = RequestIntent::new("gpt-4o", vec![Message::user("x".repeat(400))]);
        let est = TokenEstimate::of(&intent);
        assert_eq!(est.prompt_tokens, 100 + 4 + 3);
        let cost = catalogue.estimate(&ProviderId::new("openai"), &intent.model, &est);
        assert_eq!(cost.usage.completion_tokens, 1024);
        let with_limit = TokenEstimate {
            max_completion_tokens: Some(10),
            ..est
        };
        let cheaper = catalogue.estimate(&ProviderId::new("openai"), &intent.model, &with_limit);
        assert!(cheaper.cost < cost.cost);
    }

    #[test]
    fn shipped_price_file_parses_completely() {
        let data_lines = BUILTIN_CSV
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count();
        assert_eq!(
            parse_prices(BUILTIN_CSV).count(),
            data_lines,
            "a malformed line in data/prices.csv"
        );
        assert_eq!(builtin_prices_as_of(), "2026-11-01");
        let c = PriceCatalogue::builtin();
        let p = c
            .price(&ProviderId::new("openai"), &ModelId::new("gpt-4o-mini"))
            .unwrap();
        assert_eq!(
            (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok),
            (0.15, 0.60, Some(0.075))
        );
        assert!(
            c.price(&ProviderId::new("x"), &ModelId::new("o3-mini"))
                .unwrap()
                .default_max_output
                == 4096
        );
    }

    #[test]
    fn unknown_model_has_no_price_rather_than_zero() {
        let est = TokenEstimate {
            prompt_tokens: 10,
            max_completion_tokens: None,
        };
        let cost = PriceCatalogue::builtin().estimate(
            &ProviderId::new("openai"),
            &ModelId::new("no-such-model"),
            &est,
        );
        assert_eq!(cost.cost, None);
    }

    #[test]
    fn provider_specific_price_wins() {
        let mut c = PriceCatalogue::builtin();
        c.set_for_provider(
            ProviderId::new("azure"),
            ModelId::new("gpt-4o"),
            ModelPrice::new(5.0, 20.0),
        );
        let model = ModelId::new("gpt-4o");
        assert_eq!(
            c.price(&ProviderId::new("azure"), &model)
                .unwrap()
                .input_per_mtok,
            5.0
        );
        assert_eq!(
            c.price(&ProviderId::new("openai"), &model)
                .unwrap()
                .input_per_mtok,
            2.5
        );
    }

    #[test]
    fn downgrade_applies_only_to_short_prompts() {
        let rule = DowngradeRule {
            from: ModelId::new("gpt-4o"),
            to: ModelId::new("gpt-4o-mini"),
            max_prompt_tokens: 200,
            max_messages: 4,
        };
        let short = RequestIntent::new("gpt-4o", vec![Message::user("hi")]);
        let long = RequestIntent::new("gpt-4o", vec![Message::user("x".repeat(4_000))]);
        assert_eq!(
            rule.apply(&short, &TokenEstimate::of(&short)),
            Some(&ModelId::new("gpt-4o-mini"))
        );
        assert_eq!(rule.apply(&long, &TokenEstimate::of(&long)), None);
    }

    #[test]
    fn reconciliation_reports_release_and_overrun() {
        let r = Reconciliation {
            estimated: Money::from_usd(0.01),
            actual: Money::from_usd(0.004),
        };
        assert_eq!(r.released(), Money::from_usd(0.006));
        assert_eq!(r.overrun(), Money::ZERO);
        assert!((r.ratio().unwrap() - 0.4).abs() < 1e-9);
    }
}
