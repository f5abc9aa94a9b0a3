//! The JSON Lines audit sink: each record serialized as one line, written by a
//! background thread.
//!
//! [`AuditSink::record`] only encodes the record and pushes the line into a bounded
//! channel with `try_send`; it never waits, so a slow disk or a blocked stdout cannot
//! delay a request. When the channel is full the record is refused with
//! [`AuditError::Unavailable`] and the router counts it.
//!
//! The writer is a dedicated OS thread rather than a Tokio task, because writes to
//! stdout and files block: on a Tokio worker they would stall every request scheduled
//! on it. It drains the channel into a `BufWriter` and flushes whenever the channel is
//! momentarily empty, so lines reach the output promptly under light load and in
//! large writes under heavy load.
//!
//! Invariant: lines are written in the order `record` accepted them.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use apikeyrouter_application::AuditRecord;
use apikeyrouter_application::ports::{AuditError, AuditSink};
use async_trait::async_trait;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// What the writer thread is asked to do.
enum Command {
    /// Write this line (without its newline).
    Line(String),
    /// Flush, then answer with the first write error since the previous flush, if any.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// An [`AuditSink`] writing one JSON object per line to stdout, a file or any writer,
/// from a background thread.
///
/// [`record`](AuditSink::record) only encodes the record and queues the line with
/// `try_send`, so it never waits; when the queue is full it refuses the record with
/// [`AuditError::Unavailable`]. The writer is a dedicated OS thread (writes to stdout
/// and files block, and would stall a Tokio worker), which flushes whenever the queue
/// is momentarily empty.
///
/// The constructors spawn the writer thread; they need no async runtime, and
/// [`record`](AuditSink::record) and [`flush`](Self::flush) work on any executor.
/// The thread ends once the sink is dropped and the lines already queued are written.
/// Lines still queued when the process exits are lost: call [`flush`](Self::flush)
/// during shutdown.
pub struct JsonLinesAuditSink {
    sender: mpsc::Sender<Command>,
    capacity: usize,
}

impl fmt::Debug for JsonLinesAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLinesAuditSink")
            .field("capacity", &self.capacity)
            .field(
                "queued",
                &self.capacity.saturating_sub(self.sender.capacity()),
            )
            .finish()
    }
}

impl JsonLinesAuditSink {
    /// Lines that may wait for the writer before records are refused.
    pub const DEFAULT_CAPACITY: usize = 10_000;

    /// A sink writing to the process's stdout.
    ///
    /// # Errors
    /// When the writer thread cannot be spawned.
    pub fn stdout() -> io::Result<Self> {
        Self::to_writer(io::stdout())
    }

    /// A sink appending to the file at `path`, created if missing.
    ///
    /// # Errors
    /// When the file cannot be opened for appending or the writer thread cannot be
    /// spawned.
    pub fn file(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Self::to_writer(file)
    }

    /// A sink writing to `writer`, with the default capacity.
    ///
    /// # Errors
    /// When the writer thread cannot be spawned.
    pub fn to_writer<W: Write + Send + 'static>(writer: W) -> io::Result<Self> {
        Self::with_capacity(writer, Self::DEFAULT_CAPACITY)
    }

    /// A sink writing to `writer` that queues at most `capacity` lines (at least one)
    /// before refusing records.
    ///
    /// # Errors
    /// When the writer thread cannot be spawned.
    pub fn with_capacity<W: Write + Send + 'static>(
        writer: W,
        capacity: usize,
    ) -> io::Result<Self> {
        let capacity = capacity.max(1);
        let (sender, receiver) = mpsc::channel(capacity);
        std::thread::Builder::new()
            .name("audit-jsonl-writer".to_owned())
            .spawn(move || write_lines(receiver, writer))?;
        Ok(Self { sender, capacity })
    }
}

#[async_trait]
impl AuditSink for JsonLinesAuditSink {
    async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let line = serde_json::to_string(record)
            .map_err(|e| AuditError::Internal(format!("cannot encode audit record: {e}")))?;
        self.sender
            .try_send(Command::Line(line))
            .map_err(|e| match e {
                TrySendError::Full(_) => AuditError::Unavailable("audit buffer full".to_owned()),
                TrySendError::Closed(_) => writer_stopped(),
            })
    }

    /// Waits until every line accepted before this call is written and the writer
    /// flushed.
    ///
    /// # Errors
    /// [`AuditError::Internal`] when a write or the flush failed since the previous
    /// flush (those lines may be lost), [`AuditError::Unavailable`] when the writer
    /// thread has stopped.
    async fn flush(&self) -> Result<(), AuditError> {
        let (ack, acked) = oneshot::channel();
        // Unlike `record`, this waits for room in the queue: the caller asked to wait.
        self.sender
            .send(Command::Flush(ack))
            .await
            .map_err(|_| writer_stopped())?;
        acked
            .await
            .map_err(|_| writer_stopped())?
            .map_err(AuditError::Internal)
    }
}

fn writer_stopped() -> AuditError {
    AuditError::Unavailable("audit writer stopped".to_owned())
}

/// The writer thread: drains `receiver` into `writer` until every sender is gone.
fn write_lines<W: Write>(mut receiver: mpsc::Receiver<Command>, writer: W) {
    let mut out = BufWriter::new(writer);
    // The first write error since the last flush command, reported by the next one.
    let mut error: Option<String> = None;
    while let Some(command) = receiver.blocking_recv() {
        handle(command, &mut out, &mut error);
        while let Ok(command) = receiver.try_recv() {
            handle(command, &mut out, &mut error);
        }
        // The queue is momentarily empty: push what we have to the output.
        if let Err(e) = out.flush() {
            note_error(&mut error, &e);
        }
    }
}

fn handle<W: Write>(command: Command, out: &mut BufWriter<W>, error: &mut Option<String>) {
    match command {
        Command::Line(mut line) => {
            line.push('\n');
            if let Err(e) = out.write_all(line.as_bytes()) {
                note_error(error, &e);
            }
        }
        Command::Flush(ack) => {
            if let Err(e) = out.flush() {
                note_error(error, &e);
            }
            let res = match error.take() {
                Some(message) => Err(message),
                None => Ok(()),
            };
            // The caller may have stopped waiting; nothing to do then.
            let _ = ack.send(res);
        }
    }
}

fn note_error(error: &mut Option<String>, e: &io::Error) {
    tracing::warn!(error = %e, "audit line write failed");
    error.get_or_insert_with(|| format!("audit write failed: {e}"));
}
