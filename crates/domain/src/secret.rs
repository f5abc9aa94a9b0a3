//! Key material behind a redacting type: it cannot be printed, serialized or compared
//! in variable time by accident.

use std::fmt;

use thiserror::Error;

/// Why a key material string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyMaterialError {
    /// The material is empty or only whitespace.
    #[error("key material is empty")]
    Empty,
    /// The material is too short to be a real provider key.
    #[error("key material is too short: {len} characters, at least {min} required")]
    TooShort {
        /// Length received.
        len: usize,
        /// Minimum accepted.
        min: usize,
    },
    /// The material is longer than any provider issues.
    #[error("key material is too long: {len} characters, at most {max} allowed")]
    TooLong {
        /// Length received.
        len: usize,
        /// Maximum accepted.
        max: usize,
    },
    /// The material contains whitespace or control characters (often a copy-paste error).
    #[error("key material contains whitespace or control characters at position {position}")]
    BadCharacter {
        /// Character index of the first offending character.
        position: usize,
    },
}

/// A provider API key's secret value.
///
/// `Debug` and `Display` print only the masked form; there is no `Serialize`. The
/// only way to the raw value is [`KeyMaterial::expose`], which adapters call when
/// building the provider's auth header.
#[derive(Clone)]
pub struct KeyMaterial(std::sync::Arc<str>);

impl KeyMaterial {
    /// Shortest material accepted; real keys are far longer, this catches blanks and typos.
    pub const MIN_LEN: usize = 8;
    /// Longest material accepted.
    pub const MAX_LEN: usize = 512;

    /// Validates and wraps raw material (surrounding whitespace is trimmed).
    ///
    /// # Errors
    /// [`KeyMaterialError`] when the material is empty, too short or long, or holds
    /// whitespace or control characters.
    pub fn parse(raw: &str) -> Result<Self, KeyMaterialError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(KeyMaterialError::Empty);
        }
        let len = trimmed.chars().count();
        if len < Self::MIN_LEN {
            return Err(KeyMaterialError::TooShort {
                len,
                min: Self::MIN_LEN,
            });
        }
        if len > Self::MAX_LEN {
            return Err(KeyMaterialError::TooLong {
                len,
                max: Self::MAX_LEN,
            });
        }
        if let Some(position) = trimmed
            .chars()
            .position(|c| c.is_whitespace() || c.is_control())
        {
            return Err(KeyMaterialError::BadCharacter { position });
        }
        Ok(Self(trimmed.into()))
    }

    /// The raw secret. Call only to hand it to its provider.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A display form that reveals the prefix and the last four characters, e.g.
    /// `sk-...abcd`. The prefix is everything up to and including the first `-` when
    /// that is within the first 8 characters, otherwise the first 3 characters.
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        let prefix_len = chars
            .iter()
            .take(8)
            .position(|&c| c == '-')
            .map_or(3, |dash| dash + 1);
        // Never reveal more than a third of a short key.
        let prefix_len = prefix_len.min(chars.len() / 3);
        let tail_len = 4.min(chars.len() / 3);
        let prefix: String = chars[..prefix_len].iter().collect();
        let tail: String = chars[chars.len() - tail_len..].iter().collect();
        format!("{prefix}...{tail}")
    }

    /// Constant-time equality, for comparing secrets without timing leaks.
    pub fn ct_eq(&self, other: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), other.as_bytes())
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({})", self.masked())
    }
}

impl fmt::Display for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl PartialEq for KeyMaterial {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other.expose())
    }
}

impl Eq for KeyMaterial {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_shows_prefix_and_last_four() {
        let m = KeyMaterial::parse("sk-proj-abcdefghijklmnop1234").unwrap();
        assert_eq!(m.masked(), "sk-...1234");
        let a = KeyMaterial::parse("AIzaSyD0123456789wxyz").unwrap();
        assert_eq!(a.masked(), "AIz...wxyz");
    }

    #[test]
    fn debug_and_display_never_show_material() {
        let m = KeyMaterial::parse("sk-secretsecretsecret9876").unwrap();
        assert!(!format!("{m:?}").contains("secretsecret"));
        assert!(!format!("{m}").contains("secretsecret"));
    }

    #[test]
    fn bad_material_is_refused_precisely() {
        assert_eq!(KeyMaterial::parse("   "), Err(KeyMaterialError::Empty));
        assert_eq!(
            KeyMaterial::parse("sk-1"),
            Err(KeyMaterialError::TooShort { len: 4, min: 8 })
        );
        assert_eq!(
            KeyMaterial::parse("sk-abc def-ghi"),
            Err(KeyMaterialError::BadCharacter { position: 6 })
        );
    }

    #[test]
    fn constant_time_comparison_matches_equality() {
        let m = KeyMaterial::parse("sk-abcdefgh1234").unwrap();
        assert!(m.ct_eq("sk-abcdefgh1234"));
        assert!(!m.ct_eq("sk-abcdefgh1235"));
        assert!(!m.ct_eq("sk-abcdefgh123"));
    }
}
