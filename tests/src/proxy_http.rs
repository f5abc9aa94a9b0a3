//! The proxy over real HTTP: a server on port 0, a real client, simulated providers.

use std::net::SocketAddr;
use std::sync::Arc;

use apikeyrouter::config::Config;
use reqwest::StatusCode;
use serde_json::{Value, json};

const BASE: &str = r#"
[[providers]]
id = "openai"
kind = "simulated"
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]

[[providers]]
id = "anthropic"
kind = "simulated"
models = ["claude-sonnet-4-5"]

[[fallbacks]]
model = "gpt-4o"
to = ["claude-sonnet-4-5"]

[[keys]]
provider = "openai"
material = "sk-test-openai-0001"

[[keys]]
provider = "anthropic"
material = "sk-ant-test-0001"

[[budgets]]
scope = "global"
limit_usd = 50.0
"#;

struct Proxy {
    addr: SocketAddr,
    client: reqwest::Client,
}

impl Proxy {
    async fn start(extra: &str, vars: &[(&str, &str)]) -> Self {
        let text = format!("listen = \"127.0.0.1:0\"\n{BASE}\n{extra}");
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let config = Config::parse(&text, "test.toml", &vars).expect("valid config");
        let addr = crate::support::spawn_proxy(&config).await;
        Self {
            addr,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The audit record of request `id` once it is written (records are written in
    /// the background), or `null` after three seconds.
    async fn record_when_written(&self, id: &str) -> Value {
        for _ in 0..300 {
            let r = self.get(&format!("/api/v1/requests/{id}")).await;
            if r.status() == StatusCode::OK {
                return r.json().await.unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Value::Null
    }

    /// `GET path` (no credentials).
    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("response")
    }

    /// The JSON answer to `GET path` (no credentials).
    async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.unwrap()
    }

    /// The metrics page in Prometheus' text format.
    async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    /// `method path` with `body` as JSON (no credentials).
    async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> reqwest::Response {
        self.client
            .request(method, self.url(path))
            .json(body)
            .send()
            .await
            .expect("response")
    }

    /// `DELETE path` (no credentials).
    async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("response")
    }

    /// The token of a virtual key made through the management API from `body`.
    async fn make_virtual_key(&self, body: Value) -> String {
        let r = self
            .send_json(reqwest::Method::POST, "/api/v1/virtual_keys", &body)
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let made: Value = r.json().await.expect("json");
        made["token"].as_str().expect("a token").to_owned()
    }

    async fn chat(&self, body: Value, token: Option<&str>) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/v1/chat/completions"))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("response")
    }
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
}

/// Config for an OpenAI-compatible provider `id` at `base` serving `model`, with one
/// key; `then` follows (prices, for instance).
fn compatible(id: &str, model: &str, base: &str, material: &str, then: &str) -> String {
    format!(
        "\n[[providers]]\nid = \"{id}\"\nkind = \"openai-compatible\"\nbase_url = \"{base}/v1\"\n\
         models = [\"{model}\"]\n\n[[keys]]\nprovider = \"{id}\"\nmaterial = \"{material}\"\n{then}"
    )
}

/// The price lines of `model`: $1,000 per million tokens in and out.
fn thousand_dollar_price(model: &str) -> String {
    format!(
        "\n[[prices]]\nmodel = \"{model}\"\ninput_per_mtok = 1000.0\noutput_per_mtok = 1000.0\n"
    )
}

/// An OpenAI chat completion from `model` saying `content` (5 tokens in, 1 out).
fn completion_json(model: &str, content: &str) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    })
}

/// The value of one series (name and labels as printed) on a metrics page.
fn series(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series}: {metrics}"))
        .parse()
        .unwrap()
}

async fn error_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body: Value = response.json().await.expect("json error body");
    assert!(
        body["error"]["message"].is_string(),
        "not OpenAI's error shape: {body}"
    );
    assert!(
        body["error"]["type"].is_string(),
        "not OpenAI's error shape: {body}"
    );
    (status, body)
}

