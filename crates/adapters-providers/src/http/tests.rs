//! Tests of the shared HTTP plumbing: header parsing, error classification, message
//! scrubbing, timeouts and server-sent events, against local servers only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apikeyrouter_domain::{FailureKind, KeyMaterial, QuotaObservation, Timestamp};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::errors::classify_body;
use super::*;

/// Sends a request of `method` to `url` with `client`.
async fn call(
    client: &HttpClient,
    method: Method,
    url: &str,
) -> Result<Response, apikeyrouter_application::ports::ProviderError> {
    let request = request(method, parse_uri(url)?, [], None::<&()>)?;
    client.send(request).await
}

/// 2024-06-01T00:00:00Z.
const NOW_MS: u64 = 1_717_200_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(NOW_MS)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn at(offset: Duration) -> Timestamp {
    Timestamp::from_millis(NOW_MS).plus(offset)
}

#[test]
fn retry_after_reads_seconds_dates_and_milliseconds() {
    let check = |pairs: &[(&str, &str)], expected: Option<Duration>| {
        assert_eq!(retry_after(&headers(pairs), now()), expected, "{pairs:?}");
    };
    check(&[("retry-after", "20")], Some(Duration::from_secs(20)));
    check(
        &[("retry-after", " 1.5 ")],
        Some(Duration::from_millis(1_500)),
    );
    check(
        &[("retry-after", "Sat, 01 Jun 2024 00:00:30 GMT")],
        Some(Duration::from_secs(30)),
    );
    check(
        &[("retry-after", "Fri, 31 May 2024 23:00:00 GMT")],
        Some(Duration::ZERO),
    );
    check(
        &[("retry-after-ms", "250"), ("retry-after", "1")],
        Some(Duration::from_millis(250)),
    );
    check(&[("retry-after", "soon")], None);
    check(&[("retry-after", "-3")], None);
    check(&[], None);
}

#[test]
fn go_durations_parse_as_openai_sends_them() {
    let check = |text: &str, expected: Option<Duration>| {
        assert_eq!(parse_go_duration(text), expected, "{text}");
    };
    check("1s", Some(Duration::from_secs(1)));
    check("6m0s", Some(Duration::from_secs(360)));
    check("20ms", Some(Duration::from_millis(20)));
    check("1h2m3.5s", Some(Duration::from_millis(3_723_500)));
    check("2m59.56s", Some(Duration::from_millis(179_560)));
    check("0s", Some(Duration::ZERO));
    check("1d", Some(Duration::from_secs(86_400)));
    check("7", Some(Duration::from_secs(7)));
    check("", None);
    check("1x", None);
    check("s", None);
    check("1h-2m", None);
}

#[test]
fn openai_rate_limit_headers_become_an_observation() {
    let observed = openai_quota(
        &headers(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "29000.0"),
            ("x-ratelimit-reset-tokens", "1m30s"),
        ]),
        now(),
    );
    assert_eq!(
        observed,
        Some(QuotaObservation {
            limit_requests: Some(500),
            remaining_requests: Some(499),
            reset_requests_at: Some(at(Duration::from_millis(120))),
            limit_tokens: Some(30_000),
            remaining_tokens: Some(29_000),
            reset_tokens_at: Some(at(Duration::from_secs(90))),
        })
    );
    assert_eq!(openai_quota(&headers(&[("x-other", "1")]), now()), None);
    let partial = openai_quota(&headers(&[("x-ratelimit-remaining-tokens", "7")]), now());
    assert_eq!(partial.and_then(|q| q.remaining_tokens), Some(7));
}

#[test]
fn rfc3339_times_parse_with_fractions_and_offsets() {
    let check = |text: &str, expected: Option<u64>| {
        assert_eq!(
            parse_rfc3339(text).map(Timestamp::as_millis),
            expected,
            "{text}"
        );
    };
    check("2024-06-01T00:00:00Z", Some(NOW_MS));
    check("2024-06-01T00:00:30.5Z", Some(NOW_MS + 30_500));
    check("2024-06-01T00:00:30.123456789Z", Some(NOW_MS + 30_123));
    check("2024-06-01T02:00:00+02:00", Some(NOW_MS));
    check("2024-05-31T19:30:00-04:30", Some(NOW_MS));
    check("2024-06-01t00:00:00z", Some(NOW_MS));
    check("1970-01-01T00:00:00Z", Some(0));
    check("2000-02-29T12:00:00Z", Some(951_825_600_000));
    check("2024-06-01T00:00:00", None);
    check("2024-13-01T00:00:00Z", None);
    check("2024-06-01T00:00:00.Z", None);
    check("2024-06-01T00:00:00Zjunk", None);
    check("1969-12-31T23:59:59Z", None);
    check("not a date", None);
    check("", None);
}

