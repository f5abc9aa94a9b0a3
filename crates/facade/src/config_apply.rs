//! Building a router from a validated [`Config`], and applying a new one to a running
//! router (hot reload) without dropping what it learned.

use std::collections::HashSet;
use std::sync::Arc;

use apikeyrouter_adapters_providers::simulated::SimulatedProvider;
use apikeyrouter_application::ports::Provider;
use apikeyrouter_application::{ProviderSettings, RegisterKeyError};
use apikeyrouter_domain::KeyId;
use apikeyrouter_observability::{DiscardAuditSink, JsonLinesAuditSink};

use crate::builder::BuildError;
use crate::config::{Config, ProviderKind, ResolvedProvider};
use crate::router::ApiKeyRouter;

/// Constructs the adapter for one configured provider.
///
/// # Errors
/// [`BuildError::Setting`] when the adapter cannot be created (e.g. a bad URL).
pub fn build_provider(p: &ResolvedProvider) -> Result<Arc<dyn Provider>, BuildError> {
    use apikeyrouter_adapters_providers::http::HttpSettings;
    let mut http = HttpSettings::default();
    if let Some(t) = p.connect_timeout {
        http.connect_timeout = t;
    }
    if let Some(t) = p.first_byte_timeout {
        http.first_byte_timeout = t;
    }
    let fail = |e: apikeyrouter_application::ports::ProviderError| {
        BuildError::Setting(format!("provider {}: {}", p.id, e.message))
    };
    let provider: Arc<dyn Provider> = match p.kind {
        ProviderKind::Simulated => {
            Arc::new(SimulatedProvider::new().with_latency(p.latency.unwrap_or_default()))
        }
        ProviderKind::Openai => Arc::new(
            apikeyrouter_adapters_providers::openai::OpenAiProvider::new(
                p.base_url.as_deref().unwrap_or("https://api.openai.com/v1"),
                http,
            )
            .map_err(fail)?,
        ),
        ProviderKind::Anthropic => Arc::new(
            apikeyrouter_adapters_providers::anthropic::AnthropicProvider::new(
                p.base_url.as_deref().unwrap_or("https://api.anthropic.com"),
                http,
            )
            .map_err(fail)?,
        ),
        ProviderKind::Gemini => Arc::new(
            apikeyrouter_adapters_providers::gemini::GeminiProvider::new(
                p.base_url
                    .as_deref()
                    .unwrap_or("https://generativelanguage.googleapis.com/v1beta"),
                http,
            )
            .map_err(fail)?,
        ),
        ProviderKind::OpenaiCompatible => {
            let base = p.base_url.as_deref().unwrap_or_default();
            Arc::new(match &p.api_version {
                Some(version) => apikeyrouter_adapters_providers::openai_compatible::OpenAiCompatibleProvider::azure(
                    base,
                    apikeyrouter_adapters_providers::openai_compatible::AzureSettings::new(version.as_str()),
                    http,
                ),
                None => apikeyrouter_adapters_providers::openai_compatible::OpenAiCompatibleProvider::new(base, http),
            }
            .map_err(fail)?)
        }
    };
    Ok(provider)
}

impl ApiKeyRouter {
    /// Builds a router from a validated configuration: store, audit output, settings,
    /// prices, providers, keys and budgets.
    ///
    /// # Errors
    /// [`BuildError`] when the store cannot be opened, an adapter cannot be built, or a
    /// key or budget is refused.
    pub async fn from_config(config: &Config) -> Result<Self, BuildError> {
        let audit: Arc<dyn apikeyrouter_application::ports::AuditSink> =
            match (config.audit.kind.as_deref(), &config.audit.path) {
                (Some("stdout"), _) => Arc::new(
                    JsonLinesAuditSink::stdout()
                        .map_err(|e| BuildError::Setting(format!("audit: {e}")))?,
                ),
                (Some("file"), Some(path)) => Arc::new(
                    JsonLinesAuditSink::file(path)
                        .map_err(|e| BuildError::Setting(format!("audit file {path}: {e}")))?,
                ),
                (Some("mongodb"), _) => {
                    let mongodb = config.audit.mongodb(&config.store).ok_or_else(|| {
                        BuildError::Setting("audit: kind mongodb needs a url".to_owned())
                    })?;
                    apikeyrouter_adapters_stores::connect_audit_sink(&mongodb).await?
                }
                _ => Arc::new(DiscardAuditSink),
            };
        let router = Self::builder()
            .store_config(config.store.clone())
            .audit(audit)
            .settings(config.settings.clone())
            .catalogue(config.catalogue.clone())
            .build()
            .await?;
        router.apply_config(config).await?;
        Ok(router)
    }

