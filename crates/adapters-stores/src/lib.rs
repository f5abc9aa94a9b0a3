//! State-store adapters of ApiKeyRouter: implementations of the
//! [`StateStore`](apikeyrouter_application::ports::StateStore) port (keys, usage and
//! quota, budgets, the request log) and [`connect`], which opens the one a
//! [`StoreConfig`] names.
//!
//! Each backend lives in its own module behind a feature: `memory` (default), and the
//! placeholders `redis` and `mongodb`. A configuration naming a backend this build lacks
//! is still accepted by serde; [`connect`] then says which feature is missing.
//!
//! Depends on the domain and application crates only (plus each backend's client
//! crate); never on another adapter crate.

mod config;
#[cfg(feature = "memory")]
pub mod memory;

pub use config::{StoreConfig, connect};
#[cfg(feature = "memory")]
pub use memory::MemoryStore;
