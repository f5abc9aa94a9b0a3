//! The pure domain of ApiKeyRouter: keys and their state machine, quota windows,
//! routing decisions, budgets, cost and failure classification.
//!
//! Invariant: this crate performs no I/O, spawns nothing and never reads a clock.
//! Every operation that depends on time takes a [`Timestamp`] argument, so the same
//! inputs always give the same outputs. It depends only on `std`, `serde` (derive) and
//! `thiserror`.

pub mod budget;
pub mod cost;
pub mod failure;
pub mod ids;
pub mod key;
pub mod money;
pub mod quota;
pub mod request;
pub mod routing;
pub mod secret;
pub mod time;
pub mod virtual_key;

pub use budget::{
    Budget, BudgetError, BudgetLedger, BudgetPeriod, BudgetScope, BudgetStatus, Enforcement,
    Reclaimed, Reservation, ReservationId,
};
pub use cost::{CostEstimate, ModelPrice, PriceCatalogue, Reconciliation, TokenEstimate};
pub use failure::{FailureKind, KeyAction, RetryAdvice, classify_status};
pub use ids::{KeyId, ModelId, ProviderId, RequestId, TenantId};
pub use key::{
    ApiKey, KeyMetadata, KeyState, KeyStats, StateTransition, TransitionError, TransitionTrigger,
};
pub use money::Money;
pub use quota::{
    CapacityState, ExhaustionPrediction, QuotaLimits, QuotaObservation, QuotaSnapshot,
    QuotaWindows, Uncertainty, WindowCounts, WindowKind,
};
pub use request::{
    EmbeddingIntent, Image, Message, RequestIntent, ResponseFormat, Role, TokenUsage, ToolCall,
    ToolChoice, ToolDefinition,
};
pub use routing::{
    Constraints, Decision, Ineligibility, Objective, ObjectiveError, ObjectiveKind, RouteQuery,
    RoutingTable,
};
pub use secret::{KeyMaterial, KeyMaterialError};
pub use time::Timestamp;
pub use virtual_key::{VirtualKey, VirtualKeyError, parse_sha256_hex, validate_name};
