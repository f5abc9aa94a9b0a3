//! The Lua scripts the Redis store runs server-side, one per atomic operation.
//!
//! Each script is `scripts/common.lua` followed by its own file. [`Script`] sends
//! `EVALSHA` and falls back to loading the script on `NOSCRIPT`, so after the first
//! call every operation is one round trip. Pipelined scripts (`settle`, `release`)
//! do the same fallback in `RedisStore::run_scripts`.

use redis::Script;

macro_rules! source {
    ($file:literal) => {
        concat!(
            include_str!("scripts/common.lua"),
            "\n",
            include_str!(concat!("scripts/", $file))
        )
    };
}

/// Every script's source, in [`Scripts`] field order.
const SOURCES: [&str; 20] = [
    source!("insert_key.lua"),
    source!("update_metadata.lua"),
    source!("delete_key.lua"),
    source!("transition.lua"),
    source!("settle_key.lua"),
    source!("quota_read.lua"),
    source!("reserve.lua"),
    source!("settle_budgets.lua"),
    source!("release_budgets.lua"),
    source!("budgets.lua"),
    source!("reserve_budgets.lua"),
    source!("reserve_client.lua"),
    source!("reserve_key.lua"),
    source!("reclaim.lua"),
    source!("redefine_budget.lua"),
    source!("insert_budget.lua"),
    source!("insert_virtual_key.lua"),
    source!("revoke_virtual_key.lua"),
    source!("update_virtual_key.lua"),
    source!("rotate_virtual_key.lua"),
];

/// Every script, hashed once at start.
pub(super) struct Scripts {
    pub(super) insert_key: Script,
    pub(super) update_metadata: Script,
    pub(super) delete_key: Script,
    pub(super) transition: Script,
    pub(super) settle_key: Script,
    pub(super) quota_read: Script,
    pub(super) reserve: Script,
    pub(super) settle_budgets: Script,
    pub(super) release_budgets: Script,
    pub(super) budgets: Script,
    /// Cluster only: the three per-slot parts of `reserve`.
    pub(super) reserve_budgets: Script,
    pub(super) reserve_client: Script,
    pub(super) reserve_key: Script,
    pub(super) reclaim: Script,
    pub(super) redefine_budget: Script,
    pub(super) insert_budget: Script,
    pub(super) insert_virtual_key: Script,
    pub(super) revoke_virtual_key: Script,
    pub(super) update_virtual_key: Script,
    pub(super) rotate_virtual_key: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let [
            insert_key,
            update_metadata,
            delete_key,
            transition,
            settle_key,
            quota_read,
            reserve,
            settle_budgets,
            release_budgets,
            budgets,
            reserve_budgets,
            reserve_client,
            reserve_key,
            reclaim,
            redefine_budget,
            insert_budget,
            insert_virtual_key,
            revoke_virtual_key,
            update_virtual_key,
            rotate_virtual_key,
        ] = SOURCES.map(Script::new);
        Self {
            insert_key,
            update_metadata,
            delete_key,
            transition,
            settle_key,
            quota_read,
            reserve,
            settle_budgets,
            release_budgets,
            budgets,
            reserve_budgets,
            reserve_client,
            reserve_key,
            reclaim,
            redefine_budget,
            insert_budget,
            insert_virtual_key,
            revoke_virtual_key,
            update_virtual_key,
            rotate_virtual_key,
        }
    }

    /// Every script's source, for loading them all into the server's script cache at
    /// start (one pipeline), so the first burst of requests does not race to load them.
    pub(super) fn sources() -> &'static [&'static str] {
        &SOURCES
    }
}
