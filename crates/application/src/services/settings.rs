//! Router behaviour settings: default objective, attempts, deadlines, fallbacks and
//! downgrade rules.

use std::collections::HashMap;
use std::time::Duration;

use apikeyrouter_domain::cost::DowngradeRule;
use apikeyrouter_domain::failure::FailurePolicy;
use apikeyrouter_domain::{ModelId, Objective};

/// How the router behaves. Replaced as a whole on reload.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    /// Objective used when a request names none.
    pub objective: Objective,
    /// Most provider calls per request, across keys and fallback models.
    pub max_attempts: u32,
    /// Most time per request, all attempts included.
    pub total_deadline: Duration,
    /// Most time per provider call.
    pub attempt_timeout: Duration,
    /// How long a budget reservation may be held before it is taken for one left by
    /// an instance that died, and given back. Longer than any request, streams
    /// included: a request that outlives it still has its cost charged, but runs
    /// unreserved for the rest of its life.
    pub reservation_lease: Duration,
    /// Cooldowns and backoff after failures.
    pub failure_policy: FailurePolicy,
    /// When no key can serve a model, try these models in order.
    pub fallbacks: HashMap<ModelId, Vec<ModelId>>,
    /// Cheaper models for simple requests; applied when the objective weighs cost.
    pub downgrades: Vec<DowngradeRule>,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            objective: Objective::default(),
            max_attempts: 3,
            total_deadline: Duration::from_secs(120),
            attempt_timeout: Duration::from_secs(60),
            reservation_lease: Duration::from_secs(3_600),
            failure_policy: FailurePolicy::default(),
            fallbacks: HashMap::new(),
            downgrades: Vec::new(),
        }
    }
}
