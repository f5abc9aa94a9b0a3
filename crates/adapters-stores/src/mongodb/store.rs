//! [`MongoStore`]: every state-store port, and the audit-sink port, over MongoDB.
//!
//! See the parent module for the consistency design (conditional single-document
//! updates, the charge saga and what it leaves).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apikeyrouter_application::ports::{
    AuditError, AuditSink, BudgetStore, Charge, ChargeRejection, CipherError, ClientLimit,
    KeyOutcome, KeyStore, ReclaimedReservations, RequestLog, SecretCipher, Settled, Settlement,
    StateStore, StoreError, StoreErrorKind, UsageLedger, Verdict, VirtualKeyStore,
};
use apikeyrouter_application::records::AuditRecord;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetError, BudgetStatus, Enforcement, KeyId, KeyMaterial, KeyMetadata,
    KeyState, KeyStats, Money, ProviderId, QuotaLimits, QuotaSnapshot, RequestId, ReservationId,
    StateTransition, Timestamp, TransitionError, TransitionTrigger, VirtualKey, WindowKind,
};
use async_trait::async_trait;
use futures_util::TryStreamExt as _;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{self, Binary, Bson, Document, doc, oid::ObjectId};
use mongodb::options::{ClientOptions, ReturnDocument};
use mongodb::{Client, Collection, Database};

use super::documents::{
    AUDIT, BUDGETS, BudgetDoc, CLIENTS, KEYS, KeyDoc, ObservationDoc, QuotaDoc, REQUESTS,
    RequestDoc, StatsDoc, TRANSITIONS, TransitionDoc, VIRTUAL_KEYS, WindowDoc, current_start, date,
    enforcement_name, millis, nanos, record_id, reservation_key, rolled_exhausted, to_i64, to_u64,
    window_field, window_increment,
};
use super::{Retention, is_duplicate_key, malformed, map_err, schema};
use crate::config::redact_url;

/// How long to look for a server before reporting it unreachable, unless the URL
/// says otherwise (`serverSelectionTimeoutMS`).
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// Conditional updates retried this many times when the document changed between
/// the read and the write; only sustained contention on one document exhausts it.
const MAX_ATTEMPTS: usize = 32;
/// Compare-and-set attempts for the moving averages before dropping the sample.
const AVERAGE_ATTEMPTS: usize = 8;

/// Keys, quota windows, budgets, transitions, the request log and the audit trail in
/// a MongoDB database.
///
/// Implements every state-store port and [`AuditSink`]; cheap to share as
/// `Arc<dyn StateStore>`. `Debug` shows the URL without its password and the
/// database name.
pub struct MongoStore {
    db: Database,
    keys: Collection<Document>,
    transitions: Collection<Document>,
    budgets: Collection<Document>,
    requests: Collection<Document>,
    audit: Collection<Document>,
    clients: Collection<Document>,
    virtual_keys: Collection<Document>,
    cipher: Arc<dyn SecretCipher>,
    shown_url: String,
    retention: Retention,
    /// Last seen enforcement per budget: which conditional update to try first. A
    /// wrong hint costs a round trip, never correctness, since the update's filter
    /// names the enforcement it assumed.
    enforcement_hints: Mutex<HashMap<String, Enforcement>>,
}

/// A budget reservation taken by the current charge, for compensation.
struct Held {
    budget_id: String,
    /// The amount a reservation of the same id held before, which it replaced.
    previous: Option<i64>,
}

