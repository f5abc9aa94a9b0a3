//! Budgets: who they cover, over which period, how strictly, and the ledger that makes
//! concurrent spending safe (reserve the estimate, then commit the actual or release).

use foldhash::HashMap;
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{KeyId, ProviderId, TenantId};
use crate::money::Money;
use crate::time::Timestamp;

/// What a budget covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub enum BudgetScope {
    /// Every request.
    Global,
    /// Requests served by one provider.
    Provider {
        /// The provider.
        provider: ProviderId,
    },
    /// Requests served by one key.
    Key {
        /// The key.
        key: KeyId,
    },
    /// Requests made for one tenant.
    Tenant {
        /// The tenant.
        tenant: TenantId,
    },
    /// Requests carrying a tag (e.g. `feature = "chatbot"`, `environment = "staging"`).
    Tag {
        /// Tag name.
        key: String,
        /// Tag value.
        value: String,
    },
}

/// The facts about one request that decide which budgets apply to it.
#[derive(Clone, Copy, Debug)]
pub struct ChargeContext<'a> {
    /// Provider serving the request.
    pub provider: &'a ProviderId,
    /// Key serving the request.
    pub key: &'a KeyId,
    /// Tenant it is made for.
    pub tenant: Option<&'a TenantId>,
    /// Its tags.
    pub tags: &'a BTreeMap<String, String>,
}

impl BudgetScope {
    /// Whether a request described by `ctx` counts against this scope.
    pub fn covers(&self, ctx: &ChargeContext<'_>) -> bool {
        match self {
            Self::Global => true,
            Self::Provider { provider } => provider == ctx.provider,
            Self::Key { key } => key == ctx.key,
            Self::Tenant { tenant } => ctx.tenant == Some(tenant),
            Self::Tag { key, value } => ctx.tags.get(key) == Some(value),
        }
    }

    /// Whether the scope depends on which key serves the request (so another key,
    /// or another provider, may still fit when this budget is full).
    pub const fn depends_on_key(&self) -> bool {
        matches!(self, Self::Provider { .. } | Self::Key { .. })
    }
}

/// How often a budget starts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// Each UTC day.
    Daily,
    /// Each ISO week (Monday 00:00 UTC).
    Weekly,
    /// Each calendar month (UTC).
    Monthly,
    /// Fixed-length periods starting at `anchor`.
    Custom {
        /// Start of the first period.
        anchor: Timestamp,
        /// Length of each period in seconds.
        length_secs: u64,
    },
}

impl BudgetPeriod {
    /// Start and end of the period containing `now`.
    pub fn bounds(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        match *self {
            Self::Daily => {
                let start = now.start_of_day();
                (start, start.plus(Duration::from_secs(86_400)))
            }
            Self::Weekly => {
                let start = now.start_of_week();
                (start, start.plus(Duration::from_secs(7 * 86_400)))
            }
            Self::Monthly => (now.start_of_month(), now.start_of_next_month()),
            Self::Custom {
                anchor,
                length_secs,
            } => {
                let len_ms = length_secs.max(1).saturating_mul(1000);
                let elapsed = now.as_millis().saturating_sub(anchor.as_millis());
                let start = anchor.as_millis() + elapsed - elapsed % len_ms;
                (
                    Timestamp::from_millis(start),
                    Timestamp::from_millis(start.saturating_add(len_ms)),
                )
            }
        }
    }
}

/// Whether a budget blocks or only warns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Reject a request before execution when its estimate does not fit.
    Hard,
    /// Allow it and flag the overrun.
    Soft,
}

/// Why a budget was refused or a charge rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BudgetError {
    /// The limit is zero (or was negative or not a number).
    #[error("budget {id} has a non-positive limit; limits must be greater than zero")]
    NonPositiveLimit {
        /// The budget.
        id: String,
    },
    /// The budget id is empty.
    #[error("budget id is empty")]
    EmptyId,
    /// A custom period of zero length.
    #[error("budget {id} has a custom period of zero length")]
    ZeroPeriod {
        /// The budget.
        id: String,
    },
    /// A hard budget cannot take the estimated cost.
    #[error(
        "budget {id} would be exceeded: limit {limit}, spent {spent}, reserved {reserved}, request needs {requested}"
    )]
    WouldExceed {
        /// The budget.
        id: String,
        /// Its limit.
        limit: Money,
        /// Committed spend this period.
        spent: Money,
        /// Outstanding reservations.
        reserved: Money,
        /// What the request asked for.
        requested: Money,
    },
}

