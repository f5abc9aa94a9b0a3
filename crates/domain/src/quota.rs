//! Quota awareness: request and token windows per key, fed by our own accounting and
//! by the provider's rate-limit headers, summarised as a capacity state with an
//! uncertainty and an exhaustion prediction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::key::KeyMetadata;
use crate::time::Timestamp;

/// The windows a key is counted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// Requests per minute.
    MinuteRequests,
    /// Tokens per minute.
    MinuteTokens,
    /// Requests per UTC day.
    DayRequests,
    /// Tokens per UTC day.
    DayTokens,
    /// Tokens per calendar month.
    MonthTokens,
}

impl WindowKind {
    /// Every kind, in the order windows are checked.
    pub const ALL: [Self; 5] = [
        Self::MinuteRequests,
        Self::MinuteTokens,
        Self::DayRequests,
        Self::DayTokens,
        Self::MonthTokens,
    ];

    /// Start and end of the window of this kind containing `now`.
    pub fn bounds(self, now: Timestamp) -> (Timestamp, Timestamp) {
        match self {
            Self::MinuteRequests | Self::MinuteTokens => {
                let start = Timestamp::from_millis(now.as_millis() - now.as_millis() % 60_000);
                (start, start.plus(Duration::from_secs(60)))
            }
            Self::DayRequests | Self::DayTokens => {
                let start = now.start_of_day();
                (start, start.plus(Duration::from_secs(86_400)))
            }
            Self::MonthTokens => (now.start_of_month(), now.start_of_next_month()),
        }
    }

    /// Whether the window counts tokens (otherwise it counts requests).
    pub const fn counts_tokens(self) -> bool {
        matches!(
            self,
            Self::MinuteTokens | Self::DayTokens | Self::MonthTokens
        )
    }
}

/// The limits a key is subject to; `None` means unknown or unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests per day.
    pub rpd: Option<u64>,
    /// Tokens per day.
    pub tpd: Option<u64>,
    /// Tokens per month.
    pub monthly_tokens: Option<u64>,
}

impl QuotaLimits {
    /// The limits declared in a key's metadata.
    pub fn from_metadata(m: &KeyMetadata) -> Self {
        Self {
            rpm: m.rpm,
            tpm: m.tpm,
            rpd: m.rpd,
            tpd: m.tpd,
            monthly_tokens: m.monthly_tokens,
        }
    }

    /// The limit of the window of `kind`.
    pub const fn limit(&self, kind: WindowKind) -> Option<u64> {
        match kind {
            WindowKind::MinuteRequests => self.rpm,
            WindowKind::MinuteTokens => self.tpm,
            WindowKind::DayRequests => self.rpd,
            WindowKind::DayTokens => self.tpd,
            WindowKind::MonthTokens => self.monthly_tokens,
        }
    }
}

/// What a provider said about a key's remaining capacity (from response headers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaObservation {
    /// Request limit of the provider's window.
    pub limit_requests: Option<u64>,
    /// Requests left in it.
    pub remaining_requests: Option<u64>,
    /// When it resets.
    pub reset_requests_at: Option<Timestamp>,
    /// Token limit of the provider's window.
    pub limit_tokens: Option<u64>,
    /// Tokens left in it.
    pub remaining_tokens: Option<u64>,
    /// When it resets.
    pub reset_tokens_at: Option<Timestamp>,
}

/// How full a key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityState {
    /// At least half of the tightest window left.
    Abundant,
    /// Between a fifth and a half left.
    Constrained,
    /// Less than a fifth left.
    Critical,
    /// Nothing left until a window resets.
    Exhausted,
    /// A window that was exhausted has just reset.
    Recovering,
}

/// How much to trust a capacity reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Uncertainty {
    /// The provider told us recently.
    Low,
    /// Our own accounting against declared limits (other users of the key are invisible).
    Medium,
    /// No limits known: the state is a guess.
    High,
}

/// When a key is expected to run out at its current rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExhaustionPrediction {
    /// The window expected to run out first.
    pub window: WindowKind,
    /// When, or `None` if the window resets first at the current rate.
    pub exhausts_at: Option<Timestamp>,
    /// Current consumption per minute in that window's unit.
    pub rate_per_minute: f64,
    /// Confidence in `[0, 1]`: grows with the number of samples and the share of the
    /// window observed.
    pub confidence: f64,
}

