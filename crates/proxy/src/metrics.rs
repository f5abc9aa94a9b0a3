//! Prometheus metrics: requests, latency, tokens, cost, failovers, and key states by
//! provider (read from the router at scrape time). Labels are low-cardinality: the
//! endpoint, the status code, a stable error code, provider and model.

use std::sync::atomic::AtomicU64;

use apikeyrouter::{ModelId, ProviderId};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub status: u16,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

/// A label value kept as the router's id: building the labels of a request is then an
/// `Arc` clone, not a `String` copy.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct IdLabel<T>(pub T);

impl<T: AsRef<str>> EncodeLabelValue for IdLabel<T> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.0.as_ref())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub provider: IdLabel<ProviderId>,
    pub model: IdLabel<ModelId>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: IdLabel<ProviderId>,
    pub model: IdLabel<ModelId>,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyStateLabels {
    pub provider: IdLabel<ProviderId>,
    pub state: &'static str,
}

/// Labels of the audit delivery gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub state: &'static str,
}

/// The proxy's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabels, Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<ModelLabels, Counter<f64, AtomicU64>>,
    pub failovers: Family<ModelLabels, Counter>,
    pub keys: Family<KeyStateLabels, Gauge>,
    pub audit: Family<AuditLabels, Gauge>,
    pub store_degraded: Gauge,
    pub store_local_fallbacks: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("apikeyrouter");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ])
        });
        let tokens = Family::<TokenLabels, Counter>::default();
        let cost = Family::<ModelLabels, Counter<f64, AtomicU64>>::default();
        let failovers = Family::<ModelLabels, Counter>::default();
        let keys = Family::<KeyStateLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests answered, by endpoint, status and error code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer (to first byte for streams)",
            latency.clone(),
        );
        registry.register(
            "tokens",
            "Tokens used, by provider, model and kind",
            tokens.clone(),
        );
        registry.register(
            "cost_usd",
            "Money spent, by provider and model",
            cost.clone(),
        );
        registry.register(
            "failovers",
            "Requests served after at least one failed attempt",
            failovers.clone(),
        );
        registry.register("keys", "Keys by provider and state", keys.clone());
        let audit = Family::<AuditLabels, Gauge>::default();
        registry.register(
            "audit_records",
            "Audit records by delivery state: pending, delivered, dropped (queue full), rejected, retries",
            audit.clone(),
        );
        let store_degraded = Gauge::default();
        registry.register(
            "store_degraded",
            "1 while the shared state store is unreachable and requests run on local limits (fail-open)",
            store_degraded.clone(),
        );
        let store_local_fallbacks = Gauge::default();
        registry.register(
            "store_local_fallbacks",
            "Store operations served on local limits because the shared store was unreachable",
            store_local_fallbacks.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            tokens,
            cost,
            failovers,
            keys,
            audit,
            store_degraded,
            store_local_fallbacks,
        }
    }

    /// Counts a served request's usage.
    pub fn record_usage(
        &self,
        provider: &ProviderId,
        model: &ModelId,
        prompt: u64,
        completion: u64,
        cost_usd: Option<f64>,
        attempts: usize,
    ) {
        let labels = |kind| TokenLabels {
            provider: IdLabel(provider.clone()),
            model: IdLabel(model.clone()),
            kind,
        };
        self.tokens.get_or_create(&labels("prompt")).inc_by(prompt);
        self.tokens
            .get_or_create(&labels("completion"))
            .inc_by(completion);
        let model_labels = ModelLabels {
            provider: IdLabel(provider.clone()),
            model: IdLabel(model.clone()),
        };
        if let Some(usd) = cost_usd {
            self.cost.get_or_create(&model_labels).inc_by(usd);
        }
        if attempts > 1 {
            self.failovers.get_or_create(&model_labels).inc();
        }
    }

    /// Sets the audit delivery gauges from the router's counters.
    pub fn set_audit(&self, stats: apikeyrouter::DeliveryStats) {
        let values = [
            ("pending", stats.pending),
            ("delivered", stats.delivered),
            ("dropped", stats.dropped),
            ("rejected", stats.rejected),
            ("retries", stats.retries),
        ];
        for (state, value) in values {
            self.audit
                .get_or_create(&AuditLabels { state })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// Sets the store health gauges.
    pub fn set_store_health(&self, health: apikeyrouter::StoreHealth) {
        self.store_degraded.set(i64::from(health.degraded));
        self.store_local_fallbacks
            .set(i64::try_from(health.local_fallbacks).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