#[tokio::test]
async fn chat_completion_has_openai_shape_and_routing_headers() {
    let p = Proxy::start("", &[]).await;
    let r = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("x-request-id", "my-request-1")
        .header("x-apikeyrouter-objective", "cost")
        .header("x-apikeyrouter-tags", "feature=chatbot, segment=premium")
        .json(&hello("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["x-request-id"], "my-request-1");
    assert_eq!(h["x-apikeyrouter-key-id"], "openai-1");
    assert_eq!(h["x-apikeyrouter-provider"], "openai");
    let cost: f64 = h["x-apikeyrouter-cost-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let remaining: f64 = h["x-apikeyrouter-budget-remaining-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cost > 0.0);
    assert!((remaining - (50.0 - cost)).abs() < 1e-9);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // The request's record is there, with the tags and the decision.
    let record: Value = p
        .get("/api/v1/requests/my-request-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["tags"]["feature"], "chatbot");
    assert_eq!(record["decision"]["objective"], "cost");
    assert_eq!(record["outcome"]["status"], "success");
}

#[tokio::test]
async fn streaming_sends_chunks_usage_and_done() {
    let p = Proxy::start("", &[]).await;
    let body = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Tell me something"}]});
    let r = p.chat(body, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["x-apikeyrouter-provider"], "openai");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(
        content.starts_with("Simulated reply from gpt-4o"),
        "{content}"
    );
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk");
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop")
    );
    // The stream's tokens and cost reach the metrics once it has settled.
    let metrics = p.metrics().await;
    let tokens = series(
        &metrics,
        "apikeyrouter_tokens_total{provider=\"openai\",model=\"gpt-4o\",kind=\"completion\"}",
    );
    assert_eq!(
        tokens,
        usage["usage"]["completion_tokens"].as_f64().unwrap()
    );
    let cost = series(
        &metrics,
        "apikeyrouter_cost_usd_total{provider=\"openai\",model=\"gpt-4o\"}",
    );
    assert!(cost > 0.0, "{metrics}");
    // The settled cost also follows the stream, as an SSE comment before `[DONE]`.
    let comment: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(": x-apikeyrouter-cost-usd: "))
        .unwrap_or_else(|| panic!("no cost comment in {text}"))
        .parse()
        .unwrap();
    assert!((comment - cost).abs() < 1e-9, "{comment} against {cost}");
    assert!(text.find(": x-apikeyrouter-cost-usd").unwrap() < text.find("[DONE]").unwrap());
}

#[tokio::test]
async fn embeddings_as_floats_and_base64() {
    let p = Proxy::start("", &[]).await;
    let body = json!({"model": "text-embedding-3-small", "input": ["one", "two"], "dimensions": 4});
    let response = p
        .client
        .post(p.url("/v1/embeddings"))
        .json(&body)
        .send()
        .await
        .unwrap();
    // The same routing headers as chat, the budget's remainder included.
    let h = response.headers().clone();
    assert!(h["x-request-id"].to_str().unwrap().starts_with("req_"));
    assert_eq!(h["x-apikeyrouter-provider"], "openai");
    assert!(h.contains_key("x-apikeyrouter-key-id"));
    let cost: f64 = h["x-apikeyrouter-cost-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let remaining: f64 = h["x-apikeyrouter-budget-remaining-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (remaining - (50.0 - cost)).abs() < 1e-9,
        "{remaining} {cost}"
    );
    let r: Value = response.json().await.unwrap();
    assert_eq!(r["data"].as_array().unwrap().len(), 2);
    assert_eq!(r["data"][0]["embedding"].as_array().unwrap().len(), 4);
    let body = json!({"model": "text-embedding-3-small", "input": "one", "dimensions": 4, "encoding_format": "base64"});
    let r: Value = p
        .client
        .post(p.url("/v1/embeddings"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["data"][0]["embedding"].as_str().unwrap().len(),
        24,
        "4 f32 = 16 bytes = 24 base64 chars"
    );
}

#[tokio::test]
async fn models_lists_what_keys_can_serve() {
    let extra = r#"
[[providers]]
id = "together"
kind = "simulated"
models = ["meta-llama/Llama-3-70b"]

[[keys]]
provider = "together"
material = "sk-test-together-0001"
"#;
    let p = Proxy::start(extra, &[]).await;
    let r: Value = p.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "claude-sonnet-4-5",
            "gpt-4o",
            "gpt-4o-mini",
            "meta-llama/Llama-3-70b",
            "text-embedding-3-small"
        ]
    );

    // One model by id, as the SDK's `models.retrieve` asks, slashes and all.
    for (id, owner) in [("gpt-4o", "openai"), ("meta-llama/Llama-3-70b", "together")] {
        let one = p.get_json(&format!("/v1/models/{id}")).await;
        assert_eq!(
            one,
            json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
        );
    }
    let r = p.get("/v1/models/gpt-5").await;
    let (status, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
}

#[tokio::test]
async fn bad_requests_get_precise_openai_errors() {
    let p = Proxy::start("[limits]\nmax_body_bytes = 2048", &[]).await;
    let malformed = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(malformed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_json");

    // JSON text that is not UTF-8 (a Latin-1 "é" in a string).
    let latin1 = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(b"{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}".to_vec())
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(latin1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_json");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not UTF-8"), "{message}");

    let (status, body) = error_of(p.chat(json!({"model": 5, "messages": []}), None).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected the shape")
            || body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("does not match")
    );

    let (status, body) = error_of(
        p.chat(json!({"model": "gpt-4o", "messages": []}), None)
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("messages"))
    );

    let (status, body) = error_of(p.chat(hello("no-such-model"), None).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );

    let mut two = hello("gpt-4o");
    two["n"] = json!(2);
    let (status, _) = error_of(p.chat(two, None).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let (status, body) = error_of(p.chat(big, None).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large"))
    );

    let (status, _) = error_of(p.get("/v2/nothing").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let bad_objective = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("x-apikeyrouter-objective", "speed")
        .json(&hello("gpt-4o"))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(bad_objective).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown objective")
    );

    // The server still serves after all that.
    assert_eq!(p.chat(hello("gpt-4o"), None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn no_eligible_key_is_429_when_busy_and_503_when_none_usable() {
    let extra = r#"
[[providers]]
id = "tiny"
kind = "simulated"
models = ["tiny-model"]

[[keys]]
provider = "tiny"
material = "sk-tiny-key-0001"
metadata = { rpm = 1 }
"#;
    let p = Proxy::start(extra, &[]).await;
    crate::support::wait_out_a_late_minute().await;
    assert_eq!(
        p.chat(hello("tiny-model"), None).await.status(),
        StatusCode::OK
    );
    let r = p.chat(hello("tiny-model"), None).await;
    // The key's minute window holds one request: it is back when that minute ends,
    // not in the 1 s a blind retry would take.
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let minute_end = (60_000 - now_ms % 60_000).div_ceil(1000);
    assert!(
        (minute_end..=minute_end + 1).contains(&retry_after),
        "Retry-After {retry_after}, minute ends in {minute_end} s"
    );
    let (status, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("no_eligible_key"))
    );

    let disable = json!({"state": "disabled", "reason": "test"});
    let r = p
        .client
        .put(p.url("/api/v1/keys/anthropic-1/state"))
        .json(&disable)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, body) = error_of(p.chat(hello("claude-sonnet-4-5"), None).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 disabled")
    );
}

/// Virtual keys made through the management API: the token is shown once and then
/// authenticates with the key's models, rpm and budget; the list shows the file's
/// keys and the API's with their spend, never a token; a revoked token is refused at
/// once, and its budget goes with it.
#[tokio::test]
async fn virtual_keys_are_made_listed_used_and_revoked_through_the_api() {
    let extra = r#"
[[virtual_keys]]
name = "from-file"
token_env = "CLIENT_FILE"
budget_usd = 3.0
"#;
    let p = Proxy::start(extra, &[("CLIENT_FILE", "file-client-token-1")]).await;
    crate::support::wait_out_a_late_minute().await;
    let post = async |body: Value| {
        p.send_json(reqwest::Method::POST, "/api/v1/virtual_keys", &body)
            .await
    };
    let r =
        post(json!({"name": "team-a", "models": ["gpt-4o"], "rpm": 2, "budget_usd": 5.0})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let made: Value = r.json().await.unwrap();
    let token = made["token"].as_str().unwrap().to_owned();
    assert!(
        token.starts_with("sk-akr-") && token.len() == 7 + 43,
        "{token}"
    );
    assert_eq!(made["source"], "api");
    assert_eq!(made["models"], json!(["gpt-4o"]));
    assert_eq!(made["budget"]["limit"], 5.0, "{made}");
    assert!(made.get("token_sha256").is_none(), "{made}");

    // The token works at once, within the key's models and rpm.
    assert_eq!(
        p.chat(hello("gpt-4o"), Some(&token)).await.status(),
        StatusCode::OK
    );
    let (status, body) = error_of(p.chat(hello("gpt-4o-mini"), Some(&token)).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        p.chat(hello("gpt-4o"), Some(&token)).await.status(),
        StatusCode::OK
    );
    let (status, body) = error_of(p.chat(hello("gpt-4o"), Some(&token)).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded"))
    );

    // Listed with the file's key, in name order, with this month's spend; no token.
    let r = p.get("/api/v1/virtual_keys").await;
    let text = r.text().await.unwrap();
    assert!(
        !text.contains(&token) && !text.contains("file-client-token-1"),
        "{text}"
    );
    let list: Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from-file", "team-a"]);
    assert_eq!(list["data"][0]["source"], "config");
    assert_eq!(list["data"][0]["budget"]["limit"], 3.0);
    assert!(
        list["data"][1]["budget"]["spent"].as_f64().unwrap() > 0.0,
        "{list}"
    );
    let one = p.get_json("/api/v1/virtual_keys/team-a").await;
    assert_eq!(one["rpm"], 2);
    assert!(one.get("token").is_none());
    // One key, read with its own budget alone, is what the list says of it.
    assert_eq!(one, list["data"][1]);
    assert_eq!(
        p.get_json("/api/v1/virtual_keys/from-file").await,
        list["data"][0]
    );
    let unknown = p.get("/api/v1/virtual_keys/nobody").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    // Refusals name what is wrong.
    for (body, status, code, param) in [
        (
            json!({"name": "team-a"}),
            StatusCode::CONFLICT,
            "virtual_key_exists",
            Some("name"),
        ),
        (
            json!({"name": "from-file"}),
            StatusCode::CONFLICT,
            "virtual_key_exists",
            Some("name"),
        ),
        (
            json!({"name": "a b"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("name"),
        ),
        (
            json!({"rpm": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("rpm"),
        ),
        (
            json!({"budget_usd": -1}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("budget_usd"),
        ),
        (
            json!({"token": "mine"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            None,
        ),
    ] {
        let (got, err) = error_of(post(body.clone()).await).await;
        assert_eq!(
            (
                got,
                err["error"]["code"].as_str(),
                err["error"]["param"].as_str()
            ),
            (status, Some(code), param),
            "{body}: {err}"
        );
    }
    // Without a name, one is made up.
    let r = post(json!({})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let unnamed: Value = r.json().await.unwrap();
    assert!(
        unnamed["name"].as_str().unwrap().starts_with("vk-"),
        "{unnamed}"
    );

    // Revoked: refused at once; listed as revoked, its name kept; its budget gone.
    let delete = async |name: &str| p.delete(&format!("/api/v1/virtual_keys/{name}")).await;
    assert_eq!(delete("team-a").await.status(), StatusCode::NO_CONTENT);
    let (status, _) = error_of(p.chat(hello("gpt-4o"), Some(&token)).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let revoked = p.get_json("/api/v1/virtual_keys/team-a").await;
    assert!(revoked["revoked_at"].as_u64().is_some(), "{revoked}");
    assert_eq!(delete("team-a").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        p.get_json("/api/v1/virtual_keys/team-a").await["revoked_at"],
        revoked["revoked_at"]
    );
    let (status, body) = error_of(post(json!({"name": "team-a"})).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("virtual_key_exists"))
    );
    let (status, body) = error_of(delete("nobody").await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("virtual_key_not_found"))
    );
    let (status, body) = error_of(delete("from-file").await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("defined_in_config"))
    );
    let budgets = p.get_json("/api/v1/budgets").await.to_string();
    assert!(
        !budgets.contains("virtual-key-team-a") && budgets.contains("virtual-key-from-file"),
        "{budgets}"
    );
    // The file's key still works.
    assert_eq!(
        p.chat(hello("gpt-4o"), Some("file-client-token-1"))
            .await
            .status(),
        StatusCode::OK
    );
}

/// PATCH changes a virtual key's limits under the same token: models and rpm at
/// once, a new budget limit keeping this month's spend, `null` removing one; a
/// revoked key, an unknown one and fields that cannot change are refused.
#[tokio::test]
async fn virtual_keys_change_their_limits_under_the_same_token() {
    let p = Proxy::start("", &[]).await;
    crate::support::wait_out_a_late_minute().await;
    let token = p
        .make_virtual_key(json!({"name": "team", "budget_usd": 5.0}))
        .await;
    assert_eq!(
        p.chat(hello("gpt-4o-mini"), Some(&token)).await.status(),
        StatusCode::OK
    );
    let patch = async |name: &str, body: Value| {
        let path = format!("/api/v1/virtual_keys/{name}");
        p.send_json(reqwest::Method::PATCH, &path, &body).await
    };
    let r = patch(
        "team",
        json!({"models": ["gpt-4o"], "rpm": 1, "budget_usd": 7.0}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let changed: Value = r.json().await.unwrap();
    assert_eq!(
        (changed["rpm"].as_u64(), changed["models"].clone()),
        (Some(1), json!(["gpt-4o"]))
    );
    assert_eq!(changed["budget"]["limit"], 7.0, "{changed}");
    assert!(
        changed["budget"]["spent"].as_f64().unwrap() > 0.0,
        "spend kept: {changed}"
    );
    assert!(changed.get("token").is_none());
    // In force at once, same token.
    let (status, _) = error_of(p.chat(hello("gpt-4o-mini"), Some(&token)).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        p.chat(hello("gpt-4o"), Some(&token)).await.status(),
        StatusCode::OK
    );
    let (status, body) = error_of(p.chat(hello("gpt-4o"), Some(&token)).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded"))
    );
    // null removes a limit, the budget with it.
    let r = patch("team", json!({"rpm": null, "budget_usd": null})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let changed: Value = r.json().await.unwrap();
    assert!(
        changed["rpm"].is_null() && changed["budget"].is_null(),
        "{changed}"
    );
    assert_eq!(
        p.chat(hello("gpt-4o"), Some(&token)).await.status(),
        StatusCode::OK
    );

    for (name, body, status, code) in [
        (
            "team",
            json!({"name": "other"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "team",
            json!({"rpm": "fast"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "team",
            json!({"rpm": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "nobody",
            json!({"rpm": 5}),
            StatusCode::NOT_FOUND,
            "virtual_key_not_found",
        ),
    ] {
        let (got, err) = error_of(patch(name, body.clone()).await).await;
        assert_eq!(
            (got, err["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {err}"
        );
    }
    let r = p.delete("/api/v1/virtual_keys/team").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (got, err) = error_of(patch("team", json!({"rpm": 5})).await).await;
    assert_eq!(
        (got, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("virtual_key_revoked"))
    );
}

/// Rotating a virtual key gives it a new token under the same name, limits and budget
/// (spend kept): the old token is refused at once, the new one works, and the budget
/// keeps counting. Revoked keys, keys of the file and unknown names cannot be rotated.
#[tokio::test]
async fn rotating_a_virtual_key_replaces_its_token_and_keeps_the_rest() {
    let extra = r#"
[[virtual_keys]]
name = "from-file"
token_env = "CLIENT_FILE"
"#;
    let p = Proxy::start(extra, &[("CLIENT_FILE", "sk-client-file-token")]).await;
    crate::support::wait_out_a_late_minute().await;
    let old = p
        .make_virtual_key(json!({"name": "team", "rpm": 50, "budget_usd": 5.0}))
        .await;
    assert_eq!(
        p.chat(hello("gpt-4o-mini"), Some(&old)).await.status(),
        StatusCode::OK
    );
    let rotate = async |name: &str| {
        let path = format!("/api/v1/virtual_keys/{name}/rotate");
        p.send_json(reqwest::Method::POST, &path, &json!({})).await
    };
    let r = rotate("team").await;
    assert_eq!(r.status(), StatusCode::OK);
    let rotated: Value = r.json().await.unwrap();
    let new = rotated["token"].as_str().expect("the new token").to_owned();
    assert!(new.starts_with("sk-akr-") && new != old, "{rotated}");
    assert_eq!(
        (rotated["name"].as_str(), rotated["rpm"].as_u64()),
        (Some("team"), Some(50))
    );
    assert_eq!(rotated["budget"]["limit"], 5.0, "{rotated}");
    let spent_before = rotated["budget"]["spent"].as_f64().unwrap();
    assert!(spent_before > 0.0, "spend kept: {rotated}");

    let (status, body) = error_of(p.chat(hello("gpt-4o-mini"), Some(&old)).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        p.chat(hello("gpt-4o-mini"), Some(&new)).await.status(),
        StatusCode::OK
    );
    let listed = p.get_json("/api/v1/virtual_keys/team").await;
    assert!(listed.get("token").is_none(), "{listed}");
    assert!(
        listed["budget"]["spent"].as_f64().unwrap() > spent_before,
        "the new token spends the same budget: {listed}"
    );

    for (name, status, code) in [
        ("from-file", StatusCode::CONFLICT, "defined_in_config"),
        ("nobody", StatusCode::NOT_FOUND, "virtual_key_not_found"),
    ] {
        let (got, err) = error_of(rotate(name).await).await;
        assert_eq!(
            (got, err["error"]["code"].as_str()),
            (status, Some(code)),
            "{err}"
        );
    }
    assert_eq!(
        p.delete("/api/v1/virtual_keys/team").await.status(),
        StatusCode::NO_CONTENT
    );
    let (got, err) = error_of(rotate("team").await).await;
    assert_eq!(
        (got, err["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("virtual_key_revoked"))
    );
    let (status, _) = error_of(p.chat(hello("gpt-4o-mini"), Some(&new)).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Without virtual keys in the file, /v1 is open until the API makes one, and stays
/// closed once the last is revoked; a budget that would limit a new key's requests
/// (its id is the key's budget id) is refused with 409 whether or not the key asks
/// for a budget.
#[tokio::test]
async fn revoking_the_last_virtual_key_keeps_the_api_closed() {
    let p = Proxy::start("", &[]).await;
    assert_eq!(p.chat(hello("gpt-4o"), None).await.status(), StatusCode::OK);
    let post =
        async |path: &str, body: Value| p.send_json(reqwest::Method::POST, path, &body).await;
    let token = p.make_virtual_key(json!({"name": "only"})).await;
    let (status, _) = error_of(p.chat(hello("gpt-4o"), None).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        p.chat(hello("gpt-4o"), Some(&token)).await.status(),
        StatusCode::OK
    );
    let r = p.delete("/api/v1/virtual_keys/only").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    for credential in [None, Some(token.as_str())] {
        let (status, _) = error_of(p.chat(hello("gpt-4o"), credential).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{credential:?}");
    }

    let budget = json!({"id": "virtual-key-later", "scope": "tag", "tag": "virtual_key=later",
        "limit_usd": 1.0});
    let r = post("/api/v1/budgets", budget).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let (status, body) =
        error_of(post("/api/v1/virtual_keys", json!({"name": "later"})).await).await;
    assert_eq!(
        (
            status,
            body["error"]["code"].as_str(),
            body["error"]["param"].as_str()
        ),
        (StatusCode::CONFLICT, Some("budget_exists"), Some("name"))
    );
}

/// A change to one stored virtual key is read alone: told that `a` changed, an
/// instance learns `a` and not `b`, made meanwhile through another router sharing its
/// store (a memory store here, which no periodic reading re-reads). A record that
/// does not decode is left out, as the listing leaves it out, without keeping the
/// other changes read with it from applying.
#[tokio::test]
async fn a_virtual_key_change_reads_that_key_alone() {
    use std::collections::BTreeSet;

    use apikeyrouter_proxy::state::AppState;

    let store = Arc::new(crate::forwarding::Forwarding::over_memory());
    let router = async || {
        apikeyrouter::ApiKeyRouter::builder()
            .store(store.clone())
            .build()
            .await
            .unwrap()
    };
    let config = Config::parse(BASE, "vk-alone.toml", &[]).unwrap();
    let auth = apikeyrouter_proxy::auth::Auth::from_config(&config).unwrap();
    let here = AppState::new(router().await, auth, config);
    here.refresh_virtual_keys().await.unwrap();
    let elsewhere = router().await;
    let known = || -> BTreeSet<String> { here.auth().clients().map(|v| v.name.clone()).collect() };
    for (name, digit) in [("a", '1'), ("b", '2')] {
        elsewhere
            .add_virtual_key(crate::support::virtual_key(name, digit))
            .await
            .unwrap();
    }

    here.refresh_named_virtual_keys(["a"]).await.unwrap();
    assert_eq!(known(), BTreeSet::from(["a".to_owned()]));
    elsewhere.revoke_virtual_key("a").await.unwrap();
    here.refresh_named_virtual_keys(["a", "b", "never-made"])
        .await
        .unwrap();
    assert_eq!(known(), BTreeSet::from(["b".to_owned()]));
    here.refresh_virtual_keys().await.unwrap();
    assert_eq!(known(), BTreeSet::from(["b".to_owned()]));

    elsewhere
        .add_virtual_key(crate::support::virtual_key("c", '3'))
        .await
        .unwrap();
    store.undecodable_virtual_key("b");
    here.refresh_named_virtual_keys(["b", "c"]).await.unwrap();
    assert_eq!(known(), BTreeSet::from(["c".to_owned()]));
}

/// A reload of the config file replaces the file's virtual keys and keeps the ones
/// made through the API.
#[tokio::test]
async fn a_reload_keeps_the_virtual_keys_made_through_the_api() {
    let dir = std::env::temp_dir().join(format!("akr-vk-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    let file = |extra: &str| format!("listen = \"127.0.0.1:0\"\n{BASE}\n{extra}");
    let first = "[[virtual_keys]]\nname = \"old\"\ntoken = \"old-client-token-1\"\n";
    std::fs::write(&path, file(first)).unwrap();
    let config = Config::load(&path).unwrap();
    let state = apikeyrouter_proxy::server::build_state(&config)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(apikeyrouter_proxy::server::serve(
        state,
        config.listen,
        config.server,
        Some(path.clone()),
        move |addr| {
            let _ = tx.send(addr);
        },
    ));
    let p = Proxy {
        addr: rx.await.unwrap(),
        client: reqwest::Client::new(),
    };
    let token = p.make_virtual_key(json!({"name": "made"})).await;

    // The file now names another key; the watcher polls every two seconds (file
    // times may be coarse, so the size changes too).
    let second = "[[virtual_keys]]\nname = \"new\"\ntoken = \"new-client-token-22\"\n";
    std::fs::write(&path, file(second)).unwrap();
    let started = std::time::Instant::now();
    while p
        .chat(hello("gpt-4o"), Some("new-client-token-22"))
        .await
        .status()
        != StatusCode::OK
    {
        assert!(started.elapsed().as_secs() < 15, "reload did not happen");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        p.chat(hello("gpt-4o"), Some(&token)).await.status(),
        StatusCode::OK
    );
    let (status, _) = error_of(p.chat(hello("gpt-4o"), Some("old-client-token-1")).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn virtual_keys_authenticate_and_confine_clients() {
    let extra = r#"
[[keys]]
provider = "openai"
material = "sk-test-tenant-a-0001"
metadata = { tenant = "customer-a" }

[[virtual_keys]]
name = "a"
token_env = "CLIENT_A"
tenant = "customer-a"
models = ["gpt-4o"]
rpm = 3

[[virtual_keys]]
name = "shared"
token_env = "CLIENT_SHARED"
"#;
    let p = Proxy::start(
        extra,
        &[
            ("CLIENT_A", "client-a-token-123"),
            ("CLIENT_SHARED", "shared-token-456"),
        ],
    )
    .await;
    crate::support::wait_out_a_late_minute().await;
    let (status, body) = error_of(p.chat(hello("gpt-4o"), None).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
    );
    let (status, _) = error_of(p.chat(hello("gpt-4o"), Some("wrong-token-000")).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Credentials are checked before the body: no body detail reaches a stranger.
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let (status, _) = error_of(
            p.client
                .post(p.url(path))
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // ...nor is the body read: a stranger announcing a large body that never comes
    // is answered at once.
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-000\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"model\":"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 512];
        let read = tokio::time::timeout(std::time::Duration::from_secs(3), tcp.read(&mut answer))
            .await
            .expect("no answer before the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }

    // /v1/models follows routing: a tenant's client sees what its tenant's keys
    // serve (within its allowed models); an untenanted client what shared keys serve.
    let models = async |token: &str| {
        let r: Value = p
            .client
            .get(p.url("/v1/models"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(models("client-a-token-123").await, ["gpt-4o"]);
    // A model outside the client's allowed ones is not found for it, by id either.
    for (token, status) in [
        ("client-a-token-123", StatusCode::NOT_FOUND),
        ("shared-token-456", StatusCode::OK),
        ("wrong-token-000", StatusCode::UNAUTHORIZED),
    ] {
        let r = p
            .client
            .get(p.url("/v1/models/gpt-4o-mini"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{token}");
    }
    assert_eq!(
        models("shared-token-456").await,
        [
            "claude-sonnet-4-5",
            "gpt-4o",
            "gpt-4o-mini",
            "text-embedding-3-small"
        ]
    );

    let r = p.chat(hello("gpt-4o"), Some("client-a-token-123")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["x-apikeyrouter-key-id"],
        "openai-2",
        "customer-a routes to its own key"
    );
    let r = p.chat(hello("gpt-4o"), Some("shared-token-456")).await;
    assert_eq!(
        r.headers()["x-apikeyrouter-key-id"],
        "openai-1",
        "untenanted clients use shared keys"
    );

    let (status, body) = error_of(
        p.chat(hello("gpt-4o-mini"), Some("client-a-token-123"))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("model_not_allowed"))
    );

    // rpm 3, counted in the store with each routed request (the refused one above
    // did not count): two more pass, the next is refused with a Retry-After.
    for _ in 0..2 {
        assert_eq!(
            p.chat(hello("gpt-4o"), Some("client-a-token-123"))
                .await
                .status(),
            StatusCode::OK
        );
    }
    let refused = p.chat(hello("gpt-4o"), Some("client-a-token-123")).await;
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let (status, body) = error_of(refused).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded"))
    );
    assert_eq!(
        body["error"]["message"],
        "Rate limit of 3 requests per minute reached for client a."
    );
}

#[tokio::test]
async fn management_api_requires_the_admin_token_and_masks_material() {
    let p = Proxy::start(
        "[admin]\ntoken_env = \"ADMIN\"",
        &[("ADMIN", "admin-token-789")],
    )
    .await;
    let (status, _) = error_of(p.get("/api/v1/keys").await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = error_of(
        p.client
            .get(p.url("/api/v1/keys"))
            .bearer_auth("nope-nope-nope")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("admin-token-789");
    let new = json!({"key_material": "sk-live-new-key-abcd", "provider_id": "openai", "metadata": {"tenant": "t1", "rpm": 60}});
    let r = admin(p.client.post(p.url("/api/v1/keys")))
        .json(&new)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["key_material"], "sk-...abcd");
    let list = admin(p.client.get(p.url("/api/v1/keys")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!list.contains("new-key"), "material leaked in the key list");
    assert!(list.contains(&id));

    let r = admin(p.client.post(p.url("/api/v1/keys")))
        .json(&new)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let bad = json!({"key_material": "", "provider_id": "openai"});
    let (status, _) = error_of(
        admin(p.client.post(p.url("/api/v1/keys")))
            .json(&bad)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let quota: Value = admin(p.client.get(p.url(&format!("/api/v1/keys/{id}/quota"))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(quota["capacity"], "abundant");
    assert_eq!(quota["windows"][0]["limit"], 60);

    // A merge patch: what it names changes, what it leaves out stays (the tenant),
    // and `null` removes.
    let patch_key =
        |patch: Value| admin(p.client.patch(p.url(&format!("/api/v1/keys/{id}")))).json(&patch);
    let patched: Value = patch_key(json!({"metadata": {"rpm": 120, "tier": "gold"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        patched["metadata"],
        json!({"tenant": "t1", "rpm": 120, "tier": "gold"})
    );
    let patched: Value = patch_key(json!({"metadata": {"tier": null, "env": "production"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        patched["metadata"],
        json!({"tenant": "t1", "rpm": 120, "environment": "production"})
    );
    let (status, error) = error_of(
        patch_key(json!({"metadata": {"rpm": "lots"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["param"], "metadata", "{error}");
    let (status, _) = error_of(
        patch_key(json!({"metadata": {"rpm": 0}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a zero limit is refused");
    let kept: Value = admin(p.client.get(p.url(&format!("/api/v1/keys/{id}"))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        kept["metadata"]["rpm"], 120,
        "a refused patch changes nothing"
    );
    // A path that does not decode to text: refused in the same error shape.
    let (status, error) = error_of(
        admin(p.client.get(p.url("/api/v1/keys/%FF")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path")),
        "{error}"
    );

    let bad_state = json!({"state": "throttled"});
    let (status, _) = error_of(
        admin(p.client.put(p.url(&format!("/api/v1/keys/{id}/state"))))
            .json(&bad_state)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let budget = json!({"id": "team", "scope": "tenant", "tenant": "t1", "limit_usd": 10.0, "period": "daily", "spent_usd": 2.5});
    let r = admin(p.client.post(p.url("/api/v1/budgets")))
        .json(&budget)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let budgets: Value = admin(p.client.get(p.url("/api/v1/budgets")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let team = budgets["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget_id"] == "team")
        .unwrap();
    assert_eq!(team["spent"], 2.5);
    assert_eq!(team["remaining"], 7.5);

    // One id, one budget: POST does not replace (and reset) an existing one.
    let (status, error) = error_of(
        admin(p.client.post(p.url("/api/v1/budgets")))
            .json(&budget)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("budget_exists"))
    );
    let mut misspelt = budget.clone();
    misspelt["id"] = json!("other");
    misspelt["limit"] = json!(5.0);
    let (status, error) = error_of(
        admin(p.client.post(p.url("/api/v1/budgets")))
            .json(&misspelt)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `limit`"),
        "{error}"
    );
    // PUT redefines it keeping this period's spend; GET reads one budget.
    let raised = json!({"scope": "tenant", "tenant": "t1", "limit_usd": 20.0, "period": "daily"});
    let r = admin(p.client.put(p.url("/api/v1/budgets/team")))
        .json(&raised)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let team: Value = admin(p.client.get(p.url("/api/v1/budgets/team")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (team["spent"].clone(), team["remaining"].clone()),
        (json!(2.5), json!(17.5))
    );
    let mut renamed = raised.clone();
    renamed["id"] = json!("elsewhere");
    let (status, _) = error_of(
        admin(p.client.put(p.url("/api/v1/budgets/team")))
            .json(&renamed)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let r = admin(p.client.put(p.url("/api/v1/budgets/fresh")))
        .json(&raised)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // A spend given with PUT replaces the account of an existing budget.
    let mut reset = raised.clone();
    reset["spent_usd"] = json!(1.25);
    let r = admin(p.client.put(p.url("/api/v1/budgets/fresh")))
        .json(&reset)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(
        (fresh["spent"].clone(), fresh["remaining"].clone()),
        (json!(1.25), json!(18.75))
    );
    for (method, code) in [
        ("DELETE", StatusCode::NO_CONTENT),
        ("DELETE", StatusCode::NOT_FOUND),
        ("GET", StatusCode::NOT_FOUND),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = admin(p.client.request(method, p.url("/api/v1/budgets/team")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code);
    }

    let policies: Value = admin(p.client.get(p.url("/api/v1/policies")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(policies["objective"], "fairness");
    assert_eq!(policies["reservation_lease_ms"], 3_600_000);
    assert_eq!(policies["fallbacks"][0]["to"][0], "claude-sonnet-4-5");
    let providers: Value = admin(p.client.get(p.url("/api/v1/providers")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(providers["data"][0]["kind"], "simulated");

    let r = admin(p.client.delete(p.url(&format!("/api/v1/keys/{id}"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = error_of(
        admin(p.client.get(p.url(&format!("/api/v1/keys/{id}"))))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let p = Proxy::start("", &[]).await;
    assert_eq!(
        p.client
            .get(p.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let ready = p.get_json("/ready").await;
    assert_eq!(ready["store"], "memory");
    p.chat(hello("gpt-4o"), None).await;
    let _ = p.chat(hello("nope"), None).await;
    let embedded = p
        .client
        .post(p.url("/v1/embeddings"))
        .json(&json!({"model": "text-embedding-3-small", "input": ["one"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(embedded.status(), StatusCode::OK);
    let unknown = p.client.get(p.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(
            "apikeyrouter_requests_total{endpoint=\"chat\",status=\"200\",code=\"ok\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("code=\"model_not_found\""), "{metrics}");
    // Endpoints are told apart by path: the two probes above, and a URL no route has.
    assert!(
        metrics
            .contains("apikeyrouter_requests_total{endpoint=\"ops\",status=\"200\",code=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "apikeyrouter_requests_total{endpoint=\"other\",status=\"404\",code=\"unknown_url\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("apikeyrouter_keys{provider=\"openai\",state=\"available\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "apikeyrouter_tokens_total{provider=\"openai\",model=\"gpt-4o\",kind=\"prompt\"}"
        ),
        "{metrics}"
    );
    assert!(
        // One served chat timed (the refused one is not); the series exist from start-up.
        metrics.contains("apikeyrouter_request_duration_seconds_count{endpoint=\"chat\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apikeyrouter_request_duration_seconds_count{endpoint=\"embeddings\"} 1"),
        "{metrics}"
    );
    // The served chat's cost reached its provider and model's series.
    let cost = series(
        &metrics,
        "apikeyrouter_cost_usd_total{provider=\"openai\",model=\"gpt-4o\"}",
    );
    assert!(cost > 0.0, "{metrics}");

    // Scrapes at once each count every key once (one rewrites the gauges at a time).
    let pages = futures_util::future::join_all((0..16).map(|_| p.metrics())).await;
    for page in pages {
        let keys: f64 = page
            .lines()
            .filter(|l| l.starts_with("apikeyrouter_keys{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(keys, 2.0, "{page}");
    }
}

#[tokio::test]
async fn client_disconnecting_mid_stream_is_settled_and_audited() {
    use futures_util::StreamExt;
    let p = Proxy::start("", &[]).await;
    let body = json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": "a long answer please, with many many words in it"}]});
    let r = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("x-request-id", "gone-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut bytes = r.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(bytes);
    let record = p.record_when_written("gone-1").await;
    // The simulated provider streams all chunks at once, so the server may finish
    // before it notices the client left; either way the stream is settled and audited.
    let status = record["outcome"]["status"].as_str().unwrap_or_default();
    assert!(
        status == "success" || record["outcome"]["code"] == "client_disconnected",
        "{record}"
    );
    assert!(
        record["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{record}"
    );
    // The metrics count what was billed, though the client never saw a usage chunk.
    let metrics = p.metrics().await;
    let tokens = series(
        &metrics,
        "apikeyrouter_tokens_total{provider=\"openai\",model=\"gpt-4o\",kind=\"completion\"}",
    );
    assert_eq!(
        tokens,
        record["usage"]["completion_tokens"].as_f64().unwrap()
    );
    assert!(
        series(
            &metrics,
            "apikeyrouter_cost_usd_total{provider=\"openai\",model=\"gpt-4o\"}"
        ) > 0.0,
        "{metrics}"
    );
    // And the server keeps serving.
    assert_eq!(p.chat(hello("gpt-4o"), None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_client_hanging_up_mid_request_leaves_nothing_reserved_and_is_audited() {
    use std::time::Duration;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_millis(400))
                .set_body_json(completion_json("slow-model", "late")),
        )
        .mount(&upstream)
        .await;
    let extra = compatible(
        "slow",
        "slow-model",
        &upstream.uri(),
        "sk-slow-test-0001",
        &thousand_dollar_price("slow-model"),
    );
    let p = Proxy::start(&extra, &[]).await;
    let gave_up = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("x-request-id", "hung-up-1")
        .timeout(Duration::from_millis(100))
        .json(&hello("slow-model"))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gave up before the answer");

    // The call finishes without it: audited as served, and settled.
    let record = p.record_when_written("hung-up-1").await;
    assert_eq!(record["outcome"]["status"], "success", "{record}");
    let budgets = p.get_json("/api/v1/budgets").await;
    let global = &budgets["data"][0];
    assert_eq!(global["reserved"].as_f64(), Some(0.0), "{budgets}");
    // 6 tokens at $1,000 per million.
    assert_eq!(global["spent"].as_f64(), Some(0.006), "{budgets}");
    // And counted in the metrics, though no answer was written (right after the
    // record is handed over: wait a moment for it).
    let mut metrics = p.metrics().await;
    for _ in 0..100 {
        if metrics.contains("apikeyrouter_tokens_total{provider=\"slow\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        metrics = p.metrics().await;
    }
    for (kind, tokens) in [("prompt", 5.0), ("completion", 1.0)] {
        let name = format!(
            "apikeyrouter_tokens_total{{provider=\"slow\",model=\"slow-model\",kind=\"{kind}\"}}"
        );
        assert_eq!(series(&metrics, &name), tokens, "{kind}");
    }
    let cost = "apikeyrouter_cost_usd_total{provider=\"slow\",model=\"slow-model\"}";
    assert!((series(&metrics, cost) - 0.006).abs() < 1e-9, "{metrics}");
}

#[tokio::test]
async fn a_virtual_keys_budget_stops_that_client_only() {
    let extra = r#"
[[virtual_keys]]
name = "intern"
token = "intern-token-0001"
budget_usd = 0.001

[[virtual_keys]]
name = "team"
token = "team-token-0002"
"#;
    let p = Proxy::start(extra, &[]).await;
    let mut served = 0;
    let refusal = loop {
        let mut small = hello("gpt-4o");
        small["max_tokens"] = json!(10);
        let r = p.chat(small, Some("intern-token-0001")).await;
        if r.status() != StatusCode::OK {
            break r;
        }
        served += 1;
        assert!(served < 500, "the client's budget never stopped it");
    };
    let (status, body) = error_of(refusal).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("budget_exceeded"))
    );
    assert!(served > 0);
    // Another client is unaffected.
    assert_eq!(
        p.chat(hello("gpt-4o"), Some("team-token-0002"))
            .await
            .status(),
        StatusCode::OK
    );
    let budgets = p.get_json("/api/v1/budgets").await;
    let intern = budgets["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget_id"] == "virtual-key-intern")
        .unwrap();
    assert!(intern["spent"].as_f64().unwrap() <= 0.001);

    // Another client cannot charge (or exhaust) the intern's budget by naming its tag;
    // its own requests carry its own name.
    let spoofed = p
        .client
        .post(p.url("/v1/chat/completions"))
        .bearer_auth("team-token-0002")
        .header("x-apikeyrouter-tags", "feature=x, virtual_key=intern")
        .json(&hello("gpt-4o"))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(spoofed).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_header")),
        "{body}"
    );
    let r = p
        .client
        .post(p.url("/v1/chat/completions"))
        .bearer_auth("team-token-0002")
        .header("x-apikeyrouter-tags", "feature=x")
        .json(&hello("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let record = p.record_when_written(&id).await;
    assert_eq!(
        record["tags"],
        json!({"feature": "x", "virtual_key": "team"}),
        "{record}"
    );
}

#[tokio::test]
async fn a_failover_is_counted_on_the_model_that_served() {
    // Nothing listens on port 1, so `o3-mini`'s only key fails and its fallback serves.
    let p = Proxy::start(
        r#"
[[providers]]
id = "broken"
kind = "openai-compatible"
base_url = "http://127.0.0.1:1/v1"
models = ["o3-mini"]

[[keys]]
provider = "broken"
material = "sk-broken-0001"

[[fallbacks]]
model = "o3-mini"
to = ["gpt-4o-mini"]
"#,
        &[],
    )
    .await;
    let direct = p.chat(hello("gpt-4o"), None).await;
    assert_eq!(direct.status(), StatusCode::OK);
    let failed_over = p.chat(hello("o3-mini"), None).await;
    assert_eq!(failed_over.status(), StatusCode::OK);
    assert_eq!(failed_over.headers()["x-apikeyrouter-provider"], "openai");
    let body: Value = failed_over.json().await.unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    let metrics = p.metrics().await;
    assert!(
        metrics
            .contains("apikeyrouter_failovers_total{provider=\"openai\",model=\"gpt-4o-mini\"} 1"),
        "{metrics}"
    );
    // A request served by its first attempt is not a failover.
    assert!(
        metrics.contains("apikeyrouter_failovers_total{provider=\"openai\",model=\"gpt-4o\"} 0"),
        "{metrics}"
    );
}

/// A budget reservation that a stopped instance left in the shared store is given
/// back once it is older than `[routing] reservation_lease_ms`, and `/metrics` counts
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_reservation_in_the_shared_store_is_reclaimed_and_counted() {
    use crate::support::{fresh_namespace, redis_store_in, redis_url};
    use apikeyrouter_application::ports::{BudgetStore, Charge, KeyStore, UsageLedger};
    use apikeyrouter_domain::{Money, QuotaLimits, ReservationId, Timestamp};

    let url = redis_url();
    let namespace = fresh_namespace("proxy-reclaim");
    let store = redis_store_in(&namespace).await;
    let p = Proxy::start(
        &format!(
            "[store]\nkind = \"redis\"\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n\
             [routing]\ntotal_deadline_ms = 200\nreservation_lease_ms = 200\n"
        ),
        &[],
    )
    .await;
    let budget_id = store.list_budgets().await.unwrap()[0].id.clone();
    let key_id = store.list_keys().await.unwrap()[0].id.clone();
    assert!(
        p.metrics()
            .await
            .contains("apikeyrouter_reservations_reclaimed 0\n")
    );

    // Left a second ago by an instance that stopped before settling.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    store
        .reserve(&Charge {
            reservation: ReservationId(42),
            key_id,
            limits: QuotaLimits::default(),
            est_tokens: 100,
            est_cost: Money::from_usd(2.5),
            budget_ids: vec![budget_id],
            client: None,
            now: Timestamp::from_millis(now.as_millis() as u64 - 1_000),
        })
        .await
        .unwrap();

    let started = std::time::Instant::now();
    loop {
        let metrics = p.metrics().await;
        if metrics.contains("apikeyrouter_reservations_reclaimed 1\n") {
            assert!(
                metrics.contains("apikeyrouter_reservations_reclaimed_usd 2.5\n"),
                "{metrics}"
            );
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "not reclaimed within 3 s:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = &store
        .budget_statuses(Timestamp::from_millis(now.as_millis() as u64))
        .await
        .unwrap()[0];
    assert_eq!(status.reserved, Money::ZERO);
}

/// What a client sees when the upstreams fail: every key rate limited answers 429
/// with the provider's `Retry-After`, server errors 502, a provider too slow to start
/// answering 504; each in OpenAI's error shape.
#[tokio::test]
async fn upstream_failures_map_to_429_502_and_504() {
    use std::time::Duration;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let answer = |status: u16| {
        ResponseTemplate::new(status).set_body_json(json!({
            "error": {"message": "upstream says no", "type": "server_error"}
        }))
    };
    let limited = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(answer(429).insert_header("retry-after", "7"))
        .mount(&limited)
        .await;
    let broken = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(answer(500))
        .mount(&broken)
        .await;
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(answer(200).set_delay(Duration::from_secs(2)))
        .mount(&slow)
        .await;
    let mut extra = String::new();
    for (id, server) in [("limited", &limited), ("broken", &broken), ("slow", &slow)] {
        extra.push_str(&format!(
            r#"
[[providers]]
id = "{id}"
kind = "openai-compatible"
base_url = "{}/v1"
models = ["{id}-model"]
first_byte_timeout_ms = 200

[[keys]]
provider = "{id}"
material = "sk-{id}-test-0001"

[[keys]]
provider = "{id}"
material = "sk-{id}-test-0002"
"#,
            server.uri()
        ));
    }
    let p = Proxy::start(&extra, &[]).await;

    let r = p.chat(hello("limited-model"), None).await;
    let retry_after = r.headers().get("retry-after").cloned();
    let (status, body) = error_of(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("upstream_rate_limited")),
        "{body}"
    );
    assert_eq!(retry_after.unwrap(), "7");
    // Both keys now cool down: the next request is refused before any call, also 429.
    let (status, _) = error_of(p.chat(hello("limited-model"), None).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let (status, body) = error_of(p.chat(hello("broken-model"), None).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("upstream_failed")),
        "{body}"
    );

    let (status, body) = error_of(p.chat(hello("slow-model"), None).await).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
}

/// An OpenAI-compatible upstream that streams one word every 100 ms for three
/// seconds, over plain TCP: for a client that leaves long before the end.
async fn slow_streaming_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The request: headers, then as many body bytes as they announce.
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0..30 {
                    let chunk = json!({"id": "chatcmpl-slow", "object": "chat.completion.chunk",
                        "created": 1, "model": "slow-stream",
                        "choices": [{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]});
                    if socket
                        .write_all(format!("data: {chunk}\n\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let _ = socket.write_all(b"data: [DONE]\n\n").await;
            });
        }
    });
    addr
}

/// A client that leaves a stream long before its end: the proxy notices, stops, and
/// settles what was generated (audited as `client_disconnected`, counted in metrics).
#[tokio::test]
async fn a_client_leaving_a_long_stream_is_settled_as_disconnected() {
    use futures_util::StreamExt;
    let upstream = slow_streaming_upstream().await;
    let extra = compatible(
        "slow",
        "slow-stream",
        &format!("http://{upstream}"),
        "sk-slow-stream-0001",
        &thousand_dollar_price("slow-stream"),
    );
    let p = Proxy::start(&extra, &[]).await;
    let started = std::time::Instant::now();
    let r = p
        .client
        .post(p.url("/v1/chat/completions"))
        .header("x-request-id", "left-early-1")
        .json(&json!({"model": "slow-stream", "stream": true,
            "messages": [{"role": "user", "content": "take your time"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut bytes = r.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(bytes);

    let record = p.record_when_written("left-early-1").await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "settled only after the upstream's end"
    );
    assert_eq!(record["outcome"]["code"], "client_disconnected", "{record}");
    let billed = record["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(billed > 0, "{record}");
    // The whole stream is 200 bytes of text, about 50 tokens.
    assert!(billed < 25, "billed for most of the stream: {record}");
    let metrics = p.metrics().await;
    let counted = series(
        &metrics,
        "apikeyrouter_tokens_total{provider=\"slow\",model=\"slow-stream\",kind=\"completion\"}",
    );
    assert_eq!(counted, billed as f64);
    // Nothing stays reserved.
    let budgets = p.get_json("/api/v1/budgets").await;
    assert_eq!(
        budgets["data"][0]["reserved"].as_f64(),
        Some(0.0),
        "{budgets}"
    );
}

/// An upstream that echoes the key it was sent in its error bodies (as OpenAI does for
/// a wrong key) never gets that key to the client: not in the error answer, not in
/// the audit record, not in the key views of the management API.
#[tokio::test]
async fn a_key_echoed_by_the_upstream_never_reaches_the_client_or_the_audit() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

    /// Answers with `status` and a message quoting the request's bearer token.
    struct Echo(u16);
    impl Respond for Echo {
        fn respond(&self, request: &Request) -> ResponseTemplate {
            let auth = request
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .trim_start_matches("Bearer ")
                .to_owned();
            ResponseTemplate::new(self.0).set_body_json(json!({
                "error": {
                    "message": format!("Incorrect API key provided: {auth}. Key {auth} rejected."),
                    "type": "invalid_request_error"
                }
            }))
        }
    }

    const SECRETS: [&str; 3] = [
        "sk-echo401-secret-material-0001",
        "sk-echo500-secret-material-0002",
        "sk-echo400-secret-material-0003",
    ];
    let mut extra = String::new();
    let mut servers = Vec::new();
    for (status, secret) in [401, 500, 400].into_iter().zip(SECRETS) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(Echo(status))
            .mount(&server)
            .await;
        extra.push_str(&compatible(
            &format!("echo{status}"),
            &format!("echo{status}-model"),
            &server.uri(),
            secret,
            "",
        ));
        servers.push(server);
    }
    let p = Proxy::start(&extra, &[]).await;

    // The first 401 marks the only key invalid: the second request finds none.
    let expected = [
        (401, false, StatusCode::BAD_GATEWAY, "upstream_failed"),
        (
            401,
            true,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_eligible_key",
        ),
        (500, false, StatusCode::BAD_GATEWAY, "upstream_failed"),
        (500, true, StatusCode::BAD_GATEWAY, "upstream_failed"),
        (
            400,
            false,
            StatusCode::BAD_REQUEST,
            "provider_rejected_request",
        ),
        (
            400,
            true,
            StatusCode::BAD_REQUEST,
            "provider_rejected_request",
        ),
    ];
    let mut seen = String::new();
    for (upstream, stream, status, code) in expected {
        let mut body = hello(&format!("echo{upstream}-model"));
        body["stream"] = json!(stream);
        let r = p.chat(body, None).await;
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let (got, error) = error_of(r).await;
        assert_eq!((got, error["error"]["code"].as_str()), (status, Some(code)));
        seen.push_str(&error.to_string());
        let record = p.record_when_written(&id).await;
        assert_eq!(record["outcome"]["code"], code, "{record}");
        seen.push_str(&record.to_string());
    }
    seen.push_str(&p.get_json("/api/v1/keys").await.to_string());
    for secret in SECRETS {
        assert!(
            !seen.contains(secret),
            "{secret} reached the client: {seen}"
        );
    }
    assert!(seen.contains("[redacted]"), "the echo was expected: {seen}");
}

/// OpenAI's sampling options a client sets (`seed`, the penalties,
/// `parallel_tool_calls`, `user`) reach an OpenAI-compatible upstream as sent; a
/// penalty out of range and log probabilities, which replies never carry, are refused
/// with 400 naming the parameter, before any upstream call.
#[tokio::test]
async fn sampling_options_reach_the_upstream_and_unsupported_ones_are_refused() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(completion_json("compat-model", "Hello")),
        )
        .mount(&upstream)
        .await;
    let extra = compatible(
        "compat",
        "compat-model",
        &upstream.uri(),
        "sk-compat-test-0001",
        "",
    );
    let p = Proxy::start(&extra, &[]).await;

    let mut body = hello("compat-model");
    body["seed"] = json!(1234);
    body["presence_penalty"] = json!(0.5);
    body["frequency_penalty"] = json!(-1.0);
    body["parallel_tool_calls"] = json!(false);
    body["user"] = json!("end-user-42");
    body["tools"] = json!([{"type": "function", "function": {"name": "lookup"}}]);
    let r = p.chat(body.clone(), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let requests = upstream.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
    for (field, value) in [
        ("seed", json!(1234)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(-1.0)),
        ("parallel_tool_calls", json!(false)),
        ("user", json!("end-user-42")),
    ] {
        assert_eq!(sent[field], value, "{field} in {sent}");
    }

    let refusals = [
        ("frequency_penalty", json!(2.5), "invalid_request"),
        ("logprobs", json!(true), "unsupported_value"),
        ("top_logprobs", json!(3), "unsupported_value"),
    ];
    for (field, value, code) in refusals {
        let mut bad = hello("compat-model");
        bad[field] = value;
        let (status, error) = error_of(p.chat(bad, None).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
        let named = error["error"]["param"] == field
            || error["error"]["message"].as_str().unwrap().contains(field);
        assert!(named, "{field} not named: {error}");
    }
    // `logprobs: false` asks for nothing and is accepted.
    let mut plain = hello("compat-model");
    plain["logprobs"] = json!(false);
    assert_eq!(p.chat(plain, None).await.status(), StatusCode::OK);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
}
