//! The MongoDB store's schema: its version, the forward migrations that reach it, the
//! indexes and the retention (TTL) indexes.
//!
//! Run at every connect, and safe when several instances connect at once: every
//! migration step is idempotent (creating an index that exists is a no-op), and the
//! version only moves forward. A database whose version is newer than this build's
//! is refused rather than written with an older shape.
//!
//! Retention is configuration, not schema: the TTL indexes are compared with it at
//! each connect and replaced (dropped and created again) when they differ, because
//! not every server supports changing `expireAfterSeconds` in place.

use std::time::Duration;

use apikeyrouter_application::ports::{StoreError, StoreErrorKind};
use futures_util::TryStreamExt as _;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};

use super::documents::{
    AUDIT, META, REQUESTS, SCHEMA_VERSION_ID, SchemaVersionDoc, TRANSITIONS, record_id,
};
use super::{Retention, map_err, now_date};

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Name of the index over a key's transitions in time order.
pub(super) const TRANSITIONS_BY_KEY: &str = "key_id_at";
/// Name of the unique index on request ids (in `requests` and `audit`).
pub(super) const REQUEST_ID_UNIQUE: &str = "request_id_unique";
/// Name of the TTL index on `finished_at` (in `requests` and `audit`).
pub(super) const FINISHED_AT_TTL: &str = "finished_at_ttl";

/// Brings the database to [`SCHEMA_VERSION`] and the TTL indexes to `retention`.
///
/// # Errors
/// `Invalid` when the database is newer than this build or its version document is
/// malformed; `Unavailable` and others from the server.
pub(super) async fn migrate(db: &Database, retention: &Retention) -> Result<(), StoreError> {
    let meta: Collection<Document> = db.collection(META);
    let found = read_version(&meta).await?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::new(
            StoreErrorKind::Invalid,
            format!(
                "mongodb database {} has schema version {found}, newer than this build's \
                 {SCHEMA_VERSION}: upgrade apikeyrouter",
                db.name()
            ),
        ));
    }
    for version in (found + 1)..=SCHEMA_VERSION {
        apply(db, version).await?;
        record_version(&meta, version).await?;
    }
    ensure_ttl(db, REQUESTS, retention.decisions_days).await?;
    ensure_ttl(db, AUDIT, retention.audit_days).await
}

/// The recorded version; 0 for a database never migrated.
pub(super) async fn read_version(meta: &Collection<Document>) -> Result<i64, StoreError> {
    let Some(raw) = meta
        .find_one(doc! { "_id": SCHEMA_VERSION_ID })
        .await
        .map_err(|e| map_err(META, "read the schema version", e))?
    else {
        return Ok(0);
    };
    let parsed: SchemaVersionDoc = mongodb::bson::from_document(raw.clone()).map_err(|_| {
        StoreError::new(
            StoreErrorKind::Invalid,
            format!("mongodb {META}: record {} is malformed", record_id(&raw)),
        )
    })?;
    Ok(parsed.version)
}

/// One forward migration step, to `version`.
async fn apply(db: &Database, version: i64) -> Result<(), StoreError> {
    match version {
        // Version 1: the collections' indexes. Collections themselves are created on
        // first write.
        1 => {
            create_index(
                db,
                TRANSITIONS,
                doc! { "key_id": 1, "at": 1 },
                IndexOptions::builder()
                    .name(TRANSITIONS_BY_KEY.to_owned())
                    .build(),
            )
            .await?;
            for collection in [REQUESTS, AUDIT] {
                create_index(
                    db,
                    collection,
                    doc! { "request_id": 1 },
                    IndexOptions::builder()
                        .name(REQUEST_ID_UNIQUE.to_owned())
                        .unique(true)
                        .build(),
                )
                .await?;
            }
            Ok(())
        }
        // Later versions add arms here; a gap is a bug in this file.
        _ => Err(StoreError::new(
            StoreErrorKind::Internal,
            format!("no migration to schema version {version}"),
        )),
    }
}

