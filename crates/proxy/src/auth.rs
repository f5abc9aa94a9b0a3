//! Who may call: the admin token for the management API, virtual keys (client tokens
//! mapped to a tenant and its limits) for the OpenAI-compatible API.
//!
//! Virtual keys come from the config file and from the state store (made through the
//! management API). Tokens are kept only as SHA-256 digests and looked up by digest,
//! so the time a look-up takes says nothing about how much of a token matched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use apikeyrouter::config::{Config, ResolvedVirtualKey};
use apikeyrouter::domain::parse_sha256_hex;
use apikeyrouter::domain::secret::constant_time_eq;
use apikeyrouter::{ModelId, TenantId};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::errors::ApiError;

type TokenHash = [u8; 32];

fn digest(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A token's digest as stored: 64 lowercase hex digits.
pub fn digest_hex(token: &str) -> String {
    digest(token)
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            hex.push_str(&format!("{b:02x}"));
            hex
        })
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Access to the management API. `Debug` says which, never the digest: an operator's
/// token may be weak enough to find from its unsalted hash.
#[derive(Clone)]
pub enum AdminAuth {
    /// Requests must carry this token.
    Token(TokenHash),
    /// No token configured: allowed only because the proxy listens on loopback.
    Open,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Token(_) => "Token",
            Self::Open => "Open",
        })
    }
}

impl AdminAuth {
    /// Checks a management request.
    ///
    /// # Errors
    /// 401 in OpenAI's shape when the token is missing or wrong.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self {
            Self::Open => Ok(()),
            Self::Token(expected) => match bearer(headers) {
                Some(token) if constant_time_eq(&digest(token), expected) => Ok(()),
                Some(_) => Err(ApiError::unauthorized("Incorrect admin token.")),
                None => Err(ApiError::unauthorized(
                    "The management API requires `Authorization: Bearer <admin token>`.",
                )),
            },
        }
    }
}

/// A client credential and its limits.
#[derive(Debug)]
pub struct VirtualKey {
    pub name: String,
    pub tenant: Option<TenantId>,
    pub models: Option<Vec<ModelId>>,
    pub rpm: Option<u32>,
    /// Made through the management API (kept in the store), not the config file.
    pub stored: bool,
}

impl VirtualKey {
    fn of(v: &ResolvedVirtualKey) -> Self {
        Self {
            name: v.name.clone(),
            tenant: v.tenant.clone(),
            models: v.models.clone(),
            rpm: v.rpm,
            stored: false,
        }
    }

    fn of_stored(v: &apikeyrouter::VirtualKey) -> Self {
        Self {
            name: v.name.clone(),
            tenant: v.tenant.clone(),
            models: v.models.clone(),
            rpm: v.rpm,
            stored: true,
        }
    }

    /// Whether the key may use `model`.
    pub fn allows(&self, model: &ModelId) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

/// The credentials in force (replaced whole on reload and when the stored virtual
/// keys change).
pub struct Auth {
    pub admin: AdminAuth,
    clients: HashMap<TokenHash, Arc<VirtualKey>>,
    /// Whether the store held virtual keys (revoked ones included) at any read since
    /// start: once client credentials were issued, revoking the last one, or a read
    /// that finds none, must not open the API.
    stored_any: bool,
    /// Digests revoked through this instance: a read of the store that began before
    /// the revocation, or a stale replica, must not bring them back.
    revoked: HashSet<TokenHash>,
}

impl std::fmt::Debug for Auth {
    /// Names only: digests identify tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.clients.values().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        f.debug_struct("Auth")
            .field("admin", &self.admin)
            .field("clients", &names)
            .field("stored_any", &self.stored_any)
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

impl Auth {
    /// Credentials from a configuration. Without an admin token the management API is
    /// open only on a loopback address.
    ///
    /// # Errors
    /// A message when the proxy would listen publicly without an admin token.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let admin = match &config.admin_token {
            Some(token) => AdminAuth::Token(digest(token)),
            None if config.listen.ip().is_loopback() => AdminAuth::Open,
            None => {
                return Err(format!(
                    "listening on {} without an admin token would expose the management API; set [admin] token_env (or APIKEYROUTER_ADMIN_TOKEN)",
                    config.listen
                ));
            }
        };
        let clients = config
            .virtual_keys
            .iter()
            .map(|v| (digest(&v.token), Arc::new(VirtualKey::of(v))))
            .collect();
        Ok(Self {
            admin,
            clients,
            stored_any: false,
            revoked: HashSet::new(),
        })
    }

