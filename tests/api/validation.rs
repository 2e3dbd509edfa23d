//! Bad input gets a clear error in the envelope and changes nothing: missing and mistyped fields,
//! unknown fields, malformed JSON, wrong content types, oversized bodies, bad list parameters,
//! invalid registrations.

use futures_util::stream;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{PASSWORD, TestApp, assert_error, body_json, message_of, unique_email};

fn field_named(error: &serde_json::Value, field: &str) -> bool {
    message_of(error).contains(field)
        || error["details"]["field"]
            .as_str()
            .is_some_and(|f| f.contains(field))
}

#[tokio::test]
async fn missing_required_fields_are_400() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let cases = [
        (
            "/api/v1/auth/register",
            json!({ "email": unique_email() }),
            "password",
        ),
        (
            "/api/v1/auth/register",
            json!({ "password": PASSWORD }),
            "email",
        ),
        (
            "/api/v1/auth/login",
            json!({ "email": session.email }),
            "password",
        ),
        ("/api/v1/auth/refresh", json!({}), "refresh_token"),
        ("/api/v1/auth/logout", json!({}), "refresh_token"),
    ];
    for (path, body, field) in cases {
        let response = app.post_json(path, None, &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(field_named(&error, field), "{path} {body}: {error}");
    }
    let response = app
        .post_json("/api/v1/me/api-keys", Some(session.token()), &json!({}))
        .await;
    let error = assert_error(response, 400, "VALIDATION_ERROR").await;
    assert!(field_named(&error, "name"), "{error}");
}

#[tokio::test]
async fn wrong_types_are_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = app
        .create_thread(session.token(), &json!({ "title": "t" }))
        .await;
    let thread_path = format!("/api/v1/threads/{}", thread["id"].as_str().unwrap());

    let cases = [
        (
            Method::POST,
            "/api/v1/auth/register".to_owned(),
            json!({ "email": 5, "password": PASSWORD }),
            "email",
        ),
        (
            Method::POST,
            "/api/v1/auth/login".to_owned(),
            json!({ "email": session.email, "password": ["x"] }),
            "password",
        ),
        (
            Method::POST,
            "/api/v1/threads".to_owned(),
            json!({ "title": 12 }),
            "title",
        ),
        (
            Method::POST,
            "/api/v1/threads".to_owned(),
            json!({ "model": { "id": "gpt-4o" } }),
            "model",
        ),
        (
            Method::PATCH,
            thread_path.clone(),
            json!({ "bookmarked": "yes" }),
            "bookmarked",
        ),
        (
            Method::PATCH,
            thread_path.clone(),
            json!({ "system_prompt": false }),
            "system_prompt",
        ),
        (
            Method::PATCH,
            "/api/v1/me".to_owned(),
            json!({ "settings": "dark" }),
            "settings",
        ),
    ];
    for (method, path, body, field) in cases {
        let response = app
            .request(method.clone(), &path)
            .bearer_auth(session.token())
            .json(&body)
            .send()
            .await
            .unwrap();
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(
            field_named(&error, field),
            "{method} {path} {body}: {error}"
        );
    }
    let unchanged = app.get_ok(&thread_path, session.token()).await;
    assert_eq!(unchanged["thread"]["title"], "t");
    assert_eq!(unchanged["thread"]["bookmarked"], false);
}

#[tokio::test]
async fn a_body_that_is_json_but_not_an_object_is_400_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;

    let response = app
        .post_json(
            "/api/v1/threads",
            Some(session.token()),
            &json!(["array title"]),
        )
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    for body in [
        json!([]),
        json!("a string"),
        json!(42),
        json!(null),
        json!(true),
    ] {
        let response = app
            .post_json("/api/v1/threads", Some(session.token()), &body)
            .await;
        assert_error(response, 400, "VALIDATION_ERROR").await;
    }
    let threads = app.get_ok("/api/v1/threads", session.token()).await;
    assert_eq!(
        threads["threads"],
        json!([]),
        "a non-object body created a thread"
    );

    // Not even an account: fields are named, never positional.
    let email = unique_email();
    let response = app
        .post_json("/api/v1/auth/register", None, &json!([email, PASSWORD]))
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    let login = app.login_raw(&email, PASSWORD).await;
    assert_error(login, 401, "UNAUTHENTICATED").await;

    let response = app
        .patch_json("/api/v1/me", session.token(), &json!(["Positional Name"]))
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    let me = app.get_ok("/api/v1/me", session.token()).await;
    assert!(me["user"]["display_name"].is_null(), "{me}");
}

