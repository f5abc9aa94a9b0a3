//! From the file as written to validated values, with precise errors.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use apikeyrouter_adapters_stores::StoreConfig;
use apikeyrouter_application::RouterSettings;
use apikeyrouter_domain::{
    Budget, BudgetPeriod, BudgetScope, Enforcement, KeyId, KeyMaterial, KeyMetadata, ModelId,
    ModelPrice, Objective, PriceCatalogue, ProviderId, TenantId,
};
use thiserror::Error;

use super::file::{
    AuditConfig, DEFAULT_RESERVATION_LEASE_MS, FileConfig, LimitsConfig, ProviderKind,
    ServerConfig, ServerRuntime,
};

/// What is wrong with a configuration, and where.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{source_name}: {}{message}", if key.is_empty() { String::new() } else { format!("{key}: ") })]
pub struct ConfigError {
    /// The file (or `environment`).
    pub source_name: String,
    /// The key path, e.g. `keys[1].material_env`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// A provider as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedProvider {
    /// Id.
    pub id: ProviderId,
    /// Adapter.
    pub kind: ProviderKind,
    /// Base URL (kind default when absent).
    pub base_url: Option<String>,
    /// Models served, if listed.
    pub models: Option<Vec<ModelId>>,
    /// Azure OpenAI api-version.
    pub api_version: Option<String>,
    /// Connect timeout.
    pub connect_timeout: Option<Duration>,
    /// First-byte timeout.
    pub first_byte_timeout: Option<Duration>,
    /// Simulated latency.
    pub latency: Option<Duration>,
}

/// A key with its secret resolved.
#[derive(Clone, Debug)]
pub struct ResolvedKey {
    /// Stable id.
    pub id: KeyId,
    /// Provider.
    pub provider: ProviderId,
    /// The secret.
    pub material: KeyMaterial,
    /// Metadata.
    pub metadata: KeyMetadata,
}

/// The tag every request made with a virtual key carries (`virtual_key=<name>`): the
/// key's budget is a tag budget on it, and cost reports group by it.
pub const VIRTUAL_KEY_TAG: &str = "virtual_key";

/// A client credential with its token resolved.
#[derive(Clone)]
pub struct ResolvedVirtualKey {
    /// Name.
    pub name: String,
    /// The token clients present (never printed).
    pub token: String,
    /// Tenant whose keys serve it.
    pub tenant: Option<TenantId>,
    /// Models it may use.
    pub models: Option<Vec<ModelId>>,
    /// Its monthly budget.
    pub budget_usd: Option<f64>,
    /// Its requests per minute.
    pub rpm: Option<u32>,
}

impl fmt::Debug for ResolvedVirtualKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedVirtualKey")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("models", &self.models)
            .field("rpm", &self.rpm)
            .finish_non_exhaustive()
    }
}

/// A validated configuration: everything parsed, every secret resolved.
#[derive(Clone)]
pub struct Config {
    /// Where it came from.
    pub source_name: String,
    /// Listen address.
    pub listen: SocketAddr,
    /// Admin bearer token, if any (never printed).
    pub admin_token: Option<String>,
    /// Store.
    pub store: StoreConfig,
    /// Router settings (objective, attempts, deadlines, fallbacks, downgrades).
    pub settings: RouterSettings,
    /// Prices: built-in plus overrides.
    pub catalogue: PriceCatalogue,
    /// Providers in file order.
    pub providers: Vec<ResolvedProvider>,
    /// Keys in file order.
    pub keys: Vec<ResolvedKey>,
    /// Budgets.
    pub budgets: Vec<Budget>,
    /// Client credentials.
    pub virtual_keys: Vec<ResolvedVirtualKey>,
    /// Audit output.
    pub audit: AuditConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Serving threads.
    pub server: ServerConfig,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("source_name", &self.source_name)
            .field("listen", &self.listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("store", &self.store.kind_name())
            .field("providers", &self.providers)
            .field("keys", &self.keys)
            .field("budgets", &self.budgets)
            .field("virtual_keys", &self.virtual_keys)
            .finish_non_exhaustive()
    }
}

