//! Access tokens: JWTs signed with HS256 (default) or RS256/EdDSA from PEM files.
//!
//! Every token carries the `kid` of the key that signed it. Verification picks the key by `kid`,
//! so an operator rotates by adding the old public key to `auth.jwt_previous_public_keys` and
//! switching the signing key; tokens signed by either verify until they expire.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chorus_actors::store::{Role, User};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AuthError;
use crate::config::{AuthConfig, JwtAlgorithm};

/// Claims of an access token. `role` and `tier` ride along so the edge can authorise without a
/// store call; a change of either takes effect at the next refresh (at most one access TTL).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    pub sub: Uuid,
    pub role: Role,
    pub tier: String,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
    /// Token type, so a token minted for something else is never accepted as access.
    pub typ: String,
}

const ACCESS_TYP: &str = "access";

pub struct JwtKeys {
    algorithm: Algorithm,
    kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    issuer: String,
    access_ttl: Duration,
}

impl JwtKeys {
    /// Builds the keys from config. `dev_secret` is used for HS256 when no secret is configured.
    pub fn from_config(
        config: &AuthConfig,
        dev_secret: Option<&[u8]>,
    ) -> Result<JwtKeys, AuthError> {
        let (algorithm, encoding, current) = match config.algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = match (&config.secret, dev_secret) {
                    (Some(secret), _) => secret.expose().as_bytes().to_vec(),
                    (None, Some(dev)) => dev.to_vec(),
                    (None, None) => {
                        return Err(AuthError::Keys("no HS256 secret configured".into()));
                    }
                };
                (
                    Algorithm::HS256,
                    EncodingKey::from_secret(&secret),
                    DecodingKey::from_secret(&secret),
                )
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                let private = read_key(config.private_key_file.as_deref())?;
                let public = read_key(config.public_key_file.as_deref())?;
                if config.algorithm == JwtAlgorithm::Rs256 {
                    (
                        Algorithm::RS256,
                        EncodingKey::from_rsa_pem(&private)
                            .map_err(key_error("private RSA key"))?,
                        DecodingKey::from_rsa_pem(&public).map_err(key_error("public RSA key"))?,
                    )
                } else {
                    (
                        Algorithm::EdDSA,
                        EncodingKey::from_ed_pem(&private)
                            .map_err(key_error("private Ed25519 key"))?,
                        DecodingKey::from_ed_pem(&public)
                            .map_err(key_error("public Ed25519 key"))?,
                    )
                }
            }
        };
        let mut decoding = HashMap::new();
        decoding.insert(config.kid.clone(), current);
        for previous in &config.previous_public_keys {
            let pem = read_key(Some(&previous.file))?;
            let key = match algorithm {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                _ => DecodingKey::from_ed_pem(&pem),
            }
            .map_err(key_error("previous public key"))?;
            decoding.insert(previous.kid.clone(), key);
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&config.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 30;
        Ok(JwtKeys {
            algorithm,
            kid: config.kid.clone(),
            encoding,
            decoding,
            validation,
            issuer: config.issuer.clone(),
            access_ttl: config.access_ttl,
        })
    }

    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// Signs an access token for `user`, valid for the configured TTL from `now` (unix seconds).
    pub fn issue_access(&self, user: &User, now: i64) -> Result<String, AuthError> {
        let claims = AccessClaims {
            sub: user.id,
            role: user.role,
            tier: user.tier.clone(),
            iss: self.issuer.clone(),
            iat: now,
            exp: now + self.access_ttl.as_secs() as i64,
            typ: ACCESS_TYP.into(),
        };
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| AuthError::Keys(format!("signing access token: {e}")))
    }

    /// Checks signature, algorithm, issuer, expiry and type. No I/O.
    pub fn verify_access(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::InvalidToken("malformed token"))?;
        let kid = header
            .kid
            .ok_or(AuthError::InvalidToken("token has no key id"))?;
        let key = self
            .decoding
            .get(&kid)
            .ok_or(AuthError::InvalidToken("unknown key id"))?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::InvalidToken("bad signature"),
                ErrorKind::InvalidAlgorithm => AuthError::InvalidToken("wrong algorithm"),
                ErrorKind::InvalidIssuer => AuthError::InvalidToken("wrong issuer"),
                _ => AuthError::InvalidToken("malformed token"),
            },
        )?;
        if data.claims.typ != ACCESS_TYP {
            return Err(AuthError::InvalidToken("not an access token"));
        }
        Ok(data.claims)
    }
}