#[tokio::test]
async fn unknown_fields_are_400() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = app
        .create_thread(session.token(), &json!({ "title": "t" }))
        .await;
    let thread_path = format!("/api/v1/threads/{}", thread["id"].as_str().unwrap());

    let email = unique_email();
    let response = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": email, "password": PASSWORD, "role": "admin" }),
        )
        .await;
    let error = assert_error(response, 400, "VALIDATION_ERROR").await;
    assert!(message_of(&error).contains("role"), "{error}");
    // Nothing was created: the same email registers fine afterwards, as a plain user.
    let registered = app.register(&email, PASSWORD).await;
    assert_eq!(registered.user["role"], "user");

    let cases = [
        (
            "/api/v1/threads",
            json!({ "title": "x", "titel": "typo" }),
            "titel",
        ),
        (
            "/api/v1/me/api-keys",
            json!({ "name": "k", "scopes": ["admin"] }),
            "scopes",
        ),
    ];
    for (path, body, field) in cases {
        let response = app.post_json(path, Some(session.token()), &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(message_of(&error).contains(field), "{path}: {error}");
    }
    let response = app
        .patch_json(
            &thread_path,
            session.token(),
            &json!({ "title": "new", "pinned": true }),
        )
        .await;
    let error = assert_error(response, 400, "VALIDATION_ERROR").await;
    assert!(message_of(&error).contains("pinned"), "{error}");
    let unchanged = app.get_ok(&thread_path, session.token()).await;
    assert_eq!(
        unchanged["thread"]["title"], "t",
        "a refused patch changed the thread"
    );
    let threads = app.get_ok("/api/v1/threads", session.token()).await;
    assert_eq!(
        threads["threads"].as_array().unwrap().len(),
        1,
        "a refused create stored a thread"
    );
}

#[tokio::test]
async fn malformed_json_is_400_saying_so() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    for body in [
        "{\"title\": ",
        "{title: 'x'}",
        "{\"title\": \"x\"} trailing",
        "{\"title\": \"x\",}",
        "nul",
    ] {
        let response = app
            .send_raw(
                Method::POST,
                "/api/v1/threads",
                Some(session.token()),
                Some("application/json"),
                body,
            )
            .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(
            message_of(&error).to_lowercase().contains("malformed json"),
            "{body:?}: {error}"
        );
    }
    let response = app
        .send_raw(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some("application/json"),
            "{\"email\":",
        )
        .await;
    let error = assert_error(response, 400, "VALIDATION_ERROR").await;
    assert!(
        message_of(&error).to_lowercase().contains("malformed json"),
        "{error}"
    );
    let threads = app.get_ok("/api/v1/threads", session.token()).await;
    assert_eq!(threads["threads"], json!([]));
}

#[tokio::test]
async fn a_non_json_content_type_is_415() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let body = json!({ "title": "x" }).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let response = app
            .send_raw(
                Method::POST,
                "/api/v1/threads",
                Some(session.token()),
                content_type,
                body.clone(),
            )
            .await;
        assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    }
    let response = app
        .send_raw(
            Method::POST,
            "/api/v1/auth/register",
            None,
            Some("text/plain"),
            json!({ "email": unique_email(), "password": PASSWORD }).to_string(),
        )
        .await;
    assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE").await;

    // Parameters and case do not matter.
    let response = app
        .send_raw(
            Method::POST,
            "/api/v1/threads",
            Some(session.token()),
            Some("Application/JSON; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let threads = app.get_ok("/api/v1/threads", session.token()).await;
    assert_eq!(threads["threads"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let app = TestApp::builder()
        .env("CHORUS__SERVER__BODY_LIMIT_BYTES", "1024")
        .spawn()
        .await;
    let session = app.register_user().await;

    // Declared length over the limit.
    // Oversized requests go over their own connections: the server may close a connection whose
    // body it did not read, and a pooled client would then reuse a dead connection.
    let big = json!({ "title": "x".repeat(2000) });
    let response = app
        .unpooled_request(Method::POST, "/api/v1/threads")
        .bearer_auth(session.token())
        .json(&big)
        .send()
        .await
        .unwrap();
    let error = assert_error(response, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(error["details"]["limit_bytes"], 1024, "{error}");
    let response = app
        .unpooled_request(Method::POST, "/api/v1/auth/register")
        .json(&json!({ "email": unique_email(), "password": "p".repeat(1500) }))
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "PAYLOAD_TOO_LARGE").await;

    // No Content-Length: a chunked body that grows past the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"title\": \"".to_vec()),
        Ok(vec![b'y'; 600]),
        Ok(vec![b'y'; 600]),
        Ok(vec![b'y'; 600]),
        Ok(b"\"}".to_vec()),
    ];
    let response = app
        .unpooled_request(Method::POST, "/api/v1/threads")
        .bearer_auth(session.token())
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream::iter(chunks)))
        .send()
        .await
        .expect("the server should answer the oversized stream");
    assert_error(response, 413, "PAYLOAD_TOO_LARGE").await;

    // A chunked body under the limit is fine.
    let small: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(b"{\"title\": ".to_vec()), Ok(b"\"chunked\"}".to_vec())];
    let response = app
        .request(Method::POST, "/api/v1/threads")
        .bearer_auth(session.token())
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream::iter(small)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(body_json(response).await["thread"]["title"], "chunked");

    // Nothing oversized was stored, and the server still answers.
    let threads = app.get_ok("/api/v1/threads", session.token()).await;
    let titles: Vec<&str> = threads["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["title"].as_str())
        .collect();
    assert_eq!(titles, vec!["chunked"]);
}