/// One window as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSnapshot {
    /// Which window.
    pub kind: WindowKind,
    /// Its limit (ours or the provider's, whichever is tighter).
    pub limit: u64,
    /// Used so far.
    pub used: u64,
    /// Left.
    pub remaining: u64,
    /// When it resets.
    pub resets_at: Timestamp,
}

/// The quota state of a key at an instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuotaSnapshot {
    /// Overall capacity (the tightest window decides).
    pub capacity: CapacityState,
    /// How far to trust it.
    pub uncertainty: Uncertainty,
    /// Every limited window.
    pub windows: Vec<WindowSnapshot>,
    /// The earliest predicted exhaustion, if any window is limited.
    pub prediction: Option<ExhaustionPrediction>,
}

impl QuotaSnapshot {
    /// The window of `kind`, when it is limited.
    pub fn window(&self, kind: WindowKind) -> Option<&WindowSnapshot> {
        self.windows.iter().find(|w| w.kind == kind)
    }
}

/// A refusal from our own accounting: the key would go over a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaDenial {
    /// The window that is full.
    pub window: WindowKind,
    /// When it resets.
    pub retry_at: Timestamp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Window {
    start: Timestamp,
    used: u64,
    /// Requests counted in this window, for prediction confidence.
    samples: u64,
    /// The previous window of this kind ran out.
    previous_exhausted: bool,
}

const KINDS: [WindowKind; 5] = WindowKind::ALL;

/// The counts of one window as a store keeps them outside [`QuotaWindows`] (e.g. as
/// server-side counters), for rebuilding the windows with [`QuotaWindows::from_counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Used so far in the window containing the instant of interest.
    pub used: u64,
    /// Requests counted in it.
    pub samples: u64,
    /// Whether the window before it ran out.
    pub previous_exhausted: bool,
}

/// Observations older than this no longer lower uncertainty.
const OBSERVATION_FRESH_FOR: Duration = Duration::from_secs(60);

/// Per-key usage windows. Plain data: the store that owns it serializes access.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaWindows {
    windows: [Window; 5],
    observation: Option<(QuotaObservation, Timestamp)>,
}

impl QuotaWindows {
    /// Empty windows.
    pub fn new() -> Self {
        Self::default()
    }

    /// Windows rebuilt from counts kept elsewhere: `counts(kind)` gives the window of
    /// `kind` containing `now`, and `observation` is the last provider observation
    /// with the instant it was made.
    pub fn from_counts(
        now: Timestamp,
        counts: impl Fn(WindowKind) -> WindowCounts,
        observation: Option<(QuotaObservation, Timestamp)>,
    ) -> Self {
        let windows = KINDS.map(|kind| {
            let c = counts(kind);
            Window {
                start: kind.bounds(now).0,
                used: c.used,
                samples: c.samples,
                previous_exhausted: c.previous_exhausted,
            }
        });
        Self {
            windows,
            observation,
        }
    }

    fn roll(&mut self, limits: &QuotaLimits, now: Timestamp) {
        // Every window is rolled together, and minute windows nest in days and months:
        // within the current minute there is nothing to roll (the common case, which
        // spares the calendar arithmetic).
        let minute_start = now.as_millis() - now.as_millis() % 60_000;
        let current = self.windows[0].start.as_millis() == minute_start && minute_start != 0;
        for (w, kind) in self.windows.iter_mut().zip(KINDS).filter(|_| !current) {
            let (start, _) = kind.bounds(now);
            if w.start != start {
                let exhausted = limits.limit(kind).is_some_and(|l| w.used >= l);
                *w = Window {
                    start,
                    used: 0,
                    samples: 0,
                    previous_exhausted: exhausted,
                };
            }
        }
        if let Some((obs, _)) = &mut self.observation {
            if obs.reset_requests_at.is_some_and(|t| t <= now) {
                obs.remaining_requests = obs.limit_requests;
                obs.reset_requests_at = None;
            }
            if obs.reset_tokens_at.is_some_and(|t| t <= now) {
                obs.remaining_tokens = obs.limit_tokens;
                obs.reset_tokens_at = None;
            }
        }
    }

