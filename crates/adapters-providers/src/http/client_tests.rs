//! Tests of the client's transport: TLS with HTTP/2 through ALPN, certificate
//! checks, and proxies (a `CONNECT` tunnel for `https`, absolute form for `http`),
//! against a local HTTPS server with a test certificate authority and a local proxy;
//! and the connection lanes.

use std::net::SocketAddr;
use std::sync::Arc;

use apikeyrouter_domain::FailureKind;
use bytes::Bytes;
use http::{Method, Version};
use http_body_util::Full;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::client::HttpClient;
use super::{HttpSettings, MAX_BODY_BYTES, parse_uri, read_body, request};

const CA: &[u8] = include_bytes!("testdata/ca.pem");
const CERT: &[u8] = include_bytes!("testdata/localhost.pem");
const KEY: &[u8] = include_bytes!("testdata/localhost.key");

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client that trusts only the test certificate authority.
fn trusting_client(proxies: Matcher) -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(CA).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    HttpClient::with_parts(&HttpSettings::default(), tls, proxies)
}

fn tls_acceptor(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(CERT).unwrap()],
            PrivateKeyDer::from_pem_slice(KEY).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// An HTTPS server for `localhost` offering HTTP/2 and HTTP/1.1; it answers each
/// request with its protocol version and path.
async fn https_server() -> SocketAddr {
    let acceptor = tls_acceptor(&[b"h2", b"http/1.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A failed handshake (the untrusting client) just ends the connection.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let text = format!("{:?} {}", req.version(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        text,
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    address
}

/// A forward proxy: it reports each request head it receives, opens `CONNECT`
/// tunnels to 127.0.0.1 at the requested port, and answers plain requests itself
/// with `proxied`.
async fn proxy_server() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    proxy_server_with(None).await
}

/// [`proxy_server`], spoken over TLS (an `https://` proxy) when given an acceptor.
async fn proxy_server_with(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (heads, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let heads = heads.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            serve_proxy(stream, heads).await;
                        }
                    }
                    None => serve_proxy(tcp, heads).await,
                }
            });
        }
    });
    (address, received)
}

async fn serve_proxy<S>(mut client: S, heads: mpsc::UnboundedSender<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let _ = heads.send(head.clone());
    if let Some(target) = head.strip_prefix("CONNECT ") {
        let port = target
            .split_whitespace()
            .next()
            .and_then(|authority| authority.rsplit_once(':'))
            .map(|(_, port)| port.to_owned())
            .unwrap_or_default();
        let Ok(mut upstream) = TcpStream::connect(format!("127.0.0.1:{port}")).await else {
            return;
        };
        let _ = client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    } else {
        let _ = client
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nproxied")
            .await;
    }
}

