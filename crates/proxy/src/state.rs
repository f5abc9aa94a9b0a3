//! What every handler shares.

use std::sync::{Arc, PoisonError, RwLock};

use apikeyrouter::config::Config;
use apikeyrouter::{ApiKeyRouter, VirtualKey};

use crate::auth::Auth;
use crate::metrics::Metrics;

/// Shared state of the proxy.
#[derive(Debug)]
pub struct AppState {
    pub router: ApiKeyRouter,
    /// Replaced whole on reload.
    auth: RwLock<Arc<Auth>>,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
    /// The configuration the proxy started with: a reload compares its sections read
    /// only at start with the new file's.
    pub launched: Config,
    /// Held across a re-read of the stored virtual keys and its application, so that
    /// a read that began before a change never lands after one that began after it;
    /// holds the list last applied (`None`: apply the next read whatever it is).
    refreshing: tokio::sync::Mutex<Option<Vec<VirtualKey>>>,
}

impl AppState {
    pub fn new(router: ApiKeyRouter, auth: Auth, launched: Config) -> Self {
        Self {
            router,
            auth: RwLock::new(Arc::new(auth)),
            metrics: Metrics::new(),
            max_body_bytes: launched.limits.max_body_bytes,
            launched,
            refreshing: tokio::sync::Mutex::new(None),
        }
    }

    pub fn auth(&self) -> Arc<Auth> {
        self.auth
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the credentials with what `change` makes of the ones in force, under
    /// the lock: a reload of the file and a change of the stored virtual keys at the
    /// same moment both land.
    pub fn update_auth(&self, change: impl FnOnce(&Auth) -> Auth) {
        let mut auth = self.auth.write().unwrap_or_else(PoisonError::into_inner);
        *auth = Arc::new(change(&auth));
    }

    /// Re-reads the stored virtual keys into the credentials in force.
    ///
    /// # Errors
    /// The store's error; the credentials are left as they were.
    pub async fn refresh_virtual_keys(&self) -> Result<(), apikeyrouter::StoreError> {
        let mut applied = self.refreshing.lock().await;
        let mut stored = self.router.virtual_keys().await?;
        // In name order, which the stores promise and the named reads below rely on;
        // sorted here too so that a store listing otherwise cannot duplicate a key.
        stored.sort_by(|a, b| a.name.cmp(&b.name));
        self.apply_stored(&mut applied, stored);
        Ok(())
    }

    /// Makes `stored` the virtual keys in force, unless they are the ones applied
    /// already (the periodic re-read, mostly): then nothing is rebuilt, and their
    /// warnings were logged already.
    fn apply_stored(&self, applied: &mut Option<Vec<VirtualKey>>, stored: Vec<VirtualKey>) {
        if applied.as_ref() != Some(&stored) {
            self.update_auth(|auth| auth.with_stored(&stored));
            *applied = Some(stored);
        }
    }

    /// Re-reads the stored virtual keys `names`, each alone, into the credentials in
    /// force (a name no longer stored, or whose record does not decode, is dropped);
    /// all of them instead when none were read yet. The store reads a change to a few
    /// keys costs stay independent of how many keys there are.
    ///
    /// # Errors
    /// The store's error; the credentials are left as they were.
    pub async fn refresh_named_virtual_keys<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str> + Send,
    ) -> Result<(), apikeyrouter::StoreError> {
        let mut applied = self.refreshing.lock().await;
        let Some(mut keys) = applied.clone() else {
            drop(applied);
            return self.refresh_virtual_keys().await;
        };
        for name in names {
            let stored = match self.router.virtual_key(name).await {
                Ok(key) => Some(key),
                Err(e) if e.kind == apikeyrouter::StoreErrorKind::NotFound => None,
                // Left out, as the listing leaves out a record that does not decode:
                // one bad record must not keep the other changes from applying.
                Err(e) if e.kind == apikeyrouter::StoreErrorKind::Invalid => {
                    tracing::warn!(virtual_key = %name, error = %e, "stored virtual key does not decode; ignored");
                    None
                }
                Err(e) => return Err(e),
            };
            // The list stays in name order, as the store lists it.
            match (keys.binary_search_by(|k| k.name.as_str().cmp(name)), stored) {
                (Ok(at), Some(key)) => keys[at] = key,
                (Ok(at), None) => {
                    keys.remove(at);
                }
                (Err(at), Some(key)) => keys.insert(at, key),
                (Err(_), None) => {}
            }
        }
        self.apply_stored(&mut applied, keys);
        Ok(())
    }

    /// [`Self::refresh_virtual_keys`] that applies the list even if it did not change:
    /// after a reload, a stored key a file key of the same name hid may be back.
    pub async fn reapply_virtual_keys(&self) -> Result<(), apikeyrouter::StoreError> {
        *self.refreshing.lock().await = None;
        self.refresh_virtual_keys().await
    }

    /// Refuses the key of `token_sha256` on this instance now, whatever a re-read of
    /// the store says later: what `DELETE /api/v1/virtual_keys/{name}` answers for.
    pub async fn revoke_locally(&self, token_sha256: &str) {
        let _applying = self.refreshing.lock().await;
        self.update_auth(|auth| auth.revoking(token_sha256));
    }
}