impl MongoStore {
    /// Connects to `url`, uses `database`, and brings its schema up to date.
    ///
    /// `cipher` seals key material before it is written and opens it when read;
    /// `retention` sets how long request records and the audit trail are kept.
    ///
    /// # Errors
    /// `Unavailable` naming the URL (without password) when no server answers within
    /// the server selection timeout (3 s unless the URL sets one); `Invalid` for a
    /// malformed URL or database name, or a database whose schema is newer than this
    /// build.
    pub async fn connect(
        url: &str,
        database: &str,
        cipher: Arc<dyn SecretCipher>,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        let shown_url = redact_url(url);
        if database.is_empty() || database.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
            return Err(StoreError::new(
                StoreErrorKind::Invalid,
                format!("mongodb database name {database:?} is not valid"),
            ));
        }
        let mut options = ClientOptions::parse(url).await.map_err(|e| {
            if matches!(
                e.kind.as_ref(),
                mongodb::error::ErrorKind::DnsResolve { .. } | mongodb::error::ErrorKind::Io(_)
            ) {
                StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("mongodb at {shown_url} cannot be resolved"),
                )
            } else {
                // The driver's message may quote the URL, password included: not kept.
                StoreError::new(
                    StoreErrorKind::Invalid,
                    format!("mongodb url {shown_url} is malformed"),
                )
            }
        })?;
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options
            .connect_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options
            .app_name
            .get_or_insert_with(|| "apikeyrouter".to_owned());
        let client = Client::with_options(options).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("mongodb url {shown_url} has unusable options"),
            )
        })?;
        let db = client.database(database);
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                format!("mongodb at {shown_url} is unreachable"),
            )
            .with_source(e)
        })?;
        schema::migrate(&db, &retention).await?;
        Ok(Self {
            keys: db.collection(KEYS),
            transitions: db.collection(TRANSITIONS),
            budgets: db.collection(BUDGETS),
            requests: db.collection(REQUESTS),
            audit: db.collection(AUDIT),
            clients: db.collection(CLIENTS),
            virtual_keys: db.collection(VIRTUAL_KEYS),
            db,
            cipher,
            shown_url,
            retention,
            enforcement_hints: Mutex::new(HashMap::new()),
        })
    }

    /// The database's name.
    pub fn database(&self) -> &str {
        self.db.name()
    }

    /// The retention the store was opened with.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The database handle, for tests that inspect raw documents.
    #[cfg(test)]
    pub(super) fn db(&self) -> &Database {
        &self.db
    }

    // -----------------------------------------------------------------------------
    // keys

    fn key_from_doc(&self, doc: KeyDoc) -> Result<ApiKey, StoreError> {
        let unreadable = |why: &str| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("mongodb {KEYS}: record {}: key material {why}", doc.id),
            )
        };
        let plain = self.cipher.open(&doc.material.bytes).map_err(|e| match e {
            CipherError::Open => unreadable("cannot be opened: wrong master key or corrupted data"),
            CipherError::Internal(_) => StoreError::new(
                StoreErrorKind::Internal,
                format!("mongodb {KEYS}: record {}: the cipher failed", doc.id),
            ),
        })?;
        let text = std::str::from_utf8(&plain).map_err(|_| unreadable("is not text"))?;
        let material = KeyMaterial::parse(text).map_err(|_| unreadable("is not valid"))?;
        Ok(ApiKey {
            cooldown_until: doc.cooldown(),
            created_at: doc.created(),
            stats: doc.stats.to_stats(),
            id: KeyId::new(doc.id),
            provider: ProviderId::new(doc.provider),
            material,
            metadata: doc.metadata,
            state: doc.state,
            state_reason: doc.state_reason,
        })
    }

    fn decode_key_doc(raw: Document) -> Result<KeyDoc, StoreError> {
        let id = record_id(&raw);
        bson::from_document(raw).map_err(|_| malformed(KEYS, &id))
    }

    async fn find_key(&self, id: &KeyId) -> Result<Document, StoreError> {
        self.keys
            .find_one(doc! { "_id": id.as_str() })
            .await
            .map_err(|e| map_err(KEYS, "read a key", e))?
            .ok_or_else(|| StoreError::key_not_found(id))
    }

    async fn load_quota(&self, id: &KeyId) -> Result<QuotaDoc, StoreError> {
        let raw = self.find_key(id).await?;
        let quota = raw
            .get_document("quota")
            .map_err(|_| malformed(KEYS, id.as_str()))?;
        bson::from_document(quota.clone()).map_err(|_| malformed(KEYS, id.as_str()))
    }

    fn stats_of(raw: &Document) -> Result<KeyStats, StoreError> {
        let id = record_id(raw);
        let stats = raw
            .get_document("stats")
            .map_err(|_| malformed(KEYS, &id))?;
        let stats: StatsDoc =
            bson::from_document(stats.clone()).map_err(|_| malformed(KEYS, &id))?;
        Ok(stats.to_stats())
    }

    /// Moves the success and latency averages by one sample, by compare-and-set.
    async fn update_averages(
        &self,
        id: &KeyId,
        mut stats: KeyStats,
        outcome: &KeyOutcome,
    ) -> Result<KeyStats, StoreError> {
        // Whether this call was the key's first success (the latency average then
        // starts at this sample), decided once from the counters it incremented.
        let success = outcome.verdict.succeeded();
        let first_success = success && stats.successes == 1;
        for _ in 0..AVERAGE_ATTEMPTS {
            let (old_success, old_latency) = (stats.success_ewma, stats.latency_ewma_ms);
            // The domain's arithmetic, applied to the current averages.
            let mut before = stats.clone();
            before.successes = u64::from(!first_success);
            before.record(success, outcome.latency, outcome.now);
            let (new_success, new_latency) = (before.success_ewma, before.latency_ewma_ms);
            let res = self
                .keys
                .update_one(
                    doc! {
                        "_id": id.as_str(),
                        "stats.success_ewma": old_success,
                        "stats.latency_ewma_ms": old_latency,
                    },
                    doc! { "$set": {
                        "stats.success_ewma": new_success,
                        "stats.latency_ewma_ms": new_latency,
                    } },
                )
                .await
                .map_err(|e| map_err(KEYS, "update a key's averages", e))?;
            if res.matched_count > 0 {
                stats.success_ewma = new_success;
                stats.latency_ewma_ms = new_latency;
                return Ok(stats);
            }
            stats = Self::stats_of(&self.find_key(id).await?)?;
        }
        // Sustained contention: the sample is dropped from the averages only.
        Ok(stats)
    }

    /// The key's part of a settlement after its tokens are reconciled: the outcome
    /// counted and the provider's observation stored in one update of the key's
    /// document; the moving averages follow by compare-and-set (see the module docs).
    /// `None` when the key is gone.
    async fn record_key_outcome(
        &self,
        id: &KeyId,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        let outcome = &settlement.outcome;
        let mut inc = doc! {
            "stats.prompt_tokens": to_i64(outcome.usage.prompt_tokens),
            "stats.completion_tokens": to_i64(outcome.usage.completion_tokens),
            "stats.cost_nanos": nanos(outcome.cost),
        };
        let mut set = doc! {};
        if outcome.verdict != Verdict::Abandoned {
            inc.insert("stats.requests", 1_i64);
            set.insert("stats.last_used", millis(outcome.now));
        }
        match outcome.verdict {
            Verdict::Succeeded => {
                inc.insert("stats.successes", 1_i64);
                set.insert("stats.consecutive_failures", 0_i64);
                set.insert("stats.throttle_streak", 0_i64);
            }
            Verdict::Failed { rate_limited } => {
                inc.insert("stats.failures", 1_i64);
                inc.insert("stats.consecutive_failures", 1_i64);
                if rate_limited {
                    inc.insert("stats.throttle_streak", 1_i64);
                }
            }
            Verdict::Abandoned => {}
        }
        if let Some(observation) = settlement.observation {
            let observed = observation_bson(ObservationDoc::from_domain(&observation, outcome.now));
            set.insert("quota.observation", observed);
            // Charges read with an older observation must not count against this one.
            inc.insert("quota.observation_seq", 1_i64);
        }
        let mut update = doc! { "$inc": inc };
        if !set.is_empty() {
            // MongoDB refuses an empty `$set`.
            update.insert("$set", set);
        }
        let Some(after) = self
            .keys
            .find_one_and_update(doc! { "_id": id.as_str() }, update)
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| map_err(KEYS, "record an outcome", e))?
        else {
            return Ok(None);
        };
        let stats = Self::stats_of(&after)?;
        if outcome.verdict == Verdict::Abandoned {
            return Ok(Some(stats));
        }
        self.update_averages(id, stats, outcome).await.map(Some)
    }

    // -----------------------------------------------------------------------------
    // quota windows

    /// The conditional update that counts one request of `charge` in the key's
    /// windows as `quota` shows them: it matches only while every window it checked
    /// is unchanged in start and still has room.
    fn window_charge(charge: &Charge, quota: &QuotaDoc) -> (Document, Document) {
        let now = charge.now;
        let mut filter = doc! {
            "_id": charge.key_id.as_str(),
            "quota.observation_seq": quota.observation_seq,
        };
        let mut inc = Document::new();
        let mut set = Document::new();
        for kind in WindowKind::ALL {
            let field = format!("quota.{}", window_field(kind));
            let stored = quota.window(kind);
            let add = to_i64(window_increment(kind, charge.est_tokens));
            filter.insert(format!("{field}.start"), stored.start);
            if quota.is_current(kind, now) {
                if let Some(limit) = charge.limits.limit(kind) {
                    filter.insert(
                        format!("{field}.used"),
                        doc! { "$lte": to_i64(limit).saturating_sub(add) },
                    );
                }
                inc.insert(format!("{field}.used"), add);
                inc.insert(format!("{field}.samples"), 1_i64);
            } else {
                // Roll the window over and count the request in the new one, in the
                // same update; `used` is pinned so the exhaustion flag is exact.
                filter.insert(format!("{field}.used"), stored.used);
                let fresh = WindowDoc {
                    start: current_start(kind, now),
                    used: add,
                    samples: 1,
                    previous_exhausted: rolled_exhausted(stored, kind, &charge.limits),
                };
                set.insert(field, window_bson(fresh));
            }
        }
        if let Some(obs) = quota.observation {
            if obs.needs_roll(now) {
                let rolled = obs.rolled_and_charged(now, charge.est_tokens);
                set.insert("quota.observation", observation_bson(rolled));
                inc.insert("quota.observation_seq", 1_i64);
            } else {
                // The domain refuses a request when the provider said nothing is
                // left until a reset; the filter keeps that true under concurrency.
                if obs.remaining_requests.is_some() {
                    if obs.reset_requests_at.is_some() {
                        filter.insert(
                            "quota.observation.remaining_requests",
                            doc! { "$gte": 1_i64 },
                        );
                    }
                    inc.insert("quota.observation.remaining_requests", -1_i64);
                }
                if charge.est_tokens > 0 && obs.remaining_tokens.is_some() {
                    if obs.reset_tokens_at.is_some() {
                        filter.insert("quota.observation.remaining_tokens", doc! { "$gte": 1_i64 });
                    }
                    inc.insert(
                        "quota.observation.remaining_tokens",
                        -to_i64(charge.est_tokens),
                    );
                }
            }
        }
        let mut update = Document::new();
        if !inc.is_empty() {
            update.insert("$inc", inc);
        }
        if !set.is_empty() {
            update.insert("$set", set);
        }
        (filter, update)
    }

    /// Counts `charge` in its key's windows, starting from `quota` as read.
    async fn charge_windows(
        &self,
        charge: &Charge,
        quota: QuotaDoc,
    ) -> Result<(), ChargeRejection> {
        let mut quota = quota;
        for _ in 0..MAX_ATTEMPTS {
            let (filter, update) = Self::window_charge(charge, &quota);
            let res = self
                .keys
                .update_one(filter, update)
                .await
                .map_err(|e| map_err(KEYS, "count a request", e))?;
            if res.matched_count > 0 {
                return Ok(());
            }
            // Changed since read: read again and decide again.
            quota = self.load_quota(&charge.key_id).await?;
            quota
                .to_domain(&charge.limits, charge.now)
                .check(&charge.limits, charge.est_tokens, charge.now)
                .map_err(ChargeRejection::Quota)?;
        }
        Err(contention(KEYS, charge.key_id.as_str()).into())
    }

    /// Replaces the estimated tokens of `charge` with `actual` in the token windows
    /// it was counted in. Windows that rolled over since are left alone (the estimate
    /// went with them), and so is a key deleted since.
    async fn reconcile_tokens(&self, charge: &Charge, actual: u64) -> Result<(), StoreError> {
        let delta = to_i64(actual).saturating_sub(to_i64(charge.est_tokens));
        if delta == 0 {
            return Ok(());
        }
        let token_kinds = WindowKind::ALL.into_iter().filter(|k| k.counts_tokens());
        let condition = |kind: WindowKind, filter: &mut Document| {
            let field = format!("quota.{}", window_field(kind));
            filter.insert(format!("{field}.start"), current_start(kind, charge.now));
            if delta < 0 {
                filter.insert(format!("{field}.used"), doc! { "$gte": -delta });
            }
            format!("{field}.used")
        };
        let mut filter = doc! { "_id": charge.key_id.as_str() };
        let mut inc = Document::new();
        for kind in token_kinds.clone() {
            let used = condition(kind, &mut filter);
            inc.insert(used, delta);
        }
        let res = self
            .keys
            .update_one(filter, doc! { "$inc": inc })
            .await
            .map_err(|e| map_err(KEYS, "reconcile tokens", e))?;
        if res.matched_count > 0 {
            return Ok(());
        }
        // Some window rolled over (or the key is gone): adjust each one still open.
        for kind in token_kinds {
            let mut filter = doc! { "_id": charge.key_id.as_str() };
            let used = condition(kind, &mut filter);
            self.keys
                .update_one(filter, doc! { "$inc": { used: delta } })
                .await
                .map_err(|e| map_err(KEYS, "reconcile tokens", e))?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // budgets

    fn hint(&self, id: &str) -> Enforcement {
        self.enforcement_hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .copied()
            .unwrap_or(Enforcement::Hard)
    }

    fn set_hint(&self, id: &str, enforcement: Enforcement) {
        self.enforcement_hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), enforcement);
    }

    fn decode_budget(raw: Document) -> Result<BudgetDoc, StoreError> {
        let id = record_id(&raw);
        let doc: BudgetDoc = bson::from_document(raw).map_err(|_| malformed(BUDGETS, &id))?;
        if doc.budget().is_none() {
            return Err(malformed(BUDGETS, &id));
        }
        Ok(doc)
    }

    async fn load_budget(&self, id: &str) -> Result<Option<BudgetDoc>, StoreError> {
        let raw = self
            .budgets
            .find_one(doc! { "_id": id })
            .await
            .map_err(|e| map_err(BUDGETS, "read a budget", e))?;
        raw.map(Self::decode_budget).transpose()
    }

    async fn all_budgets(&self) -> Result<Vec<BudgetDoc>, StoreError> {
        let cursor = self
            .budgets
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| map_err(BUDGETS, "list budgets", e))?;
        let raws: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| map_err(BUDGETS, "list budgets", e))?;
        raws.into_iter().map(Self::decode_budget).collect()
    }

    /// Starts the budget's new period at `now`: nothing spent, reservations kept.
    /// Pinned to the `spent` read, so a commit landing meanwhile is not lost; a
    /// concurrent roll by another caller makes this one a no-op.
    async fn roll_budget(&self, doc: &BudgetDoc, now: Timestamp) -> Result<(), StoreError> {
        let (start, end) = doc.period_at(now);
        self.budgets
            .update_one(
                doc! { "_id": &doc.id, "period_end": doc.period_end, "spent": doc.spent },
                doc! {
                    "$set": { "period_start": start, "period_end": end, "spent": 0_i64 },
                    "$inc": { "headroom": doc.spent },
                },
            )
            .await
            .map_err(|e| map_err(BUDGETS, "start a budget period", e))?;
        Ok(())
    }

    /// Reserves `charge`'s estimate in budget `id`. `Ok(None)` for an unknown budget.
    async fn reserve_budget(
        &self,
        id: &str,
        charge: &Charge,
    ) -> Result<Option<Held>, ChargeRejection> {
        let amount = nanos(charge.est_cost);
        let key = reservation_key(charge.reservation);
        let field = format!("reservations.{key}");
        let now_ms = millis(charge.now);
        let entry = doc! { "amount": amount, "taken_at": now_ms };
        let mut guess = self.hint(id);
        for _ in 0..MAX_ATTEMPTS {
            let mut filter = doc! {
                "_id": id,
                "period_end": { "$gt": now_ms },
                "enforcement": enforcement_name(guess),
            };
            filter.insert(field.clone(), doc! { "$exists": false });
            if guess == Enforcement::Hard {
                filter.insert("headroom", doc! { "$gte": amount });
            }
            let mut set = Document::new();
            set.insert(field.clone(), entry.clone());
            let update = doc! { "$inc": { "reserved": amount, "headroom": -amount }, "$set": set };
            let res = self
                .budgets
                .update_one(filter, update)
                .await
                .map_err(|e| map_err(BUDGETS, "reserve", e))?;
            if res.matched_count > 0 {
                return Ok(Some(Held {
                    budget_id: id.to_owned(),
                    previous: None,
                }));
            }

            // Why not? Read and act on what is there.
            let Some(doc) = self.load_budget(id).await? else {
                return Ok(None);
            };
            self.set_hint(id, doc.enforcement);
            guess = doc.enforcement;
            if doc.period_over(charge.now) {
                self.roll_budget(&doc, charge.now).await?;
                continue;
            }
            let hard = doc.enforcement == Enforcement::Hard;
            if let Some(previous) = doc.reservations.get(&key) {
                // Reserving an id again replaces its reservation.
                let delta = amount.saturating_sub(previous.amount);
                let mut filter = doc! {
                    "_id": id,
                    "period_end": { "$gt": now_ms },
                    "enforcement": enforcement_name(guess),
                };
                filter.insert(format!("{field}.amount"), previous.amount);
                if hard && delta > 0 {
                    filter.insert("headroom", doc! { "$gte": delta });
                }
                let mut set = Document::new();
                set.insert(field.clone(), entry.clone());
                let update =
                    doc! { "$inc": { "reserved": delta, "headroom": -delta }, "$set": set };
                let res = self
                    .budgets
                    .update_one(filter, update)
                    .await
                    .map_err(|e| map_err(BUDGETS, "reserve", e))?;
                if res.matched_count > 0 {
                    return Ok(Some(Held {
                        budget_id: id.to_owned(),
                        previous: Some(previous.amount),
                    }));
                }
                if hard && doc.headroom < delta {
                    return Err(ChargeRejection::Budget(would_exceed(&doc, charge.est_cost)));
                }
                continue;
            }
            if hard && doc.headroom < amount {
                return Err(ChargeRejection::Budget(would_exceed(&doc, charge.est_cost)));
            }
            // It fits now: something changed between the update and the read.
        }
        Err(contention(BUDGETS, id).into())
    }

    /// Gives back what [`Self::reserve_budget`] took for `charge`. Best effort: it
    /// runs on a path that already fails, and a reservation it cannot give back only
    /// ever refuses, never overspends (see the module docs).
    async fn undo_reservations(&self, held: &[Held], charge: &Charge) {
        let amount = nanos(charge.est_cost);
        let field = format!("reservations.{}", reservation_key(charge.reservation));
        for h in held {
            let res = match h.previous {
                None => self.release_budget(&h.budget_id, charge).await,
                Some(previous) => {
                    let mut filter = doc! { "_id": &h.budget_id };
                    filter.insert(format!("{field}.amount"), amount);
                    let mut set = Document::new();
                    set.insert(format!("{field}.amount"), previous);
                    let delta = previous.saturating_sub(amount);
                    self.budgets
                        .update_one(
                            filter,
                            doc! { "$inc": { "reserved": delta, "headroom": -delta }, "$set": set },
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| map_err(BUDGETS, "restore a reservation", e))
                }
            };
            // Nothing more to do on failure: see the doc comment.
            drop(res);
        }
    }

    /// Commits `actual` in budget `id`, replacing `reservation` (expected to hold
    /// `held`, `None` when it is known not to be there), and returns the status
    /// after. `Ok(None)` for an unknown budget. With [`ReservationId::NONE`] it is
    /// spend without a reservation, which is not carried into a period that started
    /// after `now` (`BudgetLedger::add_unreserved`).
    async fn commit_budget(
        &self,
        id: &str,
        reservation: ReservationId,
        held: Option<Money>,
        actual: Money,
        now: Timestamp,
    ) -> Result<Option<BudgetStatus>, StoreError> {
        let actual = nanos(actual);
        let field = format!("reservations.{}", reservation_key(reservation));
        let now_ms = millis(now);
        // What the reservation should hold; `None` once known to be gone.
        let mut expected = held.map(nanos);
        let unreserved = reservation == ReservationId::NONE;
        for _ in 0..MAX_ATTEMPTS {
            let mut filter = doc! { "_id": id, "period_end": { "$gt": now_ms } };
            if unreserved {
                filter.insert("period_start", doc! { "$lte": now_ms });
            }
            let update = match expected {
                Some(held) => {
                    filter.insert(format!("{field}.amount"), held);
                    let mut unset = Document::new();
                    unset.insert(field.clone(), "");
                    doc! {
                        "$inc": {
                            "reserved": -held,
                            "spent": actual,
                            "headroom": held.saturating_sub(actual),
                        },
                        "$unset": unset,
                    }
                }
                // Already committed or released: money spent is still counted.
                None => {
                    filter.insert(field.clone(), doc! { "$exists": false });
                    doc! { "$inc": { "spent": actual, "headroom": -actual } }
                }
            };
            let after = self
                .budgets
                .find_one_and_update(filter, update)
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| map_err(BUDGETS, "settle", e))?;
            if let Some(after) = after {
                return Ok(Some(Self::decode_budget(after)?.status(now)));
            }
            let Some(doc) = self.load_budget(id).await? else {
                return Ok(None);
            };
            if unreserved && doc.period_start > now_ms {
                return Ok(Some(doc.status(now)));
            }
            if doc.period_over(now) {
                self.roll_budget(&doc, now).await?;
                continue;
            }
            expected = doc
                .reservations
                .get(&reservation_key(reservation))
                .map(|r| r.amount);
        }
        Err(contention(BUDGETS, id))
    }

    /// Drops `charge`'s reservation in budget `id`, if it is still held.
    async fn release_budget(&self, id: &str, charge: &Charge) -> Result<(), StoreError> {
        let key = reservation_key(charge.reservation);
        let field = format!("reservations.{key}");
        let mut held = nanos(charge.est_cost);
        for _ in 0..MAX_ATTEMPTS {
            let mut filter = doc! { "_id": id };
            filter.insert(format!("{field}.amount"), held);
            let mut unset = Document::new();
            unset.insert(field.clone(), "");
            let res = self
                .budgets
                .update_one(
                    filter,
                    doc! { "$inc": { "reserved": -held, "headroom": held }, "$unset": unset },
                )
                .await
                .map_err(|e| map_err(BUDGETS, "release", e))?;
            if res.matched_count > 0 {
                return Ok(());
            }
            let Some(doc) = self.load_budget(id).await? else {
                return Ok(());
            };
            match doc.reservations.get(&key) {
                None => return Ok(()),
                Some(r) => held = r.amount,
            }
        }
        Err(contention(BUDGETS, id))
    }

    // -----------------------------------------------------------------------------
    // request records

    /// Whether `collection` keeps the record of `raw` under its request id. Both
    /// sides are decoded the same way before they are compared: a record read back
    /// differs from the one written where its serde shape rounds (objective weights
    /// are kept as a two-decimal label).
    async fn holds(
        &self,
        collection: &Collection<Document>,
        name: &str,
        raw: &Document,
    ) -> Result<bool, StoreError> {
        let id = raw.get_str("request_id").unwrap_or_default();
        let kept = collection
            .find_one(doc! { "request_id": id })
            .await
            .map_err(|e| map_err(name, "read a request", e))?;
        let decode = |doc: Document| {
            bson::from_document::<RequestDoc>(doc)
                .ok()
                .and_then(|d| bson::from_document::<AuditRecord>(d.record).ok())
        };
        Ok(match (kept.and_then(decode), decode(raw.clone())) {
            (Some(kept), Some(ours)) => kept == ours,
            _ => false,
        })
    }

    fn request_doc(record: &AuditRecord) -> Result<Document, StoreError> {
        let cannot_encode = || {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!(
                    "request {} cannot be encoded for mongodb",
                    record.request_id.as_str()
                ),
            )
        };
        let encoded = bson::to_document(record).map_err(|_| cannot_encode())?;
        let doc = RequestDoc {
            request_id: record.request_id.as_str().to_owned(),
            started_at: date(record.started_at),
            finished_at: date(record.finished_at),
            tenant: record.tenant.as_ref().map(|t| t.as_str().to_owned()),
            key_id: record.key_id.as_ref().map(|k| k.as_str().to_owned()),
            record: encoded,
        };
        bson::to_document(&doc).map_err(|_| cannot_encode())
    }
}