async fn get_text(client: &HttpClient, url: &str) -> (Version, String) {
    let request = request(Method::GET, parse_uri(url).unwrap(), [], None::<&()>).unwrap();
    let response = client.send(request).await.unwrap();
    let version = response.version();
    let body = read_body(response, MAX_BODY_BYTES).await.unwrap();
    (version, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn https_negotiates_http2_with_a_trusted_server() {
    let server = https_server().await;
    let client = trusting_client(Matcher::builder().build());
    let url = format!("https://localhost:{}/v1/models", server.port());
    let (version, body) = get_text(&client, &url).await;
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(body, "HTTP/2.0 /v1/models");
    // The pooled connection serves the next request too.
    assert_eq!(get_text(&client, &url).await.1, "HTTP/2.0 /v1/models");
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_network_error() {
    let server = https_server().await;
    // The production constructor: the platform's trust store, which does not know the
    // test authority.
    let client = HttpClient::new(&HttpSettings::default()).unwrap();
    let url = format!("https://localhost:{}/v1/models", server.port());
    let request = request(Method::GET, parse_uri(&url).unwrap(), [], None::<&()>).unwrap();
    let error = client.send(request).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Network, "{error}");
    assert!(error.message.contains("certificate"), "{error}");
    assert!(!error.message.contains("/v1/models"), "{error}");
}

#[tokio::test]
async fn https_through_a_proxy_uses_an_authenticated_connect_tunnel() {
    let server = https_server().await;
    let (proxy, mut heads) = proxy_server().await;
    let proxies = Matcher::builder()
        .https(format!("http://user:secret@{proxy}"))
        .build();
    let client = trusting_client(proxies);
    let url = format!("https://localhost:{}/v1/models", server.port());
    let (version, body) = get_text(&client, &url).await;
    assert_eq!(
        (version, body.as_str()),
        (Version::HTTP_2, "HTTP/2.0 /v1/models")
    );
    let head = heads.recv().await.unwrap();
    assert!(
        head.starts_with(&format!("CONNECT localhost:{} HTTP/1.1\r\n", server.port())),
        "{head}"
    );
    let head = head.to_ascii_lowercase();
    // base64("user:secret")
    assert!(
        head.contains("proxy-authorization: basic dxnlcjpzzwnyzxq="),
        "{head}"
    );
    assert!(head.contains("user-agent: apikeyrouter/"), "{head}");
}

#[tokio::test]
async fn an_https_proxy_is_reached_over_tls() {
    let server = https_server().await;
    let (proxy, mut heads) = proxy_server_with(Some(tls_acceptor(&[b"http/1.1"]))).await;
    let proxies = Matcher::builder()
        .https(format!("https://localhost:{}", proxy.port()))
        .http(format!("https://localhost:{}", proxy.port()))
        .build();
    let client = trusting_client(proxies);
    let url = format!("https://localhost:{}/v1/models", server.port());
    let (_, body) = get_text(&client, &url).await;
    assert_eq!(body, "HTTP/2.0 /v1/models");
    assert!(heads.recv().await.unwrap().starts_with("CONNECT "));
    let (_, body) = get_text(&client, "http://upstream.invalid/v1/models").await;
    assert_eq!(body, "proxied");
    assert!(
        heads
            .recv()
            .await
            .unwrap()
            .starts_with("GET http://upstream.invalid/v1/models HTTP/1.1\r\n")
    );
}

#[tokio::test]
async fn the_connect_timeout_covers_a_stalled_tls_handshake() {
    // Accepts TCP connections and never answers the TLS hello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let settings = HttpSettings {
        connect_timeout: std::time::Duration::from_millis(200),
        ..HttpSettings::default()
    };
    let client = HttpClient::new(&settings).unwrap();
    let url = format!("https://localhost:{port}/v1/models");
    let request = request(Method::GET, parse_uri(&url).unwrap(), [], None::<&()>).unwrap();
    let started = std::time::Instant::now();
    let error = client.send(request).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
    assert!(error.message.contains("connect timed out"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn a_redirect_is_a_bad_request_that_hides_the_location() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(307).insert_header(
            "location",
            "https://elsewhere.invalid/v1?key=sk-in-location",
        ))
        .mount(&server)
        .await;
    let client = trusting_client(Matcher::builder().build());
    let url = format!("{}/v1/chat/completions", server.uri());
    let request = request(Method::POST, parse_uri(&url).unwrap(), [], Some(&"{}")).unwrap();
    let response = client.send(request).await.unwrap();
    let error = super::error_from_response(response, super::no_quota).await;
    assert_eq!(error.kind, FailureKind::BadRequest, "{error}");
    assert_eq!(error.status, Some(307));
    assert!(error.message.contains("redirect"), "{error}");
    assert!(!error.message.contains("sk-in-location"), "{error}");
    assert!(!error.message.contains("elsewhere"), "{error}");
}

#[test]
fn every_adapter_refuses_a_base_url_with_credentials_when_built() {
    let base = "https://user:hunter2@api.example.com/v1";
    let settings = HttpSettings::default();
    let errors = [
        crate::openai::OpenAiProvider::new(base, settings).err(),
        crate::openai_compatible::OpenAiCompatibleProvider::new(base, settings).err(),
        crate::openai_compatible::OpenAiCompatibleProvider::azure(
            "https://user:hunter2@res.openai.azure.com",
            crate::openai_compatible::AzureSettings::new("2024-10-21"),
            settings,
        )
        .err(),
        crate::anthropic::AnthropicProvider::new(base, settings).err(),
        crate::gemini::GeminiProvider::new(base, settings).err(),
    ];
    for error in errors {
        let error = error.expect("a base url with credentials was accepted");
        assert_eq!(error.kind, FailureKind::BadRequest, "{error}");
        assert!(!error.message.contains("hunter2"), "{error}");
    }
}

#[test]
fn credentials_in_a_url_are_refused_without_echoing_them() {
    let error = parse_uri("https://user:hunter2@api.example.com/v1").unwrap_err();
    assert_eq!(error.kind, FailureKind::BadRequest);
    assert!(!error.message.contains("hunter2"), "{error}");
    assert!(parse_uri("https://api.example.com/v1?a=b@c").is_ok());
}

#[tokio::test]
async fn http_through_a_proxy_is_sent_in_absolute_form_with_credentials() {
    let (proxy, mut heads) = proxy_server().await;
    let proxies = Matcher::builder()
        .http(format!("http://user:secret@{proxy}"))
        .build();
    let client = trusting_client(proxies);
    let (_, body) = get_text(&client, "http://upstream.invalid/v1/models?x=1").await;
    assert_eq!(body, "proxied");
    let head = heads.recv().await.unwrap();
    assert!(
        head.starts_with("GET http://upstream.invalid/v1/models?x=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authorization: basic dxnlcjpzzwnyzxq="),
        "{head}"
    );
}

#[tokio::test]
async fn no_proxy_hosts_are_reached_directly() {
    let (proxy, mut heads) = proxy_server().await;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string("direct"))
        .mount(&server)
        .await;
    let proxies = Matcher::builder()
        .http(format!("http://{proxy}"))
        .no("127.0.0.1")
        .build();
    let client = trusting_client(proxies);
    let (_, body) = get_text(&client, &server.uri()).await;
    assert_eq!(body, "direct");
    assert!(heads.try_recv().is_err(), "the proxy saw a request");
}

/// An HTTP/2-only server that refuses its first `refusals` streams with
/// `REFUSED_STREAM` and answers the next with `200 served`; it reports each stream.
async fn refusing_h2_server(refusals: usize) -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let acceptor = tls_acceptor(&[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (streams, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let mut served = 0;
        while let Some(Ok((_request, mut respond))) = connection.accept().await {
            let _ = streams.send(());
            if served < refusals {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            } else {
                let response = http::Response::new(());
                let mut body = respond.send_response(response, false).unwrap();
                body.send_data(Bytes::from_static(b"served"), true).unwrap();
            }
            served += 1;
        }
    });
    (address, seen)
}

#[tokio::test]
async fn a_refused_http2_stream_is_sent_again() {
    let (server, mut streams) = refusing_h2_server(2).await;
    let client = trusting_client(Matcher::builder().build());
    let url = format!("https://localhost:{}/v1/models", server.port());
    let (version, body) = get_text(&client, &url).await;
    assert_eq!((version, body.as_str()), (Version::HTTP_2, "served"));
    let mut seen = 0;
    while streams.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 3, "two refusals, then the answer");
}

