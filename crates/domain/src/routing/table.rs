//! The routing table: an incrementally maintained index of keys that answers "which
//! key next?" in logarithmic time.
//!
//! Keys are grouped into pools of interchangeable keys (same provider, tenant and model
//! list). Each pool keeps its ready keys (routable state, not parked) in one ordered
//! set per single objective, so a decision reads the first element of a few sets
//! instead of scoring every key. Keys that are cooling down or over a local rate
//! window sit in a wake-up heap and rejoin the sets when their time comes. Weighted
//! objectives score the ready keys of the matching pools in one linear pass.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use foldhash::HashMap;

use serde::{Deserialize, Serialize};

use crate::ids::{KeyId, ModelId, ProviderId, TenantId};
use crate::key::{ApiKey, KeyState, KeyStats, StateTransition, TransitionTrigger};
use crate::money::Money;
use crate::time::Timestamp;

use super::decision::{
    Alternative, CandidateRow, Decision, IneligibleCounts, KeyMetrics, LossReason, NoEligibleKey,
};
use super::objective::{Objective, ObjectiveKind};

/// Why a key could not serve a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ineligibility {
    /// Throttled after a rate limit.
    Throttled,
    /// Quota exhausted.
    Exhausted,
    /// Disabled by an operator.
    Disabled,
    /// Credentials rejected.
    Invalid,
    /// Our accounting says a rate window is full.
    RateLimited,
    /// Does not serve the model.
    ModelNotServed,
    /// Provider excluded by constraints.
    ProviderNotAllowed,
    /// Over the maximum cost per request.
    OverMaxCost,
    /// Under the minimum success rate.
    BelowMinSuccessRate,
    /// Already tried for this request.
    AlreadyTried,
    /// A budget it charges is full.
    BudgetExceeded,
}

impl Ineligibility {
    /// Lowercase label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Exhausted => "exhausted",
            Self::Disabled => "disabled",
            Self::Invalid => "invalid",
            Self::RateLimited => "rate_limited",
            Self::ModelNotServed => "model_not_served",
            Self::ProviderNotAllowed => "provider_not_allowed",
            Self::OverMaxCost => "over_max_cost",
            Self::BelowMinSuccessRate => "below_min_success_rate",
            Self::AlreadyTried => "already_tried",
            Self::BudgetExceeded => "budget_exceeded",
        }
    }

    const fn of_state(state: KeyState) -> Option<Self> {
        match state {
            KeyState::Available | KeyState::Recovering => None,
            KeyState::Throttled => Some(Self::Throttled),
            KeyState::Exhausted => Some(Self::Exhausted),
            KeyState::Disabled => Some(Self::Disabled),
            KeyState::Invalid => Some(Self::Invalid),
        }
    }
}

/// A provider that serves the requested model, with this request's estimated cost there.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderOffer {
    /// The provider.
    pub provider: ProviderId,
    /// Estimated cost of the request on it; `None` when the model has no price.
    pub est_cost: Option<Money>,
}

/// The request-specific inputs of one decision.
#[derive(Clone, Copy, Debug)]
pub struct RouteQuery<'a> {
    /// Model to serve.
    pub model: &'a ModelId,
    /// Tenant the request is for; only its keys are considered (untenanted requests
    /// use only untenanted keys).
    pub tenant: Option<&'a TenantId>,
    /// Providers that serve `model`, in preference order.
    pub offers: &'a [ProviderOffer],
    /// Keys to skip for this request, with the reason.
    pub exclude: &'a [(KeyId, Ineligibility)],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    provider: ProviderId,
    tenant: Option<TenantId>,
    models: Option<Box<[ModelId]>>,
}

#[derive(Debug)]
struct Pool {
    key: PoolKey,
    members: Vec<u32>,
    by_state: [u32; 6],
    parked: u32,
    fairness: BTreeSet<(u64, u32)>,
    /// Kept only once a request asked for reliability (most deployments use one
    /// objective, and every set costs a re-insertion per decision).
    reliability: Option<BTreeSet<(u32, u64, u32)>>,
    /// Kept only once a request asked for latency.
    latency: Option<BTreeSet<(u32, u64, u32)>>,
}

