//! The tests' "now" for stores that expire data on the wall clock.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use apikeyrouter_domain::Timestamp;

/// The next whole hour of the wall clock, fixed for the test process. Redis sets real
/// expiries (`PEXPIREAT`) from the times it is given, so a fixed date in the tests
/// would have every window expire at once after that date had passed.
#[must_use]
pub fn base_now() -> Timestamp {
    static BASE: OnceLock<Timestamp> = OnceLock::new();
    *BASE.get_or_init(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp::from_millis((ms / 3_600_000 + 1) * 3_600_000)
    })
}
