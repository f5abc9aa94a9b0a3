//! Prometheus metrics: requests, latency, tokens, cost, failovers, and key states by
//! provider (read from the router at scrape time). Labels are low-cardinality: the
//! endpoint, the status code, a stable error code, provider and model.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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

/// The labels of a chat request served.
const CHAT_SERVED: RequestLabels = RequestLabels {
    endpoint: "chat",
    status: 200,
    code: "ok",
};

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
    pub reservations_reclaimed: Gauge,
    pub reservations_reclaimed_usd: Gauge<f64, AtomicU64>,
    /// Handles into the families above, found once: a family look-up hashes its
    /// labels with SipHash under a lock, and a request would make six of them.
    chat_latency: Histogram,
    embeddings_latency: Histogram,
    /// The series of a chat request served: what nearly every answer counts.
    chat_served: Counter,
    by_model: RwLock<foldhash::HashMap<(ProviderId, ModelId), Arc<ModelCounters>>>,
    /// One scrape at a time rewrites the key-state gauges and renders: two at once
    /// would count a key twice (one clears, both add).
    scrape: Mutex<()>,
}

/// A provider and model's series in the token, cost and failover families.
#[derive(Debug)]
struct ModelCounters {
    prompt: Counter,
    completion: Counter,
    cost: Counter<f64, AtomicU64>,
    failovers: Counter,
}

/// The endpoints whose latency the handlers record.
#[derive(Clone, Copy, Debug)]
pub enum Timed {
    Chat,
    Embeddings,
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
        let reservations_reclaimed = Gauge::default();
        registry.register(
            "reservations_reclaimed",
            "Budget reservations given back because they were held longer than the lease (left by instances that stopped between reserve and settle)",
            reservations_reclaimed.clone(),
        );
        let reservations_reclaimed_usd = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "reservations_reclaimed_usd",
            "Money those reclaimed reservations held",
            reservations_reclaimed_usd.clone(),
        );
        let chat_latency = latency
            .get_or_create(&EndpointLabels { endpoint: "chat" })
            .clone();
        let embeddings_latency = latency
            .get_or_create(&EndpointLabels {
                endpoint: "embeddings",
            })
            .clone();
        let chat_served = requests.get_or_create(&CHAT_SERVED).clone();
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
            reservations_reclaimed,
            reservations_reclaimed_usd,
            chat_latency,
            embeddings_latency,
            chat_served,
            by_model: RwLock::default(),
            scrape: Mutex::default(),
        }
    }

    /// Counts an answer by endpoint, status and error code.
    pub fn count_answer(&self, labels: &RequestLabels) {
        if *labels == CHAT_SERVED {
            self.chat_served.inc();
        } else {
            self.requests.get_or_create(labels).inc();
        }
    }

    /// Records the time an endpoint took to answer.
    pub fn observe_latency(&self, endpoint: Timed, elapsed: std::time::Duration) {
        let histogram = match endpoint {
            Timed::Chat => &self.chat_latency,
            Timed::Embeddings => &self.embeddings_latency,
        };
        histogram.observe(elapsed.as_secs_f64());
    }

    /// The counters of a provider and model, created in their families on first use.
    fn model_counters(&self, provider: &ProviderId, model: &ModelId) -> Arc<ModelCounters> {
        let key = (provider.clone(), model.clone());
        if let Some(found) = self
            .by_model
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return found.clone();
        }
        let tokens = |kind| {
            self.tokens
                .get_or_create(&TokenLabels {
                    provider: IdLabel(provider.clone()),
                    model: IdLabel(model.clone()),
                    kind,
                })
                .clone()
        };
        let model_labels = ModelLabels {
            provider: IdLabel(provider.clone()),
            model: IdLabel(model.clone()),
        };
        let counters = Arc::new(ModelCounters {
            prompt: tokens("prompt"),
            completion: tokens("completion"),
            cost: self.cost.get_or_create(&model_labels).clone(),
            failovers: self.failovers.get_or_create(&model_labels).clone(),
        });
        self.by_model
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(counters)
            .clone()
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
        let counters = self.model_counters(provider, model);
        counters.prompt.inc_by(prompt);
        counters.completion.inc_by(completion);
        if let Some(usd) = cost_usd {
            counters.cost.inc_by(usd);
        }
        if attempts > 1 {
            counters.failovers.inc();
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

    /// Sets the reclaimed reservation gauges from the router's counters.
    pub fn set_reclaimed(&self, stats: apikeyrouter::domain::Reclaimed) {
        self.reservations_reclaimed
            .set(i64::try_from(stats.count).unwrap_or(i64::MAX));
        self.reservations_reclaimed_usd.set(stats.amount.as_usd());
    }

    /// The page, with the key-state gauges set to `key_states` (how many keys of each
    /// provider are in each state) when they could be read.
    pub fn scrape(&self, key_states: Option<foldhash::HashMap<KeyStateLabels, i64>>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counts) = key_states {
            self.keys.clear();
            for (labels, n) in counts {
                self.keys.get_or_create(&labels).set(n);
            }
        }
        self.render()
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
