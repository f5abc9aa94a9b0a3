//! The audit-sink port: where every routed request's record goes.

use async_trait::async_trait;
use thiserror::Error;

use crate::records::AuditRecord;

/// Recording failed.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The sink cannot take records right now (full buffer, backend down).
    #[error("audit sink unavailable: {0}")]
    Unavailable(String),
    /// The record could not be encoded or written.
    #[error("audit sink failed: {0}")]
    Internal(String),
}

/// Receives one record per routed request, successful or not.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait AuditSink: Send + Sync + 'static {
    /// Records `record`. Implementations should return quickly (buffer and write in
    /// the background); the router awaits this call on every request.
    ///
    /// # Errors
    /// [`AuditError`] when the record could not be accepted; the router logs it and
    /// counts it, and still answers the request.
    async fn record(&self, record: &AuditRecord) -> Result<(), AuditError>;

    /// Waits until every record accepted so far is written: a sink that writes in the
    /// background must not lose what it accepted when the process exits after
    /// shutting down. The default has nothing to wait for.
    ///
    /// # Errors
    /// [`AuditError`] when records accepted since the previous flush were not written.
    async fn flush(&self) -> Result<(), AuditError> {
        Ok(())
    }
}
