//! Audit records are delivered in the background: a sink that is down delays them but
//! loses none, and a full queue drops records loudly (counted), never silently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apikeyrouter::{AuditRecord, AuditSink, KeyMetadata, Objective, RequestId};
use apikeyrouter_application::ports::AuditError;
use async_trait::async_trait;

use crate::support::{Harness, ask};

/// A sink that refuses records as unavailable while `down`.
#[derive(Default)]
struct FlakySink {
    down: AtomicBool,
    received: Mutex<Vec<RequestId>>,
}

#[async_trait]
impl AuditSink for FlakySink {
    async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(AuditError::Unavailable("sink is down".to_owned()));
        }
        self.received
            .lock()
            .unwrap()
            .push(record.request_id.clone());
        Ok(())
    }
}

async fn harness(sink: Arc<FlakySink>, queue: usize) -> Harness {
    let h = Harness::new(|b| b.audit(sink).audit_queue(queue)).await;
    h.provider("openai");
    h.key("openai", 0, KeyMetadata::default()).await;
    h
}

async fn route_n(h: &Harness, n: usize) -> Vec<RequestId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = h
            .router
            .route(ask("gpt-4o-mini", &format!("q{i}")), Objective::default())
            .await
            .expect("served while the sink is down");
        ids.push(r.request_id);
    }
    ids
}

#[tokio::test]
async fn records_wait_for_a_sink_that_is_down_and_arrive_once_in_order() {
    let sink = Arc::new(FlakySink::default());
    sink.down.store(true, Ordering::SeqCst);
    let h = harness(sink.clone(), 100).await;
    let ids = route_n(&h, 20).await;

    assert!(!h.router.flush_records(Duration::from_millis(300)).await);
    let stats = h.router.record_delivery();
    assert_eq!(stats.pending, 20);
    assert_eq!(stats.delivered, 0);
    assert_eq!(stats.dropped, 0);
    assert!(stats.retries >= 1, "{stats:?}");
    assert!(sink.received.lock().unwrap().is_empty());

    sink.down.store(false, Ordering::SeqCst);
    assert!(h.router.flush_records(Duration::from_secs(10)).await);
    assert_eq!(*sink.received.lock().unwrap(), ids);
    let stats = h.router.record_delivery();
    assert_eq!((stats.pending, stats.delivered, stats.dropped), (0, 20, 0));
    // The request log got them too.
    for id in &ids {
        assert!(h.router.request(id).await.unwrap().is_some(), "{id}");
    }
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_the_overflow() {
    let sink = Arc::new(FlakySink::default());
    sink.down.store(true, Ordering::SeqCst);
    let h = harness(sink.clone(), 3).await;
    // Three wait in the queue, plus the batch (up to three here) the delivery task
    // may already hold and retry; the rest overflow.
    let ids = route_n(&h, 8).await;
    let stats = h.router.record_delivery();
    assert!((3..=6).contains(&stats.pending), "{stats:?}");
    assert_eq!(stats.dropped, 8 - stats.pending, "{stats:?}");
    let kept = usize::try_from(stats.pending).unwrap();

    sink.down.store(false, Ordering::SeqCst);
    assert!(h.router.flush_records(Duration::from_secs(10)).await);
    assert_eq!(*sink.received.lock().unwrap(), ids[..kept].to_vec());
    let stats = h.router.record_delivery();
    assert_eq!(stats.pending, 0);
    assert_eq!(stats.delivered + stats.dropped, 8);
}

#[tokio::test]
async fn lookups_see_the_request_just_made() {
    let h = harness(Arc::new(FlakySink::default()), 100).await;
    for id in route_n(&h, 50).await {
        let record = h.router.request(&id).await.unwrap().expect("record kept");
        assert_eq!(record.request_id, id);
    }
}

/// Request ids can come from clients (`x-request-id`), and two requests may carry the
/// same one: the first keeps it in the request log, each later one is saved under
/// `{id}~{fresh id}`, and the audit trail carries the id each record was saved under.
/// No record replaces another.
#[tokio::test]
async fn a_reused_request_id_never_replaces_the_first_record() {
    let sink = Arc::new(FlakySink::default());
    let h = harness(sink.clone(), 100).await;
    let objective = Objective::default();
    let questions = ["first", "second", "third"];
    for question in questions {
        let ctx = apikeyrouter::RequestContext {
            request_id: Some(RequestId::new("client-id-1")),
            ..apikeyrouter::RequestContext::default()
        };
        let r = h
            .router
            .route_with(
                ask("gpt-4o-mini", question).with_tag("question", question),
                &objective,
                ctx,
            )
            .await
            .expect("served");
        assert_eq!(r.request_id.as_str(), "client-id-1");
    }
    assert!(h.router.flush_records(Duration::from_secs(5)).await);
    let received = sink.received.lock().unwrap().clone();
    assert_eq!(received.len(), 3, "{received:?}");
    assert_eq!(received[0].as_str(), "client-id-1");
    for moved in &received[1..] {
        assert!(
            moved.as_str().starts_with("client-id-1~req_"),
            "{received:?}"
        );
    }
    assert_ne!(received[1], received[2]);
    // Each id finds its own request's record: the first is not replaced.
    for (id, question) in received.iter().zip(questions) {
        let record = h.router.request(id).await.unwrap().expect("kept");
        assert_eq!(&record.request_id, id);
        assert_eq!(record.tags["question"], question, "{id}");
    }
}

/// Routes `n` requests on a thread of its own with its own single-threaded runtime,
/// as the proxy's serving threads do; the runtime stays up (its lane delivering) until
/// `stop` fires. Returns the ids once routed.
fn serving_thread(
    router: apikeyrouter::ApiKeyRouter,
    tag: &'static str,
    n: usize,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (
    std::thread::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<Vec<RequestId>>,
) {
    let (ids_tx, ids_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let r = router
                    .route(
                        ask("gpt-4o-mini", &format!("{tag}{i}")),
                        Objective::default(),
                    )
                    .await
                    .expect("served");
                ids.push(r.request_id);
            }
            let _ = ids_tx.send(ids);
            let _ = stop.await;
        });
    });
    (thread, ids_rx)
}

