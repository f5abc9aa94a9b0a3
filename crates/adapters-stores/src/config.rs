//! Which state store to open, and [`connect`], which opens it.
//!
//! Invariant: [`StoreConfig`] has the same shape whatever features are enabled, so a
//! configuration file never fails to parse because of how the binary was built; the
//! missing backend is reported by [`connect`] instead.

use std::sync::Arc;

use apikeyrouter_application::ports::{AuditSink, StateStore, StoreError, StoreErrorKind};
use serde::{Deserialize, Serialize};

/// What the router does when a shared store becomes unreachable during traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Refuse requests (503 `store_unavailable`) until the store is back: limits and
    /// budgets are never checked against a partial view.
    #[default]
    FailClosed,
    /// Keep serving on local limits (per instance), with a warning and the
    /// `store_degraded` metric, until the store is back.
    FailOpen,
}

/// How many request records a memory store keeps by default: about 1.4 MB of
/// records, which stay in the CPU caches. With 10,000 (about 14 MB), the record each
/// request pushes out had left the caches long before, and freeing it (with the
/// allocation of its successor) cost the proxy 6 to 13 µs of CPU per request on the
/// bench machine (docs/benchmarks.md, session 19).
pub const DEFAULT_REQUEST_CAPACITY: usize = 1_000;

/// The most request records a memory store may be told to keep: about 1.4 GB of
/// them. A longer trail belongs in an audit sink or a database store.
pub const MAX_REQUESTS_KEPT: u32 = 1_000_000;

/// Reads `requests_kept`, naming the setting in every error: inside the `kind`-tagged
/// enum, serde's own errors would name only the `[store]` section.
fn requests_kept<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct Count;
    impl serde::de::Visitor<'_> for Count {
        type Value = u32;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "requests_kept: a whole number from 0 to {MAX_REQUESTS_KEPT}"
            )
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u32, E> {
            u32::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_REQUESTS_KEPT)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u32, E> {
            u64::try_from(n)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
                .and_then(|n| self.visit_u64(n))
        }
    }
    d.deserialize_u64(Count).map(Some)
}

/// The request records a memory store keeps for its `requests_kept` setting.
fn records_kept(requests_kept: Option<u32>) -> usize {
    requests_kept.map_or(DEFAULT_REQUEST_CAPACITY, |n| n as usize)
}

/// The state-store backend and its settings, tagged by `kind`.
///
/// ```text
/// { "kind": "memory" }
/// { "kind": "redis", "url": "redis://localhost:6379" }
/// { "kind": "redis", "url": "redis://node-a:6379,redis://node-b:6379", "cluster": true }
/// { "kind": "mongodb", "url": "mongodb://localhost:27017", "database": "apikeyrouter" }
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// In process memory (feature `memory`); lost on restart.
    Memory {
        /// How many of the newest request records are kept for look-ups by id;
        /// [`DEFAULT_REQUEST_CAPACITY`] when absent, 0 keeps none, at most
        /// [`MAX_REQUESTS_KEPT`].
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "requests_kept"
        )]
        requests_kept: Option<u32>,
    },
    /// Redis (feature `redis`): state shared by every instance using the same server
    /// and namespace.
    Redis {
        /// Connection URL, e.g. `redis://localhost:6379` or
        /// `redis://user:password@host:6379/0`.
        url: String,
        /// Prefix of every Redis key; `apikeyrouter` when absent. Deployments (or
        /// tests) sharing a server keep apart by using different namespaces.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// `true` for a Redis Cluster: `url` then names one or more seed nodes,
        /// comma-separated (`redis://a:6379,redis://b:6379`), and the rest of the
        /// cluster is discovered from them. A single server when absent or `false`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster: Option<bool>,
        /// When the server is lost during traffic; `fail_closed` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_unavailable: Option<FailMode>,
    },
    /// MongoDB (feature `mongodb`): durable keys (material encrypted with the master
    /// key from `APIKEYROUTER_MASTER_KEY` or `APIKEYROUTER_MASTER_KEY_FILE`), budgets,
    /// transitions, request records and the audit trail.
    Mongodb {
        /// Connection string, e.g. `mongodb://localhost:27017`.
        url: String,
        /// Database name; when absent, the one in the URL's path, else `apikeyrouter`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        database: Option<String>,
        /// Days request records (routing decisions) are kept; 30 when absent, 0 to
        /// keep them forever.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decisions_retention_days: Option<u32>,
        /// Days the audit trail is kept; 365 when absent, 0 to keep it forever.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit_retention_days: Option<u32>,
        /// When the server is lost during traffic; `fail_closed` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_unavailable: Option<FailMode>,
    },
    /// Counters (quota windows, reservations, budget ledgers, key state) in one
    /// store, records (keys with their material, transitions, budget definitions,
    /// request records) in another: typically Redis and MongoDB.
    Split {
        /// Where the counters live, e.g. `{ kind = "redis", url = "..." }`.
        counters: Box<StoreConfig>,
        /// Where the records live, e.g. `{ kind = "mongodb", url = "..." }`.
        records: Box<StoreConfig>,
        /// When either is lost during traffic; `fail_closed` when absent. (The
        /// halves' own `on_unavailable` is not used.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_unavailable: Option<FailMode>,
    },
}

