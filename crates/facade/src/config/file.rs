//! The shape of the configuration file, as written.

use std::fmt;
use std::time::Duration;

use apikeyrouter_adapters_stores::StoreConfig;
use apikeyrouter_domain::cost::DowngradeRule;
use apikeyrouter_domain::{
    Budget, BudgetPeriod, BudgetScope, Enforcement, KeyId, KeyMetadata, ProviderId, TenantId,
    Timestamp,
};
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address the proxy listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin API access.
    #[serde(default)]
    pub admin: AdminConfig,
    /// State store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Routing behaviour.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Providers.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// Fallback chains.
    #[serde(default)]
    pub fallbacks: Vec<FallbackConfig>,
    /// Keys.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Budgets.
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    /// Client credentials of the proxy.
    #[serde(default)]
    pub virtual_keys: Vec<VirtualKeyConfig>,
    /// Price overrides.
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
    /// Cheaper models for simple requests.
    #[serde(default)]
    pub downgrades: Vec<DowngradeRule>,
    /// Where audit records go.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Request limits of the proxy.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How the proxy spreads its work over threads.
    #[serde(default)]
    pub server: ServerConfig,
}

pub(crate) fn default_listen() -> String {
    "127.0.0.1:8000".to_owned()
}

/// `[admin]`
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Environment variable holding the admin bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The token itself (discouraged: prefer `token_env`).
    #[serde(default)]
    pub token: Option<String>,
}

/// `[routing]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// `cost`, `reliability`, `fairness`, `latency`, or weights like `cost=0.7,reliability=0.3`.
    #[serde(default = "default_objective")]
    pub objective: String,
    /// Most provider calls per request.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Most time per request, in milliseconds.
    #[serde(default = "default_total_deadline_ms")]
    pub total_deadline_ms: u64,
    /// Most time per provider call, in milliseconds.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// How long a budget reservation may be held, in milliseconds, before it is
    /// taken for one left by a stopped instance and given back; at least
    /// `total_deadline_ms`, and longer than the longest stream. Default: an hour, or
    /// `total_deadline_ms` if that is longer.
    #[serde(default)]
    pub reservation_lease_ms: Option<u64>,
}

fn default_objective() -> String {
    "fairness".to_owned()
}
const fn default_max_attempts() -> u32 {
    3
}
const fn default_total_deadline_ms() -> u64 {
    120_000
}
const fn default_attempt_timeout_ms() -> u64 {
    60_000
}
/// The reservation lease when the file sets none (raised to the deadline if shorter).
pub const DEFAULT_RESERVATION_LEASE_MS: u64 = 3_600_000;

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            objective: default_objective(),
            max_attempts: default_max_attempts(),
            total_deadline_ms: default_total_deadline_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            reservation_lease_ms: None,
        }
    }
}

/// The adapter behind a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// OpenAI.
    Openai,
    /// Anthropic.
    Anthropic,
    /// Google Gemini.
    Gemini,
    /// Any OpenAI-compatible API (Azure OpenAI with `api_version`, Groq, Mistral, vLLM, Ollama).
    OpenaiCompatible,
    /// A deterministic simulation, for demos and tests.
    Simulated,
}

impl ProviderKind {
    /// The name used in the file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::OpenaiCompatible => "openai-compatible",
            Self::Simulated => "simulated",
        }
    }
}

/// `[[providers]]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Identifier keys refer to.
    pub id: String,
    /// Adapter.
    pub kind: ProviderKind,
    /// API base URL; each kind has a default except `openai-compatible`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Models it serves; default: the adapter's (its price-catalogue models).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Azure OpenAI: the `api-version` (turns on Azure's URL and header shape).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Connect timeout in milliseconds.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Time to the first response byte in milliseconds.
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    /// Simulated providers: latency per call in milliseconds.
    #[serde(default)]
    pub latency_ms: Option<u64>,
}

/// `[[fallbacks]]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// When no key can serve this model...
    pub model: String,
    /// ...try these, in order.
    pub to: Vec<String>,
}

/// `[[keys]]`
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Stable id; default `<provider>-<n>` (n counts that provider's keys from 1).
    #[serde(default)]
    pub id: Option<String>,
    /// Provider id.
    pub provider: String,
    /// Environment variable holding the key.
    #[serde(default)]
    pub material_env: Option<String>,
    /// The key itself (discouraged: prefer `material_env`).
    #[serde(default)]
    pub material: Option<String>,
    /// Tenant, tier, limits, models, tags.
    #[serde(default)]
    pub metadata: KeyMetadata,
}

