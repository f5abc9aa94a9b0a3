//! Shared set-up for the integration tests: a router on a manual clock with simulated
//! providers, and Redis stores in namespaces of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apikeyrouter::observability::MemoryAuditSink;
use apikeyrouter::providers::SimulatedProvider;
use apikeyrouter_adapters_stores::RedisStore;

use apikeyrouter::{
    ApiKeyRouter, ApiKeyRouterBuilder, Budget, BudgetPeriod, BudgetScope, Enforcement, KeyId,
    KeyMetadata, ManualClock, Message, RequestIntent, Timestamp,
};

/// 2026-11-27T10:30:00Z, a minute boundary: the manual clock's start for tests on the
/// memory store, which expires nothing on its own.
pub const T0: Timestamp = Timestamp::from_millis(1_795_775_400_000);

/// The "now" of tests on Redis: the next whole hour of the wall clock, fixed for the
/// test process (see the store adapters' `test_time`).
pub use apikeyrouter_adapters_stores::test_time::base_now;

/// The Redis the tests use: `REDIS_URL`, or the one `cargo xtask services up` starts.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A namespace starting with `prefix` that no other test, in this process or
/// another, uses.
pub fn fresh_namespace(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A Redis store in `namespace`; fails (never skips) without a server.
pub async fn redis_store_in(namespace: &str) -> RedisStore {
    let url = redis_url();
    RedisStore::connect(&url, namespace)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis unreachable at {url}: {e}; run `cargo xtask services up` (or set REDIS_URL)"
            )
        })
}

/// A MongoDB store on `database` (the server `MONGODB_URL` names, or the one `cargo
/// xtask services up` starts), with a fixed test master key; fails (never skips)
/// without a server.
pub async fn mongo_store_in(database: &str) -> apikeyrouter_adapters_stores::MongoStore {
    use apikeyrouter_adapters_stores::cipher::MasterKeys;
    use apikeyrouter_adapters_stores::mongodb::Retention;
    use apikeyrouter_adapters_stores::{AeadCipher, MongoStore};

    let url =
        std::env::var("MONGODB_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned());
    // A fixed test master key: 32 bytes, base64.
    let keys = MasterKeys::parse("test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test")
        .expect("test master key");
    MongoStore::connect(&url, database, Arc::new(AeadCipher::new(keys)), Retention::default())
        .await
        .unwrap_or_else(|e| panic!("MongoDB-compatible server unreachable at {url}: {e}; run `cargo xtask services up` (or set MONGODB_URL)"))
}

pub struct Harness {
    pub router: ApiKeyRouter,
    pub clock: Arc<ManualClock>,
    pub audit: Arc<MemoryAuditSink>,
}

impl Harness {
    pub async fn new(configure: impl FnOnce(ApiKeyRouterBuilder) -> ApiKeyRouterBuilder) -> Self {
        let clock = Arc::new(ManualClock::new(T0));
        let audit = Arc::new(MemoryAuditSink::new());
        let builder = ApiKeyRouter::builder()
            .clock(clock.clone())
            .audit(audit.clone());
        let router = configure(builder).build().await.expect("router builds");
        Self {
            router,
            clock,
            audit,
        }
    }

    pub fn provider(&self, id: &str) -> Arc<SimulatedProvider> {
        let p = Arc::new(SimulatedProvider::new());
        self.router.register_provider(id, p.clone());
        p
    }

    pub async fn key(&self, provider: &str, n: usize, metadata: KeyMetadata) -> KeyId {
        let material = format!("sk-{provider}-test-key-{n:06}");
        self.router
            .register_key(&material, provider, metadata)
            .await
            .expect("key registers")
            .id
    }

    /// The audit records so far, once the background delivery has caught up.
    pub async fn audit_records(&self) -> Vec<apikeyrouter::AuditRecord> {
        assert!(
            self.router.flush_records(Duration::from_secs(5)).await,
            "audit records not delivered"
        );
        self.audit.records()
    }

    /// Adds a global daily hard budget of `limit_usd`.
    pub async fn daily_hard_budget(&self, id: &str, limit_usd: f64) {
        let budget = Budget::new(
            id,
            BudgetScope::Global,
            limit_usd,
            BudgetPeriod::Daily,
            Enforcement::Hard,
        )
        .expect("a valid budget");
        self.router.add_budget(budget).await.expect("budget added");
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

pub fn ask(model: &str, text: &str) -> RequestIntent {
    RequestIntent::new(model, vec![Message::user(text)])
}

/// Serves `config` in-process on the port it names (port 0: a free one) and returns
/// the bound address once the proxy accepts connections.
pub async fn spawn_proxy(config: &apikeyrouter::config::Config) -> std::net::SocketAddr {
    let state = apikeyrouter_proxy::server::build_state(config)
        .await
        .expect("proxy state");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(apikeyrouter_proxy::server::serve(
        state,
        config.listen,
        config.server,
        None,
        move |addr| {
            let _ = tx.send(addr);
        },
    ));
    rx.await.expect("proxy bound")
}

/// Waits for the next minute when fewer than ten seconds of this one are left, so a
/// test of per-minute limits (a key's or a client's rpm, counted in fixed wall-clock
/// minutes) runs its requests inside one window.
pub async fn wait_out_a_late_minute() {
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
        % 60_000;
    if into_minute > 50_000 {
        tokio::time::sleep(Duration::from_millis(60_100 - into_minute as u64)).await;
    }
}

/// An active virtual key record named `name` whose digest is `digit` 64 times.
pub fn virtual_key(name: &str, digit: char) -> apikeyrouter_domain::VirtualKey {
    apikeyrouter_domain::VirtualKey {
        name: name.to_owned(),
        token_sha256: digit.to_string().repeat(64),
        tenant: None,
        models: None,
        rpm: None,
        budget_usd: None,
        created_at: base_now(),
        revoked_at: None,
    }
}
