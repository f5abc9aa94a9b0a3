//! State-store adapters of ApiKeyRouter: implementations of the
//! [`StateStore`](apikeyrouter_application::ports::StateStore) port (keys, usage and
//! quota, budgets, the request log) and [`connect`], which opens the one a
//! [`StoreConfig`] names.
//!
//! Each backend lives in its own module behind a feature: `memory` (default), `redis`
//! and `mongodb`. A configuration naming a backend this build lacks is still accepted
//! by serde; [`connect`] then says which feature is missing. [`cipher`] (always
//! built) encrypts key material at rest for the stores that persist it.
//!
//! Depends on the domain and application crates only (plus each backend's client
//! crate); never on another adapter crate.

pub mod cipher;
mod config;
#[cfg(feature = "memory")]
mod fail_open;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "mongodb")]
pub mod mongodb;
#[cfg(feature = "redis")]
pub mod redis;
mod split;
#[cfg(any(test, feature = "test-util"))]
pub mod test_time;

pub use cipher::AeadCipher;
pub use config::{
    DEFAULT_REQUEST_CAPACITY, FailMode, MAX_REQUESTS_KEPT, StoreConfig, connect,
    connect_audit_sink, redact_url,
};
#[cfg(feature = "memory")]
pub use fail_open::FailOpenStore;
#[cfg(feature = "memory")]
pub use memory::MemoryStore;
#[cfg(feature = "mongodb")]
pub use mongodb::MongoStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
pub use split::SplitStore;
