//! Delivery of finished requests' records to the audit sink and the request log, off
//! the request path.
//!
//! The router hands each record over without waiting, to a worker on the handing
//! thread's own runtime (its lane): one worker serving every thread cost the others an
//! `eventfd` write and a cross-core wake-up per request (measured in session 14), while
//! a worker on the same thread is only queued, and runs once the request's task yields
//! (after its response is written). Each lane delivers its records in order, retrying a
//! destination that is down with backoff until it is back. Its queue is bounded: when
//! it is full the record is dropped, logged as an error and counted, never silently.
//! Look-ups first wait for the records handed over before them
//! ([`RecordDelivery::settled`]), so a caller reads its own writes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use apikeyrouter_domain::RequestId;

use super::ids::IdGenerator;
use crate::ports::{AuditError, AuditSink, StateStore, StoreErrorKind};
use crate::records::AuditRecord;

/// Records held per handing thread while the destinations are slow or down, by default.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Records taken from the queue per wake-up of a lane's worker; while they are
/// delivered the queue has room for `capacity` more.
const BATCH: usize = 256;

/// Counters of the record delivery, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Handed over and not yet delivered.
    pub pending: u64,
    /// Delivered to every destination.
    pub delivered: u64,
    /// Refused because the queue was full, or lost with a runtime that ended.
    pub dropped: u64,
    /// Refused by a destination as malformed (not retried).
    pub rejected: u64,
    /// Delivery attempts that failed and were retried.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
}

/// One thread's queue, and how far its worker has got through it.
struct Lane {
    /// Records travel as `Arc`s: moved by value, a record (about 500 bytes) was
    /// copied into the queue, out of it and into the `Arc` shared with the request log.
    tx: mpsc::Sender<Arc<AuditRecord>>,
    /// Records handed to this lane, in its queue's order: `settled` waits on these
    /// only, so a record dropped later cannot make an earlier queued one look
    /// delivered.
    queued: AtomicU64,
    /// How many queued records the worker has finished (delivered or rejected).
    finished: Arc<watch::Sender<u64>>,
    /// Its thread has ended: once drained, the lane can go.
    orphaned: AtomicBool,
}

