//! Provider adapters: implementations of the application's
//! [`Provider`](apikeyrouter_application::ports::Provider) port, one module per
//! provider.
//!
//! Each adapter translates its API's errors into
//! [`ProviderError`](apikeyrouter_application::ports::ProviderError) at the seam, so no
//! HTTP-client error type leaves this crate. It depends on the application and domain
//! crates only, never on another adapter crate (stores, observability).
//!
//! - [`simulated`]: a deterministic in-process provider for tests, benchmarks and demos.

pub mod simulated;

pub use simulated::{Behaviour, Failure, FailurePlan, SimulatedProvider};
