//! What every handler shares.

use std::sync::{Arc, PoisonError, RwLock};

use apikeyrouter::ApiKeyRouter;
use apikeyrouter::config::Config;

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
}

impl AppState {
    pub fn new(router: ApiKeyRouter, auth: Auth, launched: Config) -> Self {
        Self {
            router,
            auth: RwLock::new(Arc::new(auth)),
            metrics: Metrics::new(),
            max_body_bytes: launched.limits.max_body_bytes,
            launched,
        }
    }

    pub fn auth(&self) -> Arc<Auth> {
        self.auth
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_auth(&self, auth: Auth) {
        *self.auth.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
    }
}