impl Pool {
    fn new(key: PoolKey) -> Self {
        Self {
            key,
            members: Vec::new(),
            by_state: [0; 6],
            parked: 0,
            fairness: BTreeSet::new(),
            reliability: None,
            latency: None,
        }
    }

    fn serves(&self, model: &ModelId) -> bool {
        self.key.models.as_ref().is_none_or(|m| m.contains(model))
    }

    fn ready_len(&self) -> u32 {
        u32::try_from(self.fairness.len()).unwrap_or(u32::MAX)
    }

    fn insert_ready(&mut self, slot: u32, e: &Entry) {
        self.fairness.insert((e.uses, slot));
        if let Some(set) = &mut self.reliability {
            set.insert((u32::MAX - e.success_q, e.uses, slot));
        }
        if let Some(set) = &mut self.latency {
            set.insert((e.latency_us, e.uses, slot));
        }
    }

    fn remove_ready(&mut self, slot: u32, e: &Entry) {
        self.fairness.remove(&(e.uses, slot));
        if let Some(set) = &mut self.reliability {
            set.remove(&(u32::MAX - e.success_q, e.uses, slot));
        }
        if let Some(set) = &mut self.latency {
            set.remove(&(e.latency_us, e.uses, slot));
        }
    }

    /// Ready slots in the order of `kind` (cost orders by use within a pool, since the
    /// cost of a request is the same on every key of a pool).
    fn ordered(&self, kind: ObjectiveKind) -> Ordered<'_> {
        match kind {
            ObjectiveKind::Cost | ObjectiveKind::Fairness => {
                Ordered::Fairness(self.fairness.iter())
            }
            ObjectiveKind::Reliability => match &self.reliability {
                Some(set) => Ordered::Triple(set.iter()),
                None => Ordered::Fairness(self.fairness.iter()),
            },
            ObjectiveKind::Latency => match &self.latency {
                Some(set) => Ordered::Triple(set.iter()),
                None => Ordered::Fairness(self.fairness.iter()),
            },
        }
    }
}

/// Slots of one ordered set, without boxing.
enum Ordered<'a> {
    Fairness(std::collections::btree_set::Iter<'a, (u64, u32)>),
    Triple(std::collections::btree_set::Iter<'a, (u32, u64, u32)>),
}

impl Iterator for Ordered<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Self::Fairness(it) => it.next().map(|&(_, s)| s),
            Self::Triple(it) => it.next().map(|&(_, _, s)| s),
        }
    }
}

const fn state_index(state: KeyState) -> usize {
    match state {
        KeyState::Available => 0,
        KeyState::Throttled => 1,
        KeyState::Exhausted => 2,
        KeyState::Recovering => 3,
        KeyState::Disabled => 4,
        KeyState::Invalid => 5,
    }
}

#[derive(Debug)]
struct Entry {
    id: KeyId,
    pool: u32,
    state: KeyState,
    cooldown_until: Option<Timestamp>,
    parked_until: Option<Timestamp>,
    uses: u64,
    /// Success rate scaled to `0..=1_000_000`.
    success_q: u32,
    /// Latency in microseconds.
    latency_us: u32,
    generation: u32,
    ready: bool,
    live: bool,
}

impl Entry {
    fn metrics(&self, est_cost: Option<Money>) -> KeyMetrics {
        KeyMetrics {
            uses: self.uses,
            success_rate: f64::from(self.success_q) / 1e6,
            latency_ms: f64::from(self.latency_us) / 1e3,
            est_cost,
        }
    }

