//! [`RedisStore`]: every state-store port over Redis, each operation one command,
//! pipeline or script.
//!
//! Round trips: `reserve`, `settle`, `release`, `quota_snapshot`, `insert_key`,
//! `update_metadata`, `delete_key`, the budget operations and the request log take
//! one each (one more, once, when the server lost its script cache); `transition`
//! takes two (read the state, then compare-and-set), more only when another instance
//! changed the key's state in between; `list_keys` two. [`RedisStore::round_trips`]
//! counts them.
//!
//! On Redis Cluster ([`RedisStore::connect_cluster`]) operations whose names span
//! several hash tags are split per tag: `reserve` takes up to three sequential calls
//! (budgets, client, key; plus the compensation when a later part refuses),
//! `settle` and `release` two concurrent calls, `insert_key`, `delete_key`,
//! `put_budget` and `delete_budget` two, `list_keys` one plus one per key (sent
//! concurrently). The round-trip counter counts each command sent.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apikeyrouter_application::ports::{
    BudgetStore, Charge, ChargeRejection, KeyStore, ReclaimedReservations, RequestLog, Settled,
    Settlement, StateStore, StoreChange, StoreChanges, StoreError, StoreErrorKind, UsageLedger,
    Verdict, VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::quota::QuotaDenial;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetError, BudgetLedger, BudgetPeriod, BudgetStatus, KeyId, KeyMetadata,
    KeyState, KeyStats, Money, QuotaLimits, QuotaObservation, QuotaSnapshot, QuotaWindows,
    RequestId, ReservationId, StateTransition, Timestamp, TransitionError, TransitionTrigger,
    VirtualKey, WindowCounts, WindowKind,
};
use async_trait::async_trait;
use futures_util::{Stream, StreamExt, future};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncCommands, Client, Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, ScriptInvocation,
    ServerErrorKind, Value,
};

use crate::config::redact_url;

use super::codec::{
    Hash, budget_fields, budget_row, cooldown_text, from_json, from_redis, invalid, key_fields,
    key_from_hash, parse_num, state_text, stats_from_hash, to_json,
};
use super::keys::Names;
use super::scripts::Scripts;

/// The payload of every virtual-key event before events named the key. A newer
/// instance reads all virtual keys on it, so a rolling upgrade loses no change; a key
/// really named so is then read with all the others.
const LEGACY_VIRTUAL_KEY_EVENT: &str = "changed";

/// The namespace [`crate::connect`] uses for a `redis` store configuration.
pub const DEFAULT_NAMESPACE: &str = "apikeyrouter";

/// How long a request record is kept by default: a week.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Transitions that lose a race retry this many times before giving up.
const MAX_TRANSITION_ATTEMPTS: usize = 16;

/// Every state-store port over one Redis server or a Redis Cluster, under a
/// namespace.
///
/// Several processes sharing a server (or cluster) and a namespace share every key,
/// window, budget and request record; every charge is one atomic script (on
/// Cluster, one per hash tag with the budgets' part atomic), so a hard budget is
/// never exceeded whatever the number of instances. Cheap to share as
/// `Arc<dyn StateStore>`: the connection is multiplexed and reconnects on its own.
pub struct RedisStore {
    /// The server, or on Cluster the first seed node: change events are subscribed
    /// through it (Cluster broadcasts `PUBLISH` to every node).
    client: Client,
    conn: Conn,
    names: Names,
    scripts: Scripts,
    /// The URL with its password masked; the only form ever printed.
    url: String,
    request_ttl: Duration,
    /// Commands and pipelines sent through `conn`, each one network round trip.
    round_trips: Arc<AtomicU64>,
}

/// The multiplexed connection: to one server, or to a Redis Cluster (routing each
/// command to the node serving its keys' slot, following `MOVED` and `ASK`).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The shared connection, counting every command or pipeline it sends: each is one
/// network round trip (a pipeline's commands travel and come back together).
#[derive(Clone)]
struct Counted {
    conn: Conn,
    round_trips: Arc<AtomicU64>,
}

