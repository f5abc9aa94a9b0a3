//! The private shapes of the documents the MongoDB store keeps, and their conversion
//! to and from domain values.
//!
//! Conventions: counters and amounts are `i64` (money in nano-dollars); instants
//! written once with their document (creation, transitions, request times) are BSON
//! dates, so operators can read them and TTL indexes can expire by them; instants
//! updated in place (cooldowns, last use, window starts, budget periods) are `i64`
//! milliseconds since the epoch, because some compatible servers store a date set by
//! an update operator as text. Readers accept any integer width, since servers may return small
//! numbers as 32-bit. Unknown fields are ignored so a newer schema can add fields
//! without breaking older readers; wrong types or missing required fields are
//! reported as a malformed record by the caller.

use std::collections::BTreeMap;

use apikeyrouter_domain::quota::WindowCounts;
use apikeyrouter_domain::{
    Budget, BudgetPeriod, BudgetScope, BudgetStatus, Enforcement, KeyMetadata, KeyState, KeyStats,
    Money, QuotaLimits, QuotaObservation, QuotaWindows, ReservationId, StateTransition, Timestamp,
    TransitionTrigger, WindowKind,
};
use mongodb::bson::{Bson, DateTime, Document};
use serde::{Deserialize, Serialize};

/// Keys with sealed material, state, counters and quota windows.
pub(super) const KEYS: &str = "keys";
/// Recorded state transitions.
pub(super) const TRANSITIONS: &str = "transitions";
/// Budget definitions with their ledgers.
pub(super) const BUDGETS: &str = "budgets";
/// Request records for look-up by request id (decisions, attempts, outcome).
pub(super) const REQUESTS: &str = "requests";
/// The audit trail, append-only.
pub(super) const AUDIT: &str = "audit";
/// One document per client: `{ _id: client, start, count }` for its current minute.
pub(super) const CLIENTS: &str = "clients";
/// Virtual keys made at run time: `_id` is the name, the rest the key's fields.
pub(super) const VIRTUAL_KEYS: &str = "virtual_keys";
/// Store metadata: the schema version.
pub(super) const META: &str = "meta";

/// `_id` of the schema version document in [`META`].
pub(super) const SCHEMA_VERSION_ID: &str = "schema_version";

/// An unsigned count as stored (saturating at `i64::MAX`).
pub(super) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored count as unsigned (negative values, which only a concurrent decrement
/// racing a window roll can leave, read as zero).
pub(super) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// An amount as stored.
pub(super) fn nanos(m: Money) -> i64 {
    to_i64(m.as_nanos())
}

/// Milliseconds as stored.
pub(super) fn millis(t: Timestamp) -> i64 {
    to_i64(t.as_millis())
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from_millis(to_u64(ms))
}

/// A BSON date.
pub(super) fn date(t: Timestamp) -> DateTime {
    DateTime::from_millis(millis(t))
}

fn from_date(d: DateTime) -> Timestamp {
    timestamp(d.timestamp_millis())
}

/// The `_id` of a raw document, for naming it in errors (never its other fields).
pub(super) fn record_id(doc: &Document) -> String {
    let shown = match doc.get("_id") {
        Some(Bson::String(s)) => s.clone(),
        Some(Bson::ObjectId(oid)) => oid.to_hex(),
        Some(Bson::Int32(n)) => n.to_string(),
        Some(Bson::Int64(n)) => n.to_string(),
        Some(_) => "(non-string id)".to_owned(),
        None => "(no id)".to_owned(),
    };
    shown.chars().take(128).collect()
}

// ---------------------------------------------------------------------------------
// keys

/// A key as stored in [`KEYS`]. Invariant: `material` is always sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct KeyDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub provider: String,
    /// The key material sealed by the store's cipher.
    pub material: mongodb::bson::Binary,
    #[serde(default)]
    pub metadata: KeyMetadata,
    pub state: KeyState,
    #[serde(default)]
    pub state_reason: String,
    /// Bumped by every transition; transitions compare-and-set on it.
    #[serde(default)]
    pub state_version: i64,
    /// Milliseconds (updated in place, so not a BSON date: see the module docs).
    #[serde(default)]
    pub cooldown_until: Option<i64>,
    pub stats: StatsDoc,
    pub created_at: DateTime,
    /// Fresh per insert, so transitions left behind by a deleted key of the same id
    /// never show up under a new one.
    pub incarnation: String,
    pub quota: QuotaDoc,
}

