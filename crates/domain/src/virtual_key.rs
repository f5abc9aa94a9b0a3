//! Virtual keys made at run time: client credentials of the proxy kept in the state
//! store, so every instance sharing it accepts them.
//!
//! A record holds the token only as its SHA-256 digest: whoever reads the store cannot
//! present it. Revoking a key keeps its record, marked with the time: the trail says
//! which credentials existed, and a name is never given to a second key (its budget
//! and tag stay its own).

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{ModelId, TenantId};
use crate::time::Timestamp;

/// Longest name accepted: names appear in tags, budget ids and logs.
pub const MAX_NAME_LEN: usize = 64;

/// A virtual key as stored.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtualKey {
    /// Unique name, for logs and its budget (`virtual-key-<name>`).
    pub name: String,
    /// SHA-256 of the token, 64 lowercase hex digits.
    pub token_sha256: String,
    /// Tenant whose keys serve it; `None` for the untenanted keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Models it may use; `None` for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelId>>,
    /// Requests per minute it may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Its monthly hard budget in dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it was revoked; a revoked key authenticates no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
}

impl fmt::Debug for VirtualKey {
    /// Without the digest: it identifies the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualKey")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("models", &self.models)
            .field("rpm", &self.rpm)
            .field("budget_usd", &self.budget_usd)
            .field("created_at", &self.created_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a virtual key's definition.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum VirtualKeyError {
    /// The name is not 1 to [`MAX_NAME_LEN`] letters, digits, `-`, `_` and `.`
    /// starting with a letter or digit.
    #[error(
        "name must be 1 to {MAX_NAME_LEN} characters of letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    Name,
    /// The digest is not 64 lowercase hex digits.
    #[error("token_sha256 must be 64 lowercase hex digits")]
    Digest,
    /// The tenant is empty.
    #[error("tenant must not be empty")]
    Tenant,
    /// The model list is empty (the key could use nothing).
    #[error("models must name at least one model")]
    Models,
    /// `rpm` is zero.
    #[error("rpm must be greater than zero")]
    Rpm,
    /// The budget is not a positive amount.
    #[error("budget_usd must be greater than zero")]
    Budget,
}

/// Checks a virtual key's name, from the config file or the API: it becomes a tag
/// value, a budget id and a path segment, so it is one plain word (no `.`/`..`
/// segments, no separators of tags).
///
/// # Errors
/// [`VirtualKeyError::Name`].
pub fn validate_name(name: &str) -> Result<(), VirtualKeyError> {
    let mut bytes = name.bytes();
    let ok = name.len() <= MAX_NAME_LEN
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(()).ok_or(VirtualKeyError::Name)
}

/// The 32 bytes of a SHA-256 digest written as 64 lowercase hex digits; `None` for
/// anything else.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = value(pair[0])? << 4 | value(pair[1])?;
    }
    Some(out)
}

impl VirtualKey {
    /// Checks the fields a store or a client could get wrong.
    ///
    /// # Errors
    /// The first field found wrong.
    pub fn validate(&self) -> Result<(), VirtualKeyError> {
        validate_name(&self.name)?;
        if parse_sha256_hex(&self.token_sha256).is_none() {
            return Err(VirtualKeyError::Digest);
        }
        if self.tenant.as_ref().is_some_and(|t| t.as_str().is_empty()) {
            return Err(VirtualKeyError::Tenant);
        }
        if self.models.as_ref().is_some_and(Vec::is_empty) {
            return Err(VirtualKeyError::Models);
        }
        if self.rpm == Some(0) {
            return Err(VirtualKeyError::Rpm);
        }
        if self
            .budget_usd
            .is_some_and(|usd| !(usd.is_finite() && usd > 0.0))
        {
            return Err(VirtualKeyError::Budget);
        }
        Ok(())
    }

    /// Whether it still authenticates.
    pub const fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> VirtualKey {
        VirtualKey {
            name: name.to_owned(),
            token_sha256: "ab".repeat(32),
            tenant: None,
            models: None,
            rpm: None,
            budget_usd: None,
            created_at: Timestamp::from_millis(0),
            revoked_at: None,
        }
    }

    #[test]
    fn names_digests_and_limits_are_checked() {
        assert_eq!(key("team-a.prod_1").validate(), Ok(()));
        for bad in [
            "",
            "a b",
            "a,b",
            "a=b",
            "é",
            ".",
            "..",
            ".x",
            "-x",
            "a{b}",
            &"x".repeat(65),
        ] {
            assert_eq!(key(bad).validate(), Err(VirtualKeyError::Name), "{bad:?}");
        }
        assert_eq!(key(&"x".repeat(64)).validate(), Ok(()));
        for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            let k = VirtualKey {
                token_sha256: bad,
                ..key("k")
            };
            assert_eq!(k.validate(), Err(VirtualKeyError::Digest));
        }
        let k = VirtualKey {
            rpm: Some(0),
            ..key("k")
        };
        assert_eq!(k.validate(), Err(VirtualKeyError::Rpm));
        let k = VirtualKey {
            tenant: Some(TenantId::new("")),
            ..key("k")
        };
        assert_eq!(k.validate(), Err(VirtualKeyError::Tenant));
        let k = VirtualKey {
            models: Some(Vec::new()),
            ..key("k")
        };
        assert_eq!(k.validate(), Err(VirtualKeyError::Models));
        for usd in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let k = VirtualKey {
                budget_usd: Some(usd),
                ..key("k")
            };
            assert_eq!(k.validate(), Err(VirtualKeyError::Budget), "{usd}");
        }
    }

    #[test]
    fn digests_parse_only_as_64_lowercase_hex_digits() {
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let bytes = parse_sha256_hex(hex).unwrap();
        assert_eq!((bytes[0], bytes[31]), (0xba, 0xad));
        for bad in [
            &hex[..62],
            &format!("{hex}00"),
            &hex.to_uppercase(),
            &format!("+a{}", &hex[2..]),
            &format!("é{}", &hex[2..]),
        ] {
            assert_eq!(parse_sha256_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn debug_leaves_the_digest_out() {
        let shown = format!("{:?}", key("k"));
        assert!(
            shown.contains("\"k\"") && !shown.contains("abab"),
            "{shown}"
        );
    }

    #[test]
    fn round_trips_through_json_without_empty_fields() {
        let k = VirtualKey {
            tenant: Some(TenantId::new("acme")),
            rpm: Some(60),
            ..key("k")
        };
        let json = serde_json::to_value(&k).unwrap();
        assert!(json.get("models").is_none() && json.get("revoked_at").is_none());
        assert_eq!(serde_json::from_value::<VirtualKey>(json).unwrap(), k);
    }
}
