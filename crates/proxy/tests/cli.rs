//! The `apikeyrouter` command as a user runs it: `check`, `serve` with a config file,
//! reload on SIGHUP (with a request in flight), 10,000 connections at once, graceful
//! shutdown on SIGTERM, the per-core runtime, `serve` without a config, and `demo`;
//! reloads judged by the address in use, SIGHUP without a file.

#![expect(clippy::unwrap_used, clippy::panic, reason = "test code")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_apikeyrouter");

const CONFIG: &str = r#"
listen = "127.0.0.1:0"

[admin]
token_env = "TEST_ADMIN_TOKEN"

[[providers]]
id = "openai"
kind = "simulated"
models = ["gpt-4o"]

[[keys]]
provider = "openai"
material_env = "TEST_OPENAI_KEY"
metadata = { tenant = "acme", rpm = 100 }
"#;

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn envs(cmd: &mut Command) -> &mut Command {
    cmd.env("TEST_ADMIN_TOKEN", "admin-token-cli-1")
        .env("TEST_OPENAI_KEY", "sk-cli-secret-key-9876")
        .env("RUST_LOG", "warn")
}

/// Minimal HTTP/1.1 request over a fresh connection; returns status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = http_with(addr, method, path, "", body);
    (status, body)
}

/// [`http`] with `extra` header lines (each ending in `\r\n`); returns status, head
/// and body.
fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-token-cli-1\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(config: &PathBuf) -> Server {
    let mut child = envs(Command::new(BIN).args(["serve", "--config"]).arg(config))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = bound_address(&mut child);
    Server { child, addr }
}

/// `demo` on a free loopback port, without an admin token.
fn demo() -> Server {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env_remove("APIKEYROUTER_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = bound_address(&mut child);
    Server { child, addr }
}

/// The address a starting server prints on its first line of stdout.
fn bound_address(child: &mut Child) -> SocketAddr {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .parse()
        .unwrap()
}

/// Waits up to ten seconds for the server to exit after a signal, successfully.
fn assert_graceful_exit(server: &mut Server) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no graceful exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} failed");
}

#[test]
fn check_prints_what_would_load_without_secrets() {
    let path = temp_config("check-ok", CONFIG);
    let out = envs(Command::new(BIN).args(["check", "--config"]).arg(&path))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is valid"));
    assert!(
        stdout.contains("openai-1 on openai sk-...9876 tenant acme"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("secret"),
        "check printed key material: {stdout}"
    );
}

#[test]
fn check_names_file_key_and_problem() {
    let path = temp_config(
        "check-bad",
        &CONFIG.replace("provider = \"openai\"", "provider = \"openia\""),
    );
    let out = envs(Command::new(BIN).args(["check", "--config"]).arg(&path))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: keys[0].provider: unknown provider \"openia\"",
            path.display()
        )),
        "{stderr}"
    );
}

/// `check` refuses what `serve` would refuse: a public address without an admin token.
#[test]
fn check_refuses_a_public_address_without_an_admin_token() {
    let public = CONFIG
        .replace("127.0.0.1:0", "0.0.0.0:8000")
        .replace("[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n", "");
    let path = temp_config("check-public", &public);
    let out = envs(Command::new(BIN).args(["check", "--config"]).arg(&path))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listening on 0.0.0.0:8000 without an admin token"),
        "{stderr}"
    );
}

