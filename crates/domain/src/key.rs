//! The API key entity, its metadata, its state machine and usage counters.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{KeyId, ModelId, ProviderId, TenantId};
use crate::money::Money;
use crate::secret::KeyMaterial;
use crate::time::Timestamp;

/// Where a key is in its life cycle.
///
/// ```text
/// Available -> Throttled -> Available                (rate limit, cooldown elapsed)
/// Available -> Exhausted -> Recovering -> Available  (quota gone, reset, probe succeeded)
/// any -> Disabled (manual), any -> Invalid (auth failure)
/// Disabled | Invalid -> Available                    (manual re-enable)
/// ```
///
/// Disabled and Invalid are left only by hand (see [`KeyState::can_transition`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Serving traffic.
    Available,
    /// Rate limited; no traffic until its cooldown ends.
    Throttled,
    /// Quota used up; no traffic until the quota resets.
    Exhausted,
    /// Quota reset; serving traffic on probation until one request succeeds.
    Recovering,
    /// Switched off by an operator.
    Disabled,
    /// The provider rejected its credentials.
    Invalid,
}

impl KeyState {
    /// Every state, for tables and property tests.
    pub const ALL: [Self; 6] = [
        Self::Available,
        Self::Throttled,
        Self::Exhausted,
        Self::Recovering,
        Self::Disabled,
        Self::Invalid,
    ];

    /// Whether a key in this state may be chosen by the router.
    pub const fn is_routable(self) -> bool {
        matches!(self, Self::Available | Self::Recovering)
    }

    /// Whether someone set it (an operator, or a provider refusing the credentials),
    /// so that it changes only when someone acts; the other states follow traffic and
    /// time on each instance.
    pub const fn is_set_by_hand(self) -> bool {
        matches!(self, Self::Disabled | Self::Invalid)
    }

    /// Whether the state machine allows `self -> to` for `trigger`.
    ///
    /// A state set by hand is left only by hand: by an operator, or for Invalid when
    /// the provider refuses the credentials. Traffic and time (a cooldown that ends, a
    /// quota reset, a probe that succeeds) never take a key out of it, even when they
    /// were decided before it was set: a cooldown computed on one instance must not
    /// re-enable a key an operator disabled meanwhile on another.
    pub const fn can_transition(self, to: Self, trigger: TransitionTrigger) -> bool {
        let by_hand = match trigger {
            TransitionTrigger::Manual => true,
            TransitionTrigger::AuthFailure => matches!(to, Self::Invalid),
            _ => false,
        };
        self.has_edge_to(to) && (by_hand || !self.is_set_by_hand())
    }

    /// The edges of the state machine, whatever the trigger.
    const fn has_edge_to(self, to: Self) -> bool {
        use KeyState::{Available, Disabled, Exhausted, Invalid, Recovering, Throttled};
        matches!(
            (self, to),
            (Available | Recovering, Throttled)
                | (Throttled, Available)
                | (Available | Throttled | Recovering, Exhausted)
                | (Exhausted, Recovering)
                | (Recovering, Available)
                | (
                    Available | Throttled | Exhausted | Recovering | Invalid,
                    Disabled
                )
                | (
                    Available | Throttled | Exhausted | Recovering | Disabled,
                    Invalid
                )
                | (Disabled | Invalid, Available)
        )
    }

    /// Lowercase name, as used in the API and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Throttled => "throttled",
            Self::Exhausted => "exhausted",
            Self::Recovering => "recovering",
            Self::Disabled => "disabled",
            Self::Invalid => "invalid",
        }
    }
}

/// What caused a state transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionTrigger {
    /// The provider answered 429 or an equivalent rate-limit signal.
    RateLimited,
    /// The provider reported the key's quota or credit as used up.
    QuotaExhausted,
    /// The provider rejected the credentials.
    AuthFailure,
    /// A throttle cooldown ended.
    CooldownElapsed,
    /// An exhausted key's quota window reset.
    QuotaReset,
    /// A recovering key served a request successfully.
    ProbeSucceeded,
    /// Several server errors or timeouts in a row: a short rest.
    RepeatedFailures,
    /// An operator asked for it.
    Manual,
}

impl TransitionTrigger {
    /// Every trigger, for tables and property tests.
    pub const ALL: [Self; 8] = [
        Self::RateLimited,
        Self::QuotaExhausted,
        Self::AuthFailure,
        Self::CooldownElapsed,
        Self::QuotaReset,
        Self::ProbeSucceeded,
        Self::RepeatedFailures,
        Self::Manual,
    ];
}

/// One recorded change of a key's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTransition {
    /// The key that changed.
    pub key_id: KeyId,
    /// State before.
    pub from: KeyState,
    /// State after.
    pub to: KeyState,
    /// What caused it.
    pub trigger: TransitionTrigger,
    /// Human-readable detail (never key material).
    pub reason: String,
    /// When it happened.
    pub at: Timestamp,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("key {key_id} cannot go from {} to {}", from.as_str(), to.as_str())]
