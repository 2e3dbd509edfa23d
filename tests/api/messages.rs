//! `GET /api/v1/threads/{id}/messages`: order, cursor pagination and the model filter. Sending
//! messages comes later, so these tests seed the thread through the server's own SQLite file.

use chorus_actors::store::MessageRole;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Session, TestApp, assert_error, assert_rfc3339, seed_messages, uuid_of};

fn message_ids(page: &Value) -> Vec<Uuid> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array: {page}"))
        .iter()
        .map(|m| uuid_of(&m["id"]))
        .collect()
}

/// A thread with seven messages over two models (and one without a model); returns its id and
/// the message ids in creation order.
async fn seeded_thread(app: &TestApp, session: &Session) -> (String, Vec<Uuid>) {
    let thread = app
        .create_thread(session.token(), &json!({ "title": "seeded" }))
        .await;
    let store = app.store().await;
    let ids = seed_messages(
        &store,
        session.user_uuid(),
        uuid_of(&thread["id"]),
        &[
            (MessageRole::System, None, "m0 system"),
            (MessageRole::User, Some("gpt-4o"), "m1 question"),
            (MessageRole::Assistant, Some("gpt-4o"), "m2 answer"),
            (MessageRole::User, Some("claude-sonnet-4"), "m3 question"),
            (MessageRole::Assistant, Some("claude-sonnet-4"), "m4 answer"),
            (MessageRole::User, Some("gpt-4o"), "m5 follow-up"),
            (MessageRole::Assistant, Some("gpt-4o"), "m6 answer"),
        ],
    )
    .await;
    (thread["id"].as_str().unwrap().to_owned(), ids)
}

#[tokio::test]
async fn messages_are_listed_oldest_first_with_their_fields() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (thread, ids) = seeded_thread(&app, &session).await;
    let page = app
        .get_ok(
            &format!("/api/v1/threads/{thread}/messages"),
            session.token(),
        )
        .await;
    assert_eq!(message_ids(&page), ids);
    assert!(page["next_cursor"].is_null(), "{page}");

    let first = &page["messages"][1];
    assert_eq!(first["thread_id"], thread.as_str());
    assert_eq!(first["role"], "user");
    assert_eq!(first["model"], "gpt-4o");
    assert_eq!(first["content"], "m1 question");
    assert_eq!(first["status"], "complete");
    assert_eq!(first["usage"]["input_tokens"], 3);
    assert_eq!(first["usage"]["output_tokens"], 0);
    assert!(first["cost_usd"].is_number(), "{first}");
    assert_rfc3339(&first["created_at"]);
    let system = &page["messages"][0];
    assert_eq!(system["role"], "system");
    assert!(system["model"].is_null());
    assert_eq!(page["messages"][2]["role"], "assistant");
}

#[tokio::test]
async fn order_desc_lists_newest_first() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (thread, ids) = seeded_thread(&app, &session).await;
    let page = app
        .get_ok(
            &format!("/api/v1/threads/{thread}/messages?order=desc"),
            session.token(),
        )
        .await;
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(message_ids(&page), expected);
    let asc = app
        .get_ok(
            &format!("/api/v1/threads/{thread}/messages?order=asc"),
            session.token(),
        )
        .await;
    assert_eq!(message_ids(&asc), ids);
}

async fn walk(app: &TestApp, token: &str, first_path: &str) -> (Vec<usize>, Vec<Uuid>) {
    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    let mut path = first_path.to_owned();
    loop {
        let page = app.get_ok(&path, token).await;
        let ids = message_ids(&page);
        sizes.push(ids.len());
        seen.extend(ids);
        match &page["next_cursor"] {
            Value::Null => break,
            Value::String(cursor) => path = format!("{first_path}&cursor={cursor}"),
            other => panic!("next_cursor must be a string or null: {other}"),
        }
        assert!(sizes.len() < 10, "pagination does not end");
    }
    (sizes, seen)
}

#[tokio::test]
async fn cursor_pagination_covers_every_message_once_in_both_orders() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (thread, ids) = seeded_thread(&app, &session).await;
    let base = format!("/api/v1/threads/{thread}/messages?limit=3");

    let (sizes, seen) = walk(&app, session.token(), &base).await;
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(seen, ids);

    let (sizes, seen) = walk(&app, session.token(), &format!("{base}&order=desc")).await;
    assert_eq!(sizes, vec![3, 3, 1]);
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected);

    // Exactly one full page ends the list.
    let (sizes, _) = walk(
        &app,
        session.token(),
        &format!("/api/v1/threads/{thread}/messages?limit=7"),
    )
    .await;
    assert_eq!(sizes, vec![7]);
}

#[tokio::test]
async fn model_filter_lists_only_that_models_messages() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (thread, ids) = seeded_thread(&app, &session).await;

    let gpt = app
        .get_ok(
            &format!("/api/v1/threads/{thread}/messages?model=gpt-4o"),
            session.token(),
        )
        .await;
    assert_eq!(message_ids(&gpt), vec![ids[1], ids[2], ids[5], ids[6]]);
    assert!(
        gpt["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["model"] == "gpt-4o")
    );

    let (sizes, seen) = walk(
        &app,
        session.token(),
        &format!("/api/v1/threads/{thread}/messages?model=claude-sonnet-4&limit=1&order=desc"),
    )
    .await;
    assert_eq!(sizes, vec![1, 1]);
    assert_eq!(seen, vec![ids[4], ids[3]]);

    let none = app
        .get_ok(
            &format!("/api/v1/threads/{thread}/messages?model=mistral-large"),
            session.token(),
        )
        .await;
    assert_eq!(none["messages"], json!([]));
    assert!(none["next_cursor"].is_null());
}

#[tokio::test]
async fn an_empty_thread_has_an_empty_first_page() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = app.create_thread(session.token(), &json!({})).await;
    let page = app
        .get_ok(
            &format!(
                "/api/v1/threads/{}/messages",
                thread["id"].as_str().unwrap()
            ),
            session.token(),
        )
        .await;
    assert_eq!(page, json!({ "messages": [], "next_cursor": null }));
}

#[tokio::test]
async fn bad_list_parameters_are_400_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let (thread, _) = seeded_thread(&app, &session).await;
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("order=sideways", "order"),
        ("model=has%20space", "model"),
    ] {
        let response = app
            .get(
                &format!("/api/v1/threads/{thread}/messages?{query}"),
                session.token(),
            )
            .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(param) || error["details"]["field"] == param,
            "`{query}` should name `{param}`: {error}"
        );
    }
    // Limits at the edges are fine.
    for query in ["limit=1", "limit=100"] {
        app.get_ok(
            &format!("/api/v1/threads/{thread}/messages?{query}"),
            session.token(),
        )
        .await;
    }
}
