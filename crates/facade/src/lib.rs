//! ApiKeyRouter: route LLM requests across many API keys and providers.
//!
//! Every request gets the best eligible key for the chosen objective (cost,
//! reliability, fairness, latency or a weighted mix), quota and rate-limit awareness,
//! a cost estimate before the call, budget enforcement, automatic failover to other
//! keys and fallback models, and an audit record that explains the decision.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use apikeyrouter::{ApiKeyRouter, KeyMetadata, Message, ObjectiveKind, RequestIntent};
//! use apikeyrouter::providers::SimulatedProvider;
//!
//! let router = ApiKeyRouter::builder().build().await?;
//! router.register_provider("openai", Arc::new(SimulatedProvider::new()));
//! router.register_key("sk-demo-key-000001", "openai", KeyMetadata::default()).await?;
//! let response = router
//!     .route(RequestIntent::new("gpt-4o", vec![Message::user("Hello!")]), ObjectiveKind::Cost)
//!     .await?;
//! println!("{} via {} ({})", response.content, response.key_id, response.decision);
//! # Ok(()) }
//! ```
//!
//! This crate is the composition root: it assembles the domain, the services, the
//! store and provider adapters and observability, and holds no business logic.

mod builder;
mod config_apply;
mod router;
mod virtual_keys;

pub mod config;

pub use builder::{ApiKeyRouterBuilder, BuildError};
pub use router::ApiKeyRouter;
pub use virtual_keys::AddVirtualKeyError;

pub use apikeyrouter_application::ports::{
    AuditSink, ChatChunk, ChatResponse, ChatStream, ClientLimit, Clock, EmbeddingCall,
    EmbeddingResponse, FinishReason, ManualClock, ModelSet, Provider, ProviderCall, ProviderError,
    ReclaimedReservations, StateStore, StoreError, StoreErrorKind, StoreHealth, StreamStart,
    SystemClock, ToolCallDelta,
};
pub use apikeyrouter_application::services::{
    BudgetServiceError, Defined, KeyQuota, KeyServiceError, RequestContext, RouteErrorKind,
    RoutedStream, StreamTotals, VirtualKeyChange,
};
pub use apikeyrouter_application::{
    AttemptRecord, AuditRecord, DeliveryStats, EmbeddingRouteResponse, Outcome, ProviderSettings,
    RegisterKeyError, RouteError, RouteResponse, RouterSettings,
};
pub use apikeyrouter_domain::cost::DowngradeRule;
pub use apikeyrouter_domain::failure::FailurePolicy;
pub use apikeyrouter_domain::key::KeyInfo;
pub use apikeyrouter_domain::{
    Budget, BudgetPeriod, BudgetScope, BudgetStatus, CapacityState, Constraints, Decision,
    EmbeddingIntent, Enforcement, FailureKind, KeyId, KeyMetadata, KeyState, Message, ModelId,
    ModelPrice, Money, Objective, ObjectiveKind, PriceCatalogue, ProviderId, RequestId,
    RequestIntent, Role, StateTransition, TenantId, Timestamp, TokenUsage, Uncertainty, VirtualKey,
    VirtualKeyError,
};

/// The pure domain model, for users who need more than the re-exports.
pub use apikeyrouter_domain as domain;

/// Provider adapters.
pub mod providers {
    pub use apikeyrouter_adapters_providers::http::use_connection_lane;
    pub use apikeyrouter_adapters_providers::simulated::{
        Behaviour, Failure, FailurePlan, SimulatedProvider,
    };
}

/// State store adapters and their configuration.
pub mod stores {
    pub use apikeyrouter_adapters_stores::{MemoryStore, StoreConfig, connect};
}

/// Tracing setup and audit sinks.
pub mod observability {
    pub use apikeyrouter_observability::{
        DiscardAuditSink, JsonLinesAuditSink, LogFormat, MemoryAuditSink, init_tracing,
    };
}

/// mockall mocks of the ports, for tests of code built on the router.
#[cfg(feature = "test-util")]
pub mod mocks {
    pub use apikeyrouter_application::ports::{MockAuditSink, MockProvider};
}