    /// When the key can serve again if nothing else happens: the later of the end of
    /// its cooldown and of its parking; `None` when it is ready now or only an
    /// operator can bring it back.
    fn ready_at(&self) -> Option<Timestamp> {
        let cooldown = match self.state {
            KeyState::Available | KeyState::Recovering => None,
            KeyState::Throttled | KeyState::Exhausted => Some(self.cooldown_until?),
            KeyState::Disabled | KeyState::Invalid => return None,
        };
        match (cooldown, self.parked_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_wake(&self) -> Option<Timestamp> {
        let cooldown = match self.state {
            KeyState::Throttled | KeyState::Exhausted => self.cooldown_until,
            _ => None,
        };
        match (cooldown, self.parked_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn quantize_success(rate: f64) -> u32 {
    (rate.clamp(0.0, 1.0) * 1e6).round() as u32
}

/// Latency in microseconds, rounded to 100 µs: finer differences are noise, and
/// coarser buckets spare the ordered sets a re-insertion after most calls.
fn quantize_latency(ms: f64) -> u32 {
    let us = (ms.max(0.0) * 1e3).min(f64::from(u32::MAX - 100)) as u32;
    (us + 50) / 100 * 100
}

/// A scored candidate during a decision.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    slot: u32,
    cost: Option<Money>,
    /// Lower sorts first; the winner is the minimum.
    rank: (u64, u64, u64),
    score: f64,
}

/// Keeps the best four candidates without allocating.
#[derive(Debug, Default)]
struct Top4 {
    items: [Option<Candidate>; 4],
}

impl Top4 {
    const LEN: usize = 4;

    fn offer(&mut self, mut c: Candidate) {
        for item in &mut self.items {
            match item {
                None => {
                    *item = Some(c);
                    return;
                }
                Some(existing) if c.rank < existing.rank => std::mem::swap(existing, &mut c),
                Some(_) => {}
            }
        }
    }

    fn first(&self) -> Option<Candidate> {
        self.items[0]
    }
}

/// The incremental index of keys used to route requests.
#[derive(Debug, Default)]
pub struct RoutingTable {
    entries: Vec<Entry>,
    free: Vec<u32>,
    by_id: HashMap<KeyId, u32>,
    pools: Vec<Pool>,
    pool_ids: HashMap<PoolKey, u32>,
    /// Pools by tenant (`None` = shared keys) and provider.
    pools_by_tenant: HashMap<Option<TenantId>, HashMap<ProviderId, Vec<u32>>>,
    wakeups: BinaryHeap<Reverse<(Timestamp, u32, u32)>>,
    outbox: Vec<StateTransition>,
    /// Whether pools keep their reliability and latency orders (new pools follow).
    track_reliability: bool,
    track_latency: bool,
}

impl RoutingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the table holds no keys.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The state the table holds for `id`.
    pub fn state(&self, id: &KeyId) -> Option<KeyState> {
        self.by_id.get(id).map(|&s| self.entries[s as usize].state)
    }

    /// Adds `key` or refreshes everything the table knows of it.
    pub fn upsert(&mut self, key: &ApiKey) {
        let pool_key = PoolKey {
            provider: key.provider.clone(),
            tenant: key.metadata.tenant.clone(),
            models: key.metadata.models.as_ref().map(|m| {
                let mut m = m.clone();
                m.sort();
                m.dedup();
                m.into_boxed_slice()
            }),
        };
        let pool = self.pool_for(pool_key);
        let slot = match self.by_id.get(&key.id) {
            Some(&slot) => {
                self.detach(slot);
                let old_pool = self.entries[slot as usize].pool;
                if old_pool != pool {
                    self.pools[old_pool as usize].members.retain(|&m| m != slot);
                    self.pools[pool as usize].members.push(slot);
                }
                slot
            }
            None => {
                let entry = Entry {
                    id: key.id.clone(),
                    pool,
                    state: key.state,
                    cooldown_until: None,
                    parked_until: None,
                    uses: 0,
                    success_q: 0,
                    latency_us: 0,
                    generation: 0,
                    ready: false,
                    live: true,
                };
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.entries[slot as usize] = entry;
                        slot
                    }
                    None => {
                        self.entries.push(entry);
                        u32::try_from(self.entries.len() - 1).unwrap_or(u32::MAX)
                    }
                };
                self.by_id.insert(key.id.clone(), slot);
                self.pools[pool as usize].members.push(slot);
                slot
            }
        };
        let e = &mut self.entries[slot as usize];
        e.pool = pool;
        e.state = key.state;
        e.cooldown_until = key.cooldown_until;
        e.uses = e.uses.max(key.stats.requests);
        e.success_q = quantize_success(key.stats.success_ewma);
        e.latency_us = quantize_latency(key.stats.latency_ewma_ms);
        e.live = true;
        self.attach(slot);
    }

    /// Removes a key; returns whether it was present.
    pub fn remove(&mut self, id: &KeyId) -> bool {
        let Some(slot) = self.by_id.remove(id) else {
            return false;
        };
        self.detach(slot);
        let e = &mut self.entries[slot as usize];
        e.live = false;
        e.generation = e.generation.wrapping_add(1);
        let pool = e.pool as usize;
        self.pools[pool].members.retain(|&m| m != slot);
        self.free.push(slot);
        true
    }

    /// Sets a key's state (after a transition recorded elsewhere). A throttled or
    /// exhausted key with a cooldown wakes up by itself when it ends.
    pub fn set_state(&mut self, id: &KeyId, state: KeyState, cooldown_until: Option<Timestamp>) {
        let Some(&slot) = self.by_id.get(id) else {
            return;
        };
        self.detach(slot);
        let e = &mut self.entries[slot as usize];
        e.state = state;
        e.cooldown_until = cooldown_until;
        self.attach(slot);
    }

    /// Keeps a key out of routing until `until` without changing its state (our own
    /// accounting found its rate window full).
    pub fn park(&mut self, id: &KeyId, until: Timestamp) {
        let Some(&slot) = self.by_id.get(id) else {
            return;
        };
        self.detach(slot);
        self.entries[slot as usize].parked_until = Some(until);
        self.attach(slot);
    }

    /// Refreshes a key's health figures after a call.
    pub fn record_outcome(&mut self, id: &KeyId, stats: &KeyStats) {
        let Some(&slot) = self.by_id.get(id) else {
            return;
        };
        let e = &self.entries[slot as usize];
        let success_q = quantize_success(stats.success_ewma);
        let latency_us = quantize_latency(stats.latency_ewma_ms);
        if e.success_q == success_q && e.latency_us == latency_us {
            return;
        }
        self.detach(slot);
        let e = &mut self.entries[slot as usize];
        e.success_q = success_q;
        e.latency_us = latency_us;
        self.attach(slot);
    }

    /// Transitions made by the table itself (cooldowns that ended), oldest first.
    /// The caller persists them.
    pub fn drain_transitions(&mut self) -> std::vec::Drain<'_, StateTransition> {
        self.outbox.drain(..)
    }