fn read_key(path: Option<&Path>) -> Result<Vec<u8>, AuthError> {
    let path = path.ok_or_else(|| AuthError::Keys("key file not configured".into()))?;
    std::fs::read(path).map_err(|e| AuthError::Keys(format!("reading {}: {e}", path.display())))
}

fn key_error(what: &'static str) -> impl Fn(jsonwebtoken::errors::Error) -> AuthError {
    move |e| AuthError::Keys(format!("{what}: {e}"))
}

/// Loads `<data_dir>/<name>`, creating it (64 random bytes, hex, mode 0600) on first start.
/// Only for running without a configured secret: the caller logs a warning every start.
pub fn load_or_create_dev_secret(data_dir: &Path, name: &str) -> Result<Vec<u8>, AuthError> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => {
            return Err(AuthError::Keys(format!(
                "{} is shorter than 32 bytes; delete it to regenerate",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuthError::Keys(format!("reading {}: {e}", path.display()))),
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| AuthError::Keys(format!("creating {}: {e}", data_dir.display())))?;
    let bytes: [u8; 64] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private_file(&path, hex.as_bytes())
        .map_err(|e| AuthError::Keys(format!("writing {}: {e}", path.display())))?;
    Ok(hex.into_bytes())
}

fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Secret};
    use chrono::Utc;

    fn config(secret: &str) -> AuthConfig {
        let mut auth = Config::load(None, Vec::new()).unwrap().auth;
        auth.secret = Some(Secret::from_test(secret));
        auth
    }

    fn user() -> User {
        User {
            id: Uuid::now_v7(),
            email: "a@example.com".into(),
            display_name: None,
            password_hash: String::new(),
            tier: "free".into(),
            role: Role::User,
            settings: Default::default(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn issues_and_verifies() {
        let keys = JwtKeys::from_config(&config(SECRET), None).unwrap();
        let user = user();
        let token = keys.issue_access(&user, Utc::now().timestamp()).unwrap();
        let claims = keys.verify_access(&token).unwrap();
        assert_eq!(claims.sub, user.id);
        assert_eq!(claims.role, Role::User);
    }

    #[test]
    fn rejects_expired_tampered_and_foreign_tokens() {
        let keys = JwtKeys::from_config(&config(SECRET), None).unwrap();
        let user = user();
        let old = keys
            .issue_access(&user, Utc::now().timestamp() - 3600)
            .unwrap();
        assert!(matches!(keys.verify_access(&old), Err(AuthError::Expired)));

        let token = keys.issue_access(&user, Utc::now().timestamp()).unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_claims = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"sub":"00000000-0000-0000-0000-000000000000","role":"admin","tier":"free","iss":"chorus","iat":0,"exp":99999999999,"typ":"access"}"#,
        );
        parts[1] = &forged_claims;
        assert!(keys.verify_access(&parts.join(".")).is_err());

        let other =
            JwtKeys::from_config(&config("another-secret-of-at-least-32-bytes!"), None).unwrap();
        assert!(other.verify_access(&token).is_err());
        assert!(keys.verify_access("not.a.jwt").is_err());
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn key_file_config(algorithm: JwtAlgorithm, kid: &str, key: &str) -> AuthConfig {
        let mut auth = Config::load(None, Vec::new()).unwrap().auth;
        auth.algorithm = algorithm;
        auth.secret = None;
        auth.kid = kid.into();
        auth.private_key_file = Some(fixture(&format!("{key}.pem")));
        auth.public_key_file = Some(fixture(&format!("{key}.pub.pem")));
        auth
    }

    #[test]
    fn rs256_and_eddsa_sign_with_key_files_and_name_the_kid() {
        for (algorithm, key, alg) in [
            (JwtAlgorithm::Rs256, "rsa-k1", Algorithm::RS256),
            (JwtAlgorithm::EdDsa, "ed25519-k1", Algorithm::EdDSA),
        ] {
            let keys = JwtKeys::from_config(&key_file_config(algorithm, "k1", key), None).unwrap();
            let user = user();
            let token = keys.issue_access(&user, Utc::now().timestamp()).unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.alg, alg);
            assert_eq!(header.kid.as_deref(), Some("k1"));
            assert_eq!(keys.verify_access(&token).unwrap().sub, user.id);
            // An HS256 token is refused by an asymmetric verifier (no algorithm confusion).
            let hs = JwtKeys::from_config(&config(SECRET), None).unwrap();
            let hs_token = hs.issue_access(&user, Utc::now().timestamp()).unwrap();
            assert!(keys.verify_access(&hs_token).is_err());
        }
    }

    #[test]
    fn rotation_keeps_tokens_of_the_previous_key_valid() {
        let user = user();
        let old = JwtKeys::from_config(
            &key_file_config(JwtAlgorithm::EdDsa, "k0", "ed25519-k0"),
            None,
        )
        .unwrap();
        let old_token = old.issue_access(&user, Utc::now().timestamp()).unwrap();

        let mut rotated = key_file_config(JwtAlgorithm::EdDsa, "k1", "ed25519-k1");
        // Before the old public key is listed, its tokens are refused (unknown kid)...
        let without_old = JwtKeys::from_config(&rotated, None).unwrap();
        assert!(matches!(
            without_old.verify_access(&old_token),
            Err(AuthError::InvalidToken("unknown key id"))
        ));
        // ...and once listed they verify, while new tokens carry the new kid.
        rotated.previous_public_keys = vec![crate::config::PreviousKey {
            kid: "k0".into(),
            file: fixture("ed25519-k0.pub.pem"),
        }];
        let keys = JwtKeys::from_config(&rotated, None).unwrap();
        assert_eq!(keys.verify_access(&old_token).unwrap().sub, user.id);
        let new_token = keys.issue_access(&user, Utc::now().timestamp()).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&new_token)
                .unwrap()
                .kid
                .as_deref(),
            Some("k1")
        );
        assert!(keys.verify_access(&new_token).is_ok());
        // A token whose kid names the old key but is signed by another key fails.
        let forged_header = jsonwebtoken::Header {
            kid: Some("k0".into()),
            ..jsonwebtoken::Header::new(Algorithm::EdDSA)
        };
        let claims = keys.verify_access(&new_token).unwrap();
        let forged = jsonwebtoken::encode(
            &forged_header,
            &claims,
            &EncodingKey::from_ed_pem(&std::fs::read(fixture("ed25519-k1.pem")).unwrap()).unwrap(),
        )
        .unwrap();
        assert!(keys.verify_access(&forged).is_err());
    }

    #[test]
    fn missing_or_bad_key_files_are_errors() {
        let mut config = key_file_config(JwtAlgorithm::Rs256, "k1", "rsa-k1");
        config.private_key_file = Some(fixture("does-not-exist.pem"));
        assert!(JwtKeys::from_config(&config, None).is_err());
        // An Ed25519 key where an RSA key is expected.
        let config = key_file_config(JwtAlgorithm::Rs256, "k1", "ed25519-k1");
        assert!(JwtKeys::from_config(&config, None).is_err());
    }

    #[test]
    fn dev_secret_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_dev_secret(dir.path(), "jwt-secret").unwrap();
        let second = load_or_create_dev_secret(dir.path(), "jwt-secret").unwrap();
        assert_eq!(first, second);
        assert!(first.len() >= 64);
    }
}
