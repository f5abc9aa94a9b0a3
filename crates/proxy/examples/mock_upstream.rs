//! An instant OpenAI-compatible upstream for load tests: answers every chat completion
//! with a fixed body, no work, TCP_NODELAY on.
//!
//! `cargo run --release -p apikeyrouter-proxy --example mock_upstream -- 127.0.0.1:9100`

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::serve::ListenerExt;

const BODY: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;

async fn chat() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], BODY)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("mock upstream on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().route("/v1/chat/completions", post(chat));
    axum::serve(listener, app).await?;
    Ok(())
}
