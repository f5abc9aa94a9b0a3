//! The state-store ports: keys, usage and quota, budgets, the request log and the
//! virtual keys made at run time.
//!
//! One adapter implements all five (memory, Redis, MongoDB); [`StateStore`] bundles
//! them so the services hold a single `Arc<dyn StateStore>`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apikeyrouter_domain::quota::QuotaDenial;
use apikeyrouter_domain::{
    ApiKey, Budget, BudgetError, BudgetStatus, KeyId, KeyMetadata, KeyState, KeyStats, Money,
    QuotaLimits, QuotaObservation, QuotaSnapshot, RequestId, ReservationId, StateTransition,
    Timestamp, TokenUsage, TransitionTrigger, VirtualKey,
};
use async_trait::async_trait;

use crate::records::AuditRecord;

/// Kinds of store failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The record does not exist.
    NotFound,
    /// The record already exists.
    Conflict,
    /// The backend cannot be reached.
    Unavailable,
    /// The operation is not allowed (e.g. a forbidden state transition) or the stored
    /// data is malformed.
    Invalid,
    /// Anything else.
    Internal,
}

/// A store failure.
#[derive(Debug)]
pub struct StoreError {
    /// What kind.
    pub kind: StoreErrorKind,
    /// What happened, naming the record.
    pub message: String,
    /// The backend's error.
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// An error of `kind`.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// `NotFound` for a key.
    pub fn key_not_found(id: &KeyId) -> Self {
        Self::new(StoreErrorKind::NotFound, format!("key {id} not found"))
    }

    /// `NotFound` for a virtual key.
    pub fn virtual_key_not_found(name: &str) -> Self {
        Self::new(
            StoreErrorKind::NotFound,
            format!("virtual key {name} not found"),
        )
    }

    /// `Conflict` for a change to a revoked virtual key.
    pub fn virtual_key_revoked(name: &str) -> Self {
        Self::new(
            StoreErrorKind::Conflict,
            format!("virtual key {name} is revoked"),
        )
    }

    /// `Conflict` for a budget created under an id in use.
    pub fn budget_exists(id: &str) -> Self {
        Self::new(
            StoreErrorKind::Conflict,
            format!("budget {id} already exists"),
        )
    }

    /// `NotFound` for a budget.
    pub fn budget_not_found(id: &str) -> Self {
        Self::new(StoreErrorKind::NotFound, format!("budget {id} not found"))
    }

    /// Adds the backend's error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// What an attempt says about its key's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The provider answered.
    Succeeded,
    /// The provider, or the way to it, failed the call; `rate_limited` when it was a
    /// rate limit (drives cooldown backoff).
    Failed {
        /// Whether the failure was a rate limit.
        rate_limited: bool,
    },
    /// The caller went away before the provider answered. That says nothing about the
    /// key, so its request, success, failure and latency counters are left alone (a
    /// client that times out must not put a healthy key into cooldown); only what the
    /// attempt spent is added.
    Abandoned,
}

impl Verdict {
    /// Whether the provider answered.
    pub fn succeeded(self) -> bool {
        self == Self::Succeeded
    }

    /// Whether the call failed with a rate limit.
    pub fn rate_limited(self) -> bool {
        self == Self::Failed { rate_limited: true }
    }
}

/// The result of one call, for a key's counters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyOutcome {
    /// What the call says about the key.
    pub verdict: Verdict,
    /// Time to answer.
    pub latency: Duration,
    /// Tokens consumed.
    pub usage: TokenUsage,
    /// Money spent.
    pub cost: Money,
    /// When it finished.
    pub now: Timestamp,
}

/// Keys and their state.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Adds a key.
    ///
    /// # Errors
    /// `Conflict` if a key with its id exists.
    async fn insert_key(&self, key: ApiKey) -> Result<(), StoreError>;

    /// One key.
    ///
    /// # Errors
    /// `NotFound` if absent.
    async fn get_key(&self, id: &KeyId) -> Result<ApiKey, StoreError>;

    /// Every key, in id order.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError>;

    /// Replaces a key's metadata and returns the key.
    ///
    /// # Errors
    /// `NotFound` if absent.
    async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<ApiKey, StoreError>;

    /// Removes a key with its counters and transitions.
    ///
    /// # Errors
    /// `NotFound` if absent.
    async fn delete_key(&self, id: &KeyId) -> Result<(), StoreError>;

    /// Moves a key to `to` atomically and records the transition.
    ///
    /// # Errors
    /// `NotFound` if absent; `Invalid` if the state machine forbids it (nothing changes).
    async fn transition(
        &self,
        id: &KeyId,
        to: KeyState,
        trigger: TransitionTrigger,
        reason: String,
        cooldown_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<StateTransition, StoreError>;

    /// A key's recorded transitions, oldest first.
    ///
    /// # Errors
    /// `NotFound` if the key is absent.
    async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, StoreError>;
}