    /// Applies every wake-up due at `now`.
    pub fn wake(&mut self, now: Timestamp) {
        while let Some(&Reverse((at, slot, generation))) = self.wakeups.peek() {
            if at > now {
                break;
            }
            self.wakeups.pop();
            let e = &self.entries[slot as usize];
            if !e.live || e.generation != generation {
                continue;
            }
            self.detach(slot);
            let e = &mut self.entries[slot as usize];
            if e.parked_until.is_some_and(|p| p <= now) {
                e.parked_until = None;
            }
            if e.cooldown_until.is_some_and(|c| c <= now) {
                let (to, trigger, reason) = match e.state {
                    KeyState::Throttled => (
                        KeyState::Available,
                        TransitionTrigger::CooldownElapsed,
                        "cooldown elapsed",
                    ),
                    KeyState::Exhausted => (
                        KeyState::Recovering,
                        TransitionTrigger::QuotaReset,
                        "quota reset time reached",
                    ),
                    other => (other, TransitionTrigger::CooldownElapsed, ""),
                };
                if to != e.state {
                    self.outbox.push(StateTransition {
                        key_id: e.id.clone(),
                        from: e.state,
                        to,
                        trigger,
                        reason: reason.to_owned(),
                        at: now,
                    });
                    e.state = to;
                }
                e.cooldown_until = None;
            }
            self.attach(slot);
        }
    }

