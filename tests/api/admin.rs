//! `PATCH /api/v1/admin/users/{id}`: admins change a user's tier and role.

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_error, body_json, message_of};

fn user_path(id: &str) -> String {
    format!("/api/v1/admin/users/{id}")
}

#[tokio::test]
async fn an_admin_changes_a_users_tier_and_the_user_sees_it() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin().await;
    let user = app.register_user().await;

    let response = app
        .patch_json(
            &user_path(&user.user_id),
            admin.token(),
            &json!({ "tier": "pro" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    assert_eq!(body["user"]["id"], user.user_id.as_str());
    assert_eq!(body["user"]["tier"], "pro");
    assert_eq!(body["user"]["role"], "user");
    assert_eq!(body["user"]["email"], user.email.as_str());
    assert!(body["user"].get("password_hash").is_none(), "{body}");

    // /me reads the store, so the user sees the new tier with their current token.
    let me = app.get_ok("/api/v1/me", user.token()).await;
    assert_eq!(me["user"]["tier"], "pro");
    assert_eq!(me["user"]["role"], "user");

    // Promotion: the role is in the access token, so it shows in the next one.
    let response = app
        .patch_json(
            &user_path(&user.user_id),
            admin.token(),
            &json!({ "role": "admin", "tier": "enterprise" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let promoted = app.login(&user.email, &user.password).await;
    assert_eq!(promoted.user["role"], "admin");
    assert_eq!(promoted.user["tier"], "enterprise");
    // An empty patch changes nothing and answers the user.
    let response = app
        .patch_json(&user_path(&admin.user_id), promoted.token(), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_json(response).await["user"]["role"], "admin");
}

#[tokio::test]
async fn non_admins_are_forbidden_and_nothing_changes() {
    let app = TestApp::spawn().await;
    let user = app.register_user().await;
    let other = app.register_user().await;

    for target in [&other.user_id, &user.user_id] {
        let response = app
            .patch_json(
                &user_path(target),
                user.token(),
                &json!({ "tier": "pro", "role": "admin" }),
            )
            .await;
        let error = assert_error(response, 403, "FORBIDDEN").await;
        assert!(message_of(&error).contains("admin"), "{error}");
    }
    // Even for an id that does not exist: a non-admin learns nothing about ids.
    let response = app
        .patch_json(
            &user_path(&Uuid::now_v7().to_string()),
            user.token(),
            &json!({ "tier": "pro" }),
        )
        .await;
    assert_error(response, 403, "FORBIDDEN").await;
    // No token at all.
    let response = app
        .request(reqwest::Method::PATCH, &user_path(&other.user_id))
        .json(&json!({ "tier": "pro" }))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "UNAUTHENTICATED").await;

    for session in [&user, &other] {
        let me = app.get_ok("/api/v1/me", session.token()).await;
        assert_eq!(me["user"]["tier"], "free");
        assert_eq!(me["user"]["role"], "user");
    }
}

#[tokio::test]
async fn a_demoted_admin_loses_the_admin_route_at_once() {
    let app = TestApp::spawn().await;
    let first = app.register_admin().await;
    let second = app.register_admin().await;
    let user = app.register_user().await;

    let response = app
        .patch_json(
            &user_path(&second.user_id),
            first.token(),
            &json!({ "role": "user" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // `second` still holds a token saying admin, but the store says otherwise.
    let response = app
        .patch_json(
            &user_path(&user.user_id),
            second.token(),
            &json!({ "tier": "pro" }),
        )
        .await;
    assert_error(response, 403, "FORBIDDEN").await;

    // An admin cannot demote themselves (there might be no admin left).
    let response = app
        .patch_json(
            &user_path(&first.user_id),
            first.token(),
            &json!({ "role": "user" }),
        )
        .await;
    assert_error(response, 409, "CONFLICT").await;
    let me = app.get_ok("/api/v1/me", first.token()).await;
    assert_eq!(me["user"]["role"], "admin");
}

#[tokio::test]
async fn bad_bodies_are_refused_naming_the_problem_and_change_nothing() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin().await;
    let user = app.register_user().await;
    let path = user_path(&user.user_id);

    let response = app
        .patch_json(&path, admin.token(), &json!({ "tier": "platinum" }))
        .await;
    let error = assert_error(response, 400, "VALIDATION_ERROR").await;
    let message = message_of(&error);
    for tier in ["free", "pro", "enterprise"] {
        assert!(message.contains(tier), "valid tiers not named: {error}");
    }
    assert!(message.contains("platinum"), "{error}");
    assert_eq!(error["details"]["field"], "tier");
    assert_eq!(
        error["details"]["valid"],
        json!(["enterprise", "free", "pro"])
    );

    for (body, field) in [
        (json!({ "role": "root" }), "role"),
        (json!({ "role": null }), "role"),
        (json!({ "tier": null }), "tier"),
        (json!({ "tier": 3 }), "tier"),
        (json!({ "tier": "pro", "email": "x@example.com" }), "email"),
    ] {
        let response = app.patch_json(&path, admin.token(), &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(message_of(&error).contains(field), "{body}: {error}");
    }
    let response = app
        .send_raw(
            reqwest::Method::PATCH,
            &path,
            Some(admin.token()),
            Some("application/json"),
            "{\"tier\":",
        )
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;

    let me = app.get_ok("/api/v1/me", user.token()).await;
    assert_eq!(me["user"]["tier"], "free");
    assert_eq!(me["user"]["role"], "user");
}

#[tokio::test]
async fn unknown_users_are_not_found() {
    let app = TestApp::spawn().await;
    let admin = app.register_admin().await;
    for id in [Uuid::now_v7().to_string(), "not-a-uuid".to_owned()] {
        let response = app
            .patch_json(&user_path(&id), admin.token(), &json!({ "tier": "pro" }))
            .await;
        let error = assert_error(response, 404, "NOT_FOUND").await;
        assert!(message_of(&error).contains("user"), "{error}");
    }
}