/// Moves the recorded version forward to `version` (never back, even if another
/// instance got further meanwhile).
async fn record_version(meta: &Collection<Document>, version: i64) -> Result<(), StoreError> {
    let res = meta
        .update_one(
            doc! { "_id": SCHEMA_VERSION_ID, "version": { "$lt": version } },
            doc! { "$set": { "version": version, "updated_at": now_date() } },
        )
        .await
        .map_err(|e| map_err(META, "record the schema version", e))?;
    if res.matched_count > 0 {
        return Ok(());
    }
    let fresh = doc! { "_id": SCHEMA_VERSION_ID, "version": version, "updated_at": now_date() };
    match meta.insert_one(fresh).await {
        Ok(_) => Ok(()),
        // Another instance recorded it first, at this version or a later one.
        Err(e) if super::is_duplicate_key(&e) => Ok(()),
        Err(e) => Err(map_err(META, "record the schema version", e)),
    }
}

async fn create_index(
    db: &Database,
    collection: &str,
    keys: Document,
    options: IndexOptions,
) -> Result<(), StoreError> {
    let coll: Collection<Document> = db.collection(collection);
    let model = IndexModel::builder().keys(keys).options(options).build();
    coll.create_index(model)
        .await
        .map_err(|e| map_err(collection, "create an index", e))?;
    Ok(())
}

/// An index as the server lists it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct IndexInfo {
    /// Its name (servers may decorate the name they were given).
    pub name: String,
    /// Its key pattern.
    pub keys: Document,
    /// Whether it is unique.
    pub unique: bool,
    /// Its TTL, if any.
    pub expire_after: Option<Duration>,
}

/// The indexes of `collection`; none for a collection that does not exist.
pub(super) async fn list_indexes(
    db: &Database,
    collection: &str,
) -> Result<Vec<IndexInfo>, StoreError> {
    let coll: Collection<Document> = db.collection(collection);
    let cursor = match coll.list_indexes().await {
        Ok(cursor) => cursor,
        // A collection dropped since it was migrated has no indexes.
        Err(e) if super::is_namespace_missing(&e) => return Ok(Vec::new()),
        Err(e) => return Err(map_err(collection, "list indexes", e)),
    };
    let models: Vec<IndexModel> = cursor
        .try_collect()
        .await
        .map_err(|e| map_err(collection, "list indexes", e))?;
    Ok(models
        .into_iter()
        .map(|m| {
            let options = m.options.unwrap_or_default();
            IndexInfo {
                name: options.name.unwrap_or_default(),
                keys: m.keys,
                unique: options.unique.unwrap_or(false),
                expire_after: options.expire_after,
            }
        })
        .collect())
}

/// Makes the TTL index on `finished_at` match `days` (`None`: no expiry). Indexes
/// are recognised by their key pattern, not their name, since some servers rename
/// the indexes they create.
async fn ensure_ttl(db: &Database, collection: &str, days: Option<u32>) -> Result<(), StoreError> {
    let wanted = days.map(|d| Duration::from_secs(u64::from(d) * 86_400));
    let existing = list_indexes(db, collection)
        .await?
        .into_iter()
        .find(|index| same_keys(&index.keys, &doc! { "finished_at": 1 }));
    if let Some(index) = &existing {
        if index.expire_after == wanted {
            return Ok(());
        }
        let coll: Collection<Document> = db.collection(collection);
        coll.drop_index(index.name.as_str())
            .await
            .map_err(|e| map_err(collection, "replace the retention index", e))?;
    }
    let Some(expire_after) = wanted else {
        return Ok(());
    };
    create_index(
        db,
        collection,
        doc! { "finished_at": 1 },
        IndexOptions::builder()
            .name(FINISHED_AT_TTL.to_owned())
            .expire_after(expire_after)
            .build(),
    )
    .await
}

/// Whether two key patterns name the same fields in the same order and directions,
/// whatever number types the server returned them in.
pub(super) fn same_keys(listed: &Document, wanted: &Document) -> bool {
    let direction = |b: &Bson| match b {
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(n) => Some(*n),
        _ => None,
    };
    listed.len() == wanted.len()
        && listed
            .iter()
            .zip(wanted.iter())
            .all(|((ka, va), (kb, vb))| {
                ka == kb && direction(va).is_some() && direction(va) == direction(vb)
            })
}
