//! Budget management and reporting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::Guard;

use apikeyrouter_domain::{Budget, BudgetStatus, Money, Reclaimed};

use super::core::Shared;
use super::errors::BudgetServiceError;
use crate::ports::{ReclaimedReservations, StoreError, StoreErrorKind};

/// Tries of [`BudgetService::define`] before it gives up on a budget that keeps
/// appearing and disappearing under it.
const DEFINE_ATTEMPTS: usize = 5;

/// What [`BudgetService::define`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Defined {
    /// The budget after it.
    pub status: BudgetStatus,
    /// Whether the budget was new.
    pub created: bool,
}

/// Adds, lists and removes budgets.
#[derive(Clone)]
pub struct BudgetService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BudgetService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BudgetService")
    }
}

impl BudgetService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Adds or replaces a budget (by id), with `spent` already spent this period.
    ///
    /// # Errors
    /// A store failure; nothing changes then.
    pub async fn put(
        &self,
        budget: Budget,
        spent: Money,
    ) -> Result<BudgetStatus, BudgetServiceError> {
        let now = self.shared.clock.now();
        let status = self
            .shared
            .store
            .put_budget(budget.clone(), spent, now)
            .await?;
        self.known(budget);
        Ok(status)
    }

    /// Puts `budget`, just stored, in the definitions this instance enforces.
    fn known(&self, budget: Budget) {
        tracing::info!(budget_id = %budget.id, limit = %budget.limit, "budget set");
        self.shared.change_budgets(|current| {
            let mut budgets: Vec<Budget> = current
                .iter()
                .filter(|b| b.id != budget.id)
                .cloned()
                .collect();
            budgets.push(budget.clone());
            budgets.sort_by(|a, b| a.id.cmp(&b.id));
            budgets
        });
    }

    /// Adds a budget unless one with its id exists (anywhere the store is shared),
    /// with `spent` already spent this period.
    ///
    /// # Errors
    /// [`BudgetServiceError::Exists`] when the id is taken, or a store failure;
    /// nothing changes then.
    pub async fn create(
        &self,
        budget: Budget,
        spent: Money,
    ) -> Result<BudgetStatus, BudgetServiceError> {
        let now = self.shared.clock.now();
        let status = match self
            .shared
            .store
            .insert_budget(budget.clone(), spent, now)
            .await
        {
            Ok(status) => status,
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                return Err(BudgetServiceError::Exists(budget.id));
            }
            Err(e) => return Err(e.into()),
        };
        self.known(budget);
        Ok(status)
    }

    /// Defines budget `budget.id`: a new one starts with `spent` (or nothing) spent; an
    /// existing one is redefined in place, keeping this period's spend and its
    /// reservations, unless `spent` is given, which replaces its account. Each step is
    /// one store operation, so a request charged meanwhile, here or on another
    /// instance, is neither lost nor double-counted.
    ///
    /// # Errors
    /// A store failure, or a budget that keeps being created and deleted meanwhile.
    pub async fn define(
        &self,
        budget: Budget,
        spent: Option<Money>,
    ) -> Result<Defined, BudgetServiceError> {
        let now = self.shared.clock.now();
        let store = &self.shared.store;
        // Whether it existed is decided by the store, not by a read before.
        if let Some(spent) = spent {
            let defined = match store.insert_budget(budget.clone(), spent, now).await {
                Ok(status) => Defined {
                    status,
                    created: true,
                },
                Err(e) if e.kind == StoreErrorKind::Conflict => Defined {
                    status: store.put_budget(budget.clone(), spent, now).await?,
                    created: false,
                },
                Err(e) => return Err(e.into()),
            };
            self.known(budget);
            return Ok(defined);
        }
        for _ in 0..DEFINE_ATTEMPTS {
            let defined = match store.redefine_budget(budget.clone(), now).await {
                Ok(status) => Defined {
                    status,
                    created: false,
                },
                Err(e) if e.kind == StoreErrorKind::NotFound => {
                    match store.insert_budget(budget.clone(), Money::ZERO, now).await {
                        Ok(status) => Defined {
                            status,
                            created: true,
                        },
                        // Created meanwhile elsewhere: redefine that one.
                        Err(e) if e.kind == StoreErrorKind::Conflict => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            self.known(budget);
            return Ok(defined);
        }
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            format!(
                "budget {} kept being created and removed meanwhile",
                budget.id
            ),
        )
        .into())
    }

    /// Every budget's status, in id order.
    ///
    /// # Errors
    /// A store failure.
    pub async fn list(&self) -> Result<Vec<BudgetStatus>, BudgetServiceError> {
        Ok(self
            .shared
            .store
            .budget_statuses(self.shared.clock.now())
            .await?)
    }

    /// The budgets this instance enforces, as defined (limit, period, scope,
    /// enforcement), without their spend.
    pub fn definitions(&self) -> Arc<Vec<Budget>> {
        Guard::into_inner(self.shared.budgets())
    }

    /// One budget's status, read alone.
    ///
    /// # Errors
    /// [`BudgetServiceError::NotFound`] or a store failure.
    pub async fn get(&self, id: &str) -> Result<BudgetStatus, BudgetServiceError> {
        self.shared
            .store
            .budget_status(id, self.shared.clock.now())
            .await
            .map_err(|e| unknown_or_store(id, e))
    }

    /// Removes a budget.
    ///
    /// # Errors
    /// [`BudgetServiceError::NotFound`] or a store failure.
    pub async fn remove(&self, id: &str) -> Result<(), BudgetServiceError> {
        self.shared
            .store
            .delete_budget(id)
            .await
            .map_err(|e| unknown_or_store(id, e))?;
        self.shared
            .change_budgets(|current| current.iter().filter(|b| b.id != id).cloned().collect());
        Ok(())
    }

    /// Removes a budget if there is one: what clean-ups want, for which a budget
    /// already gone is done.
    ///
    /// # Errors
    /// A store failure.
    pub async fn remove_if_present(&self, id: &str) -> Result<(), BudgetServiceError> {
        match self.remove(id).await {
            Err(BudgetServiceError::NotFound(_)) => Ok(()),
            done => done,
        }
    }

    /// Gives back the budget reservations held longer than the lease
    /// ([`RouterSettings::reservation_lease`](crate::services::RouterSettings)):
    /// no request lives that long, so an instance died between reserve and
    /// settle. The router does this by itself about once a minute (see
    /// `ApiKeyRouterCore::sweep_stale_reservations`); this runs it now.
    ///
    /// # Errors
    /// A store failure, or `Invalid` from a store that cannot reclaim.
    pub async fn reclaim_stale(&self) -> Result<Vec<ReclaimedReservations>, BudgetServiceError> {
        Ok(reclaim_stale(&self.shared).await?)
    }
}