impl ConnectionLike for Counted {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match &mut self.conn {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match &mut self.conn {
            Conn::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.conn {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// `StoreError::Invalid` for a namespace that would break our hash tags.
fn names_for(namespace: &str) -> Result<Names, StoreError> {
    Names::new(namespace).ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Invalid,
            format!(
                "redis namespace {namespace:?} must be non-empty and hold no braces or whitespace"
            ),
        )
    })
}

impl RedisStore {
    /// Connects to the server at `url` (`redis://[user:password@]host:port[/db]`) and
    /// keeps everything under `namespace` (a prefix of every Redis key, so several
    /// deployments or tests can share one server).
    ///
    /// # Errors
    /// `Invalid` for a malformed URL or a namespace that is empty or holds `{`, `}`
    /// or whitespace; `Unavailable` when the server cannot be reached or refuses us.
    /// Messages name the URL with its password masked.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let names = names_for(namespace)?;
        // The parse error is left out: it may quote the URL, password included.
        let client = Client::open(url).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("invalid redis url {shown}"),
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let unreachable = |err: redis::RedisError| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                format!("cannot reach redis at {shown}: {err}"),
            )
            .with_source(err)
        };
        let mut conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(unreachable)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        // EVALSHA falls back to loading on NOSCRIPT anyway (after a server restart,
        // say); loading up front spares the first requests that detour.
        let mut load = redis::pipe();
        for source in Scripts::sources() {
            load.cmd("SCRIPT").arg("LOAD").arg(*source).ignore();
        }
        let _: () = load
            .query_async(&mut conn)
            .await
            .map_err(|err| from_redis(err, "SCRIPT LOAD"))?;
        Ok(Self::new(client, Conn::Single(conn), names, shown))
    }

    /// Connects to the Redis Cluster reachable through the seed nodes `urls`
    /// (comma-separated `redis://[user:password@]host:port`; the other nodes are
    /// discovered) and keeps everything under `namespace`, as [`Self::connect`].
    ///
    /// Every script touches one hash tag. `reserve` is split per slot (budgets,
    /// then the client's minute, then the key's windows), each part atomic, a
    /// refusal by a later part giving back what the earlier parts took; see the
    /// module docs. Change events are subscribed through the first seed node, since
    /// Cluster broadcasts `PUBLISH` to every node.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_cluster(urls: &str, namespace: &str) -> Result<Self, StoreError> {
        let seeds: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        let shown = seeds
            .iter()
            .map(|url| redact_url(url))
            .collect::<Vec<_>>()
            .join(",");
        let names = names_for(namespace)?;
        let invalid_url = || {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("invalid redis cluster url {shown}"),
            )
        };
        let first = seeds.first().ok_or_else(invalid_url)?;
        // The parse errors are left out: they may quote a URL, password included.
        let client = Client::open(*first).map_err(|_| invalid_url())?;
        let cluster = ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(2)
            .max_retry_wait(500)
            .build()
            .map_err(|_| invalid_url())?;
        let unreachable = |err: redis::RedisError| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                format!("cannot reach redis cluster at {shown}: {err}"),
            )
            .with_source(err)
        };
        let mut conn = cluster.get_async_connection().await.map_err(unreachable)?;
        // Routed to every primary.
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        // One command per script: `SCRIPT LOAD` alone is sent to every node, while
        // in a pipeline it would reach only one.
        for source in Scripts::sources() {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(*source)
                .query_async(&mut conn)
                .await
                .map_err(|err| from_redis(err, "SCRIPT LOAD"))?;
        }
        Ok(Self::new(client, Conn::Cluster(conn), names, shown))
    }

    fn new(client: Client, conn: Conn, names: Names, url: String) -> Self {
        Self {
            client,
            conn,
            names,
            scripts: Scripts::new(),
            url,
            request_ttl: DEFAULT_REQUEST_TTL,
            round_trips: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether this store talks to a Redis Cluster (names of different hash tags
    /// are then never combined in one script, pipeline or transaction).
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Keeps request records for `ttl` (at least a millisecond) instead of
    /// [`DEFAULT_REQUEST_TTL`].
    #[must_use]
    pub fn with_request_ttl(mut self, ttl: Duration) -> Self {
        self.request_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// The namespace every Redis key of this store starts with.
    pub fn namespace(&self) -> &str {
        self.names.namespace()
    }

    /// The ids of keys changed by any instance sharing this namespace, as they change:
    /// inserted, metadata updated, transitioned or deleted (not on every counter
    /// update). Opens a dedicated connection.
    ///
    /// How a facade should use it: keep its in-process view of keys (the routing
    /// table) and, for each id received, re-read the key with `get_key` (`NotFound`
    /// means deleted) and update the view. Redis Pub/Sub delivers at most once and
    /// only while connected: when the stream ends (connection lost), subscribe again
    /// and re-read every key with `list_keys`, since changes made in the gap were
    /// not delivered.
    ///
    /// # Errors
    /// `Unavailable` when the server cannot be reached.
    pub async fn subscribe_changes(
        &self,
    ) -> Result<impl Stream<Item = StoreChange> + Send + 'static + use<>, StoreError> {
        let keys = self.names.key_events();
        let budgets = self.names.budget_events();
        let virtual_keys = self.names.virtual_key_events();
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|err| from_redis(err, &keys))?;
        pubsub
            .subscribe(&[&keys, &budgets, &virtual_keys])
            .await
            .map_err(|err| from_redis(err, &keys))?;
        Ok(pubsub.into_on_message().filter_map(move |msg| {
            let channel = msg.get_channel_name();
            let change = if channel == budgets {
                Some(StoreChange::Budgets)
            } else if channel == virtual_keys {
                msg.get_payload::<String>().ok().map(|name| {
                    // What versions before named events announce, for any change.
                    if name == LEGACY_VIRTUAL_KEY_EVENT {
                        StoreChange::VirtualKeys
                    } else {
                        StoreChange::VirtualKey(name)
                    }
                })
            } else {
                msg.get_payload::<String>()
                    .ok()
                    .map(|id| StoreChange::Key(KeyId::new(id)))
            };
            future::ready(change)
        }))
    }

    /// Network round trips this store has made since it connected: each command,
    /// pipeline or script call counts one (connecting and key-change subscriptions
    /// are not counted). For tests and benchmarks of the per-request cost.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn conn(&self) -> Counted {
        Counted {
            conn: self.conn.clone(),
            round_trips: self.round_trips.clone(),
        }
    }

    /// Runs scripts in one pipeline, so one round trip, returning each one's reply.
    /// Not atomic across scripts: used where they touch different hash-tag groups
    /// and need no joint check. A pipelined `EVALSHA` does not load its script on
    /// `NOSCRIPT` (the server lost its cache), so a script failing that way is run
    /// again alone, which loads it; the others ran already and are not repeated.
    ///
    /// On Cluster a pipeline is sent to one node and refused when its commands span
    /// slots, so the scripts are sent as separate calls, concurrently.
    async fn run_scripts(&self, invocations: &[&ScriptInvocation<'_>]) -> RedisResult<Vec<Value>> {
        if self.is_cluster() {
            return future::try_join_all(invocations.iter().map(|invocation| {
                let mut conn = self.conn();
                async move { invocation.invoke_async(&mut conn).await }
            }))
            .await;
        }
        let mut pipe = redis::pipe();
        for invocation in invocations {
            pipe.invoke_script(invocation);
        }
        let replies: Vec<RedisResult<Value>> =
            pipe.ignore_errors().query_async(&mut self.conn()).await?;
        let mut values = Vec::with_capacity(replies.len());
        for (reply, invocation) in replies.into_iter().zip(invocations) {
            values.push(match reply {
                Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    invocation.invoke_async(&mut self.conn()).await?
                }
                other => other?,
            });
        }
        Ok(values)
    }

    /// Runs a transaction on the budgets' hash tag and announces `payload` on
    /// `channel`: in the same transaction on a single server; on Cluster right after
    /// it, as its own command (the channel name hashes to another slot, and
    /// Cluster broadcasts `PUBLISH` to every node anyway). Returns the
    /// transaction's reply.
    async fn with_event(
        &self,
        mut pipe: Pipeline,
        channel: &str,
        payload: &str,
    ) -> RedisResult<Value> {
        if !self.is_cluster() {
            pipe.publish(channel, payload).ignore();
            return pipe.query_async(&mut self.conn()).await;
        }
        let reply: Value = pipe.query_async(&mut self.conn()).await?;
        let _: i64 = self.conn().publish(channel, payload).await?;
        Ok(reply)
    }

    /// `reserve` on Cluster, one atomic script per hash tag, in this order: the
    /// hard budgets (`reserve_budgets.lua`; a refusal charges nothing), the
    /// client's minute (`reserve_client.lua`), the key's windows and observation
    /// (`reserve_key.lua`). When a later part refuses or fails, what the earlier
    /// parts took is given back (the budget reservation released, the client's
    /// counter decremented), so a refused charge leaves nothing behind once this
    /// returns. Concurrent charges never overspend a hard budget: the budgets are
    /// checked and reserved in one script; between the parts another charge may
    /// see a reservation that is about to be given back and be refused for it.
    async fn reserve_per_slot(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        let id = &charge.key_id;
        let redis_key = self.names.key(id);
        let store_error =
            |err: redis::RedisError| ChargeRejection::Store(from_redis(err, &redis_key));
        let (budget_ids, budget_keys) = self.budget_keys(&charge.budget_ids);

        if !budget_keys.is_empty() {
            let reply: Vec<String> = budgets_invocation(
                &self.scripts.reserve_budgets,
                &budget_keys,
                &budget_ids,
                charge.reservation,
                charge.now,
                charge.est_cost,
            )
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
            rejection(&reply, charge, &redis_key)?;
        }

        let mut client_key = None;
        if let Some(client) = &charge.client {
            let (minute_start, minute_end) = WindowKind::MinuteRequests.bounds(charge.now);
            let key = self
                .names
                .client_window(&client.client, minute_start.as_millis());
            let reply: RedisResult<Vec<String>> = self
                .scripts
                .reserve_client
                .key(&key)
                .arg(client.rpm.to_string())
                .arg(minute_end.as_millis().to_string())
                .invoke_async(&mut self.conn())
                .await;
            let outcome = reply
                .map_err(store_error)
                .and_then(|reply| rejection(&reply, charge, &redis_key));
            if outcome.is_err() {
                self.undo_reserve(charge, &budget_keys, None).await;
                return outcome;
            }
            client_key = Some(key);
        }

        let windows = WindowKind::ALL.map(|kind| kind.bounds(charge.now));
        let mut invocation = self.scripts.reserve_key.prepare_invoke();
        invocation
            .key(&redis_key)
            .key(self.names.observation(id))
            .arg(charge.now.as_millis().to_string())
            .arg(self.names.window_prefix(id))
            .arg(clamp_i64(charge.est_tokens));
        for kind in WindowKind::ALL {
            invocation.arg(limit_text(charge.limits.limit(kind)));
        }
        for (start, _) in windows {
            invocation.arg(start.as_millis().to_string());
        }
        for (_, end) in windows {
            invocation.arg(end.as_millis().to_string());
        }
        let reply: RedisResult<Vec<String>> = invocation.invoke_async(&mut self.conn()).await;
        let outcome = reply
            .map_err(store_error)
            .and_then(|reply| rejection(&reply, charge, &redis_key));
        if outcome.is_err() {
            self.undo_reserve(charge, &budget_keys, client_key.as_deref())
                .await;
        }
        outcome
    }

    /// Gives back what the first parts of a refused per-slot `reserve` took: the
    /// budget reservation and the client's count. Best effort: a failure is logged
    /// (the reservation then stays held until the budget's next `put_budget`; the
    /// client's count expires with its minute).
    async fn undo_reserve(
        &self,
        charge: &Charge,
        budget_keys: &[String],
        client_key: Option<&str>,
    ) {
        let budget_part = self.release_budgets_invocation(budget_keys, charge);
        let budgets = async {
            if budget_keys.is_empty() {
                return Ok(());
            }
            budget_part
                .invoke_async::<i64>(&mut self.conn())
                .await
                .map(drop)
        };
        let client = async {
            match client_key {
                Some(key) => self.conn().decr::<_, _, i64>(key, 1).await.map(drop),
                None => Ok(()),
            }
        };
        let (budgets, client) = future::join(budgets, client).await;
        for (part, result) in [("budget reservation", budgets), ("client count", client)] {
            if let Err(err) = result {
                tracing::warn!(
                    key_id = %charge.key_id,
                    error = %err,
                    "could not give back the {part} of a refused charge"
                );
            }
        }
    }

    /// The key's part of a settlement: tokens reconciled, observation stored,
    /// outcome counted (`settle_key.lua`).
    fn settle_key_invocation(
        &self,
        charge: &Charge,
        actual_tokens: u64,
        settlement: &Settlement,
    ) -> ScriptInvocation<'_> {
        let id = &charge.key_id;
        let outcome = &settlement.outcome;
        // The same f64 the domain's KeyStats::record computes, printed so that it reads
        // back exactly.
        let latency_ms = outcome.latency.as_secs_f64() * 1000.0;
        let mut invocation = self.scripts.settle_key.prepare_invoke();
        invocation
            .key(self.names.key(id))
            .key(self.names.observation(id))
            .arg(self.names.window_prefix(id))
            .arg(clamp_i64(charge.est_tokens))
            .arg(clamp_i64(actual_tokens));
        for start in token_window_starts(charge.now) {
            invocation.arg(start);
        }
        invocation
            .arg(match outcome.verdict {
                Verdict::Succeeded => "1",
                Verdict::Failed { .. } => "0",
                Verdict::Abandoned => "-",
            })
            .arg(if outcome.verdict.rate_limited() {
                "1"
            } else {
                "0"
            })
            .arg(format!("{latency_ms:?}"))
            .arg(clamp_i64(outcome.usage.prompt_tokens))
            .arg(clamp_i64(outcome.usage.completion_tokens))
            .arg(clamp_i64(outcome.cost.as_nanos()))
            .arg(outcome.now.as_millis().to_string())
            .arg(if settlement.observation.is_some() {
                "1"
            } else {
                "0"
            });
        if let Some(observation) = settlement.observation {
            let fields = [
                ("lr", observation.limit_requests),
                ("rr", observation.remaining_requests),
                (
                    "rrat",
                    observation.reset_requests_at.map(Timestamp::as_millis),
                ),
                ("lt", observation.limit_tokens),
                ("rt", observation.remaining_tokens),
                (
                    "rtat",
                    observation.reset_tokens_at.map(Timestamp::as_millis),
                ),
            ];
            for (field, value) in fields {
                if let Some(value) = value {
                    invocation.arg(field).arg(clamp_i64(value));
                }
            }
        }
        invocation
    }

    /// The key's counters from the `settle_key` reply; `None` when the key is gone.
    fn stats_reply(reply: Option<Value>, redis_key: &str) -> Result<Option<KeyStats>, StoreError> {
        let hash: Option<Hash> = match reply {
            Some(value) => {
                redis::from_redis_value(value).map_err(|err| from_redis(err.into(), redis_key))?
            }
            None => return Err(invalid(redis_key, "no reply from the settle script")),
        };
        hash.map(|hash| stats_from_hash(&hash, redis_key))
            .transpose()
    }

    async fn key_hash(&self, id: &KeyId) -> Result<Hash, StoreError> {
        let redis_key = self.names.key(id);
        let hash: Hash = self
            .conn()
            .hgetall(&redis_key)
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        if hash.is_empty() {
            return Err(StoreError::key_not_found(id));
        }
        Ok(hash)
    }

    /// The script call giving back `charge`'s budget reservations.
    fn release_budgets_invocation(
        &self,
        budget_keys: &[String],
        charge: &Charge,
    ) -> ScriptInvocation<'_> {
        let mut invocation = self.scripts.release_budgets.prepare_invoke();
        for key in budget_keys {
            invocation.key(key);
        }
        invocation.arg(charge.reservation.0.to_string());
        invocation
    }

    /// KEYS for the budgets of a charge: ledger and reservations of each distinct id,
    /// in ascending id order (the order the statuses come back in).
    fn budget_keys(&self, ids: &[String]) -> (Vec<String>, Vec<String>) {
        let mut ids: Vec<String> = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let keys = ids
            .iter()
            .flat_map(|id| [self.names.budget(id), self.names.reservations(id)])
            .collect();
        (ids, keys)
    }

    fn statuses_from_rows(&self, rows: &[Vec<String>]) -> Result<Vec<BudgetStatus>, StoreError> {
        let prefix = self.names.budget_prefix();
        let mut statuses = rows
            .iter()
            .map(|row| budget_row(row, &prefix).map(|(_, status)| status))
            .collect::<Result<Vec<_>, _>>()?;
        statuses.sort_unstable_by(|a, b| a.budget_id.cmp(&b.budget_id));
        Ok(statuses)
    }

    async fn budget_rows(
        &self,
        now: Option<Timestamp>,
        only: Option<&str>,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        let ids_key = self.names.budget_ids();
        let mut invocation = self.scripts.budgets.prepare_invoke();
        invocation
            .key(&ids_key)
            .arg(self.names.budget_prefix())
            .arg(now.map(|t| t.as_millis().to_string()).unwrap_or_default());
        for bound in period_bounds(now.unwrap_or(Timestamp::EPOCH)) {
            invocation.arg(bound);
        }
        if let Some(id) = only {
            invocation.arg(id);
        }
        invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &ids_key))
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("cluster", &self.is_cluster())
            .field("namespace", &self.names.namespace())
            .field("request_ttl", &self.request_ttl)
            .finish_non_exhaustive()
    }
}

