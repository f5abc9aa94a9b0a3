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
//! | `{ns:budgets}:ledger:<id>` | hash | a budget: definition (JSON), limit, hard, period, period bounds, spent, reserved |
//! | `{ns:budgets}:reservations:<id>` | hash | its outstanding reservations: reservation id to amount |
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
//! one round trip. `settle` and `release` (after the call) are one pipeline of two
//! scripts, so one round trip too: the key's part (token windows, the provider's
//! observation, the key's counters) and the budgets' part, each under one hash tag.
//! They need no joint check, so splitting them costs no atomicity that matters.
//!
//! # Redis Cluster
//!
//! The names are laid out for Cluster: everything of one key shares the hash tag
//! `{ns:key:<id>}`, and all budget ledgers share `{ns:budgets}`, so one script can
//! charge several budgets atomically (budgets are few, and a global budget is touched
//! by every request whatever the layout). A charge therefore spans two slots: the
//! key's and the budgets'. This store connects to a single server (or a primary)
//! and runs the one-script path there. On Cluster the charge would be split per
//! slot: the budget part first (reserve, refusing on a hard budget), then the key
//! part, with the budget reservation released if the key's windows refuse; that
//! split path is not implemented yet.
//!
//! # Change events
//!
//! Inserting, updating, transitioning and deleting a key publishes its id on
//! `{ns}:key-events`, putting or deleting a budget its id on `{ns}:budget-events`;
//! [`RedisStore::subscribe_changes`] turns both into one stream so other instances
//! can refresh their view of keys and budgets.
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
