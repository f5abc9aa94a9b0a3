//! Configuration parsing and validation: the spec's example loads, and every mistake
//! is named with its key.

use super::*;
use apikeyrouter_domain::{BudgetPeriod, Enforcement, Timestamp};

use crate::config::ServerRuntime;

const SPEC_EXAMPLE: &str = r#"
listen = "127.0.0.1:8000"

[admin]
token_env = "APIKEYROUTER_ADMIN_TOKEN"

[store]
kind = "memory"

[routing]
objective = "fairness"
max_attempts = 3

[[providers]]
id = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"

[[providers]]
id = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com"

[[fallbacks]]
model = "gpt-4o"
to = ["claude-sonnet-4-5", "gemini-2.5-pro"]

[[keys]]
provider = "openai"
material_env = "OPENAI_KEY_1"
metadata = { tenant = "customer-a", tier = "premium", rpm = 500, tpm = 90000 }

[[budgets]]
scope = "global"
limit_usd = 100.0
period = "monthly"
enforcement = "hard"

[[virtual_keys]]
token_env = "CLIENT_TOKEN_A"
tenant = "customer-a"
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn base_env() -> Vec<(String, String)> {
    env(&[
        ("APIKEYROUTER_ADMIN_TOKEN", "admin-secret-123"),
        ("OPENAI_KEY_1", "sk-live-abcdefgh12345678"),
        ("CLIENT_TOKEN_A", "client-token-aaaa"),
    ])
}

fn parse_err(text: &str, vars: &[(String, String)]) -> String {
    Config::parse(text, "test.toml", vars)
        .unwrap_err()
        .to_string()
}

#[test]
fn spec_example_loads() {
    let c = Config::parse(SPEC_EXAMPLE, "test.toml", &base_env()).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
    assert_eq!(c.admin_token.as_deref(), Some("admin-secret-123"));
    assert_eq!(c.providers.len(), 2);
    assert_eq!(c.keys[0].id.as_str(), "openai-1");
    assert_eq!(c.keys[0].metadata.rpm, Some(500));
    assert_eq!(c.keys[0].material.masked(), "sk-...5678");
    assert_eq!(c.settings.fallbacks[&ModelId::new("gpt-4o")].len(), 2);
    assert_eq!(c.budgets[0].id, "global-monthly");
    assert_eq!(c.virtual_keys[0].tenant, Some(TenantId::new("customer-a")));
    let summary = c.summary();
    assert!(
        summary.contains("openai-1 on openai sk-...5678 tenant customer-a"),
        "{summary}"
    );
    assert!(!summary.contains("abcdefgh"), "summary leaked a secret");
    assert!(
        !format!("{c:?}").contains("abcdefgh"),
        "debug leaked a secret"
    );
}

#[test]
fn environment_overrides_scalars() {
    let mut vars = base_env();
    vars.push(("APIKEYROUTER_ROUTING__MAX_ATTEMPTS".into(), "7".into()));
    vars.push(("APIKEYROUTER_LISTEN".into(), "0.0.0.0:9000".into()));
    vars.push((
        "APIKEYROUTER_ROUTING__OBJECTIVE".into(),
        "cost=0.7,reliability=0.3".into(),
    ));
    let c = Config::parse(SPEC_EXAMPLE, "test.toml", &vars).unwrap();
    assert_eq!(c.settings.max_attempts, 7);
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.settings.objective.label(), "cost=0.70,reliability=0.30");
}

#[test]
fn empty_file_is_an_empty_router() {
    let c = Config::parse("", "test.toml", &[]).unwrap();
    assert!(c.keys.is_empty() && c.providers.is_empty());
    assert_eq!(c.store.kind_name(), "memory");
    assert_eq!(c.admin_token, None);
}

#[test]
fn the_memory_store_keeps_the_configured_number_of_request_records() {
    let default = Config::parse("", "test.toml", &[]).unwrap();
    assert_eq!(default.store.requests_kept(), Some(1_000));
    assert!(
        default
            .summary()
            .contains("store: memory, the newest 1000 request records kept for look-ups"),
        "{}",
        default.summary()
    );
    let text = "[store]\nkind = \"memory\"\nrequests_kept = 10000\n";
    let c = Config::parse(text, "test.toml", &[]).unwrap();
    assert_eq!(c.store.requests_kept(), Some(10_000));
    assert!(c.summary().contains("the newest 10000 request records"));

    let negative = parse_err("[store]\nkind = \"memory\"\nrequests_kept = -5\n", &[]);
    assert!(
        negative.starts_with("test.toml: ")
            && negative.contains("integer `-5`, expected requests_kept: a whole number"),
        "{negative}"
    );
    let elsewhere = parse_err(
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nrequests_kept = 5\n",
        &[],
    );
    assert!(
        elsewhere.contains("unknown field `requests_kept`"),
        "{elsewhere}"
    );
}