/// A key's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct StatsDoc {
    pub requests: i64,
    pub successes: i64,
    pub failures: i64,
    pub consecutive_failures: i64,
    pub throttle_streak: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_nanos: i64,
    pub success_ewma: f64,
    pub latency_ewma_ms: f64,
    /// Milliseconds.
    #[serde(default)]
    pub last_used: Option<i64>,
}

impl StatsDoc {
    pub(super) fn from_stats(s: &KeyStats) -> Self {
        Self {
            requests: to_i64(s.requests),
            successes: to_i64(s.successes),
            failures: to_i64(s.failures),
            consecutive_failures: i64::from(s.consecutive_failures),
            throttle_streak: i64::from(s.throttle_streak),
            prompt_tokens: to_i64(s.prompt_tokens),
            completion_tokens: to_i64(s.completion_tokens),
            cost_nanos: nanos(s.cost),
            success_ewma: s.success_ewma,
            latency_ewma_ms: s.latency_ewma_ms,
            last_used: s.last_used.map(millis),
        }
    }

    pub(super) fn to_stats(&self) -> KeyStats {
        KeyStats {
            requests: to_u64(self.requests),
            successes: to_u64(self.successes),
            failures: to_u64(self.failures),
            consecutive_failures: to_u32(self.consecutive_failures),
            throttle_streak: to_u32(self.throttle_streak),
            prompt_tokens: to_u64(self.prompt_tokens),
            completion_tokens: to_u64(self.completion_tokens),
            cost: Money::from_nanos(to_u64(self.cost_nanos)),
            success_ewma: self.success_ewma,
            latency_ewma_ms: self.latency_ewma_ms,
            last_used: self.last_used.map(timestamp),
        }
    }
}

impl KeyDoc {
    pub(super) fn cooldown(&self) -> Option<Timestamp> {
        self.cooldown_until.map(timestamp)
    }

    pub(super) fn created(&self) -> Timestamp {
        from_date(self.created_at)
    }
}

// ---------------------------------------------------------------------------------
// quota windows

/// One quota window: counts since `start` (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct WindowDoc {
    pub start: i64,
    pub used: i64,
    pub samples: i64,
    pub previous_exhausted: bool,
}

/// The provider's last word on a key's capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ObservationDoc {
    pub limit_requests: Option<i64>,
    pub remaining_requests: Option<i64>,
    pub reset_requests_at: Option<i64>,
    pub limit_tokens: Option<i64>,
    pub remaining_tokens: Option<i64>,
    pub reset_tokens_at: Option<i64>,
    pub observed_at: i64,
}

impl ObservationDoc {
    pub(super) fn from_domain(o: &QuotaObservation, now: Timestamp) -> Self {
        Self {
            limit_requests: o.limit_requests.map(to_i64),
            remaining_requests: o.remaining_requests.map(to_i64),
            reset_requests_at: o.reset_requests_at.map(millis),
            limit_tokens: o.limit_tokens.map(to_i64),
            remaining_tokens: o.remaining_tokens.map(to_i64),
            reset_tokens_at: o.reset_tokens_at.map(millis),
            observed_at: millis(now),
        }
    }

    fn to_domain(self) -> (QuotaObservation, Timestamp) {
        (
            QuotaObservation {
                limit_requests: self.limit_requests.map(to_u64),
                remaining_requests: self.remaining_requests.map(to_u64),
                reset_requests_at: self.reset_requests_at.map(timestamp),
                limit_tokens: self.limit_tokens.map(to_u64),
                remaining_tokens: self.remaining_tokens.map(to_u64),
                reset_tokens_at: self.reset_tokens_at.map(timestamp),
            },
            timestamp(self.observed_at),
        )
    }

    /// Whether a reset time has passed at `now` (the domain then restores the
    /// remaining count to the limit).
    pub(super) fn needs_roll(&self, now: Timestamp) -> bool {
        let now = millis(now);
        self.reset_requests_at.is_some_and(|t| t <= now)
            || self.reset_tokens_at.is_some_and(|t| t <= now)
    }

