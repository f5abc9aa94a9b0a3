//! Rate-limit and retry headers: `retry-after`, OpenAI's `x-ratelimit-*` and
//! Anthropic's `anthropic-ratelimit-*`, turned into durations and
//! [`QuotaObservation`]s. Pure functions of the headers and the time passed in.

use std::time::{Duration, SystemTime};

use apikeyrouter_domain::{QuotaObservation, Timestamp};
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName};

use super::timestamp;

/// The wait a response asks for: `retry-after-ms` (milliseconds, OpenAI), else
/// `retry-after` as seconds (fractions allowed) or as an HTTP date (relative to `now`,
/// zero if already past). `None` when absent or unreadable.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, &RETRY_AFTER_MS).and_then(parse_seconds) {
        // `parse_seconds` read the number as seconds: scale back to milliseconds.
        return Some(ms / 1_000);
    }
    let value = header_str(headers, &RETRY_AFTER)?;
    if let Some(wait) = parse_seconds(value) {
        return Some(wait);
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A non-negative decimal number of seconds, e.g. `20` or `1.5`.
fn parse_seconds(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let seconds: f64 = value.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// The names of one provider's six rate-limit headers, parsed once at compile time
/// so that reading them costs a hash look-up, not a name parse each.
struct QuotaHeaders {
    limit_requests: HeaderName,
    remaining_requests: HeaderName,
    reset_requests: HeaderName,
    limit_tokens: HeaderName,
    remaining_tokens: HeaderName,
    reset_tokens: HeaderName,
}

impl QuotaHeaders {
    /// The observation they carry, resets read by `reset`; `None` when none is there.
    fn read(
        &self,
        headers: &HeaderMap,
        reset: impl Fn(&str) -> Option<Timestamp>,
    ) -> Option<QuotaObservation> {
        let reset_at = |name: &HeaderName| header_str(headers, name).and_then(&reset);
        let observation = QuotaObservation {
            limit_requests: header_u64(headers, &self.limit_requests),
            remaining_requests: header_u64(headers, &self.remaining_requests),
            reset_requests_at: reset_at(&self.reset_requests),
            limit_tokens: header_u64(headers, &self.limit_tokens),
            remaining_tokens: header_u64(headers, &self.remaining_tokens),
            reset_tokens_at: reset_at(&self.reset_tokens),
        };
        (observation != QuotaObservation::default()).then_some(observation)
    }
}

const OPENAI: QuotaHeaders = QuotaHeaders {
    limit_requests: HeaderName::from_static("x-ratelimit-limit-requests"),
    remaining_requests: HeaderName::from_static("x-ratelimit-remaining-requests"),
    reset_requests: HeaderName::from_static("x-ratelimit-reset-requests"),
    limit_tokens: HeaderName::from_static("x-ratelimit-limit-tokens"),
    remaining_tokens: HeaderName::from_static("x-ratelimit-remaining-tokens"),
    reset_tokens: HeaderName::from_static("x-ratelimit-reset-tokens"),
};

const ANTHROPIC: QuotaHeaders = QuotaHeaders {
    limit_requests: HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    remaining_requests: HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    reset_requests: HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    limit_tokens: HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    remaining_tokens: HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    reset_tokens: HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
};

/// Anthropic's headers when it counts input tokens apart.
const ANTHROPIC_INPUT: QuotaHeaders = QuotaHeaders {
    limit_tokens: HeaderName::from_static("anthropic-ratelimit-input-tokens-limit"),
    remaining_tokens: HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
    reset_tokens: HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
    limit_requests: HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    remaining_requests: HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    reset_requests: HeaderName::from_static("anthropic-ratelimit-requests-reset"),
};

const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// OpenAI's (and Groq's, Azure's) rate-limit headers: `x-ratelimit-limit-requests`,
/// `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` (a duration such as
/// `6m0s`, made absolute from `now`), and the same for `-tokens`. `None` when none of
/// them is present.
pub fn openai_quota(headers: &HeaderMap, now: SystemTime) -> Option<QuotaObservation> {
    let now = timestamp(now);
    OPENAI.read(headers, |value| {
        parse_go_duration(value).map(|wait| now.plus(wait))
    })
}

/// Anthropic's rate-limit headers: `anthropic-ratelimit-requests-{limit,remaining,reset}`
/// and `anthropic-ratelimit-tokens-*` (or `anthropic-ratelimit-input-tokens-*` when the
/// combined token headers are absent); resets are RFC 3339 times. `now` is unused (the
/// resets are absolute) and taken so the function fits [`super::error_from_response`].
/// `None` when none of them is present.
pub fn anthropic_quota(headers: &HeaderMap, _now: SystemTime) -> Option<QuotaObservation> {
    let combined = headers.contains_key(&ANTHROPIC.limit_tokens)
        || headers.contains_key(&ANTHROPIC.remaining_tokens);
    let names = if combined {
        &ANTHROPIC
    } else {
        &ANTHROPIC_INPUT
    };
    names.read(headers, parse_rfc3339)
}

/// For providers that send no rate-limit headers (Gemini): always `None`.
pub fn no_quota(_headers: &HeaderMap, _now: SystemTime) -> Option<QuotaObservation> {
    None
}

fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// A count; a fractional one is truncated (some compatible servers send `99.0`).
fn header_u64(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let value = header_str(headers, name)?;
    value.parse::<u64>().ok().or_else(|| {
        let float: f64 = value.parse().ok()?;
        // Truncation is the intent; negative and non-finite values are refused.
        (float.is_finite() && float >= 0.0).then_some(float as u64)
    })
}

/// A Go-style duration as OpenAI sends it: `1s`, `6m0s`, `20ms`, `1h2m3.5s`, also
/// `us`/`µs`, `ns` and `d`. A bare number is seconds (as Google's `retryDelay` without
/// unit). `None` when malformed.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Some(seconds) = parse_seconds(text) {
        return Some(seconds);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "d" => 86_400.0,
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(Duration::try_from_secs_f64(number * seconds_per_unit).ok()?)?;
    }
    Some(total)
}

