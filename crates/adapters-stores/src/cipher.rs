//! [`AeadCipher`]: the [`SecretCipher`] port with XChaCha20-Poly1305, and the master
//! keys it seals key material under.
//!
//! Sealed format, version 1 (every field is authenticated, the header as associated
//! data):
//!
//! ```text
//! 0x01 | id length (1 byte) | master key id (ASCII) | nonce (24 bytes) | ciphertext + tag (16 bytes)
//! ```
//!
//! The master key id in the header is what lets the master key rotate: [`AeadCipher`]
//! seals with its current key and opens with whichever known key the header names.
//! Nonces are 192-bit values from the operating system's random source, so random
//! nonces never collide in practice and no counter has to be persisted.
//!
//! Invariant: no error, log line or `Debug` output carries master key bytes or
//! plaintext; errors name at most a master key id or the variable it came from.
//!
//! Depends on the application's cipher port, `chacha20poly1305` and `base64` only;
//! not feature-gated, so every store that persists key material can use it.

use std::fmt;
use std::path::Path;

use apikeyrouter_application::ports::{CipherError, SecretCipher};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use thiserror::Error;

/// Environment variable holding the master key ring (see [`MasterKeys::parse`]).
pub const MASTER_KEY_ENV: &str = "APIKEYROUTER_MASTER_KEY";
/// Environment variable naming a file that holds the master key ring.
pub const MASTER_KEY_FILE_ENV: &str = "APIKEYROUTER_MASTER_KEY_FILE";
/// Id given to a master key written without one.
pub const DEFAULT_KEY_ID: &str = "default";

/// Version byte of the sealed format this build writes.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const MAX_KEY_ID_LEN: usize = 64;

/// Why master keys could not be loaded. Names sources and key ids, never key bytes.
#[derive(Debug, Error)]
pub enum MasterKeyError {
    /// Neither variable is set.
    #[error(
        "no master key: set {MASTER_KEY_ENV} to a base64-encoded 32-byte key \
         (e.g. the output of `openssl rand -base64 32`) or {MASTER_KEY_FILE_ENV} to a file \
         holding one"
    )]
    Missing,
    /// The key file could not be read.
    #[error("cannot read master key file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The ring holds no key.
    #[error("{source_name} holds no master key")]
    Empty {
        /// The variable or file it came from.
        source_name: String,
    },
    /// A key id is empty, too long or uses characters other than `A-Z a-z 0-9 . _ -`.
    #[error(
        "{source_name}: master key id {id:?} is invalid: use 1 to {MAX_KEY_ID_LEN} of A-Z a-z 0-9 . _ -"
    )]
    BadId {
        /// The variable or file.
        source_name: String,
        /// The id (not secret).
        id: String,
    },
    /// A key is neither 32 bytes of base64 nor 64 hex digits.
    #[error("{source_name}: master key {id:?} is not 32 bytes encoded as base64 or 64 hex digits")]
    BadKey {
        /// The variable or file.
        source_name: String,
        /// The key's id.
        id: String,
    },
    /// Two keys share an id.
    #[error("{source_name}: master key id {id:?} appears twice")]
    DuplicateId {
        /// The variable or file.
        source_name: String,
        /// The id.
        id: String,
    },
}

/// One master key with its id.
struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// A ring of master keys: the first is current (seals), every one opens.
///
/// `Debug` prints the key ids only.
pub struct MasterKeys {
    /// Invariant: never empty; ids are unique.
    keys: Vec<MasterKey>,
}

