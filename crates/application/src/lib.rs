//! Use-case services of ApiKeyRouter and the ports they drive.
//!
//! The services (routing, keys, quota, budgets) orchestrate the pure domain through
//! ports: [`ports::Provider`], [`ports::StateStore`], [`ports::AuditSink`],
//! [`ports::Clock`] and [`ports::SecretCipher`]. Adapters implement the ports; this
//! crate names none of them and does no I/O of its own. It may use tokio only for
//! synchronisation and timers (deadlines), never for sockets or files.

pub mod ports;
pub mod records;
pub mod services;

pub use records::{AttemptRecord, AuditRecord, EmbeddingRouteResponse, Outcome, RouteResponse};
pub use services::{
    ApiKeyRouterCore, BudgetService, DEFAULT_QUEUE_CAPACITY, Defined, DeliveryStats, KeyService,
    ProviderSettings, QuotaService, RegisterKeyError, RouteError, RouterService, RouterSettings,
};