    /// Picks the best key for `query` under `objective` at `now`, and counts the pick
    /// as one use of the key (so concurrent decisions spread over keys).
    ///
    /// # Errors
    /// [`NoEligibleKey`] with counts of why each considered key could not serve.
    pub fn choose(
        &mut self,
        query: &RouteQuery<'_>,
        objective: &Objective,
        now: Timestamp,
    ) -> Result<Decision, NoEligibleKey> {
        self.wake(now);
        let single = objective.single();
        if let Some(kind @ (ObjectiveKind::Reliability | ObjectiveKind::Latency)) = single {
            self.track(kind);
        }
        let mut counts = IneligibleCounts::default();
        let mut considered = 0u32;
        let mut ready = 0u32;
        let mut top = Top4::default();
        let min_cost = self.min_offer_cost(query);
        // A weighted objective ranks by score, which needs the minima up front; a
        // single one ranks by its own figure and scores only the final four.
        let (mut min_uses, mut min_latency) = match single {
            Some(_) => (u64::MAX, u32::MAX),
            None => (self.min_uses(query), self.min_latency(query)),
        };

        for (offer, pool) in self.offered_pools(query) {
            let members = u32::try_from(pool.members.len()).unwrap_or(u32::MAX);
            considered = considered.saturating_add(members);
            if !pool.serves(query.model) {
                counts.add(Ineligibility::ModelNotServed, members);
                continue;
            }
            if !objective.constraints.allows_provider(&offer.provider) {
                counts.add(Ineligibility::ProviderNotAllowed, members);
                continue;
            }
            for state in KeyState::ALL {
                if let Some(reason) = Ineligibility::of_state(state) {
                    counts.add(reason, pool.by_state[state_index(state)]);
                }
            }
            counts.add(Ineligibility::RateLimited, pool.parked);
            ready = ready.saturating_add(pool.ready_len());
            if let (Some(max), Some(cost)) =
                (objective.constraints.max_cost_per_request, offer.est_cost)
            {
                if cost > max {
                    counts.add(Ineligibility::OverMaxCost, pool.ready_len());
                    continue;
                }
            }
            if single.is_some() {
                min_uses = min_uses.min(pool.fairness.first().map_or(u64::MAX, |f| f.0));
                if let Some(first) = pool.latency.as_ref().and_then(BTreeSet::first) {
                    min_latency = min_latency.min(first.0);
                }
            }
            // A single objective needs only the first few keys in its order; a
            // weighted one scores every ready key of the pool.
            let wanted = if single.is_some() {
                Top4::LEN
            } else {
                usize::MAX
            };
            let mut taken = 0;
            for slot in pool.ordered(single.unwrap_or(ObjectiveKind::Fairness)) {
                let e = &self.entries[slot as usize];
                if let Some((_, reason)) = query.exclude.iter().find(|(id, _)| *id == e.id) {
                    counts.add(*reason, 1);
                    continue;
                }
                if let Some(min) = objective.constraints.min_success_rate {
                    if f64::from(e.success_q) / 1e6 < min {
                        counts.add(Ineligibility::BelowMinSuccessRate, 1);
                        continue;
                    }
                }
                let slot64 = u64::from(slot);
                let (rank, score) = match single {
                    Some(ObjectiveKind::Cost) => (
                        (
                            offer.est_cost.map_or(u64::MAX, Money::as_nanos),
                            e.uses,
                            slot64,
                        ),
                        0.0,
                    ),
                    Some(ObjectiveKind::Reliability) => {
                        ((u64::from(u32::MAX - e.success_q), e.uses, slot64), 0.0)
                    }
                    Some(ObjectiveKind::Latency) => {
                        ((u64::from(e.latency_us), e.uses, slot64), 0.0)
                    }
                    Some(ObjectiveKind::Fairness) => ((e.uses, 0, slot64), 0.0),
                    None => {
                        let score = weighted_score(
                            objective,
                            e,
                            offer.est_cost,
                            min_cost,
                            min_uses,
                            min_latency,
                        );
                        ((u64::MAX - (score * 1e12) as u64, e.uses, slot64), score)
                    }
                };
                top.offer(Candidate {
                    slot,
                    cost: offer.est_cost,
                    rank,
                    score,
                });
                taken += 1;
                if taken >= wanted {
                    break;
                }
            }
        }

        let Some(winner) = top.first() else {
            return Err(NoEligibleKey {
                model: query.model.clone(),
                considered,
                ineligible: counts,
                retry_at: self.first_ready_at(query, objective),
            });
        };
        let score_of = |c: &Candidate| match single {
            Some(_) => weighted_score(
                objective,
                &self.entries[c.slot as usize],
                c.cost,
                min_cost,
                min_uses,
                min_latency,
            ),
            None => c.score,
        };
        let winner_entry = &self.entries[winner.slot as usize];
        let winner_metrics = winner_entry.metrics(winner.cost);
        let mut alternatives = Vec::with_capacity(Top4::LEN - 1);
        for c in top.items.iter().skip(1).flatten() {
            let e = &self.entries[c.slot as usize];
            let metrics = e.metrics(c.cost);
            alternatives.push(Alternative {
                key_id: e.id.clone(),
                provider: self.pools[e.pool as usize].key.provider.clone(),
                score: score_of(c),
                metrics,
                lost_because: loss_reason(single, &winner_metrics, &metrics),
            });
        }
        let decision = Decision {
            key_id: winner_entry.id.clone(),
            provider: self.pools[winner_entry.pool as usize].key.provider.clone(),
            model: query.model.clone(),
            objective: objective.weights,
            score: score_of(&winner),
            metrics: winner_metrics,
            alternatives,
            ready,
            ineligible: counts,
            at: now,
        };
        self.bump_uses(winner.slot);
        Ok(decision)
    }