/// Day, week and month period bounds containing `now`, for the scripts' roll of
/// budget ledgers (custom periods are computed in the script from their anchor).
/// A call of a budget script (reserve or settle) that takes the budgets' keys, then
/// `now`, the amount in nanodollars, the reservation id, the period bounds and the ids.
fn budgets_invocation<'a>(
    script: &'a redis::Script,
    budget_keys: &[String],
    budget_ids: &[String],
    reservation: ReservationId,
    now: Timestamp,
    amount: Money,
) -> ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    for key in budget_keys {
        invocation.key(key);
    }
    invocation
        .arg(now.as_millis().to_string())
        .arg(clamp_i64(amount.as_nanos()))
        .arg(reservation.0.to_string());
    for bound in period_bounds(now) {
        invocation.arg(bound);
    }
    for budget_id in budget_ids {
        invocation.arg(budget_id);
    }
    invocation
}

fn period_bounds(now: Timestamp) -> [String; 6] {
    let [(ds, de), (ws, we), (ms, me)] = [
        BudgetPeriod::Daily,
        BudgetPeriod::Weekly,
        BudgetPeriod::Monthly,
    ]
    .map(|period| period.bounds(now));
    [ds, de, ws, we, ms, me].map(|t| t.as_millis().to_string())
}

/// The windows' short names, in [`WindowKind::ALL`] order (the scripts' `KINDS`).
const WINDOW_NAMES: [&str; 5] = ["rpm", "tpm", "rpd", "tpd", "mtok"];

