//! What an outage owes the shared store, and paying it back when it answers.
//!
//! Spend is counted at least once, never zero times: a settlement the outage cut
//! off after the shared store applied it, or a pay-back interrupted after it landed,
//! is counted again (a budget errs towards refusing, never towards overspending).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use apikeyrouter_application::ports::{Charge, Settlement, StoreError};
use apikeyrouter_domain::{Budget, Money, ReservationId, Timestamp};

use super::FailOpenStore;

/// Reservations on the shared store tracked at most; when full, those older than
/// [`HELD_AT_MOST_MS`] are forgotten (a request dropped between its reserve and its
/// settlement never finishes), at most once a minute; meanwhile new ones go untracked.
const MAX_HELD: usize = 65_536;
const HELD_AT_MOST_MS: u64 = 10 * 60 * 1000;
const EVICT_EVERY_MS: u64 = 60 * 1000;

/// The debt, or a part of it taken to be paid.
#[derive(Debug, Default)]
pub(super) struct Owed {
    /// Reservations made on the shared store and not yet finished there, with when.
    held_remotely: HashMap<ReservationId, Timestamp>,
    /// No eviction pass before this time (milliseconds).
    evict_after_ms: u64,
    /// Requests reserved on the shared store and finished on the mirror: their
    /// reservations are released there (their spend is in `spend`).
    to_release: VecDeque<(Charge, Settlement)>,
    /// Spend on the mirror, by budget and period start, with the time of the latest.
    spend: BTreeMap<(String, Timestamp), (Money, Timestamp)>,
}

impl Owed {
    pub(super) fn is_empty(&self) -> bool {
        self.to_release.is_empty() && self.spend.is_empty()
    }

    /// `charge` was reserved on the shared store.
    pub(super) fn held_remotely(&mut self, charge: &Charge) {
        if self.held_remotely.len() >= MAX_HELD {
            let now = charge.now.as_millis();
            if now < self.evict_after_ms {
                return;
            }
            self.evict_after_ms = now.saturating_add(EVICT_EVERY_MS);
            let horizon = now.saturating_sub(HELD_AT_MOST_MS);
            self.held_remotely.retain(|_, at| at.as_millis() >= horizon);
            if self.held_remotely.len() >= MAX_HELD {
                return;
            }
        }
        self.held_remotely.insert(charge.reservation, charge.now);
    }

    /// `charge` was settled or released on the shared store.
    pub(super) fn finished_remotely(&mut self, charge: &Charge) {
        self.held_remotely.remove(&charge.reservation);
    }

    /// `charge` finished on the mirror having cost `spent`; `budgets` are the
    /// definitions, for the periods. Returns whether anything is now owed.
    pub(super) fn finished_locally(
        &mut self,
        charge: &Charge,
        settlement: &Settlement,
        spent: Money,
        budgets: &[Budget],
    ) -> bool {
        if self.held_remotely.remove(&charge.reservation).is_some() {
            self.to_release.push_back((charge.clone(), *settlement));
        }
        if spent != Money::ZERO {
            let at = settlement.outcome.now;
            for budget in budgets.iter().filter(|b| charge.budget_ids.contains(&b.id)) {
                let (period_start, _) = budget.period.bounds(at);
                self.add_spend((budget.id.clone(), period_start), spent, at);
            }
        }
        !self.is_empty()
    }

    fn add_spend(&mut self, budget_period: (String, Timestamp), cost: Money, at: Timestamp) {
        let entry = self.spend.entry(budget_period).or_insert((Money::ZERO, at));
        entry.0 = entry.0.saturating_add(cost);
        entry.1 = entry.1.max(at);
    }

    /// Takes what is owed, leaving the tracked reservations.
    fn take_debt(&mut self) -> Self {
        Self {
            held_remotely: HashMap::new(),
            evict_after_ms: 0,
            to_release: std::mem::take(&mut self.to_release),
            spend: std::mem::take(&mut self.spend),
        }
    }

