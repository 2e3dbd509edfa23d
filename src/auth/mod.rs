//! Authentication primitives: password hashing, access JWTs, opaque refresh tokens and API keys.
//!
//! Access tokens are verified from the signature and claims alone — no store call on the hot
//! path (ARCHITECTURE.md, principle 2). Refresh tokens and API keys are random strings whose
//! SHA-256 is what the store keeps.

pub mod api_keys;
pub mod jwt;
pub mod password;
pub mod sealing;
pub mod tokens;

pub use jwt::{AccessClaims, JwtKeys};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("token expired")]
    Expired,
    #[error("loading signing keys: {0}")]
    Keys(String),
    #[error("password hashing failed: {0}")]
    Hashing(String),
}
