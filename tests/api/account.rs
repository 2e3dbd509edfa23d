//! `/api/v1/me*`: profile, settings, usage and API keys.

use chorus_actors::store::Store;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, assert_rfc3339, body_json, message_of};

#[tokio::test]
async fn get_me_returns_the_profile() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let body = app.get_ok("/api/v1/me", session.token()).await;
    let user = &body["user"];
    assert_eq!(user["id"], session.user_id.as_str());
    assert_eq!(user["email"], session.email.as_str());
    assert_eq!(user["display_name"], Value::Null);
    assert_eq!(user["tier"], "free");
    assert_eq!(user["role"], "user");
    assert_eq!(user["settings"], json!({}));
    assert_rfc3339(&user["created_at"]);
    assert_eq!(user["created_at"], session.user["created_at"]);
    for secret_field in ["password", "password_hash"] {
        assert!(
            user.get(secret_field).is_none(),
            "{secret_field} leaked: {body}"
        );
    }
}

#[tokio::test]
async fn patch_me_sets_fields_and_null_clears_them() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();

    let response = app
        .patch_json(
            "/api/v1/me",
            token,
            &json!({
                "display_name": "Grace",
                "settings": {
                    "default_model": "gpt-4o",
                    "temperature": 0.7,
                    "system_prompt": "Answer briefly."
                }
            }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body_json(response).await;
    let user = &body["user"];
    assert_eq!(user["display_name"], "Grace");
    assert_eq!(user["settings"]["default_model"], "gpt-4o");
    assert_eq!(user["settings"]["temperature"], 0.7);
    assert_eq!(user["settings"]["system_prompt"], "Answer briefly.");

    // What PATCH answered is what GET sees.
    let me = app.get_ok("/api/v1/me", token).await;
    assert_eq!(me["user"], body["user"]);

    // Absent fields stay; null clears.
    let response = app
        .patch_json(
            "/api/v1/me",
            token,
            &json!({ "display_name": null, "settings": { "temperature": null } }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let me = app.get_ok("/api/v1/me", token).await;
    let user = &me["user"];
    assert!(user["display_name"].is_null(), "{me}");
    assert!(
        user["settings"]
            .get("temperature")
            .is_none_or(Value::is_null),
        "{me}"
    );
    assert_eq!(user["settings"]["default_model"], "gpt-4o");
    assert_eq!(user["settings"]["system_prompt"], "Answer briefly.");

    let response = app
        .patch_json(
            "/api/v1/me",
            token,
            &json!({ "settings": { "default_model": null, "system_prompt": null } }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let me = app.get_ok("/api/v1/me", token).await;
    let settings = &me["user"]["settings"];
    for key in ["default_model", "temperature", "system_prompt"] {
        assert!(
            settings.get(key).is_none_or(Value::is_null),
            "{key} not cleared: {me}"
        );
    }
    // Email and role cannot be patched through settings or otherwise.
    assert_eq!(me["user"]["email"], session.email.as_str());
    assert_eq!(me["user"]["role"], "user");
}

#[tokio::test]
async fn patch_me_rejects_bad_values_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    app.patch_json(
        "/api/v1/me",
        token,
        &json!({ "display_name": "Before", "settings": { "temperature": 1.0 } }),
    )
    .await;
    let before = app.get_ok("/api/v1/me", token).await;

    let cases = [
        (
            json!({ "display_name": "After", "settings": { "temperature": 5 } }),
            "settings.temperature",
        ),
        (
            json!({ "display_name": "After", "settings": { "default_model": "has spaces" } }),
            "settings.default_model",
        ),
        (json!({ "display_name": "x".repeat(101) }), "display_name"),
        (json!({ "display_name": 42 }), "display_name"),
        (
            json!({ "settings": { "temperature": "hot" } }),
            "temperature",
        ),
    ];
    for (body, field) in cases {
        let response = app.patch_json("/api/v1/me", token, &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(
            message_of(&error).contains(field)
                || error["details"]["field"]
                    .as_str()
                    .is_some_and(|f| f.contains(field)),
            "error should name `{field}`: {error}"
        );
    }
    for body in [
        json!({ "role": "admin" }),
        json!({ "settings": { "tier": "pro" } }),
    ] {
        let response = app.patch_json("/api/v1/me", token, &body).await;
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }

    let after = app.get_ok("/api/v1/me", token).await;
    assert_eq!(after, before, "a refused PATCH must change nothing");
}

#[tokio::test]
async fn usage_reports_the_current_period_and_counters() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let body = app.get_ok("/api/v1/me/usage", session.token()).await;
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    assert_eq!(body["period"], period.as_str(), "{body}");
    assert_eq!(body["tier"], "free");
    assert!(body["limits"].is_object(), "{body}");
    assert!(body["used"].is_object(), "{body}");
    assert_eq!(body["cost_usd"].as_f64(), Some(0.0), "{body}");

    // Counters kept by the store show up; cost is reported in dollars, not as a raw counter.
    let store = app.store().await;
    let user = session.user_uuid();
    store.add_usage(user, &period, "messages", 3).await.unwrap();
    store
        .add_usage(user, &period, "cost_micro_usd", 1_500_000)
        .await
        .unwrap();
    store
        .add_usage(user, "2000-01", "messages", 99)
        .await
        .unwrap();
    let body = app.get_ok("/api/v1/me/usage", session.token()).await;
    assert_eq!(body["used"]["messages"], 3, "{body}");
    assert_eq!(body["cost_usd"].as_f64(), Some(1.5), "{body}");
    assert!(body["used"].get("cost_micro_usd").is_none(), "{body}");
}

#[tokio::test]
async fn api_keys_are_shown_once_listed_without_the_secret_and_deletable() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();

    let response = app
        .post_json(
            "/api/v1/me/api-keys",
            Some(token),
            &json!({ "name": "laptop" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created = body_json(response).await;
    let key = created["key"].as_str().expect("key shown on creation");
    assert!(key.starts_with("ck-"), "{key}");
    assert!(key.len() > 20, "{key}");
    assert_eq!(created["name"], "laptop");
    let id = created["id"].as_str().expect("id").to_owned();

    let second = app
        .post_json("/api/v1/me/api-keys", Some(token), &json!({ "name": "ci" }))
        .await;
    assert_eq!(second.status(), StatusCode::CREATED);
    let second = body_json(second).await;
    assert_ne!(second["key"], created["key"]);

    let list = app.get_ok("/api/v1/me/api-keys", token).await;
    let keys = list["api_keys"].as_array().expect("api_keys array");
    assert_eq!(keys.len(), 2, "{list}");
    let listed = keys
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("key listed");
    assert_eq!(listed["name"], "laptop");
    assert_rfc3339(&listed["created_at"]);
    assert!(listed["last_used_at"].is_null(), "{list}");
    assert!(listed.get("key").is_none(), "secret listed: {list}");
    assert!(!list.to_string().contains(key), "secret listed: {list}");
    assert!(
        !list.to_string().contains(&key["ck-".len()..]),
        "secret listed: {list}"
    );

    let response = app
        .delete(&format!("/api/v1/me/api-keys/{id}"), token)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let list = app.get_ok("/api/v1/me/api-keys", token).await;
    let ids: Vec<&Value> = list["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["id"])
        .collect();
    assert_eq!(ids, vec![&second["id"]], "{list}");

    let again = app
        .delete(&format!("/api/v1/me/api-keys/{id}"), token)
        .await;
    assert_error(again, 404, "NOT_FOUND").await;
    let garbage = app.delete("/api/v1/me/api-keys/not-a-uuid", token).await;
    assert_error(garbage, 404, "NOT_FOUND").await;
}

#[tokio::test]
async fn api_key_names_are_validated_and_the_count_is_capped() {
    let app = TestApp::builder()
        .env("CHORUS__LIMITS__API_KEYS_PER_USER", "2")
        .spawn()
        .await;
    let session = app.register_user().await;
    let token = session.token();

    for body in [
        json!({}),
        json!({ "name": "" }),
        json!({ "name": "   " }),
        json!({ "name": 7 }),
        json!({ "name": "x".repeat(101) }),
    ] {
        let response = app
            .post_json("/api/v1/me/api-keys", Some(token), &body)
            .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(message_of(&error).contains("name"), "{body} → {error}");
    }
    let list = app.get_ok("/api/v1/me/api-keys", token).await;
    assert_eq!(
        list["api_keys"],
        json!([]),
        "refused creates stored nothing"
    );

    for name in ["one", "two"] {
        let response = app
            .post_json("/api/v1/me/api-keys", Some(token), &json!({ "name": name }))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let third = app
        .post_json(
            "/api/v1/me/api-keys",
            Some(token),
            &json!({ "name": "three" }),
        )
        .await;
    assert_error(third, 409, "CONFLICT").await;
    let list = app.get_ok("/api/v1/me/api-keys", token).await;
    assert_eq!(list["api_keys"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_api_key_creation_respects_the_cap() {
    let app = TestApp::builder()
        .env("CHORUS__LIMITS__API_KEYS_PER_USER", "2")
        .spawn()
        .await;
    let session = app.register_user().await;
    let token = session.token();
    let bodies: Vec<Value> = (0..6).map(|i| json!({ "name": format!("k{i}") })).collect();
    let responses = futures_util::future::join_all(
        bodies
            .iter()
            .map(|body| app.post_json("/api/v1/me/api-keys", Some(token), body)),
    )
    .await;
    let mut created = 0;
    for response in responses {
        if response.status() == StatusCode::CREATED {
            created += 1;
        } else {
            assert_error(response, 409, "CONFLICT").await;
        }
    }
    assert_eq!(created, 2);
    let list = app.get_ok("/api/v1/me/api-keys", token).await;
    assert_eq!(list["api_keys"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn provider_keys_are_stored_sealed_listed_as_configured_and_deletable() {
    let mut app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token().to_owned();
    let secret_key = format!("sk-test-{}", uuid::Uuid::new_v4().simple());

    let response = app
        .request(reqwest::Method::PUT, "/api/v1/me/provider-keys/openai")
        .bearer_auth(&token)
        .json(&json!({ "api_key": secret_key }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let list = app.get_ok("/api/v1/me/provider-keys", &token).await;
    assert_eq!(list["providers"]["openai"]["configured"], true, "{list}");
    assert!(
        list["providers"]
            .get("anthropic")
            .is_none_or(|p| p["configured"] == false),
        "{list}"
    );
    assert!(
        !list.to_string().contains(&secret_key),
        "key echoed: {list}"
    );

    // Stored encrypted: the plaintext is nowhere in the database.
    let store = app.store().await;
    let stored = store.list_provider_keys(session.user_uuid()).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].provider, "openai");
    let needle = secret_key.as_bytes();
    assert!(
        !stored[0].sealed.windows(needle.len()).any(|w| w == needle),
        "the provider key is stored in plaintext"
    );
    drop(store);

    // It survives a restart and is still readable as configured.
    app.restart().await;
    let list = app.get_ok("/api/v1/me/provider-keys", &token).await;
    assert_eq!(list["providers"]["openai"]["configured"], true, "{list}");

    let response = app.delete("/api/v1/me/provider-keys/openai", &token).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let list = app.get_ok("/api/v1/me/provider-keys", &token).await;
    assert!(
        list["providers"]
            .get("openai")
            .is_none_or(|p| p["configured"] == false),
        "{list}"
    );
    let again = app.delete("/api/v1/me/provider-keys/openai", &token).await;
    assert_error(again, 404, "NOT_FOUND").await;

    let status = app.stop_gracefully().await;
    assert!(status.success());
    for line in app.logs() {
        assert!(!line.contains(&secret_key), "provider key logged: {line}");
    }
}

#[tokio::test]
async fn provider_key_input_is_validated() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let put = |path: &'static str, body: Value| {
        app.request(reqwest::Method::PUT, path)
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    for body in [
        json!({}),
        json!({ "api_key": "" }),
        json!({ "api_key": 42 }),
        json!({ "api_key": "sk-x", "extra": 1 }),
    ] {
        let response = put("/api/v1/me/provider-keys/openai", body.clone())
            .await
            .unwrap();
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }
    let response = put(
        "/api/v1/me/provider-keys/not-a-provider",
        json!({ "api_key": "k" }),
    )
    .await
    .unwrap();
    let status = response.status().as_u16();
    assert!(
        status == 400 || status == 404,
        "unknown provider answered {status}"
    );
    let list = app.get_ok("/api/v1/me/provider-keys", token).await;
    let configured: Vec<&String> = list["providers"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, p)| p["configured"] == true)
        .map(|(name, _)| name)
        .collect();
    assert!(configured.is_empty(), "refused input stored a key: {list}");
    let unauthenticated = app.get_anon("/api/v1/me/provider-keys").await;
    assert_error(unauthenticated, 401, "UNAUTHENTICATED").await;
}
