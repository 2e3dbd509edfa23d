//! `/api/v1/threads*`: create, list (order, pagination, search, bookmarks), get (with per-model
//! figures), patch (null clears), delete (with its messages).

use std::collections::HashSet;

use chorus_actors::store::{MessageQuery, MessageRole, Store};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, assert_error, assert_rfc3339, body_json, encode, seed_messages, seed_summary, uuid_of,
};

fn ids(list: &Value) -> Vec<String> {
    list["threads"]
        .as_array()
        .unwrap_or_else(|| panic!("no threads array: {list}"))
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn create_returns_201_with_the_thread() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let response = app
        .post_json(
            "/api/v1/threads",
            Some(session.token()),
            &json!({ "title": "  Trip planning ", "system_prompt": "You plan trips.", "model": "gpt-4o" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = body_json(response).await;
    let thread = &body["thread"];
    uuid_of(&thread["id"]);
    assert_eq!(thread["title"], "Trip planning", "title is trimmed: {body}");
    assert_eq!(thread["system_prompt"], "You plan trips.");
    assert_eq!(thread["model"], "gpt-4o");
    assert_eq!(thread["bookmarked"], false);
    assert_eq!(thread["message_count"], 0);
    assert_rfc3339(&thread["created_at"]);
    assert_rfc3339(&thread["updated_at"]);

    let fetched = app
        .get_thread(session.token(), thread["id"].as_str().unwrap())
        .await;
    for key in [
        "id",
        "title",
        "system_prompt",
        "model",
        "bookmarked",
        "created_at",
        "message_count",
    ] {
        assert_eq!(fetched[key], thread[key], "{key}");
    }
}

#[tokio::test]
async fn create_without_a_body_or_with_blank_fields_gives_an_untitled_thread() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let response = app
        .request(reqwest::Method::POST, "/api/v1/threads")
        .bearer_auth(session.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = body_json(response).await;
    assert!(body["thread"]["title"].is_null(), "{body}");
    assert!(body["thread"]["model"].is_null(), "{body}");

    let thread = app
        .create_thread(
            session.token(),
            &json!({ "title": "   ", "system_prompt": "" }),
        )
        .await;
    assert!(thread["title"].is_null(), "{thread}");
    assert!(thread["system_prompt"].is_null(), "{thread}");
}

#[tokio::test]
async fn list_is_newest_activity_first_and_pages_without_duplicates() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let mut created = Vec::new();
    for i in 0..25 {
        let thread = app
            .create_thread(token, &json!({ "title": format!("thread {i:02}") }))
            .await;
        created.push(thread["id"].as_str().unwrap().to_owned());
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut path = "/api/v1/threads?limit=10".to_owned();
    loop {
        let page = app.get_ok(&path, token).await;
        page_sizes.push(page["threads"].as_array().unwrap().len());
        seen.extend(ids(&page));
        match &page["next_cursor"] {
            Value::Null => break,
            Value::String(cursor) => {
                path = format!("/api/v1/threads?limit=10&cursor={}", encode(cursor));
            }
            other => panic!("next_cursor must be a string or null, got {other}"),
        }
        assert!(page_sizes.len() < 10, "pagination does not end");
    }
    assert_eq!(page_sizes, vec![10, 10, 5]);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 25, "duplicates across pages");
    assert_eq!(seen, newest_first);

    // Default page size is 20.
    let first = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(ids(&first).len(), 20);
    assert!(first["next_cursor"].is_string());

    // Exactly one full page: next_cursor is null, not a cursor to an empty page.
    let all = app.get_ok("/api/v1/threads?limit=25", token).await;
    assert_eq!(ids(&all).len(), 25);
    assert!(all["next_cursor"].is_null(), "{}", all["next_cursor"]);
}

#[tokio::test]
async fn activity_moves_a_thread_to_the_top() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let a = app.create_thread(token, &json!({ "title": "a" })).await;
    let b = app.create_thread(token, &json!({ "title": "b" })).await;
    let c = app.create_thread(token, &json!({ "title": "c" })).await;
    let id = |t: &Value| t["id"].as_str().unwrap().to_owned();

    let list = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(ids(&list), vec![id(&c), id(&b), id(&a)]);

    // A patch is activity.
    let response = app
        .patch_json(
            &format!("/api/v1/threads/{}", id(&a)),
            token,
            &json!({ "title": "a2" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let list = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(ids(&list), vec![id(&a), id(&c), id(&b)]);

    // So is a new message.
    let store = app.store().await;
    seed_messages(
        &store,
        session.user_uuid(),
        uuid_of(&b["id"]),
        &[(MessageRole::User, Some("gpt-4o"), "hello")],
    )
    .await;
    let list = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(ids(&list), vec![id(&b), id(&a), id(&c)]);
}

#[tokio::test]
async fn q_searches_titles_and_summaries_case_insensitively() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let rust = app
        .create_thread(token, &json!({ "title": "Learning Rust lifetimes" }))
        .await;
    let cooking = app
        .create_thread(token, &json!({ "title": "Sourdough schedule" }))
        .await;
    app.create_thread(token, &json!({ "title": "Unrelated" }))
        .await;
    app.create_thread(token, &json!({})).await;

    let found = app.get_ok("/api/v1/threads?q=rust", token).await;
    assert_eq!(ids(&found), vec![rust["id"].as_str().unwrap().to_owned()]);
    let found = app.get_ok("/api/v1/threads?q=LIFETIMES", token).await;
    assert_eq!(ids(&found), vec![rust["id"].as_str().unwrap().to_owned()]);
    let found = app
        .get_ok("/api/v1/threads?q=nothing-matches-this", token)
        .await;
    assert_eq!(ids(&found), Vec::<String>::new());
    assert!(found["next_cursor"].is_null());

    // A word only in a summary finds the thread too.
    let store = app.store().await;
    let user = session.user_uuid();
    let thread = uuid_of(&cooking["id"]);
    let seeded = seed_messages(
        &store,
        user,
        thread,
        &[(MessageRole::Assistant, Some("gpt-4o"), "Feed the starter")],
    )
    .await;
    seed_summary(
        &store,
        user,
        thread,
        "gpt-4o",
        "Discussed rye flour hydration",
        seeded[0],
    )
    .await;
    let found = app
        .get_ok(&format!("/api/v1/threads?q={}", encode("Rye Flour")), token)
        .await;
    assert_eq!(
        ids(&found),
        vec![cooking["id"].as_str().unwrap().to_owned()]
    );
}

#[tokio::test]
async fn bookmarked_filter_lists_only_bookmarked_threads() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let mut bookmarked = Vec::new();
    for i in 0..4 {
        let thread = app
            .create_thread(token, &json!({ "title": format!("t{i}") }))
            .await;
        let id = thread["id"].as_str().unwrap().to_owned();
        if i % 2 == 0 {
            let response = app
                .patch_json(
                    &format!("/api/v1/threads/{id}"),
                    token,
                    &json!({ "bookmarked": true }),
                )
                .await;
            assert_eq!(response.status(), StatusCode::OK);
            bookmarked.push(id);
        }
    }
    bookmarked.reverse();
    let list = app.get_ok("/api/v1/threads?bookmarked=true", token).await;
    assert_eq!(ids(&list), bookmarked);
    assert!(
        list["threads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["bookmarked"] == true)
    );
    let list = app.get_ok("/api/v1/threads?bookmarked=false", token).await;
    assert_eq!(ids(&list).len(), 2);
    assert!(
        list["threads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["bookmarked"] == false)
    );
    let list = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(ids(&list).len(), 4);
}

#[tokio::test]
async fn get_reports_per_model_counts_and_summaries() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let thread = app
        .create_thread(token, &json!({ "title": "compare" }))
        .await;
    let id = thread["id"].as_str().unwrap().to_owned();

    let fresh = app.get_thread(token, &id).await;
    assert_eq!(fresh["message_count"], 0);
    assert_eq!(fresh["models"], json!({}), "{fresh}");

    let store = app.store().await;
    let user = session.user_uuid();
    let seeded = seed_messages(
        &store,
        user,
        uuid_of(&thread["id"]),
        &[
            (MessageRole::System, None, "setup"),
            (MessageRole::User, Some("gpt-4o"), "q1"),
            (MessageRole::Assistant, Some("gpt-4o"), "a1"),
            (MessageRole::User, Some("claude-sonnet-4"), "q1"),
            (MessageRole::Assistant, Some("claude-sonnet-4"), "a1"),
            (MessageRole::Assistant, Some("gpt-4o"), "a2"),
        ],
    )
    .await;
    seed_summary(
        &store,
        user,
        uuid_of(&thread["id"]),
        "gpt-4o",
        "so far: q1",
        seeded[2],
    )
    .await;

    let got = app.get_thread(token, &id).await;
    assert_eq!(got["message_count"], 6, "{got}");
    assert_eq!(
        got["models"],
        json!({
            "claude-sonnet-4": { "message_count": 2, "summary": null },
            "gpt-4o": { "message_count": 3, "summary": "so far: q1" },
        }),
        "{got}"
    );
    // The list shows the count too (without the per-model map).
    let list = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(list["threads"][0]["message_count"], 6);
}

#[tokio::test]
async fn patch_sets_fields_and_null_clears_them() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let thread = app
        .create_thread(
            token,
            &json!({ "title": "old", "system_prompt": "old prompt", "model": "gpt-4o" }),
        )
        .await;
    let path = format!("/api/v1/threads/{}", thread["id"].as_str().unwrap());

    let response = app
        .patch_json(
            &path,
            token,
            &json!({
                "title": "new",
                "system_prompt": "new prompt",
                "model": "anthropic/claude-sonnet-4",
                "bookmarked": true
            }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let patched = body_json(response).await["thread"].clone();
    assert_eq!(patched["title"], "new");
    assert_eq!(patched["system_prompt"], "new prompt");
    assert_eq!(patched["model"], "anthropic/claude-sonnet-4");
    assert_eq!(patched["bookmarked"], true);
    assert_eq!(patched["created_at"], thread["created_at"]);
    let before =
        chrono::DateTime::parse_from_rfc3339(thread["updated_at"].as_str().unwrap()).unwrap();
    let after =
        chrono::DateTime::parse_from_rfc3339(patched["updated_at"].as_str().unwrap()).unwrap();
    assert!(after >= before, "updated_at went backwards");

    let fetched = app.get_ok(&path, token).await["thread"].clone();
    for key in ["title", "system_prompt", "model", "bookmarked"] {
        assert_eq!(fetched[key], patched[key], "{key}");
    }

    // Only `title` is cleared; the rest stays as it was.
    let response = app
        .patch_json(&path, token, &json!({ "title": null }))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let fetched = app.get_ok(&path, token).await["thread"].clone();
    assert!(fetched["title"].is_null(), "{fetched}");
    assert_eq!(fetched["system_prompt"], "new prompt");
    assert_eq!(fetched["model"], "anthropic/claude-sonnet-4");
    assert_eq!(fetched["bookmarked"], true);

    let response = app
        .patch_json(
            &path,
            token,
            &json!({ "system_prompt": null, "model": null, "bookmarked": false }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let fetched = app.get_ok(&path, token).await["thread"].clone();
    assert!(fetched["system_prompt"].is_null(), "{fetched}");
    assert!(fetched["model"].is_null(), "{fetched}");
    assert_eq!(fetched["bookmarked"], false);

    // An empty patch is allowed and changes nothing visible.
    let response = app.patch_json(&path, token, &json!({})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let again = app.get_ok(&path, token).await["thread"].clone();
    for key in [
        "title",
        "system_prompt",
        "model",
        "bookmarked",
        "message_count",
    ] {
        assert_eq!(again[key], fetched[key], "{key}");
    }
}

#[tokio::test]
async fn delete_removes_the_thread_and_its_messages() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    let keep = app.create_thread(token, &json!({ "title": "keep" })).await;
    let gone = app.create_thread(token, &json!({ "title": "gone" })).await;
    let gone_id = gone["id"].as_str().unwrap().to_owned();
    let store = app.store().await;
    let user = session.user_uuid();
    let seeded = seed_messages(
        &store,
        user,
        uuid_of(&gone["id"]),
        &[
            (MessageRole::User, Some("gpt-4o"), "hi"),
            (MessageRole::Assistant, Some("gpt-4o"), "hello"),
        ],
    )
    .await;
    seed_summary(
        &store,
        user,
        uuid_of(&gone["id"]),
        "gpt-4o",
        "greetings",
        seeded[1],
    )
    .await;

    let path = format!("/api/v1/threads/{gone_id}");
    let response = app.delete(&path, token).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.text().await.unwrap().is_empty());

    assert_error(app.get(&path, token).await, 404, "NOT_FOUND").await;
    assert_error(
        app.get(&format!("{path}/messages"), token).await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_error(
        app.patch_json(&path, token, &json!({ "title": "back" }))
            .await,
        404,
        "NOT_FOUND",
    )
    .await;
    assert_error(app.delete(&path, token).await, 404, "NOT_FOUND").await;

    let list = app.get_ok("/api/v1/threads", token).await;
    assert_eq!(ids(&list), vec![keep["id"].as_str().unwrap().to_owned()]);
    let found = app.get_ok("/api/v1/threads?q=greetings", token).await;
    assert_eq!(
        ids(&found),
        Vec::<String>::new(),
        "its summary went with it"
    );

    let left = store
        .list_messages(
            user,
            uuid_of(&gone["id"]),
            &MessageQuery {
                limit: 100,
                ..MessageQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(
        left.items.is_empty(),
        "messages survived the delete: {:?}",
        left.items
    );
    assert!(
        store
            .get_summary(user, uuid_of(&gone["id"]), "gpt-4o")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn malformed_and_unknown_thread_ids_are_404() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    for id in ["not-a-uuid", "123", &uuid::Uuid::now_v7().to_string()] {
        let path = format!("/api/v1/threads/{id}");
        assert_error(app.get(&path, token).await, 404, "NOT_FOUND").await;
        assert_error(
            app.patch_json(&path, token, &json!({ "title": "x" })).await,
            404,
            "NOT_FOUND",
        )
        .await;
        assert_error(app.delete(&path, token).await, 404, "NOT_FOUND").await;
        assert_error(
            app.get(&format!("{path}/messages"), token).await,
            404,
            "NOT_FOUND",
        )
        .await;
    }
}

#[tokio::test]
async fn titles_are_limited_in_characters_not_bytes_and_search_folds_unicode_case() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let token = session.token();
    // 200 two-byte characters: at the limit, so accepted.
    let accented = "é".repeat(200);
    let thread = app
        .create_thread(token, &json!({ "title": accented }))
        .await;
    assert_eq!(thread["title"], accented.as_str());
    let response = app
        .post_json(
            "/api/v1/threads",
            Some(token),
            &json!({ "title": "é".repeat(201) }),
        )
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;

    let uber = app
        .create_thread(token, &json!({ "title": "Über Reisen nach Köln" }))
        .await;
    for q in ["über", "ÜBER", "köln", "reisen nach"] {
        let found = app
            .get_ok(&format!("/api/v1/threads?q={}", encode(q)), token)
            .await;
        assert_eq!(
            ids(&found),
            vec![uber["id"].as_str().unwrap().to_owned()],
            "q={q}"
        );
    }
    // The needle is literal: `%` and `_` are not wildcards.
    let found = app.get_ok("/api/v1/threads?q=%25", token).await;
    assert_eq!(ids(&found), Vec::<String>::new());
    let found = app.get_ok("/api/v1/threads?q=_", token).await;
    assert_eq!(ids(&found), Vec::<String>::new());
}
