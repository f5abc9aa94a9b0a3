//! The secret-cipher port: seals key material for stores that persist it.

use thiserror::Error;

/// Sealing or opening failed.
#[derive(Debug, Error)]
pub enum CipherError {
    /// The ciphertext was not sealed under any master key we hold, or was altered.
    #[error("ciphertext cannot be opened: wrong master key or corrupted data")]
    Open,
    /// The cipher itself failed.
    #[error("cipher failure: {0}")]
    Internal(String),
}

/// Authenticated encryption of key material at rest (implemented in adapters; the
/// in-memory store keeps material in process and does not need it).
pub trait SecretCipher: Send + Sync + 'static {
    /// Encrypts `plaintext`; the result names the master key used so it can rotate.
    ///
    /// # Errors
    /// [`CipherError::Internal`] when the cipher fails.
    fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CipherError>;

    /// Decrypts what [`Self::seal`] produced.
    ///
    /// # Errors
    /// [`CipherError::Open`] for a wrong master key or altered data.
    fn open(&self, ciphertext: &[u8]) -> Result<Vec<u8>, CipherError>;
}