fn window_kind(name: &str) -> Option<WindowKind> {
    WINDOW_NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|idx| WindowKind::ALL.get(idx).copied())
}

/// Starts of the token windows (tpm, tpd, monthly) containing `at`.
fn token_window_starts(at: Timestamp) -> [String; 3] {
    [
        WindowKind::MinuteTokens,
        WindowKind::DayTokens,
        WindowKind::MonthTokens,
    ]
    .map(|kind| kind.bounds(at).0.as_millis().to_string())
}

fn limit_text(limit: Option<u64>) -> String {
    limit.map(|l| l.to_string()).unwrap_or_default()
}

/// A charge refused or failed by the reserve script's answer.
fn rejection(reply: &[String], charge: &Charge, redis_key: &str) -> Result<(), ChargeRejection> {
    let parse_money = |text: &str, what: &str| {
        parse_num(text, redis_key, what)
            .map(Money::from_nanos)
            .map_err(ChargeRejection::Store)
    };
    match reply {
        [ok] if ok == "ok" => Ok(()),
        [missing] if missing == "missing" => Err(ChargeRejection::Store(
            StoreError::key_not_found(&charge.key_id),
        )),
        [client, retry_at] if client == "client" => Err(ChargeRejection::Client {
            retry_at: parse_num(retry_at, redis_key, "retry_at")
                .map(Timestamp::from_millis)
                .map_err(ChargeRejection::Store)?,
        }),
        [quota, window, retry_at] if quota == "quota" => {
            let window = window_kind(window).ok_or_else(|| {
                ChargeRejection::Store(invalid(redis_key, format!("unknown window {window:?}")))
            })?;
            let retry_at = parse_num(retry_at, redis_key, "retry_at")
                .map(Timestamp::from_millis)
                .map_err(ChargeRejection::Store)?;
            Err(ChargeRejection::Quota(QuotaDenial { window, retry_at }))
        }
        [budget, id, limit, spent, reserved, requested] if budget == "budget" => {
            Err(ChargeRejection::Budget(BudgetError::WouldExceed {
                id: id.clone(),
                limit: parse_money(limit, "limit")?,
                spent: parse_money(spent, "spent")?,
                reserved: parse_money(reserved, "reserved")?,
                requested: parse_money(requested, "requested")?,
            }))
        }
        other => Err(ChargeRejection::Store(StoreError::new(
            StoreErrorKind::Internal,
            format!("unexpected answer from the reserve script for {redis_key}: {other:?}"),
        ))),
    }
}