/// What this router's sweeps have reclaimed since it started, for metrics: a rising
/// count means instances stop between reserve and settle.
#[derive(Debug, Default)]
pub(crate) struct ReclaimCounters {
    reservations: AtomicU64,
    nanos: AtomicU64,
}

impl ReclaimCounters {
    fn add(&self, r: &ReclaimedReservations) {
        self.reservations.fetch_add(r.count, Ordering::Relaxed);
        self.nanos.fetch_add(r.amount.as_nanos(), Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> Reclaimed {
        Reclaimed {
            count: self.reservations.load(Ordering::Relaxed),
            amount: Money::from_nanos(self.nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Reclaims reservations taken before `now - lease`, logging and counting each
/// budget's.
pub(crate) async fn reclaim_stale(
    shared: &Shared,
) -> Result<Vec<ReclaimedReservations>, StoreError> {
    let lease = shared.settings().reservation_lease;
    let now = shared.clock.now();
    let reclaimed = shared
        .store
        .reclaim_reservations(now.minus(lease), now)
        .await?;
    for r in &reclaimed {
        shared.reclaimed.add(r);
        tracing::warn!(
            budget_id = %r.budget_id,
            reservations = r.count,
            amount = %r.amount,
            lease_secs = lease.as_secs(),
            "reclaimed budget reservations held longer than the lease (an instance stopped between reserve and settle)"
        );
    }
    Ok(reclaimed)
}

/// A store error about budget `id`: `NotFound` as [`BudgetServiceError::NotFound`].
fn unknown_or_store(id: &str, e: StoreError) -> BudgetServiceError {
    match e.kind {
        StoreErrorKind::NotFound => BudgetServiceError::NotFound(id.to_owned()),
        _ => BudgetServiceError::Store(e),
    }
}
