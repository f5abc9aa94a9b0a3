//! Key management: register, list, inspect, update, delete, change state.

use std::sync::Arc;

use apikeyrouter_domain::key::KeyInfo;
use apikeyrouter_domain::{
    ApiKey, KeyId, KeyMaterial, KeyMetadata, KeyState, ProviderId, StateTransition,
    TransitionError, TransitionTrigger,
};

use super::core::{Shared, refresh_key};
use super::errors::{KeyServiceError, RegisterKeyError};
use crate::ports::StoreErrorKind;

/// Registers and manages keys.
#[derive(Clone)]
pub struct KeyService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyService")
    }
}

impl KeyService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Registers a key for `provider`. The key gets a fresh id; its material is
    /// never returned, only masked.
    ///
    /// # Errors
    /// [`RegisterKeyError`] for an unknown provider, malformed material or metadata,
    /// material already registered, or a store failure. Nothing is stored then.
    pub async fn register(
        &self,
        material: &str,
        provider: &ProviderId,
        metadata: KeyMetadata,
    ) -> Result<KeyInfo, RegisterKeyError> {
        self.register_with_id(self.shared.ids.key_id(), material, provider, metadata)
            .await
    }

    /// Registers a key under a chosen id (e.g. one named in a configuration file, so
    /// it stays the same across restarts).
    ///
    /// # Errors
    /// As [`Self::register`], and [`RegisterKeyError::IdTaken`] when the id is in use.
    pub async fn register_with_id(
        &self,
        id: KeyId,
        material: &str,
        provider: &ProviderId,
        metadata: KeyMetadata,
    ) -> Result<KeyInfo, RegisterKeyError> {
        if id.as_str().trim().is_empty() || id.as_str().len() > 128 {
            return Err(RegisterKeyError::Metadata(
                "key id must be 1 to 128 characters".to_owned(),
            ));
        }
        if self.shared.key_handle(&id).is_some() {
            return Err(RegisterKeyError::IdTaken(id));
        }
        if self.shared.provider(provider).is_none() {
            return Err(RegisterKeyError::UnknownProvider(provider.clone()));
        }
        let material = KeyMaterial::parse(material)?;
        metadata.validate().map_err(RegisterKeyError::Metadata)?;
        let duplicate = self
            .shared
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(_, h)| &h.provider == provider && h.material == material)
            .map(|(id, _)| id.clone());
        if let Some(id) = duplicate {
            return Err(RegisterKeyError::Duplicate(id));
        }
        let key = ApiKey::new(
            id,
            provider.clone(),
            material,
            metadata,
            self.shared.clock.now(),
        );
        self.shared
            .store
            .insert_key(key.clone())
            .await
            .map_err(|e| match e.kind {
                StoreErrorKind::Conflict => RegisterKeyError::IdTaken(key.id.clone()),
                _ => RegisterKeyError::Store(e),
            })?;
        self.shared.cache_key(&key);
        tracing::info!(key_id = %key.id, provider = %provider, "key registered");
        Ok(key.info())
    }

    /// Whether key `id` holds `material` (compared in constant time).
    pub fn material_matches(&self, id: &KeyId, material: &KeyMaterial) -> bool {
        self.shared
            .key_handle(id)
            .is_some_and(|h| h.material == *material)
    }

    /// One key.
    ///
    /// # Errors
    /// [`KeyServiceError::NotFound`] or a store failure.
    pub async fn get(&self, id: &KeyId) -> Result<KeyInfo, KeyServiceError> {
        self.sync_wakeups().await;
        let key = self
            .shared
            .store
            .get_key(id)
            .await
            .map_err(|e| KeyServiceError::from_store(id, e))?;
        Ok(key.info())
    }

    /// Every key, in id order.
    ///
    /// # Errors
    /// A store failure.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, KeyServiceError> {
        self.sync_wakeups().await;
        let keys = self
            .shared
            .store
            .list_keys()
            .await
            .map_err(KeyServiceError::Store)?;
        Ok(keys.iter().map(ApiKey::info).collect())
    }

    /// Replaces a key's metadata (tenant, limits, models, tags).
    ///
    /// # Errors
    /// [`KeyServiceError::NotFound`], invalid metadata, or a store failure.
    pub async fn update_metadata(
        &self,
        id: &KeyId,
        metadata: KeyMetadata,
    ) -> Result<KeyInfo, KeyServiceError> {
        metadata.validate().map_err(KeyServiceError::Metadata)?;
        let key = self
            .shared
            .store
            .update_metadata(id, metadata)
            .await
            .map_err(|e| KeyServiceError::from_store(id, e))?;
        self.shared.cache_key(&key);
        Ok(key.info())
    }

    /// Removes a key; it gets no further traffic.
    ///
    /// # Errors
    /// [`KeyServiceError::NotFound`] or a store failure.
    pub async fn delete(&self, id: &KeyId) -> Result<(), KeyServiceError> {
        self.shared
            .store
            .delete_key(id)
            .await
            .map_err(|e| KeyServiceError::from_store(id, e))?;
        self.shared.forget_key(id);
        tracing::info!(key_id = %id, "key deleted");
        Ok(())
    }

    /// Disables a key or makes it available again, by hand.
    ///
    /// # Errors
    /// [`KeyServiceError::NotManual`] for other states, a forbidden transition (e.g.
    /// disabling a disabled key), not found, or a store failure.
    pub async fn set_state(
        &self,
        id: &KeyId,
        state: KeyState,
        reason: &str,
    ) -> Result<StateTransition, KeyServiceError> {
        if !matches!(state, KeyState::Disabled | KeyState::Available) {
            return Err(KeyServiceError::NotManual(state.as_str()));
        }
        let now = self.shared.clock.now();
        let reason = if reason.trim().is_empty() {
            "manual change".to_owned()
        } else {
            reason.to_owned()
        };
        let transition = self
            .shared
            .store
            .transition(id, state, TransitionTrigger::Manual, reason, None, now)
            .await
            .map_err(|e| match e.kind {
                StoreErrorKind::Invalid => match self.shared.table().state(id) {
                    Some(from) => KeyServiceError::Transition(TransitionError {
                        key_id: id.clone(),
                        from,
                        to: state,
                    }),
                    None => KeyServiceError::Store(e),
                },
                _ => KeyServiceError::from_store(id, e),
            })?;
        self.shared.set_key_state(id, state, None);
        tracing::info!(key_id = %id, from = transition.from.as_str(), to = state.as_str(), "key state changed by hand");
        Ok(transition)
    }

    /// A key's recorded state transitions, oldest first.
    ///
    /// # Errors
    /// [`KeyServiceError::NotFound`] or a store failure.
    pub async fn transitions(&self, id: &KeyId) -> Result<Vec<StateTransition>, KeyServiceError> {
        self.sync_wakeups().await;
        self.shared
            .store
            .transitions(id)
            .await
            .map_err(|e| KeyServiceError::from_store(id, e))
    }

    /// Applies cooldowns that ended while no request came, so what is reported is current.
    pub(crate) async fn sync_wakeups(&self) {
        sync_wakeups(&self.shared).await;
    }
}

/// Persists the transitions the routing table made by itself (ended cooldowns).
pub(crate) async fn sync_wakeups(shared: &Shared) {
    let transitions: Vec<StateTransition> = {
        let mut table = shared.table();
        table.wake(shared.clock.now());
        table.drain_transitions().collect()
    };
    persist_transitions(shared, transitions).await;
}

/// Returns whether the store refused one whose key it holds in another state (an
/// operator disabled it, say): the table now holds what the store does, and a choice
/// made with the woken key is to be made again. A refusal where the store agrees
/// with the table (another instance ended the same cooldown first) changes nothing.
pub(crate) async fn persist_transitions(
    shared: &Shared,
    transitions: Vec<StateTransition>,
) -> bool {
    let mut refused = false;
    for t in transitions {
        if let Err(e) = shared
            .store
            .transition(&t.key_id, t.to, t.trigger, t.reason, None, t.at)
            .await
        {
            tracing::debug!(key_id = %t.key_id, error = %e, "table transition not persisted");
            if e.kind == StoreErrorKind::Invalid {
                refresh_key(shared, &t.key_id).await;
                refused |= shared.table().state(&t.key_id) != Some(t.to);
            }
        }
    }
    refused
}
