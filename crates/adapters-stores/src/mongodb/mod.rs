//! The MongoDB store (feature `mongodb`): durable keys with their material sealed by
//! a [`SecretCipher`](apikeyrouter_application::ports::SecretCipher), state
//! transitions, budgets, quota windows, the request log and the audit trail, with
//! indexes, retention and a versioned schema.
//!
//! # Consistency without transactions
//!
//! Every change is one atomic single-document update whose filter states the
//! precondition (a window's start and headroom, a budget's headroom, a key's state
//! version); no multi-document transaction and no change stream is needed, so the
//! store runs on any server speaking the wire protocol, including replica-set-less
//! deployments. Filters use plain field conditions only (no `$expr`, no top-level
//! `$or`), the subset every compatible server evaluates alike.
//!
//! A charge ([`UsageLedger::reserve`](apikeyrouter_application::ports::UsageLedger::reserve))
//! spans the key's document and one document per budget, so it is a saga in a fixed
//! order:
//! 1. read the key and check its quota windows locally (a refusal writes nothing);
//! 2. reserve in each budget, in ascending id order, with a conditional update that
//!    only matches while `headroom >= amount` for a hard budget;
//! 3. count the request in the key's windows with a conditional update that only
//!    matches while every limited window has room;
//! 4. if a later step is refused or fails, give back what the earlier steps took.
//!
//! What this leaves: between step 2 and a compensation in step 4, the budgets hold
//! money for a charge that will not happen, so a concurrent charge may be refused
//! although it would have fitted (a spurious refusal, bounded by the duration of one
//! `reserve` call). A hard budget is never exceeded: every reservation is checked
//! against the headroom left by all the others at the moment it is taken. If the
//! server becomes unreachable during step 4, a reservation can stay held until the
//! budget is replaced with `put_budget` (reservations carry `taken_at` to find them);
//! again this can only refuse, never overspend.
//!
//! Counters that are not plain sums (the success and latency moving averages) are
//! updated by compare-and-set after the counters; under extreme contention a
//! sample may be dropped from the averages (never from the counters).
//!
//! Depends on the domain and application crates and the official `mongodb` driver;
//! driver types never leave this module.

mod documents;
mod schema;
mod store;

pub use schema::SCHEMA_VERSION;
pub use store::MongoStore;

use apikeyrouter_application::ports::{StoreError, StoreErrorKind};
use mongodb::bson::DateTime;
use mongodb::error::{ErrorKind, WriteFailure};

/// Database used when neither the configuration nor the URL names one.
pub const DEFAULT_DATABASE: &str = "apikeyrouter";

/// How long records are kept before the server expires them (`None`: forever).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Request records in `requests` (routing decisions, attempts, outcome), looked
    /// up by request id.
    pub decisions_days: Option<u32>,
    /// The audit trail in `audit`.
    pub audit_days: Option<u32>,
}

impl Default for Retention {
    /// Decisions for 30 days, the audit trail for 365.
    fn default() -> Self {
        Self {
            decisions_days: Some(30),
            audit_days: Some(365),
        }
    }
}

/// The database named in the URL's path (`mongodb://host/<db>?...`), if any.
pub fn database_from_url(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let (_, path) = rest.split_once('/')?;
    let name = path.split('?').next().unwrap_or_default();
    (!name.is_empty()).then(|| name.to_owned())
}

fn now_date() -> DateTime {
    DateTime::now()
}

/// Whether the server refused a write as a duplicate of a unique key.
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    const DUPLICATE_KEY: i32 = 11000;
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(we)) => we.code == DUPLICATE_KEY,
        ErrorKind::Command(ce) => ce.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(im) => im
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().any(|we| we.code == DUPLICATE_KEY)),
        _ => false,
    }
}

/// Whether the server reported a missing collection.
fn is_namespace_missing(e: &mongodb::error::Error) -> bool {
    const NAMESPACE_NOT_FOUND: i32 = 26;
    matches!(e.kind.as_ref(), ErrorKind::Command(ce) if ce.code == NAMESPACE_NOT_FOUND)
}

/// Translates a driver error at the seam: the message names the collection and what
/// was being done; the driver's error (which names hosts, never credentials) is kept
/// as the source.
fn map_err(collection: &str, doing: &str, e: mongodb::error::Error) -> StoreError {
    let kind = match e.kind.as_ref() {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Authentication { .. }
        | ErrorKind::Shutdown => StoreErrorKind::Unavailable,
        _ if is_duplicate_key(&e) => StoreErrorKind::Conflict,
        ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonDeserialization(_)
        | ErrorKind::BsonSerialization(_) => StoreErrorKind::Invalid,
        _ if e.contains_label("RetryableWriteError") => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Internal,
    };
    let what = match kind {
        StoreErrorKind::Unavailable => "server unavailable",
        StoreErrorKind::Conflict => "duplicate key",
        _ => "server error",
    };
    StoreError::new(
        kind,
        format!("mongodb {collection}: cannot {doing}: {what}"),
    )
    .with_source(e)
}

/// `Invalid` for a stored document this build cannot read.
fn malformed(collection: &str, id: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Invalid,
        format!("mongodb {collection}: record {id} is malformed"),
    )
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn database_is_read_from_the_url_path() {
        assert_eq!(
            database_from_url("mongodb://u:p@h:1/routerdb?w=1").as_deref(),
            Some("routerdb")
        );
        assert_eq!(database_from_url("mongodb://h:1/?w=1"), None);
        assert_eq!(database_from_url("mongodb://h:1"), None);
    }
}
