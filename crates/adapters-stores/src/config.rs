//! Which state store to open, and [`connect`], which opens it.
//!
//! Invariant: [`StoreConfig`] has the same shape whatever features are enabled, so a
//! configuration file never fails to parse because of how the binary was built; the
//! missing backend is reported by [`connect`] instead.

use std::sync::Arc;

use apikeyrouter_application::ports::{StateStore, StoreError, StoreErrorKind};
use serde::{Deserialize, Serialize};

/// The state-store backend and its settings, tagged by `kind`.
///
/// ```text
/// { "kind": "memory" }
/// { "kind": "redis", "url": "redis://localhost:6379" }
/// { "kind": "mongodb", "url": "mongodb://localhost:27017", "database": "apikeyrouter" }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// In process memory (feature `memory`); lost on restart.
    Memory {},
    /// Redis (feature `redis`; not implemented yet).
    Redis {
        /// Connection URL, e.g. `redis://localhost:6379`.
        url: String,
    },
    /// MongoDB (feature `mongodb`; not implemented yet).
    Mongodb {
        /// Connection string, e.g. `mongodb://localhost:27017`.
        url: String,
        /// Database name; the driver's default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        database: Option<String>,
    },
}

impl StoreConfig {
    /// The backend's name: `memory`, `redis` or `mongodb`.
    pub const fn kind_name(&self) -> &'static str {
        match self {
            Self::Memory {} => "memory",
            Self::Redis { .. } => "redis",
            Self::Mongodb { .. } => "mongodb",
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Memory {}
    }
}

/// Opens the store `config` names.
///
/// # Errors
/// `Unavailable` when this build lacks the backend's feature, when the backend is not
/// implemented yet, or when it cannot be reached.
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn StateStore>, StoreError> {
    match config {
        StoreConfig::Memory {} => connect_memory(),
        StoreConfig::Redis { .. } => connect_redis(),
        StoreConfig::Mongodb { .. } => connect_mongodb(),
    }
}

#[cfg(feature = "memory")]
fn connect_memory() -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(Arc::new(crate::memory::MemoryStore::new()))
}

#[cfg(not(feature = "memory"))]
fn connect_memory() -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("built without the `memory` feature"))
}

#[cfg(feature = "redis")]
fn connect_redis() -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("the redis store is not implemented yet"))
}

#[cfg(not(feature = "redis"))]
fn connect_redis() -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("built without the `redis` feature"))
}

#[cfg(feature = "mongodb")]
fn connect_mongodb() -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("the mongodb store is not implemented yet"))
}

#[cfg(not(feature = "mongodb"))]
fn connect_mongodb() -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("built without the `mongodb` feature"))
}

fn unavailable(message: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_each_kind() {
        let memory: StoreConfig = serde_json::from_str(r#"{"kind":"memory"}"#).unwrap();
        assert_eq!(memory, StoreConfig::Memory {});
        let redis: StoreConfig =
            serde_json::from_str(r#"{"kind":"redis","url":"redis://localhost:6379"}"#).unwrap();
        assert_eq!(
            redis,
            StoreConfig::Redis {
                url: "redis://localhost:6379".to_owned()
            }
        );
        let mongodb: StoreConfig =
            serde_json::from_str(r#"{"kind":"mongodb","url":"mongodb://db"}"#).unwrap();
        assert_eq!(
            mongodb,
            StoreConfig::Mongodb {
                url: "mongodb://db".to_owned(),
                database: None
            }
        );
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let res = serde_json::from_str::<StoreConfig>(r#"{"kind":"redis","url":"x","pool":4}"#);
        assert!(res.is_err());
    }

    #[tokio::test]
    async fn redis_config_reports_why_it_cannot_connect() {
        let config = StoreConfig::Redis {
            url: "redis://localhost:6379".to_owned(),
        };
        let err = connect(&config).await.err().unwrap();
        assert_eq!(err.kind, StoreErrorKind::Unavailable);
        let expected = if cfg!(feature = "redis") {
            "the redis store is not implemented yet"
        } else {
            "built without the `redis` feature"
        };
        assert_eq!(err.message, expected);
    }

    #[tokio::test]
    async fn mongodb_config_reports_why_it_cannot_connect() {
        let config = StoreConfig::Mongodb {
            url: "mongodb://localhost:27017".to_owned(),
            database: Some("apikeyrouter".to_owned()),
        };
        let err = connect(&config).await.err().unwrap();
        assert_eq!(err.kind, StoreErrorKind::Unavailable);
        let expected = if cfg!(feature = "mongodb") {
            "the mongodb store is not implemented yet"
        } else {
            "built without the `mongodb` feature"
        };
        assert_eq!(err.message, expected);
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_config_opens_a_reachable_store() {
        let store = connect(&StoreConfig::default()).await.unwrap();
        assert_eq!(store.kind(), "memory");
        store.ping().await.unwrap();
    }
}