impl MasterKeys {
    /// Parses a key ring: entries separated by commas or newlines, each
    /// `[<id>:]<key>` where `<key>` is 32 bytes as base64 (standard or URL-safe,
    /// padded or not) or as 64 hex digits, and `<id>` defaults to `default`. Blank
    /// lines and lines starting with `#` are skipped. The first entry is the current
    /// key; list older keys after it to keep opening what they sealed.
    ///
    /// `source_name` (a variable or file name) is used in error messages.
    ///
    /// # Errors
    /// [`MasterKeyError`] naming the entry by id, never showing key bytes.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, MasterKeyError> {
        let mut keys: Vec<MasterKey> = Vec::new();
        let entries = text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|entry| !entry.is_empty() && !entry.starts_with('#'));
        for entry in entries {
            let (id, encoded) = match entry.split_once(':') {
                Some((id, encoded)) => (id.trim(), encoded.trim()),
                None => (DEFAULT_KEY_ID, entry),
            };
            if !valid_key_id(id) {
                return Err(MasterKeyError::BadId {
                    source_name: source_name.to_owned(),
                    id: id.chars().take(MAX_KEY_ID_LEN).collect(),
                });
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(MasterKeyError::DuplicateId {
                    source_name: source_name.to_owned(),
                    id: id.to_owned(),
                });
            }
            let bad_key = || MasterKeyError::BadKey {
                source_name: source_name.to_owned(),
                id: id.to_owned(),
            };
            let bytes = decode_key(encoded).ok_or_else(bad_key)?;
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| bad_key())?;
            keys.push(MasterKey {
                id: id.to_owned(),
                cipher,
            });
        }
        if keys.is_empty() {
            return Err(MasterKeyError::Empty {
                source_name: source_name.to_owned(),
            });
        }
        Ok(Self { keys })
    }

    /// Loads the ring from [`MASTER_KEY_ENV`], or else from the file
    /// [`MASTER_KEY_FILE_ENV`] names.
    ///
    /// # Errors
    /// [`MasterKeyError::Missing`] (saying how to set one) when neither is set; the
    /// other variants when the value is malformed or the file unreadable.
    pub fn from_env() -> Result<Self, MasterKeyError> {
        if let Some(value) = std::env::var_os(MASTER_KEY_ENV).filter(|v| !v.is_empty()) {
            let text = value.to_string_lossy();
            return Self::parse(&text, MASTER_KEY_ENV);
        }
        if let Some(path) = std::env::var_os(MASTER_KEY_FILE_ENV).filter(|v| !v.is_empty()) {
            return Self::from_file(Path::new(&path));
        }
        Err(MasterKeyError::Missing)
    }

    /// Loads the ring from a file (format as for [`Self::parse`]).
    ///
    /// # Errors
    /// [`MasterKeyError::File`] when it cannot be read, else as for [`Self::parse`].
    pub fn from_file(path: &Path) -> Result<Self, MasterKeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MasterKeyError::File {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// The current key's id.
    pub fn current_id(&self) -> &str {
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// Every key id, current first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }
}

impl fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKeys")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_key_id(id: &str) -> bool {
    (1..=MAX_KEY_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 32 bytes from base64 (any common alphabet, padded or not) or 64 hex digits.
fn decode_key(encoded: &str) -> Option<Vec<u8>> {
    if encoded.len() == 2 * KEY_LEN && encoded.bytes().all(|b| b.is_ascii_hexdigit()) {
        return decode_hex(encoded);
    }
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|engine| engine.decode(encoded).ok())
        .filter(|bytes| bytes.len() == KEY_LEN)
}

fn decode_hex(encoded: &str) -> Option<Vec<u8>> {
    let digits = encoded.as_bytes();
    digits
        .chunks_exact(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

/// Seals key material with XChaCha20-Poly1305 under the current master key and opens
/// it with any master key of its ring (see the module docs for the format).
///
/// `Debug` prints the master key ids only.
pub struct AeadCipher {
    keys: MasterKeys,
}

impl AeadCipher {
    /// A cipher over `keys`.
    pub fn new(keys: MasterKeys) -> Self {
        Self { keys }
    }

    /// A cipher over the master keys the environment names (see
    /// [`MasterKeys::from_env`]).
    ///
    /// # Errors
    /// As for [`MasterKeys::from_env`].
    pub fn from_env() -> Result<Self, MasterKeyError> {
        MasterKeys::from_env().map(Self::new)
    }

    /// The master keys.
    pub fn keys(&self) -> &MasterKeys {
        &self.keys
    }

    /// The master key id a sealed value names, if it is in a known format. Not
    /// secret: useful to say which key an unopenable value needs.
    pub fn key_id_of(sealed: &[u8]) -> Option<&str> {
        parse_sealed(sealed).map(|parts| parts.key_id)
    }
}

impl fmt::Debug for AeadCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AeadCipher")
            .field("current", &self.keys.current_id())
            .field("keys", &self.keys)
            .finish()
    }
}

/// The fields of a sealed value.
struct Sealed<'a> {
    /// Version byte, id length and id: the associated data.
    header: &'a [u8],
    key_id: &'a str,
    nonce: &'a [u8],
    body: &'a [u8],
}

fn parse_sealed(sealed: &[u8]) -> Option<Sealed<'_>> {
    let (&version, rest) = sealed.split_first()?;
    if version != FORMAT_V1 {
        return None;
    }
    let (&id_len, rest) = rest.split_first()?;
    let id_len = usize::from(id_len);
    if rest.len() < id_len + NONCE_LEN + TAG_LEN {
        return None;
    }
    let (id, rest) = rest.split_at(id_len);
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let key_id = std::str::from_utf8(id).ok()?;
    Some(Sealed {
        header: sealed.get(..2 + id_len)?,
        key_id,
        nonce,
        body,
    })
}