impl StoreConfig {
    /// The backend's name: `memory`, `redis` or `mongodb`.
    pub const fn kind_name(&self) -> &'static str {
        match self {
            Self::Memory { .. } => "memory",
            Self::Redis { .. } => "redis",
            Self::Mongodb { .. } => "mongodb",
            Self::Split { .. } => "split",
        }
    }

    /// How many request records a memory store keeps; `None` for the other kinds.
    pub fn requests_kept(&self) -> Option<usize> {
        match self {
            Self::Memory { requests_kept } => Some(records_kept(*requests_kept)),
            _ => None,
        }
    }

    /// What to do when the store is lost during traffic.
    pub fn fail_mode(&self) -> FailMode {
        match self {
            Self::Memory { .. } => FailMode::FailClosed,
            Self::Redis { on_unavailable, .. }
            | Self::Mongodb { on_unavailable, .. }
            | Self::Split { on_unavailable, .. } => on_unavailable.unwrap_or_default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Memory {
            requests_kept: None,
        }
    }
}

/// Opens the store `config` names.
///
/// # Errors
/// `Unavailable` when this build lacks the backend's feature or the backend cannot be
/// reached; `Invalid` when its settings are wrong (for MongoDB, also when no master
/// key is configured).
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn StateStore>, StoreError> {
    let store = connect_backend(config).await?;
    match config.fail_mode() {
        FailMode::FailClosed => Ok(store),
        FailMode::FailOpen => fail_open(store).await,
    }
}

#[cfg(feature = "memory")]
async fn fail_open(store: Arc<dyn StateStore>) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(Arc::new(
        crate::fail_open::FailOpenStore::start(store).await?,
    ))
}

#[cfg(not(feature = "memory"))]
async fn fail_open(_store: Arc<dyn StateStore>) -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable(
        "on_unavailable = \"fail_open\" needs the `memory` feature",
    ))
}

async fn connect_backend(config: &StoreConfig) -> Result<Arc<dyn StateStore>, StoreError> {
    match config {
        StoreConfig::Split {
            counters, records, ..
        } => {
            if matches!(**counters, StoreConfig::Split { .. })
                || matches!(**records, StoreConfig::Split { .. })
            {
                return Err(StoreError::new(
                    StoreErrorKind::Invalid,
                    "a split store's counters and records must not be split stores",
                ));
            }
            let counters = Box::pin(connect_backend(counters)).await?;
            let records = Box::pin(connect_backend(records)).await?;
            Ok(Arc::new(crate::split::SplitStore::new(counters, records)))
        }
        StoreConfig::Memory { requests_kept } => connect_memory(records_kept(*requests_kept)),
        StoreConfig::Redis {
            url,
            namespace,
            cluster,
            ..
        } => connect_redis(url, namespace.as_deref(), cluster.unwrap_or(false)).await,
        StoreConfig::Mongodb {
            url,
            database,
            decisions_retention_days,
            audit_retention_days,
            ..
        } => {
            connect_mongodb(
                url,
                database.as_deref(),
                *decisions_retention_days,
                *audit_retention_days,
            )
            .await
        }
    }
}

#[cfg(feature = "memory")]
fn connect_memory(requests_kept: usize) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(Arc::new(crate::memory::MemoryStore::with_request_capacity(
        requests_kept,
    )))
}

#[cfg(not(feature = "memory"))]
fn connect_memory(_requests_kept: usize) -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("built without the `memory` feature"))
}