fn observation_from_hash(
    hash: &Hash,
    redis_key: &str,
) -> Result<Option<(QuotaObservation, Timestamp)>, StoreError> {
    let Some(at) = hash.get("at") else {
        return Ok(None);
    };
    let num = |name: &str| -> Result<Option<u64>, StoreError> {
        hash.get(name)
            .map(|text| parse_num(text, redis_key, name))
            .transpose()
    };
    let time = |name: &str| num(name).map(|ms| ms.map(Timestamp::from_millis));
    let observation = QuotaObservation {
        limit_requests: num("lr")?,
        remaining_requests: num("rr")?,
        reset_requests_at: time("rrat")?,
        limit_tokens: num("lt")?,
        remaining_tokens: num("rt")?,
        reset_tokens_at: time("rtat")?,
    };
    let at = Timestamp::from_millis(parse_num(at, redis_key, "at")?);
    Ok(Some((observation, at)))
}

/// Values past `i64::MAX` do not fit Redis integers; no real count gets there.
fn clamp_i64(n: u64) -> String {
    n.min(i64::MAX as u64).to_string()
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        let id = &key.id;
        let redis_key = self.names.key(id);
        let mut invocation = self.scripts.insert_key.prepare_invoke();
        invocation
            .key(&redis_key)
            .key(self.names.transitions(id))
            .key(self.names.observation(id))
            .key(self.names.generation(id));
        if self.is_cluster() {
            // The id set has its own hash tag: add the id first, so a failure
            // between the two calls leaves at most an id without a key, which
            // `list_keys` skips (as one deleted between its reads).
            let ids_key = self.names.key_ids();
            let _: i64 = self
                .conn()
                .sadd(&ids_key, id.as_str())
                .await
                .map_err(|err| from_redis(err, &ids_key))?;
        } else {
            invocation.key(self.names.key_ids());
        }
        invocation.arg(id.as_str()).arg(self.names.key_events());
        for (field, value) in key_fields(&key)? {
            invocation.arg(field).arg(value);
        }
        let inserted: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        if inserted == 0 {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("key {id} already exists"),
            ));
        }
        Ok(())
    }

    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        let hash = self.key_hash(id).await?;
        key_from_hash(&hash, &self.names.key(id))
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let ids_key = self.names.key_ids();
        let mut conn = self.conn();
        let ids: Vec<String> = conn
            .smembers(&ids_key)
            .await
            .map_err(|err| from_redis(err, &ids_key))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let redis_keys: Vec<String> = ids
            .iter()
            .map(|id| self.names.key(&KeyId::new(id.as_str())))
            .collect();
        let hashes: Vec<Hash> = if self.is_cluster() {
            // Each key has its own hash tag, so its own slot: one command each,
            // sent concurrently (a pipeline must stay within one slot).
            future::try_join_all(redis_keys.iter().map(|redis_key| {
                let mut conn = self.conn();
                async move { conn.hgetall::<_, Hash>(redis_key).await }
            }))
            .await
            .map_err(|err| from_redis(err, &ids_key))?
        } else {
            let mut pipe = redis::pipe();
            for redis_key in &redis_keys {
                pipe.hgetall(redis_key);
            }
            pipe.query_async(&mut conn)
                .await
                .map_err(|err| from_redis(err, &ids_key))?
        };
        let mut keys = Vec::with_capacity(hashes.len());
        for (hash, redis_key) in hashes.iter().zip(&redis_keys) {
            // Deleted between the two reads.
            if !hash.is_empty() {
                keys.push(key_from_hash(hash, redis_key)?);
            }
        }
        keys.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        let redis_key = self.names.key(id);
        let hash: Option<Hash> = self
            .scripts
            .update_metadata
            .key(&redis_key)
            .arg(to_json(&metadata, "key metadata")?)
            .arg(self.names.key_events())
            .arg(id.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        let hash = hash.ok_or_else(|| StoreError::key_not_found(id))?;
        key_from_hash(&hash, &redis_key)
    }

    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        let redis_key = self.names.key(id);
        let ids_key = self.names.key_ids();
        let mut invocation = self.scripts.delete_key.prepare_invoke();
        invocation
            .key(&redis_key)
            .key(self.names.transitions(id))
            .key(self.names.observation(id));
        if !self.is_cluster() {
            invocation.key(&ids_key);
        }
        let deleted: i64 = invocation
            .arg(id.as_str())
            .arg(self.names.key_events())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        if deleted == 0 {
            return Err(StoreError::key_not_found(id));
        }
        if self.is_cluster() {
            // The id set has its own hash tag: the id goes after the key, so a
            // failure in between leaves an id without a key, which `list_keys` skips.
            let _: i64 = self
                .conn()
                .srem(&ids_key, id.as_str())
                .await
                .map_err(|err| from_redis(err, &ids_key))?;
        }
        Ok(())
    }

    async fn transition(
        &self,
        id: &KeyId,
        to: KeyState,
        trigger: TransitionTrigger,
        reason: String,
        cooldown_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<StateTransition, StoreError> {
        let redis_key = self.names.key(id);
        for _ in 0..MAX_TRANSITION_ATTEMPTS {
            let hash = self.key_hash(id).await?;
            let from = key_from_hash(&hash, &redis_key)?.state;
            // The domain's state machine decides; the script only makes sure the key
            // is still in `from` when the change is written.
            if !from.can_transition(to, trigger) {
                let err = TransitionError {
                    key_id: id.clone(),
                    from,
                    to,
                };
                return Err(StoreError::new(StoreErrorKind::Invalid, err.to_string()));
            }
            let record = StateTransition {
                key_id: id.clone(),
                from,
                to,
                trigger,
                reason: reason.clone(),
                at: now,
            };
            let reply: Vec<String> = self
                .scripts
                .transition
                .key(&redis_key)
                .key(self.names.transitions(id))
                .arg(state_text(from))
                .arg(state_text(to))
                .arg(&reason)
                .arg(cooldown_text(cooldown_until))
                .arg(to_json(&record, "state transition")?)
                .arg(self.names.key_events())
                .arg(id.as_str())
                .invoke_async(&mut self.conn())
                .await
                .map_err(|err| from_redis(err, &redis_key))?;
            match reply.first().map(String::as_str) {
                Some("ok") => return Ok(record),
                Some("missing") => return Err(StoreError::key_not_found(id)),
                // Another instance moved the key first: decide again from its new state.
                _ => continue,
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Unavailable,
            format!(
                "key {id} kept changing state; transition to {} not applied",
                to.as_str()
            ),
        ))
    }

    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        let redis_key = self.names.key(id);
        let list_key = self.names.transitions(id);
        let (exists, items): (bool, Vec<String>) = redis::pipe()
            .exists(&redis_key)
            .lrange(&list_key, 0, -1)
            .query_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &list_key))?;
        if !exists {
            return Err(StoreError::key_not_found(id));
        }
        items
            .iter()
            .map(|item| from_json(item, &list_key))
            .collect()
    }
}