    /// Puts back what `debt` still holds.
    fn merge(&mut self, debt: Self) {
        self.to_release.extend(debt.to_release);
        for (budget_period, (cost, at)) in debt.spend {
            self.add_spend(budget_period, cost, at);
        }
    }
}

/// The part of the debt being paid: whatever it still holds when dropped (paid in
/// part, failed, or the paying caller's future dropped) is owed again.
struct Paying<'a> {
    store: &'a FailOpenStore,
    debt: Owed,
}

impl Drop for Paying<'_> {
    fn drop(&mut self) {
        let left = std::mem::take(&mut self.debt);
        if !left.is_empty() {
            self.store.owed().merge(left);
            self.store.owing.store(true, Ordering::Relaxed);
        }
        self.store.paying.store(false, Ordering::Release);
    }
}

impl FailOpenStore {
    /// Gives the shared store what is owed: releases its reservations of requests
    /// finished on the mirror, then adds the mirror's spend to its budgets (spend of
    /// a period that has closed since, or of a deleted budget, is dropped). One
    /// caller at a time; on an error the rest stays owed.
    pub(super) async fn pay_back(&self) -> Result<(), StoreError> {
        if self.paying.swap(true, Ordering::Acquire) {
            return Ok(());
        }
        let debt = {
            let mut owed = self.owed();
            self.owing.store(false, Ordering::Relaxed);
            owed.take_debt()
        };
        let mut paying = Paying { store: self, debt };
        while let Some((charge, settlement)) = paying.debt.to_release.front() {
            match self.remote.release(charge, settlement).await {
                Ok(_) => {}
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::error!(key_id = %charge.key_id, error = %e, "outage reservation not released by the state store");
                }
            }
            paying.debt.to_release.pop_front();
        }
        let budgets = self
            .budgets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = Timestamp::from_millis(self.latest_ms.load(Ordering::Relaxed));
        while let Some(((id, period_start), &(cost, at))) = paying.debt.spend.first_key_value() {
            let current = budgets
                .iter()
                .find(|b| b.id == *id)
                .map(|b| b.period.bounds(now).0);
            if current == Some(*period_start) {
                match self
                    .remote
                    .add_spend(std::slice::from_ref(id), cost, at)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => {
                        tracing::error!(budget_id = %id, error = %e, "outage spend refused by the state store");
                    }
                }
            } else {
                tracing::info!(budget_id = %id, "outage spend of a closed period or a deleted budget not given to the state store");
            }
            paying.debt.spend.pop_first();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use apikeyrouter_domain::{KeyId, QuotaLimits};

    use super::*;

    fn reserved(n: u64, at_ms: u64) -> Charge {
        Charge {
            reservation: ReservationId(n),
            key_id: KeyId::new("k1"),
            limits: QuotaLimits::default(),
            est_tokens: 1,
            est_cost: Money::ZERO,
            budget_ids: Vec::new(),
            client: None,
            now: Timestamp::from_millis(at_ms),
        }
    }

    #[test]
    fn a_full_table_forgets_old_reservations_at_most_once_a_minute() {
        let mut owed = Owed::default();
        let start = 1_000_000_000;
        for n in 1..=MAX_HELD as u64 {
            owed.held_remotely(&reserved(n, start));
        }
        // Eleven minutes on, the leftovers are forgotten and the new one is tracked.
        let later = start + 11 * 60 * 1000;
        owed.held_remotely(&reserved(1 << 40, later));
        assert_eq!(owed.held_remotely.len(), 1);

        for n in 1..MAX_HELD as u64 {
            owed.held_remotely(&reserved(n, later));
        }
        assert_eq!(owed.held_remotely.len(), MAX_HELD);
        // Full of recent ones, and within a minute of the last pass: untracked.
        owed.held_remotely(&reserved(2 << 40, later + 1));
        assert_eq!(owed.held_remotely.len(), MAX_HELD);
        assert!(!owed.held_remotely.contains_key(&ReservationId(2 << 40)));
    }
}
