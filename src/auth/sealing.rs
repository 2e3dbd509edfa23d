//! Sealing of users' own provider keys (AES-256-GCM).
//!
//! The AES key is SHA-256 of `auth.provider_keys_secret` (or of a dev secret kept in the data
//! dir). Each sealed value is `nonce (12 bytes) || ciphertext+tag`, with the owner's user id and
//! the provider name as associated data: a sealed key copied onto another user's or provider's
//! row fails to open instead of being used.

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AuthError;

const NONCE_LEN: usize = 12;

pub struct ProviderKeyCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for ProviderKeyCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProviderKeyCipher(<redacted>)")
    }
}

/// Turns open users' keys through this (the master key never leaves the edge's cipher).
impl chorus_actors::provider::KeyOpener for ProviderKeyCipher {
    fn open(&self, user_id: Uuid, provider: &str, sealed: &[u8]) -> Option<String> {
        match ProviderKeyCipher::open(self, user_id, provider, sealed) {
            Ok(key) => Some(key),
            Err(e) => {
                // Never the key itself: only that it could not be opened (a rotated secret?).
                tracing::warn!(%user_id, provider, error = %e, "a stored provider key cannot be opened; using shared deployments");
                None
            }
        }
    }
}

impl ProviderKeyCipher {
    pub fn from_secret(secret: &[u8]) -> Result<Self, AuthError> {
        let key = Sha256::digest(secret);
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|_| AuthError::Keys("provider key cipher: bad key length".into()))?;
        Ok(ProviderKeyCipher { cipher })
    }

    pub fn seal(
        &self,
        user_id: Uuid,
        provider: &str,
        plaintext: &str,
    ) -> Result<Vec<u8>, AuthError> {
        let nonce = Nonce::generate();
        let aad = associated_data(user_id, provider);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| AuthError::Keys("sealing provider key failed".into()))?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// Used when a turn calls a provider with the user's own key.
    pub fn open(&self, user_id: Uuid, provider: &str, sealed: &[u8]) -> Result<String, AuthError> {
        if sealed.len() <= NONCE_LEN {
            return Err(AuthError::Keys("sealed provider key is truncated".into()));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce)
            .map_err(|_| AuthError::Keys("sealed provider key has a bad nonce".into()))?;
        let aad = associated_data(user_id, provider);
        let plaintext = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                AuthError::Keys("provider key does not open (wrong secret or row)".into())
            })?;
        String::from_utf8(plaintext)
            .map_err(|_| AuthError::Keys("provider key is not UTF-8".into()))
    }
}

fn associated_data(user_id: Uuid, provider: &str) -> Vec<u8> {
    let mut aad = user_id.as_bytes().to_vec();
    aad.extend_from_slice(provider.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_for_the_same_row_and_secret() {
        let cipher =
            ProviderKeyCipher::from_secret(b"a secret of at least thirty-two bytes").unwrap();
        let user = Uuid::now_v7();
        let sealed = cipher.seal(user, "openai", "sk-live-123").unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"sk-live-123"));
        assert_eq!(cipher.open(user, "openai", &sealed).unwrap(), "sk-live-123");
        // Same plaintext seals differently each time (fresh nonce).
        assert_ne!(sealed, cipher.seal(user, "openai", "sk-live-123").unwrap());
        assert!(cipher.open(Uuid::now_v7(), "openai", &sealed).is_err());
        assert!(cipher.open(user, "anthropic", &sealed).is_err());
        let other = ProviderKeyCipher::from_secret(b"another secret of thirty-two bytes!").unwrap();
        assert!(other.open(user, "openai", &sealed).is_err());
        assert!(cipher.open(user, "openai", &sealed[..5]).is_err());
    }
}