/// Unknown budget ids in a [`Charge`] are ignored (the budget was deleted or never
/// existed). `settle` and `release` on a key deleted since `reserve` still settle
/// and release its budgets. Token estimates are reconciled in the windows of the
/// charge's instant, where they were counted.
#[async_trait]
impl UsageLedger for RedisStore {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        if self.is_cluster() {
            return self.reserve_per_slot(charge).await;
        }
        let id = &charge.key_id;
        let redis_key = self.names.key(id);
        let (budget_ids, budget_keys) = self.budget_keys(&charge.budget_ids);
        let windows = WindowKind::ALL.map(|kind| kind.bounds(charge.now));

        let mut invocation = self.scripts.reserve.prepare_invoke();
        invocation.key(&redis_key).key(self.names.observation(id));
        for key in &budget_keys {
            invocation.key(key);
        }
        let (minute_start, minute_end) = WindowKind::MinuteRequests.bounds(charge.now);
        if let Some(client) = &charge.client {
            invocation.key(
                self.names
                    .client_window(&client.client, minute_start.as_millis()),
            );
        }
        invocation
            .arg(charge.now.as_millis().to_string())
            .arg(self.names.window_prefix(id))
            .arg(clamp_i64(charge.est_tokens))
            .arg(clamp_i64(charge.est_cost.as_nanos()))
            .arg(charge.reservation.0.to_string());
        for kind in WindowKind::ALL {
            invocation.arg(limit_text(charge.limits.limit(kind)));
        }
        for (start, _) in windows {
            invocation.arg(start.as_millis().to_string());
        }
        for (_, end) in windows {
            invocation.arg(end.as_millis().to_string());
        }
        for bound in period_bounds(charge.now) {
            invocation.arg(bound);
        }
        invocation
            .arg(
                charge
                    .client
                    .as_ref()
                    .map_or(String::new(), |c| c.rpm.to_string()),
            )
            .arg(minute_end.as_millis().to_string());
        for budget_id in &budget_ids {
            invocation.arg(budget_id);
        }
        let reply: Vec<String> = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        rejection(&reply, charge, &redis_key)
    }

    /// One pipeline of two scripts, one round trip: the key's part (`settle_key`)
    /// and the budgets' part (`settle_budgets`). Not one script because they touch
    /// two hash-tag groups (`{ns:key:<id>}` and `{ns:budgets}`), which Cluster
    /// would refuse in one script; nothing here needs them atomic together.
    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        let redis_key = self.names.key(&charge.key_id);
        let outcome = &settlement.outcome;
        let key_part = self.settle_key_invocation(charge, outcome.usage.total(), settlement);
        let (budget_ids, budget_keys) = self.budget_keys(&charge.budget_ids);
        let budget_part = budgets_invocation(
            &self.scripts.settle_budgets,
            &budget_keys,
            &budget_ids,
            charge.reservation,
            outcome.now,
            outcome.cost,
        );
        let invocations: &[&ScriptInvocation<'_>] = if budget_ids.is_empty() {
            &[&key_part]
        } else {
            &[&key_part, &budget_part]
        };
        let mut replies = self
            .run_scripts(invocations)
            .await
            .map_err(|err| from_redis(err, &redis_key))?
            .into_iter();
        let stats = Self::stats_reply(replies.next(), &redis_key)?;
        let rows: Vec<Vec<String>> = match replies.next() {
            Some(value) => redis::from_redis_value(value)
                .map_err(|err| from_redis(err.into(), &self.names.budget_prefix()))?,
            None => Vec::new(),
        };
        Ok(Settled {
            budgets: self.statuses_from_rows(&rows)?,
            stats,
        })
    }

    /// One pipeline of two scripts, one round trip, as for `settle`.
    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        let redis_key = self.names.key(&charge.key_id);
        let key_part = self.settle_key_invocation(charge, 0, settlement);
        let (_, budget_keys) = self.budget_keys(&charge.budget_ids);
        let budget_part = self.release_budgets_invocation(&budget_keys, charge);
        let invocations: &[&ScriptInvocation<'_>] = if budget_keys.is_empty() {
            &[&key_part]
        } else {
            &[&key_part, &budget_part]
        };
        let mut replies = self
            .run_scripts(invocations)
            .await
            .map_err(|err| from_redis(err, &redis_key))?
            .into_iter();
        Self::stats_reply(replies.next(), &redis_key)
    }

    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        let redis_key = self.names.key(id);
        let observation_key = self.names.observation(id);
        let mut invocation = self.scripts.quota_read.prepare_invoke();
        invocation
            .key(&redis_key)
            .key(&observation_key)
            .arg(self.names.window_prefix(id));
        let starts = WindowKind::ALL.map(|kind| kind.bounds(now).0);
        for start in starts {
            invocation.arg(start.as_millis().to_string());
        }
        for (kind, start) in WindowKind::ALL.into_iter().zip(starts) {
            let before = Timestamp::from_millis(start.as_millis().saturating_sub(1));
            invocation.arg(kind.bounds(before).0.as_millis().to_string());
        }
        let (status, counts, observation): (String, Vec<String>, Vec<String>) = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        if status == "missing" {
            return Err(StoreError::key_not_found(id));
        }
        let counts: Vec<u64> = counts
            .iter()
            .map(|text| parse_num(text, &redis_key, "window counter"))
            .collect::<Result<_, _>>()?;
        if counts.len() != 3 * WindowKind::ALL.len() {
            return Err(invalid(&redis_key, "incomplete window counters"));
        }
        let observation: Hash = observation
            .chunks_exact(2)
            .filter_map(|pair| match pair {
                [field, value] => Some((field.clone(), value.clone())),
                _ => None,
            })
            .collect();
        let observation = observation_from_hash(&observation, &observation_key)?;
        let window_counts = |kind: WindowKind| {
            let idx = WindowKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
            let at = |offset: usize| counts.get(3 * idx + offset).copied().unwrap_or(0);
            WindowCounts {
                used: at(0),
                samples: at(1),
                previous_exhausted: limits.limit(kind).is_some_and(|limit| at(2) >= limit),
            }
        };
        Ok(QuotaWindows::from_counts(now, window_counts, observation).snapshot(limits, now))
    }
}