#[cfg(feature = "redis")]
async fn connect_redis(
    url: &str,
    namespace: Option<&str>,
    cluster: bool,
) -> Result<Arc<dyn StateStore>, StoreError> {
    let namespace = namespace.unwrap_or(crate::redis::DEFAULT_NAMESPACE);
    let store = if cluster {
        crate::redis::RedisStore::connect_cluster(url, namespace).await?
    } else {
        crate::redis::RedisStore::connect(url, namespace).await?
    };
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
async fn connect_redis(
    _url: &str,
    _namespace: Option<&str>,
    _cluster: bool,
) -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("built without the `redis` feature"))
}

/// Retention from configured days: absent means the default, 0 means forever.
#[cfg(feature = "mongodb")]
fn retention(decisions_days: Option<u32>, audit_days: Option<u32>) -> crate::mongodb::Retention {
    let defaults = crate::mongodb::Retention::default();
    let days = |configured: Option<u32>, default: Option<u32>| match configured {
        None => default,
        Some(0) => None,
        Some(n) => Some(n),
    };
    crate::mongodb::Retention {
        decisions_days: days(decisions_days, defaults.decisions_days),
        audit_days: days(audit_days, defaults.audit_days),
    }
}

/// Opens MongoDB with the master key the environment names; without one it fails
/// (`Invalid`) with a message saying how to set it, before touching the network.
#[cfg(feature = "mongodb")]
async fn open_mongodb(
    url: &str,
    database: Option<&str>,
    decisions_days: Option<u32>,
    audit_days: Option<u32>,
    cipher: Arc<dyn apikeyrouter_application::ports::SecretCipher>,
) -> Result<Arc<crate::mongodb::MongoStore>, StoreError> {
    use crate::mongodb::{DEFAULT_DATABASE, MongoStore, database_from_url};

    let database = database
        .map(str::to_owned)
        .or_else(|| database_from_url(url))
        .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
    let retention = retention(decisions_days, audit_days);
    let store = MongoStore::connect(url, &database, cipher, retention).await?;
    Ok(Arc::new(store))
}

#[cfg(feature = "mongodb")]
async fn connect_mongodb(
    url: &str,
    database: Option<&str>,
    decisions_days: Option<u32>,
    audit_days: Option<u32>,
) -> Result<Arc<dyn StateStore>, StoreError> {
    let cipher = crate::cipher::AeadCipher::from_env()
        .map_err(|e| StoreError::new(StoreErrorKind::Invalid, e.to_string()))?;
    Ok(open_mongodb(url, database, decisions_days, audit_days, Arc::new(cipher)).await?)
}

#[cfg(not(feature = "mongodb"))]
async fn connect_mongodb(
    _url: &str,
    _database: Option<&str>,
    _decisions_days: Option<u32>,
    _audit_days: Option<u32>,
) -> Result<Arc<dyn StateStore>, StoreError> {
    Err(unavailable("built without the `mongodb` feature"))
}

/// The MongoDB store that `config` names as an audit sink: the `audit` collection,
/// one document per request, kept `audit_retention_days`.
///
/// # Errors
/// `Invalid` when `config` is not MongoDB; otherwise as [`connect`].
pub async fn connect_audit_sink(config: &StoreConfig) -> Result<Arc<dyn AuditSink>, StoreError> {
    match config {
        StoreConfig::Mongodb {
            url,
            database,
            decisions_retention_days,
            audit_retention_days,
            ..
        } => {
            audit_mongodb(
                url,
                database.as_deref(),
                *decisions_retention_days,
                *audit_retention_days,
            )
            .await
        }
        other => Err(StoreError::new(
            StoreErrorKind::Invalid,
            format!(
                "a {} store cannot be an audit sink; use mongodb",
                other.kind_name()
            ),
        )),
    }
}

/// The audit sink stores no key material, so it needs no master key: without one it
/// opens the database with a cipher that refuses to seal or open anything.
#[cfg(feature = "mongodb")]
async fn audit_mongodb(
    url: &str,
    database: Option<&str>,
    decisions_days: Option<u32>,
    audit_days: Option<u32>,
) -> Result<Arc<dyn AuditSink>, StoreError> {
    use apikeyrouter_application::ports::{CipherError, SecretCipher};

    struct NoKeyMaterial;
    impl SecretCipher for NoKeyMaterial {
        fn seal(&self, _: &[u8]) -> Result<Vec<u8>, CipherError> {
            Err(CipherError::Internal(
                "the audit sink's connection keeps no key material".to_owned(),
            ))
        }
        fn open(&self, _: &[u8]) -> Result<Vec<u8>, CipherError> {
            Err(CipherError::Open)
        }
    }

    let cipher: Arc<dyn SecretCipher> = match crate::cipher::AeadCipher::from_env() {
        Ok(c) => Arc::new(c),
        Err(_) => Arc::new(NoKeyMaterial),
    };
    Ok(open_mongodb(url, database, decisions_days, audit_days, cipher).await?)
}