/// A spending limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Identifier, unique among budgets.
    pub id: String,
    /// What it covers.
    #[serde(flatten)]
    pub scope: BudgetScope,
    /// Most that may be spent per period.
    pub limit: Money,
    /// When it starts over.
    pub period: BudgetPeriod,
    /// Hard or soft.
    pub enforcement: Enforcement,
}

impl Budget {
    /// A validated budget.
    ///
    /// # Errors
    /// [`BudgetError`] for an empty id, a limit that is not a positive finite number,
    /// or a zero-length custom period.
    pub fn new(
        id: impl Into<String>,
        scope: BudgetScope,
        limit_usd: f64,
        period: BudgetPeriod,
        enforcement: Enforcement,
    ) -> Result<Self, BudgetError> {
        let id = id.into();
        if id.trim().is_empty() {
            return Err(BudgetError::EmptyId);
        }
        let limit = Money::from_usd(limit_usd);
        if !(limit_usd.is_finite() && limit_usd > 0.0) || limit == Money::ZERO {
            return Err(BudgetError::NonPositiveLimit { id });
        }
        if let BudgetPeriod::Custom { length_secs: 0, .. } = period {
            return Err(BudgetError::ZeroPeriod { id });
        }
        Ok(Self {
            id,
            scope,
            limit,
            period,
            enforcement,
        })
    }
}

/// Identifier of one reservation, unique per request attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReservationId(pub u64);

impl ReservationId {
    /// Held by no request: generated ids carry a counter that starts at 1 in their
    /// low 40 bits. Committing it charges spend that was never reserved (see
    /// [`BudgetLedger::commit`]).
    pub const NONE: Self = Self(0);
}

/// Money held for a request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Its id.
    pub id: ReservationId,
    /// Amount held.
    pub amount: Money,
    /// Start of the period it was taken in: a commit after the period rolled over is
    /// charged to the new period, and a release then has nothing to give back.
    pub period_start: Timestamp,
    /// When it was taken: a reservation older than any request can live was left by
    /// an instance that died, and [`BudgetLedger::reclaim`] gives it back.
    #[serde(default)]
    pub taken_at: Timestamp,
}

/// Reservations given back: by [`BudgetLedger::reclaim`], or summed over sweeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Reservations dropped.
    pub count: u64,
    /// The money they held.
    pub amount: Money,
}

/// A budget's spend, reserved amounts and reporting view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    /// Budget id.
    pub budget_id: String,
    /// What it covers.
    pub scope: BudgetScope,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Limit per period.
    pub limit: Money,
    /// Committed spend this period.
    pub spent: Money,
    /// Outstanding reservations.
    pub reserved: Money,
    /// `limit - spent - reserved`, or zero.
    pub remaining: Money,
    /// When the current period ends.
    pub period_end: Timestamp,
    /// Soft budget over its limit.
    pub over_limit: bool,
}

/// The running account of one budget. Not thread-safe by itself: the store that owns it
/// serializes access, which is what makes reserve-then-commit atomic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetLedger {
    /// The budget.
    pub budget: Budget,
    /// Start of the current period.
    pub period_start: Timestamp,
    /// End of the current period.
    pub period_end: Timestamp,
    /// Committed spend this period.
    pub spent: Money,
    /// Outstanding reservations by id.
    reservations: HashMap<ReservationId, Reservation>,
    reserved: Money,
}

impl BudgetLedger {
    /// A fresh ledger for `budget` in the period containing `now`.
    pub fn new(budget: Budget, now: Timestamp) -> Self {
        let (period_start, period_end) = budget.period.bounds(now);
        Self {
            budget,
            period_start,
            period_end,
            spent: Money::ZERO,
            reservations: HashMap::default(),
            reserved: Money::ZERO,
        }
    }

    /// A ledger that already spent `spent` this period (e.g. carried over from records).
    pub fn with_spent(mut self, spent: Money) -> Self {
        self.spent = spent;
        self
    }

    /// Starts a new period when `now` is past the current one. Reservations stay held.
    pub fn roll(&mut self, now: Timestamp) {
        if now >= self.period_end {
            let (start, end) = self.budget.period.bounds(now);
            self.period_start = start;
            self.period_end = end;
            self.spent = Money::ZERO;
        }
    }

    /// Changes the budget's definition (limit, period, scope, enforcement) keeping its
    /// account: what this period spent and the reservations held. A new period kind
    /// starts its period at the one containing `now`, carrying the spend over.
    pub fn redefine(&mut self, budget: Budget, now: Timestamp) {
        self.roll(now);
        if budget.period != self.budget.period {
            let (start, end) = budget.period.bounds(now);
            self.period_start = start;
            self.period_end = end;
        }
        self.budget = budget;
    }