    /// The full per-key table behind a decision: every key of the request's tenant on
    /// the offered providers, with its eligibility and score. Linear in the number of
    /// keys; meant for explanation on demand, not for the hot path.
    pub fn explain(
        &self,
        query: &RouteQuery<'_>,
        objective: &Objective,
        now: Timestamp,
    ) -> Vec<CandidateRow> {
        let mut rows = Vec::new();
        let min_cost = self.min_offer_cost(query);
        let min_uses = self.min_uses(query);
        let min_latency = self.min_latency(query);
        for (offer, pool) in self.offered_pools(query) {
            for &slot in &pool.members {
                let e = &self.entries[slot as usize];
                let over_cost = matches!(
                    (objective.constraints.max_cost_per_request, offer.est_cost),
                    (Some(max), Some(cost)) if cost > max
                );
                let cooled = e.next_wake().is_some_and(|t| t <= now);
                let ineligible = if !pool.serves(query.model) {
                    Some(Ineligibility::ModelNotServed)
                } else if !objective.constraints.allows_provider(&offer.provider) {
                    Some(Ineligibility::ProviderNotAllowed)
                } else if let (Some(reason), false) = (Ineligibility::of_state(e.state), cooled) {
                    Some(reason)
                } else if e.parked_until.is_some_and(|p| p > now) {
                    Some(Ineligibility::RateLimited)
                } else if over_cost {
                    Some(Ineligibility::OverMaxCost)
                } else if let Some((_, reason)) = query.exclude.iter().find(|(id, _)| *id == e.id) {
                    Some(*reason)
                } else if objective
                    .constraints
                    .min_success_rate
                    .is_some_and(|min| f64::from(e.success_q) / 1e6 < min)
                {
                    Some(Ineligibility::BelowMinSuccessRate)
                } else {
                    None
                };
                let score = ineligible.is_none().then(|| {
                    weighted_score(
                        objective,
                        e,
                        offer.est_cost,
                        min_cost,
                        min_uses,
                        min_latency,
                    )
                });
                rows.push(CandidateRow {
                    key_id: e.id.clone(),
                    provider: offer.provider.clone(),
                    state: e.state,
                    ineligible,
                    score,
                    metrics: e.metrics(offer.est_cost),
                });
            }
        }
        rows.sort_by(|a, b| {
            b.score
                .unwrap_or(-1.0)
                .total_cmp(&a.score.unwrap_or(-1.0))
                .then_with(|| a.key_id.cmp(&b.key_id))
        });
        rows
    }

