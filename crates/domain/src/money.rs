//! Money in exact integer units, so budgets add up without floating-point drift.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// An amount of US dollars, stored as nano-dollars (1e-9 USD).
///
/// Nano-dollars make the cheapest token prices (fractions of a micro-dollar) exact
/// while still holding about 18 billion dollars in a `u64`.
///
/// Serialized as a number of dollars (e.g. `0.0025`): exact for amounts below about
/// nine million dollars, and readable in audit records and API responses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(u64);

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_usd())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let usd = f64::deserialize(deserializer)?;
        if !usd.is_finite() || usd < 0.0 {
            return Err(serde::de::Error::custom(format!(
                "amount must be a non-negative number of dollars, got {usd}"
            )));
        }
        Ok(Self::from_usd(usd))
    }
}

const NANOS_PER_USD: f64 = 1e9;

impl Money {
    /// Nothing.
    pub const ZERO: Self = Self(0);

    /// An amount from nano-dollars.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// An amount from dollars; negative and non-finite inputs become zero, so callers
    /// validate user-supplied amounts before converting.
    pub fn from_usd(usd: f64) -> Self {
        if usd.is_finite() && usd > 0.0 {
            Self((usd * NANOS_PER_USD).round() as u64)
        } else {
            Self::ZERO
        }
    }

    /// Nano-dollars.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Dollars as a float, for display and reporting.
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD
    }

    /// Dollars with nine decimals (`12.345678901`), exact: written from the integer
    /// nano-dollars, not through a float.
    /// Written digit by digit: two of these go into every routed response's headers,
    /// and `format!` cost about 2% of the proxy's instructions per request.
    pub fn usd_decimal(self) -> String {
        const NANOS: u64 = 1_000_000_000;
        // u64::MAX nano-dollars is 18446744073.709551615: 21 characters.
        let mut digits = [0u8; 21];
        let mut at = digits.len();
        let mut fraction = self.0 % NANOS;
        for _ in 0..9 {
            at -= 1;
            digits[at] = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        at -= 1;
        digits[at] = b'.';
        let mut whole = self.0 / NANOS;
        loop {
            at -= 1;
            digits[at] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        String::from_utf8(digits[at..].to_vec()).unwrap_or_default()
    }

    /// `self - other`, or zero.
    #[must_use]
    pub const fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// `self + other`, saturating.
    #[must_use]
    pub const fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    /// `self + other`, or `None` on overflow.
    pub const fn checked_add(self, other: Self) -> Option<Self> {
        match self.0.checked_add(other.0) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// `self * n`, saturating.
    #[must_use]
    pub const fn times(self, n: u64) -> Self {
        Self(self.0.saturating_mul(n))
    }
}

impl Add for Money {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        self.saturating_add(rhs)
    }
}

impl AddAssign for Money {
    fn add_assign(&mut self, rhs: Self) {
        *self = self.saturating_add(rhs);
    }
}

impl Sum for Money {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, Add::add)
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${:.9}", self.as_usd())
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("${:.6}", self.as_usd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_decimal_is_exact_with_nine_decimals() {
        let text = |nanos| Money::from_nanos(nanos).usd_decimal();
        assert_eq!(text(0), "0.000000000");
        assert_eq!(text(1_500), "0.000001500");
        assert_eq!(text(12_345_678_901), "12.345678901");
        // Beyond f64's exact range for nine decimals.
        assert_eq!(text(9_007_199_254_740_993), "9007199.254740993");
        assert_eq!(text(u64::MAX), "18446744073.709551615");
    }

    proptest::proptest! {
        #[test]
        fn usd_decimal_matches_the_formatted_quotient_and_remainder(nanos: u64) {
            let expected = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
            proptest::prop_assert_eq!(Money::from_nanos(nanos).usd_decimal(), expected);
        }
    }

    #[test]
    fn usd_round_trip_is_exact_for_small_prices() {
        let per_token = Money::from_usd(0.075 / 1e6);
        assert_eq!(per_token.as_nanos(), 75);
        assert_eq!(per_token.times(1_000_000), Money::from_usd(0.075));
    }

    #[test]
    fn serializes_as_dollars_and_round_trips() {
        let m = Money::from_usd(1_234.567_891_234);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "1234.567891234");
        assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        assert!(serde_json::from_str::<Money>("-1").is_err());
    }

    #[test]
    fn invalid_amounts_become_zero() {
        assert_eq!(Money::from_usd(-1.0), Money::ZERO);
        assert_eq!(Money::from_usd(f64::NAN), Money::ZERO);
    }
}