#[cfg(not(feature = "mongodb"))]
async fn audit_mongodb(
    _url: &str,
    _database: Option<&str>,
    _decisions_days: Option<u32>,
    _audit_days: Option<u32>,
) -> Result<Arc<dyn AuditSink>, StoreError> {
    Err(unavailable("built without the `mongodb` feature"))
}

#[cfg(not(all(feature = "memory", feature = "redis", feature = "mongodb")))]
fn unavailable(message: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, message)
}

/// `url` with the password (and any query string, which may carry one) masked.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            // A lone userinfo may be a password written without its colon.
            None => format!("***@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, _query)) => format!("{path}?***"),
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl std::fmt::Debug for StoreConfig {
    /// URLs without their passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory { requests_kept } => f
                .debug_struct("Memory")
                .field("requests_kept", requests_kept)
                .finish(),
            Self::Redis {
                url,
                namespace,
                cluster,
                on_unavailable,
            } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .field("namespace", namespace)
                .field("cluster", cluster)
                .field("on_unavailable", on_unavailable)
                .finish(),
            Self::Mongodb {
                url,
                database,
                decisions_retention_days,
                audit_retention_days,
                on_unavailable,
            } => f
                .debug_struct("Mongodb")
                .field("url", &redact_url(url))
                .field("database", database)
                .field("decisions_retention_days", decisions_retention_days)
                .field("audit_retention_days", audit_retention_days)
                .field("on_unavailable", on_unavailable)
                .finish(),
            Self::Split {
                counters,
                records,
                on_unavailable,
            } => f
                .debug_struct("Split")
                .field("counters", counters)
                .field("records", records)
                .field("on_unavailable", on_unavailable)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
            ("rediss://user:s3cret@host", "rediss://user:***@host"),
            ("redis://s3cret@host", "redis://***@host"),
            (
                "redis+unix:///run/redis.sock?pass=s3cret",
                "redis+unix:///run/redis.sock?***",
            ),
            ("not a url", "not a url"),
            // MongoDB's options may carry secrets too (tlsCertificateKeyFilePassword).
            (
                "mongodb://router:s3cret@db1:27017,db2/app?authSource=admin",
                "mongodb://router:***@db1:27017,db2/app?***",
            ),
            ("mongodb://a:b@c@host/x", "mongodb://a:***@host/x"),
            (
                "mongodb+srv://cluster.example.net",
                "mongodb+srv://cluster.example.net",
            ),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        let split = StoreConfig::Split {
            counters: Box::new(StoreConfig::Redis {
                url: "redis://:s3cret@host:6379".to_owned(),
                namespace: None,
                cluster: None,
                on_unavailable: None,
            }),
            records: Box::new(StoreConfig::Mongodb {
                url: "mongodb://router:s3cret@db:27017/app".to_owned(),
                database: None,
                decisions_retention_days: None,
                audit_retention_days: None,
                on_unavailable: None,
            }),
            on_unavailable: None,
        };
        let shown = format!("{split:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("router:***@db:27017"), "{shown}");
    }

    #[test]
    fn config_parses_each_kind() {
        let memory: StoreConfig = serde_json::from_str(r#"{"kind":"memory"}"#).unwrap();
        assert_eq!(
            memory,
            StoreConfig::Memory {
                requests_kept: None
            }
        );
        let redis: StoreConfig =
            serde_json::from_str(r#"{"kind":"redis","url":"redis://localhost:6379"}"#).unwrap();
        assert_eq!(
            redis,
            StoreConfig::Redis {
                url: "redis://localhost:6379".to_owned(),
                namespace: None,
                cluster: None,
                on_unavailable: None,
            }
        );
        let cluster: StoreConfig = serde_json::from_str(
            r#"{"kind":"redis","url":"redis://a:7000,redis://b:7001","cluster":true}"#,
        )
        .unwrap();
        assert_eq!(
            cluster,
            StoreConfig::Redis {
                url: "redis://a:7000,redis://b:7001".to_owned(),
                namespace: None,
                cluster: Some(true),
                on_unavailable: None,
            }
        );
        let mongodb: StoreConfig =
            serde_json::from_str(r#"{"kind":"mongodb","url":"mongodb://db"}"#).unwrap();
        assert_eq!(
            mongodb,
            StoreConfig::Mongodb {
                url: "mongodb://db".to_owned(),
                database: None,
                decisions_retention_days: None,
                audit_retention_days: None,
                on_unavailable: None,
            }
        );
    }

    #[test]
    fn memory_config_takes_how_many_records_to_keep() {
        let memory: StoreConfig =
            serde_json::from_str(r#"{"kind":"memory","requests_kept":500}"#).unwrap();
        assert_eq!(
            memory,
            StoreConfig::Memory {
                requests_kept: Some(500)
            }
        );
        let most: StoreConfig =
            serde_json::from_str(r#"{"kind":"memory","requests_kept":1000000}"#).unwrap();
        assert_eq!(most.requests_kept(), Some(1_000_000));
        for wrong in ["-1", "1000001", "4294967296", r#""many""#, "1.5"] {
            let json = format!(r#"{{"kind":"memory","requests_kept":{wrong}}}"#);
            let err = serde_json::from_str::<StoreConfig>(&json).unwrap_err();
            assert!(
                err.to_string()
                    .contains("expected requests_kept: a whole number from 0 to 1000000"),
                "{wrong}: {err}"
            );
        }
        // Only the memory store keeps a bounded log in process.
        let err = serde_json::from_str::<StoreConfig>(
            r#"{"kind":"redis","url":"redis://localhost:6379","requests_kept":5}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `requests_kept`"),
            "{err}"
        );
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let res = serde_json::from_str::<StoreConfig>(r#"{"kind":"redis","url":"x","pool":4}"#);
        assert!(res.is_err());
    }

    #[tokio::test]
    async fn redis_config_reports_why_it_cannot_connect() {
        // Port 1 on loopback: nothing listens there.
        let config = StoreConfig::Redis {
            url: "redis://:hunter2@127.0.0.1:1".to_owned(),
            namespace: None,
            cluster: None,
            on_unavailable: None,
        };
        let err = connect(&config).await.err().unwrap();
        assert_eq!(err.kind, StoreErrorKind::Unavailable);
        if cfg!(feature = "redis") {
            assert!(
                err.message
                    .starts_with("cannot reach redis at redis://:***@127.0.0.1:1"),
                "{}",
                err.message
            );
            assert!(!err.message.contains("hunter2"));
        } else {
            assert_eq!(err.message, "built without the `redis` feature");
        }
    }

    #[tokio::test]
    async fn mongodb_config_reports_why_it_cannot_connect() {
        // Port 1 on loopback: nothing listens there.
        let config = StoreConfig::Mongodb {
            url: "mongodb://router:hunter2@127.0.0.1:1".to_owned(),
            database: Some("apikeyrouter".to_owned()),
            decisions_retention_days: None,
            audit_retention_days: None,
            on_unavailable: None,
        };
        let err = connect(&config).await.err().unwrap();
        assert!(!err.message.contains("hunter2"), "{}", err.message);
        let has_master_key = ["APIKEYROUTER_MASTER_KEY", "APIKEYROUTER_MASTER_KEY_FILE"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
        if !cfg!(feature = "mongodb") {
            assert_eq!(err.kind, StoreErrorKind::Unavailable);
            assert_eq!(err.message, "built without the `mongodb` feature");
        } else if has_master_key {
            assert_eq!(err.kind, StoreErrorKind::Unavailable);
            assert_eq!(
                err.message,
                "mongodb at mongodb://router:***@127.0.0.1:1 is unreachable"
            );
        } else {
            // Checked before the network: the message says how to provide a key.
            assert_eq!(err.kind, StoreErrorKind::Invalid);
            assert!(
                err.message.contains("set APIKEYROUTER_MASTER_KEY"),
                "{}",
                err.message
            );
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_config_opens_a_reachable_store() {
        let store = connect(&StoreConfig::default()).await.unwrap();
        assert_eq!(store.kind(), "memory");
        store.ping().await.unwrap();
    }
}
