//! Quota queries: capacity state, windows and exhaustion prediction per key.

use std::sync::Arc;

use apikeyrouter_domain::quota::{ExhaustionPrediction, WindowSnapshot};
use apikeyrouter_domain::{CapacityState, KeyId, KeyState, QuotaLimits, Uncertainty};
use serde::{Deserialize, Serialize};

use super::core::Shared;
use super::errors::KeyServiceError;
use super::keys::sync_wakeups;

/// The quota state of one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyQuota {
    /// The key.
    pub key_id: KeyId,
    /// Its life-cycle state.
    pub state: KeyState,
    /// Capacity, with the key's state taken into account (an exhausted key is
    /// exhausted whatever the windows say).
    pub capacity: CapacityState,
    /// How far to trust it.
    pub uncertainty: Uncertainty,
    /// Each limited window.
    pub windows: Vec<WindowSnapshot>,
    /// When the key is expected to run out.
    pub prediction: Option<ExhaustionPrediction>,
}

/// Answers quota questions.
#[derive(Clone)]
pub struct QuotaService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QuotaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaService")
    }
}

impl QuotaService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The quota state and exhaustion prediction of a key.
    ///
    /// # Errors
    /// [`KeyServiceError::NotFound`] or a store failure.
    pub async fn key_quota(&self, id: &KeyId) -> Result<KeyQuota, KeyServiceError> {
        sync_wakeups(&self.shared).await;
        let key = self
            .shared
            .store
            .get_key(id)
            .await
            .map_err(|e| KeyServiceError::from_store(id, e))?;
        let limits = QuotaLimits::from_metadata(&key.metadata);
        let now = self.shared.clock.now();
        let snap = self
            .shared
            .store
            .quota_snapshot(id, &limits, now)
            .await
            .map_err(|e| KeyServiceError::from_store(id, e))?;
        let capacity = match key.state {
            KeyState::Exhausted => CapacityState::Exhausted,
            KeyState::Recovering => CapacityState::Recovering,
            _ => snap.capacity,
        };
        Ok(KeyQuota {
            key_id: key.id,
            state: key.state,
            capacity,
            uncertainty: snap.uncertainty,
            windows: snap.windows,
            prediction: snap.prediction,
        })
    }
}