/// An RFC 3339 date-time such as `2024-06-01T12:34:56Z`, `2024-06-01T12:34:56.789Z`
/// or `2024-06-01T14:34:56+02:00`, as milliseconds since the epoch. `None` when
/// malformed or before 1970.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let bytes = text.trim().as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = bytes.get(range)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let separator_ok =
        |index: usize, allowed: &[u8]| bytes.get(index).is_some_and(|byte| allowed.contains(byte));
    if !(separator_ok(4, b"-")
        && separator_ok(7, b"-")
        && separator_ok(10, b"Tt ")
        && separator_ok(13, b":")
        && separator_ok(16, b":"))
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut index = 19;
    let mut millis = 0;
    if bytes.get(index) == Some(&b'.') {
        let start = index + 1;
        let end = bytes[start..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .map_or(bytes.len(), |offset| start + offset);
        if end == start {
            return None;
        }
        // Milliseconds: the first three digits, right-padded.
        let mut scaled = 0;
        for position in 0..3 {
            let digit = bytes
                .get(start + position)
                .filter(|_| start + position < end);
            scaled = scaled * 10 + digit.map_or(0, |d| i64::from(d - b'0'));
        }
        millis = scaled;
        index = end;
    }
    let offset_seconds = match bytes.get(index)? {
        b'Z' | b'z' if index + 1 == bytes.len() => 0,
        sign @ (b'+' | b'-') if index + 6 == bytes.len() && separator_ok(index + 3, b":") => {
            let hours = number(index + 1..index + 3)?;
            let minutes = number(index + 4..index + 6)?;
            let magnitude = hours * 3_600 + minutes * 60;
            if *sign == b'+' { magnitude } else { -magnitude }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_seconds;
    let ms = seconds.checked_mul(1_000)?.checked_add(millis)?;
    u64::try_from(ms).ok().map(Timestamp::from_millis)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}