    /// The observation as the domain sees it at `now` (mirrors `QuotaWindows::roll`),
    /// after counting one more request of `tokens` tokens.
    pub(super) fn rolled_and_charged(mut self, now: Timestamp, tokens: u64) -> Self {
        let now_ms = millis(now);
        if self.reset_requests_at.is_some_and(|t| t <= now_ms) {
            self.remaining_requests = self.limit_requests;
            self.reset_requests_at = None;
        }
        if self.reset_tokens_at.is_some_and(|t| t <= now_ms) {
            self.remaining_tokens = self.limit_tokens;
            self.reset_tokens_at = None;
        }
        self.remaining_requests = self
            .remaining_requests
            .map(|r| r.max(0).saturating_sub(1).max(0));
        self.remaining_tokens = self
            .remaining_tokens
            .map(|r| r.max(0).saturating_sub(to_i64(tokens)).max(0));
        self
    }
}

/// A key's quota windows, embedded in its [`KeyDoc`] so one atomic update can
/// check and count every window of a key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct QuotaDoc {
    pub minute_requests: WindowDoc,
    pub minute_tokens: WindowDoc,
    pub day_requests: WindowDoc,
    pub day_tokens: WindowDoc,
    pub month_tokens: WindowDoc,
    #[serde(default)]
    pub observation: Option<ObservationDoc>,
    /// Bumped whenever `observation` is replaced, so a charge that checked one
    /// observation never decrements another.
    #[serde(default)]
    pub observation_seq: i64,
}

/// The field of [`QuotaDoc`] holding the window of `kind`.
pub(super) const fn window_field(kind: WindowKind) -> &'static str {
    match kind {
        WindowKind::MinuteRequests => "minute_requests",
        WindowKind::MinuteTokens => "minute_tokens",
        WindowKind::DayRequests => "day_requests",
        WindowKind::DayTokens => "day_tokens",
        WindowKind::MonthTokens => "month_tokens",
    }
}

/// What one request of `tokens` tokens adds to a window of `kind`.
pub(super) const fn window_increment(kind: WindowKind, tokens: u64) -> u64 {
    if kind.counts_tokens() { tokens } else { 1 }
}

/// Start (ms) of the window of `kind` containing `now`.
pub(super) fn current_start(kind: WindowKind, now: Timestamp) -> i64 {
    millis(kind.bounds(now).0)
}

impl QuotaDoc {
    pub(super) const fn window(&self, kind: WindowKind) -> &WindowDoc {
        match kind {
            WindowKind::MinuteRequests => &self.minute_requests,
            WindowKind::MinuteTokens => &self.minute_tokens,
            WindowKind::DayRequests => &self.day_requests,
            WindowKind::DayTokens => &self.day_tokens,
            WindowKind::MonthTokens => &self.month_tokens,
        }
    }

    /// Whether the stored window of `kind` still counts at `now`. A window newer
    /// than `now` (another instance's clock runs ahead) also counts, rather than
    /// being rolled back.
    pub(super) fn is_current(&self, kind: WindowKind, now: Timestamp) -> bool {
        self.window(kind).start >= current_start(kind, now)
    }

    /// The window of `kind` as it stands at `now`: the stored counts, or a fresh
    /// window when the stored one is over (mirrors `QuotaWindows::roll`).
    fn counts_at(&self, kind: WindowKind, limits: &QuotaLimits, now: Timestamp) -> WindowCounts {
        let w = self.window(kind);
        if self.is_current(kind, now) {
            WindowCounts {
                used: to_u64(w.used),
                samples: to_u64(w.samples),
                previous_exhausted: w.previous_exhausted,
            }
        } else {
            WindowCounts {
                used: 0,
                samples: 0,
                previous_exhausted: rolled_exhausted(w, kind, limits),
            }
        }
    }

    /// The domain's view of these windows at `now`.
    pub(super) fn to_domain(&self, limits: &QuotaLimits, now: Timestamp) -> QuotaWindows {
        QuotaWindows::from_counts(
            now,
            |kind| self.counts_at(kind, limits, now),
            self.observation.map(ObservationDoc::to_domain),
        )
    }
}

/// Whether the window `w` ran out, judged when it is rolled over.
pub(super) fn rolled_exhausted(w: &WindowDoc, kind: WindowKind, limits: &QuotaLimits) -> bool {
    limits.limit(kind).is_some_and(|l| to_u64(w.used) >= l)
}