/// Everything charged for one attempt, all-or-nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    /// Unique per attempt; reserving it twice replaces the first reservation.
    pub reservation: ReservationId,
    /// Key that will serve.
    pub key_id: KeyId,
    /// Its limits.
    pub limits: QuotaLimits,
    /// Estimated tokens (prompt plus completion bound).
    pub est_tokens: u64,
    /// Estimated cost.
    pub est_cost: Money,
    /// Budgets the attempt counts against.
    pub budget_ids: Vec<String>,
    /// The calling client's request rate limit, shared by every instance; set until
    /// one of a request's reservations succeeds, so a failover does not count twice.
    pub client: Option<ClientLimit>,
    /// When.
    pub now: Timestamp,
}

/// A client's (virtual key's) requests-per-minute limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientLimit {
    /// Stable id of the client (not its secret token).
    pub client: String,
    /// Requests per calendar minute.
    pub rpm: u32,
}

/// Why a charge was refused.
#[derive(Debug)]
pub enum ChargeRejection {
    /// A quota window of the key is full.
    Quota(QuotaDenial),
    /// A hard budget cannot take the estimate.
    Budget(BudgetError),
    /// The client used its requests for this minute; it may try again at `retry_at`.
    Client {
        /// When the client's window resets.
        retry_at: Timestamp,
    },
    /// The store failed.
    Store(StoreError),
}

impl From<StoreError> for ChargeRejection {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// How an attempt ended, for [`UsageLedger::settle`] and [`UsageLedger::release`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settlement {
    /// The call's result for the key's counters. For `settle` its usage and cost are
    /// what the attempt actually spent; `release` charges nothing whatever they say.
    pub outcome: KeyOutcome,
    /// Rate-limit headers the provider sent, if any.
    pub observation: Option<QuotaObservation>,
}

/// What [`UsageLedger::settle`] leaves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settled {
    /// The status of every budget charged that still exists, in id order.
    pub budgets: Vec<BudgetStatus>,
    /// The key's counters after the outcome; `None` when the key was deleted since
    /// the reserve.
    pub stats: Option<KeyStats>,
}

/// Request and token windows, budget reservations, quota observations.
#[async_trait]
pub trait UsageLedger: Send + Sync + 'static {
    /// Checks every quota window of the key and every budget in `charge`, and if all
    /// fit, counts the request and reserves the estimate in each, atomically: either
    /// everything is charged or nothing is.
    ///
    /// # Errors
    /// [`ChargeRejection`] naming the first window or budget that did not fit.
    async fn reserve(&self, charge: &Charge) -> Result<(), ChargeRejection>;

    /// Reconciles a finished attempt in one call: replaces the estimate with the
    /// outcome's actual tokens and cost in the key's token windows and every budget
    /// charged, adds the outcome to the key's counters, and stores the provider's
    /// observation if there is one. One call so that the step after a provider
    /// call costs one round trip on a networked store.
    ///
    /// A key deleted since the reserve still has its budgets settled; its stats
    /// come back as `None`.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn settle(&self, charge: &Charge, settlement: &Settlement)
    -> Result<Settled, StoreError>;

    /// Gives back the whole estimate of an attempt that cost nothing, adds the
    /// outcome to the key's counters and stores the provider's observation if there
    /// is one, in one call. The request still counts against the key's request
    /// windows (the provider counted it too). Returns the key's counters, `None`
    /// when the key was deleted since the reserve.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn release(
        &self,
        charge: &Charge,
        settlement: &Settlement,
    ) -> Result<Option<KeyStats>, StoreError>;

    /// A key's quota state.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn quota_snapshot(
        &self,
        id: &KeyId,
        limits: &QuotaLimits,
        now: Timestamp,
    ) -> Result<QuotaSnapshot, StoreError>;
}

