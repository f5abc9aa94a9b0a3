//! Building a router from a validated [`Config`], and applying a new one to a running
//! router (hot reload) without dropping what it learned.

use std::collections::HashSet;
use std::sync::Arc;

use apikeyrouter_adapters_providers::simulated::SimulatedProvider;
use apikeyrouter_application::ports::Provider;
use apikeyrouter_application::{ProviderSettings, RegisterKeyError};
use apikeyrouter_domain::{KeyId, Money};
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
    /// providers (re)registered, configured keys added or updated (keys removed from
    /// the file are deleted; keys added through the API are left alone), budgets added
    /// or redefined keeping their spend. In-flight requests are not disturbed.
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
        let current = budgets
            .list()
            .await
            .map_err(|e| BuildError::Setting(e.to_string()))?;
        for b in &config.budgets {
            let existing = current.iter().find(|s| s.budget_id == b.id);
            let unchanged = existing.is_some_and(|s| {
                s.scope == b.scope && s.limit == b.limit && s.enforcement == b.enforcement
            });
            if !unchanged {
                let spent = existing.map_or(Money::ZERO, |s| s.spent);
                budgets
                    .put(b.clone(), spent)
                    .await
                    .map_err(|e| BuildError::Setting(format!("budget {}: {e}", b.id)))?;
            }
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