#[tokio::test]
async fn a_server_refusing_every_try_is_a_network_error() {
    let (server, mut streams) = refusing_h2_server(usize::MAX).await;
    let client = trusting_client(Matcher::builder().build());
    let url = format!("https://localhost:{}/v1/models", server.port());
    let request = request(Method::GET, parse_uri(&url).unwrap(), [], None::<&()>).unwrap();
    let error = client.send(request).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Network, "{error}");
    assert!(error.message.contains("refused"), "{error}");
    let mut seen = 0;
    while streams.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 3, "the request and two resends");
}

/// An HTTP/2-only server whose first connection, spoken frame by frame, answers the
/// first request's `HEADERS` with a graceful `GOAWAY` (`NO_ERROR`, last stream 0: the
/// request was not processed); later connections answer `200 served`. Reports each
/// connection.
async fn going_away_h2_server() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    const PREFACE_LEN: usize = 24;
    const HEADERS: u8 = 0x1;
    const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    const GOAWAY: [u8; 17] = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let acceptor = tls_acceptor(&[b"h2"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (connections, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = connections.send(());
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut preface = [0u8; PREFACE_LEN];
        tls.read_exact(&mut preface).await.unwrap();
        tls.write_all(&SETTINGS).await.unwrap();
        loop {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await.unwrap();
            if head[3] == HEADERS {
                break;
            }
        }
        tls.write_all(&GOAWAY).await.unwrap();
        tls.flush().await.unwrap();
        // Held open until the client lets go of it, so the GOAWAY is what it sees.
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;

        let (tcp, _) = listener.accept().await.unwrap();
        let _ = connections.send(());
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((_request, mut respond))) = connection.accept().await {
            let mut body = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            body.send_data(Bytes::from_static(b"served"), true).unwrap();
        }
    });
    (address, seen)
}