    /// Outstanding reservations.
    pub fn reserved(&self) -> Money {
        self.reserved
    }

    /// `limit - spent - reserved`, or zero.
    pub fn remaining(&self) -> Money {
        self.budget
            .limit
            .saturating_sub(self.spent)
            .saturating_sub(self.reserved)
    }

    /// Whether `amount` fits under the limit right now (a soft budget always fits).
    ///
    /// # Errors
    /// [`BudgetError::WouldExceed`] for a hard budget that cannot take `amount`.
    pub fn check(&self, amount: Money) -> Result<(), BudgetError> {
        let needed = self
            .spent
            .saturating_add(self.reserved)
            .saturating_add(amount);
        if self.budget.enforcement == Enforcement::Hard && needed > self.budget.limit {
            return Err(BudgetError::WouldExceed {
                id: self.budget.id.clone(),
                limit: self.budget.limit,
                spent: self.spent,
                reserved: self.reserved,
                requested: amount,
            });
        }
        Ok(())
    }

    /// Holds `amount` for request `id`. Reserving the same id twice replaces the first
    /// reservation, so retries are idempotent.
    ///
    /// # Errors
    /// [`BudgetError::WouldExceed`] when a hard budget cannot take it; nothing is held.
    pub fn reserve(
        &mut self,
        id: ReservationId,
        amount: Money,
        now: Timestamp,
    ) -> Result<(), BudgetError> {
        self.roll(now);
        let previous = self.take(id);
        if let Err(err) = self.check(amount) {
            if let Some(previous) = previous {
                self.put(previous);
            }
            return Err(err);
        }
        self.put(Reservation {
            id,
            amount,
            period_start: self.period_start,
            taken_at: now,
        });
        Ok(())
    }

    /// Replaces reservation `id` with the `actual` cost. Unknown ids (already committed
    /// or released) still charge `actual`: money spent is never forgotten.
    pub fn commit(&mut self, id: ReservationId, actual: Money, now: Timestamp) {
        self.roll(now);
        self.take(id);
        self.spent = self.spent.saturating_add(actual);
    }

    /// Adds `cost` spent at `at` without a reservation (spend counted elsewhere first,
    /// e.g. during a store outage). Spend dated before the current period belongs to
    /// one that has closed and is not carried into this one; returns whether it counted.
    pub fn add_unreserved(&mut self, cost: Money, at: Timestamp) -> bool {
        self.roll(at);
        if at < self.period_start {
            return false;
        }
        self.spent = self.spent.saturating_add(cost);
        true
    }

    /// Drops reservation `id` without spending (the call failed before costing anything).
    pub fn release(&mut self, id: ReservationId) {
        self.take(id);
    }

    /// Drops every reservation taken before `taken_before` without spending: their
    /// requests cannot still be running, so the instance that held them died between
    /// reserve and settle. A settle that comes after all still charges its cost
    /// ([`Self::commit`] of an unknown id).
    pub fn reclaim(&mut self, taken_before: Timestamp) -> Reclaimed {
        let mut reclaimed = Reclaimed::default();
        self.reservations.retain(|_, r| {
            let stale = r.taken_at < taken_before;
            if stale {
                reclaimed.count += 1;
                reclaimed.amount = reclaimed.amount.saturating_add(r.amount);
            }
            !stale
        });
        self.reserved = self.reserved.saturating_sub(reclaimed.amount);
        reclaimed
    }

    /// A reporting view at `now`.
    pub fn status(&self) -> BudgetStatus {
        BudgetStatus {
            budget_id: self.budget.id.clone(),
            scope: self.budget.scope.clone(),
            enforcement: self.budget.enforcement,
            limit: self.budget.limit,
            spent: self.spent,
            reserved: self.reserved,
            remaining: self.remaining(),
            period_end: self.period_end,
            over_limit: self.spent.saturating_add(self.reserved) > self.budget.limit,
        }
    }

    fn take(&mut self, id: ReservationId) -> Option<Reservation> {
        let r = self.reservations.remove(&id)?;
        self.reserved = self.reserved.saturating_sub(r.amount);
        Some(r)
    }

    fn put(&mut self, r: Reservation) {
        self.reserved = self.reserved.saturating_add(r.amount);
        self.reservations.insert(r.id, r);
    }
}

#[cfg(test)]
mod tests;