    /// The client making a request: `None` when no virtual key was ever configured or
    /// made (the API is open), else the matching key.
    ///
    /// # Errors
    /// 401 when virtual keys exist and the token is missing or unknown.
    pub fn client(&self, headers: &HeaderMap) -> Result<Option<Arc<VirtualKey>>, ApiError> {
        if self.clients.is_empty() && !self.stored_any {
            return Ok(None);
        }
        let Some(token) = bearer(headers) else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Use `Authorization: Bearer <virtual key>`.",
            ));
        };
        // A map lookup by digest: timing depends on the digest, never on how much of
        // the token matched.
        self.clients
            .get(&digest(token))
            .cloned()
            .map(Some)
            .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
    }

    /// The virtual keys, in no particular order.
    pub fn clients(&self) -> impl Iterator<Item = &VirtualKey> {
        self.clients.values().map(|v| &**v)
    }

    /// These credentials with `current`'s stored virtual keys: what a reload of the
    /// file keeps.
    pub fn keeping_stored(mut self, current: &Self) -> Self {
        self.revoked.clone_from(&current.revoked);
        let stored = current.clients.iter().filter(|(_, v)| v.stored);
        self.merged(
            stored.map(|(hash, v)| (*hash, v.clone())),
            current.stored_any,
        )
    }

    /// These credentials without the stored key of digest `token_sha256`, which
    /// stays refused whatever a later read of the store says.
    pub fn revoking(&self, token_sha256: &str) -> Self {
        let mut next = self.with_stored_clients(self.clients.iter().filter(|(_, v)| v.stored));
        if let Some(hash) = parse_sha256_hex(token_sha256) {
            next.clients.remove(&hash);
            next.revoked.insert(hash);
        }
        next
    }

    /// These credentials with the active keys of `stored` in place of the stored
    /// virtual keys they hold. A stored key with a malformed digest is left out
    /// (logged), and so is one revoked through this instance.
    pub fn with_stored(&self, stored: &[apikeyrouter::VirtualKey]) -> Self {
        let file = self.with_stored_clients(std::iter::empty());
        let active: Vec<(TokenHash, Arc<VirtualKey>)> = stored
            .iter()
            .filter(|v| v.is_active())
            .filter_map(|v| {
                let hash = parse_sha256_hex(&v.token_sha256);
                if hash.is_none() {
                    tracing::warn!(virtual_key = %v.name, "stored virtual key has a malformed digest; ignored");
                }
                Some((hash?, Arc::new(VirtualKey::of_stored(v))))
            })
            .filter(|(hash, _)| !self.revoked.contains(hash))
            .collect();
        file.merged(active.into_iter(), self.stored_any || !stored.is_empty())
    }

    /// The file's credentials and this instance's memory of the store (whether it
    /// held keys, what was revoked here), with `stored` as the stored keys.
    fn with_stored_clients<'a>(
        &'a self,
        stored: impl Iterator<Item = (&'a TokenHash, &'a Arc<VirtualKey>)>,
    ) -> Self {
        let file = self.clients.iter().filter(|(_, v)| !v.stored);
        Self {
            admin: self.admin.clone(),
            clients: file
                .chain(stored)
                .map(|(hash, v)| (*hash, v.clone()))
                .collect(),
            stored_any: self.stored_any,
            revoked: self.revoked.clone(),
        }
    }

    /// `self` (the file's keys) with `stored` added; the file's key wins a name or
    /// a token.
    fn merged(
        mut self,
        stored: impl Iterator<Item = (TokenHash, Arc<VirtualKey>)>,
        stored_any: bool,
    ) -> Self {
        let file_names = self.file_names();
        for (hash, v) in stored {
            if file_names.contains(&v.name) {
                tracing::warn!(virtual_key = %v.name, "a stored virtual key has the name of one in the config file; the file's is used");
                continue;
            }
            self.clients.entry(hash).or_insert(v);
        }
        self.stored_any = stored_any;
        self
    }

    /// The names of the config file's virtual keys.
    pub fn file_names(&self) -> HashSet<String> {
        self.clients()
            .filter(|v| !v.stored)
            .map(|v| v.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_print_as_lowercase_hex() {
        // SHA-256("abc"), from FIPS 180-2.
        let hex = digest_hex("abc");
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_sha256_hex(&hex), Some(digest("abc")));
    }

    fn stored(name: &str, token: &str) -> apikeyrouter::VirtualKey {
        apikeyrouter::VirtualKey {
            name: name.to_owned(),
            token_sha256: digest_hex(token),
            tenant: Some(TenantId::new("acme")),
            models: None,
            rpm: Some(7),
            budget_usd: None,
            created_at: apikeyrouter::Timestamp::from_millis(0),
            revoked_at: None,
        }
    }

    fn client_of(auth: &Auth, token: &str) -> Option<Arc<VirtualKey>> {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        auth.client(&headers).ok().flatten()
    }

    #[test]
    fn stored_keys_join_the_files_which_win_a_name_and_survive_a_reload() {
        let text = "[[virtual_keys]]\nname = \"shared\"\ntoken = \"file-token-0001\"\n";
        let config = Config::parse(text, "t.toml", &[]).unwrap();
        let mut malformed = stored("broken", "broken-token-01");
        malformed.token_sha256.replace_range(..2, "zz");
        let auth = Auth::from_config(&config).unwrap().with_stored(&[
            stored("made", "made-token-0001"),
            stored("shared", "clash-token-001"),
            malformed,
        ]);
        let made = client_of(&auth, "made-token-0001").unwrap();
        assert_eq!(
            (made.name.as_str(), made.rpm, made.stored),
            ("made", Some(7), true)
        );
        assert!(!client_of(&auth, "file-token-0001").unwrap().stored);
        assert!(client_of(&auth, "clash-token-001").is_none());
        assert!(client_of(&auth, "broken-token-01").is_none());

        // A reload to a file without virtual keys keeps the stored one; a new list
        // of stored keys replaces the old.
        let reloaded = Auth::from_config(&Config::parse("", "t.toml", &[]).unwrap())
            .unwrap()
            .keeping_stored(&auth);
        assert!(client_of(&reloaded, "made-token-0001").is_some());
        assert!(client_of(&reloaded, "file-token-0001").is_none());
        let emptied = auth.with_stored(&[]);
        assert!(client_of(&emptied, "made-token-0001").is_none());
        assert!(client_of(&emptied, "file-token-0001").is_some());
    }

    /// A key revoked through this instance stays refused even when a later read of
    /// the store (begun before the revocation, or from a stale replica) still lists
    /// it as active, and across a reload of the file.
    #[test]
    fn a_key_revoked_here_stays_refused_whatever_a_stale_read_says() {
        let open = Auth::from_config(&Config::parse("", "t.toml", &[]).unwrap()).unwrap();
        let made = stored("made", "made-token-0001");
        let other = stored("other", "other-token-001");
        let auth = open.with_stored(&[made.clone(), other.clone()]);
        let revoked = auth.revoking(&made.token_sha256);
        assert!(client_of(&revoked, "made-token-0001").is_none());
        assert!(client_of(&revoked, "other-token-001").is_some());
        let stale = revoked.with_stored(&[made.clone(), other.clone()]);
        assert!(client_of(&stale, "made-token-0001").is_none());
        assert!(client_of(&stale, "other-token-001").is_some());
        let reloaded = Auth::from_config(&Config::parse("", "t.toml", &[]).unwrap())
            .unwrap()
            .keeping_stored(&stale)
            .with_stored(&[made]);
        assert!(client_of(&reloaded, "made-token-0001").is_none());
        let shown = format!("{reloaded:?}");
        assert!(
            !shown.contains(&digest_hex("made-token-0001")[..8]),
            "{shown}"
        );
    }

    /// Without keys in the file, revoking the last stored key leaves the API closed:
    /// the revoked record still says credentials were issued.
    #[test]
    fn revoking_the_last_stored_key_keeps_the_api_closed() {
        let open = Auth::from_config(&Config::parse("", "t.toml", &[]).unwrap()).unwrap();
        assert!(matches!(open.client(&HeaderMap::new()), Ok(None)));
        let made = open.with_stored(&[stored("made", "made-token-0001")]);
        assert!(client_of(&made, "made-token-0001").is_some());
        let revoked = made.with_stored(&[apikeyrouter::VirtualKey {
            revoked_at: Some(apikeyrouter::Timestamp::from_millis(1)),
            ..stored("made", "made-token-0001")
        }]);
        assert!(client_of(&revoked, "made-token-0001").is_none());
        assert!(revoked.client(&HeaderMap::new()).is_err());
        // A read that finds nothing (a store that lost its data) does not open it.
        assert!(revoked.with_stored(&[]).client(&HeaderMap::new()).is_err());
        // And a reload of the file keeps it so.
        let reloaded = Auth::from_config(&Config::parse("", "t.toml", &[]).unwrap())
            .unwrap()
            .keeping_stored(&revoked);
        assert!(reloaded.client(&HeaderMap::new()).is_err());
    }
}