impl SecretCipher for AeadCipher {
    fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CipherError> {
        let key = self
            .keys
            .keys
            .first()
            .ok_or_else(|| CipherError::Internal("no master key".to_owned()))?;
        let id_len = u8::try_from(key.id.len())
            .map_err(|_| CipherError::Internal("master key id too long".to_owned()))?;
        let nonce = XNonce::try_generate()
            .map_err(|_| CipherError::Internal("the OS random source failed".to_owned()))?;
        let mut sealed =
            Vec::with_capacity(2 + key.id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        sealed.push(FORMAT_V1);
        sealed.push(id_len);
        sealed.extend_from_slice(key.id.as_bytes());
        let body = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &sealed,
                },
            )
            .map_err(|_| CipherError::Internal("encryption failed".to_owned()))?;
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    fn open(&self, ciphertext: &[u8]) -> Result<Vec<u8>, CipherError> {
        let parts = parse_sealed(ciphertext).ok_or(CipherError::Open)?;
        let key = self
            .keys
            .keys
            .iter()
            .find(|k| k.id == parts.key_id)
            .ok_or(CipherError::Open)?;
        let nonce = XNonce::try_from(parts.nonce).map_err(|_| CipherError::Open)?;
        key.cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: parts.body,
                    aad: parts.header,
                },
            )
            .map_err(|_| CipherError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B_HEX: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    fn cipher(ring: &str) -> AeadCipher {
        AeadCipher::new(MasterKeys::parse(ring, "test").unwrap())
    }

    #[test]
    fn sealed_material_round_trips_and_hides_the_plaintext() {
        let c = cipher(KEY_A);
        let sealed = c.seal(b"sk-live-0123456789abcdef").unwrap();
        assert!(
            !sealed
                .windows(b"0123456789".len())
                .any(|w| w == b"0123456789")
        );
        assert_eq!(AeadCipher::key_id_of(&sealed), Some(DEFAULT_KEY_ID));
        assert_eq!(c.open(&sealed).unwrap(), b"sk-live-0123456789abcdef");
        // A fresh nonce each time: the same plaintext never seals the same way twice.
        assert_ne!(c.seal(b"same").unwrap(), c.seal(b"same").unwrap());
    }

    #[test]
    fn any_altered_byte_is_detected() {
        let c = cipher(KEY_A);
        let sealed = c.seal(b"sk-live-0123456789abcdef").unwrap();
        for idx in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[idx] ^= 0x01;
            assert!(
                matches!(c.open(&tampered), Err(CipherError::Open)),
                "byte {idx} altered undetected"
            );
        }
        assert!(matches!(
            c.open(&sealed[..sealed.len() - 1]),
            Err(CipherError::Open)
        ));
        assert!(matches!(c.open(&[]), Err(CipherError::Open)));
    }

    #[test]
    fn a_different_master_key_cannot_open() {
        let sealed = cipher(KEY_A).seal(b"sk-live-0123456789abcdef").unwrap();
        let other = cipher(KEY_B_HEX);
        let err = other.open(&sealed).unwrap_err();
        assert!(matches!(err, CipherError::Open));
        assert_eq!(
            err.to_string(),
            "ciphertext cannot be opened: wrong master key or corrupted data"
        );
    }

    #[test]
    fn rotation_keeps_old_ciphertext_readable_and_seals_with_the_new_key() {
        let old = cipher(&format!("v1:{KEY_A}"));
        let sealed_old = old.seal(b"sk-old-material-1234").unwrap();

        let rotated = cipher(&format!("v2:{KEY_B_HEX}\nv1:{KEY_A}"));
        assert_eq!(rotated.open(&sealed_old).unwrap(), b"sk-old-material-1234");
        let sealed_new = rotated.seal(b"sk-new-material-5678").unwrap();
        assert_eq!(AeadCipher::key_id_of(&sealed_new), Some("v2"));
        assert!(matches!(old.open(&sealed_new), Err(CipherError::Open)));
        assert_eq!(rotated.open(&sealed_new).unwrap(), b"sk-new-material-5678");
    }

    #[test]
    fn malformed_rings_are_refused_without_showing_key_bytes() {
        let err = MasterKeys::parse("k1:c2hvcnQ=", "APIKEYROUTER_MASTER_KEY").unwrap_err();
        assert_eq!(
            err.to_string(),
            "APIKEYROUTER_MASTER_KEY: master key \"k1\" is not 32 bytes encoded as base64 or 64 hex digits"
        );
        assert!(!err.to_string().contains("c2hvcnQ"));
        let err = MasterKeys::parse(&format!("a b:{KEY_A}"), "f").unwrap_err();
        assert!(matches!(err, MasterKeyError::BadId { .. }));
        let err = MasterKeys::parse(&format!("{KEY_A},{KEY_B_HEX}"), "f").unwrap_err();
        assert!(matches!(err, MasterKeyError::DuplicateId { .. }));
        let err = MasterKeys::parse("# only a comment\n", "f").unwrap_err();
        assert!(matches!(err, MasterKeyError::Empty { .. }));
        assert!(MasterKeyError::Missing.to_string().contains(MASTER_KEY_ENV));
    }

    #[test]
    fn debug_shows_key_ids_only() {
        let c = cipher(&format!("current:{KEY_A}, old:{KEY_B_HEX}"));
        let shown = format!("{c:?}");
        assert_eq!(
            shown,
            r#"AeadCipher { current: "current", keys: MasterKeys { ids: ["current", "old"] } }"#
        );
    }
}