fn window_bson(w: WindowDoc) -> Document {
    doc! {
        "start": w.start,
        "used": w.used,
        "samples": w.samples,
        "previous_exhausted": w.previous_exhausted,
    }
}

fn observation_bson(o: ObservationDoc) -> Document {
    doc! {
        "limit_requests": o.limit_requests,
        "remaining_requests": o.remaining_requests,
        "reset_requests_at": o.reset_requests_at,
        "limit_tokens": o.limit_tokens,
        "remaining_tokens": o.remaining_tokens,
        "reset_tokens_at": o.reset_tokens_at,
        "observed_at": o.observed_at,
    }
}

fn would_exceed(doc: &BudgetDoc, requested: Money) -> BudgetError {
    BudgetError::WouldExceed {
        id: doc.id.clone(),
        limit: Money::from_nanos(to_u64(doc.limit)),
        spent: Money::from_nanos(to_u64(doc.spent)),
        reserved: Money::from_nanos(to_u64(doc.reserved)),
        requested,
    }
}

fn contention(collection: &str, id: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        format!(
            "mongodb {collection}: record {id} kept changing during {MAX_ATTEMPTS} attempts; try again"
        ),
    )
}

/// Budget ids in ascending order without duplicates: the order a charge takes them in.
fn sorted_ids(ids: &[String]) -> Vec<&str> {
    let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoStore")
            .field("url", &self.shown_url)
            .field("database", &self.db.name())
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Key material is sealed with the store's cipher before it is written and opened
/// when read; a record that cannot be read is `Invalid`, naming it.
#[async_trait]
impl KeyStore for MongoStore {
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError> {
        let sealed = self
            .cipher
            .seal(key.material.expose().as_bytes())
            .map_err(|_| {
                StoreError::new(
                    StoreErrorKind::Internal,
                    format!("key {}: the cipher failed", key.id),
                )
            })?;
        let doc = KeyDoc {
            id: key.id.as_str().to_owned(),
            provider: key.provider.as_str().to_owned(),
            material: Binary {
                subtype: BinarySubtype::Generic,
                bytes: sealed,
            },
            metadata: key.metadata,
            state: key.state,
            state_reason: key.state_reason,
            state_version: 0,
            cooldown_until: key.cooldown_until.map(millis),
            stats: StatsDoc::from_stats(&key.stats),
            created_at: date(key.created_at),
            incarnation: ObjectId::new().to_hex(),
            quota: QuotaDoc::default(),
        };
        let raw = bson::to_document(&doc).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("key {} cannot be encoded for mongodb", key.id),
            )
        })?;
        match self.keys.insert_one(raw).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("key {} already exists", key.id),
            )),
            Err(e) => Err(map_err(KEYS, "insert a key", e)),
        }
    }

    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError> {
        let raw = self.find_key(id).await?;
        self.key_from_doc(Self::decode_key_doc(raw)?)
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let cursor = self
            .keys
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| map_err(KEYS, "list keys", e))?;
        let raws: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| map_err(KEYS, "list keys", e))?;
        raws.into_iter()
            .map(|raw| self.key_from_doc(Self::decode_key_doc(raw)?))
            .collect()
    }

    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError> {
        let encoded = bson::to_bson(&metadata).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("metadata of key {id} cannot be encoded for mongodb"),
            )
        })?;
        let after = self
            .keys
            .find_one_and_update(
                doc! { "_id": id.as_str() },
                doc! { "$set": { "metadata": encoded } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| map_err(KEYS, "update a key", e))?
            .ok_or_else(|| StoreError::key_not_found(id))?;
        self.key_from_doc(Self::decode_key_doc(after)?)
    }

    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError> {
        let res = self
            .keys
            .delete_one(doc! { "_id": id.as_str() })
            .await
            .map_err(|e| map_err(KEYS, "delete a key", e))?;
        if res.deleted_count == 0 {
            return Err(StoreError::key_not_found(id));
        }
        // If this fails the records stay behind, invisible: a key inserted again
        // under the id has a new incarnation.
        self.transitions
            .delete_many(doc! { "key_id": id.as_str() })
            .await
            .map_err(|e| map_err(TRANSITIONS, "delete a key's transitions", e))?;
        Ok(())
    }

    /// The state changes by compare-and-set on the key's state version, then the
    /// transition is recorded; if recording fails, the state change is undone (when
    /// nothing changed it since) and the error returned.
    async fn transition(
        &self,
        id: &KeyId,
        to: KeyState,
        trigger: TransitionTrigger,
        reason: String,
        cooldown_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<StateTransition, StoreError> {
        let to_bson_state = |state: KeyState| Bson::String(state.as_str().to_owned());
        for _ in 0..MAX_ATTEMPTS {
            let doc = Self::decode_key_doc(self.find_key(id).await?)?;
            let from = doc.state;
            if !from.can_transition(to, trigger) {
                let refused = TransitionError {
                    key_id: id.clone(),
                    from,
                    to,
                };
                return Err(StoreError::new(
                    StoreErrorKind::Invalid,
                    refused.to_string(),
                ));
            }
            let res = self
                .keys
                .update_one(
                    doc! { "_id": id.as_str(), "state_version": doc.state_version },
                    doc! {
                        "$set": {
                            "state": to_bson_state(to),
                            "state_reason": &reason,
                            "cooldown_until": cooldown_until.map(millis),
                        },
                        "$inc": { "state_version": 1_i64 },
                    },
                )
                .await
                .map_err(|e| map_err(KEYS, "change a key's state", e))?;
            if res.matched_count == 0 {
                continue;
            }
            let record = StateTransition {
                key_id: id.clone(),
                from,
                to,
                trigger,
                reason: reason.clone(),
                at: now,
            };
            let seq = doc.state_version.saturating_add(1);
            let entry = bson::to_document(&TransitionDoc::new(&record, &doc.incarnation, seq))
                .map_err(|_| malformed(TRANSITIONS, id.as_str()))?;
            match self.transitions.insert_one(entry).await {
                Ok(_) => return Ok(record),
                Err(e) if is_duplicate_key(&e) => return Ok(record),
                Err(e) => {
                    let undo = self
                        .keys
                        .update_one(
                            doc! { "_id": id.as_str(), "state_version": seq },
                            doc! {
                                "$set": {
                                    "state": to_bson_state(from),
                                    "state_reason": &doc.state_reason,
                                    "cooldown_until": doc.cooldown_until,
                                },
                                "$inc": { "state_version": 1_i64 },
                            },
                        )
                        .await;
                    drop(undo);
                    return Err(map_err(TRANSITIONS, "record a transition", e));
                }
            }
        }
        Err(contention(KEYS, id.as_str()))
    }

    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError> {
        let raw = self.find_key(id).await?;
        let incarnation = raw
            .get_str("incarnation")
            .map_err(|_| malformed(KEYS, id.as_str()))?;
        let cursor = self
            .transitions
            .find(doc! { "key_id": id.as_str(), "incarnation": incarnation })
            .sort(doc! { "at": 1, "seq": 1 })
            .await
            .map_err(|e| map_err(TRANSITIONS, "list transitions", e))?;
        let raws: Vec<Document> = cursor
            .try_collect()
            .await
            .map_err(|e| map_err(TRANSITIONS, "list transitions", e))?;
        let mut docs = raws
            .into_iter()
            .map(|raw| {
                let record = record_id(&raw);
                bson::from_document::<TransitionDoc>(raw)
                    .map_err(|_| malformed(TRANSITIONS, &record))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The server sorted already; sorting again keeps the order exact even where a
        // server compares dates loosely.
        docs.sort_by_key(|d| (d.at.timestamp_millis(), d.seq));
        Ok(docs.iter().map(TransitionDoc::to_domain).collect())
    }
}

/// A charge is a saga over the key's document and each budget's (see the module
/// docs). Unknown budget ids are ignored, as by the memory store.
impl MongoStore {
    /// Counts one request against the client's minute with conditional updates of its
    /// one document; returns the minute's start (ms) for compensation.
    async fn count_client(
        &self,
        client: &ClientLimit,
        now: Timestamp,
    ) -> Result<i64, ChargeRejection> {
        let (start, end) = WindowKind::MinuteRequests.bounds(now);
        let start = millis(start);
        let id = client.client.as_str();
        let rpm = i64::from(client.rpm);
        let failed = |e| ChargeRejection::Store(map_err(CLIENTS, "count a request", e));
        for _ in 0..MAX_ATTEMPTS {
            let counted = self
                .clients
                .update_one(
                    doc! { "_id": id, "start": start, "count": { "$lt": rpm } },
                    doc! { "$inc": { "count": 1_i64 } },
                )
                .await
                .map_err(failed)?;
            if counted.matched_count > 0 {
                return Ok(start);
            }
            let current = self
                .clients
                .find_one(doc! { "_id": id })
                .await
                .map_err(failed)?;
            match current {
                None => match self
                    .clients
                    .insert_one(doc! { "_id": id, "start": start, "count": 1_i64 })
                    .await
                {
                    Ok(_) => return Ok(start),
                    Err(e) if is_duplicate_key(&e) => {}
                    Err(e) => return Err(failed(e)),
                },
                // This minute (or a later one, written by an instance whose clock is
                // ahead) is full: the step above found no room in it.
                Some(doc) if doc.get_i64("start").is_ok_and(|seen| seen >= start) => {
                    let seen = doc.get_i64("start").unwrap_or(start);
                    if seen > start {
                        let counted = self
                            .clients
                            .update_one(
                                doc! { "_id": id, "start": seen, "count": { "$lt": rpm } },
                                doc! { "$inc": { "count": 1_i64 } },
                            )
                            .await
                            .map_err(failed)?;
                        if counted.matched_count > 0 {
                            return Ok(seen);
                        }
                    }
                    return Err(ChargeRejection::Client { retry_at: end });
                }
                Some(doc) => {
                    // An older minute: start this one, unless another instance did.
                    let seen = doc.get("start").cloned().unwrap_or(Bson::Null);
                    let rolled = self
                        .clients
                        .update_one(
                            doc! { "_id": id, "start": seen },
                            doc! { "$set": { "start": start, "count": 1_i64 } },
                        )
                        .await
                        .map_err(failed)?;
                    if rolled.matched_count > 0 {
                        return Ok(start);
                    }
                }
            }
        }
        Err(ChargeRejection::Store(contention(CLIENTS, id)))
    }

    /// The key's part of a settlement: tokens reconciled, outcome and observation
    /// counted. `None` when the key was deleted since the reserve.
    async fn settle_key(
        &self,
        charge: &Charge,
        actual_tokens: u64,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        let settled = async {
            self.reconcile_tokens(charge, actual_tokens).await?;
            self.record_key_outcome(&charge.key_id, settlement).await
        };
        match settled.await {
            Err(e) if e.kind == StoreErrorKind::NotFound => Ok(None),
            other => other,
        }
    }

    async fn reserve_key_and_budgets(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        let quota = self.load_quota(&charge.key_id).await?;
        quota
            .to_domain(&charge.limits, charge.now)
            .check(&charge.limits, charge.est_tokens, charge.now)
            .map_err(ChargeRejection::Quota)?;
        let mut held = Vec::new();
        for id in sorted_ids(&charge.budget_ids) {
            match self.reserve_budget(id, charge).await {
                Ok(Some(h)) => held.push(h),
                Ok(None) => {}
                Err(rejection) => {
                    self.undo_reservations(&held, charge).await;
                    return Err(rejection);
                }
            }
        }
        if let Err(rejection) = self.charge_windows(charge, quota).await {
            self.undo_reservations(&held, charge).await;
            return Err(rejection);
        }
        Ok(())
    }
}

#[async_trait]
impl UsageLedger for MongoStore {
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection> {
        let Some(client) = &charge.client else {
            return self.reserve_key_and_budgets(charge).await;
        };
        let start = self.count_client(client, charge.now).await?;
        let result = self.reserve_key_and_budgets(charge).await;
        if result.is_err() {
            let undo = self
                .clients
                .update_one(
                    doc! { "_id": client.client.as_str(), "start": start },
                    doc! { "$inc": { "count": -1 } },
                )
                .await;
            if let Err(e) = undo {
                tracing::warn!(client = %client.client, error = %e, "client request count not given back");
            }
        }
        result
    }

    /// The key's document takes one update for the tokens and one for the counters
    /// and observation (plus the averages' compare-and-set), then one per budget:
    /// single-document updates, no transaction (see the module docs).
    async fn settle(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Settled, StoreError> {
        // The money first: a key deleted or failing meanwhile must not lose the spend.
        let outcome = &settlement.outcome;
        let mut budgets = Vec::new();
        for id in sorted_ids(&charge.budget_ids) {
            if let Some(status) = self
                .commit_budget(
                    id,
                    charge.reservation,
                    Some(charge.est_cost),
                    outcome.cost,
                    outcome.now,
                )
                .await?
            {
                budgets.push(status);
            }
        }
        let stats = self
            .settle_key(charge, outcome.usage.total(), settlement)
            .await?;
        Ok(Settled { budgets, stats })
    }

    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError> {
        for id in sorted_ids(&charge.budget_ids) {
            self.release_budget(id, charge).await?;
        }
        self.settle_key(charge, 0, settlement).await
    }

    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError> {
        let quota = self.load_quota(id).await?;
        Ok(quota.to_domain(limits, now).snapshot(limits, now))
    }
}

/// A budget's ledger as stored, and its BSON.
fn budget_document(
    budget: &Budget,
    spent: Money,
    now: Timestamp,
) -> Result<(BudgetDoc, Document), StoreError> {
    let doc = BudgetDoc::new(budget, spent, now);
    let raw = bson::to_document(&doc).map_err(|_| {
        StoreError::new(
            StoreErrorKind::Invalid,
            format!("budget {} cannot be encoded for mongodb", budget.id),
        )
    })?;
    Ok((doc, raw))
}

/// Replacing a budget with `put_budget` drops its outstanding reservations; settling
/// them later still charges the actual cost.
#[async_trait]
impl BudgetStore for MongoStore {
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let (doc, raw) = budget_document(&budget, spent, now)?;
        self.budgets
            .replace_one(doc! { "_id": &budget.id }, raw)
            .upsert(true)
            .await
            .map_err(|e| map_err(BUDGETS, "write a budget", e))?;
        self.set_hint(&budget.id, budget.enforcement);
        Ok(doc.status(now))
    }

    /// An insert: the `_id` index refuses a taken id.
    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        let (doc, raw) = budget_document(&budget, spent, now)?;
        match self.budgets.insert_one(raw).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {
                return Err(StoreError::budget_exists(&budget.id));
            }
            Err(e) => return Err(map_err(BUDGETS, "insert a budget", e)),
        }
        self.set_hint(&budget.id, budget.enforcement);
        Ok(doc.status(now))
    }

    /// A compare-and-set on the limit and the period read: the headroom moves by the
    /// change of limit while commits and reservations move it by theirs.
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError> {
        // The definition's fields as a new ledger of the budget stores them.
        let (defined, raw) = budget_document(&budget, Money::ZERO, now)?;
        let field = |name: &str| raw.get(name).cloned().unwrap_or(Bson::Null);
        let (scope, period, enforcement) = (field("scope"), field("period"), field("enforcement"));
        let limit = defined.limit;
        for _ in 0..MAX_ATTEMPTS {
            let Some(doc) = self.load_budget(&budget.id).await? else {
                return Err(StoreError::budget_not_found(&budget.id));
            };
            if doc.period_over(now) {
                self.roll_budget(&doc, now).await?;
                continue;
            }
            // Only a new period kind moves the period; the spend is carried into it.
            let (start, end) = if doc.period == budget.period {
                (doc.period_start, doc.period_end)
            } else {
                (defined.period_start, defined.period_end)
            };
            let after = self
                .budgets
                .find_one_and_update(
                    doc! { "_id": &budget.id, "limit": doc.limit, "period_end": doc.period_end },
                    doc! {
                        "$set": {
                            "scope": scope.clone(),
                            "limit": limit,
                            "period": period.clone(),
                            "enforcement": enforcement.clone(),
                            "period_start": start,
                            "period_end": end,
                        },
                        "$inc": { "headroom": limit.saturating_sub(doc.limit) },
                    },
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(|e| map_err(BUDGETS, "redefine a budget", e))?;
            if let Some(after) = after {
                self.set_hint(&budget.id, budget.enforcement);
                return Ok(Self::decode_budget(after)?.status(now));
            }
        }
        Err(contention(BUDGETS, &budget.id))
    }

    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError> {
        Ok(self
            .all_budgets()
            .await?
            .iter()
            .filter_map(BudgetDoc::budget)
            .collect())
    }

    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError> {
        Ok(self
            .all_budgets()
            .await?
            .iter()
            .map(|doc| doc.status(now))
            .collect())
    }

    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError> {
        self.load_budget(id)
            .await?
            .map(|doc| doc.status(now))
            .ok_or_else(|| StoreError::budget_not_found(id))
    }

    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        let mut statuses = Vec::new();
        for id in sorted_ids(ids) {
            if let Some(status) = self
                .commit_budget(id, ReservationId::NONE, None, cost, now)
                .await?
            {
                statuses.push(status);
            }
        }
        Ok(statuses)
    }

    /// One conditional update per stale reservation, matching its amount and time,
    /// so a reservation settled or reclaimed by another instance meanwhile is left
    /// alone.
    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        _now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        let cutoff = millis(taken_before);
        let mut reclaimed = Vec::new();
        for doc in self.all_budgets().await? {
            let mut count = 0;
            let mut amount = 0_i64;
            for (key, held) in doc.reservations.iter().filter(|(_, r)| r.taken_at < cutoff) {
                let field = format!("reservations.{key}");
                let mut filter = doc! { "_id": &doc.id };
                filter.insert(format!("{field}.amount"), held.amount);
                filter.insert(format!("{field}.taken_at"), held.taken_at);
                let mut unset = Document::new();
                unset.insert(field, "");
                let res = self
                    .budgets
                    .update_one(
                        filter,
                        doc! {
                            "$inc": { "reserved": -held.amount, "headroom": held.amount },
                            "$unset": unset,
                        },
                    )
                    .await
                    .map_err(|e| map_err(BUDGETS, "reclaim reservations", e))?;
                if res.modified_count > 0 {
                    count += 1;
                    amount += held.amount;
                }
            }
            if count > 0 {
                reclaimed.push(ReclaimedReservations {
                    budget_id: doc.id,
                    count,
                    amount: Money::from_nanos(to_u64(amount)),
                });
            }
        }
        Ok(reclaimed)
    }

    async fn delete_budget(&self, id: &str) -> Result<(), StoreError> {
        let res = self
            .budgets
            .delete_one(doc! { "_id": id })
            .await
            .map_err(|e| map_err(BUDGETS, "delete a budget", e))?;
        if res.deleted_count == 0 {
            return Err(StoreError::budget_not_found(id));
        }
        Ok(())
    }
}

