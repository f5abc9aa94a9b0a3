//! Virtual keys made at run time, with their budgets: what the proxy's management API
//! calls.

use apikeyrouter_application::ports::{StoreError, StoreErrorKind};
use apikeyrouter_application::services::{BudgetServiceError, VirtualKeyChange};
use apikeyrouter_domain::{BudgetStatus, Money, VirtualKey, VirtualKeyError};

use crate::ApiKeyRouter;
use crate::config::{virtual_key_budget, virtual_key_budget_id};

/// Why a virtual key was not added.
#[derive(Debug, thiserror::Error)]
pub enum AddVirtualKeyError {
    /// A field is wrong.
    #[error(transparent)]
    Invalid(#[from] VirtualKeyError),
    /// The name is taken (names of revoked keys stay taken).
    #[error("virtual key {0} exists")]
    NameTaken(String),
    /// A budget already has the id the key's would have, and would limit the key.
    #[error("budget {0} exists")]
    BudgetTaken(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl ApiKeyRouter {
    /// Stores a virtual key made now and, when it has one, its monthly hard budget
    /// (`virtual-key-<name>`, as for the config file's virtual keys). If the budget
    /// cannot be set the key is revoked again, so that no key runs without the limit
    /// it was given; its name stays taken.
    ///
    /// # Errors
    /// See [`AddVirtualKeyError`].
    pub async fn add_virtual_key(
        &self,
        key: VirtualKey,
    ) -> Result<(VirtualKey, Option<BudgetStatus>), AddVirtualKeyError> {
        key.validate()?;
        // Named first: a key's own budget must not hide that the key exists.
        match self.core().virtual_key(&key.name).await {
            Ok(_) => return Err(AddVirtualKeyError::NameTaken(key.name)),
            Err(e) if e.kind == StoreErrorKind::NotFound => {}
            Err(e) => return Err(AddVirtualKeyError::Store(e)),
        }
        let budget_id = virtual_key_budget_id(&key.name);
        // A budget under that id would apply to the key's requests (its scope is the
        // key's tag): one made by hand, or left behind by a failed clean-up.
        match self.core().budgets().get(&budget_id).await {
            Ok(_) => return Err(AddVirtualKeyError::BudgetTaken(budget_id)),
            Err(BudgetServiceError::NotFound(_)) => {}
            Err(e) => return Err(AddVirtualKeyError::Store(store_error(e))),
        }
        let budget = key
            .budget_usd
            .map(|usd| virtual_key_budget(&key.name, usd))
            .transpose()
            .map_err(|_| VirtualKeyError::Budget)?;
        let name = key.name.clone();
        let stored = match self.core().insert_virtual_key(key).await {
            Ok(stored) => stored,
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                return Err(AddVirtualKeyError::NameTaken(name));
            }
            Err(e) => return Err(AddVirtualKeyError::Store(e)),
        };
        let Some(budget) = budget else {
            return Ok((stored, None));
        };
        // Created, not put: one made under that id since the check above stays, with
        // its spend, and this key does not.
        let e = match self.core().budgets().create(budget, Money::ZERO).await {
            Ok(status) => return Ok(self.unless_revoked_meanwhile(stored, status).await),
            Err(e) => e,
        };
        if let Err(undo) = self.core().revoke_virtual_key(&name).await {
            tracing::error!(virtual_key = %name, error = %undo, "virtual key left without its budget: revoke it");
        }
        Err(match e {
            BudgetServiceError::Exists(id) => AddVirtualKeyError::BudgetTaken(id),
            e => AddVirtualKeyError::Store(store_error(e)),
        })
    }

    /// The key just made or changed with its new budget, unless a revocation landed
    /// between the two: it found no budget to remove, so the budget is removed here
    /// rather than left to limit a name no key can use again.
    async fn unless_revoked_meanwhile(
        &self,
        stored: VirtualKey,
        budget: BudgetStatus,
    ) -> (VirtualKey, Option<BudgetStatus>) {
        let revoked = match self.core().virtual_keys().await {
            Ok(keys) => keys
                .into_iter()
                .find(|k| k.name == stored.name && !k.is_active()),
            Err(e) => {
                tracing::warn!(virtual_key = %stored.name, error = %e, "virtual key not read back after its budget was made");
                None
            }
        };
        let Some(revoked) = revoked else {
            return (stored, Some(budget));
        };
        if let Err(e) = self
            .core()
            .budgets()
            .remove_if_present(&budget.budget_id)
            .await
        {
            tracing::warn!(virtual_key = %stored.name, error = %e, "budget of a virtual key revoked while it was made not removed; revoke the key again to retry");
        }
        (revoked, None)
    }

    /// Gives an active virtual key made at run time `key`'s limits (tenant, models,
    /// rpm, budget) under the same token. The budget follows: a new limit is defined
    /// in place, keeping this month's spend and the reservations in flight; an
    /// unchanged one is left alone; no limit removes it.
    ///
    /// # Errors
    /// `Invalid` for malformed limits, `NotFound` for an unknown key, `Conflict` for a
    /// revoked one, or a store failure.
    pub async fn update_virtual_key(&self, key: VirtualKey) -> Result<(), StoreError> {
        self.core().update_virtual_key(key.clone()).await?;
        let budgets = self.core().budgets();
        let id = virtual_key_budget_id(&key.name);
        match key.budget_usd {
            // Redefined in place: this month's spend and the reservations stay. An
            // unchanged limit is left alone, with whatever else an operator set on
            // the budget through the budgets API.
            Some(usd) => {
                let budget = virtual_key_budget(&key.name, usd)
                    .map_err(|e| StoreError::new(StoreErrorKind::Invalid, e))?;
                match budgets.get(&id).await {
                    Ok(current) if current.limit == budget.limit => {}
                    Ok(_) | Err(BudgetServiceError::NotFound(_)) => {
                        let defined = budgets.define(budget, None).await.map_err(store_error)?;
                        if defined.created {
                            // A revocation since the update found no budget to remove.
                            self.unless_revoked_meanwhile(key, defined.status).await;
                        }
                    }
                    Err(e) => return Err(store_error(e)),
                }
            }
            None => budgets.remove_if_present(&id).await.map_err(store_error)?,
        }
        Ok(())
    }

    /// Every virtual key made at run time, revoked ones included, in name order.
    ///
    /// # Errors
    /// A store failure.
    pub async fn virtual_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
        self.core().virtual_keys().await
    }

    /// One virtual key made at run time, revoked or not, read alone.
    ///
    /// # Errors
    /// `NotFound` for an unknown name, or a store failure.
    pub async fn virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        self.core().virtual_key(name).await
    }

