//! Virtual keys made at run time: client credentials of the proxy kept in the state
//! store, so every instance sharing it accepts them.
//!
//! A record holds the token only as its SHA-256 digest: whoever reads the store cannot
//! present it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{ModelId, TenantId};
use crate::time::Timestamp;

/// Longest name accepted: names appear in tags, budget ids, logs and metrics labels.
pub const MAX_NAME_LEN: usize = 64;

/// A virtual key as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtualKey {
    /// Unique name, for logs, metrics and its budget (`virtual-key-<name>`).
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
}

/// What is wrong with a virtual key's definition.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum VirtualKeyError {
    /// The name is empty, too long or holds other characters than letters, digits,
    /// `-`, `_` and `.`.
    #[error("name must be 1 to {MAX_NAME_LEN} characters of letters, digits, '-', '_' and '.'")]
    Name,
    /// The digest is not 64 lowercase hex digits.
    #[error("token_sha256 must be 64 lowercase hex digits")]
    Digest,
    /// `rpm` is zero.
    #[error("rpm must be greater than zero")]
    Rpm,
    /// The budget is not a positive amount.
    #[error("budget_usd must be greater than zero")]
    Budget,
}

impl VirtualKey {
    /// Checks the fields a store or a client could get wrong.
    ///
    /// # Errors
    /// The first field found wrong.
    pub fn validate(&self) -> Result<(), VirtualKeyError> {
        let name_ok = (1..=MAX_NAME_LEN).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(VirtualKeyError::Name);
        }
        let digest_ok = self.token_sha256.len() == 64
            && self
                .token_sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !digest_ok {
            return Err(VirtualKeyError::Digest);
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
        }
    }

    #[test]
    fn names_digests_and_limits_are_checked() {
        assert_eq!(key("team-a.prod_1").validate(), Ok(()));
        for bad in ["", "a b", "a,b", "a=b", "é", &"x".repeat(65)] {
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
        for usd in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let k = VirtualKey {
                budget_usd: Some(usd),
                ..key("k")
            };
            assert_eq!(k.validate(), Err(VirtualKeyError::Budget), "{usd}");
        }
    }

    #[test]
    fn round_trips_through_json_without_empty_fields() {
        let k = VirtualKey {
            tenant: Some(TenantId::new("acme")),
            rpm: Some(60),
            ..key("k")
        };
        let json = serde_json::to_value(&k).unwrap();
        assert!(json.get("models").is_none() && json.get("budget_usd").is_none());
        assert_eq!(serde_json::from_value::<VirtualKey>(json).unwrap(), k);
    }
}