/// The status of `GET path` sent without credentials.
fn status_without_token(addr: SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Waits up to ten seconds for the key list to show a key ending in `last4`.
fn wait_for_key(addr: SocketAddr, last4: &str) {
    let started = Instant::now();
    loop {
        let (_, keys) = http(addr, "GET", "/api/v1/keys", "");
        if keys.contains(&format!("...{last4}")) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "reload did not happen: {keys}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A reload judges whether the management API may go without a token by the address
/// the server listens on (`--listen` included), not by the file's `listen`: a file
/// that drops its token cannot open the API on a public address, and a server on
/// loopback started with `--listen` keeps reloading a file that names a public one.
#[test]
fn reloads_judge_the_admin_token_by_the_address_in_use() {
    let untokened = CONFIG.replace("[admin]\ntoken_env = \"TEST_ADMIN_TOKEN\"\n", "");
    let with_key = |text: &str, material: &str| {
        format!("{text}\n[[keys]]\nprovider = \"openai\"\nmaterial = \"{material}\"\n")
    };

    // The file names a public address and no token; the server listens on loopback.
    let public_file = untokened.replace("127.0.0.1:0", "0.0.0.0:8000");
    let path = temp_config("reload-loopback", &public_file);
    let child = envs(Command::new(BIN).args(["serve", "--listen", "127.0.0.1:0", "--config"]))
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    server.addr = bound_address(&mut server.child);
    std::fs::write(&path, with_key(&public_file, "sk-cli-loopback-key-5555")).unwrap();
    signal(&server.child, "HUP");
    wait_for_key(server.addr, "5555");
    drop(server);

    // The file has a token and loopback; the server listens on every address.
    let path = temp_config("reload-public", CONFIG);
    let mut child = envs(Command::new(BIN).args(["serve", "--listen", "0.0.0.0:0", "--config"]))
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log lines, as they come: the refused reload is awaited, not slept on.
    let (lines, logged) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut server = Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let port = bound_address(&mut server.child).port();
    server.addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(status_without_token(server.addr, "/api/v1/keys"), 401);
    std::fs::write(&path, with_key(&untokened, "sk-cli-refused-key-6666")).unwrap();
    signal(&server.child, "HUP");
    let refused = logged
        .iter()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap();
    assert!(refused.contains("without an admin token"), "{refused}");
    assert_eq!(
        status_without_token(server.addr, "/api/v1/keys"),
        401,
        "a reload opened the management API on a public address"
    );
    // A later valid file still applies: the refused one was seen and skipped.
    std::fs::write(&path, with_key(CONFIG, "sk-cli-accepted-key-7777")).unwrap();
    signal(&server.child, "HUP");
    wait_for_key(server.addr, "7777");
    let (_, keys) = http(server.addr, "GET", "/api/v1/keys", "");
    assert!(!keys.contains("...6666"), "{keys}");
}

/// Without a configuration file SIGHUP has nothing to reload: it is logged, and the
/// server goes on serving instead of dying of the signal's default action.
#[test]
fn sighup_without_a_config_file_leaves_the_server_serving() {
    let mut server = demo();
    let addr = server.addr;
    // At once: the handler is in place before the address is announced.
    signal(&server.child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "SIGHUP ended it"
    );
    assert_eq!(status_without_token(addr, "/health"), 200);
    signal(&server.child, "TERM");
    assert_graceful_exit(&mut server);
}

/// A client that never finishes its request head, or leaves a kept-alive connection
/// idle, is disconnected after `header_read_timeout_ms`; shutdown waits for a request
/// in flight only `drain_timeout_ms`, then exits.
#[test]
fn slow_clients_are_cut_off_and_shutdown_drains_within_its_limit() {
    let text = format!(
        "{}\n[limits]\nheader_read_timeout_ms = 300\ndrain_timeout_ms = 500\n",
        CONFIG
            .replace(
                "kind = \"simulated\"",
                "kind = \"simulated\"\nlatency_ms = 5000"
            )
            .replace("metadata = { tenant = \"acme\", rpm = 100 }", "")
    );
    let path = temp_config("slow-clients", &text);
    let mut server = serve(&path);
    let addr = server.addr;

    // Half a request head, then nothing: closed without an answer. Timed from before
    // the connection: the server's timer starts when it accepts.
    let started = Instant::now();
    let mut half = TcpStream::connect(addr).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow:")
        .unwrap();
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));

    // A kept-alive connection: answered, then closed once idle for the timeout.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let started = Instant::now();
    let _ = idle.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // The server still serves, and a request in flight (5 s upstream) does not hold
    // the shutdown past the drain limit.
    assert_eq!(http(addr, "GET", "/health", "").0, 200);
    let in_flight = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"slowly"}]}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    });
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    signal(&server.child, "TERM");
    assert_graceful_exit(&mut server);
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "shutdown took {:?}",
        asked.elapsed()
    );
    // Cut without any answer: neither served nor refused early.
    let cut = in_flight.join().unwrap();
    assert!(cut.is_empty(), "{}", String::from_utf8_lossy(&cut));
}