/// Top-level keys the environment may override (arrays of tables cannot be).
const ENV_PREFIX: &str = "APIKEYROUTER_";
const ENV_SECTIONS: [&str; 7] = [
    "listen", "admin", "store", "routing", "audit", "limits", "server",
];
/// More serving threads than this is a typo, not a machine.
const MAX_SERVER_THREADS: usize = 1024;
const DEFAULT_ADMIN_TOKEN_ENV: &str = "APIKEYROUTER_ADMIN_TOKEN";

/// The providers of a configuration without a file: `openai`, `anthropic` and
/// `gemini`, each of its kind at the kind's default URL, serving its price catalogue's
/// models.
const BUILT_IN_PROVIDERS: &str = r#"
[[providers]]
id = "openai"
kind = "openai"

[[providers]]
id = "anthropic"
kind = "anthropic"

[[providers]]
id = "gemini"
kind = "gemini"
"#;

impl Config {
    /// Reads and validates a file, with overrides from the process environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and what is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&source_name, "", format!("cannot read the file: {e}")))?;
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::parse(&text, &source_name, &vars)
    }

    /// The configuration of `apikeyrouter serve` without a file: defaults plus the
    /// environment, no keys, and the built-in providers at their public addresses
    /// (`openai`, `anthropic`, `gemini`), so that keys added through the management API have a
    /// provider to belong to.
    ///
    /// # Errors
    /// [`ConfigError`] for a bad environment override.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::parse(BUILT_IN_PROVIDERS, "environment", &vars)
    }

    /// Parses and validates `text` with environment `vars`.
    ///
    /// # Errors
    /// [`ConfigError`] naming `source_name`, the key and what is wrong.
    pub fn parse(
        text: &str,
        source_name: &str,
        vars: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| err(source_name, "", toml_message(&e, text)))?;
        apply_env(&mut value, vars);
        let file: FileConfig = toml::Table::try_into(value)
            .map_err(|e: toml::de::Error| err(source_name, "", toml_message(&e, "")))?;
        let env: HashMap<&str, &str> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Validator {
            source: source_name,
            env: &env,
        }
        .validate(file)
    }

    /// The sections of `newer` that differ from this configuration's and that a
    /// running proxy reads only at start (`[store]`, `[audit]`, `[limits]`,
    /// `[server]`), by name: a reload applies the rest and reports these as needing a
    /// restart.
    pub fn start_only_changes(&self, newer: &Self) -> Vec<&'static str> {
        [
            ("store", self.store != newer.store),
            ("audit", self.audit != newer.audit),
            ("limits", self.limits != newer.limits),
            ("server", self.server != newer.server),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// A human-readable summary of what would load (no secrets).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("config {} is valid", self.source_name));
        line(format!("listen: {}", self.listen));
        match self.store.requests_kept() {
            Some(kept) => line(format!(
                "store: memory, the newest {kept} request records kept for look-ups"
            )),
            None => line(format!("store: {}", self.store.kind_name())),
        }
        line(format!(
            "server: {} runtime, {} threads",
            self.server.runtime.as_str(),
            self.server.threads()
        ));
        line(format!(
            "admin API: {}",
            if self.admin_token.is_some() {
                "token required"
            } else {
                "no token (loopback only)"
            }
        ));
        line(format!(
            "routing: objective {}, max {} attempts, deadline {} ms, reservation lease {} ms",
            self.settings.objective.label(),
            self.settings.max_attempts,
            self.settings.total_deadline.as_millis(),
            self.settings.reservation_lease.as_millis()
        ));
        line(format!("providers ({}):", self.providers.len()));
        for p in &self.providers {
            let models = p.models.as_ref().map_or("adapter default".to_owned(), |m| {
                m.iter().map(ModelId::as_str).collect::<Vec<_>>().join(", ")
            });
            line(format!(
                "  {} ({}) {} models: {models}",
                p.id,
                p.kind.as_str(),
                p.base_url.as_deref().unwrap_or("default URL")
            ));
        }
        line(format!("keys ({}):", self.keys.len()));
        for k in &self.keys {
            let tenant = k
                .metadata
                .tenant
                .as_ref()
                .map_or(String::new(), |t| format!(" tenant {t}"));
            line(format!(
                "  {} on {} {}{tenant}",
                k.id,
                k.provider,
                k.material.masked()
            ));
        }
        let mut fallbacks: Vec<_> = self.settings.fallbacks.iter().collect();
        fallbacks.sort_by(|a, b| a.0.cmp(b.0));
        for (from, to) in fallbacks {
            line(format!(
                "fallback: {from} -> {}",
                to.iter()
                    .map(ModelId::as_str)
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ));
        }
        for b in &self.budgets {
            line(format!(
                "budget {}: {} per {:?}, {:?}",
                b.id, b.limit, b.period, b.enforcement
            ));
        }
        line(format!("virtual keys ({}):", self.virtual_keys.len()));
        for v in &self.virtual_keys {
            let tenant = v
                .tenant
                .as_ref()
                .map_or("any tenant".to_owned(), |t| format!("tenant {t}"));
            line(format!("  {} -> {tenant}", v.name));
        }
        out
    }
}

