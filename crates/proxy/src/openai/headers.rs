//! The routing headers of a routed response: which request, key and provider, and
//! what it cost (dollars as [`Money::usd_decimal`] writes them). One writer for chat,
//! streamed chat and embeddings.

use apikeyrouter::{KeyId, Money, ProviderId, RequestId};
use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`: the request's id, the client's own when it sent one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEY_ID: HeaderName = HeaderName::from_static("x-apikeyrouter-key-id");
const PROVIDER: HeaderName = HeaderName::from_static("x-apikeyrouter-provider");
const COST: HeaderName = HeaderName::from_static("x-apikeyrouter-cost-usd");
const ESTIMATED_COST: HeaderName = HeaderName::from_static("x-apikeyrouter-estimated-cost-usd");
const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-apikeyrouter-budget-remaining-usd");

/// What the routing headers say; taken from a response before its body consumes it.
#[derive(Debug)]
pub struct RoutingHeaders {
    request_id: RequestId,
    key_id: KeyId,
    provider: ProviderId,
    /// The actual cost (unknown until a stream ends).
    cost: Option<Money>,
    estimated_cost: Option<Money>,
    /// The lowest remaining amount of the budgets that applied.
    budget_remaining: Option<Money>,
}

impl RoutingHeaders {
    /// The headers of a request served by `key_id` at `provider`, amounts unknown.
    pub fn new(request_id: &RequestId, key_id: &KeyId, provider: &ProviderId) -> Self {
        Self {
            request_id: request_id.clone(),
            key_id: key_id.clone(),
            provider: provider.clone(),
            cost: None,
            estimated_cost: None,
            budget_remaining: None,
        }
    }

    /// With the actual and estimated cost and the lowest budget remainder.
    #[must_use]
    pub fn with_amounts(
        mut self,
        cost: Option<Money>,
        estimated_cost: Option<Money>,
        budget_remaining: Option<Money>,
    ) -> Self {
        self.cost = cost;
        self.estimated_cost = estimated_cost;
        self.budget_remaining = budget_remaining;
        self
    }

    /// Adds the headers to `headers`; an id that cannot be a header value is left out.
    pub fn write(&self, headers: &mut HeaderMap) {
        headers.reserve(6);
        let ids = [
            (REQUEST_ID, self.request_id.as_str()),
            (KEY_ID, self.key_id.as_str()),
            (PROVIDER, self.provider.as_str()),
        ];
        for (name, value) in ids {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        let amounts = [
            (COST, self.cost),
            (ESTIMATED_COST, self.estimated_cost),
            (BUDGET_REMAINING, self.budget_remaining),
        ];
        for (name, amount) in amounts {
            if let Some(value) = amount.and_then(|a| HeaderValue::try_from(a.usd_decimal()).ok()) {
                headers.insert(name, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_header_is_written_and_unknown_amounts_are_left_out() {
        let mut headers = HeaderMap::new();
        RoutingHeaders::new(
            &RequestId::new("req-1"),
            &KeyId::new("key_1"),
            &ProviderId::new("openai"),
        )
        .with_amounts(
            Some(Money::from_nanos(2_000)),
            None,
            Some(Money::from_nanos(5_000_000_000)),
        )
        .write(&mut headers);
        assert_eq!(headers["x-request-id"], "req-1");
        assert_eq!(headers["x-apikeyrouter-key-id"], "key_1");
        assert_eq!(headers["x-apikeyrouter-provider"], "openai");
        assert_eq!(headers["x-apikeyrouter-cost-usd"], "0.000002000");
        assert_eq!(
            headers["x-apikeyrouter-budget-remaining-usd"],
            "5.000000000"
        );
        assert!(!headers.contains_key("x-apikeyrouter-estimated-cost-usd"));
    }
}
