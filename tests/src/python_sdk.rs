//! The official OpenAI Python SDK against the proxy (`tests/python/openai_sdk_client.py`).
//!
//! `cargo xtask ci` creates the virtual environment (`target/python-sdk`) before the
//! tests run; `APIKEYROUTER_PYTHON` may point at another interpreter with `openai`
//! installed. Without either the test fails with instructions: it never skips.

use std::path::PathBuf;
use std::process::Command;

use apikeyrouter::config::Config;

const CONFIG: &str = r#"
listen = "127.0.0.1:0"

[[providers]]
id = "openai"
kind = "simulated"
models = ["gpt-4o", "text-embedding-3-small"]

[[keys]]
provider = "openai"
material = "sk-sdk-test-0001"

[[keys]]
provider = "openai"
material = "sk-sdk-test-0002"

[[virtual_keys]]
name = "sdk"
token = "sdk-client-token-1"
"#;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("APIKEYROUTER_PYTHON") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("target/python-sdk/bin/python");
    assert!(
        venv.exists(),
        "no Python with the openai SDK: run `cargo xtask python-sdk` (or `cargo xtask ci`), or set APIKEYROUTER_PYTHON"
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_sdk_works_against_the_proxy() {
    let config = Config::parse(CONFIG, "sdk-test.toml", &[]).unwrap();
    let addr = crate::support::spawn_proxy(&config).await;
    let made: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/virtual_keys"))
        .json(&serde_json::json!({"name": "made", "models": ["gpt-4o"], "rpm": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let made_token = made["token"].as_str().unwrap().to_owned();
    // The made key's rpm of 1 is tested inside one minute.
    crate::support::wait_out_a_late_minute().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/openai_sdk_client.py");
    let python = python();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(format!("http://{addr}/v1"))
            // Tokens by environment, not on the command line, where every process on
            // the machine can read them.
            .env("SDK_CLIENT_TOKEN", "sdk-client-token-1")
            .env("SDK_MADE_TOKEN", made_token)
            .output()
    })
    .await
    .unwrap()
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(": 11 passed, 0 failed"), "{stdout}");
}
