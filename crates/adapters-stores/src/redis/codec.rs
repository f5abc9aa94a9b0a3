//! Translation between domain values and what the Redis store keeps: hash fields,
//! JSON strings, integer strings, and Redis errors into [`StoreError`]s.
//!
//! Invariant: nothing read from Redis is trusted. A missing field, a field that does
//! not parse or a value of the wrong type becomes `StoreError` `Invalid` naming the
//! Redis key, never a panic.

use std::collections::HashMap;
use std::str::FromStr;

use apikeyrouter_application::ports::{StoreError, StoreErrorKind};
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetStatus, KeyId, KeyMaterial, KeyMetadata, KeyState, KeyStats, Money,
    ProviderId, Timestamp,
};
use redis::{ErrorKind, RedisError, ServerErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A Redis hash as read.
pub(super) type Hash = HashMap<String, String>;

/// `Invalid`: the data under `redis_key` is not what this store writes.
pub(super) fn invalid(redis_key: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::new(
        StoreErrorKind::Invalid,
        format!("redis key {redis_key} holds invalid data: {detail}"),
    )
}

/// Translates a Redis error met while working on `redis_key` (or an operation name).
pub(super) fn from_redis(err: RedisError, redis_key: &str) -> StoreError {
    let store_error = match (err.kind(), err.code()) {
        // Raised by the scripts' `call` helper: "BADDATA <key> <what>".
        (_, Some("BADDATA")) => {
            let detail = err.detail().unwrap_or_default();
            // The server appends " script: <sha>, on @user_script:<line>."; drop it.
            let detail = detail.split(" script: ").next().unwrap_or(detail);
            let (key, what) = detail
                .split_once(' ')
                .unwrap_or((detail, "unexpected data"));
            invalid(key, what)
        }
        (_, Some("WRONGTYPE")) => invalid(redis_key, "a value of the wrong type"),
        (ErrorKind::Io, _)
        | (
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly,
            ),
            _,
        ) => StoreError::new(
            StoreErrorKind::Unavailable,
            format!("redis is unavailable ({redis_key}): {err}"),
        ),
        _ if err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal() => {
            StoreError::new(
                StoreErrorKind::Unavailable,
                format!("redis is unavailable ({redis_key}): {err}"),
            )
        }
        _ => StoreError::new(
            StoreErrorKind::Internal,
            format!("redis failed on {redis_key}: {err}"),
        ),
    };
    store_error.with_source(err)
}

/// JSON of a value this store writes.
pub(super) fn to_json<T: Serialize>(value: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|err| {
        StoreError::new(
            StoreErrorKind::Internal,
            format!("cannot encode {what} as json"),
        )
        .with_source(err)
    })
}

/// A JSON value read from `redis_key`.
pub(super) fn from_json<T: DeserializeOwned>(json: &str, redis_key: &str) -> Result<T, StoreError> {
    serde_json::from_str(json)
        .map_err(|err| invalid(redis_key, format!("bad json: {err}")).with_source(err))
}

/// A number read from `redis_key`.
pub(super) fn parse_num<T: FromStr>(
    text: &str,
    redis_key: &str,
    what: &str,
) -> Result<T, StoreError> {
    text.trim()
        .parse()
        .map_err(|_| invalid(redis_key, format!("{what} is not a number: {text:?}")))
}

fn field<'h>(hash: &'h Hash, name: &str, redis_key: &str) -> Result<&'h str, StoreError> {
    hash.get(name)
        .map(String::as_str)
        .ok_or_else(|| invalid(redis_key, format!("field {name} is missing")))
}

fn num_field<T: FromStr + Default>(
    hash: &Hash,
    name: &str,
    redis_key: &str,
) -> Result<T, StoreError> {
    hash.get(name)
        .map_or(Ok(T::default()), |text| parse_num(text, redis_key, name))
}

fn optional_time(text: &str, redis_key: &str, what: &str) -> Result<Option<Timestamp>, StoreError> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_num(text, redis_key, what).map(|ms| Some(Timestamp::from_millis(ms)))
}

fn time_text(t: Option<Timestamp>) -> String {
    t.map(|t| t.as_millis().to_string()).unwrap_or_default()
}

/// The name a state is stored under.
pub(super) fn state_text(state: KeyState) -> &'static str {
    state.as_str()
}

fn parse_state(text: &str, redis_key: &str) -> Result<KeyState, StoreError> {
    KeyState::ALL
        .into_iter()
        .find(|s| s.as_str() == text)
        .ok_or_else(|| invalid(redis_key, format!("unknown key state {text:?}")))
}

/// The cooldown as stored: milliseconds, or empty for none.
pub(super) fn cooldown_text(cooldown: Option<Timestamp>) -> String {
    time_text(cooldown)
}

/// Every field of a key's hash except the generation, which the insert script sets.
///
/// The material is stored as it is: Redis holds key material only when it is used as
/// the key store, and then it must be protected like the provider keys themselves.
pub(super) fn key_fields(key: &ApiKey) -> Result<Vec<(&'static str, String)>, StoreError> {
    let s = &key.stats;
    Ok(vec![
        ("id", key.id.to_string()),
        ("provider", key.provider.to_string()),
        ("material", key.material.expose().to_owned()),
        ("created_at", key.created_at.as_millis().to_string()),
        ("meta", to_json(&key.metadata, "key metadata")?),
        ("state", state_text(key.state).to_owned()),
        ("reason", key.state_reason.clone()),
        ("cooldown", cooldown_text(key.cooldown_until)),
        ("requests", s.requests.to_string()),
        ("successes", s.successes.to_string()),
        ("failures", s.failures.to_string()),
        ("consecutive_failures", s.consecutive_failures.to_string()),
        ("throttle_streak", s.throttle_streak.to_string()),
        ("prompt_tokens", s.prompt_tokens.to_string()),
        ("completion_tokens", s.completion_tokens.to_string()),
        ("cost", s.cost.as_nanos().to_string()),
        // `{:?}` prints the shortest text that reads back as the same f64.
        ("success_ewma", format!("{:?}", s.success_ewma)),
        ("latency_ewma_ms", format!("{:?}", s.latency_ewma_ms)),
        ("last_used", time_text(s.last_used)),
    ])
}