#[test]
fn serve_reloads_on_sighup_and_shuts_down_gracefully() {
    let path = temp_config("serve", CONFIG);
    let mut server = serve(&path);
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    // The only key belongs to tenant acme, and there is no virtual key mapping to it.
    assert_eq!(status, 503, "{body}");
    let (status, body) = http(server.addr, "GET", "/api/v1/keys", "");
    assert_eq!(status, 200);
    assert!(body.contains("openai-1") && !body.contains("openai-2"));

    // Add a shared key and reload with SIGHUP.
    let more = format!(
        "{CONFIG}\n[[keys]]\nprovider = \"openai\"\nmaterial = \"sk-cli-second-key-1234\"\n"
    );
    std::fs::write(&path, more).unwrap();
    signal(&server.child, "HUP");
    let started = Instant::now();
    loop {
        let (_, body) = http(server.addr, "GET", "/api/v1/keys", "");
        if body.contains("openai-2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "reload did not happen: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");

    // A change to the file is picked up without a signal too.
    let third = format!(
        "{CONFIG}\n[[keys]]\nprovider = \"openai\"\nmaterial = \"sk-cli-second-key-1234\"\n[[keys]]\nprovider = \"openai\"\nmaterial = \"sk-cli-third-key-5678\"\n"
    );
    std::fs::write(&path, third).unwrap();
    let started = Instant::now();
    loop {
        let (_, body) = http(server.addr, "GET", "/api/v1/keys", "");
        if body.contains("openai-3") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "file change not picked up: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A broken file is refused and the running configuration stays.
    std::fs::write(&path, "listen = 5").unwrap();
    signal(&server.child, "HUP");
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = http(
        server.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200);

    signal(&server.child, "TERM");
    assert_graceful_exit(&mut server);
}

/// Open file limit of this process, to size the connection flood to the machine.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

/// Descriptors the process `pid` has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// 10,000 connections at once: a quarter send a chat request each (all in flight
/// together), a quarter garbage, the rest nothing. Every request is answered, the
/// garbage refused or closed, a new client still served, and once the clients hang
/// up the server holds no more descriptors than before.
#[test]
fn ten_thousand_connections_at_once_are_served_and_released() {
    let path = temp_config(
        "flood",
        CONFIG
            .replace("metadata = { tenant = \"acme\", rpm = 100 }", "")
            .as_str(),
    );
    let server = serve(&path);
    let pid = server.child.id();
    let before = open_descriptors(pid);
    // 10,000 where the limits allow it (the server process needs one descriptor each too).
    let wanted = 10_000.min(open_files_limit().saturating_sub(500));
    assert!(
        wanted >= 1_000,
        "open file limit too low for the test: {}",
        open_files_limit()
    );
    let mut held = Vec::with_capacity(wanted);
    for _ in 0..wanted {
        match TcpStream::connect(server.addr) {
            Ok(s) => held.push(s),
            Err(e) => panic!("connection {} refused: {e}", held.len()),
        }
    }
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"one of many"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    for (i, s) in held.iter_mut().enumerate() {
        match i % 4 {
            0 => s.write_all(request.as_bytes()).unwrap(),
            1 => {
                let _ = s.write_all(b"NOT HTTP\r\n\r\n");
            }
            _ => {}
        }
    }
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"still there?"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    for (i, s) in held.iter_mut().enumerate().step_by(4) {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
    drop(held);
    let (status, _) = http(server.addr, "GET", "/health", "");
    assert_eq!(status, 200);
    // The server notices each hang-up and closes its side.
    let started = Instant::now();
    while open_descriptors(pid) > before + 16 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} descriptors open, {before} before the flood",
            open_descriptors(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With `--json-logs` and the default `info` filter, every served request writes one
/// JSON line to stderr that names its request id and model; the key material never
/// appears in the logs.
#[test]
fn served_requests_are_logged_as_json_lines_with_their_request_id() {
    // A key of no tenant, so that a request without a virtual key may use it.
    let config = temp_config("json-logs", &CONFIG.replace("tenant = \"acme\", ", ""));
    let mut child = envs(Command::new(BIN).args(["--json-logs", "serve", "--config"]))
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let addr = bound_address(&mut child);
    // Killed on drop if an assertion fails first.
    let mut server = Server { child, addr };
    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let request_id = answer["id"]
        .as_str()
        .and_then(|id| id.strip_prefix("chatcmpl-"))
        .unwrap()
        .to_owned();
    // Refusals carry a request id too: the client's, or a new one.
    let (status, head, _) = http_with(
        addr,
        "POST",
        "/v1/chat/completions",
        "x-request-id: refused-by-test-1\r\n",
        "{not json",
    );
    assert_eq!(status, 400);
    assert!(head.contains("x-request-id: refused-by-test-1"), "{head}");
    let (status, head, _) = http_with(addr, "POST", "/v1/embeddings", "", "[]");
    assert_eq!(status, 400);
    let generated = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id: {head}"))
        .to_owned();
    assert!(generated.starts_with("req_"), "{generated}");

    signal(&server.child, "TERM");
    let mut logs = String::new();
    stderr.read_to_string(&mut logs).unwrap();
    assert!(server.child.wait().unwrap().success());
    assert!(
        !logs.contains("sk-cli-secret-key-9876"),
        "key material in the logs"
    );
    let served: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|v| v["fields"]["message"] == "request served")
        .collect();
    assert_eq!(served.len(), 1, "{logs}");
    let span = &served[0]["span"];
    assert_eq!(span["request_id"], request_id.as_str(), "{logs}");
    assert_eq!(span["model"], "gpt-4o");
    assert_eq!(served[0]["level"], "INFO");
    let refused: Vec<(String, String)> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request refused")
        .map(|v| {
            let f = &v["fields"];
            (
                f["request_id"].as_str().unwrap_or_default().to_owned(),
                format!("{} {} {}", f["endpoint"], f["status"], f["code"]),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            (
                "refused-by-test-1".to_owned(),
                "\"chat\" 400 \"invalid_json\"".to_owned()
            ),
            (generated, "\"embeddings\" 400 \"invalid_json\"".to_owned()),
        ],
        "{logs}"
    );
}

/// Voluntary context switches of each serving thread of the per-core runtime: a thread
/// parked with nothing to do makes none, so a rising count shows it is serving.
fn serving_thread_switches(pid: u32) -> Vec<u64> {
    let mut switches = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        // "apikeyrouter-serve-N", cut to the kernel's 15 characters.
        if !comm.starts_with("apikeyrouter-se") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let count = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        switches.push(count);
    }
    switches
}

/// `[server] runtime = "per-core"`: each serving thread takes connections of its own,
/// a second instance cannot take the port, and requests in flight at SIGTERM finish
/// and are audited before the process exits.
#[test]
fn per_core_runtime_spreads_connections_and_drains_on_sigterm() {
    let audit = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("per-core-audit-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&audit);
    let text = format!(
        "{}\n[server]\nruntime = \"per-core\"\nthreads = 3\n[audit]\nkind = \"file\"\npath = {:?}\n",
        CONFIG.replace("tenant = \"acme\", ", "").replace(
            "models = [\"gpt-4o\"]",
            "models = [\"gpt-4o\"]\nlatency_ms = 1500"
        ),
        audit.display().to_string()
    );
    let config = temp_config("per-core", &text);
    let mut server = serve(&config);
    let pid = server.child.id();
    // The listeners are bound (and queue connections) before the threads start.
    let started = Instant::now();
    let mut before = serving_thread_switches(pid);
    while before.len() < 3 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        before = serving_thread_switches(pid);
    }
    assert_eq!(before.len(), 3, "serving threads: {before:?}");
    // Fresh connections, spread by the kernel over the three listeners.
    for _ in 0..300 {
        assert_eq!(http(server.addr, "GET", "/health", "").0, 200);
    }
    let after = serving_thread_switches(pid);
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a - b >= 10,
            "a serving thread took no connections: {before:?} -> {after:?}"
        );
    }

    // SO_REUSEPORT does not let a second instance share the port.
    let second = envs(Command::new(BIN).args(["serve", "--config"]).arg(&config))
        .args(["--listen", &server.addr.to_string()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {}", server.addr)),
        "{stderr}"
    );

    // Requests in flight when SIGTERM arrives are answered before the process exits.
    let addr = server.addr;
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                http(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
                )
            })
        })
        .collect();
    // Long enough for the requests to be read on a loaded machine, well before they
    // are answered.
    std::thread::sleep(Duration::from_millis(500));
    signal(&server.child, "TERM");
    for request in in_flight {
        let (status, body) = request.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_graceful_exit(&mut server);
    // Their audit records were delivered before the exit.
    let records = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(records.lines().count(), 3, "{records}");
}