/// `[[budgets]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Identifier; default derived from scope and period.
    #[serde(default)]
    pub id: Option<String>,
    /// `global`, `provider`, `key`, `tenant` or `tag`.
    pub scope: String,
    /// For `scope = "provider"`.
    #[serde(default)]
    pub provider: Option<String>,
    /// For `scope = "key"`.
    #[serde(default)]
    pub key: Option<String>,
    /// For `scope = "tenant"`.
    #[serde(default)]
    pub tenant: Option<String>,
    /// For `scope = "tag"`: `name=value`, e.g. `feature=chatbot`.
    #[serde(default)]
    pub tag: Option<String>,
    /// Limit per period in dollars.
    pub limit_usd: f64,
    /// `daily`, `weekly`, `monthly` or `custom`.
    #[serde(default = "default_period")]
    pub period: String,
    /// For `period = "custom"`: period length in seconds (periods start at the epoch).
    #[serde(default)]
    pub period_seconds: Option<u64>,
    /// `hard` (reject) or `soft` (warn).
    #[serde(default = "default_enforcement")]
    pub enforcement: String,
}

impl BudgetConfig {
    /// The budget this entry declares.
    ///
    /// # Errors
    /// The offending field (empty for the entry as a whole) and what is wrong with it.
    pub fn to_budget(&self) -> Result<Budget, (&'static str, String)> {
        let need = |field: &Option<String>, name: &'static str| {
            field
                .clone()
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| (name, format!("required for scope {:?}", self.scope)))
        };
        let (scope, target) = match self.scope.as_str() {
            "global" => (BudgetScope::Global, String::new()),
            "provider" => {
                let p = need(&self.provider, "provider")?;
                (
                    BudgetScope::Provider {
                        provider: ProviderId::new(p.as_str()),
                    },
                    format!("-{p}"),
                )
            }
            "key" => {
                let k = need(&self.key, "key")?;
                (
                    BudgetScope::Key {
                        key: KeyId::new(k.as_str()),
                    },
                    format!("-{k}"),
                )
            }
            "tenant" => {
                let t = need(&self.tenant, "tenant")?;
                (
                    BudgetScope::Tenant {
                        tenant: TenantId::new(t.as_str()),
                    },
                    format!("-{t}"),
                )
            }
            "tag" => {
                let t = need(&self.tag, "tag")?;
                let (name, value) = t
                    .split_once('=')
                    .filter(|(n, v)| !n.is_empty() && !v.is_empty())
                    .ok_or_else(|| {
                        (
                            "tag",
                            format!("{t:?} is not name=value, e.g. feature=chatbot"),
                        )
                    })?;
                (
                    BudgetScope::Tag {
                        key: name.to_owned(),
                        value: value.to_owned(),
                    },
                    format!("-{name}-{value}"),
                )
            }
            other => {
                return Err((
                    "scope",
                    format!(
                        "unknown scope {other:?}; expected global, provider, key, tenant or tag"
                    ),
                ));
            }
        };
        let period = match (self.period.as_str(), self.period_seconds) {
            ("daily", _) => BudgetPeriod::Daily,
            ("weekly", _) => BudgetPeriod::Weekly,
            ("monthly", _) => BudgetPeriod::Monthly,
            ("custom", Some(secs)) if secs > 0 => BudgetPeriod::Custom {
                anchor: Timestamp::EPOCH,
                length_secs: secs,
            },
            ("custom", _) => {
                return Err((
                    "period_seconds",
                    "a custom period needs period_seconds greater than zero".to_owned(),
                ));
            }
            (other, _) => {
                return Err((
                    "period",
                    format!("unknown period {other:?}; expected daily, weekly, monthly or custom"),
                ));
            }
        };
        let enforcement = match self.enforcement.as_str() {
            "hard" => Enforcement::Hard,
            "soft" => Enforcement::Soft,
            other => {
                return Err((
                    "enforcement",
                    format!("unknown enforcement {other:?}; expected hard or soft"),
                ));
            }
        };
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{}{target}-{}", self.scope, self.period));
        Budget::new(id, scope, self.limit_usd, period, enforcement)
            .map_err(|e| ("limit_usd", e.to_string()))
    }
}

fn default_period() -> String {
    "monthly".to_owned()
}
fn default_enforcement() -> String {
    "hard".to_owned()
}

/// `[[virtual_keys]]`
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualKeyConfig {
    /// Name for logs, metrics and budgets; default `vk-<n>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Environment variable holding the client token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The token itself (discouraged).
    #[serde(default)]
    pub token: Option<String>,
    /// Tenant whose keys serve this client.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Models this client may use; default any.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Monthly spending limit of this client in dollars (hard).
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// Requests per minute this client may send.
    #[serde(default)]
    pub rpm: Option<u32>,
}