fn err(source: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        source_name: source.to_owned(),
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The parser's complaint with its line and column, on one line. Not the crate's
/// `Display`, which quotes the offending source line: that line may hold a secret
/// (`material = "sk-...` with its closing quote missing) and the message reaches
/// stderr and the logs.
fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let mut bare = e.clone();
    bare.set_input(None);
    let message = bare
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    let message = without_quoted_strings(&message);
    let Some(at) = e.span().map(|span| span.start.min(text.len())) else {
        return message;
    };
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

/// `message` with serde's quotations of string values (`invalid type: string "..."`)
/// cut to `string`: a secret written where another type belongs must not be echoed.
fn without_quoted_strings(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at + "string".len()]);
        let quoted = &rest[at + QUOTED.len()..];
        let mut escaped = false;
        let end = quoted.char_indices().find_map(|(i, c)| match c {
            _ if escaped => {
                escaped = false;
                None
            }
            '\\' => {
                escaped = true;
                None
            }
            '"' => Some(i + 1),
            _ => None,
        });
        rest = &quoted[end.unwrap_or(quoted.len())..];
    }
    out.push_str(rest);
    out
}

/// Applies `APIKEYROUTER_SECTION__KEY=value` overrides to the known sections.
fn apply_env(table: &mut toml::Table, vars: &[(String, String)]) {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) || !ENV_SECTIONS.contains(&segments[0].as_str()) {
            continue;
        }
        // A value that parses as TOML (number, bool, quoted string) keeps its type.
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if let Some(at) = table_at(table, &segments[..segments.len() - 1]) {
            if let Some(last) = segments.last() {
                at.insert(last.clone(), value);
            }
        }
    }
}

/// The table at `path`, created as needed; `None` when a non-table value is in the way.
fn table_at<'t>(table: &'t mut toml::Table, path: &[String]) -> Option<&'t mut toml::Table> {
    let Some((first, rest)) = path.split_first() else {
        return Some(table);
    };
    match table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(inner) => table_at(inner, rest),
        _ => None,
    }
}

