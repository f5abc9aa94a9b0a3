//! Observability of ApiKeyRouter: tracing setup ([`init_tracing`]) and audit sinks
//! implementing the application's [`AuditSink`](apikeyrouter_application::ports::AuditSink)
//! port ([`JsonLinesAuditSink`], [`MemoryAuditSink`], [`DiscardAuditSink`]).
//!
//! It depends on the application and domain crates and on tracing, never on the
//! adapter crates (providers, stores): the facade wires them together.

pub mod audit;
pub mod tracing_setup;

pub use audit::{DiscardAuditSink, JsonLinesAuditSink, MemoryAuditSink};
pub use tracing_setup::{LogFormat, TracingError, init_tracing};