/// Budget definitions and their ledgers.
#[async_trait]
pub trait BudgetStore: Send + Sync + 'static {
    /// Adds or replaces a budget, starting it with `spent` already spent this period.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn put_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError>;

    /// Adds a budget unless one with its id exists, starting it with `spent` already
    /// spent this period, announced as [`Self::put_budget`] announces: what a create
    /// must use, since a check followed by a put would let two creators overwrite
    /// each other's budget (and its spend).
    ///
    /// # Errors
    /// `Conflict` when a budget has that id; `Unavailable` when the backend is down.
    async fn insert_budget(
        &self,
        budget: Budget,
        spent: Money,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError>;

    /// Changes a budget's definition (limit, period, scope, enforcement) in one store
    /// step, keeping what it spent this period and the reservations it holds
    /// (`BudgetLedger::redefine`): reading the spend and putting it back would lose
    /// what is spent in between and drop the reservations. Announced as
    /// [`Self::put_budget`] announces.
    ///
    /// # Errors
    /// `NotFound` when there is no such budget; `Unavailable` when the backend is down.
    async fn redefine_budget(
        &self,
        budget: Budget,
        now: Timestamp,
    ) -> Result<BudgetStatus, StoreError>;

    /// Every budget's definition.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn list_budgets(&self) -> Result<Vec<Budget>, StoreError>;

    /// Every budget's status at `now`, in id order.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn budget_statuses(&self, now: Timestamp) -> Result<Vec<BudgetStatus>, StoreError>;

    /// One budget's status at `now`: a read of that budget alone, so that looking one
    /// up (a virtual key's, among thousands) does not read them all.
    ///
    /// # Errors
    /// `NotFound` for an unknown id; `Unavailable` when the backend is down.
    async fn budget_status(&self, id: &str, now: Timestamp) -> Result<BudgetStatus, StoreError>;

    /// Removes a budget.
    ///
    /// # Errors
    /// `NotFound` if absent.
    async fn delete_budget(&self, id: &str) -> Result<(), StoreError>;

    /// Adds `cost` spent at `now` to each budget among `ids` that exists here,
    /// without a reservation: money spent while this store could not be reached
    /// (fail-open), counted once it can. Spend dated before a budget's current
    /// period is not carried into it (`BudgetLedger::add_unreserved`). Returns the
    /// statuses after, in id order.
    ///
    /// The default refuses, so a store written before this method existed still
    /// builds; fail-open then drops the outage's spend with an error in the log.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down; `Invalid` from the default.
    async fn add_spend(
        &self,
        ids: &[String],
        cost: Money,
        now: Timestamp,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        let _ = (ids, cost, now);
        Err(StoreError::new(
            StoreErrorKind::Invalid,
            "this store cannot add spend without a reservation",
        ))
    }

    /// Gives back, in every budget, the reservations taken before `taken_before`,
    /// without spending them: an instance that died between reserve and settle left
    /// them, and in a shared store nothing else would ever release them. Returns
    /// what each budget that had any gave back, in id order. Each reservation is
    /// dropped atomically, so instances sweeping at once reclaim it once; a request
    /// that settles after all still has its cost charged. A reservation whose time
    /// is not known (stored before times were kept, possibly by an instance still
    /// running) is dated `now` instead, so it is reclaimed one lease later.
    ///
    /// The default refuses, so a store written before this method existed still
    /// builds; the router's sweep then logs that it cannot reclaim.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down; `Invalid` from the default.
    async fn reclaim_reservations(
        &self,
        taken_before: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<ReclaimedReservations>, StoreError> {
        let _ = (taken_before, now);
        Err(StoreError::new(
            StoreErrorKind::Invalid,
            "this store cannot reclaim reservations",
        ))
    }
}

/// The reservations [`BudgetStore::reclaim_reservations`] gave back in one budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimedReservations {
    /// The budget.
    pub budget_id: String,
    /// How many reservations it dropped.
    pub count: u64,
    /// The money they held.
    pub amount: Money,
}

/// Records of routed requests, for look-up by request id.
#[async_trait]
pub trait RequestLog: Send + Sync + 'static {
    /// Stores a request's record (decision, attempts, outcome) under its id, unless
    /// the id is taken by a different record: ids may come from clients, and one
    /// request's record must never replace another's. Returns `false` when the id is
    /// taken; saving the same record again (a retried delivery) returns `true`.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn save_request(&self, record: Arc<AuditRecord>) -> Result<bool, StoreError>;

    /// A request's record, if kept.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down.
    async fn get_request(&self, id: &RequestId) -> Result<Option<AuditRecord>, StoreError>;
}