impl Lane {
    /// Queues `record`; a lane its thread does not keep is orphaned once the record
    /// is counted, so that it is not let go before.
    fn send(
        &self,
        kept: bool,
        record: Arc<AuditRecord>,
    ) -> Result<(), mpsc::error::TrySendError<Arc<AuditRecord>>> {
        self.tx.try_send(record)?;
        // The worker may finish it before this count: `settled` only needs `finished`
        // to reach it eventually.
        self.queued.fetch_add(1, Ordering::Relaxed);
        if !kept {
            self.orphaned.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn pending(&self) -> u64 {
        self.queued
            .load(Ordering::Relaxed)
            .saturating_sub(*self.finished.borrow())
    }
}

/// Tells deliveries (one per router) apart in the threads' lane caches.
static NEXT_DELIVERY: AtomicU64 = AtomicU64::new(0);

/// A thread's lanes, by delivery. Weak: a router's lanes, and with them their
/// workers, end when the router is dropped.
struct ThreadLanes(Vec<(u64, Weak<Lane>)>);

impl Drop for ThreadLanes {
    /// A thread that ends (a blocking-pool thread, say) leaves its lanes to be closed
    /// once drained, so they do not pile up.
    fn drop(&mut self) {
        for lane in self.0.iter().filter_map(|(_, lane)| lane.upgrade()) {
            lane.orphaned.store(true, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static LANES: RefCell<ThreadLanes> = const { RefCell::new(ThreadLanes(Vec::new())) };
}

/// The lanes and what their workers share; a lane and its worker start with the
/// first record a thread hands over, inside that thread's runtime, and end once the
/// router is dropped and the lane's queue drained.
pub(crate) struct RecordDelivery {
    id: u64,
    sink: Arc<dyn AuditSink>,
    store: Arc<dyn StateStore>,
    capacity: usize,
    lanes: Mutex<Vec<Arc<Lane>>>,
    counters: Arc<Counters>,
    /// Free ids for records whose own id is taken in the request log.
    ids: Arc<IdGenerator>,
}

impl RecordDelivery {
    pub(crate) fn with_capacity(
        sink: Arc<dyn AuditSink>,
        store: Arc<dyn StateStore>,
        capacity: usize,
    ) -> Self {
        Self {
            id: NEXT_DELIVERY.fetch_add(1, Ordering::Relaxed),
            sink,
            store,
            capacity: capacity.max(1),
            lanes: Mutex::default(),
            counters: Arc::default(),
            ids: Arc::new(IdGenerator::new()),
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Lane>>> {
        // The list stays whole whatever a panicking holder did.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This thread's lane, if it opened one.
    fn cached_lane(&self) -> Option<Arc<Lane>> {
        // `try_with`: a record may be handed over while the thread's locals are torn
        // down (a request dropped by another local's destructor).
        LANES
            .try_with(|lanes| {
                lanes
                    .borrow()
                    .0
                    .iter()
                    .find(|(id, _)| *id == self.id)
                    .and_then(|(_, lane)| lane.upgrade())
            })
            .ok()
            .flatten()
    }

    /// A new lane and its worker on the current runtime, and whether the thread keeps
    /// it (not when its locals are being torn down: then the lane serves one record
    /// and is orphaned); `None` outside a runtime.
    fn open_lane(&self) -> Option<(Arc<Lane>, bool)> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::channel(self.capacity);
        let lane = Arc::new(Lane {
            tx,
            queued: AtomicU64::new(0),
            finished: Arc::new(watch::Sender::new(0)),
            orphaned: AtomicBool::new(false),
        });
        handle.spawn(run(
            rx,
            self.sink.clone(),
            self.store.clone(),
            self.counters.clone(),
            lane.finished.clone(),
            self.ids.clone(),
        ));
        {
            let mut lanes = self.lanes();
            // Dropping a drained orphan's sender ends its worker.
            lanes.retain(|l| !(l.orphaned.load(Ordering::Relaxed) && l.pending() == 0));
            lanes.push(lane.clone());
        }
        let kept = LANES
            .try_with(|lanes| {
                let lanes = &mut lanes.borrow_mut().0;
                // Forget the lanes of routers dropped since.
                lanes.retain(|(id, lane)| *id != self.id && lane.strong_count() > 0);
                lanes.push((self.id, Arc::downgrade(&lane)));
            })
            .is_ok();
        Some((lane, kept))
    }

    fn drop_record(&self, record: &AuditRecord, why: &str) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(request_id = %record.request_id, capacity = self.capacity, "audit record dropped: {why}");
    }

    /// Takes `lane`, whose worker has stopped with its runtime, out of service: the
    /// records it still held are lost, and counted as dropped.
    fn retire(&self, lane: &Arc<Lane>) {
        {
            let mut lanes = self.lanes();
            let before = lanes.len();
            lanes.retain(|l| !Arc::ptr_eq(l, lane));
            if lanes.len() == before {
                return; // retired already
            }
        }
        let lost = lane.pending();
        if lost > 0 {
            self.counters.dropped.fetch_add(lost, Ordering::Relaxed);
            tracing::error!(
                records = lost,
                "audit records dropped: the runtime delivering them has ended"
            );
        }
    }

    /// Queues `record` for delivery without waiting.
    pub(crate) fn submit(&self, record: AuditRecord) {
        const NO_RUNTIME: &str = "no async runtime to deliver it";
        const FULL: &str = "the delivery queue is full (destinations down or too slow)";
        const ENDING: &str = "the runtime is shutting down";
        let record = Arc::new(record);
        let (lane, kept, opened) = match self.cached_lane() {
            Some(lane) => (lane, true, false),
            None => match self.open_lane() {
                Some((lane, kept)) => (lane, kept, true),
                None => return self.drop_record(&record, NO_RUNTIME),
            },
        };
        let record = match lane.send(kept, record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(r)) => return self.drop_record(&r, FULL),
            Err(mpsc::error::TrySendError::Closed(r)) => r,
        };
        // The lane's worker has ended with its runtime.
        self.retire(&lane);
        if opened {
            // Its worker was cancelled as it was spawned: the runtime is shutting down.
            return self.drop_record(&record, ENDING);
        }
        // Another runtime may run on this thread now: one new lane on it, and no more
        // (a runtime shutting down cancels each new worker at once).
        let Some((lane, kept)) = self.open_lane() else {
            return self.drop_record(&record, NO_RUNTIME);
        };
        if let Err(e) = lane.send(kept, record) {
            self.retire(&lane);
            self.drop_record(&e.into_inner(), ENDING);
        }
    }

    /// Waits until every record handed over before this call is finished, or until
    /// `timeout`; returns whether they all were.
    pub(crate) async fn settled(&self, timeout: Duration) -> bool {
        let lanes = self.lanes().clone();
        let mut waits = Vec::with_capacity(lanes.len());
        for lane in lanes {
            if lane.tx.is_closed() {
                // Its worker ended with its runtime: nothing more will finish there.
                self.retire(&lane);
            } else {
                waits.push((
                    lane.queued.load(Ordering::Relaxed),
                    lane.finished.subscribe(),
                ));
            }
        }
        let all = async {
            for (target, mut rx) in waits {
                if rx.wait_for(|n| *n >= target).await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }

    /// [`Self::settled`], then the sink's own [`AuditSink::flush`], both within
    /// `timeout`: what shutdown waits for.
    pub(crate) async fn flushed(&self, timeout: Duration) -> bool {
        let by = tokio::time::Instant::now() + timeout;
        if !self.settled(timeout).await {
            return false;
        }
        match tokio::time::timeout_at(by, self.sink.flush()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit sink not flushed at shutdown");
                false
            }
            Err(_) => false,
        }
    }

    pub(crate) fn stats(&self) -> DeliveryStats {
        let c = &self.counters;
        DeliveryStats {
            pending: self.lanes().iter().map(|lane| lane.pending()).sum(),
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }
}

/// A lane's worker: delivers records until the lane is gone. It does not yield
/// between batches: on a multi-threaded runtime a yield hands the task to the
/// scheduler's shared queue, which wakes an idle worker thread each time (measured:
/// 5.0 → 4.5 context switches and about 250 → 218 µs of CPU per request at one
/// connection). When the queue is empty the task waits, and a sender wakes it.
async fn run(
    mut rx: mpsc::Receiver<Arc<AuditRecord>>,
    sink: Arc<dyn AuditSink>,
    store: Arc<dyn StateStore>,
    counters: Arc<Counters>,
    finished: Arc<watch::Sender<u64>>,
    ids: Arc<IdGenerator>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for record in batch.drain(..) {
            // The request log first: it may move the record to a free id, which the
            // audit trail must then carry too.
            let (record, logged) = log_request(&counters, &*store, &ids, record).await;
            let audited = deliver(
                &counters,
                &record,
                "audit sink",
                || sink.record(&record),
                |e| matches!(e, AuditError::Unavailable(_)),
            )
            .await
            .is_some();
            if audited && logged {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
            }
            // Per record, so a look-up waits only for the records queued before it.
            finished.send_modify(|n| *n += 1);
        }
    }
}

/// Saves `record` in the request log under its id or, when another request's record
/// holds that id (a client sent an `x-request-id` already used), under
/// `{id}~{fresh id}`: no record replaces another, and one probe suffices however often
/// an id is reused. Returns the record as saved and whether it was.
async fn log_request(
    counters: &Counters,
    store: &dyn StateStore,
    ids: &IdGenerator,
    record: Arc<AuditRecord>,
) -> (Arc<AuditRecord>, bool) {
    let mut saving = record.clone();
    // A fresh id is free unless someone chose it on purpose: a few tries suffice.
    for _ in 0..4 {
        let saved = deliver(
            counters,
            &saving,
            "request log",
            || store.save_request(saving.clone()),
            |e| e.kind == StoreErrorKind::Unavailable,
        )
        .await;
        match saved {
            Some(true) => return (saving, true),
            Some(false) => {
                let mut moved = (*record).clone();
                moved.request_id =
                    RequestId::new(format!("{}~{}", record.request_id, ids.request_id()));
                tracing::warn!(request_id = %record.request_id, saved_as = %moved.request_id, "request id already taken; record saved under another");
                saving = Arc::new(moved);
            }
            None => return (saving, false),
        }
    }
    tracing::error!(request_id = %record.request_id, "record refused: no free request id found");
    (saving, false)
}

/// Delivers to one destination, retrying while it is unavailable; returns its answer,
/// or `None` when it refused the record for good.
async fn deliver<T, F, Fut, E>(
    counters: &Counters,
    record: &AuditRecord,
    destination: &str,
    mut send: F,
    retryable: impl Fn(&E) -> bool,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = FIRST_BACKOFF;
    loop {
        match send().await {
            Ok(answer) => return Some(answer),
            Err(e) if retryable(&e) => {
                if counters.retries.fetch_add(1, Ordering::Relaxed) % 100 == 0 {
                    tracing::warn!(request_id = %record.request_id, destination, error = %e, "record delivery failed; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => {
                tracing::error!(request_id = %record.request_id, destination, error = %e, "record refused");
                return None;
            }
        }
    }
}