// ---------------------------------------------------------------------------------
// transitions

/// One recorded transition in [`TRANSITIONS`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct TransitionDoc {
    /// `<key id>/<incarnation>/<state version>`: unique, so a retried insert is
    /// harmless.
    #[serde(rename = "_id")]
    pub id: String,
    pub key_id: String,
    pub incarnation: String,
    pub seq: i64,
    pub from: KeyState,
    pub to: KeyState,
    pub trigger: TransitionTrigger,
    pub reason: String,
    pub at: DateTime,
}

impl TransitionDoc {
    pub(super) fn new(t: &StateTransition, incarnation: &str, seq: i64) -> Self {
        Self {
            id: format!("{}/{incarnation}/{seq}", t.key_id),
            key_id: t.key_id.to_string(),
            incarnation: incarnation.to_owned(),
            seq,
            from: t.from,
            to: t.to,
            trigger: t.trigger,
            reason: t.reason.clone(),
            at: date(t.at),
        }
    }

    pub(super) fn to_domain(&self) -> StateTransition {
        StateTransition {
            key_id: apikeyrouter_domain::KeyId::new(self.key_id.as_str()),
            from: self.from,
            to: self.to,
            trigger: self.trigger,
            reason: self.reason.clone(),
            at: from_date(self.at),
        }
    }
}

// ---------------------------------------------------------------------------------
// budgets

/// Money held for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ReservationDoc {
    pub amount: i64,
    /// When it was taken (ms), for operators looking for leaked reservations.
    pub taken_at: i64,
}

/// A budget and its ledger in [`BUDGETS`].
///
/// Invariant: `headroom == limit - spent - reserved` after every update (each update
/// adjusts them together, atomically), so a hard budget's reservation can be a plain
/// conditional update `headroom >= amount` on one document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct BudgetDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub scope: BudgetScope,
    /// Nano-dollars per period.
    pub limit: i64,
    pub period: BudgetPeriod,
    pub enforcement: Enforcement,
    pub period_start: i64,
    pub period_end: i64,
    pub spent: i64,
    pub reserved: i64,
    pub headroom: i64,
    /// Outstanding reservations by `r<reservation id>`.
    #[serde(default)]
    pub reservations: BTreeMap<String, ReservationDoc>,
}

/// The key of reservation `id` in [`BudgetDoc::reservations`].
pub(super) fn reservation_key(id: ReservationId) -> String {
    format!("r{}", id.0)
}

/// The stored name of an enforcement.
pub(super) const fn enforcement_name(e: Enforcement) -> &'static str {
    match e {
        Enforcement::Hard => "hard",
        Enforcement::Soft => "soft",
    }
}

impl BudgetDoc {
    /// A fresh ledger for `budget` in the period containing `now`.
    pub(super) fn new(budget: &Budget, spent: Money, now: Timestamp) -> Self {
        let (start, end) = budget.period.bounds(now);
        let limit = nanos(budget.limit);
        let spent = nanos(spent);
        Self {
            id: budget.id.clone(),
            scope: budget.scope.clone(),
            limit,
            period: budget.period,
            enforcement: budget.enforcement,
            period_start: millis(start),
            period_end: millis(end),
            spent,
            reserved: 0,
            headroom: limit.saturating_sub(spent),
            reservations: BTreeMap::new(),
        }
    }

    /// The definition, or `None` when the stored one cannot be right.
    pub(super) fn budget(&self) -> Option<Budget> {
        if self.limit <= 0 || self.id.is_empty() {
            return None;
        }
        Some(Budget {
            id: self.id.clone(),
            scope: self.scope.clone(),
            limit: Money::from_nanos(to_u64(self.limit)),
            period: self.period,
            enforcement: self.enforcement,
        })
    }

    /// Whether the stored period is over at `now`.
    pub(super) fn period_over(&self, now: Timestamp) -> bool {
        millis(now) >= self.period_end
    }

    /// The period containing `now` (ms).
    pub(super) fn period_at(&self, now: Timestamp) -> (i64, i64) {
        let (start, end) = self.period.bounds(now);
        (millis(start), millis(end))
    }