#[test]
fn anthropic_rate_limit_headers_become_an_observation() {
    let observed = anthropic_quota(
        &headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2024-06-01T00:00:01Z"),
            ("anthropic-ratelimit-tokens-limit", "40000"),
            ("anthropic-ratelimit-tokens-remaining", "39000"),
            (
                "anthropic-ratelimit-tokens-reset",
                "2024-06-01T00:00:02.500Z",
            ),
            ("anthropic-ratelimit-input-tokens-limit", "1"),
        ]),
        now(),
    );
    assert_eq!(
        observed,
        Some(QuotaObservation {
            limit_requests: Some(50),
            remaining_requests: Some(49),
            reset_requests_at: Some(at(Duration::from_secs(1))),
            limit_tokens: Some(40_000),
            remaining_tokens: Some(39_000),
            reset_tokens_at: Some(at(Duration::from_millis(2_500))),
        })
    );
    let input_only = anthropic_quota(
        &headers(&[
            ("anthropic-ratelimit-input-tokens-limit", "20000"),
            ("anthropic-ratelimit-input-tokens-remaining", "100"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2024-06-01T00:01:00Z",
            ),
        ]),
        now(),
    );
    assert_eq!(
        input_only,
        Some(QuotaObservation {
            limit_tokens: Some(20_000),
            remaining_tokens: Some(100),
            reset_tokens_at: Some(at(Duration::from_secs(60))),
            ..QuotaObservation::default()
        })
    );
    assert_eq!(anthropic_quota(&HeaderMap::new(), now()), None);
    assert_eq!(no_quota(&HeaderMap::new(), now()), None);
}

