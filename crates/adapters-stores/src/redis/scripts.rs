//! The Lua scripts the Redis store runs server-side, one per atomic operation.
//!
//! Each script is `scripts/common.lua` followed by its own file. [`Script`] sends
//! `EVALSHA` and falls back to loading the script on `NOSCRIPT`, so after the first
//! call every operation is one round trip. Pipelined scripts (`settle`, `release`)
//! do the same fallback in `RedisStore::run_scripts`.

use redis::Script;

/// A script's source: `scripts/common.lua` followed by `scripts/<name>.lua`.
macro_rules! source {
    ($name:ident) => {
        concat!(
            include_str!("scripts/common.lua"),
            "\n",
            include_str!(concat!("scripts/", stringify!($name), ".lua"))
        )
    };
}

/// The registry from one list of names, which gives each field, its file and the
/// load order.
macro_rules! scripts {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Every script's source, in [`Scripts`] field order.
        const SOURCES: &[&str] = &[$(source!($name),)*];

        /// Every script, hashed once at start.
        pub(super) struct Scripts {
            $($(#[$doc])* pub(super) $name: Script,)*
        }

        impl Scripts {
            pub(super) fn new() -> Self {
                Self {
                    $($name: Script::new(source!($name)),)*
                }
            }
        }
    };
}

scripts! {
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
    /// Cluster only: the three per-slot parts of `reserve`.
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

impl Scripts {
    /// Every script's source, for loading them all into the server's script cache at
    /// start (one pipeline), so the first burst of requests does not race to load them.
    pub(super) fn sources() -> &'static [&'static str] {
        SOURCES
    }
}