/// A key's counters from its hash.
pub(super) fn stats_from_hash(hash: &Hash, redis_key: &str) -> Result<KeyStats, StoreError> {
    Ok(KeyStats {
        requests: num_field(hash, "requests", redis_key)?,
        successes: num_field(hash, "successes", redis_key)?,
        failures: num_field(hash, "failures", redis_key)?,
        consecutive_failures: num_field(hash, "consecutive_failures", redis_key)?,
        throttle_streak: num_field(hash, "throttle_streak", redis_key)?,
        prompt_tokens: num_field(hash, "prompt_tokens", redis_key)?,
        completion_tokens: num_field(hash, "completion_tokens", redis_key)?,
        cost: Money::from_nanos(num_field(hash, "cost", redis_key)?),
        success_ewma: hash
            .get("success_ewma")
            .map_or(Ok(1.0), |t| parse_num(t, redis_key, "success_ewma"))?,
        latency_ewma_ms: num_field(hash, "latency_ewma_ms", redis_key)?,
        last_used: optional_time(
            hash.get("last_used").map_or("", String::as_str),
            redis_key,
            "last_used",
        )?,
    })
}

/// A key from its hash.
pub(super) fn key_from_hash(hash: &Hash, redis_key: &str) -> Result<ApiKey, StoreError> {
    let material = KeyMaterial::parse(field(hash, "material", redis_key)?)
        .map_err(|err| invalid(redis_key, format!("bad key material: {err}")))?;
    let metadata: KeyMetadata = from_json(field(hash, "meta", redis_key)?, redis_key)?;
    Ok(ApiKey {
        id: KeyId::new(field(hash, "id", redis_key)?),
        provider: ProviderId::new(field(hash, "provider", redis_key)?),
        material,
        metadata,
        state: parse_state(field(hash, "state", redis_key)?, redis_key)?,
        state_reason: hash.get("reason").cloned().unwrap_or_default(),
        cooldown_until: optional_time(
            hash.get("cooldown").map_or("", String::as_str),
            redis_key,
            "cooldown",
        )?,
        stats: stats_from_hash(hash, redis_key)?,
        created_at: Timestamp::from_millis(parse_num(
            field(hash, "created_at", redis_key)?,
            redis_key,
            "created_at",
        )?),
    })
}

/// The fields of a budget's ledger hash, for a new period starting at `now`.
pub(super) fn budget_fields(
    budget: &Budget,
    spent: Money,
    now: Timestamp,
) -> Result<Vec<(&'static str, String)>, StoreError> {
    use apikeyrouter_domain::{BudgetPeriod, Enforcement};

    let (start, end) = budget.period.bounds(now);
    let (period, anchor, len_ms) = match budget.period {
        BudgetPeriod::Daily => ("daily", 0, 0),
        BudgetPeriod::Weekly => ("weekly", 0, 0),
        BudgetPeriod::Monthly => ("monthly", 0, 0),
        // The same length as BudgetPeriod::bounds uses.
        BudgetPeriod::Custom {
            anchor,
            length_secs,
        } => (
            "custom",
            anchor.as_millis(),
            length_secs.max(1).saturating_mul(1000),
        ),
    };
    Ok(vec![
        ("def", to_json(budget, "budget")?),
        ("limit", budget.limit.as_nanos().to_string()),
        (
            "hard",
            if budget.enforcement == Enforcement::Hard {
                "1"
            } else {
                "0"
            }
            .to_owned(),
        ),
        ("period", period.to_owned()),
        ("anchor", anchor.to_string()),
        ("len", len_ms.to_string()),
        ("start", start.as_millis().to_string()),
        ("end", end.as_millis().to_string()),
        ("spent", spent.as_nanos().to_string()),
        ("reserved", "0".to_owned()),
    ])
}

/// A budget's definition and status from a script's row: id, definition, spent,
/// reserved, period end.
pub(super) fn budget_row(
    row: &[String],
    redis_key_prefix: &str,
) -> Result<(Budget, BudgetStatus), StoreError> {
    let [id, def, spent, reserved, end] = row else {
        return Err(invalid(
            redis_key_prefix,
            format!("a budget row of {} fields", row.len()),
        ));
    };
    let redis_key = format!("{redis_key_prefix}{id}");
    let budget: Budget = from_json(def, &redis_key)?;
    let spent = Money::from_nanos(parse_num(spent, &redis_key, "spent")?);
    let reserved = Money::from_nanos(parse_num(reserved, &redis_key, "reserved")?);
    let period_end = Timestamp::from_millis(parse_num(end, &redis_key, "end")?);
    let status = BudgetStatus {
        budget_id: budget.id.clone(),
        scope: budget.scope.clone(),
        enforcement: budget.enforcement,
        limit: budget.limit,
        spent,
        reserved,
        remaining: budget.limit.saturating_sub(spent).saturating_sub(reserved),
        period_end,
        over_limit: spent.saturating_add(reserved) > budget.limit,
    };
    Ok((budget, status))
}