/// Replacing a budget with `put_budget` drops its outstanding reservations; settling
/// them later still charges the actual cost.
#[async_trait]
impl BudgetStore for RedisStore {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let ledger_key = self.names.budget(&budget.id);
        let fields = budget_fields(&budget, spent, now)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(&ledger_key)
            .ignore()
            .del(self.names.reservations(&budget.id))
            .ignore()
            .hset_multiple(&ledger_key, &fields)
            .ignore()
            .sadd(self.names.budget_ids(), &budget.id)
            .ignore();
        self.with_event(pipe, &self.names.budget_events(), &budget.id)
            .await
            .map_err(|err| from_redis(err, &ledger_key))?;
        Ok(BudgetLedger::new(budget, now).with_spent(spent).status())
    }

    /// One script (`scripts/insert_budget.lua`): the id set decides, the ledger is
    /// written only if the id was free, and the change is announced with it.
    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let ledger_key = self.names.budget(&budget.id);
        let mut script = self.scripts.insert_budget.prepare_invoke();
        script
            .key(self.names.budget_ids())
            .key(&ledger_key)
            .key(self.names.reservations(&budget.id))
            .arg(&budget.id)
            .arg(self.names.budget_events());
        for (field, value) in budget_fields(&budget, spent, now)? {
            script.arg(field).arg(value);
        }
        let added: i64 = script
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &ledger_key))?;
        if added == 0 {
            return Err(StoreError::budget_exists(&budget.id));
        }
        Ok(BudgetLedger::new(budget, now).with_spent(spent).status())
    }

    /// One script changes the ledger's definition fields, leaving its spend and
    /// reservations, and announces the change.
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let ledger_key = self.names.budget(&budget.id);
        let mut invocation = self.scripts.redefine_budget.prepare_invoke();
        invocation.key(&ledger_key).arg(now.as_millis().to_string());
        for bound in period_bounds(now) {
            invocation.arg(bound);
        }
        invocation.arg(&budget.id).arg(self.names.budget_events());
        for (field, value) in budget_fields(&budget, Money::ZERO, now)? {
            if !matches!(field, "spent" | "reserved") {
                invocation.arg(field).arg(value);
            }
        }
        let row: Option<Vec<String>> = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &ledger_key))?;
        let Some(row) = row else {
            return Err(StoreError::budget_not_found(&budget.id));
        };
        let (_, status) = budget_row(&row, &self.names.budget_prefix())?;
        Ok(status)
    }

    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        let prefix = self.names.budget_prefix();
        let mut budgets = self
            .budget_rows(None, None)
            .await?
            .iter()
            .map(|row| budget_row(row, &prefix).map(|(budget, _)| budget))
            .collect::<Result<Vec<_>, _>>()?;
        budgets.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(budgets)
    }

    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        let rows = self.budget_rows(Some(now), None).await?;
        self.statuses_from_rows(&rows)
    }

    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        let rows = self.budget_rows(Some(now), Some(id)).await?;
        self.statuses_from_rows(&rows)?
            .pop()
            .ok_or_else(|| StoreError::budget_not_found(id))
    }

    /// The budgets' part of `settle` for a reservation no one holds.
    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        let (budget_ids, budget_keys) = self.budget_keys(ids);
        if budget_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Vec<String>> = budgets_invocation(
            &self.scripts.settle_budgets,
            &budget_keys,
            &budget_ids,
            ReservationId::NONE,
            now,
            cost,
        )
        .invoke_async(&mut self.conn())
        .await
        .map_err(|err| from_redis(err, &self.names.budget_prefix()))?;
        self.statuses_from_rows(&rows)
    }

    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        let ids_key = self.names.budget_ids();
        let rows: Vec<(String, u64, u64)> = self
            .scripts
            .reclaim
            .prepare_invoke()
            .key(&ids_key)
            .arg(self.names.budget_prefix())
            .arg(self.names.reservations_prefix())
            .arg(taken_before.as_millis())
            .arg(now.as_millis())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &ids_key))?;
        let mut reclaimed: Vec<ReclaimedReservations> = rows
            .into_iter()
            .map(|(budget_id, count, amount)| ReclaimedReservations {
                budget_id,
                count,
                amount: Money::from_nanos(amount),
            })
            .collect();
        reclaimed.sort_unstable_by(|a, b| a.budget_id.cmp(&b.budget_id));
        Ok(reclaimed)
    }

    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        let ids_key = self.names.budget_ids();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .srem(&ids_key, id)
            .del(self.names.budget(id))
            .ignore()
            .del(self.names.reservations(id))
            .ignore();
        let (removed,): (i64,) = redis::from_redis_value(
            self.with_event(pipe, &self.names.budget_events(), id)
                .await
                .map_err(|err| from_redis(err, &ids_key))?,
        )
        .map_err(|err| from_redis(err.into(), &ids_key))?;
        if removed == 0 {
            return Err(StoreError::budget_not_found(id));
        }
        Ok(())
    }
}