#[test]
fn mistakes_are_named_with_file_and_key() {
    let vars = base_env();
    assert_eq!(
        parse_err(&SPEC_EXAMPLE.replace("OPENAI_KEY_1", "OPENAI_KEY_9"), &vars),
        "test.toml: keys[0]: environment variable OPENAI_KEY_9 is not set"
    );
    assert_eq!(
        parse_err(
            &SPEC_EXAMPLE.replace("provider = \"openai\"", "provider = \"opnai\""),
            &vars
        ),
        "test.toml: keys[0].provider: unknown provider \"opnai\"; declared providers: openai, anthropic"
    );
    assert_eq!(
        parse_err(
            &SPEC_EXAMPLE.replace("objective = \"fairness\"", "objective = \"speed\""),
            &vars
        ),
        "test.toml: routing.objective: unknown objective \"speed\"; expected cost, reliability, fairness or latency"
    );
    assert_eq!(
        parse_err(
            &SPEC_EXAMPLE.replace("limit_usd = 100.0", "limit_usd = -5.0"),
            &vars
        ),
        "test.toml: budgets[0].limit_usd: budget global-monthly has a non-positive limit; limits must be greater than zero"
    );
    assert_eq!(
        parse_err(&SPEC_EXAMPLE.replace("rpm = 500", "rpm = 0"), &vars),
        "test.toml: keys[0].metadata: rpm must be greater than zero when set"
    );
    assert_eq!(
        parse_err(
            &SPEC_EXAMPLE.replace("listen = \"127.0.0.1:8000\"", "listen = \"localhost\""),
            &vars
        )
        .split(':')
        .take(2)
        .collect::<Vec<_>>(),
        ["test.toml", " listen"]
    );
    let unknown_field = parse_err(
        &SPEC_EXAMPLE.replace("max_attempts = 3", "max_attempts = 3\nretries = 2"),
        &vars,
    );
    assert!(
        unknown_field.contains("unknown field `retries`"),
        "{unknown_field}"
    );
    let bad_type = parse_err(
        &SPEC_EXAMPLE.replace("max_attempts = 3", "max_attempts = \"three\""),
        &vars,
    );
    assert!(bad_type.contains("max_attempts"), "{bad_type}");
    let bad_kind = parse_err(
        &SPEC_EXAMPLE.replace("kind = \"anthropic\"", "kind = \"claude\""),
        &vars,
    );
    assert!(bad_kind.contains("unknown variant `claude`"), "{bad_kind}");
    let no_admin_env = env(&[
        ("OPENAI_KEY_1", "sk-live-abcdefgh12345678"),
        ("CLIENT_TOKEN_A", "client-token-aaaa"),
    ]);
    assert_eq!(
        parse_err(SPEC_EXAMPLE, &no_admin_env),
        "test.toml: admin: environment variable APIKEYROUTER_ADMIN_TOKEN is not set"
    );
}

#[test]
fn reservation_lease_defaults_to_an_hour_and_must_outlast_the_deadline() {
    let vars = base_env();
    let c = Config::parse(SPEC_EXAMPLE, "test.toml", &vars).unwrap();
    assert_eq!(c.settings.reservation_lease, Duration::from_secs(3_600));
    assert!(
        c.summary().contains("reservation lease 3600000 ms"),
        "{}",
        c.summary()
    );

    let longer = SPEC_EXAMPLE.replace(
        "max_attempts = 3",
        "max_attempts = 3\ntotal_deadline_ms = 30000\nreservation_lease_ms = 900000",
    );
    let c = Config::parse(&longer, "test.toml", &vars).unwrap();
    assert_eq!(c.settings.reservation_lease, Duration::from_secs(900));

    // A deadline longer than the default lease raises the default with it.
    let long_deadline = SPEC_EXAMPLE.replace(
        "max_attempts = 3",
        "max_attempts = 3\ntotal_deadline_ms = 7200000",
    );
    let c = Config::parse(&long_deadline, "test.toml", &vars).unwrap();
    assert_eq!(c.settings.reservation_lease, Duration::from_secs(7_200));

    let shorter = SPEC_EXAMPLE.replace(
        "max_attempts = 3",
        "max_attempts = 3\ntotal_deadline_ms = 30000\nreservation_lease_ms = 29999",
    );
    assert_eq!(
        parse_err(&shorter, &vars),
        "test.toml: routing.reservation_lease_ms: must be at least total_deadline_ms (30000 ms): a shorter lease would give back the reservations of requests still running"
    );
}