    /// Applies `config` to this running router: settings and prices are replaced,
    /// providers (re)registered, configured keys added or updated, budgets (those of
    /// virtual keys included) added or redefined keeping their spend. Keys and budgets
    /// removed from the file are deleted; those added through the API are left alone,
    /// and so are providers removed from the file (keys added through the API may
    /// still use them). In-flight requests are not disturbed.
    ///
    /// # Errors
    /// [`BuildError`] for the first provider, key or budget that is refused; what was
    /// applied before it stays applied.
    pub async fn apply_config(&self, config: &Config) -> Result<(), BuildError> {
        self.core().set_settings(config.settings.clone());
        self.core().set_catalogue(config.catalogue.clone());
        for p in &config.providers {
            let provider = build_provider(p)?;
            self.core().register_provider(
                p.id.clone(),
                provider,
                ProviderSettings {
                    models: p.models.clone(),
                },
            );
        }

        let keys = self.core().keys();
        let wanted: HashSet<KeyId> = config.keys.iter().map(|k| k.id.clone()).collect();
        let previous = self.take_config_keys(wanted.clone());
        for gone in previous.difference(&wanted) {
            if let Err(e) = keys.delete(gone).await {
                tracing::warn!(key_id = %gone, error = %e, "key removed from config not deleted");
            }
        }
        for k in &config.keys {
            match keys.get(&k.id).await {
                Ok(existing)
                    if existing.provider_id == k.provider
                        && keys.material_matches(&k.id, &k.material) =>
                {
                    if existing.metadata != k.metadata {
                        keys.update_metadata(&k.id, k.metadata.clone())
                            .await
                            .map_err(|e| BuildError::Setting(format!("key {}: {e}", k.id)))?;
                    }
                }
                Ok(_) => {
                    // Provider or material changed: replace the key.
                    keys.delete(&k.id)
                        .await
                        .map_err(|e| BuildError::Setting(format!("key {}: {e}", k.id)))?;
                    register(&keys, k).await?;
                }
                Err(_) => register(&keys, k).await?,
            }
        }

        let budgets = self.core().budgets();
        let defined = budgets.definitions();
        let wanted: HashSet<String> = config.budgets.iter().map(|b| b.id.clone()).collect();
        let previous = self.take_config_budgets(wanted.clone());
        // A removal that failed stays the file's, so the next reload tries it again.
        let mut kept = wanted.clone();
        for gone in previous.difference(&wanted) {
            if let Err(e) = budgets.remove_if_present(gone).await {
                tracing::warn!(budget_id = %gone, error = %e, "budget removed from config not deleted; retried at the next reload");
                kept.insert(gone.clone());
            }
        }
        if kept.len() > wanted.len() {
            self.take_config_budgets(kept);
        }
        for b in &config.budgets {
            if defined.iter().any(|d| d == b) {
                continue;
            }
            // Redefined (limit, period, scope or enforcement) in place or new: the
            // spend of the current period and the reservations carry over.
            budgets
                .define(b.clone(), None)
                .await
                .map_err(|e| BuildError::Setting(format!("budget {}: {e}", b.id)))?;
        }
        tracing::info!(source = %config.source_name, providers = config.providers.len(), keys = config.keys.len(), budgets = config.budgets.len(), "configuration applied");
        Ok(())
    }
}

async fn register(
    keys: &apikeyrouter_application::KeyService,
    k: &crate::config::ResolvedKey,
) -> Result<(), BuildError> {
    keys.register_with_id(
        k.id.clone(),
        k.material.expose(),
        &k.provider,
        k.metadata.clone(),
    )
    .await
    .map(|_| ())
    .map_err(|e: RegisterKeyError| BuildError::Setting(format!("key {}: {e}", k.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apikeyrouter_domain::{Budget, BudgetPeriod, BudgetScope, Enforcement, Money};

    const BASE: &str = r#"
[[providers]]
id = "sim"
kind = "simulated"
models = ["gpt-4o"]

[[keys]]
provider = "sim"
material = "sk-reload-test-0001"
"#;

    fn config(extra: &str) -> Config {
        Config::parse(&format!("{BASE}{extra}"), "reload.toml", &[]).unwrap()
    }

    async fn budgets(router: &ApiKeyRouter) -> Vec<(String, Money, Money)> {
        router
            .budgets()
            .await
            .unwrap()
            .into_iter()
            .map(|b| (b.budget_id, b.limit, b.spent))
            .collect()
    }

    /// A reload makes the budgets those of the file: removed ones go (a virtual key's
    /// with its key), a changed period or limit takes effect keeping the spend, and
    /// budgets added through the API stay.
    #[tokio::test]
    async fn reload_makes_the_budgets_those_of_the_file() {
        let first = config(
            r#"
[[budgets]]
id = "monthly-cap"
scope = "global"
limit_usd = 100.0
period = "monthly"

[[budgets]]
id = "gone-soon"
scope = "global"
limit_usd = 5.0
period = "daily"

[[virtual_keys]]
name = "team"
token = "client-token-team-1"
budget_usd = 20.0
"#,
        );
        let router = ApiKeyRouter::from_config(&first).await.unwrap();
        router
            .add_budget_with_spend(
                Budget::new(
                    "from-api",
                    BudgetScope::Global,
                    7.0,
                    BudgetPeriod::Weekly,
                    Enforcement::Soft,
                )
                .unwrap(),
                Money::ZERO,
            )
            .await
            .unwrap();
        // Spend carried over a redefinition.
        let mut cap = first.budgets[0].clone();
        router
            .add_budget_with_spend(cap.clone(), Money::from_usd(3.0))
            .await
            .unwrap();
        assert_eq!(
            budgets(&router)
                .await
                .into_iter()
                .map(|b| b.0)
                .collect::<Vec<_>>(),
            ["from-api", "gone-soon", "monthly-cap", "virtual-key-team"]
        );

        let second = config(
            r#"
[[budgets]]
id = "monthly-cap"
scope = "global"
limit_usd = 100.0
period = "daily"
"#,
        );
        router.apply_config(&second).await.unwrap();
        assert_eq!(
            budgets(&router).await,
            [
                ("from-api".to_owned(), Money::from_usd(7.0), Money::ZERO),
                (
                    "monthly-cap".to_owned(),
                    Money::from_usd(100.0),
                    Money::from_usd(3.0)
                ),
            ]
        );
        cap.period = BudgetPeriod::Daily;
        let defined = router.core().budgets().definitions();
        assert!(defined.contains(&cap), "the period changed: {defined:?}");

        // Applying the same file again changes nothing.
        router.apply_config(&second).await.unwrap();
        assert_eq!(budgets(&router).await.len(), 2);
    }
}