    /// The earliest [`Entry::ready_at`] among the keys that could serve `query` but for
    /// their cooldown or rate window. Linear in those keys; only asked when no key can
    /// serve.
    fn first_ready_at(&self, query: &RouteQuery<'_>, objective: &Objective) -> Option<Timestamp> {
        self.offered_pools(query)
            .filter(|(o, p)| {
                p.serves(query.model)
                    && objective.constraints.allows_provider(&o.provider)
                    && !matches!(
                        (objective.constraints.max_cost_per_request, o.est_cost),
                        (Some(max), Some(cost)) if cost > max
                    )
            })
            .flat_map(|(_, p)| &p.members)
            .map(|&slot| &self.entries[slot as usize])
            .filter(|e| {
                objective
                    .constraints
                    .min_success_rate
                    .is_none_or(|min| f64::from(e.success_q) / 1e6 >= min)
            })
            .filter_map(Entry::ready_at)
            .min()
    }

    fn pool_for(&mut self, key: PoolKey) -> u32 {
        if let Some(&id) = self.pool_ids.get(&key) {
            return id;
        }
        let id = u32::try_from(self.pools.len()).unwrap_or(u32::MAX);
        self.pools_by_tenant
            .entry(key.tenant.clone())
            .or_default()
            .entry(key.provider.clone())
            .or_default()
            .push(id);
        self.pool_ids.insert(key.clone(), id);
        let mut pool = Pool::new(key);
        if self.track_reliability {
            pool.reliability = Some(BTreeSet::new());
        }
        if self.track_latency {
            pool.latency = Some(BTreeSet::new());
        }
        self.pools.push(pool);
        id
    }

    /// Takes a slot out of its pool's counters and ready sets.
    fn detach(&mut self, slot: u32) {
        let e = &mut self.entries[slot as usize];
        if !e.live {
            return;
        }
        let pool = &mut self.pools[e.pool as usize];
        let state = &mut pool.by_state[state_index(e.state)];
        *state = state.saturating_sub(1);
        if e.parked_until.is_some() && e.state.is_routable() {
            pool.parked = pool.parked.saturating_sub(1);
        }
        if e.ready {
            pool.remove_ready(slot, e);
            e.ready = false;
        }
    }

    /// Puts a slot back into its pool's counters and, if ready, its ready sets; and
    /// schedules its next wake-up.
    fn attach(&mut self, slot: u32) {
        let e = &mut self.entries[slot as usize];
        let pool = &mut self.pools[e.pool as usize];
        pool.by_state[state_index(e.state)] += 1;
        let parked = e.parked_until.is_some();
        if parked && e.state.is_routable() {
            pool.parked += 1;
        }
        e.ready = e.state.is_routable() && !parked;
        if e.ready {
            pool.insert_ready(slot, e);
        }
        if let Some(at) = e.next_wake() {
            e.generation = e.generation.wrapping_add(1);
            self.wakeups.push(Reverse((at, slot, e.generation)));
        }
    }

    fn bump_uses(&mut self, slot: u32) {
        let e = &mut self.entries[slot as usize];
        let pool = &mut self.pools[e.pool as usize];
        if e.ready {
            pool.remove_ready(slot, e);
            e.uses += 1;
            pool.insert_ready(slot, e);
        } else {
            e.uses += 1;
        }
    }

    fn min_offer_cost(&self, query: &RouteQuery<'_>) -> Option<Money> {
        query.offers.iter().filter_map(|o| o.est_cost).min()
    }