    /// Whether one more request of `tokens` tokens fits every limit.
    ///
    /// # Errors
    /// [`QuotaDenial`] naming the full window and when it resets.
    pub fn check(
        &mut self,
        limits: &QuotaLimits,
        tokens: u64,
        now: Timestamp,
    ) -> Result<(), QuotaDenial> {
        self.roll(limits, now);
        for (w, kind) in self.windows.iter().zip(KINDS) {
            if let Some(limit) = limits.limit(kind) {
                let add = if kind.counts_tokens() { tokens } else { 1 };
                if w.used.saturating_add(add) > limit {
                    return Err(QuotaDenial {
                        window: kind,
                        retry_at: kind.bounds(now).1,
                    });
                }
            }
        }
        if let Some((obs, _)) = &self.observation {
            if obs.remaining_requests == Some(0) {
                if let Some(reset) = obs.reset_requests_at {
                    return Err(QuotaDenial {
                        window: WindowKind::MinuteRequests,
                        retry_at: reset,
                    });
                }
            }
            if tokens > 0 && obs.remaining_tokens == Some(0) {
                if let Some(reset) = obs.reset_tokens_at {
                    return Err(QuotaDenial {
                        window: WindowKind::MinuteTokens,
                        retry_at: reset,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks and, when it fits, counts one request of `tokens` estimated tokens.
    ///
    /// # Errors
    /// [`QuotaDenial`] as for [`Self::check`]; nothing is counted then.
    pub fn charge(
        &mut self,
        limits: &QuotaLimits,
        tokens: u64,
        now: Timestamp,
    ) -> Result<(), QuotaDenial> {
        self.check(limits, tokens, now)?;
        for (w, kind) in self.windows.iter_mut().zip(KINDS) {
            w.used += if kind.counts_tokens() { tokens } else { 1 };
            w.samples += 1;
        }
        if let Some((obs, _)) = &mut self.observation {
            obs.remaining_requests = obs.remaining_requests.map(|r| r.saturating_sub(1));
            obs.remaining_tokens = obs.remaining_tokens.map(|r| r.saturating_sub(tokens));
        }
        Ok(())
    }

    /// Replaces an estimated token count with the actual one in the current windows.
    pub fn reconcile_tokens(&mut self, estimated: u64, actual: u64) {
        for (w, kind) in self.windows.iter_mut().zip(KINDS) {
            if kind.counts_tokens() {
                w.used = w.used.saturating_sub(estimated).saturating_add(actual);
            }
        }
    }

    /// Applies what the provider reported; it overrides our view of remaining capacity
    /// until its reset time.
    pub fn observe(&mut self, observation: QuotaObservation, now: Timestamp) {
        self.observation = Some((observation, now));
    }

    /// The quota state at `now`.
    pub fn snapshot(&mut self, limits: &QuotaLimits, now: Timestamp) -> QuotaSnapshot {
        self.roll(limits, now);
        let mut windows = Vec::new();
        let mut tightest: Option<f64> = None;
        let mut recovering = false;
        let mut prediction: Option<ExhaustionPrediction> = None;
        for (w, kind) in self.windows.iter().zip(KINDS) {
            let Some(limit) = limits.limit(kind) else {
                continue;
            };
            let (start, end) = kind.bounds(now);
            let remaining = limit.saturating_sub(w.used);
            windows.push(WindowSnapshot {
                kind,
                limit,
                used: w.used,
                remaining,
                resets_at: end,
            });
            let fraction = if limit == 0 {
                0.0
            } else {
                remaining as f64 / limit as f64
            };
            tightest = Some(tightest.map_or(fraction, |t: f64| t.min(fraction)));
            recovering |= w.previous_exhausted && now.since(start) < Duration::from_secs(60);
            let p = predict(kind, w, remaining, start, end, now);
            if prediction.is_none_or(|best| earlier(&p, &best)) {
                prediction = Some(p);
            }
        }
        let fresh = self
            .observation
            .as_ref()
            .filter(|(_, at)| now.since(*at) <= OBSERVATION_FRESH_FOR);
        if let Some((obs, _)) = fresh {
            for (limit, remaining, reset, kind) in [
                (
                    obs.limit_requests,
                    obs.remaining_requests,
                    obs.reset_requests_at,
                    WindowKind::MinuteRequests,
                ),
                (
                    obs.limit_tokens,
                    obs.remaining_tokens,
                    obs.reset_tokens_at,
                    WindowKind::MinuteTokens,
                ),
            ] {
                if let (Some(limit), Some(remaining)) = (limit, remaining) {
                    let fraction = if limit == 0 {
                        0.0
                    } else {
                        remaining as f64 / limit as f64
                    };
                    tightest = Some(tightest.map_or(fraction, |t: f64| t.min(fraction)));
                    windows.push(WindowSnapshot {
                        kind,
                        limit,
                        used: limit.saturating_sub(remaining),
                        remaining,
                        resets_at: reset.unwrap_or(now),
                    });
                }
            }
        }
        let uncertainty = if fresh.is_some() {
            Uncertainty::Low
        } else if tightest.is_some() {
            Uncertainty::Medium
        } else {
            Uncertainty::High
        };
        let capacity = match tightest {
            Some(f) if f <= 0.0 => CapacityState::Exhausted,
            _ if recovering => CapacityState::Recovering,
            Some(f) if f < 0.2 => CapacityState::Critical,
            Some(f) if f < 0.5 => CapacityState::Constrained,
            _ => CapacityState::Abundant,
        };
        QuotaSnapshot {
            capacity,
            uncertainty,
            windows,
            prediction,
        }
    }
}

fn earlier(a: &ExhaustionPrediction, b: &ExhaustionPrediction) -> bool {
    match (a.exhausts_at, b.exhausts_at) {
        (Some(x), Some(y)) => x < y,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Linear extrapolation of the window's consumption so far.
fn predict(
    kind: WindowKind,
    w: &Window,
    remaining: u64,
    start: Timestamp,
    end: Timestamp,
    now: Timestamp,
) -> ExhaustionPrediction {
    // At least one second observed, so a burst in the first millisecond does not
    // extrapolate to infinity.
    let elapsed = now.since(start).max(Duration::from_secs(1));
    let rate_per_sec = w.used as f64 / elapsed.as_secs_f64();
    let exhausts_at = if remaining == 0 {
        Some(now)
    } else if rate_per_sec > 0.0 {
        let at = now.plus(Duration::from_secs_f64(remaining as f64 / rate_per_sec));
        (at < end).then_some(at)
    } else {
        None
    };
    let share_observed = elapsed.as_secs_f64() / end.since(start).as_secs_f64().max(1.0);
    let sample_factor = w.samples as f64 / (w.samples as f64 + 10.0);
    let confidence = (sample_factor * (0.5 + 0.5 * share_observed.min(1.0))).clamp(0.0, 1.0);
    ExhaustionPrediction {
        window: kind,
        exhausts_at,
        rate_per_minute: rate_per_sec * 60.0,
        confidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_795_775_400_000); // a minute boundary

    fn limits() -> QuotaLimits {
        QuotaLimits {
            rpm: Some(10),
            tpm: Some(1_000),
            ..QuotaLimits::default()
        }
    }

    #[test]
    fn rpm_window_denies_then_rolls_over() {
        let mut q = QuotaWindows::new();
        for _ in 0..10 {
            q.charge(&limits(), 10, T0).unwrap();
        }
        let denial = q.charge(&limits(), 10, T0).unwrap_err();
        assert_eq!(denial.window, WindowKind::MinuteRequests);
        assert_eq!(denial.retry_at, T0.plus(Duration::from_secs(60)));
        q.charge(&limits(), 10, T0.plus(Duration::from_secs(60)))
            .unwrap();
    }

    #[test]
    fn a_snapshot_finds_its_limited_windows_by_kind() {
        let mut q = QuotaWindows::new();
        q.charge(&limits(), 40, T0).unwrap();
        let snapshot = q.snapshot(&limits(), T0);
        let rpm = snapshot.window(WindowKind::MinuteRequests).unwrap();
        assert_eq!((rpm.used, rpm.limit), (1, 10));
        assert_eq!(snapshot.window(WindowKind::MinuteTokens).unwrap().used, 40);
        assert!(
            snapshot.window(WindowKind::DayRequests).is_none(),
            "not limited"
        );
    }

    #[test]
    fn tpm_counts_tokens_and_reconciles() {
        let mut q = QuotaWindows::new();
        q.charge(&limits(), 900, T0).unwrap();
        assert_eq!(
            q.charge(&limits(), 200, T0).unwrap_err().window,
            WindowKind::MinuteTokens
        );
        q.reconcile_tokens(900, 100);
        q.charge(&limits(), 200, T0).unwrap();
    }

    #[test]
    fn capacity_states_follow_remaining_fraction() {
        let mut q = QuotaWindows::new();
        assert_eq!(q.snapshot(&limits(), T0).capacity, CapacityState::Abundant);
        assert_eq!(
            q.snapshot(&QuotaLimits::default(), T0).uncertainty,
            Uncertainty::High
        );
        for _ in 0..6 {
            q.charge(&limits(), 1, T0).unwrap();
        }
        assert_eq!(
            q.snapshot(&limits(), T0).capacity,
            CapacityState::Constrained
        );
        for _ in 0..3 {
            q.charge(&limits(), 1, T0).unwrap();
        }
        let snap = q.snapshot(&limits(), T0);
        assert_eq!(snap.capacity, CapacityState::Critical);
        assert_eq!(snap.uncertainty, Uncertainty::Medium);
        q.charge(&limits(), 1, T0).unwrap();
        assert_eq!(q.snapshot(&limits(), T0).capacity, CapacityState::Exhausted);
        let after = T0.plus(Duration::from_secs(61));
        assert_eq!(
            q.snapshot(&limits(), after).capacity,
            CapacityState::Recovering
        );
    }

    #[test]
    fn provider_observation_overrides_and_lowers_uncertainty() {
        let mut q = QuotaWindows::new();
        let reset = T0.plus(Duration::from_secs(20));
        q.observe(
            QuotaObservation {
                limit_requests: Some(100),
                remaining_requests: Some(0),
                reset_requests_at: Some(reset),
                ..QuotaObservation::default()
            },
            T0,
        );
        let snap = q.snapshot(&QuotaLimits::default(), T0);
        assert_eq!(snap.uncertainty, Uncertainty::Low);
        assert_eq!(snap.capacity, CapacityState::Exhausted);
        let denial = q.check(&QuotaLimits::default(), 1, T0).unwrap_err();
        assert_eq!(denial.retry_at, reset);
        q.check(&QuotaLimits::default(), 1, reset).unwrap();
    }

    #[test]
    fn windows_rebuilt_from_counts_snapshot_like_the_originals() {
        let mut q = QuotaWindows::new();
        for _ in 0..7 {
            q.charge(&limits(), 30, T0).unwrap();
        }
        let now = T0.plus(Duration::from_secs(20));
        let mut rebuilt = QuotaWindows::from_counts(
            now,
            |kind| WindowCounts {
                used: if kind.counts_tokens() { 210 } else { 7 },
                samples: 7,
                previous_exhausted: false,
            },
            None,
        );
        assert_eq!(rebuilt.snapshot(&limits(), now), q.snapshot(&limits(), now));
        assert_eq!(WindowKind::ALL.len(), KINDS.len());
        assert_eq!(limits().limit(WindowKind::MinuteTokens), Some(1_000));
    }

    #[test]
    fn prediction_extrapolates_current_rate() {
        let limits = QuotaLimits {
            rpd: Some(1_000),
            ..QuotaLimits::default()
        };
        let mut q = QuotaWindows::new();
        let day = T0.start_of_day();
        let now = day.plus(Duration::from_secs(3_600));
        for _ in 0..100 {
            q.charge(&limits, 1, now).unwrap();
        }
        // 100 requests in one hour: 900 left run out in nine more hours.
        let p = q.snapshot(&limits, now).prediction.unwrap();
        assert_eq!(p.window, WindowKind::DayRequests);
        assert_eq!(
            p.exhausts_at,
            Some(now.plus(Duration::from_secs(9 * 3_600)))
        );
        // 100 samples (100/110) over 1/24 of the window (0.5 + 0.5/24).
        assert!((p.confidence - 100.0 / 110.0 * (0.5 + 0.5 / 24.0)).abs() < 1e-9);
    }
}