#[tokio::test]
async fn bad_thread_list_parameters_are_400() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    app.create_thread(session.token(), &json!({ "title": "t" }))
        .await;
    let long_q = format!("q={}", "a".repeat(201));
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=eyJ1IjoxfQ", "cursor"),
        ("bookmarked=maybe", "bookmarked"),
        (long_q.as_str(), "q"),
    ] {
        let response = app
            .get(&format!("/api/v1/threads?{query}"), session.token())
            .await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(field_named(&error, param), "`{query}`: {error}");
    }
    for query in ["limit=1", "limit=100"] {
        app.get_ok(&format!("/api/v1/threads?{query}"), session.token())
            .await;
    }
}

#[tokio::test]
async fn invalid_registrations_are_400_and_create_nothing() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({ "email": "not-an-email", "password": PASSWORD }),
            "email",
        ),
        (json!({ "email": "a@b", "password": PASSWORD }), "email"),
        (
            json!({ "email": "two words@example.com", "password": PASSWORD }),
            "email",
        ),
        (json!({ "email": "", "password": PASSWORD }), "email"),
        (
            json!({ "email": format!("{}@example.com", "a".repeat(250)), "password": PASSWORD }),
            "email",
        ),
        (
            json!({ "email": unique_email(), "password": "short" }),
            "password",
        ),
        (
            json!({ "email": unique_email(), "password": "" }),
            "password",
        ),
        (
            json!({ "email": unique_email(), "password": "p".repeat(257) }),
            "password",
        ),
        (
            json!({ "email": unique_email(), "password": PASSWORD, "display_name": "n".repeat(101) }),
            "display_name",
        ),
    ];
    for (body, field) in cases {
        let response = app.post_json("/api/v1/auth/register", None, &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(field_named(&error, field), "{body}: {error}");
        // The refused account does not exist.
        if let Some(email) = body["email"].as_str().filter(|e| e.contains('.')) {
            let login = app.login_raw(email, PASSWORD).await;
            assert_error(login, 401, "UNAUTHENTICATED").await;
        }
    }
    // A short password did not reserve the email either.
    let email = unique_email();
    let response = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({ "email": email, "password": "short" }),
        )
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    app.register(&email, PASSWORD).await;
}

#[tokio::test]
async fn a_duplicate_email_is_409_and_keeps_the_first_account() {
    let app = TestApp::spawn().await;
    let first = app.register_user().await;
    for email in [first.email.clone(), first.email.to_uppercase()] {
        let response = app
            .post_json(
                "/api/v1/auth/register",
                None,
                &json!({ "email": email, "password": "another-password-456" }),
            )
            .await;
        assert_error(response, 409, "CONFLICT").await;
    }
    // The original password still logs in; the attempted one does not.
    let login = app.login(&first.email, PASSWORD).await;
    assert_eq!(login.user_id, first.user_id);
    let wrong = app.login_raw(&first.email, "another-password-456").await;
    assert_error(wrong, 401, "UNAUTHENTICATED").await;
}

#[tokio::test]
async fn an_invalid_patch_leaves_the_thread_as_it_was() {
    let app = TestApp::spawn().await;
    let session = app.register_user().await;
    let thread = app
        .create_thread(
            session.token(),
            &json!({ "title": "original", "model": "gpt-4o", "system_prompt": "p" }),
        )
        .await;
    let path = format!("/api/v1/threads/{}", thread["id"].as_str().unwrap());
    let before = app.get_ok(&path, session.token()).await;

    let cases = [
        (
            json!({ "title": "changed", "model": "not a model!" }),
            "model",
        ),
        (
            json!({ "title": "changed", "model": "m".repeat(101) }),
            "model",
        ),
        (
            json!({ "title": "t".repeat(201), "bookmarked": true }),
            "title",
        ),
        (
            json!({ "bookmarked": true, "title": "changed", "model": "" }),
            "model",
        ),
    ];
    for (body, field) in cases {
        let response = app.patch_json(&path, session.token(), &body).await;
        let error = assert_error(response, 400, "VALIDATION_ERROR").await;
        assert!(field_named(&error, field), "{body}: {error}");
    }
    let after = app.get_ok(&path, session.token()).await;
    assert_eq!(
        after, before,
        "a refused patch must change nothing (updated_at included)"
    );

    // Creating with an invalid model stores nothing.
    let response = app
        .post_json(
            "/api/v1/threads",
            Some(session.token()),
            &json!({ "title": "new", "model": "a b" }),
        )
        .await;
    assert_error(response, 400, "VALIDATION_ERROR").await;
    let list = app.get_ok("/api/v1/threads", session.token()).await;
    assert_eq!(list["threads"].as_array().unwrap().len(), 1);
}
