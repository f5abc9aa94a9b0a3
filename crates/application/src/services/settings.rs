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
            failure_policy: FailurePolicy::default(),
            fallbacks: HashMap::new(),
            downgrades: Vec::new(),
        }
    }
}