#[test]
fn server_runtime_and_threads_parse_and_are_checked() {
    let vars = base_env();
    let c = Config::parse(SPEC_EXAMPLE, "test.toml", &vars).unwrap();
    let default = if cfg!(target_os = "linux") {
        ServerRuntime::PerCore
    } else {
        ServerRuntime::Shared
    };
    assert_eq!(c.server.runtime, default);
    assert!(c.server.threads() >= 1);
    let shared = format!("{SPEC_EXAMPLE}\n[server]\nruntime = \"shared\"\n");
    assert_eq!(
        Config::parse(&shared, "test.toml", &vars)
            .unwrap()
            .server
            .runtime,
        ServerRuntime::Shared
    );

    let per_core = format!("{SPEC_EXAMPLE}\n[server]\nruntime = \"per-core\"\nthreads = 3\n");
    let c = Config::parse(&per_core, "test.toml", &vars).unwrap();
    assert_eq!(
        (c.server.runtime, c.server.threads()),
        (ServerRuntime::PerCore, 3)
    );
    assert!(
        c.summary().contains("server: per-core runtime, 3 threads"),
        "{}",
        c.summary()
    );

    // The environment overrides it like the other sections.
    let mut env = vars.clone();
    env.push(("APIKEYROUTER_SERVER__THREADS".to_owned(), "5".to_owned()));
    let c = Config::parse(&per_core, "test.toml", &env).unwrap();
    assert_eq!(c.server.threads(), 5);

    assert_eq!(
        parse_err(&per_core.replace("threads = 3", "threads = 0"), &vars),
        "test.toml: server.threads: must be between 1 and 1024"
    );
    let unknown = parse_err(&per_core.replace("per-core", "per-thread"), &vars);
    assert!(
        unknown.contains("per-thread") && unknown.contains("per-core"),
        "{unknown}"
    );
}

#[test]
fn budget_scopes_and_periods_parse() {
    let text = r#"
[[providers]]
id = "openai"
kind = "openai"

[[budgets]]
scope = "tag"
tag = "feature=chatbot"
limit_usd = 5
period = "daily"
enforcement = "soft"

[[budgets]]
scope = "provider"
provider = "openai"
limit_usd = 50
period = "custom"
period_seconds = 3600

[[budgets]]
scope = "tag"
tag = "chatbot"
limit_usd = 5
"#;
    assert_eq!(
        parse_err(text, &[]),
        "test.toml: budgets[2].tag: \"chatbot\" is not name=value, e.g. feature=chatbot"
    );
    let ok = text.rsplit_once("[[budgets]]").unwrap().0;
    let c = Config::parse(ok, "test.toml", &[]).unwrap();
    assert_eq!(c.budgets[0].id, "tag-feature-chatbot-daily");
    assert_eq!(c.budgets[0].enforcement, Enforcement::Soft);
    assert_eq!(
        c.budgets[1].period,
        BudgetPeriod::Custom {
            anchor: Timestamp::EPOCH,
            length_secs: 3600
        }
    );
}

#[test]
fn split_store_with_mongodb_audit_parses() {
    let text = r#"
[store]
kind = "split"
[store.counters]
kind = "redis"
url = "redis://127.0.0.1:6379"
[store.records]
kind = "mongodb"
url = "mongodb://127.0.0.1:27017"
database = "router"
[audit]
kind = "mongodb"
"#;
    let c = Config::parse(text, "test.toml", &[]).unwrap();
    assert_eq!(c.store.kind_name(), "split");
    let StoreConfig::Split {
        counters, records, ..
    } = &c.store
    else {
        panic!("not split: {:?}", c.store);
    };
    assert_eq!(counters.kind_name(), "redis");
    assert_eq!(records.kind_name(), "mongodb");
    // The audit sink is the records' MongoDB.
    assert_eq!(
        c.audit.mongodb(&c.store),
        Some(StoreConfig::Mongodb {
            url: "mongodb://127.0.0.1:27017".to_owned(),
            database: Some("router".to_owned()),
            decisions_retention_days: None,
            audit_retention_days: None,
            on_unavailable: None,
        })
    );
}