#[test]
fn error_bodies_classify_per_provider() {
    use FailureKind::*;
    let table: &[(u16, &str, FailureKind)] = &[
        // OpenAI
        (
            429,
            r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            RateLimited,
        ),
        (
            429,
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
            QuotaExhausted,
        ),
        (
            401,
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            Unauthorized,
        ),
        (
            400,
            r#"{"error":{"message":"maximum context length","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            BadRequest,
        ),
        (
            404,
            r#"{"error":{"message":"model not found","type":"invalid_request_error","code":"model_not_found"}}"#,
            BadRequest,
        ),
        (
            500,
            r#"{"error":{"message":"internal","type":"server_error","code":null}}"#,
            ServerError,
        ),
        (503, "<html>Service Unavailable</html>", ServerError),
        (502, "", ServerError),
        (504, "", Timeout),
        // Anthropic
        (
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ServerError,
        ),
        (
            429,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            RateLimited,
        ),
        (
            401,
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            Unauthorized,
        ),
        (
            403,
            r#"{"type":"error","error":{"type":"permission_error","message":"no access"}}"#,
            Unauthorized,
        ),
        (
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#,
            BadRequest,
        ),
        // Gemini
        (
            429,
            r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED"}}"#,
            QuotaExhausted,
        ),
        (
            429,
            r#"{"error":{"code":429,"message":"Quota exceeded for metric: generate_content_free_tier_requests","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]}]}}"#,
            RateLimited,
        ),
        (
            429,
            r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#,
            RateLimited,
        ),
        (
            401,
            r#"{"error":{"code":401,"message":"no","status":"UNAUTHENTICATED"}}"#,
            Unauthorized,
        ),
        (
            403,
            r#"{"error":{"code":403,"message":"no","status":"PERMISSION_DENIED"}}"#,
            Unauthorized,
        ),
        (
            400,
            r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT","details":[{"reason":"API_KEY_INVALID"}]}}"#,
            Unauthorized,
        ),
        (
            400,
            r#"{"error":{"code":400,"message":"bad field","status":"INVALID_ARGUMENT"}}"#,
            BadRequest,
        ),
        (
            429,
            r#"[{"error":{"code":429,"message":"slow","status":"RESOURCE_EXHAUSTED"}}]"#,
            RateLimited,
        ),
        // Errors inside a 200 body
        (
            200,
            r#"{"error":{"message":"boom","type":"server_error"}}"#,
            ServerError,
        ),
        (
            200,
            r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#,
            BadRequest,
        ),
        (
            200,
            r#"{"error":{"message":"q","code":"insufficient_quota"}}"#,
            QuotaExhausted,
        ),
        // Loose shapes
        (429, r#"{"error":"slow down"}"#, RateLimited),
        (402, r#"{"detail":"pay up"}"#, QuotaExhausted),
    ];
    for (status, body, expected) in table {
        assert_eq!(classify_body(*status, body), *expected, "{status} {body}");
    }
}

#[test]
fn error_parts_carry_status_message_retry_and_quota() {
    let quota = QuotaObservation {
        remaining_requests: Some(0),
        ..QuotaObservation::default()
    };
    let error = error_from_parts(
        429,
        &headers(&[("retry-after", "7")]),
        br#"{"error":{"message":"Rate limit reached for gpt-4o","type":"requests","code":"rate_limit_exceeded"}}"#,
        Some(quota),
        now(),
    );
    assert_eq!(error.kind, FailureKind::RateLimited);
    assert_eq!(error.status, Some(429));
    assert_eq!(error.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(error.quota, Some(quota));
    assert_eq!(
        error.message,
        "rate_limit_exceeded: Rate limit reached for gpt-4o"
    );

    let gemini = error_from_parts(
        429,
        &HeaderMap::new(),
        br#"{"error":{"code":429,"message":"slow","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"37s"}]}}"#,
        None,
        now(),
    );
    assert_eq!(gemini.retry_after, Some(Duration::from_secs(37)));
    assert_eq!(gemini.message, "RESOURCE_EXHAUSTED: slow");

    let html = error_from_parts(
        502,
        &HeaderMap::new(),
        b"<html>\n  <body>Bad   Gateway</body>\n</html>",
        None,
        now(),
    );
    assert_eq!(html.message, "<html> <body>Bad Gateway</body> </html>");
    let empty = error_from_parts(503, &HeaderMap::new(), b"", None, now());
    assert_eq!(empty.message, "service unavailable");
}

#[test]
fn messages_are_scrubbed_of_keys_and_truncated() {
    let secret = "sk-proj-abcdefghijklmnop1234567890WXYZ";
    let message = format!("Incorrect API key provided: {secret}. See docs.");
    let scrubbed = scrub_message(&message);
    assert!(!scrubbed.contains(secret), "{scrubbed}");
    assert!(scrubbed.contains("[redacted]...WXYZ"), "{scrubbed}");
    assert!(scrubbed.ends_with(". See docs."), "{scrubbed}");

    let gemini_key = "AIzaSyA1234567890abcdefghijklmnopqrstu";
    assert!(!scrub_message(&format!("key={gemini_key}")).contains(gemini_key));
    assert_eq!(scrub_message("plain words stay"), "plain words stay");

    let long = "é".repeat(2_000);
    let truncated = scrub_message(&long);
    assert_eq!(truncated.chars().count(), MAX_MESSAGE_CHARS);
    assert!(truncated.ends_with("..."));

    let material = KeyMaterial::parse("short-key-1").unwrap();
    let error = redact_key(
        apikeyrouter_application::ports::ProviderError::new(
            FailureKind::Unauthorized,
            "bad key short-key-1 given",
        ),
        &material,
    );
    assert_eq!(error.message, "bad key [redacted] given");
}

#[tokio::test]
async fn refused_connection_is_a_network_error_without_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let client = HttpClient::new(&HttpSettings::default()).unwrap();
    let url = format!("http://{address}/v1/models?key=secret-in-query");
    let error = call(&client, Method::GET, &url).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Network, "{error}");
    assert!(!error.message.contains("secret-in-query"), "{error}");
    assert!(!error.message.contains("/v1/models"), "{error}");
}

#[tokio::test]
async fn slow_headers_time_out() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let settings = HttpSettings {
        first_byte_timeout: Duration::from_millis(100),
        ..HttpSettings::default()
    };
    let client = HttpClient::new(&settings).unwrap();
    let error = call(&client, Method::GET, &server.uri()).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
    assert_eq!(error.status, None);
}

#[tokio::test]
async fn total_timeout_is_a_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let settings = HttpSettings {
        total_timeout: Duration::from_millis(100),
        ..HttpSettings::default()
    };
    let client = HttpClient::new(&settings).unwrap();
    let error = call(&client, Method::GET, &server.uri()).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
}

#[tokio::test]
async fn error_response_is_read_and_classified() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "3")
                .insert_header("x-ratelimit-remaining-requests", "0")
                .set_body_raw(
                    r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
                    "application/json",
                ),
        )
        .mount(&server)
        .await;
    let settings = HttpSettings::default();
    let client = HttpClient::new(&settings).unwrap();
    let response = call(&client, Method::POST, &server.uri()).await.unwrap();
    assert!(expect_content_type(&response, "application/json").is_ok());
    let error = error_from_response(response, openai_quota).await;
    assert_eq!(error.kind, FailureKind::QuotaExhausted);
    assert_eq!(error.status, Some(429));
    assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
    assert_eq!(error.quota.and_then(|q| q.remaining_requests), Some(0));
}