    /// Gives a virtual key made at run time a new token (its SHA-256 digest,
    /// `token_sha256`) under the same name, limits and budget; returns its record as
    /// it was, whose digest is the token to refuse from now on.
    ///
    /// # Errors
    /// `Invalid` for a malformed digest, `NotFound` for an unknown key, `Conflict`
    /// for a revoked one, or a store failure.
    pub async fn rotate_virtual_key(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<VirtualKey, StoreError> {
        self.core().rotate_virtual_key(name, token_sha256).await
    }

    /// Revokes a virtual key made at run time (again, if it was: its budget's
    /// removal is retried) and removes its budget; returns its record. A budget that
    /// cannot be removed is logged: the key is revoked, which is what counts.
    ///
    /// # Errors
    /// `NotFound` if absent, or a store failure.
    pub async fn revoke_virtual_key(&self, name: &str) -> Result<VirtualKey, StoreError> {
        let revoked = self.core().revoke_virtual_key(name).await?;
        if let Err(e) = self
            .core()
            .budgets()
            .remove_if_present(&virtual_key_budget_id(name))
            .await
        {
            tracing::warn!(virtual_key = %name, error = %e, "budget of a revoked virtual key not removed; revoke again to retry");
        }
        Ok(revoked)
    }

    /// The changes to the virtual keys made at run time from now on: one key when it
    /// changed here or on another instance (by its change event), all of them on a
    /// store without events at each periodic reading (after the budgets) and after a
    /// lost change subscription. A receiver that lagged (`RecvError::Lagged`) should
    /// read them all.
    pub fn virtual_key_changes(&self) -> tokio::sync::broadcast::Receiver<VirtualKeyChange> {
        self.core().virtual_key_changes()
    }
}

fn store_error(e: BudgetServiceError) -> StoreError {
    match e {
        BudgetServiceError::Store(e) => e,
        other => StoreError::new(StoreErrorKind::Internal, other.to_string()),
    }
}