    /// Each offer with every pool of the request's tenant on its provider, whether
    /// or not the pool serves the model: the walk each look-up starts from.
    fn offered_pools<'a>(
        &'a self,
        query: &'a RouteQuery<'_>,
    ) -> impl Iterator<Item = (&'a ProviderOffer, &'a Pool)> + 'a {
        let by_provider = self.pools_by_tenant.get(&query.tenant.cloned());
        query.offers.iter().flat_map(move |offer| {
            by_provider
                .and_then(|m| m.get(&offer.provider))
                .into_iter()
                .flatten()
                .map(move |&id| (offer, &self.pools[id as usize]))
        })
    }

    /// The pools of the offers that serve the model.
    fn matching_pools<'a>(
        &'a self,
        query: &'a RouteQuery<'_>,
    ) -> impl Iterator<Item = &'a Pool> + 'a {
        self.offered_pools(query)
            .map(|(_, pool)| pool)
            .filter(|p| p.serves(query.model))
    }

    fn min_uses(&self, query: &RouteQuery<'_>) -> u64 {
        self.matching_pools(query)
            .filter_map(|p| p.fairness.first().map(|f| f.0))
            .min()
            .unwrap_or(0)
    }

    fn min_latency(&self, query: &RouteQuery<'_>) -> u32 {
        self.matching_pools(query)
            .filter_map(|p| match &p.latency {
                Some(set) => set.first().map(|l| l.0),
                // Not tracked: scan the ready keys (weighted objectives scan them anyway).
                None => p
                    .fairness
                    .iter()
                    .map(|&(_, slot)| self.entries[slot as usize].latency_us)
                    .min(),
            })
            .min()
            .unwrap_or(0)
    }

    /// Starts keeping the ordered set of `kind` in every pool, built from the ready keys.
    fn track(&mut self, kind: ObjectiveKind) {
        let entries = &self.entries;
        for pool in &mut self.pools {
            let slots = pool
                .fairness
                .iter()
                .map(|&(_, slot)| (slot, &entries[slot as usize]));
            match kind {
                ObjectiveKind::Reliability if pool.reliability.is_none() => {
                    pool.reliability = Some(
                        slots
                            .map(|(slot, e)| (u32::MAX - e.success_q, e.uses, slot))
                            .collect(),
                    );
                }
                ObjectiveKind::Latency if pool.latency.is_none() => {
                    pool.latency = Some(
                        slots
                            .map(|(slot, e)| (e.latency_us, e.uses, slot))
                            .collect(),
                    );
                }
                _ => {}
            }
        }
        match kind {
            ObjectiveKind::Reliability => self.track_reliability = true,
            ObjectiveKind::Latency => self.track_latency = true,
            _ => {}
        }
    }
}

/// The weighted score of a key in `[0, 1]`: each goal normalised against the best
/// ready key of the request (1.0 for the best), then weighted.
fn weighted_score(
    objective: &Objective,
    e: &Entry,
    cost: Option<Money>,
    min_cost: Option<Money>,
    min_uses: u64,
    min_latency_us: u32,
) -> f64 {
    let cost_score = match (cost, min_cost) {
        (Some(c), Some(min)) => (min.as_nanos() as f64 + 1.0) / (c.as_nanos() as f64 + 1.0),
        (None, Some(_)) => 0.0,
        _ => 1.0,
    };
    let reliability = f64::from(e.success_q) / 1e6;
    let fairness = (min_uses as f64 + 1.0) / (e.uses as f64 + 1.0);
    // One millisecond of smoothing keeps brand-new keys (no latency yet) from
    // dividing by zero.
    let latency = (f64::from(min_latency_us) + 1e3) / (f64::from(e.latency_us) + 1e3);
    objective.weight(ObjectiveKind::Cost) * cost_score
        + objective.weight(ObjectiveKind::Reliability) * reliability
        + objective.weight(ObjectiveKind::Fairness) * fairness
        + objective.weight(ObjectiveKind::Latency) * latency
}

fn loss_reason(
    single: Option<ObjectiveKind>,
    winner: &KeyMetrics,
    other: &KeyMetrics,
) -> LossReason {
    let more_used = other.uses > winner.uses;
    match single {
        Some(ObjectiveKind::Cost)
            if other.est_cost.unwrap_or(Money::from_nanos(u64::MAX))
                > winner.est_cost.unwrap_or(Money::ZERO) =>
        {
            LossReason::HigherCost
        }
        Some(ObjectiveKind::Reliability) if other.success_rate < winner.success_rate => {
            LossReason::LowerSuccessRate
        }
        Some(ObjectiveKind::Latency) if other.latency_ms > winner.latency_ms => {
            LossReason::HigherLatency
        }
        None => LossReason::LowerScore,
        _ if more_used => LossReason::MoreUsed,
        _ => LossReason::TieBreak,
    }
}

#[cfg(test)]
mod tests;
