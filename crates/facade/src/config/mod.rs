//! The configuration file (TOML): parsing, environment overrides and validation into
//! the values the router is built from.
//!
//! Parsing is layered: defaults < file < environment (`APIKEYROUTER_` + the key path
//! joined with `__`, e.g. `APIKEYROUTER_ROUTING__MAX_ATTEMPTS=5`). Secrets are never in
//! the file if avoidable: keys and tokens name the environment variable that holds them.
//! Validation happens once, here; errors name the file, the key and what is wrong.

mod file;
mod validate;

pub use file::{
    AdminConfig, AuditConfig, BudgetConfig, FallbackConfig, FileConfig, KeyConfig, LimitsConfig,
    PriceConfig, ProviderConfig, ProviderKind, RoutingConfig, ServerConfig, ServerRuntime,
    VirtualKeyConfig,
};
pub use validate::{
    Config, ConfigError, ResolvedKey, ResolvedProvider, ResolvedVirtualKey, VIRTUAL_KEY_TAG,
    virtual_key_budget, virtual_key_budget_id,
};