/// Each thread hands its records to a worker on its own runtime; a flush waits for
/// every thread's, whichever thread asks, and each thread's arrive in its order.
#[tokio::test]
async fn records_from_several_serving_threads_are_all_waited_for_and_delivered() {
    let sink = Arc::new(FlakySink::default());
    sink.down.store(true, Ordering::SeqCst);
    let h = harness(sink.clone(), 100).await;
    let mut threads = Vec::new();
    let mut stops = Vec::new();
    let mut by_thread = Vec::new();
    for tag in ["a", "b", "c"] {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (thread, ids) = serving_thread(h.router.clone(), tag, 5, stop_rx);
        threads.push(thread);
        stops.push(stop_tx);
        by_thread.push(ids.await.expect("thread routed"));
    }
    assert!(!h.router.flush_records(Duration::from_millis(300)).await);
    let stats = h.router.record_delivery();
    assert_eq!((stats.pending, stats.delivered, stats.dropped), (15, 0, 0));

    sink.down.store(false, Ordering::SeqCst);
    assert!(h.router.flush_records(Duration::from_secs(10)).await);
    let received = sink.received.lock().unwrap().clone();
    assert_eq!(received.len(), 15, "{received:?}");
    for ids in &by_thread {
        let arrived: Vec<_> = received.iter().filter(|id| ids.contains(id)).collect();
        assert_eq!(
            arrived,
            ids.iter().collect::<Vec<_>>(),
            "in the thread's order"
        );
    }
    let stats = h.router.record_delivery();
    assert_eq!((stats.pending, stats.delivered, stats.dropped), (0, 15, 0));
    for stop in stops {
        let _ = stop.send(());
    }
    for thread in threads {
        thread.join().expect("thread ended cleanly");
    }
}

/// A runtime that ends takes its worker, and the records it still held, with it: they
/// are counted as dropped, a flush does not wait for them, and a later runtime on the
/// same thread delivers again.
#[test]
fn a_runtime_that_ends_loses_only_its_own_pending_records_and_says_so() {
    let new_runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let sink = Arc::new(FlakySink::default());
    sink.down.store(true, Ordering::SeqCst);
    let first = new_runtime();
    let h = first.block_on(async {
        let h = harness(sink.clone(), 100).await;
        route_n(&h, 3).await;
        h
    });
    drop(first);

    sink.down.store(false, Ordering::SeqCst);
    let second = new_runtime();
    second.block_on(async {
        let stats = h.router.record_delivery();
        assert_eq!((stats.pending, stats.dropped), (3, 0), "{stats:?}");
        // The ended lane is let go rather than waited for.
        assert!(h.router.flush_records(Duration::from_secs(5)).await);
        let stats = h.router.record_delivery();
        assert_eq!((stats.pending, stats.dropped), (0, 3), "{stats:?}");

        let ids = route_n(&h, 2).await;
        assert!(h.router.flush_records(Duration::from_secs(5)).await);
        assert_eq!(*sink.received.lock().unwrap(), ids);
        let stats = h.router.record_delivery();
        assert_eq!((stats.pending, stats.delivered, stats.dropped), (0, 2, 3));
    });
}

/// A request dropped while its runtime shuts down hands its record over when new
/// tasks are cancelled as they are spawned, and the thread's lane is one of an
/// earlier runtime, ended too: the record is counted as dropped, once, rather than
/// retried on lane after new lane.
#[test]
fn a_request_dropped_by_a_runtime_shutting_down_is_counted_not_retried_forever() {
    let new_runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let first = new_runtime();
        let (h, sim) = first.block_on(async {
            let h = Harness::new(|b| b.audit(Arc::new(FlakySink::default()))).await;
            let sim = h.provider("openai");
            h.key("openai", 0, KeyMetadata::default()).await;
            // This thread's lane opens on the first runtime, which then ends.
            route_n(&h, 1).await;
            assert!(h.router.flush_records(Duration::from_secs(5)).await);
            (h, sim)
        });
        drop(first);
        sim.set_default_latency(Duration::from_secs(60));
        let second = new_runtime();
        let router = h.router.clone();
        second.block_on(async move {
            tokio::spawn(async move {
                let _ = router
                    .route(ask("gpt-4o-mini", "slow"), Objective::default())
                    .await;
            });
            // Let it reach the provider.
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        // Drops the request mid-call: its record is handed over during the shutdown.
        drop(second);
        let _ = done_tx.send(h.router.record_delivery());
    });
    let stats = done
        .recv_timeout(Duration::from_secs(10))
        .expect("the runtime's shutdown finished");
    assert_eq!((stats.delivered, stats.dropped), (1, 1), "{stats:?}");
}
