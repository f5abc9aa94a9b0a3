//! Two `apikeyrouter serve` processes behind one "load balancer" (the test spreads
//! requests over both), sharing counters in Redis and records in MongoDB (the split
//! store, with MongoDB as the audit sink), in front of one mock upstream:
//!
//! - a key's rpm limit, and a client's, hold across both instances;
//! - a hard budget is never exceeded;
//! - a key disabled through one instance gets no traffic from the other a second later;
//! - a virtual key made through one instance is accepted by the others (one started
//!   later too), and refused by all once revoked; with MongoDB alone (no change
//!   events) through the periodic re-read, its budget too;
//! - the audit trail in MongoDB has exactly one record per request.
//!
//! Needs Redis and the MongoDB-compatible server of `cargo xtask services up`
//! (`REDIS_URL`, `MONGODB_URL` override); fails, never skips, without them.

#![expect(clippy::unwrap_used, clippy::panic, reason = "test code")]

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_apikeyrouter");
const MASTER_KEY: &str = "test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Client tokens: one without limits, one with rpm 3.
const TEAM: &str = "team-token-0001";
const LIMITED_CLIENT: &str = "limited-client-token-0002";

/// Upstream calls by key material.
type Calls = Arc<Mutex<HashMap<String, usize>>>;

/// An OpenAI-compatible upstream that answers every chat completion with 9 prompt
/// and 1 completion tokens and counts calls per key.
async fn mock_upstream() -> (SocketAddr, Calls) {
    async fn chat(State(calls): State<Calls>, headers: HeaderMap) -> axum::Json<Value> {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_owned();
        *calls.lock().unwrap().entry(key).or_default() += 1;
        axum::Json(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1,
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
        }))
    }
    let calls = Calls::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, calls)
}

struct Instance {
    child: Child,
    base: String,
}