#[tokio::test]
async fn unexpected_content_type_is_a_server_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw("<html></html>", "text/html"))
        .mount(&server)
        .await;
    let settings = HttpSettings::default();
    let client = HttpClient::new(&settings).unwrap();
    let response = call(&client, Method::GET, &server.uri()).await.unwrap();
    let error = expect_content_type(&response, "application/json").unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError);
    assert_eq!(error.status, Some(200));
    assert!(error.message.contains("text/html"), "{error}");
    assert!(expect_content_type(&response, "TEXT/HTML").is_ok());
}

async fn sse_response(body: &'static str, settings: &HttpSettings) -> (MockServer, Response) {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(body, "text/event-stream"))
        .mount(&server)
        .await;
    let client = HttpClient::new(settings).unwrap();
    let response = call(&client, Method::GET, &server.uri()).await.unwrap();
    (server, response)
}

#[tokio::test]
async fn sse_events_are_parsed_with_names() {
    let settings = HttpSettings::default();
    let (_server, response) = sse_response(
        ": keep-alive\n\nevent: message_start\ndata: {\"a\":1}\n\ndata: line one\ndata: line two\n\ndata: [DONE]\n\n",
        &settings,
    )
    .await;
    let events: Vec<_> = sse_stream(response).collect().await;
    let events: Vec<SseEvent> = events.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        events,
        vec![
            SseEvent {
                event: Some("message_start".to_owned()),
                data: "{\"a\":1}".to_owned()
            },
            SseEvent {
                event: None,
                data: "line one\nline two".to_owned()
            },
            SseEvent {
                event: None,
                data: "[DONE]".to_owned()
            },
        ]
    );
}

#[tokio::test]
async fn sse_body_ending_mid_event_is_an_error() {
    let settings = HttpSettings::default();
    let (_server, response) = sse_response("data: {\"x\":1}\n\ndata: {\"trunc", &settings).await;
    let events: Vec<_> = sse_stream(response).collect().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].as_ref().unwrap().data, "{\"x\":1}");
    let error = events[1].as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Network);
    assert!(
        error
            .message
            .starts_with("truncated or malformed event stream"),
        "{error}"
    );
}

/// A server that sends SSE headers and one event, then stays silent with the
/// connection open.
async fn stalling_sse_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0_u8; 4096];
        let _ = socket.read(&mut request).await.unwrap();
        socket
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                  d\r\ndata: first\n\n\r\n",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(socket);
    });
    address
}

#[tokio::test]
async fn silent_event_stream_times_out() {
    let address = stalling_sse_server().await;
    let settings = HttpSettings {
        first_byte_timeout: Duration::from_millis(200),
        ..HttpSettings::default()
    };
    let client = HttpClient::new(&settings).unwrap();
    let response = call(&client, Method::GET, &format!("http://{address}/"))
        .await
        .unwrap();
    let events: Vec<_> = sse_stream(response).collect().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].as_ref().unwrap().data, "first");
    let error = events[1].as_ref().unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout);
    assert!(error.message.contains("stalled for 200 ms"), "{error}");
}

/// A server that answers once with a chunked body sent as three separate writes.
async fn chunked_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0_u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            let pieces: [&[u8]; 4] = [
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n",
                b"3\r\n123\r\n",
                b"1\r\n}\r\n",
                b"0\r\n\r\n",
            ];
            for piece in pieces {
                socket.write_all(piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    address
}

#[tokio::test]
async fn a_body_in_pieces_is_joined_and_bounded() {
    let address = chunked_server().await;
    let client = HttpClient::new(&HttpSettings::default()).unwrap();
    let url = format!("http://{address}/");
    let response = call(&client, Method::GET, &url).await.unwrap();
    let body = read_body(response, MAX_BODY_BYTES).await.unwrap();
    assert_eq!(&body[..], br#"{"a":123}"#);
    let response = call(&client, Method::GET, &url).await.unwrap();
    let error = read_body(response, 8).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::ServerError, "{error}");
    assert!(error.message.contains("larger than 8 bytes"), "{error}");
    assert_eq!(error.status, Some(200));
}

#[tokio::test]
async fn a_body_still_arriving_at_the_total_timeout_is_cut() {
    let address = stalling_sse_server().await;
    let settings = HttpSettings {
        total_timeout: Duration::from_millis(300),
        ..HttpSettings::default()
    };
    let client = HttpClient::new(&settings).unwrap();
    let response = call(&client, Method::GET, &format!("http://{address}/"))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = read_body(response, MAX_BODY_BYTES).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");
    assert!(error.message.contains("total timeout of 300 ms"), "{error}");
    assert_eq!(error.status, Some(200));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn timestamps_are_milliseconds_since_the_epoch() {
    assert_eq!(timestamp(now()).as_millis(), NOW_MS);
    assert_eq!(
        timestamp(UNIX_EPOCH - Duration::from_secs(1)),
        Timestamp::EPOCH
    );
}
