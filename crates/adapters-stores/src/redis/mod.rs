//! The Redis store: every state-store port in Redis, shared by every instance that
//! points at the same server and namespace. For deployments of several proxy or
//! library instances that must agree on key states, quota windows and budgets.
//!
//! Depends on the domain and application crates and the `redis` client crate; the
//! client's types never leave this module (errors become [`StoreError`]s).
//!
//! # Data model
//!
//! Every Redis key starts with the namespace `ns` given to [`RedisStore::connect`].
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `{ns:key:<id>}:doc` | hash | the key: id, provider, material, metadata (JSON), state, reason, cooldown, creation time, counters, generation |
//! | `{ns:key:<id>}:transitions` | list | its transitions, oldest first (JSON) |
//! | `{ns:key:<id>}:obs` | hash | the provider's last rate-limit observation |
//! | `{ns:key:<id>}:w:<gen>:<kind>:<start>` | hash | one quota window: used, samples; expires one window length after it ends |
//! | `{ns:key:<id>}:gen` | string | registrations of this id, so a re-registered id starts with fresh windows |
//! | `{ns}:keys` | set | registered key ids |
//! | `{ns:client:<name>}:rpm:<start>` | string | a client's requests in the minute starting at `start` |
//! | `{ns:budgets}:ledger:<id>` | hash | a budget: definition (JSON), limit, hard, period, period bounds, spent, reserved |
//! | `{ns:budgets}:reservations:<id>` | hash | its outstanding reservations: reservation id to `amount:taken_at` (a bare amount was written before times were kept) |
//! | `{ns:budgets}:ids` | set | budget ids |
//! | `{ns:request:<id>}` | string | a request's audit record (JSON), with a TTL |
//!
//! Money is stored as integer nano-dollars, timestamps as milliseconds since the
//! epoch. Scripts compute in Lua numbers (doubles), exact up to 2^53: amounts up to
//! about 9 million dollars per budget period. Quota windows are keyed by their start, computed by the domain
//! (`WindowKind::bounds`), so a new window is simply a new counter and old ones
//! expire; snapshots are rebuilt with `QuotaWindows::from_counts` and summarised by
//! the domain. Budget periods roll inside the scripts when `now` passes the period
//! end, with the bounds computed by the domain (`BudgetPeriod::bounds`) and passed
//! in.
//!
//! Key material is stored as it is in the key hash. Redis holds material only when it
//! is used as the key store; protect it (ACLs, TLS, no persistence to shared disks)
//! as you would the provider keys themselves.
//!
//! # Atomicity: one script per charge
//!
//! `reserve` is one Lua script (`scripts/reserve.lua`, run with `EVALSHA` and loaded
//! on `NOSCRIPT`): it checks every quota window of the key, the provider's
//! observation and every hard budget, and only if all fit increments all of them
//! and records the reservation. Redis runs a script alone, so concurrent charges
//! from any number of instances never overspend a hard budget, and a request costs
//! one round trip (on a single server; Redis Cluster splits it, see below).
//! `settle` and `release` (after the call) are one pipeline of two scripts, so one
//! round trip too: the key's part (token windows, the provider's
//! observation, the key's counters) and the budgets' part, each under one hash tag.
//! They need no joint check, so splitting them costs no atomicity that matters.
//!
//! # Redis Cluster
//!
//! The names are laid out for Cluster: everything of one key shares the hash tag
//! `{ns:key:<id>}`, all budget ledgers share `{ns:budgets}`, a client's minute
//! counters share `{ns:client:<name>}`, and the set of key ids is `{ns}:keys`. So one
//! namespace's keys spread over the whole cluster (each key id hashes to its own
//! slot), and one script can still charge several budgets atomically (budgets are
//! few, and a global budget is touched by every request whatever the layout).
//!
//! [`RedisStore::connect_cluster`] (config: `cluster = true`, `url` listing one or
//! more seed nodes, comma-separated) connects with the redis crate's async cluster
//! client, which routes each command to the node of its keys' slot. Nothing is then
//! sent that spans hash tags in one script, pipeline or `MULTI` (Cluster refuses
//! those):
//!
//! - `reserve` is split per slot, in this order: the hard budgets
//!   (`scripts/reserve_budgets.lua`: checked and reserved together, so concurrent
//!   charges from any number of instances still never overspend a hard budget; a
//!   refusal charges nothing), then the client's minute (`reserve_client.lua`), then
//!   the key's windows and the provider's observation (`reserve_key.lua`). Each part
//!   is atomic; when a later part refuses (or fails), what the earlier parts took is
//!   given back: the budget reservation released (`release_budgets.lua`), the
//!   client's counter decremented. A charge therefore takes one to three sequential
//!   round trips (budgets and client only when the charge has them), plus one
//!   concurrent pair for the compensation of a refusal, instead of one. It is not
//!   atomic as a whole: between the parts another charge may see a reservation that
//!   is about to be given back and be refused for it (never the opposite), and when
//!   several limits would refuse the same charge, a budget's refusal is reported
//!   before the client's and the key's (the single-server script checks the key and
//!   the client first). If the compensation itself fails (connection lost), a
//!   budget reservation stays held until the budget is put again and a client count
//!   until its minute ends; this is logged.
//! - `settle` and `release` send their two scripts as two concurrent calls (a
//!   pipeline goes to one node).
//! - `insert_key` adds the id to `{ns}:keys` before its script, `delete_key` removes
//!   it after; a failure in between leaves an id without a key, which `list_keys`
//!   skips. `list_keys` reads each key with its own `HGETALL`, concurrently.
//! - `put_budget` and `delete_budget` keep their `MULTI` (all names under
//!   `{ns:budgets}`) and publish the change right after it.
//! - Scripts are loaded on every node at connect (`SCRIPT LOAD` is sent to all
//!   nodes), and reloaded on `NOSCRIPT`.
//!
//! On a single server (or a primary, [`RedisStore::connect`]) every charge is the
//! one script above, one round trip.
//!
//! # Change events
//!
//! Inserting, updating, transitioning and deleting a key publishes its id on
//! `{ns}:key-events`, putting or deleting a budget its id on `{ns}:budget-events`,
//! adding, updating, rotating or revoking a virtual key (hash `{ns}:virtual-keys`) a
//! message on `{ns}:virtual-key-events`, each from the script that makes the change;
//! [`RedisStore::subscribe_changes`] turns them into one stream so other instances
//! can refresh their view of keys, budgets and clients. On Cluster, which broadcasts
//! `PUBLISH` to every node, it subscribes through a plain connection to the first
//! seed node.
//!
//! # Failures
//!
//! An unreachable server is `Unavailable` (retryable); data under our names that is
//! not what this store writes (a value of the wrong type, JSON that does not parse,
//! a counter that is not a number) is `Invalid` naming the Redis key, never a panic.
//!
//! [`StoreError`]: apikeyrouter_application::ports::StoreError

mod codec;
mod keys;
mod scripts;
mod store;

pub use store::{DEFAULT_NAMESPACE, DEFAULT_REQUEST_TTL, RedisStore};

#[cfg(test)]
mod tests;