pub struct TransitionError {
    /// The key.
    pub key_id: KeyId,
    /// Its current state.
    pub from: KeyState,
    /// The refused target state.
    pub to: KeyState,
}

/// Descriptive data attached to a key at registration.
///
/// Known fields are typed; any other string field lands in `tags`, which budgets and
/// reports can group by (e.g. `feature = "chatbot"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMetadata {
    /// Tenant owning the key; requests for a tenant route only to its keys.
    /// `customer_id` is accepted as an alias.
    #[serde(
        default,
        alias = "customer_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub tenant: Option<TenantId>,
    /// Free-form tier name (e.g. `premium`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Deployment environment (e.g. `production`).
    #[serde(default, alias = "env", skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Requests per minute the provider allows this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute the provider allows this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    /// Tokens per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
    /// Tokens per calendar month (a prepaid or contractual quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_tokens: Option<u64>,
    /// Models this key may serve; `None` means every model of its provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelId>>,
    /// Any other labels.
    #[serde(flatten)]
    pub tags: BTreeMap<String, String>,
}

impl KeyMetadata {
    /// Rejects metadata that cannot be right: zero limits, an empty tenant, an empty
    /// model list.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("rpd", self.rpd),
            ("tpd", self.tpd),
            ("monthly_tokens", self.monthly_tokens),
        ] {
            if value == Some(0) {
                return Err(format!("{name} must be greater than zero when set"));
            }
        }
        if self
            .tenant
            .as_ref()
            .is_some_and(|t| t.as_str().trim().is_empty())
        {
            return Err("tenant must not be empty".to_owned());
        }
        if self.models.as_ref().is_some_and(Vec::is_empty) {
            return Err("models must list at least one model when set".to_owned());
        }
        Ok(())
    }

    /// Whether the key may serve `model`.
    pub fn serves(&self, model: &ModelId) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

/// Usage and health counters of one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStats {
    /// Requests sent with this key.
    pub requests: u64,
    /// Requests that succeeded.
    pub successes: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Rate-limit hits since the last success; drives cooldown backoff.
    pub throttle_streak: u32,
    /// Prompt tokens consumed.
    pub prompt_tokens: u64,
    /// Completion tokens consumed.
    pub completion_tokens: u64,
    /// Money spent.
    pub cost: Money,
    /// Exponentially weighted success rate in `[0, 1]`; starts optimistic at 1.
    pub success_ewma: f64,
    /// Exponentially weighted latency in milliseconds; 0 until the first sample.
    pub latency_ewma_ms: f64,
    /// Last time the key was used.
    pub last_used: Option<Timestamp>,
}

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

impl KeyStats {
    /// Fresh counters with an optimistic success rate.
    pub fn new() -> Self {
        Self {
            success_ewma: 1.0,
            ..Self::default()
        }
    }

    /// Records one finished attempt.
    pub fn record(&mut self, success: bool, latency: Duration, now: Timestamp) {
        self.requests += 1;
        self.last_used = Some(now);
        let sample = if success { 1.0 } else { 0.0 };
        self.success_ewma += EWMA_ALPHA * (sample - self.success_ewma);
        if success {
            self.successes += 1;
            self.consecutive_failures = 0;
            self.throttle_streak = 0;
            let ms = latency.as_secs_f64() * 1000.0;
            self.latency_ewma_ms = if self.successes == 1 {
                ms
            } else {
                self.latency_ewma_ms + EWMA_ALPHA * (ms - self.latency_ewma_ms)
            };
        } else {
            self.failures += 1;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
    }
}

/// A provider API key under management.
#[derive(Clone, Debug)]
pub struct ApiKey {
    /// Stable identifier.
    pub id: KeyId,
    /// Provider the key belongs to.
    pub provider: ProviderId,
    /// The secret.
    pub material: KeyMaterial,
    /// Descriptive data.
    pub metadata: KeyMetadata,
    /// Current state.
    pub state: KeyState,
    /// Why it is in this state (last transition's reason).
    pub state_reason: String,
    /// No traffic before this instant (throttled or exhausted keys).
    pub cooldown_until: Option<Timestamp>,
    /// Counters.
    pub stats: KeyStats,
    /// Registration time.
    pub created_at: Timestamp,
}

impl ApiKey {
    /// A newly registered, available key.
    pub fn new(
        id: KeyId,
        provider: ProviderId,
        material: KeyMaterial,
        metadata: KeyMetadata,
        now: Timestamp,
    ) -> Self {
        Self {
            id,
            provider,
            material,
            metadata,
            state: KeyState::Available,
            state_reason: "registered".to_owned(),
            cooldown_until: None,
            stats: KeyStats::new(),
            created_at: now,
        }
    }

