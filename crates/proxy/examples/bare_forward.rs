//! The floor of the proxy benchmark: an axum server that forwards each chat completion
//! to one upstream with a pooled hyper client and parses and re-serialises both JSON
//! bodies, with no routing, accounting, audit or metrics. `cargo xtask bench proxy`
//! runs it next to the proxy, so the report shows what the HTTP and JSON layers alone
//! cost on the machine.
//!
//! `cargo run --release -p apikeyrouter-proxy --example bare_forward -- 127.0.0.1:9102 http://127.0.0.1:9100/v1/chat/completions`

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
}

async fn forward(State(up): State<Upstream>, body: Bytes) -> Response {
    match exchange(&up, &body).await {
        Ok(answer) => ([(header::CONTENT_TYPE, "application/json")], answer).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn exchange(up: &Upstream, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let request: serde_json::Value = serde_json::from_slice(body)?;
    let outgoing = hyper::Request::post(up.uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer sk-bare-forward")
        .body(Full::new(Bytes::from(serde_json::to_vec(&request)?)))?;
    let response = up.client.request(outgoing).await?;
    let answer = response.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    Ok(serde_json::to_vec(&answer)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9102".to_owned());
    let upstream = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9100/v1/chat/completions".to_owned());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let state = Upstream {
        client: Client::builder(TokioExecutor::new()).build(connector),
        uri: upstream.parse()?,
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("bare forwarder on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}