struct Validator<'a> {
    source: &'a str,
    env: &'a HashMap<&'a str, &'a str>,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        err(self.source, &key.into(), message)
    }

    /// A secret given directly or through an environment variable, exactly one way.
    fn secret(
        &self,
        key: &str,
        direct: Option<&String>,
        env_name: Option<&String>,
        what: &str,
    ) -> Result<String, ConfigError> {
        match (direct, env_name) {
            (Some(_), Some(_)) => Err(self.err(
                key,
                format!(
                    "give the {what} either directly or through an environment variable, not both"
                ),
            )),
            (None, None) => Err(self.err(
                key,
                format!(
                    "missing {what}: set `{}_env` to the environment variable holding it",
                    what.split(' ').next().unwrap_or(what)
                ),
            )),
            (Some(v), None) => Ok(v.clone()),
            (None, Some(name)) => match self.env.get(name.as_str()) {
                Some(v) if !v.trim().is_empty() => Ok((*v).to_owned()),
                Some(_) => Err(self.err(key, format!("environment variable {name} is empty"))),
                None => Err(self.err(key, format!("environment variable {name} is not set"))),
            },
        }
    }

    fn validate(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let listen: SocketAddr = file.listen.parse().map_err(|e| {
            self.err(
                "listen",
                format!(
                    "{:?} is not a socket address (e.g. 127.0.0.1:8000): {e}",
                    file.listen
                ),
            )
        })?;

        let admin_token = match (&file.admin.token, &file.admin.token_env) {
            (None, None) => self
                .env
                .get(DEFAULT_ADMIN_TOKEN_ENV)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (*v).to_owned()),
            (direct, env_name) => {
                Some(self.secret("admin", direct.as_ref(), env_name.as_ref(), "token")?)
            }
        };
        if let Some(t) = &admin_token {
            if t.len() < 8 {
                return Err(self.err("admin", "the admin token must be at least 8 characters"));
            }
        }

        let mut settings = RouterSettings {
            objective: Objective::parse(&file.routing.objective)
                .map_err(|e| self.err("routing.objective", e.to_string()))?,
            max_attempts: file.routing.max_attempts,
            total_deadline: Duration::from_millis(file.routing.total_deadline_ms),
            attempt_timeout: Duration::from_millis(file.routing.attempt_timeout_ms),
            reservation_lease: Duration::from_millis(
                file.routing
                    .reservation_lease_ms
                    .unwrap_or(DEFAULT_RESERVATION_LEASE_MS.max(file.routing.total_deadline_ms)),
            ),
            ..RouterSettings::default()
        };
        if settings.max_attempts == 0 {
            return Err(self.err("routing.max_attempts", "must be at least 1"));
        }
        if file.routing.total_deadline_ms == 0 || file.routing.attempt_timeout_ms == 0 {
            return Err(self.err(
                "routing",
                "total_deadline_ms and attempt_timeout_ms must be greater than zero",
            ));
        }
        if settings.reservation_lease < settings.total_deadline {
            return Err(self.err(
                "routing.reservation_lease_ms",
                format!(
                    "must be at least total_deadline_ms ({} ms): a shorter lease would give back the reservations of requests still running",
                    file.routing.total_deadline_ms
                ),
            ));
        }

        let mut providers = Vec::new();
        let mut provider_ids = HashSet::new();
        for (i, p) in file.providers.iter().enumerate() {
            let key = format!("providers[{i}]");
            if p.id.trim().is_empty() {
                return Err(self.err(format!("{key}.id"), "must not be empty"));
            }
            if !provider_ids.insert(p.id.clone()) {
                return Err(self.err(
                    format!("{key}.id"),
                    format!("duplicate provider id {:?}", p.id),
                ));
            }
            if let Some(url) = &p.base_url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(self.err(
                        format!("{key}.base_url"),
                        format!("{url:?} is not an http(s) URL"),
                    ));
                }
            } else if p.kind == ProviderKind::OpenaiCompatible {
                return Err(self.err(
                    format!("{key}.base_url"),
                    "required for kind openai-compatible",
                ));
            }
            if p.models.as_ref().is_some_and(Vec::is_empty) {
                return Err(self.err(
                    format!("{key}.models"),
                    "must list at least one model when set",
                ));
            }
            if p.api_version.is_some() && p.kind != ProviderKind::OpenaiCompatible {
                return Err(self.err(
                    format!("{key}.api_version"),
                    "only applies to kind openai-compatible (Azure OpenAI)",
                ));
            }
            providers.push(ResolvedProvider {
                id: ProviderId::new(p.id.as_str()),
                kind: p.kind,
                base_url: p.base_url.clone(),
                models: p
                    .models
                    .as_ref()
                    .map(|m| m.iter().map(|s| ModelId::new(s.as_str())).collect()),
                api_version: p.api_version.clone(),
                connect_timeout: p.connect_timeout_ms.map(Duration::from_millis),
                first_byte_timeout: p.first_byte_timeout_ms.map(Duration::from_millis),
                latency: p.latency_ms.map(Duration::from_millis),
            });
        }
        let declared = || {
            file.providers
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };

        for (i, f) in file.fallbacks.iter().enumerate() {
            if f.model.trim().is_empty()
                || f.to.is_empty()
                || f.to.iter().any(|m| m.trim().is_empty())
            {
                return Err(self.err(
                    format!("fallbacks[{i}]"),
                    "needs a model and a non-empty `to` list of model names",
                ));
            }
            settings.fallbacks.insert(
                ModelId::new(f.model.as_str()),
                f.to.iter().map(|m| ModelId::new(m.as_str())).collect(),
            );
        }
        for (i, d) in file.downgrades.iter().enumerate() {
            if d.from == d.to {
                return Err(self.err(format!("downgrades[{i}]"), "from and to are the same model"));
            }
        }
        settings.downgrades = file.downgrades.clone();

        let mut keys = Vec::new();
        let mut key_ids = HashSet::new();
        let mut per_provider: HashMap<&str, usize> = HashMap::new();
        for (i, k) in file.keys.iter().enumerate() {
            let key = format!("keys[{i}]");
            if !provider_ids.contains(&k.provider) {
                return Err(self.err(
                    format!("{key}.provider"),
                    format!(
                        "unknown provider {:?}; declared providers: {}",
                        k.provider,
                        declared()
                    ),
                ));
            }
            let n = per_provider.entry(k.provider.as_str()).or_insert(0);
            *n += 1;
            let id =
                k.id.clone()
                    .unwrap_or_else(|| format!("{}-{n}", k.provider));
            if id.trim().is_empty() || !key_ids.insert(id.clone()) {
                return Err(self.err(
                    format!("{key}.id"),
                    format!("duplicate or empty key id {id:?}"),
                ));
            }
            let raw = self.secret(
                &key,
                k.material.as_ref(),
                k.material_env.as_ref(),
                "material",
            )?;
            let material = KeyMaterial::parse(&raw)
                .map_err(|e| self.err(format!("{key}.material"), e.to_string()))?;
            k.metadata
                .validate()
                .map_err(|e| self.err(format!("{key}.metadata"), e))?;
            keys.push(ResolvedKey {
                id: KeyId::new(id),
                provider: ProviderId::new(k.provider.as_str()),
                material,
                metadata: k.metadata.clone(),
            });
        }

        let mut budgets = Vec::new();
        let mut budget_ids = HashSet::new();
        for (i, b) in file.budgets.iter().enumerate() {
            let key = format!("budgets[{i}]");
            if let Some(p) = b.provider.as_ref().filter(|_| b.scope == "provider") {
                if !provider_ids.contains(p) {
                    return Err(self.err(
                        format!("{key}.provider"),
                        format!("unknown provider {p:?}; declared providers: {}", declared()),
                    ));
                }
            }
            let budget = b.to_budget().map_err(|(field, message)| {
                self.err(
                    if field.is_empty() {
                        key.clone()
                    } else {
                        format!("{key}.{field}")
                    },
                    message,
                )
            })?;
            if !budget_ids.insert(budget.id.clone()) {
                return Err(self.err(
                    format!("{key}.id"),
                    format!(
                        "duplicate budget id {:?}; give each budget an id",
                        budget.id
                    ),
                ));
            }
            budgets.push(budget);
        }

        let mut virtual_keys = Vec::new();
        let mut names = HashSet::new();
        let mut tokens = HashSet::new();
        for (i, v) in file.virtual_keys.iter().enumerate() {
            let key = format!("virtual_keys[{i}]");
            let name = v.name.clone().unwrap_or_else(|| format!("vk-{}", i + 1));
            apikeyrouter_domain::validate_name(&name)
                .map_err(|e| self.err(format!("{key}.name"), e.to_string()))?;
            if !names.insert(name.clone()) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate virtual key name {name:?}"),
                ));
            }
            let token = self.secret(&key, v.token.as_ref(), v.token_env.as_ref(), "token")?;
            if token.len() < 8 {
                return Err(self.err(
                    format!("{key}.token"),
                    "client tokens must be at least 8 characters",
                ));
            }
            if !tokens.insert(token.clone()) {
                return Err(self.err(
                    format!("{key}.token"),
                    "the same token is used by another virtual key",
                ));
            }
            if let Some(limit) = v.budget_usd {
                let budget = virtual_key_budget(&name, limit)
                    .map_err(|e| self.err(format!("{key}.budget_usd"), e))?;
                if !budget_ids.insert(budget.id.clone()) {
                    return Err(self.err(
                        format!("{key}.budget_usd"),
                        format!(
                            "its budget's id {:?} is taken by a [[budgets]] entry",
                            budget.id
                        ),
                    ));
                }
                budgets.push(budget);
            }
            if v.rpm == Some(0) {
                return Err(self.err(format!("{key}.rpm"), "must be greater than zero"));
            }
            virtual_keys.push(ResolvedVirtualKey {
                name,
                token,
                tenant: v.tenant.as_ref().map(|t| TenantId::new(t.as_str())),
                models: v
                    .models
                    .as_ref()
                    .map(|m| m.iter().map(|s| ModelId::new(s.as_str())).collect()),
                budget_usd: v.budget_usd,
                rpm: v.rpm,
            });
        }

        let mut catalogue = PriceCatalogue::builtin();
        for (i, p) in file.prices.iter().enumerate() {
            let mut price = ModelPrice::new(p.input_per_mtok, p.output_per_mtok);
            price.cached_input_per_mtok = p.cached_input_per_mtok;
            if let Some(m) = p.default_max_output {
                price.default_max_output = m;
            }
            if !price.is_valid() {
                return Err(self.err(
                    format!("prices[{i}]"),
                    "prices must be finite and not negative",
                ));
            }
            match &p.provider {
                Some(provider) => catalogue.set_for_provider(
                    ProviderId::new(provider.as_str()),
                    ModelId::new(p.model.as_str()),
                    price,
                ),
                None => catalogue.set(ModelId::new(p.model.as_str()), price),
            }
        }

        match (file.audit.kind.as_deref(), &file.audit.path) {
            (None | Some("none" | "stdout"), _) => {}
            (Some("file"), Some(_)) => {}
            (Some("file"), None) => return Err(self.err("audit.path", "required for kind file")),
            (Some("mongodb"), _) => {
                if file.audit.mongodb(&file.store).is_none() {
                    return Err(self.err(
                        "audit.url",
                        "required for kind mongodb unless the store (or its records) is mongodb",
                    ));
                }
            }
            (Some(other), _) => {
                return Err(self.err(
                    "audit.kind",
                    format!("unknown audit kind {other:?}; expected none, stdout, file or mongodb"),
                ));
            }
        }
        if file.limits.max_body_bytes < 1024 {
            return Err(self.err("limits.max_body_bytes", "must be at least 1024"));
        }
        if file.limits.header_read_timeout_ms < 100 {
            return Err(self.err(
                "limits.header_read_timeout_ms",
                "must be at least 100 (a client needs time to send its request head)",
            ));
        }
        if cfg!(not(target_os = "linux")) && file.server.runtime == ServerRuntime::PerCore {
            return Err(self.err(
                "server.runtime",
                "per-core needs Linux (SO_REUSEPORT spreading connections over listeners); use shared",
            ));
        }
        if file
            .server
            .threads
            .is_some_and(|n| !(1..=MAX_SERVER_THREADS).contains(&n))
        {
            return Err(self.err(
                "server.threads",
                format!("must be between 1 and {MAX_SERVER_THREADS}"),
            ));
        }

        Ok(Config {
            source_name: self.source.to_owned(),
            listen,
            admin_token,
            store: file.store.clone(),
            settings,
            catalogue,
            providers,
            keys,
            budgets,
            virtual_keys,
            audit: file.audit.clone(),
            limits: file.limits.clone(),
            server: file.server,
        })
    }
}

/// The id of a virtual key's budget.
pub fn virtual_key_budget_id(name: &str) -> String {
    format!("virtual-key-{name}")
}

/// A virtual key's monthly hard budget, `virtual-key-<name>`, over the spend of the
/// requests its client makes (tagged `virtual_key=<name>`).
///
/// # Errors
/// A message when the limit is not a positive amount.
pub fn virtual_key_budget(name: &str, limit_usd: f64) -> Result<Budget, String> {
    if !(limit_usd.is_finite() && limit_usd > 0.0) {
        return Err("must be greater than zero".to_owned());
    }
    Budget::new(
        virtual_key_budget_id(name),
        BudgetScope::Tag {
            key: VIRTUAL_KEY_TAG.to_owned(),
            value: name.to_owned(),
        },
        limit_usd,
        BudgetPeriod::Monthly,
        Enforcement::Hard,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