/// `serve` without a config file: an empty router on the memory store, with the
/// built-in providers, so that keys added through the management API can serve; the
/// admin token comes from `APIKEYROUTER_ADMIN_TOKEN`.
#[test]
fn serve_without_a_config_takes_keys_for_the_built_in_providers() {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("APIKEYROUTER_ADMIN_TOKEN", "admin-token-cli-1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = bound_address(&mut child);
    let _server = Server { child, addr };

    let (status, body) = http(addr, "GET", "/api/v1/keys", "");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{body}");
    let (status, body) = http(addr, "GET", "/v1/models", "");
    assert_eq!(status, 200, "{body}");
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        models["data"].as_array().unwrap().len(),
        0,
        "no keys, no models: {body}"
    );

    for (provider, material) in [
        ("openai", "sk-nocfg-openai-4321"),
        ("anthropic", "sk-ant-nocfg-8765"),
        ("gemini", "AIza-nocfg-0042"),
    ] {
        let (status, body) = http(
            addr,
            "POST",
            "/api/v1/keys",
            &format!(r#"{{"key_material":"{material}","provider_id":"{provider}"}}"#),
        );
        assert_eq!(status, 201, "{provider}: {body}");
        assert!(!body.contains(material), "material unmasked: {body}");
        let created: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(created["provider_id"], provider, "{body}");
    }
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/keys",
        r#"{"key_material":"sk-nocfg-unknown-1111","provider_id":"mistral"}"#,
    );
    assert_eq!(status, 400, "a provider that is not built in: {body}");

    let (_, body) = http(addr, "GET", "/v1/models", "");
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for model in ["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro"] {
        assert!(ids.contains(&model), "{model} missing from {ids:?}");
    }
}