    /// Moves the key to `to`, returning the record of the change.
    ///
    /// A transition to the current state is refused too; callers that only extend a
    /// cooldown set `cooldown_until` directly.
    ///
    /// # Errors
    /// [`TransitionError`] when the state machine forbids the change; the key is unchanged.
    pub fn transition(
        &mut self,
        to: KeyState,
        trigger: TransitionTrigger,
        reason: impl Into<String>,
        cooldown_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<StateTransition, TransitionError> {
        if !self.state.can_transition(to, trigger) {
            return Err(TransitionError {
                key_id: self.id.clone(),
                from: self.state,
                to,
            });
        }
        let reason = reason.into();
        let record = StateTransition {
            key_id: self.id.clone(),
            from: self.state,
            to,
            trigger,
            reason: reason.clone(),
            at: now,
        };
        self.state = to;
        self.state_reason = reason;
        self.cooldown_until = cooldown_until;
        Ok(record)
    }

    /// A serializable description of the key with its material masked.
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            provider_id: self.provider.clone(),
            key_material: self.material.masked(),
            metadata: self.metadata.clone(),
            state: self.state,
            state_reason: self.state_reason.clone(),
            cooldown_until: self.cooldown_until,
            stats: self.stats.clone(),
            created_at: self.created_at,
        }
    }
}

/// What the outside world may see of a key: everything but the secret, which appears
/// only masked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Stable identifier.
    pub id: KeyId,
    /// Provider.
    pub provider_id: ProviderId,
    /// Masked material, e.g. `sk-...abcd`.
    pub key_material: String,
    /// Descriptive data.
    pub metadata: KeyMetadata,
    /// Current state.
    pub state: KeyState,
    /// Why it is in this state.
    pub state_reason: String,
    /// No traffic before this instant.
    pub cooldown_until: Option<Timestamp>,
    /// Counters.
    pub stats: KeyStats,
    /// Registration time.
    pub created_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ApiKey {
        ApiKey::new(
            KeyId::new("k1"),
            ProviderId::new("openai"),
            KeyMaterial::parse("sk-test-000000001234").unwrap(),
            KeyMetadata::default(),
            Timestamp::EPOCH,
        )
    }

    #[test]
    fn only_disabled_and_invalid_are_set_by_hand() {
        let by_hand: Vec<KeyState> = KeyState::ALL
            .into_iter()
            .filter(|s| s.is_set_by_hand())
            .collect();
        assert_eq!(by_hand, [KeyState::Disabled, KeyState::Invalid]);
    }

    #[test]
    fn throttle_and_recover_records_both_transitions() {
        let mut k = key();
        let t1 = k
            .transition(
                KeyState::Throttled,
                TransitionTrigger::RateLimited,
                "429 from provider",
                Some(Timestamp::from_millis(5_000)),
                Timestamp::from_millis(1_000),
            )
            .unwrap();
        assert_eq!((t1.from, t1.to), (KeyState::Available, KeyState::Throttled));
        assert_eq!(k.cooldown_until, Some(Timestamp::from_millis(5_000)));
        let t2 = k
            .transition(
                KeyState::Available,
                TransitionTrigger::CooldownElapsed,
                "cooldown elapsed",
                None,
                Timestamp::from_millis(5_000),
            )
            .unwrap();
        assert_eq!((t2.from, t2.to), (KeyState::Throttled, KeyState::Available));
        assert_eq!(k.cooldown_until, None);
    }

    #[test]
    fn forbidden_transition_leaves_key_unchanged() {
        let mut k = key();
        let err = k
            .transition(
                KeyState::Recovering,
                TransitionTrigger::QuotaReset,
                "x",
                None,
                Timestamp::EPOCH,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "key k1 cannot go from available to recovering"
        );
        assert_eq!(k.state, KeyState::Available);
    }

    #[test]
    fn metadata_accepts_customer_id_alias_and_extra_tags() {
        let m: KeyMetadata =
            serde_json::from_str(r#"{"customer_id":"customer-a","rpm":500,"feature":"chatbot"}"#)
                .unwrap();
        assert_eq!(m.tenant, Some(TenantId::new("customer-a")));
        assert_eq!(m.rpm, Some(500));
        assert_eq!(m.tags.get("feature").map(String::as_str), Some("chatbot"));
    }

    #[test]
    fn info_masks_material() {
        let info = key().info();
        assert_eq!(info.key_material, "sk-...1234");
    }

    #[test]
    fn stats_track_success_rate_and_latency() {
        let mut s = KeyStats::new();
        s.record(true, Duration::from_millis(100), Timestamp::EPOCH);
        s.record(false, Duration::ZERO, Timestamp::EPOCH);
        assert_eq!((s.requests, s.successes, s.failures), (2, 1, 1));
        assert!((s.success_ewma - 0.8).abs() < 1e-9);
        assert!((s.latency_ewma_ms - 100.0).abs() < 1e-9);
    }
}

