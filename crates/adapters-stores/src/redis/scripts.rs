//! The Lua scripts the Redis store runs server-side, one per atomic operation.
//!
//! Each script is `scripts/common.lua` followed by its own file. [`Script`] sends
//! `EVALSHA` and falls back to loading the script on `NOSCRIPT`, so after the first
//! call every operation is one round trip.

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
const SOURCES: [&str; 11] = [
    source!("insert_key.lua"),
    source!("update_metadata.lua"),
    source!("delete_key.lua"),
    source!("transition.lua"),
    source!("record_outcome.lua"),
    source!("observe_quota.lua"),
    source!("quota_read.lua"),
    source!("reserve.lua"),
    source!("settle.lua"),
    source!("release.lua"),
    source!("budgets.lua"),
];

/// Every script, hashed once at start.
pub(super) struct Scripts {
    pub(super) insert_key: Script,
    pub(super) update_metadata: Script,
    pub(super) delete_key: Script,
    pub(super) transition: Script,
    pub(super) record_outcome: Script,
    pub(super) observe_quota: Script,
    pub(super) quota_read: Script,
    pub(super) reserve: Script,
    pub(super) settle: Script,
    pub(super) release: Script,
    pub(super) budgets: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let [
            insert_key,
            update_metadata,
            delete_key,
            transition,
            record_outcome,
            observe_quota,
            quota_read,
            reserve,
            settle,
            release,
            budgets,
        ] = SOURCES.map(Script::new);
        Self {
            insert_key,
            update_metadata,
            delete_key,
            transition,
            record_outcome,
            observe_quota,
            quota_read,
            reserve,
            settle,
            release,
            budgets,
        }
    }

    /// Every script's source, for loading them all into the server's script cache at
    /// start (one pipeline), so the first burst of requests does not race to load them.
    pub(super) fn sources() -> &'static [&'static str] {
        &SOURCES
    }
}
