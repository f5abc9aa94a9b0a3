//! `apikeyrouter demo`: simulated providers and demo keys, no secrets, no network.

use apikeyrouter::config::{Config, ConfigError};

/// The demo configuration: three simulated providers, five keys (one per tenant for
/// `customer-a`), a fallback chain, a budget.
pub const DEMO_CONFIG: &str = r#"
[routing]
objective = "fairness"
max_attempts = 3

[[providers]]
id = "openai"
kind = "simulated"
latency_ms = 0
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]

[[providers]]
id = "anthropic"
kind = "simulated"
latency_ms = 0
models = ["claude-sonnet-4-5", "claude-haiku-4-5"]

[[providers]]
id = "gemini"
kind = "simulated"
latency_ms = 0
models = ["gemini-2.5-pro", "gemini-2.5-flash"]

[[fallbacks]]
model = "gpt-4o"
to = ["claude-sonnet-4-5", "gemini-2.5-pro"]

[[keys]]
provider = "openai"
material = "sk-demo-openai-key-0001"
metadata = { rpm = 5000 }

[[keys]]
provider = "openai"
material = "sk-demo-openai-key-0002"
metadata = { rpm = 5000 }

[[keys]]
provider = "anthropic"
material = "sk-ant-demo-key-0001"

[[keys]]
provider = "gemini"
material = "AIza-demo-key-0001"

[[keys]]
provider = "openai"
material = "sk-demo-customer-a-0001"
metadata = { tenant = "customer-a" }

[[budgets]]
scope = "global"
limit_usd = 100.0
period = "monthly"
enforcement = "hard"
"#;

/// The demo configuration listening on `listen`.
///
/// # Errors
/// Never for the shipped text; a bad `listen` is reported.
pub fn config(listen: &str) -> Result<Config, ConfigError> {
    let text = format!("listen = {listen:?}\n{DEMO_CONFIG}");
    let vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k == "APIKEYROUTER_ADMIN_TOKEN")
        .collect();
    Config::parse(&text, "demo", &vars)
}

/// What to tell the user once the demo listens; with an admin token set
/// (`APIKEYROUTER_ADMIN_TOKEN`), the management API call shows how to send it.
pub fn banner(addr: std::net::SocketAddr, admin_token: bool) -> String {
    let admin = if admin_token {
        " -H \"Authorization: Bearer $APIKEYROUTER_ADMIN_TOKEN\""
    } else {
        ""
    };
    format!(
        "apikeyrouter demo listening on http://{addr}\n\
         simulated providers: openai, anthropic, gemini (no network, no real keys)\n\n\
         try:\n  \
         curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n    \
         -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n  \
         curl -s http://{addr}/v1/models\n  \
         curl -s http://{addr}/api/v1/keys{admin}\n  \
         curl -s http://{addr}/metrics\n\n\
         or point any OpenAI SDK at base_url=http://{addr}/v1 (any api_key)."
    )
}
