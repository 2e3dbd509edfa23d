//! No request can read or change another user's data, and probing answers 404 (never 403), so
//! ids cannot be discovered.

use chorus_actors::store::MessageRole;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_error, body_json, encode, seed_messages, uuid_of};

#[tokio::test]
async fn another_users_thread_is_404_on_every_route_and_stays_unchanged() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let bob = app.register_user().await;

    let thread = app
        .create_thread(
            alice.token(),
            &json!({ "title": "alice private plans", "system_prompt": "secret prompt", "model": "gpt-4o" }),
        )
        .await;
    let id = thread["id"].as_str().unwrap().to_owned();
    let store = app.store().await;
    seed_messages(
        &store,
        alice.user_uuid(),
        uuid_of(&thread["id"]),
        &[
            (MessageRole::User, Some("gpt-4o"), "alice question"),
            (MessageRole::Assistant, Some("gpt-4o"), "alice answer"),
        ],
    )
    .await;
    let before = app.get_thread(alice.token(), &id).await;
    let path = format!("/api/v1/threads/{id}");

    let get = app.get(&path, bob.token()).await;
    let not_found = assert_error(get, 404, "NOT_FOUND").await;
    let patch = app
        .patch_json(
            &path,
            bob.token(),
            &json!({ "title": "pwned", "bookmarked": true, "system_prompt": null }),
        )
        .await;
    assert_error(patch, 404, "NOT_FOUND").await;
    let messages = app.get(&format!("{path}/messages"), bob.token()).await;
    assert_error(messages, 404, "NOT_FOUND").await;
    let messages = app
        .get(
            &format!("{path}/messages?model=gpt-4o&order=desc"),
            bob.token(),
        )
        .await;
    assert_error(messages, 404, "NOT_FOUND").await;
    let delete = app.delete(&path, bob.token()).await;
    assert_error(delete, 404, "NOT_FOUND").await;

    // The answer is the same as for an id that does not exist at all.
    let missing = app
        .get(
            &format!("/api/v1/threads/{}", uuid::Uuid::now_v7()),
            bob.token(),
        )
        .await;
    let missing = assert_error(missing, 404, "NOT_FOUND").await;
    assert_eq!(not_found["message"], missing["message"]);

    // Alice's thread is exactly as it was, messages included.
    let after = app.get_thread(alice.token(), &id).await;
    assert_eq!(after, before);
    let page = app.get_ok(&format!("{path}/messages"), alice.token()).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn lists_never_show_another_users_threads() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let bob = app.register_user().await;
    for i in 0..3 {
        let thread = app
            .create_thread(
                alice.token(),
                &json!({ "title": format!("zanzibar trip {i}") }),
            )
            .await;
        app.patch_json(
            &format!("/api/v1/threads/{}", thread["id"].as_str().unwrap()),
            alice.token(),
            &json!({ "bookmarked": true }),
        )
        .await;
    }
    let bobs = app
        .create_thread(bob.token(), &json!({ "title": "bob's own" }))
        .await;

    for query in ["", "?q=zanzibar", "?bookmarked=true", "?limit=100"] {
        let list = app
            .get_ok(&format!("/api/v1/threads{query}"), bob.token())
            .await;
        let threads = list["threads"].as_array().unwrap();
        assert!(
            threads.iter().all(|t| t["id"] == bobs["id"]),
            "bob sees someone else's thread with `{query}`: {list}"
        );
    }
    let list = app
        .get_ok(
            &format!("/api/v1/threads?q={}", encode("zanzibar")),
            alice.token(),
        )
        .await;
    assert_eq!(list["threads"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_cursor_from_another_user_does_not_reveal_their_threads() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let bob = app.register_user().await;
    for i in 0..3 {
        app.create_thread(alice.token(), &json!({ "title": format!("a{i}") }))
            .await;
    }
    let bobs = app
        .create_thread(bob.token(), &json!({ "title": "b" }))
        .await;
    let page = app.get_ok("/api/v1/threads?limit=1", alice.token()).await;
    let cursor = page["next_cursor"]
        .as_str()
        .expect("alice has more")
        .to_owned();
    let response = app
        .get(
            &format!("/api/v1/threads?limit=10&cursor={}", encode(&cursor)),
            bob.token(),
        )
        .await;
    // Either refused or Bob's own page; never Alice's threads.
    if response.status() == StatusCode::OK {
        let list = body_json(response).await;
        assert!(
            list["threads"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["id"] == bobs["id"]),
            "{list}"
        );
    } else {
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }
}

#[tokio::test]
async fn another_users_api_key_cannot_be_seen_or_deleted() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let bob = app.register_user().await;
    let response = app
        .post_json(
            "/api/v1/me/api-keys",
            Some(alice.token()),
            &json!({ "name": "alice-key" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let key = body_json(response).await;
    let id = key["id"].as_str().unwrap();

    let bobs_list = app.get_ok("/api/v1/me/api-keys", bob.token()).await;
    assert_eq!(bobs_list["api_keys"], json!([]));

    let delete = app
        .delete(&format!("/api/v1/me/api-keys/{id}"), bob.token())
        .await;
    assert_error(delete, 404, "NOT_FOUND").await;

    let list = app.get_ok("/api/v1/me/api-keys", alice.token()).await;
    let keys = list["api_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{list}");
    assert_eq!(keys[0]["id"], id);
}

#[tokio::test]
async fn profile_and_usage_are_the_callers_own() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let bob = app.register_user().await;
    app.patch_json(
        "/api/v1/me",
        alice.token(),
        &json!({ "display_name": "Alice" }),
    )
    .await;
    let store = app.store().await;
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    chorus_actors::store::Store::add_usage(&store, alice.user_uuid(), &period, "messages", 7)
        .await
        .unwrap();

    let me = app.get_ok("/api/v1/me", bob.token()).await;
    assert_eq!(me["user"]["id"], bob.user_id.as_str());
    assert!(me["user"]["display_name"].is_null());
    let usage = app.get_ok("/api/v1/me/usage", bob.token()).await;
    assert!(
        usage["used"].get("messages").is_none_or(|v| v == 0),
        "{usage}"
    );

    // Bob's patch changes Bob only.
    app.patch_json("/api/v1/me", bob.token(), &json!({ "display_name": "Bob" }))
        .await;
    let alice_me = app.get_ok("/api/v1/me", alice.token()).await;
    assert_eq!(alice_me["user"]["display_name"], "Alice");
}

#[tokio::test]
async fn another_users_provider_keys_are_invisible_and_untouchable() {
    let app = TestApp::spawn().await;
    let alice = app.register_user().await;
    let bob = app.register_user().await;
    let response = app
        .request(reqwest::Method::PUT, "/api/v1/me/provider-keys/anthropic")
        .bearer_auth(alice.token())
        .json(&json!({ "api_key": "sk-ant-alice" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let bobs = app.get_ok("/api/v1/me/provider-keys", bob.token()).await;
    assert!(
        bobs["providers"]
            .get("anthropic")
            .is_none_or(|p| p["configured"] == false),
        "{bobs}"
    );
    let delete = app
        .delete("/api/v1/me/provider-keys/anthropic", bob.token())
        .await;
    assert_error(delete, 404, "NOT_FOUND").await;

    let alices = app.get_ok("/api/v1/me/provider-keys", alice.token()).await;
    assert_eq!(
        alices["providers"]["anthropic"]["configured"], true,
        "{alices}"
    );
}