#[tokio::test]
async fn a_request_a_server_went_away_before_processing_is_sent_again() {
    let (server, mut connections) = going_away_h2_server().await;
    let client = trusting_client(Matcher::builder().build());
    let url = format!("https://localhost:{}/v1/models", server.port());
    let (version, body) = get_text(&client, &url).await;
    assert_eq!((version, body.as_str()), (Version::HTTP_2, "served"));
    let mut seen = 0;
    while connections.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 2, "the connection that went away, then a new one");
}

/// A plain HTTP/1.1 server answering `200 ok` that counts the connections it accepts.
async fn counting_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let answer = hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), answer)
                    .await;
            });
        }
    });
    (address, accepted)
}

/// Runs `get_text` twice on a thread of its own (its own runtime), on connection lane
/// `lane`.
async fn two_gets_on_a_thread(client: &HttpClient, url: &str, lane: usize) {
    let (client, url) = (client.clone(), url.to_owned());
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        super::use_connection_lane(lane);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert_eq!(get_text(&client, &url).await.1, "ok");
            assert_eq!(get_text(&client, &url).await.1, "ok");
        });
        let _ = done.send(());
    });
    finished.await.unwrap();
}

/// Each connection lane has a pool of its own: a thread on another lane opens a
/// connection of its own although lane 0 holds an idle one, and reuses it.
#[tokio::test]
async fn each_connection_lane_keeps_its_own_pool() {
    use std::sync::atomic::Ordering::SeqCst;

    let (address, accepted) = counting_server().await;
    let client = trusting_client(Matcher::builder().build());
    let url = format!("http://{address}/");
    assert_eq!(get_text(&client, &url).await.1, "ok");
    assert_eq!(get_text(&client, &url).await.1, "ok");
    assert_eq!(accepted.load(SeqCst), 1, "lane 0 reuses its connection");

    two_gets_on_a_thread(&client, &url, 3).await;
    assert_eq!(
        accepted.load(SeqCst),
        2,
        "lane 3 opens a connection of its own"
    );
}

/// Threads that chose no lane use lane 0's pool (so the shared runtime has one pool),
/// and lane numbers wrap around the client's other lanes, never onto lane 0. (Which pool, not
/// which connection: reuse across threads depends on when the connection is back.)
#[test]
fn threads_of_no_lane_share_lane_0_and_lanes_wrap() {
    let client = trusting_client(Matcher::builder().build());
    let pool_on = |lane: Option<usize>| {
        let client = client.clone();
        std::thread::spawn(move || {
            if let Some(lane) = lane {
                super::use_connection_lane(lane);
            }
            client.pool_address()
        })
        .join()
        .unwrap()
    };
    let lane_0 = client.pool_address();
    assert_eq!(pool_on(None), lane_0);
    assert_eq!(pool_on(Some(0)), lane_0);
    let lane_3 = pool_on(Some(3));
    assert_ne!(lane_3, lane_0);
    assert_eq!(pool_on(Some(3)), lane_3);
    assert_eq!(pool_on(Some(3 + super::client::MAX_LANES - 1)), lane_3);
    assert_ne!(pool_on(Some(super::client::MAX_LANES)), lane_0);
}