/// `demo` needs no secrets and no network: it answers a chat completion from its
/// simulated providers and lists its demo keys masked.
#[test]
fn demo_serves_chat_from_simulated_providers() {
    let server = demo();
    let addr = server.addr;

    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{body}"
    );
    assert!(
        answer["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );

    let (status, body) = http(addr, "GET", "/api/v1/keys", "");
    assert_eq!(status, 200, "{body}");
    let keys: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(keys["data"].as_array().unwrap().len(), 5, "{body}");
    assert!(!body.contains("sk-demo-openai-key-0001"), "{body}");
}

/// A reload while a request is in flight: the request finishes on what it started
/// with, and the next one sees the new configuration.
#[test]
fn a_reload_does_not_drop_a_request_in_flight() {
    let slow = CONFIG
        .replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\nlatency_ms = 1500",
        )
        .replace("metadata = { tenant = \"acme\", rpm = 100 }", "");
    let path = temp_config("reload-in-flight", &slow);
    let server = serve(&path);
    let addr = server.addr;
    let in_flight = std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"slowly"}]}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    // The new file removes the request's key and adds another.
    let next = slow.replace(
        "material_env = \"TEST_OPENAI_KEY\"",
        "material = \"sk-cli-next-key-4321\"",
    );
    std::fs::write(&path, next).unwrap();
    let asked = Instant::now();
    signal(&server.child, "HUP");
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "the request ended before the reload could overlap it"
    );
    let started = Instant::now();
    loop {
        let (_, keys) = http(addr, "GET", "/api/v1/keys", "");
        if keys.contains("...4321") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "reload did not happen: {keys}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"after"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
}
