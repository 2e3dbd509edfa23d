//! Opaque secrets handed to clients: refresh tokens and API keys.
//! 32 random bytes each (256 bits), so a fast hash (SHA-256) is enough to store them safely.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Prefix of API keys, so they are recognisable in configs and secret scanners.
pub const API_KEY_PREFIX: &str = "ck-";
const REFRESH_PREFIX: &str = "crt-";

fn random_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub fn new_refresh_token() -> String {
    random_secret(REFRESH_PREFIX)
}

pub fn new_api_key() -> String {
    random_secret(API_KEY_PREFIX)
}

/// What the store keeps: hex SHA-256 of the whole token.
pub fn hash_secret(token: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(token.as_bytes());
    // On every `/v1` request (API-key lookup): one allocation, not one per byte.
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_prefixed_and_hash_stably() {
        let a = new_api_key();
        let b = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with("ck-"));
        assert!(new_refresh_token().starts_with("crt-"));
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert_eq!(hash_secret(&a).len(), 64);
        // The SHA-256 of "abc" (FIPS 180-2 test vector): the encoding did not change.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
