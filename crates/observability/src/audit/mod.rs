//! Audit sinks: implementations of the [`AuditSink`] port.
//!
//! - [`JsonLinesAuditSink`]: one JSON object per line to stdout, a file or any writer,
//!   written in the background so recording never blocks a request.
//! - [`MemoryAuditSink`]: keeps records in memory, for tests and for callers who want
//!   to inspect them.
//! - [`DiscardAuditSink`]: accepts and drops everything.
//!
//! Audit records hold no key material and no message content by construction (see
//! [`AuditRecord`]), so sinks write them as they are.

mod jsonl;

#[cfg(test)]
mod tests;

use std::sync::{Mutex, MutexGuard, PoisonError};

use apikeyrouter_application::AuditRecord;
use apikeyrouter_application::ports::{AuditError, AuditSink};
use async_trait::async_trait;

pub use jsonl::JsonLinesAuditSink;

/// A sink that accepts every record and keeps none.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiscardAuditSink;

#[async_trait]
impl AuditSink for DiscardAuditSink {
    async fn record(&self, _record: &AuditRecord) -> Result<(), AuditError> {
        Ok(())
    }
}

/// A sink that keeps every record in memory, in arrival order. It never forgets, so
/// it suits tests and short-lived processes rather than servers.
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemoryAuditSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the records received so far, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.lock().clone()
    }

    /// How many records were received.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no record was received.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forgets every record.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> MutexGuard<'_, Vec<AuditRecord>> {
        // A push either happened or not, so a poisoned list is still consistent.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl AuditSink for MemoryAuditSink {
    async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        self.lock().push(record.clone());
        Ok(())
    }
}