/// Records are kept for the retention's `decisions_days`, then expired by the
/// server's TTL monitor.
#[async_trait]
impl RequestLog for MongoStore {
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError> {
        let raw = Self::request_doc(&record)?;
        match self.requests.insert_one(raw.clone()).await {
            Ok(_) => Ok(true),
            // Taken (the unique index on `request_id`): by this very record when an
            // earlier attempt's answer was lost.
            Err(e) if is_duplicate_key(&e) => self.holds(&self.requests, REQUESTS, &raw).await,
            Err(e) => Err(map_err(REQUESTS, "save a request", e)),
        }
    }

    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError> {
        let Some(raw) = self
            .requests
            .find_one(doc! { "request_id": id.as_str() })
            .await
            .map_err(|e| map_err(REQUESTS, "read a request", e))?
        else {
            return Ok(None);
        };
        let doc: RequestDoc =
            bson::from_document(raw).map_err(|_| malformed(REQUESTS, id.as_str()))?;
        bson::from_document(doc.record)
            .map(Some)
            .map_err(|_| malformed(REQUESTS, id.as_str()))
    }
}

impl MongoStore {
    /// Why a conditional change to virtual key `name` (one not revoked) matched
    /// nothing: revoked, or absent; a failed read is `doing`'s failure.
    async fn missing_or_revoked(&self, name: &str, doing: &str) -> StoreError {
        match self.virtual_keys.find_one(doc! { "_id": name }).await {
            Ok(Some(_)) => StoreError::virtual_key_revoked(name),
            Ok(None) => StoreError::virtual_key_not_found(name),
            Err(e) => map_err(VIRTUAL_KEYS, doing, e),
        }
    }
}