/// `[[prices]]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Model.
    pub model: String,
    /// Only for this provider; default every provider.
    #[serde(default)]
    pub provider: Option<String>,
    /// Input, per million tokens.
    pub input_per_mtok: f64,
    /// Output, per million tokens.
    pub output_per_mtok: f64,
    /// Cached input, per million tokens.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
    /// Completion tokens assumed when a request sets no limit.
    #[serde(default)]
    pub default_max_output: Option<u32>,
}

/// `[audit]`
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `none` (records only kept for look-up), `stdout`, `file` or `mongodb`.
    #[serde(default)]
    pub kind: Option<String>,
    /// For `kind = "file"`.
    #[serde(default)]
    pub path: Option<String>,
    /// For `kind = "mongodb"`: the connection string; the store's MongoDB when absent.
    #[serde(default)]
    pub url: Option<String>,
    /// For `kind = "mongodb"`: the database; the store's (or the URL's) when absent.
    #[serde(default)]
    pub database: Option<String>,
}

impl AuditConfig {
    /// For `kind = "mongodb"`: the MongoDB to write to, from `url` or else from the
    /// store (a MongoDB store, or the records half of a split store).
    pub fn mongodb(&self, store: &StoreConfig) -> Option<StoreConfig> {
        if let Some(url) = &self.url {
            return Some(StoreConfig::Mongodb {
                url: url.clone(),
                database: self.database.clone(),
                decisions_retention_days: None,
                audit_retention_days: None,
                on_unavailable: None,
            });
        }
        let store = match store {
            StoreConfig::Split { records, .. } => records.as_ref(),
            other => other,
        };
        match store {
            StoreConfig::Mongodb {
                url,
                database,
                decisions_retention_days,
                audit_retention_days,
                ..
            } => Some(StoreConfig::Mongodb {
                url: url.clone(),
                database: self.database.clone().or_else(|| database.clone()),
                decisions_retention_days: *decisions_retention_days,
                audit_retention_days: *audit_retention_days,
                on_unavailable: None,
            }),
            _ => None,
        }
    }
}

/// `[server]`: how the proxy spreads request handling over threads. Read at start; a
/// reload does not change it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The runtime arrangement.
    #[serde(default)]
    pub runtime: ServerRuntime,
    /// Threads serving requests; default one per core.
    #[serde(default)]
    pub threads: Option<usize>,
}

impl ServerConfig {
    /// Threads serving requests: as configured, else one per core.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// How request handling is spread over the serving threads. Per core on Linux, where
/// it served 1.8 times the requests per second of the shared runtime at lower
/// latency (docs/benchmarks.md); shared elsewhere, where it is the only one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerRuntime {
    /// One work-stealing runtime over all threads: it evens out load that arrives
    /// over a few busy connections.
    #[cfg_attr(not(target_os = "linux"), default)]
    Shared,
    /// A single-threaded runtime per thread, each accepting on its own listener
    /// (`SO_REUSEPORT`, Linux only): a connection's requests stay on one core, with
    /// no task or cache line moving between cores.
    #[cfg_attr(target_os = "linux", default)]
    PerCore,
}

impl ServerRuntime {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::PerCore => "per-core",
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a client has to send a request head (from connecting, or from the end
    /// of its previous request on a kept-alive connection), in milliseconds.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long shutdown waits for requests in flight (streams included) before it
    /// closes their connections, in milliseconds.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

const fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}

/// Above the 60-second idle timeout of common load balancers (nginx, AWS ALB): the
/// timeout also closes idle kept-alive connections, and the side in front must close
/// an idle connection first, or it may send a request down one the proxy is closing.
const fn default_header_read_timeout_ms() -> u64 {
    75_000
}

const fn default_drain_timeout_ms() -> u64 {
    30_000
}

impl LimitsConfig {
    /// [`Self::header_read_timeout_ms`] as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// [`Self::drain_timeout_ms`] as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

/// Shown in place of a secret in `Debug` output.
fn secret_shown(secret: Option<&String>) -> Option<&'static str> {
    secret.map(|_| "[redacted]")
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token_env", &self.token_env)
            .field("token", &secret_shown(self.token.as_ref()))
            .finish()
    }
}

impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("material_env", &self.material_env)
            .field("material", &secret_shown(self.material.as_ref()))
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl fmt::Debug for VirtualKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualKeyConfig")
            .field("name", &self.name)
            .field("token_env", &self.token_env)
            .field("token", &secret_shown(self.token.as_ref()))
            .field("tenant", &self.tenant)
            .field("models", &self.models)
            .field("budget_usd", &self.budget_usd)
            .field("rpm", &self.rpm)
            .finish()
    }
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field(
                "url",
                &self
                    .url
                    .as_deref()
                    .map(apikeyrouter_adapters_stores::redact_url),
            )
            .field("database", &self.database)
            .finish()
    }
}