/// The proxy's virtual keys made through its management API (those of the config
/// file are not stored). Revoked keys keep their record (see
/// [`VirtualKey::revoked_at`]).
#[async_trait]
pub trait VirtualKeyStore: Send + Sync + 'static {
    /// Adds a virtual key and announces the change. Only the name must be free
    /// (revoked keys keep theirs): tokens are drawn at random by the proxy, so
    /// digests do not collide.
    ///
    /// # Errors
    /// `Conflict` when the name is taken; `Unavailable` when the backend is down.
    async fn insert_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError>;

    /// Every virtual key, revoked ones included, in name order. A record that does
    /// not decode is left out and logged: one bad record must not lock every client
    /// out.
    ///
    /// # Errors
    /// `Unavailable` when the backend is down; `Invalid` when records are stored but
    /// none decodes (an empty list would read as "no credentials were ever issued",
    /// which leaves the API open).
    async fn list_virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError>;

    /// One virtual key's record, revoked or not: a read of that record alone.
    ///
    /// # Errors
    /// `NotFound` for an unknown name; `Invalid` when its record does not decode;
    /// `Unavailable` when the backend is down.
    async fn get_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError>;

    /// Replaces the limits (tenant, models, rpm, budget) of an active virtual key
    /// with `key`'s and announces the change; its name, digest and times stay.
    ///
    /// # Errors
    /// `NotFound` if absent; `Conflict` if revoked; `Unavailable` when the backend
    /// is down.
    async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError>;

    /// Gives an active virtual key a new token digest (`token_sha256`, 64 lowercase
    /// hex digits) and announces the change; its name, limits and times stay.
    /// Returns the record as it was, so the caller can refuse the old token at once.
    ///
    /// # Errors
    /// `NotFound` if absent; `Conflict` if revoked; `Unavailable` when the backend
    /// is down.
    async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError>;

    /// Marks a virtual key revoked at `at` (once: revoking it again keeps the first
    /// time) and announces the change; returns the record.
    ///
    /// # Errors
    /// `NotFound` if absent; `Unavailable` when the backend is down.
    async fn revoke_virtual_key(&self, name: &str, at: Timestamp)
    -> Result<VirtualKey, StoreError>;

    /// Tells the instances sharing this store that the virtual key `name` changed (a
    /// change event); nothing for stores without change events. A store with events
    /// announces its own changes (Redis, from the script that makes each); a store that
    /// keeps the records elsewhere (the split store) calls this on the store that
    /// carries the events.
    ///
    /// # Errors
    /// `Unavailable` when the event cannot be sent.
    async fn announce_virtual_key(&self, name: &str) -> Result<(), StoreError> {
        let _ = name;
        Ok(())
    }
}

/// A change another instance made through a shared store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChange {
    /// A key was added, updated, moved to another state or deleted.
    Key(KeyId),
    /// A budget was added, redefined or deleted.
    Budgets,
    /// The virtual key of this name was added, changed, rotated or revoked.
    VirtualKey(String),
    /// Any virtual key may have changed (what an instance of a version before named
    /// events announces).
    VirtualKeys,
}

/// Changes made by any instance sharing a store; ends when the subscription is lost.
pub type StoreChanges = std::pin::Pin<Box<dyn futures_core::Stream<Item = StoreChange> + Send>>;

/// How a store is faring, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// The shared backend is unreachable and the store is running on local limits
    /// (fail-open).
    pub degraded: bool,
    /// Operations served locally because the shared backend was unreachable.
    pub local_fallbacks: u64,
}

/// Everything a store adapter provides.
#[async_trait]
pub trait StateStore: KeyStore + UsageLedger + BudgetStore + RequestLog + VirtualKeyStore {
    /// The backend's name (`memory`, `redis`, `mongodb`).
    fn kind(&self) -> &'static str;

    /// Whether other processes can reach this store. A store only this process uses
    /// (memory) has no one else's changes to follow, so nothing reads it again.
    fn is_shared(&self) -> bool {
        true
    }

    /// Key, budget and virtual-key changes made through this store by other instances, so each
    /// can refresh its local view. `None` for stores used by one process only.
    ///
    /// # Errors
    /// `Unavailable` when the subscription cannot be made.
    async fn changes(&self) -> Result<Option<StoreChanges>, StoreError> {
        Ok(None)
    }

    /// Checks the backend is reachable.
    ///
    /// # Errors
    /// `Unavailable` when it is not.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the store is degraded (running on local limits); healthy unless the
    /// adapter falls back.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }
}