#[test]
fn mongodb_audit_needs_a_url_without_a_mongodb_store() {
    assert_eq!(
        parse_err("[audit]\nkind = \"mongodb\"\n", &[]),
        "test.toml: audit.url: required for kind mongodb unless the store (or its records) is mongodb"
    );
    let c = Config::parse(
        "[audit]\nkind = \"mongodb\"\nurl = \"mongodb://db:27017\"\n",
        "test.toml",
        &[],
    )
    .unwrap();
    assert!(matches!(
        c.audit.mongodb(&c.store),
        Some(StoreConfig::Mongodb { url, .. }) if url == "mongodb://db:27017"
    ));
}

#[test]
fn start_only_changes_name_the_sections_a_reload_cannot_apply() {
    let parse = |text: &str| Config::parse(text, "t.toml", &[]).unwrap();
    let base = parse("[[providers]]\nid = \"sim\"\nkind = \"simulated\"\n");
    let same_but_keys = parse(
        "[[providers]]\nid = \"sim\"\nkind = \"simulated\"\n[[keys]]\nprovider = \"sim\"\nmaterial = \"sk-start-only-0001\"\n",
    );
    assert!(base.start_only_changes(&same_but_keys).is_empty());
    let moved = parse(
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n[limits]\nmax_body_bytes = 2048\n[[providers]]\nid = \"sim\"\nkind = \"simulated\"\n",
    );
    assert_eq!(base.start_only_changes(&moved), ["store", "limits"]);
}

#[test]
fn virtual_key_budgets_are_resolved_with_the_config() {
    let config = Config::parse(
        "[[virtual_keys]]\nname = \"team\"\ntoken = \"client-token-0001\"\nbudget_usd = 12.5\n",
        "t.toml",
        &[],
    )
    .unwrap();
    let budget = &config.budgets[0];
    assert_eq!(budget.id, "virtual-key-team");
    assert_eq!(budget.period, BudgetPeriod::Monthly);
    assert_eq!(budget.enforcement, Enforcement::Hard);
    let clash = Config::parse(
        "[[budgets]]\nid = \"virtual-key-team\"\nscope = \"global\"\nlimit_usd = 1.0\n[[virtual_keys]]\nname = \"team\"\ntoken = \"client-token-0001\"\nbudget_usd = 12.5\n",
        "t.toml",
        &[],
    )
    .unwrap_err();
    assert_eq!(clash.key, "virtual_keys[0].budget_usd");
    // Names follow the API's rule: they become tags, budget ids and URL segments.
    let odd = Config::parse(
        "[[virtual_keys]]\nname = \"a,b\"\ntoken = \"client-token-0001\"\n",
        "t.toml",
        &[],
    )
    .unwrap_err();
    assert_eq!(odd.key, "virtual_keys[0].name");
    assert!(odd.message.contains("letters, digits"), "{}", odd.message);
}

/// A syntax error on a line holding a secret names the line and column but never
/// quotes the line: the message goes to stderr and the logs.
#[test]
fn a_syntax_error_never_quotes_the_secret_on_its_line() {
    let text = "[[providers]]\nid = \"sim\"\nkind = \"simulated\"\n\n[[keys]]\nprovider = \"sim\"\nmaterial = \"sk-live-unterminated-secret-4242\n";
    let message = parse_err(text, &[]);
    assert!(!message.contains("sk-live"), "{message}");
    assert!(
        message.starts_with("test.toml: line 7, column "),
        "{message}"
    );
    // A type error found after parsing still names its key.
    let typed = parse_err(
        "[[providers]]\nid = \"sim\"\nkind = \"simulated\"\nmodels = \"sk-live-not-a-list-4242\"\n",
        &[],
    );
    assert!(!typed.contains("sk-live"), "{typed}");
    assert!(typed.contains("models"), "{typed}");
}

/// The file's shape prints without the secrets written in it.
#[test]
fn the_file_as_parsed_debugs_without_its_secrets() {
    let text = r#"
[admin]
token = "admin-secret-token-1111"

[[keys]]
provider = "openai"
material = "sk-debug-secret-key-2222"

[[virtual_keys]]
name = "a"
token = "client-secret-token-3333"

[audit]
kind = "mongodb"
url = "mongodb://audit:secret-password-4444@db:27017"
"#;
    let file: crate::config::FileConfig = toml::from_str(text).unwrap();
    let shown = format!("{file:?}");
    for secret in ["1111", "2222", "3333", "4444"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("[redacted]"), "{shown}");
}
