//! `/api/v1/auth/*`: register, login, refresh rotation with reuse detection, logout, and what
//! the bearer check refuses (garbage, expired, tampered, foreign, unsigned tokens).

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{
    PASSWORD, TEST_JWT_SECRET, TestApp, access_claims, assert_error, assert_rfc3339, body_json,
    message_of, sign_token, unique_email, unsigned_token,
};

#[tokio::test]
async fn register_returns_201_with_user_and_tokens() {
    let app = TestApp::spawn().await;
    let email = unique_email();
    let response = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": email, "password": PASSWORD, "display_name": "  Ada  " }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = body_json(response).await;

    let user = &body["user"];
    assert!(
        user["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    assert_eq!(user["email"], email.as_str());
    assert_eq!(
        user["display_name"], "Ada",
        "display name is trimmed: {body}"
    );
    assert_eq!(user["tier"], "free");
    assert_eq!(user["role"], "user");
    assert!(user["settings"].is_object(), "{body}");
    assert_rfc3339(&user["created_at"]);
    assert!(user.get("password_hash").is_none(), "hash leaked: {body}");
    assert!(
        !body.to_string().contains(PASSWORD),
        "password echoed back: {body}"
    );

    let access = body["access_token"].as_str().expect("access_token");
    assert_eq!(
        access.split('.').count(),
        3,
        "access token is a JWT: {access}"
    );
    let refresh = body["refresh_token"].as_str().expect("refresh_token");
    assert!(
        refresh.len() >= 32,
        "refresh token looks too short: {refresh}"
    );
    assert_ne!(access, refresh);
    assert_eq!(body["expires_in"], 900, "default access TTL: {body}");

    // The new access token works right away and names the same user.
    let me = app.get_ok("/api/v1/me", access).await;
    assert_eq!(me["user"]["id"], user["id"]);
}

#[tokio::test]
async fn register_normalises_email_and_login_ignores_its_case() {
    let app = TestApp::spawn().await;
    let local = format!("Mixed.{}", uuid::Uuid::new_v4().simple());
    let typed = format!("  {local}@Example.COM ");
    let session = app.register(&typed, PASSWORD).await;
    let normalised = format!("{}@example.com", local.to_lowercase());
    assert_eq!(session.user["email"], normalised.as_str());

    let again = app
        .login(&format!("{}@EXAMPLE.com", local.to_uppercase()), PASSWORD)
        .await;
    assert_eq!(again.user_id, session.user_id);
}

#[tokio::test]
async fn login_returns_the_same_shape_and_a_new_login() {
    let app = TestApp::spawn().await;
    let registered = app.register_user().await;
    let response = app.login_raw(&registered.email, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    assert_eq!(body["user"]["id"], registered.user_id.as_str());
    assert_eq!(body["user"]["email"], registered.email.as_str());
    assert_eq!(body["expires_in"], 900);
    let refresh = body["refresh_token"].as_str().unwrap();
    assert_ne!(
        refresh, registered.refresh_token,
        "each login gets its own refresh token"
    );
    let me = app
        .get_ok("/api/v1/me", body["access_token"].as_str().unwrap())
        .await;
    assert_eq!(me["user"]["id"], registered.user_id.as_str());
}

#[tokio::test]
async fn login_with_bad_credentials_is_401_and_does_not_reveal_which_part_was_wrong() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;

    let wrong_password = app.login_raw(&session.email, "wrong-password-123").await;
    let wrong_password = assert_error(wrong_password, 401, "UNAUTHENTICATED").await;

    let unknown_email = app.login_raw(&unique_email(), PASSWORD).await;
    let unknown_email = assert_error(unknown_email, 401, "UNAUTHENTICATED").await;

    assert_eq!(
        message_of(&wrong_password),
        message_of(&unknown_email),
        "the two failures must be indistinguishable"
    );
}

#[tokio::test]
async fn refresh_rotates_the_pair_and_spends_the_old_refresh_token() {
    let app = TestApp::spawn().await;
    let first = app.register_user().await;

    let second = app.refresh(&first).await;
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_eq!(second.user_id, first.user_id);
    assert_eq!(second.expires_in, 900);
    let me = app.get_ok("/api/v1/me", &second.access_token).await;
    assert_eq!(me["user"]["id"], first.user_id.as_str());

    // The presented token is spent.
    let reused = app.refresh_raw(&first.refresh_token).await;
    assert_error(reused, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn reusing_a_spent_refresh_token_revokes_the_whole_family_only() {
    let app = TestApp::spawn().await;
    let login_a = app.register_user().await;
    // A second, independent login of the same user (another device).
    let login_b = app.login(&login_a.email, PASSWORD).await;

    let a2 = app.refresh(&login_a).await;
    let a3 = app.refresh(&a2).await;

    // An attacker replays the first, spent token: refused …
    let replay = app.refresh_raw(&login_a.refresh_token).await;
    let error = assert_error(replay, 401, "UNAUTHENTICATED").await;
    assert!(!message_of(&error).is_empty());

    // … and the newest token of that family no longer works either.
    let newest = app.refresh_raw(&a3.refresh_token).await;
    assert_error(newest, 401, "UNAUTHENTICATED").await;

    // The other login's family is untouched.
    let b2 = app.refresh(&login_b).await;
    assert_eq!(b2.user_id, login_a.user_id);
}

#[tokio::test]
async fn refresh_with_an_unknown_token_is_401() {
    let app = TestApp::spawn().await;
    let response = app.refresh_raw("crt-this-token-was-never-issued").await;
    assert_error(response, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn logout_is_204_and_its_refresh_token_stops_working() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let response = app
        .post_json(
            "/api/v1/auth/logout",
            None,
            &json!({ "refresh_token": session.refresh_token }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.headers().contains_key("x-request-id"));
    assert!(response.text().await.unwrap().is_empty(), "204 has no body");

    let refreshed = app.refresh_raw(&session.refresh_token).await;
    assert_error(refreshed, 401, "UNAUTHENTICATED").await;

    // Logging in again still works.
    app.login(&session.email, PASSWORD).await;
}

#[tokio::test]
async fn logout_with_an_unknown_token_is_still_204() {
    let app = TestApp::spawn().await;
    let response = app
        .post_json(
            "/api/v1/auth/logout",
            None,
            &json!({ "refresh_token": "crt-unknown" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn missing_or_malformed_authorization_is_401() {
    let app = TestApp::spawn().await;
    app.register_user().await;

    let none = app.get_anon("/api/v1/me").await;
    assert_error(none, 401, "UNAUTHENTICATED").await;

    for header in [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
    ] {
        let response = app
            .request(reqwest::Method::GET, "/api/v1/me")
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        let error = assert_error(response, 401, "UNAUTHENTICATED").await;
        assert!(!message_of(&error).is_empty(), "{header}");
    }

    // Every protected route checks, not only /me.
    for path in ["/api/v1/threads", "/api/v1/me/usage", "/api/v1/me/api-keys"] {
        let response = app.get(path, "garbage").await;
        assert_error(response, 401, "UNAUTHENTICATED").await;
    }
    let create = app
        .post_json("/api/v1/threads", None, &json!({ "title": "x" }))
        .await;
    assert_error(create, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn a_token_forged_with_the_servers_secret_is_accepted() {
    // The positive control for the forged-token tests below: the harness signs exactly like the
    // server, so each refusal there is about the one thing that test changes.
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = sign_token(&access_claims(&session.user_id), TEST_JWT_SECRET);
    let me = app.get_ok("/api/v1/me", &token).await;
    assert_eq!(me["user"]["id"], session.user_id.as_str());
}

#[tokio::test]
async fn expired_access_token_is_401() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let mut claims = access_claims(&session.user_id);
    let now = chrono::Utc::now().timestamp();
    claims["iat"] = json!(now - 7200);
    claims["exp"] = json!(now - 3600);
    let token = sign_token(&claims, TEST_JWT_SECRET);
    let response = app.get("/api/v1/me", &token).await;
    let error = assert_error(response, 401, "UNAUTHENTICATED").await;
    assert!(
        message_of(&error).contains("expired"),
        "the client should learn to refresh: {error}"
    );
}

#[tokio::test]
async fn tokens_with_wrong_issuer_secret_type_or_no_signature_are_401() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;

    let mut wrong_issuer = access_claims(&session.user_id);
    wrong_issuer["iss"] = json!("someone-else");
    let mut wrong_type = access_claims(&session.user_id);
    wrong_type["typ"] = json!("refresh");
    let mut no_subject = access_claims(&session.user_id);
    no_subject.as_object_mut().unwrap().remove("sub");
    let mut admin = access_claims(&session.user_id);
    admin["role"] = json!("admin");

    let cases = [
        ("wrong issuer", sign_token(&wrong_issuer, TEST_JWT_SECRET)),
        (
            "not an access token",
            sign_token(&wrong_type, TEST_JWT_SECRET),
        ),
        ("no subject", sign_token(&no_subject, TEST_JWT_SECRET)),
        (
            "wrong secret",
            sign_token(
                &access_claims(&session.user_id),
                "an-attacker-secret-that-is-32-bytes-long!",
            ),
        ),
        ("alg none", unsigned_token(&admin)),
        ("tampered payload", tamper(&session.access_token, &admin)),
    ];
    for (what, token) in cases {
        let response = app.get("/api/v1/me", &token).await;
        let status = response.status();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_error(response, 401, "UNAUTHENTICATED").await;
    }

    // The genuine token still works.
    app.get_ok("/api/v1/me", &session.access_token).await;
}

/// Replaces the payload of a real token, keeping its header and signature.
fn tamper(token: &str, claims: &serde_json::Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    )
}

#[tokio::test]
async fn concurrent_reuse_of_a_refresh_token_leaves_no_working_token_in_the_family() {
    // Two requests presenting the same refresh token at once: one of them is a reuse, so the
    // family must end up revoked — including the pair the other request was just issued. Raced
    // several times (each on a fresh login) because the interleaving varies; a correct server
    // passes every round.
    let app = TestApp::builder()
        .env("CHORUS__LIMITS__AUTH_PER_IP_PER_MINUTE", "10000")
        .spawn()
        .await;
    let session = app.register_user().await;
    for round in 0..20 {
        let login = app.login(&session.email, PASSWORD).await;
        let (a, b) = tokio::join!(
            app.refresh_raw(&login.refresh_token),
            app.refresh_raw(&login.refresh_token)
        );
        let statuses = [a.status(), b.status()];
        let bodies = [body_json(a).await, body_json(b).await];
        assert!(
            statuses.iter().filter(|s| **s == StatusCode::OK).count() <= 1,
            "round {round}: one refresh token was exchanged twice: {bodies:?}"
        );
        for body in &bodies {
            if let Some(issued) = body["refresh_token"].as_str() {
                let response = app.refresh_raw(issued).await;
                assert_eq!(
                    response.status(),
                    StatusCode::UNAUTHORIZED,
                    "round {round}: a token issued to the family after reuse still works"
                );
            }
        }
    }
}

#[tokio::test]
async fn concurrent_registrations_of_one_email_create_one_account() {
    let app = TestApp::spawn().await;
    let email = unique_email();
    let body = json!({ "email": email, "password": PASSWORD });
    let responses = futures_util::future::join_all(
        (0..5).map(|_| app.post_json("/api/v1/auth/register", None, &body)),
    )
    .await;
    let mut created = 0;
    for response in responses {
        match response.status() {
            StatusCode::CREATED => created += 1,
            _ => {
                assert_error(response, 409, "CONFLICT").await;
            }
        }
    }
    assert_eq!(created, 1);
    app.login(&email, PASSWORD).await;
}

#[tokio::test]
async fn expires_in_follows_the_configured_access_ttl() {
    let app = TestApp::builder()
        .env("CHORUS__AUTH__ACCESS_TOKEN_TTL_SECS", "120")
        .spawn()
        .await;
    let session = app.register_user().await;
    assert_eq!(session.expires_in, 120);
    let claims = decode_claims(&session.access_token);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120
    );
    assert_eq!(claims["sub"], session.user_id.as_str());
    let refreshed = app.refresh(&session).await;
    assert_eq!(refreshed.expires_in, 120);
}

#[tokio::test]
async fn an_expired_refresh_token_is_401() {
    let app = TestApp::builder()
        .env("CHORUS__AUTH__REFRESH_TOKEN_TTL_SECS", "1")
        .spawn()
        .await;
    let session = app.register_user().await;
    // Refresh tokens are opaque; the only way to see one expire is to outlive it.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let response = app.refresh_raw(&session.refresh_token).await;
    assert_error(response, 401, "UNAUTHENTICATED").await;
    // A fresh login still works.
    app.login(&session.email, PASSWORD).await;
}

/// The claims of a JWT, without verifying it.
fn decode_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url payload"))
        .expect("JSON claims")
}