impl Instance {
    fn start(config: &PathBuf) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("APIKEYROUTER_MASTER_KEY", MASTER_KEY)
            .env("TEAM_TOKEN", TEAM)
            .env("LIMITED_CLIENT_TOKEN", LIMITED_CLIENT)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGTERM, then wait: the proxy drains and flushes its audit records.
    fn stop(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `n` chat requests for `model` concurrently as the client with `token`,
/// alternating between the instances, with request ids `<prefix>-<i>`; returns the
/// statuses.
async fn burst(
    client: &reqwest::Client,
    instances: &[&Instance; 2],
    (model, token): (&str, &str),
    prefix: &str,
    n: usize,
    sent: &mut Vec<String>,
) -> Vec<u16> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        sent.push(id.clone());
        let request = client
            .post(format!("{}/v1/chat/completions", instances[i % 2].base))
            .header("x-request-id", id)
            .bearer_auth(token)
            .json(&json!({"model": model, "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}))
            .send();
        tasks.push(tokio::spawn(request));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().unwrap().status().as_u16());
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_limits_budgets_key_state_and_audit() {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mongo =
        std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned());
    let unique = format!(
        "multi{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let (upstream, calls) = mock_upstream().await;
    // Two providers on the same upstream: "limited" (two keys, rpm 4 each, free
    // model) and "priced" (one key, $1,000 per million tokens: $0.01 per answered
    // request, $0.025 reserved) under a hard $0.05 global budget.
    let config = format!(
        r#"listen = "127.0.0.1:0"
[store]
kind = "split"
[store.counters]
kind = "redis"
url = "{redis}"
namespace = "{unique}"
[store.records]
kind = "mongodb"
url = "{mongo}"
database = "{unique}"
[audit]
kind = "mongodb"

[[providers]]
id = "limited"
kind = "openai-compatible"
base_url = "http://{upstream}/v1"
models = ["free-model"]
[[providers]]
id = "priced"
kind = "openai-compatible"
base_url = "http://{upstream}/v1"
models = ["priced-model"]

[[prices]]
model = "free-model"
input_per_mtok = 0.0
output_per_mtok = 0.0
[[prices]]
model = "priced-model"
input_per_mtok = 1000.0
output_per_mtok = 1000.0

[[keys]]
id = "limited-a"
provider = "limited"
material = "sk-limited-key-aaaa"
metadata = {{ rpm = 4 }}
[[keys]]
id = "limited-b"
provider = "limited"
material = "sk-limited-key-bbbb"
metadata = {{ rpm = 4 }}
[[keys]]
id = "priced-c"
provider = "priced"
material = "sk-priced-key-cccc"

[[providers]]
id = "open"
kind = "openai-compatible"
base_url = "http://{upstream}/v1"
models = ["open-model"]
[[prices]]
model = "open-model"
input_per_mtok = 0.0
output_per_mtok = 0.0
[[keys]]
id = "open-d"
provider = "open"
material = "sk-open-key-dddd"

[[budgets]]
id = "global"
scope = "global"
limit_usd = 0.05
period = "monthly"
enforcement = "hard"

[[virtual_keys]]
name = "team"
token_env = "TEAM_TOKEN"
[[virtual_keys]]
name = "limited-client"
token_env = "LIMITED_CLIENT_TOKEN"
rpm = 3
"#
    );
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{unique}.toml"));
    std::fs::write(&path, config).unwrap();
    let one = Instance::start(&path);
    let two = Instance::start(&path);
    let both = [&one, &two];
    let client = reqwest::Client::new();
    let mut sent = Vec::new();

    // 1. rpm across instances: 2 keys × 4 per minute, whatever instance asks. Start
    // early in a minute so the burst stays inside one window.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if second > 45 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let statuses = burst(&client, &both, ("free-model", TEAM), "rpm", 20, &mut sent).await;
    assert_eq!(count(&statuses, 200), 8, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 12, "{statuses:?}");
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.get("sk-limited-key-aaaa"), Some(&4), "{calls:?}");
        assert_eq!(calls.get("sk-limited-key-bbbb"), Some(&4), "{calls:?}");
    }
    // A client's rpm holds across instances too: 3 of 9, whichever instance.
    let statuses = burst(
        &client,
        &both,
        ("open-model", LIMITED_CLIENT),
        "client",
        9,
        &mut sent,
    )
    .await;
    assert_eq!(count(&statuses, 200), 3, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 6, "{statuses:?}");
    assert_eq!(calls.lock().unwrap().get("sk-open-key-dddd"), Some(&3));

    // 2. A key disabled through one instance gets no traffic from the other after a
    // second.
    let disabled = client
        .put(format!("{}/api/v1/keys/priced-c/state", one.base))
        .json(&json!({"state": "disabled", "reason": "rotating"}))
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let statuses = burst(
        &client,
        &[&two, &two],
        ("priced-model", TEAM),
        "off",
        4,
        &mut sent,
    )
    .await;
    assert_eq!(count(&statuses, 503), 4, "{statuses:?}");
    assert_eq!(calls.lock().unwrap().get("sk-priced-key-cccc"), None);
    let enabled = client
        .put(format!("{}/api/v1/keys/priced-c/state", two.base))
        .json(&json!({"state": "available", "reason": "rotated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. A virtual key made through one instance serves clients of the other a
    // moment later, and of an instance started after; revoked through another, it
    // is refused everywhere a moment later.
    let made: Value = client
        .post(format!("{}/api/v1/virtual_keys", one.base))
        .json(&json!({"name": "made-at-run-time"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = made["token"].as_str().unwrap_or_else(|| panic!("{made}"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let statuses = burst(&client, &both, ("open-model", token), "vk", 4, &mut sent).await;
    assert_eq!(count(&statuses, 200), 4, "{statuses:?}");
    let three = Instance::start(&path);
    let statuses = burst(
        &client,
        &[&three, &three],
        ("open-model", token),
        "vk-late",
        2,
        &mut sent,
    )
    .await;
    assert_eq!(count(&statuses, 200), 2, "{statuses:?}");
    let revoked = client
        .delete(format!("{}/api/v1/virtual_keys/made-at-run-time", two.base))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for instance in [&one, &two, &three] {
        let refused = client
            .post(format!("{}/v1/chat/completions", instance.base))
            .bearer_auth(token)
            .json(&json!({"model": "open-model", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), 401, "{}", instance.base);
    }
    three.stop();

    // 4. The hard budget holds across instances under concurrency.
    let statuses = burst(
        &client,
        &both,
        ("priced-model", TEAM),
        "budget",
        20,
        &mut sent,
    )
    .await;
    let served = count(&statuses, 200);
    assert!(served >= 1, "{statuses:?}");
    assert_eq!(count(&statuses, 403), 20 - served, "{statuses:?}");
    let upstream_priced = calls
        .lock()
        .unwrap()
        .get("sk-priced-key-cccc")
        .copied()
        .unwrap();
    assert_eq!(upstream_priced, served);
    for instance in both {
        let budgets: Value = client
            .get(format!("{}/api/v1/budgets", instance.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let global = budgets["data"]
            .as_array()
            .and_then(|a| a.iter().find(|b| b["budget_id"] == "global"))
            .unwrap_or_else(|| panic!("{budgets}"));
        let spent = global["spent"].as_f64().unwrap();
        assert!(spent <= 0.05 + 1e-9, "overspent: {global}");
        assert!(
            (spent - 0.01 * served as f64).abs() < 1e-6,
            "spent {spent} for {served} requests: {global}"
        );
    }

    // 5. One audit record per request in MongoDB, none missing, once the
    // instances have shut down (draining and flushing their queues).
    one.stop();
    two.stop();
    let db = mongodb::Client::with_uri_str(&mongo)
        .await
        .unwrap()
        .database(&unique);
    let audit = db.collection::<mongodb::bson::Document>("audit");
    let mut cursor = audit.find(mongodb::bson::doc! {}).await.unwrap();
    let mut ids = Vec::new();
    while cursor.advance().await.unwrap() {
        let doc = cursor.deserialize_current().unwrap();
        ids.push(doc.get_str("request_id").unwrap().to_owned());
    }
    let unique_ids: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique_ids.len(), "duplicate audit records");
    assert_eq!(unique_ids, sent.into_iter().collect::<BTreeSet<_>>());
    let _ = db.drop().await;
}

/// Polls `ask` every 250 ms until it is true, failing after 15 s (without change
/// events the routers re-read the stored keys, budgets and virtual keys every 10 s)
/// with `what`.
async fn eventually(what: &str, mut ask: impl AsyncFnMut() -> bool) {
    let started = std::time::Instant::now();
    while !ask().await {
        assert!(started.elapsed() < Duration::from_secs(15), "{what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Two instances sharing only MongoDB, which has no change events: a virtual key
/// made on one, and its budget, reach the other at its next periodic re-read; revoked
/// on the first, the key is refused by the other after its next re-read.
#[tokio::test]
async fn instances_sharing_only_mongodb_see_virtual_keys_and_their_budgets() {
    let mongo =
        std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned());
    let unique = format!(
        "vkmongo{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let config = format!(
        r#"listen = "127.0.0.1:0"
[store]
kind = "mongodb"
url = "{mongo}"
database = "{unique}"
[[providers]]
id = "openai"
kind = "simulated"
models = ["gpt-4o"]
[[keys]]
provider = "openai"
material = "sk-vk-mongo-0001"
"#
    );
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{unique}.toml"));
    std::fs::write(&path, config).unwrap();
    let one = Instance::start(&path);
    let two = Instance::start(&path);
    let client = reqwest::Client::new();
    let made: Value = client
        .post(format!("{}/api/v1/virtual_keys", one.base))
        .json(&json!({"name": "shared", "budget_usd": 2.0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = made["token"].as_str().unwrap_or_else(|| panic!("{made}"));
    let status_on_two = async || {
        client
            .post(format!("{}/v1/chat/completions", two.base))
            .bearer_auth(token)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    eventually("the other instance never accepted the key", async || {
        status_on_two().await == 200
    })
    .await;
    eventually(
        "the other instance never read the key's budget",
        async || {
            let budgets = client
                .get(format!("{}/api/v1/budgets", two.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            budgets.contains("virtual-key-shared")
        },
    )
    .await;
    let revoked = client
        .delete(format!("{}/api/v1/virtual_keys/shared", one.base))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    eventually(
        "the other instance kept accepting a revoked key",
        async || status_on_two().await == 401,
    )
    .await;
    one.stop();
    two.stop();
    let db = mongodb::Client::with_uri_str(&mongo)
        .await
        .unwrap()
        .database(&unique);
    let _ = db.drop().await;
}