/// One document per key, its name as `_id` (whose index keeps names unique). No
/// change events: instances sharing only a MongoDB store see each other's changes
/// when they re-read the keys (the proxy does every few seconds).
#[async_trait]
impl VirtualKeyStore for MongoStore {
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let mut raw = bson::to_document(&key).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("virtual key {} cannot be encoded for mongodb", key.name),
            )
        })?;
        raw.insert("_id", key.name.as_str());
        match self.virtual_keys.insert_one(raw).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!("virtual key {} already exists", key.name),
            )),
            Err(e) => Err(map_err(VIRTUAL_KEYS, "insert a virtual key", e)),
        }
    }

    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        let raw = self
            .virtual_keys
            .find_one(doc! { "_id": name })
            .await
            .map_err(|e| map_err(VIRTUAL_KEYS, "read a virtual key", e))?
            .ok_or_else(|| StoreError::virtual_key_not_found(name))?;
        bson::from_document(raw).map_err(|_| malformed(VIRTUAL_KEYS, name))
    }

    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        let failed = |e| map_err(VIRTUAL_KEYS, "list virtual keys", e);
        let docs: Vec<Document> = self
            .virtual_keys
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .map_err(failed)?
            .try_collect()
            .await
            .map_err(failed)?;
        let stored = docs.len();
        let keys: Vec<VirtualKey> = docs
            .into_iter()
            .filter_map(|raw| {
                let id = raw.get_str("_id").unwrap_or("?").to_owned();
                bson::from_document(raw)
                    .inspect_err(|_| {
                        tracing::warn!(virtual_key = %id, "stored virtual key does not decode; left out");
                    })
                    .ok()
            })
            .collect();
        if keys.is_empty() && stored > 0 {
            // None decodes: an empty list would read as "no client credentials were
            // ever issued".
            return Err(malformed(VIRTUAL_KEYS, "every one"));
        }
        Ok(keys)
    }

    /// One conditional update of the limits (only while not revoked), then a read to
    /// tell a revoked key from a missing one.
    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        let failed = |e| map_err(VIRTUAL_KEYS, "update a virtual key", e);
        let mut set = Document::new();
        let mut unset = Document::new();
        let mut field = |name: &str, value: Option<Bson>| match value {
            Some(v) => {
                set.insert(name, v);
            }
            None => {
                unset.insert(name, "");
            }
        };
        field(
            "tenant",
            key.tenant.map(|t| Bson::String(t.as_str().to_owned())),
        );
        field(
            "models",
            key.models.map(|m| {
                Bson::Array(
                    m.iter()
                        .map(|m| Bson::String(m.as_str().to_owned()))
                        .collect(),
                )
            }),
        );
        field("rpm", key.rpm.map(|r| Bson::Int64(i64::from(r))));
        field("budget_usd", key.budget_usd.map(Bson::Double));
        let mut update = Document::new();
        if !set.is_empty() {
            update.insert("$set", set);
        }
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        let result = self
            .virtual_keys
            .update_one(doc! { "_id": &key.name, "revoked_at": null }, update)
            .await
            .map_err(failed)?;
        if result.matched_count == 1 {
            return Ok(());
        }
        Err(self
            .missing_or_revoked(&key.name, "update a virtual key")
            .await)
    }

    /// One conditional update of the digest field alone, so it cannot undo a limits
    /// update made at the same time (nor be undone by one).
    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        let failed = |e| map_err(VIRTUAL_KEYS, "rotate a virtual key", e);
        let before = self
            .virtual_keys
            .find_one_and_update(
                doc! { "_id": name, "revoked_at": null },
                doc! { "$set": { "token_sha256": token_sha256 } },
            )
            .return_document(ReturnDocument::Before)
            .await
            .map_err(failed)?;
        if let Some(raw) = before {
            return bson::from_document(raw).map_err(|_| malformed(VIRTUAL_KEYS, name));
        }
        Err(self.missing_or_revoked(name, "rotate a virtual key").await)
    }

    /// One conditional update (only a key not yet revoked is marked), then a read
    /// for a key revoked before.
    async fn revoke_virtual_key(
        &self,
        name: &str,
        at: Timestamp,
    ) -> Result<VirtualKey, StoreError> {
        let failed = |e| map_err(VIRTUAL_KEYS, "revoke a virtual key", e);
        let marked = self
            .virtual_keys
            .find_one_and_update(
                doc! { "_id": name, "revoked_at": null },
                doc! { "$set": { "revoked_at": to_i64(at.as_millis()) } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(failed)?;
        let raw = match marked {
            Some(raw) => raw,
            None => self
                .virtual_keys
                .find_one(doc! { "_id": name })
                .await
                .map_err(failed)?
                .ok_or_else(|| StoreError::virtual_key_not_found(name))?,
        };
        bson::from_document(raw).map_err(|_| malformed(VIRTUAL_KEYS, name))
    }
}

#[async_trait]
impl StateStore for MongoStore {
    fn kind(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("mongodb at {} is unreachable", self.shown_url),
                )
                .with_source(e)
            })
    }
}