/// Keeps each record for the store's request TTL ([`DEFAULT_REQUEST_TTL`] unless set
/// with [`RedisStore::with_request_ttl`]); an id is taken until its record expires.
#[async_trait]
impl RequestLog for RedisStore {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        let redis_key = self.names.request(&record.request_id);
        let json = to_json(&*record, "request record")?;
        let ttl_ms = u64::try_from(self.request_ttl.as_millis()).unwrap_or(u64::MAX);
        let set: Option<String> = redis::cmd("SET")
            .arg(&redis_key)
            .arg(&json)
            .arg("NX")
            .arg("PX")
            .arg(clamp_i64(ttl_ms))
            .query_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        if set.is_some() {
            return Ok(true);
        }
        // Taken: by this very record when an earlier attempt's answer was lost.
        // Compared as stored (the same serializer writes the same text): a record
        // read back differs where its serde shape rounds (objective weights).
        let kept: Option<String> = self
            .conn()
            .get(&redis_key)
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        Ok(kept.as_deref() == Some(json.as_str()))
    }

    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        let redis_key = self.names.request(id);
        let json: Option<String> = self
            .conn()
            .get(&redis_key)
            .await
            .map_err(|err| from_redis(err, &redis_key))?;
        json.map(|json| from_json(&json, &redis_key)).transpose()
    }
}

/// How often a limits update is tried again when the record changed under it.
const UPDATE_TRIES: usize = 5;

/// One hash, name to the key's JSON; each change is one script that also announces
/// it on the virtual-key channel, so a change is never made unannounced.
#[async_trait]
impl VirtualKeyStore for RedisStore {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let hash = self.names.virtual_keys();
        let json = to_json(&key, "virtual key")?;
        let added: i64 = self
            .scripts
            .insert_virtual_key
            .key(&hash)
            .arg(&key.name)
            .arg(json)
            .arg(self.names.virtual_key_events())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &hash))?;
        if added == 0 {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("virtual key {} already exists", key.name),
            ));
        }
        Ok(())
    }

    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        let hash = self.names.virtual_keys();
        let json: Option<String> = self
            .conn()
            .hget(&hash, name)
            .await
            .map_err(|err| from_redis(err, &hash))?;
        let json = json.ok_or_else(|| StoreError::virtual_key_not_found(name))?;
        from_json(&json, &hash)
    }

    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        let hash = self.names.virtual_keys();
        let rows: Vec<(String, String)> = self
            .conn()
            .hgetall(&hash)
            .await
            .map_err(|err| from_redis(err, &hash))?;
        let mut keys: Vec<VirtualKey> = rows
            .iter()
            .filter_map(|(name, json)| match from_json::<VirtualKey>(json, &hash) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!(virtual_key = %name, error = %e, "stored virtual key does not decode; left out");
                    None
                }
            })
            .collect();
        if keys.is_empty() && !rows.is_empty() {
            // None decodes: something is wrong with all of them, and an empty list
            // would read as "no client credentials were ever issued".
            return Err(invalid(&hash, "no virtual key decodes".to_owned()));
        }
        keys.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(keys)
    }

    /// Read, change the limits, write back if the record is as read: a rotation in
    /// between makes it read again rather than write the old digest back.
    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let hash = self.names.virtual_keys();
        let not_found = || StoreError::virtual_key_not_found(&key.name);
        for _ in 0..UPDATE_TRIES {
            let json: Option<String> = self
                .conn()
                .hget(&hash, &key.name)
                .await
                .map_err(|err| from_redis(err, &hash))?;
            let Some(json) = json else {
                return Err(not_found());
            };
            let mut stored: VirtualKey = from_json(&json, &hash)?;
            stored.tenant.clone_from(&key.tenant);
            stored.models.clone_from(&key.models);
            stored.rpm = key.rpm;
            stored.budget_usd = key.budget_usd;
            let outcome: i64 = self
                .scripts
                .update_virtual_key
                .key(&hash)
                .arg(&stored.name)
                .arg(to_json(&stored, "virtual key")?)
                .arg(&json)
                .arg(self.names.virtual_key_events())
                .invoke_async(&mut self.conn())
                .await
                .map_err(|err| from_redis(err, &hash))?;
            match outcome {
                1 => return Ok(()),
                0 => return Err(not_found()),
                -1 => {
                    return Err(StoreError::virtual_key_revoked(&key.name));
                }
                _ => {} // changed meanwhile: read it again
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            format!("virtual key {} kept changing during the update", key.name),
        ))
    }

    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        let hash = self.names.virtual_keys();
        let (outcome, json): (i64, String) = self
            .scripts
            .rotate_virtual_key
            .key(&hash)
            .arg(name)
            .arg(token_sha256)
            .arg(self.names.virtual_key_events())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &hash))?;
        match outcome {
            1 => from_json(&json, &hash),
            0 => Err(StoreError::virtual_key_not_found(name)),
            -1 => Err(StoreError::virtual_key_revoked(name)),
            _ => Err(invalid(
                &hash,
                format!("virtual key {name} holds no token digest"),
            )),
        }
    }

    /// One script (`scripts/revoke_virtual_key.lua`): marks the record unless it is
    /// marked already, so the first revocation's time is the one kept.
    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        let hash = self.names.virtual_keys();
        let json: Option<String> = self
            .scripts
            .revoke_virtual_key
            .key(&hash)
            .arg(name)
            .arg(at.as_millis())
            .arg(self.names.virtual_key_events())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, &hash))?;
        let Some(json) = json else {
            return Err(StoreError::virtual_key_not_found(name));
        };
        from_json(&json, &hash)
    }

    async fn announce_virtual_key(&self, name: &str) -> Result<(), StoreError> {
        let channel = self.names.virtual_key_events();
        let _: i64 = self
            .conn()
            .publish(&channel, name)
            .await
            .map_err(|err| from_redis(err, &channel))?;
        Ok(())
    }
}

#[async_trait]
impl StateStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// Key, budget and virtual-key events published on the namespace's channels by
    /// every instance.
    async fn changes(&self) -> Result<Option<StoreChanges>, StoreError> {
        Ok(Some(Box::pin(self.subscribe_changes().await?)))
    }

    /// `PING`.
    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(|err| from_redis(err, "PING"))?;
        Ok(())
    }
}