#[cfg(test)]
mod state_machine_properties {
    use proptest::prelude::*;

    use super::*;

    fn state() -> impl Strategy<Value = KeyState> {
        prop::sample::select(KeyState::ALL.to_vec())
    }

    fn trigger() -> impl Strategy<Value = TransitionTrigger> {
        prop::sample::select(TransitionTrigger::ALL.to_vec())
    }

    /// A key just registered (available).
    fn fresh_key() -> ApiKey {
        ApiKey::new(
            KeyId::new("k"),
            ProviderId::new("p"),
            KeyMaterial::parse("sk-test-00000000").unwrap(),
            KeyMetadata::default(),
            Timestamp::EPOCH,
        )
    }

    proptest! {
        /// Under any sequence of requested transitions, a key only ever moves along an
        /// allowed edge, every move is recorded, and a refused move changes nothing.
        #[test]
        fn only_allowed_transitions_happen(
            targets in prop::collection::vec((state(), trigger()), 0..60),
        ) {
            let mut key = fresh_key();
            let mut log = Vec::new();
            for (i, (to, trigger)) in targets.into_iter().enumerate() {
                let before = key.state;
                let now = Timestamp::from_millis(i as u64);
                match key.transition(to, trigger, "test", None, now) {
                    Ok(t) => {
                        prop_assert!(before.can_transition(to, trigger));
                        prop_assert!(!before.is_set_by_hand() || matches!(trigger, TransitionTrigger::Manual | TransitionTrigger::AuthFailure));
                        prop_assert_eq!((t.from, t.to, t.trigger, t.at), (before, to, trigger, now));
                        log.push(t);
                    }
                    Err(e) => {
                        prop_assert!(!before.can_transition(to, trigger));
                        prop_assert_eq!(key.state, before);
                        prop_assert_eq!((e.from, e.to), (before, to));
                    }
                }
            }
            // The log is a connected path from Available.
            let mut at = KeyState::Available;
            for t in &log {
                prop_assert_eq!(t.from, at);
                at = t.to;
            }
            prop_assert_eq!(at, key.state);
        }
    }

    #[test]
    fn spec_paths_are_allowed_and_nothing_returns_to_itself() {
        use KeyState::*;
        use TransitionTrigger::*;
        for (from, to, trigger) in [
            (Available, Throttled, RateLimited),
            (Throttled, Available, CooldownElapsed),
            (Available, Exhausted, QuotaExhausted),
            (Exhausted, Recovering, QuotaReset),
            (Recovering, Available, ProbeSucceeded),
            (Disabled, Available, Manual),
            (Invalid, Available, Manual),
        ] {
            assert!(from.can_transition(to, trigger), "{from:?} -> {to:?}");
        }
        for s in KeyState::ALL {
            for trigger in TransitionTrigger::ALL {
                assert!(!s.can_transition(s, trigger));
            }
            if s != Disabled {
                assert!(s.can_transition(Disabled, Manual));
            }
            if s != Invalid {
                assert!(s.can_transition(Invalid, AuthFailure));
            }
        }
        assert!(!Available.can_transition(Recovering, QuotaReset));
        assert!(!Throttled.can_transition(Recovering, QuotaReset));
    }

    /// A cooldown, quota reset or probe decided before an operator disabled the key
    /// (or before its credentials were refused) does not bring it back.
    #[test]
    fn states_set_by_hand_are_left_only_by_hand() {
        use KeyState::*;
        use TransitionTrigger::*;
        for from in [Disabled, Invalid] {
            for trigger in TransitionTrigger::ALL {
                let allowed: Vec<KeyState> = KeyState::ALL
                    .into_iter()
                    .filter(|&to| from.can_transition(to, trigger))
                    .collect();
                let expected = match (from, trigger) {
                    (Disabled, Manual) => vec![Available, Invalid],
                    (Invalid, Manual) => vec![Available, Disabled],
                    (Disabled, AuthFailure) => vec![Invalid],
                    _ => vec![],
                };
                assert_eq!(allowed, expected, "{from:?} by {trigger:?}");
            }
        }
        let mut key = fresh_key();
        key.transition(Disabled, Manual, "operator", None, Timestamp::EPOCH)
            .unwrap();
        let refused = key
            .transition(
                Available,
                CooldownElapsed,
                "cooldown elapsed",
                None,
                Timestamp::EPOCH,
            )
            .unwrap_err();
        assert_eq!(
            (refused.from, refused.to, key.state),
            (Disabled, Available, Disabled)
        );
    }
}