/// The audit trail: one document per request in `audit`, append-only, kept for the
/// retention's `audit_days`. Recording the same record twice (a retried delivery)
/// keeps one; another record under a taken id (a client reused an id after the
/// request log forgot it) is kept as `{id}~<object id>`.
#[async_trait]
impl AuditSink for MongoStore {
    async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let audit_error = |err: StoreError| {
            if err.kind == StoreErrorKind::Unavailable {
                AuditError::Unavailable(err.message)
            } else {
                AuditError::Internal(err.message)
            }
        };
        let raw = Self::request_doc(record).map_err(|e| AuditError::Internal(e.message))?;
        match self.audit.insert_one(raw.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(audit_error(map_err(AUDIT, "record", e))),
        }
        if self
            .holds(&self.audit, AUDIT, &raw)
            .await
            .map_err(audit_error)?
        {
            return Ok(());
        }
        let mut moved = record.clone();
        moved.request_id = RequestId::new(format!(
            "{}~{}",
            record.request_id,
            bson::oid::ObjectId::new().to_hex()
        ));
        tracing::warn!(request_id = %record.request_id, saved_as = %moved.request_id, "request id already in the audit trail; record kept under another");
        let raw = Self::request_doc(&moved).map_err(|e| AuditError::Internal(e.message))?;
        self.audit
            .insert_one(raw)
            .await
            .map(|_| ())
            .map_err(|e| audit_error(map_err(AUDIT, "record", e)))
    }
}