    /// The reporting view at `now`; a period that is over reports nothing spent (as
    /// `BudgetLedger::roll` would), without writing anything.
    pub(super) fn status(&self, now: Timestamp) -> BudgetStatus {
        let (spent, period_end) = if self.period_over(now) {
            (0, self.period_at(now).1)
        } else {
            (self.spent, self.period_end)
        };
        let limit = Money::from_nanos(to_u64(self.limit));
        let spent = Money::from_nanos(to_u64(spent));
        let reserved = Money::from_nanos(to_u64(self.reserved));
        BudgetStatus {
            budget_id: self.id.clone(),
            scope: self.scope.clone(),
            enforcement: self.enforcement,
            limit,
            spent,
            reserved,
            remaining: limit.saturating_sub(spent).saturating_sub(reserved),
            period_end: timestamp(period_end),
            over_limit: spent.saturating_add(reserved) > limit,
        }
    }
}

// ---------------------------------------------------------------------------------
// request records and audit

/// A request record in [`REQUESTS`] or [`AUDIT`]: the record itself plus the fields
/// indexes and retention need at the top level.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct RequestDoc {
    pub request_id: String,
    pub started_at: DateTime,
    /// A BSON date: the TTL index expires records by it.
    pub finished_at: DateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The `AuditRecord`, encoded with its serde shape.
    pub record: Document,
}

// ---------------------------------------------------------------------------------
// schema

/// The schema version document in [`META`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct SchemaVersionDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub version: i64,
    pub updated_at: DateTime,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_795_775_400_000);

    #[test]
    fn fresh_quota_doc_reads_as_empty_domain_windows() {
        let limits = QuotaLimits {
            rpm: Some(2),
            ..QuotaLimits::default()
        };
        let doc = QuotaDoc::default();
        let mut windows = doc.to_domain(&limits, NOW);
        assert_eq!(
            windows.snapshot(&limits, NOW),
            QuotaWindows::new().snapshot(&limits, NOW)
        );
        windows.charge(&limits, 10, NOW).unwrap();
        windows.charge(&limits, 10, NOW).unwrap();
        assert!(windows.check(&limits, 10, NOW).is_err());
    }

    #[test]
    fn stale_window_rolls_and_remembers_exhaustion() {
        let limits = QuotaLimits {
            rpm: Some(1),
            ..QuotaLimits::default()
        };
        let doc = QuotaDoc {
            minute_requests: WindowDoc {
                start: current_start(WindowKind::MinuteRequests, NOW),
                used: 1,
                samples: 1,
                previous_exhausted: false,
            },
            ..QuotaDoc::default()
        };
        let later = NOW.plus(Duration::from_secs(60));
        assert!(!doc.is_current(WindowKind::MinuteRequests, later));
        let counts = doc.counts_at(WindowKind::MinuteRequests, &limits, later);
        assert_eq!((counts.used, counts.previous_exhausted), (0, true));
    }

    #[test]
    fn observation_rolls_like_the_domain() {
        let reset = NOW.plus(Duration::from_secs(10));
        let obs = ObservationDoc::from_domain(
            &QuotaObservation {
                limit_requests: Some(100),
                remaining_requests: Some(0),
                reset_requests_at: Some(reset),
                ..QuotaObservation::default()
            },
            NOW,
        );
        assert!(!obs.needs_roll(NOW));
        assert!(obs.needs_roll(reset));
        let rolled = obs.rolled_and_charged(reset, 5);
        assert_eq!(rolled.remaining_requests, Some(99));
        assert_eq!(rolled.reset_requests_at, None);
    }

    #[test]
    fn budget_status_rolls_the_period_without_forgetting_reservations() {
        let budget = Budget::new(
            "b",
            BudgetScope::Global,
            1.0,
            BudgetPeriod::Daily,
            Enforcement::Hard,
        )
        .unwrap();
        let mut doc = BudgetDoc::new(&budget, Money::from_usd(0.25), NOW);
        doc.reserved = nanos(Money::from_usd(0.5));
        let today = doc.status(NOW);
        assert_eq!(today.remaining, Money::from_usd(0.25));
        let tomorrow = doc.status(NOW.plus(Duration::from_secs(86_400)));
        assert_eq!(tomorrow.spent, Money::ZERO);
        assert_eq!(tomorrow.remaining, Money::from_usd(0.5));
        assert_eq!(doc.budget(), Some(budget));
    }
}
