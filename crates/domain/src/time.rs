//! Time as data. The domain never reads a clock: callers pass a [`Timestamp`] in.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

const MS_PER_DAY: u64 = 86_400_000;

impl Timestamp {
    /// The epoch itself.
    pub const EPOCH: Self = Self(0);

    /// A timestamp from milliseconds since the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the far future.
    #[must_use]
    pub fn plus(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// `self - d`, saturating at the epoch.
    #[must_use]
    pub fn minus(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_sub(ms))
    }

    /// Time elapsed from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: Self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Start of the UTC day containing `self`.
    #[must_use]
    pub fn start_of_day(self) -> Self {
        Self(self.0 - self.0 % MS_PER_DAY)
    }

    /// Start of the ISO week (Monday 00:00 UTC) containing `self`.
    #[must_use]
    pub fn start_of_week(self) -> Self {
        let days = self.0 / MS_PER_DAY;
        // 1970-01-01 was a Thursday: Monday-based weekday index is (days + 3) % 7.
        let weekday = (days + 3) % 7;
        Self((days - weekday.min(days)) * MS_PER_DAY)
    }

    /// Start of the calendar month (UTC) containing `self`.
    #[must_use]
    pub fn start_of_month(self) -> Self {
        let days = self.0 / MS_PER_DAY;
        let (y, m, _) = civil_from_days(days);
        Self(days_from_civil(y, m, 1) * MS_PER_DAY)
    }

    /// Start of the calendar month after the one containing `self`.
    #[must_use]
    pub fn start_of_next_month(self) -> Self {
        let days = self.0 / MS_PER_DAY;
        let (y, m, _) = civil_from_days(days);
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Self(days_from_civil(y, m, 1) * MS_PER_DAY)
    }

    /// The (year, month, day) of `self` in UTC.
    pub fn civil_date(self) -> (i64, u32, u32) {
        civil_from_days(self.0 / MS_PER_DAY)
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with milliseconds, e.g. `2026-11-27T10:30:00.000Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil_date();
        let ms_of_day = self.0 % MS_PER_DAY;
        let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
        let (min, rest) = (rest / 60_000, rest % 60_000);
        let (s, ms) = (rest / 1000, rest % 1000);
        f.pad(&format!(
            "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{ms:03}Z"
        ))
    }
}

/// Howard Hinnant's algorithm: days since epoch to proleptic Gregorian date.
fn civil_from_days(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Inverse of [`civil_from_days`]; dates before the epoch clamp to day zero.
fn days_from_civil(y: i64, m: u32, d: u32) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-27T10:30:00Z, a Friday.
    const FRIDAY: Timestamp = Timestamp::from_millis(1_795_775_400_000);

    #[test]
    fn civil_date_round_trips() {
        assert_eq!(FRIDAY.civil_date(), (2026, 11, 27));
        assert_eq!(FRIDAY.start_of_month().civil_date(), (2026, 11, 1));
        assert_eq!(FRIDAY.start_of_next_month().civil_date(), (2026, 12, 1));
        assert_eq!(
            Timestamp::from_millis(1_798_675_200_000)
                .start_of_next_month()
                .civil_date(),
            (2027, 1, 1)
        );
    }

    #[test]
    fn minus_undoes_plus_and_stops_at_the_epoch() {
        let hour = Duration::from_secs(3_600);
        assert_eq!(FRIDAY.plus(hour).minus(hour), FRIDAY);
        assert_eq!(
            FRIDAY.minus(hour).as_millis(),
            FRIDAY.as_millis() - 3_600_000
        );
        assert_eq!(Timestamp::from_millis(5).minus(hour), Timestamp::EPOCH);
    }

    #[test]
    fn displays_as_rfc3339() {
        assert_eq!(
            FRIDAY.plus(Duration::from_millis(1_234)).to_string(),
            "2026-11-27T10:30:01.234Z"
        );
    }

    #[test]
    fn week_starts_on_monday() {
        assert_eq!(FRIDAY.start_of_week().civil_date(), (2026, 11, 23));
        assert_eq!(FRIDAY.start_of_day().civil_date(), (2026, 11, 27));
        assert_eq!(
            FRIDAY.since(FRIDAY.start_of_day()),
            Duration::from_secs(37_800)
        );
    }
}
