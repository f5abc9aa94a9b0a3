//! Tests of the audit sinks: record encoding, ordering, back-pressure, files and the
//! in-memory sinks.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};

use apikeyrouter_application::ports::{AuditError, AuditSink};
use apikeyrouter_application::{AttemptRecord, AuditRecord, Outcome};
use apikeyrouter_domain::{
    FailureKind, KeyId, ModelId, Money, ProviderId, RequestId, Timestamp, TokenUsage,
};

use super::{DiscardAuditSink, JsonLinesAuditSink, MemoryAuditSink};

fn sample_record(request_id: &str) -> AuditRecord {
    AuditRecord {
        request_id: RequestId::new(request_id),
        correlation_id: Some("corr-7".to_owned()),
        tenant: None,
        tags: BTreeMap::from([("feature".to_owned(), "chatbot".to_owned())]),
        requested_model: ModelId::new("gpt-4o"),
        key_id: Some(KeyId::new("key-a")),
        provider: Some(ProviderId::new("openai")),
        model: Some(ModelId::new("gpt-4o")),
        decision: None,
        attempts: vec![
            AttemptRecord {
                key_id: KeyId::new("key-b"),
                provider: ProviderId::new("openai"),
                model: ModelId::new("gpt-4o"),
                failure: Some(FailureKind::RateLimited),
                message: Some("slow down".to_owned()),
                status: Some(429),
                latency_ms: 12,
            },
            AttemptRecord {
                key_id: KeyId::new("key-a"),
                provider: ProviderId::new("openai"),
                model: ModelId::new("gpt-4o"),
                failure: None,
                message: None,
                status: None,
                latency_ms: 340,
            },
        ],
        usage: TokenUsage {
            prompt_tokens: 22,
            completion_tokens: 15,
            cached_tokens: 0,
        },
        estimated_cost: Some(Money::from_nanos(1_000)),
        actual_cost: Some(Money::from_nanos(900)),
        outcome: Outcome::Success,
        started_at: Timestamp::from_millis(1_000),
        finished_at: Timestamp::from_millis(1_352),
    }
}

/// A writer appending to a shared buffer the test can read.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that blocks every write until the gate opens.
#[derive(Clone, Default)]
struct GatedWriter {
    gate: Arc<(Mutex<bool>, Condvar)>,
    out: SharedBuffer,
}

impl GatedWriter {
    fn open(&self) {
        let (open, changed) = &*self.gate;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }
}

impl Write for GatedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (open, changed) = &*self.gate;
        let guard = changed
            .wait_while(open.lock().unwrap(), |open| !*open)
            .unwrap();
        drop(guard);
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer whose every write fails.
struct BrokenWriter;

impl Write for BrokenWriter {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("disk on fire"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
}

fn request_ids(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|line| line["request_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn record_serializes_with_the_expected_fields() {
    let json = serde_json::to_value(sample_record("req-1")).unwrap();
    assert_eq!(json["request_id"], "req-1");
    assert_eq!(json["key_id"], "key-a");
    assert_eq!(json["provider"], "openai");
    assert_eq!(json["outcome"]["status"], "success");
    assert_eq!(json["attempts"][0]["failure"], "rate_limited");
    assert_eq!(json["attempts"][0]["status"], 429);
    assert_eq!(json["usage"]["prompt_tokens"], 22);
    assert_eq!(json["tags"]["feature"], "chatbot");
    // Absent optional fields are left out rather than written as null.
    assert!(json.get("tenant").is_none());
    assert!(json.get("decision").is_none());
    let back: AuditRecord = serde_json::from_value(json).unwrap();
    assert_eq!(back, sample_record("req-1"));
}

#[test]
fn failure_outcome_carries_its_code() {
    let record = AuditRecord {
        outcome: Outcome::Failure {
            code: "no_eligible_key".to_owned(),
            message: "every key is cooling down".to_owned(),
        },
        ..sample_record("req-2")
    };
    let json = serde_json::to_value(record).unwrap();
    assert_eq!(json["outcome"]["status"], "failure");
    assert_eq!(json["outcome"]["code"], "no_eligible_key");
}

#[tokio::test]
async fn jsonl_sink_writes_one_line_per_record_in_order() {
    let buffer = SharedBuffer::default();
    let sink = JsonLinesAuditSink::to_writer(buffer.clone()).unwrap();
    let expected: Vec<String> = (0..200).map(|i| format!("req-{i:03}")).collect();
    for id in &expected {
        sink.record(&sample_record(id)).await.unwrap();
    }
    sink.flush().await.unwrap();
    let lines = buffer.lines();
    assert_eq!(request_ids(&lines), expected);
    assert_eq!(lines[0]["outcome"]["status"], "success");
}

#[tokio::test]
async fn full_buffer_refuses_records_without_blocking() {
    let writer = GatedWriter::default();
    let sink = JsonLinesAuditSink::with_capacity(writer.clone(), 1).unwrap();
    // The writer thread blocks on its first write to the gated writer, after taking at
    // most a `BufWriter` buffer's worth of lines (8 KiB, about a dozen records); the
    // queue holds one more; so some record among the first hundred must be refused.
    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..100 {
        let id = format!("req-{i}");
        match sink.record(&sample_record(&id)).await {
            Ok(()) => accepted.push(id),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("a record was refused");
    assert!(
        matches!(&refusal, AuditError::Unavailable(m) if m == "audit buffer full"),
        "{refusal:?}"
    );
    assert!(!accepted.is_empty());

    writer.open();
    sink.flush().await.unwrap();
    assert_eq!(request_ids(&writer.out.lines()), accepted);
}

#[tokio::test]
async fn file_sink_appends_to_existing_content() {
    let path = std::env::temp_dir().join(format!(
        "apikeyrouter-audit-{}-{:?}.jsonl",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, "{\"request_id\":\"req-existing\"}\n").unwrap();

    let first = JsonLinesAuditSink::file(&path).unwrap();
    first.record(&sample_record("req-1")).await.unwrap();
    first.record(&sample_record("req-2")).await.unwrap();
    first.flush().await.unwrap();
    drop(first);
    let second = JsonLinesAuditSink::file(&path).unwrap();
    second.record(&sample_record("req-3")).await.unwrap();
    second.flush().await.unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        request_ids(&lines),
        ["req-existing", "req-1", "req-2", "req-3"]
    );
}

#[tokio::test]
async fn flush_reports_write_failures() {
    let sink = JsonLinesAuditSink::to_writer(BrokenWriter).unwrap();
    // Accepting the record succeeds: the failure happens later, in the background.
    sink.record(&sample_record("req-1")).await.unwrap();
    let err = sink.flush().await.unwrap_err();
    assert!(
        matches!(&err, AuditError::Internal(m) if m.contains("disk on fire")),
        "{err:?}"
    );
}

#[tokio::test]
async fn memory_sink_keeps_records_in_order_and_discard_sink_accepts_all() {
    let memory = MemoryAuditSink::new();
    assert!(memory.is_empty());
    for id in ["req-1", "req-2"] {
        memory.record(&sample_record(id)).await.unwrap();
        DiscardAuditSink.record(&sample_record(id)).await.unwrap();
    }
    assert_eq!(
        memory.records(),
        [sample_record("req-1"), sample_record("req-2")]
    );
    assert_eq!(memory.len(), 2);
    memory.clear();
    assert!(memory.records().is_empty());
}
